//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go does it, so that several
//! replicas of a manager can run and exactly one reconciles.
//!
//! Every `retry_period` each candidate reads the Lease: a free or expired Lease (its holder
//! did not renew within `lease_duration`) is taken with a compare-and-swap on its
//! resourceVersion; the holder renews it. A leader that cannot renew for `renew_deadline`
//! stops leading at once — before another candidate can see the Lease expire, since the
//! deadline is shorter than the duration. A leader that shuts down cleanly releases the Lease
//! so a standby takes over without waiting.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};

/// How a manager competes for leadership.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElection {
    /// The Lease's namespace.
    pub namespace: String,
    /// The Lease's name (one per set of competing managers).
    pub name: String,
    /// This candidate's identity (unique per replica: hostname, pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal (client-go default 15 s).
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up (10 s).
    pub renew_deadline: Duration,
    /// How often candidates try (2 s).
    pub retry_period: Duration,
}

impl LeaderElection {
    /// client-go's defaults for a Lease `namespace/name`, held as `identity`.
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        LeaderElection {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The outcome of one attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// This candidate holds the Lease (acquired or renewed).
    Leading,
    /// Someone else holds a valid Lease.
    Following,
}

/// One candidate's view of the Lease.
#[derive(Debug)]
pub(crate) struct Elector {
    config: LeaderElection,
    api: Api<Lease>,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl Elector {
    pub(crate) fn new(client: Client, config: LeaderElection) -> Elector {
        let api = Api::namespaced(client, &config.namespace);
        Elector { config, api }
    }

    pub(crate) fn config(&self) -> &LeaderElection {
        &self.config
    }

    /// Tries once to acquire or renew the Lease.
    pub(crate) async fn try_acquire_or_renew(&self) -> Result<Attempt, kube::Error> {
        let me = self.config.identity.as_str();
        let seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me.to_owned()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Attempt::Leading),
                Err(kube::Error::Api(s)) if s.reason == "AlreadyExists" => Ok(Attempt::Following),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().unwrap_or_default();
        if holder != me && !holder.is_empty() && !expired(spec) {
            return Ok(Attempt::Following);
        }
        if holder != me {
            spec.acquire_time = Some(now());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            spec.holder_identity = Some(me.to_owned());
        }
        spec.renew_time = Some(now());
        spec.lease_duration_seconds = Some(seconds);
        // The resourceVersion read is the precondition: two candidates cannot both win.
        match self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(Attempt::Leading),
            Err(kube::Error::Api(s)) if s.reason == "Conflict" => Ok(Attempt::Following),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up (a clean shutdown), if this candidate holds it.
    pub(crate) async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        if let Err(error) = self
            .api
            .replace(&self.config.name, &PostParams::default(), &lease)
            .await
        {
            tracing::warn!(%error, "releasing the leader Lease failed; it will expire");
        }
    }
}

/// Whether a Lease's holder has not renewed it within its duration.
fn expired(spec: &LeaseSpec) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let duration = i64::from(spec.lease_duration_seconds.unwrap_or(0));
    Timestamp::now().duration_since(renewed.0)
        > k8s_openapi::jiff::SignedDuration::from_secs(duration)
}
