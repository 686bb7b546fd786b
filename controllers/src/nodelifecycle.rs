//! The node lifecycle controller: notices nodes that stopped talking and moves their pods.
//!
//! A node is alive while its agent renews its Lease in `kube-node-lease` (or posts its
//! status). Past `node_monitor_grace_period` without either, its conditions become
//! `Unknown` (`NodeStatusUnknown`, "Kubelet stopped posting node status.") and it is tainted
//! `node.kubernetes.io/unreachable` — `NoSchedule` so nothing new lands there, `NoExecute`
//! so its pods are evicted. A node whose agent reports `Ready=False` is tainted
//! `node.kubernetes.io/not-ready` the same way. A node that is Ready again loses both.
//!
//! Eviction follows the NoExecute taints: a pod that does not tolerate one is deleted at
//! once; one that tolerates them all for `tolerationSeconds` (the API server gives every pod
//! 300 s for these two taints by default) is deleted that long after the taint was added;
//! its controller then creates a replacement elsewhere. When every node is down at once
//! nothing is evicted (kube's "full disruption": the problem is more likely the control
//! plane's network than every node).
//!
//! The state machine per node, from what the API shows:
//! `Ready` —(no heartbeat for the grace period)→ `Unknown` + unreachable taints
//! —(heartbeat with Ready=True)→ `Ready`, taints removed.

use orquestra_operator::rbac::{READ, Rule};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{EventType, publish};
use crate::scheduler::tolerates;

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
        resources: &["pods"],
        verbs: &["get", "list", "watch", "delete"],
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
    /// The node's status or taints could not be written, or a pod deleted.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    nodes: Store<Node>,
    leases: Store<Lease>,
    pods: Store<Pod>,
    grace: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeLifecycleController")
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

/// Adds the node lifecycle controller to `manager`; nodes are lost after `grace` without a
/// heartbeat.
pub fn add(manager: &mut Manager, grace: Duration) {
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let leases = manager.cache::<Lease>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        nodes: nodes.store(),
        leases: leases.store(),
        pods: pods.store(),
        grace,
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

/// The node's latest sign of life: its Lease's renewal or its Ready condition's heartbeat.
fn last_heard(node: &Node, lease: Option<&Lease>) -> Option<Timestamp> {
    let renewed = lease
        .and_then(|l| l.spec.as_ref())
        .and_then(|s| s.renew_time.as_ref())
        .map(|t| t.0);
    let posted = ready_condition(node)
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    let created = node.metadata.creation_timestamp.as_ref().map(|t| t.0);
    [renewed, posted, created].into_iter().flatten().max()
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

/// How long `pod` may stay on a node with `taints`: `None` forever, `Some(ZERO)` not at all,
/// counted from when each NoExecute taint was added.
fn eviction_due(pod: &Pod, taints: &[Taint]) -> Option<Timestamp> {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.clone())
        .unwrap_or_default();
    let mut due: Option<Timestamp> = None;
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let added = taint
            .time_added
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Timestamp::now);
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        let at = if matching.is_empty() {
            Some(added)
        } else if matching.iter().any(|t| t.toleration_seconds.is_none()) {
            None
        } else {
            let seconds = matching
                .iter()
                .filter_map(|t| t.toleration_seconds)
                .min()
                .unwrap_or(0)
                .max(0);
            Some(added + Duration::from_secs(seconds as u64))
        };
        if let Some(at) = at {
            due = Some(due.map_or(at, |d| d.min(at)));
        }
    }
    due
}

fn wanted_taints(node: &Node, lost: bool) -> Vec<Taint> {
    let status = ready_status(node);
    let mut taints: Vec<Taint> = taints(node)
        .into_iter()
        .filter(|t| t.key != UNREACHABLE && t.key != NOT_READY)
        .collect();
    let current = self::taints(node);
    let key = if lost || status == "Unknown" {
        Some(UNREACHABLE)
    } else if status == "False" {
        Some(NOT_READY)
    } else {
        None
    };
    if let Some(key) = key {
        for effect in ["NoSchedule", "NoExecute"] {
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
    let silent = last_heard(&node, lease.as_deref())
        .map(|t| now.duration_since(t).unsigned_abs())
        .unwrap_or_default();
    let lost = silent > ctx.grace;
    let mut node = node;
    if lost && ready_status(&node) != "Unknown" {
        tracing::info!(node = %name, silent = ?silent, "node stopped reporting; marking it Unknown");
        let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let conditions: Vec<serde_json::Value> = node
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
    let wanted = wanted_taints(&node, lost);
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
    let mut next = (!lost).then(|| ctx.grace.saturating_sub(silent) + Duration::from_millis(500));
    // Evict what does not tolerate the NoExecute taints (unless every node is down).
    if wanted.iter().any(|t| t.effect == "NoExecute") && !self::full_disruption(&ctx) {
        for pod in ctx.pods.state().into_iter().filter(|p| {
            p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(name.as_str())
                && p.metadata.deletion_timestamp.is_none()
        }) {
            let Some(due) = eviction_due(&pod, &wanted) else {
                continue;
            };
            if due > now {
                let wait = now.duration_until(due).unsigned_abs() + Duration::from_millis(100);
                next = Some(next.map_or(wait, |n| n.min(wait)));
                continue;
            }
            let namespace = pod.namespace().unwrap_or_default();
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                Ok(_) => {
                    publish(
                        &ctx.client,
                        MANAGER,
                        pod.as_ref(),
                        EventType::Normal,
                        "TaintManagerEviction",
                        &format!("Marking for deletion Pod {namespace}/{}", pod.name_any()),
                    )
                    .await;
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(NodeLifecycleError::Api {
                        action: format!("evicting pod {namespace}/{}", pod.name_any()),
                        source,
                    });
                }
            }
        }
    }
    Ok(match next {
        Some(wait) => Action::requeue(wait),
        None => Action::await_change(),
    })
}

/// Every node (of more than one) is down: more likely the control plane's own trouble.
fn full_disruption(ctx: &Controller) -> bool {
    let nodes = ctx.nodes.state();
    nodes.len() > 1 && nodes.iter().all(|n| ready_status(n) != "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str, seconds_ago: i64) -> Taint {
        Taint {
            key: key.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(
                Timestamp::now() - Duration::from_secs(seconds_ago as u64),
            )),
            value: None,
        }
    }

    fn pod(tolerations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"spec": {"containers": [], "tolerations": tolerations}}))
            .unwrap()
    }

    #[test]
    fn eviction_follows_toleration_seconds() {
        let taints = [taint(UNREACHABLE, 10)];
        let now = Timestamp::now();
        // No toleration: due since the taint was added.
        assert!(eviction_due(&pod(json!([])), &taints).unwrap() <= now);
        // 300 s: due in about 290 s.
        let due = eviction_due(
            &pod(json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}])),
            &taints,
        )
        .unwrap();
        let left = now.duration_until(due).as_secs_f64();
        assert!((285.0..=291.0).contains(&left), "{left}");
        // Tolerated forever: never.
        assert!(eviction_due(&pod(json!([{"operator": "Exists"}])), &taints).is_none());
    }
}
