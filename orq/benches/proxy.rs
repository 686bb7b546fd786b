//! Service proxy benchmark (root), one run, inside a network namespace it creates and enters
//! first (so the bridge, the pod and the nftables table never touch the host):
//!
//! 1. Programming latency with 1,000 Services: the node agent's service proxy (its caches,
//!    its sync loop and `nft`) against the in-process API server; 100 times, one Service's
//!    EndpointSlice gets a new endpoint address, and the clock runs from the API write until
//!    `nft` lists the new address in that Service's chain. Anchor: one bare `nft -f`
//!    transaction adding a map element, the floor any nftables proxy pays per change.
//! 2. Request throughput through a ClusterIP vs straight to a pod: two identical pods set
//!    up by the agent's own network code run busybox httpd, one behind the Service, one
//!    reached by its IP; `wrk` (2 threads, 16 connections, 5 s) against each, alternated
//!    twice. Two pods, because one client reaching one pod both ways within a minute mixes
//!    two TCP timestamp clocks (Linux keys a connection's timestamp offset on the
//!    addresses the client sees: the cluster IP or the pod's) on the same 4-tuples, and
//!    the pod's TIME_WAIT sockets then drop SYNs as PAWS-old (`TcpExtPAWSTimewait`), each
//!    costing a 1 s retransmit: a benchmark artefact, not a cost of either path.
//!
//! `cargo bench -p orq --bench proxy`

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, PostParams};
use orquestra_node_agent::agent;
use orquestra_node_agent::network::{Cidr, Network};
use orquestra_node_agent::proxy::{self, ProxyConfig, ProxyMetrics, ServiceProxy};
use orquestra_operator::testing::TestApi;
use serde_json::json;

use common::busybox::{self, run_ok};
use common::{Proc, percentile};

mod common;

const SERVICES: usize = 1_000;
const CHANGES: usize = 100;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let netns = format!("orqproxybench-{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
    // Enter the namespace before any thread exists: every thread and child inherits it.
    let ns = std::fs::File::open(format!("/run/netns/{netns}")).unwrap();
    {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on an open namespace file descriptor; the process has one thread.
        let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    }
    run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
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

/// Runs `nft` with `args`; its stdout.
fn nft(args: &[&str]) -> String {
    let out = Command::new("nft").args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn nft_file(input: &str) {
    let out = busybox::run_with_input(Command::new("nft").args(["-f", "-"]), input.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cluster_ip(i: usize) -> String {
    format!("10.43.{}.{}", i / 250, 1 + i % 250)
}

fn slice(i: usize, endpoints: &[String], port: i32) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "bench", "conditions": {"ready": true}}))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
                     "annotations": {"endpoints.kubernetes.io/last-change-trigger-time":
                                     jiff::Timestamp::now().to_string()}},
        "addressType": "IPv4", "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    }))
    .unwrap()
}

/// `wrk` requests per second against `url`.
fn wrk(url: &str) -> f64 {
    let out = Command::new("wrk")
        .args(["-t2", "-c16", "-d5s", url])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    assert!(errors.is_none(), "wrk {url}: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("wrk {url}: {text}"))
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApi::start().await.unwrap();
    let client = api.client();

    // Two identical pods, set up by the agent's network code, serving HTTP.
    let network = Network::new(
        "orqbench0",
        Cidr::parse("10.244.0.0/24").unwrap(),
        dir.path().join("ips"),
    );
    network.ensure_node().await.unwrap();
    // A node has a route for the service range (its default route, usually): without one
    // a connection to a cluster IP fails before the proxy's output hook sees it.
    run_ok(Command::new("ip").args(["route", "add", "10.43.0.0/16", "dev", "orqbench0"]));
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

    // 1,000 Services with their slices; svc-0 points at the pod, the rest at addresses
    // that answer nothing (the rules are the same either way).
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let created = Instant::now();
    futures::stream::iter(0..SERVICES)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            let pod_ip = pod.ip.to_string();
            async move {
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": format!("svc-{i}")},
                    "spec": {"clusterIP": cluster_ip(i),
                             "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
                }))
                .unwrap();
                services.create(&PostParams::default(), &svc).await.unwrap();
                let endpoints = if i == 0 {
                    vec![pod_ip]
                } else {
                    vec![
                        format!("10.244.1.{}", 1 + i % 250),
                        format!("10.244.2.{}", 1 + i % 250),
                    ]
                };
                slices
                    .create(&PostParams::default(), &slice(i, &endpoints, 8080))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    println!(
        "{SERVICES} Services with EndpointSlices created in {:.1} s",
        created.elapsed().as_secs_f64()
    );

    // The agent's proxy: caches, sync loop, nft.
    let changed = Arc::new(tokio::sync::Notify::new());
    let (svc_store, svc_feed) = agent::cache::<Service>(&client, vec![Arc::clone(&changed)]);
    let (slice_store, slice_feed) =
        agent::cache::<EndpointSlice>(&client, vec![Arc::clone(&changed)]);
    let (node_store, node_feed) = agent::cache::<Node>(&client, vec![Arc::clone(&changed)]);
    tokio::spawn(svc_feed);
    tokio::spawn(slice_feed);
    tokio::spawn(node_feed);
    let _ = tokio::join!(
        svc_store.wait_until_ready(),
        slice_store.wait_until_ready(),
        node_store.wait_until_ready()
    );
    let registry = prometheus::Registry::new();
    let proxy = ServiceProxy::new(
        ProxyConfig {
            node_name: "bench".into(),
            pod_cidr: network.cidr,
        },
        svc_store,
        slice_store,
        node_store,
        ProxyMetrics::register(&registry).unwrap(),
    );
    let first = Instant::now();
    tokio::spawn(proxy.run(
        Arc::clone(&changed),
        Duration::from_secs(3600),
        std::future::pending(),
    ));
    let last = cluster_ip(SERVICES - 1);
    while !nft(&["list", "map", "ip", proxy::TABLE, "service-ips"]).contains(&last) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "first sync of {SERVICES} Services: {:.0} ms",
        first.elapsed().as_secs_f64() * 1e3
    );

    // Anchor: a bare nft transaction adding one map element.
    nft_file(
        "add table ip anchor\nadd map ip anchor m { type ipv4_addr : verdict; }\nadd chain ip anchor c\n",
    );
    let mut anchor = Vec::new();
    for i in 0..CHANGES {
        let begun = Instant::now();
        nft_file(&format!(
            "add element ip anchor m {{ 10.1.{}.{} : goto c }}\n",
            i / 250,
            1 + i % 250
        ));
        anchor.push(begun.elapsed().as_secs_f64() * 1e3);
    }
    nft_file("delete table ip anchor\n");

    // Changes: one Service's endpoint moves to a new address; until its chain shows it.
    let mut latencies = Vec::new();
    let mut chains = BTreeMap::new();
    for change in 0..CHANGES {
        let i = 1 + (change * 7919) % (SERVICES - 1);
        let chain = chains
            .entry(i)
            .or_insert_with(|| {
                let element = nft(&[
                    "get",
                    "element",
                    "ip",
                    proxy::TABLE,
                    "service-ips",
                    &format!("{{ {} . tcp . 80 }}", cluster_ip(i)),
                ]);
                element
                    .split("goto ")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                    .unwrap_or_else(|| panic!("svc-{i} not programmed: {element}"))
                    .to_owned()
            })
            .clone();
        let new_ip = format!("10.244.3.{}", 1 + change % 250);
        let mut current = slices.get(&format!("svc-{i}")).await.unwrap();
        let fresh = slice(
            i,
            &[new_ip.clone(), format!("10.244.2.{}", 1 + i % 250)],
            8080,
        );
        current.endpoints = fresh.endpoints;
        current.metadata.annotations = fresh.metadata.annotations;
        let begun = Instant::now();
        slices
            .replace(&format!("svc-{i}"), &PostParams::default(), &current)
            .await
            .unwrap();
        loop {
            if nft(&["list", "chain", "ip", proxy::TABLE, &chain]).contains(&new_ip) {
                break;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(10),
                "svc-{i} never showed {new_ip}"
            );
        }
        latencies.push(begun.elapsed().as_secs_f64() * 1e3);
    }

    // Throughput: straight to a pod vs through the cluster IP (to its twin).
    let direct_url = format!("http://{}:8080/", direct_pod.ip);
    let service_url = format!("http://{}/", cluster_ip(0));
    let (mut direct, mut through) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        direct.push(wrk(&direct_url));
        through.push(wrk(&service_url));
    }
    let direct = direct.iter().sum::<f64>() / direct.len() as f64;
    let through = through.iter().sum::<f64>() / through.len() as f64;

    let (a50, a99) = (percentile(&mut anchor, 0.5), percentile(&mut anchor, 0.99));
    let (p50, p99) = (
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
    );
    println!("| measurement | service proxy | anchor | ratio |");
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| endpoint change → rules programmed, {SERVICES} Services, p50 / p99 (ms) | {p50:.1} / {p99:.1} | bare `nft -f` of one element {a50:.1} / {a99:.1} | p50 = {:.1}× the bare transaction (target p99 ≤ 200 ms) |",
        p50 / a50
    );
    println!(
        "| HTTP requests/s, wrk -t2 -c16, new connection per request (busybox httpd) | ClusterIP {through:.0} | pod IP {direct:.0} | {:.2}× direct (target ≥ 0.90) |",
        through / direct
    );

    drop(httpds);
    network.teardown_pod("web").await.unwrap();
    network.teardown_pod("direct").await.unwrap();
    network.remove_node().await.unwrap();
    proxy::cleanup().await.unwrap();
}
