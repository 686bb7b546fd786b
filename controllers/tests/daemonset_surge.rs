//! A DaemonSet rolling update with `maxSurge` (and `maxUnavailable: 0`), against the real
//! API server in-process and simulated nodes: the new pod starts beside the old one before
//! the old one goes, so no node is ever without a ready daemon pod, and at most `maxSurge`
//! nodes run two at once.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use orquestra_operator::Manager;
use orquestra_operator::testing::TestApi;
use serde_json::json;

/// Node → (ready pods, pods), both not terminating, of the DaemonSet, and their hashes.
async fn census(pods: &Api<Pod>) -> BTreeMap<String, (usize, usize, Vec<String>)> {
    let mut out: BTreeMap<String, (usize, usize, Vec<String>)> = BTreeMap::new();
    for p in pods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items
    {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            && p.metadata.deletion_timestamp.is_none();
        let entry = out.entry(node).or_default();
        entry.0 += usize::from(ready);
        // An old pod on its way out no longer counts as surging.
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        entry.1 += 1;
        let hash = p
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("controller-revision-hash"));
        entry.2.push(hash.cloned().unwrap_or_default());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn surge_starts_the_new_pod_first() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 3, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::scheduler::add(&mut manager).unwrap();
    orquestra_controllers::workloads::daemonset::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let sets: Api<DaemonSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "agent"},
        "spec": {"selector": {"matchLabels": {"app": "agent"}},
                 "updateStrategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
                 "template": {"metadata": {"labels": {"app": "agent"}},
                              "spec": {"containers": [{"name": "agent", "image": "busybox"}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &ds).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        let c = census(&pods).await;
        if c.len() == 3 && c.values().all(|(ready, all, _)| *ready == 1 && *all == 1) {
            break c;
        }
        assert!(Instant::now() < deadline, "initial placement: {c:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let old_hash = first.values().next().unwrap().2[0].clone();

    for _ in 0..20 {
        let patch = json!({"spec": {"template": {"spec": {"containers": [
            {"name": "agent", "image": "busybox:2"}]}}}});
        match sets
            .patch("agent", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut max_doubled = 0;
    loop {
        let c = census(&pods).await;
        for (node, (ready, _, _)) in &c {
            assert!(*ready >= 1, "{node} without a ready daemon pod: {c:?}");
        }
        let doubled = c.values().filter(|(_, all, _)| *all > 1).count();
        max_doubled = max_doubled.max(doubled);
        assert!(doubled <= 1, "more than maxSurge nodes surging: {c:?}");
        if c.len() == 3
            && c.values()
                .all(|(ready, all, hashes)| *ready == 1 && *all == 1 && hashes[0] != old_hash)
        {
            break;
        }
        assert!(Instant::now() < deadline, "rollout: {c:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(max_doubled <= 1);
}
