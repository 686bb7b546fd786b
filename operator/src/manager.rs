//! The manager: one kube `Client`, shared caches (one watch per kind, however many
//! controllers read it), the controllers, an HTTP endpoint for `/metrics`, `/healthz` and
//! `/readyz`, and a graceful shutdown that lets in-flight reconciles finish.
//!
//! ```no_run
//! # async fn demo(client: kube::Client) -> Result<(), orquestra_operator::manager::ManagerError> {
//! use std::sync::Arc;
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use kube::runtime::{Controller, controller::Action, watcher};
//! use orquestra_operator::{Manager, Runner};
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("never")]
//! struct Never;
//!
//! async fn reconcile(_cm: Arc<ConfigMap>, _ctx: Arc<()>) -> Result<Action, Never> {
//!     Ok(Action::await_change())
//! }
//!
//! let mut manager = Manager::new(client);
//! let configmaps = manager.cache::<ConfigMap>(watcher::Config::default());
//! let controller = Controller::for_shared_stream(
//!     configmaps.subscribe().expect("subscribed before run"),
//!     configmaps.store(),
//! );
//! manager.add(Runner::new("configmaps", controller), reconcile, Arc::new(()));
//! manager.run("127.0.0.1:8080".parse().unwrap(), std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use prometheus::Registry;
use serde::de::DeserializeOwned;

use crate::controller::{Progress, Runner};
use crate::leader::{Attempt, Elector, LeaderElection};
use crate::metrics::ControllerMetrics;

/// How many changes a shared cache buffers for its slowest subscriber.
const SUBSCRIBER_BUFFER: usize = 1024;

/// Why the manager stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    /// The metrics/health endpoint could not listen.
    #[error("serving /metrics on {addr}: {source}")]
    Listen {
        /// Where it tried.
        addr: SocketAddr,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Another replica holds the Lease now; this manager stopped its controllers.
    #[error("leadership of Lease {lease} lost")]
    LeadershipLost {
        /// `namespace/name`.
        lease: String,
    },
}

/// Leader election as the manager runs it.
struct Leader {
    elector: Elector,
    gauge: prometheus::IntGauge,
}

/// Where a cache's watch sends the objects it saw change or vanish, one per subscriber.
type Subscriber<K> = futures::channel::mpsc::Sender<Arc<K>>;

/// Who hears of a cache's changes; taken by the watch when it starts.
struct Subscribers<K> {
    changed: Vec<Subscriber<K>>,
    deleted: Vec<Subscriber<K>>,
}

/// A cache of one kind, shared by every controller of the manager: one watch feeds the
/// store that reconcilers read and the streams that trigger them.
///
/// The watch fans each change out itself, over one bounded channel per subscriber, rather
/// than through kube-runtime's shared reflector: its `ReflectHandle` answers `Pending` without
/// a wake-up when the object it was told of is already gone from the store, so a
/// subscriber that hears of a pod just deleted stops for good, its buffer fills, and the
/// backpressure stalls the watch — and every controller on that cache with it.
pub struct Cache<K: Resource + Clone + 'static>
where
    K::DynamicType: Eq + Hash + Clone,
{
    store: Store<K>,
    writer: Arc<Mutex<Option<Writer<K>>>>,
    subscribers: Arc<Mutex<Option<Subscribers<K>>>>,
}

impl<K: Resource + Clone + 'static> Clone for Cache<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn clone(&self) -> Self {
        Cache {
            store: self.store.clone(),
            writer: Arc::clone(&self.writer),
            subscribers: Arc::clone(&self.subscribers),
        }
    }
}

impl<K: Resource + Clone + 'static> Debug for Cache<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("objects", &self.store.state().len())
            .finish_non_exhaustive()
    }
}

impl<K: Resource + Clone + 'static> Cache<K>
where
    K::DynamicType: Eq + Hash + Clone,
{
    /// The read side: what reconcilers look objects up in.
    pub fn store(&self) -> Store<K> {
        self.store.clone()
    }

    /// A stream of the changed objects (as the store holds them), for a controller's trigger
    /// (`for_shared_stream`, `owns_shared_stream`, `watches_shared_stream`); every object
    /// again after each complete (re)list. Only before [`Manager::run`]: every subscriber
    /// must be known when the watch starts, or it could miss changes. `None` afterwards.
    ///
    /// Poll it steadily: the watch waits for the slowest subscriber once its buffer is full.
    pub fn subscribe(&self) -> Option<impl futures::Stream<Item = Arc<K>> + Send + 'static>
    where
        K: Send + Sync,
    {
        let (tx, rx) = futures::channel::mpsc::channel(SUBSCRIBER_BUFFER);
        self.subscribers.lock().ok()?.as_mut()?.changed.push(tx);
        Some(rx)
    }

    /// A stream of the objects deleted (their last state), which [`Cache::subscribe`] does
    /// not carry. Objects that vanished while the watch was down are announced when it
    /// relists. Only before [`Manager::run`]; `None` afterwards.
    pub fn deletions(&self) -> Option<impl futures::Stream<Item = Arc<K>> + Send + 'static>
    where
        K: Send + Sync,
    {
        let (tx, rx) = futures::channel::mpsc::channel(SUBSCRIBER_BUFFER);
        self.subscribers.lock().ok()?.as_mut()?.deleted.push(tx);
        Some(rx)
    }
}

type Task = Box<dyn FnOnce(Shutdown) -> BoxFuture<'static, ()> + Send>;

/// Resolves when the manager shuts down.
pub type Shutdown = futures::future::Shared<BoxFuture<'static, ()>>;

/// The manager. Build it, add caches and controllers, then [`Manager::run`] it.
pub struct Manager {
    client: Client,
    registry: Registry,
    metrics: Option<ControllerMetrics>,
    caches: HashMap<TypeId, Box<dyn Any + Send + Sync>>,
    drivers: Vec<Task>,
    controllers: Vec<Task>,
    /// What `/readyz` answers from: the caches' and controllers' health.
    readiness: Arc<Readiness>,
    leader: Option<Leader>,
}

impl Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("caches", &self.caches.len())
            .field("controllers", &self.controllers.len())
            .finish_non_exhaustive()
    }
}

/// The state `/readyz` reports for one cache.
#[derive(Debug, Default)]
pub(crate) struct CacheHealth {
    kind: String,
    synced: AtomicBool,
    failing: AtomicBool,
}

impl Manager {
    /// A manager over `client`, with its own metrics registry.
    pub fn new(client: Client) -> Manager {
        Manager::with_registry(client, Registry::new())
    }

    /// A manager whose metrics go into `registry` — a process that serves one `/metrics`
    /// for several components (`orq server`) shares its registry.
    pub fn with_registry(client: Client, registry: Registry) -> Manager {
        let metrics = ControllerMetrics::register(&registry).ok();
        Manager {
            client,
            registry,
            metrics,
            caches: HashMap::new(),
            drivers: Vec::new(),
            controllers: Vec::new(),
            readiness: Arc::new(Readiness::default()),
            leader: None,
        }
    }

    /// Competes for leadership on a Lease: caches fill and `/metrics` serves on every
    /// replica, controllers run only on the leader. Sets client-go's
    /// `leader_election_master_status{name}` gauge.
    pub fn leader_election(&mut self, config: LeaderElection) -> Result<(), ManagerError> {
        let gauge = prometheus::IntGaugeVec::new(
            prometheus::Opts::new(
                "leader_election_master_status",
                "1 while this replica leads (holds the Lease), 0 otherwise.",
            ),
            &["name"],
        )?;
        self.registry.register(Box::new(gauge.clone()))?;
        let gauge = gauge.with_label_values(&[config.name.as_str()]);
        gauge.set(0);
        self.leader = Some(Leader {
            elector: Elector::new(self.client.clone(), config),
            gauge,
        });
        Ok(())
    }

    /// The client.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The registry `/metrics` serves; register your own metrics here too.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// What the manager's `/readyz` answers, for a process that serves its own health
    /// endpoint too (`orq server` adds it to its `/readyz`).
    pub fn health(&self) -> Health {
        Health(Arc::clone(&self.readiness))
    }

    /// The shared cache of kind `K` (all namespaces), created on first use with `config`;
    /// later calls return the same cache (and ignore `config`).
    pub fn cache<K>(&mut self, config: watcher::Config) -> Cache<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Default + Send + Sync,
    {
        if let Some(cache) = self
            .caches
            .get(&TypeId::of::<K>())
            .and_then(|c| c.downcast_ref::<Cache<K>>())
        {
            return cache.clone();
        }
        let (store, writer) = reflector::store::<K>();
        let cache = Cache {
            store,
            writer: Arc::new(Mutex::new(Some(writer))),
            subscribers: Arc::new(Mutex::new(Some(Subscribers {
                changed: Vec::new(),
                deleted: Vec::new(),
            }))),
        };
        let health = Arc::new(CacheHealth {
            kind: K::kind(&Default::default()).into_owned(),
            ..CacheHealth::default()
        });
        if let Ok(mut caches) = self.readiness.caches.lock() {
            caches.push(Arc::clone(&health));
        }
        let api: Api<K> = Api::all(self.client.clone());
        let driver_cache = cache.clone();
        self.drivers.push(Box::new(move |shutdown: Shutdown| {
            async move {
                let Some(writer) = driver_cache.writer.lock().ok().and_then(|mut w| w.take())
                else {
                    return;
                };
                let Subscribers { changed, deleted } = driver_cache
                    .subscribers
                    .lock()
                    .ok()
                    .and_then(|mut s| s.take())
                    .unwrap_or(Subscribers {
                        changed: Vec::new(),
                        deleted: Vec::new(),
                    });
                let store = driver_cache.store.clone();
                let mut writer = writer;
                // What the store held when a relist began: whatever the relist no longer
                // has was deleted meanwhile.
                let mut before_relist: Vec<Arc<K>> = Vec::new();
                // The watcher retries failures itself, with backoff, and never ends; should
                // its stream end all the same, a new one starts (relisting into the same
                // store), so a cache never goes quiet for good.
                loop {
                    let events = watcher(api.clone(), config.clone())
                        .default_backoff()
                        .map(|event| {
                            if let Ok(event) = &event {
                                writer.apply_watcher_event(event);
                            }
                            event
                        })
                        .then(|event| {
                            let mut gone: Vec<Arc<K>> = Vec::new();
                            let mut seen: Vec<Arc<K>> = Vec::new();
                            match &event {
                                Ok(watcher::Event::Apply(object)) => {
                                    let key = reflector::ObjectRef::from_obj(object);
                                    seen.extend(store.get(&key));
                                }
                                Ok(watcher::Event::Delete(object)) => {
                                    gone.push(Arc::new(object.clone()));
                                }
                                Ok(watcher::Event::Init) => before_relist = store.state(),
                                Ok(watcher::Event::InitDone) => {
                                    seen = store.state();
                                    gone = std::mem::take(&mut before_relist)
                                        .into_iter()
                                        .filter(|o| {
                                            let key = reflector::ObjectRef::from_obj(o.as_ref());
                                            store.get(&key).is_none()
                                        })
                                        .collect();
                                }
                                _ => {}
                            }
                            // Senders are cheap to clone; a dropped subscriber only fails its
                            // send.
                            let mut to_changed = if seen.is_empty() {
                                Vec::new()
                            } else {
                                changed.clone()
                            };
                            let mut to_deleted = if gone.is_empty() {
                                Vec::new()
                            } else {
                                deleted.clone()
                            };
                            async move {
                                use futures::SinkExt;
                                for (objects, senders) in
                                    [(seen, &mut to_changed), (gone, &mut to_deleted)]
                                {
                                    for object in objects {
                                        for tx in senders.iter_mut() {
                                            let _ = tx.send(Arc::clone(&object)).await;
                                        }
                                    }
                                }
                                event
                            }
                        })
                        .for_each(|event| {
                            match event {
                                // Synced from the first complete list on. (Not through
                                // `Store::wait_until_ready`: kube-runtime 5's ready signal
                                // wakes only its latest waiter, and the controllers wait on
                                // it too.)
                                Ok(watcher::Event::InitDone) => {
                                    health.synced.store(true, Ordering::Relaxed);
                                    health.failing.store(false, Ordering::Relaxed);
                                }
                                Ok(_) => health.failing.store(false, Ordering::Relaxed),
                                Err(error) => {
                                    if !health.failing.swap(true, Ordering::Relaxed) {
                                        tracing::warn!(kind = %health.kind, %error, "watch failing; retrying with backoff");
                                    }
                                }
                            }
                            futures::future::ready(())
                        });
                    tokio::select! {
                        () = events => {
                            tracing::warn!(kind = %health.kind, "watch stream ended; starting a new one");
                            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                        }
                        () = shutdown.clone() => return,
                    }
                }
            }
            .boxed()
        }));
        self.caches
            .insert(TypeId::of::<K>(), Box::new(cache.clone()));
        cache
    }

    /// Runs `task` alongside the caches' watches — on every replica, leader or not — until
    /// the shutdown future it is given resolves. For controllers that keep a cache the
    /// typed [`Manager::cache`] cannot: the garbage collector's owner graph over every kind
    /// discovery finds, fed into a reflector store that a [`Runner`] then reconciles from.
    pub fn add_source(
        &mut self,
        task: impl FnOnce(Shutdown) -> BoxFuture<'static, ()> + Send + 'static,
    ) {
        self.drivers.push(Box::new(task));
    }

    /// Adds a controller: `reconcile` runs under `runner`'s metrics, backoff and
    /// concurrency, with `context`, until the manager shuts down.
    pub fn add<K, Ctx, E, F, Fut>(&mut self, runner: Runner<K>, reconcile: F, context: Arc<Ctx>)
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Eq + Hash + Clone + Debug + Unpin + Default,
        Ctx: Send + Sync + 'static,
        E: std::error::Error + Send + Sync + 'static,
        F: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
    {
        let Some(metrics) = self.metrics.clone() else {
            tracing::error!("controller metrics failed to register; controller not added");
            return;
        };
        if let Ok(mut controllers) = self.readiness.controllers.lock() {
            controllers.push(runner.progress());
        }
        self.controllers.push(Box::new(move |shutdown: Shutdown| {
            runner
                .shutdown_on(shutdown)
                .run(reconcile, context, metrics)
                .boxed()
        }));
    }

    /// Runs everything until `shutdown` resolves (or SIGTERM/SIGINT arrives): the caches'
    /// watches, the controllers, and `/metrics`, `/healthz`, `/readyz` on `addr`. On
    /// shutdown, controllers stop taking new work and finish the reconciles in flight.
    pub async fn run(
        self,
        addr: SocketAddr,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ManagerError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ManagerError::Listen { addr, source })?;
        self.run_on(listener, shutdown).await
    }

    /// [`Manager::run`] on a listener the caller bound (port 0 in tests).
    pub async fn run_on(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ManagerError> {
        let signal: Shutdown = async move {
            tokio::select! {
                () = shutdown => {}
                () = terminate_signal() => {}
            }
        }
        .boxed()
        .shared();
        let readiness = self.readiness;
        let app = crate::endpoint::router(self.registry.clone(), Arc::clone(&readiness));
        tokio::spawn(watchdog(Arc::clone(&readiness), signal.clone()));
        tokio::spawn(probe(self.client.clone(), readiness, signal.clone()));
        let server_signal = signal.clone();
        let server = tokio::spawn(async move {
            let result = axum::serve(listener, app)
                .with_graceful_shutdown(server_signal)
                .await;
            if let Err(error) = result {
                tracing::error!(%error, "metrics endpoint failed");
            }
        });
        let mut drivers = Vec::new();
        for driver in self.drivers {
            drivers.push(tokio::spawn(driver(signal.clone())));
        }
        let outcome = match self.leader {
            None => {
                let controllers = start(self.controllers, &signal);
                signal.clone().await;
                tracing::info!("shutting down: finishing in-flight reconciles");
                finish(controllers).await;
                Ok(())
            }
            Some(leader) => lead(leader, self.controllers, &signal).await,
        };
        if outcome.is_err() {
            // Leadership lost: nothing of this manager may act any more.
            drivers.iter().for_each(tokio::task::JoinHandle::abort);
            server.abort();
            return outcome;
        }
        finish(drivers).await;
        let _ = server.await;
        Ok(())
    }
}

fn start(controllers: Vec<Task>, signal: &Shutdown) -> Vec<tokio::task::JoinHandle<()>> {
    controllers
        .into_iter()
        .map(|controller| tokio::spawn(controller(signal.clone())))
        .collect()
}

async fn finish(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for task in tasks {
        let _ = task.await;
    }
}

/// Leader-elected running: wait for the Lease, run the controllers while renewing it, and
/// stop them at once if it is lost (an error: the caller should exit or start over), or
/// gracefully on shutdown (then the Lease is released for a standby).
async fn lead(
    leader: Leader,
    controllers: Vec<Task>,
    signal: &Shutdown,
) -> Result<(), ManagerError> {
    let config = leader.elector.config().clone();
    let gauge = leader.gauge;
    gauge.set(0);
    // Candidate until the Lease is ours.
    let mut renewed;
    loop {
        renewed = tokio::time::Instant::now();
        if attempt(&leader.elector, config.renew_deadline).await == Some(Attempt::Leading) {
            break;
        }
        tokio::select! {
            () = signal.clone() => return Ok(()),
            () = tokio::time::sleep(config.retry_period) => {}
        }
    }
    tracing::info!(identity = %config.identity, lease = %config.name, "became the leader");
    gauge.set(1);
    let running = start(controllers, signal);
    loop {
        tokio::select! {
            () = signal.clone() => break,
            () = tokio::time::sleep(config.retry_period) => {}
        }
        // Bounded by what is left of the renew deadline, so a leader cut off from the API
        // server stops acting exactly then — `lease_duration - renew_deadline` before any
        // other candidate can see the Lease expire — not a whole attempt later.
        // The renewal counts from when the attempt started (its renewTime is no earlier).
        let left = config.renew_deadline.saturating_sub(renewed.elapsed());
        let started = tokio::time::Instant::now();
        match attempt(&leader.elector, left).await {
            Some(Attempt::Leading) => renewed = started,
            Some(Attempt::Following) => return lost(&gauge, running, &config),
            None if renewed.elapsed() >= config.renew_deadline => {
                return lost(&gauge, running, &config);
            }
            None => {}
        }
    }
    tracing::info!("shutting down: finishing in-flight reconciles, then releasing the Lease");
    finish(running).await;
    leader.elector.release().await;
    gauge.set(0);
    Ok(())
}

/// One try at the Lease, bounded by `deadline`; `None` if it failed or hung.
async fn attempt(elector: &Elector, deadline: std::time::Duration) -> Option<Attempt> {
    match tokio::time::timeout(deadline, elector.try_acquire_or_renew()).await {
        Ok(Ok(attempt)) => Some(attempt),
        Ok(Err(error)) => {
            tracing::debug!(%error, "leader election attempt failed");
            None
        }
        Err(_) => None,
    }
}

fn lost(
    gauge: &prometheus::IntGauge,
    running: Vec<tokio::task::JoinHandle<()>>,
    config: &LeaderElection,
) -> Result<(), ManagerError> {
    gauge.set(0);
    running.iter().for_each(tokio::task::JoinHandle::abort);
    tracing::error!(identity = %config.identity, lease = %config.name, "leadership lost; stopped reconciling");
    Err(ManagerError::LeadershipLost {
        lease: format!("{}/{}", config.namespace, config.name),
    })
}

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub(crate) struct Readiness {
    caches: Mutex<Vec<Arc<CacheHealth>>>,
    controllers: Mutex<Vec<Arc<Progress>>>,
    /// The API server answered the last probe.
    api_reachable: AtomicBool,
}

impl Readiness {
    /// Ready once every cache has listed, while the API server answers and no controller
    /// is stalled.
    pub(crate) fn check(&self) -> Result<(), String> {
        if !self.api_reachable.load(Ordering::Relaxed) {
            return Err("API server unreachable".into());
        }
        for cache in self.caches.lock().iter().flat_map(|c| c.iter()) {
            if !cache.synced.load(Ordering::Relaxed) {
                return Err(format!("cache of {} not synced", cache.kind));
            }
        }
        self.controllers_progressing()
    }

    /// Every controller is getting its work done (the first that is not, and why).
    fn controllers_progressing(&self) -> Result<(), String> {
        let controllers: Vec<Arc<Progress>> = self
            .controllers
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default();
        let stalled: Vec<String> = controllers.iter().filter_map(|p| p.check().err()).collect();
        if stalled.is_empty() {
            Ok(())
        } else {
            Err(stalled.join("; "))
        }
    }
}

/// The manager's readiness, as [`Manager::health`] hands it out.
#[derive(Clone, Debug)]
pub struct Health(Arc<Readiness>);

impl Health {
    /// `Ok` when the manager is ready (its caches synced, the API server answering, no
    /// controller stalled); otherwise why not, naming the cache or controller.
    pub fn check(&self) -> Result<(), String> {
        self.0.check()
    }

    /// Only the controllers' part: `Ok` unless one is stalled (then its name and why). For a
    /// process that runs its controllers against its own in-process API server.
    pub fn controllers(&self) -> Result<(), String> {
        self.0.controllers_progressing()
    }
}

/// How often the watchdog looks at the controllers' progress.
const WATCHDOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Checks every controller's progress each second until shutdown, so a stall is logged when
/// it happens, whether or not anyone asks `/readyz`.
async fn watchdog(readiness: Arc<Readiness>, shutdown: Shutdown) {
    let watching = async {
        loop {
            tokio::time::sleep(WATCHDOG_INTERVAL).await;
            let _ = readiness.controllers_progressing();
        }
    };
    tokio::select! {
        () = watching => {}
        () = shutdown => {}
    }
}

/// How often the manager checks that the API server answers.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Keeps `readiness.api_reachable` current until shutdown. (A watch that resumes after an
/// outage reports nothing until something changes, so the watches alone cannot say when the
/// API server is back.)
async fn probe(client: Client, readiness: Arc<Readiness>, shutdown: Shutdown) {
    let probing = async {
        loop {
            let answered = tokio::time::timeout(PROBE_INTERVAL * 2, client.apiserver_version())
                .await
                .is_ok_and(|r| r.is_ok());
            if readiness.api_reachable.swap(answered, Ordering::Relaxed) != answered {
                if answered {
                    tracing::info!("API server reachable");
                } else {
                    tracing::warn!("API server unreachable; watches retry with backoff");
                }
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    };
    tokio::select! {
        () = probing => {}
        () = shutdown => {}
    }
}

async fn terminate_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    std::future::pending::<()>().await;
}
