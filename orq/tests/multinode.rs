//! Services across nodes, end to end (root): three "hosts" — network namespaces the test
//! creates, each with its own address on a test bridge — run one `orq agent` each; the
//! control plane (`orq server --no-agent`) and a registry listen on the bridge's address in
//! the machine's namespace. Only the test's own addresses (10.213.0.0/24 and the pods'
//! ranges inside the hosts) are ever used. The bed is `common/bed.rs`.
//!
//! It shows the service proxy (NodePort from outside, ClusterIP from a pod on another
//! node, readiness and scale-down taking endpoints out at once, a Service without
//! endpoints refusing connections, deleted Services leaving no rules on any node), the pod
//! network across nodes (a pod reaching a pod on another node by IP), cluster DNS, a host
//! cut off the network turning Unknown, and an agent's cleanup leaving nothing behind.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::json;

#[path = "common/bed.rs"]
mod bed;
#[path = "common/busybox.rs"]
mod busybox;

use bed::{Bed, HOSTS, http_get, is_root, spread, web_deployment};
use busybox::run_ok;

#[test]
fn services_across_three_nodes() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables");
        return;
    }
    let mut bed = Bed::start(213);
    let nodes = bed.wait("nodes", Duration::from_secs(60), |v| {
        let items = v["items"].as_array().unwrap();
        items.len() == HOSTS
            && items.iter().all(|n| {
                !n["spec"]["podCIDR"].is_null()
                    && n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    eprintln!(
        "nodes Ready: {:?}",
        nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["metadata"]["name"].clone(), n["spec"]["podCIDR"].clone()))
            .collect::<Vec<_>>()
    );

    bed.apply(&web_deployment(&bed.registry_addr));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"port": 80, "targetPort": "http"}]},
    }));
    bed.wait("deployment/web", Duration::from_secs(120), |d| {
        d["status"]["readyReplicas"] == 3
    });
    let pods = bed.web_pods();
    let mut on: Vec<&str> = pods.values().map(|(_, node, _)| node.as_str()).collect();
    on.sort();
    assert_eq!(on, ["h0", "h1", "h2"], "one replica per node: {pods:?}");
    let service = bed.get("service/web");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let cluster_ip = service["spec"]["clusterIP"].as_str().unwrap().to_owned();

    // 300 requests from outside to one node's NodePort reach every pod.
    let node_addr = format!("{}:{node_port}", bed.host_ip(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&node_addr, "/").is_none() {
        assert!(
            Instant::now() < deadline,
            "NodePort never answered\n{}",
            bed.ruleset(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = spread(&node_addr, 300);
    eprintln!("NodePort {node_addr}: {seen:?}");
    for name in pods.keys() {
        let count = seen.get(name).copied().unwrap_or(0);
        assert!(
            count >= 45,
            "{name} got {count} of 300: {seen:?}\n{}",
            bed.diagnose()
        );
    }
    // On the node itself the node port answers on 127.0.0.1 too, reaching pods on this node
    // and on the others (as kube-proxy's iptables mode does): users try localhost first.
    let local = bed
        .nsenter(0, "curl")
        .arg("-sS")
        .args(["--max-time", "2", "--retry", "3", "--retry-all-errors"])
        .args(["-H", "Connection: close"])
        .args(["-w", "\n"])
        .args((0..12).map(|_| format!("http://127.0.0.1:{node_port}/")))
        .output()
        .unwrap();
    let answered: std::collections::BTreeSet<String> = String::from_utf8_lossy(&local.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        local.status.success()
            && answered.iter().all(|a| pods.contains_key(a))
            && answered.len() >= 2,
        "curl 127.0.0.1:{node_port} on h0: {answered:?} {}\n{}",
        String::from_utf8_lossy(&local.stderr),
        bed.ruleset(0)
    );

    // From a pod on another node: the ClusterIP (300 requests), a pod by IP on another
    // node, and the Service by its DNS name.
    let (remote_name, (remote_ip, _, _)) = pods
        .iter()
        .find(|(_, (_, node, _))| node == "h0")
        .map(|(n, v)| (n.clone(), v.clone()))
        .unwrap();
    // busybox's nc as the HTTP client (its static wget cannot run without NSS files).
    let script = format!(
        "get() {{ printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $1 $2 | tail -n 1; }}; \
         for i in $(seq 300); do get {cluster_ip} 80 || echo failed; done; \
         echo POD-TO-POD $(get {remote_ip} 8080); \
         echo DNS $(get web.default.svc.cluster.local 80); \
         echo SEARCH $(get web 80); echo END"
    );
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {"nodeName": "h1", "restartPolicy": "Never",
                 "containers": [{"name": "client",
                                 "image": format!("{}/busybox:v1", bed.registry_addr),
                                 "command": ["sh", "-c", script]}]},
    }));
    bed.wait("pod/client", Duration::from_secs(120), |p| {
        p["status"]["phase"] == "Succeeded" || p["status"]["phase"] == "Failed"
    });
    let log = bed.kubectl(&["logs", "client"]);
    let mut through_cluster_ip: HashMap<&str, usize> = HashMap::new();
    for line in log.lines().take(300) {
        *through_cluster_ip.entry(line.trim()).or_default() += 1;
    }
    eprintln!("ClusterIP {cluster_ip} from h1: {through_cluster_ip:?}");
    for name in pods.keys() {
        let count = through_cluster_ip.get(name.as_str()).copied().unwrap_or(0);
        assert!(
            count >= 45,
            "{name} got {count} of 300 through the ClusterIP: {log}"
        );
    }
    assert!(
        log.contains(&format!("POD-TO-POD {remote_name}")),
        "pod on h1 reaching {remote_ip} on h0: {log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("DNS web-")),
        "web.default.svc.cluster.local from a pod: {log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("SEARCH web-")),
        "`web` through the pod's search path: {log}"
    );

    // A pod failing its readiness gets no traffic.
    let (unready_name, (unready_ip, _, _)) = pods
        .iter()
        .find(|(_, (_, node, _))| node == "h2")
        .map(|(n, v)| (n.clone(), v.clone()))
        .unwrap();
    let out = bed
        .nsenter(0, "curl")
        .args([
            "-s",
            "-m",
            "2",
            &format!("http://{unready_ip}:8080/cgi-bin/unready"),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("unready"));
    bed.wait(
        &format!("pod/{unready_name}"),
        Duration::from_secs(20),
        |p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "False")
        },
    );
    // The slice change reaches the proxies a moment after the pod's status.
    std::thread::sleep(Duration::from_secs(1));
    let seen = spread(&node_addr, 100);
    assert!(
        !seen.contains_key(&unready_name),
        "{unready_name} is not ready but got traffic: {seen:?}"
    );
    assert_eq!(seen.values().sum::<usize>(), 100, "{seen:?}");

    // Scaled to one replica: removed pods get no traffic a second later.
    bed.kubectl(&["scale", "deployment", "web", "--replicas=1"]);
    let scaled = Instant::now();
    let mut answers = Vec::new();
    while scaled.elapsed() < Duration::from_secs(4) {
        if let Some(body) = http_get(&node_addr, "/") {
            answers.push((scaled.elapsed(), body));
        }
    }
    let remaining: Vec<String> = bed
        .web_pods()
        .into_iter()
        .filter(|(_, (_, _, live))| *live)
        .map(|(name, _)| name)
        .collect();
    let late: Vec<&(Duration, String)> = answers
        .iter()
        .filter(|(at, body)| *at > Duration::from_secs(1) && !remaining.contains(body))
        .collect();
    assert!(
        late.is_empty(),
        "removed pods answered more than 1 s after the scale-down: {late:?} (remaining {remaining:?})"
    );
    assert!(
        answers.iter().any(|(at, _)| *at > Duration::from_secs(1)),
        "the remaining pod answers"
    );

    // A Service selecting nothing, and one whose named targetPort no pod defines, refuse
    // connections at once.
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "nothing", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "none"}, "ports": [{"port": 80}]},
    }));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "misnamed", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"port": 80, "targetPort": "nope"}]},
    }));
    let mut refusing_ports = Vec::new();
    for name in ["nothing", "misnamed"] {
        let service = bed.get(&format!("service/{name}"));
        let port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        refusing_ports.push(port);
        let addr: SocketAddr = format!("{}:{port}", bed.host_ip(1)).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let begun = Instant::now();
            let result = TcpStream::connect_timeout(&addr, Duration::from_secs(3));
            let took = begun.elapsed();
            if let Err(e) = &result
                && e.kind() == std::io::ErrorKind::ConnectionRefused
            {
                assert!(
                    took < Duration::from_millis(500),
                    "{name}: refused only after {took:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} at {addr}: {result:?} after {took:?}\n{}",
                bed.ruleset(1)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Deleting the Services removes their rules from every node.
    bed.kubectl(&["delete", "service", "web", "nothing", "misnamed"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..HOSTS {
        loop {
            let rules = bed.ruleset(i);
            let stale = rules.contains(&cluster_ip)
                || rules.contains(&format!(". {node_port} :"))
                || refusing_ports
                    .iter()
                    .any(|p| rules.contains(&format!(". {p} :")))
                // The server's own `kubernetes` Service keeps its chains.
                || ["web", "nothing", "misnamed"]
                    .iter()
                    .any(|svc| rules.contains(&format!("-default/{svc}/")));
            if !stale {
                assert!(rules.contains("table ip orquestra-proxy"), "{rules}");
                break;
            }
            assert!(Instant::now() < deadline, "h{i} kept rules:\n{rules}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // The agents joined with the node token, under RBAC: the bootstrap system:node role let
    // them do all of the above without one refusal.
    let metrics = bed.kubectl(&["get", "--raw", "/metrics"]);
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("apiserver_request_total{") && l.contains(r#"code="403""#)),
        "{metrics}"
    );

    // A host cut off the network: its node stops renewing its lease and turns Unknown.
    bed.cut_off(2);
    bed.wait("node/h2", Duration::from_secs(60), |n| {
        n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
    });

    // Told to clean up, an agent leaves nothing of its own behind.
    bed.agents[0].take();
    run_ok(
        bed.nsenter(0, env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--cleanup", "--agent-data-dir"])
            .arg(bed.agent_dir(0)),
    );
    let rules = bed.ruleset(0);
    assert!(rules.trim().is_empty(), "left after cleanup:\n{rules}");
    let routes = bed.nsenter(0, "ip").args(["-4", "route"]).output().unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains("proto 211") && !routes.contains("orq0"),
        "left after cleanup:\n{routes}"
    );
}
