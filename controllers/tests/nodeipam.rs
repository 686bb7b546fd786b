//! Node IPAM against the real API server in-process: nodes get distinct /24s of the cluster
//! CIDR, a restarted controller keeps them and gives a new node the next free one, and an
//! exhausted range leaves a node without a CIDR (with an event) until a node is deleted.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use orquestra_controllers::nodes::nodeipam::{self, Config};
use orquestra_operator::Manager;
use orquestra_operator::testing::TestApi;
use serde_json::json;

async fn node(nodes: &Api<Node>, name: &str) {
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
}

/// Runs node IPAM with `config` until the returned sender is dropped or fired.
async fn start(
    client: &Client,
    config: Config,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut manager = Manager::new(client.clone());
    nodeipam::add_with(&mut manager, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        manager
            .run_on(listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, task)
}

/// Node name → podCIDR (`""` when none), once every node in `names` has one or `timeout`.
async fn cidrs(nodes: &Api<Node>, want: usize) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all: BTreeMap<String, String> = nodes
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|n| {
                let cidr = n.spec.and_then(|s| s.pod_cidr).unwrap_or_default();
                (n.metadata.name.unwrap(), cidr)
            })
            .collect();
        if all.values().filter(|c| !c.is_empty()).count() >= want {
            return all;
        }
        assert!(
            Instant::now() < deadline,
            "want {want} nodes with a pod CIDR, have {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_cidrs_survive_a_restart() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    for name in ["a", "b", "c"] {
        node(&nodes, name).await;
    }
    let (stop, task) = start(&client, Config::default()).await;
    let first = cidrs(&nodes, 3).await;
    let mut values: Vec<&String> = first.values().collect();
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 3, "distinct: {first:?}");
    for cidr in &values {
        assert!(
            cidr.starts_with("10.244.") && cidr.ends_with(".0/24"),
            "{cidr}"
        );
    }
    let a = nodes.get("a").await.unwrap();
    let spec = a.spec.unwrap();
    assert_eq!(spec.pod_cidrs, Some(vec![spec.pod_cidr.clone().unwrap()]));

    // Restart: existing allocations are kept, a new node gets a subnet nobody has.
    let _ = stop.send(());
    task.await.unwrap();
    node(&nodes, "d").await;
    let (_stop, _task) = start(&client, Config::default()).await;
    let second = cidrs(&nodes, 4).await;
    for (name, cidr) in &first {
        assert_eq!(second.get(name), Some(cidr), "{name} kept its CIDR");
    }
    let d = &second["d"];
    assert!(
        !first.values().any(|c| c == d),
        "d got {d}, already taken: {first:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhaustion_leaves_a_node_waiting() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let nodes: Api<Node> = Api::all(client.clone());
    for name in ["a", "b", "c"] {
        node(&nodes, name).await;
    }
    // Two /24s only.
    let (_stop, _task) = start(&client, Config::new("10.9.0.0/23", 24).unwrap()).await;
    let got = cidrs(&nodes, 2).await;
    let waiting: Vec<&String> = got
        .iter()
        .filter(|(_, c)| c.is_empty())
        .map(|(n, _)| n)
        .collect();
    assert_eq!(waiting.len(), 1, "one node left without: {got:?}");
    let waiting = waiting[0].clone();
    // Said so in an event, and nothing is retried in a loop meanwhile.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("CIDRNotAvailable"))
            .count();
        if found == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "want one CIDRNotAvailable event, have {found}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rv = nodes.get(&waiting).await.unwrap().metadata.resource_version;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        nodes.get(&waiting).await.unwrap().metadata.resource_version,
        rv,
        "the waiting node was written to"
    );

    // A deleted node frees its subnet for the waiting one.
    let (freed_node, freed) = got.iter().find(|(_, c)| !c.is_empty()).unwrap();
    nodes
        .delete(freed_node, &DeleteParams::default())
        .await
        .unwrap();
    let after = cidrs(&nodes, 2).await;
    assert_eq!(after.get(&waiting), Some(freed), "{after:?}");
}
