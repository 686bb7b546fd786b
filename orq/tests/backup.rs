//! `orq backup` of a running server and `orq restore` into a new data dir: a server started
//! on it serves the same objects at the same resourceVersions, with the same secrets (the old
//! admin token still works). For the SQLite store and for etcd.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Server;
use orquestra_store::testing::EtcdProcess;

fn orq(args: &[&std::ffi::OsStr]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Creates `n` ConfigMaps `<prefix>-<i>` through `server`; returns (name, resourceVersion) of each.
fn create_config_maps(server: &Server, prefix: &str, n: usize) -> Vec<(String, String)> {
    let token = server.token().unwrap();
    (0..n)
        .map(|i| {
            let name = format!("{prefix}-{i}");
            let body = format!(
                r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"{name}"}},"data":{{"i":"{i}"}}}}"#
            );
            let out = Command::new("curl")
                .args(["-s", "--max-time", "10", "-X", "POST", "-H"])
                .arg(format!("Authorization: Bearer {token}"))
                .args(["-H", "Content-Type: application/json", "--cacert"])
                .arg(server.data_dir.join("tls/ca.crt"))
                .args(["-d", &body])
                .arg(format!(
                    "https://{}/api/v1/namespaces/default/configmaps",
                    server.addr
                ))
                .output()
                .unwrap();
            let created: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let rv = created["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or_else(|| panic!("created {name}: {created}"))
                .to_owned();
            (name, rv)
        })
        .collect()
}

/// The restored server answers every object at its resourceVersion, to the old admin token.
fn check_restored(restored: &Server, objects: &[(String, String)], token: &str) {
    assert_eq!(
        restored.token().as_deref(),
        Some(token),
        "the same admin token"
    );
    for (name, rv) in objects {
        let (status, body) = restored
            .get(&format!("/api/v1/namespaces/default/configmaps/{name}"))
            .unwrap();
        assert_eq!(status, 200, "{name}: {body}");
        let object: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            object["metadata"]["resourceVersion"],
            *rv.as_str(),
            "{name}"
        );
    }
}

fn backup_and_restore(data_dir: &Path, datastore: Option<&str>, out: &Path, new: &Path) {
    let mut args: Vec<&std::ffi::OsStr> = vec!["backup".as_ref(), out.as_os_str()];
    args.extend(["--data-dir".as_ref(), data_dir.as_os_str()]);
    if let Some(datastore) = datastore {
        args.extend([
            std::ffi::OsStr::new("--datastore"),
            std::ffi::OsStr::new(datastore),
        ]);
    }
    let (ok, text) = orq(&args);
    assert!(ok, "orq backup: {text}");
    assert!(text.contains("at revision"), "{text}");
    // A backup never overwrites.
    let (ok, text) = orq(&args);
    assert!(!ok && text.contains("already exists"), "{text}");
    let (ok, text) = orq(&[
        "restore".as_ref(),
        out.as_os_str(),
        "--data-dir".as_ref(),
        new.as_os_str(),
    ]);
    assert!(ok, "orq restore: {text}");
}

#[test]
fn an_online_sqlite_backup_restores_the_same_objects_at_the_same_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--no-agent"]);
    server.wait_ready();
    let objects = create_config_maps(&server, "backed-up", 20);
    let work = tempfile::tempdir().unwrap();
    let (archive, new) = (work.path().join("backup.tar"), work.path().join("restored"));
    // Online: the server keeps running (and writing) while it is taken.
    backup_and_restore(dir.path(), None, &archive, &new);
    let later = create_config_maps(&server, "later", 1);
    let token = server.token().unwrap();
    let restored = Server::start(&new, &["--no-agent"]);
    restored.wait_ready();
    check_restored(&restored, &objects, &token);
    // What was written after the backup is not in it.
    let (status, _) = restored
        .get(&format!(
            "/api/v1/namespaces/default/configmaps/{}",
            later[0].0
        ))
        .unwrap();
    assert_eq!(status, 404);
    // Restoring into a data dir in use is refused, and leaves it alone.
    let (ok, text) = orq(&[
        "restore".as_ref(),
        archive.as_os_str(),
        "--data-dir".as_ref(),
        new.as_os_str(),
    ]);
    assert!(!ok && text.contains("not empty"), "{text}");
    assert!(restored.terminate().success());
    assert!(server.terminate().success());
}

#[test]
fn an_etcd_snapshot_restores_into_a_new_etcd_at_the_same_versions() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(EtcdProcess::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--no-agent", "--datastore", &etcd.datastore_url()],
    );
    server.wait_ready();
    let objects = create_config_maps(&server, "backed-up", 20);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("backup.tar");
    let new = work.path().join("restored");
    let etcd_dir = work.path().join("etcd");
    backup_and_restore(
        dir.path(),
        Some(&etcd.datastore_url()),
        &archive,
        &work.path().join("secrets-only"),
    );
    // The etcd part: a one-member etcd from the snapshot, then a server on it.
    let peer = free_port();
    let client = free_port();
    let (ok, text) = orq(&[
        "restore".as_ref(),
        archive.as_os_str(),
        "--data-dir".as_ref(),
        new.as_os_str(),
        "--etcd-data-dir".as_ref(),
        etcd_dir.as_os_str(),
        "--etcd-name".as_ref(),
        "restored".as_ref(),
        "--etcd-peer-url".as_ref(),
        format!("http://127.0.0.1:{peer}").as_ref(),
    ]);
    assert!(ok, "orq restore: {text}");
    let token = server.token().unwrap();
    assert!(server.terminate().success());
    drop(etcd);
    let mut restored_etcd = Command::new("etcd")
        .arg("--name=restored")
        .arg(format!("--data-dir={}", etcd_dir.display()))
        .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
        .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
        .arg(format!(
            "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
        ))
        .arg("--log-level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    runtime.block_on(async {
        let endpoint = vec![format!("127.0.0.1:{client}")];
        for _ in 0..100 {
            let options = orquestra_store::etcd::EtcdOptions::default();
            if orquestra_store::etcd::EtcdStore::connect(&endpoint, options)
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("the restored etcd does not answer");
    });
    let restored = Server::start(
        &new,
        &[
            "--no-agent",
            "--datastore",
            &format!("etcd://127.0.0.1:{client}"),
        ],
    );
    restored.wait_ready();
    check_restored(&restored, &objects, &token);
    assert!(restored.terminate().success());
    let _ = restored_etcd.kill();
    let _ = restored_etcd.wait();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
