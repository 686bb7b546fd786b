//! The node lifecycle controller (with the taint eviction controller acting on its taints), the
//! scheduler and the workload controllers against the real API server in-process and
//! simulated nodes: a node whose Lease stops being renewed is
//! marked Unknown and tainted unreachable, its pods are evicted after their
//! `tolerationSeconds` and recreated on the other nodes within `grace + tolerationSeconds +
//! 10 s`; a pod tolerating the taint forever stays; the node coming back is untainted.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};
use orquestra_controllers::Settings;
use orquestra_node_agent::simulated;
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

const GRACE: Duration = Duration::from_secs(3);
const TOLERATION_SECONDS: u64 = 2;
const RENEW: Duration = Duration::from_millis(500);

fn ready(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

fn unreachable_taints(node: &Node) -> Vec<String> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key == "node.kubernetes.io/unreachable")
        .map(|t| t.effect)
        .collect()
}

async fn nodes_up(client: &Client, prefix: &str, count: usize) {
    let nodes: Api<Node> = Api::all(client.clone());
    for name in simulated::node_names(prefix, count) {
        wait_for(&nodes, &name, Duration::from_secs(30), |n| {
            ready(n).as_deref() == Some("True") && unreachable_taints(n).is_empty()
        })
        .await
        .unwrap();
    }
}

fn node_of(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_tainted_and_its_pods_move() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let (stop_flaky, flaky_stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(simulated::run_with(
        client.clone(),
        "sim",
        3,
        RENEW,
        std::future::pending(),
    ));
    tokio::spawn(simulated::run_with(
        client.clone(),
        "flaky",
        1,
        RENEW,
        async {
            let _ = flaky_stopped.await;
        },
    ));
    nodes_up(&client, "sim", 3).await;
    nodes_up(&client, "flaky", 1).await;
    let mut manager = Manager::new(client.clone());
    let settings = Settings {
        node_monitor_grace_period: GRACE,
        ..Settings::default()
    };
    orquestra_controllers::add_selected(
        &mut manager,
        &[
            "scheduler".into(),
            "replicaset".into(),
            "deployment".into(),
            "nodelifecycle".into(),
            "taint-eviction-controller".into(),
        ],
        &settings,
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    // Eight replicas that tolerate an unreachable node for two seconds, spread over four
    // nodes; and a bare pod on the flaky node that tolerates everything forever.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 8,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "containers": [{"name": "app", "image": "busybox"}],
                    "tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                                     "effect": "NoExecute", "tolerationSeconds": TOLERATION_SECONDS}],
                },
            },
        },
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let stubborn: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stubborn"},
        "spec": {"nodeName": "flaky-0", "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "app", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &stubborn)
        .await
        .unwrap();
    wait_for(&deployments, "web", Duration::from_secs(30), |d| {
        d.status.as_ref().and_then(|s| s.available_replicas) == Some(8)
    })
    .await
    .unwrap();
    let on_flaky: Vec<String> = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| node_of(p) == "flaky-0")
        .map(|p| p.name_any())
        .collect();
    assert!(
        !on_flaky.is_empty(),
        "the spread put no pod on the flaky node"
    );

    // The flaky node goes silent.
    let stopped_at = Instant::now();
    stop_flaky.send(()).unwrap();
    let budget = GRACE + Duration::from_secs(TOLERATION_SECONDS) + Duration::from_secs(10);
    let nodes: Api<Node> = Api::all(client.clone());
    loop {
        let node = nodes.get("flaky-0").await.unwrap();
        let all = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items;
        let evicted = all
            .iter()
            .filter(|p| on_flaky.contains(&p.name_any()))
            .all(|p| p.metadata.deletion_timestamp.is_some());
        let elsewhere = all
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && node_of(p) != "flaky-0"
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            })
            .count();
        let tainted = unreachable_taints(&node);
        if ready(&node).as_deref() == Some("Unknown")
            && tainted.len() == 2
            && evicted
            && elsewhere == 8
        {
            break;
        }
        assert!(
            stopped_at.elapsed() < budget,
            "after {:?}: Ready={:?}, taints {tainted:?}, evicted {evicted}, {elsewhere}/8 running elsewhere",
            stopped_at.elapsed(),
            ready(&node)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let moved_in = stopped_at.elapsed();
    assert!(
        moved_in >= GRACE,
        "the node was declared lost before its grace period ({moved_in:?})"
    );
    let stubborn = pods.get("stubborn").await.unwrap();
    assert!(
        stubborn.metadata.deletion_timestamp.is_none(),
        "a pod tolerating the taint forever was evicted"
    );

    // The node comes back: Ready again, untainted; its evicted pods are finally removed.
    tokio::spawn(simulated::run_with(
        client.clone(),
        "flaky",
        1,
        RENEW,
        std::future::pending(),
    ));
    nodes_up(&client, "flaky", 1).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .iter()
            .filter(|p| on_flaky.contains(&p.name_any()))
            .map(|p| p.name_any())
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "evicted pods left: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
