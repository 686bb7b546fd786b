//! The NoExecute taint eviction controller (`taint-eviction-controller`): deletes the pods on
//! a node with `NoExecute` taints they do not tolerate, as kube-controller-manager's does.
//!
//! A pod that does not tolerate every NoExecute taint of its node is evicted at once. One
//! that tolerates them all is evicted after the shortest `tolerationSeconds` among the
//! tolerations that matched (never, if none of them has a limit), counted on this
//! controller's clock from when it first saw the pod so tainted — not from the taint's
//! `timeAdded`, which another machine's clock wrote. The schedule is re-evaluated whenever the
//! node's NoExecute taints or the pod change, and cancelled when the taints go (the
//! `TaintManagerEviction` event says "Cancelling deletion"). An evicted pod first gets the
//! `DisruptionTarget` condition (`DeletionByTaintManager`), then is deleted; its controller
//! replaces it elsewhere.
//!
//! The node lifecycle controller only taints nodes (`node.kubernetes.io/unreachable`,
//! `not-ready`); the evictions those taints cause are this controller's.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Taint, Toleration};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{EventType, publish};
use crate::scheduler::tolerates;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["nodes"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The controller's name: its field manager and the component of its events.
pub const MANAGER: &str = "taint-eviction-controller";

/// What can go wrong evicting one pod (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum TaintEvictionError {
    /// The pod's condition could not be set, or the pod deleted.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
}

/// Pending evictions: when each pod (by UID) was first seen on a node whose NoExecute taints
/// it tolerates only for a while.
type Schedule = Arc<Mutex<HashMap<String, Instant>>>;

/// The NoExecute taints (key, value) of each node as last seen.
type SeenTaints = Arc<Mutex<HashMap<String, BTreeSet<(String, String)>>>>;

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    nodes: Store<Node>,
    scheduled: Schedule,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaintEvictionController")
            .finish_non_exhaustive()
    }
}

fn no_execute(node: &Node) -> Vec<Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.effect == "NoExecute")
        .collect()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

/// Adds the taint eviction controller to `manager`.
pub fn add(manager: &mut Manager) {
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let scheduled: Schedule = Arc::default();
    let context = Arc::new(Controller {
        client: manager.client(),
        nodes: nodes.store(),
        scheduled: Arc::clone(&scheduled),
    });
    // A node's NoExecute taints changing (as last seen here) is news for its pods; other
    // node changes (heartbeats) are not.
    let seen: SeenTaints = Arc::default();
    let pods_of = {
        let store = pods.store();
        move |node: &str| {
            store
                .state()
                .into_iter()
                .filter(|p| node_of(p) == Some(node))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let on_node = {
        let seen = Arc::clone(&seen);
        let pods_of = pods_of.clone();
        move |node: Arc<Node>| {
            let taints: BTreeSet<(String, String)> = no_execute(&node)
                .into_iter()
                .map(|t| (t.key, t.value.unwrap_or_default()))
                .collect();
            let name = node.name_any();
            let changed = {
                let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                let before = seen.get(&name).cloned().unwrap_or_default();
                if taints.is_empty() {
                    seen.remove(&name);
                } else {
                    seen.insert(name.clone(), taints.clone());
                }
                before != taints
            };
            if changed { pods_of(&name) } else { Vec::new() }
        }
    };
    let on_node_deleted = move |node: Arc<Node>| {
        seen.lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&node.name_any());
        pods_of(&node.name_any())
    };
    // A deleted pod's schedule is forgotten.
    let on_pod_deleted = move |pod: Arc<Pod>| {
        if let Some(uid) = pod.uid() {
            scheduled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid);
        }
        Vec::<ObjectRef<Pod>>::new()
    };
    let runner = Runner::for_cache(MANAGER, &pods)
        .and_then(|r| r.watches(&nodes, on_node))
        .and_then(|r| r.watches_deleted(&nodes, on_node_deleted))
        .and_then(|r| r.watches_deleted(&pods, on_pod_deleted))
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

/// What the taints say of a pod: stay, go now, or go after a while.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// No NoExecute taint, or every one tolerated without a limit.
    Stay,
    /// A NoExecute taint not tolerated (or a limit of zero or less).
    EvictNow,
    /// Every NoExecute taint tolerated, the shortest limit this long.
    EvictAfter(Duration),
}

/// kube's rule: every taint must be tolerated; the limit is the smallest `tolerationSeconds`
/// among all the tolerations that matched a taint (those without one do not count, unless
/// none has one).
fn verdict(tolerations: &[Toleration], taints: &[Taint]) -> Verdict {
    if taints.is_empty() {
        return Verdict::Stay;
    }
    let mut used: Vec<&Toleration> = Vec::new();
    for taint in taints {
        let matching: Vec<&Toleration> =
            tolerations.iter().filter(|t| tolerates(t, taint)).collect();
        if matching.is_empty() {
            return Verdict::EvictNow;
        }
        used.extend(matching);
    }
    let limits = used.iter().filter_map(|t| t.toleration_seconds);
    match limits.min() {
        None => Verdict::Stay,
        Some(s) if s <= 0 => Verdict::EvictNow,
        Some(s) => Verdict::EvictAfter(Duration::from_secs(s.unsigned_abs())),
    }
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Controller>) -> Result<Action, TaintEvictionError> {
    let uid = pod.uid().unwrap_or_default();
    let taints = node_of(&pod)
        .and_then(|n| ctx.nodes.get(&ObjectRef::new(n)))
        .map(|n| no_execute(&n))
        .unwrap_or_default();
    let verdict = if pod.metadata.deletion_timestamp.is_some() {
        Verdict::Stay
    } else {
        let tolerations = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.clone())
            .unwrap_or_default();
        verdict(&tolerations, &taints)
    };
    let now = Instant::now();
    let wait = match verdict {
        Verdict::Stay => {
            let cancelled = ctx
                .scheduled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&uid)
                .is_some();
            if cancelled && pod.metadata.deletion_timestamp.is_none() {
                let name = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
                tracing::info!(pod = %name, "cancelling a NoExecute eviction");
                publish(
                    &ctx.client,
                    MANAGER,
                    pod.as_ref(),
                    EventType::Normal,
                    "TaintManagerEviction",
                    &format!("Cancelling deletion of Pod {name}"),
                )
                .await;
            }
            return Ok(Action::await_change());
        }
        Verdict::EvictNow => Duration::ZERO,
        Verdict::EvictAfter(limit) => {
            let since = *ctx
                .scheduled
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(uid.clone())
                .or_insert(now);
            limit.saturating_sub(now.saturating_duration_since(since))
        }
    };
    if !wait.is_zero() {
        return Ok(Action::requeue(wait + Duration::from_millis(50)));
    }
    evict(&ctx.client, &pod).await?;
    ctx.scheduled
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&uid);
    Ok(Action::await_change())
}

/// Marks the pod a `DisruptionTarget` of the taint manager, then deletes it (that very pod:
/// a UID precondition).
async fn evict(client: &Client, pod: &Pod) -> Result<(), TaintEvictionError> {
    let namespace = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    tracing::info!(pod = %format!("{namespace}/{name}"), "evicting a pod for a NoExecute taint");
    publish(
        client,
        MANAGER,
        pod,
        EventType::Normal,
        "TaintManagerEviction",
        &format!("Marking for deletion Pod {namespace}/{name}"),
    )
    .await;
    let marked = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c.type_ == "DisruptionTarget"
                    && c.status == "True"
                    && c.reason.as_deref() == Some("DeletionByTaintManager")
            })
        });
    if !marked {
        let stamp = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let patch = json!({
            "metadata": {"uid": pod.uid()},
            "status": {"conditions": [{
                "type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager",
                "message": "Taint manager: deleting due to NoExecute taint",
                "lastTransitionTime": stamp,
            }]},
        });
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        match api
            .patch_status(&name, &params, &Patch::Strategic(patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(source) => {
                return Err(TaintEvictionError::Api {
                    action: format!("marking pod {namespace}/{name} a disruption target"),
                    source,
                });
            }
        }
    }
    let params = DeleteParams {
        preconditions: pod.uid().map(|uid| kube::api::Preconditions {
            uid: Some(uid),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(source) => Err(TaintEvictionError::Api {
            action: format!("deleting pod {namespace}/{name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taint(key: &str) -> Taint {
        Taint {
            key: key.into(),
            value: Some("v".into()),
            effect: "NoExecute".into(),
            time_added: None,
        }
    }

    fn toleration(key: &str, seconds: Option<i64>) -> Toleration {
        Toleration {
            key: Some(key.into()),
            operator: Some("Exists".into()),
            effect: Some("NoExecute".into()),
            toleration_seconds: seconds,
            value: None,
        }
    }

    #[test]
    fn verdicts() {
        let a = [taint("a")];
        let ab = [taint("a"), taint("b")];
        assert_eq!(verdict(&[], &[]), Verdict::Stay);
        assert_eq!(verdict(&[], &a), Verdict::EvictNow);
        assert_eq!(verdict(&[toleration("a", None)], &a), Verdict::Stay);
        assert_eq!(
            verdict(&[toleration("a", Some(5))], &a),
            Verdict::EvictAfter(Duration::from_secs(5))
        );
        assert_eq!(verdict(&[toleration("a", Some(0))], &a), Verdict::EvictNow);
        // Not every taint tolerated: now.
        assert_eq!(verdict(&[toleration("a", None)], &ab), Verdict::EvictNow);
        // The shortest limit among the tolerations used; unlimited ones do not count.
        assert_eq!(
            verdict(
                &[
                    toleration("a", None),
                    toleration("b", Some(30)),
                    toleration("a", Some(10)),
                    toleration("c", Some(1)),
                ],
                &ab
            ),
            Verdict::EvictAfter(Duration::from_secs(10))
        );
    }
}
