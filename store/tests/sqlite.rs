//! What only the embedded backend has: a file that persists, a process lock, corruption
//! detection, group commit, in-process watchers that catch up from disk, and history
//! trimming by compaction.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};
use orquestra_store::{Error, ListOptions, Store, WatchEvent};

fn open(path: &Path) -> SqliteStore {
    SqliteStore::open(path, SqliteOptions::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopening_keeps_data_revision_and_compaction_point() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dir/state.db");
    let (kv, compacted_at) = {
        let store = open(&path);
        let kv = store.create("/a", Bytes::from_static(b"1")).await.unwrap();
        let kv = store
            .update("/a", Bytes::from_static(b"2"), kv.mod_revision)
            .await
            .unwrap();
        store.create("/b", Bytes::from_static(b"x")).await.unwrap();
        let at = store.current_revision().await.unwrap();
        store.compact(at).await.unwrap();
        (kv, at)
    };
    let store = open(&path);
    assert_eq!(store.current_revision().await.unwrap(), compacted_at);
    assert_eq!(store.get("/a", None).await.unwrap().1.unwrap(), kv);
    assert!(matches!(
        store.get("/a", Some(kv.mod_revision)).await,
        Err(Error::Compacted { oldest, .. }) if oldest == compacted_at
    ));
    let next = store.create("/c", Bytes::new()).await.unwrap();
    assert_eq!(
        next.mod_revision,
        compacted_at + 1,
        "revisions continue after reopening"
    );
}

#[tokio::test]
async fn a_second_opener_is_refused_with_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let first = open(&path);
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(Error::Locked { path: locked }) => assert_eq!(locked, path),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    open(&path);
}

#[test]
fn a_file_that_is_not_a_database_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(error @ Error::Corrupt { .. }) => {
            assert!(error.to_string().contains("corrupt"), "{error}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn someone_elses_database_is_incompatible() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.execute_batch("CREATE TABLE invoices (id INTEGER)")
        .unwrap();
    drop(conn);
    assert!(matches!(
        SqliteStore::open(&path, SqliteOptions::default()),
        Err(Error::Incompatible { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_pages_surface_as_corrupt_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let store = open(&path);
        for i in 0..200 {
            store
                .create(&format!("/k/{i:04}"), Bytes::from(vec![1u8; 2000]))
                .await
                .unwrap();
        }
    }
    // All connections are closed, so the WAL has been checkpointed into the file. Overwrite
    // everything after the first page (the schema) with garbage.
    let mut bytes = std::fs::read(&path).unwrap();
    assert!(bytes.len() > 3 * 4096, "database has several pages");
    for byte in &mut bytes[4096..] {
        *byte = 0xa5;
    }
    std::fs::write(&path, &bytes).unwrap();
    match SqliteStore::open(&path, SqliteOptions::default()) {
        Err(Error::Corrupt { .. }) => {}
        Ok(store) => {
            let read = store.list("/k/", &ListOptions::default()).await;
            assert!(matches!(read, Err(Error::Corrupt { .. })), "{read:?}");
        }
        Err(other) => panic!("expected Corrupt, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_share_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(&dir.path().join("state.db")));
    let writers: Vec<_> = (0..64)
        .map(|w| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                for i in 0..20 {
                    store
                        .create(&format!("/g/{w}/{i}"), Bytes::from_static(b"v"))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let stats = store.stats();
    assert_eq!(stats.writes, 64 * 20);
    assert!(
        stats.commits * 4 < stats.writes,
        "64 concurrent writers should average more than 4 writes per fsync: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_watcher_catches_up_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        watch_buffer: 2,
        ..SqliteOptions::default()
    };
    let store = Arc::new(SqliteStore::open(&dir.path().join("state.db"), options).unwrap());
    let mut watch = store.watch("/slow/", 0).await.unwrap();
    // Many small commits while nobody reads: the broadcast buffer overflows.
    let mut written = Vec::new();
    for i in 0..300 {
        written.push(
            store
                .create(&format!("/slow/{i:03}"), Bytes::from_static(b"v"))
                .await
                .unwrap()
                .mod_revision,
        );
    }
    let mut seen = Vec::new();
    while seen.len() < written.len() {
        match common::next(&mut watch).await {
            Some(Ok(WatchEvent::Change(event))) => seen.push(event.revision()),
            Some(Ok(WatchEvent::Progress(_))) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(seen, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_end_when_the_store_closes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("state.db"));
    let mut watch = store.watch("/", 0).await.unwrap();
    drop(store);
    let item = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap();
    assert!(matches!(item, Some(Err(Error::Closed))), "{item:?}");
    assert!(watch.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_trims_superseded_history() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let store = open(&path);
    let mut kv = store
        .create("/hot", Bytes::from_static(b"0"))
        .await
        .unwrap();
    for i in 1..=2500 {
        kv = store
            .update("/hot", Bytes::from(i.to_string()), kv.mod_revision)
            .await
            .unwrap();
    }
    let doomed = store.create("/doomed", Bytes::new()).await.unwrap();
    store
        .delete("/doomed", Some(doomed.mod_revision))
        .await
        .unwrap();
    let rows = || -> i64 {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.query_row("SELECT COUNT(*) FROM log", [], |r| r.get(0))
            .unwrap()
    };
    assert_eq!(rows(), 2503);
    store
        .compact(store.current_revision().await.unwrap())
        .await
        .unwrap();
    // The writer trims in chunks while idle. What stays: the current row of /hot; the
    // deletion of /doomed, which is the compaction revision itself (a watch from there
    // still reports it); and the row it deleted, that event's previous value.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rows() > 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "history not trimmed: {} rows",
            rows()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.get("/hot", None).await.unwrap().1.unwrap(), kv);
    assert_eq!(store.get("/doomed", None).await.unwrap().1, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_by_url() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("state.db").display());
    let store = orquestra_store::open(&url).await.unwrap();
    store.create("/x", Bytes::new()).await.unwrap();
    assert!(matches!(
        orquestra_store::open("postgres://nope").await,
        Err(Error::InvalidArgument { .. })
    ));
}

/// Mounts a tmpfs of `size` at a fresh directory; unmounted (by path) when dropped.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "orquestra-test",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount tmpfs (tests run as root)");
        SmallDisk { dir }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_cleanly_and_loses_nothing_acknowledged() {
    let disk = SmallDisk::mount("4m");
    let path = disk.dir.path().join("state.db");
    let mut acknowledged = Vec::new();
    {
        let store = open(&path);
        let error = loop {
            let key = format!("/fill/{:05}", acknowledged.len());
            match store.create(&key, Bytes::from(vec![7u8; 16 * 1024])).await {
                Ok(kv) => acknowledged.push(kv),
                Err(error) => break error,
            }
            assert!(acknowledged.len() < 10_000, "a 4 MiB disk never filled up");
        };
        assert!(
            matches!(error, Error::Sqlite { .. }),
            "a full disk is a typed SQLite error: {error:?}"
        );
        assert!(error.to_string().contains("state.db"), "{error}");
        // Reads still work, and see exactly the acknowledged writes.
        let (_, n) = store.count("/fill/").await.unwrap();
        assert_eq!(n as usize, acknowledged.len());
    }
    assert!(
        acknowledged.len() > 10,
        "some writes fit before the disk filled"
    );
    // After reopening on the still-full disk, every acknowledged write is there.
    let store = open(&path);
    for kv in &acknowledged {
        assert_eq!(&store.get(&kv.key, None).await.unwrap().1.unwrap(), kv);
    }
}
