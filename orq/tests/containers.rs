//! Real containers end to end (root): `orq server` with its node agent runs inside a network
//! namespace the test creates (so its bridge, NAT rules and pod namespaces never touch the
//! host's network), pulls a small busybox image the test builds with umoci and serves from a
//! real registry (Debian's docker-registry) in the same namespace, and runs pods through
//! libcontainer. The real kubectl drives it.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use busybox::{run_ok, run_with_input};
use host::{Host, IMAGE, Netns, Proc, phase, pod_manifest, state};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

#[test]
fn pods_run_fail_restart_and_go() {
    let host = Host::start("pods");
    // A web server, a pod that exits 3 (Never), one that keeps failing (OnFailure), one that
    // runs out of memory, a missing command and a missing image — all at once.
    host.apply(&pod_manifest(
        "web",
        "Always",
        None,
        serde_json::json!({"readinessProbe": {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}}),
    ));
    // Probes: a liveness probe that starts failing after 2 s, a readiness probe that never
    // passes (404).
    host.apply(&pod_manifest(
        "live",
        "Always",
        Some(&[
            "sh",
            "-c",
            "touch /tmp/healthy; sleep 2; rm /tmp/healthy; sleep 3600",
        ]),
        serde_json::json!({"livenessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]},
                                             "periodSeconds": 1, "failureThreshold": 2}}),
    ));
    host.apply(&pod_manifest(
        "unready",
        "Always",
        None,
        serde_json::json!({"readinessProbe": {"httpGet": {"path": "/missing", "port": 8080},
                                              "periodSeconds": 1}}),
    ));
    host.apply(&pod_manifest(
        "exit3",
        "Never",
        Some(&["sh", "-c", "echo bye; exit 3"]),
        Value::Null,
    ));
    host.apply(&pod_manifest(
        "crash",
        "OnFailure",
        Some(&["sh", "-c", "echo crashing; exit 1"]),
        Value::Null,
    ));
    host.apply(&pod_manifest(
        "hog",
        "Never",
        Some(&["dd", "if=/dev/zero", "of=/dev/null", "bs=256M", "count=1"]),
        serde_json::json!({"resources": {"limits": {"memory": "32Mi"}}}),
    ));
    host.apply(&pod_manifest(
        "nocmd",
        "Never",
        Some(&["/bin/does-not-exist"]),
        Value::Null,
    ));
    host.apply(&pod_manifest(
        "logger",
        "Always",
        Some(&[
            "sh",
            "-c",
            "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.2; done",
        ]),
        Value::Null,
    ));
    let mut missing = pod_manifest("noimage", "Never", None, Value::Null);
    missing["spec"]["containers"][0]["image"] = "127.0.0.1:5000/nothing:here".into();
    host.apply(&missing);

    // Running, answering HTTP on its pod IP from the host.
    let web = host.wait_pod("web", Duration::from_secs(60), |p| {
        phase(p) == "Running" && p["status"]["containerStatuses"][0]["ready"] == true
    });
    let ip = web["status"]["podIP"].as_str().unwrap().to_owned();
    // From the /24 node IPAM gave the node.
    let cidr = host.kubectl(&["get", "node", "n1", "-o", "jsonpath={.spec.podCIDR}"]);
    assert!(cidr.ends_with("/24"), "podCIDR {cidr:?}");
    let network = cidr.split('/').next().unwrap();
    let prefix = &network[..network.rfind('.').unwrap() + 1];
    assert!(ip.starts_with(prefix), "{ip} not in {cidr}");
    let body = host
        .curl(&format!("http://{ip}:8080/"))
        .expect("HTTP on the pod IP");
    assert_eq!(body, "hello from orquestra\n");
    let id = web["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap();
    assert!(id.starts_with("libcontainer://"), "{id}");
    let image_id = web["status"]["containerStatuses"][0]["imageID"]
        .as_str()
        .unwrap();
    assert!(
        image_id.starts_with("127.0.0.1:5000/busybox@sha256:"),
        "{image_id}"
    );
    let conditions: Vec<(String, String)> = web["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().into(),
                c["status"].as_str().unwrap().into(),
            )
        })
        .collect();
    for t in ["PodScheduled", "Initialized", "ContainersReady", "Ready"] {
        assert!(
            conditions.contains(&(t.into(), "True".into())),
            "{conditions:?}"
        );
    }
    assert_eq!(web["status"]["qosClass"], "BestEffort");

    // A failing readiness probe keeps the pod running but not Ready.
    let unready = host.wait_pod("unready", Duration::from_secs(60), |p| {
        phase(p) == "Running"
    });
    std::thread::sleep(Duration::from_secs(3));
    let unready = host.pod(unready["metadata"]["name"].as_str().unwrap());
    assert_eq!(unready["status"]["containerStatuses"][0]["ready"], false);
    assert_eq!(unready["status"]["containerStatuses"][0]["restartCount"], 0);
    let ready = unready["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "False");

    // A failing liveness probe restarts the container.
    let live = host.wait_pod("live", Duration::from_secs(60), |p| {
        p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(1)
    });
    assert_eq!(
        live["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 137,
        "killed (sh as PID 1 ignores SIGTERM): {:#}",
        live["status"]
    );

    // The agent's metrics (on the server's /metrics for its local agent): kubelet's and
    // cAdvisor's names, read from the cgroups; promtool finds nothing to complain about.
    let token = std::fs::read_to_string(host.data_dir().join("token")).unwrap();
    let metrics = host
        .nsenter("curl")
        .args(["-sf", "--max-time", "5", "--cacert"])
        .arg(host.data_dir().join("tls/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
        .arg("https://127.0.0.1:6443/metrics")
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout).into_owned();
    let sample = |prefix: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    assert!(
        sample("kubelet_running_pods ").is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    assert!(sample("kubelet_running_containers ").is_some_and(|v| v >= 1.0));
    assert!(sample("kubelet_pod_start_duration_seconds_count ").is_some_and(|v| v >= 1.0));
    let web_memory =
        "container_memory_working_set_bytes{container=\"main\",namespace=\"default\",pod=\"web\"}";
    assert!(sample(web_memory).is_some_and(|v| v > 0.0), "{metrics}");
    let web_cpu =
        "container_cpu_usage_seconds_total{container=\"main\",namespace=\"default\",pod=\"web\"}";
    assert!(sample(web_cpu).is_some_and(|v| v >= 0.0), "{metrics}");
    let ours: String = metrics
        .lines()
        .filter(|l| l.contains("kubelet_") || l.contains("container_"))
        .map(|l| format!("{l}\n"))
        .collect();
    run_with_input(
        Command::new("promtool").args(["check", "metrics"]),
        ours.as_bytes(),
    );

    // `kubectl run` as a newcomer types it: the scheduler places it on the node.
    host.kubectl(&[
        "run",
        "hello",
        &format!("--image={IMAGE}"),
        "--",
        "sh",
        "-c",
        "echo hi from kubectl run; exec httpd -f -p 8080 -h /www",
    ]);
    let hello = host.wait_pod("hello", Duration::from_secs(60), |p| phase(p) == "Running");
    assert_eq!(hello["spec"]["nodeName"], "n1");
    let hello_ip = hello["status"]["podIP"].as_str().unwrap().to_owned();
    host.wait_http(&format!("http://{hello_ip}:8080/"));
    assert_eq!(host.kubectl(&["logs", "hello"]), "hi from kubectl run\n");

    // Exit 3 with restartPolicy Never: Failed, exit code 3.
    let exit3 = host.wait_pod("exit3", Duration::from_secs(60), |p| phase(p) == "Failed");
    assert_eq!(state(&exit3)["terminated"]["exitCode"], 3);
    assert_eq!(state(&exit3)["terminated"]["reason"], "Error");
    assert_eq!(host.kubectl(&["logs", "exit3"]), "bye\n");

    // Events are core/v1 Events from the kubelet, as `kubectl describe` and `get events` read.
    let events: Value =
        serde_json::from_str(&host.kubectl(&["get", "events", "-o", "json"])).unwrap();
    let reasons = |pod: &str| -> Vec<String> {
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == pod)
            .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
            .collect()
    };
    assert!(
        reasons("exit3").contains(&"Started".to_owned()),
        "{:?}",
        reasons("exit3")
    );
    assert!(
        reasons("noimage").contains(&"Failed".to_owned()),
        "{:?}",
        reasons("noimage")
    );
    let described = host.kubectl(&["describe", "pod", "web"]);
    assert!(
        described.contains("Pulled") || described.contains("Started"),
        "{described}"
    );

    // kubectl logs through the API server's pods/log proxy to the agent: --tail,
    // --timestamps, -c, -f, and the errors for a wrong container or no previous one.
    host.wait_pod("logger", Duration::from_secs(60), |p| phase(p) == "Running");
    std::thread::sleep(Duration::from_secs(1));
    let tail = host.kubectl(&["logs", "logger", "--tail=2"]);
    let tail: Vec<&str> = tail.lines().collect();
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert!(tail.iter().all(|l| l.starts_with("line ")), "{tail:?}");
    let stamped = host.kubectl(&["logs", "logger", "-c", "main", "--tail=1", "--timestamps"]);
    let (time, text) = stamped.trim_end().split_once(' ').unwrap();
    assert!(
        time.parse::<k8s_openapi::jiff::Timestamp>().is_ok(),
        "{stamped}"
    );
    assert!(text.starts_with("line "), "{stamped}");
    let followed = host
        .nsenter("timeout")
        .args(["3", "kubectl", "--kubeconfig"])
        .arg(host.data_dir().join("kubeconfig.yaml"))
        .args(["logs", "-f", "logger", "--tail=1"])
        .output()
        .unwrap();
    let followed = String::from_utf8_lossy(&followed.stdout).into_owned();
    let numbers: Vec<u64> = followed
        .lines()
        .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
        .collect();
    assert!(
        numbers.len() >= 5,
        "following streams new lines: {followed:?}"
    );
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    let wrong = host
        .nsenter("kubectl")
        .arg("--kubeconfig")
        .arg(host.data_dir().join("kubeconfig.yaml"))
        .args(["logs", "logger", "-c", "nope"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("nope"));
    let no_previous = host
        .nsenter("kubectl")
        .arg("--kubeconfig")
        .arg(host.data_dir().join("kubeconfig.yaml"))
        .args(["logs", "logger", "--previous"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&no_previous.stderr).contains("previous terminated container"),
        "{}",
        String::from_utf8_lossy(&no_previous.stderr)
    );

    // Over its memory limit: OOMKilled.
    let hog = host.wait_pod("hog", Duration::from_secs(60), |p| phase(p) == "Failed");
    assert_eq!(
        state(&hog)["terminated"]["reason"],
        "OOMKilled",
        "{:#}",
        hog["status"]
    );
    assert_eq!(state(&hog)["terminated"]["exitCode"], 137);

    // A command the image does not have: CreateContainerError with the runtime's reason.
    let nocmd = host.wait_pod("nocmd", Duration::from_secs(60), |p| {
        state(p)["waiting"]["reason"] == "CreateContainerError"
    });
    let message = state(&nocmd)["waiting"]["message"].as_str().unwrap();
    assert!(message.contains("/bin/does-not-exist"), "{message}");

    // An image the registry does not have: ErrImagePull, then ImagePullBackOff.
    let noimage = host.wait_pod("noimage", Duration::from_secs(60), |p| {
        state(p)["waiting"]["reason"] == "ImagePullBackOff"
    });
    assert!(
        state(&noimage)["waiting"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing"),
        "{:#}",
        noimage["status"]
    );

    // OnFailure: restarted at once, then backing off (CrashLoopBackOff) 10 s, 20 s, 40 s…
    // (the delay before restart n+1 is 10 s × 2^(n-1)).
    let backing_off = host.wait_pod("crash", Duration::from_secs(60), |p| {
        p["status"]["containerStatuses"][0]["restartCount"].as_u64() >= Some(2)
            && state(p)["waiting"]["reason"] == "CrashLoopBackOff"
    });
    let restarts = backing_off["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap();
    let message = state(&backing_off)["waiting"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("back-off {}s", 10 << (restarts - 1))),
        "{restarts} restarts: {message}"
    );
    assert_eq!(
        backing_off["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"],
        1
    );
    assert_eq!(phase(&backing_off), "Running");
    // The previous attempt's output stays readable.
    assert_eq!(host.kubectl(&["logs", "crash", "--previous"]), "crashing\n");

    // Delete: stopped within its grace period (busybox httpd as PID 1 ignores SIGTERM, so
    // this is the SIGKILL at the end of 5 s), the pod gone, its address and rootfs released.
    let pod_dir = host
        .data_dir()
        .join("agent/pods")
        .join(web["metadata"]["uid"].as_str().unwrap());
    assert!(pod_dir.exists());
    let begun = Instant::now();
    host.kubectl(&["delete", "pod", "web", "--timeout=30s"]);
    assert!(
        begun.elapsed() < Duration::from_secs(15),
        "{:?}",
        begun.elapsed()
    );
    assert!(
        !pod_dir.exists(),
        "the pod's directory (and rootfs) removed: {:?}\n{}",
        Command::new("find")
            .arg(&pod_dir)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned()),
        host.server_log_tail()
    );
    let ips = std::fs::read_dir(host.data_dir().join("agent/network/ips"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect::<Vec<_>>();
    assert!(!ips.contains(&ip), "{ip} released: {ips:?}");
    assert!(host.curl(&format!("http://{ip}:8080/")).is_none());
    let netns = format!(
        "/run/netns/orq-{}",
        web["metadata"]["uid"].as_str().unwrap()
    );
    assert!(!Path::new(&netns).exists(), "{netns} removed");
}

#[test]
fn agent_sigkill_keeps_containers_running() {
    let mut host = Host::start("restart");
    for i in 0..5 {
        host.apply(&pod_manifest(
            &format!("p{i}"),
            "Always",
            Some(&["sleep", "3600"]),
            Value::Null,
        ));
    }
    let ids = |host: &Host| -> Vec<(String, Value, Value)> {
        (0..5)
            .map(|i| {
                let pod = host.wait_pod(&format!("p{i}"), Duration::from_secs(60), |p| {
                    phase(p) == "Running"
                });
                let status = &pod["status"]["containerStatuses"][0];
                (
                    format!("p{i}"),
                    status["containerID"].clone(),
                    status["restartCount"].clone(),
                )
            })
            .collect()
    };
    let pids = |host: &Host| -> Vec<i32> {
        let mut pids = Vec::new();
        for pod in std::fs::read_dir(host.data_dir().join("agent/pods")).unwrap() {
            let started = pod.unwrap().path().join("containers/main/0/started.json");
            let started: Value = serde_json::from_slice(&std::fs::read(started).unwrap()).unwrap();
            pids.push(started["pid"].as_i64().unwrap() as i32);
        }
        pids.sort();
        pids
    };
    let before = ids(&host);
    let before_pids = pids(&host);
    assert_eq!(before_pids.len(), 5);
    host.kill_server();
    host.start_server();
    // Give the new agent time to re-adopt (and, were it wrong, to restart) the containers.
    std::thread::sleep(Duration::from_secs(3));
    let after = ids(&host);
    assert_eq!(before, after, "same containers, no restarts");
    for (_, _, restarts) in &after {
        assert_eq!(restarts, 0);
    }
    assert_eq!(pids(&host), before_pids, "the same processes");
    for pid in &before_pids {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{pid} still runs"
        );
    }

    // The re-adopted pods are still managed: a deletion is carried out.
    host.kubectl(&["delete", "pod", "p0", "--timeout=30s"]);

    // An orphan: p1 deleted while no agent ran (the API server alone, force delete); the
    // next agent stops its container and removes its state.
    let p1 = host.pod("p1");
    let p1_dir = host
        .data_dir()
        .join("agent/pods")
        .join(p1["metadata"]["uid"].as_str().unwrap());
    let p1_pid: i32 = serde_json::from_slice::<Value>(
        &std::fs::read(p1_dir.join("containers/main/0/started.json")).unwrap(),
    )
    .unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    host.kill_server();
    host.start_server_with(&["--no-agent"]);
    host.kubectl(&["delete", "pod", "p1", "--grace-period=0", "--force"]);
    host.kill_server();
    host.start_server();
    let deadline = Instant::now() + Duration::from_secs(30);
    while p1_dir.exists() || Path::new(&format!("/proc/{p1_pid}")).exists() {
        assert!(Instant::now() < deadline, "orphan p1 not cleaned up");
        std::thread::sleep(Duration::from_millis(200));
    }
    let left = pids(&host);
    assert_eq!(left.len(), 3, "p2, p3 and p4 untouched");
    assert!(left.iter().all(|p| before_pids.contains(p)));
}

#[test]
fn init_containers_volumes_and_environment() {
    let host = Host::start("volumes");
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings"},
        "data": {"greeting": "hello", "file.txt": "from a configmap"},
    }));
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "creds"},
        "stringData": {"password": "s3cret"},
    }));
    // Two init containers in order (the second sees the first's file in the shared
    // emptyDir), then the main container reads everything the pod gives it.
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "vols", "labels": {"app": "vols"}},
        "spec": {
            "nodeName": "n1", "restartPolicy": "Never",
            "initContainers": [
                {"name": "first", "image": IMAGE, "command": ["sh", "-c", "echo one > /work/order"],
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
                {"name": "second", "image": IMAGE, "command": ["sh", "-c", "cat /work/order > /work/seen; echo two >> /work/seen"],
                 "volumeMounts": [{"name": "work", "mountPath": "/work"}]},
            ],
            "containers": [{
                "name": "main", "image": IMAGE,
                "command": ["sh", "-c", "cat /work/seen; cat /config/file.txt; echo; echo $GREETING $PASSWORD $POD_NAME $NODE $(hostname); cat /info/labels; echo; id -u"],
                "env": [
                    {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                ],
                "securityContext": {"runAsUser": 65534},
                "volumeMounts": [
                    {"name": "work", "mountPath": "/work"},
                    {"name": "config", "mountPath": "/config"},
                    {"name": "info", "mountPath": "/info"},
                ],
            }],
            "volumes": [
                {"name": "work", "emptyDir": {}},
                {"name": "config", "configMap": {"name": "settings"}},
                {"name": "info", "downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            ],
        },
    }));
    let pod = host.wait_pod("vols", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded" || phase(p) == "Failed"
    });
    assert_eq!(phase(&pod), "Succeeded", "{:#}", pod["status"]);
    let inits = pod["status"]["initContainerStatuses"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    assert!(
        inits
            .iter()
            .all(|s| s["state"]["terminated"]["reason"] == "Completed")
    );
    assert_eq!(
        host.kubectl(&["logs", "vols"]),
        "one\ntwo\nfrom a configmap\nhello s3cret vols n1 vols\napp=\"vols\"\n65534\n"
    );
    // hostNetwork: the node's address and network namespace.
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "hostnet"},
        "spec": {"nodeName": "n1", "hostNetwork": true, "restartPolicy": "Never", "containers": [{
            "name": "main", "image": IMAGE,
            "command": ["cat", "/proc/net/dev"],
        }]},
    }));
    let hostnet = host.wait_pod("hostnet", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded" || phase(p) == "Failed"
    });
    assert_eq!(phase(&hostnet), "Succeeded", "{:#}", hostnet["status"]);
    assert_eq!(hostnet["status"]["podIP"], "127.0.0.1");
    let devices = host.kubectl(&["logs", "hostnet"]);
    assert!(
        devices.contains("orq0:"),
        "sees the node's bridge: {devices}"
    );

    // A missing ConfigMap key is the pod's configuration error, not a crash.
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "badref"},
        "spec": {"nodeName": "n1", "containers": [{
            "name": "main", "image": IMAGE, "command": ["sleep", "3600"],
            "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "missing"}}}],
        }]},
    }));
    let bad = host.wait_pod("badref", Duration::from_secs(60), |p| {
        state(p)["waiting"]["reason"] == "CreateContainerConfigError"
    });
    let message = state(&bad)["waiting"]["message"].as_str().unwrap();
    assert!(message.contains("missing"), "{message}");
}

#[test]
fn images_import_without_a_registry() {
    let host = Host::start("images");
    let layout = host.dir.path().join("oci");
    let orq_image = |args: &[&str]| -> Output {
        host.nsenter(env!("CARGO_BIN_EXE_orq"))
            .arg("image")
            .args(args)
            .arg("--agent-data-dir")
            .arg(host.data_dir().join("agent"))
            .output()
            .unwrap()
    };
    // A layout naming its image only by tag needs a repository.
    let refused = orq_image(&["import", layout.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--name"));
    // As an archive, under a name no registry serves.
    let archive = host.dir.path().join("busybox.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&archive)
            .arg("."),
    );
    let imported = orq_image(&[
        "import",
        archive.to_str().unwrap(),
        "--name",
        "example.invalid/busybox",
    ]);
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    let listed = String::from_utf8_lossy(&orq_image(&["ls"]).stdout).into_owned();
    assert!(
        listed.contains("example.invalid/busybox:busybox"),
        "{listed}"
    );
    // A pod runs it with imagePullPolicy Never.
    let mut pod = pod_manifest(
        "imported",
        "Never",
        Some(&["echo", "from an import"]),
        Value::Null,
    );
    pod["spec"]["containers"][0]["image"] = "example.invalid/busybox:busybox".into();
    pod["spec"]["containers"][0]["imagePullPolicy"] = "Never".into();
    host.apply(&pod);
    host.wait_pod("imported", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(host.kubectl(&["logs", "imported"]), "from an import\n");
    // Removed: gone from the list; a pod that needs it cannot pull it (policy Never).
    assert!(
        orq_image(&["rm", "example.invalid/busybox:busybox"])
            .status
            .success()
    );
    let listed = String::from_utf8_lossy(&orq_image(&["ls"]).stdout).into_owned();
    assert!(!listed.contains("example.invalid"), "{listed}");
    let mut again = pod;
    again["metadata"]["name"] = "again".into();
    host.apply(&again);
    host.wait_pod("again", Duration::from_secs(60), |p| {
        state(p)["waiting"]["reason"] == "ErrImageNeverPull"
    });
    // And pulling prints progress.
    let pulled = orq_image(&["pull", IMAGE]);
    assert!(
        pulled.status.success(),
        "{}",
        String::from_utf8_lossy(&pulled.stderr)
    );
    assert!(String::from_utf8_lossy(&pulled.stderr).contains("layers"));

    // A registry on a non-loopback address (inside the test's namespace) is HTTPS unless
    // configured as insecure.
    run_ok(
        host.nsenter("ip")
            .args(["addr", "add", "10.77.0.1/32", "dev", "lo"]),
    );
    let remote = "10.77.0.1:5000/busybox:v1";
    let refused = orq_image(&["pull", remote]);
    assert!(
        !refused.status.success(),
        "HTTPS to a plain-HTTP registry must fail"
    );
    let allowed = orq_image(&["pull", remote, "--insecure-registry", "10.77.0.1:5000"]);
    assert!(
        allowed.status.success(),
        "{}",
        String::from_utf8_lossy(&allowed.stderr)
    );

    // A registry serving a layer whose bytes do not match its digest: refused, nothing stored.
    for reference in [IMAGE, remote] {
        assert!(orq_image(&["rm", reference]).status.success());
    }
    let mut blobs = Vec::new();
    let mut dirs = vec![host.dir.path().join("registry")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                dirs.push(entry.path());
            } else if entry.file_name() == "data" {
                blobs.push((entry.metadata().unwrap().len(), entry.path()));
            }
        }
    }
    let (size, layer) = blobs.into_iter().max().unwrap();
    let mut bytes = std::fs::read(&layer).unwrap();
    let middle = (size / 2) as usize;
    bytes[middle] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    let corrupt = orq_image(&["pull", IMAGE]);
    assert!(!corrupt.status.success());
    let message = String::from_utf8_lossy(&corrupt.stderr).to_lowercase();
    assert!(message.contains("digest"), "{message}");
    let listed = String::from_utf8_lossy(&orq_image(&["ls"]).stdout).into_owned();
    assert!(!listed.contains("busybox"), "{listed}");
}

/// Issue 6 with real containers on one node, driven by the real kubectl: create a
/// Deployment, scale it, change its image and undo that, expose it (the Endpoints list the
/// ready pods' IPs), then delete its namespace and see everything go.
#[test]
fn deployments_with_kubectl() {
    let host = Host::start("deploy");
    // A second tag of the same image: a new template for `set image`.
    let v2 = IMAGE.replace(":v1", ":v2");
    let copied = host
        .nsenter("skopeo")
        .args([
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ])
        .arg(format!("docker://{IMAGE}"))
        .arg(format!("docker://{v2}"))
        .output()
        .unwrap();
    assert!(
        copied.status.success(),
        "{}",
        String::from_utf8_lossy(&copied.stderr)
    );
    let rollout =
        |what: &str| host.kubectl(&["-n", "shop", "rollout", "status", what, "--timeout=120s"]);
    // Running pods of the Deployment: name → (image, IP).
    let pods = || -> Vec<(String, String, String)> {
        let list: Value = serde_json::from_str(
            &host.kubectl(&["-n", "shop", "get", "pods", "-l", "app=web", "-o", "json"]),
        )
        .unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && phase(p) == "Running")
            .map(|p| {
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    p["spec"]["containers"][0]["image"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                    p["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    };
    let wait_pods = |count: usize, image: &str| -> Vec<(String, String, String)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = pods();
            if now.len() == count && now.iter().all(|(_, i, _)| i == image) {
                return now;
            }
            assert!(
                Instant::now() < deadline,
                "want {count} pods of {image}, have {now:?}\n{}",
                host.server_log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    host.kubectl(&["create", "namespace", "shop"]);
    // A shell that leaves at once on SIGTERM, so rollouts do not wait out the grace period.
    host.kubectl(&[
        "-n",
        "shop",
        "create",
        "deployment",
        "web",
        "--image",
        IMAGE,
        "--replicas=2",
        "--port=8080",
        "--",
        "sh",
        "-c",
        "trap 'exit 0' TERM; sleep 3600 & wait",
    ]);
    let out = rollout("deployment/web");
    assert!(out.contains("successfully rolled out"), "{out}");
    wait_pods(2, IMAGE);

    host.kubectl(&["-n", "shop", "scale", "deployment/web", "--replicas=3"]);
    rollout("deployment/web");
    wait_pods(3, IMAGE);

    host.kubectl(&[
        "-n",
        "shop",
        "set",
        "image",
        "deployment/web",
        &format!("busybox={v2}"),
    ]);
    rollout("deployment/web");
    wait_pods(3, &v2);
    let history = host.kubectl(&["-n", "shop", "rollout", "history", "deployment/web"]);
    assert!(history.contains('1') && history.contains('2'), "{history}");

    host.kubectl(&["-n", "shop", "rollout", "undo", "deployment/web"]);
    rollout("deployment/web");
    let running = wait_pods(3, IMAGE);
    let revision = host.kubectl(&[
        "-n",
        "shop",
        "get",
        "deployment",
        "web",
        "-o",
        "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}",
    ]);
    assert_eq!(revision, "3");

    // Exposed: the Endpoints list exactly the ready pods' IPs, on the container port.
    host.kubectl(&[
        "-n",
        "shop",
        "expose",
        "deployment",
        "web",
        "--port=80",
        "--target-port=8080",
    ]);
    let mut want: Vec<String> = running.iter().map(|(_, _, ip)| ip.clone()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let endpoints: Value = serde_json::from_str(
            &host
                .kubectl_try(&["-n", "shop", "get", "endpoints", "web", "-o", "json"])
                .unwrap_or_else(|| "{}".into()),
        )
        .unwrap();
        let subset = &endpoints["subsets"][0];
        let mut ips: Vec<String> = subset["addresses"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|a| a["ip"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        ips.sort();
        if ips == want {
            assert_eq!(subset["ports"][0]["port"], 8080);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "endpoints {ips:?}, pods {want:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Deleting the namespace removes everything in it, then the namespace.
    host.kubectl(&["delete", "namespace", "shop", "--wait=false"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    while host.kubectl_try(&["get", "namespace", "shop"]).is_some() {
        assert!(
            Instant::now() < deadline,
            "namespace shop still there: {}",
            host.kubectl(&["get", "all", "-n", "shop"])
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let left = host.kubectl(&[
        "get",
        "pods,replicasets,deployments,services",
        "-A",
        "-o",
        "name",
    ]);
    assert!(!left.contains("web"), "left behind: {left}");
}

/// Gives a host namespace a default route (through a veth pair of its own: no dummy module
/// here) like a real machine's: its source address, 192.0.2.2, is what a server listening on
/// every address advertises, so pods reach it there.
fn uplink(netns: &Netns) {
    let ip = |args: &[&str]| run_ok(Command::new("ip").arg("-n").arg(&netns.0).args(args));
    ip(&[
        "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1",
    ]);
    ip(&["addr", "add", "192.0.2.2/24", "dev", "uplink0"]);
    ip(&["link", "set", "uplink1", "up"]);
    ip(&["link", "set", "uplink0", "up"]);
    ip(&["route", "add", "default", "via", "192.0.2.1"]);
}

#[test]
fn pods_get_a_service_account_token_and_reach_the_api_server() {
    let host = Host::start_listening("incluster", "0.0.0.0:6443", uplink);
    let slice: Value =
        serde_json::from_str(&host.kubectl(&["get", "endpointslice", "kubernetes", "-o", "json"]))
            .unwrap();
    assert_eq!(
        slice["endpoints"][0]["addresses"][0], "192.0.2.2",
        "the default route's address is advertised"
    );
    let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let script = format!(
        "echo NS=$(cat {dir}/namespace); echo TOKEN=$(cat {dir}/token); cat {dir}/ca.crt; \
         echo HOST=$KUBERNETES_SERVICE_HOST PORT=$KUBERNETES_SERVICE_PORT \
              HTTPS=$KUBERNETES_SERVICE_PORT_HTTPS LINK=$KUBERNETES_PORT; \
         if touch {dir}/x 2>/dev/null; then echo writable; else echo read-only; fi; \
         if echo | nc -w 3 $KUBERNETES_SERVICE_HOST $KUBERNETES_SERVICE_PORT >/dev/null 2>&1; \
         then echo reachable; else echo unreachable; fi"
    );
    host.apply(&pod_manifest(
        "incluster",
        "Never",
        Some(&["sh", "-c", &script]),
        Value::Null,
    ));
    let mut opted_out = pod_manifest(
        "optout",
        "Never",
        Some(&[
            "sh",
            "-c",
            &format!("if test -e {dir}/token; then echo mounted; else echo not-mounted; fi"),
        ]),
        Value::Null,
    );
    opted_out["spec"]["automountServiceAccountToken"] = false.into();
    host.apply(&opted_out);

    for name in ["incluster", "optout"] {
        let pod = host.wait_pod(name, Duration::from_secs(60), |p| {
            phase(p) == "Succeeded" || phase(p) == "Failed"
        });
        assert_eq!(phase(&pod), "Succeeded", "{:#}", pod["status"]);
        assert_eq!(pod["spec"]["serviceAccountName"], "default");
    }
    assert_eq!(host.kubectl(&["logs", "optout"]), "not-mounted\n");
    let logs = host.kubectl(&["logs", "incluster"]);
    assert!(logs.contains("NS=default\n"), "{logs}");
    let ca = std::fs::read_to_string(host.data_dir().join("tls/ca.crt")).unwrap();
    assert!(logs.contains(ca.trim()), "ca.crt is the cluster CA: {logs}");
    assert!(
        logs.contains("HOST=10.43.0.1 PORT=443 HTTPS=443 LINK=tcp://10.43.0.1:443\n"),
        "{logs}"
    );
    assert!(logs.contains("read-only\n"), "{logs}");
    assert!(
        logs.contains("reachable\n") && !logs.contains("unreachable"),
        "the pod reaches the API server through its Service: {logs}"
    );
    // The token is the pod's: it authenticates against the API server (403, not 401: RBAC
    // grants the default ServiceAccount nothing).
    let token = logs
        .lines()
        .find_map(|l| l.strip_prefix("TOKEN="))
        .unwrap()
        .to_owned();
    let out = host
        .nsenter("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(host.data_dir().join("tls/ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg("https://127.0.0.1:6443/api/v1/namespaces/default/pods")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}

/// The Ready (or NetworkUnavailable) condition of node n1: `(status, message)`.
fn node_condition(host: &Host, type_: &str) -> Option<(String, String)> {
    let node: Value =
        serde_json::from_str(&host.kubectl_try(&["get", "node", "n1", "-o", "json"])?).ok()?;
    node["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
        .map(|c| {
            let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
            (text("status"), text("message"))
        })
}

/// A part of the node agent that cannot start — cluster DNS, its address taken by another
/// process before the server starts — shows on the Node with its cause and on the server's
/// console, is retried, and recovers by itself once the port is free. A second server in the
/// same network is refused at start, naming the first's PID and data dir.
#[test]
fn a_failing_node_part_shows_on_the_node_and_recovers() {
    const CAUSE: &str = "cluster DNS: 10.244.0.1:53 is in use by another process (udp)";
    let mut squatter = None;
    let mut host = Host::start_with(
        "dnsheld",
        "127.0.0.1:6443",
        |netns| {
            // The node's bridge with the first node's pod gateway, and a process on its
            // port 53, as a local dnsmasq would be.
            let ip = |args: &[&str]| run_ok(Command::new("ip").arg("-n").arg(&netns.0).args(args));
            ip(&["link", "add", "orq0", "type", "bridge"]);
            ip(&["addr", "add", "10.244.0.1/24", "dev", "orq0"]);
            ip(&["link", "set", "orq0", "up"]);
            let mut child = Command::new("nsenter")
                .arg(format!("--net={}", netns.path()))
                .args(["python3", "-c"])
                .arg(
                    "import socket, sys, time\n\
                     s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                     s.bind(('10.244.0.1', 53))\n\
                     print('bound', flush=True)\n\
                     time.sleep(600)",
                )
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(child.stdout.take().unwrap()),
                &mut line,
            )
            .unwrap();
            assert_eq!(line.trim(), "bound");
            squatter = Some(Proc(child));
        },
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = node_condition(&host, "Ready");
        let network = node_condition(&host, "NetworkUnavailable");
        if ready == Some(("False".into(), CAUSE.into()))
            && network == Some(("True".into(), CAUSE.into()))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node never said why: Ready {ready:?}, NetworkUnavailable {network:?}\n{}",
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let log = std::fs::read_to_string(host.dir.path().join("server.log")).unwrap();
    assert!(
        log.contains(&format!("the node is not ready: {CAUSE}")),
        "the console says it in plain words:\n{log}"
    );

    // A second server with its own data dir and port, in the same network: refused.
    let first = host.server.as_ref().unwrap().0.id();
    let other = host.dir.path().join("other");
    let out = host
        .nsenter(env!("CARGO_BIN_EXE_orq"))
        .args(["server", "--listen", "127.0.0.1:6444", "--data-dir"])
        .arg(&other)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second server ran: {stderr}");
    assert!(
        stderr.contains(&format!(
            "another orq node agent (PID {first}, data dir {})",
            host.data_dir().display()
        )),
        "{stderr}"
    );

    // The port is freed: DNS binds on a retry, the node is Ready, DNS answers.
    drop(squatter.take());
    let deadline = Instant::now() + Duration::from_secs(60);
    while node_condition(&host, "Ready").map(|c| c.0) != Some("True".into())
        || node_condition(&host, "NetworkUnavailable").map(|c| c.0) != Some("False".into())
    {
        assert!(
            Instant::now() < deadline,
            "the node did not recover: {:?}\n{}",
            node_condition(&host, "Ready"),
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let answer = host
        .nsenter("busybox")
        .args([
            "nslookup",
            "kubernetes.default.svc.cluster.local",
            "10.244.0.1",
        ])
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer.stdout);
    assert!(
        answer.contains("10.43.0.1"),
        "cluster DNS answers: {answer}"
    );
    host.kill_server();
}

/// `charts/orquestra` onto a running `orq server`: the operator image (this build, packaged
/// by scripts/build-image.sh) comes from the registry in the host's namespace; the server
/// runs only the loops that get a pod onto the node (scheduler, deployment, replicaset,
/// serviceaccount and root-ca-cert-publisher — a pod's token volume needs the namespace's
/// `kube-root-ca.crt` — nodeipam) and the garbage collector, and none of those the chart's
/// operator runs, and enforces RBAC, so the operator has only the chart's generated rules.
/// Install → the operator pod is Ready, leads, reconciles a StaticSite and keeps its own
/// metrics Service's Endpoints, with no request refused, and serves the StaticSite webhook
/// the chart registered (Service, generated certificate, caBundle): an unpinned image is
/// refused; upgrade with a changed value → a new pod, the certificate kept and the webhook
/// still answering; uninstall → nothing of the release is left.
#[test]
fn helm_chart_installs_upgrades_and_uninstalls_the_operator() {
    const NS: &str = "orquestra-system";
    const OPERATOR_IMAGE: &str = "127.0.0.1:5000/orquestra/orq";
    let host = Host::start_with(
        "chart",
        "0.0.0.0:6443",
        uplink,
        &[
            "--controllers=scheduler,deployment,replicaset,serviceaccount,root-ca-cert-publisher,nodeipam,garbagecollector",
        ],
    );
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let layout = host.dir.path().join("orq-oci");
    run_ok(
        Command::new("bash")
            .arg(repo.join("scripts/build-image.sh"))
            .arg(&layout)
            .arg("test")
            .env("ORQ_BINARY", env!("CARGO_BIN_EXE_orq")),
    );
    run_ok(
        host.nsenter("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:test", layout.display()))
            .arg(format!("docker://{OPERATOR_IMAGE}:test")),
    );

    // The operator runs everything the server does not, and the StaticSite controller.
    let values = host.dir.path().join("values.yaml");
    std::fs::write(
        &values,
        serde_json::json!({
            "image": {"repository": OPERATOR_IMAGE, "tag": "test"},
            "operator": {"controllers": [
                "*", "-scheduler", "-deployment", "-replicaset", "-serviceaccount",
                "-root-ca-cert-publisher", "-nodeipam", "-garbagecollector", "staticsite",
            ]},
        })
        .to_string(),
    )
    .unwrap();
    let chart = repo.join("charts/orquestra");
    let helm = |args: &[&str]| {
        let out = host
            .nsenter("helm")
            .env("KUBECONFIG", host.data_dir().join("kubeconfig.yaml"))
            .env("HOME", host.dir.path())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "helm {args:?}: {}\n{}\nserver log:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            host.server_log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let chart_arg = chart.to_str().unwrap();
    let values_arg = values.to_str().unwrap();
    let installed = helm(&[
        "install",
        "orq",
        chart_arg,
        "-n",
        NS,
        "--create-namespace",
        "-f",
        values_arg,
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(installed.contains("STATUS: deployed"), "{installed}");

    let operator_pods = || -> Vec<Value> {
        let list: Value = serde_json::from_str(&host.kubectl(&[
            "get",
            "pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/component=operator",
            "-o",
            "json",
        ]))
        .unwrap();
        list["items"].as_array().cloned().unwrap_or_default()
    };
    let ready = |pod: &Value| {
        pod["metadata"]["deletionTimestamp"].is_null()
            && pod["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    };
    let wait = |what: &str, timeout: Duration, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + timeout;
        while !done() {
            assert!(
                Instant::now() < deadline,
                "{what} did not happen in {timeout:?}; operator pods: {:#}\nserver log:\n{}",
                Value::from(operator_pods()),
                host.server_log_tail()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let pods = operator_pods();
    assert_eq!(pods.len(), 1, "{pods:#?}");
    assert!(ready(&pods[0]), "helm --wait returned with the pod Ready");
    let first = pods[0]["metadata"]["name"].as_str().unwrap().to_owned();
    let holder = || {
        host.kubectl_try(&[
            "get",
            "lease",
            "orquestra-operator",
            "-n",
            "kube-system",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap_or_default()
    };
    // The identity is the pod's hostname (its name) and the operator's PID.
    wait(
        "the operator taking the Lease",
        Duration::from_secs(60),
        &|| holder().starts_with(&format!("{first}_")),
    );

    // A loop only the operator runs: the Endpoints of the chart's metrics Service.
    let pod_ip = pods[0]["status"]["podIP"].as_str().unwrap().to_owned();
    wait(
        "the metrics Service's Endpoints",
        Duration::from_secs(60),
        &|| {
            host.kubectl_try(&[
                "get",
                "endpoints",
                "orq-orquestra-metrics",
                "-n",
                NS,
                "-o",
                "jsonpath={.subsets[*].addresses[*].ip}",
            ])
            .is_some_and(|ips| ips == pod_ip)
        },
    );
    let metrics = host
        .curl(&format!("http://{pod_ip}:10257/metrics"))
        .unwrap_or_default();
    assert!(
        metrics.contains(r#"leader_election_master_status{name="orquestra-operator"} 1"#),
        "{metrics}"
    );

    // The chart installed the StaticSite CRD; the operator reconciles one.
    host.apply(&serde_json::json!({
        "apiVersion": "example.orquestra.dev/v1", "kind": "StaticSite",
        "metadata": {"name": "hello", "namespace": "default"},
        "spec": {"content": "<h1>hello</h1>", "replicas": 0},
    }));
    wait(
        "the StaticSite's children and status",
        Duration::from_secs(60),
        &|| {
            host.kubectl_try(&["get", "configmap", "hello-content", "-o", "name"])
                .is_some()
                && host
                    .kubectl_try(&["get", "deployment", "hello", "-o", "name"])
                    .is_some()
                && host
                    .kubectl_try(&["get", "service", "hello", "-o", "name"])
                    .is_some()
                && host
                    .kubectl_try(&[
                        "get",
                        "staticsite",
                        "hello",
                        "-o",
                        r#"jsonpath={.status.conditions[?(@.type=="Ready")].status}"#,
                    ])
                    .is_some_and(|s| s == "True")
        },
    );

    // The server enforces RBAC (its default): the operator did all that on the chart's
    // generated rules alone, without one refusal, and its token gets no more than them.
    let server_metrics = host.kubectl(&["get", "--raw", "/metrics"]);
    assert!(
        !server_metrics
            .lines()
            .any(|l| l.starts_with("apiserver_request_total{") && l.contains(r#"code="403""#)),
        "{server_metrics}"
    );
    let token = host.kubectl(&["create", "token", "orq-orquestra", "-n", NS]);
    let as_operator = |method: &str, path: &str| {
        let out = host
            .nsenter("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method])
            .args([
                "-H",
                "Content-Type: application/merge-patch+json",
                "-d",
                "{}",
            ])
            .arg("--cacert")
            .arg(host.data_dir().join("tls/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .arg(format!("https://127.0.0.1:6443{path}"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(as_operator("GET", "/api/v1/pods"), "200");
    // Patching Secrets, or ReplicaSets (the server's loops' business): no rule of its own.
    assert_eq!(
        as_operator("PATCH", "/api/v1/namespaces/default/secrets/any"),
        "403"
    );
    assert_eq!(
        as_operator("PATCH", "/apis/apps/v1/namespaces/default/replicasets/any"),
        "403"
    );

    // The chart registered the StaticSite controller's validating webhook, served by the
    // operator pod behind the chart's Service with the certificate the chart generated: an
    // unpinned image is refused, naming the webhook.
    let unpinned = serde_json::json!({
        "apiVersion": "example.orquestra.dev/v1", "kind": "StaticSite",
        "metadata": {"name": "drifting", "namespace": "default"},
        "spec": {"content": "x", "replicas": 0, "image": "nginx"},
    });
    let refused = host.apply_try(&unpinned).unwrap_err();
    assert!(
        refused.contains(r#"admission webhook "vstaticsite.staticsites.example.orquestra.dev" denied the request"#)
            && refused.contains(r#"spec.image "nginx" is not pinned"#),
        "{refused}"
    );
    let metrics = host
        .curl(&format!("http://{pod_ip}:10257/metrics"))
        .unwrap_or_default();
    assert!(
        metrics.lines().any(|l| l.starts_with(
            r#"controller_runtime_webhook_requests_total{code="200",webhook="vstaticsite.staticsites.example.orquestra.dev"}"#
        )),
        "{metrics}"
    );
    let webhook_ca = || {
        host.kubectl(&[
            "get",
            "secret",
            "orq-orquestra-webhook-cert",
            "-n",
            NS,
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ])
    };
    let ca_before = webhook_ca();
    assert!(!ca_before.is_empty());

    // A changed value rolls the pod; the new one becomes Ready and takes over the Lease.
    let upgraded = helm(&[
        "upgrade",
        "orq",
        chart_arg,
        "-n",
        NS,
        "-f",
        values_arg,
        "--set",
        "operator.resources.limits.memory=300Mi",
        "--wait",
        "--timeout",
        "180s",
    ]);
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    wait("the rolled operator pod", Duration::from_secs(90), &|| {
        let pods = operator_pods();
        pods.len() == 1 && pods[0]["metadata"]["name"] != first.as_str() && ready(&pods[0])
    });
    let second = operator_pods()[0].clone();
    assert_eq!(
        second["spec"]["containers"][0]["resources"]["limits"]["memory"],
        "300Mi"
    );
    let second = second["metadata"]["name"].as_str().unwrap().to_owned();
    wait(
        "the new pod taking the Lease",
        Duration::from_secs(60),
        &|| holder().starts_with(&format!("{second}_")),
    );
    // The upgrade kept the webhook's certificate, so the caBundle still matches what the
    // new pod serves with.
    assert_eq!(webhook_ca(), ca_before);
    let refused = host.apply_try(&unpinned).unwrap_err();
    assert!(refused.contains("is not pinned"), "{refused}");

    // Deleting the StaticSite runs the operator's finalizer, which removes its children.
    host.kubectl(&[
        "delete",
        "staticsite",
        "hello",
        "--wait=true",
        "--timeout=60s",
    ]);
    assert!(
        host.kubectl_try(&["get", "configmap", "hello-content"])
            .is_none()
    );

    helm(&["uninstall", "orq", "-n", NS, "--wait", "--timeout", "120s"]);
    let left = |args: &[&str]| {
        let mut args = args.to_vec();
        args.extend(["-l", "app.kubernetes.io/instance=orq", "-o", "name"]);
        host.kubectl(&args)
    };
    wait(
        "the release's objects going",
        Duration::from_secs(60),
        &|| {
            left(&[
                "get",
                "deployments,replicasets,pods,services,serviceaccounts,secrets",
                "-n",
                NS,
            ])
            .is_empty()
                && left(&["get", "clusterroles,clusterrolebindings"]).is_empty()
                && left(&["get", "validatingwebhookconfigurations"]).is_empty()
                && left(&["get", "roles,rolebindings", "-n", "kube-system"]).is_empty()
        },
    );
    // Helm keeps the CRDs of crds/ on uninstall, by its policy.
    assert!(
        host.kubectl_try(&[
            "get",
            "crd",
            "staticsites.example.orquestra.dev",
            "-o",
            "name"
        ])
        .is_some()
    );
}

/// Namespaces created and deleted by many clients at once, each given a pod the moment it
/// exists (before its `default` ServiceAccount can): the control loops keep up — every
/// surviving namespace gets its ServiceAccount and `kube-root-ca.crt` within seconds, every
/// deleted one goes — and every pod runs once its account exists (the agent retries).
#[test]
fn namespaces_churn_while_pods_start_in_them() {
    const CLIENTS: usize = 8;
    const EACH: usize = 25;
    let host = Host::start("churn");
    let started = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..CLIENTS {
            let host = &host;
            scope.spawn(move || {
                for i in 0..EACH {
                    let ns = format!("churn-{client}-{i}");
                    let mut pod =
                        pod_manifest("sleeper", "Never", Some(&["sleep", "3600"]), Value::Null);
                    pod["metadata"]["namespace"] = ns.clone().into();
                    pod["spec"]["terminationGracePeriodSeconds"] = 0.into();
                    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": [
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                        pod,
                    ]});
                    host.apply(&list);
                    // Every other namespace goes again at once, its pod with it.
                    if i % 2 == 1 {
                        host.kubectl(&["delete", "namespace", &ns, "--wait=false"]);
                    }
                }
            });
        }
    });
    let churned = started.elapsed();
    let surviving: Vec<String> = (0..CLIENTS)
        .flat_map(|c| {
            (0..EACH)
                .filter(|i| i % 2 == 0)
                .map(move |i| format!("churn-{c}-{i}"))
        })
        .collect();
    let names_in = |what: &str| -> Vec<(String, String)> {
        let list: Value =
            serde_json::from_str(&host.kubectl(&["get", what, "-A", "-o", "json"])).unwrap();
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| {
                (
                    o["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    };
    let missing = |what: &str, name: &str| -> Vec<String> {
        let have = names_in(what);
        surviving
            .iter()
            .filter(|ns| !have.iter().any(|(n, o)| n == *ns && o == name))
            .cloned()
            .collect()
    };

    // The namespace defaults, within seconds of the churn's end.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (accounts, certs) = (
            missing("serviceaccounts", "default"),
            missing("configmaps", "kube-root-ca.crt"),
        );
        if accounts.is_empty() && certs.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after {churned:?} of churn and 30 s more, no default ServiceAccount in {accounts:?}, \
             no kube-root-ca.crt in {certs:?}\nserver log:\n{}",
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Every surviving pod runs; every deleted namespace is gone.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let pods: Value =
            serde_json::from_str(&host.kubectl(&["get", "pods", "-A", "-o", "json"])).unwrap();
        let not_running: Vec<String> = surviving
            .iter()
            .filter(|ns| {
                !pods["items"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|p| p["metadata"]["namespace"] == ns.as_str() && phase(p) == "Running")
            })
            .cloned()
            .collect();
        let lingering: Vec<String> = names_in("namespaces")
            .into_iter()
            .map(|(_, name)| name)
            .filter(|name| name.starts_with("churn-") && !surviving.contains(name))
            .collect();
        if not_running.is_empty() && lingering.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pods not running in {not_running:?}; namespaces not gone: {lingering:?}\nserver log:\n{}",
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Seccomp: `RuntimeDefault` filters (the process is in seccomp filter mode and `unshare`
/// fails with EPERM), `Unconfined` does not, a `Localhost` profile comes from the agent's
/// `seccomp/` directory, and a missing one is the pod's `CreateContainerConfigError`.
#[test]
fn seccomp_profiles_filter_system_calls() {
    let host = Host::start("seccomp");
    let script = "grep -E 'Seccomp:|NoNewPrivs:' /proc/self/status; \
                  unshare -U true && echo unshare=ok || echo unshare=refused";
    let with_profile = |name: &str, profile: Value| {
        let mut pod = pod_manifest(
            name,
            "Never",
            Some(&["sh", "-c", script]),
            serde_json::json!({}),
        );
        pod["spec"]["securityContext"] = serde_json::json!({"seccompProfile": profile});
        pod
    };
    let profiles = host.data_dir().join("agent/seccomp/profiles");
    std::fs::create_dir_all(&profiles).unwrap();
    std::fs::write(
        profiles.join("no-unshare.json"),
        r#"{"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["unshare"], "action": "SCMP_ACT_ERRNO"}]}"#,
    )
    .unwrap();
    host.apply(&with_profile(
        "default",
        serde_json::json!({"type": "RuntimeDefault"}),
    ));
    host.apply(&with_profile(
        "unconfined",
        serde_json::json!({"type": "Unconfined"}),
    ));
    // allowPrivilegeEscalation: false too (the restricted pod security level's pair).
    let mut restricted = with_profile("restricted", serde_json::json!({"type": "RuntimeDefault"}));
    restricted["spec"]["containers"][0]["securityContext"] =
        serde_json::json!({"allowPrivilegeEscalation": false});
    host.apply(&restricted);
    host.apply(&with_profile(
        "local",
        serde_json::json!({"type": "Localhost", "localhostProfile": "profiles/no-unshare.json"}),
    ));
    host.apply(&with_profile(
        "missing",
        serde_json::json!({"type": "Localhost", "localhostProfile": "profiles/nope.json"}),
    ));
    let logs = |name: &str| {
        host.wait_pod(name, Duration::from_secs(60), |p| phase(p) == "Succeeded");
        host.kubectl(&["logs", name])
    };
    let out = logs("default");
    assert!(
        out.contains("Seccomp:\t2") && out.contains("unshare=refused"),
        "{out}"
    );
    assert!(out.contains("NoNewPrivs:\t0"), "{out}");
    let out = logs("restricted");
    assert!(
        out.contains("Seccomp:\t2") && out.contains("unshare=refused"),
        "{out}"
    );
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    let out = logs("unconfined");
    assert!(
        out.contains("Seccomp:\t0") && out.contains("unshare=ok"),
        "{out}"
    );
    let out = logs("local");
    assert!(
        out.contains("Seccomp:\t2") && out.contains("unshare=refused"),
        "{out}"
    );
    let pod = host.wait_pod("missing", Duration::from_secs(60), |p| {
        state(p)["waiting"]["reason"] == "CreateContainerConfigError"
    });
    let message = state(&pod)["waiting"]["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("nope.json"), "{message}");
}
