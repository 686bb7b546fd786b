//! The writer thread: the only code that modifies the database.
//!
//! It takes every request that has queued up (up to `max_batch`), applies them one after
//! another in one transaction — each condition checked against the state left by the ones
//! before it, each successful write taking the next revision — and commits once. That one
//! commit (one WAL fsync) acknowledges the whole batch: group commit. Only after the commit
//! are the batch's events published to watchers and the callers answered, so nothing is
//! acknowledged or observed that a crash could take back.
//!
//! A request whose condition fails (exists, not found, conflict) gets its error and changes
//! nothing; the rest of its batch goes on. A SQLite failure (disk full, I/O error) rolls the
//! whole batch back and fails every request in it.
//!
//! Compaction marks the new compaction point in the batch's transaction, then deletes the
//! superseded history in small chunks whenever no write is waiting.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use bytes::Bytes;
use rusqlite::{Connection, TransactionBehavior, params};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::read::{self, LogRow};
use super::{Shared, sqlite_error};
use crate::error::{Error, Result};
use crate::kv::{Event, KeyValue, Revision};

/// How long the idle writer polls for the next request before it sleeps.
const SPIN: std::time::Duration = std::time::Duration::from_micros(50);

/// WAL size, in pages, past which the writer checkpoints itself.
const WAL_CHECKPOINT_PAGES: i64 = 4096;

/// Rows of superseded history deleted per compaction step.
const COMPACTION_CHUNK: i64 = 1000;

/// A write, as queued for the writer.
#[derive(Debug)]
pub(super) enum Op {
    Create {
        key: String,
        value: Bytes,
    },
    Update {
        key: String,
        value: Bytes,
        expected: Revision,
    },
    Delete {
        key: String,
        expected: Option<Revision>,
    },
    Compact {
        revision: Revision,
    },
}

/// The writer's answer to one op.
#[derive(Debug)]
pub(super) enum Reply {
    /// Create or update: the key's new state.
    Put(KeyValue),
    /// Delete: its revision and the key's last state.
    Deleted(Revision, KeyValue),
    /// Compact: done (the history is trimmed in the background).
    Compacted,
}

/// One queued write and where to send its outcome.
pub(super) struct Request {
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<Result<Reply>>,
}

/// What one commit published to watchers.
#[derive(Debug)]
pub(super) struct Committed {
    /// The revision after the commit.
    pub(super) revision: Revision,
    /// The changes, in revision order.
    pub(super) events: Vec<Event>,
}

/// Starts the writer thread. It owns the connection and the process lock, and stops (and
/// releases the lock) once every request sender is gone.
pub(super) fn spawn(
    conn: Connection,
    lock: File,
    queue: mpsc::Receiver<Request>,
    events: broadcast::Sender<Arc<Committed>>,
    shared: Arc<Shared>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("sqlite-writer".into())
        .spawn(move || {
            let _lock = lock;
            // The checkpoint thread copies the WAL into the database in the background, but
            // under a steady write load it never catches up with the end of the WAL, so the
            // WAL would grow without bound (and appending to a growing file is slower than
            // overwriting a reused one). The writer is the only appender: a checkpoint it
            // runs itself once the WAL passes `WAL_CHECKPOINT_PAGES` (16 MiB) completes, and the next
            // commit starts the WAL over.
            if let Err(error) = conn.pragma_update(None, "wal_autocheckpoint", WAL_CHECKPOINT_PAGES)
            {
                tracing::warn!(%error, "could not enable the writer's WAL autocheckpoint");
            }
            Writer {
                next: shared.current.load(Ordering::Acquire) + 1,
                last_batch: 0,
                conn,
                queue,
                events,
                shared,
                compaction: None,
            }
            .run()
        })
}

/// Where a background compaction has got to.
#[derive(Debug, Clone, Copy)]
struct CompactionCursor {
    /// Delete superseded history below this revision.
    target: Revision,
    /// Rows up to here have been examined.
    done: Revision,
}

struct Writer {
    conn: Connection,
    queue: mpsc::Receiver<Request>,
    events: broadcast::Sender<Arc<Committed>>,
    shared: Arc<Shared>,
    /// The revision the next successful write gets.
    next: Revision,
    /// Requests in the last batch.
    last_batch: usize,
    compaction: Option<CompactionCursor>,
}

/// Why applying one op stopped.
enum OpError {
    /// The op's condition failed: only this op fails.
    Rejected(Error),
    /// SQLite failed: the batch is rolled back.
    Storage(rusqlite::Error),
}

impl From<rusqlite::Error> for OpError {
    fn from(e: rusqlite::Error) -> Self {
        OpError::Storage(e)
    }
}

impl Writer {
    fn run(mut self) {
        let max_batch = self.shared.options.max_batch.max(1);
        loop {
            let first = if self.compaction.is_some() {
                match self.queue.try_recv() {
                    Ok(request) => request,
                    Err(TryRecvError::Empty) => {
                        self.compaction_step();
                        continue;
                    }
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match self.next_request() {
                    Some(request) => request,
                    None => break,
                }
            };
            let mut batch = Vec::with_capacity(max_batch.min(64));
            batch.push(first);
            while batch.len() < max_batch {
                match self.queue.try_recv() {
                    Ok(request) => batch.push(request),
                    Err(_) => break,
                }
            }
            self.last_batch = batch.len();
            self.commit(batch);
        }
    }

    /// Waits for the next request. After a batch of one (a lone sequential writer), the
    /// writer just answered usually sends its next write within tens of microseconds;
    /// polling that long before sleeping saves a thread wake-up per write. After a larger
    /// batch, polling would only take CPU from the callers, so it sleeps at once.
    fn next_request(&mut self) -> Option<Request> {
        if self.last_batch > 1 {
            return self.queue.blocking_recv();
        }
        let spin_until = std::time::Instant::now() + SPIN;
        loop {
            match self.queue.try_recv() {
                Ok(request) => return Some(request),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if std::time::Instant::now() < spin_until => {
                    std::thread::yield_now();
                }
                Err(TryRecvError::Empty) => return self.queue.blocking_recv(),
            }
        }
    }

    /// Applies and commits one batch, then publishes and answers.
    fn commit(&mut self, batch: Vec<Request>) {
        let path = self.shared.path.clone();
        let first = self.next;
        let mut outcomes = Vec::with_capacity(batch.len());
        let mut events = Vec::new();
        let mut compact_to = None;

        let result = (|| -> rusqlite::Result<()> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            for request in &batch {
                match apply(&tx, self.next, &self.shared, &request.op) {
                    Ok((reply, event)) => {
                        if let Some(event) = event {
                            events.push(event);
                            self.next += 1;
                        }
                        if let (Op::Compact { revision }, Reply::Compacted) = (&request.op, &reply)
                        {
                            compact_to = compact_to.max(Some(*revision));
                        }
                        outcomes.push(Ok(reply));
                    }
                    Err(OpError::Rejected(error)) => outcomes.push(Err(error)),
                    Err(OpError::Storage(error)) => return Err(error),
                }
            }
            tx.commit()
        })();

        if let Err(error) = result {
            // Nothing of this batch is durable: fail all of it and start over from the
            // revision the database actually holds.
            tracing::error!(%error, path = %path.display(), "write batch failed; rolled back");
            self.next = first;
            let error = sqlite_error(&path, error);
            for request in batch {
                let _ = request.reply.send(Err(clone_error(&error)));
            }
            return;
        }

        let revision = self.next - 1;
        self.shared.current.store(revision, Ordering::Release);
        self.shared.commits.fetch_add(1, Ordering::Relaxed);
        self.shared
            .writes
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        if let Some(target) =
            compact_to.filter(|t| *t > self.shared.compacted.load(Ordering::Acquire))
        {
            self.shared.compacted.store(target, Ordering::Release);
            // Rows examined for an earlier target may be superseded under this one: rescan.
            self.compaction = Some(CompactionCursor { target, done: 0 });
        }
        if !events.is_empty() {
            // No receivers is fine: nobody is watching.
            let _ = self.events.send(Arc::new(Committed { revision, events }));
        }
        for (request, outcome) in batch.into_iter().zip(outcomes) {
            let _ = request.reply.send(outcome);
        }
    }

    /// Deletes one chunk of the history that no read at or after the compaction point can
    /// reach: rows superseded by a newer row of their key *below* the point, and deletion
    /// markers below it (with their `kv` entries, unless the key was created again). Each
    /// key's newest row below the point survives, so reads at the point, and the previous
    /// value of the first event at or after it, still find what they need. Walks in revision
    /// order, a chunk at a time, between write batches.
    fn compaction_step(&mut self) {
        let Some(cursor) = self.compaction else {
            return;
        };
        let result = (|| -> rusqlite::Result<Option<Revision>> {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            // The last revision this chunk examines.
            let upto: Option<Revision> = tx.query_row(
                "SELECT MAX(revision) FROM (SELECT revision FROM log
                 WHERE revision > ?1 AND revision < ?2 ORDER BY revision LIMIT ?3)",
                params![cursor.done, cursor.target, COMPACTION_CHUNK],
                |r| r.get(0),
            )?;
            let Some(upto) = upto else {
                return Ok(None);
            };
            tx.execute(
                "DELETE FROM log WHERE revision IN (
                     SELECT prev_revision FROM log
                     WHERE revision > ?1 AND revision <= ?2 AND prev_revision > 0)",
                params![cursor.done, upto],
            )?;
            tx.execute(
                "DELETE FROM kv WHERE deleted = 1 AND mod_revision > ?1 AND mod_revision <= ?2
                   AND key IN (SELECT key FROM log
                               WHERE revision > ?1 AND revision <= ?2 AND deleted = 1)",
                params![cursor.done, upto],
            )?;
            tx.execute(
                "DELETE FROM log WHERE revision > ?1 AND revision <= ?2 AND deleted = 1",
                params![cursor.done, upto],
            )?;
            tx.commit()?;
            Ok(Some(upto))
        })();
        match result {
            Ok(Some(upto)) => {
                self.compaction = Some(CompactionCursor {
                    done: upto,
                    ..cursor
                })
            }
            Ok(None) => {
                tracing::debug!(target = cursor.target, "compaction finished");
                self.compaction = None;
            }
            Err(error) => {
                // Retried at the next idle moment; history is only trimmed later.
                tracing::warn!(%error, "compaction step failed");
                self.compaction = None;
            }
        }
    }
}

/// Applies one op inside the batch transaction. Returns the reply and, for a write, its
/// event (whose revision is `revision`).
fn apply(
    tx: &Connection,
    revision: Revision,
    shared: &Shared,
    op: &Op,
) -> Result<(Reply, Option<Event>), OpError> {
    match op {
        Op::Create { key, value } => {
            let newest = read::newest(tx, key)?;
            if newest.as_ref().is_some_and(|row| !row.deleted) {
                return Err(OpError::Rejected(Error::AlreadyExists { key: key.clone() }));
            }
            // A recreated key's chain goes on through its deletion marker, so reads at
            // revisions before the deletion still find the old incarnation.
            let row = LogRow {
                revision,
                key: key.as_bytes().to_vec(),
                deleted: false,
                create_revision: revision,
                prev_revision: newest.as_ref().map_or(0, |row| row.revision),
                version: 1,
                value: Some(value.to_vec()),
            };
            let event = write(tx, &row, newest.as_ref())?;
            Ok((Reply::Put(event.kv.clone()), Some(event)))
        }
        Op::Update {
            key,
            value,
            expected,
        } => {
            let prev = live(tx, key, Some(*expected))?;
            let row = LogRow {
                revision,
                key: key.as_bytes().to_vec(),
                deleted: false,
                create_revision: prev.create_revision,
                prev_revision: prev.revision,
                version: prev.version + 1,
                value: Some(value.to_vec()),
            };
            let event = write(tx, &row, Some(&prev))?;
            Ok((Reply::Put(event.kv.clone()), Some(event)))
        }
        Op::Delete { key, expected } => {
            let prev = live(tx, key, *expected)?;
            let row = LogRow {
                revision,
                key: key.as_bytes().to_vec(),
                deleted: true,
                create_revision: 0,
                prev_revision: prev.revision,
                version: 0,
                value: None,
            };
            let event = write(tx, &row, Some(&prev))?;
            let last = event
                .prev
                .clone()
                .ok_or_else(|| OpError::Rejected(Error::NotFound { key: key.clone() }))?;
            Ok((Reply::Deleted(revision, last), Some(event)))
        }
        Op::Compact { revision: target } => {
            // `revision - 1` is the latest committed revision while this batch runs.
            let current = revision - 1;
            if *target > current {
                return Err(OpError::Rejected(Error::FutureRevision {
                    requested: *target,
                    current,
                }));
            }
            if *target > shared.compacted.load(Ordering::Acquire) {
                tx.prepare_cached("UPDATE meta SET value = ?1 WHERE name = 'compact_revision'")?
                    .execute([target])?;
            }
            Ok((Reply::Compacted, None))
        }
    }
}

/// Appends `row` to the log, points `kv` at it, and returns its event.
fn write(tx: &Connection, row: &LogRow, prev: Option<&LogRow>) -> rusqlite::Result<Event> {
    tx.prepare_cached(
        "INSERT INTO log (revision, key, deleted, create_revision, prev_revision, version, value)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        row.revision,
        row.key,
        row.deleted as i64,
        row.create_revision,
        row.prev_revision,
        row.version,
        row.value
    ])?;
    tx.prepare_cached(
        "INSERT INTO kv (key, mod_revision, deleted) VALUES (?1, ?2, ?3)
         ON CONFLICT (key) DO UPDATE SET mod_revision = excluded.mod_revision,
                                         deleted = excluded.deleted",
    )?
    .execute(params![row.key, row.revision, row.deleted as i64])?;
    Ok(read::event(row, prev))
}

/// The key's newest row if it is live, checked against the expected `mod_revision`.
fn live(tx: &Connection, key: &str, expected: Option<Revision>) -> Result<LogRow, OpError> {
    let not_found = || {
        OpError::Rejected(Error::NotFound {
            key: key.to_owned(),
        })
    };
    let newest = read::newest(tx, key)?.ok_or_else(not_found)?;
    let current = newest.key_value().ok_or_else(not_found)?;
    match expected {
        Some(expected) if expected != current.mod_revision => {
            Err(OpError::Rejected(Error::Conflict {
                key: key.to_owned(),
                expected,
                current: Box::new(current),
            }))
        }
        _ => Ok(newest),
    }
}

/// One failed commit fails every request of its batch, each with its own error value.
fn clone_error(error: &Error) -> Error {
    match error {
        Error::Sqlite { path, source } => Error::Sqlite {
            path: path.clone(),
            source: Arc::clone(source),
        },
        Error::Corrupt { path, source } => Error::Corrupt {
            path: path.clone(),
            source: Arc::clone(source),
        },
        Error::Locked { path } => Error::Locked { path: path.clone() },
        other => Error::InvalidArgument {
            message: other.to_string(),
        },
    }
}
