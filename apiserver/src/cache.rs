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

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orquestra_store::{EventKind, KeyValue, ListOptions, Revision, Store, WatchEvent};
use serde_json::Value;
use tokio::sync::watch;

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
        })
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

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<String, Entry>,
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
}

impl WatchCache {
    /// Starts mirroring `store`; the returned cache fills in the background.
    pub fn start(store: Arc<dyn Store>) -> WatchCache {
        let (tx, rx) = watch::channel(0);
        let cache = WatchCache {
            state: Arc::default(),
            revision: rx,
            store: Arc::clone(&store),
            served: Arc::default(),
        };
        let state = Arc::clone(&cache.state);
        tokio::spawn(async move {
            // Until the store is dropped (no more senders' receivers: the server is gone).
            while !tx.is_closed() {
                if let Err(error) = mirror(&store, &state, &tx).await {
                    tracing::warn!(%error, "watch cache lost its watch; refilling");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        cache
    }

    /// The objects under `prefix` (starting after `start_after`, at most `limit`), once the
    /// cache has reached `at_least`; `None` if it does not within a few seconds.
    pub async fn list(
        &self,
        prefix: &str,
        at_least: Revision,
        start_after: Option<&str>,
        limit: Option<usize>,
        keep: impl Fn(&Entry) -> bool,
    ) -> Option<Snapshot> {
        let mut revision = self.revision.clone();
        let reached =
            tokio::time::timeout(CATCH_UP, revision.wait_for(|r| *r >= at_least.max(1))).await;
        if !matches!(reached, Ok(Ok(_))) {
            return None;
        }
        let state = self.state.read().ok()?;
        let revision = *self.revision.borrow();
        let start = match start_after {
            Some(key) => Bound::Excluded(key.to_owned()),
            None => Bound::Included(prefix.to_owned()),
        };
        let mut entries = Vec::new();
        let mut last_key = None;
        let mut more = false;
        for (key, entry) in state.objects.range((start, Bound::Unbounded)) {
            if !key.starts_with(prefix) {
                break;
            }
            if !keep(entry) {
                continue;
            }
            if limit.is_some_and(|l| entries.len() >= l) {
                more = true;
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
        })
    }

    /// How many LISTs the cache has answered.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Whether the cache holds `key` now.
    pub fn contains(&self, key: &str) -> bool {
        self.state
            .read()
            .is_ok_and(|state| state.objects.contains_key(key))
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

/// Fills the cache from a list, then applies the watch from that list's revision until the
/// watch ends.
async fn mirror(
    store: &Arc<dyn Store>,
    state: &RwLock<State>,
    tx: &watch::Sender<Revision>,
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
    }
    tx.send_replace(revision);
    while let Some(item) = stream.next().await {
        let item = item?;
        let revision = item.revision();
        if let WatchEvent::Change(event) = item {
            let entry = match event.kind {
                EventKind::Delete => None,
                EventKind::Create | EventKind::Update => Entry::from_kv(&event.kv),
            };
            if let Ok(mut state) = state.write() {
                match entry {
                    Some(entry) => state.objects.insert(event.kv.key, entry),
                    None => state.objects.remove(&event.kv.key),
                };
            }
        }
        if tx.is_closed() {
            break;
        }
        tx.send_replace(revision);
    }
    Ok(())
}
