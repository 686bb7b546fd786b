//! The scheduler (`default-scheduler`, also answering to `orquestra`): assigns each pod
//! without a node to one, as a reconcile loop on the controller framework.
//!
//! For a pending pod it **filters** the nodes — Ready, not cordoned, taints tolerated,
//! `nodeSelector` and required node affinity matched, CPU, memory and pod-count requests
//! fitting what is allocatable minus what is already placed, host ports free, the pod's
//! PersistentVolumeClaims satisfiable there ([`volumes`]) — then
//! **scores** the survivors (fewest pods of the same owner first, so replicas spread; then
//! least allocated) and **binds** through `pods/binding`. A pod that fits nowhere gets a
//! `FailedScheduling` event naming the reasons per node, and is retried when any node
//! changes or a placed pod goes (and every 30 s). Pods bound but not yet seen bound in the cache are *assumed*
//! on their node, so a slow cache never double-books.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod volumes;

use k8s_openapi::api::core::v1::{
    Node, PersistentVolume, PersistentVolumeClaim, Pod, Taint, Toleration,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::quantity;
use orquestra_operator::{Manager, Runner};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts};
use serde_json::json;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["pods", "nodes"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["pods/binding"],
        verbs: &["create"],
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
}

/// The scheduler's metrics, under kube-scheduler's names.
#[derive(Clone, Debug)]
struct Metrics {
    attempts: IntCounterVec,
    duration: HistogramVec,
    pending: IntGauge,
}

/// What the reconciler shares.
pub struct Scheduler {
    client: Client,
    pods: Store<Pod>,
    nodes: Store<Node>,
    /// Claims, volumes and classes, for the pods' PersistentVolumeClaims.
    storage: volumes::VolumeStores,
    /// Pod UID → (node, requests, owner, when): bound by us, maybe not yet seen bound in
    /// the cache.
    assumed: Mutex<HashMap<String, Assumed>>,
    metrics: Metrics,
    /// One scheduling cycle at a time (as kube-scheduler): a decision sees every binding
    /// decided before it — through the snapshot, which each decision updates.
    cycle: tokio::sync::Mutex<Option<Snapshot>>,
    /// Set when a node changes or a placed pod goes: the next cycle takes a new snapshot.
    nodes_changed: Arc<std::sync::atomic::AtomicBool>,
    /// Where the next cycle starts looking among the nodes.
    next_start: std::sync::atomic::AtomicUsize,
    /// Pod UID → what a placed pod takes and its owner, parsed once rather than at every
    /// snapshot (a pod's requests do not change once it is created).
    placed: Mutex<Placements>,
}

/// The placed pods' requests, as of the last snapshot.
#[derive(Debug, Default)]
struct Placements {
    /// Counts snapshots; a pod whose `seen` is behind is gone from the cache.
    epoch: u64,
    pods: HashMap<String, Placed>,
}

/// What a placed pod takes from its node, its controller's UID, and the snapshot that last
/// saw it.
#[derive(Debug)]
struct Placed {
    wanted: Requests,
    owner: Option<String>,
    seen: u64,
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

/// A pod the scheduler decided on: its node, requests and owner, and when.
type Assumed = (String, Requests, Option<String>, Instant);

/// How long a snapshot of the nodes and their usage serves before it is taken again. Within
/// it, the scheduler's own decisions are added as they are made; others' changes (a pod
/// deleted, a node added) are seen at the next snapshot.
const SNAPSHOT_TTL: Duration = Duration::from_millis(500);

/// What the cluster looked like at the start of a stretch of cycles: each node parsed once,
/// and what is placed on it (bound pods plus assumed ones).
#[derive(Debug)]
struct Snapshot {
    taken: Instant,
    nodes: Vec<NodeInfo>,
    /// What is placed on each node, by its index in `nodes`: a cycle looks at hundreds of
    /// nodes, so no hashing of names there.
    usage: Vec<Usage>,
    pending: usize,
}

/// A node as the filters read it, its quantities parsed once per snapshot.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    node: Arc<Node>,
    name: String,
    ready: bool,
    cpu: Option<i64>,
    memory: Option<i64>,
    pods: Option<i64>,
}

impl NodeInfo {
    /// Parses `node` for the filters and scores.
    pub fn new(node: Arc<Node>) -> NodeInfo {
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let allocatable = status.and_then(|s| s.allocatable.as_ref());
        let alloc = |name: &str, parse: fn(&str) -> Option<i64>| {
            allocatable
                .and_then(|a| a.get(name))
                .and_then(|q| parse(&q.0))
        };
        NodeInfo {
            name: node.name_any(),
            ready,
            cpu: alloc("cpu", quantity::millicores),
            memory: alloc("memory", quantity::bytes),
            pods: alloc("pods", |q| q.parse().ok()),
            node,
        }
    }
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").finish_non_exhaustive()
    }
}

/// Adds the scheduler to `manager`: caches of Pods and Nodes, and its runner.
pub fn add(manager: &mut Manager) -> Result<(), prometheus::Error> {
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let nodes = manager.cache::<Node>(watcher::Config::default());
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
    };
    registry.register(Box::new(metrics.attempts.clone()))?;
    registry.register(Box::new(metrics.duration.clone()))?;
    registry.register(Box::new(metrics.pending.clone()))?;
    let context = Arc::new(Scheduler {
        client: manager.client(),
        pods: pods.store(),
        nodes: nodes.store(),
        storage: volumes::VolumeStores {
            claims: claims.store(),
            volumes: pvs.store(),
            classes: classes.store(),
        },
        assumed: Mutex::default(),
        metrics,
        cycle: tokio::sync::Mutex::new(None),
        nodes_changed: Arc::default(),
        next_start: Default::default(),
        placed: Mutex::default(),
    });
    let nodes_changed = Arc::clone(&context.nodes_changed);
    let pending = pods.store();
    let (freed, pending_after_delete) = (Arc::clone(&context.nodes_changed), pods.store());
    let pending_of = |pods: Store<Pod>| {
        move || {
            pods.state()
                .into_iter()
                .filter(|p| is_pending(p))
                .map(|p| ObjectRef::from_obj(p.as_ref()))
                .collect::<Vec<_>>()
        }
    };
    let (on_claim, on_volume) = (pending_of(pods.store()), pending_of(pods.store()));
    // Cycles run one at a time; 64 reconciles in flight keep that many bindings going.
    let runner = Runner::for_cache("scheduler", &pods)
        .map(|r| r.concurrency(64))
        .and_then(|r| {
            // Any node change may make room: look at every pending pod again.
            r.watches(&nodes, move |_node: Arc<Node>| {
                nodes_changed.store(true, std::sync::atomic::Ordering::SeqCst);
                pending
                    .state()
                    .into_iter()
                    .filter(|p| is_pending(p))
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .and_then(|r| {
            // A placed pod gone frees room (kube-scheduler's AssignedPodDelete): take a new
            // snapshot and look at every pending pod again, rather than in 30 s.
            r.watches_deleted(&pods, move |gone: Arc<Pod>| {
                if is_pending(&gone) {
                    return Vec::new();
                }
                freed.store(true, std::sync::atomic::Ordering::SeqCst);
                pending_after_delete
                    .state()
                    .into_iter()
                    .filter(|p| is_pending(p))
                    .map(|p| ObjectRef::from_obj(p.as_ref()))
                    .collect::<Vec<_>>()
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

/// CPU (millicores), memory (bytes) and host ports a pod asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// Millicores.
    pub cpu: i64,
    /// Bytes.
    pub memory: i64,
    /// `hostPort`/protocol pairs.
    pub ports: Vec<(i32, String)>,
}

/// A pod's effective requests: the sum over containers, or the largest init container's if
/// larger (init containers run one at a time).
pub fn requests(pod: &Pod) -> Requests {
    let get = |c: &k8s_openapi::api::core::v1::Container| {
        let r = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let q = |name: &str, parse: fn(&str) -> Option<i64>| {
            r.and_then(|r| r.get(name))
                .and_then(|q| parse(&q.0))
                .unwrap_or(0)
        };
        (q("cpu", quantity::millicores), q("memory", quantity::bytes))
    };
    let Some(spec) = pod.spec.as_ref() else {
        return Requests::default();
    };
    let (mut cpu, mut memory) = (0, 0);
    let mut ports = Vec::new();
    for c in &spec.containers {
        let (c_cpu, c_mem) = get(c);
        cpu += c_cpu;
        memory += c_mem;
        for p in c.ports.iter().flatten() {
            if let Some(host_port) = p.host_port.filter(|p| *p > 0) {
                ports.push((
                    host_port,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                ));
            }
        }
    }
    for c in spec.init_containers.iter().flatten() {
        let (c_cpu, c_mem) = get(c);
        cpu = cpu.max(c_cpu);
        memory = memory.max(c_mem);
    }
    Requests { cpu, memory, ports }
}

/// What a node offers and what is placed on it.
#[derive(Debug, Default)]
struct Usage {
    cpu: i64,
    memory: i64,
    pods: i64,
    ports: Vec<(i32, String)>,
    /// Pods per owner UID, for spreading.
    owners: HashMap<String, i64>,
}

impl Usage {
    fn add(&mut self, r: &Requests, owner: Option<&str>) {
        self.cpu += r.cpu;
        self.memory += r.memory;
        self.pods += 1;
        self.ports.extend(r.ports.iter().cloned());
        if let Some(owner) = owner {
            match self.owners.get_mut(owner) {
                Some(count) => *count += 1,
                None => {
                    self.owners.insert(owner.to_owned(), 1);
                }
            }
        }
    }
}

fn controller_uid(pod: &Pod) -> Option<String> {
    crate::objects::controller_uid(pod).map(str::to_owned)
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Scheduler>) -> Result<Action, SchedulerError> {
    let uid = pod.uid().unwrap_or_default();
    if !is_pending(&pod) {
        ctx.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&uid);
        return Ok(Action::await_change());
    }
    if ctx
        .assumed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .contains_key(&uid)
    {
        // Decided a moment ago; the cache has not caught up.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let profile = "default-scheduler";
    let begun = Instant::now();
    let needs = match volumes::ClaimNeeds::of(&pod, &ctx.storage) {
        Ok(needs) => needs,
        Err(reason) => {
            let nodes = ctx.nodes.state().len();
            ctx.failed_scheduling(&pod, &format!("0/{nodes} nodes are available: {reason}."))
                .await;
            ctx.metrics
                .attempts
                .with_label_values(&["unschedulable", profile])
                .inc();
            return Ok(Action::requeue(Duration::from_secs(30)));
        }
    };
    let wanted = requests(&pod);
    let owner = controller_uid(&pod);
    // The scheduling cycle: decide against the snapshot and assume the pod there. The
    // binding runs after the lock is released, so cycles do not wait for the API.
    let mut cycle = ctx.cycle.lock().await;
    let nodes_changed = ctx
        .nodes_changed
        .swap(false, std::sync::atomic::Ordering::SeqCst);
    let mut fresh = !nodes_changed
        && cycle
            .as_ref()
            .is_some_and(|s| s.taken.elapsed() < SNAPSHOT_TTL);
    let decision = loop {
        if !fresh {
            *cycle = Some(ctx.snapshot());
        }
        let Some(snapshot) = cycle.as_mut() else {
            unreachable!("the snapshot was just taken");
        };
        ctx.metrics.pending.set(snapshot.pending as i64);
        let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
        let mut best: Option<(i64, usize)> = None;
        // As kube-scheduler: in a large cluster, stop looking once enough feasible nodes are
        // found, starting where the last cycle stopped so every node gets its turn.
        let count = snapshot.nodes.len();
        let enough = feasible_enough(count);
        let start = ctx.next_start.load(std::sync::atomic::Ordering::Relaxed) % count.max(1);
        let mut feasible = 0;
        let mut examined = 0;
        for i in 0..count {
            if feasible >= enough {
                break;
            }
            examined += 1;
            let at = (start + i) % count;
            let (node, used) = (&snapshot.nodes[at], Some(&snapshot.usage[at]));
            let fit = fits(&pod, node, &wanted, used).and_then(|()| {
                if needs.allows(&node.node) {
                    Ok(())
                } else {
                    Err("node(s) had volume node affinity conflict".to_owned())
                }
            });
            match fit {
                Err(reason) => *reasons.entry(reason).or_default() += 1,
                Ok(()) => {
                    feasible += 1;
                    let score = score(node, &wanted, used, owner.as_deref());
                    // Ties go to the first found: the rotating start spreads them.
                    if best.is_none_or(|(s, _)| score > s) {
                        best = Some((score, at));
                    }
                }
            }
        }
        ctx.next_start.store(
            (start + examined) % count.max(1),
            std::sync::atomic::Ordering::Relaxed,
        );
        if best.is_none() && fresh {
            // Nowhere, by a snapshot that may be stale (a pod since deleted, a node since
            // added): look again at the cluster as it is now before giving up.
            fresh = false;
            continue;
        }
        break match best {
            Some((_, at)) => {
                let node = snapshot.nodes[at].name.clone();
                snapshot.usage[at].add(&wanted, owner.as_deref());
                snapshot.pending = snapshot.pending.saturating_sub(1);
                ctx.assumed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(uid.clone(), (node.clone(), wanted, owner, Instant::now()));
                Ok(node)
            }
            None => {
                let summary = reasons
                    .iter()
                    .map(|(reason, count)| format!("{count} {reason}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                Err(format!(
                    "0/{} nodes are available: {}.",
                    snapshot.nodes.len(),
                    if summary.is_empty() {
                        "no nodes registered".to_owned()
                    } else {
                        summary
                    }
                ))
            }
        };
    };
    drop(cycle);
    let node = match decision {
        Ok(node) => node,
        Err(message) => {
            ctx.failed_scheduling(&pod, &message).await;
            ctx.metrics
                .attempts
                .with_label_values(&["unschedulable", profile])
                .inc();
            ctx.metrics
                .duration
                .with_label_values(&["unschedulable", profile])
                .observe(begun.elapsed().as_secs_f64());
            return Ok(Action::requeue(Duration::from_secs(30)));
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

impl Scheduler {
    /// Takes a snapshot: the nodes, and what is placed on each — bound pods from the cache
    /// plus the assumed ones it does not show yet.
    fn snapshot(&self) -> Snapshot {
        let nodes: Vec<NodeInfo> = self.nodes.state().into_iter().map(NodeInfo::new).collect();
        let index: HashMap<&str, usize> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.as_str(), i))
            .collect();
        let mut usage: Vec<Usage> = std::iter::repeat_with(Usage::default)
            .take(nodes.len())
            .collect();
        let pods = self.pods.state();
        let mut pending: usize = 0;
        let mut placed = self.placed.lock().unwrap_or_else(|e| e.into_inner());
        placed.epoch += 1;
        let epoch = placed.epoch;
        for pod in &pods {
            if is_pending(pod) {
                pending += 1;
                continue;
            }
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
            let terminal = matches!(
                pod.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Succeeded" | "Failed")
            );
            if let Some(node) = node.filter(|n| !n.is_empty())
                && !terminal
            {
                let uid = pod.metadata.uid.as_deref().unwrap_or_default();
                // Pods on a node that is gone take nothing from the nodes there are.
                let used = index.get(node).map(|&at| &mut usage[at]);
                if let Some(p) = placed.pods.get_mut(uid) {
                    p.seen = epoch;
                    if let Some(used) = used {
                        used.add(&p.wanted, p.owner.as_deref());
                    }
                } else {
                    let p = Placed {
                        wanted: requests(pod),
                        owner: controller_uid(pod),
                        seen: epoch,
                    };
                    if let Some(used) = used {
                        used.add(&p.wanted, p.owner.as_deref());
                    }
                    placed.pods.insert(uid.to_owned(), p);
                }
            }
        }
        placed.pods.retain(|_, p| p.seen == epoch);
        let mut assumed = self.assumed.lock().unwrap_or_else(|e| e.into_inner());
        // Forget assumptions the cache has confirmed, or that are too old to matter.
        assumed.retain(|uid, (_, _, _, at)| {
            !placed.pods.contains_key(uid) && at.elapsed() < Duration::from_secs(60)
        });
        for (node, r, owner, _) in assumed.values() {
            if let Some(&at) = index.get(node.as_str()) {
                usage[at].add(r, owner.as_deref());
            }
            pending = pending.saturating_sub(1);
        }
        drop(index);
        Snapshot {
            taken: Instant::now(),
            nodes,
            usage,
            pending,
        }
    }

    /// Drops the assumption about pod `uid` and the snapshot that counted it.
    async fn forget(&self, uid: &str) {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        *self.cycle.lock().await = None;
    }

    async fn failed_scheduling(&self, pod: &Pod, message: &str) {
        crate::events::publish(
            &self.client,
            "default-scheduler",
            pod,
            crate::events::EventType::Warning,
            "FailedScheduling",
            message,
        )
        .await;
    }
}

/// Whether `pod` may go to `node`; the reason (kube-scheduler's wording) if not.
fn fits(pod: &Pod, info: &NodeInfo, wanted: &Requests, used: Option<&Usage>) -> Result<(), String> {
    if !info.ready {
        return Err("node(s) were not ready".into());
    }
    let node = info.node.as_ref();
    let spec = node.spec.as_ref();
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    // A cordoned node takes only pods tolerating its taint (DaemonSet pods do).
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        let cordon = Taint {
            key: UNSCHEDULABLE.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        if !tolerations.iter().any(|t| tolerates(t, &cordon)) {
            return Err("node(s) were unschedulable".into());
        }
    }
    for taint in spec.and_then(|s| s.taints.as_ref()).into_iter().flatten() {
        if taint.effect == "PreferNoSchedule" {
            continue;
        }
        if !tolerations.iter().any(|t| tolerates(t, taint)) {
            return Err(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                taint.key,
                taint.value.clone().unwrap_or_default()
            ));
        }
    }
    if !pod.spec.as_ref().is_some_and(|spec| placeable(spec, node)) {
        return Err("node(s) didn't match Pod's node affinity/selector".into());
    }
    let default = Usage::default();
    let used = used.unwrap_or(&default);
    if let Some(pods) = info.pods
        && used.pods + 1 > pods
    {
        return Err("Too many pods".into());
    }
    if let Some(cpu) = info.cpu
        && wanted.cpu > 0
        && used.cpu + wanted.cpu > cpu
    {
        return Err("Insufficient cpu".into());
    }
    if let Some(memory) = info.memory
        && wanted.memory > 0
        && used.memory + wanted.memory > memory
    {
        return Err("Insufficient memory".into());
    }
    if wanted.ports.iter().any(|p| used.ports.contains(p)) {
        return Err("node(s) didn't have free ports for the requested pod ports".into());
    }
    Ok(())
}

/// The taint of a cordoned node (`spec.unschedulable`).
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// Whether a pod with `spec` may go to `node` by its `nodeSelector` and required node
/// affinity: any term matching, a term matching when all its `matchExpressions` (on the
/// node's labels) and `matchFields` (`metadata.name`, the only field kube supports) do.
pub fn placeable(spec: &k8s_openapi::api::core::v1::PodSpec, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selector = spec.node_selector.as_ref().unwrap_or(&empty);
    if selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    required.is_none_or(|required| selector_matches(required, node))
}

/// Whether `node` matches a NodeSelector: any term matching, a term matching when all its
/// `matchExpressions` (on the node's labels) and `matchFields` (`metadata.name`, the only
/// field kube supports) do. Pods' required node affinity and volumes' node affinity read
/// alike.
pub fn selector_matches(selector: &k8s_openapi::api::core::v1::NodeSelector, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.name_any();
    selector.node_selector_terms.iter().any(|term| {
        term.match_expressions.iter().flatten().all(|e| {
            crate::labels::requirement(
                &e.operator,
                labels.get(&e.key),
                e.values.as_deref().unwrap_or_default(),
            )
        }) && term.match_fields.iter().flatten().all(|f| {
            let value = (f.key == "metadata.name").then_some(&name);
            f.key == "metadata.name"
                && crate::labels::requirement(
                    &f.operator,
                    value,
                    f.values.as_deref().unwrap_or_default(),
                )
        })
    })
}

/// Kubernetes' toleration matching: whether toleration `t` tolerates `taint`.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key),
        _ => {
            t.key.as_deref() == Some(taint.key.as_str())
                && t.value.clone().unwrap_or_default() == taint.value.clone().unwrap_or_default()
        }
    }
}

/// Higher is better: spreading a controller's pods first (each pod of the same owner
/// already on the node costs 100), then the least allocated node (0–100), then fewer pods.
fn score(node: &NodeInfo, wanted: &Requests, used: Option<&Usage>, owner: Option<&str>) -> i64 {
    let default = Usage::default();
    let used = used.unwrap_or(&default);
    let free = |total: Option<i64>, used: i64| -> i64 {
        match total {
            Some(total) if total > 0 => ((total - used).max(0) * 100) / total,
            _ => 100,
        }
    };
    let least_allocated = (free(node.cpu, used.cpu + wanted.cpu)
        + free(node.memory, used.memory + wanted.memory))
        / 2;
    let same_owner = owner.and_then(|o| used.owners.get(o)).copied().unwrap_or(0);
    -same_owner * 100_000 + least_allocated * 1_000 - used.pods
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let emptier_but_same_owner = score(&n, &Requests::default(), Some(&crowded), Some("rs"));
        let busy_other = Usage {
            cpu: 1500,
            pods: 2,
            ..Usage::default()
        };
        let other = score(&n, &Requests::default(), Some(&busy_other), Some("rs"));
        assert!(other > emptier_but_same_owner);
    }
}
