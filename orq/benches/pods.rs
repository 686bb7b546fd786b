//! Node agent benchmark (root): real containers through the agent's runtime, side by side
//! with `runc` in the same run.
//!
//! ```sh
//! cargo bench -p orq --bench pods
//! ```
//!
//! Everything runs inside a network namespace the benchmark creates (it enters it first, so
//! the registry, `orq server`, `orq agent` and the pods' bridge all live there). Reports:
//! 1. container create+start+wait+delete of `/bin/true` through `orq shim` (the agent's
//!    runtime) vs `runc run` on the same bundle, sequentially, p50/p99 and the ratio;
//! 2. pod startup latency — API create to `Running` observed by a watch, image present —
//!    p50/p99 over 100 pods created one after another;
//! 3. the agent's RSS idle and with 50 pods running;
//! 4. pod startup with five volumes (two ConfigMaps, two Secrets, one projected volume of a
//!    ConfigMap, a Secret, the downward API and a service account token) side by side with
//!    the same pod without them: 40 of each, interleaved.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{PostParams, WatchEvent, WatchParams};
use serde_json::json;

const IMAGE: &str = "127.0.0.1:5000/busybox:v1";

use common::busybox::run_ok;
use common::{Proc, busybox_registry, client, enter_netns, percentile, rss_mib};

mod common;

fn orq() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orq"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let netns = format!("orqbench-{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
    let result = std::panic::catch_unwind(|| bench(&netns));
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn bench(netns: &str) {
    enter_netns(netns);
    let dir = tempfile::tempdir().unwrap();
    let orq = orq();
    assert!(orq.exists(), "build orq first: {}", orq.display());

    // 1. The runtime vs runc.
    let bundle = dir.path().join("bundle");
    make_bundle(&bundle);
    let runs = 100;
    let mut ours = Vec::new();
    let mut theirs = Vec::new();
    for i in 0..runs {
        ours.push(run_shim(&orq, &bundle, &dir.path().join("lc"), i));
        theirs.push(run_runc(&bundle, i));
    }
    let (o50, o99) = (percentile(&mut ours, 0.5), percentile(&mut ours, 0.99));
    let (r50, r99) = (percentile(&mut theirs, 0.5), percentile(&mut theirs, 0.99));
    println!("runtime: create+start+wait+delete of /bin/true, {runs} runs interleaved");
    println!("  orq shim (libcontainer): p50 {o50:.1} ms  p99 {o99:.1} ms");
    println!("  runc run               : p50 {r50:.1} ms  p99 {r99:.1} ms");
    println!(
        "  ratio orq/runc         : p50 {:.2}  p99 {:.2}",
        o50 / r50,
        o99 / r99
    );

    // 2 and 3: a registry with the image, an API server, a separate agent.
    let _registry = busybox_registry(dir.path(), IMAGE);
    let data = dir.path().join("data");
    let _server = Proc(
        Command::new(&orq)
            .args(["server", "--no-agent", "--listen", "127.0.0.1:6443"])
            .arg("--data-dir")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let kubeconfig = data.join("kubeconfig.yaml");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kubeconfig.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let agent_dir = dir.path().join("agent");
    let agent = Proc(
        Command::new(&orq)
            .args([
                "agent",
                "--node-name",
                "bench",
                "--agent-listen",
                "127.0.0.1:10250",
            ])
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--agent-data-dir")
            .arg(&agent_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let agent_pid = agent.0.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = client(&kubeconfig).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        tokio::time::sleep(Duration::from_secs(3)).await;
        let idle = rss_mib(agent_pid);
        // Warm-up: pull the image once.
        pods.create(&PostParams::default(), &pod("warm")).await.unwrap();
        wait_running(&pods, "warm").await;

        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
        let watch_pods = pods.clone();
        let watcher = tokio::spawn(async move {
            let mut stream = watch_pods
                .watch(&WatchParams::default(), "0")
                .await
                .unwrap()
                .boxed();
            let mut running = HashMap::new();
            while let Some(event) = stream.next().await {
                if let Ok(WatchEvent::Modified(p) | WatchEvent::Added(p)) = event {
                    let name = p.metadata.name.clone().unwrap_or_default();
                    let phase = p.status.as_ref().and_then(|s| s.phase.clone());
                    if phase.as_deref() == Some("Running") && !running.contains_key(&name) {
                        running.insert(name.clone(), Instant::now());
                        let _ = tx.send((name, Instant::now()));
                    }
                }
            }
        });
        let mut created = HashMap::new();
        let mut with_50 = 0.0;
        let mut latencies = Vec::new();
        for i in 0..100 {
            let name = format!("p{i}");
            created.insert(name.clone(), Instant::now());
            pods.create(&PostParams::default(), &pod(&name)).await.unwrap();
            // One at a time: wait for this one before the next.
            loop {
                let (done, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                    .await
                    .expect("a pod did not start within 60 s")
                    .unwrap();
                if let Some(t0) = created.get(&done) {
                    latencies.push(at.duration_since(*t0).as_secs_f64() * 1000.0);
                }
                if done == name {
                    break;
                }
            }
            if i == 49 {
                tokio::time::sleep(Duration::from_secs(2)).await;
                with_50 = rss_mib(agent_pid);
            }
        }
        let (p50, p99) = (percentile(&mut latencies, 0.5), percentile(&mut latencies, 0.99));
        println!("pod startup: API create → Running seen by a watch, image present, 100 pods one after another");
        println!("  p50 {p50:.0} ms  p99 {p99:.0} ms  max {:.0} ms", latencies.last().unwrap());
        println!("agent RSS: idle {idle:.1} MiB, with 50 pods running {with_50:.1} MiB");

        // 4. Five volumes vs none, interleaved.
        let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(client.clone(), "default");
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(client.clone(), "default");
        for i in 0..3 {
            config_maps
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({
                        "metadata": {"name": format!("cm{i}")},
                        "data": {"a": "1", "b": "2", "c": "3"},
                    }))
                    .unwrap(),
                )
                .await
                .unwrap();
            secrets
                .create(
                    &PostParams::default(),
                    &serde_json::from_value(json!({
                        "metadata": {"name": format!("secret{i}")},
                        "stringData": {"x": "1", "y": "2"},
                    }))
                    .unwrap(),
                )
                .await
                .unwrap();
        }
        let (mut plain, mut mounted) = (Vec::new(), Vec::new());
        for i in 0..40 {
            for (name, with_volumes) in [(format!("q{i}"), false), (format!("v{i}"), true)] {
                let spec = if with_volumes { pod_with_volumes(&name) } else { pod(&name) };
                let t0 = Instant::now();
                pods.create(&PostParams::default(), &spec).await.unwrap();
                loop {
                    let (done, at) = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                        .await
                        .expect("a pod did not start within 60 s")
                        .unwrap();
                    if done == name {
                        let ms = at.duration_since(t0).as_secs_f64() * 1000.0;
                        if with_volumes { mounted.push(ms) } else { plain.push(ms) }
                        break;
                    }
                }
            }
        }
        watcher.abort();
        let (n50, n99) = (percentile(&mut plain, 0.5), percentile(&mut plain, 0.99));
        let (v50, v99) = (percentile(&mut mounted, 0.5), percentile(&mut mounted, 0.99));
        println!("pod startup with 5 configMap/secret/projected volumes vs none, 40 each interleaved");
        println!("  no volumes : p50 {n50:.0} ms  p99 {n99:.0} ms");
        println!("  5 volumes  : p50 {v50:.0} ms  p99 {v99:.0} ms");
        println!("  ratio      : p50 {:.2}  p99 {:.2}", v50 / n50, v99 / n99);
    });
    drop(runtime);
    drop(agent);
    let _ = Command::new(&orq)
        .args(["agent", "--cleanup", "--agent-data-dir"])
        .arg(&agent_dir)
        .status();
    // The runtime comparison's parent cgroup (its containers removed their own).
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(controller.path().join("orquestra-bench"));
    }
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": "bench", "terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": ["sleep", "3600"],
        }]},
    }))
    .unwrap()
}

/// [`pod`] with five volumes: two ConfigMaps, two Secrets, and a projected volume of a
/// ConfigMap, a Secret, the downward API and a service account token.
fn pod_with_volumes(name: &str) -> Pod {
    let mut pod = serde_json::to_value(pod(name)).unwrap();
    pod["spec"]["volumes"] = json!([
        {"name": "cm0", "configMap": {"name": "cm0"}},
        {"name": "cm1", "configMap": {"name": "cm1"}},
        {"name": "s0", "secret": {"secretName": "secret0"}},
        {"name": "s1", "secret": {"secretName": "secret1"}},
        {"name": "all", "projected": {"sources": [
            {"configMap": {"name": "cm2"}},
            {"secret": {"name": "secret2"}},
            {"downwardAPI": {"items": [{"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}}]}},
            {"serviceAccountToken": {"path": "token", "audience": "bench", "expirationSeconds": 3600}},
        ]}},
    ]);
    pod["spec"]["containers"][0]["volumeMounts"] = json!([
        {"name": "cm0", "mountPath": "/cm0"},
        {"name": "cm1", "mountPath": "/cm1"},
        {"name": "s0", "mountPath": "/s0"},
        {"name": "s1", "mountPath": "/s1"},
        {"name": "all", "mountPath": "/all"},
    ]);
    serde_json::from_value(pod).unwrap()
}

async fn wait_running(pods: &Api<Pod>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pods.get(name).await.unwrap();
        if p.status.and_then(|s| s.phase).as_deref() == Some("Running") {
            return;
        }
        assert!(Instant::now() < deadline, "{name} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A bundle whose rootfs is busybox-static and whose process is `/bin/true`, with the spec
/// the agent writes (no network namespace path: a fresh one each run, for both runtimes).
fn make_bundle(bundle: &Path) {
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/true")).unwrap();
    let config = orquestra_node_agent::container::ContainerConfig {
        args: vec!["/bin/true".into()],
        env: vec!["PATH=/bin".into()],
        hostname: "bench".into(),
        cgroups_path: "/orquestra-bench/c".into(),
        ..Default::default()
    };
    let mut spec = config.oci_spec(&rootfs);
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network"}));
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(&spec).unwrap(),
    )
    .unwrap();
}

/// `orq shim` (returns once started) + waiting for the exit record and the state's removal.
fn run_shim(orq: &Path, bundle: &Path, root: &Path, i: usize) -> f64 {
    let _ = std::fs::remove_file(bundle.join("exited.json"));
    let _ = std::fs::remove_file(bundle.join("started.json"));
    let id = format!("bench-orq-{i}");
    let begun = Instant::now();
    run_ok(
        Command::new(orq)
            .args(["shim", "--id", &id, "--bundle"])
            .arg(bundle)
            .arg("--root")
            .arg(root)
            .arg("--log")
            .arg(bundle.join("out.log")),
    );
    while !bundle.join("exited.json").exists() || root.join(&id).exists() {
        std::thread::sleep(Duration::from_micros(200));
    }
    begun.elapsed().as_secs_f64() * 1000.0
}

fn run_runc(bundle: &Path, i: usize) -> f64 {
    let id = format!("bench-runc-{i}");
    let begun = Instant::now();
    run_ok(
        Command::new("runc")
            .args(["run", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    );
    begun.elapsed().as_secs_f64() * 1000.0
}
