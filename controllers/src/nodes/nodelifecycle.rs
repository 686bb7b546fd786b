//! The node lifecycle controller: notices nodes that stopped talking and moves their pods.
//!
//! A node is alive while its agent renews its Lease in `kube-node-lease` (or posts its
//! status). As kube-controller-manager does, the grace period is counted on the controller's
//! own clock from the moment it last *saw* a sign of life change — the Lease's `renewTime` or
//! the Ready condition's `lastHeartbeatTime` — or first saw the node, never from the
//! timestamps themselves: a node registered a moment ago, or whose agent's clock is behind,
//! is not lost, and a new node without a Lease yet is "not yet", not "gone". A node that has
//! never posted a Ready condition gets the longer `node_startup_grace_period`.
//! Past the grace period without a sign of life, its conditions become
//! `Unknown` (`NodeStatusUnknown`, "Kubelet stopped posting node status.") and it is tainted
//! `node.kubernetes.io/unreachable` — `NoSchedule` so nothing new lands there, `NoExecute`
//! so its pods are evicted. A node whose agent reports `Ready=False` is tainted
//! `node.kubernetes.io/not-ready` the same way. A node that is Ready again loses both.
//!
//! The `NoExecute` taints are what evicts the node's pods: the taint eviction controller
//! ([`super::tainteviction`]) deletes those that do not tolerate them, or after their
//! `tolerationSeconds` (the API server gives every pod 300 s for these two taints by
//! default); their controllers then create replacements elsewhere. When every node (of more
//! than one) is down at once, no node gets — or keeps — a `NoExecute` lifecycle taint, so
//! nothing is evicted (kube's "full disruption": the problem is more likely the control
//! plane's network than every node).
//!
//! The state machine per node, from what the API shows:
//! registered (no Ready condition, no taint) —(status posted)→ `Ready`;
//! registered —(nothing for the startup grace period)→ `Unknown` + unreachable taints;
//! `Ready` —(no heartbeat for the grace period)→ `Unknown` + unreachable taints
//! —(heartbeat with Ready=True)→ `Ready`, taints removed.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{EventType, publish};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["nodes"],
        verbs: &["get", "list", "watch", "update"],
    },
    Rule {
        api_groups: &[""],
        resources: &["nodes/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &["coordination.k8s.io"],
        resources: &["leases"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The field manager of the controller's writes and the component of its events.
pub const MANAGER: &str = "node-lifecycle-controller";
/// The taint of a node whose agent stopped reporting.
pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
/// The taint of a node whose agent reports it not ready.
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";
const LEASE_NAMESPACE: &str = "kube-node-lease";

/// What can go wrong reconciling one node (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum NodeLifecycleError {
    /// The node's status or taints could not be written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
}

/// How long a node may stay silent (kube-controller-manager's flags of the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grace {
    /// A node that has posted its status is lost after this long without a sign of life
    /// (`--node-monitor-grace-period`).
    pub monitor: Duration,
    /// A node that has never posted a Ready condition gets this long from when it was
    /// first seen (`--node-startup-grace-period`, 60 s).
    pub startup: Duration,
}

/// The signs of life last seen of one node, and when, on the controller's clock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Observed {
    /// When a sign of life last changed (or the node was first seen).
    probed: Instant,
    /// The Ready condition's `lastHeartbeatTime` as last seen (`None`: no Ready condition).
    heartbeat: Option<Timestamp>,
    /// The Lease's `renewTime` as last seen.
    renewed: Option<Timestamp>,
}

/// What the controller makes of a node's silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdict {
    /// How long since the last sign of life (or since first seen).
    silent: Duration,
    /// The grace period that applies to this node now.
    grace: Duration,
}

impl Verdict {
    fn lost(&self) -> bool {
        self.silent > self.grace
    }
}

/// The controller's memory of every node's signs of life: a node's silence is measured on
/// the controller's clock (`now`, injected so tests can drive it) from the last time one of
/// them changed, never from the timestamps the agent wrote.
#[derive(Debug, Default)]
struct HealthTable {
    nodes: HashMap<String, Observed>,
}

impl HealthTable {
    /// Records what `node` and its `lease` show at `now` and judges its silence.
    fn observe(
        &mut self,
        node: &Node,
        lease: Option<&Lease>,
        now: Instant,
        grace: Grace,
    ) -> Verdict {
        // Only the heartbeat time counts, not the status: this controller's own change to
        // `Unknown` is not a sign of life.
        let heartbeat = ready_condition(node).map(|c| {
            c.last_heartbeat_time
                .as_ref()
                .or(c.last_transition_time.as_ref())
                .map_or(Timestamp::UNIX_EPOCH, |t| t.0)
        });
        let renewed = lease
            .and_then(|l| l.spec.as_ref())
            .and_then(|s| s.renew_time.as_ref())
            .map(|t| t.0);
        let name = node.metadata.name.clone().unwrap_or_default();
        let seen = self.nodes.entry(name).or_insert_with(|| Observed {
            probed: now,
            heartbeat,
            renewed,
        });
        // A new heartbeat or a newer renewal: alive at `now`.
        // A Lease that disappears is not a sign of life, nor of death.
        if heartbeat != seen.heartbeat {
            seen.heartbeat = heartbeat;
            seen.probed = now;
        }
        if renewed.is_some_and(|r| seen.renewed.is_none_or(|s| r > s)) {
            seen.renewed = renewed;
            seen.probed = now;
        }
        Verdict {
            silent: now.saturating_duration_since(seen.probed),
            grace: if heartbeat.is_some() {
                grace.monitor
            } else {
                grace.startup.max(grace.monitor)
            },
        }
    }

    /// Forgets nodes that are gone (kept small without a delete hook).
    fn retain(&mut self, present: impl Fn(&str) -> bool) {
        self.nodes.retain(|name, _| present(name));
    }
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    grace: Grace,
    health: Mutex<HealthTable>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLifecycleController")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// Adds the node lifecycle controller to `manager`; nodes are lost after `grace` without a
/// sign of life.
pub fn add(manager: &mut Manager, grace: Grace) {
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let leases = manager.cache::<Lease>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        nodes: nodes.store(),
        leases: leases.store(),
        grace,
        health: Mutex::default(),
    });
    let runner = Runner::for_cache("nodelifecycle", &nodes)
        .and_then(|r| {
            // A renewed node Lease is news for its node.
            r.watches(&leases, |lease: Arc<Lease>| {
                (lease.namespace().as_deref() == Some(LEASE_NAMESPACE))
                    .then(|| ObjectRef::<Node>::new(&lease.name_any()))
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

fn ready_condition(node: &Node) -> Option<&k8s_openapi::api::core::v1::NodeCondition> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
}

fn ready_status(node: &Node) -> &str {
    ready_condition(node).map_or("Unknown", |c| c.status.as_str())
}

fn taints(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
}

/// The node's taints with the lifecycle ones as its Ready condition (or silence) says: a
/// node that has not posted a Ready condition yet gets none; in a full disruption
/// (`no_execute` false) only the `NoSchedule` ones.
fn wanted_taints(node: &Node, lost: bool, no_execute: bool) -> Vec<Taint> {
    let status = ready_condition(node).map(|c| c.status.as_str());
    let mut taints: Vec<Taint> = taints(node)
        .into_iter()
        .filter(|t| t.key != UNREACHABLE && t.key != NOT_READY)
        .collect();
    let current = self::taints(node);
    let key = match status {
        _ if lost => Some(UNREACHABLE),
        Some("Unknown") => Some(UNREACHABLE),
        Some("False") => Some(NOT_READY),
        _ => None,
    };
    if let Some(key) = key {
        let effects: &[&str] = if no_execute {
            &["NoSchedule", "NoExecute"]
        } else {
            &["NoSchedule"]
        };
        for &effect in effects {
            // Keep the original timeAdded: tolerationSeconds count from it.
            let existing = current
                .iter()
                .find(|t| t.key == key && t.effect == effect)
                .cloned();
            taints.push(existing.unwrap_or_else(|| Taint {
                key: key.into(),
                effect: effect.into(),
                time_added: (effect == "NoExecute").then(|| Time(Timestamp::now())),
                value: None,
            }));
        }
    }
    taints
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Controller>) -> Result<Action, NodeLifecycleError> {
    let name = node.name_any();
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let lease = ctx
        .leases
        .get(&ObjectRef::new(&name).within(LEASE_NAMESPACE));
    let now = Timestamp::now();
    let verdict = {
        let mut health = ctx.health.lock().unwrap_or_else(|e| e.into_inner());
        if health.nodes.len() > ctx.nodes.state().len() {
            health.retain(|n| ctx.nodes.get(&ObjectRef::new(n)).is_some());
        }
        health.observe(&node, lease.as_deref(), Instant::now(), ctx.grace)
    };
    let lost = verdict.lost();
    let mut node = node;
    if lost && ready_condition(&node).map(|c| c.status.as_str()) != Some("Unknown") {
        tracing::info!(node = %name, silent = ?verdict.silent, "node stopped reporting; marking it Unknown");
        let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let mut conditions: Vec<serde_json::Value> = node
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|c| {
                let mut c = serde_json::to_value(c).unwrap_or_default();
                c["status"] = json!("Unknown");
                c["reason"] = json!("NodeStatusUnknown");
                c["message"] = json!("Kubelet stopped posting node status.");
                c["lastTransitionTime"] = json!(stamp);
                c
            })
            .collect();
        if ready_condition(&node).is_none() {
            // As kube-controller-manager: the heartbeat of a node that never posted one is
            // its creation.
            let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
            conditions.push(json!({
                "type": "Ready", "status": "Unknown", "reason": "NodeStatusNeverUpdated",
                "message": "Kubelet never posted node status.",
                "lastHeartbeatTime": created.map_or_else(|| stamp.clone(), |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                "lastTransitionTime": stamp,
            }));
        }
        let updated = nodes
            .patch_status(
                &name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"status": {"conditions": conditions}})),
            )
            .await
            .map_err(|source| NodeLifecycleError::Api {
                action: format!("marking node {name} Unknown"),
                source,
            })?;
        publish(
            &ctx.client,
            MANAGER,
            &updated,
            EventType::Normal,
            "NodeNotReady",
            &format!("Node {name} status is now: NodeNotReady"),
        )
        .await;
        node = Arc::new(updated);
    }
    let wanted = wanted_taints(&node, lost, !full_disruption(&ctx));
    if wanted != taints(&node) {
        let mut updated = (*node).clone();
        updated.spec.get_or_insert_with(Default::default).taints = Some(wanted.clone());
        updated.status = None;
        nodes
            .replace(&name, &Default::default(), &updated)
            .await
            .map_err(|source| NodeLifecycleError::Api {
                action: format!("updating the taints of node {name}"),
                source,
            })?;
    }
    // A live node is looked at again when its grace would run out; a lost one now and then,
    // to notice a full disruption starting or ending.
    Ok(Action::requeue(if lost {
        verdict.grace.max(Duration::from_secs(1))
    } else {
        verdict.grace.saturating_sub(verdict.silent) + Duration::from_millis(500)
    }))
}

/// Every node (of more than one) is down: more likely the control plane's own trouble.
fn full_disruption(ctx: &Controller) -> bool {
    let nodes = ctx.nodes.state();
    nodes.len() > 1 && nodes.iter().all(|n| ready_status(n) != "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Grace = Grace {
        monitor: Duration::from_secs(40),
        startup: Duration::from_secs(60),
    };

    /// A node as the API shows it, created long ago by its timestamp, with a Ready condition
    /// whose heartbeat is `heartbeat` if it has posted its status.
    fn node(heartbeat: Option<&str>) -> Node {
        let conditions: Vec<serde_json::Value> = heartbeat
            .map(|t| json!({"type": "Ready", "status": "True", "lastHeartbeatTime": t}))
            .into_iter()
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "creationTimestamp": "2020-01-01T00:00:00Z"},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    fn lease(renewed: &str) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "namespace": LEASE_NAMESPACE},
            "spec": {"renewTime": renewed},
        }))
        .unwrap()
    }

    /// The fake clock: the controller's `now` is `start + seconds`.
    fn at(start: Instant, seconds: u64) -> Instant {
        start + Duration::from_secs(seconds)
    }

    #[test]
    fn a_new_node_is_not_lost_however_old_its_timestamps() {
        let (mut table, t0) = (HealthTable::default(), Instant::now());
        // Registered moments ago, no status posted and no Lease yet; its creation time (by a
        // skewed clock) is years back. Counted from first sight, with the startup grace.
        let fresh = node(None);
        let v = table.observe(&fresh, None, at(t0, 0), GRACE);
        assert_eq!(
            (v.silent, v.grace, v.lost()),
            (Duration::ZERO, GRACE.startup, false)
        );
        assert!(!table.observe(&fresh, None, at(t0, 59), GRACE).lost());
        assert!(
            wanted_taints(&fresh, false, true).is_empty(),
            "no taint before a Ready condition"
        );
        // It posts Ready (with a heartbeat from an old clock) and a Lease: the normal grace now,
        // counted from this moment.
        let ready = node(Some("2020-01-01T00:00:01Z"));
        let v = table.observe(
            &ready,
            Some(&lease("2020-01-01T00:00:01Z")),
            at(t0, 30),
            GRACE,
        );
        assert_eq!((v.silent, v.grace), (Duration::ZERO, GRACE.monitor));
        assert!(wanted_taints(&ready, false, true).is_empty());
    }

    #[test]
    fn a_node_that_never_reports_is_lost_after_the_startup_grace() {
        let (mut table, t0) = (HealthTable::default(), Instant::now());
        let silent = node(None);
        table.observe(&silent, None, at(t0, 0), GRACE);
        let v = table.observe(&silent, None, at(t0, 61), GRACE);
        assert!(v.lost(), "{v:?}");
        let taints: Vec<_> = wanted_taints(&silent, v.lost(), true)
            .into_iter()
            .map(|t| (t.key, t.effect))
            .collect();
        assert_eq!(
            taints,
            [
                (UNREACHABLE.to_owned(), "NoSchedule".to_owned()),
                (UNREACHABLE.to_owned(), "NoExecute".to_owned())
            ]
        );
    }

    #[test]
    fn a_silent_node_is_lost_after_the_grace_and_a_returning_one_is_not() {
        let (mut table, t0) = (HealthTable::default(), Instant::now());
        let ready = node(Some("2026-01-01T00:00:00Z"));
        table.observe(
            &ready,
            Some(&lease("2026-01-01T00:00:00.000001Z")),
            at(t0, 0),
            GRACE,
        );
        // Renewals keep it alive, whatever their timestamps say.
        let v = table.observe(
            &ready,
            Some(&lease("2026-01-01T00:00:10Z")),
            at(t0, 35),
            GRACE,
        );
        assert_eq!(v.silent, Duration::ZERO);
        // The same renewal seen again is not news; a Lease that vanished is no news either.
        assert!(
            !table
                .observe(
                    &ready,
                    Some(&lease("2026-01-01T00:00:10Z")),
                    at(t0, 75),
                    GRACE
                )
                .lost()
        );
        let v = table.observe(&ready, None, at(t0, 76), GRACE);
        assert!(v.lost() && v.silent == Duration::from_secs(41), "{v:?}");
        // An older renewal (a clock stepped back) is not a sign of life either.
        assert!(
            table
                .observe(
                    &ready,
                    Some(&lease("2026-01-01T00:00:05Z")),
                    at(t0, 77),
                    GRACE
                )
                .lost()
        );
        // The controller marks it Unknown: its own change is not a heartbeat.
        let mut unknown = ready.clone();
        unknown
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "Unknown".into();
        assert!(table.observe(&unknown, None, at(t0, 78), GRACE).lost());
        assert_eq!(
            wanted_taints(&unknown, false, true).len(),
            2,
            "Unknown is unreachable"
        );
        // The agent returns: a new heartbeat, then renewals.
        let back = node(Some("2026-01-01T00:02:00Z"));
        let v = table.observe(&back, None, at(t0, 90), GRACE);
        assert_eq!((v.silent, v.lost()), (Duration::ZERO, false));
        assert!(wanted_taints(&back, false, true).is_empty());
        assert!(
            !table
                .observe(
                    &back,
                    Some(&lease("2026-01-01T00:02:30Z")),
                    at(t0, 125),
                    GRACE
                )
                .lost()
        );
    }

    #[test]
    fn no_noexecute_taint_in_a_full_disruption() {
        let mut unknown = node(Some("2026-01-01T00:00:00Z"));
        unknown
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()[0]
            .status = "Unknown".into();
        let effects: Vec<String> = wanted_taints(&unknown, true, false)
            .into_iter()
            .map(|t| t.effect)
            .collect();
        assert_eq!(effects, ["NoSchedule"]);
    }
}
