//! Pod semantics with real containers (root), as the kubelet's: termination messages,
//! init container statuses, QoS classes, users and groups, sysctls, host aliases and
//! hostnames, in-place resizes, and host ports the node refuses to give twice — `orq server` with its node agent in a network namespace
//! of the test's own, busybox from a real registry, the real kubectl.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use serde_json::json;

use host::{Host, IMAGE, phase};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

#[test]
fn termination_messages_init_statuses_and_qos() {
    let host = Host::start("podsem");
    let pod = |name: &str, script: &str, policy: Option<&str>, path: Option<&str>, user: i64| {
        let mut container = json!({
            "name": "main", "image": IMAGE, "command": ["sh", "-c", script],
            "securityContext": {"runAsUser": user},
        });
        if let Some(policy) = policy {
            container["terminationMessagePolicy"] = json!(policy);
        }
        if let Some(path) = path {
            container["terminationMessagePath"] = json!(path);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": "n1", "restartPolicy": "Never", "containers": [container]},
        })
    };
    // The file, as a non-root user at a path of its own; the log tail when the container
    // failed and wrote nothing; nothing when it succeeded.
    host.apply(&pod(
        "custom",
        "echo -n DONE > /dev/termination-custom-log",
        None,
        Some("/dev/termination-custom-log"),
        10000,
    ));
    host.apply(&pod(
        "fallback",
        "echo -n DONE; false",
        Some("FallbackToLogsOnError"),
        None,
        0,
    ));
    host.apply(&pod(
        "succeeded",
        "echo -n DONE; true",
        Some("FallbackToLogsOnError"),
        None,
        0,
    ));
    host.apply(&pod(
        "fromfile",
        "echo -n OK > /dev/termination-log; echo DONE",
        Some("FallbackToLogsOnError"),
        None,
        0,
    ));
    let message = |name: &str, want: &str| {
        let pod = host.wait_pod(name, Duration::from_secs(60), |p| phase(p) == want);
        pod["status"]["containerStatuses"][0]["state"]["terminated"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(message("custom", "Succeeded"), "DONE");
    assert_eq!(message("fallback", "Failed"), "DONE");
    assert_eq!(message("succeeded", "Succeeded"), "");
    assert_eq!(message("fromfile", "Succeeded"), "OK");

    // Completed init containers are ready; the QoS class is the API server's, from every
    // container, there as soon as the pod is created.
    let both = json!({"cpu": "100m", "memory": "32Mi"});
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "inits"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "initContainers": [
                {"name": "one", "image": IMAGE, "command": ["true"],
                 "resources": {"limits": both, "requests": both}},
                {"name": "two", "image": IMAGE, "command": ["true"],
                 "resources": {"limits": both, "requests": both}},
            ],
            "containers": [{"name": "main", "image": IMAGE, "command": ["true"],
                "resources": {"limits": both, "requests": both}}],
        },
    }));
    assert_eq!(host.pod("inits")["status"]["qosClass"], "Guaranteed");
    let done = host.wait_pod("inits", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    let inits = done["status"]["initContainerStatuses"].as_array().unwrap();
    assert!(
        inits
            .iter()
            .all(|s| s["ready"] == true && s["state"]["terminated"]["exitCode"] == 0),
        "{inits:#?}"
    );
    let initialized = done["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Initialized")
        .unwrap()
        .clone();
    assert_eq!(initialized["status"], "True");

    // Safe sysctls are set in the pod's namespaces; others are refused with the reason.
    let sysctl_pod = |name: &str, sysctl: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {
                "nodeName": "n1", "restartPolicy": "Never",
                "securityContext": {"sysctls": [{"name": sysctl, "value": "1"}]},
                "containers": [{"name": "main", "image": IMAGE,
                    "command": ["cat", "/proc/sys/kernel/shm_rmid_forced"]}],
            },
        })
    };
    host.apply(&sysctl_pod("sysctl", "kernel.shm_rmid_forced"));
    host.wait_pod("sysctl", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(host.kubectl(&["logs", "sysctl"]), "1\n");
    host.apply(&sysctl_pod("unsafe", "kernel.msgmax"));
    let refused = host.wait_pod("unsafe", Duration::from_secs(60), |p| {
        p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            == "CreateContainerConfigError"
    });
    let message = refused["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains("kernel.msgmax"), "{message}");
}

#[test]
fn names_hosts_and_service_environment() {
    let host = Host::start("podnames");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "fooservice"},
        "spec": {"ports": [{"port": 8765, "name": "http"}], "selector": {"app": "none"}},
    }));
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "named"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "hostname": "db", "subdomain": "peers", "setHostnameAsFQDN": true,
            "hostAliases": [{"ip": "123.45.67.89", "hostnames": ["foo", "bar"]}],
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c",
                "cat /etc/hosts; hostname; env | grep -E '^(FOOSERVICE|KUBERNETES_SERVICE)_' | sort"]}],
        },
    }));
    host.wait_pod("named", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    let out = host.kubectl(&["logs", "named"]);
    assert!(out.contains("123.45.67.89\tfoo\tbar\n"), "{out}");
    assert!(
        out.contains("\tdb.peers.default.svc.cluster.local\tdb\n"),
        "{out}"
    );
    assert!(
        out.contains("\ndb.peers.default.svc.cluster.local\n"),
        "{out}"
    );
    assert!(out.contains("FOOSERVICE_SERVICE_PORT=8765\n"), "{out}");
    assert!(out.contains("FOOSERVICE_SERVICE_PORT_HTTP=8765\n"), "{out}");
    assert!(out.contains("KUBERNETES_SERVICE_HOST="), "{out}");
    // enableServiceLinks: false keeps only the API server's.
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "unlinked"},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never", "enableServiceLinks": false,
            "containers": [{"name": "main", "image": IMAGE, "command": ["sh", "-c",
                "env | grep -E '^(FOOSERVICE|KUBERNETES_SERVICE)_HOST' | sort"]}],
        },
    }));
    host.wait_pod("unlinked", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    let out = host.kubectl(&["logs", "unlinked"]);
    assert!(!out.contains("FOOSERVICE"), "{out}");
    assert!(out.contains("KUBERNETES_SERVICE_HOST="), "{out}");

    // The pod's containers share one IPC namespace, not the node's.
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ipc"},
        "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 1, "containers": [
            {"name": "a", "image": IMAGE, "command": ["sleep", "3600"]},
            {"name": "b", "image": IMAGE, "command": ["sleep", "3600"]},
        ]},
    }));
    host.wait_pod("ipc", Duration::from_secs(60), |p| phase(p) == "Running");
    let ns = |c: &str| host.kubectl(&["exec", "ipc", "-c", c, "--", "readlink", "/proc/1/ns/ipc"]);
    assert_eq!(ns("a"), ns("b"));
    assert_ne!(
        ns("a").trim(),
        std::fs::read_link("/proc/self/ns/ipc")
            .unwrap()
            .display()
            .to_string()
    );
}

#[test]
fn resize_changes_the_cgroup_in_place() {
    let host = Host::start("podresize");
    let resources = |cpu: &str, memory: &str| json!({"limits": {"cpu": cpu, "memory": memory}, "requests": {"cpu": cpu, "memory": memory}});
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "resized"},
        "spec": {
            "nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "containers": [
                {"name": "inplace", "image": IMAGE, "command": ["sleep", "3600"],
                 "resources": resources("100m", "64Mi")},
                {"name": "restarts", "image": IMAGE, "command": ["sleep", "3600"],
                 "resources": resources("100m", "64Mi"),
                 "resizePolicy": [{"resourceName": "memory", "restartPolicy": "RestartContainer"}]},
            ],
        },
    }));
    host.wait_pod("resized", Duration::from_secs(60), |p| {
        phase(p) == "Running"
    });
    // What the container sees of its own cgroup, v1 or v2.
    let cgroup = |container: &str| {
        host.kubectl(&["exec", "resized", "-c", container, "--", "sh", "-c",
            "if [ -f /sys/fs/cgroup/cgroup.controllers ]; then \
               cat /sys/fs/cgroup/memory.max; cut -d' ' -f1 /sys/fs/cgroup/cpu.max; \
             else cat /sys/fs/cgroup/memory/memory.limit_in_bytes /sys/fs/cgroup/cpu/cpu.cfs_quota_us; fi"])
    };
    assert_eq!(cgroup("inplace"), format!("{}\n10000\n", 64 << 20));
    let patch = json!({"spec": {"containers": [
        {"name": "inplace", "resources": resources("200m", "128Mi")},
        {"name": "restarts", "resources": resources("100m", "96Mi")},
    ]}});
    host.kubectl(&[
        "patch",
        "pod",
        "resized",
        "--subresource",
        "resize",
        "--type",
        "strategic",
        "-p",
        &patch.to_string(),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while cgroup("inplace") != format!("{}\n20000\n", 128 << 20) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            cgroup("inplace")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let pod = host.wait_pod("resized", Duration::from_secs(30), |p| {
        let statuses = p["status"]["containerStatuses"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        p["status"]["observedGeneration"] == p["metadata"]["generation"]
            && statuses.iter().all(|s| s["state"]["running"].is_object())
            && statuses
                .iter()
                .any(|s| s["name"] == "restarts" && s["restartCount"] == 1)
    });
    let statuses = pod["status"]["containerStatuses"].as_array().unwrap();
    let inplace = statuses.iter().find(|s| s["name"] == "inplace").unwrap();
    assert_eq!(inplace["restartCount"], 0, "resized in place: {inplace:#}");
    assert_eq!(inplace["resources"]["limits"]["memory"], "128Mi");
    assert_eq!(inplace["allocatedResources"]["cpu"], "200m");
    assert_eq!(cgroup("restarts"), format!("{}\n10000\n", 96 << 20));
    assert_eq!(pod["metadata"]["generation"], 2);

    // Beyond the node: Infeasible, and the containers keep what they have.
    host.kubectl(&[
        "patch", "pod", "resized", "--subresource", "resize", "--type", "strategic", "-p",
        &json!({"spec": {"containers": [{"name": "inplace", "resources": resources("100000", "128Mi")}]}})
            .to_string(),
    ]);
    let pod = host.wait_pod("resized", Duration::from_secs(30), |p| {
        p["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["type"] == "PodResizePending"))
    });
    let pending = pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "PodResizePending")
        .unwrap()
        .clone();
    assert_eq!(pending["reason"], "Infeasible");
    assert!(
        pending["message"]
            .as_str()
            .unwrap()
            .starts_with("Node didn't have enough capacity: cpu"),
        "{pending}"
    );
    assert_eq!(cgroup("inplace"), format!("{}\n20000\n", 128 << 20));

    // A resize that would change the QoS class is refused by the API server.
    let refused = host
        .nsenter("kubectl")
        .arg("--kubeconfig")
        .arg(host.data_dir().join("kubeconfig.yaml"))
        .args([
            "patch",
            "pod",
            "resized",
            "--subresource",
            "resize",
            "--type",
            "strategic",
            "-p",
        ])
        .arg(
            json!({"spec": {"containers": [{"name": "inplace",
                "resources": {"requests": {"cpu": "50m", "memory": "128Mi"},
                              "limits": {"cpu": "200m", "memory": "128Mi"}}}]}})
            .to_string(),
        )
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("Pod QOS Class may not change"), "{stderr}");
}

#[test]
fn active_deadline_fails_the_pod() {
    let host = Host::start("poddeadline");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "bounded"},
        "spec": {
            "nodeName": "n1", "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"]}],
        },
    }));
    host.wait_pod("bounded", Duration::from_secs(60), |p| {
        phase(p) == "Running"
    });
    // Set (shortened) on the running pod, as the conformance spec does.
    host.kubectl(&[
        "patch",
        "pod",
        "bounded",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"activeDeadlineSeconds":3}}"#,
    ]);
    let pod = host.wait_pod("bounded", Duration::from_secs(30), |p| phase(p) == "Failed");
    assert_eq!(
        pod["status"]["reason"], "DeadlineExceeded",
        "{:#}",
        pod["status"]
    );
    let state = &pod["status"]["containerStatuses"][0]["state"];
    assert!(state["terminated"].is_object(), "{state}");
}

#[test]
fn host_ports_in_use_reject_the_pod() {
    let host = Host::start("podports");
    let pod = |name: &str, host_ip: Option<&str>| {
        let mut port = json!({"containerPort": 21017, "hostPort": 21017});
        if let Some(ip) = host_ip {
            port["hostIP"] = json!(ip);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": "n1", "terminationGracePeriodSeconds": 1, "restartPolicy": "Never",
                "containers": [{"name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                    "ports": [port]}]},
        })
    };
    host.apply(&pod("holder", None));
    host.wait_pod("holder", Duration::from_secs(60), |p| phase(p) == "Running");
    // Bound straight to the node (no scheduler to keep it away): the node refuses it, as
    // the kubelet's admission does — 0.0.0.0 overlaps every address.
    host.apply(&pod("second", Some("127.0.0.1")));
    let rejected = host.wait_pod("second", Duration::from_secs(30), |p| phase(p) == "Failed");
    assert_eq!(
        rejected["status"]["reason"], "NodePorts",
        "{:#}",
        rejected["status"]
    );
    assert!(
        rejected["status"]["message"]
            .as_str()
            .unwrap()
            .contains("didn't have free ports"),
        "{:#}",
        rejected["status"]
    );
    // Once the holder is gone the port is free again.
    host.kubectl(&["delete", "pod", "holder", "--wait=true"]);
    host.apply(&pod("third", None));
    host.wait_pod("third", Duration::from_secs(60), |p| phase(p) == "Running");
}

#[test]
fn privileged_containers_get_every_capability_the_node_has() {
    let host = Host::start("podpriv");
    host.apply(&json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "priv"},
        "spec": {"nodeName": "n1", "restartPolicy": "Never",
            "containers": [{"name": "main", "image": IMAGE,
                "command": ["sh", "-c", "grep CapEff /proc/self/status"],
                "securityContext": {"privileged": true}}]},
    }));
    let pod = host.wait_pod("priv", Duration::from_secs(60), |p| {
        matches!(phase(p), "Succeeded" | "Failed")
    });
    assert_eq!(phase(&pod), "Succeeded", "{:#}", pod["status"]);
    // The container's effective set is the node's bounding set (whatever the host withholds
    // — CAP_SYS_RESOURCE on some sandboxes — it does not ask for).
    let ours = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:").map(|v| v.trim().to_owned()))
        .unwrap();
    let logs = host.kubectl(&["logs", "priv"]);
    assert!(logs.contains(&ours), "{logs} vs the node's {ours}");
}

#[test]
fn runtime_classes_run_known_handlers_only() {
    let host = Host::start("podrtc");
    for (name, handler) in [("runc", "runc"), ("kata", "kata")] {
        host.apply(&json!({
            "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
            "metadata": {"name": name}, "handler": handler,
            "overhead": {"podFixed": {"cpu": "10m", "memory": "1Mi"}},
        }));
    }
    let pod = |name: &str, class: &str| {
        json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": "n1", "restartPolicy": "Never", "runtimeClassName": class,
                     "containers": [{"name": "main", "image": IMAGE, "command": ["true"]}]},
        })
    };
    host.apply(&pod("ok", "runc"));
    let ok = host.wait_pod("ok", Duration::from_secs(60), |p| phase(p) == "Succeeded");
    assert_eq!(ok["spec"]["overhead"]["cpu"], "10m", "the class's overhead");
    host.apply(&pod("refused", "kata"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let events = host.kubectl(&[
            "get",
            "events",
            "--field-selector",
            "involvedObject.name=refused,reason=FailedCreatePodSandBox",
            "-o",
            "jsonpath={.items[*].message}",
        ]);
        if events.contains("no runtime for \"kata\" is configured") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{events}");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(phase(&host.pod("refused")), "Pending");

    // AppArmor on a host without it: refused with the kubelet's reason, not ignored.
    if !std::path::Path::new("/sys/module/apparmor/parameters/enabled").exists() {
        host.apply(&json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "armored"},
            "spec": {"nodeName": "n1", "restartPolicy": "Never",
                     "securityContext": {"appArmorProfile": {"type": "RuntimeDefault"}},
                     "containers": [{"name": "main", "image": IMAGE, "command": ["true"]}]},
        }));
        let pod = host.wait_pod("armored", Duration::from_secs(60), |p| {
            p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                == "CreateContainerConfigError"
        });
        let message = pod["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains("AppArmor is not enabled on the host"),
            "{message}"
        );
    }
}

#[test]
fn registry_mirrors_serve_pulls() {
    // `mirror.invalid` resolves nowhere: its images come from the test's registry, named as
    // its mirror; the test registry's own mirror listens nowhere, so its images come from it.
    let host = Host::start_with(
        "podmirror",
        "127.0.0.1:6443",
        |_| {},
        &[
            "--registry-mirror",
            "mirror.invalid=http://127.0.0.1:5000",
            "--registry-mirror",
            "127.0.0.1:5000=127.0.0.1:5999",
        ],
    );
    for (name, image) in [
        ("mirrored", "mirror.invalid/busybox:v1"),
        ("fallback", IMAGE),
    ] {
        host.apply(&json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": "n1", "restartPolicy": "Never",
                     "containers": [{"name": "main", "image": image, "imagePullPolicy": "Always",
                                     "command": ["echo", "pulled"]}]},
        }));
        host.wait_pod(name, Duration::from_secs(60), |p| phase(p) == "Succeeded");
        assert_eq!(host.kubectl(&["logs", name]), "pulled\n");
    }
    let pod = host.pod("mirrored");
    assert_eq!(
        pod["status"]["containerStatuses"][0]["image"], "mirror.invalid/busybox:v1",
        "the pod's image keeps the name it asked for"
    );
}
