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

/// Runs `orq agent ARGS` to its end (it must fail fast); its exit status and stderr.
fn failing_agent(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Agent(
        Command::new(env!("CARGO_BIN_EXE_orq"))
            .arg("agent")
            .args(args)
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "orq agent {args:?} did not give up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn joining_with_a_wrong_server_or_token_fails_naming_what_failed() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--no-agent"]);
    server.wait_ready();
    let ca = dir.path().join("tls/ca.crt");
    let ca = ca.to_str().unwrap();
    let url = format!("https://{}", server.addr);
    let token = server.token().unwrap();

    let (status, stderr) = failing_agent(&["--server", &url, "--token", "wrong", "--ca-file", ca]);
    assert!(!status.success());
    assert!(
        stderr.contains(&format!(
            "the API server at {url} rejected the token (401 Unauthorized)"
        )),
        "{stderr}"
    );

    let (status, stderr) = failing_agent(&[
        "--server",
        "https://127.0.0.1:1",
        "--token",
        token.trim(),
        "--ca-file",
        ca,
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("cannot reach the API server at https://127.0.0.1:1"),
        "{stderr}"
    );

    let (status, stderr) = failing_agent(&["--server", "10.0.0.1", "--token", "t"]);
    assert!(!status.success());
    assert!(
        stderr.contains("is not a URL like https://HOST:6443"),
        "{stderr}"
    );

    let (status, stderr) = failing_agent(&["--server", &url, "--ca-file", ca]);
    assert!(!status.success());
    assert!(
        stderr.contains("--server needs --token or --token-file"),
        "{stderr}"
    );

    let (status, stderr) = failing_agent(&[]);
    assert!(!status.success());
    assert!(stderr.contains("no cluster to join"), "{stderr}");

    let (status, stderr) = failing_agent(&[
        "--server",
        &url,
        "--token",
        "t",
        "--register-with-taints",
        "dedicated=gpu:Sometimes",
    ]);
    assert!(!status.success());
    assert!(
        stderr.contains("the effect must be NoSchedule, PreferNoSchedule or NoExecute"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_with_server_token_and_ca_and_registers_its_taints() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--no-agent"]);
    tokio::task::block_in_place(|| server.wait_ready());
    // A bridge name of this test's own, though with the proxy off and no pods the agent
    // never creates it; `--cleanup` below then removes nothing of anyone else's.
    let bridge = format!("orqj{}", std::process::id() % 100_000);
    let agent_dir = dir.path().join("agent");
    let node_args = [
        "--bridge",
        &bridge,
        "--agent-data-dir",
        agent_dir.to_str().unwrap(),
        "--disable-kube-proxy",
    ];
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_orq"))
            .arg("agent")
            .args(["--server", &format!("https://{}", server.addr)])
            .arg("--token-file")
            .arg(dir.path().join("node-token"))
            .arg("--ca-file")
            .arg(dir.path().join("tls/ca.crt"))
            .args(["--node-name", "joined", "--agent-listen", "127.0.0.1:0"])
            .args([
                "--register-with-taints",
                "orquestra.dev/runtime=libcontainer:NoSchedule,dedicated:NoExecute",
            ])
            .args(node_args)
            .env_remove("KUBECONFIG")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let config = kube::config::Kubeconfig::read_from(server.kubeconfig()).unwrap();
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(kube::Client::try_from(config).unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let node = loop {
        if let Some(node) = nodes.get_opt("joined").await.unwrap() {
            let ready = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if ready {
                break node;
            }
        }
        assert!(Instant::now() < deadline, "the joined node becomes Ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let taints: Vec<(String, Option<String>, String)> = node
        .spec
        .unwrap()
        .taints
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.value, t.effect))
        .collect();
    assert_eq!(
        taints,
        [
            (
                "orquestra.dev/runtime".to_owned(),
                Some("libcontainer".to_owned()),
                "NoSchedule".to_owned()
            ),
            ("dedicated".to_owned(), None, "NoExecute".to_owned()),
        ]
    );
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(agent.0.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while agent.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent stops on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Whatever the agent left in its data dir goes (nothing on the host: no pods ran).
    let status = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args(["agent", "--cleanup"])
        .args(node_args)
        .status()
        .unwrap();
    assert!(status.success());
}
