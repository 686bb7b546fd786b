//! Running a kube-runtime [`Controller`] the way every Orquestra controller runs: metrics
//! recorded around each reconcile, a panicking reconciler turned into an error (the manager
//! and the other controllers carry on), a reconcile that runs past its time limit cancelled
//! and retried as an error, per-object exponential backoff on errors, and a concurrency
//! limit.
//!
//! A controller that stops working must never stall silently: each runner keeps a
//! [`Progress`] record — when a reconcile last started or finished, what is in flight, what
//! waits — and one whose work waits with nothing moving for longer than its stall limit turns
//! the manager's `/readyz` unready with its name (and says so in the log).

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use kube::Resource;
use kube::runtime::Controller;
use kube::runtime::controller::{Action, Config};
use kube::runtime::reflector::ObjectRef;
use serde::de::DeserializeOwned;

use crate::metrics::ControllerMetrics;

/// Per-object exponential backoff after errors: `base`, doubling per consecutive failure, up
/// to `max` (controller-runtime's defaults: 5 ms to 1,000 s). A success resets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(5),
            max: Duration::from_secs(1000),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 or more).
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(31));
        self.base.saturating_mul(factor).min(self.max)
    }
}

/// How long one reconcile may run before it is cancelled and retried as an error, unless
/// the runner says otherwise ([`Runner::reconcile_timeout`]).
pub const DEFAULT_RECONCILE_TIMEOUT: Duration = Duration::from_secs(120);

/// How long work may wait with no reconcile starting or finishing before the runner reports
/// itself stalled, unless it says otherwise ([`Runner::stall_after`]).
pub const DEFAULT_STALL_AFTER: Duration = Duration::from_secs(60);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError<E: std::error::Error + 'static> {
    /// The reconciler returned an error.
    #[error(transparent)]
    Failed(E),
    /// The reconciler panicked; the panic was contained.
    #[error("reconciler panicked: {0}")]
    Panicked(String),
    /// The reconcile ran past the runner's time limit and was cancelled.
    #[error("reconcile cancelled after {0:?}")]
    TimedOut(Duration),
}

/// An object in a controller's queue: namespace and name (kube-runtime reports objects it
/// could not find type-erased, so the queue does not key on the kind).
type Key = (Option<String>, String);

fn key_of<K: Resource>(item: &ObjectRef<K>) -> Key
where
    K::DynamicType: Eq + Hash + Clone,
{
    (item.namespace.clone(), item.name.clone())
}

/// Whether a runner is getting its work done: what `/readyz` and the stall warning read.
pub struct Progress {
    name: String,
    stall_after_ms: AtomicU64,
    /// When a reconcile last started or finished (or the runner started).
    last: Mutex<Instant>,
    /// When each reconcile in flight started, by a sequence number.
    active: Mutex<HashMap<u64, Instant>>,
    next: AtomicU64,
    /// How many objects wait and since when the longest-waiting one has, if the runner
    /// sees its queue.
    waiting: OnceLock<Waiting>,
    /// Reported stalled at the last check (for logging transitions once).
    stalled: AtomicBool,
}

impl Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("name", &self.name)
            .field("stalled", &self.stalled)
            .finish_non_exhaustive()
    }
}

impl Progress {
    fn new(name: &str) -> Progress {
        Progress {
            name: name.to_owned(),
            stall_after_ms: AtomicU64::new(DEFAULT_STALL_AFTER.as_millis() as u64),
            last: Mutex::new(Instant::now()),
            active: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            waiting: OnceLock::new(),
            stalled: AtomicBool::new(false),
        }
    }

    /// The controller's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn moved(&self) {
        if let Ok(mut last) = self.last.lock() {
            *last = Instant::now();
        }
    }

    fn started(self: &Arc<Self>) -> InFlight {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut active) = self.active.lock() {
            active.insert(id, Instant::now());
        }
        self.moved();
        InFlight {
            progress: Arc::clone(self),
            id,
        }
    }

    /// Why the runner is stalled at `now`, if it is: work has waited (or one reconcile has
    /// run) longer than the stall limit, and no reconcile started or finished meanwhile.
    pub fn stalled_at(&self, now: Instant) -> Option<String> {
        let limit = Duration::from_millis(self.stall_after_ms.load(Ordering::Relaxed));
        let idle = self
            .last
            .lock()
            .map(|last| now.saturating_duration_since(*last))
            .unwrap_or_default();
        if idle < limit {
            return None;
        }
        let running = self
            .active
            .lock()
            .ok()
            .and_then(|active| active.values().min().copied())
            .map(|since| now.saturating_duration_since(since))
            .filter(|d| *d >= limit);
        if let Some(running) = running {
            return Some(format!(
                "controller {}: a reconcile has run for {}s and no other started or finished",
                self.name,
                running.as_secs()
            ));
        }
        let waiting = self.waiting.get().and_then(|waiting| waiting());
        match waiting {
            Some((count, since)) if now.saturating_duration_since(since) >= limit => Some(format!(
                "controller {}: {count} objects waiting, the oldest for {}s, and no \
                     reconcile started or finished for {}s",
                self.name,
                now.saturating_duration_since(since).as_secs(),
                idle.as_secs()
            )),
            _ => None,
        }
    }

    /// [`Progress::stalled_at`] now, logging when the runner becomes stalled or recovers.
    pub fn check(&self) -> Result<(), String> {
        let stalled = self.stalled_at(Instant::now());
        let was = self.stalled.swap(stalled.is_some(), Ordering::Relaxed);
        match (&stalled, was) {
            (Some(why), false) => tracing::error!(controller = %self.name, "stalled: {why}"),
            (None, true) => tracing::info!(controller = %self.name, "progressing again"),
            _ => {}
        }
        stalled.map_or(Ok(()), Err)
    }
}

type Waiting = Arc<dyn Fn() -> Option<(usize, Instant)> + Send + Sync>;

/// A reconcile in flight; its end (however it ends: done, cancelled, dropped at shutdown)
/// counts as progress.
struct InFlight {
    progress: Arc<Progress>,
    id: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut active) = self.progress.active.lock() {
            active.remove(&self.id);
        }
        self.progress.moved();
    }
}

/// A controller ready to run: a kube-runtime [`Controller`] plus how to run it.
pub struct Runner<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Debug + Unpin + Default,
{
    name: String,
    controller: Controller<K>,
    concurrency: u16,
    backoff: Backoff,
    timeout: Duration,
    progress: Arc<Progress>,
    /// The queue seen from outside kube-runtime's scheduler, when the runner built its
    /// controller from caches (and so sees every trigger).
    queue: Option<Arc<Queue>>,
}

/// The workqueue as controller-runtime's metrics describe it: an object is added when a
/// watch event triggers it (deduplicated while it waits, as client-go's dirty set does) and
/// leaves when its reconcile starts, or when kube-runtime drops it because the object is
/// gone from the cache.
struct Queue {
    pending: Mutex<HashMap<Key, Instant>>,
    meters: OnceLock<QueueMeters>,
}

struct QueueMeters {
    depth: prometheus::IntGauge,
    adds: prometheus::IntCounter,
    wait: prometheus::Histogram,
}

impl Queue {
    fn add(&self, item: Key) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        pending.entry(item).or_insert_with(Instant::now);
        if let Some(m) = self.meters.get() {
            m.adds.inc();
            m.depth.set(pending.len() as i64);
        }
    }

    /// The item left the queue: its reconcile started, or it was dropped.
    fn taken(&self, item: &Key) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        let added = pending.remove(item);
        if let Some(m) = self.meters.get() {
            if let Some(added) = added {
                m.wait.observe(added.elapsed().as_secs_f64());
            }
            m.depth.set(pending.len() as i64);
        }
    }

    /// How many wait, and since when the longest-waiting one has.
    fn oldest(&self) -> Option<(usize, Instant)> {
        let pending = self.pending.lock().ok()?;
        let oldest = pending.values().min().copied()?;
        Some((pending.len(), oldest))
    }
}

impl<K> Debug for Runner<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Debug + Unpin + Default,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

/// What the wrapped reconciler shares between reconciles.
struct Shared<K: Resource, Ctx, F> {
    name: String,
    context: Arc<Ctx>,
    reconcile: F,
    metrics: ControllerMetrics,
    backoff: Backoff,
    timeout: Duration,
    progress: Arc<Progress>,
    failures: Mutex<HashMap<ObjectRef<K>, u32>>,
    queue: Option<Arc<Queue>>,
}

impl<K> Runner<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Debug + Unpin + Default,
{
    /// Names a controller (its metrics label) built with kube-runtime's [`Controller`]
    /// (`owns`, `watches`, shared streams and all).
    ///
    /// Built this way the runner cannot see kube-runtime's queue: the `workqueue_depth`,
    /// `workqueue_adds_total` and `workqueue_queue_duration_seconds` series stay at zero. Use
    /// [`Runner::for_cache`] to get them.
    pub fn new(name: impl Into<String>, controller: Controller<K>) -> Self {
        let name = name.into();
        Runner {
            progress: Arc::new(Progress::new(&name)),
            name,
            controller,
            concurrency: 0,
            backoff: Backoff::default(),
            timeout: DEFAULT_RECONCILE_TIMEOUT,
            queue: None,
        }
    }

    /// A controller of the objects in a manager's shared `cache`, built by the runner so that
    /// it sees every trigger (and records the workqueue metrics). `None` once the manager
    /// runs (caches are subscribed before).
    pub fn for_cache(name: impl Into<String>, cache: &crate::Cache<K>) -> Option<Self> {
        let queue = Arc::new(Queue {
            pending: Mutex::new(HashMap::new()),
            meters: OnceLock::new(),
        });
        let meter = Arc::clone(&queue);
        let triggers = cache.subscribe()?.map(move |object: Arc<K>| {
            meter.add(key_of(&ObjectRef::from_obj(&*object)));
            object
        });
        let controller = Controller::for_shared_stream(triggers, cache.store());
        let runner = Runner::new(name, controller);
        let oldest = Arc::clone(&queue);
        let _ = runner
            .progress
            .waiting
            .set(Arc::new(move || oldest.oldest()));
        Some(Runner {
            queue: Some(queue),
            ..runner
        })
    }

    /// Also reconciles the objects `mapper` names when an object of another kind changes
    /// (from the manager's shared `cache`): a Secret's change reconciling the apps that mount
    /// it, for instance.
    pub fn watches<O, I>(
        mut self,
        cache: &crate::Cache<O>,
        mapper: impl Fn(Arc<O>) -> I + Send + Sync + 'static,
    ) -> Option<Self>
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + Send + 'static,
        I::IntoIter: Send,
    {
        let queue = self.queue.clone();
        let mapper = Arc::new(mapper);
        let map = move |object: Arc<O>| -> Vec<ObjectRef<K>> {
            let items: Vec<ObjectRef<K>> = mapper(object).into_iter().collect();
            if let Some(queue) = &queue {
                items.iter().for_each(|item| queue.add(key_of(item)));
            }
            items
        };
        self.controller = self
            .controller
            .watches_shared_stream(cache.subscribe()?, map);
        Some(self)
    }

    /// Also reconciles the objects `mapper` names when an object of another kind is
    /// *deleted* (from the manager's shared `cache`; see [`crate::Cache::deletions`]):
    /// [`Runner::watches`] and [`Runner::owns`] only see objects that still exist.
    pub fn watches_deleted<O, I>(
        mut self,
        cache: &crate::Cache<O>,
        mapper: impl Fn(Arc<O>) -> I + Send + Sync + 'static,
    ) -> Option<Self>
    where
        O: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        I: IntoIterator<Item = ObjectRef<K>> + Send + 'static,
        I::IntoIter: Send,
    {
        let queue = self.queue.clone();
        let map = move |object: Arc<O>| -> Vec<ObjectRef<K>> {
            let items: Vec<ObjectRef<K>> = mapper(object).into_iter().collect();
            if let Some(queue) = &queue {
                items.iter().for_each(|item| queue.add(key_of(item)));
            }
            items
        };
        self.controller = self
            .controller
            .watches_shared_stream(cache.deletions()?, map);
        Some(self)
    }

    /// Also reconciles an object when one of the children it controls (by a controller
    /// owner reference) changes: the children of the manager's shared `cache`.
    pub fn owns<C>(mut self, cache: &crate::Cache<C>) -> Option<Self>
    where
        C: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    {
        let queue = self.queue.clone();
        let kind = K::kind(&K::DynamicType::default()).into_owned();
        let api_version = K::api_version(&K::DynamicType::default()).into_owned();
        let children = cache.subscribe()?.map(move |child: Arc<C>| {
            if let Some(queue) = &queue {
                let owner = child.meta().owner_references.iter().flatten().find(|o| {
                    o.controller == Some(true) && o.kind == kind && o.api_version == api_version
                });
                if let Some(owner) = owner {
                    let mut item = ObjectRef::<K>::new(&owner.name);
                    if let Some(ns) = child.meta().namespace.as_deref() {
                        item = item.within(ns);
                    }
                    queue.add(key_of(&item));
                }
            }
            child
        });
        self.controller = self.controller.owns_shared_stream(children);
        Some(self)
    }

    /// At most `n` reconciles at once (0: unlimited). The same object is never reconciled
    /// twice at once either way.
    pub fn concurrency(mut self, n: u16) -> Self {
        self.concurrency = n;
        self
    }

    /// Stops taking new work when `signal` resolves; reconciles in flight finish first.
    pub fn shutdown_on(mut self, signal: impl Future<Output = ()> + Send + Sync + 'static) -> Self {
        self.controller = self.controller.graceful_shutdown_on(signal);
        self
    }

    /// The backoff after errors.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long one reconcile may run before it is cancelled (its future dropped) and
    /// retried with backoff as an error ([`DEFAULT_RECONCILE_TIMEOUT`] unless set).
    pub fn reconcile_timeout(mut self, limit: Duration) -> Self {
        self.timeout = limit;
        self
    }

    /// How long work may wait with nothing moving before the runner reports itself stalled
    /// ([`DEFAULT_STALL_AFTER`] unless set).
    pub fn stall_after(self, limit: Duration) -> Self {
        self.progress
            .stall_after_ms
            .store(limit.as_millis() as u64, Ordering::Relaxed);
        self
    }

    /// The runner's progress record, which the manager's `/readyz` reads.
    pub fn progress(&self) -> Arc<Progress> {
        Arc::clone(&self.progress)
    }

    /// Runs until the controller's streams end (its shutdown signal, if it has one).
    /// `reconcile` is level-based: given the object's latest state, make the world match
    /// it, and say when to look again.
    pub async fn run<Ctx, E, F, Fut>(
        self,
        reconcile: F,
        context: Arc<Ctx>,
        metrics: ControllerMetrics,
    ) where
        Ctx: Send + Sync + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
    {
        metrics.init(&self.name, self.concurrency);
        if let Some(queue) = &self.queue {
            let _ = queue.meters.set(QueueMeters {
                depth: metrics.depth.with_label_values(&[self.name.as_str()]),
                adds: metrics.adds.with_label_values(&[self.name.as_str()]),
                wait: metrics
                    .queue_duration
                    .with_label_values(&[self.name.as_str()]),
            });
        }
        let shared = Arc::new(Shared {
            queue: self.queue.clone(),
            name: self.name.clone(),
            context,
            reconcile,
            metrics,
            backoff: self.backoff,
            timeout: self.timeout,
            progress: Arc::clone(&self.progress),
            failures: Mutex::new(HashMap::new()),
        });
        let name = self.name;
        let queue = self.queue;
        self.progress.moved();
        self.controller
            .with_config(Config::default().concurrency(self.concurrency))
            .run(reconcile_instrumented, error_policy, shared)
            .for_each(|result| {
                match result {
                    // Triggered, but gone from the cache before its turn: it leaves the queue
                    // without a reconcile.
                    Err(kube::runtime::controller::Error::ObjectNotFound(item)) => {
                        if let Some(queue) = &queue {
                            queue.taken(&(item.namespace.clone(), item.name.clone()));
                        }
                    }
                    Err(error) => tracing::debug!(controller = %name, %error, "reconcile failed"),
                    Ok(_) => {}
                }
                futures::future::ready(())
            })
            .await;
    }
}

fn reconcile_instrumented<K, Ctx, E, F, Fut>(
    object: Arc<K>,
    shared: Arc<Shared<K, Ctx, F>>,
) -> futures::future::BoxFuture<'static, Result<Action, ReconcileError<E>>>
where
    K: Resource + Clone + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Debug + Unpin + Default,
    Ctx: Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
    F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Action, E>> + Send + 'static,
{
    async move {
        let name = shared.name.as_str();
        let m = &shared.metrics;
        if let Some(queue) = &shared.queue {
            queue.taken(&key_of(&ObjectRef::from_obj(&*object)));
        }
        let workers = m.active_workers.with_label_values(&[name]);
        workers.inc();
        let in_flight = shared.progress.started();
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            shared.timeout,
            AssertUnwindSafe((shared.reconcile)(
                Arc::clone(&object),
                Arc::clone(&shared.context),
            ))
            .catch_unwind(),
        )
        .await;
        drop(in_flight);
        let seconds = started.elapsed().as_secs_f64();
        workers.dec();
        m.reconcile_time.with_label_values(&[name]).observe(seconds);
        m.work_duration.with_label_values(&[name]).observe(seconds);
        let Ok(outcome) = outcome else {
            m.reconcile_timeouts.with_label_values(&[name]).inc();
            m.reconcile_errors.with_label_values(&[name]).inc();
            m.reconcile_total.with_label_values(&[name, "error"]).inc();
            tracing::warn!(
                controller = name,
                object = %ObjectRef::from_obj(&*object),
                limit = ?shared.timeout,
                "reconcile ran past its time limit; cancelled, to be retried"
            );
            return Err(ReconcileError::TimedOut(shared.timeout));
        };
        let result = match outcome {
            Ok(Ok(action)) => {
                if let Ok(mut failures) = shared.failures.lock() {
                    failures.remove(&ObjectRef::from_obj(&object));
                }
                let label = if action == Action::await_change() {
                    "success"
                } else {
                    "requeue_after"
                };
                m.reconcile_total.with_label_values(&[name, label]).inc();
                return Ok(action);
            }
            Ok(Err(error)) => ReconcileError::Failed(error),
            Err(panic) => {
                m.reconcile_panics.with_label_values(&[name]).inc();
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic payload".into());
                tracing::error!(controller = name, %message, "reconciler panicked");
                ReconcileError::Panicked(message)
            }
        };
        m.reconcile_errors.with_label_values(&[name]).inc();
        m.reconcile_total.with_label_values(&[name, "error"]).inc();
        Err(result)
    }
    .boxed()
}

fn error_policy<K, Ctx, E, F>(
    object: Arc<K>,
    error: &ReconcileError<E>,
    shared: Arc<Shared<K, Ctx, F>>,
) -> Action
where
    K: Resource,
    K::DynamicType: Eq + Hash + Clone + Default,
    E: std::error::Error + 'static,
{
    let failures = shared
        .failures
        .lock()
        .map(|mut failures| {
            let count = failures.entry(ObjectRef::from_obj(&object)).or_insert(0);
            *count = count.saturating_add(1);
            *count
        })
        .unwrap_or(1);
    shared
        .metrics
        .retries
        .with_label_values(&[shared.name.as_str()])
        .inc();
    tracing::debug!(controller = %shared.name, %error, failures, "retrying after backoff");
    Action::requeue(shared.backoff.delay(failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff::default();
        assert_eq!(b.delay(1), Duration::from_millis(5));
        assert_eq!(b.delay(2), Duration::from_millis(10));
        assert_eq!(b.delay(4), Duration::from_millis(40));
        assert_eq!(b.delay(40), Duration::from_secs(1000));
    }
}
