//! `orq agent --runtime simulated` as a process against `orq server`: its nodes register
//! Ready and a pod bound to one of them runs; SIGTERM stops the agent cleanly.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;

struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agent_nodes_run_pods() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--insecure-http", "--no-agent"]);
    tokio::task::block_in_place(|| server.wait_ready());
    let agent = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args([
            "agent",
            "--runtime",
            "simulated",
            "--nodes",
            "2",
            "--node-name",
            "sim",
        ])
        .arg("--kubeconfig")
        .arg(server.kubeconfig())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    // Killed (by its PID) if the test fails before it stops on its own.
    let mut agent = Agent(agent);
    let client = kube::Client::try_from(kube::Config::new(
        format!("http://{}", server.addr).parse().unwrap(),
    ))
    .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names: Vec<String> = nodes
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        if names == ["sim-0", "sim-1"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "two simulated nodes, no local one: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "p"},
        "spec": {"nodeName": "sim-1", "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pods
        .get("p")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase)
        .as_deref()
        != Some("Running")
    {
        assert!(
            Instant::now() < deadline,
            "the pod runs on its simulated node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(agent.0.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = agent.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent stops on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    drop(server);
}
