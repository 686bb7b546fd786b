//! The control loops of `orq server`, each group behind leader election on its own Lease in
//! `kube-system`, as kube-scheduler and kube-controller-manager run beside kube-apiserver:
//! `kube-scheduler` for the scheduler, `kube-controller-manager` for every other loop. With
//! several servers on one datastore, each competes and one of each acts; the others keep
//! their caches warm and take over when the holder stops renewing (a SIGKILL, a partition)
//! — within [`LEASE_DURATION`] + [`RETRY_PERIOD`] (12 s), and a leader that cannot renew
//! for [`RENEW_DEADLINE`] (7 s) stops acting first, so no two act at once.
//!
//! A manager that lost its Lease has stopped its controllers and cannot be restarted, so
//! each group is a loop of manager incarnations: a fresh manager (with a registry of its
//! own, merged into the server's `/metrics` through [`Running`]) competes again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orquestra_operator::{Health, LeaderElection, Manager};
use prometheus::Registry;
use prometheus::proto::MetricFamily;

use crate::operator::ControllerArgs;

/// The namespace of the leader Leases.
pub const LEASE_NAMESPACE: &str = "kube-system";

/// How long a leader Lease stays valid unrenewed.
pub const LEASE_DURATION: Duration = Duration::from_secs(10);
/// How long a leader keeps failing to renew before it stops acting.
pub const RENEW_DEADLINE: Duration = Duration::from_secs(7);
/// How often leaders renew and candidates try.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// A group of control loops with a Lease of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Group {
    /// The scheduler (Lease `kube-scheduler`).
    Scheduler,
    /// Every other control loop (Lease `kube-controller-manager`).
    Controllers,
}

impl Group {
    /// Both groups, in the order they start.
    pub const ALL: [Group; 2] = [Group::Scheduler, Group::Controllers];

    /// The Lease the group's leader holds (the names kube-scheduler and
    /// kube-controller-manager use, so tools that look for them find them).
    pub fn lease(self) -> &'static str {
        match self {
            Group::Scheduler => "kube-scheduler",
            Group::Controllers => "kube-controller-manager",
        }
    }

    /// The part of a `--controllers` selection that is this group's.
    pub fn selection(self, all: &[String]) -> Vec<String> {
        match self {
            Group::Scheduler if orquestra_controllers::enabled(all, "scheduler") => {
                vec!["scheduler".to_owned()]
            }
            Group::Scheduler => Vec::new(),
            Group::Controllers => {
                let mut rest = all.to_vec();
                rest.push("-scheduler".to_owned());
                rest
            }
        }
    }
}

/// The current manager of each running group: what the server's `/metrics` and `/readyz`
/// read.
#[derive(Clone, Default)]
pub struct Running(Arc<Mutex<BTreeMap<Group, (Registry, Health)>>>);

impl Running {
    fn set(&self, group: Group, registry: Registry, health: Health) {
        if let Ok(mut running) = self.0.lock() {
            running.insert(group, (registry, health));
        }
    }

    /// `Ok` unless a group's controllers are stalled (then which and why).
    pub fn controllers(&self) -> Result<(), String> {
        let running = self.0.lock().map(|r| r.clone()).unwrap_or_default();
        running
            .values()
            .map(|(_, health)| health.controllers())
            .collect::<Result<Vec<()>, String>>()
            .map(|_| ())
    }

    /// The groups' metric families merged into `base`'s (a family two registries share,
    /// like `workqueue_depth`, becomes one, its series distinct by their labels).
    pub fn gather(&self, base: &Registry) -> Vec<MetricFamily> {
        let registries: Vec<Registry> = self
            .0
            .lock()
            .map(|r| r.values().map(|(registry, _)| registry.clone()).collect())
            .unwrap_or_default();
        merge(
            std::iter::once(base)
                .chain(registries.iter())
                .flat_map(Registry::gather),
        )
    }
}

/// Families with the same name merged into one, sorted by name.
fn merge(families: impl Iterator<Item = MetricFamily>) -> Vec<MetricFamily> {
    let mut merged: BTreeMap<String, MetricFamily> = BTreeMap::new();
    for family in families {
        match merged.get_mut(family.name()) {
            Some(existing) => {
                for metric in family.get_metric() {
                    existing.mut_metric().push(metric.clone());
                }
            }
            None => {
                merged.insert(family.name().to_owned(), family);
            }
        }
    }
    merged.into_values().collect()
}

/// How one group runs.
pub struct Elected {
    /// The group.
    pub group: Group,
    /// The API client its controllers use.
    pub client: kube::Client,
    /// The whole `--controllers` selection and the loops' settings.
    pub args: ControllerArgs,
    /// The CA published as `kube-root-ca.crt` when `--root-ca-file` names none.
    pub own_ca: Option<String>,
    /// This server's identity in the Leases.
    pub identity: String,
    /// Where the current incarnation's registry and health are published.
    pub running: Running,
}

impl Elected {
    /// Whether the group has any loop selected.
    pub fn selects_any(&self) -> bool {
        orquestra_controllers::BUILTIN.iter().any(|b| {
            orquestra_controllers::enabled(&self.group.selection(&self.args.controllers), b.name)
        }) || (self.group == Group::Controllers && self.args.selects_custom())
    }

    /// Competes for the group's Lease and runs its loops while holding it, over and over
    /// (a lost Lease starts a fresh candidate) until `stop` resolves.
    pub async fn run(self, stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut args = self.args.clone();
        args.controllers = self.group.selection(&self.args.controllers);
        loop {
            let registry = Registry::new();
            let mut manager = Manager::with_registry(self.client.clone(), registry.clone());
            let added = args.add_to(&mut manager, self.own_ca.clone())?;
            if added.is_empty() {
                return Ok(());
            }
            let mut election =
                LeaderElection::new(LEASE_NAMESPACE, self.group.lease(), self.identity.clone());
            // Shorter than client-go's 15 s / 10 s so a standby takes over within 12 s of
            // a leader's death (the 2 s retry after the 10 s Lease); the 3 s between the
            // renew deadline and the duration is the margin by which a cut-off leader
            // stops before anyone else may start.
            election.lease_duration = LEASE_DURATION;
            election.renew_deadline = RENEW_DEADLINE;
            election.retry_period = RETRY_PERIOD;
            manager.leader_election(election)?;
            self.running.set(self.group, registry, manager.health());
            tracing::info!(lease = self.group.lease(), controllers = ?added, identity = %self.identity, "competing for the Lease");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let mut stopped = stop.clone();
            let shutdown = async move {
                let _ = stopped.wait_for(|stop| *stop).await;
            };
            match manager.run_on(listener, shutdown).await {
                Ok(()) => return Ok(()),
                Err(error) => {
                    if *stop.borrow() {
                        return Ok(());
                    }
                    tracing::warn!(lease = self.group.lease(), %error, "the control loops stopped; competing for the Lease again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

/// This server's identity in Leases: the hostname and an id kept in the data dir, so a
/// restarted server is the same holder (it takes its Leases back at once instead of waiting
/// for them to expire) while servers on other data dirs never collide. Only one process can
/// hold a data dir (its lock), so one identity is never two live holders.
pub fn identity(data_dir: &std::path::Path) -> anyhow::Result<String> {
    use anyhow::Context;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "orq".into());
    let path = data_dir.join("server-id");
    let id = match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
        _ => {
            let mut bytes = [0u8; 6];
            use std::io::Read;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut bytes))
                .context("reading /dev/urandom for the server's id")?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            orquestra_apiserver::identity::write_private(&path, id.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            id
        }
    };
    Ok(format!("{host}_{id}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_scheduler_has_a_lease_of_its_own() {
        assert_eq!(
            Group::Scheduler.selection(&list(&["*"])),
            list(&["scheduler"])
        );
        assert!(
            Group::Scheduler
                .selection(&list(&["*", "-scheduler"]))
                .is_empty()
        );
        let rest = Group::Controllers.selection(&list(&["*"]));
        assert!(!orquestra_controllers::enabled(&rest, "scheduler"));
        assert!(orquestra_controllers::enabled(&rest, "replicaset"));
    }

    #[test]
    fn families_of_the_same_name_merge() {
        let a = Registry::new();
        let b = Registry::new();
        let counter = |registry: &Registry, controller: &str| {
            let c = prometheus::IntCounterVec::new(
                prometheus::Opts::new("reconcile_total", "Reconciles."),
                &["controller"],
            )
            .unwrap();
            registry.register(Box::new(c.clone())).unwrap();
            c.with_label_values(&[controller]).inc();
        };
        counter(&a, "scheduler");
        counter(&b, "replicaset");
        let merged = merge(a.gather().into_iter().chain(b.gather()));
        assert_eq!(merged.len(), 1);
        assert_eq!(merged[0].get_metric().len(), 2);
    }

    #[test]
    fn the_identity_is_kept_in_the_data_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = identity(dir.path()).unwrap();
        assert_eq!(identity(dir.path()).unwrap(), first);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(identity(other.path()).unwrap(), first);
    }
}
