//! The embedded backend: one SQLite file in WAL mode.
//!
//! Layout: `log` holds one row per revision (the history, trimmed by compaction); each row
//! links to the previous row of its key (`prev_revision`), so a key's history is a chain.
//! `kv` maps every key to its newest row — a value, or a deletion marker until compaction
//! drops it. `meta` keeps the schema version and the compaction point. There is no index on
//! `log.key`: it would add a second randomly placed page to every write (measured: about a
//! third of the write throughput); past revisions are read by walking the chains instead. All writes go through one writer thread ([`writer`]) that
//! commits whatever has queued up as one transaction — one fsync for many writers (group
//! commit) — and then hands the committed events to in-process watchers ([`watch`]) without
//! any polling. Reads run on a small pool of connections on the blocking thread pool.
//!
//! Only one process may open the file: an exclusive `flock` on `<file>.lock`, held by the
//! writer thread for as long as it runs, turns a second opener into [`Error::Locked`].

mod read;
mod watch;
mod writer;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rusqlite::config::DbConfig;
use rusqlite::{Connection, ErrorCode, OpenFlags};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::{Error, Result};
use crate::kv::{KeyValue, Revision};
use crate::limits::{check_key, check_prefix, check_value};
use crate::store::{ListOptions, ListPage, Store, WatchStream};

use writer::{Committed, Op, Reply, Request};

/// The schema this code reads and writes; stored in `meta`.
const SCHEMA_VERSION: i64 = 1;

/// Tuning of the SQLite backend. The defaults suit the API server.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// Most writes committed in one transaction (one fsync).
    pub max_batch: usize,
    /// Writes that may wait for the writer before callers are made to wait (backpressure).
    pub queue_depth: usize,
    /// Committed batches buffered for watchers; a watcher further behind catches up from the
    /// database instead.
    pub watch_buffer: usize,
    /// A watcher that has had nothing to deliver for this long is told the current revision
    /// ([`crate::WatchEvent::Progress`]) at the next commit.
    pub progress_interval: Duration,
    /// How often the WAL is checkpointed into the database file (off the write path).
    pub checkpoint_interval: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            max_batch: 1024,
            queue_depth: 8192,
            watch_buffer: 1024,
            progress_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_millis(500),
        }
    }
}

/// State shared by the store handle, the writer thread and the watchers.
struct Shared {
    path: PathBuf,
    options: SqliteOptions,
    /// Idle read connections.
    readers: Mutex<Vec<Connection>>,
    /// The latest committed revision.
    current: AtomicI64,
    /// Reads and watches from before this revision fail with `Compacted`.
    compacted: AtomicI64,
    /// Where watchers subscribe; `None` once the store is closed, so watchers end.
    events: Mutex<Option<broadcast::Sender<Arc<Committed>>>>,
    /// Transactions committed by the writer.
    commits: AtomicU64,
    /// Writes (creates, updates, deletes) those transactions made.
    writes: AtomicU64,
}

/// Counters of the writer, for metrics and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SqliteStats {
    /// Transactions committed (each one fsync of the WAL).
    pub commits: u64,
    /// Successful writes; `writes / commits` is the mean group-commit batch.
    pub writes: u64,
}

/// The embedded SQLite store. See the module docs.
pub struct SqliteStore {
    shared: Arc<Shared>,
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
    checkpointer: Option<(std::sync::mpsc::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .field("revision", &self.shared.current.load(Ordering::Acquire))
            .finish()
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the store in the SQLite file at `path`.
    ///
    /// Fails with `Locked` if another process has it open, `Corrupt` if the file is not a
    /// readable SQLite database, `Incompatible` if it is someone else's database.
    pub fn open(path: &Path, options: SqliteOptions) -> Result<SqliteStore> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Io { path, source }
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        let lock = lock_exclusively(path)?;

        let conn = open_connection(path)?;
        let (current, compacted) = init_schema(&conn, path)?;
        // The database and WAL files may be new: make their directory entries durable too.
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(dir))?;
        }

        let (events, _) = broadcast::channel(options.watch_buffer.max(1));
        let shared = Arc::new(Shared {
            path: path.to_owned(),
            options: options.clone(),
            readers: Mutex::new(Vec::new()),
            current: AtomicI64::new(current),
            compacted: AtomicI64::new(compacted),
            events: Mutex::new(Some(events.clone())),
            commits: AtomicU64::new(0),
            writes: AtomicU64::new(0),
        });

        let (requests, queue) = mpsc::channel(options.queue_depth.max(1));
        let writer =
            writer::spawn(conn, lock, queue, events, Arc::clone(&shared)).map_err(io_err(path))?;
        let checkpointer = spawn_checkpointer(path, options.checkpoint_interval)?;
        Ok(SqliteStore {
            shared,
            requests: Some(requests),
            writer: Some(writer),
            checkpointer: Some(checkpointer),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// The writer's counters since open.
    pub fn stats(&self) -> SqliteStats {
        SqliteStats {
            commits: self.shared.commits.load(Ordering::Relaxed),
            writes: self.shared.writes.load(Ordering::Relaxed),
        }
    }

    async fn write(&self, op: Op) -> Result<Reply> {
        let (reply, response) = oneshot::channel();
        let requests = self.requests.as_ref().ok_or(Error::Closed)?;
        requests
            .send(Request { op, reply })
            .await
            .map_err(|_| Error::Closed)?;
        response.await.map_err(|_| Error::Closed)?
    }

    /// Runs `f` with a pooled read connection on the blocking thread pool.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Path) -> Result<T> + Send + 'static,
    {
        read_with(Arc::clone(&self.shared), f).await
    }
}

/// Runs `f` with a pooled read connection of `shared` on the blocking thread pool.
async fn read_with<T, F>(shared: Arc<Shared>, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce(&Connection, &Path) -> Result<T> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let pooled = shared.readers.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&shared.path)?,
        };
        let result = f(&conn, &shared.path);
        if let Ok(mut idle) = shared.readers.lock() {
            if idle.len() < 16 {
                idle.push(conn);
            }
        }
        result
    })
    .await
    .map_err(|_| Error::Closed)?
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the queue lets the writer finish what it has and exit; joining it means the
        // lock is released (and every queued write settled) when `drop` returns.
        self.requests.take();
        if let Ok(mut events) = self.shared.events.lock() {
            events.take();
        }
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
        if let Some((stop, checkpointer)) = self.checkpointer.take() {
            drop(stop);
            let _ = checkpointer.join();
        }
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn get(
        &self,
        key: &str,
        revision: Option<Revision>,
    ) -> Result<(Revision, Option<KeyValue>)> {
        check_key(key)?;
        let key = key.to_owned();
        self.read(move |conn, path| read::get(conn, path, &key, revision))
            .await
    }

    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListPage> {
        check_prefix(prefix)?;
        if let Some(after) = &options.start_after {
            if !after.starts_with(prefix) {
                return Err(Error::InvalidArgument {
                    message: format!("continuation key {after:?} is outside prefix {prefix:?}"),
                });
            }
        }
        let prefix = prefix.to_owned();
        let options = options.clone();
        self.read(move |conn, path| read::list(conn, path, &prefix, &options))
            .await
    }

    async fn count(&self, prefix: &str) -> Result<(Revision, u64)> {
        check_prefix(prefix)?;
        let prefix = prefix.to_owned();
        self.read(move |conn, path| read::count(conn, path, &prefix))
            .await
    }

    async fn create(&self, key: &str, value: Bytes) -> Result<KeyValue> {
        check_key(key)?;
        check_value(key, &value)?;
        match self
            .write(Op::Create {
                key: key.to_owned(),
                value,
            })
            .await?
        {
            Reply::Put(kv) => Ok(kv),
            other => unreachable_reply(other),
        }
    }

    async fn update(&self, key: &str, value: Bytes, expected: Revision) -> Result<KeyValue> {
        check_key(key)?;
        check_value(key, &value)?;
        match self
            .write(Op::Update {
                key: key.to_owned(),
                value,
                expected,
            })
            .await?
        {
            Reply::Put(kv) => Ok(kv),
            other => unreachable_reply(other),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        check_key(key)?;
        match self
            .write(Op::Delete {
                key: key.to_owned(),
                expected,
            })
            .await?
        {
            Reply::Deleted(revision, prev) => Ok((revision, prev)),
            other => unreachable_reply(other),
        }
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        check_prefix(prefix)?;
        if after < 0 {
            return Err(Error::InvalidArgument {
                message: format!("watch revision {after} is negative"),
            });
        }
        watch::start(Arc::clone(&self.shared), prefix.to_owned(), after)
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        match self.write(Op::Compact { revision }).await? {
            Reply::Compacted => Ok(()),
            other => unreachable_reply(other),
        }
    }

    async fn current_revision(&self) -> Result<Revision> {
        if self.requests.is_none() {
            return Err(Error::Closed);
        }
        Ok(self.shared.current.load(Ordering::Acquire))
    }

    async fn size(&self) -> Result<u64> {
        self.read(|conn, path| {
            let pages: i64 = conn
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(|e| sqlite_error(path, e))?;
            let page_size: i64 = conn
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .map_err(|e| sqlite_error(path, e))?;
            Ok((pages * page_size) as u64)
        })
        .await
    }
}

/// The writer answers each op with its own reply variant; anything else is a bug in this
/// module, reported as an error rather than a panic.
fn unreachable_reply<T>(reply: Reply) -> Result<T> {
    Err(Error::InvalidArgument {
        message: format!("internal error: unexpected writer reply {reply:?}"),
    })
}

/// Maps a SQLite error on `path` to the store's error: corruption and lock contention get
/// their own variants.
fn sqlite_error(path: &Path, source: rusqlite::Error) -> Error {
    match source.sqlite_error_code() {
        Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => Error::Corrupt {
            path: path.to_owned(),
            source: Arc::new(source),
        },
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => Error::Locked {
            path: path.to_owned(),
        },
        _ => Error::Sqlite {
            path: path.to_owned(),
            source: Arc::new(source),
        },
    }
}

/// Takes the exclusive lock that makes this process the file's only user.
fn lock_exclusively(path: &Path) -> Result<File> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| Error::Io {
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let source = std::io::Error::last_os_error();
        return Err(if source.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Error::Locked {
                path: path.to_owned(),
            }
        } else {
            Error::Io {
                path: lock_path,
                source,
            }
        });
    }
    Ok(file)
}

/// Opens a connection with the settings every connection needs.
fn open_connection(path: &Path) -> Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sqlite_error(path, e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| sqlite_error(path, e))?;
    // Query-planner stability: plans never depend on bound values, so cached statements are
    // not re-prepared each time a key changes (measured: most of the writer's time).
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .map_err(|e| sqlite_error(path, e))?;
    // WAL: readers never block the writer. synchronous=FULL: the WAL is fsynced at every
    // commit, so an acknowledged write survives power loss. Checkpoints run on their own
    // thread, off the write path.
    let mode: String = conn
        .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
        .map_err(|e| sqlite_error(path, e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Incompatible {
            path: path.to_owned(),
            reason: format!("could not switch to WAL mode (journal mode is {mode})"),
        });
    }
    conn.execute_batch(
        "PRAGMA synchronous=FULL;
         PRAGMA wal_autocheckpoint=0;
         PRAGMA journal_size_limit=16777216;",
    )
    .map_err(|e| sqlite_error(path, e))?;
    Ok(conn)
}

/// Opens a pooled read connection.
fn open_reader(path: &Path) -> Result<Connection> {
    let conn = open_connection(path)?;
    conn.execute_batch("PRAGMA query_only=1")
        .map_err(|e| sqlite_error(path, e))?;
    Ok(conn)
}

/// Creates the schema on a new database, checks it on an existing one, and returns the
/// current and the compacted revision.
fn init_schema(conn: &Connection, path: &Path) -> Result<(Revision, Revision)> {
    let err = |e| sqlite_error(path, e);
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table'")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(err)?;
    if tables.is_empty() {
        conn.execute_batch(&format!(
            "BEGIN;
             CREATE TABLE log (
                 revision        INTEGER PRIMARY KEY,
                 key             BLOB    NOT NULL,
                 deleted         INTEGER NOT NULL,
                 create_revision INTEGER NOT NULL,
                 prev_revision   INTEGER NOT NULL,
                 version         INTEGER NOT NULL,
                 value           BLOB
             );
             CREATE TABLE kv (
                 key          BLOB    PRIMARY KEY,
                 mod_revision INTEGER NOT NULL,
                 deleted      INTEGER NOT NULL
             ) WITHOUT ROWID;
             CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('schema_version', {SCHEMA_VERSION}), ('compact_revision', 0);
             COMMIT;"
        ))
        .map_err(err)?;
    } else if !tables.iter().any(|t| t == "meta") {
        return Err(Error::Incompatible {
            path: path.to_owned(),
            reason: format!("unexpected tables {tables:?}"),
        });
    }
    let meta = |name: &str| -> Result<Option<i64>> {
        match conn.query_row("SELECT value FROM meta WHERE name = ?1", [name], |r| {
            r.get(0)
        }) {
            Ok(v) => Ok(Some(v)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok(None),
            Err(e) => Err(sqlite_error(path, e)),
        }
    };
    match meta("schema_version")? {
        Some(SCHEMA_VERSION) => {}
        other => {
            return Err(Error::Incompatible {
                path: path.to_owned(),
                reason: format!("schema version {other:?}, expected {SCHEMA_VERSION}"),
            });
        }
    }
    let compacted = meta("compact_revision")?.unwrap_or(0);
    let current: Revision = conn
        .query_row("SELECT COALESCE(MAX(revision), 0) FROM log", [], |r| {
            r.get(0)
        })
        .map_err(err)?;
    Ok((current, compacted))
}

/// Copies the store at `path` into a new database file `to` with SQLite's online backup API,
/// while a running server keeps writing (it reads a consistent snapshot; in WAL mode it
/// never blocks the writer), and returns the copy's revision. `to` must not exist.
pub fn backup(path: &Path, to: &Path) -> Result<Revision> {
    if to.exists() {
        return Err(Error::Io {
            path: to.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
        });
    }
    let source = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| sqlite_error(path, e))?;
    source
        .busy_timeout(Duration::from_secs(5))
        .map_err(|e| sqlite_error(path, e))?;
    // Not someone else's database, nor another schema version.
    init_schema(&source, path)?;
    let mut copy = Connection::open(to).map_err(|e| sqlite_error(to, e))?;
    {
        let backup =
            rusqlite::backup::Backup::new(&source, &mut copy).map_err(|e| sqlite_error(to, e))?;
        // All pages in one step: one consistent snapshot, however busy the writer is (a
        // step over several calls restarts whenever the source changes in between).
        loop {
            use rusqlite::backup::StepResult;
            match backup.step(-1).map_err(|e| sqlite_error(to, e))? {
                StepResult::Done => break,
                StepResult::More | StepResult::Busy | StepResult::Locked => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }
    let (revision, _) = init_schema(&copy, to)?;
    // The copy is a plain rollback-journal file until a store opens it (then WAL): make it
    // durable before anyone relies on it.
    drop(copy);
    File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(|source| Error::Io {
            path: to.to_owned(),
            source,
        })?;
    Ok(revision)
}

/// Checkpoints the WAL into the database file every `interval` on its own connection and
/// thread, so the writer never pays for it. Stops when the returned sender is dropped.
fn spawn_checkpointer(
    path: &Path,
    interval: Duration,
) -> Result<(std::sync::mpsc::Sender<()>, JoinHandle<()>)> {
    let conn = open_connection(path)?;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(interval)
            {
                if let Err(error) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                {
                    tracing::warn!(%error, "WAL checkpoint failed");
                }
            }
        })
        .map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
    Ok((stop, thread))
}
