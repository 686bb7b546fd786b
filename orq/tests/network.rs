//! Services and DNS end to end on the three-host test bed (root; `common/bed.rs`, network
//! 10.217.0.0/24): `sessionAffinity: ClientIP` keeping a client on one pod until its timeout
//! passes, an ExternalName Service resolving through cluster DNS (CNAME and the target's
//! address, in both directions of a type change), a ClusterIP's reverse name, and host ports
//! reachable on the node's address (and on 127.0.0.1 for a pod asking for it), a second
//! pod asking for a taken host port left unscheduled.

#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "common/bed.rs"]
mod bed;
#[path = "common/busybox.rs"]
mod busybox;

use bed::{Bed, HOSTS, http_get, is_root, web_deployment};

fn wait_nodes_ready(bed: &Bed) {
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
}

/// `n` requests to `addr` in a row; the set of pods that answered (a failure counts as
/// `<failed>`).
fn answers(addr: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| http_get(addr, "/").unwrap_or_else(|| "<failed>".into()))
        .collect()
}

/// Runs `command` in the long-running client pod; its stdout, or the failure.
fn exec(bed: &Bed, command: &[&str]) -> Result<String, String> {
    let mut args = vec!["exec", "client", "--"];
    args.extend_from_slice(command);
    bed.kubectl_try(&args)
        .ok_or_else(|| format!("kubectl exec client -- {command:?} failed"))
}

/// Retries `nslookup name` in the client pod until its output satisfies `done`.
fn lookup_until(bed: &Bed, name: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = exec(bed, &["nslookup", name]).unwrap_or_else(|e| e);
        if done(&out) {
            return out;
        }
        assert!(
            Instant::now() < deadline,
            "nslookup {name} in a pod: {out}\n{}",
            bed.logs_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn host_port_pod(bed: &Bed, name: &str, node: &str, port: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "hostport"}},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": node},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "web", "image": format!("{}/busybox:v1", bed.registry_addr),
                "command": ["sh", "-c",
                            "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"],
                "ports": [port],
            }],
        },
    })
}

#[test]
fn affinity_external_names_and_host_ports() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables");
        return;
    }
    let bed = Bed::start(217);
    wait_nodes_ready(&bed);
    bed.apply(&web_deployment(&bed.registry_addr));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "sessionAffinity": "ClientIP",
                 "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 2}},
                 "ports": [{"port": 80, "targetPort": "http"}]},
    }));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {"nodeName": "h1", "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "client",
                                 "image": format!("{}/busybox:v1", bed.registry_addr),
                                 "command": ["sleep", "3600"]}]},
    }));
    bed.wait("deployment/web", Duration::from_secs(120), |d| {
        d["status"]["readyReplicas"] == 3
    });
    let service = bed.get("service/web");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let cluster_ip = service["spec"]["clusterIP"].as_str().unwrap().to_owned();
    let node_addr = format!("{}:{node_port}", bed.host_ip(0));

    // sessionAffinity: a burst from one client lands on one pod; after 2 s of silence the
    // client is free again, so over eight bursts it meets more than one pod (all eight on one
    // of three pods by chance: 1 in 2,187).
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&node_addr, "/").is_none() {
        assert!(
            Instant::now() < deadline,
            "NodePort never answered\n{}",
            bed.ruleset(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut first_of_burst = HashSet::new();
    for burst in 0..8 {
        let seen = answers(&node_addr, 10);
        let distinct: HashSet<&String> = seen.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "burst {burst} to {node_addr} went to several pods: {seen:?}\n{}",
            bed.ruleset(0)
        );
        assert_ne!(seen[0], "<failed>", "burst {burst} failed");
        first_of_burst.insert(seen[0].clone());
        std::thread::sleep(Duration::from_millis(3_000));
    }
    eprintln!("affinity: bursts met {first_of_burst:?}");
    assert!(
        first_of_burst.len() > 1,
        "the affinity never expired: every burst met {first_of_burst:?}"
    );

    // ExternalName: a CNAME to the web Service, followed to its address; the ClusterIP has a
    // reverse name; the type changed to ClusterIP and back.
    bed.wait("pod/client", Duration::from_secs(60), |p| {
        p["status"]["phase"] == "Running"
    });
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "alias", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local"},
    }));
    let out = lookup_until(&bed, "alias.default.svc.cluster.local", |out| {
        out.contains(&cluster_ip)
    });
    eprintln!("nslookup alias: {out}");
    let out = lookup_until(&bed, &cluster_ip, |out| {
        out.contains("web.default.svc.cluster.local")
    });
    eprintln!("nslookup {cluster_ip}: {out}");
    bed.kubectl(&[
        "patch",
        "service",
        "alias",
        "--type=merge",
        "-p",
        r#"{"spec":{"type":"ClusterIP","externalName":null,"ports":[{"port":80}]}}"#,
    ]);
    let alias_ip = bed.get("service/alias")["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(alias_ip, "", "a ClusterIP once the type changed");
    lookup_until(&bed, "alias.default.svc.cluster.local", |out| {
        out.contains(&alias_ip)
    });
    bed.kubectl(&[
        "patch",
        "service",
        "alias",
        "--type=merge",
        "-p",
        r#"{"spec":{"type":"ExternalName","externalName":"web.default.svc.cluster.local","clusterIP":null,"clusterIPs":null,"ports":null}}"#,
    ]);
    lookup_until(&bed, "alias.default.svc.cluster.local", |out| {
        out.contains(&cluster_ip) && !out.contains(&alias_ip)
    });

    // Host ports: one pod on h1's address, one on 127.0.0.1 only, one for UDP — the same
    // port number.
    bed.apply(&host_port_pod(
        &bed,
        "hp-any",
        "h1",
        json!({"containerPort": 8080, "hostPort": 18080}),
    ));
    bed.apply(&host_port_pod(
        &bed,
        "hp-local",
        "h1",
        json!({"containerPort": 8080, "hostPort": 18081, "hostIP": "127.0.0.1"}),
    ));
    for name in ["hp-any", "hp-local"] {
        bed.wait(&format!("pod/{name}"), Duration::from_secs(60), |p| {
            p["status"]["phase"] == "Running" && !p["status"]["podIP"].is_null()
        });
    }
    let host_addr = format!("{}:18080", bed.host_ip(1));
    let deadline = Instant::now() + Duration::from_secs(20);
    let answer = loop {
        if let Some(body) = http_get(&host_addr, "/") {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "host port {host_addr} never answered\n{}",
            bed.ruleset(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(answer, "hp-any", "{host_addr}");
    // 127.0.0.1 on h1 reaches hp-local; its port is not open on h1's address.
    let local = bed
        .nsenter(1, "curl")
        .args(["-s", "-m", "5", "http://127.0.0.1:18081/"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&local.stdout).trim(),
        "hp-local",
        "127.0.0.1:18081 on h1: {}\n{}",
        String::from_utf8_lossy(&local.stderr),
        bed.ruleset(1)
    );
    assert_eq!(
        http_get(&format!("{}:18081", bed.host_ip(1)), "/"),
        None,
        "a 127.0.0.1 host port answered on the node's address"
    );
    // A pod on h0 reaches the host port across nodes.
    let across = exec(
        &bed,
        &[
            "sh",
            "-c",
            &format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {} 18080 | tail -n 1",
                bed.host_ip(1)
            ),
        ],
    )
    .unwrap();
    assert_eq!(across.trim(), "hp-any");

    // Bad input: the same host port again on h1 is not scheduled there.
    bed.apply(&host_port_pod(
        &bed,
        "hp-again",
        "h1",
        json!({"containerPort": 8080, "hostPort": 18080}),
    ));
    std::thread::sleep(Duration::from_secs(3));
    let again = bed.get("pod/hp-again");
    assert_eq!(again["status"]["phase"], "Pending", "{again}");
    assert!(again["spec"]["nodeName"].is_null(), "{again}");
    let events = bed.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=hp-again",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains("free ports"),
        "the scheduler says why: {events}"
    );
    // Deleting the holder frees the port for it.
    bed.kubectl(&["delete", "pod", "hp-any", "--wait=false"]);
    bed.wait("pod/hp-again", Duration::from_secs(60), |p| {
        p["status"]["phase"] == "Running"
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&host_addr, "/").as_deref() != Some("hp-again") {
        assert!(
            Instant::now() < deadline,
            "the freed host port never reached its new pod\n{}",
            bed.ruleset(1)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
