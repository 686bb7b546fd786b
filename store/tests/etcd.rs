//! What only the etcd backend meets: a cluster that is not there, or goes away.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use orquestra_store::etcd::{EtcdOptions, EtcdStore};
use orquestra_store::testing::EtcdProcess;
use orquestra_store::{Error, Store};

fn quick() -> EtcdOptions {
    EtcdOptions {
        connect_timeout: Duration::from_secs(1),
        request_timeout: Duration::from_secs(2),
    }
}

#[tokio::test]
async fn an_unreachable_cluster_is_unavailable() {
    // A port nothing listens on: bind one, then close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    match EtcdStore::connect(&[format!("127.0.0.1:{port}")], quick()).await {
        Err(error @ Error::Unavailable { .. }) => {
            assert!(error.is_transient());
            assert!(error.to_string().contains(&port.to_string()), "{error}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_that_goes_away_fails_requests_and_watches() {
    let etcd = EtcdProcess::start().await.unwrap();
    let store = EtcdStore::connect(&[etcd.endpoint().to_owned()], quick())
        .await
        .unwrap();
    store.create("/k", Bytes::from_static(b"v")).await.unwrap();
    let mut watch = store.watch("/", 0).await.unwrap();
    assert!(common::next(&mut watch).await.unwrap().is_ok());

    drop(etcd);

    let result = store.create("/k2", Bytes::from_static(b"v")).await;
    assert!(
        matches!(result, Err(Error::Unavailable { .. })),
        "expected Unavailable, got {result:?}"
    );
    let item = tokio::time::timeout(Duration::from_secs(30), watch.next())
        .await
        .expect("the watch notices within 30s");
    assert!(
        matches!(item, Some(Err(_))),
        "expected an error, got {item:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opens_by_url() {
    let etcd = EtcdProcess::start().await.unwrap();
    let store = orquestra_store::open(&etcd.datastore_url()).await.unwrap();
    let kv = store.create("/x", Bytes::from_static(b"1")).await.unwrap();
    assert_eq!(store.get("/x", None).await.unwrap().1.unwrap(), kv);
}
