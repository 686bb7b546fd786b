//! The Deployment controller: a Deployment owns ReplicaSets, one per pod template (named
//! `<deployment>-<pod-template-hash>`), and rolls pods from the old ones to the new one.
//!
//! As kube-controller-manager's: `RollingUpdate` scales the new ReplicaSet up by at most
//! `maxSurge` above `replicas` and the old ones down while at least `replicas -
//! maxUnavailable` pods are available; `Recreate` scales the old ones to zero and waits for
//! their pods to be gone first. Each new template gets the next `revision`; returning to an
//! old template (`kubectl rollout undo`) reuses its ReplicaSet under a new revision. Old
//! ReplicaSets beyond `revisionHistoryLimit` are deleted once scaled down. `paused` stops
//! rollouts (scaling still happens). Status carries the counts, `observedGeneration` and
//! the `Available` and `Progressing` conditions (`ProgressDeadlineExceeded` after
//! `progressDeadlineSeconds` without progress) that `kubectl rollout status` and
//! `helm --wait` read.
//!
//! Pod availability is counted from the shared pod cache (ready for `minReadySeconds`),
//! capped by each ReplicaSet's `spec.replicas`, and every scale is a write against the
//! ReplicaSet's cached resourceVersion — so a stale cache gets a conflict and a retry, never
//! an extra scale-down.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentSpec, ReplicaSet};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{EventType, publish};
use crate::labels::matches;
use crate::objects::{controller_ref, controller_uid};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["apps"],
        resources: &["deployments"],
        verbs: &["get", "list", "watch", "patch"],
    },
    Rule {
        api_groups: &["apps"],
        resources: &["deployments/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &["apps"],
        resources: &["replicasets"],
        verbs: &[
            "get", "list", "watch", "create", "update", "patch", "delete",
        ],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The field manager of the controller's writes and the component of its events.
pub const MANAGER: &str = "deployment-controller";
/// The label (on ReplicaSets, their selectors and pods) naming the pod template.
pub const HASH_LABEL: &str = "pod-template-hash";
/// The revision annotation on a Deployment and its ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";
/// Why a revision was made (`kubectl annotate … kubernetes.io/change-cause=…`).
pub const CHANGE_CAUSE: &str = "kubernetes.io/change-cause";

/// What can go wrong reconciling one Deployment (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum DeploymentError {
    /// A ReplicaSet could not be created, scaled or deleted, or the status written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
    /// The pod template could not be turned into a ReplicaSet.
    #[error("building the ReplicaSet for {0}: {1}")]
    Template(String, serde_json::Error),
}

fn api_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> DeploymentError {
    let action = action.into();
    move |source| DeploymentError::Api { action, source }
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    sets: Store<ReplicaSet>,
    pods: Store<Pod>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeploymentController")
            .finish_non_exhaustive()
    }
}

/// Adds the Deployment controller to `manager`.
pub fn add(manager: &mut Manager) {
    let deployments = manager.cache::<Deployment>(watcher::Config::default());
    let sets = manager.cache::<ReplicaSet>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        sets: sets.store(),
        pods: pods.store(),
    });
    let candidates = deployments.store();
    let owners = sets.store();
    let runner = Runner::for_cache("deployment", &deployments)
        .and_then(|r| r.owns(&sets))
        .and_then(|r| {
            // An orphaned ReplicaSet wakes the Deployments whose selector matches it.
            r.watches(&sets, move |rs: Arc<ReplicaSet>| {
                if controller_uid(rs.as_ref()).is_some() {
                    return Vec::new();
                }
                let labels = rs.metadata.labels.clone().unwrap_or_default();
                candidates
                    .state()
                    .into_iter()
                    .filter(|d| {
                        d.namespace() == rs.namespace()
                            && d.spec
                                .as_ref()
                                .is_some_and(|s| matches(&s.selector, &labels))
                    })
                    .map(|d| ObjectRef::from_obj(d.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .and_then(|r| {
            // A pod's readiness is progress for its ReplicaSet's Deployment; its departure
            // too (Recreate waits for the last old pod to be gone).
            let deployment_of = move |pod: Arc<Pod>| {
                let rs = controller_ref(pod.as_ref())
                    .filter(|o| o.kind == "ReplicaSet")
                    .and_then(|o| owners.get(&ObjectRef::new(&o.name).within(&pod.namespace()?)));
                rs.and_then(|rs| {
                    let owner = controller_ref(rs.as_ref())?;
                    let namespace = rs.namespace()?;
                    (owner.kind == "Deployment")
                        .then(|| ObjectRef::new(&owner.name).within(&namespace))
                })
            };
            r.watches(&pods, deployment_of.clone())?
                .watches_deleted(&pods, deployment_of)
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

/// The pod-template-hash of `template`: FNV-1a over its JSON and the collision count,
/// written with the alphabet kube uses for generated names (no vowels, no look-alikes).
pub fn template_hash(template: &PodTemplateSpec, collision_count: Option<i32>) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            hash ^= u32::from(*b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    };
    feed(&serde_json::to_vec(template).unwrap_or_default());
    if let Some(count) = collision_count {
        feed(&count.to_le_bytes());
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    hash.to_string()
        .bytes()
        .map(|b| char::from(ALPHABET[usize::from(b) % ALPHABET.len()]))
        .collect()
}

/// `template` without the pod-template-hash label, to compare a Deployment's template with
/// a ReplicaSet's.
fn without_hash(template: &PodTemplateSpec) -> PodTemplateSpec {
    let mut template = template.clone();
    if let Some(labels) = template.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    template
}

fn revision_of(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// Resolves `maxSurge`/`maxUnavailable` against `replicas` as kube does: surge rounds up,
/// unavailability down, and they are never both zero.
pub fn surge_and_unavailable(spec: &DeploymentSpec) -> (i32, i32) {
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let rolling = spec
        .strategy
        .as_ref()
        .and_then(|s| s.rolling_update.as_ref());
    let resolve = |value: Option<&IntOrString>, default: &str, round_up: bool| -> i32 {
        let value = value
            .cloned()
            .unwrap_or_else(|| IntOrString::String(default.into()));
        match value {
            IntOrString::Int(n) => n.max(0),
            IntOrString::String(s) => {
                let percent: f64 = s.trim_end_matches('%').parse().unwrap_or(25.0);
                let exact = percent * f64::from(replicas) / 100.0;
                (if round_up {
                    exact.ceil()
                } else {
                    exact.floor()
                }) as i32
            }
        }
    };
    let surge = resolve(rolling.and_then(|r| r.max_surge.as_ref()), "25%", true);
    let unavailable = resolve(
        rolling.and_then(|r| r.max_unavailable.as_ref()),
        "25%",
        false,
    );
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable.min(replicas))
    }
}

/// Pods of one ReplicaSet, as the cache shows them.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    /// Pods not being deleted and not finished.
    active: i32,
    /// Every pod that still exists, terminating or not (Recreate waits for them all).
    existing: i32,
    ready: i32,
    available: i32,
    /// The soonest a ready pod becomes available (minReadySeconds), to look again then.
    next: Option<Duration>,
}

fn condition_true(pod: &Pod, type_: &str) -> Option<Timestamp> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            c.last_transition_time
                .as_ref()
                .map(|t| t.0)
                .unwrap_or_else(Timestamp::now)
        })
}

fn count(pods: &[Arc<Pod>], rs: &ReplicaSet, min_ready: i32) -> Counts {
    let uid = rs.uid().unwrap_or_default();
    let mut counts = Counts::default();
    let now = Timestamp::now();
    for pod in pods
        .iter()
        .filter(|p| controller_uid(p.as_ref()) == Some(&uid))
    {
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        let terminal = matches!(phase, Some("Succeeded" | "Failed"));
        if !terminal {
            counts.existing += 1;
        }
        if terminal || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        counts.active += 1;
        let Some(since) = condition_true(pod, "Ready") else {
            continue;
        };
        counts.ready += 1;
        let ready_for = now.duration_since(since).as_secs_f64();
        if ready_for >= f64::from(min_ready) || min_ready == 0 {
            counts.available += 1;
        } else {
            let wait = Duration::from_secs_f64(f64::from(min_ready) - ready_for);
            counts.next = Some(counts.next.map_or(wait, |n| n.min(wait)));
        }
    }
    // Pods above spec.replicas are about to go: never count them as available.
    let wanted = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    counts.available = counts.available.min(wanted);
    counts.ready = counts.ready.min(counts.active);
    counts
}

fn replicas_of(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1)
}

/// One reconcile's view: the Deployment, its ReplicaSets and their pods' counts.
struct View<'a> {
    ctx: &'a Controller,
    d: &'a Deployment,
    spec: DeploymentSpec,
    namespace: String,
    sets: Vec<Arc<ReplicaSet>>,
    counts: BTreeMap<String, Counts>,
}

impl View<'_> {
    fn counts(&self, rs: &ReplicaSet) -> Counts {
        self.counts
            .get(&rs.uid().unwrap_or_default())
            .copied()
            .unwrap_or_default()
    }

    fn api(&self) -> Api<ReplicaSet> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    /// Sets `rs`'s replicas (and the Deployment's revision annotations), against the cached
    /// resourceVersion.
    async fn scale(
        &self,
        rs: &ReplicaSet,
        replicas: i32,
        revision: Option<i64>,
    ) -> Result<bool, DeploymentError> {
        let before = replicas_of(rs);
        let mut updated = rs.clone();
        let mut changed = before != replicas;
        if let Some(spec) = updated.spec.as_mut() {
            spec.replicas = Some(replicas);
            let min_ready = self.spec.min_ready_seconds;
            if spec.min_ready_seconds != min_ready {
                spec.min_ready_seconds = min_ready;
                changed = true;
            }
        }
        let annotations = updated.annotations_mut();
        if let Some(revision) = revision
            && annotations.get(REVISION) != Some(&revision.to_string())
        {
            annotations.insert(REVISION.into(), revision.to_string());
            changed = true;
        }
        if let Some(cause) = self.d.annotations().get(CHANGE_CAUSE)
            && revision.is_some()
            && annotations.get(CHANGE_CAUSE) != Some(cause)
        {
            annotations.insert(CHANGE_CAUSE.into(), cause.clone());
            changed = true;
        }
        for (key, value) in [
            (
                "deployment.kubernetes.io/desired-replicas",
                self.spec.replicas.unwrap_or(1).to_string(),
            ),
            (
                "deployment.kubernetes.io/max-replicas",
                (self.spec.replicas.unwrap_or(1) + surge_and_unavailable(&self.spec).0).to_string(),
            ),
        ] {
            if annotations.get(key) != Some(&value) {
                annotations.insert(key.into(), value);
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        updated.status = None;
        self.api()
            .replace(&rs.name_any(), &PostParams::default(), &updated)
            .await
            .map_err(api_error(format!("scaling replica set {}", rs.name_any())))?;
        if before != replicas {
            let verb = if replicas > before { "up" } else { "down" };
            let message = format!(
                "Scaled {verb} replica set {} from {before} to {replicas}",
                rs.name_any()
            );
            publish(
                &self.ctx.client,
                MANAGER,
                self.d,
                EventType::Normal,
                "ScalingReplicaSet",
                &message,
            )
            .await;
        }
        Ok(true)
    }
}

/// Whether `replicas` changed since the active ReplicaSets were last sized (their
/// `desired-replicas` annotation says otherwise): kube's "scaling event".
fn scaling_event(view: &View<'_>, replicas: i32) -> bool {
    view.sets.iter().filter(|rs| replicas_of(rs) > 0).any(|rs| {
        rs.annotations()
            .get("deployment.kubernetes.io/desired-replicas")
            .and_then(|v| v.parse::<i32>().ok())
            .is_some_and(|desired| desired != replicas)
    })
}

/// kube's `scale`: a Deployment resized mid-rollout (or paused) resizes its ReplicaSets in
/// proportion to their sizes — each by its share of `replicas + maxSurge` against the
/// `max-replicas` it was last sized for, leftovers to the largest — so a rollout in
/// progress keeps its ratio; a lone active set simply takes the new count, and a saturated
/// new set sends the old ones to zero. Returns whether anything was written.
async fn scale_proportionally(
    view: &View<'_>,
    new: Option<&ReplicaSet>,
    replicas: i32,
) -> Result<bool, DeploymentError> {
    let new_uid = new.and_then(|n| n.uid());
    let active: Vec<&Arc<ReplicaSet>> = view.sets.iter().filter(|rs| replicas_of(rs) > 0).collect();
    let lone = match (active.len(), new) {
        (1, _) => Some(active[0].as_ref()),
        (0, Some(n)) => Some(n),
        (0, None) => view
            .sets
            .iter()
            .max_by_key(|rs| rs.creation_timestamp().map(|t| t.0))
            .map(|rs| rs.as_ref()),
        _ => None,
    };
    if let Some(rs) = lone {
        return view.scale(rs, replicas, None).await;
    }
    if let Some(n) = new {
        let desired = n
            .annotations()
            .get("deployment.kubernetes.io/desired-replicas")
            .and_then(|v| v.parse::<i32>().ok());
        let saturated = replicas_of(n) == replicas
            && desired == Some(replicas)
            && n.status.as_ref().and_then(|s| s.available_replicas) == Some(replicas);
        if saturated {
            let mut wrote = false;
            for rs in active.iter().filter(|rs| rs.uid() != new_uid) {
                wrote |= view.scale(rs, 0, None).await?;
            }
            return Ok(wrote);
        }
    }
    let recreate = view.spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    if recreate {
        return Ok(false);
    }
    let surge = surge_and_unavailable(&view.spec).0;
    let allowed = if replicas > 0 { replicas + surge } else { 0 };
    let current: i32 = active.iter().map(|rs| replicas_of(rs)).sum();
    let to_add = allowed - current;
    let mut sorted = active.clone();
    // Largest first; among equals the newer when growing, the older when shrinking.
    sorted.sort_by(|a, b| {
        let by_size = replicas_of(b).cmp(&replicas_of(a));
        let (ta, tb) = (
            a.creation_timestamp().map(|t| t.0),
            b.creation_timestamp().map(|t| t.0),
        );
        by_size.then(if to_add > 0 { tb.cmp(&ta) } else { ta.cmp(&tb) })
    });
    let status_replicas = view
        .d
        .status
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(current);
    let mut added = 0;
    let mut sizes: Vec<i32> = Vec::with_capacity(sorted.len());
    for rs in &sorted {
        let size = replicas_of(rs);
        let proportion = if size == 0 || to_add == 0 || to_add == added {
            0
        } else {
            let fraction = if replicas == 0 {
                -size
            } else {
                let annotated = rs
                    .annotations()
                    .get("deployment.kubernetes.io/max-replicas")
                    .and_then(|v| v.parse::<i32>().ok())
                    .filter(|a| *a > 0)
                    .unwrap_or(status_replicas.max(1));
                (f64::from(size) * f64::from(allowed) / f64::from(annotated)).round() as i32 - size
            };
            let left = to_add - added;
            if to_add > 0 {
                fraction.min(left)
            } else {
                fraction.max(left)
            }
        };
        added += proportion;
        sizes.push(size + proportion);
    }
    if let Some(first) = sizes.first_mut() {
        *first = (*first + to_add - added).max(0);
    }
    let mut wrote = false;
    for (rs, size) in sorted.iter().zip(sizes) {
        wrote |= view.scale(rs, size, None).await?;
    }
    Ok(wrote)
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Controller>) -> Result<Action, DeploymentError> {
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = d.namespace().unwrap_or_default();
    let uid = d.uid().unwrap_or_default();
    let spec = d.spec.clone().unwrap_or_default();
    let selects_everything = spec
        .selector
        .match_labels
        .as_ref()
        .is_none_or(|l| l.is_empty())
        && spec
            .selector
            .match_expressions
            .as_ref()
            .is_none_or(|e| e.is_empty());
    if selects_everything {
        publish(
            &ctx.client,
            MANAGER,
            d.as_ref(),
            EventType::Warning,
            "SelectingAll",
            "This deployment is selecting all pods. A non-empty selector is required.",
        )
        .await;
        return Ok(Action::await_change());
    }
    let api: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), &namespace);
    let in_namespace: Vec<Arc<ReplicaSet>> = ctx
        .sets
        .state()
        .into_iter()
        .filter(|rs| rs.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    // Adopt orphaned ReplicaSets the selector matches.
    let mut sets = Vec::new();
    for rs in in_namespace {
        match controller_uid(rs.as_ref()) {
            Some(owner) if owner == uid => sets.push(rs),
            Some(_) => {}
            None if rs.metadata.deletion_timestamp.is_none()
                && matches(
                    &spec.selector,
                    rs.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
                ) =>
            {
                let owner = d.controller_owner_ref(&()).map(|o| vec![o]);
                let patch = json!({"metadata": {"ownerReferences": owner}});
                let adopted = api
                    .patch(
                        &rs.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map_err(api_error(format!("adopting replica set {}", rs.name_any())))?;
                sets.push(Arc::new(adopted));
            }
            None => {}
        }
    }
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    // Each ReplicaSet's pods are available after its own minReadySeconds, as its status
    // counts them (the deployment's own sets carry the deployment's; an adopted one may
    // have none, and its ready pods are available at once).
    let counts = sets
        .iter()
        .map(|rs| {
            let own = rs
                .spec
                .as_ref()
                .and_then(|s| s.min_ready_seconds)
                .unwrap_or(0);
            (rs.uid().unwrap_or_default(), count(&pods, rs, own))
        })
        .collect();
    let mut view = View {
        ctx: &ctx,
        d: &d,
        spec: spec.clone(),
        namespace: namespace.clone(),
        sets,
        counts,
    };

    let template = spec.template.clone();
    let new = view
        .sets
        .iter()
        .find(|rs| {
            rs.spec
                .as_ref()
                .and_then(|s| s.template.as_ref())
                .is_some_and(|t| without_hash(t) == template)
        })
        .cloned();
    let max_revision = view
        .sets
        .iter()
        .map(|rs| revision_of(rs))
        .max()
        .unwrap_or(0);
    let paused = spec.paused == Some(true);
    let replicas = spec.replicas.unwrap_or(1).max(0);

    let mut requeue = view.counts.values().filter_map(|c| c.next).min();
    let mut collision_count = d.status.as_ref().and_then(|s| s.collision_count);
    let (new, revision) = if paused || (scaling_event(&view, replicas) && new.is_some()) {
        // Paused, or resized mid-rollout: no rollout step, the sets resized in proportion.
        scale_proportionally(&view, new.as_deref(), replicas).await?;
        let revision = new.as_deref().map(revision_of).unwrap_or(0);
        (new, revision)
    } else {
        let (new, revision) = match new {
            Some(new) => {
                // The current template's ReplicaSet: the newest revision (a rollback makes
                // an old one new again).
                let revision = if revision_of(&new) < max_revision || revision_of(&new) == 0 {
                    max_revision + 1
                } else {
                    revision_of(&new)
                };
                if revision != revision_of(&new) {
                    view.scale(&new, replicas_of(&new), Some(revision)).await?;
                }
                (new, revision)
            }
            None => {
                let (created, collisions) =
                    create_new(&view, &template, max_revision + 1, collision_count).await?;
                collision_count = collisions;
                publish(
                    &ctx.client,
                    MANAGER,
                    d.as_ref(),
                    EventType::Normal,
                    "ScalingReplicaSet",
                    &format!(
                        "Scaled up replica set {} from 0 to {}",
                        created.name_any(),
                        replicas_of(&created)
                    ),
                )
                .await;
                let created = Arc::new(created);
                view.sets.push(Arc::clone(&created));
                view.counts
                    .insert(created.uid().unwrap_or_default(), Counts::default());
                (created, max_revision + 1)
            }
        };
        let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
        if recreate {
            rollout_recreate(&view, &new, replicas).await?;
        } else {
            rollout_rolling(&view, &new, replicas).await?;
        }
        (Some(new), revision)
    };
    // Keep the revision annotation of the Deployment in step with its new ReplicaSet.
    if revision > 0 && d.annotations().get(REVISION) != Some(&revision.to_string()) {
        let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({"metadata": {"annotations": {REVISION: revision.to_string()}}});
        deployments
            .patch(
                &d.name_any(),
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(&patch),
            )
            .await
            .map_err(api_error("annotating the revision"))?;
    }
    cleanup(&view, new.as_deref()).await?;
    if let Some(wait) = status(&view, new.as_deref(), collision_count, paused).await? {
        requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
    }
    Ok(match requeue {
        Some(wait) => Action::requeue(wait + Duration::from_millis(100)),
        None => Action::await_change(),
    })
}

/// Creates the ReplicaSet of `template` (named by its hash; a name taken by a different
/// template bumps `collisionCount` and tries the next hash).
async fn create_new(
    view: &View<'_>,
    template: &PodTemplateSpec,
    revision: i64,
    mut collision_count: Option<i32>,
) -> Result<(ReplicaSet, Option<i32>), DeploymentError> {
    let d = view.d;
    let spec = &view.spec;
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    // Rolling: start at what the surge allows; Recreate: at zero until the old pods are gone.
    let current: i32 = view.sets.iter().map(|rs| replicas_of(rs)).sum();
    let initial = if recreate {
        0
    } else if view.sets.is_empty() {
        replicas
    } else {
        let (surge, _) = surge_and_unavailable(spec);
        (replicas + surge - current).clamp(0, replicas)
    };
    loop {
        let hash = template_hash(template, collision_count);
        let mut pod_template = template.clone();
        pod_template
            .metadata
            .get_or_insert_with(Default::default)
            .labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut selector = spec.selector.clone();
        selector
            .match_labels
            .get_or_insert_with(Default::default)
            .insert(HASH_LABEL.into(), hash.clone());
        let mut labels = template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        labels.insert(HASH_LABEL.into(), hash.clone());
        let mut annotations = BTreeMap::from([
            (REVISION.to_owned(), revision.to_string()),
            (
                "deployment.kubernetes.io/desired-replicas".to_owned(),
                replicas.to_string(),
            ),
            (
                "deployment.kubernetes.io/max-replicas".to_owned(),
                (replicas + surge_and_unavailable(spec).0).to_string(),
            ),
        ]);
        if let Some(cause) = d.annotations().get(CHANGE_CAUSE) {
            annotations.insert(CHANGE_CAUSE.into(), cause.clone());
        }
        let rs = json!({
            "apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {
                "name": format!("{}-{hash}", d.name_any()),
                "namespace": view.namespace,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": d.controller_owner_ref(&()).map(|o| vec![o]),
            },
            "spec": {
                "replicas": initial,
                "minReadySeconds": spec.min_ready_seconds,
                "selector": selector,
                "template": pod_template,
            },
        });
        let rs: ReplicaSet =
            serde_json::from_value(rs).map_err(|e| DeploymentError::Template(d.name_any(), e))?;
        match view.api().create(&PostParams::default(), &rs).await {
            Ok(created) => return Ok((created, collision_count)),
            Err(kube::Error::Api(s)) if s.code == 409 => {
                // Taken: ours with the same template (a stale cache) is the new one;
                // anything else is a hash collision.
                let existing = view
                    .api()
                    .get(&rs.name_any())
                    .await
                    .map_err(api_error("reading a colliding replica set"))?;
                let same = controller_uid(&existing) == d.uid().as_deref()
                    && existing
                        .spec
                        .as_ref()
                        .and_then(|s| s.template.as_ref())
                        .is_some_and(|t| without_hash(t) == *template);
                if same {
                    return Ok((existing, collision_count));
                }
                collision_count = Some(collision_count.unwrap_or(0) + 1);
            }
            Err(source) => {
                return Err(DeploymentError::Api {
                    action: format!("creating replica set {}", rs.name_any()),
                    source,
                });
            }
        }
    }
}

/// Recreate: every old ReplicaSet to zero; the new one up once their pods are all gone.
async fn rollout_recreate(
    view: &View<'_>,
    new: &ReplicaSet,
    replicas: i32,
) -> Result<(), DeploymentError> {
    let new_uid = new.uid();
    let mut old_pods = 0;
    for rs in view.sets.iter().filter(|rs| rs.uid() != new_uid) {
        view.scale(rs, 0, None).await?;
        old_pods += view.counts(rs).existing;
    }
    if old_pods == 0 {
        view.scale(new, replicas, None).await?;
    }
    Ok(())
}

/// RollingUpdate: the new ReplicaSet up within the surge, the old ones down while enough
/// pods stay available.
async fn rollout_rolling(
    view: &View<'_>,
    new: &ReplicaSet,
    replicas: i32,
) -> Result<(), DeploymentError> {
    let (surge, max_unavailable) = surge_and_unavailable(&view.spec);
    let new_uid = new.uid();
    let new_replicas = replicas_of(new);
    let all: i32 = view.sets.iter().map(|rs| replicas_of(rs)).sum();
    // Up: never more than replicas + surge pods in all.
    if new_replicas > replicas {
        view.scale(new, replicas, None).await?;
        return Ok(());
    }
    if new_replicas < replicas {
        let room = (replicas + surge - all).max(0);
        let target = (new_replicas + room).min(replicas);
        if target != new_replicas {
            view.scale(new, target, None).await?;
            return Ok(());
        }
    }
    // Down: what may go without falling below replicas - maxUnavailable available.
    let mut old: Vec<&Arc<ReplicaSet>> = view
        .sets
        .iter()
        .filter(|rs| rs.uid() != new_uid && replicas_of(rs) > 0)
        .collect();
    if old.is_empty() {
        return Ok(());
    }
    let min_available = replicas - max_unavailable;
    let new_counts = view.counts(new);
    let new_unavailable = (new_replicas - new_counts.available).max(0);
    let mut budget = all - min_available - new_unavailable;
    if budget <= 0 {
        return Ok(());
    }
    // First the old pods that are not available anyway (oldest ReplicaSets first).
    old.sort_by_key(|rs| (revision_of(rs), rs.creation_timestamp().map(|t| t.0)));
    let mut scaled = BTreeMap::new();
    for rs in &old {
        if budget <= 0 {
            break;
        }
        let unhealthy = (replicas_of(rs) - view.counts(rs).available).max(0);
        let down = unhealthy.min(budget);
        if down > 0 {
            scaled.insert(rs.uid().unwrap_or_default(), replicas_of(rs) - down);
            budget -= down;
        }
    }
    // Then available ones, as far as availability allows.
    let available: i32 = view.sets.iter().map(|rs| view.counts(rs).available).sum();
    let mut spare = (available - min_available).max(0).min(budget.max(0));
    for rs in &old {
        if spare <= 0 {
            break;
        }
        let uid = rs.uid().unwrap_or_default();
        let current = scaled.get(&uid).copied().unwrap_or(replicas_of(rs));
        let down = current.min(spare);
        if down > 0 {
            scaled.insert(uid, current - down);
            spare -= down;
        }
    }
    for rs in old {
        if let Some(target) = scaled.get(&rs.uid().unwrap_or_default()) {
            view.scale(rs, *target, None).await?;
        }
    }
    Ok(())
}

/// Deletes old, scaled-down ReplicaSets beyond `revisionHistoryLimit` (oldest first).
async fn cleanup(view: &View<'_>, new: Option<&ReplicaSet>) -> Result<(), DeploymentError> {
    let limit = view.spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let new_uid = new.and_then(|n| n.uid());
    let mut idle: Vec<&Arc<ReplicaSet>> = view
        .sets
        .iter()
        .filter(|rs| {
            rs.uid() != new_uid
                && replicas_of(rs) == 0
                && rs.status.as_ref().is_none_or(|s| s.replicas == 0)
                && view.counts(rs).existing == 0
                && rs.metadata.deletion_timestamp.is_none()
        })
        .collect();
    if idle.len() <= limit {
        return Ok(());
    }
    idle.sort_by_key(|rs| revision_of(rs));
    let doomed = idle.len() - limit;
    for rs in idle.into_iter().take(doomed) {
        match view
            .api()
            .delete(&rs.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => {
                return Err(DeploymentError::Api {
                    action: format!("deleting old replica set {}", rs.name_any()),
                    source,
                });
            }
        }
    }
    Ok(())
}

fn now_time() -> Time {
    // Conditions carry whole seconds, as the API serializes them.
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or_else(|_| Timestamp::now()))
}

/// Sets one condition; `lastUpdateTime` moves on every change (or when `progress`), and
/// `lastTransitionTime` only when the status does.
fn set_condition(
    conditions: &mut Vec<DeploymentCondition>,
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    progress: bool,
) {
    let now = now_time();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            let changed = c.status != status || c.reason.as_deref() != Some(reason);
            if c.status != status {
                c.last_transition_time = Some(now.clone());
            }
            if changed || progress || c.message.as_deref() != Some(message.as_str()) {
                c.last_update_time = Some(now);
            }
            c.status = status.into();
            c.reason = Some(reason.into());
            c.message = Some(message);
        }
        None => conditions.push(DeploymentCondition {
            type_: type_.into(),
            status: status.into(),
            reason: Some(reason.into()),
            message: Some(message),
            last_update_time: Some(now.clone()),
            last_transition_time: Some(now),
        }),
    }
}

/// Writes the status when it changed; returns when to look again for a progress deadline.
async fn status(
    view: &View<'_>,
    new: Option<&ReplicaSet>,
    collision_count: Option<i32>,
    paused: bool,
) -> Result<Option<Duration>, DeploymentError> {
    let d = view.d;
    let replicas = view.spec.replicas.unwrap_or(1).max(0);
    let (_, max_unavailable) = surge_and_unavailable(&view.spec);
    let total = |f: fn(&Counts) -> i32| -> i32 { view.counts.values().map(f).sum() };
    let new_counts = new.map(|n| view.counts(n)).unwrap_or_default();
    let current = d.status.clone().unwrap_or_default();
    let mut status = current.clone();
    status.observed_generation = d.metadata.generation;
    status.replicas = Some(total(|c| c.active));
    status.updated_replicas = Some(new_counts.active);
    status.ready_replicas = Some(total(|c| c.ready));
    status.available_replicas = Some(total(|c| c.available));
    status.unavailable_replicas = Some((replicas - total(|c| c.available)).max(0));
    status.collision_count = collision_count;
    let available = total(|c| c.available);
    let mut conditions = status.conditions.take().unwrap_or_default();
    if available >= replicas - max_unavailable {
        set_condition(
            &mut conditions,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            false,
        );
    } else {
        set_condition(
            &mut conditions,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            false,
        );
    }
    let name = new.map(|n| n.name_any()).unwrap_or_default();
    let old_active: i32 = view
        .sets
        .iter()
        .filter(|rs| Some(rs.uid()) != new.map(|n| n.uid()))
        .map(|rs| view.counts(rs).active)
        .sum();
    let complete =
        new_counts.active == replicas && new_counts.available == replicas && old_active == 0;
    let mut requeue = None;
    let deadline = view.spec.progress_deadline_seconds;
    if paused {
        set_condition(
            &mut conditions,
            "Progressing",
            "Unknown",
            "DeploymentPaused",
            "Deployment is paused".into(),
            false,
        );
    } else if complete {
        set_condition(
            &mut conditions,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{name}\" has successfully progressed."),
            false,
        );
    } else {
        let progressed = status.updated_replicas > current.updated_replicas
            || status.ready_replicas > current.ready_replicas
            || status.available_replicas > current.available_replicas
            || status.replicas.unwrap_or(0) - status.updated_replicas.unwrap_or(0)
                < current.replicas.unwrap_or(0) - current.updated_replicas.unwrap_or(0);
        let existing = conditions
            .iter()
            .find(|c| c.type_ == "Progressing")
            .cloned();
        let resumed = existing
            .as_ref()
            .is_some_and(|c| c.reason.as_deref() == Some("DeploymentPaused"));
        let timed_out_already = existing
            .as_ref()
            .is_some_and(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
        let last_update = existing
            .as_ref()
            .and_then(|c| c.last_update_time.as_ref())
            .map(|t| t.0);
        let elapsed = last_update.map(|t| Timestamp::now().duration_since(t).as_secs_f64());
        let over = deadline
            .zip(elapsed)
            .is_some_and(|(limit, elapsed)| elapsed > f64::from(limit) && !progressed && !resumed);
        if over || (timed_out_already && !progressed) {
            set_condition(
                &mut conditions,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                format!("ReplicaSet \"{name}\" has timed out progressing."),
                false,
            );
        } else {
            let (reason, message) = if resumed {
                ("DeploymentResumed", "Deployment is resumed".to_owned())
            } else if existing.is_none() || current.observed_generation != d.metadata.generation {
                (
                    "NewReplicaSetCreated",
                    format!("Created new replica set \"{name}\""),
                )
            } else {
                (
                    "ReplicaSetUpdated",
                    format!("ReplicaSet \"{name}\" is progressing."),
                )
            };
            let progress = progressed || existing.is_none() || resumed;
            set_condition(
                &mut conditions,
                "Progressing",
                "True",
                reason,
                message,
                progress,
            );
            if let Some(limit) = deadline {
                let since = if progress {
                    0.0
                } else {
                    elapsed.unwrap_or(0.0)
                };
                requeue = Some(Duration::from_secs_f64(
                    (f64::from(limit) - since).max(0.0) + 1.0,
                ));
            }
        }
    }
    conditions.sort_by_key(|c| if c.type_ == "Available" { 0 } else { 1 });
    status.conditions = Some(conditions);
    if status != current {
        let deployments: Api<Deployment> =
            Api::namespaced(view.ctx.client.clone(), &view.namespace);
        deployments
            .patch_status(
                &d.name_any(),
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(api_error(format!(
                "updating the status of {}",
                d.name_any()
            )))?;
    }
    Ok(requeue)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: serde_json::Value) -> DeploymentSpec {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn surge_rounds_up_and_unavailability_down() {
        let base = json!({"selector": {}, "template": {}, "replicas": 10});
        assert_eq!(surge_and_unavailable(&spec(base.clone())), (3, 2));
        let mut zero = base.clone();
        zero["strategy"] = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": "0%"}});
        assert_eq!(surge_and_unavailable(&spec(zero)), (0, 1));
        let mut ints = base;
        ints["strategy"] = json!({"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}});
        assert_eq!(surge_and_unavailable(&spec(ints)), (1, 0));
    }

    #[test]
    fn hashes_are_stable_names() {
        let template: PodTemplateSpec =
            serde_json::from_value(json!({"metadata": {"labels": {"app": "web"}}})).unwrap();
        let a = template_hash(&template, None);
        assert_eq!(a, template_hash(&template, None));
        assert_ne!(a, template_hash(&template, Some(1)));
        assert!(
            a.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }
}
