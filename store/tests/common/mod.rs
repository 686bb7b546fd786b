//! Shared by the store's integration tests: one constructor per backend, each returning a
//! fresh, empty store and whatever keeps it alive.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};
use orquestra_store::testing::EtcdProcess;
use orquestra_store::{Error, Store, WatchEvent, WatchStream};

/// A store under test and what must outlive it.
pub struct Harness {
    pub store: Arc<dyn Store>,
    _keep: Box<dyn std::any::Any + Send>,
}

/// A fresh SQLite store in a temporary directory.
pub async fn sqlite() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("state.db"), SqliteOptions::default()).unwrap();
    Harness {
        store: Arc::new(store),
        _keep: Box::new(dir),
    }
}

/// A fresh etcd, started for this test alone (compaction is cluster-wide, so tests cannot
/// share one).
pub async fn etcd() -> Harness {
    let etcd = EtcdProcess::start().await.expect("start etcd");
    let store = etcd.store().await.unwrap();
    Harness {
        store: Arc::new(store),
        _keep: Box::new(etcd),
    }
}

/// The next item of a watch, failing the test after 10 s.
pub async fn next(stream: &mut WatchStream) -> Option<Result<WatchEvent, Error>> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("watch produced nothing within 10s")
}

/// The next change of a watch, skipping progress notifications.
pub async fn next_change(stream: &mut WatchStream) -> orquestra_store::Event {
    loop {
        match next(stream).await {
            Some(Ok(WatchEvent::Change(event))) => return event,
            Some(Ok(WatchEvent::Progress(_))) => continue,
            other => panic!("expected a change, got {other:?}"),
        }
    }
}
