//! The backend-independent contract: the [`Store`] trait and its request/response types.

use std::fmt;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::kv::{KeyValue, Revision, WatchEvent};

/// A stream of changes under a prefix, in strictly increasing revision order.
///
/// If the watch cannot continue (its start revision was compacted, or it fell behind
/// compaction, or the backend went away) the stream yields one `Err` and then ends. A
/// compacted start is reported in the stream, not by [`Store::watch`] itself, because that is
/// how etcd reports it and how the Kubernetes watch protocol passes it on (an in-stream 410).
pub type WatchStream = BoxStream<'static, Result<WatchEvent>>;

/// Options of [`Store::list`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListOptions {
    /// Read the snapshot at this revision; `None` reads the latest.
    pub revision: Option<Revision>,
    /// Return at most this many key-values; `None` (or 0) returns all.
    pub limit: Option<usize>,
    /// Start strictly after this key (which must have the listed prefix): the continuation
    /// of an earlier page, read at that page's [`ListPage::revision`].
    pub start_after: Option<String>,
}

/// One page of a [`Store::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListPage {
    /// The revision of the snapshot the page was read from.
    pub revision: Revision,
    /// The key-values, in ascending key order.
    pub kvs: Vec<KeyValue>,
    /// True when keys remain after the last one returned.
    pub more: bool,
}

impl ListPage {
    /// The options that read the next page of the same snapshot, or `None` on the last page.
    pub fn next(&self, limit: Option<usize>) -> Option<ListOptions> {
        let last = self.kvs.last()?;
        self.more.then(|| ListOptions {
            revision: Some(self.revision),
            limit,
            start_after: Some(last.key.clone()),
        })
    }
}

/// An MVCC key-value store with etcd semantics.
///
/// Revisions are global: every successful write (create, update, delete) takes the next one.
/// Reads may name an older revision until compaction discards it. All writes are durable when
/// acknowledged.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Reads `key`, at `revision` or the latest. Returns the revision read at and the
    /// key-value, if the key existed then.
    async fn get(
        &self,
        key: &str,
        revision: Option<Revision>,
    ) -> Result<(Revision, Option<KeyValue>)>;

    /// Lists the keys starting with `prefix` (all keys for `""`), one page at a time.
    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListPage>;

    /// Counts the keys starting with `prefix` at the latest revision, which it also returns.
    async fn count(&self, prefix: &str) -> Result<(Revision, u64)>;

    /// Creates `key`; fails with `AlreadyExists` if it exists.
    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue>;

    /// Replaces `key`'s value if its `mod_revision` is still `expected`; fails with `Conflict`
    /// (carrying the current state) if not, `NotFound` if the key does not exist.
    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<KeyValue>;

    /// Deletes `key`, only if its `mod_revision` is `expected` when given. Returns the
    /// deletion's revision and the last state of the key.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;

    /// Watches every change to keys starting with `prefix` with a revision strictly greater
    /// than `after`. See [`WatchStream`] for how it ends.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// Discards history before `revision`: reads and watches from older revisions fail with
    /// `Compacted` afterwards. Compacting to a revision at or below the last compaction does
    /// nothing.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// The latest revision.
    async fn current_revision(&self) -> Result<Revision>;

    /// The size of the backing database in bytes.
    async fn size(&self) -> Result<u64>;
}
