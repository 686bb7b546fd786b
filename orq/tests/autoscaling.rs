//! The HorizontalPodAutoscaler with real containers (root): `orq server` with its node agent
//! in a network namespace of the test's own, busybox from a real registry, the real kubectl.
//! A Deployment whose pods spin the CPU (each capped at 200m, requesting 100m) is scaled up
//! by its autoscaler to the maximum, and back down to the minimum once the pods go idle —
//! the usage read from `metrics.k8s.io`, which the server fills from the node agent's cgroup
//! counters, and which `kubectl top pods` and `kubectl top nodes` show.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use host::{Host, IMAGE};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

fn replicas(host: &Host) -> i64 {
    let d: Value =
        serde_json::from_str(&host.kubectl(&["get", "deployment", "burn", "-o", "json"])).unwrap();
    d["spec"]["replicas"].as_i64().unwrap_or(0)
}

fn running_pods(host: &Host) -> Vec<String> {
    host.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=burn",
        "--field-selector",
        "status.phase=Running",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ])
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

fn hpa(host: &Host) -> Value {
    serde_json::from_str(&host.kubectl(&["get", "hpa", "burn", "-o", "json"])).unwrap()
}

#[test]
fn an_autoscaler_follows_cpu_load_up_and_down() {
    let host = Host::start_with(
        "hpa",
        "127.0.0.1:6443",
        |_| {},
        &[
            "--horizontal-pod-autoscaler-sync-period",
            "5s",
            "--metric-resolution",
            "5s",
        ],
    );
    host.apply(&json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "burn", "namespace": "default"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "burn"}},
            "template": {"metadata": {"labels": {"app": "burn"}}, "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": IMAGE,
                    "command": ["sh", "-c", "while [ ! -e /tmp/stop ]; do :; done; exec sleep 3600"],
                    "resources": {"requests": {"cpu": "100m"}, "limits": {"cpu": "200m"}}}]}}},
    }));
    host.apply(&json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "burn", "namespace": "default"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "burn"},
            "minReplicas": 1, "maxReplicas": 3,
            "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                "target": {"type": "Utilization", "averageUtilization": 50}}}],
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 0}}},
    }));

    // Up: each pod uses ~200 % of its request against a 50 % target.
    let deadline = Instant::now() + Duration::from_secs(120);
    while replicas(&host) < 3 {
        assert!(
            Instant::now() < deadline,
            "not scaled up: {:#}",
            hpa(&host)["status"]
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    let status = hpa(&host)["status"].clone();
    let utilization = status["currentMetrics"][0]["resource"]["current"]["averageUtilization"]
        .as_i64()
        .unwrap();
    assert!(utilization > 100, "{status:#}");

    // `kubectl top`: each busy pod near its 200m cap, the node busy too.
    let deadline = Instant::now() + Duration::from_secs(60);
    let top = loop {
        let top = host.kubectl_try(&["top", "pods", "-l", "app=burn", "--no-headers"]);
        if let Some(top) = top.as_ref()
            && top.lines().count() >= 3
        {
            break top.clone();
        }
        assert!(Instant::now() < deadline, "kubectl top pods: {top:?}");
        std::thread::sleep(Duration::from_secs(1));
    };
    let busy: Vec<i64> = top
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1)?.strip_suffix('m')?.parse().ok())
        .collect();
    assert!(
        busy.iter().filter(|m| **m > 100).count() >= 1,
        "no busy pod in kubectl top pods:\n{top}"
    );
    let nodes = host.kubectl(&["top", "nodes", "--no-headers"]);
    assert!(nodes.starts_with("n1 "), "kubectl top nodes:\n{nodes}");
    let events = host.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "involvedObject.name=burn,reason=SuccessfulRescale",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(
        events.contains("above target"),
        "no rescale event: {events}"
    );

    // Down: every pod goes idle (new ones included, until the count settles).
    let deadline = Instant::now() + Duration::from_secs(150);
    while replicas(&host) > 1 {
        for pod in running_pods(&host) {
            let _ = host.kubectl_try(&["exec", &pod, "--", "touch", "/tmp/stop"]);
        }
        assert!(
            Instant::now() < deadline,
            "not scaled down: {:#}",
            hpa(&host)["status"]
        );
        std::thread::sleep(Duration::from_secs(2));
    }
    let status = hpa(&host)["status"].clone();
    assert_eq!(status["desiredReplicas"], 1, "{status:#}");
}
