//! The StatefulSet controller (`statefulset`), as kube-controller-manager's: pods with a
//! stable identity — `<set>-<ordinal>` (ordinals from `spec.ordinals.start`), hostname the
//! pod name, subdomain `spec.serviceName` — each with its own PersistentVolumeClaims
//! (`<template>-<set>-<ordinal>`, from `volumeClaimTemplates`, created before the pod and
//! kept across its replacements, so a recreated pod finds its data).
//!
//! With `OrderedReady` pod management (the default) pods are created one at a time in
//! ordinal order, each once its predecessors are Running and Ready (and available for
//! `minReadySeconds`), and removed one at a time from the highest ordinal; nothing
//! progresses while any pod is unhealthy. `Parallel` creates and removes without waiting.
//! A pod that failed, or that someone deleted, is replaced under the same name.
//!
//! Each template is recorded as a `ControllerRevision` (`<set>-<hash>`, numbered), whose
//! name labels the pods (`controller-revision-hash`) and is reported as
//! `status.updateRevision`; `status.currentRevision` is the one the set was at before, until
//! every pod is updated and ready. A template equal to an earlier revision's reuses that
//! revision (a rollback, as `kubectl rollout undo` does). `RollingUpdate` replaces old pods
//! from the highest ordinal down, at most `maxUnavailable` (default 1) at a time, leaving
//! ordinals below `partition` at the current revision (and recreating them from it);
//! `OnDelete` only gives pods deleted by someone else the new template.
//!
//! `persistentVolumeClaimRetentionPolicy`: `whenDeleted: Delete` makes the set an owner of
//! its claims, `whenScaled: Delete` makes a scaled-away pod the owner of its claims, so the
//! garbage collector removes them. A claim that cannot be provisioned (its StorageClass does
//! not exist, or it is being deleted) holds its pod back, with a warning Event on the set
//! naming the claim.
//!
//! *Expectations* (as the ReplicaSet controller's) keep a slow cache from making it create
//! or delete twice.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimVolumeSource, Pod, PodTemplateSpec, Volume,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{self, EventType};
use crate::labels::matches;
use crate::objects::ready;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["apps"],
        resources: &["statefulsets"],
        verbs: READ,
    },
    Rule {
        api_groups: &["apps"],
        resources: &["statefulsets/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &["apps"],
        resources: &["controllerrevisions"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumeclaims"],
        verbs: &["get", "list", "watch", "create", "patch"],
    },
    Rule {
        api_groups: &["storage.k8s.io"],
        resources: &["storageclasses"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The field manager of the controller's writes (and its events' source).
pub const MANAGER: &str = "statefulset-controller";

/// The label carrying the name of the revision a pod was made from.
pub const REVISION_HASH: &str = "controller-revision-hash";

/// The label carrying a stateful pod's own name (for per-pod Services).
pub const POD_NAME: &str = "statefulset.kubernetes.io/pod-name";

/// The label carrying a stateful pod's ordinal.
pub const POD_INDEX: &str = "apps.kubernetes.io/pod-index";

/// What can go wrong reconciling one StatefulSet (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum StatefulSetError {
    /// A pod, claim or revision could not be written, or the status.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A revision could not be built or read (a defect or an invalid template).
    #[error("revision of statefulset {set}: {source}")]
    Revision {
        /// The StatefulSet.
        set: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// Every name for a new revision was taken by a different template.
    #[error("statefulset {0}: no free revision name after repeated hash collisions")]
    Collisions(String),
}

fn api_error(action: String) -> impl FnOnce(kube::Error) -> StatefulSetError {
    move |source| StatefulSetError::Api { action, source }
}

/// Pods created (by name) and deleted (by UID) but not yet seen so in the cache.
#[derive(Debug, Default)]
struct Expectations {
    creating: Vec<String>,
    deleting: Vec<String>,
    since: Option<Instant>,
}

/// How long unmet expectations hold a set back before they are forgotten (a pod created and
/// deleted before the cache saw it never shows up).
const EXPECTATION_TIMEOUT: Duration = Duration::from_secs(15);

/// How soon a pod held back by its claim is looked at again.
const CLAIM_RETRY: Duration = Duration::from_secs(5);

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    pods: Store<Pod>,
    revisions: Store<ControllerRevision>,
    claims: Store<PersistentVolumeClaim>,
    classes: Store<StorageClass>,
    expectations: Mutex<HashMap<String, Expectations>>,
    /// The last warning published per set UID, so a stuck claim is reported once.
    warned: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatefulSetController")
            .finish_non_exhaustive()
    }
}

fn owner_of(pod: &Pod) -> Option<ObjectRef<StatefulSet>> {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "StatefulSet")?;
    Some(ObjectRef::new(&owner.name).within(&pod.namespace()?))
}

/// Adds the StatefulSet controller to `manager`.
pub fn add(manager: &mut Manager) {
    let sets = manager.cache::<StatefulSet>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let revisions = manager.cache::<ControllerRevision>(watcher::Config::default());
    let claims = manager.cache::<PersistentVolumeClaim>(watcher::Config::default());
    let classes = manager.cache::<StorageClass>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        pods: pods.store(),
        revisions: revisions.store(),
        claims: claims.store(),
        classes: classes.store(),
        expectations: Mutex::default(),
        warned: Mutex::default(),
    });
    let candidates = sets.store();
    let runner = Runner::for_cache("statefulset", &sets)
        .and_then(|r| r.owns(&pods))
        .and_then(|r| r.watches_deleted(&pods, |pod: Arc<Pod>| owner_of(&pod)))
        .and_then(|r| {
            // An orphan named like one of a set's pods, and selected by it, wakes the set
            // to adopt it.
            r.watches(&pods, move |pod: Arc<Pod>| {
                let orphan = !pod
                    .owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true));
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                candidates
                    .state()
                    .into_iter()
                    .filter(|set| {
                        orphan
                            && set.namespace() == pod.namespace()
                            && ordinal_of(&set.name_any(), &pod.name_any()).is_some()
                            && set
                                .spec
                                .as_ref()
                                .is_some_and(|s| matches(&s.selector, &labels))
                    })
                    .map(|set| ObjectRef::from_obj(set.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

/// The ordinal of pod `pod` of set `set` (`<set>-<ordinal>`), if it is named as one.
pub fn ordinal_of(set: &str, pod: &str) -> Option<i32> {
    let digits = pod.strip_prefix(set)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The name of claim template `template`'s claim for the pod of `set` at `ordinal`.
pub fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn finished(pod: &Pod) -> bool {
    matches!(phase(pod), "Failed" | "Succeeded")
}

fn running_ready(pod: &Pod) -> bool {
    phase(pod) == "Running" && ready(pod)
}

/// Running, and ready for `min_ready` seconds: `None`; otherwise how much longer it has to
/// stay ready (zero when it is not ready at all).
fn unavailable_for(pod: &Pod, min_ready: i64) -> Option<Duration> {
    if !running_ready(pod) {
        return Some(Duration::ZERO);
    }
    if min_ready <= 0 {
        return None;
    }
    let since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_transition_time.as_ref())
        .map(|t| t.0.as_second())?;
    let ready_for = jiff::Timestamp::now().as_second() - since;
    (ready_for < min_ready).then(|| Duration::from_secs((min_ready - ready_for).max(1) as u64))
}

fn available(pod: &Pod, min_ready: i64) -> bool {
    unavailable_for(pod, min_ready).is_none()
}

fn revision_label(pod: &Pod) -> Option<&str> {
    pod.labels().get(REVISION_HASH).map(String::as_str)
}

/// A stable hash of the template and the collision count (FNV-1a over its JSON; kube's is
/// over its own encoding), short as kube's.
fn template_hash(template: &PodTemplateSpec, collisions: i32) -> String {
    let mut text = serde_json::to_string(template).unwrap_or_default();
    if collisions > 0 {
        text.push_str(&collisions.to_string());
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{:x}", hash & 0xff_ffff_ffff)
}

/// The template a revision records (its data is the patch `kubectl rollout undo` applies:
/// `{"spec": {"template": {…, "$patch": "replace"}}}`).
fn template_of(revision: &ControllerRevision) -> Option<PodTemplateSpec> {
    let template = revision.data.as_ref()?.0.pointer("/spec/template")?.clone();
    serde_json::from_value(template).ok()
}

/// How many of `replicas` may be unavailable during a rolling update: an integer, or a
/// percentage rounded down; at least 1.
fn max_unavailable(spec: &StatefulSetSpec, replicas: usize) -> usize {
    let value = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.max_unavailable.clone())
        .unwrap_or(IntOrString::Int(1));
    let n = match value {
        IntOrString::Int(n) => n.max(0) as usize,
        IntOrString::String(s) => {
            let percent: usize = s.trim_end_matches('%').parse().unwrap_or(0);
            replicas * percent / 100
        }
    };
    n.max(1)
}

/// The set's update strategy is `RollingUpdate` (the default).
fn rolling(spec: &StatefulSetSpec) -> bool {
    spec.update_strategy
        .as_ref()
        .and_then(|u| u.type_.as_deref())
        .unwrap_or("RollingUpdate")
        == "RollingUpdate"
}

/// Whether the retention policy deletes claims when the set is deleted (`deleted`) or
/// when their pod is scaled away.
fn policy_deletes(spec: &StatefulSetSpec, deleted: bool) -> bool {
    let Some(policy) = spec.persistent_volume_claim_retention_policy.as_ref() else {
        return false;
    };
    let when = if deleted {
        &policy.when_deleted
    } else {
        &policy.when_scaled
    };
    when.as_deref() == Some("Delete")
}

/// A new revision of `set` recording `template`.
fn new_revision(
    set: &StatefulSet,
    template: &PodTemplateSpec,
    collisions: i32,
    number: i64,
) -> Result<ControllerRevision, StatefulSetError> {
    let hash = template_hash(template, collisions);
    let mut labels: BTreeMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    labels.insert("controller.kubernetes.io/hash".into(), hash.clone());
    let mut data = serde_json::to_value(template).map_err(|source| StatefulSetError::Revision {
        set: set.name_any(),
        source,
    })?;
    data["$patch"] = json!("replace");
    serde_json::from_value(json!({
        "metadata": {"name": format!("{}-{hash}", set.name_any()),
                     "namespace": set.namespace(), "labels": labels,
                     "ownerReferences": [set.controller_owner_ref(&())]},
        "data": {"spec": {"template": data}},
        "revision": number,
    }))
    .map_err(|source| StatefulSetError::Revision {
        set: set.name_any(),
        source,
    })
}

/// The pod of `set` at `ordinal`, made from `template` of revision `revision`.
pub fn build_pod(
    set: &StatefulSet,
    template: &PodTemplateSpec,
    revision: &str,
    ordinal: i32,
) -> Pod {
    let set_name = set.name_any();
    let name = format!("{set_name}-{ordinal}");
    let spec = set.spec.clone().unwrap_or_default();
    let meta = template.metadata.clone().unwrap_or_default();
    let mut labels = meta.labels.unwrap_or_default();
    labels.insert(POD_NAME.into(), name.clone());
    labels.insert(POD_INDEX.into(), ordinal.to_string());
    labels.insert(REVISION_HASH.into(), revision.into());
    let mut pod_spec = template.spec.clone().unwrap_or_default();
    pod_spec.hostname = Some(name.clone());
    pod_spec.subdomain = spec.service_name.clone().filter(|s| !s.is_empty());
    let mut volumes = pod_spec.volumes.take().unwrap_or_default();
    for claim in spec.volume_claim_templates.iter().flatten() {
        let volume_name = claim.name_any();
        volumes.retain(|v| v.name != volume_name);
        volumes.push(Volume {
            name: volume_name.clone(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim_name(&volume_name, &set_name, ordinal),
                read_only: None,
            }),
            ..Volume::default()
        });
    }
    pod_spec.volumes = (!volumes.is_empty()).then_some(volumes);
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: set.namespace(),
            labels: Some(labels),
            annotations: meta.annotations,
            finalizers: meta.finalizers,
            owner_references: set.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(pod_spec),
        status: None,
    }
}

/// The claims of the pod of `set` at `ordinal`, from its `volumeClaimTemplates`: the
/// template's labels plus the selector's, its annotations and spec.
pub fn build_claims(set: &StatefulSet, ordinal: i32) -> Vec<PersistentVolumeClaim> {
    let set_name = set.name_any();
    let spec = set.spec.clone().unwrap_or_default();
    let selector = spec.selector.match_labels.clone().unwrap_or_default();
    spec.volume_claim_templates
        .iter()
        .flatten()
        .map(|template| {
            let mut labels = template.metadata.labels.clone().unwrap_or_default();
            labels.extend(selector.clone());
            PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(claim_name(&template.name_any(), &set_name, ordinal)),
                    namespace: set.namespace(),
                    labels: Some(labels),
                    annotations: template.metadata.annotations.clone(),
                    ..ObjectMeta::default()
                },
                spec: template.spec.clone(),
                status: None,
            }
        })
        .collect()
}

/// A controller reference to `object`, as the retention policy sets on claims.
fn owner_ref<K: Resource<DynamicType = ()>>(object: &K) -> OwnerReference {
    object
        .controller_owner_ref(&())
        .unwrap_or_else(|| OwnerReference {
            api_version: K::api_version(&()).into_owned(),
            kind: K::kind(&()).into_owned(),
            name: object.name_any(),
            uid: object.uid().unwrap_or_default(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        })
}

/// The owner references claim `claim` should have under the retention policy: the set
/// when `whenDeleted: Delete`, or, for a pod scaled away (`condemned`) under
/// `whenScaled: Delete`, that pod instead. References to other owners are kept; a claim
/// another controller owns gets neither.
fn claim_owners(
    claim: &PersistentVolumeClaim,
    set: &StatefulSet,
    pod: &Pod,
    condemned: bool,
) -> Vec<OwnerReference> {
    let spec = set.spec.clone().unwrap_or_default();
    let set_uid = set.uid().unwrap_or_default();
    let mut owners: Vec<OwnerReference> = claim
        .owner_references()
        .iter()
        // Any earlier pod of that name too: a scaled-away pod's claim that is in use again.
        .filter(|o| o.uid != set_uid && !(o.kind == "Pod" && o.name == pod.name_any()))
        .cloned()
        .collect();
    if owners.iter().any(|o| o.controller == Some(true)) {
        return owners;
    }
    if condemned && policy_deletes(&spec, false) {
        owners.push(owner_ref(pod));
    } else if policy_deletes(&spec, true) {
        owners.push(owner_ref(set));
    }
    owners
}

/// The set's pods split by ordinal: those in `[start, start + replicas)` by slot, the
/// others (to scale away) in ordinal order.
#[derive(Debug, Default)]
struct Split {
    slots: Vec<Option<Arc<Pod>>>,
    condemned: Vec<(i32, Arc<Pod>)>,
}

fn split(set_name: &str, owned: &[Arc<Pod>], start: i32, replicas: i32) -> Split {
    let mut out = Split {
        slots: vec![None; replicas.max(0) as usize],
        condemned: Vec::new(),
    };
    for pod in owned {
        let Some(ordinal) = ordinal_of(set_name, &pod.name_any()) else {
            continue;
        };
        if ordinal >= start && ordinal - start < replicas {
            out.slots[(ordinal - start) as usize] = Some(Arc::clone(pod));
        } else {
            out.condemned.push((ordinal, Arc::clone(pod)));
        }
    }
    out.condemned.sort_by_key(|(o, _)| *o);
    out
}

/// The revisions a reconcile works with.
#[derive(Debug)]
struct Revisions {
    current: ControllerRevision,
    update: ControllerRevision,
    collisions: i32,
}

async fn reconcile(
    set: Arc<StatefulSet>,
    ctx: Arc<Controller>,
) -> Result<Action, StatefulSetError> {
    if set.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = set.name_any();
    let namespace = set.namespace().unwrap_or_default();
    let uid = set.uid().unwrap_or_default();
    let spec = set.spec.clone().unwrap_or_default();
    ctx.adopt_and_release(&set).await;

    let owned: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(namespace.as_str())
                && p.owner_references()
                    .iter()
                    .any(|o| o.controller == Some(true) && o.uid == uid)
                && matches(&spec.selector, p.labels())
        })
        .collect();
    if ctx.waiting(&uid, &owned) {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let revisions = ctx.revisions(&set).await?;
    let current_template = template_of(&revisions.current).unwrap_or_else(|| spec.template.clone());

    let replicas = spec.replicas.unwrap_or(1).max(0);
    let start = spec
        .ordinals
        .as_ref()
        .and_then(|o| o.start)
        .unwrap_or(0)
        .max(0);
    let monotonic = spec.pod_management_policy.as_deref() != Some("Parallel");
    let min_ready = i64::from(spec.min_ready_seconds.unwrap_or(0));
    let rolling = rolling(&spec);
    let partition = if rolling {
        spec.update_strategy
            .as_ref()
            .and_then(|u| u.rolling_update.as_ref())
            .and_then(|r| r.partition)
            .unwrap_or(0)
            .clamp(0, replicas)
    } else {
        0
    };
    let Split { slots, condemned } = split(&name, &owned, start, replicas);
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);

    let mut created: Vec<String> = Vec::new();
    let mut deleted: Vec<String> = Vec::new();
    let mut requeue: Option<Duration> = None;
    let mut halted = false;
    let mut outcome: Result<(), StatefulSetError> = Ok(());

    // Claims follow the retention policy.
    for pod in &owned {
        let condemned = condemned.iter().any(|(_, p)| p.uid() == pod.uid());
        ctx.own_claims(&set, pod, condemned).await;
    }

    // Scale up, replace failed pods, and (OrderedReady) wait for each to be ready.
    for (index, slot) in slots.iter().enumerate() {
        let ordinal = start + index as i32;
        match slot {
            None => {
                let (template, revision) = if rolling && (index as i32) < partition {
                    (&current_template, &revisions.current)
                } else {
                    (&spec.template, &revisions.update)
                };
                match ctx.ensure_claims(&set, ordinal).await {
                    Ok(None) => {
                        let pod = build_pod(&set, template, &revision.name_any(), ordinal);
                        let pod_name = pod.name_any();
                        match pods.create(&PostParams::default(), &pod).await {
                            Ok(_) => {
                                created.push(pod_name.clone());
                                ctx.forget_warning(&uid);
                                ctx.event(
                                    &set,
                                    EventType::Normal,
                                    "SuccessfulCreate",
                                    &format!(
                                        "create Pod {pod_name} in StatefulSet {name} successful"
                                    ),
                                )
                                .await;
                            }
                            // The old pod of that name is still on its way out.
                            Err(kube::Error::Api(s)) if s.code == 409 => {
                                requeue = Some(Duration::from_secs(1));
                            }
                            Err(source) => {
                                ctx.event(
                                    &set,
                                    EventType::Warning,
                                    "FailedCreate",
                                    &format!("create Pod {pod_name} in StatefulSet {name} failed error: {source}"),
                                )
                                .await;
                                outcome = Err(StatefulSetError::Api {
                                    action: format!("creating pod {namespace}/{pod_name}"),
                                    source,
                                });
                            }
                        }
                    }
                    Ok(Some(problem)) => {
                        ctx.warn_once(
                            &set,
                            &format!(
                                "create Pod {name}-{ordinal} in StatefulSet {name} waits: {problem}"
                            ),
                        )
                        .await;
                        requeue = Some(CLAIM_RETRY);
                    }
                    Err(e) => outcome = Err(e),
                }
                if monotonic || outcome.is_err() {
                    halted = true;
                    break;
                }
            }
            Some(pod) if finished(pod) && !terminating(pod) => {
                // Failed (rejected, evicted) or done: replaced under the same name once gone.
                match ctx.delete_pod(&set, pod).await {
                    Ok(true) => deleted.push(pod.uid().unwrap_or_default()),
                    Ok(false) => {}
                    Err(e) => outcome = Err(e),
                }
                if monotonic || outcome.is_err() {
                    halted = true;
                    break;
                }
            }
            Some(pod) if terminating(pod) => {
                if monotonic {
                    halted = true;
                    break;
                }
            }
            Some(pod) => {
                if monotonic && !running_ready(pod) {
                    halted = true;
                    break;
                }
                if monotonic && let Some(wait) = unavailable_for(pod, min_ready) {
                    requeue = Some(wait);
                    halted = true;
                    break;
                }
            }
        }
    }

    // Scale down from the highest ordinal; OrderedReady: one at a time, and only the first
    // unhealthy pod may go while it is unhealthy.
    if !halted {
        let first_unhealthy = slots
            .iter()
            .flatten()
            .chain(condemned.iter().map(|(_, p)| p))
            .find(|p| terminating(p) || !running_ready(p))
            .and_then(|p| p.uid());
        for (_, pod) in condemned.iter().rev() {
            if terminating(pod) {
                if monotonic {
                    halted = true;
                    break;
                }
                continue;
            }
            if monotonic && !running_ready(pod) && pod.uid() != first_unhealthy {
                halted = true;
                break;
            }
            match ctx.delete_pod(&set, pod).await {
                Ok(true) => deleted.push(pod.uid().unwrap_or_default()),
                Ok(false) => {}
                Err(e) => {
                    outcome = Err(e);
                    halted = true;
                    break;
                }
            }
            if monotonic {
                halted = true;
                break;
            }
        }
    }

    // Rolling update: old pods at or above the partition go, highest first, at most
    // maxUnavailable unavailable at a time.
    if !halted && rolling {
        let budget = max_unavailable(&spec, replicas as usize);
        let mut unavailable = slots
            .iter()
            .filter(|slot| match slot {
                None => true,
                Some(p) => terminating(p) || !available(p, min_ready),
            })
            .count();
        let update_name = revisions.update.name_any();
        for slot in slots.iter().skip(partition as usize).rev() {
            let Some(pod) = slot else { continue };
            if terminating(pod) || revision_label(pod) == Some(update_name.as_str()) {
                continue;
            }
            let counts = available(pod, min_ready);
            if counts && unavailable >= budget {
                break;
            }
            match ctx.delete_pod(&set, pod).await {
                Ok(true) => deleted.push(pod.uid().unwrap_or_default()),
                Ok(false) => {}
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
            if counts {
                unavailable += 1;
            }
        }
    }

    ctx.remember(&uid, created, deleted);
    outcome?;
    ctx.prune(&set, &revisions, &owned).await?;
    ctx.status(&set, &revisions, &owned, min_ready).await?;
    // Pods ready but not yet for minReadySeconds: look again when they will count as
    // available.
    let pending = owned
        .iter()
        .filter(|p| running_ready(p))
        .filter_map(|p| unavailable_for(p, min_ready))
        .min();
    let requeue = match (requeue, pending) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

impl Controller {
    /// Publishes an event about `set`.
    async fn event(&self, set: &StatefulSet, type_: EventType, reason: &str, message: &str) {
        events::publish(&self.client, MANAGER, set, type_, reason, message).await;
    }

    /// Publishes warning `message` about `set` unless it was the last one published.
    async fn warn_once(&self, set: &StatefulSet, message: &str) {
        let uid = set.uid().unwrap_or_default();
        {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if warned.get(&uid).map(String::as_str) == Some(message) {
                return;
            }
            warned.insert(uid, message.to_owned());
        }
        tracing::info!(set = %set.name_any(), "{message}");
        self.event(set, EventType::Warning, "FailedCreate", message)
            .await;
    }

    fn forget_warning(&self, uid: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
        warned.remove(uid);
    }

    /// Deletes `pod` (that very pod: a UID precondition); whether a delete was sent.
    async fn delete_pod(&self, set: &StatefulSet, pod: &Pod) -> Result<bool, StatefulSetError> {
        let namespace = pod.namespace().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        let pod_name = pod.name_any();
        match api.delete(&pod_name, &params).await {
            Ok(_) => {
                self.event(
                    set,
                    EventType::Normal,
                    "SuccessfulDelete",
                    &format!(
                        "delete Pod {pod_name} in StatefulSet {} successful",
                        set.name_any()
                    ),
                )
                .await;
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
            Err(source) => Err(StatefulSetError::Api {
                action: format!("deleting pod {namespace}/{pod_name}"),
                source,
            }),
        }
    }

    /// Creates the missing claims of the pod at `ordinal`; `Some(problem)` when one of them
    /// cannot be provisioned (so the pod must wait).
    async fn ensure_claims(
        &self,
        set: &StatefulSet,
        ordinal: i32,
    ) -> Result<Option<String>, StatefulSetError> {
        let namespace = set.namespace().unwrap_or_default();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &namespace);
        let pod_name = format!("{}-{ordinal}", set.name_any());
        for mut claim in build_claims(set, ordinal) {
            let claim_name = claim.name_any();
            let key = ObjectRef::new(&claim_name).within(&namespace);
            let existing = match self.claims.get(&key) {
                Some(c) => (*c).clone(),
                None => {
                    if set.spec.as_ref().is_some_and(|s| policy_deletes(s, true)) {
                        claim.metadata.owner_references = Some(vec![owner_ref(set)]);
                    }
                    match api.create(&PostParams::default(), &claim).await {
                        Ok(c) => {
                            self.event(
                                set,
                                EventType::Normal,
                                "SuccessfulCreate",
                                &format!(
                                    "create Claim {claim_name} Pod {pod_name} in StatefulSet {} success",
                                    set.name_any()
                                ),
                            )
                            .await;
                            c
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            api.get(&claim_name).await.map_err(api_error(format!(
                                "reading claim {namespace}/{claim_name}"
                            )))?
                        }
                        Err(source) => {
                            let message = format!(
                                "create Claim {claim_name} for Pod {pod_name} in StatefulSet {} failed error: {source}",
                                set.name_any()
                            );
                            self.warn_once(set, &message).await;
                            return Err(StatefulSetError::Api {
                                action: format!("creating claim {namespace}/{claim_name}"),
                                source,
                            });
                        }
                    }
                }
            };
            if let Some(problem) = self.claim_problem(&existing) {
                return Ok(Some(problem));
            }
        }
        Ok(None)
    }

    /// Why `claim` cannot serve a new pod: it is being deleted, or it is unbound and its
    /// StorageClass does not exist.
    fn claim_problem(&self, claim: &PersistentVolumeClaim) -> Option<String> {
        let name = claim.name_any();
        if claim.metadata.deletion_timestamp.is_some() {
            return Some(format!("claim {name} is being deleted"));
        }
        let spec = claim.spec.as_ref()?;
        let bound = spec.volume_name.as_deref().is_some_and(|v| !v.is_empty())
            || claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        let class = spec.storage_class_name.as_deref().unwrap_or("");
        if bound || class.is_empty() || self.classes.get(&ObjectRef::new(class)).is_some() {
            return None;
        }
        Some(format!(
            "claim {name} cannot be provisioned: storageclass.storage.k8s.io \"{class}\" not found"
        ))
    }

    /// Gives the claims of `pod` the owners the retention policy asks for.
    async fn own_claims(&self, set: &StatefulSet, pod: &Pod, condemned: bool) {
        let Some(ordinal) = ordinal_of(&set.name_any(), &pod.name_any()) else {
            return;
        };
        let namespace = set.namespace().unwrap_or_default();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &namespace);
        for template in set
            .spec
            .as_ref()
            .and_then(|s| s.volume_claim_templates.as_ref())
            .into_iter()
            .flatten()
        {
            let name = claim_name(&template.name_any(), &set.name_any(), ordinal);
            let Some(claim) = self.claims.get(&ObjectRef::new(&name).within(&namespace)) else {
                continue;
            };
            let owners = claim_owners(&claim, set, pod, condemned);
            if owners.as_slice() == claim.owner_references() {
                continue;
            }
            let patch = json!({"metadata": {"uid": claim.uid(), "ownerReferences": owners}});
            if let Err(error) = api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                tracing::debug!(%error, claim = %name, "updating a claim's owners failed");
            }
        }
    }

    /// Adopts orphans the set selects and names as its own; releases owned pods it no
    /// longer selects. Failures are retried by the next reconcile.
    async fn adopt_and_release(&self, set: &StatefulSet) {
        let namespace = set.namespace().unwrap_or_default();
        let uid = set.uid().unwrap_or_default();
        let name = set.name_any();
        let Some(spec) = set.spec.as_ref() else {
            return;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        for pod in self.pods.state() {
            if pod.namespace().as_deref() != Some(namespace.as_str()) || terminating(&pod) {
                continue;
            }
            let controller = pod
                .owner_references()
                .iter()
                .find(|o| o.controller == Some(true));
            let selected = matches(&spec.selector, pod.labels());
            let owners = match controller {
                None if selected && ordinal_of(&name, &pod.name_any()).is_some() => {
                    let mut owners = pod.owner_references().to_vec();
                    owners.extend(set.controller_owner_ref(&()));
                    owners
                }
                Some(o) if o.uid == uid && !selected => pod
                    .owner_references()
                    .iter()
                    .filter(|o| o.uid != uid)
                    .cloned()
                    .collect(),
                _ => continue,
            };
            let patch = json!({"metadata": {"uid": pod.uid(), "ownerReferences": owners}});
            if let Err(error) = api
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                tracing::debug!(%error, pod = %pod.name_any(), "adopting or releasing failed");
            }
        }
    }

    /// The set's revisions, in revision order.
    fn owned_revisions(&self, set: &StatefulSet) -> Vec<Arc<ControllerRevision>> {
        let namespace = set.namespace().unwrap_or_default();
        let uid = set.uid().unwrap_or_default();
        let mut mine: Vec<Arc<ControllerRevision>> = self
            .revisions
            .state()
            .into_iter()
            .filter(|r| {
                r.namespace().as_deref() == Some(namespace.as_str())
                    && r.owner_references()
                        .iter()
                        .any(|o| o.controller == Some(true) && o.uid == uid)
            })
            .collect();
        mine.sort_by_key(|r| r.revision);
        mine
    }

    /// The current and update revisions: the update revision is the one recording the
    /// template — an existing one (renumbered to the newest when it was older: a rollback)
    /// or a new one; the current one is `status.currentRevision`, else the update revision.
    async fn revisions(&self, set: &StatefulSet) -> Result<Revisions, StatefulSetError> {
        let set_name = set.name_any();
        let namespace = set.namespace().unwrap_or_default();
        let template = set
            .spec
            .as_ref()
            .map(|s| s.template.clone())
            .unwrap_or_default();
        let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), &namespace);
        let mine = self.owned_revisions(set);
        let newest = mine.iter().map(|r| r.revision).max().unwrap_or(0);
        let mut collisions = set
            .status
            .as_ref()
            .and_then(|s| s.collision_count)
            .unwrap_or(0);
        let equal = mine
            .iter()
            .rev()
            .find(|r| template_of(r).as_ref() == Some(&template));
        let update = match equal {
            Some(r) if r.revision == newest => (**r).clone(),
            Some(r) => {
                let patch = json!({"revision": newest + 1});
                api.patch(
                    &r.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map_err(api_error(format!(
                    "renumbering controllerrevision {namespace}/{}",
                    r.name_any()
                )))?
            }
            None => {
                let mut made = None;
                for _ in 0..16 {
                    let revision = new_revision(set, &template, collisions, newest + 1)?;
                    let revision_name = revision.name_any();
                    match api.create(&PostParams::default(), &revision).await {
                        Ok(r) => {
                            made = Some(r);
                            break;
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => {
                            let existing = api.get(&revision_name).await.map_err(api_error(
                                format!("reading controllerrevision {namespace}/{revision_name}"),
                            ))?;
                            let ours = existing
                                .owner_references()
                                .iter()
                                .any(|o| Some(&o.uid) == set.uid().as_ref());
                            if ours && template_of(&existing).as_ref() == Some(&template) {
                                made = Some(existing);
                                break;
                            }
                            collisions += 1;
                        }
                        Err(source) => {
                            return Err(StatefulSetError::Api {
                                action: format!(
                                    "creating controllerrevision {namespace}/{revision_name}"
                                ),
                                source,
                            });
                        }
                    }
                }
                made.ok_or_else(|| StatefulSetError::Collisions(set_name.clone()))?
            }
        };
        let wanted = set
            .status
            .as_ref()
            .and_then(|s| s.current_revision.clone())
            .unwrap_or_default();
        let current = mine
            .iter()
            .find(|r| !wanted.is_empty() && r.name_any() == wanted)
            .map(|r| (**r).clone())
            .unwrap_or_else(|| update.clone());
        Ok(Revisions {
            current,
            update,
            collisions,
        })
    }

    /// Deletes the oldest revisions beyond `revisionHistoryLimit` (default 10) that neither
    /// the current nor the update revision is, nor any pod uses.
    async fn prune(
        &self,
        set: &StatefulSet,
        revisions: &Revisions,
        owned: &[Arc<Pod>],
    ) -> Result<(), StatefulSetError> {
        let namespace = set.namespace().unwrap_or_default();
        let limit = set
            .spec
            .as_ref()
            .and_then(|s| s.revision_history_limit)
            .unwrap_or(10)
            .max(0) as usize;
        let current = revisions.current.name_any();
        let update = revisions.update.name_any();
        let live: HashSet<&str> = owned
            .iter()
            .filter_map(|p| revision_label(p))
            .chain([current.as_str(), update.as_str()])
            .collect();
        let old: Vec<Arc<ControllerRevision>> = self
            .owned_revisions(set)
            .into_iter()
            .filter(|r| !live.contains(r.name_any().as_str()))
            .collect();
        if old.len() <= limit {
            return Ok(());
        }
        let api: Api<ControllerRevision> = Api::namespaced(self.client.clone(), &namespace);
        for r in &old[..old.len() - limit] {
            match api.delete(&r.name_any(), &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => {
                    return Err(StatefulSetError::Api {
                        action: format!("deleting controllerrevision {namespace}/{}", r.name_any()),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// Whether creations or deletions for set `uid` are still missing from the cache
    /// (`owned` its pods there); forgets those seen, and all after a while.
    fn waiting(&self, uid: &str, owned: &[Arc<Pod>]) -> bool {
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = expectations.get_mut(uid) else {
            return false;
        };
        let present: HashSet<String> = owned.iter().map(|p| p.name_any()).collect();
        let live: HashSet<String> = owned
            .iter()
            .filter(|p| !terminating(p))
            .filter_map(|p| p.uid())
            .collect();
        e.creating.retain(|n| !present.contains(n));
        e.deleting.retain(|u| live.contains(u));
        let stale = e.since.is_some_and(|s| s.elapsed() > EXPECTATION_TIMEOUT);
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

    /// Writes the counts and revisions from what the cache shows, when they changed. The
    /// update is complete (the current revision becomes the update revision) once every
    /// pod is updated and ready.
    async fn status(
        &self,
        set: &StatefulSet,
        revisions: &Revisions,
        owned: &[Arc<Pod>],
        min_ready: i64,
    ) -> Result<(), StatefulSetError> {
        let current_name = revisions.current.name_any();
        let update_name = revisions.update.name_any();
        let count = |f: &dyn Fn(&Pod) -> bool| owned.iter().filter(|p| f(p)).count() as i64;
        let replicas = count(&|_| true);
        let ready_count = count(&running_ready);
        let available_count = count(&|p| available(p, min_ready));
        let mut current_count =
            count(&|p| !terminating(p) && revision_label(p) == Some(current_name.as_str()));
        let updated_count =
            count(&|p| !terminating(p) && revision_label(p) == Some(update_name.as_str()));
        let mut current = current_name.clone();
        if updated_count == replicas && ready_count == replicas {
            current = update_name.clone();
            current_count = updated_count;
        }
        let status = json!({
            "observedGeneration": set.metadata.generation,
            "replicas": replicas,
            "readyReplicas": ready_count,
            "currentReplicas": current_count,
            "updatedReplicas": updated_count,
            "availableReplicas": available_count,
            "currentRevision": current,
            "updateRevision": update_name,
            "collisionCount": revisions.collisions,
        });
        let existing = set
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or_default();
        let changed = status.as_object().into_iter().flatten().any(|(k, v)| {
            let default = if v.is_string() { json!("") } else { json!(0) };
            existing.get(k).cloned().unwrap_or(default) != *v
        });
        if !changed {
            return Ok(());
        }
        let api: Api<StatefulSet> =
            Api::namespaced(self.client.clone(), &set.namespace().unwrap_or_default());
        api.patch_status(
            &set.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"status": status})),
        )
        .await
        .map_err(api_error(format!(
            "updating the status of statefulset {}",
            set.name_any()
        )))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn set(extra: Value) -> StatefulSet {
        let mut base = json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u-1"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "serviceName": "nginx",
                     "template": {"metadata": {"labels": {"app": "web"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}],
                                           "volumes": [{"name": "data", "emptyDir": {}}]}},
                     "volumeClaimTemplates": [{"metadata": {"name": "data", "labels": {"tier": "db"}},
                                               "spec": {"accessModes": ["ReadWriteOnce"]}}]}});
        if let (Some(b), Some(e)) = (base["spec"].as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal_of("web", "web-0"), Some(0));
        assert_eq!(ordinal_of("web", "web-12"), Some(12));
        assert_eq!(ordinal_of("web", "web-x"), None);
        assert_eq!(ordinal_of("web", "web-"), None);
        assert_eq!(ordinal_of("web", "web-1-2"), None);
        assert_eq!(ordinal_of("web", "webs-1"), None);
        assert_eq!(ordinal_of("web", "web--1"), None);
    }

    #[test]
    fn pod_identity() {
        let s = set(json!({}));
        let template = s.spec.as_ref().unwrap().template.clone();
        let pod = build_pod(&s, &template, "web-abc", 2);
        assert_eq!(pod.name_any(), "web-2");
        let labels = pod.labels();
        assert_eq!(labels[POD_NAME], "web-2");
        assert_eq!(labels[POD_INDEX], "2");
        assert_eq!(labels[REVISION_HASH], "web-abc");
        assert_eq!(labels["app"], "web");
        let spec = pod.spec.unwrap();
        assert_eq!(spec.hostname.as_deref(), Some("web-2"));
        assert_eq!(spec.subdomain.as_deref(), Some("nginx"));
        let volumes = spec.volumes.unwrap();
        assert_eq!(volumes.len(), 1, "the claim replaces the template's volume");
        assert_eq!(
            volumes[0]
                .persistent_volume_claim
                .as_ref()
                .unwrap()
                .claim_name,
            "data-web-2"
        );
        let owner = &pod.metadata.owner_references.unwrap()[0];
        assert_eq!((owner.uid.as_str(), owner.controller), ("u-1", Some(true)));

        let claims = build_claims(&s, 2);
        assert_eq!(claims[0].name_any(), "data-web-2");
        let labels = claims[0].labels();
        assert_eq!(
            (labels["app"].as_str(), labels["tier"].as_str()),
            ("web", "db")
        );
    }

    #[test]
    fn retention_owners() {
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "web-3", "uid": "p-3"}})).unwrap();
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {
            "name": "data-web-3",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Thing", "name": "t", "uid": "t-1"}]}}))
        .unwrap();
        let uids = |owners: Vec<OwnerReference>| -> Vec<String> {
            owners.into_iter().map(|o| o.uid).collect()
        };
        let retain = set(json!({}));
        assert_eq!(uids(claim_owners(&claim, &retain, &pod, true)), ["t-1"]);
        let deleting = set(json!({"persistentVolumeClaimRetentionPolicy":
            {"whenDeleted": "Delete", "whenScaled": "Delete"}}));
        assert_eq!(
            uids(claim_owners(&claim, &deleting, &pod, false)),
            ["t-1", "u-1"]
        );
        assert_eq!(
            uids(claim_owners(&claim, &deleting, &pod, true)),
            ["t-1", "p-3"]
        );
        // A claim left owned by an earlier web-3 (scaled away, then back) loses that owner.
        let stale: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {
            "name": "data-web-3",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "web-3", "uid": "p-old"}]}}))
        .unwrap();
        assert!(claim_owners(&stale, &retain, &pod, false).is_empty());
        // Another controller's claim is left to it.
        let foreign: PersistentVolumeClaim = serde_json::from_value(json!({"metadata": {
            "name": "data-web-3",
            "ownerReferences": [{"apiVersion": "v1", "kind": "Thing", "name": "t", "uid": "t-1",
                                 "controller": true}]}}))
        .unwrap();
        assert_eq!(uids(claim_owners(&foreign, &deleting, &pod, true)), ["t-1"]);
    }

    #[test]
    fn splitting_and_budget() {
        let pod = |name: &str| -> Arc<Pod> {
            Arc::new(serde_json::from_value(json!({"metadata": {"name": name}})).unwrap())
        };
        let owned = vec![
            pod("web-4"),
            pod("web-1"),
            pod("web-2"),
            pod("web-0"),
            pod("other"),
        ];
        let s = split("web", &owned, 1, 2);
        let names: Vec<Option<String>> = s
            .slots
            .iter()
            .map(|p| p.as_ref().map(|p| p.name_any()))
            .collect();
        assert_eq!(names, [Some("web-1".into()), Some("web-2".into())]);
        let condemned: Vec<i32> = s.condemned.iter().map(|(o, _)| *o).collect();
        assert_eq!(condemned, [0, 4]);

        let spec = |v: Value| -> StatefulSetSpec {
            set(json!({"updateStrategy": {"type": "RollingUpdate",
                                          "rollingUpdate": {"maxUnavailable": v}}}))
            .spec
            .unwrap()
        };
        assert_eq!(max_unavailable(&spec(json!(2)), 10), 2);
        assert_eq!(max_unavailable(&spec(json!("25%")), 10), 2);
        assert_eq!(max_unavailable(&spec(json!(0)), 10), 1);
    }

    #[test]
    fn revisions_record_the_template() {
        let s = set(json!({}));
        let template = s.spec.as_ref().unwrap().template.clone();
        let hash = template_hash(&template, 0);
        assert_eq!(hash, template_hash(&template, 0));
        assert_ne!(hash, template_hash(&template, 1));
        let data = json!({"spec": {"template": serde_json::to_value(&template).unwrap()}});
        let revision: ControllerRevision = serde_json::from_value(json!({
            "metadata": {"name": "web-1"}, "revision": 1, "data": data}))
        .unwrap();
        assert_eq!(template_of(&revision), Some(template));
    }
}
