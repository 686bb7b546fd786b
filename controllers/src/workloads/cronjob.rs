//! The CronJob controller (`cronjob`), as kube-controller-manager's (v2): creates a Job
//! from `jobTemplate` at each time `spec.schedule` names (in `spec.timeZone`, else the
//! server's zone), named `<cronjob>-<minutes since the epoch>` so a time is never run
//! twice, annotated with `batch.kubernetes.io/cronjob-scheduled-timestamp`.
//!
//! Only the most recent missed time runs (a controller that was down does not catch up on
//! every one), and not when `startingDeadlineSeconds` has passed since it (`MissSchedule`).
//! `concurrencyPolicy` decides what an unfinished Job means for the next: `Allow` runs both,
//! `Forbid` skips the time, `Replace` deletes the running Job first. `suspend` stops new
//! runs. Status keeps the `active` Jobs, `lastScheduleTime` and `lastSuccessfulTime`;
//! finished Jobs beyond `successfulJobsHistoryLimit`/`failedJobsHistoryLimit` are deleted,
//! oldest first. Between times the loop sleeps until the next one.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use jiff::tz::TimeZone;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use orquestra_cron::Schedule;
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::{Value, json};

use crate::events::{EventType, publish};
use crate::objects::controller_ref;
use crate::workloads::job::finished;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["batch"],
        resources: &["cronjobs"],
        verbs: READ,
    },
    Rule {
        api_groups: &["batch"],
        resources: &["cronjobs/status"],
        verbs: &["patch", "update"],
    },
    Rule {
        api_groups: &["batch"],
        resources: &["jobs"],
        verbs: &["get", "list", "watch", "create", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "cronjob-controller";
/// The annotation with the time a Job was scheduled for (RFC 3339, in the CronJob's zone).
pub const SCHEDULED_TIMESTAMP: &str = "batch.kubernetes.io/cronjob-scheduled-timestamp";

/// Missed times beyond this are reported (`TooManyMissedTimes`), as kube does.
const MISSED_REPORTED: usize = 100;

/// What can go wrong reconciling one CronJob (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum CronJobError {
    /// A Job could not be created or deleted, or the status written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
    /// The job template does not make a Job.
    #[error("building a job from the template of {cronjob}: {source}")]
    Template {
        /// The CronJob.
        cronjob: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// What the reconciler shares.
pub struct Context {
    client: Client,
    jobs: Store<Job>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CronJobContext").finish_non_exhaustive()
    }
}

/// Adds the CronJob controller to `manager`.
pub fn add(manager: &mut Manager) {
    let cronjobs = manager.cache::<CronJob>(watcher::Config::default());
    let jobs = manager.cache::<Job>(watcher::Config::default());
    let context = Arc::new(Context {
        client: manager.client(),
        jobs: jobs.store(),
    });
    let runner = Runner::for_cache("cronjob", &cronjobs)
        .and_then(|r| r.owns(&jobs))
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

/// The Job name for a scheduled time: the CronJob's name and the time in minutes.
pub fn job_name(cronjob: &str, at: Timestamp) -> String {
    format!("{cronjob}-{}", at.as_second().div_euclid(60))
}

fn rfc3339(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn reference(job: &Job) -> Value {
    json!({"kind": "Job", "apiVersion": "batch/v1", "name": job.name_any(),
           "namespace": job.namespace(), "uid": job.uid(), "resourceVersion": job.resource_version()})
}

async fn reconcile(cj: Arc<CronJob>, ctx: Arc<Context>) -> Result<Action, CronJobError> {
    let namespace = cj.namespace().unwrap_or_default();
    let name = cj.name_any();
    let uid = cj.uid().unwrap_or_default();
    let spec = cj.spec.clone();
    let status = cj.status.clone().unwrap_or_default();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut owned: Vec<Arc<Job>> = ctx
        .jobs
        .state()
        .into_iter()
        .filter(|j| {
            j.namespace().as_deref() == Some(namespace.as_str())
                && controller_ref(j.as_ref()).is_some_and(|o| o.uid == uid)
        })
        .collect();
    owned.sort_by_key(|j| j.metadata.creation_timestamp.as_ref().map(|t| t.0));

    // The active list: owned Jobs not finished; listed ones that are gone are reported.
    let mut active: Vec<Value> = Vec::new();
    let mut last_successful = status.last_successful_time.as_ref().map(|t| t.0);
    for listed in status.active.iter().flatten() {
        let still = owned
            .iter()
            .any(|j| j.uid().as_deref() == listed.uid.as_deref());
        if !still && ctx.jobs.state().iter().all(|j| j.uid() != listed.uid) {
            let job = listed.name.clone().unwrap_or_default();
            publish(
                &ctx.client,
                MANAGER,
                cj.as_ref(),
                EventType::Normal,
                "MissingJob",
                &format!("Active job went missing: {job}"),
            )
            .await;
        }
    }
    for job in &owned {
        match finished(job) {
            None if job.metadata.deletion_timestamp.is_none() => active.push(reference(job)),
            None => {}
            Some(condition) => {
                let was_active = status
                    .active
                    .iter()
                    .flatten()
                    .any(|r| r.uid.as_deref() == job.uid().as_deref());
                if was_active {
                    publish(
                        &ctx.client,
                        MANAGER,
                        cj.as_ref(),
                        EventType::Normal,
                        "SawCompletedJob",
                        &format!(
                            "Saw completed job: {}, status: {}",
                            job.name_any(),
                            condition.type_
                        ),
                    )
                    .await;
                }
                if condition.type_ == "Complete" {
                    let done = job
                        .status
                        .as_ref()
                        .and_then(|s| s.completion_time.as_ref())
                        .map(|t| t.0);
                    last_successful = last_successful.max(done);
                }
            }
        }
    }

    // History: the oldest finished Jobs beyond the limits go.
    for (kind, limit) in [
        ("Complete", spec.successful_jobs_history_limit.unwrap_or(3)),
        ("Failed", spec.failed_jobs_history_limit.unwrap_or(1)),
    ] {
        let done: Vec<&Arc<Job>> = owned
            .iter()
            .filter(|j| {
                j.metadata.deletion_timestamp.is_none()
                    && finished(j).is_some_and(|c| c.type_ == kind)
            })
            .collect();
        let extra = done.len().saturating_sub(limit.max(0) as usize);
        for job in done.into_iter().take(extra) {
            delete_job(&jobs_api, job, &cj, &ctx).await?;
        }
    }

    let mut last_schedule = status.last_schedule_time.as_ref().map(|t| t.0);
    let mut next_wake: Option<Duration> = None;
    if cj.meta().deletion_timestamp.is_none() && spec.suspend != Some(true) {
        let zone = match spec.time_zone.as_deref() {
            Some(z) => TimeZone::get(z).ok(),
            None => Some(TimeZone::system()),
        };
        match (Schedule::parse(&spec.schedule), zone) {
            (Ok(schedule), Some(tz)) => {
                let now = Timestamp::now();
                let created = cj.metadata.creation_timestamp.as_ref().map_or(now, |t| t.0);
                let mut earliest = last_schedule.unwrap_or(created);
                if let Some(s) = spec.starting_deadline_seconds {
                    earliest = earliest.max(now - jiff::SignedDuration::from_secs(s));
                }
                let (latest, missed) = schedule.latest_between(earliest, now, &tz, MISSED_REPORTED);
                if missed > MISSED_REPORTED {
                    publish(
                        &ctx.client,
                        MANAGER,
                        cj.as_ref(),
                        EventType::Warning,
                        "TooManyMissedTimes",
                        "too many missed start times. Set or decrease .spec.startingDeadlineSeconds or check clock skew",
                    )
                    .await;
                }
                if let Some(at) = latest {
                    let late = spec
                        .starting_deadline_seconds
                        .is_some_and(|s| now > at + jiff::SignedDuration::from_secs(s));
                    let job = job_name(&name, at);
                    let exists = owned.iter().any(|j| j.name_any() == job)
                        || ctx
                            .jobs
                            .state()
                            .iter()
                            .any(|j| j.name_any() == job && j.namespace() == cj.namespace());
                    if late {
                        publish(
                            &ctx.client,
                            MANAGER,
                            cj.as_ref(),
                            EventType::Warning,
                            "MissSchedule",
                            &format!("Missed scheduled time to start a job: {}", rfc3339(at)),
                        )
                        .await;
                    } else if !exists {
                        let policy = spec.concurrency_policy.as_deref().unwrap_or("Allow");
                        let run = match policy {
                            "Forbid" if !active.is_empty() => {
                                tracing::debug!(cronjob = %name, "not starting a job: one is still active (Forbid)");
                                false
                            }
                            "Replace" => {
                                for job in owned.iter().filter(|j| {
                                    finished(j).is_none() && j.metadata.deletion_timestamp.is_none()
                                }) {
                                    delete_job(&jobs_api, job, &cj, &ctx).await?;
                                }
                                active.clear();
                                true
                            }
                            _ => true,
                        };
                        if run {
                            let created = create_job(&jobs_api, &cj, &job, at, &tz, &ctx).await?;
                            active.push(reference(&created));
                            last_schedule = Some(at);
                        }
                    }
                }
                if let Some(next) = schedule.next_after(now, &tz) {
                    next_wake = Duration::try_from(next.duration_since(now))
                        .ok()
                        .map(|d| d + Duration::from_millis(100));
                }
            }
            (Err(e), _) => {
                publish(
                    &ctx.client,
                    MANAGER,
                    cj.as_ref(),
                    EventType::Warning,
                    "UnparseableSchedule",
                    &format!("unparseable schedule: {:?} : {e}", spec.schedule),
                )
                .await;
            }
            (_, None) => {
                publish(
                    &ctx.client,
                    MANAGER,
                    cj.as_ref(),
                    EventType::Warning,
                    "UnknownTimeZone",
                    &format!("invalid timeZone: {:?}", spec.time_zone),
                )
                .await;
            }
        }
    }

    let desired = json!({
        "active": if active.is_empty() { Value::Null } else { json!(active) },
        "lastScheduleTime": last_schedule.map(rfc3339),
        "lastSuccessfulTime": last_successful.map(rfc3339),
    });
    let uids = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["uid"].as_str().map(str::to_owned))
            .collect()
    };
    let current = serde_json::to_value(&status).unwrap_or_default();
    let time = |v: &Value| v.as_str().and_then(|s| s.parse::<Timestamp>().ok());
    let changed = uids(&current["active"]) != uids(&desired["active"])
        || time(&current["lastScheduleTime"]) != time(&desired["lastScheduleTime"])
        || time(&current["lastSuccessfulTime"]) != time(&desired["lastSuccessfulTime"]);
    if changed {
        let cronjobs: Api<CronJob> = Api::namespaced(ctx.client.clone(), &namespace);
        cronjobs
            .patch_status(
                &name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"status": desired})),
            )
            .await
            .map_err(|source| CronJobError::Api {
                action: format!("updating the status of cronjob {name}"),
                source,
            })?;
    }
    Ok(next_wake.map_or_else(Action::await_change, Action::requeue))
}

async fn create_job(
    api: &Api<Job>,
    cj: &CronJob,
    name: &str,
    at: Timestamp,
    tz: &TimeZone,
    ctx: &Context,
) -> Result<Job, CronJobError> {
    let template = cj.spec.job_template.clone();
    let mut metadata =
        serde_json::to_value(template.metadata.unwrap_or_default()).unwrap_or_else(|_| json!({}));
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(cj.namespace());
    metadata["ownerReferences"] = json!(cj.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(true);
        vec![o]
    }));
    metadata["annotations"][SCHEDULED_TIMESTAMP] = json!(
        at.to_zoned(tz.clone())
            .strftime("%Y-%m-%dT%H:%M:%S%:z")
            .to_string()
    );
    let job: Job = serde_json::from_value(json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata, "spec": template.spec,
    }))
    .map_err(|source| CronJobError::Template {
        cronjob: cj.name_any(),
        source,
    })?;
    match api.create(&PostParams::default(), &job).await {
        Ok(created) => {
            publish(
                &ctx.client,
                MANAGER,
                cj,
                EventType::Normal,
                "SuccessfulCreate",
                &format!("Created job {name}"),
            )
            .await;
            Ok(created)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            api.get(name).await.map_err(|source| CronJobError::Api {
                action: format!("reading job {name}"),
                source,
            })
        }
        Err(source) => {
            publish(
                &ctx.client,
                MANAGER,
                cj,
                EventType::Warning,
                "FailedCreate",
                &format!("Error creating job: {source}"),
            )
            .await;
            Err(CronJobError::Api {
                action: format!("creating job {name}"),
                source,
            })
        }
    }
}

async fn delete_job(
    api: &Api<Job>,
    job: &Job,
    cj: &CronJob,
    ctx: &Context,
) -> Result<(), CronJobError> {
    let name = job.name_any();
    match api.delete(&name, &DeleteParams::background()).await {
        Ok(_) => {
            publish(
                &ctx.client,
                MANAGER,
                cj,
                EventType::Normal,
                "SuccessfulDelete",
                &format!("Deleted job {name}"),
            )
            .await;
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(CronJobError::Api {
            action: format!("deleting job {name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_names_count_minutes() {
        let at: Timestamp = "2026-12-03T10:05:00Z".parse().unwrap();
        assert_eq!(
            job_name("nightly", at),
            format!("nightly-{}", at.as_second() / 60)
        );
    }
}
