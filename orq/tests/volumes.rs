//! Pods' volumes with real containers (root): `orq server` with its node agent in a network
//! namespace of the test's own, busybox from a real registry, the real kubectl. What a
//! process in the pod sees: files and modes of ConfigMap, Secret, downward API and projected
//! volumes, their updates while the pod runs, a projected token renewed, tmpfs emptyDirs as
//! a non-root user, subPaths, persistent volume claims, and the errors of bad volumes.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use host::{Host, IMAGE, phase};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

/// `sh -c script` in the pod's container.
fn sh(host: &Host, pod: &str, script: &str) -> String {
    host.kubectl(&["exec", pod, "--", "sh", "-c", script])
}

/// Polls `sh` until its output satisfies `done`; returns how long it took.
fn wait_output(
    host: &Host,
    pod: &str,
    script: &str,
    timeout: Duration,
    done: impl Fn(&str) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        let out = sh(host, pod, script);
        if done(&out) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{pod}: `{script}` still says {out:?} after {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The claims of a JWT (unverified: the test reads what the agent wrote).
fn claims(token: &str) -> Value {
    let payload = token.trim().split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

fn events_about(host: &Host, pod: &str) -> String {
    host.kubectl(&[
        "get",
        "events",
        "--field-selector",
        &format!("involvedObject.name={pod}"),
        "-o",
        "custom-columns=REASON:.reason,MESSAGE:.message",
        "--no-headers",
    ])
}

#[test]
fn projected_volumes_follow_their_sources_and_tokens_renew() {
    // Tokens live 30 s at most here, so the agent renews them at ~24 s.
    let host = Host::start_with(
        "volproj",
        "127.0.0.1:6443",
        |_| {},
        &["--service-account-max-token-expiration", "30s"],
    );
    host.apply(&json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf"},
        "data": {"data-1": "value-1", "data-2": "value-2"},
    }));
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "sec"},
        "stringData": {"password": "s3cret"},
    }));
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "reader", "labels": {"app": "reader", "version": "v1"}},
        "spec": {
            "nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "securityContext": {"runAsUser": 1000},
            "containers": [{
                "name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                "resources": {"limits": {"memory": "64Mi"}},
                "volumeMounts": [
                    {"name": "cm", "mountPath": "/cm"},
                    {"name": "sec", "mountPath": "/sec"},
                    {"name": "info", "mountPath": "/info"},
                    {"name": "all", "mountPath": "/all"},
                    {"name": "mem", "mountPath": "/mem"},
                    {"name": "unsized", "mountPath": "/unsized"},
                ],
            }],
            "volumes": [
                {"name": "cm", "configMap": {"name": "conf",
                    "items": [{"key": "data-1", "path": "path/to/data-1", "mode": 0o444}]}},
                {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o440}},
                {"name": "info", "downwardAPI": {"items": [
                    {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
                    {"path": "mem", "resourceFieldRef": {"containerName": "main",
                        "resource": "limits.memory", "divisor": "1Mi"}},
                ]}},
                {"name": "all", "projected": {"sources": [
                    {"configMap": {"name": "conf"}},
                    {"secret": {"name": "sec", "items": [{"key": "password", "path": "pw"}]}},
                    {"downwardAPI": {"items": [{"path": "podname", "fieldRef": {"fieldPath": "metadata.name"}}]}},
                    {"serviceAccountToken": {"audience": "vault", "expirationSeconds": 600, "path": "token"}},
                ]}},
                {"name": "mem", "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}},
                {"name": "unsized", "emptyDir": {"medium": "Memory"}},
            ],
        },
    }));
    host.wait_pod("reader", Duration::from_secs(60), |p| phase(p) == "Running");

    // What the pod sees, as user 1000.
    assert_eq!(sh(&host, "reader", "id -u"), "1000\n");
    assert_eq!(sh(&host, "reader", "cat /cm/path/to/data-1"), "value-1");
    assert_eq!(
        sh(&host, "reader", "stat -L -c %a /cm/path/to/data-1"),
        "444\n"
    );
    assert_eq!(
        sh(&host, "reader", "readlink /cm/path"),
        "..data/path\n",
        "visible names link through ..data"
    );
    assert_eq!(sh(&host, "reader", "stat -L -c %a /sec/password"), "440\n");
    // User 1000 is in no /etc/passwd, so its group is 0 (as container runtimes do), which
    // the group bits of 0440 let read.
    assert_eq!(sh(&host, "reader", "id -g; cat /sec/password"), "0\ns3cret");
    assert_eq!(
        sh(&host, "reader", "cat /info/labels"),
        "app=\"reader\"\nversion=\"v1\""
    );
    assert_eq!(sh(&host, "reader", "cat /info/mem"), "64");
    assert_eq!(
        sh(&host, "reader", "cat /all/data-1 /all/pw /all/podname"),
        "value-1s3cretreader"
    );
    // The token: readable by the pod's user only, for the audience asked.
    assert_eq!(
        sh(&host, "reader", "stat -L -c '%a %u' /all/token"),
        "600 1000\n"
    );
    let first = sh(&host, "reader", "cat /all/token");
    let c = claims(&first);
    assert_eq!(c["aud"], json!(["vault"]), "{c}");
    assert_eq!(c["exp"].as_i64().unwrap() - c["iat"].as_i64().unwrap(), 30);
    assert_eq!(c["kubernetes.io"]["pod"]["name"], "reader");
    // tmpfs: world-writable, its size the sizeLimit; user 1000 creates files in it.
    assert_eq!(
        sh(&host, "reader", "stat -f -c %T /mem; stat -c %a /mem"),
        "tmpfs\n777\n"
    );
    assert_eq!(
        sh(
            &host,
            "reader",
            "echo hi > /mem/f && stat -c '%a %u' /mem/f && df -k /mem | tail -1 | tr -s ' ' | cut -d' ' -f2"
        )
        .replace('\t', " "),
        "644 1000\n16384\n"
    );
    // Without a sizeLimit, the pod's memory limit caps it (the kubelet's default).
    assert_eq!(
        sh(
            &host,
            "reader",
            "df -k /unsized | tail -1 | tr -s ' ' | cut -d' ' -f2"
        ),
        "65536\n"
    );

    // A ConfigMap edit reaches the running pod, through both volumes.
    host.kubectl(&[
        "patch",
        "configmap",
        "conf",
        "--type=merge",
        "-p",
        r#"{"data":{"data-1":"value-1-updated"}}"#,
    ]);
    let took = wait_output(
        &host,
        "reader",
        "cat /cm/path/to/data-1",
        Duration::from_secs(90),
        |out| out == "value-1-updated",
    );
    eprintln!("configMap volume updated in the running pod after {took:?}");
    assert!(took <= Duration::from_secs(90));
    assert_eq!(sh(&host, "reader", "cat /all/data-1"), "value-1-updated");
    // A label change reaches the downward API file.
    host.kubectl(&["label", "pod", "reader", "version=v2", "--overwrite"]);
    wait_output(
        &host,
        "reader",
        "cat /info/labels",
        Duration::from_secs(60),
        |out| out.contains("version=\"v2\""),
    );
    // A key removed from the ConfigMap disappears from the projection that lists all keys.
    host.kubectl(&[
        "patch",
        "configmap",
        "conf",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/data/data-2"}]"#,
    ]);
    wait_output(&host, "reader", "ls /all", Duration::from_secs(60), |out| {
        !out.contains("data-2")
    });

    // The token is renewed before it expires, still for the same audience.
    let renewed = wait_output(
        &host,
        "reader",
        "cat /all/token",
        Duration::from_secs(60),
        |out| out != first,
    );
    eprintln!("projected token renewed after {renewed:?} more");
    let next = claims(&sh(&host, "reader", "cat /all/token"));
    assert_eq!(next["aud"], json!(["vault"]));
    // At 80 % of its 30 s: not sooner (a refresh of the other sources reuses it), and
    // before the old one expired.
    assert!(
        next["iat"].as_i64().unwrap() - c["iat"].as_i64().unwrap() >= 20,
        "{c} → {next}"
    );
    assert!(
        next["iat"].as_i64().unwrap() < c["exp"].as_i64().unwrap(),
        "renewed before the old one expired: {c} → {next}"
    );
}

#[test]
fn bad_volumes_wait_or_fail_with_their_reason() {
    let host = Host::start("volbad");
    // A ConfigMap that does not exist yet: the pod waits (ContainerCreating) with a
    // FailedMount event naming it, and starts once it exists.
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "waits"},
        "spec": {
            "nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "later", "mountPath": "/later"}]}],
            "volumes": [{"name": "later", "configMap": {"name": "later"}}],
        },
    }));
    let pod = host.wait_pod("waits", Duration::from_secs(30), |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"] == "ContainerCreating"
    });
    assert_eq!(phase(&pod), "Pending");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = events_about(&host, "waits");
        if events.contains("FailedMount")
            && events.contains(
                r#"MountVolume.SetUp failed for volume "later" : configmap "later" not found"#,
            )
        {
            break;
        }
        assert!(Instant::now() < deadline, "no FailedMount event: {events}");
        std::thread::sleep(Duration::from_millis(250));
    }
    host.apply(&json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "later"},
        "data": {"k": "here now"},
    }));
    host.wait_pod("waits", Duration::from_secs(30), |p| phase(p) == "Running");
    assert_eq!(sh(&host, "waits", "cat /later/k"), "here now");

    // An optional source that is missing is an empty volume; a hostPath of the wrong type
    // keeps the pod waiting with the check's message.
    let dir = host.dir.path().join("hostdir");
    std::fs::create_dir_all(&dir).unwrap();
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "optional"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", "ls /opt/x; echo done"],
                "volumeMounts": [{"name": "x", "mountPath": "/opt/x"}]}],
            "volumes": [{"name": "x", "secret": {"secretName": "absent", "optional": true}}],
        },
    }));
    host.wait_pod("optional", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(host.kubectl(&["logs", "optional"]), "done\n");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "wrongtype"},
        "spec": {
            "nodeName": "n1",
            "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "h", "mountPath": "/h"}]}],
            "volumes": [{"name": "h", "hostPath": {"path": dir.display().to_string(), "type": "File"}}],
        },
    }));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !events_about(&host, "wrongtype").contains("hostPath type check failed") {
        assert!(
            Instant::now() < deadline,
            "{}",
            events_about(&host, "wrongtype")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(phase(&host.pod("wrongtype")), "Pending");

    // An image volume: the image's files, read-only.
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "imagevol"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE,
                "command": ["sh", "-c", "cat /img/www/index.html; touch /img/x 2>/dev/null || echo read-only"],
                "volumeMounts": [{"name": "img", "mountPath": "/img"}]}],
            "volumes": [{"name": "img", "image": {"reference": IMAGE, "pullPolicy": "IfNotPresent"}}],
        },
    }));
    host.wait_pod("imagevol", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(
        host.kubectl(&["logs", "imagevol"]),
        "hello from orquestra\nread-only\n"
    );

    // subPath: a link out of the volume is refused; subPathExpr expands the container's
    // environment; an expansion to an absolute path is refused.
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "escape"},
        "spec": {
            "nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "initContainers": [{"name": "link", "image": IMAGE,
                "command": ["sh", "-c", "ln -s /etc /vol/out && mkdir -p /vol/in"],
                "volumeMounts": [{"name": "vol", "mountPath": "/vol"}]}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                "volumeMounts": [{"name": "vol", "mountPath": "/etc-of-node", "subPath": "out"}]}],
            "volumes": [{"name": "vol", "emptyDir": {}}],
        },
    }));
    let pod = host.wait_pod("escape", Duration::from_secs(60), |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            == "CreateContainerConfigError"
    });
    let message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("not within volume path"), "{message}");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "expr"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE,
                "command": ["sh", "-c", "echo mine > /mine/file; cat /all/expr/file"],
                "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                "volumeMounts": [
                    {"name": "vol", "mountPath": "/mine", "subPathExpr": "$(POD)"},
                    {"name": "vol", "mountPath": "/all"},
                ]}],
            "volumes": [{"name": "vol", "emptyDir": {}}],
        },
    }));
    host.wait_pod("expr", Duration::from_secs(60), |p| phase(p) == "Succeeded");
    assert_eq!(host.kubectl(&["logs", "expr"]), "mine\n");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "absolute"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE, "command": ["true"],
                "env": [{"name": "P", "value": "/tmp"}],
                "volumeMounts": [{"name": "vol", "mountPath": "/m", "subPathExpr": "$(P)"}]}],
            "volumes": [{"name": "vol", "emptyDir": {}}],
        },
    }));
    host.wait_pod("absolute", Duration::from_secs(60), |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            == "CreateContainerConfigError"
    });
}

#[test]
fn persistent_volume_claims_bind_keep_data_and_are_reclaimed() {
    let host = Host::start("volpvc");
    // The default class, as k3s ships one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while host
        .kubectl_try(&["get", "storageclass", "local-path", "-o", "json"])
        .is_none()
    {
        assert!(Instant::now() < deadline, "no local-path StorageClass");
        std::thread::sleep(Duration::from_millis(200));
    }
    let class: Value =
        serde_json::from_str(&host.kubectl(&["get", "storageclass", "local-path", "-o", "json"]))
            .unwrap();
    assert_eq!(
        class["metadata"]["annotations"]["storageclass.kubernetes.io/is-default-class"],
        "true"
    );
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");

    // A claim naming no class gets the default and waits for its first pod.
    let claim = |name: &str, class: Option<&str>| {
        let mut claim = json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "64Mi"}}},
        });
        if let Some(class) = class {
            claim["spec"]["storageClassName"] = json!(class);
        }
        claim
    };
    host.apply(&claim("data", None));
    let get_claim = |name: &str| -> Value {
        serde_json::from_str(&host.kubectl(&["get", "pvc", name, "-o", "json"])).unwrap()
    };
    assert_eq!(get_claim("data")["spec"]["storageClassName"], "local-path");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !events_about(&host, "data").contains("WaitForFirstConsumer") {
        assert!(Instant::now() < deadline, "{}", events_about(&host, "data"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get_claim("data")["status"]["phase"], "Pending");

    // One pod writes (scheduled: the scheduler picks the node, the volume is made there),
    // the next reads what it wrote.
    let pod = |name: &str, script: &str, claim: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c", script],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            },
        })
    };
    host.apply(&pod("writer", "echo kept > /data/file", "data"));
    host.wait_pod("writer", Duration::from_secs(90), |p| {
        phase(p) == "Succeeded"
    });
    let bound = get_claim("data");
    assert_eq!(bound["status"]["phase"], "Bound", "{bound:#}");
    let volume = bound["spec"]["volumeName"].as_str().unwrap().to_owned();
    let pv: Value =
        serde_json::from_str(&host.kubectl(&["get", "pv", &volume, "-o", "json"])).unwrap();
    assert_eq!(pv["status"]["phase"], "Bound");
    assert_eq!(pv["spec"]["claimRef"]["name"], "data");
    let dir = std::path::PathBuf::from(pv["spec"]["hostPath"]["path"].as_str().unwrap());
    assert!(
        dir.starts_with(host.data_dir().join("agent/storage")),
        "{}",
        dir.display()
    );
    assert_eq!(std::fs::read_to_string(dir.join("file")).unwrap(), "kept\n");
    host.apply(&pod("reader", "cat /data/file", "data"));
    host.wait_pod("reader", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(host.kubectl(&["logs", "reader"]), "kept\n");

    // The claim gone, the volume is Released and (Delete) reclaimed: directory and all.
    host.kubectl(&["delete", "pod", "writer", "reader", "--wait=true"]);
    host.kubectl(&["delete", "pvc", "data", "--wait=true"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while host.kubectl_try(&["get", "pv", &volume]).is_some() || dir.exists() {
        assert!(
            Instant::now() < deadline,
            "volume {volume} not reclaimed: {}",
            host.kubectl(&["get", "pv", "-o", "wide"])
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    // Retain keeps the volume (Released) and its data.
    host.apply(&json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": "keep"},
        "provisioner": "orquestra.io/local-path", "reclaimPolicy": "Retain",
        "volumeBindingMode": "WaitForFirstConsumer",
    }));
    host.apply(&claim("kept", Some("keep")));
    host.apply(&pod("keeper", "echo still here > /data/file", "kept"));
    host.wait_pod("keeper", Duration::from_secs(90), |p| {
        phase(p) == "Succeeded"
    });
    let volume = get_claim("kept")["spec"]["volumeName"]
        .as_str()
        .unwrap()
        .to_owned();
    host.kubectl(&["delete", "pod", "keeper", "--wait=true"]);
    host.kubectl(&["delete", "pvc", "kept", "--wait=true"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let released = loop {
        let pv: Value =
            serde_json::from_str(&host.kubectl(&["get", "pv", &volume, "-o", "json"])).unwrap();
        if pv["status"]["phase"] == "Released" {
            break pv;
        }
        assert!(Instant::now() < deadline, "{:#}", pv["status"]);
        std::thread::sleep(Duration::from_millis(250));
    };
    std::thread::sleep(Duration::from_secs(2));
    let dir = std::path::PathBuf::from(released["spec"]["hostPath"]["path"].as_str().unwrap());
    assert_eq!(
        std::fs::read_to_string(dir.join("file")).unwrap(),
        "still here\n"
    );
    assert!(host.kubectl_try(&["get", "pv", &volume]).is_some());

    // A class that does not exist: Pending, with the reason.
    host.apply(&claim("lost", Some("nope")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !events_about(&host, "lost").contains(r#"storageclass.storage.k8s.io "nope" not found"#) {
        assert!(Instant::now() < deadline, "{}", events_about(&host, "lost"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(get_claim("lost")["status"]["phase"], "Pending");
}

#[test]
fn an_empty_dir_over_its_size_limit_evicts_the_pod() {
    let host = Host::start("volevict");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "filler"},
        "spec": {
            "nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": IMAGE,
                "command": ["sh", "-c", "dd if=/dev/zero of=/scratch/big bs=1M count=8; sleep 3600"],
                "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "4Mi"}}],
        },
    }));
    let pod = host.wait_pod("filler", Duration::from_secs(60), |p| phase(p) == "Failed");
    assert_eq!(pod["status"]["reason"], "Evicted", "{:#}", pod["status"]);
    assert_eq!(
        pod["status"]["message"],
        "Usage of EmptyDir volume \"scratch\" exceeds the limit \"4Mi\". "
    );
}
