//! The simulated runtime against the real API server in-process: its nodes register Ready,
//! pods bound to them run at once with an IP and the usual conditions, other pods are left
//! alone.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

fn pod(name: &str, node: Option<&str>) -> Pod {
    let mut pod = json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]},
    });
    if let Some(node) = node {
        pod["spec"]["nodeName"] = json!(node);
    }
    serde_json::from_value(pod).unwrap()
}

#[tokio::test]
async fn simulated_nodes_run_their_pods_instantly() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let names = orquestra_node_agent::simulated::spawn_ready(
        client.clone(),
        "sim",
        3,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &names {
        let node = nodes.get(name).await.unwrap();
        let conditions = node.status.and_then(|s| s.conditions).unwrap_or_default();
        assert!(
            conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            "{name} Ready"
        );
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.create(&PostParams::default(), &pod("bound", Some("sim-1")))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("elsewhere", Some("real-node")))
        .await
        .unwrap();
    pods.create(&PostParams::default(), &pod("unscheduled", None))
        .await
        .unwrap();
    let running = wait_for(&pods, "bound", Duration::from_secs(10), |p| {
        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
    .unwrap();
    let status = running.status.unwrap();
    assert!(status.pod_ip.unwrap().starts_with("10.244."));
    assert!(
        status
            .conditions
            .unwrap()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
    let container = &status.container_statuses.unwrap()[0];
    assert!(container.ready && container.state.as_ref().unwrap().running.is_some());

    tokio::time::sleep(Duration::from_millis(300)).await;
    for other in ["elsewhere", "unscheduled"] {
        let phase = pods.get(other).await.unwrap().status.and_then(|s| s.phase);
        assert_eq!(phase.as_deref(), Some("Pending"), "{other} is not ours");
    }
}
