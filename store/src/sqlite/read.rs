//! Read queries. Each runs inside one read transaction, so the revision it reports and the
//! rows it returns come from the same snapshot (WAL readers see a fixed point in history).
//!
//! The latest state comes from `kv` joined to `log`. The state at a past revision `R` is
//! found per key by walking its chain (`prev_revision`) back from the newest row to the first
//! row at or below `R`; a broken link means the key did not exist then (compaction only
//! drops rows that no read at or after the compaction point can reach — see `writer`).

use std::path::Path;
use std::sync::LazyLock;

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::sqlite_error;
use crate::error::{Error, Result};
use crate::kv::{Event, EventKind, KeyValue, Revision};
use crate::limits::prefix_end;
use crate::store::{ListOptions, ListPage};

/// Upper bound for "no upper bound": larger than any key we accept.
const NO_END: &[u8] = &[0xff; crate::limits::MAX_KEY_BYTES + 1];

/// The columns of a `log` row, in [`LogRow::from_row`] order.
const LOG_COLUMNS: &str = "revision, key, deleted, create_revision, prev_revision, version, value";

/// [`LOG_COLUMNS`] qualified by a table name or alias, for joins. Statements on the write
/// path build their SQL once (`LazyLock`): formatting it per call showed in profiles.
fn log_columns(table: &str) -> String {
    LOG_COLUMNS
        .split(", ")
        .map(|c| format!("{table}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One `log` row: a key's state written at `revision`.
#[derive(Debug, Clone)]
pub(super) struct LogRow {
    pub(super) revision: Revision,
    pub(super) key: Vec<u8>,
    pub(super) deleted: bool,
    pub(super) create_revision: Revision,
    pub(super) prev_revision: Revision,
    pub(super) version: i64,
    pub(super) value: Option<Vec<u8>>,
}

impl LogRow {
    fn from_row(row: &Row<'_>, at: usize) -> rusqlite::Result<LogRow> {
        Ok(LogRow {
            revision: row.get(at)?,
            key: row.get(at + 1)?,
            deleted: row.get::<_, i64>(at + 2)? != 0,
            create_revision: row.get(at + 3)?,
            prev_revision: row.get(at + 4)?,
            version: row.get(at + 5)?,
            value: row.get(at + 6)?,
        })
    }

    /// The key-value this row holds, or `None` for a deletion marker.
    pub(super) fn key_value(&self) -> Option<KeyValue> {
        (!self.deleted).then(|| KeyValue {
            key: String::from_utf8_lossy(&self.key).into_owned(),
            value: Bytes::from(self.value.clone().unwrap_or_default()),
            create_revision: self.create_revision,
            mod_revision: self.revision,
            version: self.version,
        })
    }
}

/// A snapshot: the revision it stands at and the compaction point it saw.
struct Snapshot {
    current: Revision,
    compacted: Revision,
}

/// Starts a read transaction and reads where it stands.
fn begin<'c>(conn: &'c Connection, path: &Path) -> Result<(rusqlite::Transaction<'c>, Snapshot)> {
    let err = |e| sqlite_error(path, e);
    // `unchecked_transaction` because pooled connections are shared by reference; reads only.
    let tx = conn.unchecked_transaction().map_err(err)?;
    let current = tx
        .prepare_cached("SELECT COALESCE(MAX(revision), 0) FROM log")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(err)?;
    let compacted = tx
        .prepare_cached("SELECT value FROM meta WHERE name = 'compact_revision'")
        .and_then(|mut s| s.query_row([], |r| r.get(0)))
        .map_err(err)?;
    Ok((tx, Snapshot { current, compacted }))
}

/// Checks that `revision` can be read in `snapshot`.
fn check_revision(snapshot: &Snapshot, revision: Revision) -> Result<()> {
    if revision > snapshot.current {
        return Err(Error::FutureRevision {
            requested: revision,
            current: snapshot.current,
        });
    }
    if revision < snapshot.compacted {
        return Err(Error::Compacted {
            requested: revision,
            oldest: snapshot.compacted,
        });
    }
    Ok(())
}

/// The `log` row at `revision`, if it is still there.
fn log_row(conn: &Connection, revision: Revision) -> rusqlite::Result<Option<LogRow>> {
    conn.prepare_cached(&format!(
        "SELECT {LOG_COLUMNS} FROM log WHERE revision = ?1"
    ))?
    .query_row([revision], |r| LogRow::from_row(r, 0))
    .optional()
}

/// Walks a key's chain back from `newest` to its state at `revision`.
fn as_of(
    conn: &Connection,
    mut row: LogRow,
    revision: Revision,
) -> rusqlite::Result<Option<KeyValue>> {
    while row.revision > revision {
        if row.prev_revision == 0 {
            return Ok(None);
        }
        match log_row(conn, row.prev_revision)? {
            Some(prev) => row = prev,
            // Compacted away: only deletion markers and rows superseded before the
            // compaction point go, so the key did not exist at `revision`.
            None => return Ok(None),
        }
    }
    Ok(row.key_value())
}

/// The newest row of `key` (a value or a deletion marker), inside a transaction; used by the
/// writer too.
pub(super) fn newest(conn: &Connection, key: &str) -> rusqlite::Result<Option<LogRow>> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "SELECT {} FROM kv JOIN log ON log.revision = kv.mod_revision WHERE kv.key = ?1",
            log_columns("log")
        )
    });
    conn.prepare_cached(&SQL)?
        .query_row([key.as_bytes()], |r| LogRow::from_row(r, 0))
        .optional()
}

/// See [`crate::Store::get`].
pub(super) fn get(
    conn: &Connection,
    path: &Path,
    key: &str,
    revision: Option<Revision>,
) -> Result<(Revision, Option<KeyValue>)> {
    let err = |e| sqlite_error(path, e);
    let (tx, snapshot) = begin(conn, path)?;
    let at = revision.filter(|r| *r > 0).unwrap_or(snapshot.current);
    check_revision(&snapshot, at)?;
    let kv = match newest(&tx, key).map_err(err)? {
        Some(row) => as_of(&tx, row, at).map_err(err)?,
        None => None,
    };
    Ok((at, kv))
}

/// See [`crate::Store::list`].
pub(super) fn list(
    conn: &Connection,
    path: &Path,
    prefix: &str,
    options: &ListOptions,
) -> Result<ListPage> {
    let err = |e| sqlite_error(path, e);
    let (tx, snapshot) = begin(conn, path)?;
    let end = prefix_end(prefix.as_bytes());
    let end: &[u8] = end.as_deref().unwrap_or(NO_END);
    // Keys strictly after `start_after`, or from the prefix itself.
    let (start, op) = match &options.start_after {
        Some(after) => (after.as_bytes(), ">"),
        None => (prefix.as_bytes(), ">="),
    };
    let limit = options.limit.filter(|l| *l > 0);
    let revision = options
        .revision
        .filter(|r| *r > 0)
        .unwrap_or(snapshot.current);
    check_revision(&snapshot, revision)?;

    let mut kvs = Vec::new();
    let mut more = false;
    if revision == snapshot.current {
        // One more than asked, to learn whether more remain.
        let fetch = limit.map_or(-1, |l| l as i64 + 1);
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {} FROM kv JOIN log ON log.revision = kv.mod_revision
                 WHERE kv.key {op} ?1 AND kv.key < ?2 AND kv.deleted = 0
                 ORDER BY kv.key LIMIT ?3",
                log_columns("log")
            ))
            .map_err(err)?;
        let mut rows = stmt.query(params![start, end, fetch]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            kvs.extend(LogRow::from_row(row, 0).map_err(err)?.key_value());
        }
        if let Some(l) = limit {
            more = kvs.len() > l;
            kvs.truncate(l);
        }
    } else {
        // Every key that has a chain, deleted ones included: each one's state at `revision`.
        let mut stmt = tx
            .prepare_cached(&format!(
                "SELECT {} FROM kv JOIN log ON log.revision = kv.mod_revision
                 WHERE kv.key {op} ?1 AND kv.key < ?2 ORDER BY kv.key",
                log_columns("log")
            ))
            .map_err(err)?;
        let mut rows = stmt.query(params![start, end]).map_err(err)?;
        while let Some(row) = rows.next().map_err(err)? {
            let newest = LogRow::from_row(row, 0).map_err(err)?;
            if let Some(kv) = as_of(&tx, newest, revision).map_err(err)? {
                if limit.is_some_and(|l| kvs.len() == l) {
                    more = true;
                    break;
                }
                kvs.push(kv);
            }
        }
    }
    Ok(ListPage {
        revision,
        kvs,
        more,
    })
}

/// See [`crate::Store::count`].
pub(super) fn count(conn: &Connection, path: &Path, prefix: &str) -> Result<(Revision, u64)> {
    let (tx, snapshot) = begin(conn, path)?;
    let end = prefix_end(prefix.as_bytes());
    let end: &[u8] = end.as_deref().unwrap_or(NO_END);
    let n: i64 = tx
        .prepare_cached("SELECT COUNT(*) FROM kv WHERE key >= ?1 AND key < ?2 AND deleted = 0")
        .and_then(|mut s| s.query_row(params![prefix.as_bytes(), end], |r| r.get(0)))
        .map_err(|e| sqlite_error(path, e))?;
    Ok((snapshot.current, n as u64))
}

/// The watch event a `log` row records, given the row its `prev_revision` names.
pub(super) fn event(row: &LogRow, prev: Option<&LogRow>) -> Event {
    let kind = if row.deleted {
        EventKind::Delete
    } else if row.version == 1 {
        EventKind::Create
    } else {
        EventKind::Update
    };
    let kv = row.key_value().unwrap_or_else(|| KeyValue {
        // A deletion, reported as etcd does: the key and the deletion's revision.
        key: String::from_utf8_lossy(&row.key).into_owned(),
        value: Bytes::new(),
        create_revision: 0,
        mod_revision: row.revision,
        version: 0,
    });
    let prev = match kind {
        EventKind::Create => None,
        EventKind::Update | EventKind::Delete => prev.and_then(LogRow::key_value),
    };
    Event { kind, kv, prev }
}

/// Up to `limit` changes under `prefix` with revisions after `after`, in revision order,
/// each with the key's previous state. Fails with `Compacted` if changes right after `after`
/// are gone.
pub(super) fn history(
    conn: &Connection,
    path: &Path,
    prefix: &str,
    after: Revision,
    limit: usize,
) -> Result<Vec<Event>> {
    let err = |e| sqlite_error(path, e);
    let (tx, snapshot) = begin(conn, path)?;
    if after + 1 < snapshot.compacted {
        return Err(Error::Compacted {
            requested: after + 1,
            oldest: snapshot.compacted,
        });
    }
    let end = prefix_end(prefix.as_bytes());
    let end: &[u8] = end.as_deref().unwrap_or(NO_END);
    let mut stmt = tx
        .prepare_cached(&format!(
            "SELECT {}, {} FROM log l LEFT JOIN log p ON p.revision = l.prev_revision
             WHERE l.revision > ?1 AND l.key >= ?2 AND l.key < ?3
             ORDER BY l.revision LIMIT ?4",
            log_columns("l"),
            log_columns("p")
        ))
        .map_err(err)?;
    let rows = stmt
        .query_map(
            params![after, prefix.as_bytes(), end, limit as i64],
            |row| {
                let changed = LogRow::from_row(row, 0)?;
                let prev = match row.get::<_, Option<i64>>(7)? {
                    Some(_) => Some(LogRow::from_row(row, 7)?),
                    None => None,
                };
                Ok(event(&changed, prev.as_ref()))
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(err)?;
    Ok(rows)
}
