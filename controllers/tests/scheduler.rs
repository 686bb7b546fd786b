//! The scheduler against the real API server in-process and simulated nodes: pods spread
//! evenly, requests are respected, taints and selectors filter, and a pod that fits nowhere
//! gets a FailedScheduling event and is placed once a node frees up.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

fn pod(name: &str, extra: serde_json::Value) -> Pod {
    let mut pod = json!({
        "metadata": {"name": name, "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "name": "rs", "uid": "rs-uid", "controller": true}]},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    });
    if let Some(obj) = extra.as_object() {
        for (k, v) in obj {
            pod["spec"][k] = v.clone();
        }
    }
    serde_json::from_value(pod).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_spread_fit_and_wait_for_room() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 4, Duration::from_secs(20))
        .await
        .unwrap();
    let nodes: Api<Node> = Api::all(client.clone());
    // sim-3 is cordoned: nothing lands there.
    nodes
        .patch(
            "sim-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .unwrap();

    let mut manager = Manager::new(client.clone());
    orquestra_controllers::scheduler::add(&mut manager).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    for i in 0..30 {
        pods.create(&PostParams::default(), &pod(&format!("p{i}"), json!({})))
            .await
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let placement = loop {
        let list = pods.list(&ListParams::default()).await.unwrap();
        let bound: Vec<String> = list
            .items
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        if bound.len() == 30 {
            let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
            for node in bound {
                *per_node.entry(node).or_default() += 1;
            }
            break per_node;
        }
        assert!(
            Instant::now() < deadline,
            "only {} of 30 bound",
            bound.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!placement.contains_key("sim-3"), "cordoned: {placement:?}");
    let (min, max) = (
        placement.values().min().copied().unwrap(),
        placement.values().max().copied().unwrap(),
    );
    assert_eq!(placement.len(), 3, "{placement:?}");
    assert!(max - min <= 1, "spread evenly: {placement:?}");

    // A pod asking for more CPU than any node has: FailedScheduling, with the reasons.
    let greedy = pod(
        "greedy",
        json!({"containers": [{"name": "app", "image": "busybox",
            "resources": {"requests": {"cpu": "100000"}}}]}),
    );
    pods.create(&PostParams::default(), &greedy).await.unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        let found = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.reason.as_deref() == Some("FailedScheduling")
                    && e.involved_object.name.as_deref() == Some("greedy")
            });
        if let Some(e) = found {
            break e.message.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "no FailedScheduling event");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(message.starts_with("0/4 nodes are available:"), "{message}");
    assert!(message.contains("3 Insufficient cpu"), "{message}");
    assert!(
        message.contains("1 node(s) were unschedulable"),
        "{message}"
    );

    // A node selector only sim-3 matches, then sim-3 uncordoned: the pod lands there.
    nodes
        .patch(
            "sim-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"disk": "ssd"}}})),
        )
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("picky", json!({"nodeSelector": {"disk": "ssd"}})),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        pods.get("picky")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .is_none()
    );
    nodes
        .patch(
            "sim-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": false}})),
        )
        .await
        .unwrap();
    let picky = wait_for(&pods, "picky", Duration::from_secs(20), |p| {
        p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("sim-3")
    })
    .await
    .unwrap();
    assert_eq!(picky.spec.unwrap().node_name.as_deref(), Some("sim-3"));
}
