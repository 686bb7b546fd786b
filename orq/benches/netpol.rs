//! NetworkPolicy benchmark (root), one run, inside a network namespace it creates and enters
//! first (so the bridge, the pods and the nftables tables never touch the host):
//!
//! 1. Connection rate between two pods with 1,000 policies vs with none: a client and a
//!    server pod, and a bystander and a twin server, on one bridge, set up by the agent's own
//!    network code, the servers running busybox httpd (a new connection per request); `wrk`
//!    (2 threads, 16 connections, 5 s) from the client's namespace. The 1,000 policies: 998
//!    each letting another (remote) pod reach the server on its own port, one letting the
//!    client reach it on its named port, one isolating the client's egress to the server —
//!    so each connection passes the client's egress set and the server's ingress set (999
//!    elements). The bystander and the twin, selected by none, are the baseline measured
//!    alternately under the same conditions (3 runs each); both pairs also run before any
//!    policy exists.
//! 2. Programming latency with those 1,000 policies: the node agent's enforcement (its
//!    caches, sync loop and `nft`) against the in-process API server; 100 times, one
//!    policy's port changes, and the clock runs from the API write until `nft` lists the new
//!    port in the server's set. Anchor: one bare `nft -f` transaction adding an element to a
//!    1,000-element set of the same type.
//!
//! `cargo bench -p orq --bench netpol`

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, Patch, PatchParams, PostParams};
use orquestra_node_agent::agent;
use orquestra_node_agent::network::policy::{self, PolicyEnforcer, PolicyMetrics};
use orquestra_node_agent::network::{Cidr, Network, PodNetwork};
use orquestra_operator::testing::TestApi;
use serde_json::json;

use common::busybox::{self, run_ok};
use common::{Proc, enter_netns, percentile};

mod common;

const POLICIES: usize = 1_000;
const CHANGES: usize = 100;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let netns = format!("orqnetpolbench-{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
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

/// `wrk` requests per second from pod `client`'s namespace against `url`.
fn wrk(client: &str, url: &str) -> f64 {
    let out = Command::new("ip")
        .args(["netns", "exec", &Network::netns_name(client)])
        .args(["wrk", "-t2", "-c16", "-d5s", url])
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

/// A remote peer's address: on other nodes' pod CIDRs.
fn peer_ip(i: usize) -> String {
    format!("10.244.{}.{}", 1 + i / 250, 1 + i % 250)
}

/// The policy letting peer `i` reach the server on port 10000 + `port`.
fn peer_policy(i: usize, port: usize) -> NetworkPolicy {
    serde_json::from_value(json!({
        "metadata": {"name": format!("peer-{i}")},
        "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"peer": i.to_string()}}}],
                              "ports": [{"port": 10_000 + port, "protocol": "TCP"}]}]},
    }))
    .unwrap()
}

async fn pod(pods: &Api<Pod>, name: &str, node: &str, ip: &str, labels: serde_json::Value) {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "busybox",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip,
                                        "podIPs": [{"ip": ip}]}})),
    )
    .await
    .unwrap();
}

/// `rounds` `wrk` runs of each `(client, url)`, alternated; their means.
fn rates(pairs: &[(&str, &str)], rounds: usize) -> Vec<f64> {
    let mut sums = vec![0.0; pairs.len()];
    for _ in 0..rounds {
        for (i, (client, url)) in pairs.iter().enumerate() {
            sums[i] += wrk(client, url) / rounds as f64;
        }
    }
    sums
}

async fn bench() {
    let dir = tempfile::tempdir().unwrap();
    let api = TestApi::start().await.unwrap();
    let client = api.client();

    // A client and two identical servers on one bridge, set up by the agent's network code.
    let network = Network::new(
        "orqnpbench0",
        Cidr::parse("10.244.0.0/24").unwrap(),
        dir.path().join("ips"),
    );
    network.ensure_node().await.unwrap();
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("index.html"), "hello\n").unwrap();
    let mut httpds = Vec::new();
    let mut addresses: Vec<PodNetwork> = Vec::new();
    for name in ["client", "server", "bystander", "twin"] {
        addresses.push(network.setup_pod(name).await.unwrap());
        if !matches!(name, "client" | "bystander") {
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
    }
    let (client_ip, server_ip, bystander_ip, twin_ip) = (
        addresses[0].ip.to_string(),
        addresses[1].ip.to_string(),
        addresses[2].ip.to_string(),
        addresses[3].ip.to_string(),
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pod(
        &pods,
        "client",
        "bench",
        &client_ip,
        json!({"role": "client"}),
    )
    .await;
    pod(
        &pods,
        "server",
        "bench",
        &server_ip,
        json!({"app": "server"}),
    )
    .await;
    pod(
        &pods,
        "bystander",
        "bench",
        &bystander_ip,
        json!({"role": "bystander"}),
    )
    .await;
    pod(&pods, "twin", "bench", &twin_ip, json!({"app": "twin"})).await;

    // The agent's enforcement: caches, sync loop, nft.
    let changed = Arc::new(tokio::sync::Notify::new());
    let (policy_store, policy_feed) =
        agent::cache::<NetworkPolicy>(&client, vec![Arc::clone(&changed)]);
    let (pod_store, pod_feed) = agent::cache::<Pod>(&client, vec![Arc::clone(&changed)]);
    let (ns_store, ns_feed) = agent::cache::<Namespace>(&client, vec![Arc::clone(&changed)]);
    tokio::spawn(policy_feed);
    tokio::spawn(pod_feed);
    tokio::spawn(ns_feed);
    let _ = tokio::join!(
        policy_store.wait_until_ready(),
        pod_store.wait_until_ready(),
        ns_store.wait_until_ready()
    );
    let registry = prometheus::Registry::new();
    let enforcer = PolicyEnforcer::new(
        "bench".into(),
        policy_store,
        pod_store,
        ns_store,
        PolicyMetrics::register(&registry).unwrap(),
    );
    tokio::spawn(enforcer.run(
        Arc::clone(&changed),
        Duration::from_secs(3600),
        std::future::pending(),
    ));
    while !nft(&["list", "table", "ip", policy::TABLE]).contains("hook forward") {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // No policy: the connection rates of both pairs.
    let server_url = format!("http://{server_ip}:8080/");
    let twin_url = format!("http://{twin_ip}:8080/");
    let pairs = [
        ("client", server_url.as_str()),
        ("bystander", twin_url.as_str()),
    ];
    let before = rates(&pairs, 2);

    // 1,000 policies: 998 remote peers each on its own port, the client on 8080, and the
    // client's egress to both servers.
    let created = Instant::now();
    futures::stream::iter(0..POLICIES - 2)
        .map(|i| {
            let pods = pods.clone();
            async move {
                pod(
                    &pods,
                    &format!("peer-{i}"),
                    "elsewhere",
                    &peer_ip(i),
                    json!({"peer": i.to_string()}),
                )
                .await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), "default");
    let first = Instant::now();
    futures::stream::iter(0..POLICIES - 2)
        .map(|i| {
            let policies = policies.clone();
            async move {
                policies
                    .create(&PostParams::default(), &peer_policy(i, i))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    for extra in [
        json!({"metadata": {"name": "client-to-server"},
               "spec": {"podSelector": {"matchLabels": {"app": "server"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"role": "client"}}}],
                                     "ports": [{"port": "http"}]}]}}),
        json!({"metadata": {"name": "client-egress"},
               "spec": {"podSelector": {"matchLabels": {"role": "client"}},
                        "policyTypes": ["Egress"],
                        "egress": [{"to": [{"podSelector": {"matchExpressions": [
                            {"key": "app", "operator": "In", "values": ["server"]}]}}],
                                    "ports": [{"port": 8080}]}]}}),
    ] {
        let p: NetworkPolicy = serde_json::from_value(extra).unwrap();
        policies.create(&PostParams::default(), &p).await.unwrap();
    }
    // Until the server's set holds every peer and the client is isolated.
    let server_set = loop {
        let table = nft(&["list", "table", "ip", policy::TABLE]);
        let set = table
            .lines()
            .find_map(|l| l.trim().strip_prefix("set ingress-"))
            .map(|rest| format!("ingress-{}", rest.trim_end_matches(" {")));
        if let Some(set) = set
            && table.contains(&format!("{client_ip} : jump egress-"))
        {
            let listed = nft(&["list", "set", "ip", policy::TABLE, &set]);
            if listed.matches(" . tcp . ").count() >= POLICIES - 1 {
                break set;
            }
        }
        assert!(first.elapsed() < Duration::from_secs(120), "{table}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "{} peer pods and {POLICIES} policies created in {:.1} s; the server's set complete {:.1} s after the first policy",
        POLICIES - 2,
        created.elapsed().as_secs_f64(),
        first.elapsed().as_secs_f64()
    );
    // The isolated pair and the untouched one, alternated: the same conditions for both.
    let with = rates(&pairs, 3);

    // Anchor: a bare transaction adding one element to a 1,000-element set of this type.
    let mut anchor_elements = String::new();
    for i in 0..POLICIES {
        anchor_elements.push_str(&format!("{} . 6 . {}, ", peer_ip(i), 10_000 + i));
    }
    nft_file(&format!(
        "add table ip anchor\nadd set ip anchor s {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}\nadd element ip anchor s {{ {} }}\n",
        anchor_elements.trim_end_matches(", ")
    ));
    let mut anchor = Vec::new();
    for i in 0..CHANGES {
        let begun = Instant::now();
        nft_file(&format!(
            "add element ip anchor s {{ 10.250.0.{} . 6 . 80 }}\n",
            1 + i
        ));
        anchor.push(begun.elapsed().as_secs_f64() * 1e3);
    }
    nft_file("delete table ip anchor\n");

    // Changes: one policy's port moves; until the server's set shows the new port.
    let mut latencies = Vec::new();
    for change in 0..CHANGES {
        let i = (change * 7919) % (POLICIES - 2);
        let port = 2_000 + change;
        let mut current = policies.get(&format!("peer-{i}")).await.unwrap();
        current.spec = peer_policy(i, port).spec;
        let wanted = format!("{} . tcp . {}", peer_ip(i), 10_000 + port);
        let begun = Instant::now();
        policies
            .replace(&format!("peer-{i}"), &PostParams::default(), &current)
            .await
            .unwrap();
        loop {
            if nft(&["list", "set", "ip", policy::TABLE, &server_set]).contains(&wanted) {
                break;
            }
            assert!(
                begun.elapsed() < Duration::from_secs(10),
                "peer-{i} never showed {wanted}"
            );
        }
        latencies.push(begun.elapsed().as_secs_f64() * 1e3);
    }
    let metrics = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("orquestra_network_policy_sync_failures_total"))
        .unwrap_or_default()
        .to_owned();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(f64::NAN)
    };
    let mean_ms = |histogram: &str| {
        1e3 * value(&format!("{histogram}_sum")) / value(&format!("{histogram}_count"))
    };

    let (a50, a99) = (percentile(&mut anchor, 0.5), percentile(&mut anchor, 0.99));
    let (p50, p99) = (
        percentile(&mut latencies, 0.5),
        percentile(&mut latencies, 0.99),
    );
    println!("| measurement | with {POLICIES} policies | without | ratio |");
    println!("| --- | ---: | ---: | --- |");
    println!(
        "| new connections/s between two pods on one node, wrk -t2 -c16 (busybox httpd), 3 runs each alternated | client → server, both isolated (the server's set {} elements): {:.0} | bystander → twin, no policy selects them: {:.0} | {:.2}× (target ≥ 0.90) |",
        POLICIES - 1,
        with[0],
        with[1],
        with[0] / with[1]
    );
    println!(
        "| the same pairs before any policy existed, 2 runs each | client → server {:.0} | bystander → twin {:.0} | {:.2}× |",
        before[0],
        before[1],
        before[0] / before[1]
    );
    println!(
        "| policy change → rules programmed, p50 / p99 (ms) | {p50:.1} / {p99:.1} | bare `nft -f` of one element into a {POLICIES}-element set {a50:.1} / {a99:.1} | p99 target ≤ 200 ms |"
    );
    println!(
        "in the agent: a sync takes {:.1} ms on average, a change is programmed {:.1} ms after it reaches the caches; {failures}",
        mean_ms("orquestra_network_policy_sync_duration_seconds"),
        mean_ms("orquestra_network_policy_programming_duration_seconds")
    );

    drop(httpds);
    for name in ["client", "server", "bystander", "twin"] {
        network.teardown_pod(name).await.unwrap();
    }
    network.remove_node().await.unwrap();
    policy::cleanup().await.unwrap();
}
