//! The watch cache: an in-memory mirror of every object under `/registry/`, kept current by
//! one store watch, that serves LISTs without reading (or decoding) the store.
//!
//! Each object is kept as the exact JSON a client receives (resourceVersion included), so a
//! list is written by concatenating bytes. Consistency is kube-apiserver's "consistent list
//! from cache": a LIST that asks for the latest state first reads the store's current
//! revision, then waits (briefly) until the cache has caught up to it; a LIST at
//! `resourceVersion=0` takes the cache as it is. What the cache cannot answer — an exact old
//! revision, a continue token from an older snapshot, a cache that does not catch up — goes
//! to the store as before.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orquestra_store::{EventKind, KeyValue, ListOptions, Revision, Store, WatchEvent};
use serde_json::Value;
use tokio::sync::{broadcast, watch};

/// The store prefix the cache mirrors.
const PREFIX: &str = "/registry/";

/// How long a consistent LIST waits for the cache before reading the store instead.
const CATCH_UP: Duration = Duration::from_secs(3);

/// One cached object.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The object as served, resourceVersion included.
    pub json: Bytes,
    /// `{"metadata": {"labels": …}}`, for label selectors without decoding `json`.
    labels: Option<Arc<Value>>,
    /// The object's protobuf message, made on first use and shared by every clone, so a
    /// protobuf LIST is written by concatenation as a JSON one is (kube-apiserver caches
    /// serializations the same way). `None` inside: the kind has no protobuf form.
    protobuf: Arc<OnceLock<Option<Bytes>>>,
}

impl Entry {
    fn from_kv(kv: &KeyValue) -> Option<Entry> {
        let mut object: Value = serde_json::from_slice(&kv.value).ok()?;
        crate::engine::set_resource_version(&mut object, kv.mod_revision);
        let labels = object
            .pointer("/metadata/labels")
            .map(|labels| Arc::new(serde_json::json!({ "metadata": { "labels": labels } })));
        Some(Entry {
            json: Bytes::from(serde_json::to_vec(&object).ok()?),
            labels,
            protobuf: Arc::default(),
        })
    }

    /// The object's protobuf message: `encode` (given the decoded object) runs once per
    /// cached version of the object, later calls reuse what it returned.
    pub fn protobuf(&self, encode: impl FnOnce(&Value) -> Option<Vec<u8>>) -> Option<Bytes> {
        self.protobuf
            .get_or_init(|| self.decode().as_ref().and_then(encode).map(Bytes::from))
            .clone()
    }

    /// Whether the object's labels satisfy `selector`.
    pub fn labels_match(&self, selector: &crate::selector::LabelSelector) -> bool {
        static NONE: Value = Value::Null;
        selector.matches(self.labels.as_deref().unwrap_or(&NONE))
    }

    /// The object, decoded.
    pub fn decode(&self) -> Option<Value> {
        serde_json::from_slice(&self.json).ok()
    }
}

/// How many recent changes the cache keeps for watches resuming from the past.
const WINDOW: usize = 8192;

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Entry>,
    /// The latest changes, oldest first: every change after `window_start`.
    window: VecDeque<Arc<Change>>,
    window_start: Revision,
    /// The revision `objects` reflect (ahead of the published one for a moment).
    revision: Revision,
}

/// One change, as every watcher of the cache shares it.
#[derive(Debug)]
pub struct Change {
    /// Its revision.
    pub revision: Revision,
    /// The store key.
    pub key: String,
    /// The object after the change; `None` for a delete.
    pub new: Option<Entry>,
    /// The object before it; `None` for a create.
    pub prev: Option<Entry>,
}

/// What a cache watcher receives.
#[derive(Debug, Clone)]
pub enum Notice {
    /// A change.
    Change(Arc<Change>),
    /// Everything up to this revision has been sent.
    Progress(Revision),
}

/// A watch on the cache: the changes to replay, then the live feed.
#[derive(Debug)]
pub struct CacheWatch {
    /// Objects under the prefix at `revision` (only when asked for).
    pub initial: Vec<Entry>,
    /// The revision the watch starts after.
    pub revision: Revision,
    /// Buffered changes after the start, oldest first (any prefix: filter them).
    pub replay: Vec<Arc<Change>>,
    /// Later changes and progress (any prefix). Lagging too far ends the watch: the client
    /// resumes from the last revision it saw.
    pub live: broadcast::Receiver<Notice>,
}

/// The cache. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WatchCache {
    state: Arc<RwLock<State>>,
    /// The revision the cache reflects; 0 until the first fill.
    revision: watch::Receiver<Revision>,
    store: Arc<dyn Store>,
    /// LISTs answered from the cache.
    served: Arc<AtomicU64>,
    /// Watches started on the cache.
    watches: Arc<AtomicU64>,
    /// The live feed of changes, sent under the state's write lock.
    feed: broadcast::Sender<Notice>,
}

/// A snapshot of the cached objects under one prefix.
#[derive(Debug)]
pub struct Snapshot {
    /// The revision it reflects.
    pub revision: Revision,
    /// The objects, in key order.
    pub entries: Vec<Entry>,
    /// The key of the last one (where a next page starts).
    pub last_key: Option<String>,
    /// Entries remain after the last one (only with a limit).
    pub more: bool,
    /// How many objects under the prefix follow the last one, when asked for and `more`
    /// (a LIST's `remainingItemCount`).
    pub remaining: Option<u64>,
}

impl WatchCache {
    /// Starts mirroring `store`; the returned cache fills in the background.
    pub fn start(store: Arc<dyn Store>) -> WatchCache {
        let (tx, rx) = watch::channel(0);
        let (feed, _) = broadcast::channel(4096);
        let cache = WatchCache {
            state: Arc::default(),
            revision: rx,
            store: Arc::clone(&store),
            served: Arc::default(),
            watches: Arc::default(),
            feed: feed.clone(),
        };
        let state = Arc::clone(&cache.state);
        tokio::spawn(async move {
            // Until the server is gone (no receivers of the revision left).
            while !tx.is_closed() {
                if let Err(error) = mirror(&store, &state, &tx, &feed).await {
                    tracing::warn!(%error, "watch cache lost its watch; refilling");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        cache
    }

    /// How many objects are cached per `(group, plural)` of their `/registry/` keys.
    pub fn counts(&self) -> Vec<(String, String, u64)> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        let mut counts: Vec<(String, String, u64)> = Vec::new();
        for key in state.objects.keys() {
            let mut parts = key.strip_prefix(PREFIX).unwrap_or(key).splitn(3, '/');
            let (Some(group), Some(plural)) = (parts.next(), parts.next()) else {
                continue;
            };
            match counts.last_mut() {
                // Keys are sorted: a resource's objects are contiguous.
                Some((g, p, n)) if g == group && p == plural => *n += 1,
                _ => counts.push((group.to_owned(), plural.to_owned(), 1)),
            }
        }
        counts
    }

    /// The objects under `prefix` (starting after `start_after`, at most `limit`), once the
    /// cache has reached `at_least`; `None` if it does not within a few seconds. With
    /// `count_remaining` (meaningful when `keep` keeps everything) a limited page also counts
    /// the objects after it.
    pub async fn list(
        &self,
        prefix: &str,
        at_least: Revision,
        start_after: Option<&str>,
        limit: Option<usize>,
        keep: impl Fn(&Entry) -> bool,
        count_remaining: bool,
    ) -> Option<Snapshot> {
        let mut revision = self.revision.clone();
        let reached =
            tokio::time::timeout(CATCH_UP, revision.wait_for(|r| *r >= at_least.max(1))).await;
        if !matches!(reached, Ok(Ok(_))) {
            return None;
        }
        let state = self.state.read().ok()?;
        let revision = state.revision;
        let start = match start_after {
            Some(key) => Bound::Excluded(key.to_owned()),
            None => Bound::Included(prefix.to_owned()),
        };
        let mut entries = Vec::new();
        let mut last_key = None;
        let mut more = false;
        let mut remaining = None;
        let mut range = state
            .objects
            .range((start, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix));
        for (key, entry) in range.by_ref() {
            if !keep(entry) {
                continue;
            }
            if limit.is_some_and(|l| entries.len() >= l) {
                more = true;
                if count_remaining {
                    remaining = Some(1 + range.count() as u64);
                }
                break;
            }
            entries.push(entry.clone());
            last_key = Some(key);
        }
        let last_key = last_key.cloned();
        drop(state);
        self.served.fetch_add(1, Ordering::Relaxed);
        Some(Snapshot {
            revision,
            entries,
            last_key,
            more,
            remaining,
        })
    }

    /// How many watches the cache has started.
    pub fn watches(&self) -> u64 {
        self.watches.load(Ordering::Relaxed)
    }

    /// How many LISTs the cache has answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Starts a watch of `prefix`: from `after` (replaying the changes since, if the cache
    /// still has them all and the store has not compacted them away), or — with
    /// `after = None` — from the latest state, whose objects come first. `None` when only the
    /// store can serve it.
    pub async fn watch(&self, prefix: &str, after: Option<Revision>) -> Option<CacheWatch> {
        let at_least = match after {
            Some(rv) => rv,
            None => self.latest().await.ok()?,
        };
        let mut revision = self.revision.clone();
        let reached = matches!(
            tokio::time::timeout(CATCH_UP, revision.wait_for(|r| *r >= at_least.max(1))).await,
            Ok(Ok(_))
        );
        if !reached {
            return None;
        }
        if let Some(rv) = after.filter(|rv| *rv < self.revision()) {
            // The store decides what is too old (a compaction shows as an error here, and
            // the store's own watch then reports the 410).
            self.store.get(PREFIX, Some(rv.max(1))).await.ok()?;
        }
        let state = self.state.read().ok()?;
        let revision = state.revision;
        let (initial, replay) = match after {
            None => {
                let initial = state
                    .objects
                    .range(prefix.to_owned()..)
                    .take_while(|(key, _)| key.starts_with(prefix))
                    .map(|(_, entry)| entry.clone())
                    .collect();
                (initial, Vec::new())
            }
            Some(rv) if rv >= state.window_start => {
                let replay = state
                    .window
                    .iter()
                    .filter(|change| change.revision > rv)
                    .cloned()
                    .collect();
                (Vec::new(), replay)
            }
            Some(_) => return None,
        };
        // Subscribing under the read lock: the writer sends under its write lock, so nothing
        // falls between the replay and the feed.
        let live = self.feed.subscribe();
        drop(state);
        self.watches.fetch_add(1, Ordering::Relaxed);
        Some(CacheWatch {
            initial,
            revision: after.unwrap_or(revision),
            replay,
            live,
        })
    }

    /// Whether the cache holds `key` now.
    pub fn contains(&self, key: &str) -> bool {
        self.state
            .read()
            .is_ok_and(|state| state.objects.contains_key(key))
    }

    /// The cached object at `key`, if the cache holds it now.
    pub fn get(&self, key: &str) -> Option<Entry> {
        self.state.read().ok()?.objects.get(key).cloned()
    }

    /// The revision the cache reflects now.
    pub fn revision(&self) -> Revision {
        *self.revision.borrow()
    }

    /// The store's current revision: what a consistent read must reflect.
    pub async fn latest(&self) -> Result<Revision, orquestra_store::Error> {
        self.store.current_revision().await
    }
}

/// How often every watch gets a progress notice (a bookmark, to clients that asked).
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Fills the cache from a list, then applies the watch from that list's revision until the
/// watch ends.
async fn mirror(
    store: &Arc<dyn Store>,
    state: &RwLock<State>,
    tx: &watch::Sender<Revision>,
    feed: &broadcast::Sender<Notice>,
) -> Result<(), orquestra_store::Error> {
    let mut objects = BTreeMap::new();
    let mut options = ListOptions {
        limit: Some(1000),
        ..ListOptions::default()
    };
    let revision = loop {
        let page = store.list(PREFIX, &options).await?;
        for kv in &page.kvs {
            if let Some(entry) = Entry::from_kv(kv) {
                objects.insert(kv.key.clone(), entry);
            }
        }
        match page.next(options.limit) {
            Some(next) => options = next,
            None => break page.revision,
        }
    };
    let mut stream = store.watch(PREFIX, revision).await?;
    if let Ok(mut state) = state.write() {
        state.objects = objects;
        // Changes before the refill are gone: watches from then go to the store.
        state.window.clear();
        state.window_start = revision;
        state.revision = revision;
    }
    tx.send_replace(revision);
    // A bookmark for every watch now and then, even of kinds nothing writes: a quiet watch's
    // resourceVersion then moves with the store, so it does not fall behind compaction and
    // end in `410 Expired` and a relist (kube-apiserver's watch cache does the same).
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    progress.tick().await;
    loop {
        let item = tokio::select! {
            item = stream.next() => match item {
                Some(item) => item,
                None => break,
            },
            _ = progress.tick() => {
                if let Ok(state) = state.read() {
                    let _ = feed.send(Notice::Progress(state.revision));
                }
                continue;
            }
        };
        let item = item?;
        let revision = item.revision();
        match item {
            WatchEvent::Change(event) => {
                let new = match event.kind {
                    EventKind::Delete => None,
                    EventKind::Create | EventKind::Update => Entry::from_kv(&event.kv),
                };
                if let Ok(mut state) = state.write() {
                    let prev = match &new {
                        Some(entry) => state.objects.insert(event.kv.key.clone(), entry.clone()),
                        None => state.objects.remove(&event.kv.key),
                    };
                    let change = Arc::new(Change {
                        revision,
                        key: event.kv.key,
                        new,
                        prev,
                    });
                    if state.window.len() >= WINDOW {
                        if let Some(oldest) = state.window.pop_front() {
                            state.window_start = oldest.revision;
                        }
                    }
                    state.window.push_back(Arc::clone(&change));
                    state.revision = revision;
                    // No receivers is fine: nobody is watching.
                    let _ = feed.send(Notice::Change(change));
                }
            }
            WatchEvent::Progress(revision) => {
                if let Ok(mut state) = state.write() {
                    state.revision = state.revision.max(revision);
                    let _ = feed.send(Notice::Progress(revision));
                }
            }
        }
        if tx.is_closed() {
            break;
        }
        tx.send_replace(revision);
    }
    Ok(())
}
