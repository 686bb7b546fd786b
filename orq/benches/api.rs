//! API server benchmark: a real `orq server` process (HTTPS, token, embedded SQLite store)
//! and, in the same run, the anchor — the real kube-apiserver over a real etcd — driven by
//! the same kube-rs clients, beside the disk's fsync limit.
//!
//! ```sh
//! cargo bench -p orq --bench api
//! KUBE_APISERVER=/var/tmp/orq-conformance/bin/kube-apiserver cargo bench -p orq --bench api
//! ```
//!
//! Reports, for each server: creates/s over one keep-alive TLS connection, in JSON and in
//! protobuf (client-go's encoding: request body and response), and with 32 concurrent
//! clients (ConfigMaps created with generateName); LIST latency for 2,000 and 10,000
//! ConfigMaps as JSON and as protobuf; watch fan-out (100 watchers, 100 changes: time until
//! every watcher has every change); the servers' RSS idle and after the load. The anchor runs
//! when `KUBE_APISERVER` names a kube-apiserver binary (`scripts/conformance.sh build` makes
//! one) or the conformance build's is at its default place; etcd is Debian's.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;

use common::{Proc, client, rss_mib};

mod common;

/// Where `scripts/conformance.sh build` puts kube-apiserver.
const CONFORMANCE_KUBE_APISERVER: &str = "/var/tmp/orq-conformance/bin/kube-apiserver";

const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

fn configmap_json() -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"generateName": "bench-"},
        "data": {"key": "value", "other": "x".repeat(200)}
    })
}

fn configmap() -> ConfigMap {
    serde_json::from_value(configmap_json()).unwrap()
}

async fn namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}),
    )
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// A free loopback port.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One server under test: its processes (RSS is their sum) and an admin kubeconfig.
struct Subject {
    name: &'static str,
    procs: Vec<Proc>,
    kubeconfig: PathBuf,
}

impl Subject {
    fn rss_mib(&self) -> f64 {
        self.procs.iter().map(|p| rss_mib(p.0.id())).sum()
    }
}

/// `orq server` with its embedded SQLite store, in `dir`.
async fn start_orq(dir: &Path) -> Subject {
    let port = free_port();
    let server = Proc(
        Command::new(env!("CARGO_BIN_EXE_orq"))
            .args(["server", "--disable-kube-proxy", "--no-agent"])
            .args(["--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let kubeconfig = dir.join("kubeconfig.yaml");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(Instant::now() < deadline, "orq server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    Subject {
        name: "orq server",
        procs: vec![server],
        kubeconfig,
    }
}

/// The anchor: kube-apiserver (`binary`) over Debian's etcd, both in `dir`, with a static
/// admin token in `system:masters` and a self-signed serving certificate.
async fn start_kube_apiserver(dir: &Path, binary: &Path) -> Subject {
    let (client_port, peer_port, port) = (free_port(), free_port(), free_port());
    let etcd_url = format!("http://127.0.0.1:{client_port}");
    let etcd = Proc(
        Command::new("etcd")
            .arg("--data-dir")
            .arg(dir.join("etcd"))
            .args([
                "--listen-client-urls",
                &etcd_url,
                "--advertise-client-urls",
                &etcd_url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("default=http://127.0.0.1:{peer_port}"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server, installed by scripts/install-deps.sh)"),
    );
    let key = dir.join("sa.key");
    let openssl = |args: &[&str]| {
        let ok = Command::new("openssl")
            .args(args)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl {args:?}");
    };
    openssl(&["genrsa", "-out", key.to_str().unwrap(), "2048"]);
    openssl(&[
        "rsa",
        "-in",
        key.to_str().unwrap(),
        "-pubout",
        "-out",
        dir.join("sa.pub").to_str().unwrap(),
    ]);
    let token = "bench-admin-token";
    std::fs::write(
        dir.join("tokens.csv"),
        format!("{token},admin,admin,\"system:masters\"\n"),
    )
    .unwrap();
    let server = Proc(
        Command::new(binary)
            .args(["--etcd-servers", &etcd_url, "--bind-address", "127.0.0.1"])
            .args(["--secure-port", &port.to_string()])
            .arg(format!("--cert-dir={}", dir.join("certs").display()))
            .arg(format!(
                "--token-auth-file={}",
                dir.join("tokens.csv").display()
            ))
            .arg(format!(
                "--service-account-key-file={}",
                dir.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                key.display()
            ))
            .args(["--service-account-issuer", "https://kubernetes.default.svc"])
            .args(["--service-cluster-ip-range", "10.96.0.0/16"])
            .args(["--authorization-mode", "RBAC"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let kubeconfig = dir.join("kubeconfig.yaml");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: k\n  cluster:\n    server: https://127.0.0.1:{port}\n    insecure-skip-tls-verify: true\nusers:\n- name: admin\n  user:\n    token: {token}\ncontexts:\n- name: k\n  context: {{cluster: k, user: admin}}\ncurrent-context: k\n"
        ),
    )
    .unwrap();
    let probe = client(&kubeconfig).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
        if probe.request_text(request).await.is_ok_and(|t| t == "ok") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kube-apiserver did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Subject {
        name: "kube-apiserver + etcd",
        procs: vec![server, etcd],
        kubeconfig,
    }
}

/// `clients` clients create `total` ConfigMaps in `ns` between them, as JSON through
/// kube-rs; returns creates/s.
async fn creates(clients: &[Client], ns: &str, total: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, client)| {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            let count = total / clients.len() + usize::from(i < total % clients.len());
            tokio::spawn(async move {
                for _ in 0..count {
                    api.create(&PostParams::default(), &configmap())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}

/// `total` creates over one connection as client-go sends them: a protobuf body, a protobuf
/// answer asked for first. Returns creates/s.
async fn creates_protobuf(client: &Client, ns: &str, total: usize) -> f64 {
    let body = orquestra_apiserver::proto::encode(&configmap_json()).unwrap();
    let started = Instant::now();
    for _ in 0..total {
        let request = http::Request::post(format!("/api/v1/namespaces/{ns}/configmaps"))
            .header("content-type", PROTOBUF)
            .header("accept", format!("{PROTOBUF}, application/json"))
            .body(body.clone())
            .unwrap();
        let response = client.send(request.map(Into::into)).await.unwrap();
        assert_eq!(response.status(), 201);
        let kind = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_owned();
        let bytes = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
            .await
            .unwrap();
        assert!(
            kind.starts_with(PROTOBUF) && bytes.starts_with(b"k8s\0"),
            "{kind}"
        );
    }
    total as f64 / started.elapsed().as_secs_f64()
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Median latencies of full LISTs of `ns`, whole body received, as JSON and as protobuf:
/// the two asked for alternately, so the machine's drift weighs on both alike.
async fn list_raw_ms(client: &Client, ns: &str) -> (f64, f64) {
    let mut json = Vec::new();
    let mut protobuf = Vec::new();
    for _ in 0..9 {
        for (accept, samples) in [("application/json", &mut json), (PROTOBUF, &mut protobuf)] {
            let request = http::Request::get(format!("/api/v1/namespaces/{ns}/configmaps"))
                .header("accept", accept)
                .body(Vec::<u8>::new())
                .unwrap();
            let started = Instant::now();
            let response = client.send(request.map(Into::into)).await.unwrap();
            let bytes =
                axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
                    .await
                    .unwrap();
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            assert!(bytes.len() > 1000);
        }
    }
    (median(json), median(protobuf))
}

/// Median latency of a full LIST of `ns` decoded by kube-rs into typed ConfigMaps.
async fn list_typed_ms(client: &Client, ns: &str, expect: usize) -> f64 {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut samples = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        let list = api.list(&ListParams::default()).await.unwrap();
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
        // orq server also publishes kube-root-ca.crt into every namespace (no
        // kube-controller-manager runs beside the anchor).
        assert!((expect..=expect + 1).contains(&list.items.len()));
    }
    median(samples)
}

/// 100 watchers on one namespace; 100 creates; time from the first create until every
/// watcher has seen every change, and the p99 of per-event delivery.
async fn fan_out(client: &Client) -> (f64, f64) {
    namespace(client, "fanout").await;
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), "fanout");
    let revision = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let start = Arc::new(tokio::sync::OnceCell::<Instant>::new());
    let mut watchers = Vec::new();
    for _ in 0..100 {
        let mut stream = api
            .watch(&WatchParams::default(), &revision)
            .await
            .unwrap()
            .boxed();
        let start = Arc::clone(&start);
        watchers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while latencies.len() < 100 {
                match stream.next().await {
                    // orq server publishes kube-root-ca.crt into the new namespace too,
                    // possibly before the first create; only the benchmark's own count.
                    Some(Ok(WatchEvent::Added(cm)))
                        if cm
                            .metadata
                            .name
                            .as_deref()
                            .unwrap_or("")
                            .starts_with("bench-") =>
                    {
                        let t0 = *start.get().unwrap();
                        latencies.push(t0.elapsed().as_secs_f64() * 1000.0);
                    }
                    Some(Ok(_)) => {}
                    other => panic!("watch ended: {other:?}"),
                }
            }
            latencies
        }));
    }
    start.set(Instant::now()).unwrap();
    for _ in 0..100 {
        api.create(&PostParams::default(), &configmap())
            .await
            .unwrap();
    }
    let mut all = Vec::new();
    for watcher in watchers {
        all.extend(watcher.await.unwrap());
    }
    all.sort_by(f64::total_cmp);
    (all[all.len() - 1], all[all.len() * 99 / 100])
}

/// What one server measured, in the table's row order.
struct Measured {
    rows: Vec<(&'static str, f64)>,
}

async fn measure(subject: &Subject) -> Measured {
    let idle = subject.rss_mib();
    let one = client(&subject.kubeconfig).await;
    for ns in ["seq", "proto", "list2k", "list10k"] {
        namespace(&one, ns).await;
    }
    // Warm up (connections, caches) before timing.
    creates(std::slice::from_ref(&one), "seq", 50).await;
    let sequential = creates(std::slice::from_ref(&one), "seq", 1000).await;
    let sequential_proto = creates_protobuf(&one, "proto", 1000).await;
    let mut many = Vec::new();
    for _ in 0..32 {
        many.push(client(&subject.kubeconfig).await);
    }
    let concurrent = creates(&many, "list10k", 10_000).await;
    creates(&many, "list2k", 2_000).await;
    let (list_2k, _) = list_raw_ms(&one, "list2k").await;
    let (list_10k, list_10k_proto) = list_raw_ms(&one, "list10k").await;
    let list_2k_typed = list_typed_ms(&one, "list2k", 2_000).await;
    let list_10k_typed = list_typed_ms(&one, "list10k", 10_000).await;
    let (fan_all, fan_p99) = fan_out(&one).await;
    let loaded = subject.rss_mib();
    Measured {
        rows: vec![
            ("creates/s, one keep-alive TLS connection, JSON", sequential),
            (
                "creates/s, one connection, protobuf request and response",
                sequential_proto,
            ),
            ("creates/s, 32 clients", concurrent),
            (
                "LIST 2,000 ConfigMaps, JSON, whole body received, median ms",
                list_2k,
            ),
            (
                "LIST 10,000 ConfigMaps, JSON, whole body received, median ms",
                list_10k,
            ),
            (
                "LIST 10,000 ConfigMaps, protobuf, whole body received, median ms",
                list_10k_proto,
            ),
            (
                "LIST 2,000 ConfigMaps, decoded by kube-rs, median ms",
                list_2k_typed,
            ),
            (
                "LIST 10,000 ConfigMaps, decoded by kube-rs, median ms",
                list_10k_typed,
            ),
            (
                "watch fan-out, 100 watchers × 100 changes: all delivered after, ms",
                fan_all,
            ),
            (
                "watch fan-out, per-event delivery p99 (from first create), ms",
                fan_p99,
            ),
            ("RSS idle, MiB (kube-apiserver: + etcd)", idle),
            ("RSS after the load, MiB", loaded),
        ],
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let fsync = orquestra_store::testing::fsync_samples(dir.path(), 500, false).unwrap();
        let fsync_limit = 500.0 / fsync.iter().sum::<Duration>().as_secs_f64();

        let orq_dir = dir.path().join("orq");
        let orq = start_orq(&orq_dir).await;
        let orq_measured = measure(&orq).await;
        let orq_name = orq.name;
        drop(orq);

        let anchor_binary = std::env::var_os("KUBE_APISERVER")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from(CONFORMANCE_KUBE_APISERVER)).filter(|p| p.exists()));
        let anchor = match anchor_binary {
            Some(binary) => {
                let anchor_dir = dir.path().join("kube");
                std::fs::create_dir_all(&anchor_dir).unwrap();
                let subject = start_kube_apiserver(&anchor_dir, &binary).await;
                let measured = measure(&subject).await;
                Some((subject.name, measured))
            }
            None => None,
        };

        println!("# API server benchmark: orq server (HTTPS, SQLite) beside kube-apiserver + etcd, same clients, same run");
        println!();
        println!("disk fsync limit (512 B + fdatasync): {fsync_limit:.0} ops/s");
        println!();
        match &anchor {
            Some((anchor_name, anchor)) => {
                println!("| measurement | {orq_name} | {anchor_name} | ratio (orq ÷ anchor) |");
                println!("| --- | ---: | ---: | ---: |");
                for ((what, ours), (_, theirs)) in orq_measured.rows.iter().zip(&anchor.rows) {
                    println!("| {what} | {ours:.1} | {theirs:.1} | {:.2} |", ours / theirs);
                }
            }
            None => {
                println!("(no kube-apiserver: set KUBE_APISERVER to run the anchor)");
                println!("| measurement | {orq_name} |");
                println!("| --- | ---: |");
                for (what, ours) in &orq_measured.rows {
                    println!("| {what} | {ours:.1} |");
                }
            }
        }
    });
}
