//! Several `orq server`s on one etcd: the scheduler and the controllers each act on one server
//! at a time, behind the Leases `kube-scheduler` and `kube-controller-manager`, and hand over
//! when it dies; the `kubernetes` Endpoints list exactly the live servers.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Pod};
use kube::Api;
use kube::api::PostParams;
use orquestra_store::testing::EtcdProcess;

/// A process killed by PID when the test ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free on both 127.0.0.2 and 127.0.0.3 (servers on one port, as the `kubernetes`
/// Service has one target port).
fn shared_port() -> u16 {
    loop {
        let a = TcpListener::bind("127.0.0.2:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.3", port)).is_ok() {
            return port;
        }
    }
}

fn server(dir: &std::path::Path, ip: &str, port: u16, etcd: &EtcdProcess) -> Server {
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    Server::start_at(
        dir,
        addr,
        &[
            "--insecure-http",
            "--no-agent",
            "--datastore",
            &etcd.datastore_url(),
            "--advertise-address",
            ip,
        ],
    )
}

fn client(server: &Server) -> kube::Client {
    kube::Client::try_from(kube::Config::new(
        format!("http://{}", server.addr).parse().unwrap(),
    ))
    .unwrap()
}

/// The server's identity in Leases: the hostname, then the id in its data dir.
fn identity_of(server: &Server) -> String {
    let id = std::fs::read_to_string(server.data_dir.join("server-id")).unwrap();
    format!("_{}", id.trim())
}

async fn holder(client: &kube::Client, lease: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-system");
    leases
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

async fn endpoint_ips(client: &kube::Client) -> Vec<String> {
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let Ok(Some(e)) = endpoints.get_opt("kubernetes").await else {
        return Vec::new();
    };
    e.subsets
        .into_iter()
        .flatten()
        .flat_map(|s| s.addresses.unwrap_or_default())
        .map(|a| a.ip)
        .collect()
}

/// Polls `check` every 200 ms until it holds; panics naming `what` after `within`.
async fn until<F, Fut>(within: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < within, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    start.elapsed()
}

async fn scheduled(pods: &Api<Pod>, name: &str) -> bool {
    pods.get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.spec?.node_name)
        .is_some()
}

fn pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_fails_over_between_servers_on_one_etcd() {
    let etcd = EtcdProcess::start().await.unwrap();
    let port = shared_port();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = server(dir_a.path(), "127.0.0.2", port, &etcd);
    tokio::task::block_in_place(|| a.wait_ready());
    let b = server(dir_b.path(), "127.0.0.3", port, &etcd);
    tokio::task::block_in_place(|| b.wait_ready());
    let client_b = client(&b);

    // The first server leads both groups; the second follows and serves.
    let (id_a, id_b) = (identity_of(&a), identity_of(&b));
    for lease in ["kube-scheduler", "kube-controller-manager"] {
        until(
            Duration::from_secs(20),
            &format!("{lease} held by a"),
            || async {
                holder(&client_b, lease)
                    .await
                    .is_some_and(|h| h.ends_with(&id_a))
            },
        )
        .await;
    }
    until(
        Duration::from_secs(20),
        "both servers in the endpoints",
        || async { endpoint_ips(&client_b).await == ["127.0.0.2", "127.0.0.3"] },
    )
    .await;
    let status = |server: &Server, lease: &str| {
        let (_, metrics) = server.get("/metrics").unwrap();
        metrics
            .lines()
            .find(|l| {
                l.starts_with("leader_election_master_status")
                    && l.contains(&format!("name=\"{lease}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
    };
    tokio::task::block_in_place(|| {
        assert_eq!(status(&a, "kube-scheduler").as_deref(), Some("1"));
        assert_eq!(status(&a, "kube-controller-manager").as_deref(), Some("1"));
        assert_eq!(status(&b, "kube-scheduler").as_deref(), Some("0"));
        assert_eq!(status(&b, "kube-controller-manager").as_deref(), Some("0"));
    });

    // A node to schedule onto, through the server that stays.
    let _agent = Child(
        Command::new(env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--runtime", "simulated", "--node-name", "sim"])
            .arg("--kubeconfig")
            .arg(b.kubeconfig())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pods: Api<Pod> = Api::namespaced(client_b.clone(), "default");
    pods.create(&PostParams::default(), &pod("before"))
        .await
        .unwrap();
    until(Duration::from_secs(30), "a pod scheduled by a", || {
        scheduled(&pods, "before")
    })
    .await;

    // SIGKILL the leader: the other takes both Leases and schedules within 12 s (the 10 s
    // Lease and a 2 s retry), and drops the dead server from the endpoints.
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = Instant::now();
    pods.create(&PostParams::default(), &pod("after"))
        .await
        .unwrap();
    until(
        Duration::from_secs(15),
        "the pod scheduled after the kill",
        || scheduled(&pods, "after"),
    )
    .await;
    // The two Leases expire together; the controllers' may be taken a retry later.
    until(Duration::from_secs(4), "both Leases held by b", || async {
        holder(&client_b, "kube-scheduler")
            .await
            .is_some_and(|h| h.ends_with(&id_b))
            && holder(&client_b, "kube-controller-manager")
                .await
                .is_some_and(|h| h.ends_with(&id_b))
    })
    .await;
    eprintln!("scheduling resumed {:?} after the kill", killed.elapsed());
    until(
        Duration::from_secs(25),
        "the dead server out of the endpoints",
        || async { endpoint_ips(&client_b).await == ["127.0.0.3"] },
    )
    .await;

    // Back on its data dir (the same identity), it follows; a clean stop of the leader
    // releases the Leases and its endpoint at once.
    let a = server(dir_a.path(), "127.0.0.2", port, &etcd);
    tokio::task::block_in_place(|| a.wait_ready());
    until(
        Duration::from_secs(20),
        "the restarted server back in the endpoints",
        || async { endpoint_ips(&client_b).await == ["127.0.0.2", "127.0.0.3"] },
    )
    .await;
    assert!(
        holder(&client_b, "kube-scheduler")
            .await
            .is_some_and(|h| h.ends_with(&id_b))
    );
    assert!(tokio::task::block_in_place(|| b.terminate()).success());
    let client_a = client(&a);
    let handed = until(
        Duration::from_secs(8),
        "a leads again after b's clean stop",
        || async {
            holder(&client_a, "kube-scheduler")
                .await
                .is_some_and(|h| h.ends_with(&id_a))
                && holder(&client_a, "kube-controller-manager")
                    .await
                    .is_some_and(|h| h.ends_with(&id_a))
        },
    )
    .await;
    eprintln!("handed over {handed:?} after a clean stop");
    until(
        Duration::from_secs(6),
        "the stopped server out of the endpoints",
        || async { endpoint_ips(&client_a).await == ["127.0.0.2"] },
    )
    .await;
    drop(client_a);
    tokio::task::block_in_place(|| drop(a));
}

fn tls_client(server: &Server) -> kube::Client {
    let config = kube::config::Kubeconfig::read_from(server.kubeconfig()).unwrap();
    let config = futures::executor::block_on(kube::Config::from_custom_kubeconfig(
        config,
        &Default::default(),
    ))
    .unwrap();
    kube::Client::try_from(config).unwrap()
}

/// `orq server` on the same etcd, run to its exit: what it printed.
fn server_fails(dir: &std::path::Path, etcd: &EtcdProcess, extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_orq"))
        .arg("server")
        .arg("--data-dir")
        .arg(dir)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--no-agent",
            "--disable-kube-proxy",
        ])
        .args(["--datastore", &etcd.datastore_url()])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_joins_through_the_datastore_and_agents_fail_over_between_servers() {
    let etcd = EtcdProcess::start().await.unwrap();
    let dir_a = tempfile::tempdir().unwrap();
    let a = Server::start(
        dir_a.path(),
        &["--no-agent", "--datastore", &etcd.datastore_url()],
    );
    tokio::task::block_in_place(|| a.wait_ready());
    let token = std::fs::read_to_string(dir_a.path().join("server-token")).unwrap();

    // Without the token, or with a wrong one, a second server says what to do.
    let stray = tempfile::tempdir().unwrap();
    let stderr = tokio::task::block_in_place(|| server_fails(stray.path(), &etcd, &[]));
    assert!(stderr.contains("join it with --token"), "{stderr}");
    let stderr =
        tokio::task::block_in_place(|| server_fails(stray.path(), &etcd, &["--token", "guess"]));
    assert!(stderr.contains("does not open"), "{stderr}");
    assert!(
        !stray.path().join("tls/ca.crt").exists(),
        "nothing of a cluster was made"
    );

    // With it, the second server shares the CA and the tokens; its certificate is its own.
    let dir_b = tempfile::tempdir().unwrap();
    let b = Server::start(
        dir_b.path(),
        &[
            "--no-agent",
            "--datastore",
            &etcd.datastore_url(),
            "--token",
            token.trim(),
        ],
    );
    tokio::task::block_in_place(|| b.wait_ready());
    let read = |dir: &std::path::Path, file: &str| std::fs::read(dir.join(file)).unwrap();
    for shared in [
        "tls/ca.crt",
        "tls/ca.key",
        "tls/service-account.key",
        "token",
        "node-token",
    ] {
        assert_eq!(
            read(dir_a.path(), shared),
            read(dir_b.path(), shared),
            "{shared}"
        );
    }
    assert_ne!(
        read(dir_a.path(), "tls/server.key"),
        read(dir_b.path(), "tls/server.key")
    );

    // An agent that knows both servers keeps its node alive through b once a dies.
    let node_token = String::from_utf8(read(dir_a.path(), "node-token")).unwrap();
    let _agent = Child(
        Command::new(env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--runtime", "simulated", "--node-name", "sim"])
            .args(["--server", &format!("https://{}", a.addr)])
            .args(["--server", &format!("https://{}", b.addr)])
            .args(["--token", node_token.trim()])
            .arg("--ca-file")
            .arg(dir_a.path().join("tls/ca.crt"))
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let client_b = tokio::task::block_in_place(|| tls_client(&b));
    let leases: Api<Lease> = Api::namespaced(client_b.clone(), "kube-node-lease");
    let renewed = |after: k8s_openapi::jiff::Timestamp| {
        let leases = leases.clone();
        async move {
            leases
                .get_opt("sim-0")
                .await
                .ok()
                .flatten()
                .and_then(|l| l.spec?.renew_time)
                .is_some_and(|t| t.0 > after)
        }
    };
    until(
        Duration::from_secs(30),
        "the agent's node registered",
        || renewed(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
    )
    .await;
    let mut a = a;
    a.child.kill().unwrap();
    a.child.wait().unwrap();
    let killed = k8s_openapi::jiff::Timestamp::now();
    let took = until(
        Duration::from_secs(30),
        "the node's Lease renewed through b",
        || renewed(killed),
    )
    .await;
    eprintln!("the agent renewed its Lease through the other server {took:?} after the kill");
    tokio::task::block_in_place(|| drop(b));
}
