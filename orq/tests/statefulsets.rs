//! StatefulSets with real containers (root): `orq server` with its node agent in a network
//! namespace of the test's own, busybox from a real registry, the real kubectl. Three pods
//! with stable names, each writing its hostname into its own claim (local-path); a rolling
//! update held by a partition (only ordinals at or above it updated), then partition 0 for
//! all; a deleted pod recreated under its name with its data; `kubectl rollout undo` back to
//! the first revision; and a claim naming a StorageClass that does not exist holding its
//! pod back, with an event on the set naming the claim.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use host::{Host, IMAGE, phase};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

/// A StatefulSet of `replicas` busybox pods, each appending its hostname to `/data/names`
/// in its own claim, with `VERSION` in its environment; `class` for the claims, if any.
fn set(name: &str, replicas: i32, version: &str, class: Option<&str>) -> Value {
    let script = "hostname >> /data/names; trap 'exit 0' TERM; while true; do sleep 1; done";
    let mut claim = json!({"metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}}});
    if let Some(class) = class {
        claim["spec"]["storageClassName"] = json!(class);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "serviceName": name,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"terminationGracePeriodSeconds": 2, "containers": [{
                    "name": "main", "image": IMAGE, "command": ["sh", "-c", script],
                    "env": [{"name": "VERSION", "value": version}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}},
            "volumeClaimTemplates": [claim],
        },
    })
}

fn get(host: &Host, kind: &str, name: &str) -> Value {
    serde_json::from_str(&host.kubectl(&["get", kind, name, "-o", "json"])).unwrap()
}

fn ready(pod: &Value) -> bool {
    phase(pod) == "Running"
        && pod["metadata"]["deletionTimestamp"].is_null()
        && pod["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Polls the set until `done` holds for it and its pods (by ordinal).
fn wait_set(
    host: &Host,
    name: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value, &[Value]) -> bool,
) -> (Value, Vec<Value>) {
    let deadline = Instant::now() + timeout;
    loop {
        let set = get(host, "statefulset", name);
        let list: Value = serde_json::from_str(&host.kubectl(&[
            "get",
            "pods",
            "-l",
            &format!("app={name}"),
            "-o",
            "json",
        ]))
        .unwrap();
        let mut pods = list["items"].as_array().cloned().unwrap_or_default();
        pods.sort_by_key(|p| p["metadata"]["name"].as_str().unwrap_or("").to_owned());
        if done(&set, &pods) {
            return (set, pods);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not reached in {timeout:?}\nstatus: {:#}\npods: {:?}\nserver log:\n{}",
            set["status"],
            pods.iter()
                .map(|p| (
                    p["metadata"]["name"].clone(),
                    p["metadata"]["labels"]["controller-revision-hash"].clone(),
                    p["status"]["phase"].clone()
                ))
                .collect::<Vec<_>>(),
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn revision(pod: &Value) -> &str {
    pod["metadata"]["labels"]["controller-revision-hash"]
        .as_str()
        .unwrap_or("")
}

/// Every pod of the set there, ready, and the update finished at one revision.
fn settled(set: &Value, pods: &[Value], replicas: usize) -> bool {
    let status = &set["status"];
    let update = status["updateRevision"].as_str().unwrap_or("-");
    pods.len() == replicas
        && pods.iter().all(|p| ready(p) && revision(p) == update)
        && status["currentRevision"] == status["updateRevision"]
        && status["readyReplicas"] == json!(replicas)
        && status["observedGeneration"] == set["metadata"]["generation"]
}

#[test]
fn partitioned_rollout_keeps_identity_and_data() {
    let host = Host::start("sts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while host
        .kubectl_try(&["get", "storageclass", "local-path", "-o", "name"])
        .is_none()
    {
        assert!(Instant::now() < deadline, "no local-path StorageClass");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The bad input alongside: its claim's class does not exist.
    host.apply(&set("bad", 1, "v1", Some("nope")));
    host.apply(&set("web", 3, "v1", None));

    // Created in order, each with its name as hostname and its own bound claim.
    let (status, pods) = wait_set(
        &host,
        "web",
        "initial rollout",
        Duration::from_secs(180),
        |s, p| settled(s, p, 3),
    );
    let first = status["status"]["updateRevision"]
        .as_str()
        .unwrap()
        .to_owned();
    let created: Vec<String> = pods
        .iter()
        .map(|p| {
            p["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(created.windows(2).all(|w| w[0] <= w[1]), "{created:?}");
    for i in 0..3 {
        let name = format!("web-{i}");
        let names = host.kubectl(&["exec", &name, "--", "cat", "/data/names"]);
        assert_eq!(names.trim(), name);
        let claim = get(&host, "pvc", &format!("data-web-{i}"));
        assert_eq!(claim["status"]["phase"], "Bound", "{claim:#}");
        assert_eq!(claim["metadata"]["labels"]["app"], "web");
    }

    // The bad set: its claim exists, its pod does not, and an event names the claim.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = host.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.kind=StatefulSet,involvedObject.name=bad",
            "-o",
            "jsonpath={range .items[*]}{.type} {.message}{\"\\n\"}{end}",
        ]);
        if events.contains("Warning") && events.contains("data-bad-0") {
            assert!(events.contains("nope"), "{events}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no event naming the claim: {events}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    get(&host, "pvc", "data-bad-0");
    assert!(
        host.kubectl_try(&["get", "pod", "bad-0", "-o", "name"])
            .is_none(),
        "bad-0 must wait for its claim"
    );

    // A canary: with partition 2 only web-2 gets the new template.
    host.kubectl(&[
        "patch",
        "statefulset",
        "web",
        "-p",
        &json!({"spec": {
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}},
            "template": {"spec": {"containers": [{"name": "main",
                "env": [{"name": "VERSION", "value": "v2"}]}]}}}})
        .to_string(),
    ]);
    let (status, pods) = wait_set(&host, "web", "canary", Duration::from_secs(120), |s, p| {
        let update = s["status"]["updateRevision"].as_str().unwrap_or("");
        update != first
            && p.len() == 3
            && p.iter().all(ready)
            && revision(&p[2]) == update
            && s["status"]["updatedReplicas"] == json!(1)
    });
    let second = status["status"]["updateRevision"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(status["status"]["currentRevision"], json!(first));
    assert_eq!(revision(&pods[0]), first);
    assert_eq!(revision(&pods[1]), first);
    let env = host.kubectl(&["exec", "web-2", "--", "sh", "-c", "echo $VERSION"]);
    assert_eq!(env.trim(), "v2");
    let env = host.kubectl(&["exec", "web-1", "--", "sh", "-c", "echo $VERSION"]);
    assert_eq!(env.trim(), "v1");

    // Partition 0: the rest follow, highest first.
    host.kubectl(&[
        "patch",
        "statefulset",
        "web",
        "-p",
        r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#,
    ]);
    let (status, _) = wait_set(
        &host,
        "web",
        "full rollout",
        Duration::from_secs(180),
        |s, p| settled(s, p, 3),
    );
    assert_eq!(status["status"]["updateRevision"], json!(second));
    host.kubectl(&["rollout", "status", "statefulset/web", "--timeout=60s"]);

    // A deleted pod comes back under its name, with its claim and what it wrote before.
    let before = host.kubectl(&["exec", "web-1", "--", "cat", "/data/names"]);
    let uid = get(&host, "pod", "web-1")["metadata"]["uid"].clone();
    host.kubectl(&["delete", "pod", "web-1", "--wait=false"]);
    let back = host.wait_pod("web-1", Duration::from_secs(120), |p| {
        p["metadata"]["uid"] != uid && ready(p)
    });
    assert_eq!(revision(&back), second);
    let after = host.kubectl(&["exec", "web-1", "--", "cat", "/data/names"]);
    assert_eq!(
        after,
        format!("{before}web-1\n"),
        "the data outlives the pod"
    );

    // `kubectl rollout undo` goes back to the first revision (not a new one).
    host.kubectl(&["rollout", "undo", "statefulset/web"]);
    let (status, _) = wait_set(
        &host,
        "web",
        "rollback",
        Duration::from_secs(180),
        |s, p| s["status"]["updateRevision"] == json!(first) && settled(s, p, 3),
    );
    assert_eq!(status["status"]["currentRevision"], json!(first));
    let env = host.kubectl(&["exec", "web-0", "--", "sh", "-c", "echo $VERSION"]);
    assert_eq!(env.trim(), "v1");
    let history = host.kubectl(&["rollout", "history", "statefulset/web"]);
    assert!(history.contains('2') && history.contains('3'), "{history}");
}
