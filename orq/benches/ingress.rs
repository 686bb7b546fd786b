//! Ingress benchmark (root), one run, inside a network namespace it creates and enters first
//! (so the bridge, the pods and port 80 never touch the host): requests per second and p99
//! latency through the node agent's ingress against the same kind of backend reached
//! directly, `wrk -t2 -c16 -d5s --latency`, alternated twice.
//!
//! 1. busybox httpd in two identical pods set up by the agent's network code (one behind
//!    the Ingress, one reached by its IP — two pods for the reason the proxy benchmark gives:
//!    one client reaching one pod both ways mixes TCP timestamp clocks). httpd forks per
//!    connection and closes it after each answer, so every request costs one backend
//!    connection either way: the ingress' cost next to a backend that does work per request.
//! 2. A keep-alive axum (hyper) backend in this process, answering a fixed 6-byte body: the floor,
//!    where the proxy's own work (a second HTTP parse and hop per request, on the same two
//!    cores as wrk and the backend) is nearly all there is.
//!
//! The ingress is the agent's own (`IngressController`): caches of Ingresses, Services and
//! EndpointSlices from the in-process API server, its route table, its listener.
//!
//! `cargo bench -p orq --bench ingress`

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, PostParams};
use orquestra_node_agent::agent;
use orquestra_node_agent::ingress::{IngressConfig, IngressController, Stores};
use orquestra_node_agent::network::{Cidr, Network};
use orquestra_operator::testing::TestApi;
use serde_json::json;

use common::busybox::run_ok;
use common::{Proc, enter_netns};

mod common;

/// The in-process backend's port (in the benchmark's namespace, on loopback).
const FLOOR_PORT: u16 = 9090;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let netns = format!("orqingressbench-{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
    // Before any thread exists: every thread and child inherits the namespace.
    enter_netns(&netns);
    let result = std::panic::catch_unwind(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(bench())
    });
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

/// What `wrk` measured.
struct Run {
    rps: f64,
    p99_ms: f64,
}

/// `wrk --latency` against `url`, with extra `headers`.
fn wrk(url: &str, headers: &[&str]) -> Run {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c16", "-d5s", "--latency"]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        !text.lines().any(|l| l.contains("Non-2xx")),
        "wrk {url}: {text}"
    );
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk {url}: {text}"));
    // "     99%    1.23ms" (us, ms or s).
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(str::trim)
        .unwrap_or_else(|| panic!("wrk {url}: no 99% line: {text}"));
    let p99_ms = if let Some(v) = p99.strip_suffix("us") {
        v.parse::<f64>().unwrap() / 1e3
    } else if let Some(v) = p99.strip_suffix("ms") {
        v.parse::<f64>().unwrap()
    } else if let Some(v) = p99.strip_suffix('s') {
        v.parse::<f64>().unwrap() * 1e3
    } else {
        panic!("wrk {url}: p99 {p99}")
    };
    Run { rps, p99_ms }
}

/// Direct and through the ingress, alternated twice: the mean requests/s and the worst p99
/// of each.
fn compare(direct_url: &str, ingress_url: &str, host: &str) -> (Run, Run) {
    let host_header = format!("Host: {host}");
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        direct.push(wrk(direct_url, &[]));
        through.push(wrk(ingress_url, &[&host_header]));
    }
    let summarize = |runs: &[Run]| Run {
        rps: runs.iter().map(|r| r.rps).sum::<f64>() / runs.len() as f64,
        p99_ms: runs.iter().map(|r| r.p99_ms).fold(0.0, f64::max),
    };
    (summarize(&direct), summarize(&through))
}

/// A keep-alive HTTP/1.1 server (axum, on hyper) on 127.0.0.1:`port` answering `hello\n`.
async fn floor_backend(port: u16) {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let app = axum::Router::new().route("/", axum::routing::get(|| async { "hello\n" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap()
}

fn slice(name: &str, ip: &str, port: u16) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }))
    .unwrap()
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApi::start().await.unwrap();
    let client = api.client();

    // Two identical pods serving HTTP, set up by the agent's network code.
    let network = Network::new(
        "orqbench0",
        Cidr::parse("10.244.0.0/24").unwrap(),
        dir.path().join("ips"),
    );
    network.ensure_node().await.unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello\n").unwrap();
    let mut httpds = Vec::new();
    let mut pods = Vec::new();
    for name in ["web", "direct"] {
        pods.push(network.setup_pod(name).await.unwrap());
        httpds.push(Proc(
            Command::new("ip")
                .args(["netns", "exec", &Network::netns_name(name)])
                .args(["busybox", "httpd", "-f", "-p", "8080", "-h"])
                .arg(&www)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ));
    }
    let (pod, direct_pod) = (&pods[0], &pods[1]);
    floor_backend(FLOOR_PORT).await;

    // Services `web` (the pod) and `floor` (the in-process backend), one Ingress.
    let pp = PostParams::default();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    for (name, ip, port) in [
        ("web", pod.ip.to_string(), 8080),
        ("floor", "127.0.0.1".to_owned(), FLOOR_PORT),
    ] {
        services.create(&pp, &service(name)).await.unwrap();
        slices.create(&pp, &slice(name, &ip, port)).await.unwrap();
    }
    let rule = |host: &str, service: &str| {
        json!({"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
               "backend": {"service": {"name": service, "port": {"number": 80}}}}]}})
    };
    let ingress: Ingress = serde_json::from_value(json!({
        "metadata": {"name": "bench"},
        "spec": {"ingressClassName": "orquestra", "rules": [
            rule("web.bench", "web"), rule("floor.bench", "floor"),
        ]},
    }))
    .unwrap();
    Api::<Ingress>::namespaced(client.clone(), "default")
        .create(&pp, &ingress)
        .await
        .unwrap();

    // The agent's ingress on 127.0.0.1:80.
    let changed = Arc::new(tokio::sync::Notify::new());
    let notify = || vec![Arc::clone(&changed)];
    let (ingresses, f1) = agent::cache::<Ingress>(&client, notify());
    let (classes, f2) = agent::cache::<IngressClass>(&client, notify());
    let (secrets, f3) = agent::cache::<Secret>(&client, notify());
    let (services, f4) = agent::cache::<Service>(&client, notify());
    let (slices, f5) = agent::cache::<EndpointSlice>(&client, notify());
    tokio::spawn(f1);
    tokio::spawn(f2);
    tokio::spawn(f3);
    tokio::spawn(f4);
    tokio::spawn(f5);
    let registry = prometheus::Registry::new();
    let controller = IngressController::new(
        IngressConfig {
            http: "127.0.0.1:80".parse().unwrap(),
            https: "127.0.0.1:443".parse().unwrap(),
        },
        Stores {
            ingresses,
            classes,
            secrets,
            services,
            slices,
        },
        &registry,
    )
    .unwrap();
    tokio::spawn(controller.run(Arc::clone(&changed)));
    let routed = Instant::now();
    for host in ["web.bench", "floor.bench"] {
        loop {
            let out = Command::new("curl")
                .args(["-s", "--max-time", "1", "-H", &format!("Host: {host}")])
                .arg("http://127.0.0.1/")
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout) == "hello\n" {
                break;
            }
            assert!(
                routed.elapsed() < Duration::from_secs(20),
                "{host} never routed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // wrk runs as a child: the runtime's threads stay free for the ingress and backend.
    let (direct, through) = tokio::task::spawn_blocking({
        let direct_url = format!("http://{}:8080/", direct_pod.ip);
        move || compare(&direct_url, "http://127.0.0.1/", "web.bench")
    })
    .await
    .unwrap();
    let (floor_direct, floor_through) = tokio::task::spawn_blocking(|| {
        compare(
            &format!("http://127.0.0.1:{FLOOR_PORT}/"),
            "http://127.0.0.1/",
            "floor.bench",
        )
    })
    .await
    .unwrap();

    println!(
        "| backend (wrk -t2 -c16 -d5s, mean of 2; worst p99) | through the ingress | direct | ratio |"
    );
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| busybox httpd pod (a connection per request) | {:.0} req/s, p99 {:.2} ms | {:.0} req/s, p99 {:.2} ms | {:.2}× requests/s (target ≥ 0.80) |",
        through.rps,
        through.p99_ms,
        direct.rps,
        direct.p99_ms,
        through.rps / direct.rps
    );
    println!(
        "| in-process axum, keep-alive, 6-byte body (the floor) | {:.0} req/s, p99 {:.2} ms | {:.0} req/s, p99 {:.2} ms | {:.2}× requests/s |",
        floor_through.rps,
        floor_through.p99_ms,
        floor_direct.rps,
        floor_direct.p99_ms,
        floor_through.rps / floor_direct.rps
    );

    drop(httpds);
    network.teardown_pod("web").await.unwrap();
    network.teardown_pod("direct").await.unwrap();
    network.remove_node().await.unwrap();
}
