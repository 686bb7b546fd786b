//! Priority and preemption with real containers (root): `orq server` with its node agent in
//! a network namespace of the test's own, busybox from a real registry, the real kubectl.
//! The node is made full with a CPU request sized from its allocatable CPU; a pod of a
//! higher PriorityClass then preempts the one filling it and runs in its place.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::{Value, json};

use host::{Host, IMAGE, phase};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

/// Millicores of a CPU quantity (`2`, `1500m`, `0.5`).
fn millicores(q: &str) -> i64 {
    match q.strip_suffix('m') {
        Some(m) => m.parse().unwrap(),
        None => (q.parse::<f64>().unwrap() * 1000.0) as i64,
    }
}

fn pod(name: &str, class: &str, cpu: i64) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {
            "priorityClassName": class,
            "terminationGracePeriodSeconds": 2,
            "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                "resources": {"requests": {"cpu": format!("{cpu}m")}}}],
        },
    })
}

#[test]
fn higher_priority_pod_preempts_on_a_full_node() {
    let host = Host::start("sched");
    let node: Value =
        serde_json::from_str(&host.kubectl(&["get", "node", "n1", "-o", "json"])).unwrap();
    let allocatable = millicores(node["status"]["allocatable"]["cpu"].as_str().unwrap());
    // What is already requested there.
    let pods: Value =
        serde_json::from_str(&host.kubectl(&["get", "pods", "-A", "-o", "json"])).unwrap();
    let taken: i64 = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["spec"]["nodeName"] == "n1")
        .flat_map(|p| {
            p["spec"]["containers"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .filter_map(|c| c["resources"]["requests"]["cpu"].as_str().map(millicores))
        .sum();
    let free = allocatable - taken;
    assert!(free > 100, "node n1 has {free}m CPU free");
    for (name, value) in [("low", 1), ("high", 1000)] {
        host.apply(
            &json!({"apiVersion": "scheduling.k8s.io/v1", "kind": "PriorityClass",
            "metadata": {"name": name}, "value": value}),
        );
    }

    host.apply(&pod("filler", "low", free * 7 / 10));
    let filler = host.wait_pod("filler", Duration::from_secs(60), |p| phase(p) == "Running");
    assert_eq!(filler["spec"]["priority"], 1);
    assert_eq!(filler["spec"]["nodeName"], "n1");

    host.apply(&pod("preemptor", "high", free / 2));
    let preemptor = host.wait_pod("preemptor", Duration::from_secs(90), |p| {
        phase(p) == "Running"
    });
    assert_eq!(preemptor["spec"]["nodeName"], "n1");
    // The filler is gone (or at least on its way out).
    match host.kubectl_try(&["get", "pod", "filler", "-o", "json"]) {
        None => {}
        Some(out) => {
            let filler: Value = serde_json::from_str(&out).unwrap();
            assert!(
                !filler["metadata"]["deletionTimestamp"].is_null(),
                "{filler:#}"
            );
        }
    }
    let events = host.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "reason=Preempted",
        "-o",
        "json",
    ]);
    assert!(events.contains("Preempted by pod"), "{events}");
}
