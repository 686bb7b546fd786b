//! The HA control plane under faults (root): three netns hosts on a test bridge, each with an
//! etcd member (one three-member cluster), an `orq server` on it (the second and third joined
//! with the first's token) and a simulated agent that knows all three servers. A load
//! generator in the machine's namespace writes ConfigMaps and creates/deletes pods through all
//! servers while the test SIGKILLs the server leading the controllers, SIGKILLs an etcd
//! member, and cuts the leading server's host off the network; then brings everything back.
//! At the end every acknowledged write is there, no ReplicaSet has more pods than replicas,
//! and every node is Ready. Only the bed's own addresses (10.218.0.0/24) are used.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

#[path = "common/bed.rs"]
mod bed;
#[path = "common/busybox.rs"]
mod busybox;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bed::{Proc, is_root, wire_hosts};
use busybox::run_ok;
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};

const HOSTS: usize = 3;
const NET: u8 = 218;

fn host_ip(i: usize) -> String {
    format!("10.{NET}.0.{}", 11 + i)
}

/// The bed: bridge, namespaces, and per host an etcd member, a server and an agent.
struct Cluster {
    dir: tempfile::TempDir,
    tag: String,
    etcd: Vec<Option<Proc>>,
    servers: Vec<Option<Proc>>,
    agents: Vec<Option<Proc>>,
    token: Option<String>,
}

impl Cluster {
    fn bridge(&self) -> String {
        format!("orqha{}", self.tag)
    }
    fn netns(&self, i: usize) -> String {
        format!("orqha{}-{i}", self.tag)
    }
    fn veth(&self, i: usize) -> String {
        format!("orqhv{}-{i}", self.tag)
    }
    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("server{i}"))
    }
    fn nsenter(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns(i)))
            .arg(program);
        cmd
    }
    fn log(&self, name: &str) -> std::fs::File {
        std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{name}.log")))
            .unwrap()
    }

    fn create() -> Cluster {
        let mut cluster = Cluster {
            dir: tempfile::tempdir().unwrap(),
            tag: format!("{}", std::process::id() % 100_000),
            etcd: (0..HOSTS).map(|_| None).collect(),
            servers: (0..HOSTS).map(|_| None).collect(),
            agents: (0..HOSTS).map(|_| None).collect(),
            token: None,
        };
        let hosts: Vec<(String, String, String)> = (0..HOSTS)
            .map(|i| (cluster.netns(i), cluster.veth(i), host_ip(i)))
            .collect();
        wire_hosts(&cluster.bridge(), &format!("10.{NET}.0.1"), &hosts);
        for i in 0..HOSTS {
            cluster.start_etcd(i);
        }
        cluster.wait_etcd();
        cluster
    }

    /// Until every member answers healthy (a quorum is up).
    fn wait_etcd(&self) {
        let endpoints: Vec<String> = (0..HOSTS)
            .map(|j| format!("http://{}:2379", host_ip(j)))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let healthy = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .arg(format!("--endpoints={}", endpoints.join(",")))
                .args(["endpoint", "health"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if healthy {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd healthy within 60 s\n{}",
                self.tails()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn start_etcd(&mut self, i: usize) {
        let ip = host_ip(i);
        let initial: Vec<String> = (0..HOSTS)
            .map(|j| format!("m{j}=http://{}:2380", host_ip(j)))
            .collect();
        let child = self
            .nsenter(i, "etcd")
            .arg(format!("--name=m{i}"))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join(format!("etcd{i}")).display()
            ))
            .arg(format!("--listen-client-urls=http://{ip}:2379"))
            .arg(format!("--advertise-client-urls=http://{ip}:2379"))
            .arg(format!("--listen-peer-urls=http://{ip}:2380"))
            .arg(format!("--initial-advertise-peer-urls=http://{ip}:2380"))
            .arg(format!("--initial-cluster={}", initial.join(",")))
            .arg(format!("--initial-cluster-token=orqha{}", self.tag))
            .arg("--max-request-bytes=2097152")
            .arg("--experimental-watch-progress-notify-interval=1s")
            .arg("--log-level=warn")
            .stdout(Stdio::null())
            .stderr(self.log(&format!("etcd{i}")))
            .spawn()
            .unwrap();
        self.etcd[i] = Some(Proc(child));
    }

    fn datastore(&self) -> String {
        let members: Vec<String> = (0..HOSTS).map(|j| format!("{}:2379", host_ip(j))).collect();
        format!("etcd://{}", members.join(","))
    }

    fn start_server(&mut self, i: usize) {
        let mut cmd = self.nsenter(i, env!("CARGO_BIN_EXE_orq"));
        cmd.arg("server")
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .args([
                "--listen",
                "0.0.0.0:6443",
                "--advertise-address",
                &host_ip(i),
            ])
            .args(["--no-agent", "--datastore", &self.datastore()])
            .args(["--tls-san", &host_ip(i)]);
        if let Some(token) = &self.token {
            cmd.args(["--token", token]);
        }
        let child = cmd
            .env("RUST_LOG", "info")
            .stdout(self.log(&format!("server{i}")))
            .stderr(self.log(&format!("server{i}")))
            .spawn()
            .unwrap();
        self.servers[i] = Some(Proc(child));
    }

    fn start_agent(&mut self, i: usize) {
        let node_token = std::fs::read_to_string(self.data_dir(0).join("node-token")).unwrap();
        let mut cmd = self.nsenter(i, env!("CARGO_BIN_EXE_orq"));
        cmd.args(["agent", "--runtime", "simulated"])
            .args(["--node-name", &format!("h{i}")]);
        // Its own host's server first: what an agent on a server host would be given.
        for j in (0..HOSTS).map(|j| (i + j) % HOSTS) {
            cmd.args(["--server", &format!("https://{}:6443", host_ip(j))]);
        }
        let child = cmd
            .args(["--token", node_token.trim()])
            .arg("--ca-file")
            .arg(self.data_dir(0).join("tls/ca.crt"))
            .env_remove("KUBECONFIG")
            .stdout(self.log(&format!("agent{i}")))
            .stderr(self.log(&format!("agent{i}")))
            .spawn()
            .unwrap();
        self.agents[i] = Some(Proc(child));
    }

    fn set_link(&self, i: usize, up: bool) {
        run_ok(Command::new("ip").args([
            "link",
            "set",
            &self.veth(i),
            if up { "up" } else { "down" },
        ]));
    }

    /// `GET path` on server `i` from inside its own host (reachable even when cut off).
    fn local_get(&self, i: usize, path: &str) -> Option<String> {
        let token = std::fs::read_to_string(self.data_dir(0).join("token")).ok()?;
        let out = self
            .nsenter(i, "curl")
            .args(["-s", "--max-time", "2", "--cacert"])
            .arg(self.data_dir(0).join("tls/ca.crt"))
            .args(["-H", &format!("Authorization: Bearer {}", token.trim())])
            .arg(format!("https://127.0.0.1:6443{path}"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `leader_election_master_status{name=lease}` of server `i`, read inside its host.
    fn leads(&self, i: usize, lease: &str) -> Option<bool> {
        let metrics = self.local_get(i, "/metrics")?;
        metrics
            .lines()
            .find(|l| {
                l.starts_with("leader_election_master_status")
                    && l.contains(&format!("name=\"{lease}\""))
            })
            .map(|l| l.ends_with(" 1"))
    }

    fn tails(&self) -> String {
        let mut out = String::new();
        for name in [
            "server0", "server1", "server2", "agent0", "etcd0", "etcd1", "etcd2",
        ] {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                .unwrap_or_default();
            let lines: Vec<&str> = text.lines().rev().take(15).collect();
            out.push_str(&format!("=== {name}\n"));
            for line in lines.into_iter().rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.take();
        }
        for server in &mut self.servers {
            server.take();
        }
        for etcd in &mut self.etcd {
            etcd.take();
        }
        for i in 0..HOSTS {
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(i)])
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

/// An admin client of server `i` (the cluster's shared CA and admin token), with short
/// timeouts so a dead or cut-off server fails requests instead of hanging them.
async fn admin(cluster: &Cluster, i: usize) -> kube::Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(cluster.data_dir(0).join("kubeconfig.yaml")).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.cluster_url = format!("https://{}:6443", host_ip(i)).parse().unwrap();
    config.connect_timeout = Some(Duration::from_secs(2));
    config.read_timeout = Some(Duration::from_secs(5));
    config.write_timeout = Some(Duration::from_secs(5));
    kube::Client::try_from(config).unwrap()
}

/// Which server (by index) holds `lease`, through any answering client.
async fn holder(clients: &[kube::Client], ids: &[String], lease: &str) -> Option<usize> {
    for client in clients {
        let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
        if let Ok(Some(l)) = leases.get_opt(lease).await {
            let holder = l.spec?.holder_identity?;
            return ids.iter().position(|id| holder.ends_with(id.as_str()));
        }
    }
    None
}

/// The server leading the controllers, once one does (within 30 s).
async fn controller_leader(clients: &[kube::Client], ids: &[String], cluster: &Cluster) -> usize {
    let start = Instant::now();
    loop {
        if let Some(leader) = holder(clients, ids, "kube-controller-manager").await {
            eprintln!(
                "controllers lead on server {leader} (after {:?})",
                start.elapsed()
            );
            return leader;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "a controller leader within 30 s\n{}",
            cluster.tails()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn until<F, Fut>(within: Duration, what: &str, cluster: &Cluster, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < within,
            "{what} within {within:?}\n{}",
            cluster.tails()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    start.elapsed()
}

/// What the load generator saw.
#[derive(Default)]
struct Load {
    /// ConfigMaps whose create was acknowledged.
    acknowledged: BTreeSet<String>,
    /// When each acknowledged write returned.
    successes: Vec<Instant>,
    failures: usize,
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"load": "churn"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_control_plane_survives_server_kills_etcd_member_kills_and_partitions() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let mut cluster = Cluster::create();
    cluster.start_server(0);
    let wait_file = |path: &Path| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !path.exists() {
            assert!(Instant::now() < deadline, "{} within 60 s", path.display());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    tokio::task::block_in_place(|| {
        wait_file(&cluster.data_dir(0).join("server-token"));
        wait_file(&cluster.data_dir(0).join("kubeconfig.yaml"));
    });
    cluster.token = Some(
        std::fs::read_to_string(cluster.data_dir(0).join("server-token"))
            .unwrap()
            .trim()
            .to_owned(),
    );
    cluster.start_server(1);
    cluster.start_server(2);
    let mut clients = Vec::new();
    for i in 0..HOSTS {
        clients.push(admin(&cluster, i).await);
    }
    for (i, client) in clients.iter().enumerate() {
        let client = client.clone();
        until(
            Duration::from_secs(60),
            &format!("server {i} answering"),
            &cluster,
            || {
                let client = client.clone();
                async move { client.apiserver_version().await.is_ok() }
            },
        )
        .await;
    }
    let ids: Vec<String> = (0..HOSTS)
        .map(|i| {
            let id = std::fs::read_to_string(cluster.data_dir(i).join("server-id")).unwrap();
            format!("_{}", id.trim())
        })
        .collect();
    for i in 0..HOSTS {
        cluster.start_agent(i);
    }
    let nodes: Api<Node> = Api::all(clients[0].clone());
    let all_ready = |nodes: Api<Node>| async move {
        let Ok(list) = nodes.list(&ListParams::default()).await else {
            return false;
        };
        let ready = list
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        ready == HOSTS
    };
    until(
        Duration::from_secs(60),
        "three Ready nodes",
        &cluster,
        || all_ready(nodes.clone()),
    )
    .await;

    // A ReplicaSet whose pods the load deletes: the controllers must replace them, once.
    let rs: ReplicaSet = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "churn"},
        "spec": {"replicas": 6, "selector": {"matchLabels": {"app": "churn"}},
                 "template": {"metadata": {"labels": {"app": "churn"}},
                              "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
    }))
    .unwrap();
    let replicasets: Api<ReplicaSet> = Api::namespaced(clients[0].clone(), "default");
    replicasets
        .create(&PostParams::default(), &rs)
        .await
        .unwrap();

    // The load: ConfigMaps round-robin through the servers, and standalone pods created
    // and deleted, and the ReplicaSet's pods deleted, through them too.
    let load = Arc::new(Mutex::new(Load::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (clients, load, stop) = (clients.clone(), Arc::clone(&load), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let client = clients[n % HOSTS].clone();
                let name = format!("load-{n}");
                let cm: ConfigMap = serde_json::from_value(
                    serde_json::json!({"metadata": {"name": name}, "data": {"n": n.to_string()}}),
                )
                .unwrap();
                let api: Api<ConfigMap> = Api::namespaced(client, "default");
                let result = api.create(&PostParams::default(), &cm).await;
                {
                    let mut load = load.lock().unwrap();
                    match result {
                        Ok(_) => {
                            load.acknowledged.insert(name);
                            load.successes.push(Instant::now());
                        }
                        Err(_) => load.failures += 1,
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let churn = {
        let (clients, stop) = (clients.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut n = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let pods: Api<Pod> = Api::namespaced(clients[n % HOSTS].clone(), "default");
                let _ = pods
                    .create(&PostParams::default(), &pod(&format!("churn-{n}")))
                    .await;
                if n >= 3 {
                    let _ = pods
                        .delete(&format!("churn-{}", n - 3), &DeleteParams::default())
                        .await;
                }
                if let Ok(list) = pods.list(&ListParams::default().labels("app=churn")).await {
                    if let Some(victim) = list.items.first().and_then(|p| p.metadata.name.clone()) {
                        let _ = pods.delete(&victim, &DeleteParams::default()).await;
                    }
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // 1. SIGKILL the server leading the controllers (and the scheduler, if the same).
    let leader = controller_leader(&clients, &ids, &cluster).await;
    cluster.servers[leader].take();
    let killed = Instant::now();
    let others: Vec<kube::Client> = (0..HOSTS)
        .filter(|i| *i != leader)
        .map(|i| clients[i].clone())
        .collect();
    let pending: Api<Pod> = Api::namespaced(others[0].clone(), "default");
    pending
        .create(&PostParams::default(), &pod("after-kill"))
        .await
        .unwrap();
    until(
        Duration::from_secs(15),
        "another server leading the controllers",
        &cluster,
        || async {
            holder(&others, &ids, "kube-controller-manager")
                .await
                .is_some_and(|h| h != leader)
                && holder(&others, &ids, "kube-scheduler")
                    .await
                    .is_some_and(|h| h != leader)
        },
    )
    .await;
    until(
        Duration::from_secs(15),
        "the pending pod scheduled",
        &cluster,
        || async {
            pending
                .get_opt("after-kill")
                .await
                .ok()
                .flatten()
                .and_then(|p| p.spec?.node_name)
                .is_some()
        },
    )
    .await;
    eprintln!(
        "took over and scheduled {:?} after the kill",
        killed.elapsed()
    );
    cluster.start_server(leader);

    // 2. SIGKILL an etcd member: writes go on.
    let member = (leader + 1) % HOSTS;
    cluster.etcd[member].take();
    let before = load.lock().unwrap().successes.len();
    until(
        Duration::from_secs(15),
        "writes continuing with a member down",
        &cluster,
        || async { load.lock().unwrap().successes.len() > before + 20 },
    )
    .await;
    cluster.start_etcd(member);

    // 3. Cut the leading server's host off: it stops acting before another starts.
    let leader = controller_leader(&clients, &ids, &cluster).await;
    let survivors: Vec<usize> = (0..HOSTS).filter(|i| *i != leader).collect();
    cluster.set_link(leader, false);
    let cut = Instant::now();
    let mut stopped_at = None;
    let mut started_at = None;
    while started_at.is_none() || stopped_at.is_none() {
        assert!(
            cut.elapsed() < Duration::from_secs(30),
            "a handover within 30 s\n{}",
            cluster.tails()
        );
        if stopped_at.is_none() {
            let leads =
                tokio::task::block_in_place(|| cluster.leads(leader, "kube-controller-manager"));
            if leads == Some(false) {
                stopped_at = Some(cut.elapsed());
            }
        }
        if started_at.is_none() {
            let others = tokio::task::block_in_place(|| {
                survivors
                    .iter()
                    .any(|i| cluster.leads(*i, "kube-controller-manager") == Some(true))
            });
            if others {
                started_at = Some(cut.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (stopped_at, started_at) = (stopped_at.unwrap(), started_at.unwrap());
    eprintln!(
        "cut off: the old leader stopped after {stopped_at:?}, another started after {started_at:?}"
    );
    assert!(
        stopped_at < started_at,
        "no two leaders at once: stopped {stopped_at:?}, started {started_at:?}"
    );
    cluster.set_link(leader, true);

    // Everything back; the load stops; nothing lost, nothing doubled, every node Ready.
    until(
        Duration::from_secs(60),
        "three Ready nodes after the faults",
        &cluster,
        || all_ready(nodes.clone()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    churn.await.unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(clients[survivors[0]].clone(), "default");
    let present: BTreeSet<String> = configmaps
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect();
    let load = std::mem::take(&mut *load.lock().unwrap());
    let lost: Vec<&String> = load.acknowledged.difference(&present).collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    let longest_gap = load
        .successes
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    eprintln!(
        "{} writes acknowledged, {} failed, 0 lost; longest gap between acknowledged writes {longest_gap:?}",
        load.acknowledged.len(),
        load.failures
    );
    let pods: Api<Pod> = Api::namespaced(clients[survivors[0]].clone(), "default");
    until(
        Duration::from_secs(30),
        "the ReplicaSet at exactly 6 live pods",
        &cluster,
        || async {
            pods.list(&ListParams::default().labels("app=churn"))
                .await
                .is_ok_and(|l| {
                    l.items
                        .iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .count()
                        == 6
                })
        },
    )
    .await;
    // And it stays there: no late duplicate from a second controller.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let live = pods
        .list(&ListParams::default().labels("app=churn"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .count();
    assert_eq!(live, 6, "no duplicate pods for the ReplicaSet");
}
