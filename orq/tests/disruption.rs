//! `kubectl drain` held back by a PodDisruptionBudget, with real containers (root): `orq
//! server` with its node agent in a network namespace of the test's own, busybox from a real
//! registry, the real kubectl.
//!
//! A two-replica Deployment and a budget of `minAvailable: 2`: the drain cordons the node and
//! its evictions are refused (429) — kubectl retries them every five seconds — so it does not
//! finish and no pod goes. Lowered to `minAvailable: 1`, the budget allows one eviction; the
//! second is refused again, because the first pod's replacement cannot be Ready: on a single
//! node, a cordoned node is the only place it could go. The test then uncordons the node,
//! standing in for the capacity another node would give in a real cluster: the replacement
//! lands and becomes Ready, the budget allows the second eviction, and the drain completes.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use host::{Host, IMAGE};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

/// The drain, killed (by PID) if the test ends early.
struct Drain(Child);

impl Drop for Drain {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn web_pods(host: &Host) -> Vec<Value> {
    let list: Value =
        serde_json::from_str(&host.kubectl(&["get", "pods", "-l", "app=web", "-o", "json"]))
            .unwrap();
    list["items"].as_array().cloned().unwrap_or_default()
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn ready(pod: &Value) -> bool {
    pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

fn budget(host: &Host) -> Value {
    serde_json::from_str(&host.kubectl(&["get", "pdb", "web", "-o", "json"])).unwrap()
}

/// Waits for the budget to have processed its spec and to allow `allowed` disruptions.
fn wait_allowed(host: &Host, allowed: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pdb = budget(host);
        if pdb["status"]["observedGeneration"] == pdb["metadata"]["generation"]
            && pdb["status"]["disruptionsAllowed"].as_i64().unwrap_or(0) == allowed
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the budget does not allow {allowed}: {:#}",
            pdb["status"]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn drain_waits_for_the_disruption_budget() {
    let host = Host::start("pdb");
    host.apply(&json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"]}],
                },
            },
        },
    }));
    wait_until("two web pods Ready", Duration::from_secs(90), || {
        web_pods(&host).iter().filter(|p| ready(p)).count() == 2
    });
    let originals: Vec<String> = web_pods(&host).iter().map(name).collect();
    host.apply(&json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": "web"},
        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "web"}}},
    }));
    wait_allowed(&host, 0);

    let log = host.dir.path().join("drain.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut drain = Drain(
        host.nsenter("kubectl")
            .arg("--kubeconfig")
            .arg(host.data_dir().join("kubeconfig.yaml"))
            .args([
                "drain",
                "n1",
                "--ignore-daemonsets",
                "--delete-emptydir-data",
                "--pod-selector",
                "app=web",
                "--timeout=240s",
            ])
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    );
    let drain_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The budget allows nothing: the drain keeps retrying, no pod goes.
    wait_until("a refused eviction", Duration::from_secs(30), || {
        drain_log().contains("violate the pod's disruption budget")
    });
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        drain.0.try_wait().unwrap().is_none(),
        "the drain finished against the budget:\n{}",
        drain_log()
    );
    let live: Vec<String> = web_pods(&host)
        .iter()
        .filter(|p| ready(p))
        .map(name)
        .collect();
    assert_eq!(live.len(), 2, "a pod went against the budget: {live:?}");
    let node: Value =
        serde_json::from_str(&host.kubectl(&["get", "node", "n1", "-o", "json"])).unwrap();
    assert_eq!(node["spec"]["unschedulable"], true, "the drain cordons");

    // One disruption allowed: one pod goes; its replacement cannot land on the cordoned node,
    // so the budget holds the other.
    host.kubectl(&[
        "patch",
        "pdb",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"minAvailable":1}}"#,
    ]);
    wait_until("one original pod evicted", Duration::from_secs(60), || {
        let pods = web_pods(&host);
        originals
            .iter()
            .filter(|o| pods.iter().any(|p| &name(p) == *o && ready(p)))
            .count()
            == 1
    });
    std::thread::sleep(Duration::from_secs(7));
    let pods = web_pods(&host);
    assert_eq!(
        originals
            .iter()
            .filter(|o| pods.iter().any(|p| &name(p) == *o && ready(p)))
            .count(),
        1,
        "the budget let the second pod go without a Ready replacement"
    );
    assert!(
        pods.iter()
            .any(|p| !originals.contains(&name(p)) && p["spec"]["nodeName"].is_null()),
        "the replacement should be waiting for a schedulable node"
    );
    assert!(drain.0.try_wait().unwrap().is_none(), "{}", drain_log());

    // The node takes pods again: the replacement becomes Ready, the budget allows the second
    // eviction, the drain completes.
    host.kubectl(&["uncordon", "n1"]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = drain.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the drain did not complete:\n{}\nserver log:\n{}",
            drain_log(),
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(status.success(), "the drain failed:\n{}", drain_log());
    assert!(drain_log().contains("drained"), "{}", drain_log());
    let pods = web_pods(&host);
    assert!(
        pods.iter().all(|p| !originals.contains(&name(p))),
        "an original pod is left: {:?}",
        pods.iter().map(name).collect::<Vec<_>>()
    );
}
