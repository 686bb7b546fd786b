//! The scale-out backend: the [`Store`] trait over a real etcd cluster (v3 API).
//!
//! Conditional writes are etcd transactions comparing the key's `mod_revision`; list pages
//! are range reads at a pinned revision; watches are native etcd watches with `prev_kv`;
//! compaction is etcd's own. Several Orquestra servers may share one cluster: etcd, not this
//! code, orders their writes.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType,
    GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use futures::StreamExt;

use crate::error::{Error, Result};
use crate::kv::{Event, EventKind, KeyValue, Revision, WatchEvent};
use crate::limits::{check_key, check_prefix, check_value, prefix_end};
use crate::store::{ListOptions, ListPage, Store, WatchStream};

/// How the etcd client behaves.
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Give up on one request after this long (watches excepted).
    pub request_timeout: Duration,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        EtcdOptions {
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

/// A [`Store`] backed by etcd.
///
/// One client per member, requests pinned to one of them as etcd's own client does: the
/// etcd-client crate's balanced channel fails every request while any one member is down
/// (etcdv3/etcd-client#39), so a request failing as unavailable moves the pin to the next
/// member instead (at most once per [`FAILOVER_EVERY`], however many requests failed at
/// once). The failed request is reported as `Unavailable` — never retried here, since a
/// write may have been applied — and the caller's next one goes to the next member.
#[derive(Clone)]
pub struct EtcdStore {
    clients: std::sync::Arc<[Client]>,
    pinned: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed_over: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    endpoints: String,
}

/// How often the pinned member may change.
const FAILOVER_EVERY: Duration = Duration::from_millis(500);

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

impl EtcdStore {
    /// Connects to the cluster at `endpoints` (`host:port`, or full `http://` URLs) and checks
    /// that it answers.
    pub async fn connect(endpoints: &[String], options: EtcdOptions) -> Result<EtcdStore> {
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                if e.contains("://") {
                    e.clone()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let joined = urls.join(",");
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            .with_timeout(options.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        let mut clients = Vec::new();
        let mut last_error = None;
        for url in &urls {
            match Client::connect(std::slice::from_ref(url), Some(connect.clone())).await {
                Ok(client) => clients.push(client),
                Err(source) => last_error = Some(source),
            }
        }
        if clients.is_empty() {
            return Err(Error::Unavailable {
                endpoints: joined,
                source: last_error
                    .unwrap_or(etcd_client::Error::InvalidArgs("no etcd endpoints".into())),
            });
        }
        let store = EtcdStore {
            clients: clients.into(),
            pinned: Default::default(),
            failed_over: Default::default(),
            endpoints: joined,
        };
        // One member answering is enough (the others may be down); each try that fails
        // moves the pin on.
        let mut answered = store.current_revision().await;
        for _ in 1..store.clients.len() {
            if answered.is_ok() {
                break;
            }
            *store.failed_over.lock().unwrap_or_else(|e| e.into_inner()) = None;
            answered = store.current_revision().await;
        }
        answered?;
        Ok(store)
    }

    /// The client of the pinned member.
    fn client(&self) -> Client {
        let i = self.pinned.load(std::sync::atomic::Ordering::Relaxed) % self.clients.len();
        self.clients[i].clone()
    }

    /// Moves the pin to the next member (see the type's docs).
    fn fail_over(&self) {
        if self.clients.len() < 2 {
            return;
        }
        let mut last = self.failed_over.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|at| at.elapsed() < FAILOVER_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let next = self
            .pinned
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        tracing::warn!(endpoint = next % self.clients.len(), endpoints = %self.endpoints, "etcd member unavailable: trying the next one");
    }

    /// Streams an etcd snapshot (its maintenance API: the whole backend, consistent at one
    /// revision) into the new file `to` and returns the revision it was taken at. Restore
    /// it with `etcdutl snapshot restore` (`etcdctl` before etcd 3.5), which keeps the
    /// revision.
    pub async fn snapshot(&self, to: &std::path::Path) -> Result<Revision> {
        use std::io::Write;
        let io = |source| Error::Io {
            path: to.to_owned(),
            source,
        };
        // The revision before the stream starts: the snapshot holds at least it.
        let revision = self.current_revision().await?;
        let mut file = std::fs::File::options()
            .write(true)
            .create_new(true)
            .open(to)
            .map_err(io)?;
        let mut stream = self
            .client()
            .maintenance_client()
            .snapshot()
            .await
            .map_err(|e| self.error(e))?;
        while let Some(chunk) = stream.message().await.map_err(|e| self.error(e))? {
            file.write_all(chunk.blob()).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        Ok(revision)
    }

    /// Maps a client error to the store's error.
    fn error(&self, source: etcd_client::Error) -> Error {
        use etcd_client::Error as E;
        match &source {
            E::GRpcStatus(status) => {
                let message = status.message();
                match status.code() {
                    tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Cancelled => {
                        self.fail_over();
                        Error::Unavailable {
                            endpoints: self.endpoints.clone(),
                            source,
                        }
                    }
                    _ if message.contains("request is too large") => Error::ValueTooLarge {
                        key: String::new(),
                        size: 0,
                        limit: crate::limits::MAX_VALUE_BYTES,
                    },
                    _ => Error::Etcd { source },
                }
            }
            E::TransportError(_) | E::IoError(_) | E::EndpointError(_) => {
                self.fail_over();
                Error::Unavailable {
                    endpoints: self.endpoints.clone(),
                    source,
                }
            }
            _ => Error::Etcd { source },
        }
    }

    /// Maps an error of a read at `revision`: compaction and future revisions get their own
    /// variants.
    async fn read_error(&self, source: etcd_client::Error, revision: Revision) -> Error {
        if let etcd_client::Error::GRpcStatus(status) = &source {
            if status
                .message()
                .contains("required revision has been compacted")
            {
                return match self.compacted_revision().await {
                    Ok(oldest) => Error::Compacted {
                        requested: revision,
                        oldest,
                    },
                    Err(error) => error,
                };
            }
            if status
                .message()
                .contains("required revision is a future revision")
            {
                return match self.current_revision().await {
                    Ok(current) => Error::FutureRevision {
                        requested: revision,
                        current,
                    },
                    Err(error) => error,
                };
            }
        }
        self.error(source)
    }

    /// etcd does not report its compaction point directly, but refuses a watch from revision 1
    /// with it (after a range read was refused as compacted, so the answer comes at once).
    async fn compacted_revision(&self) -> Result<Revision> {
        let mut client = self.client();
        let mut stream = client
            .watch("\0", Some(WatchOptions::new().with_start_revision(1)))
            .await
            .map_err(|e| self.error(e))?;
        let probe = async {
            while let Some(response) = stream.message().await.map_err(|e| self.error(e))? {
                if response.compact_revision() > 0 {
                    return Ok(response.compact_revision());
                }
            }
            Ok(0)
        };
        // Without an answer, 0 ("unknown") is still a correct lower bound.
        tokio::time::timeout(Duration::from_secs(5), probe)
            .await
            .unwrap_or(Ok(0))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.client().txn(txn).await.map_err(|e| self.error(e))
    }
}

/// Converts etcd's key-value.
fn key_value(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: Bytes::copy_from_slice(kv.value()),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    }
}

fn header_revision(txn: &TxnResponse) -> Revision {
    txn.header().map_or(0, |h| h.revision())
}

/// The key-value read by the `or_else` get of a failed transaction.
fn failed_get(txn: &TxnResponse) -> Option<KeyValue> {
    txn.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(key_value),
        _ => None,
    })
}

/// The previous key-value returned by a put or delete with `prev_kv`.
fn prev_kv(txn: &TxnResponse) -> Option<KeyValue> {
    txn.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Put(put) => put.prev_key().map(key_value),
        TxnOpResponse::Delete(delete) => delete.prev_kvs().first().map(key_value),
        _ => None,
    })
}

/// The `range_end` that selects every key under `prefix` (etcd's "\0" means "to the end").
fn range_end(prefix: &str) -> Vec<u8> {
    prefix_end(prefix.as_bytes()).unwrap_or_else(|| vec![0])
}

#[async_trait]
impl Store for EtcdStore {
    async fn get(
        &self,
        key: &str,
        revision: Option<Revision>,
    ) -> Result<(Revision, Option<KeyValue>)> {
        check_key(key)?;
        let rev = revision.filter(|r| *r > 0).unwrap_or(0);
        let response = match self
            .client()
            .get(key, Some(GetOptions::new().with_revision(rev)))
            .await
        {
            Ok(response) => response,
            Err(e) => return Err(self.read_error(e, rev).await),
        };
        let at = if rev > 0 {
            rev
        } else {
            response.header().map_or(0, |h| h.revision())
        };
        Ok((at, response.kvs().first().map(key_value)))
    }

    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListPage> {
        check_prefix(prefix)?;
        let start = match &options.start_after {
            Some(after) if !after.starts_with(prefix) => {
                return Err(Error::InvalidArgument {
                    message: format!("continuation key {after:?} is outside prefix {prefix:?}"),
                });
            }
            // The smallest key after `after`.
            Some(after) => {
                let mut key = after.as_bytes().to_vec();
                key.push(0);
                key
            }
            None if prefix.is_empty() => vec![0],
            None => prefix.as_bytes().to_vec(),
        };
        let rev = options.revision.filter(|r| *r > 0).unwrap_or(0);
        let limit = options.limit.filter(|l| *l > 0);
        let mut get = GetOptions::new()
            .with_range(range_end(prefix))
            .with_revision(rev);
        if let Some(limit) = limit {
            get = get.with_limit(limit as i64);
        }
        let response = match self.client().get(start, Some(get)).await {
            Ok(response) => response,
            Err(e) => return Err(self.read_error(e, rev).await),
        };
        let revision = if rev > 0 {
            rev
        } else {
            response.header().map_or(0, |h| h.revision())
        };
        Ok(ListPage {
            revision,
            kvs: response.kvs().iter().map(key_value).collect(),
            more: response.more(),
        })
    }

    async fn count(&self, prefix: &str) -> Result<(Revision, u64)> {
        check_prefix(prefix)?;
        let key = if prefix.is_empty() { "\0" } else { prefix };
        let response = self
            .client()
            .get(
                key,
                Some(
                    GetOptions::new()
                        .with_range(range_end(prefix))
                        .with_count_only(),
                ),
            )
            .await
            .map_err(|e| self.error(e))?;
        Ok((
            response.header().map_or(0, |h| h.revision()),
            response.count().max(0) as u64,
        ))
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        check_key(key)?;
        check_value(key, &value)?;
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(key, value.to_vec(), None)]),
            )
            .await
            .map_err(|e| with_key(e, key, &value))?;
        if !response.succeeded() {
            return Err(Error::AlreadyExists {
                key: key.to_owned(),
            });
        }
        let revision = header_revision(&response);
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        })
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<KeyValue> {
        check_key(key)?;
        check_value(key, &value)?;
        if expected <= 0 {
            return Err(Error::InvalidArgument {
                message: format!(
                    "update of {key:?} needs the expected mod_revision, got {expected}"
                ),
            });
        }
        let response = self
            .txn(
                Txn::new()
                    .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
                    .and_then([TxnOp::put(
                        key,
                        value.to_vec(),
                        Some(PutOptions::new().with_prev_key()),
                    )])
                    .or_else([TxnOp::get(key, None)]),
            )
            .await
            .map_err(|e| with_key(e, key, &value))?;
        if !response.succeeded() {
            return Err(match failed_get(&response) {
                Some(current) => Error::Conflict {
                    key: key.to_owned(),
                    expected,
                    current: Box::new(current),
                },
                None => Error::NotFound {
                    key: key.to_owned(),
                },
            });
        }
        let prev = prev_kv(&response);
        let revision = header_revision(&response);
        Ok(KeyValue {
            key: key.to_owned(),
            value,
            create_revision: prev.as_ref().map_or(revision, |p| p.create_revision),
            mod_revision: revision,
            version: prev.as_ref().map_or(1, |p| p.version + 1),
        })
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        check_key(key)?;
        let condition = match expected {
            Some(expected) => Compare::mod_revision(key, CompareOp::Equal, expected),
            None => Compare::version(key, CompareOp::Greater, 0),
        };
        let response = self
            .txn(
                Txn::new()
                    .when([condition])
                    .and_then([TxnOp::delete(
                        key,
                        Some(DeleteOptions::new().with_prev_key()),
                    )])
                    .or_else([TxnOp::get(key, None)]),
            )
            .await?;
        if !response.succeeded() {
            return Err(match (failed_get(&response), expected) {
                (Some(current), Some(expected)) => Error::Conflict {
                    key: key.to_owned(),
                    expected,
                    current: Box::new(current),
                },
                _ => Error::NotFound {
                    key: key.to_owned(),
                },
            });
        }
        let prev = prev_kv(&response).ok_or_else(|| Error::NotFound {
            key: key.to_owned(),
        })?;
        Ok((header_revision(&response), prev))
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        check_prefix(prefix)?;
        if after < 0 {
            return Err(Error::InvalidArgument {
                message: format!("watch revision {after} is negative"),
            });
        }
        let key = if prefix.is_empty() { "\0" } else { prefix };
        let options = WatchOptions::new()
            .with_range(range_end(prefix))
            .with_start_revision(after + 1)
            .with_prev_key()
            .with_progress_notify();
        let stream = self
            .client()
            .watch(key, Some(options))
            .await
            .map_err(|e| self.error(e))?;
        let store = self.clone();
        // `unfold` keeps the etcd stream (and with it the watch) alive for as long as the
        // caller holds ours; pending items are drained before the next response is read.
        let items = futures::stream::unfold(
            (stream, Vec::<Result<WatchEvent>>::new(), false),
            move |(mut stream, mut pending, mut done)| {
                let store = store.clone();
                async move {
                    loop {
                        if !pending.is_empty() {
                            let item = pending.remove(0);
                            return Some((item, (stream, pending, done)));
                        }
                        if done {
                            return None;
                        }
                        let response = match stream.message().await {
                            Ok(Some(response)) => response,
                            Ok(None) => {
                                done = true;
                                pending.push(Err(Error::Closed));
                                continue;
                            }
                            Err(e) => {
                                done = true;
                                pending.push(Err(store.error(e)));
                                continue;
                            }
                        };
                        if response.compact_revision() > 0 {
                            done = true;
                            pending.push(Err(Error::Compacted {
                                requested: after + 1,
                                oldest: response.compact_revision(),
                            }));
                            continue;
                        }
                        if response.canceled() {
                            done = true;
                            pending.push(Err(Error::InvalidArgument {
                                message: format!(
                                    "etcd cancelled the watch: {}",
                                    response.cancel_reason()
                                ),
                            }));
                            continue;
                        }
                        if response.created() && response.events().is_empty() {
                            continue;
                        }
                        if response.events().is_empty() {
                            let revision = response.header().map_or(0, |h| h.revision());
                            pending.push(Ok(WatchEvent::Progress(revision)));
                            continue;
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv() else { continue };
                            let kv = key_value(kv);
                            let prev = event.prev_kv().map(key_value);
                            let kind = match event.event_type() {
                                EventType::Delete => EventKind::Delete,
                                EventType::Put if kv.version == 1 => EventKind::Create,
                                EventType::Put => EventKind::Update,
                            };
                            pending.push(Ok(WatchEvent::Change(Event { kind, kv, prev })));
                        }
                    }
                }
            },
        );
        Ok(items.boxed())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self
            .client()
            .compact(revision, Some(CompactionOptions::new().with_physical()))
            .await
        {
            Ok(_) => Ok(()),
            Err(etcd_client::Error::GRpcStatus(status))
                if status
                    .message()
                    .contains("required revision has been compacted") =>
            {
                Ok(())
            }
            Err(e) => Err(self.read_error(e, revision).await),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        let response = self
            .client()
            .get("\0", Some(GetOptions::new().with_count_only()))
            .await
            .map_err(|e| self.error(e))?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    async fn size(&self) -> Result<u64> {
        let status = self.client().status().await.map_err(|e| self.error(e))?;
        Ok(status.db_size().max(0) as u64)
    }
}

/// Fills in the key and size of a too-large error, which etcd reports without them.
fn with_key(error: Error, key: &str, value: &[u8]) -> Error {
    match error {
        Error::ValueTooLarge { limit, .. } => Error::ValueTooLarge {
            key: key.to_owned(),
            size: value.len(),
            limit,
        },
        other => other,
    }
}
