//! The taint eviction controller against the real API server in-process and simulated nodes:
//! a NoExecute taint evicts a pod that does not tolerate it at once (marking it a
//! `DisruptionTarget` of the taint manager first), one that tolerates it for
//! `tolerationSeconds` that much later, one that tolerates it forever never; removing the
//! taint before the time is up cancels the eviction.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

const KEY: &str = "example.com/evict";

async fn pod(pods: &Api<Pod>, name: &str, node: &str, seconds: Option<Option<i64>>, hold: bool) {
    let mut pod = json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]},
    });
    if let Some(seconds) = seconds {
        pod["spec"]["tolerations"] = json!([{"key": KEY, "operator": "Equal", "value": "yes",
                                             "effect": "NoExecute", "tolerationSeconds": seconds}]);
    }
    if hold {
        pod["metadata"]["finalizers"] = json!(["example.com/hold"]);
    }
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
    wait_for(
        pods,
        name,
        Duration::from_secs(20),
        orquestra_controllers::objects::ready,
    )
    .await
    .unwrap();
}

async fn taint(client: &Client, node: &str, on: bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    let taints = if on {
        json!([{"key": KEY, "value": "yes", "effect": "NoExecute"}])
    } else {
        json!(null)
    };
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"taints": taints}})),
        )
        .await
        .unwrap();
}

async fn evicted(pods: &Api<Pod>, name: &str) -> bool {
    pods.get_opt(name)
        .await
        .unwrap()
        .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_execute_taints_evict() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 2, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(
        &mut manager,
        &["taint-eviction-controller".into()],
        &orquestra_controllers::Settings::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // On sim-0, tainted for good: no toleration (held by a finalizer, to look at it after),
    // three seconds, forever.
    pod(&pods, "plain", "sim-0", None, true).await;
    pod(&pods, "short", "sim-0", Some(Some(3)), false).await;
    pod(&pods, "forever", "sim-0", Some(None), false).await;
    // On sim-1, tainted for a moment: four seconds.
    pod(&pods, "spared", "sim-1", Some(Some(4)), false).await;

    let tainted = Instant::now();
    taint(&client, "sim-0", true).await;
    taint(&client, "sim-1", true).await;
    let plain = wait_for(&pods, "plain", Duration::from_secs(5), |p| {
        p.metadata.deletion_timestamp.is_some()
    })
    .await
    .unwrap();
    let condition = plain
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "DisruptionTarget"))
        .cloned()
        .unwrap();
    assert_eq!(
        (condition.status.as_str(), condition.reason.as_deref()),
        ("True", Some("DeletionByTaintManager"))
    );
    pods.patch(
        "plain",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(!evicted(&pods, "short").await, "evicted before its 3 s");

    // The taint leaves sim-1 before the four seconds are up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    taint(&client, "sim-1", false).await;

    let deadline = tainted + Duration::from_secs(10);
    while !evicted(&pods, "short").await {
        assert!(Instant::now() < deadline, "not evicted after its 3 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        tainted.elapsed() >= Duration::from_secs(3),
        "evicted after {:?}, before its 3 s",
        tainted.elapsed()
    );
    // Well past the four seconds: the cancelled one and the tolerating one stay.
    tokio::time::sleep(
        (tainted + Duration::from_secs(7)).saturating_duration_since(Instant::now()),
    )
    .await;
    assert!(
        !evicted(&pods, "spared").await,
        "evicted though the taint was removed"
    );
    assert!(
        !evicted(&pods, "forever").await,
        "evicted though it tolerates the taint forever"
    );
}
