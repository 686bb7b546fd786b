//! The ReplicaSet controller (`replicaset`), and the same loop for the ReplicationControllers
//! that came before ReplicaSets (`replicationcontroller`): keeps `spec.replicas` pods matching
//! the selector, creating them from the template and deleting the least valuable first
//! (unscheduled, then not ready, then the newest), adopting matching orphans, and reporting
//! the counts in status. The two kinds differ only in how they spell their selector
//! ([`Replicated`]).
//!
//! *Expectations* (as kube-controller-manager's): pods this controller created or deleted but
//! has not seen in its cache yet are counted as done, so a slow cache never makes it create
//! or delete twice.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};

use crate::labels::matches;
use crate::objects::ready;
use serde_json::json;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["apps"],
        resources: &["replicasets"],
        verbs: READ,
    },
    Rule {
        api_groups: &["apps"],
        resources: &["replicasets/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
];

/// What the ReplicationController loop's requests need.
pub const RC_RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["replicationcontrollers"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["replicationcontrollers/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "replicaset-controller";

/// A kind that keeps a number of pods from a template: ReplicaSet, ReplicationController.
pub trait Replicated:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + serde::Serialize
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The loop's name (`--controllers`, metrics).
    const LOOP: &'static str;
    /// The pods it selects.
    fn selector(&self) -> LabelSelector;
    /// How many it wants.
    fn replicas(&self) -> i32;
    /// What its pods are made from.
    fn template(&self) -> Option<PodTemplateSpec>;
    /// Its status as JSON (for comparing what changed).
    fn status_json(&self) -> serde_json::Value;
    /// How long a pod must be ready before it counts as available.
    fn min_ready_seconds(&self) -> i32;
}

impl Replicated for ReplicaSet {
    const LOOP: &'static str = "replicaset";

    fn min_ready_seconds(&self) -> i32 {
        self.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
    }

    fn selector(&self) -> LabelSelector {
        self.spec
            .as_ref()
            .map(|s| s.selector.clone())
            .unwrap_or_default()
    }

    fn replicas(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    fn template(&self) -> Option<PodTemplateSpec> {
        self.spec.as_ref().and_then(|s| s.template.clone())
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.status).unwrap_or_default()
    }
}

impl Replicated for ReplicationController {
    const LOOP: &'static str = "replicationcontroller";

    fn min_ready_seconds(&self) -> i32 {
        self.spec
            .as_ref()
            .and_then(|s| s.min_ready_seconds)
            .unwrap_or(0)
    }

    /// A plain map of labels (the API server defaults it to the template's labels).
    fn selector(&self) -> LabelSelector {
        LabelSelector {
            match_labels: self.spec.as_ref().and_then(|s| s.selector.clone()),
            match_expressions: None,
        }
    }

    fn replicas(&self) -> i32 {
        self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
    }

    fn template(&self) -> Option<PodTemplateSpec> {
        self.spec.as_ref().and_then(|s| s.template.clone())
    }

    fn status_json(&self) -> serde_json::Value {
        serde_json::to_value(&self.status).unwrap_or_default()
    }
}

/// What can go wrong reconciling one ReplicaSet (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaSetError {
    /// A pod could not be created or deleted, or the status written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
}

/// Creations and deletions made but not yet seen in the cache, per ReplicaSet UID.
#[derive(Debug, Default)]
struct Expectations {
    creating: Vec<String>,
    deleting: Vec<String>,
    since: Option<Instant>,
}

/// What the reconciler shares.
pub struct Controller<K> {
    client: Client,
    pods: Store<Pod>,
    expectations: Mutex<HashMap<String, Expectations>>,
    kind: std::marker::PhantomData<K>,
}

impl<K> std::fmt::Debug for Controller<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaSetController")
            .finish_non_exhaustive()
    }
}

/// Adds the ReplicaSet controller to `manager`.
pub fn add(manager: &mut Manager) {
    add_for::<ReplicaSet>(manager);
}

/// Adds the ReplicationController loop to `manager`.
pub fn add_replication_controllers(manager: &mut Manager) {
    add_for::<ReplicationController>(manager);
}

fn add_for<K: Replicated>(manager: &mut Manager) {
    let sets = manager.cache::<K>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let context = Arc::new(Controller::<K> {
        client: manager.client(),
        pods: pods.store(),
        expectations: Mutex::default(),
        kind: std::marker::PhantomData,
    });
    let candidates = sets.store();
    let runner = Runner::for_cache(K::LOOP, &sets)
        .and_then(|r| r.owns(&pods))
        .and_then(|r| {
            // A pod that is gone is news for its owner (kube-runtime's own streams only
            // carry objects that still exist).
            r.watches_deleted(&pods, |pod: Arc<Pod>| {
                let owner = pod
                    .owner_references()
                    .iter()
                    .find(|o| o.controller == Some(true) && o.kind == K::kind(&()))?;
                Some(ObjectRef::new(&owner.name).within(&pod.namespace()?))
            })
        })
        .and_then(|r| {
            // An orphan wakes the ReplicaSets whose selector matches it, to adopt it.
            r.watches(&pods, move |pod: Arc<Pod>| {
                let orphan = !pod
                    .owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true));
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                candidates
                    .state()
                    .into_iter()
                    .filter(|rs| {
                        orphan
                            && rs.namespace() == pod.namespace()
                            && matches(&rs.selector(), &labels)
                    })
                    .map(|rs| ObjectRef::from_obj(rs.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

fn active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
}

/// Lower is deleted first: unscheduled, then not running, then not ready; newest first.
fn value(pod: &Pod) -> (u8, u8, u8, std::cmp::Reverse<String>) {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    let created = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    (
        u8::from(scheduled),
        u8::from(running),
        u8::from(ready(pod)),
        std::cmp::Reverse(created),
    )
}

/// Replaces a pod's owner references (adoption, release), on that very pod (uid
/// precondition: a same-named successor is left alone). A failure is retried by the next
/// reconcile, which sees the pod as it still is.
async fn set_owners(api: &Api<Pod>, pod: &Pod, owners: serde_json::Value) {
    let patch = json!({"metadata": {"uid": pod.uid(), "ownerReferences": owners}});
    let _ = api
        .patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await;
}

async fn reconcile<K: Replicated>(
    rs: Arc<K>,
    ctx: Arc<Controller<K>>,
) -> Result<Action, ReplicaSetError> {
    if rs.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let selector = rs.selector();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let all: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    // Adopt active orphans the selector matches.
    for orphan in all.iter().filter(|p| {
        active(p)
            && !p
                .owner_references()
                .iter()
                .any(|o| o.controller == Some(true))
            && matches(
                &selector,
                p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            )
    }) {
        let owner = rs.controller_owner_ref(&()).map(|o| vec![o]);
        set_owners(&api, orphan, json!(owner)).await;
    }
    let (mut owned, released): (Vec<Arc<Pod>>, Vec<Arc<Pod>>) = all
        .into_iter()
        .filter(|p| {
            active(p)
                && p.owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .partition(|p| {
            matches(
                &selector,
                p.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            )
        });
    // Release owned pods the selector no longer matches (their labels changed): they lose
    // this owner reference and are replaced, as kube-controller-manager's ReplicaSet
    // controller does.
    for pod in &released {
        let others: Vec<_> = pod
            .owner_references()
            .iter()
            .filter(|o| o.uid != uid)
            .cloned()
            .collect();
        set_owners(&api, pod, json!(others)).await;
    }
    // Expectations: what we did that the cache has not shown yet.
    {
        let mut expectations = ctx.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let e = expectations.entry(uid.clone()).or_default();
        let names: std::collections::HashSet<String> = owned.iter().map(|p| p.name_any()).collect();
        e.creating.retain(|n| !names.contains(n));
        e.deleting.retain(|n| names.contains(n));
        let stale = e
            .since
            .is_some_and(|s| s.elapsed() > Duration::from_secs(60));
        if (!e.creating.is_empty() || !e.deleting.is_empty()) && !stale {
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        *e = Expectations::default();
    }
    let want = rs.replicas().max(0) as usize;
    // A failed create or delete shows as the `ReplicaFailure` condition (an exceeded quota,
    // say) until a sync succeeds, as kube's controller reports it.
    let mut failure: Option<(ReplicaSetError, &str)> = None;
    if owned.len() < want {
        let template = rs.template().unwrap_or_default();
        let owner = rs.controller_owner_ref(&()).map(|o| vec![o]);
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": super::pod_metadata(template.metadata.as_ref()),
            "spec": template.spec.clone(),
        });
        pod["metadata"]["generateName"] = json!(format!("{}-", rs.name_any()));
        pod["metadata"]["ownerReferences"] = json!(owner);
        pod["metadata"]["namespace"] = json!(namespace);
        let pod: Pod = serde_json::from_value(pod).map_err(|e| ReplicaSetError::Api {
            action: "building a pod from the template".into(),
            source: kube::Error::SerdeError(e),
        })?;
        let missing = want - owned.len();
        let params = PostParams::default();
        let creates = (0..missing).map(|_| api.create(&params, &pod));
        let results = futures::future::join_all(creates).await;
        let mut created = Vec::new();
        let mut create_failure = None;
        for result in results {
            match result {
                Ok(p) => created.push(p.name_any()),
                Err(e) => create_failure = Some(e),
            }
        }
        ctx.remember(&uid, created, Vec::new());
        if let Some(source) = create_failure {
            failure = Some((
                ReplicaSetError::Api {
                    action: format!("creating pods for {}", rs.name_any()),
                    source,
                },
                "FailedCreate",
            ));
        }
    } else if owned.len() > want {
        owned.sort_by_key(|p| value(p));
        let doomed: Vec<String> = owned[..owned.len() - want]
            .iter()
            .map(|p| p.name_any())
            .collect();
        for name in &doomed {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    failure = Some((
                        ReplicaSetError::Api {
                            action: format!("deleting pod {name}"),
                            source,
                        },
                        "FailedDelete",
                    ));
                    break;
                }
            }
        }
        ctx.remember(&uid, Vec::new(), doomed);
    }
    // Status from what the cache shows.
    let ready_count = owned.iter().filter(|p| ready(p)).count() as i32;
    // Available: ready for minReadySeconds; look again when the next one will be.
    let min_ready = jiff::SignedDuration::from_secs(i64::from(rs.min_ready_seconds().max(0)));
    let now = jiff::Timestamp::now();
    let mut next_available: Option<Duration> = None;
    let available_count = owned
        .iter()
        .filter(|p| {
            let Some(since) = ready_since(p) else {
                return false;
            };
            let at = since + min_ready;
            if at <= now {
                return true;
            }
            let wait = Duration::try_from(at.duration_since(now)).unwrap_or_default();
            next_available = Some(next_available.map_or(wait, |n| n.min(wait)));
            false
        })
        .count() as i32;
    let current = rs.status_json();
    let mut conditions: Vec<serde_json::Value> = current["conditions"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| c["type"] != "ReplicaFailure")
        .collect();
    let had_failure = current["conditions"]
        .as_array()
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "ReplicaFailure"));
    if let Some((error, reason)) = &failure {
        let kept = current["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == "ReplicaFailure").cloned());
        conditions.push(kept.unwrap_or_else(|| {
            json!({"type": "ReplicaFailure", "status": "True", "reason": reason,
                   "message": error.to_string(),
                   "lastTransitionTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()})
        }));
    }
    let status = json!({
        "replicas": owned.len() as i32,
        "fullyLabeledReplicas": owned.len() as i32,
        "readyReplicas": ready_count,
        "availableReplicas": available_count,
        "observedGeneration": rs.meta().generation,
        "conditions": if conditions.is_empty() { serde_json::Value::Null } else { json!(conditions) },
    });
    let changed = had_failure != failure.is_some()
        || [
            "replicas",
            "fullyLabeledReplicas",
            "readyReplicas",
            "availableReplicas",
            "observedGeneration",
        ]
        .iter()
        .any(|k| current.get(k).cloned().unwrap_or(json!(0)) != status[k]);
    if changed {
        let sets: Api<K> = Api::namespaced(ctx.client.clone(), &namespace);
        sets.patch_status(
            &rs.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(|source| ReplicaSetError::Api {
            action: format!("updating the status of {}", rs.name_any()),
            source,
        })?;
    }
    match failure {
        Some((error, _)) => Err(error),
        None => Ok(next_available
            .map(|d| Action::requeue(d + Duration::from_millis(100)))
            .unwrap_or_else(Action::await_change)),
    }
}

/// When the pod last became Ready (now, if it is Ready without a time).
fn ready_since(pod: &Pod) -> Option<jiff::Timestamp> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map_or_else(jiff::Timestamp::now, |t| t.0)
        })
}

impl<K> Controller<K> {
    fn remember(&self, uid: &str, creating: Vec<String>, deleting: Vec<String>) {
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let e = expectations.entry(uid.to_owned()).or_default();
        e.creating.extend(creating);
        e.deleting.extend(deleting);
        e.since = Some(Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    #[test]
    fn selectors() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]
        }))
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(matches(
            &selector,
            &labels(&[("app", "web"), ("tier", "a")])
        ));
        assert!(!matches(
            &selector,
            &labels(&[("app", "web"), ("tier", "c")])
        ));
        assert!(!matches(
            &selector,
            &labels(&[("app", "db"), ("tier", "a")])
        ));
    }
}
