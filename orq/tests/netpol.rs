//! NetworkPolicy enforcement end to end on the three-host test bed (root; `common/bed.rs`,
//! network 10.216.0.0/24): a server pod on h0 (HTTP on 8080 `http` and 8081 `alt`) and four
//! clients — two on h0 beside it (their traffic crosses h0's bridge, which the `ip` hooks see
//! only through bridge netfilter, turned off here first to show the agent turns it back on)
//! and two on h2 (routed across nodes) — one of each labelled `access=yes`.
//!
//! A default-deny ingress policy plus one rule allowing `access=yes` pods: the labelled
//! clients connect, the others time out in 2 s, by the pod's address and through its
//! Service. Overlapping policies (bad input): a second policy letting `role=other` pods
//! reach the named port `alt` adds to the first, and an egress policy on those clients
//! cuts them off again whatever the server allows. Policies deleted: everything connects
//! again, and no pod chain is left on any node.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "common/bed.rs"]
mod bed;
#[path = "common/busybox.rs"]
mod busybox;

use bed::{Bed, HOSTS, is_root};

const NS: &str = "netpol";
/// The bridge netfilter switch, as seen from inside a host's namespace.
const BRIDGE_NF: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// The clients: name, node, labels.
const CLIENTS: [(&str, &str, &str); 4] = [
    ("near-allowed", "h0", "yes"),
    ("near-denied", "h0", "no"),
    ("far-allowed", "h2", "yes"),
    ("far-denied", "h2", "no"),
];

fn pod(bed: &Bed, name: &str, node: &str, labels: Value, script: &str, ports: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS, "labels": labels},
        "spec": {
            "nodeName": node,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": format!("{}/busybox:v1", bed.registry_addr),
                "command": ["sh", "-c", script], "ports": ports,
            }],
        },
    })
}

fn policy(name: &str, spec: Value) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": NS}, "spec": spec})
}

/// One HTTP request from `client` to `addr`:`port` (busybox's nc, 2 s to connect); the
/// answering pod's name, or `None`, and how long it took.
fn probe(bed: &Bed, client: &str, addr: &str, port: u16) -> (Option<String>, Duration) {
    let begun = Instant::now();
    let script = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} {port} | tail -n 1");
    let out = bed.kubectl_try(&["exec", "-n", NS, client, "--", "sh", "-c", &script]);
    let answer = out.map(|o| o.trim().to_owned()).filter(|o| !o.is_empty());
    (answer, begun.elapsed())
}

/// Waits (up to 20 s, for the rules to reach the nodes) until every `(client, port,
/// reachable)` holds for `addr`, the probes of a round run in parallel. A denied probe must
/// give up within 2 s of nc's timeout plus kubectl's overhead: the packet is dropped, the
/// client not left hanging.
fn expect(bed: &Bed, what: &str, addr: &str, cases: &[(&str, u16, bool)]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let results: Vec<(Option<String>, Duration)> = std::thread::scope(|s| {
            let handles: Vec<_> = cases
                .iter()
                .map(|(client, port, _)| s.spawn(move || probe(bed, client, addr, *port)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wrong: Vec<String> = cases
            .iter()
            .zip(&results)
            .filter(|((_, _, want), (got, took))| {
                (got.as_deref() == Some("server")) != *want
                    || (!want && *took > Duration::from_secs(6))
            })
            .map(|((client, port, want), (got, took))| {
                format!("{client} → {addr}:{port}: want {want}, got {got:?} after {took:?}")
            })
            .collect();
        if wrong.is_empty() {
            eprintln!("{what}: as expected ({} probes)", cases.len());
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {wrong:#?}\n{}",
            bed.diagnose()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The policy table on host `i`.
fn policy_table(bed: &Bed, i: usize) -> String {
    let out = bed
        .nsenter(i, "nft")
        .args(["list", "table", "ip", "orquestra-policy"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kubectl get <args> -o json` in the test's namespace.
fn get(bed: &Bed, args: &[&str]) -> Option<Value> {
    let mut all = vec!["get", "-n", NS, "-o", "json"];
    all.extend_from_slice(args);
    serde_json::from_str(&bed.kubectl_try(&all)?).ok()
}

fn bridge_netfilter(bed: &Bed, i: usize) -> String {
    let out = bed.nsenter(i, "cat").arg(BRIDGE_NF).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn default_deny_plus_one_allow_rule_across_two_nodes() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables");
        return;
    }
    let bed = Bed::start_with(216, &[], &[]);
    bed.wait("nodes", Duration::from_secs(60), |v| {
        let items = v["items"].as_array().unwrap();
        items.len() == HOSTS
            && items.iter().all(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    bed.apply(&json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}));
    let serve = "mkdir -p /www && hostname > /www/index.html && httpd -p 8081 -h /www && \
                 exec httpd -f -p 8080 -h /www";
    bed.apply(&pod(
        &bed,
        "server",
        "h0",
        json!({"app": "server"}),
        serve,
        json!([{"name": "http", "containerPort": 8080}, {"name": "alt", "containerPort": 8081}]),
    ));
    for (name, node, access) in CLIENTS {
        let role = if access == "yes" { "client" } else { "other" };
        bed.apply(&pod(
            &bed,
            name,
            node,
            json!({"access": access, "role": role}),
            "exec sleep 3600",
            json!([]),
        ));
    }
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "server", "namespace": NS},
        "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = get(&bed, &["pods"]).is_some_and(|v| {
            let items = v["items"].as_array().cloned().unwrap_or_default();
            items.len() == 1 + CLIENTS.len()
                && items
                    .iter()
                    .all(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
        });
        if running {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods not running: {}\n{}",
            bed.kubectl_try(&["get", "pods", "-n", NS, "-o", "wide"])
                .unwrap_or_default(),
            bed.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let server_ip = get(&bed, &["pod", "server"]).unwrap()["status"]["podIP"]
        .as_str()
        .unwrap()
        .to_owned();
    let cluster_ip = get(&bed, &["service", "server"]).unwrap()["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    let everyone = |port: u16, reachable: bool| -> Vec<(&'static str, u16, bool)> {
        CLIENTS
            .iter()
            .map(|(name, _, _)| (*name, port, reachable))
            .collect()
    };
    expect(&bed, "no policy", &server_ip, &everyone(8080, true));

    // Bridge netfilter off on h0: the agent turns it back on once a pod there is isolated.
    bed.nsenter(0, "sh")
        .args(["-c", &format!("echo 0 > {BRIDGE_NF}")])
        .status()
        .unwrap();
    assert_eq!(bridge_netfilter(&bed, 0), "0");

    // Default deny for ingress, plus one rule: `access=yes` pods may connect.
    bed.apply(&policy(
        "default-deny",
        json!({"podSelector": {}, "policyTypes": ["Ingress"]}),
    ));
    bed.apply(&policy(
        "allow-access",
        json!({"podSelector": {"matchLabels": {"app": "server"}},
               "ingress": [{"from": [{"podSelector": {"matchLabels": {"access": "yes"}}}]}]}),
    ));
    let allow_labelled = [
        ("near-allowed", 8080, true),
        ("far-allowed", 8080, true),
        ("near-denied", 8080, false),
        ("far-denied", 8080, false),
        // No ports in the rule: every port.
        ("near-allowed", 8081, true),
        ("far-denied", 8081, false),
    ];
    expect(
        &bed,
        "default deny + allow access=yes",
        &server_ip,
        &allow_labelled,
    );
    assert_eq!(bridge_netfilter(&bed, 0), "1", "h0's bridge netfilter");
    // Through the Service: judged after the DNAT, on the pod.
    expect(
        &bed,
        "through the ClusterIP",
        &cluster_ip,
        &[
            ("near-denied", 80, false),
            ("far-allowed", 80, true),
            ("near-allowed", 80, true),
        ],
    );
    // The server's node holds its chain; h1 (no pod of the namespace) isolates nobody.
    assert!(
        policy_table(&bed, 0).contains(&format!("{server_ip} : jump ingress-")),
        "{}",
        policy_table(&bed, 0)
    );
    assert!(
        !policy_table(&bed, 1).contains(": jump"),
        "{}",
        policy_table(&bed, 1)
    );

    // Overlapping policies: a second one lets `role=other` pods of this namespace reach the
    // named port `alt` — the union of both, not the intersection.
    bed.apply(&policy(
        "allow-other-alt",
        json!({"podSelector": {"matchLabels": {"app": "server"}},
               "ingress": [{"from": [{"namespaceSelector": {"matchLabels":
                                          {"kubernetes.io/metadata.name": NS}},
                                      "podSelector": {"matchLabels": {"role": "other"}}}],
                            "ports": [{"port": "alt"}]}]}),
    ));
    expect(
        &bed,
        "overlapping ingress policies",
        &server_ip,
        &[
            ("near-denied", 8081, true),
            ("far-denied", 8081, true),
            ("near-denied", 8080, false),
            ("far-denied", 8080, false),
            ("near-allowed", 8080, true),
            ("far-allowed", 8081, true),
        ],
    );
    // Egress denied on the client side wins over what the server allows: on h0 for the
    // client beside the server, on h2 for the one across nodes.
    bed.apply(&policy(
        "deny-other-egress",
        json!({"podSelector": {"matchLabels": {"role": "other"}}, "policyTypes": ["Egress"]}),
    ));
    expect(
        &bed,
        "egress denied",
        &server_ip,
        &[
            ("near-denied", 8081, false),
            ("far-denied", 8081, false),
            ("near-allowed", 8081, true),
            ("far-allowed", 8080, true),
        ],
    );

    // Every policy deleted: everything connects again, and no pod chain is left.
    bed.kubectl(&["delete", "networkpolicy", "-n", NS, "--all"]);
    expect(&bed, "policies deleted", &server_ip, &everyone(8080, true));
    expect(
        &bed,
        "policies deleted, alt",
        &server_ip,
        &everyone(8081, true),
    );
    for i in 0..HOSTS {
        let table = policy_table(&bed, i);
        assert!(
            table.contains("hook forward") && !table.contains(": jump"),
            "h{i}:\n{table}"
        );
    }
    // No sync failed on any node, and the programming was measured.
    for i in 0..HOSTS {
        let metrics = bed.kubectl(&["get", "--raw", &format!("/api/v1/nodes/h{i}/proxy/metrics")]);
        assert!(
            metrics
                .lines()
                .any(|l| l == "orquestra_network_policy_sync_failures_total 0"),
            "h{i}: {}",
            metrics
                .lines()
                .filter(|l| l.contains("network_policy"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let h0 = bed.kubectl(&["get", "--raw", "/api/v1/nodes/h0/proxy/metrics"]);
    let count = h0
        .lines()
        .find_map(|l| {
            l.strip_prefix("orquestra_network_policy_programming_duration_seconds_count ")
        })
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(count >= 4, "h0 programmed {count} changes");

    // `orq agent --cleanup` takes the table away.
    let mut bed = bed;
    bed.agents[1].take();
    busybox::run_ok(
        bed.nsenter(1, env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--cleanup", "--agent-data-dir"])
            .arg(bed.agent_dir(1)),
    );
    let tables = bed
        .nsenter(1, "nft")
        .args(["list", "tables"])
        .output()
        .unwrap();
    let tables = String::from_utf8_lossy(&tables.stdout);
    assert!(!tables.contains("orquestra-policy"), "{tables}");
}
