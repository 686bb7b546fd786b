//! Streams benchmark (root): exec round trips and port-forward throughput through
//! `orq server`, side by side with `runc exec` and a direct connection in the same run.
//!
//! ```sh
//! cargo bench -p orq --bench streams
//! ```
//!
//! Everything runs inside a network namespace the benchmark creates. Reports:
//! 1. exec round trip — `kubectl exec POD -- true` (kubectl 1.33 over WebSocket, 1.27 over
//!    SPDY), kube-rs `Api::exec` from this process, and `runc exec` of `true` in a runc
//!    container of the same image on the same host — 50 runs each, interleaved, p50/p99;
//! 2. port-forward throughput — a 256 MiB download from a pod's HTTP server through
//!    `kubectl port-forward` (1.33: SPDY tunneled in a WebSocket; 1.27: SPDY) and straight
//!    from the pod's IP, 3 runs each, the best of each.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{AttachParams, PostParams};
use serde_json::json;

use common::busybox::run_ok;
use common::{Proc, busybox_registry, client, enter_netns, percentile};

mod common;

const IMAGE: &str = "127.0.0.1:5000/busybox:v1";
const KUBECTL_1_33: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";
const KUBECTL_1_27: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27";
const RUNC_ID: &str = "orq-bench-streams";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let netns = format!("orqbench-{}", std::process::id());
    run_ok(Command::new("ip").args(["netns", "add", &netns]));
    let dir = tempfile::tempdir().unwrap();
    let result = std::panic::catch_unwind(|| bench(dir.path()));
    let _ = Command::new("runc")
        .args(["delete", "--force", RUNC_ID])
        .status();
    let _ = Command::new(orq())
        .args(["agent", "--cleanup", "--agent-data-dir"])
        .arg(dir.path().join("data/agent"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    for controller in std::fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
        let _ = std::fs::remove_dir(controller.path().join("orquestra-bench-streams/c"));
        let _ = std::fs::remove_dir(controller.path().join("orquestra-bench-streams"));
    }
    let _ = Command::new("ip").args(["netns", "del", &netns]).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn orq() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_orq"))
}

fn bench(dir: &Path) {
    enter_netns(&format!("orqbench-{}", std::process::id()));
    let orq = orq();
    let _registry = busybox_registry(dir, IMAGE);
    let data = dir.join("data");
    let _server = Proc(
        Command::new(&orq)
            .args(["server", "--listen", "127.0.0.1:6443"])
            .arg("--data-dir")
            .arg(&data)
            .env("RUST_LOG", "warn")
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
    let kubectl = |bin: &str, args: &[&str]| {
        let out = Command::new(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    start_runc(dir);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let pods: Api<Pod> = runtime.block_on(async {
        let client = client(&kubeconfig).await;
        let pods: Api<Pod> = Api::namespaced(client, "default");
        // The node registers, then the pods: a shell and an HTTP server.
        let deadline = Instant::now() + Duration::from_secs(30);
        while pods
            .create(&PostParams::default(), &pod("sh", &["sleep", "3600"]))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the server did not come up");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        pods.create(
            &PostParams::default(),
            &pod("web", &["httpd", "-f", "-p", "8080", "-h", "/www"]),
        )
        .await
        .unwrap();
        for name in ["sh", "web"] {
            wait_running(&pods, name).await;
        }
        pods
    });
    kubectl(
        KUBECTL_1_33,
        &[
            "exec",
            "web",
            "--",
            "dd",
            "if=/dev/zero",
            "of=/www/big",
            "bs=1048576",
            "count=256",
        ],
    );

    // 1. Exec round trips, interleaved.
    let runs = 50;
    let (mut ws, mut spdy, mut kube_rs, mut runc) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        kubectl(KUBECTL_1_33, &["exec", "sh", "--", "true"]);
        ws.push(ms(t));
        let t = Instant::now();
        kubectl(KUBECTL_1_27, &["exec", "sh", "--", "true"]);
        spdy.push(ms(t));
        let t = Instant::now();
        runtime.block_on(async {
            let mut attached = pods
                .exec("sh", ["true"], &AttachParams::default().stderr(false))
                .await
                .unwrap();
            let status = attached.take_status().unwrap();
            status.await.unwrap();
        });
        kube_rs.push(ms(t));
        let t = Instant::now();
        run_ok(
            Command::new("runc")
                .args(["exec", RUNC_ID, "true"])
                .stdin(Stdio::null()),
        );
        runc.push(ms(t));
    }
    println!("exec round trip of `true`, {runs} runs interleaved");
    let r50 = percentile(&mut runc, 0.5);
    let r99 = percentile(&mut runc, 0.99);
    for (name, samples) in [
        ("kubectl 1.33 exec (WebSocket)", &mut ws),
        ("kubectl 1.27 exec (SPDY)     ", &mut spdy),
        ("kube-rs Api::exec            ", &mut kube_rs),
    ] {
        let (p50, p99) = (percentile(samples, 0.5), percentile(samples, 0.99));
        println!(
            "  {name}: p50 {p50:6.1} ms  p99 {p99:6.1} ms  ({:.1}× / {:.1}× runc)",
            p50 / r50,
            p99 / r99
        );
    }
    println!("  runc exec                    : p50 {r50:6.1} ms  p99 {r99:6.1} ms");

    // 2. Port-forward throughput against the pod's own address.
    let pod_ip = runtime.block_on(async {
        pods.get("web")
            .await
            .unwrap()
            .status
            .and_then(|s| s.pod_ip)
            .unwrap()
    });
    let direct = best_download(&format!("http://{pod_ip}:8080/big"));
    println!("port-forward: 256 MiB download, best of 3");
    for (bin, local, name) in [
        (KUBECTL_1_33, "18080", "kubectl 1.33 (SPDY in WebSocket)"),
        (KUBECTL_1_27, "18081", "kubectl 1.27 (SPDY)             "),
    ] {
        let _forward = Proc(
            Command::new(bin)
                .arg("--kubeconfig")
                .arg(&kubeconfig)
                .args(["port-forward", "pod/web", &format!("{local}:8080")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let url = format!("http://127.0.0.1:{local}/big");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !Command::new("curl")
            .args([
                "-sf",
                "-o",
                "/dev/null",
                "--max-time",
                "2",
                "-r",
                "0-0",
                &url,
            ])
            .status()
            .unwrap()
            .success()
        {
            assert!(
                Instant::now() < deadline,
                "the port-forward did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let through = best_download(&url);
        println!(
            "  {name}: {through:7.1} MiB/s  ({:.2}× direct)",
            through / direct
        );
    }
    println!("  direct to the pod IP            : {direct:7.1} MiB/s");
    drop(runtime);
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// The best of 3 downloads of `url`, in MiB/s.
fn best_download(url: &str) -> f64 {
    (0..3)
        .map(|_| {
            let out = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "-w", "%{speed_download}", url])
                .output()
                .unwrap();
            assert!(out.status.success(), "download of {url} failed");
            let bytes_per_s: f64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
            bytes_per_s / (1024.0 * 1024.0)
        })
        .fold(0.0, f64::max)
}

/// A runc container of the same busybox image running `sleep`, for `runc exec`.
fn start_runc(dir: &Path) {
    let bundle = dir.join("runc-bundle");
    let rootfs = bundle.join("rootfs");
    std::fs::create_dir_all(rootfs.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in ["sleep", "true", "sh"] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    let config = orquestra_node_agent::container::ContainerConfig {
        args: vec!["/bin/sleep".into(), "3600".into()],
        env: vec!["PATH=/bin".into()],
        hostname: "bench".into(),
        cgroups_path: "/orquestra-bench-streams/c".into(),
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
    run_ok(
        Command::new("runc")
            .args(["run", "-d", "--bundle"])
            .arg(&bundle)
            .arg(RUNC_ID)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
}

fn pod(name: &str, command: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{
            "name": "main", "image": IMAGE, "imagePullPolicy": "IfNotPresent",
            "command": command,
        }]},
    }))
    .unwrap()
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
