//! The store contract, run unchanged against every backend: the embedded SQLite store and a
//! real etcd started on loopback for each test. Revisions are only compared relative to each
//! other, never to absolute numbers: etcd starts its history at 1, SQLite at 0.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use orquestra_store::{
    Error, EventKind, ListOptions, MAX_KEY_BYTES, MAX_VALUE_BYTES, Store, WatchEvent,
};

use common::{next, next_change};

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn create_and_get(store: &Arc<dyn Store>) {
    let before = store.current_revision().await.unwrap();
    let a = store.create("/r/a", b("1")).await.unwrap();
    assert_eq!(
        a.mod_revision,
        before + 1,
        "each write takes the next revision"
    );
    assert_eq!(a.create_revision, a.mod_revision);
    assert_eq!(a.version, 1);
    let c = store.create("/r/c", b("3")).await.unwrap();
    assert_eq!(c.mod_revision, a.mod_revision + 1);
    assert_eq!(store.current_revision().await.unwrap(), c.mod_revision);

    let (at, got) = store.get("/r/a", None).await.unwrap();
    assert_eq!(at, c.mod_revision, "reads report the revision they saw");
    assert_eq!(got.unwrap(), a);
    assert_eq!(store.get("/r/b", None).await.unwrap().1, None);

    match store.create("/r/a", b("again")).await {
        Err(Error::AlreadyExists { key }) => assert_eq!(key, "/r/a"),
        other => panic!("expected AlreadyExists, got {other:?}"),
    }
    assert_eq!(
        store.get("/r/a", None).await.unwrap().1.unwrap().value,
        b("1")
    );
    assert_eq!(
        store.current_revision().await.unwrap(),
        c.mod_revision,
        "a refused write takes no revision"
    );
}

async fn update_is_compare_and_swap(store: &Arc<dyn Store>) {
    let v1 = store.create("/cas/k", b("v1")).await.unwrap();
    let v2 = store
        .update("/cas/k", b("v2"), v1.mod_revision)
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    assert_eq!(v2.create_revision, v1.create_revision);
    assert_eq!(v2.mod_revision, v1.mod_revision + 1);
    assert_eq!(v2.value, b("v2"));

    match store.update("/cas/k", b("stale"), v1.mod_revision).await {
        Err(Error::Conflict {
            key,
            expected,
            current,
        }) => {
            assert_eq!(key, "/cas/k");
            assert_eq!(expected, v1.mod_revision);
            assert_eq!(*current, v2, "a conflict carries the current state");
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    assert!(matches!(
        store.update("/cas/missing", b("x"), v1.mod_revision).await,
        Err(Error::NotFound { .. })
    ));
    assert_eq!(store.get("/cas/k", None).await.unwrap().1.unwrap(), v2);
}

async fn delete_and_recreate(store: &Arc<dyn Store>) {
    let v1 = store.create("/del/k", b("v1")).await.unwrap();
    let v2 = store
        .update("/del/k", b("v2"), v1.mod_revision)
        .await
        .unwrap();
    assert!(matches!(
        store.delete("/del/k", Some(v1.mod_revision)).await,
        Err(Error::Conflict { current, .. }) if *current == v2
    ));
    let (revision, prev) = store.delete("/del/k", Some(v2.mod_revision)).await.unwrap();
    assert_eq!(revision, v2.mod_revision + 1);
    assert_eq!(prev, v2, "delete returns the last state");
    assert_eq!(store.get("/del/k", None).await.unwrap().1, None);
    assert!(matches!(
        store.delete("/del/k", None).await,
        Err(Error::NotFound { .. })
    ));

    let again = store.create("/del/k", b("v3")).await.unwrap();
    assert_eq!(again.version, 1, "a recreated key starts a new incarnation");
    assert_eq!(again.create_revision, again.mod_revision);
    let (_, prev) = store.delete("/del/k", None).await.unwrap();
    assert_eq!(prev, again, "an unconditional delete works too");
}

async fn reads_at_past_revisions(store: &Arc<dyn Store>) {
    let v1 = store.create("/hist/k", b("v1")).await.unwrap();
    let other = store.create("/hist/other", b("o")).await.unwrap();
    let v2 = store
        .update("/hist/k", b("v2"), v1.mod_revision)
        .await
        .unwrap();
    let (deleted_at, _) = store.delete("/hist/k", None).await.unwrap();

    let at = |r| store.get("/hist/k", Some(r));
    assert_eq!(
        at(v1.mod_revision - 1).await.unwrap().1,
        None,
        "before it existed"
    );
    assert_eq!(at(v1.mod_revision).await.unwrap().1.unwrap(), v1);
    assert_eq!(at(other.mod_revision).await.unwrap().1.unwrap(), v1);
    assert_eq!(at(v2.mod_revision).await.unwrap().1.unwrap(), v2);
    assert_eq!(at(deleted_at).await.unwrap().1, None, "after its deletion");
    let (reported, _) = at(v2.mod_revision).await.unwrap();
    assert_eq!(reported, v2.mod_revision);

    let page = store
        .list(
            "/hist/",
            &ListOptions {
                revision: Some(v2.mod_revision),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.revision, v2.mod_revision);
    assert_eq!(page.kvs, vec![v2.clone(), other.clone()]);
    let now = store.list("/hist/", &ListOptions::default()).await.unwrap();
    assert_eq!(now.kvs, vec![other]);

    let future = store.current_revision().await.unwrap() + 100;
    assert!(matches!(
        store.get("/hist/k", Some(future)).await,
        Err(Error::FutureRevision { requested, .. }) if requested == future
    ));
    assert!(matches!(
        store
            .list(
                "/hist/",
                &ListOptions {
                    revision: Some(future),
                    ..Default::default()
                }
            )
            .await,
        Err(Error::FutureRevision { .. })
    ));
}

async fn recreated_keys_keep_their_history(store: &Arc<dyn Store>) {
    let first = store.create("/re/k", b("first")).await.unwrap();
    let (deleted_at, _) = store.delete("/re/k", None).await.unwrap();
    let second = store.create("/re/k", b("second")).await.unwrap();
    let second = store
        .update("/re/k", b("second'"), second.mod_revision)
        .await
        .unwrap();

    assert_eq!(
        store
            .get("/re/k", Some(first.mod_revision))
            .await
            .unwrap()
            .1
            .unwrap(),
        first
    );
    assert_eq!(store.get("/re/k", Some(deleted_at)).await.unwrap().1, None);
    assert_eq!(store.get("/re/k", None).await.unwrap().1.unwrap(), second);
    let then = store
        .list(
            "/re/",
            &ListOptions {
                revision: Some(first.mod_revision),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(then.kvs, vec![first.clone()]);
    let gap = store
        .list(
            "/re/",
            &ListOptions {
                revision: Some(deleted_at),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(gap.kvs.is_empty());

    let mut watch = store.watch("/re/", first.mod_revision - 1).await.unwrap();
    let kinds: Vec<_> = [
        next_change(&mut watch).await,
        next_change(&mut watch).await,
        next_change(&mut watch).await,
        next_change(&mut watch).await,
    ]
    .into_iter()
    .map(|e| (e.kind, e.prev.map(|p| p.mod_revision)))
    .collect();
    assert_eq!(
        kinds,
        vec![
            (EventKind::Create, None),
            (EventKind::Delete, Some(first.mod_revision)),
            (EventKind::Create, None),
            (EventKind::Update, Some(deleted_at + 1)),
        ]
    );
}

async fn list_pages_share_one_snapshot(store: &Arc<dyn Store>) {
    let mut expected = BTreeMap::new();
    for i in 0..25 {
        let key = format!("/pods/ns/p{i:02}");
        let kv = store
            .create(&key, Bytes::from(format!("v{i}")))
            .await
            .unwrap();
        expected.insert(key, kv);
    }
    // Neighbours that share a textual prefix but not the key prefix.
    store.create("/pods/ns2/x", b("no")).await.unwrap();
    store.create("/pods/nr/x", b("no")).await.unwrap();
    store.create("/pods/ns", b("no")).await.unwrap();

    let first = store
        .list(
            "/pods/ns/",
            &ListOptions {
                limit: Some(10),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(first.kvs.len(), 10);
    assert!(first.more);

    // Changes after the first page must not show in the following pages.
    let p15 = expected["/pods/ns/p15"].clone();
    store
        .update("/pods/ns/p15", b("changed"), p15.mod_revision)
        .await
        .unwrap();
    store.delete("/pods/ns/p20", None).await.unwrap();
    store.create("/pods/ns/p99", b("late")).await.unwrap();

    let mut seen = first.kvs.clone();
    let mut page = first;
    while let Some(options) = page.next(Some(10)) {
        page = store.list("/pods/ns/", &options).await.unwrap();
        assert_eq!(page.revision, options.revision.unwrap());
        seen.extend(page.kvs.iter().cloned());
    }
    let want: Vec<_> = expected.values().cloned().collect();
    assert_eq!(seen, want, "every key once, in order, as of the first page");

    let all = store
        .list("/pods/ns/", &ListOptions::default())
        .await
        .unwrap();
    assert_eq!(all.kvs.len(), 25);
    assert!(!all.more);
    assert!(all.kvs.iter().any(|kv| kv.key == "/pods/ns/p99"));
    let exact = store
        .list(
            "/pods/ns/",
            &ListOptions {
                limit: Some(25),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        !exact.more,
        "a page that ends exactly at the last key says so"
    );

    let (_, n) = store.count("/pods/ns/").await.unwrap();
    assert_eq!(n, 25);
    let (_, everything) = store.count("").await.unwrap();
    assert_eq!(everything, 28);
    assert_eq!(
        store
            .list("", &ListOptions::default())
            .await
            .unwrap()
            .kvs
            .len(),
        28
    );

    assert!(matches!(
        store
            .list(
                "/pods/ns/",
                &ListOptions {
                    start_after: Some("/other/x".into()),
                    ..Default::default()
                }
            )
            .await,
        Err(Error::InvalidArgument { .. })
    ));
}

async fn watch_replays_history_with_previous_values(store: &Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let a1 = store.create("/w/a", b("a1")).await.unwrap();
    store.create("/elsewhere/x", b("x")).await.unwrap();
    let a2 = store
        .update("/w/a", b("a2"), a1.mod_revision)
        .await
        .unwrap();
    let (deleted_at, _) = store.delete("/w/a", None).await.unwrap();

    let mut watch = store.watch("/w/", start).await.unwrap();
    let created = next_change(&mut watch).await;
    assert_eq!(created.kind, EventKind::Create);
    assert_eq!(created.kv, a1);
    assert_eq!(created.prev, None);
    let updated = next_change(&mut watch).await;
    assert_eq!(updated.kind, EventKind::Update);
    assert_eq!(updated.kv, a2);
    assert_eq!(updated.prev.as_ref(), Some(&a1));
    let deleted = next_change(&mut watch).await;
    assert_eq!(deleted.kind, EventKind::Delete);
    assert_eq!(deleted.kv.key, "/w/a");
    assert_eq!(deleted.kv.mod_revision, deleted_at);
    assert_eq!(deleted.prev.as_ref(), Some(&a2));

    // Then live changes, strictly after the replayed ones.
    let b1 = store.create("/w/b", b("b1")).await.unwrap();
    let live = next_change(&mut watch).await;
    assert_eq!(live.kv, b1);

    // A watch from the middle starts strictly after its revision.
    let mut later = store.watch("/w/", a2.mod_revision).await.unwrap();
    assert_eq!(next_change(&mut later).await.kv.mod_revision, deleted_at);
}

async fn watch_sees_concurrent_writers_in_order(store: &Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("/cw/", start).await.unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let mut revisions = Vec::new();
                for i in 0..25 {
                    let kv = store
                        .create(&format!("/cw/{w}/{i}"), Bytes::from(vec![w as u8; 100]))
                        .await
                        .unwrap();
                    revisions.push(kv.mod_revision);
                }
                revisions
            })
        })
        .collect();
    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.unwrap());
    }
    acknowledged.sort();
    let mut seen = Vec::new();
    while seen.len() < acknowledged.len() {
        seen.push(next_change(&mut watch).await.kv.mod_revision);
    }
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
    assert_eq!(seen, acknowledged, "every acknowledged write, once");
}

async fn compaction(store: &Arc<dyn Store>) {
    let old = store.create("/c/old", b("old")).await.unwrap();
    let mut kept = store.create("/c/kept", b("0")).await.unwrap();
    for i in 1..5 {
        kept = store
            .update("/c/kept", Bytes::from(format!("{i}")), kept.mod_revision)
            .await
            .unwrap();
    }
    store.delete("/c/old", None).await.unwrap();
    let gone = store.create("/c/gone", b("g")).await.unwrap();
    store.delete("/c/gone", None).await.unwrap();
    let target = store.current_revision().await.unwrap();
    let unchanged = store.create("/c/after", b("a")).await.unwrap();

    store.compact(target).await.unwrap();
    store.compact(target).await.unwrap();
    store
        .compact(target - 3)
        .await
        .expect("compacting to an older revision does nothing");

    // Reads before the compaction point fail with the oldest readable revision...
    match store.get("/c/kept", Some(old.mod_revision)).await {
        Err(Error::Compacted { requested, oldest }) => {
            assert_eq!(requested, old.mod_revision);
            assert_eq!(oldest, target);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(matches!(
        store
            .list(
                "/c/",
                &ListOptions {
                    revision: Some(target - 1),
                    ..Default::default()
                }
            )
            .await,
        Err(Error::Compacted { .. })
    ));
    // ...and so does a watch from before it, in the stream.
    let mut watch = store.watch("/c/", old.mod_revision).await.unwrap();
    match next(&mut watch).await {
        Some(Err(Error::Compacted { oldest, .. })) => assert_eq!(oldest, target),
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(
        next(&mut watch).await.is_none(),
        "the stream ends after the error"
    );

    // The compaction point itself and everything later stay readable.
    let page = store
        .list(
            "/c/",
            &ListOptions {
                revision: Some(target),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(page.kvs, vec![kept.clone()]);
    assert_eq!(
        store.get("/c/kept", Some(target)).await.unwrap().1.unwrap(),
        kept
    );
    assert_eq!(store.get("/c/gone", Some(target)).await.unwrap().1, None);
    assert_eq!(gone.version, 1);
    let mut watch = store.watch("/c/", target).await.unwrap();
    assert_eq!(next_change(&mut watch).await.kv, unchanged);
    let updated = store
        .update("/c/kept", b("5"), kept.mod_revision)
        .await
        .unwrap();
    let event = next_change(&mut watch).await;
    assert_eq!(event.kv, updated);
    assert_eq!(
        event.prev,
        Some(kept),
        "the previous value survives compaction"
    );

    let future = store.current_revision().await.unwrap() + 10;
    assert!(matches!(
        store.compact(future).await,
        Err(Error::FutureRevision { .. })
    ));
}

async fn limits_and_bad_arguments(store: &Arc<dyn Store>) {
    let long_key = format!("/{}", "k".repeat(MAX_KEY_BYTES));
    assert!(matches!(
        store.create(&long_key, b("x")).await,
        Err(Error::KeyTooLarge { .. })
    ));
    assert!(matches!(
        store.get(&long_key, None).await,
        Err(Error::KeyTooLarge { .. })
    ));
    let too_big = Bytes::from(vec![7u8; MAX_VALUE_BYTES + 1]);
    match store.create("/big", too_big).await {
        Err(Error::ValueTooLarge { key, size, limit }) => {
            assert_eq!(
                (key.as_str(), size, limit),
                ("/big", MAX_VALUE_BYTES + 1, MAX_VALUE_BYTES)
            );
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    let at_limit = Bytes::from(vec![7u8; MAX_VALUE_BYTES]);
    let kv = store.create("/big", at_limit.clone()).await.unwrap();
    assert_eq!(
        store.get("/big", None).await.unwrap().1.unwrap().value,
        at_limit
    );
    assert!(matches!(
        store
            .update(
                "/big",
                Bytes::from(vec![0u8; MAX_VALUE_BYTES * 2]),
                kv.mod_revision
            )
            .await,
        Err(Error::ValueTooLarge { .. })
    ));
    assert!(matches!(
        store.create("", b("x")).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        store.watch("/x/", -1).await,
        Err(Error::InvalidArgument { .. })
    ));
}

async fn concurrent_compare_and_swap_loses_no_update(store: &Arc<dyn Store>) {
    store.create("/counter", b("0")).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let store = Arc::clone(store);
            tokio::spawn(async move {
                let mut conflicts = 0;
                for _ in 0..10 {
                    loop {
                        let (_, kv) = store.get("/counter", None).await.unwrap();
                        let kv = kv.unwrap();
                        let n: u64 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                        match store
                            .update(
                                "/counter",
                                Bytes::from((n + 1).to_string()),
                                kv.mod_revision,
                            )
                            .await
                        {
                            Ok(_) => break,
                            Err(Error::Conflict { .. }) => conflicts += 1,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
                conflicts
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let (_, kv) = store.get("/counter", None).await.unwrap();
    let kv = kv.unwrap();
    assert_eq!(kv.value, b("80"));
    assert_eq!(kv.version, 81);
}

async fn quiet_watchers_get_progress(store: &Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("/quiet/", start).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut written = start;
    loop {
        written = store
            .create(&format!("/noisy/{written}"), b("x"))
            .await
            .unwrap()
            .mod_revision;
        if let Ok(item) = tokio::time::timeout(Duration::from_millis(100), next(&mut watch)).await {
            match item {
                Some(Ok(WatchEvent::Progress(revision))) => {
                    assert!(revision > start && revision <= written);
                    return;
                }
                other => panic!("expected only progress, got {other:?}"),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no progress notification in 15s"
        );
    }
}

async fn size_is_reported(store: &Arc<dyn Store>) {
    store
        .create("/size", Bytes::from(vec![1u8; 64 * 1024]))
        .await
        .unwrap();
    assert!(store.size().await.unwrap() > 0);
}

/// Generates one test per case for a backend.
macro_rules! conformance {
    ($backend:ident: $($case:ident),* $(,)?) => {
        mod $backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let harness = crate::common::$backend().await;
                    super::$case(&harness.store).await;
                }
            )*
        }
    };
}

macro_rules! all_backends {
    ($($case:ident),* $(,)?) => {
        conformance!(sqlite: $($case),*);
        conformance!(etcd: $($case),*);
    };
}

all_backends!(
    create_and_get,
    update_is_compare_and_swap,
    delete_and_recreate,
    reads_at_past_revisions,
    list_pages_share_one_snapshot,
    recreated_keys_keep_their_history,
    watch_replays_history_with_previous_values,
    watch_sees_concurrent_writers_in_order,
    compaction,
    limits_and_bad_arguments,
    concurrent_compare_and_swap_loses_no_update,
    quiet_watchers_get_progress,
    size_is_reported,
);
