//! The store's one error type. Each variant is a distinct condition a caller can act on; the
//! API server maps them to Kubernetes `Status` reasons in one place.

use std::path::PathBuf;
use std::sync::Arc;

use crate::kv::{KeyValue, Revision};

/// Shorthand for results of store operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// `create` on a key that exists.
    #[error("key {key:?} already exists")]
    AlreadyExists {
        /// The key.
        key: String,
    },

    /// `update`/`delete` on a key that does not exist.
    #[error("key {key:?} not found")]
    NotFound {
        /// The key.
        key: String,
    },

    /// A compare-and-swap whose expected `mod_revision` is not the key's current one.
    #[error("key {key:?} was modified: expected mod_revision {expected}, found {}", .current.mod_revision)]
    Conflict {
        /// The key.
        key: String,
        /// The `mod_revision` the caller expected.
        expected: Revision,
        /// The key's current state, so the caller can retry without another read.
        current: Box<KeyValue>,
    },

    /// A read or watch at a revision that compaction has discarded.
    #[error("revision {requested} has been compacted; the oldest available revision is {oldest}")]
    Compacted {
        /// The revision asked for.
        requested: Revision,
        /// The oldest revision that can still be read or watched from.
        oldest: Revision,
    },

    /// A read at a revision the store has not reached yet.
    #[error("revision {requested} is in the future; the current revision is {current}")]
    FutureRevision {
        /// The revision asked for.
        requested: Revision,
        /// The store's current revision.
        current: Revision,
    },

    /// A key longer than [`crate::MAX_KEY_BYTES`].
    #[error("key of {size} bytes exceeds the limit of {limit} bytes")]
    KeyTooLarge {
        /// The key's size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },

    /// A value larger than [`crate::MAX_VALUE_BYTES`].
    #[error("value of {size} bytes for key {key:?} exceeds the limit of {limit} bytes")]
    ValueTooLarge {
        /// The key.
        key: String,
        /// The value's size in bytes.
        size: usize,
        /// The limit.
        limit: usize,
    },

    /// A malformed request: empty key, continuation outside the prefix, bad URL, ….
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// What is wrong.
        message: String,
    },

    /// The SQLite file is held by another process.
    #[error("database {path:?} is locked by another process")]
    Locked {
        /// The database file.
        path: PathBuf,
    },

    /// The SQLite file is not a database, or is damaged.
    #[error("database {path:?} is corrupt or not an Orquestra database")]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: Arc<rusqlite::Error>,
    },

    /// The SQLite file is a database, but not one of this version of Orquestra.
    #[error("database {path:?} is not an Orquestra store: {reason}")]
    Incompatible {
        /// The database file.
        path: PathBuf,
        /// What does not match.
        reason: String,
    },

    /// Filesystem trouble around the database (creating the directory, the lock file, …).
    #[error("I/O error on {path:?}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// Any other SQLite failure (disk full, I/O error inside SQLite, …). Nothing from the
    /// failed batch was acknowledged. Shared because one failed commit fails every write in
    /// its batch.
    #[error("sqlite error on {path:?}")]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// What SQLite reported.
        #[source]
        source: Arc<rusqlite::Error>,
    },

    /// The etcd cluster could not be reached or did not answer in time.
    #[error("etcd at {endpoints} is unavailable")]
    Unavailable {
        /// The endpoints tried, comma separated.
        endpoints: String,
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },

    /// etcd answered with an error this crate has no better name for.
    #[error("etcd request failed")]
    Etcd {
        /// The client's error.
        #[source]
        source: etcd_client::Error,
    },

    /// The store has been shut down (its writer stopped); no further operations succeed.
    #[error("the store is closed")]
    Closed,
}

impl Error {
    /// True for errors that may succeed on retry without any change by the caller.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}
