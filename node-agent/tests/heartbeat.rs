//! Node registration and heartbeats against the real API server in-process: the Node with its
//! capacity, conditions, addresses and nodeInfo; the Lease in kube-node-lease renewed on its
//! clock; registering again (an agent restart) is idempotent and keeps transition times.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use orquestra_node_agent::{Heartbeat, HostInfo, NodeConfig};
use orquestra_operator::testing::{TestApi, wait_for};

#[tokio::test]
async fn a_node_registers_and_keeps_its_lease_fresh() {
    let api = TestApi::start().await.unwrap();
    let mut config = NodeConfig::new("node-1", "127.0.0.1");
    config.lease_renew = Duration::from_millis(200);
    let heartbeat = Heartbeat::new(api.client(), config.clone(), HostInfo::read());
    heartbeat.register().await.unwrap();

    let nodes: Api<Node> = Api::all(api.client());
    let node = nodes.get("node-1").await.unwrap();
    let labels = node.metadata.labels.clone().unwrap();
    assert_eq!(labels["kubernetes.io/hostname"], "node-1");
    let status = node.status.clone().unwrap();
    assert_eq!(status.capacity.as_ref().unwrap()["pods"].0, "110");
    assert!(
        status.capacity.as_ref().unwrap()["cpu"]
            .0
            .parse::<u32>()
            .unwrap()
            >= 1
    );
    let conditions = status.conditions.clone().unwrap();
    let ready = conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("True", Some("KubeletReady"))
    );
    for pressure in ["MemoryPressure", "DiskPressure", "PIDPressure"] {
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == pressure && c.status == "False")
        );
    }
    let info = status.node_info.unwrap();
    assert_eq!(info.container_runtime_version, "libcontainer://0.7.0");
    assert_eq!(info.operating_system, "linux");
    assert!(
        status
            .addresses
            .unwrap()
            .iter()
            .any(|a| a.type_ == "InternalIP" && a.address == "127.0.0.1")
    );

    // The Lease, renewed on its clock by the running heartbeat.
    let leases: Api<Lease> = Api::namespaced(api.client(), "kube-node-lease");
    let first = leases.get("node-1").await.unwrap().spec.unwrap();
    assert_eq!(first.holder_identity.as_deref(), Some("node-1"));
    assert_eq!(first.lease_duration_seconds, Some(40));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(heartbeat.run(async move {
        let _ = stopped.await;
    }));
    let first_renew = first.renew_time.unwrap();
    wait_for(&leases, "node-1", Duration::from_secs(5), |lease| {
        lease
            .spec
            .as_ref()
            .and_then(|s| s.renew_time.as_ref())
            .is_some_and(|t| t.0 > first_renew.0)
    })
    .await
    .unwrap();
    stop.send(()).unwrap();
    running.await.unwrap();

    // An agent restart registers again: same Node, Ready's transition time kept.
    let again = Heartbeat::new(api.client(), config, HostInfo::read());
    again.register().await.unwrap();
    let node = nodes.get("node-1").await.unwrap();
    let ready_again = node
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "Ready")
        .unwrap();
    assert_eq!(ready_again.last_transition_time, ready.last_transition_time);
    assert_eq!(
        nodes.list(&Default::default()).await.unwrap().items.len(),
        1
    );
}
