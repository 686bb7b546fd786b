//! Orquestra's versioned key-value store: the part that plays etcd's role in Kubernetes.
//!
//! The seam is the [`Store`] trait, small on purpose (kine's shape): get, list, count, create,
//! update, delete, watch, compact, plus the current revision and the database size. Every
//! write gets the next global revision; every key keeps `create_revision`, `mod_revision` and
//! `version`; writes are conditional on the key's `mod_revision` (compare-and-swap), and a
//! watch replays every change after a revision, in revision order, with the previous value.
//!
//! Two backends implement it and pass the same conformance suite (`tests/conformance.rs`):
//! - [`sqlite::SqliteStore`], the embedded default: one SQLite file in WAL mode, every
//!   acknowledged write fsynced, concurrent writers sharing one fsync (group commit), watchers
//!   fed from the writer in-process;
//! - [`etcd::EtcdStore`], for scale-out: the same trait over a real etcd cluster (v3 API).
//!
//! [`open`] picks one from a datastore URL (`sqlite:///path/state.db`,
//! `etcd://host:port[,host:port…]`). [`Compactor`] applies a retention policy to either.
//!
//! This crate knows nothing of HTTP or Kubernetes objects: keys are strings, values bytes.

mod compactor;
mod error;
pub mod etcd;
mod kv;
mod limits;
pub mod sqlite;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod url;

pub use compactor::{CompactionPolicy, Compactor};
pub use error::{Error, Result};
pub use kv::{Event, EventKind, KeyValue, Revision, WatchEvent};
pub use limits::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use store::{ListOptions, ListPage, Store, WatchStream};
pub use url::{Datastore, open};
