//! One pod on this node: a level-based worker that converges the pod's containers to its
//! spec and reports what it sees.
//!
//! Each sync reads the truth from disk (every container attempt is a bundle directory the
//! shim records into), decides the next step, takes it, and patches the pod's status if it
//! changed. Nothing is remembered that the disk does not say, except back-off timers and the
//! last status sent — so an agent restarted at any point re-adopts running containers and
//! carries on.
//!
//! The pod's lifecycle on the node is an explicit state machine ([`Lifecycle`]):
//!
//! ```text
//! Preparing ──sandbox+volumes──▶ Initializing ──init containers done──▶ Running
//!     │                              │                                     │
//!     └──────────────── deletion requested / pod gone ─────────────────────┴──▶ Terminating
//! Running ──all containers done, none to restart──▶ Finished(Succeeded|Failed)
//! Terminating ──containers stopped, sandbox released──▶ (worker ends)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use sha2::Digest;

use crate::agent::Context;
use crate::container::{self, ContainerConfig, ContainerState};
use crate::events::EventType;
use crate::hook::{self, Hook};
use crate::image::{Image, ImageError};
use crate::network::PodNetwork;
use crate::probe::{self, Kind, Tracker};
use crate::resolve::{self, ConfigError, Sources};
use crate::shim::{Exited, Started, StdinMode, now_rfc3339};
use crate::volume::{self, PodVolumes};

/// The first restart delay of a crashing container; doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_secs(10);
/// The longest restart delay.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long resets its back-off (the kubelet's 2 × max).
pub const BACKOFF_RESET: Duration = Duration::from_secs(600);

/// Where a pod is in its life on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Getting its network namespace, address and volumes.
    Preparing,
    /// Running its init containers, one at a time, in order.
    Initializing,
    /// Its containers run (and restart as the policy says).
    Running,
    /// Every container is done and none will restart.
    Finished {
        /// `Succeeded` or `Failed`.
        phase: &'static str,
    },
    /// Being stopped: SIGTERM sent; SIGKILL at the deadline.
    Terminating {
        /// When SIGKILL goes out.
        deadline: Instant,
    },
}

/// What the worker wants after a sync.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Sync again after this long (or sooner, when the pod changes).
    After(Duration),
    /// The pod is gone from this node: stop the worker.
    Done,
}

/// Restart back-off of one container (or image pull).
#[derive(Clone, Copy, Debug)]
struct Backoff {
    delay: Duration,
    last: Instant,
}

/// The worker of one pod.
pub struct PodWorker {
    ctx: Arc<Context>,
    uid: String,
    dir: PathBuf,
    lifecycle: Lifecycle,
    network: Option<PodNetwork>,
    volumes: Option<PodVolumes>,
    /// Why a container is not running, when the worker knows better than the disk.
    waiting: HashMap<String, (String, String)>,
    restart_backoff: HashMap<String, Backoff>,
    pull_backoff: HashMap<String, Backoff>,
    last_status: Option<Value>,
    start_time: Option<String>,
    /// Probe state per container attempt.
    probes: HashMap<(String, u32, Kind), Tracker>,
    /// Containers being killed (failed liveness): SIGKILL at the instant.
    killing: HashMap<(String, u32), Instant>,
    created: Instant,
    reported_running: bool,
    /// The service account files, once written (`None`: not yet, or not automounted).
    service_account: Option<crate::serviceaccount::Projected>,
    /// When the emptyDir size limits were last checked.
    evicted_at: Instant,
    /// Why the pod failed as a whole (`status.reason`/`message`): `DeadlineExceeded`.
    failure: Option<(&'static str, String)>,
    /// Why the pod's resize cannot be done (`PodResizePending`, reason `Infeasible`).
    resize_infeasible: Option<String>,
    /// Whether the node admitted the pod (its host ports are free).
    admitted: bool,
    /// The pod as the API has it, updated while a sync runs: a pull in progress gives up
    /// when the pod is deleted, rather than hold its termination up.
    updates: Option<tokio::sync::watch::Receiver<Option<Arc<Pod>>>>,
    /// Failed attempts to prepare the pod so far (its ServiceAccount, a Secret or ConfigMap
    /// it mounts missing, …): the next try backs off.
    prepare_failures: u32,
}

/// The delay before preparing a pod again after `failures` failed attempts: 1 s doubling to
/// the kubelet's 10 s, so a pod starts soon after the object it waited for appears.
fn prepare_backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.saturating_sub(1).min(4)).min(Duration::from_secs(10))
}

impl std::fmt::Debug for PodWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWorker")
            .field("uid", &self.uid)
            .field("lifecycle", &self.lifecycle)
            .finish_non_exhaustive()
    }
}

/// A container's attempts on disk: `containers/<name>/<attempt>/`.
#[derive(Clone, Debug)]
struct Attempt {
    number: u32,
    dir: PathBuf,
    state: ContainerState,
}

impl PodWorker {
    /// A worker for the pod with `uid`; its state comes from `ctx`'s data dir.
    pub fn new(ctx: Arc<Context>, uid: &str) -> Self {
        let dir = ctx.pods_dir().join(uid);
        PodWorker {
            ctx,
            uid: uid.to_owned(),
            dir,
            lifecycle: Lifecycle::Preparing,
            network: None,
            volumes: None,
            waiting: HashMap::new(),
            restart_backoff: HashMap::new(),
            pull_backoff: HashMap::new(),
            last_status: None,
            start_time: None,
            probes: HashMap::new(),
            killing: HashMap::new(),
            created: Instant::now(),
            reported_running: false,
            service_account: None,
            prepare_failures: 0,
            admitted: false,
            resize_infeasible: None,
            failure: None,
            evicted_at: Instant::now(),
            updates: None,
        }
    }

    /// Lets the worker watch the pod while it syncs (see `updates`).
    pub fn watch_updates(&mut self, updates: tokio::sync::watch::Receiver<Option<Arc<Pod>>>) {
        self.updates = Some(updates);
    }

    /// The lifecycle state.
    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// One sync: `pod` is the latest from the API, `None` once it is gone from it.
    pub async fn sync(&mut self, pod: Option<&Pod>) -> Next {
        let Some(pod) = pod else {
            // Deleted from the API without us (force delete) or an orphan: stop at once.
            return self.terminate(None, Duration::ZERO).await;
        };
        if pod.metadata.deletion_timestamp.is_some() {
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or(pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds))
                .unwrap_or(30)
                .max(0) as u64;
            return self.terminate(Some(pod), Duration::from_secs(grace)).await;
        }
        if !self.admitted && !matches!(self.lifecycle, Lifecycle::Finished { .. }) {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            let running = matches!(phase, Some("Running"));
            match self.ctx.admit_ports(&self.uid, pod, running) {
                Ok(()) => self.admitted = true,
                Err(message) => {
                    self.event(pod, EventType::Warning, "NodePorts", &message)
                        .await;
                    self.failure = Some(("NodePorts", message));
                    self.lifecycle = Lifecycle::Finished { phase: "Failed" };
                }
            }
        }
        if matches!(self.lifecycle, Lifecycle::Finished { .. }) {
            self.ctx.release_ports(&self.uid);
        }
        if self.start_time.is_none() {
            self.start_time = Some(
                pod.status
                    .as_ref()
                    .and_then(|s| s.start_time.as_ref())
                    .map(|t| t.0.to_string())
                    .unwrap_or_else(now_rfc3339),
            );
        }
        // activeDeadlineSeconds: counted from the pod's start on this node; past it, every
        // container is killed and the pod fails (as the kubelet's active deadline handler).
        let deadline = pod
            .spec
            .as_ref()
            .and_then(|s| s.active_deadline_seconds)
            .zip(self.start_time.as_deref().map(instant_of))
            .map(|(secs, started)| started + Duration::from_secs(secs.max(0) as u64));
        if let Some(at) = deadline
            && Instant::now() >= at
            && !matches!(self.lifecycle, Lifecycle::Finished { .. })
        {
            for (_, attempt) in self.all_latest() {
                if matches!(attempt.state, ContainerState::Running(_)) {
                    let _ = container::signal(&attempt.dir, Signal::SIGKILL);
                }
            }
            let message = "Pod was active on the node longer than the specified deadline";
            self.event(pod, EventType::Normal, "DeadlineExceeded", message)
                .await;
            self.failure = Some(("DeadlineExceeded", message.to_owned()));
            self.lifecycle = Lifecycle::Finished { phase: "Failed" };
            // Let the containers' exit records land before the sandbox goes.
            tokio::time::sleep(Duration::from_millis(300)).await;
            self.release_sandbox().await;
        }
        let next = match self.lifecycle {
            Lifecycle::Finished { .. } => Next::After(Duration::from_secs(10)),
            _ => match (self.converge(pod).await, deadline) {
                (Next::After(d), Some(at)) => {
                    Next::After(d.min(at.saturating_duration_since(Instant::now())))
                }
                (next, _) => next,
            },
        };
        self.report(pod).await;
        next
    }

    /// Preparing → Initializing → Running → Finished.
    async fn converge(&mut self, pod: &Pod) -> Next {
        let spec = pod.spec.clone().unwrap_or_default();
        if self.lifecycle == Lifecycle::Preparing {
            if let Err((reason, message)) = self.prepare(pod).await {
                self.event(pod, EventType::Warning, reason, &message).await;
                for c in spec
                    .init_containers
                    .iter()
                    .flatten()
                    .chain(&spec.containers)
                {
                    self.waiting.insert(
                        c.name.clone(),
                        ("ContainerCreating".into(), message.clone()),
                    );
                }
                self.prepare_failures = self.prepare_failures.saturating_add(1);
                return Next::After(prepare_backoff(self.prepare_failures));
            }
            self.prepare_failures = 0;
            self.lifecycle = Lifecycle::Initializing;
        }
        self.refresh_token(pod).await;
        self.refresh_volumes(pod).await;
        if matches!(self.lifecycle, Lifecycle::Finished { .. }) {
            // Evicted (an emptyDir over its size limit).
            return Next::After(Duration::from_secs(10));
        }
        let policy = spec.restart_policy.as_deref().unwrap_or("Always");
        if self.lifecycle == Lifecycle::Initializing {
            for init in spec.init_containers.iter().flatten() {
                let latest = self.latest(&init.name);
                // A sidecar (`restartPolicy: Always`) starts in order, and the next one
                // waits only for it to have started (its startup probe passed); it keeps
                // running beside the main containers, restarted whenever it exits.
                if is_sidecar(init) {
                    match latest.as_ref().map(|a| &a.state) {
                        None => return self.start(pod, init, 0).await,
                        Some(ContainerState::Running(_)) => {
                            let number = latest.as_ref().map_or(0, |a| a.number);
                            if !self.started_and_ready(init, number).0 {
                                let due = self.run_probes(pod).await;
                                return Next::After(
                                    due.unwrap_or(self.ctx.config.sync_period)
                                        .min(self.ctx.config.sync_period),
                                );
                            }
                            continue;
                        }
                        Some(ContainerState::Created) => {
                            return Next::After(self.ctx.config.sync_period);
                        }
                        Some(ContainerState::Exited(..) | ContainerState::Lost(_)) => {
                            return self.restart(pod, init, latest).await;
                        }
                    }
                }
                match latest.as_ref().map(|a| &a.state) {
                    Some(ContainerState::Exited(_, exited)) if exited.exit_code == 0 => continue,
                    Some(ContainerState::Running(_) | ContainerState::Created) => {
                        return Next::After(self.ctx.config.sync_period);
                    }
                    Some(ContainerState::Exited(..) | ContainerState::Lost(_)) => {
                        if policy == "Never" {
                            self.lifecycle = Lifecycle::Finished { phase: "Failed" };
                            self.release_sandbox().await;
                            return Next::After(Duration::from_secs(10));
                        }
                        return self.restart(pod, init, latest).await;
                    }
                    None => return self.start(pod, init, 0).await,
                }
            }
            self.lifecycle = Lifecycle::Running;
        }
        // Running: start what never ran, restart what exited as the policy says.
        let mut wake = self.ctx.config.sync_period;
        let mut done = Vec::new();
        let main_done = spec.containers.iter().all(|c| {
            self.latest(&c.name).is_some_and(|a| {
                matches!(
                    a.state,
                    ContainerState::Exited(..) | ContainerState::Lost(_)
                )
            })
        }) && policy != "Always";
        for sidecar in spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| is_sidecar(c))
        {
            let latest = self.latest(&sidecar.name);
            if main_done {
                continue;
            }
            if let Some(ContainerState::Exited(..) | ContainerState::Lost(_)) =
                latest.as_ref().map(|a| &a.state)
                && let Next::After(d) = self.restart(pod, sidecar, latest).await
            {
                wake = wake.min(d);
            }
        }
        for c in &spec.containers {
            let latest = self.latest(&c.name);
            match latest.as_ref().map(|a| &a.state) {
                None => {
                    if let Next::After(d) = self.start(pod, c, 0).await {
                        wake = wake.min(d);
                    }
                }
                Some(ContainerState::Running(_) | ContainerState::Created) => {}
                Some(ContainerState::Exited(_, exited)) => {
                    let code = exited.exit_code;
                    if policy == "Always" || (policy == "OnFailure" && code != 0) {
                        if let Next::After(d) = self.restart(pod, c, latest).await {
                            wake = wake.min(d);
                        }
                    } else {
                        done.push(code);
                    }
                }
                Some(ContainerState::Lost(_)) => {
                    if policy == "Never" {
                        done.push(255);
                    } else if let Next::After(d) = self.restart(pod, c, latest).await {
                        wake = wake.min(d);
                    }
                }
            }
        }
        // Ephemeral containers (`kubectl debug`): started once, never restarted.
        for c in ephemeral_containers(&spec) {
            if self.latest(&c.name).is_none()
                && let Next::After(d) = self.start(pod, &c, 0).await
            {
                wake = wake.min(d);
            }
        }
        self.resize(pod).await;
        if let Some(due) = self.run_probes(pod).await {
            wake = wake.min(due);
        }
        if !spec.containers.is_empty() && done.len() == spec.containers.len() {
            // The main containers are done: the sidecars stop (SIGTERM, as on deletion),
            // and the pod finishes once they have.
            let sidecars: Vec<Attempt> = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| is_sidecar(c))
                .filter_map(|c| self.latest(&c.name))
                .filter(|a| matches!(a.state, ContainerState::Running(_)))
                .collect();
            if !sidecars.is_empty() {
                for attempt in &sidecars {
                    let _ = container::signal(&attempt.dir, Signal::SIGTERM);
                }
                return Next::After(Duration::from_millis(200));
            }
            let phase = if done.iter().all(|c| *c == 0) {
                "Succeeded"
            } else {
                "Failed"
            };
            self.lifecycle = Lifecycle::Finished { phase };
            self.release_sandbox().await;
        }
        Next::After(wake)
    }

    /// In-place resize: brings each running container (and sidecar) to its spec's CPU and
    /// memory — its cgroup updated, or the container restarted where its `resizePolicy`
    /// asks — unless the pod no longer fits the node at all.
    async fn resize(&mut self, pod: &Pod) {
        let spec = pod.spec.clone().unwrap_or_default();
        let running: Vec<(Container, Attempt)> = spec
            .containers
            .iter()
            .chain(
                spec.init_containers
                    .iter()
                    .flatten()
                    .filter(|c| is_sidecar(c)),
            )
            .filter_map(|c| {
                let a = self.latest(&c.name)?;
                matches!(a.state, ContainerState::Running(_)).then(|| (c.clone(), a))
            })
            .filter(|(c, a)| {
                crate::resize::step(c, crate::resize::recorded(&a.dir).as_ref())
                    != crate::resize::Step::None
            })
            .collect();
        if running.is_empty() {
            self.resize_infeasible = None;
            return;
        }
        let node = crate::downward::Allocatable::of_host(&self.ctx.config.data_dir);
        if let Err(why) = crate::resize::feasible(pod, &node) {
            if self.resize_infeasible.as_deref() != Some(&why) {
                self.event(pod, EventType::Warning, "ResizeInfeasible", &why)
                    .await;
            }
            self.resize_infeasible = Some(why);
            return;
        }
        self.resize_infeasible = None;
        for (c, attempt) in running {
            match crate::resize::step(&c, crate::resize::recorded(&attempt.dir).as_ref()) {
                crate::resize::Step::None => {}
                crate::resize::Step::Update => {
                    let Some(path) = crate::shim::cgroups_path(&attempt.dir) else {
                        continue;
                    };
                    match crate::resize::actuate(&path, &resolve::resources(&c)) {
                        Ok(()) => {
                            let _ = crate::resize::record(&attempt.dir, c.resources.as_ref());
                            self.event(
                                pod,
                                EventType::Normal,
                                "ResizeCompleted",
                                &format!("Container {} resized", c.name),
                            )
                            .await;
                        }
                        Err(e) => {
                            self.event(
                                pod,
                                EventType::Warning,
                                "ResizeError",
                                &format!("resizing container {}: {e}", c.name),
                            )
                            .await;
                        }
                    }
                }
                crate::resize::Step::Restart => {
                    // Stopped and started again at once, with the new resources: a resize
                    // restart is not a failure, whatever the pod's restart policy.
                    let _ = container::signal(&attempt.dir, Signal::SIGKILL);
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline
                        && self
                            .latest(&c.name)
                            .is_some_and(|a| matches!(a.state, ContainerState::Running(_)))
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    self.start(pod, &c, attempt.number + 1).await;
                }
            }
        }
    }

    /// Runs the probes that are due on running containers; kills a container whose
    /// liveness (or startup) probe failed. Returns how long until the next one is due.
    async fn run_probes(&mut self, pod: &Pod) -> Option<Duration> {
        let spec = pod.spec.clone().unwrap_or_default();
        let grace =
            Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        // Main containers and sidecars are probed alike.
        let probed: Vec<Container> = spec
            .init_containers
            .iter()
            .flatten()
            .filter(|c| is_sidecar(c))
            .chain(&spec.containers)
            .cloned()
            .collect();
        let live: std::collections::HashSet<(String, u32)> = probed
            .iter()
            .filter_map(|c| {
                let a = self.latest(&c.name)?;
                matches!(a.state, ContainerState::Running(_)).then(|| (c.name.clone(), a.number))
            })
            .collect();
        self.probes
            .retain(|(name, n, _), _| live.contains(&(name.clone(), *n)));
        for c in &probed {
            let Some(attempt) = self.latest(&c.name) else {
                continue;
            };
            let ContainerState::Running(started) = &attempt.state else {
                self.killing.remove(&(c.name.clone(), attempt.number));
                continue;
            };
            let key = (c.name.clone(), attempt.number);
            if let Some(deadline) = self.killing.get(&key) {
                if now >= *deadline {
                    let _ = container::signal(&attempt.dir, Signal::SIGKILL);
                }
                next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                continue;
            }
            let started_at = instant_of(&started.started_at);
            let startup_done = match Kind::Startup.of(c) {
                Some(_) => self
                    .probes
                    .get(&(c.name.clone(), attempt.number, Kind::Startup))
                    .is_some_and(|t| t.passing),
                None => true,
            };
            for kind in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
                let Some(probe) = kind.of(c) else { continue };
                if kind == Kind::Startup && startup_done {
                    continue;
                }
                if kind != Kind::Startup && !startup_done {
                    continue;
                }
                let tkey = (c.name.clone(), attempt.number, kind);
                let tracker = self
                    .probes
                    .entry(tkey.clone())
                    .or_insert_with(|| Tracker::new(kind, probe, started_at));
                if now < tracker.due {
                    next = Some(next.map_or(tracker.due, |n| n.min(tracker.due)));
                    continue;
                }
                let target = self.hook_target(c, attempt.number);
                let outcome = probe::run(probe, c, &target).await;
                let failed = outcome.as_ref().err().cloned();
                let Some(tracker) = self.probes.get_mut(&tkey) else {
                    continue;
                };
                let flipped = tracker.record(probe, outcome, Instant::now());
                let (passing, due) = (tracker.passing, tracker.due);
                next = Some(next.map_or(due, |n| n.min(due)));
                if let Some(message) = failed {
                    self.event(
                        pod,
                        EventType::Warning,
                        "Unhealthy",
                        &format!("{} probe failed: {message}", kind.name()),
                    )
                    .await;
                }
                let fatal = matches!(kind, Kind::Liveness | Kind::Startup);
                if flipped && !passing && fatal {
                    self.event(
                        pod,
                        EventType::Normal,
                        "Killing",
                        &format!(
                            "Container {} failed {} probe, will be restarted",
                            c.name,
                            kind.name().to_lowercase()
                        ),
                    )
                    .await;
                    let deadline = Instant::now() + grace;
                    self.stop_container(Some(pod), Some(c), &attempt, deadline)
                        .await;
                    self.killing.insert(key.clone(), deadline);
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                    break;
                }
            }
        }
        next.map(|n| {
            n.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(10))
        })
    }

    /// Whether a running container counts as started (its startup probe, if any, passed)
    /// and ready (started, and its readiness probe, if any, passes).
    fn started_and_ready(&self, c: &Container, attempt: u32) -> (bool, bool) {
        let passing = |kind: Kind| match kind.of(c) {
            None => true,
            Some(_) => self
                .probes
                .get(&(c.name.clone(), attempt, kind))
                .is_some_and(|t| t.passing),
        };
        let started = passing(Kind::Startup);
        (started, started && passing(Kind::Readiness))
    }

    /// The sandbox (network namespace and address unless `hostNetwork`, `/etc` files, the
    /// service account's files), then the volumes. A failure is the event's reason
    /// (`FailedCreatePodSandBox`, `FailedMount`) and message.
    async fn prepare(&mut self, pod: &Pod) -> Result<(), (&'static str, String)> {
        self.prepare_sandbox(pod)
            .await
            .map_err(|message| ("FailedCreatePodSandBox", message))?;
        if self.volumes.is_none() {
            let mut images = BTreeMap::new();
            for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
                let Some(source) = &v.image else { continue };
                // Pulled like a container's image (policy, credentials, back-off), under a
                // name no container can have.
                let puller = Container {
                    name: format!("volume:{}", v.name),
                    image: source.reference.clone(),
                    image_pull_policy: source.pull_policy.clone(),
                    ..Container::default()
                };
                match self.ensure_image(pod, &puller).await {
                    Ok(image) => {
                        images.insert(v.name.clone(), self.ctx.images.layer_dirs(&image));
                    }
                    Err(_) => {
                        let why = self
                            .waiting
                            .get(&puller.name)
                            .map(|w| w.1.clone())
                            .unwrap_or_default();
                        return Err((
                            "FailedMount",
                            format!("MountVolume.SetUp failed for volume \"{}\" : {why}", v.name),
                        ));
                    }
                }
            }
            let addresses = self.addresses();
            let node = crate::downward::Allocatable::of_host(&self.ctx.config.data_dir);
            let inputs = volume::Inputs {
                client: &self.ctx.client,
                addresses: &addresses,
                node: &node,
            };
            let volumes = PodVolumes::set_up(&inputs, pod, &self.dir, &images)
                .await
                .map_err(|e| ("FailedMount", e.to_string()))?;
            self.volumes = Some(volumes);
        }
        Ok(())
    }

    /// Brings the pod's configMap, secret, downwardAPI and projected volumes up to date with
    /// their sources (every [`volume::REFRESH_PERIOD`]).
    async fn refresh_volumes(&mut self, pod: &Pod) {
        let addresses = self.addresses();
        let node = crate::downward::Allocatable::of_host(&self.ctx.config.data_dir);
        let Some(volumes) = self.volumes.as_mut() else {
            return;
        };
        let inputs = volume::Inputs {
            client: &self.ctx.client,
            addresses: &addresses,
            node: &node,
        };
        let (changed, errors) = volumes.refresh(&inputs, pod).await;
        if !changed.is_empty()
            || !errors.is_empty()
            || self.evicted_at.elapsed() > volume::REFRESH_PERIOD
        {
            self.evicted_at = Instant::now();
            if let Some(message) = volumes.over_limit(pod) {
                self.evict(pod, message).await;
                return;
            }
        }
        if !changed.is_empty() {
            tracing::debug!(pod = %pod.name_any(), volumes = ?changed, "volumes updated");
        }
        for e in errors {
            self.event(pod, EventType::Warning, "FailedMount", &e.to_string())
                .await;
        }
    }

    /// Evicts the pod, as the kubelet's eviction manager does: every container killed, the
    /// pod `Failed` with reason `Evicted` and `message`.
    async fn evict(&mut self, pod: &Pod, message: String) {
        for (_, attempt) in self.all_latest() {
            if matches!(attempt.state, ContainerState::Running(_)) {
                let _ = container::signal(&attempt.dir, Signal::SIGKILL);
            }
        }
        self.event(pod, EventType::Warning, "Evicted", &message)
            .await;
        self.failure = Some(("Evicted", message));
        self.lifecycle = Lifecycle::Finished { phase: "Failed" };
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.release_sandbox().await;
    }

    /// The pod's IPC namespace file (`None` for `hostIPC` pods, which use the node's).
    fn ipc_namespace(&self, pod: &Pod) -> Option<PathBuf> {
        let host = pod.spec.as_ref().and_then(|s| s.host_ipc).unwrap_or(false);
        (!host).then(|| self.dir.join("ipc"))
    }

    /// The addresses the downward API reports.
    fn addresses(&self) -> crate::downward::Addresses {
        crate::downward::Addresses {
            pod_ip: self.pod_ip(),
            host_ip: self.ctx.config.node_ip.clone(),
        }
    }

    async fn prepare_sandbox(&mut self, pod: &Pod) -> Result<(), String> {
        crate::resolve::runtime_handler(&self.ctx.client, pod).await?;
        fs::create_dir_all(self.dir.join("etc")).map_err(|e| e.to_string())?;
        // One IPC namespace for all the pod's containers (System V IPC and POSIX message
        // queues between them), kept as a bind-mounted nsfs file as `ip netns` keeps
        // network namespaces; `hostIPC` pods use the node's.
        if let Some(ipc) = self.ipc_namespace(pod)
            && !container::is_mountpoint(&ipc)
        {
            fs::write(&ipc, b"").map_err(|e| format!("creating {}: {e}", ipc.display()))?;
            let made = tokio::process::Command::new("unshare")
                .arg(format!("--ipc={}", ipc.display()))
                .arg("true")
                .output()
                .await
                .map_err(|e| format!("unshare: {e}"))?;
            if !made.status.success() {
                return Err(format!(
                    "creating the pod's IPC namespace: {}",
                    String::from_utf8_lossy(&made.stderr).trim()
                ));
            }
        }
        let host_network = pod
            .spec
            .as_ref()
            .and_then(|s| s.host_network)
            .unwrap_or(false);
        if !host_network && self.network.is_none() {
            self.ctx
                .ensure_node_network()
                .await
                .map_err(|e| format!("setting up the node network: {e}"))?;
            let network = self
                .ctx
                .network
                .setup_pod(&self.uid)
                .await
                .map_err(|e| format!("setting up the pod network: {e}"))?;
            self.network = Some(network);
        }
        let domain = crate::agent::CLUSTER_DOMAIN;
        let hostname = crate::hosts::kernel_hostname(pod, domain);
        let node_hosts = host_network.then(|| fs::read_to_string("/etc/hosts").unwrap_or_default());
        let hosts = crate::hosts::hosts_file(pod, &[self.pod_ip()], domain, node_hosts.as_deref());
        fs::write(self.dir.join("etc/hosts"), hosts).map_err(|e| e.to_string())?;
        fs::write(self.dir.join("etc/hostname"), format!("{hostname}\n"))
            .map_err(|e| e.to_string())?;
        fs::write(self.dir.join("etc/resolv.conf"), self.resolv_conf(pod))
            .map_err(|e| e.to_string())?;
        if self.service_account.is_none()
            && !crate::serviceaccount::mounted_by_volume(pod)
            && crate::serviceaccount::automount(&self.ctx.client, pod).await?
        {
            self.service_account = Some(
                crate::serviceaccount::project(
                    &self.ctx.client,
                    pod,
                    &self.dir.join("serviceaccount"),
                    self.ctx.config.cluster_ca.as_deref(),
                )
                .await?,
            );
        }
        Ok(())
    }

    /// Replaces the service account token once 80 % of its lifetime has passed (a failure
    /// is retried at the next sync; the old token is still valid meanwhile).
    async fn refresh_token(&mut self, pod: &Pod) {
        let Some(projected) = &self.service_account else {
            return;
        };
        if Instant::now() < projected.due {
            return;
        }
        let dir = projected.dir.clone();
        match crate::serviceaccount::project(
            &self.ctx.client,
            pod,
            &dir,
            self.ctx.config.cluster_ca.as_deref(),
        )
        .await
        {
            Ok(projected) => self.service_account = Some(projected),
            Err(e) => {
                tracing::warn!(pod = %pod.name_any(), error = %e, "refreshing the service account token")
            }
        }
    }

    /// The pod's `/etc/resolv.conf`, by its `dnsPolicy` as the kubelet writes it:
    /// `ClusterFirst` (the default; `ClusterFirstWithHostNet` for host-network pods) points
    /// at the node's cluster DNS with the namespace's search path; `Default`, or a node
    /// without cluster DNS, copies the host's; `None` has only the pod's `dnsConfig`, which
    /// otherwise adds its nameservers, searches and options.
    fn resolv_conf(&self, pod: &Pod) -> String {
        let spec = pod.spec.as_ref();
        let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
        let policy = spec
            .and_then(|s| s.dns_policy.as_deref())
            .unwrap_or("ClusterFirst");
        let cluster = self.ctx.config.kube_proxy
            && match policy {
                "ClusterFirst" => !host_network,
                "ClusterFirstWithHostNet" => true,
                _ => false,
            };
        let (mut nameservers, mut searches, mut options) = (Vec::new(), Vec::new(), Vec::new());
        if cluster {
            let domain = crate::agent::CLUSTER_DOMAIN;
            let ns = pod.namespace().unwrap_or_default();
            nameservers.push(self.ctx.network.cidr.gateway().to_string());
            searches.extend([
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_owned(),
            ]);
            options.push("ndots:5".to_owned());
        } else if policy != "None" {
            let host = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            for line in host.lines() {
                let mut words = line.split_whitespace();
                match words.next() {
                    Some("nameserver") => nameservers.extend(words.map(str::to_owned)),
                    Some("search" | "domain") => searches.extend(words.map(str::to_owned)),
                    Some("options") => options.extend(words.map(str::to_owned)),
                    _ => {}
                }
            }
        }
        if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
            nameservers.extend(config.nameservers.iter().flatten().cloned());
            searches.extend(config.searches.iter().flatten().cloned());
            for option in config.options.iter().flatten() {
                let Some(name) = option.name.as_deref() else {
                    continue;
                };
                options.retain(|o| o.split(':').next() != Some(name));
                options.push(match &option.value {
                    Some(value) => format!("{name}:{value}"),
                    None => name.to_owned(),
                });
            }
        }
        let mut out = String::new();
        if !searches.is_empty() {
            out.push_str(&format!("search {}\n", searches.join(" ")));
        }
        for server in nameservers.iter().take(3) {
            out.push_str(&format!("nameserver {server}\n"));
        }
        if !options.is_empty() {
            out.push_str(&format!("options {}\n", options.join(" ")));
        }
        out
    }

    fn pod_ip(&self) -> String {
        match &self.network {
            Some(n) => n.ip.to_string(),
            None => self.ctx.config.node_ip.clone(),
        }
    }

    /// Restarts an exited container unless it is backing off.
    async fn restart(&mut self, pod: &Pod, c: &Container, latest: Option<Attempt>) -> Next {
        let now = Instant::now();
        let ran = latest.as_ref().and_then(|a| match &a.state {
            ContainerState::Exited(started, exited) => run_time(started, exited),
            _ => None,
        });
        if ran.is_some_and(|r| r >= BACKOFF_RESET) {
            self.restart_backoff.remove(&c.name);
        }
        match self.restart_backoff.get(&c.name).copied() {
            Some(b) if now < b.last + b.delay => {
                let message = format!(
                    "back-off {}s restarting failed container={} pod={}_{}({})",
                    b.delay.as_secs(),
                    c.name,
                    pod.name_any(),
                    pod.namespace().unwrap_or_default(),
                    self.uid
                );
                if self.waiting.get(&c.name).map(|w| w.0.as_str()) != Some("CrashLoopBackOff") {
                    self.event(pod, EventType::Warning, "BackOff", &message)
                        .await;
                }
                self.waiting
                    .insert(c.name.clone(), ("CrashLoopBackOff".into(), message));
                Next::After(b.last + b.delay - now)
            }
            previous => {
                let delay = previous.map_or(BACKOFF_BASE, |b| (b.delay * 2).min(BACKOFF_MAX));
                self.restart_backoff
                    .insert(c.name.clone(), Backoff { delay, last: now });
                let attempt = latest.map_or(0, |a| a.number + 1);
                self.start(pod, c, attempt).await
            }
        }
    }

    /// Pulls the image if needed, resolves the container's configuration, and starts
    /// attempt number `attempt`.
    async fn start(&mut self, pod: &Pod, c: &Container, attempt: u32) -> Next {
        let image = match self.ensure_image(pod, c).await {
            Ok(image) => image,
            Err(next) => return next,
        };
        let attempt_dir = self
            .dir
            .join("containers")
            .join(&c.name)
            .join(attempt.to_string());
        let id = container_id(&self.uid, &c.name, attempt);
        let config = match self.container_config(pod, c, &image, &attempt_dir).await {
            Ok(config) => config,
            Err(e) => {
                let _ = container::remove_container_dir(&attempt_dir);
                self.event(pod, EventType::Warning, "Failed", &format!("Error: {e}"))
                    .await;
                self.waiting
                    .insert(c.name.clone(), ("CreateContainerConfigError".into(), e.0));
                return Next::After(Duration::from_secs(2));
            }
        };
        if let Err(e) = crate::resize::record(&attempt_dir, c.resources.as_ref()) {
            tracing::warn!(container = %c.name, error = %e, "recording the container's resources");
        }
        let spec = config.oci_spec(&attempt_dir.join("rootfs"));
        let log = self.log_path(&c.name, attempt);
        let ctx = Arc::clone(&self.ctx);
        let op = Instant::now();
        let stdin = match (c.stdin, c.stdin_once) {
            (Some(true), Some(true)) => StdinMode::Once,
            (Some(true), _) => StdinMode::Open,
            _ => StdinMode::Null,
        };
        let started = ctx
            .runtime
            .start(&id, &attempt_dir, &spec, &log, stdin, c.tty == Some(true))
            .await;
        ctx.metrics
            .runtime_operation("start_container", op.elapsed(), started.is_err());
        match started {
            Ok(_) => {
                self.waiting.remove(&c.name);
                self.event(
                    pod,
                    EventType::Normal,
                    "Started",
                    &format!("Started container {}", c.name),
                )
                .await;
                self.prune_attempts(&c.name, attempt);
                self.post_start(pod, c, attempt, &attempt_dir).await;
                Next::After(self.ctx.config.sync_period)
            }
            Err(message) => {
                let _ = container::remove_container_dir(&attempt_dir);
                self.event(
                    pod,
                    EventType::Warning,
                    "Failed",
                    &format!("Error: {message}"),
                )
                .await;
                self.waiting
                    .insert(c.name.clone(), ("CreateContainerError".into(), message));
                Next::After(Duration::from_secs(2))
            }
        }
    }

    /// Runs `c`'s `postStart` hook, if it has one, on the attempt just started; a hook that
    /// fails kills the container (it restarts as the pod's policy says).
    async fn post_start(&mut self, pod: &Pod, c: &Container, attempt: u32, dir: &Path) {
        let Some(handler) = Hook::PostStart.of(c) else {
            return;
        };
        let target = self.hook_target(c, attempt);
        if let Err(message) = hook::run(handler, c, &target, hook::POST_START_LIMIT).await {
            self.event(
                pod,
                EventType::Warning,
                Hook::PostStart.failed_reason(),
                &format!("PostStartHook failed: {message}"),
            )
            .await;
            let grace = pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0) as u64;
            let _ = container::signal(dir, Signal::SIGTERM);
            self.killing.insert(
                (c.name.clone(), attempt),
                Instant::now() + Duration::from_secs(grace),
            );
        }
    }

    /// For an ephemeral container with a `targetContainerName` (`kubectl debug --target`),
    /// the running target's PID namespace, which it joins to see the target's processes.
    fn target_pid_namespace(&self, pod: &Pod, name: &str) -> Option<PathBuf> {
        let target = pod
            .spec
            .as_ref()?
            .ephemeral_containers
            .iter()
            .flatten()
            .find(|e| e.name == name)?
            .target_container_name
            .clone()?;
        match self.latest(&target)?.state {
            ContainerState::Running(started) => {
                Some(PathBuf::from(format!("/proc/{}/ns/pid", started.pid)))
            }
            _ => None,
        }
    }

    /// Where `c`'s hooks (and probes) reach it.
    fn hook_target(&self, c: &Container, attempt: u32) -> probe::Target {
        probe::Target {
            pod_ip: self.pod_ip(),
            shim_exec: self.ctx.shim_exec(),
            state_root: self.ctx.runtime.state_root.clone(),
            container_id: container_id(&self.uid, &c.name, attempt),
        }
    }

    /// Stops a running container: its `preStop` hook first (within `deadline`), then
    /// SIGTERM. The hook runs in the background so the pod's other containers stop at the
    /// same time; SIGKILL at the deadline is the caller's.
    async fn stop_container(
        &self,
        pod: Option<&Pod>,
        c: Option<&Container>,
        attempt: &Attempt,
        deadline: Instant,
    ) {
        let handler = c.and_then(|c| Hook::PreStop.of(c).map(|h| (c, h)));
        let Some((c, handler)) = handler else {
            let _ = container::signal(&attempt.dir, Signal::SIGTERM);
            return;
        };
        let target = self.hook_target(c, attempt.number);
        let (c, handler) = (c.clone(), handler.clone());
        let dir = attempt.dir.clone();
        let events = pod.map(|p| (self.ctx.clone(), p.clone()));
        tokio::spawn(async move {
            let limit = deadline.saturating_duration_since(Instant::now());
            if let Err(message) = hook::run(&handler, &c, &target, limit).await {
                tracing::info!(container = %c.name, %message, "preStop hook failed");
                if let Some((ctx, pod)) = events {
                    ctx.events
                        .publish(
                            &pod,
                            EventType::Warning,
                            Hook::PreStop.failed_reason(),
                            &format!("PreStopHook failed: {message}"),
                        )
                        .await;
                }
            }
            let _ = container::signal(&dir, Signal::SIGTERM);
        });
    }

    /// The image for `c` as its pull policy says, or the back-off to wait.
    async fn ensure_image(&mut self, pod: &Pod, c: &Container) -> Result<Image, Next> {
        let reference = c.image.clone().unwrap_or_default();
        let policy = c.image_pull_policy.clone().unwrap_or_else(|| {
            let tag_latest = !reference.contains(':') || reference.ends_with(":latest");
            if tag_latest && !reference.contains('@') {
                "Always".into()
            } else {
                "IfNotPresent".into()
            }
        });
        let present = match self.ctx.images.get(&reference) {
            Ok(present) => present,
            Err(e) => {
                let reason = match e {
                    ImageError::InvalidName { .. } => "InvalidImageName",
                    _ => "ErrImagePull",
                };
                self.waiting
                    .insert(c.name.clone(), (reason.into(), e.to_string()));
                return Err(Next::After(Duration::from_secs(10)));
            }
        };
        match (policy.as_str(), present) {
            ("Never", Some(image)) | ("IfNotPresent", Some(image)) => return Ok(image),
            ("Never", None) => {
                let message = format!(
                    "Container image \"{reference}\" is not present with pull policy of Never"
                );
                self.waiting
                    .insert(c.name.clone(), ("ErrImageNeverPull".into(), message));
                return Err(Next::After(Duration::from_secs(10)));
            }
            _ => {}
        }
        let now = Instant::now();
        if let Some(b) = self.pull_backoff.get(&c.name).copied()
            && now < b.last + b.delay
        {
            let message = format!("Back-off pulling image \"{reference}\"");
            if self.waiting.get(&c.name).map(|w| w.0.as_str()) != Some("ImagePullBackOff") {
                self.event(pod, EventType::Normal, "BackOff", &message)
                    .await;
            }
            self.waiting
                .insert(c.name.clone(), ("ImagePullBackOff".into(), message));
            return Err(Next::After(b.last + b.delay - now));
        }
        self.event(
            pod,
            EventType::Normal,
            "Pulling",
            &format!("Pulling image \"{reference}\""),
        )
        .await;
        let auth = self.registry_auth(pod, &reference).await;
        let begun = Instant::now();
        let name = reference.clone();
        let progress = move |p| tracing::debug!(image = %name, progress = ?p, "pulling");
        let pull = self.ctx.images.pull(&reference, &auth, &progress);
        let pulled = match self.updates.clone() {
            Some(mut updates) => tokio::select! {
                pulled = pull => pulled,
                () = deleted(&mut updates) => {
                    // Sync again at once: the pod is terminated, nothing was started.
                    return Err(Next::After(Duration::ZERO));
                }
            },
            None => pull.await,
        };
        self.ctx
            .metrics
            .image_pull(begun.elapsed(), pulled.is_err());
        match pulled {
            Ok(image) => {
                self.pull_backoff.remove(&c.name);
                self.event(
                    pod,
                    EventType::Normal,
                    "Pulled",
                    &format!(
                        "Successfully pulled image \"{reference}\" in {:.3}s",
                        begun.elapsed().as_secs_f64()
                    ),
                )
                .await;
                Ok(image)
            }
            Err(e) => {
                let delay = self
                    .pull_backoff
                    .get(&c.name)
                    .map_or(BACKOFF_BASE, |b| (b.delay * 2).min(BACKOFF_MAX));
                self.pull_backoff
                    .insert(c.name.clone(), Backoff { delay, last: now });
                let message = format!("Failed to pull image \"{reference}\": {e}");
                self.event(pod, EventType::Warning, "Failed", &message)
                    .await;
                let reason = match e {
                    ImageError::InvalidName { .. } => "InvalidImageName",
                    _ => "ErrImagePull",
                };
                self.waiting
                    .insert(c.name.clone(), (reason.into(), message));
                Err(Next::After(delay))
            }
        }
    }

    /// Credentials for `reference` from the pod's `imagePullSecrets`
    /// (`kubernetes.io/dockerconfigjson` or `dockercfg`).
    async fn registry_auth(&self, pod: &Pod, reference: &str) -> oci_client::secrets::RegistryAuth {
        use oci_client::secrets::RegistryAuth;
        let registry = crate::image::ImageStore::normalize(reference)
            .ok()
            .and_then(|r| r.split('/').next().map(str::to_owned))
            .unwrap_or_default();
        let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(
            self.ctx.client.clone(),
            &pod.namespace().unwrap_or_default(),
        );
        for s in pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.as_ref())
            .into_iter()
            .flatten()
        {
            let Ok(Some(secret)) = secrets.get_opt(&s.name).await else {
                continue;
            };
            let data = secret.data.unwrap_or_default();
            let Some(json) = data
                .get(".dockerconfigjson")
                .or_else(|| data.get(".dockercfg"))
            else {
                continue;
            };
            if let Some((user, pass)) = crate::auth::credentials(&json.0, &registry) {
                return RegistryAuth::Basic(user, pass);
            }
        }
        RegistryAuth::Anonymous
    }

    /// Resolves the container's configuration and mounts its root filesystem.
    async fn container_config(
        &mut self,
        pod: &Pod,
        c: &Container,
        image: &Image,
        attempt_dir: &Path,
    ) -> Result<ContainerConfig, ConfigError> {
        let sources = Sources::new(
            self.ctx.client.clone(),
            &pod.namespace().unwrap_or_default(),
        );
        let addresses = self.addresses();
        let node = crate::downward::Allocatable::of_host(&self.ctx.config.data_dir);
        let volumes = self
            .volumes
            .as_ref()
            .map(|v| v.paths().clone())
            .unwrap_or_default();
        let seccomp = resolve::seccomp(pod, c, &self.ctx.config.data_dir.join("seccomp"))?;
        let env = resolve::env(
            &sources,
            pod,
            c,
            &image.config,
            &crate::links::pod_env(&self.ctx.client, pod).await,
            &addresses,
            &node,
        )
        .await?;
        let args = resolve::process_args(c, &image.config, &env)?;
        let mut mounts = volume::mounts(c, &volumes, &env)?;
        let _ = container::remove_container_dir(attempt_dir);
        if let Some(path) = crate::termination::path_in_container(c) {
            let _ = fs::create_dir_all(attempt_dir);
            let file = crate::termination::create(attempt_dir)
                .map_err(|e| ConfigError(format!("creating the termination message file: {e}")))?;
            mounts.push(container::BindMount {
                source: file,
                destination: path,
                read_only: false,
            });
        }
        let layers = self.ctx.images.layer_dirs(image);
        let rootfs = container::mount_rootfs(&layers, attempt_dir)
            .map_err(|e| ConfigError(format!("mounting the root filesystem: {e}")))?;
        let (uid, gid, groups) = resolve::user(pod, c, &image.config, &rootfs)?;
        let spec = pod.spec.clone().unwrap_or_default();
        let host_network = spec.host_network.unwrap_or(false);
        for (file, dest) in [("hosts", "/etc/hosts"), ("resolv.conf", "/etc/resolv.conf")] {
            if !mounts.iter().any(|m| m.destination == dest) {
                mounts.push(container::BindMount {
                    source: self.dir.join("etc").join(file),
                    destination: dest.into(),
                    read_only: false,
                });
            }
        }
        if let Some(projected) = &self.service_account
            && !mounts
                .iter()
                .any(|m| m.destination == crate::serviceaccount::MOUNT_PATH)
        {
            mounts.push(container::BindMount {
                source: projected.dir.clone(),
                destination: crate::serviceaccount::MOUNT_PATH.into(),
                read_only: true,
            });
        }
        if !host_network {
            mounts.push(container::BindMount {
                source: self.dir.join("etc/hostname"),
                destination: "/etc/hostname".into(),
                read_only: false,
            });
        }
        let sc = c.security_context.as_ref();
        let caps = sc.and_then(|s| s.capabilities.as_ref());
        Ok(ContainerConfig {
            args,
            env: env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                // What terminal programs expect, as container runtimes set it for a TTY
                // (unless the image or the pod set it).
                .chain(
                    (c.tty == Some(true) && !env.iter().any(|(k, _)| k == "TERM"))
                        .then(|| "TERM=xterm".to_owned()),
                )
                .collect(),
            cwd: c
                .working_dir
                .clone()
                .filter(|w| !w.is_empty())
                .unwrap_or_else(|| image.config.working_dir.clone()),
            uid,
            gid,
            additional_gids: groups,
            hostname: crate::hosts::kernel_hostname(pod, crate::agent::CLUSTER_DOMAIN),
            netns: self.network.as_ref().map(|n| n.netns.clone()),
            mounts,
            cgroups_path: format!(
                "/orquestra/pod{}/{}",
                self.uid,
                container_id(&self.uid, &c.name, attempt_number(attempt_dir))
            ),
            resources: resolve::resources(c),
            privileged: sc.and_then(|s| s.privileged).unwrap_or(false),
            cap_add: caps.and_then(|c| c.add.clone()).unwrap_or_default(),
            cap_drop: caps.and_then(|c| c.drop.clone()).unwrap_or_default(),
            read_only_rootfs: sc
                .and_then(|s| s.read_only_root_filesystem)
                .unwrap_or(false),
            tty: c.tty == Some(true),
            pid_namespace: self.target_pid_namespace(pod, &c.name),
            seccomp,
            no_new_privileges: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
            sysctls: resolve::sysctls(pod)?,
            apparmor_profile: resolve::apparmor(pod, c, resolve::host_has_apparmor())?,
            ipc_namespace: self.ipc_namespace(pod),
            host_ipc: spec.host_ipc.unwrap_or(false),
        })
    }

    /// Stops every container (SIGTERM, SIGKILL after `grace`), releases the sandbox and
    /// the pod's directory, and sends the final delete (grace 0) if the pod still exists.
    async fn terminate(&mut self, pod: Option<&Pod>, grace: Duration) -> Next {
        let deadline = match self.lifecycle {
            Lifecycle::Terminating { deadline } => deadline,
            _ => {
                let deadline = Instant::now() + grace;
                self.lifecycle = Lifecycle::Terminating { deadline };
                let spec = pod.and_then(|p| p.spec.clone()).unwrap_or_default();
                for (name, attempt) in self.all_latest() {
                    if let ContainerState::Running(_) = attempt.state {
                        if let Some(pod) = pod {
                            self.event(
                                pod,
                                EventType::Normal,
                                "Killing",
                                &format!("Stopping container {name}"),
                            )
                            .await;
                        }
                        let c = spec.containers.iter().find(|c| c.name == name);
                        self.stop_container(pod, c, &attempt, deadline).await;
                    }
                }
                deadline
            }
        };
        let running: Vec<Attempt> = self
            .all_latest()
            .into_iter()
            .map(|(_, a)| a)
            .filter(|a| matches!(a.state, ContainerState::Running(_)))
            .collect();
        if !running.is_empty() {
            if Instant::now() >= deadline {
                for attempt in &running {
                    let _ = container::signal(&attempt.dir, Signal::SIGKILL);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            return Next::After(left.clamp(Duration::from_millis(50), Duration::from_millis(200)));
        }
        // A deleted pod ends in a terminal phase before it goes (as the kubelet's status
        // manager does since 1.27): `Succeeded` if every container exited 0, else `Failed`.
        // Whoever holds a finalizer on it (a Job tracking its pods) reads how it ended.
        if let Some(pod) = pod
            && !matches!(self.lifecycle, Lifecycle::Finished { .. })
        {
            let spec = pod.spec.clone().unwrap_or_default();
            let succeeded = !spec.containers.is_empty()
                && spec.containers.iter().all(|c| {
                    matches!(self.latest(&c.name).map(|a| a.state),
                        Some(ContainerState::Exited(_, exited)) if exited.exit_code == 0)
                });
            let terminating = std::mem::replace(
                &mut self.lifecycle,
                Lifecycle::Finished {
                    phase: if succeeded { "Succeeded" } else { "Failed" },
                },
            );
            self.report(pod).await;
            self.lifecycle = terminating;
        }
        self.release_sandbox().await;
        self.ctx.network.teardown_pod(&self.uid).await.ok();
        remove_pod_cgroups(&self.uid);
        if let Err(e) = remove_pod_dir(&self.dir) {
            tracing::warn!(uid = %self.uid, error = %e, "removing the pod's directory");
        }
        if let Some(pod) = pod {
            let api: Api<Pod> = Api::namespaced(
                self.ctx.client.clone(),
                &pod.namespace().unwrap_or_default(),
            );
            let params = DeleteParams {
                grace_period_seconds: Some(0),
                preconditions: Some(Preconditions {
                    uid: Some(self.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match api.delete(&pod.name_any(), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(pod = %pod.name_any(), error = %e, "final delete failed; retrying");
                    return Next::After(Duration::from_secs(1));
                }
            }
        }
        Next::Done
    }

    /// Unmounts the containers' root filesystems and frees the network once nothing runs.
    async fn release_sandbox(&mut self) {
        for (_, attempt) in self.all_attempts() {
            let _ = nix::mount::umount2(
                &attempt.dir.join("rootfs"),
                nix::mount::MntFlags::MNT_DETACH,
            );
        }
        if self.network.take().is_some() || self.dir.exists() {
            if let Err(e) = self.ctx.network.teardown_pod(&self.uid).await {
                tracing::warn!(uid = %self.uid, error = %e, "tearing down the pod network");
            }
        }
    }

    /// Patches the pod's status when it differs from the last one sent.
    async fn report(&mut self, pod: &Pod) {
        let status = self.status(pod);
        if self.last_status.as_ref() == Some(&status) {
            return;
        }
        // Skip a patch that would change nothing on the server either (after a restart).
        let current = pod
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null);
        if self.last_status.is_none() && same_status(&current, &status) {
            self.last_status = Some(status);
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.ctx.client.clone(),
            &pod.namespace().unwrap_or_default(),
        );
        let params = PatchParams {
            field_manager: Some(crate::node::MANAGER.into()),
            ..PatchParams::default()
        };
        match api
            .patch_status(
                &pod.name_any(),
                &params,
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => {
                if status["phase"] == "Running" && !self.reported_running {
                    self.reported_running = true;
                    self.ctx.metrics.pod_started(self.created.elapsed());
                }
                self.last_status = Some(status);
            }
            Err(e) => tracing::warn!(pod = %pod.name_any(), error = %e, "status patch failed"),
        }
    }

    /// The status this node reports for the pod.
    fn status(&self, pod: &Pod) -> Value {
        let spec = pod.spec.clone().unwrap_or_default();
        let transition = |type_: &str, ok: bool| {
            let previous = pod
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == type_));
            let status = if ok { "True" } else { "False" };
            let time = match previous {
                Some(p) if p.status == status => p
                    .last_transition_time
                    .as_ref()
                    .map(|t| t.0.to_string())
                    .unwrap_or_else(now_rfc3339),
                _ => now_rfc3339(),
            };
            json!({"type": type_, "status": status, "lastProbeTime": null, "lastTransitionTime": time})
        };
        let init_statuses: Vec<Value> = spec
            .init_containers
            .iter()
            .flatten()
            .map(|c| self.container_status(c, "PodInitializing", true))
            .collect();
        let initializing = matches!(
            self.lifecycle,
            Lifecycle::Preparing | Lifecycle::Initializing
        );
        let statuses: Vec<Value> = spec
            .containers
            .iter()
            .map(|c| {
                // The kubelet's default waiting reason: PodInitializing for every pod with
                // init containers (also once one failed and the pod is over), else
                // ContainerCreating.
                let reason = if init_statuses.is_empty() {
                    "ContainerCreating"
                } else {
                    "PodInitializing"
                };
                self.container_status(c, reason, false)
            })
            .collect();
        let all_ready = statuses.iter().all(|s| s["ready"] == true);
        // Initialized once past initializing with every (non-sidecar) init container done
        // successfully: a pod that failed in an init container never was.
        let initialized = !initializing
            && spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| !is_sidecar(c))
                .all(|c| {
                    init_statuses.iter().any(|s| {
                        s["name"] == c.name.as_str() && s["state"]["terminated"]["exitCode"] == 0
                    })
                });
        let phase = match &self.lifecycle {
            Lifecycle::Finished { phase } => *phase,
            Lifecycle::Preparing | Lifecycle::Initializing => "Pending",
            // Running once every container has been started at least once.
            _ if spec.containers.iter().all(|c| {
                self.latest(&c.name)
                    .is_some_and(|a| !matches!(a.state, ContainerState::Created))
            }) =>
            {
                "Running"
            }
            _ => "Pending",
        };
        let generation = pod.metadata.generation.unwrap_or(1);
        let mut conditions = vec![
            transition(
                "PodReadyToStartContainers",
                self.network.is_some() || spec.host_network == Some(true),
            ),
            transition("Initialized", initialized),
            transition("Ready", all_ready && phase == "Running"),
            transition("ContainersReady", all_ready && phase == "Running"),
            transition("PodScheduled", true),
        ];
        // The kubelet's reasons for a condition that is not (yet) true.
        let names_where = |list: &[Value], pick: &dyn Fn(&Value) -> bool| {
            list.iter()
                .filter(|s| pick(s))
                .filter_map(|s| s["name"].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let incomplete = names_where(&init_statuses, &|s| {
            s["state"]["terminated"]["exitCode"] != 0
                && !(s["started"] == true && s["ready"] == true)
        });
        let unready = names_where(&statuses, &|s| s["ready"] != true);
        for condition in &mut conditions {
            if condition["status"] != "False" {
                continue;
            }
            let (reason, message) = match condition["type"].as_str() {
                Some("Initialized") => (
                    "ContainersNotInitialized",
                    format!("containers with incomplete status: [{incomplete}]"),
                ),
                Some("Ready" | "ContainersReady") if matches!(phase, "Succeeded" | "Failed") => {
                    ("PodCompleted", String::new())
                }
                Some("Ready" | "ContainersReady") => (
                    "ContainersNotReady",
                    format!("containers with unready status: [{unready}]"),
                ),
                _ => continue,
            };
            condition["reason"] = json!(reason);
            if !message.is_empty() {
                condition["message"] = json!(message);
            }
        }
        if let Some(why) = &self.resize_infeasible {
            let mut pending = transition("PodResizePending", true);
            pending["reason"] = json!("Infeasible");
            pending["message"] = json!(why);
            conditions.push(pending);
        }
        for condition in &mut conditions {
            condition["observedGeneration"] = json!(generation);
        }
        // Conditions others own stay as they are (the eviction API's and the taint
        // manager's `DisruptionTarget`, readiness gates'): the status patch replaces the
        // list, and the kubelet keeps what it does not manage.
        const OWN: &[&str] = &[
            "PodReadyToStartContainers",
            "Initialized",
            "Ready",
            "ContainersReady",
            "PodScheduled",
            "PodResizePending",
            "PodResizeInProgress",
        ];
        for foreign in pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .filter(|c| !OWN.contains(&c.type_.as_str()))
        {
            if let Ok(value) = serde_json::to_value(foreign) {
                conditions.push(value);
            }
        }
        let ip = self.pod_ip();
        let mut status = json!({
            "observedGeneration": generation,
            "phase": phase,
            "conditions": conditions,
            "hostIP": self.ctx.config.node_ip,
            "hostIPs": [{"ip": self.ctx.config.node_ip}],
            "startTime": self.start_time,
            "containerStatuses": statuses,
            // Set by the API server at creation, and never changed.
            "qosClass": pod
                .status
                .as_ref()
                .and_then(|s| s.qos_class.clone())
                .unwrap_or_else(|| {
                    let all: Vec<Container> = spec
                        .init_containers
                        .iter()
                        .flatten()
                        .chain(&spec.containers)
                        .cloned()
                        .collect();
                    qos_class(&all).to_owned()
                }),
        });
        if !init_statuses.is_empty() {
            status["initContainerStatuses"] = Value::Array(init_statuses);
        }
        let ephemeral: Vec<Value> = ephemeral_containers(&spec)
            .iter()
            .map(|c| self.container_status(c, "ContainerCreating", false))
            .collect();
        if !ephemeral.is_empty() {
            status["ephemeralContainerStatuses"] = Value::Array(ephemeral);
        }
        if self.network.is_some() || spec.host_network == Some(true) {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        if let Some((reason, message)) = &self.failure {
            status["reason"] = json!(reason);
            status["message"] = json!(message);
        }
        whole_seconds(&mut status);
        status
    }

    fn container_status(&self, c: &Container, default_reason: &str, init: bool) -> Value {
        let latest = self.latest(&c.name);
        let previous = latest
            .as_ref()
            .filter(|a| a.number > 0)
            .and_then(|a| self.attempt(&c.name, a.number - 1));
        let image = c.image.clone().unwrap_or_default();
        let image_id = self
            .ctx
            .images
            .get(&image)
            .ok()
            .flatten()
            .map(|i| i.image_id())
            .unwrap_or_default();
        let terminated = |a: &Attempt| match &a.state {
            ContainerState::Exited(started, exited) => {
                let mut t =
                    terminated_json(started, exited, &container_id(&self.uid, &c.name, a.number));
                let log = self.log_path(&c.name, a.number);
                let message = crate::termination::message(c, &a.dir, &log, exited.exit_code);
                if !message.is_empty() {
                    t["message"] = json!(message);
                }
                Some(t)
            }
            ContainerState::Lost(started) => Some(json!({
                "exitCode": 137, "reason": "ContainerStatusUnknown",
                "message": "The container could not be located when the pod was terminated",
                "startedAt": started.started_at,
                "containerID": format!("libcontainer://{}", container_id(&self.uid, &c.name, a.number)),
            })),
            _ => None,
        };
        let waiting = self.waiting.get(&c.name);
        let (state, last, ready, started) = match latest.as_ref().map(|a| (&a.state, a)) {
            Some((ContainerState::Running(s), a)) => {
                let (started, ready) = self.started_and_ready(c, a.number);
                (
                    json!({"running": {"startedAt": s.started_at}}),
                    previous.as_ref().and_then(terminated),
                    ready && (!init || is_sidecar(c)),
                    started,
                )
            }
            Some((_, a)) if waiting.is_some() => {
                let (reason, message) = waiting.cloned().unwrap_or_default();
                (
                    json!({"waiting": {"reason": reason, "message": message}}),
                    terminated(a),
                    false,
                    false,
                )
            }
            Some((ContainerState::Exited(_, exited), a)) => (
                json!({"terminated": terminated(a)}),
                previous.as_ref().and_then(terminated),
                // A completed init container is ready (it did its job), as the kubelet says.
                init && !is_sidecar(c) && exited.exit_code == 0,
                false,
            ),
            Some((ContainerState::Lost(_), a)) => (
                json!({"terminated": terminated(a)}),
                previous.as_ref().and_then(terminated),
                false,
                false,
            ),
            _ => {
                let (reason, message) = waiting
                    .cloned()
                    .unwrap_or_else(|| (default_reason.to_owned(), String::new()));
                let mut w = json!({"reason": reason});
                if !message.is_empty() {
                    w["message"] = json!(message);
                }
                (json!({"waiting": w}), None, false, false)
            }
        };
        let mut status = json!({
            "name": c.name,
            "image": image,
            "imageID": image_id,
            "ready": ready,
            "started": started,
            "restartCount": latest.as_ref().map_or(0, |a| a.number),
            "state": state,
            "lastState": last.map(|t| json!({"terminated": t})).unwrap_or(json!({})),
        });
        // The resources a running container actually has (after any in-place resize).
        if let Some(a) = latest
            .as_ref()
            .filter(|a| matches!(a.state, ContainerState::Running(_)))
            && let Some(actual) = crate::resize::recorded(&a.dir)
        {
            status["resources"] = json!(actual);
            if let Some(requests) = &actual.requests {
                status["allocatedResources"] = json!(requests);
            }
        }
        if let Some(a) = latest {
            if !matches!(a.state, ContainerState::Created) {
                status["containerID"] = json!(format!(
                    "libcontainer://{}",
                    container_id(&self.uid, &c.name, a.number)
                ));
            }
        }
        status
    }

    fn attempt(&self, name: &str, number: u32) -> Option<Attempt> {
        let dir = self
            .dir
            .join("containers")
            .join(name)
            .join(number.to_string());
        dir.is_dir().then(|| Attempt {
            number,
            state: container::state(&dir),
            dir,
        })
    }

    /// The latest attempt of container `name`.
    fn latest(&self, name: &str) -> Option<Attempt> {
        let number = attempt_numbers(&self.dir.join("containers").join(name))
            .into_iter()
            .max()?;
        self.attempt(name, number)
    }

    fn all_latest(&self) -> Vec<(String, Attempt)> {
        container_names(&self.dir)
            .into_iter()
            .filter_map(|name| self.latest(&name).map(|a| (name, a)))
            .collect()
    }

    fn all_attempts(&self) -> Vec<(String, Attempt)> {
        let mut out = Vec::new();
        for name in container_names(&self.dir) {
            for n in attempt_numbers(&self.dir.join("containers").join(&name)) {
                if let Some(a) = self.attempt(&name, n) {
                    out.push((name.clone(), a));
                }
            }
        }
        out
    }

    /// Keeps the latest attempt and the one before (for `lastState` and `logs --previous`).
    fn prune_attempts(&self, name: &str, latest: u32) {
        let dir = self.dir.join("containers").join(name);
        for n in attempt_numbers(&dir) {
            if n + 1 < latest {
                let _ = container::remove_container_dir(&dir.join(n.to_string()));
                let _ = fs::remove_file(self.log_path(name, n));
            }
        }
    }

    /// Where attempt `attempt` of container `name` logs.
    pub fn log_path(&self, name: &str, attempt: u32) -> PathBuf {
        self.dir
            .join("logs")
            .join(name)
            .join(format!("{attempt}.log"))
    }

    async fn event(&self, pod: &Pod, type_: EventType, reason: &str, message: &str) {
        self.ctx.events.publish(pod, type_, reason, message).await;
    }
}

/// Whether an init container is a sidecar: `restartPolicy: Always`, it runs beside the
/// main containers instead of before them.
/// The status's times to whole seconds: `metav1.Time` is second-precision in Kubernetes
/// (kube-apiserver drops fractions when it decodes), so the pod reads the same whether
/// fetched as JSON or protobuf, and an unchanged status compares equal.
fn whole_seconds(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                let time_field = matches!(
                    key.as_str(),
                    "lastTransitionTime"
                        | "lastProbeTime"
                        | "startTime"
                        | "startedAt"
                        | "finishedAt"
                );
                match v {
                    Value::String(s) if time_field => {
                        if let Some((whole, rest)) = s.split_once('.')
                            && rest.ends_with('Z')
                        {
                            *s = format!("{whole}Z");
                        }
                    }
                    other => whole_seconds(other),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_seconds),
        _ => {}
    }
}

fn is_sidecar(c: &Container) -> bool {
    c.restart_policy.as_deref() == Some("Always")
}

/// A pod's ephemeral containers as containers (the fields they share; an ephemeral
/// container has no ports, probes or resources of its own).
fn ephemeral_containers(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<Container> {
    spec.ephemeral_containers
        .iter()
        .flatten()
        .filter_map(|e| serde_json::to_value(e).ok())
        .filter_map(|mut v| {
            if let Some(o) = v.as_object_mut() {
                o.remove("targetContainerName");
            }
            serde_json::from_value(v).ok()
        })
        .collect()
}

/// The monotonic instant of an RFC 3339 time in the past (now, if unparsable).
fn instant_of(time: &str) -> Instant {
    let now = Instant::now();
    let ago = time
        .parse::<jiff::Timestamp>()
        .ok()
        .and_then(|t| (jiff::Timestamp::now() - t).try_into().ok())
        .unwrap_or(Duration::ZERO);
    now.checked_sub(ago).unwrap_or(now)
}

/// The stable container ID of attempt `attempt` of container `name` in pod `uid`: 64 hex
/// digits, as container runtimes' IDs look.
pub fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    hex::encode(sha2::Sha256::digest(
        format!("{uid}/{name}/{attempt}").as_bytes(),
    ))
}

fn attempt_number(dir: &Path) -> u32 {
    dir.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The attempt numbers recorded under a container's directory.
pub(crate) fn attempt_numbers(dir: &Path) -> Vec<u32> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn container_names(pod_dir: &Path) -> Vec<String> {
    fs::read_dir(pod_dir.join("containers"))
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn run_time(started: &Started, exited: &Exited) -> Option<Duration> {
    let a: jiff::Timestamp = started.started_at.parse().ok()?;
    let b: jiff::Timestamp = exited.finished_at.parse().ok()?;
    let secs = b.as_second() - a.as_second();
    (secs >= 0).then(|| Duration::from_secs(secs as u64))
}

fn terminated_json(started: &Started, exited: &Exited, id: &str) -> Value {
    let reason = if exited.oom_killed {
        "OOMKilled"
    } else if exited.exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    let mut t = json!({
        "exitCode": exited.exit_code,
        "reason": reason,
        "startedAt": started.started_at,
        "finishedAt": exited.finished_at,
        "containerID": format!("libcontainer://{id}"),
    });
    if let Some(signal) = exited.signal {
        t["signal"] = json!(signal);
    }
    t
}

/// The pod's QoS class from its containers' requests and limits.
pub fn qos_class(containers: &[Container]) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let res = c.resources.as_ref();
        let limits = res.and_then(|r| r.limits.clone()).unwrap_or_default();
        let requests = res.and_then(|r| r.requests.clone()).unwrap_or_default();
        any |= !limits.is_empty() || !requests.is_empty();
        for name in ["cpu", "memory"] {
            match (limits.get(name), requests.get(name)) {
                (Some(l), Some(r)) if l != r => guaranteed = false,
                (Some(_), _) => {}
                _ => guaranteed = false,
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// Whether two statuses agree on everything the agent reports (ignoring what others set).
fn same_status(current: &Value, ours: &Value) -> bool {
    ours.as_object().is_some_and(|o| {
        o.iter()
            .all(|(k, v)| k == "conditions" || current.get(k) == Some(v))
    })
}

/// Removes the pod's (empty) parent cgroups left behind by its containers.
pub(crate) fn remove_pod_cgroups(uid: &str) {
    let Ok(controllers) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for controller in controllers.flatten() {
        let dir = controller
            .path()
            .join("orquestra")
            .join(format!("pod{uid}"));
        if dir.is_dir() {
            if let Ok(children) = fs::read_dir(&dir) {
                for child in children.flatten() {
                    if child.path().is_dir() {
                        let _ = fs::remove_dir(child.path());
                    }
                }
            }
            let _ = fs::remove_dir(&dir);
        }
    }
}

/// Unmounts whatever is mounted under the pod's directory and deletes it.
pub fn remove_pod_dir(dir: &Path) -> std::io::Result<()> {
    let prefix = format!("{}/", dir.display());
    if let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") {
        let mut targets: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|t| t.starts_with(&prefix))
            .collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for t in targets {
            let _ = nix::mount::umount2(t, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Resolves once the watched pod is deleted (marked, or gone); never if the watch ends.
async fn deleted(updates: &mut tokio::sync::watch::Receiver<Option<Arc<Pod>>>) {
    loop {
        let gone = updates
            .borrow_and_update()
            .as_ref()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some());
        if gone {
            return;
        }
        if updates.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preparing_again_backs_off_to_ten_seconds() {
        let delays: Vec<u64> = (1..=7).map(|n| prepare_backoff(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 10, 10, 10]);
    }

    #[test]
    fn container_ids_are_stable_and_distinct() {
        assert_eq!(container_id("u", "c", 0), container_id("u", "c", 0));
        assert_ne!(container_id("u", "c", 0), container_id("u", "c", 1));
        assert_eq!(container_id("u", "c", 0).len(), 64);
    }

    #[test]
    fn qos_classes() {
        let c = |limits: serde_json::Value, requests: serde_json::Value| -> Container {
            serde_json::from_value(
                json!({"name": "c", "resources": {"limits": limits, "requests": requests}}),
            )
            .unwrap()
        };
        assert_eq!(qos_class(&[Container::default()]), "BestEffort");
        assert_eq!(
            qos_class(&[c(
                json!({"cpu": "1", "memory": "1Gi"}),
                json!({"cpu": "1", "memory": "1Gi"})
            )]),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&[c(json!({"memory": "1Gi"}), json!({}))]),
            "Burstable"
        );
    }
}
