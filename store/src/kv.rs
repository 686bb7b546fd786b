//! The data model shared by every backend: key-values, change events and watch items.

use bytes::Bytes;

/// A position in the store's global, strictly increasing history. Every write gets the next
/// one; `0` never names a write.
pub type Revision = i64;

/// One key's state at some revision, with etcd's bookkeeping.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value; empty in the `kv` of a [`EventKind::Delete`] event.
    pub value: Bytes,
    /// The revision that created this incarnation of the key (reset by delete + create).
    pub create_revision: Revision,
    /// The revision of the last write to the key; the token for compare-and-swap.
    pub mod_revision: Revision,
    /// Writes to this incarnation of the key, starting at 1; 0 after a delete.
    pub version: i64,
}

/// What a change did to its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// The key did not exist before this revision.
    Create,
    /// The key existed and got a new value.
    Update,
    /// The key was removed.
    Delete,
}

/// One change, as a watcher sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventKind,
    /// The key after the change. For a delete: the key, an empty value, `mod_revision` set to
    /// the deletion's revision and `version` 0 (as etcd reports it).
    pub kv: KeyValue,
    /// The key before the change: `None` for a create, the last value for updates and deletes.
    pub prev: Option<KeyValue>,
}

impl Event {
    /// The revision at which this change happened.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// An item of a watch stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A change to a key under the watched prefix.
    Change(Event),
    /// Every change under the prefix up to and including this revision has been delivered.
    /// Lets a quiet watcher advance its resume point (the API server's bookmarks).
    Progress(Revision),
}

impl WatchEvent {
    /// The revision this item speaks for.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Change(event) => event.revision(),
            WatchEvent::Progress(revision) => *revision,
        }
    }
}
