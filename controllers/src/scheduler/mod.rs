//! The scheduler (`default-scheduler`, also answering to `orquestra`): assigns each pod
//! without a node to one, as a reconcile loop on the controller framework, the way
//! kube-scheduler does.
//!
//! A scheduling cycle, one at a time under a lock, reads a [`snapshot`] of the nodes and
//! what is placed on them:
//! - [`queue`]: gated pods wait; a pod lets pending pods of higher priority go first.
//! - [`filter`] and [`volumes`]: node-local checks — Ready, not cordoned, taints tolerated,
//!   `nodeSelector` and required node affinity, CPU/memory/extended resources/pod count
//!   fitting what is allocatable minus what is placed *and* what higher-priority nominated
//!   pods wait for, host ports free, PersistentVolumeClaims satisfiable.
//! - [`interpod`]: pod affinity and anti-affinity (both ways) and topology spread.
//! - [`score`]: spread by owner and least allocated, under the pod's normalized preferences.
//! - [`preempt`]: a pod that fits nowhere evicts lower-priority pods where that makes room,
//!   and is nominated to that node.
//!
//! The decision is *assumed* in the snapshot (so a slow cache never double-books) and the
//! binding (`pods/binding`) runs outside the lock. A pod that fits nowhere gets a
//! `FailedScheduling` event and `PodScheduled=False`, and is retried when any node changes
//! or a placed pod goes (and every 30 s).

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod filter;
pub mod interpod;
pub mod preempt;
pub mod queue;
pub mod score;
pub mod snapshot;
pub mod volumes;

pub use filter::{UNSCHEDULABLE, placeable, selector_matches, tolerates};
pub use snapshot::{NodeInfo, Requests, requests};

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use serde_json::json;

use snapshot::{Parsed, Placed, Snapshot, Usage};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["pods", "nodes", "namespaces"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["pods/binding"],
        verbs: &["create"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods/status"],
        verbs: &["patch", "update"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["delete"],
    },
    Rule {
        api_groups: &["policy"],
        resources: &["poddisruptionbudgets"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumes", "persistentvolumeclaims"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumeclaims"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &["storage.k8s.io"],
        resources: &["storageclasses"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The names pods may ask for in `spec.schedulerName`.
pub const NAMES: &[&str] = &["default-scheduler", "orquestra"];

/// The name the scheduler reports as (events, preemption conditions).
pub const SCHEDULER: &str = "default-scheduler";

/// What can go wrong scheduling one pod (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The binding failed.
    #[error("binding {pod} to {node}: {source}")]
    Bind {
        /// The pod.
        pod: String,
        /// The node.
        node: String,
        /// The API error.
        source: kube::Error,
    },
    /// Evicting the victims of a preemption failed.
    #[error("preempting on {node} for {pod}: {source}")]
    Preempt {
        /// The preemptor.
        pod: String,
        /// The node.
        node: String,
        /// The API error.
        source: kube::Error,
    },
    /// Writing the pod's status (PodScheduled) failed.
    #[error("updating the status of {pod}: {source}")]
    Status {
        /// The pod.
        pod: String,
        /// The API error.
        source: kube::Error,
    },
}

/// The scheduler's metrics, under kube-scheduler's names.
#[derive(Clone, Debug)]
struct Metrics {
    attempts: IntCounterVec,
    duration: HistogramVec,
    pending: IntGauge,
    preemption_attempts: prometheus::IntCounter,
    preemption_victims: prometheus::Histogram,
}

/// A pod decided on, maybe not yet seen bound in the cache.
#[derive(Debug)]
struct Assumed {
    node: String,
    placed: Placed,
    at: Instant,
}

/// A preemptor waiting for its victims to go: the room on `node` is held for it.
#[derive(Debug)]
struct Nomination {
    node: String,
    placed: Placed,
}

/// What the reconciler shares.
pub struct Scheduler {
    client: Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    budgets: Store<PodDisruptionBudget>,
    /// Claims, volumes and classes, for the pods' PersistentVolumeClaims.
    storage: volumes::VolumeStores,
    /// Pod UID → the decision, maybe not yet seen bound in the cache.
    assumed: Mutex<HashMap<String, Assumed>>,
    /// Pod UID → the node a preemption made room on.
    nominated: Mutex<HashMap<String, Nomination>>,
    /// Pods whose last attempt found no node (they do not hold up lower priorities), until
    /// the next node change or freed room.
    unschedulable: Mutex<HashSet<String>>,
    /// Pod UID → when it first deferred to higher-priority pods.
    deferred: Mutex<HashMap<String, Instant>>,
    metrics: Metrics,
    /// One scheduling cycle at a time (as kube-scheduler): a decision sees every binding
    /// decided before it — through the snapshot, which each decision updates.
    cycle: tokio::sync::Mutex<Option<Snapshot>>,
    /// Set when a node changes or a placed pod goes: the next cycle takes a new snapshot.
    nodes_changed: Arc<std::sync::atomic::AtomicBool>,
    /// Where the next cycle starts looking among the nodes.
    next_start: std::sync::atomic::AtomicUsize,
    /// Pod UID → what a placed pod takes, parsed once rather than at every snapshot (a
    /// pod's requests do not change once it is created).
    placed: Mutex<Placements>,
}

/// The placed pods' parsed requests, as of the last snapshot.
#[derive(Debug, Default)]
struct Placements {
    /// Counts snapshots; a pod whose `seen` is behind is gone from the cache.
    epoch: u64,
    pods: HashMap<String, (Arc<Parsed>, u64)>,
}

/// How many feasible nodes a cycle looks for before it scores them: all of up to 100 nodes,
/// then kube-scheduler's adaptive share (50 % less 1 % per 125 nodes, at least 5 %, at
/// least 100 nodes).
fn feasible_enough(nodes: usize) -> usize {
    if nodes <= 100 {
        return nodes;
    }
    let percent = 50usize.saturating_sub(nodes / 125).max(5);
    (nodes * percent / 100).max(100)
}

/// How long a snapshot of the nodes and their usage serves before it is taken again. Within
/// it, the scheduler's own decisions are added as they are made; others' changes (a pod
/// deleted, a node added) are seen at the next snapshot.
const SNAPSHOT_TTL: Duration = Duration::from_millis(500);

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

/// Adds the scheduler to `manager`: caches of Pods, Nodes and what the filters read, and
/// its runner.
pub fn add(manager: &mut Manager) -> Result<(), prometheus::Error> {
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let namespaces = manager.cache::<Namespace>(watcher::Config::default());
    let budgets = manager.cache::<PodDisruptionBudget>(watcher::Config::default());
    let claims = manager.cache::<PersistentVolumeClaim>(watcher::Config::default());
    let pvs = manager.cache::<PersistentVolume>(watcher::Config::default());
    let classes = manager.cache::<StorageClass>(watcher::Config::default());
    let registry = manager.registry().clone();
    let metrics = Metrics {
        attempts: IntCounterVec::new(
            Opts::new(
                "scheduler_schedule_attempts_total",
                "Number of attempts to schedule pods, by the result.",
            ),
            &["result", "profile"],
        )?,
        duration: HistogramVec::new(
            HistogramOpts::new(
                "scheduler_scheduling_attempt_duration_seconds",
                "Scheduling attempt latency in seconds (scheduling algorithm + binding).",
            )
            .buckets(prometheus::exponential_buckets(0.001, 2.0, 15)?),
            &["result", "profile"],
        )?,
        pending: IntGauge::new(
            "scheduler_pending_pods",
            "Number of pending pods (not yet bound to a node).",
        )?,
        preemption_attempts: prometheus::IntCounter::new(
            "scheduler_preemption_attempts_total",
            "Total preemption attempts in the cluster till now",
        )?,
        preemption_victims: prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "scheduler_preemption_victims",
                "Number of selected preemption victims",
            )
            .buckets(prometheus::exponential_buckets(1.0, 2.0, 7)?),
        )?,
    };
    registry.register(Box::new(metrics.attempts.clone()))?;
    registry.register(Box::new(metrics.duration.clone()))?;
    registry.register(Box::new(metrics.pending.clone()))?;
    registry.register(Box::new(metrics.preemption_attempts.clone()))?;
    registry.register(Box::new(metrics.preemption_victims.clone()))?;
    let context = Arc::new(Scheduler {
        client: manager.client(),
        pods: pods.store(),
        nodes: nodes.store(),
        namespaces: namespaces.store(),
        budgets: budgets.store(),
        storage: volumes::VolumeStores {
            claims: claims.store(),
            volumes: pvs.store(),
            classes: classes.store(),
        },
        assumed: Mutex::default(),
        nominated: Mutex::default(),
        unschedulable: Mutex::default(),
        deferred: Mutex::default(),
        metrics,
        cycle: tokio::sync::Mutex::new(None),
        nodes_changed: Arc::default(),
        next_start: Default::default(),
        placed: Mutex::default(),
    });
    let pending_of = |pods: Store<Pod>| {
        move || {
            pods.state()
                .into_iter()
                .filter(|p| is_pending(p))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let (on_node, on_delete) = (pending_of(pods.store()), pending_of(pods.store()));
    let (on_claim, on_volume) = (pending_of(pods.store()), pending_of(pods.store()));
    let (node_ctx, delete_ctx) = (Arc::clone(&context), Arc::clone(&context));
    // Cycles run one at a time; 64 reconciles in flight keep that many bindings going.
    let runner = Runner::for_cache("scheduler", &pods)
        .map(|r| r.concurrency(64))
        .and_then(|r| {
            // Any node change may make room: look at every pending pod again.
            r.watches(&nodes, move |_node: Arc<Node>| {
                node_ctx.room_changed();
                on_node()
            })
        })
        .and_then(|r| {
            // A placed pod gone frees room (kube-scheduler's AssignedPodDelete): take a new
            // snapshot and look at every pending pod again, rather than in 30 s.
            r.watches_deleted(&pods, move |gone: Arc<Pod>| {
                if is_pending(&gone) {
                    delete_ctx.forget_pending(&gone.uid().unwrap_or_default());
                    return Vec::new();
                }
                delete_ctx.room_changed();
                on_delete()
            })
        })
        // A claim appearing or getting bound may let a waiting pod go somewhere.
        .and_then(|r| r.watches(&claims, move |_: Arc<PersistentVolumeClaim>| on_claim()))
        .and_then(|r| r.watches(&pvs, move |_: Arc<PersistentVolume>| on_volume()))
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
    Ok(())
}

fn is_pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.node_name.as_deref())
        .is_none_or(str::is_empty)
        && pod.metadata.deletion_timestamp.is_none()
        && !matches!(
            pod.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        )
        && NAMES.contains(
            &spec
                .and_then(|s| s.scheduler_name.as_deref())
                .unwrap_or("default-scheduler"),
        )
}

/// What one scheduling cycle decided.
enum Decision {
    /// Bind to this node.
    Bind(String),
    /// Evict these pods on this node, and wait.
    Preempt(String, Vec<Placed>, String),
    /// Nowhere: the FailedScheduling message.
    Unschedulable(String),
    /// Let higher-priority pods go first.
    Defer,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Scheduler>) -> Result<Action, SchedulerError> {
    let uid = pod.uid().unwrap_or_default();
    if !is_pending(&pod) {
        lock(&ctx.assumed).remove(&uid);
        ctx.forget_pending(&uid);
        return Ok(Action::await_change());
    }
    if queue::gated(&pod) {
        // Not scheduled until the gates are removed (an update, which reconciles again).
        let message = "Scheduling is blocked due to non-empty scheduling gates";
        queue::mark_unscheduled(&ctx.client, &pod, queue::GATED, message)
            .await
            .map_err(|source| SchedulerError::Status {
                pod: pod.name_any(),
                source,
            })?;
        return Ok(Action::await_change());
    }
    if lock(&ctx.assumed).contains_key(&uid) {
        // Decided a moment ago; the cache has not caught up.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let profile = SCHEDULER;
    let begun = Instant::now();
    let needs = match volumes::ClaimNeeds::of(&pod, &ctx.storage) {
        Ok(needs) => needs,
        Err(reason) => {
            let nodes = ctx.nodes.state().len();
            let message = format!("0/{nodes} nodes are available: {reason}.");
            ctx.failed_scheduling(&pod, &message).await;
            ctx.metrics
                .attempts
                .with_label_values(&["unschedulable", profile])
                .inc();
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let me = Placed {
        pod: Arc::clone(&pod),
        parsed: Arc::new(Parsed::of(&pod)),
    };
    let node = match ctx.decide(&pod, &uid, &me, &needs).await {
        Decision::Bind(node) => node,
        Decision::Defer => return Ok(Action::requeue(Duration::from_millis(100))),
        Decision::Unschedulable(message) => {
            ctx.failed_scheduling(&pod, &message).await;
            ctx.metrics
                .attempts
                .with_label_values(&["unschedulable", profile])
                .inc();
            ctx.metrics
                .duration
                .with_label_values(&["unschedulable", profile])
                .observe(begun.elapsed().as_secs_f64());
            queue::mark_unscheduled(&ctx.client, &pod, "Unschedulable", &message)
                .await
                .map_err(|source| SchedulerError::Status {
                    pod: pod.name_any(),
                    source,
                })?;
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
        Decision::Preempt(node, victims, message) => {
            ctx.failed_scheduling(&pod, &message).await;
            ctx.metrics.preemption_attempts.inc();
            ctx.metrics.preemption_victims.observe(victims.len() as f64);
            ctx.metrics
                .attempts
                .with_label_values(&["unschedulable", profile])
                .inc();
            preempt::execute(&ctx.client, SCHEDULER, &pod, &node, &victims)
                .await
                .map_err(|source| SchedulerError::Preempt {
                    pod: pod.name_any(),
                    node: node.clone(),
                    source,
                })?;
            // The victims going wakes every pending pod; look again anyway in a while.
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
    };
    // The binding cycle: the claims waiting for this pod learn its node first.
    if let Err(source) = needs.select(&ctx.client, &node).await {
        ctx.forget(&uid).await;
        return Err(SchedulerError::Bind {
            pod: pod.name_any(),
            node,
            source,
        });
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace().unwrap_or_default());
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": pod.name_any(), "namespace": pod.namespace()},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    let bound: Result<serde_json::Value, kube::Error> = api
        .create_subresource("binding", &pod.name_any(), &PostParams::default(), &binding)
        .await;
    match bound {
        Ok(_) => {
            ctx.metrics
                .attempts
                .with_label_values(&["scheduled", profile])
                .inc();
            ctx.metrics
                .duration
                .with_label_values(&["scheduled", profile])
                .observe(begun.elapsed().as_secs_f64());
            Ok(Action::await_change())
        }
        Err(error) => {
            // Not placed after all: forget the assumption, and take the next snapshot
            // afresh so the capacity it held is free again.
            ctx.forget(&uid).await;
            match error {
                // Bound meanwhile (by someone else) or gone: nothing to do.
                kube::Error::Api(s) if s.code == 409 || s.code == 404 => Ok(Action::await_change()),
                source => {
                    ctx.metrics
                        .attempts
                        .with_label_values(&["error", profile])
                        .inc();
                    Err(SchedulerError::Bind {
                        pod: pod.name_any(),
                        node,
                        source,
                    })
                }
            }
        }
    }
}

/// Whether `pod` has pod (anti-)affinity or spread terms of its own.
fn has_terms(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|s| {
        s.topology_spread_constraints
            .as_ref()
            .is_some_and(|t| !t.is_empty())
            || s.affinity
                .as_ref()
                .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some())
    })
}

impl Scheduler {
    /// One scheduling cycle for `pod` (`me`): filter, score, assume — or find what to
    /// preempt.
    async fn decide(
        &self,
        pod: &Pod,
        uid: &str,
        me: &Placed,
        needs: &volumes::ClaimNeeds,
    ) -> Decision {
        let wanted = &me.parsed.wanted;
        let priority = me.parsed.priority;
        let mut cycle = self.cycle.lock().await;
        let nodes_changed = self
            .nodes_changed
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        let mut fresh = !nodes_changed
            && cycle
                .as_ref()
                .is_some_and(|s| s.taken.elapsed() < SNAPSHOT_TTL);
        loop {
            if !fresh {
                *cycle = None;
            }
            let snapshot = cycle.get_or_insert_with(|| self.snapshot());
            self.metrics.pending.set(snapshot.pending.len() as i64);
            // Higher priorities first.
            let since = lock(&self.deferred).get(uid).copied();
            let defer = {
                let unschedulable = lock(&self.unschedulable);
                let assumed = lock(&self.assumed);
                queue::defer(&snapshot.pending, priority, since, |u| {
                    u == uid || unschedulable.contains(u) || assumed.contains_key(u)
                })
            };
            if defer {
                lock(&self.deferred)
                    .entry(uid.to_owned())
                    .or_insert_with(Instant::now);
                return Decision::Defer;
            }
            let constraints = if has_terms(pod) || !snapshot.with_affinity.is_empty() {
                interpod::Constraints::of(pod, snapshot)
            } else {
                interpod::Constraints::none()
            };
            let (held, mine) = self.held(snapshot, uid, priority);
            let check = |at: usize| -> Result<(), String> {
                let (node, used) = (&snapshot.nodes[at], &snapshot.usage[at]);
                filter::node_allows(pod, node)?;
                match held.get(&at) {
                    Some(waiting) => {
                        let mut used = used.clone();
                        for p in &waiting.placed {
                            used.add(p.clone());
                        }
                        filter::resources_fit(node, wanted, &used)?;
                    }
                    None => filter::resources_fit(node, wanted, used)?,
                }
                if !needs.allows(&node.node) {
                    return Err("node(s) had volume node affinity conflict".to_owned());
                }
                constraints.allows(node).map_err(str::to_owned)
            };
            let scoring = constraints.scores() || score::prefers_nodes(pod) || snapshot.soft_taints;
            let owner = me.parsed.owner.as_deref();
            let count = snapshot.nodes.len();
            let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed = Vec::new();
            let mut chosen = None;
            // A preemptor goes where it made room, if it fits there now.
            if let Some(at) = mine
                && check(at).is_ok()
            {
                chosen = Some(at);
            }
            if chosen.is_none() {
                let mut raw: Vec<score::Raw> = Vec::new();
                let mut best: Option<(i64, usize)> = None;
                // As kube-scheduler: in a large cluster, stop looking once enough feasible
                // nodes are found, starting where the last cycle stopped so every node gets
                // its turn.
                let enough = feasible_enough(count);
                let start =
                    self.next_start.load(std::sync::atomic::Ordering::Relaxed) % count.max(1);
                let (mut feasible, mut examined) = (0, 0);
                for i in 0..count {
                    if feasible >= enough {
                        break;
                    }
                    examined += 1;
                    let at = (start + i) % count;
                    match check(at) {
                        Err(reason) => {
                            if filter::resolvable(&reason) {
                                failed.push(at);
                            }
                            *reasons.entry(reason).or_default() += 1;
                        }
                        Ok(()) => {
                            feasible += 1;
                            let node = &snapshot.nodes[at];
                            let base = score::base(node, wanted, Some(&snapshot.usage[at]), owner);
                            if scoring {
                                let (pod_affinity, spread) = constraints.raw_scores(node);
                                raw.push(score::Raw {
                                    at,
                                    base,
                                    node_affinity: score::node_affinity(pod, node),
                                    pod_affinity,
                                    spread,
                                    taints: -score::intolerable(pod, node),
                                });
                            } else if best.is_none_or(|(s, _)| base > s) {
                                // Ties go to the first found: the rotating start spreads them.
                                best = Some((base, at));
                            }
                        }
                    }
                }
                self.next_start.store(
                    (start + examined) % count.max(1),
                    std::sync::atomic::Ordering::Relaxed,
                );
                chosen = if scoring {
                    score::pick(&raw)
                } else {
                    best.map(|(_, at)| at)
                };
            }
            if chosen.is_none() && fresh {
                // Nowhere, by a snapshot that may be stale (a pod since deleted, a node since
                // added): look again at the cluster as it is now before giving up.
                fresh = false;
                continue;
            }
            if let Some(at) = chosen {
                let node = snapshot.nodes[at].name.clone();
                snapshot.place(at, me.clone());
                lock(&self.assumed).insert(
                    uid.to_owned(),
                    Assumed {
                        node: node.clone(),
                        placed: me.clone(),
                        at: Instant::now(),
                    },
                );
                self.forget_pending(uid);
                return Decision::Bind(node);
            }
            let summary = reasons
                .iter()
                .map(|(reason, count)| format!("{count} {reason}"))
                .collect::<Vec<_>>()
                .join(", ");
            let mut message = format!(
                "0/{count} nodes are available: {}.",
                if summary.is_empty() {
                    "no nodes registered".to_owned()
                } else {
                    summary
                }
            );
            lock(&self.unschedulable).insert(uid.to_owned());
            if !preempt::eligible(pod, priority, mine, snapshot) {
                return Decision::Unschedulable(message);
            }
            let budgets = preempt::Budgets::new(self.budgets.state());
            match preempt::select(pod, wanted, priority, snapshot, &failed, &held, &budgets) {
                Some(candidate) => {
                    let node = snapshot.nodes[candidate.at].name.clone();
                    let mut nominated = lock(&self.nominated);
                    // Lower-priority pods waiting for room there lose their claim.
                    nominated.retain(|_, n| n.node != node || n.placed.parsed.priority >= priority);
                    nominated.insert(
                        uid.to_owned(),
                        Nomination {
                            node: node.clone(),
                            placed: me.clone(),
                        },
                    );
                    return Decision::Preempt(node, candidate.victims, message);
                }
                None => {
                    let helpless = count - failed.len();
                    message.push_str(&format!(
                        " preemption: 0/{count} nodes are available: {} No preemption victims \
                         found for incoming pod{}.",
                        failed.len(),
                        if helpless > 0 {
                            format!(", {helpless} Preemption is not helpful for scheduling")
                        } else {
                            String::new()
                        }
                    ));
                    return Decision::Unschedulable(message);
                }
            }
        }
    }

    /// The room nominated pods of at least `priority` (other than `uid`) wait for, per node
    /// index; and the node `uid` itself is nominated to.
    fn held(
        &self,
        snapshot: &Snapshot,
        uid: &str,
        priority: i32,
    ) -> (HashMap<usize, Usage>, Option<usize>) {
        let nominated = lock(&self.nominated);
        let mut held: HashMap<usize, Usage> = HashMap::new();
        let mut mine = None;
        for (u, n) in nominated.iter() {
            let Some(&at) = snapshot.index.get(&n.node) else {
                continue;
            };
            if u == uid {
                mine = Some(at);
            } else if n.placed.parsed.priority >= priority {
                held.entry(at).or_default().add(n.placed.clone());
            }
        }
        (held, mine)
    }

    /// A node changed or a placed pod went: every pod may fit somewhere now.
    fn room_changed(&self) {
        self.nodes_changed
            .store(true, std::sync::atomic::Ordering::SeqCst);
        lock(&self.unschedulable).clear();
    }

    /// Forgets what the queue and preemption kept about pending pod `uid` (bound or gone).
    fn forget_pending(&self, uid: &str) {
        lock(&self.nominated).remove(uid);
        lock(&self.unschedulable).remove(uid);
        lock(&self.deferred).remove(uid);
    }

    /// Takes a snapshot: the nodes, and what is placed on each — bound pods from the cache
    /// plus the assumed ones it does not show yet.
    fn snapshot(&self) -> Snapshot {
        let nodes: Vec<NodeInfo> = self.nodes.state().into_iter().map(NodeInfo::new).collect();
        let index: HashMap<String, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let soft_taints = nodes.iter().any(|n| {
            n.node
                .spec
                .as_ref()
                .and_then(|s| s.taints.as_ref())
                .is_some_and(|ts| ts.iter().any(|t| t.effect == "PreferNoSchedule"))
        });
        let mut snapshot = Snapshot {
            taken: Instant::now(),
            usage: std::iter::repeat_with(Usage::default)
                .take(nodes.len())
                .collect(),
            nodes,
            index,
            with_affinity: Vec::new(),
            namespaces: interpod::namespace_labels(&self.namespaces.state()),
            pending: Vec::new(),
            soft_taints,
        };
        let pods = self.pods.state();
        let mut placed = lock(&self.placed);
        placed.epoch += 1;
        let epoch = placed.epoch;
        let mut pending_uids = HashSet::new();
        for pod in pods {
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            if is_pending(&pod) {
                if !queue::gated(&pod) {
                    snapshot
                        .pending
                        .push((snapshot::priority(&pod), uid.clone()));
                }
                pending_uids.insert(uid);
                continue;
            }
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            let terminal = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            let Some(node) = node.filter(|n| !n.is_empty() && !terminal) else {
                continue;
            };
            let parsed = match placed.pods.get_mut(&uid) {
                Some((parsed, seen)) => {
                    *seen = epoch;
                    Arc::clone(parsed)
                }
                None => {
                    let parsed = Arc::new(Parsed::of(&pod));
                    placed.pods.insert(uid, (Arc::clone(&parsed), epoch));
                    parsed
                }
            };
            // Pods on a node that is gone take nothing from the nodes there are.
            if let Some(&at) = snapshot.index.get(node) {
                snapshot.place(at, Placed { pod, parsed });
            }
        }
        placed.pods.retain(|_, (_, seen)| *seen == epoch);
        let mut assumed = lock(&self.assumed);
        // Forget assumptions the cache has confirmed, or that are too old to matter.
        assumed.retain(|uid, a| {
            !placed.pods.contains_key(uid) && a.at.elapsed() < Duration::from_secs(60)
        });
        for a in assumed.values() {
            if let Some(&at) = snapshot.index.get(&a.node) {
                snapshot.place(at, a.placed.clone());
            }
        }
        drop(assumed);
        drop(placed);
        // Nominations of pods no longer pending are void.
        lock(&self.nominated).retain(|uid, _| pending_uids.contains(uid));
        snapshot.pending.sort_by_key(|p| std::cmp::Reverse(p.0));
        snapshot
    }

    /// Drops the assumption about pod `uid` and the snapshot that counted it.
    async fn forget(&self, uid: &str) {
        lock(&self.assumed).remove(uid);
        *self.cycle.lock().await = None;
    }

    async fn failed_scheduling(&self, pod: &Pod, message: &str) {
        crate::events::publish(
            &self.client,
            SCHEDULER,
            pod,
            crate::events::EventType::Warning,
            "FailedScheduling",
            message,
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use filter::fits;

    fn node(json: serde_json::Value) -> NodeInfo {
        NodeInfo::new(Arc::new(serde_json::from_value(json).unwrap()))
    }

    fn ready_node(name: &str) -> serde_json::Value {
        json!({"metadata": {"name": name, "labels": {"zone": "a"}}, "status": {
            "conditions": [{"type": "Ready", "status": "True"}],
            "allocatable": {"cpu": "2", "memory": "1Gi", "pods": "3"}}})
    }

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn filters() {
        let plain = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c",
            "resources": {"requests": {"cpu": "500m", "memory": "256Mi"}}}]}}),
        );
        let wanted = requests(&plain);
        assert_eq!(wanted.cpu, 500);
        let ok = node(ready_node("a"));
        assert_eq!(fits(&plain, &ok, &wanted, None), Ok(()));
        let mut not_ready = ready_node("b");
        not_ready["status"]["conditions"][0]["status"] = "False".into();
        assert!(
            fits(&plain, &node(not_ready), &wanted, None)
                .unwrap_err()
                .contains("not ready")
        );
        let mut tainted = ready_node("c");
        tainted["spec"] =
            json!({"taints": [{"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}]});
        assert!(
            fits(&plain, &node(tainted.clone()), &wanted, None)
                .unwrap_err()
                .contains("untolerated taint")
        );
        let tolerant = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu"}]}}),
        );
        assert_eq!(
            fits(&tolerant, &node(tainted), &Requests::default(), None),
            Ok(())
        );
        let busy = Usage {
            cpu: 1800,
            ..Usage::default()
        };
        assert_eq!(
            fits(&plain, &ok, &wanted, Some(&busy)),
            Err("Insufficient cpu".into())
        );
        let full = Usage {
            pods: 3,
            ..Usage::default()
        };
        assert_eq!(
            fits(&plain, &ok, &wanted, Some(&full)),
            Err("Too many pods".into())
        );
        // Extended resources: a node without them has none.
        let extended = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c",
            "resources": {"requests": {"example.com/foo": "2"}}}]}}),
        );
        assert_eq!(
            fits(&extended, &ok, &requests(&extended), None),
            Err("Insufficient example.com/foo".into())
        );
        let mut rich = ready_node("r");
        rich["status"]["allocatable"]["example.com/foo"] = "5".into();
        assert_eq!(
            fits(&extended, &node(rich), &requests(&extended), None),
            Ok(())
        );
        let elsewhere = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "nodeSelector": {"zone": "b"}}}),
        );
        assert!(
            fits(&elsewhere, &ok, &Requests::default(), None)
                .unwrap_err()
                .contains("selector")
        );
        // matchFields on metadata.name: how DaemonSet pods ask for their node.
        let pinned = |to: &str| {
            pod(
                json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [{"matchFields": [
                        {"key": "metadata.name", "operator": "In", "values": [to]}]}]}}}}}),
            )
        };
        assert_eq!(fits(&pinned("a"), &ok, &Requests::default(), None), Ok(()));
        assert!(fits(&pinned("b"), &ok, &Requests::default(), None).is_err());
        // A cordoned node takes pods tolerating its taint only.
        let mut cordoned = ready_node("a");
        cordoned["spec"] = json!({"unschedulable": true});
        assert!(fits(&plain, &node(cordoned.clone()), &wanted, None).is_err());
        let tolerant = pod(
            json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c"}],
            "tolerations": [{"key": UNSCHEDULABLE, "operator": "Exists", "effect": "NoSchedule"}]}}),
        );
        assert_eq!(
            fits(&tolerant, &node(cordoned), &Requests::default(), None),
            Ok(())
        );
    }

    #[test]
    fn large_clusters_are_sampled_as_kube_scheduler_does() {
        assert_eq!(feasible_enough(3), 3);
        assert_eq!(feasible_enough(100), 100);
        assert_eq!(feasible_enough(1_000), 420);
        assert_eq!(feasible_enough(5_000), 500);
        assert_eq!(feasible_enough(100_000), 5_000);
    }

    #[test]
    fn spreading_beats_emptiness() {
        let n = node(ready_node("a"));
        let crowded = Usage {
            owners: [("rs".to_owned(), 2)].into(),
            ..Usage::default()
        };
        let emptier_but_same_owner =
            score::base(&n, &Requests::default(), Some(&crowded), Some("rs"));
        let busy_other = Usage {
            cpu: 1500,
            pods: 2,
            ..Usage::default()
        };
        let other = score::base(&n, &Requests::default(), Some(&busy_other), Some("rs"));
        assert!(other > emptier_but_same_owner);
    }
}

#[cfg(test)]
mod port_tests {
    use super::snapshot::HostPort;

    #[test]
    fn host_ports_conflict_as_kube_says() {
        let port = |ip: &str, protocol: &str| HostPort {
            ip: ip.into(),
            port: 54322,
            protocol: protocol.into(),
        };
        assert!(port("", "TCP").conflicts(&port("10.0.0.1", "TCP")));
        assert!(port("0.0.0.0", "TCP").conflicts(&port("10.0.0.1", "TCP")));
        assert!(!port("10.0.0.2", "TCP").conflicts(&port("10.0.0.1", "TCP")));
        assert!(!port("", "UDP").conflicts(&port("", "TCP")));
    }
}
