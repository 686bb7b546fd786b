//! Footprint benchmark (root): what the all-in-one `orq server` costs to start and to keep.
//!
//! ```sh
//! cargo bench -p orq --bench footprint
//! ```
//!
//! Inside a network namespace the benchmark creates and enters first (the server's node
//! agent programs its bridge, NAT and service proxy there, never on the host), with a local
//! registry holding the busybox test image:
//! 1. time from spawning `orq server` (fresh data dir: CA, keys and store created) until its
//!    Node is `Ready` in the API, then the same for a restart on the same data dir;
//! 2. the server process's RSS idle (1 node, no pods, after 10 s);
//! 3. its RSS with 100 pods Running (one Deployment of `sleep` pods, scheduled by the
//!    server's scheduler, run by its agent through libcontainer), and — separately, since
//!    they are processes of their own — the RSS of the 100 containers' shims.
//!
//! The anchor is k3s' documentation (not run here): about 1.4–1.6 GB for a server with a
//! workload, and about 50 s until its default pods are Ready.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;

use common::busybox::run_ok;
use common::{Proc, busybox_registry, client, enter_netns, rss_mib};

mod common;

const IMAGE: &str = "127.0.0.1:5000/busybox:v1";
const PODS: i32 = 100;

impl Proc {
    /// SIGTERM, then wait for the exit (the server stops its agent's loops cleanly).
    fn terminate(mut self) {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.0.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "orq server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn orq() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orq"))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let netns = format!("orqfoot-{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
    let result = std::panic::catch_unwind(|| bench(&netns));
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn server(orq: &Path, data: &Path) -> Proc {
    Proc(
        Command::new(orq)
            .args([
                "server",
                "--listen",
                "127.0.0.1:6443",
                "--node-name",
                "foot",
            ])
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Spawns the server and returns it with the time until its Node is Ready in the API.
async fn start_until_ready(orq: &Path, data: &Path) -> (Proc, Duration) {
    let started = Instant::now();
    let server = server(orq, data);
    let kubeconfig = data.join("kubeconfig.yaml");
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the node never became Ready"
        );
        if kubeconfig.exists() {
            let nodes: Api<Node> = Api::all(client(&kubeconfig).await);
            if let Ok(node) = nodes.get("foot").await {
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                if ready {
                    return (server, started.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The RSS of this binary's shim processes (one per running container), in MiB, and their
/// count.
fn shims_rss(orq: &Path) -> (f64, usize) {
    let mut total = 0.0;
    let mut count = 0;
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let mut args = cmdline.split(|b| *b == 0);
        let (Some(exe), Some(sub)) = (args.next(), args.next()) else {
            continue;
        };
        if exe == orq.as_os_str().as_encoded_bytes() && sub == b"shim" {
            total += rss_mib(pid);
            count += 1;
        }
    }
    (total, count)
}

fn bench(netns: &str) {
    enter_netns(netns);
    let dir = tempfile::tempdir().unwrap();
    let orq = orq();
    assert!(orq.exists(), "build orq first: {}", orq.display());

    let _registry = busybox_registry(dir.path(), IMAGE);

    let data = dir.path().join("data");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (first, fresh) = start_until_ready(&orq, &data).await;
        first.terminate();
        let (server, restart) = start_until_ready(&orq, &data).await;
        let pid = server.0.id();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let idle = rss_mib(pid);

        let client = client(&data.join("kubeconfig.yaml")).await;
        let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
        let pods: Api<Pod> = Api::namespaced(client, "default");
        let deployment: Deployment = serde_json::from_value(json!({
            "metadata": {"name": "sleepers"},
            "spec": {
                "replicas": PODS,
                "selector": {"matchLabels": {"app": "sleepers"}},
                "template": {
                    "metadata": {"labels": {"app": "sleepers"}},
                    "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
                        "name": "main", "image": IMAGE, "command": ["sleep", "3600"],
                    }]},
                },
            },
        }))
        .unwrap();
        let created = Instant::now();
        deployments
            .create(&PostParams::default(), &deployment)
            .await
            .unwrap();
        let list = ListParams::default().labels("app=sleepers");
        loop {
            let running = pods
                .list(&list)
                .await
                .unwrap()
                .items
                .iter()
                .filter(|p| {
                    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                })
                .count();
            if running == PODS as usize {
                break;
            }
            assert!(
                created.elapsed() < Duration::from_secs(300),
                "only {running} of {PODS} pods Running after 300 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let all_running = created.elapsed();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let loaded = rss_mib(pid);
        let (shims, shim_count) = shims_rss(&orq);

        println!("| measurement | orq server | anchor (k3s, documented) | target |");
        println!("| --- | ---: | ---: | --- |");
        println!(
            "| start → node Ready, fresh data dir | {:.2} s | ~50 s until default pods Ready | ≤ 2 s |",
            fresh.as_secs_f64()
        );
        println!(
            "| start → node Ready, restart | {:.2} s | | ≤ 2 s |",
            restart.as_secs_f64()
        );
        println!("| RSS idle, 1 node | {idle:.1} MiB | | ≤ 60 MiB |");
        println!(
            "| RSS with {PODS} pods Running | {loaded:.1} MiB | 1.4–1.6 GB with a workload | ≤ 150 MiB |"
        );
        println!(
            "| {shim_count} container shims (processes of their own) | {shims:.1} MiB total, {:.2} MiB each | | |",
            shims / shim_count.max(1) as f64
        );
        println!(
            "| {PODS}-replica Deployment created → all Running | {:.1} s | | |",
            all_running.as_secs_f64()
        );

        deployments
            .delete("sleepers", &DeleteParams::default())
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !pods.list(&list).await.unwrap().items.is_empty() {
            assert!(Instant::now() < deadline, "pods not gone after 120 s");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        server.terminate();
    });
    drop(runtime);
    let _ = Command::new(&orq)
        .args(["agent", "--cleanup", "--agent-data-dir"])
        .arg(data.join("agent"))
        .status();
}
