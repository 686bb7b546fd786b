//! Leader election end to end, with real processes: two demo managers against one API
//! server; exactly one leads and reconciles; SIGKILL it and the other takes over within 15 s
//! (lease 10 s), its leader gauge flipping to 1 on /metrics; SIGTERM releases the Lease.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use orquestra_operator::testing::{TestApi, http_get, wait_for};

const GAUGE: &str = "leader_election_master_status{name=\"demo-manager\"}";

/// A demo manager process, killed (by its PID) when dropped.
struct Replica {
    child: Child,
    metrics: std::net::SocketAddr,
    identity: String,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn replica(api: &TestApi, identity: &str) -> Replica {
    let metrics = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_orquestra-demo-manager"))
        .args([
            format!("http://{}", api.addr()),
            identity.to_owned(),
            metrics.to_string(),
            "10".to_owned(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Replica {
        child,
        metrics,
        identity: identity.to_owned(),
    }
}

/// The leader gauge a replica reports, if it answers.
async fn gauge(replica: &Replica) -> Option<u8> {
    let (_, body) = http_get(replica.metrics, "/metrics").await?;
    let line = body.lines().find(|l| l.starts_with(GAUGE))?;
    line.rsplit(' ').next()?.parse().ok()
}

async fn annotated_by(cms: &Api<ConfigMap>, name: &str, identity: &str) {
    let cm: ConfigMap =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    wait_for(cms, name, Duration::from_secs(10), |cm| {
        cm.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("demo/reconciled-by"))
            .is_some_and(|by| by == identity)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_and_a_fast_takeover_after_sigkill() {
    let api = TestApi::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    let mut replicas = vec![replica(&api, "replica-a"), replica(&api, "replica-b")];

    // Exactly one leads.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let a = gauge(&replicas[0]).await;
        let b = gauge(&replicas[1]).await;
        match (a, b) {
            (Some(1), Some(0)) => break 0,
            (Some(0), Some(1)) => break 1,
            (Some(1), Some(1)) => panic!("two leaders"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "a leader is elected ({a:?}, {b:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let leader_id = replicas[leader].identity.clone();
    annotated_by(&cms, "first", &leader_id).await;

    // SIGKILL the leader: no chance to release the Lease.
    let killed = replicas.remove(leader);
    drop(killed);
    let killed_at = Instant::now();
    let standby = &replicas[0];
    while gauge(standby).await != Some(1) {
        assert!(
            killed_at.elapsed() < Duration::from_secs(15),
            "the standby takes over within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = killed_at.elapsed();
    assert!(
        takeover >= Duration::from_secs(5),
        "not before the Lease could have expired: {takeover:?}"
    );
    annotated_by(&cms, "second", &standby.identity).await;
    let leases: Api<Lease> = Api::namespaced(api.client(), "default");
    let lease = leases.get("demo-manager").await.unwrap();
    let spec = lease.spec.unwrap();
    assert_eq!(
        spec.holder_identity.as_deref(),
        Some(standby.identity.as_str())
    );
    assert_eq!(spec.lease_transitions, Some(1));

    // SIGTERM: the leader finishes and releases the Lease.
    let pid = replicas[0].child.id();
    // SAFETY: kill(2) on our own child's PID; no memory is involved.
    let status = unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    assert_eq!(status, 0);
    wait_for(&leases, "demo-manager", Duration::from_secs(10), |lease| {
        lease
            .spec
            .as_ref()
            .is_some_and(|s| s.holder_identity.is_none())
    })
    .await
    .unwrap();
}
