//! Read queries. Each runs inside one read transaction, so the revision it reports and the
//! rows it returns come from the same snapshot (WAL readers see a fixed point in history).

use std::path::Path;

use bytes::Bytes;
use rusqlite::{Connection, Row, params};

use super::sqlite_error;
use crate::error::{Error, Result};
use crate::kv::{Event, EventKind, KeyValue, Revision};
use crate::limits::prefix_end;
use crate::store::{ListOptions, ListPage};

/// Upper bound for "no upper bound": larger than any key we accept.
const NO_END: &[u8] = &[0xff; crate::limits::MAX_KEY_BYTES + 1];

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
        .query_row("SELECT COALESCE(MAX(revision), 0) FROM log", [], |r| {
            r.get(0)
        })
        .map_err(err)?;
    let compacted = tx
        .query_row(
            "SELECT value FROM meta WHERE name = 'compact_revision'",
            [],
            |r| r.get(0),
        )
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

/// Decodes `(key, create_revision, mod_revision, version, value)`.
fn key_value(row: &Row<'_>) -> rusqlite::Result<KeyValue> {
    let key: Vec<u8> = row.get(0)?;
    let value: Option<Vec<u8>> = row.get(4)?;
    Ok(KeyValue {
        key: String::from_utf8_lossy(&key).into_owned(),
        create_revision: row.get(1)?,
        mod_revision: row.get(2)?,
        version: row.get(3)?,
        value: Bytes::from(value.unwrap_or_default()),
    })
}

/// The key's latest state, inside a transaction (used by the writer too).
pub(super) fn current(conn: &Connection, key: &str) -> rusqlite::Result<Option<KeyValue>> {
    let mut stmt = conn.prepare_cached(
        "SELECT l.key, l.create_revision, l.revision, l.version, l.value
         FROM kv k JOIN log l ON l.revision = k.mod_revision
         WHERE k.key = ?1",
    )?;
    let mut rows = stmt.query([key.as_bytes()])?;
    rows.next()?.map(key_value).transpose()
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
    let kv = match revision.filter(|r| *r > 0 && *r != snapshot.current) {
        None => current(&tx, key).map_err(err)?,
        Some(revision) => {
            check_revision(&snapshot, revision)?;
            let mut stmt = tx
                .prepare_cached(
                    "SELECT key, create_revision, revision, version, value, deleted FROM log
                     WHERE key = ?1 AND revision <= ?2 ORDER BY revision DESC LIMIT 1",
                )
                .map_err(err)?;
            let mut rows = stmt.query(params![key.as_bytes(), revision]).map_err(err)?;
            match rows.next().map_err(err)? {
                Some(row) if row.get::<_, i64>(5).map_err(err)? == 0 => {
                    Some(key_value(row).map_err(err)?)
                }
                _ => None,
            }
        }
    };
    let at = revision.filter(|r| *r > 0).unwrap_or(snapshot.current);
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
    let (start, inclusive) = match &options.start_after {
        Some(after) => (after.as_bytes(), false),
        None => (prefix.as_bytes(), true),
    };
    let limit = options.limit.filter(|l| *l > 0);
    // One more than asked, to learn whether more remain.
    let fetch = limit.map_or(-1, |l| l as i64 + 1);
    let revision = options
        .revision
        .filter(|r| *r > 0)
        .unwrap_or(snapshot.current);
    check_revision(&snapshot, revision)?;

    let mut kvs = if revision == snapshot.current {
        let sql = format!(
            "SELECT l.key, l.create_revision, l.revision, l.version, l.value
             FROM kv k JOIN log l ON l.revision = k.mod_revision
             WHERE k.key {} ?1 AND k.key < ?2 ORDER BY k.key LIMIT ?3",
            if inclusive { ">=" } else { ">" }
        );
        let mut stmt = tx.prepare_cached(&sql).map_err(err)?;
        stmt.query_map(params![start, end, fetch], key_value)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(err)?
    } else {
        // The newest row of each key at or before `revision`, if it is not a deletion.
        let sql = format!(
            "SELECT l.key, l.create_revision, l.revision, l.version, l.value
             FROM log l
             WHERE l.key {} ?1 AND l.key < ?2 AND l.revision <= ?3 AND l.deleted = 0
               AND l.revision = (SELECT MAX(m.revision) FROM log m
                                 WHERE m.key = l.key AND m.revision <= ?3)
             ORDER BY l.key LIMIT ?4",
            if inclusive { ">=" } else { ">" }
        );
        let mut stmt = tx.prepare_cached(&sql).map_err(err)?;
        stmt.query_map(params![start, end, revision, fetch], key_value)
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(err)?
    };
    let more = limit.is_some_and(|l| kvs.len() > l);
    if let Some(l) = limit {
        kvs.truncate(l);
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
        .query_row(
            "SELECT COUNT(*) FROM kv WHERE key >= ?1 AND key < ?2",
            params![prefix.as_bytes(), end],
            |r| r.get(0),
        )
        .map_err(|e| sqlite_error(path, e))?;
    Ok((snapshot.current, n as u64))
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
        .prepare_cached(
            "SELECT l.key, l.create_revision, l.revision, l.version, l.value,
                    l.deleted, l.prev_revision,
                    p.create_revision, p.revision, p.version, p.value
             FROM log l LEFT JOIN log p ON p.revision = l.prev_revision AND l.prev_revision > 0
             WHERE l.revision > ?1 AND l.key >= ?2 AND l.key < ?3
             ORDER BY l.revision LIMIT ?4",
        )
        .map_err(err)?;
    let rows = stmt
        .query_map(
            params![after, prefix.as_bytes(), end, limit as i64],
            |row| {
                let kv = key_value(row)?;
                let deleted: i64 = row.get(5)?;
                let prev_revision: i64 = row.get(6)?;
                let prev = match row.get::<_, Option<i64>>(8)? {
                    Some(mod_revision) => Some(KeyValue {
                        key: kv.key.clone(),
                        create_revision: row.get(7)?,
                        mod_revision,
                        version: row.get(9)?,
                        value: Bytes::from(row.get::<_, Option<Vec<u8>>>(10)?.unwrap_or_default()),
                    }),
                    None => None,
                };
                let kind = match (deleted, prev_revision) {
                    (0, 0) => EventKind::Create,
                    (0, _) => EventKind::Update,
                    _ => EventKind::Delete,
                };
                Ok(Event { kind, kv, prev })
            },
        )
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(err)?;
    Ok(rows)
}
