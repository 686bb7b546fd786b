//! HA benchmark: `orq server`s on one three-member etcd cluster (Debian's etcd, on loopback),
//! driven by kube-rs clients.
//!
//! ```sh
//! cargo bench -p orq --bench ha
//! ```
//!
//! Reports, in one run: ConfigMap creates/s with 32 concurrent clients through one server,
//! then through three (round-robin) on the same etcd, as a ratio; then API availability during
//! a leader kill — 16 writers round-robin over the three servers while the server leading the
//! controllers is SIGKILLed: the longest gap between acknowledged writes, the p99 write
//! latency in the 15 s after the kill against the p99 before it, how many writes failed (the
//! dead server's), and when another server held both leader Leases and a pending pod was
//! scheduled.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::PostParams;
use kube::{Api, Client};
use serde_json::json;

use common::{Proc, percentile};

mod common;

const SERVERS: usize = 3;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A three-member etcd cluster on loopback; returns the processes and the datastore URL.
fn start_etcd(dir: &Path) -> (Vec<Proc>, String) {
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let initial: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect();
    let procs = ports
        .iter()
        .enumerate()
        .map(|(i, (client, peer))| {
            Proc(
                Command::new("etcd")
                    .arg(format!("--name=m{i}"))
                    .arg(format!(
                        "--data-dir={}",
                        dir.join(format!("etcd{i}")).display()
                    ))
                    .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                    .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                    .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                    .arg(format!(
                        "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                    ))
                    .arg(format!("--initial-cluster={}", initial.join(",")))
                    .arg("--max-request-bytes=2097152")
                    .arg("--experimental-watch-progress-notify-interval=1s")
                    .arg("--log-level=error")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            )
        })
        .collect();
    let members: Vec<String> = ports
        .iter()
        .map(|(client, _)| format!("127.0.0.1:{client}"))
        .collect();
    let endpoints: Vec<String> = members.iter().map(|m| format!("http://{m}")).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")))
        .args(["endpoint", "health"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        assert!(Instant::now() < deadline, "etcd did not become healthy");
        std::thread::sleep(Duration::from_millis(200));
    }
    (procs, format!("etcd://{}", members.join(",")))
}

/// Server `i` on 127.0.0.(2+i):port, in `dir/server{i}`.
fn start_server(dir: &Path, i: usize, port: u16, datastore: &str, token: Option<&str>) -> Proc {
    let ip = format!("127.0.0.{}", 2 + i);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orq"));
    cmd.args(["server", "--disable-kube-proxy", "--no-agent"])
        .args([
            "--listen",
            &format!("{ip}:{port}"),
            "--advertise-address",
            &ip,
        ])
        .args(["--datastore", datastore])
        .arg("--data-dir")
        .arg(dir.join(format!("server{i}")));
    if let Some(token) = token {
        cmd.args(["--token", token]);
    }
    Proc(
        cmd.env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

async fn client(dir: &Path, i: usize, port: u16) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(dir.join("server0/kubeconfig.yaml")).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.cluster_url = format!("https://127.0.0.{}:{port}", 2 + i).parse().unwrap();
    config.connect_timeout = Some(Duration::from_secs(1));
    config.read_timeout = Some(Duration::from_secs(5));
    Client::try_from(config).unwrap()
}

async fn wait_answering(client: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.apiserver_version().await.is_err() {
        assert!(Instant::now() < deadline, "a server did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn configmap() -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"generateName": "bench-"},
        "data": {"key": "value", "other": "x".repeat(200)}
    }))
    .unwrap()
}

/// Creates/s of `total` ConfigMaps by 32 concurrent writers, writer `w` through
/// `clients[w % len]`.
async fn creates(clients: &[Client], total: usize) -> f64 {
    let writers = 32;
    let start = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let api: Api<ConfigMap> =
                Api::namespaced(clients[w % clients.len()].clone(), "default");
            tokio::spawn(async move {
                for _ in 0..total / writers {
                    api.create(&PostParams::default(), &configmap())
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}

/// One acknowledged or failed write: when it started, how long it took, whether it worked.
type Sample = (Instant, Duration, bool);

async fn holder(client: &Client, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()?
        .spec?
        .holder_identity
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().unwrap();
    let (_etcd, datastore) = start_etcd(dir.path());
    let port = {
        // One port free on 127.0.0.2-4: the servers listen on the same one.
        loop {
            let port = free_port();
            if (0..SERVERS).all(|i| {
                std::net::TcpListener::bind((format!("127.0.0.{}", 2 + i).as_str(), port)).is_ok()
            }) {
                break port;
            }
        }
    };
    let mut servers: Vec<Option<Proc>> =
        vec![Some(start_server(dir.path(), 0, port, &datastore, None))];
    let token_file = dir.path().join("server0/server-token");
    let kubeconfig = dir.path().join("server0/kubeconfig.yaml");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !token_file.exists() || !kubeconfig.exists() {
        assert!(
            Instant::now() < deadline,
            "the first server did not bootstrap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token = std::fs::read_to_string(&token_file).unwrap();
    let first = client(dir.path(), 0, port).await;
    wait_answering(&first).await;

    // Throughput: one server, then three, on the same etcd.
    let total = 3_200;
    creates(std::slice::from_ref(&first), 320).await; // warm-up
    let one = creates(std::slice::from_ref(&first), total).await;
    for i in 1..SERVERS {
        servers.push(Some(start_server(
            dir.path(),
            i,
            port,
            &datastore,
            Some(token.trim()),
        )));
    }
    let mut clients = vec![first];
    for i in 1..SERVERS {
        let c = client(dir.path(), i, port).await;
        wait_answering(&c).await;
        clients.push(c);
    }
    creates(&clients, 320).await; // warm-up
    let three = creates(&clients, total).await;
    println!(
        "creates/s, 32 writers: 1 server {one:.0}, 3 servers {three:.0} ({:.2}x)",
        three / one
    );

    // A node, so that a pending pod can be scheduled after the kill.
    let node_token = std::fs::read_to_string(dir.path().join("server0/node-token")).unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_orq"));
    agent.args(["agent", "--runtime", "simulated", "--node-name", "bench"]);
    for i in 0..SERVERS {
        agent.args(["--server", &format!("https://127.0.0.{}:{port}", 2 + i)]);
    }
    let _agent = Proc(
        agent
            .args(["--token", node_token.trim()])
            .arg("--ca-file")
            .arg(dir.path().join("server0/tls/ca.crt"))
            .env_remove("KUBECONFIG")
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ids: Vec<String> = (0..SERVERS)
        .map(|i| {
            let id: PathBuf = dir.path().join(format!("server{i}/server-id"));
            format!("_{}", std::fs::read_to_string(id).unwrap().trim())
        })
        .collect();
    let leader = loop {
        if let Some(h) = holder(&clients[1], "kube-controller-manager").await {
            if let Some(i) = ids.iter().position(|id| h.ends_with(id.as_str())) {
                break i;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Availability: 16 writers round-robin over the servers; kill the leader after 10 s.
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (clients, samples, stop) =
                (clients.clone(), Arc::clone(&samples), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut n = w;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let api: Api<ConfigMap> =
                        Api::namespaced(clients[n % SERVERS].clone(), "default");
                    let start = Instant::now();
                    let ok = api
                        .create(&PostParams::default(), &configmap())
                        .await
                        .is_ok();
                    samples.lock().unwrap().push((start, start.elapsed(), ok));
                    n += 1;
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(10)).await;
    servers[leader].take();
    let killed = Instant::now();
    let survivor = clients[(leader + 1) % SERVERS].clone();
    let pods: Api<Pod> = Api::namespaced(survivor.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "after-kill"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let mut led = None;
    let mut scheduled = None;
    while (led.is_none() || scheduled.is_none()) && killed.elapsed() < Duration::from_secs(60) {
        if led.is_none() {
            let both = [
                holder(&survivor, "kube-scheduler").await,
                holder(&survivor, "kube-controller-manager").await,
            ];
            if both.iter().all(|h| {
                h.as_ref()
                    .is_some_and(|h| !h.ends_with(ids[leader].as_str()))
            }) {
                led = Some(killed.elapsed());
            }
        }
        if scheduled.is_none() {
            let bound = pods
                .get_opt("after-kill")
                .await
                .ok()
                .flatten()
                .and_then(|p| p.spec?.node_name);
            if bound.is_some() {
                scheduled = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(15).saturating_sub(killed.elapsed())).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    let samples = samples.lock().unwrap().clone();
    let mut done: Vec<Instant> = samples.iter().filter(|s| s.2).map(|s| s.0 + s.1).collect();
    done.sort();
    let gap = done
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut before: Vec<f64> = samples
        .iter()
        .filter(|s| s.2 && s.0 < killed)
        .map(|s| ms(s.1))
        .collect();
    let mut during: Vec<f64> = samples
        .iter()
        .filter(|s| s.2 && s.0 >= killed && s.0 < killed + Duration::from_secs(15))
        .map(|s| ms(s.1))
        .collect();
    let failed = samples.iter().filter(|s| !s.2).count();
    println!(
        "leader kill: longest gap between acknowledged writes {:.0} ms; write p99 {:.1} ms before, {:.1} ms in the 15 s after ({} ok before, {} ok after, {failed} failed — the dead server's)",
        ms(gap),
        percentile(&mut before, 0.99),
        percentile(&mut during, 0.99),
        before.len(),
        during.len(),
    );
    println!(
        "leader kill: both Leases held elsewhere after {:.1} s, the pending pod scheduled after {:.1} s",
        led.map_or(f64::NAN, |d| d.as_secs_f64()),
        scheduled.map_or(f64::NAN, |d| d.as_secs_f64()),
    );
}
