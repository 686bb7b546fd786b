//! The DaemonSet controller (`daemonset`): one pod per eligible node, as
//! kube-controller-manager's. A node is eligible when it matches the template's
//! `nodeSelector` and required node affinity and the pod tolerates its `NoSchedule` and
//! `NoExecute` taints — with the tolerations kube gives every DaemonSet pod
//! ([`default_tolerations`]). Pods are created pinned to their node by a required node
//! affinity `matchFields` term on `metadata.name` (as kube ≥ 1.12), so the default
//! scheduler binds them; a node that stops being eligible loses its pod.
//!
//! Each template is recorded as a `ControllerRevision` (`<ds>-<hash>`), whose hash labels
//! the pods (`controller-revision-hash`, with `pod-template-generation`). With the
//! `RollingUpdate` strategy, pods of older templates are deleted so that at most
//! `maxUnavailable` (default 1) nodes lack an available pod at any time — old pods that are
//! unavailable anyway go first. With `maxSurge` > 0 (then `maxUnavailable` is 0), the new
//! pod starts beside the old one on up to `maxSurge` nodes at a time, and the old one goes
//! once the new one is available, so a node is never without its daemon. With `OnDelete`,
//! only pods deleted by someone else are replaced with the new template. Failed pods are
//! deleted and so replaced.
//!
//! *Expectations* (as the ReplicaSet controller's) keep a slow cache from making it create
//! or delete twice.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{Node, Pod, PodSpec, Toleration};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::{Value, json};

use crate::objects::ready;
use crate::scheduler::{UNSCHEDULABLE, placeable, tolerates};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["apps"],
        resources: &["daemonsets"],
        verbs: READ,
    },
    Rule {
        api_groups: &["apps"],
        resources: &["daemonsets/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &["apps"],
        resources: &["controllerrevisions"],
        verbs: &["get", "list", "watch", "create", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch", "create", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["nodes"],
        verbs: READ,
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "daemon-set-controller";

/// The label carrying the hash of the template a pod was made from.
pub const REVISION_HASH: &str = "controller-revision-hash";

/// The label carrying the DaemonSet generation a pod was made at.
pub const TEMPLATE_GENERATION: &str = "pod-template-generation";

/// What can go wrong reconciling one DaemonSet (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum DaemonSetError {
    /// A pod or revision could not be created or deleted, or the status written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The pod template did not make a pod (a defect or an invalid template).
    #[error("building a pod of {daemonset}: {source}")]
    Build {
        /// The DaemonSet.
        daemonset: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// Creations and deletions made but not yet seen in the cache, per DaemonSet UID.
#[derive(Debug, Default)]
struct Expectations {
    creating: Vec<String>,
    deleting: Vec<String>,
    since: Option<Instant>,
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    revisions: Store<ControllerRevision>,
    expectations: Mutex<HashMap<String, Expectations>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonSetController")
            .finish_non_exhaustive()
    }
}

fn owner_of(pod: &Pod) -> Option<ObjectRef<DaemonSet>> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "DaemonSet")?;
    Some(ObjectRef::new(&owner.name).within(&pod.namespace().unwrap_or_default()))
}

/// Adds the DaemonSet controller to `manager`.
pub fn add(manager: &mut Manager) {
    let sets = manager.cache::<DaemonSet>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let revisions = manager.cache::<ControllerRevision>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        pods: pods.store(),
        nodes: nodes.store(),
        revisions: revisions.store(),
        expectations: Mutex::default(),
    });
    let every = |sets: Store<DaemonSet>| {
        move |_node: Arc<Node>| {
            sets.state()
                .into_iter()
                .map(|ds| ObjectRef::from_obj(ds.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let runner = Runner::for_cache("daemonset", &sets)
        .and_then(|r| r.owns(&pods))
        .and_then(|r| r.watches_deleted(&pods, |pod: Arc<Pod>| owner_of(&pod)))
        // Any node change may change where the daemons belong.
        .and_then(|r| r.watches(&nodes, every(sets.store())))
        .and_then(|r| r.watches_deleted(&nodes, every(sets.store())))
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

/// The tolerations kube adds to every DaemonSet pod: it stays through node trouble
/// (not-ready, unreachable, pressure) and on cordoned nodes.
pub fn default_tolerations() -> Vec<Toleration> {
    let t = |key: &str, effect: &str| Toleration {
        key: Some(key.into()),
        operator: Some("Exists".into()),
        effect: Some(effect.into()),
        ..Toleration::default()
    };
    vec![
        t("node.kubernetes.io/not-ready", "NoExecute"),
        t("node.kubernetes.io/unreachable", "NoExecute"),
        t("node.kubernetes.io/disk-pressure", "NoSchedule"),
        t("node.kubernetes.io/memory-pressure", "NoSchedule"),
        t("node.kubernetes.io/pid-pressure", "NoSchedule"),
        t(UNSCHEDULABLE, "NoSchedule"),
    ]
}

/// `spec`'s tolerations plus the defaults it lacks.
fn with_default_tolerations(spec: &PodSpec) -> Vec<Toleration> {
    let mut tolerations = spec.tolerations.clone().unwrap_or_default();
    for t in default_tolerations() {
        if !tolerations.contains(&t) {
            tolerations.push(t);
        }
    }
    tolerations
}

/// Whether a pod of template `spec` belongs on `node`: selector and affinity match, and
/// every `NoSchedule`/`NoExecute` taint is tolerated.
pub fn should_run(spec: &PodSpec, node: &Node) -> bool {
    let tolerations = with_default_tolerations(spec);
    let taints_ok = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
        .all(|taint| tolerations.iter().any(|t| tolerates(t, taint)));
    taints_ok && placeable(spec, node)
}

/// The node a daemon pod is on, or pinned to by its `metadata.name` affinity.
fn pod_node(pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    if let Some(node) = spec.node_name.as_ref().filter(|n| !n.is_empty()) {
        return Some(node.clone());
    }
    spec.affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()?
        .node_selector_terms
        .iter()
        .flat_map(|t| t.match_fields.iter().flatten())
        .find(|f| f.key == "metadata.name" && f.operator == "In")
        .and_then(|f| f.values.as_ref()?.first().cloned())
}

/// The template's affinity with every required term pinned to `node` by `matchFields`
/// (kube's `ReplaceDaemonSetPodNodeNameNodeAffinity`).
fn pin(affinity: Option<Value>, node: &str) -> Value {
    let mut affinity = affinity.unwrap_or_else(|| json!({}));
    let field = json!([{"key": "metadata.name", "operator": "In", "values": [node]}]);
    let required = &mut affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"];
    let terms = required["nodeSelectorTerms"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let terms: Vec<Value> = if terms.is_empty() {
        vec![json!({"matchFields": field})]
    } else {
        terms
            .into_iter()
            .map(|mut t| {
                t["matchFields"] = field.clone();
                t
            })
            .collect()
    };
    *required = json!({"nodeSelectorTerms": terms});
    affinity
}

/// A stable hash of the template (FNV-1a over its JSON; kube's is over its own encoding),
/// short as kube's.
fn template_hash(ds: &DaemonSet) -> String {
    let template = ds
        .spec
        .as_ref()
        .map(|s| serde_json::to_string(&s.template).unwrap_or_default())
        .unwrap_or_default();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in template.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:x}", hash & 0xff_ffff_ffff)
}

fn active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Failed")
}

/// Ready for at least `min_ready` seconds.
fn available(pod: &Pod, min_ready: i64) -> bool {
    let Some(condition) = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status == "True"))
    else {
        return false;
    };
    min_ready <= 0
        || condition
            .last_transition_time
            .as_ref()
            .is_some_and(|t| jiff::Timestamp::now().as_second() - t.0.as_second() >= min_ready)
}

/// How many of `desired` may be unavailable during an update: an integer, or a percentage
/// rounded up; at least 1.
fn max_unavailable(ds: &DaemonSet, desired: usize) -> usize {
    let value = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone())
        .unwrap_or(IntOrString::Int(1));
    let n = match value {
        IntOrString::Int(n) => n.max(0) as usize,
        IntOrString::String(s) => {
            let percent: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            (desired * percent).div_ceil(100)
        }
    };
    n.max(1)
}

/// How many nodes may run an old and a new pod at once during an update (`maxSurge`): an
/// integer, or a percentage rounded up; 0 (the default) when unset.
fn max_surge(ds: &DaemonSet, desired: usize) -> usize {
    let value = ds
        .spec
        .as_ref()
        .and_then(|s| s.update_strategy.as_ref())
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_surge.clone());
    match value {
        None => 0,
        Some(IntOrString::Int(n)) => n.max(0) as usize,
        Some(IntOrString::String(s)) => {
            let percent: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            (desired * percent).div_ceil(100)
        }
    }
}

async fn reconcile(ds: Arc<DaemonSet>, ctx: Arc<Controller>) -> Result<Action, DaemonSetError> {
    if ds.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = ds.name_any();
    let namespace = ds.namespace().unwrap_or_default();
    let uid = ds.uid().unwrap_or_default();
    let spec = ds.spec.clone().unwrap_or_default();
    let template_spec = spec.template.spec.clone().unwrap_or_default();
    let hash = template_hash(&ds);
    ctx.revision(&ds, &hash).await?;

    let owned: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace.as_str())
                && p.owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.uid == uid)
        })
        .collect();
    if ctx.waiting(&uid, &owned) {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let mut by_node: BTreeMap<String, Vec<Arc<Pod>>> = BTreeMap::new();
    let mut failed: Vec<String> = Vec::new();
    for pod in &owned {
        if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
            && pod.metadata.deletion_timestamp.is_none()
        {
            failed.push(pod.name_any());
        } else if active(pod)
            && let Some(node) = pod_node(pod)
        {
            by_node.entry(node).or_default().push(Arc::clone(pod));
        }
    }
    let nodes = ctx.nodes.state();
    let eligible: HashSet<String> = nodes
        .iter()
        .filter(|n| should_run(&template_spec, n))
        .map(|n| n.name_any())
        .collect();
    let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
    let updated = |p: &Pod| p.labels().get(REVISION_HASH) == Some(&hash);

    let rolling = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate";
    let surge = if rolling {
        max_surge(&ds, eligible.len())
    } else {
        0
    };
    let mut create: Vec<String> = Vec::new();
    let mut delete: Vec<String> = failed;
    // Nodes running an old and a new pod at once (surging).
    let mut surging = 0;
    for node in &eligible {
        match by_node.get(node).map(Vec::as_slice).unwrap_or_default() {
            [] => create.push(node.clone()),
            [_] => {}
            pods if surge > 0 && pods.iter().any(|p| updated(p)) => {
                // Surging: the newest updated pod stays; the old ones go once it is
                // available, and until then stay.
                let mut new: Vec<&Arc<Pod>> = pods.iter().filter(|p| updated(p)).collect();
                new.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
                let keep = new[0];
                delete.extend(new[1..].iter().map(|p| p.name_any()));
                let old = pods.iter().filter(|p| !updated(p));
                if available(keep, min_ready) {
                    delete.extend(old.map(|p| p.name_any()));
                } else if old.count() > 0 {
                    surging += 1;
                }
            }
            pods => {
                // More than one: keep the updated (then oldest) one.
                let mut pods = pods.to_vec();
                pods.sort_by_key(|p| {
                    (
                        !updated(p),
                        p.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    )
                });
                delete.extend(pods[1..].iter().map(|p| p.name_any()));
            }
        }
    }
    // Pods on nodes they no longer belong on (or that are gone).
    for (node, pods) in &by_node {
        if !eligible.contains(node) {
            delete.extend(pods.iter().map(|p| p.name_any()));
        }
    }
    // Rolling update: old pods go, keeping at most maxUnavailable nodes without an
    // available pod.
    if rolling && surge > 0 {
        // Surge: a new pod beside each old one, on up to maxSurge nodes at a time; an old
        // pod that is not available anyway is simply replaced.
        for node in &eligible {
            let Some([pod]) = by_node.get(node).map(Vec::as_slice) else {
                continue;
            };
            if updated(pod) || delete.contains(&pod.name_any()) {
                continue;
            }
            if !available(pod, min_ready) {
                delete.push(pod.name_any());
            } else if surging < surge {
                surging += 1;
                create.push(node.clone());
            }
        }
    } else if rolling {
        let mut unavailable = eligible
            .iter()
            .filter(|n| {
                !by_node
                    .get(*n)
                    .is_some_and(|ps| ps.iter().any(|p| available(p, min_ready)))
            })
            .count();
        let budget = max_unavailable(&ds, eligible.len());
        let mut old: Vec<&Arc<Pod>> = eligible
            .iter()
            .filter_map(|n| by_node.get(n))
            .flatten()
            .filter(|p| !updated(p) && !delete.contains(&p.name_any()))
            .collect();
        // Old pods not available anyway go first, at no cost to the budget.
        old.sort_by_key(|p| (available(p, min_ready), p.name_any()));
        for pod in old {
            if !available(pod, min_ready) {
                delete.push(pod.name_any());
            } else if unavailable < budget {
                unavailable += 1;
                delete.push(pod.name_any());
            }
        }
    }

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut failure = None;
    let mut created = Vec::new();
    if !create.is_empty() {
        let creates = create
            .iter()
            .map(|node| ctx.pod(&ds, &hash, node))
            .collect::<Result<Vec<Pod>, _>>()?;
        let params = PostParams::default();
        let results =
            futures::future::join_all(creates.iter().map(|p| pods.create(&params, p))).await;
        for result in results {
            match result {
                Ok(p) => created.push(p.name_any()),
                Err(e) => failure = Some(e),
            }
        }
    }
    let mut deleted = Vec::new();
    for pod in &delete {
        match pods.delete(pod, &DeleteParams::default()).await {
            Ok(_) => deleted.push(pod.clone()),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => failure = Some(e),
        }
    }
    ctx.remember(&uid, created, deleted);
    if let Some(source) = failure {
        return Err(DaemonSetError::Api {
            action: format!("managing the pods of daemonset {namespace}/{name}"),
            source,
        });
    }
    ctx.prune(&ds, &hash, &owned).await?;
    ctx.status(&ds, &eligible, &by_node, &hash, min_ready)
        .await?;
    Ok(Action::await_change())
}

impl Controller {
    /// Makes sure the template of `ds` is recorded as a ControllerRevision.
    async fn revision(&self, ds: &DaemonSet, hash: &str) -> Result<(), DaemonSetError> {
        let namespace = ds.namespace().unwrap_or_default();
        let name = format!("{}-{hash}", ds.name_any());
        let uid = ds.uid().unwrap_or_default();
        let mine: Vec<Arc<ControllerRevision>> = self
            .revisions
            .state()
            .into_iter()
            .filter(|r| {
                r.namespace().as_deref() == Some(namespace.as_str())
                    && r.owner_references().iter().any(|o| o.uid == uid)
            })
            .collect();
        if mine.iter().any(|r| r.name_any() == name) {
            return Ok(());
        }
        let number = mine.iter().map(|r| r.revision).max().unwrap_or(0) + 1;
        let mut labels = ds
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.clone())
            .unwrap_or_default();
        labels.insert(REVISION_HASH.into(), hash.into());
        let mut template =
            serde_json::to_value(ds.spec.as_ref().map(|s| &s.template)).unwrap_or_default();
        template["$patch"] = json!("replace");
        // The bytes are what Go marshals the template to (kube's `daemon.Match` compares
        // them with the revision's): keys sorted, no null `creationTimestamp` (omitzero).
        let revision: ControllerRevision = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace, "labels": labels,
                         "ownerReferences": [ds.controller_owner_ref(&())]},
            "data": {"spec": {"template": template}},
            "revision": number,
        }))
        .map_err(|source| DaemonSetError::Build {
            daemonset: ds.name_any(),
            source,
        })?;
        let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), &namespace);
        match api.create(&PostParams::default(), &revision).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(source) => Err(DaemonSetError::Api {
                action: format!("creating controllerrevision {namespace}/{name}"),
                source,
            }),
        }
    }

    /// Deletes the oldest revisions beyond `revisionHistoryLimit` (default 10) that neither
    /// the current template nor any pod uses.
    async fn prune(
        &self,
        ds: &DaemonSet,
        hash: &str,
        owned: &[Arc<Pod>],
    ) -> Result<(), DaemonSetError> {
        let namespace = ds.namespace().unwrap_or_default();
        let uid = ds.uid().unwrap_or_default();
        let limit = ds
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let live: HashSet<&str> = owned
            .iter()
            .filter_map(|p| p.labels().get(REVISION_HASH).map(String::as_str))
            .chain([hash])
            .collect();
        let mut old: Vec<Arc<ControllerRevision>> = self
            .revisions
            .state()
            .into_iter()
            .filter(|r| {
                r.namespace().as_deref() == Some(namespace.as_str())
                    && r.owner_references().iter().any(|o| o.uid == uid)
                    && !r
                        .labels()
                        .get(REVISION_HASH)
                        .is_some_and(|h| live.contains(h.as_str()))
            })
            .collect();
        if old.len() <= limit {
            return Ok(());
        }
        old.sort_by_key(|r| r.revision);
        let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), &namespace);
        for r in &old[..old.len() - limit] {
            match api.delete(&r.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(DaemonSetError::Api {
                        action: format!("deleting controllerrevision {namespace}/{}", r.name_any()),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The pod of `ds` for `node`.
    fn pod(&self, ds: &DaemonSet, hash: &str, node: &str) -> Result<Pod, DaemonSetError> {
        let template = ds
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let spec = template.spec.clone().unwrap_or_default();
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": super::pod_metadata(template.metadata.as_ref()),
            "spec": spec,
        });
        pod["metadata"]["generateName"] = json!(format!("{}-", ds.name_any()));
        pod["metadata"]["namespace"] = json!(ds.namespace());
        pod["metadata"]["ownerReferences"] = json!([ds.controller_owner_ref(&())]);
        pod["metadata"]["labels"][REVISION_HASH] = json!(hash);
        pod["metadata"]["labels"][TEMPLATE_GENERATION] =
            json!(ds.metadata.generation.unwrap_or(1).to_string());
        pod["spec"]["tolerations"] = json!(with_default_tolerations(&spec));
        let affinity = spec
            .affinity
            .as_ref()
            .and_then(|a| serde_json::to_value(a).ok());
        pod["spec"]["affinity"] = pin(affinity, node);
        serde_json::from_value(pod).map_err(|source| DaemonSetError::Build {
            daemonset: ds.name_any(),
            source,
        })
    }

    /// Whether creations or deletions for DaemonSet `uid` are still missing from the cache
    /// (`owned` its pods there); forgets those seen, and all after a minute.
    fn waiting(&self, uid: &str, owned: &[Arc<Pod>]) -> bool {
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = expectations.get_mut(uid) else {
            return false;
        };
        let present: HashSet<String> = owned.iter().map(|p| p.name_any()).collect();
        let live: HashSet<String> = owned
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .map(|p| p.name_any())
            .collect();
        e.creating.retain(|n| !present.contains(n));
        e.deleting.retain(|n| live.contains(n));
        let stale = e
            .since
            .is_some_and(|s| s.elapsed() > Duration::from_secs(60));
        if (e.creating.is_empty() && e.deleting.is_empty()) || stale {
            expectations.remove(uid);
            return false;
        }
        true
    }

    fn remember(&self, uid: &str, creating: Vec<String>, deleting: Vec<String>) {
        if creating.is_empty() && deleting.is_empty() {
            return;
        }
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let e = expectations.entry(uid.to_owned()).or_default();
        e.creating.extend(creating);
        e.deleting.extend(deleting);
        e.since = Some(Instant::now());
    }

    /// Writes the counts from what the cache shows, when they changed.
    async fn status(
        &self,
        ds: &DaemonSet,
        eligible: &HashSet<String>,
        by_node: &BTreeMap<String, Vec<Arc<Pod>>>,
        hash: &str,
        min_ready: i64,
    ) -> Result<(), DaemonSetError> {
        let on = |n: &String| by_node.get(n).map(Vec::as_slice).unwrap_or_default();
        let count = |f: &dyn Fn(&Pod) -> bool| {
            eligible
                .iter()
                .filter(|n| on(n).iter().any(|p| f(p)))
                .count() as i32
        };
        let desired = eligible.len() as i32;
        let current = count(&|_| true);
        let ready_count = count(&ready);
        let available_count = count(&|p| available(p, min_ready));
        let updated = count(&|p| p.labels().get(REVISION_HASH).map(String::as_str) == Some(hash));
        let misscheduled = by_node
            .iter()
            .filter(|(n, pods)| !eligible.contains(*n) && !pods.is_empty())
            .count() as i32;
        let status = json!({
            "desiredNumberScheduled": desired,
            "currentNumberScheduled": current,
            "numberMisscheduled": misscheduled,
            "numberReady": ready_count,
            "numberAvailable": available_count,
            "numberUnavailable": desired - available_count,
            "updatedNumberScheduled": updated,
            "observedGeneration": ds.metadata.generation,
        });
        let existing = ds
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or_default();
        let changed = status
            .as_object()
            .into_iter()
            .flatten()
            .any(|(k, v)| existing.get(k).cloned().unwrap_or(json!(0)) != *v);
        if !changed {
            return Ok(());
        }
        let api: Api<DaemonSet> =
            Api::namespaced(self.client.clone(), &ds.namespace().unwrap_or_default());
        api.patch_status(
            &ds.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(|source| DaemonSetError::Api {
            action: format!("updating the status of daemonset {}", ds.name_any()),
            source,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(json: Value) -> Node {
        serde_json::from_value(json).unwrap()
    }

    fn spec(json: Value) -> PodSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn eligibility() {
        let plain = spec(json!({"containers": [{"name": "c"}], "nodeSelector": {"role": "edge"}}));
        let edge = node(json!({"metadata": {"name": "a", "labels": {"role": "edge"}}}));
        let other = node(json!({"metadata": {"name": "b", "labels": {"role": "core"}}}));
        let tainted = node(
            json!({"metadata": {"name": "c", "labels": {"role": "edge"}},
            "spec": {"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]}}),
        );
        let troubled = node(
            json!({"metadata": {"name": "d", "labels": {"role": "edge"}},
            "spec": {"unschedulable": true, "taints": [
                {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"},
                {"key": UNSCHEDULABLE, "effect": "NoSchedule"},
                {"key": "soft", "effect": "PreferNoSchedule"}]}}),
        );
        assert!(should_run(&plain, &edge));
        assert!(!should_run(&plain, &other));
        assert!(!should_run(&plain, &tainted));
        assert!(should_run(&plain, &troubled), "default tolerations");
    }

    #[test]
    fn pinning_keeps_other_requirements() {
        let affinity = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}});
        let pinned = pin(Some(affinity), "n1");
        let term = &pinned["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0];
        assert_eq!(term["matchExpressions"][0]["key"], "zone");
        assert_eq!(term["matchFields"][0]["values"][0], "n1");
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c"}], "affinity": pin(None, "n2")}}))
        .unwrap();
        assert_eq!(pod_node(&pod).as_deref(), Some("n2"));
    }

    #[test]
    fn budget() {
        let ds = |v: Value| -> DaemonSet {
            serde_json::from_value(json!({"metadata": {"name": "d"}, "spec": {
                "selector": {}, "template": {},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": v}}}}))
            .unwrap()
        };
        assert_eq!(max_unavailable(&ds(json!(2)), 10), 2);
        assert_eq!(max_unavailable(&ds(json!("25%")), 10), 3);
        assert_eq!(max_unavailable(&ds(json!(0)), 10), 1);
    }
}
