//! The disruption controller (`disruption`): keeps each PodDisruptionBudget's status — what
//! the API server's `pods/eviction` reads to allow or refuse an eviction — as
//! kube-controller-manager's does.
//!
//! For a budget, the pods its selector selects in its namespace are counted:
//! `expectedPods` (the pod count for an integer `minAvailable`; otherwise the sum of the
//! `spec.replicas` of the pods' controllers — ReplicaSet, Deployment, StatefulSet,
//! ReplicationController, or any kind with a `scale` subresource), `desiredHealthy` (from
//! `minAvailable`, or `expectedPods - maxUnavailable`; percentages rounded up),
//! `currentHealthy` (Ready pods not being deleted and not recently evicted) and
//! `disruptionsAllowed = currentHealthy - desiredHealthy` (never below 0, and 0 while no pod
//! is expected). An eviction notes its pod in `disruptedPods`; the note is dropped once the
//! pod is deleted, or after two minutes if it never was. The `DisruptionAllowed` condition says
//! `SufficientPods`/`InsufficientPods`; when the counts cannot be computed (a pod whose
//! controller has no scale) the budget *fails safe*: no disruptions, reason `SyncFailed`.
//! Status writes carry the resourceVersion read, so they never overwrite an eviction's.
//!
//! A second loop resets a pod's `DisruptionTarget` condition to `False` when the pod was
//! marked for disruption more than two minutes ago but never deleted (an eviction that failed
//! after marking it), so the pod does not look doomed forever.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, PodCondition, ReplicationController};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};

use crate::events::{EventType, publish};
use crate::labels::matches;
use crate::objects::{controller_ref, ready};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["policy"],
        resources: &["poddisruptionbudgets"],
        verbs: READ,
    },
    Rule {
        api_groups: &["policy"],
        resources: &["poddisruptionbudgets/status"],
        verbs: &["update"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods", "replicationcontrollers"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["pods/status"],
        verbs: &["update"],
    },
    Rule {
        api_groups: &["apps"],
        resources: &["replicasets", "deployments", "statefulsets"],
        verbs: READ,
    },
    Rule {
        api_groups: &["*"],
        resources: &["*/scale"],
        verbs: &["get"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The field manager of the controller's writes and the component of its events.
pub const MANAGER: &str = "disruption-controller";

/// How long an eviction noted in `disruptedPods` keeps its pod out of `currentHealthy`
/// while the pod is not deleted (kube's `DeletionTimeout`).
pub const DELETION_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a `DisruptionTarget` condition may stay on a pod that is not being deleted.
pub const STALE_DISRUPTION_TIMEOUT: Duration = Duration::from_secs(120);

/// The `DisruptionAllowed` condition's reasons.
const SUFFICIENT: &str = "SufficientPods";
const INSUFFICIENT: &str = "InsufficientPods";
const SYNC_FAILED: &str = "SyncFailed";

/// What can go wrong computing or writing one budget's status.
#[derive(Debug, thiserror::Error)]
pub enum DisruptionError {
    /// A request to the API server failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
    /// A selected pod's controller could not be found (or has no scale).
    #[error("found no controllers for pod {0:?}")]
    NoController(String),
    /// A selected pod's controller is of a kind without a `scale` subresource.
    #[error("{0} does not implement the scale subresource")]
    NoScale(String),
    /// `minAvailable` or `maxUnavailable` is neither an integer nor a percentage.
    #[error("invalid value for IntOrString: {0}")]
    InvalidValue(String),
}

/// What the budget loop shares.
pub struct Controller {
    client: Client,
    pods: Store<Pod>,
    replica_sets: Store<ReplicaSet>,
    deployments: Store<Deployment>,
    stateful_sets: Store<StatefulSet>,
    replication_controllers: Store<ReplicationController>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisruptionController")
            .finish_non_exhaustive()
    }
}

/// What the stale-condition loop shares.
pub struct PodConditions {
    client: Client,
}

impl std::fmt::Debug for PodConditions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DisruptionPodConditions")
            .finish_non_exhaustive()
    }
}

/// Whether `budget` selects `pod` (same namespace; no selector selects nothing, an empty one
/// everything).
fn selects(budget: &PodDisruptionBudget, pod: &Pod) -> bool {
    let Some(selector) = budget.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    budget.namespace() == pod.namespace()
        && matches(
            selector,
            pod.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
        )
}

/// Adds the disruption controller to `manager`.
pub fn add(manager: &mut Manager) {
    let budgets = manager.cache::<PodDisruptionBudget>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        pods: pods.store(),
        replica_sets: manager
            .cache::<ReplicaSet>(watcher::Config::default())
            .store(),
        deployments: manager
            .cache::<Deployment>(watcher::Config::default())
            .store(),
        stateful_sets: manager
            .cache::<StatefulSet>(watcher::Config::default())
            .store(),
        replication_controllers: manager
            .cache::<ReplicationController>(watcher::Config::default())
            .store(),
    });
    let budget_store = budgets.store();
    let of_pod = move |pod: Arc<Pod>| {
        budget_store
            .state()
            .into_iter()
            .filter(|b| selects(b, &pod))
            .map(|b| ObjectRef::from_obj(b.as_ref()))
            .collect::<Vec<_>>()
    };
    let of_deleted_pod = of_pod.clone();
    let runner = Runner::for_cache("disruption", &budgets)
        .and_then(|r| r.watches(&pods, of_pod))
        .and_then(|r| r.watches_deleted(&pods, of_deleted_pod))
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);

    let conditions = Arc::new(PodConditions {
        client: manager.client(),
    });
    let runner = Runner::for_cache("disruption-pod-conditions", &pods)
        .expect("the cache was just created, before run");
    manager.add(runner, reconcile_pod, conditions);
}

async fn reconcile(
    budget: Arc<PodDisruptionBudget>,
    ctx: Arc<Controller>,
) -> Result<Action, DisruptionError> {
    if budget.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| selects(&budget, p))
        .collect();
    let now = Timestamp::now();
    let counted = match expected_and_desired(&ctx, &budget, &pods).await {
        Ok(counted) => counted,
        Err(error) => return fail_safe(&ctx, &budget, error).await,
    };
    if !counted.unmanaged.is_empty() {
        tracing::debug!(
            budget = %budget.name_any(),
            pods = ?counted.unmanaged,
            "pods selected by the budget have no controller"
        );
    }
    let previous = budget
        .status
        .as_ref()
        .and_then(|s| s.disrupted_pods.clone())
        .unwrap_or_default();
    let (disrupted, recheck) = disrupted_pods(&pods, &previous, now);
    let healthy = current_healthy(&pods, &disrupted, now);
    let status = status_for(
        &budget,
        counted.expected,
        counted.desired,
        healthy,
        disrupted,
    );
    if !same_status(&status, budget.status.as_ref()) {
        write_status(&ctx.client, &budget, status).await?;
    }
    Ok(match recheck {
        Some(at) => Action::requeue(until(now, at) + Duration::from_millis(100)),
        None => Action::await_change(),
    })
}

/// Whether `current` already says what `wanted` does (absent counts are zeros, an absent map
/// is empty).
fn same_status(
    wanted: &PodDisruptionBudgetStatus,
    current: Option<&PodDisruptionBudgetStatus>,
) -> bool {
    let Some(current) = current else {
        return false;
    };
    let n = |v: Option<i32>| v.unwrap_or(0);
    n(wanted.current_healthy) == n(current.current_healthy)
        && n(wanted.desired_healthy) == n(current.desired_healthy)
        && n(wanted.expected_pods) == n(current.expected_pods)
        && n(wanted.disruptions_allowed) == n(current.disruptions_allowed)
        && wanted.observed_generation.unwrap_or(0) == current.observed_generation.unwrap_or(0)
        && wanted.disrupted_pods.clone().unwrap_or_default()
            == current.disrupted_pods.clone().unwrap_or_default()
        && wanted.conditions.clone().unwrap_or_default()
            == current.conditions.clone().unwrap_or_default()
}

/// How long from `now` to `at` (zero if past).
fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(now.duration_until(at)).unwrap_or(Duration::ZERO)
}

/// Writes `status` over the budget as read (its resourceVersion a precondition). A conflict —
/// an eviction or another write got there first — is retried when the cache shows the newer
/// budget, which triggers a reconcile of its own.
async fn write_status(
    client: &Client,
    budget: &PodDisruptionBudget,
    status: PodDisruptionBudgetStatus,
) -> Result<(), DisruptionError> {
    let namespace = budget.namespace().unwrap_or_default();
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), &namespace);
    let mut updated = budget.clone();
    updated.status = Some(status);
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    match api
        .replace_status(&budget.name_any(), &params, &updated)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(()),
        Err(source) => Err(DisruptionError::Api {
            action: format!(
                "updating the status of PodDisruptionBudget {namespace}/{}",
                budget.name_any()
            ),
            source,
        }),
    }
}

/// kube's fail-safe: when the counts cannot be computed, no disruption is allowed, and the
/// condition says why. Looked at again in a while (a missing controller may appear).
async fn fail_safe(
    ctx: &Controller,
    budget: &PodDisruptionBudget,
    error: DisruptionError,
) -> Result<Action, DisruptionError> {
    tracing::info!(budget = %budget.name_any(), %error, "PodDisruptionBudget sync failed");
    publish(
        &ctx.client,
        MANAGER,
        budget,
        EventType::Warning,
        "CalculateExpectedPodCountFailed",
        &format!("Failed to calculate the number of expected pods: {error}"),
    )
    .await;
    let mut status = budget.status.clone().unwrap_or_default();
    status.disruptions_allowed = Some(0);
    let observed = status.observed_generation;
    set_condition(
        status.conditions.get_or_insert_with(Vec::new),
        "False",
        SYNC_FAILED,
        &error.to_string(),
        observed,
    );
    if !same_status(&status, budget.status.as_ref()) {
        write_status(&ctx.client, budget, status).await?;
    }
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// A budget's expected pod count and the healthy pods it wants, and the selected pods that
/// have no controller.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counted {
    expected: i32,
    desired: i32,
    unmanaged: Vec<String>,
}

async fn expected_and_desired(
    ctx: &Controller,
    budget: &PodDisruptionBudget,
    pods: &[Arc<Pod>],
) -> Result<Counted, DisruptionError> {
    let spec = budget.spec.clone().unwrap_or_default();
    let mut counted = Counted::default();
    if let Some(max_unavailable) = &spec.max_unavailable {
        let (expected, unmanaged) = expected_scale(ctx, pods).await?;
        let unavailable = scaled(max_unavailable, expected)?;
        counted = Counted {
            expected,
            desired: (expected - unavailable).max(0),
            unmanaged,
        };
    } else if let Some(min_available) = &spec.min_available {
        match min_available {
            IntOrString::Int(n) => {
                counted.desired = *n;
                counted.expected = i32::try_from(pods.len()).unwrap_or(i32::MAX);
            }
            IntOrString::String(_) => {
                let (expected, unmanaged) = expected_scale(ctx, pods).await?;
                counted = Counted {
                    expected,
                    desired: scaled(min_available, expected)?,
                    unmanaged,
                };
            }
        }
    }
    Ok(counted)
}

/// An integer, or a percentage of `total` rounded up (kube's
/// `GetScaledValueFromIntOrPercent(.., true)`).
fn scaled(value: &IntOrString, total: i32) -> Result<i32, DisruptionError> {
    match value {
        IntOrString::Int(n) => Ok(*n),
        IntOrString::String(s) => {
            let percent: i64 = s
                .strip_suffix('%')
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    DisruptionError::InvalidValue(format!("{s:?} is not a percentage"))
                })?;
            let product = percent * i64::from(total);
            let rounded = product.div_euclid(100) + i64::from(product.rem_euclid(100) != 0);
            Ok(i32::try_from(rounded).unwrap_or(i32::MAX))
        }
    }
}

/// The sum of the `replicas` of the selected pods' controllers (each counted once), and the
/// pods that have no controller.
async fn expected_scale(
    ctx: &Controller,
    pods: &[Arc<Pod>],
) -> Result<(i32, Vec<String>), DisruptionError> {
    let mut scales: HashMap<String, i32> = HashMap::new();
    let mut unmanaged = Vec::new();
    for pod in pods {
        let Some(owner) = controller_ref(pod.as_ref()) else {
            unmanaged.push(pod.name_any());
            continue;
        };
        if scales.contains_key(&owner.uid) {
            continue;
        }
        let namespace = pod.namespace().unwrap_or_default();
        let found = match find_scale(ctx, owner, &namespace)? {
            Some(found) => Some(found),
            None => scale_subresource(&ctx.client, owner, &namespace).await?,
        };
        let Some((uid, replicas)) = found else {
            return Err(DisruptionError::NoController(pod.name_any()));
        };
        scales.insert(uid, replicas);
    }
    let total = scales.values().map(|r| i64::from(*r)).sum::<i64>();
    Ok((i32::try_from(total).unwrap_or(i32::MAX), unmanaged))
}

fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

/// The controller `owner` names among the kinds this controller caches, with its UID and
/// `spec.replicas`: a ReplicationController, a Deployment (through its ReplicaSet), a
/// ReplicaSet no Deployment controls, a StatefulSet. `None` for other kinds.
fn find_scale(
    ctx: &Controller,
    owner: &OwnerReference,
    namespace: &str,
) -> Result<Option<(String, i32)>, DisruptionError> {
    let group = group_of(&owner.api_version);
    let same = |uid: Option<String>| uid.as_deref() == Some(owner.uid.as_str());
    match (owner.kind.as_str(), group) {
        ("ReplicationController", "") => Ok(ctx
            .replication_controllers
            .get(&ObjectRef::new(&owner.name).within(namespace))
            .filter(|rc| same(rc.uid()))
            .map(|rc| {
                let replicas = rc.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                (owner.uid.clone(), replicas)
            })),
        ("ReplicaSet", "apps" | "extensions") => {
            let Some(rs) = ctx
                .replica_sets
                .get(&ObjectRef::new(&owner.name).within(namespace))
                .filter(|rs| same(rs.uid()))
            else {
                return Ok(None);
            };
            match controller_ref(rs.as_ref()) {
                Some(parent)
                    if parent.kind == "Deployment"
                        && matches!(group_of(&parent.api_version), "apps" | "extensions") =>
                {
                    Ok(ctx
                        .deployments
                        .get(&ObjectRef::new(&parent.name).within(namespace))
                        .filter(|d| d.uid().as_deref() == Some(parent.uid.as_str()))
                        .map(|d| {
                            let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                            (parent.uid.clone(), replicas)
                        }))
                }
                // Controlled by another kind: neither a bare ReplicaSet nor a Deployment's.
                Some(parent) if parent.kind == "Deployment" => Ok(None),
                _ => {
                    let replicas = rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    Ok(Some((owner.uid.clone(), replicas)))
                }
            }
        }
        ("StatefulSet", "apps") => Ok(ctx
            .stateful_sets
            .get(&ObjectRef::new(&owner.name).within(namespace))
            .filter(|s| same(s.uid()))
            .map(|s| {
                let replicas = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                (owner.uid.clone(), replicas)
            })),
        _ => Ok(None),
    }
}

/// Any other controller kind: its `scale` subresource, found through discovery. A kind
/// without one is an error; a controller that is gone (or a namesake) is `None`.
async fn scale_subresource(
    client: &Client,
    owner: &OwnerReference,
    namespace: &str,
) -> Result<Option<(String, i32)>, DisruptionError> {
    let (group, version) = owner
        .api_version
        .rsplit_once('/')
        .unwrap_or(("", owner.api_version.as_str()));
    let gvk = GroupVersionKind::gvk(group, version, &owner.kind);
    let (resource, capabilities) = match kube::discovery::pinned_kind(client, &gvk).await {
        Ok(found) => found,
        // The kind is not served (any more): its pods have no controller to ask.
        Err(kube::Error::Discovery(_)) => return Ok(None),
        Err(kube::Error::Api(s)) if s.code == 404 => return Ok(None),
        Err(source) => {
            return Err(DisruptionError::Api {
                action: format!("discovering {}", owner.api_version),
                source,
            });
        }
    };
    let has_scale = capabilities
        .subresources
        .iter()
        .any(|(sub, _)| sub.plural == "scale" || sub.plural.ends_with("/scale"));
    if !has_scale {
        let resource = if group.is_empty() {
            resource.plural.clone()
        } else {
            format!("{}.{group}", resource.plural)
        };
        return Err(DisruptionError::NoScale(resource));
    }
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    match api.get_scale(&owner.name).await {
        Ok(scale) if scale.metadata.uid.as_deref() == Some(owner.uid.as_str()) => Ok(Some((
            owner.uid.clone(),
            scale.spec.and_then(|s| s.replicas).unwrap_or(0),
        ))),
        Ok(_) => Ok(None),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(None),
        Err(source) => Err(DisruptionError::Api {
            action: format!("reading the scale of {} {}", owner.kind, owner.name),
            source,
        }),
    }
}

/// The evictions still pending: those of `previous` whose pod exists, is not being deleted
/// yet, and was evicted less than [`DELETION_TIMEOUT`] ago; and when the earliest of them
/// expires.
fn disrupted_pods(
    pods: &[Arc<Pod>],
    previous: &BTreeMap<String, Time>,
    now: Timestamp,
) -> (BTreeMap<String, Time>, Option<Timestamp>) {
    let mut kept = BTreeMap::new();
    let mut recheck: Option<Timestamp> = None;
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pod.name_any();
        let Some(at) = previous.get(&name) else {
            continue;
        };
        let expires = at.0 + DELETION_TIMEOUT;
        if expires < now {
            tracing::info!(pod = %name, "pod was expected to be deleted after its eviction but was not");
            continue;
        }
        recheck = Some(recheck.map_or(expires, |r| r.min(expires)));
        kept.insert(name, at.clone());
    }
    (kept, recheck)
}

/// Ready pods that are not being deleted and not evicted within [`DELETION_TIMEOUT`].
fn current_healthy(pods: &[Arc<Pod>], disrupted: &BTreeMap<String, Time>, now: Timestamp) -> i32 {
    let healthy = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            disrupted
                .get(&p.name_any())
                .is_none_or(|at| at.0 + DELETION_TIMEOUT <= now)
        })
        .filter(|p| ready(p))
        .count();
    i32::try_from(healthy).unwrap_or(i32::MAX)
}

/// The status the budget should have, keeping its conditions' transition times.
fn status_for(
    budget: &PodDisruptionBudget,
    expected: i32,
    desired: i32,
    healthy: i32,
    disrupted: BTreeMap<String, Time>,
) -> PodDisruptionBudgetStatus {
    let allowed = if expected <= 0 {
        0
    } else {
        (healthy - desired).max(0)
    };
    let generation = budget.metadata.generation;
    let mut conditions = budget
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let (status, reason) = if allowed > 0 {
        ("True", SUFFICIENT)
    } else {
        ("False", INSUFFICIENT)
    };
    set_condition(&mut conditions, status, reason, "", generation);
    PodDisruptionBudgetStatus {
        conditions: Some(conditions),
        current_healthy: Some(healthy),
        desired_healthy: Some(desired),
        disrupted_pods: (!disrupted.is_empty()).then_some(disrupted),
        disruptions_allowed: Some(allowed),
        expected_pods: Some(expected),
        observed_generation: generation,
    }
}

/// Sets the `DisruptionAllowed` condition (`meta.SetStatusCondition`: the transition time
/// changes only with the status).
fn set_condition(
    conditions: &mut Vec<Condition>,
    status: &str,
    reason: &str,
    message: &str,
    observed_generation: Option<i64>,
) {
    let existing = conditions
        .iter_mut()
        .find(|c| c.type_ == "DisruptionAllowed");
    match existing {
        Some(c) => {
            if c.status != status {
                c.status = status.into();
                c.last_transition_time = Time(Timestamp::now());
            }
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = observed_generation;
        }
        None => conditions.push(Condition {
            type_: "DisruptionAllowed".into(),
            status: status.into(),
            reason: reason.into(),
            message: message.into(),
            observed_generation,
            last_transition_time: Time(Timestamp::now()),
        }),
    }
}

/// The pod's `DisruptionTarget` condition if it is stale-able: `True`, not the kubelet's,
/// on a pod neither finished nor being deleted.
fn disruption_target(pod: &Pod) -> Option<&PodCondition> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    status.conditions.as_ref()?.iter().find(|c| {
        c.type_ == "DisruptionTarget"
            && c.status == "True"
            && c.reason.as_deref() != Some("TerminationByKubelet")
    })
}

/// Resets a `DisruptionTarget` condition left on a pod that was not deleted within
/// [`STALE_DISRUPTION_TIMEOUT`].
async fn reconcile_pod(pod: Arc<Pod>, ctx: Arc<PodConditions>) -> Result<Action, DisruptionError> {
    let Some(condition) = disruption_target(&pod) else {
        return Ok(Action::await_change());
    };
    let now = Timestamp::now();
    let since = condition.last_transition_time.as_ref().map_or(now, |t| t.0);
    let stale_at = since + STALE_DISRUPTION_TIMEOUT;
    if stale_at > now {
        return Ok(Action::requeue(
            until(now, stale_at) + Duration::from_millis(100),
        ));
    }
    let mut updated = (*pod).clone();
    if let Some(c) = updated
        .status
        .as_mut()
        .and_then(|s| s.conditions.as_mut())
        .and_then(|cs| cs.iter_mut().find(|c| c.type_ == "DisruptionTarget"))
    {
        *c = PodCondition {
            type_: "DisruptionTarget".into(),
            status: "False".into(),
            last_transition_time: Some(Time(now)),
            ..PodCondition::default()
        };
    }
    let namespace = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    match api.replace_status(&pod.name_any(), &params, &updated).await {
        Ok(_) => {
            tracing::info!(pod = %format!("{namespace}/{}", pod.name_any()), "reset a stale DisruptionTarget condition");
            Ok(Action::await_change())
        }
        // Changed meanwhile (or gone): the newer pod comes through the cache.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(Action::await_change()),
        Err(source) => Err(DisruptionError::Api {
            action: format!(
                "resetting the DisruptionTarget condition of pod {namespace}/{}",
                pod.name_any()
            ),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ready: bool, deleting: bool) -> Arc<Pod> {
        let mut pod = json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "status": {"phase": "Running",
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        if deleting {
            pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(serde_json::from_value(pod).unwrap())
    }

    #[test]
    fn percentages_round_up() {
        let pct = |s: &str| IntOrString::String(s.into());
        assert_eq!(scaled(&pct("50%"), 3).unwrap(), 2);
        assert_eq!(scaled(&pct("1%"), 3).unwrap(), 1);
        assert_eq!(scaled(&pct("0%"), 3).unwrap(), 0);
        assert_eq!(scaled(&pct("100%"), 3).unwrap(), 3);
        assert_eq!(scaled(&IntOrString::Int(2), 3).unwrap(), 2);
        assert!(matches!(
            scaled(&pct("two"), 3),
            Err(DisruptionError::InvalidValue(_))
        ));
    }

    #[test]
    fn evictions_expire_and_deleted_pods_leave_the_map() {
        let now = Timestamp::now();
        let pods = [
            pod("a", true, false),
            pod("b", true, false),
            pod("c", true, true),
            pod("d", true, false),
        ];
        let previous: BTreeMap<String, Time> = [
            ("a", now - Duration::from_secs(10)),
            ("b", now - Duration::from_secs(300)),
            ("c", now - Duration::from_secs(10)),
            ("gone", now - Duration::from_secs(10)),
        ]
        .into_iter()
        .map(|(n, t)| (n.to_owned(), Time(t)))
        .collect();
        let (kept, recheck) = disrupted_pods(&pods, &previous, now);
        assert_eq!(kept.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            recheck,
            Some(now - Duration::from_secs(10) + DELETION_TIMEOUT)
        );
        // a: evicted recently; c: being deleted; b, d: healthy.
        assert_eq!(current_healthy(&pods, &kept, now), 2);
        assert_eq!(
            current_healthy(&[pod("x", false, false)], &kept, now),
            0,
            "unready is not healthy"
        );
    }

    #[test]
    fn status_and_condition() {
        let budget: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": {"name": "pdb", "namespace": "default", "generation": 3},
            "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}},
        }))
        .unwrap();
        let status = status_for(&budget, 3, 2, 3, BTreeMap::new());
        assert_eq!(
            (
                status.disruptions_allowed,
                status.expected_pods,
                status.observed_generation
            ),
            (Some(1), Some(3), Some(3))
        );
        let c = &status.conditions.as_ref().unwrap()[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", SUFFICIENT));
        // No pod expected: nothing allowed, whatever the counts.
        let status = status_for(&budget, 0, 0, 0, BTreeMap::new());
        assert_eq!(status.disruptions_allowed, Some(0));
        let c = &status.conditions.as_ref().unwrap()[0];
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", INSUFFICIENT)
        );
        assert!(selects(&budget, &pod("a", true, false)));
    }

    #[test]
    fn stale_disruption_targets() {
        let mut p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "a", "namespace": "default"},
            "status": {"phase": "Running", "conditions": [
                {"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}]},
        }))
        .unwrap();
        assert!(disruption_target(&p).is_some());
        p.status.as_mut().unwrap().conditions.as_mut().unwrap()[0].reason =
            Some("TerminationByKubelet".into());
        assert!(
            disruption_target(&p).is_none(),
            "the kubelet's is never stale"
        );
    }
}
