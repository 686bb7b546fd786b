//! API server benchmark: a real `orq server` process (HTTPS, token, embedded SQLite store)
//! driven by kube-rs clients, beside the disk's fsync limit measured in the same run.
//!
//! ```sh
//! cargo bench -p orq --bench api
//! ```
//!
//! Reports: creates/s over one keep-alive TLS connection and with 32 concurrent clients
//! (ConfigMaps created with generateName), LIST latency for 2,000 and 10,000 ConfigMaps,
//! watch fan-out (100 watchers, 100 changes: time until every watcher has every change), and
//! the server's RSS idle and after the load.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use kube::{Api, Client};
use serde_json::json;

use common::{client, rss_mib};

mod common;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn configmap() -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"generateName": "bench-"},
        "data": {"key": "value", "other": "x".repeat(200)}
    }))
    .unwrap()
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

/// The server's own time spent on ConfigMap creates so far (seconds, count), from its
/// `apiserver_request_duration_seconds` histogram.
async fn server_create_time(client: &Client) -> (f64, f64) {
    let request = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(request).await.unwrap();
    let value = |name: &str| {
        text.lines()
            .filter(|l| {
                l.starts_with(name)
                    && l.contains("resource=\"configmaps\"")
                    && l.contains("verb=\"POST\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (
        value("apiserver_request_duration_seconds_sum"),
        value("apiserver_request_duration_seconds_count"),
    )
}

/// `clients` clients create `total` ConfigMaps in `ns` between them; returns creates/s.
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

/// Median latency of a full LIST of `ns`: until the whole response body has arrived (what
/// the server costs, as curl would see it), and until kube-rs has also decoded it into typed
/// ConfigMaps (what a Rust client sees).
async fn list_ms(client: &Client, ns: &str, expect: usize) -> (f64, f64) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let median = |mut samples: Vec<f64>| {
        samples.sort_by(f64::total_cmp);
        samples[samples.len() / 2]
    };
    let mut raw = Vec::new();
    for _ in 0..7 {
        let request = http::Request::get(format!("/api/v1/namespaces/{ns}/configmaps"))
            .body(Vec::new())
            .unwrap();
        let started = Instant::now();
        let body = client.request_text(request).await.unwrap();
        raw.push(started.elapsed().as_secs_f64() * 1000.0);
        let list: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(list["items"].as_array().unwrap().len(), expect);
    }
    let mut typed = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        let list = api.list(&ListParams::default()).await.unwrap();
        typed.push(started.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(list.items.len(), expect);
    }
    (median(raw), median(typed))
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
                    Some(Ok(WatchEvent::Added(_))) => {
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

        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let server = Server(
            Command::new(env!("CARGO_BIN_EXE_orq"))
                .args(["server", "--disable-kube-proxy", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
                .arg(dir.path())
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let kubeconfig = dir.path().join("kubeconfig.yaml");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !kubeconfig.exists() {
            assert!(Instant::now() < deadline, "orq server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let pid = server.0.id();
        let idle = rss_mib(pid);

        let one = client(&kubeconfig).await;
        for ns in ["seq", "list2k", "list10k"] {
            namespace(&one, ns).await;
        }
        let (sum_before, count_before) = server_create_time(&one).await;
        let sequential = creates(std::slice::from_ref(&one), "seq", 1000).await;
        let (sum_after, count_after) = server_create_time(&one).await;
        let server_ms = (sum_after - sum_before) / (count_after - count_before) * 1000.0;
        let mut many = Vec::new();
        for _ in 0..32 {
            many.push(client(&kubeconfig).await);
        }
        let concurrent = creates(&many, "list10k", 10_000).await;
        creates(&many, "list2k", 2_000).await;
        let (list_2k, list_2k_typed) = list_ms(&one, "list2k", 2_000).await;
        let (list_10k, list_10k_typed) = list_ms(&one, "list10k", 10_000).await;
        let (fan_all, fan_p99) = fan_out(&one).await;
        let loaded = rss_mib(pid);

        println!("# orq API server benchmark (orq server over HTTPS, SQLite store, kube-rs clients)");
        println!();
        println!("| measurement | orq server | target | kube-apiserver 1.36 + etcd 3.4 (reference, from issue 3; not run here) |");
        println!("| --- | ---: | ---: | ---: |");
        println!("| disk fsync limit (512 B + fdatasync), ops/s | {fsync_limit:.0} | | |");
        println!("| creates/s, one keep-alive TLS connection | {sequential:.0} ({:.2} × fsync limit) | ≥ fsync limit | 273 |", sequential / fsync_limit);
        println!("| one sequential create: end to end / inside the server (handler, validation, store write), ms | {:.3} / {server_ms:.3} | | |", 1000.0 / sequential);
        println!("| creates/s, 32 clients | {concurrent:.0} | ≥ 5000 | ~1000 |");
        println!("| LIST 2,000 ConfigMaps, whole body received, median ms | {list_2k:.1} | | |");
        println!("| LIST 10,000 ConfigMaps, whole body received, median ms | {list_10k:.1} | ≤ 40 | 225 (12,700 items) |");
        println!("| LIST 2,000 ConfigMaps, decoded by kube-rs, median ms | {list_2k_typed:.1} | | |");
        println!("| LIST 10,000 ConfigMaps, decoded by kube-rs, median ms | {list_10k_typed:.1} | | |");
        println!("| watch fan-out, 100 watchers × 100 changes: all delivered after, ms | {fan_all:.1} | | |");
        println!("| watch fan-out, per-event delivery p99 (from first create), ms | {fan_p99:.1} | | |");
        println!("| server RSS idle, MiB | {idle:.1} | ≤ 40 | |");
        println!("| server RSS after the load, MiB | {loaded:.1} | ≤ 80 | 516 (+81 etcd) |");
        drop(server);
    });
}
