//! `orq server` as a user runs it: a real process on a free loopback port, probed over HTTP,
//! stopped with SIGTERM.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::process::Command;

use common::Server;

use orquestra_store::testing::EtcdProcess;

#[test]
fn serves_health_and_metrics_on_the_embedded_store_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_ready();
    assert_eq!(server.get("/healthz").unwrap(), (200, "ok".to_owned()));
    let (status, metrics) = server.get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("orquestra_store_revision 0"), "{metrics}");
    assert!(
        metrics.contains("orquestra_store_db_size_bytes"),
        "{metrics}"
    );
    assert!(
        dir.path().join("state.db").exists(),
        "default datastore is DATA_DIR/state.db"
    );
    assert!(server.terminate().success());
}

#[test]
fn a_locked_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    first.wait_ready();
    let output = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("locked by another process"), "{stderr}");
    assert!(first.terminate().success());
}

#[test]
fn runs_on_etcd() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(EtcdProcess::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--datastore", &etcd.datastore_url()]);
    server.wait_ready();
    let (_, metrics) = server.get("/metrics").unwrap();
    assert!(metrics.contains("orquestra_store_revision 1"), "{metrics}");
    assert!(!dir.path().join("state.db").exists());
    assert!(server.terminate().success());
}

#[test]
fn a_bad_datastore_url_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--datastore",
            "mysql://x",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown scheme"), "{stderr}");
}
