//! The TTL-after-finished controller (`ttl-after-finished`), as kube-controller-manager's:
//! a finished Job (`Complete` or `Failed`) with `ttlSecondsAfterFinished` is deleted that
//! many seconds after it finished — in the foreground, so its pods go first. The finish
//! time is the terminal condition's transition time; the Job is read again before the
//! delete, so a TTL raised meanwhile is honoured.

use std::sync::Arc;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::Rule;
use orquestra_operator::{Manager, Runner};

use crate::workloads::job::finished;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[Rule {
    api_groups: &["batch"],
    resources: &["jobs"],
    verbs: &["get", "list", "watch", "delete"],
}];

/// Why a Job could not be expired (retried with backoff).
#[derive(Debug, thiserror::Error)]
#[error("{action}: {source}")]
pub struct TtlError {
    action: String,
    source: kube::Error,
}

/// What the reconciler shares.
pub struct Context {
    client: Client,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtlContext").finish_non_exhaustive()
    }
}

/// Adds the TTL-after-finished controller to `manager`.
pub fn add(manager: &mut Manager) {
    let jobs = manager.cache::<Job>(watcher::Config::default());
    let context = Arc::new(Context {
        client: manager.client(),
    });
    let runner = Runner::for_cache("ttl-after-finished", &jobs)
        .expect("the cache was just created, before run");
    manager.add(runner, reconcile, context);
}

/// When the Job expires, if it is finished and has a TTL.
fn expiry(job: &Job) -> Option<Timestamp> {
    let ttl = job.spec.as_ref()?.ttl_seconds_after_finished?;
    let done = finished(job)?;
    let at = done
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
        .or_else(|| job.status.as_ref()?.completion_time.as_ref().map(|t| t.0))?;
    Some(at + SignedDuration::from_secs(i64::from(ttl.max(0))))
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, TtlError> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(at) = expiry(&job) else {
        return Ok(Action::await_change());
    };
    let now = Timestamp::now();
    if at > now {
        let left = Duration::try_from(at.duration_since(now)).unwrap_or_default();
        return Ok(Action::requeue(left + Duration::from_millis(100)));
    }
    let name = job.name_any();
    let api: Api<Job> = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    // Read it fresh: a TTL changed since the cache saw it counts.
    let fresh = match api.get_opt(&name).await {
        Ok(Some(j)) => j,
        Ok(None) => return Ok(Action::await_change()),
        Err(source) => {
            return Err(TtlError {
                action: format!("reading job {name}"),
                source,
            });
        }
    };
    if expiry(&fresh).is_none_or(|at| at > now) {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: fresh.uid(),
            resource_version: None,
        }),
        ..DeleteParams::foreground()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Action::await_change()),
        Err(source) => Err(TtlError {
            action: format!("deleting expired job {name}"),
            source,
        }),
    }
}
