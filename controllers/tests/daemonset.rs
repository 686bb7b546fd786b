//! The DaemonSet controller with the scheduler against the real API server in-process and
//! simulated nodes: pods only on the nodes that match the nodeSelector and whose taints are
//! tolerated, a new node gets its pod, a node that stops matching loses it, a template
//! change rolls the pods with at most maxUnavailable nodes unavailable, and the status
//! counts are right.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

/// Node → the template hashes of the running, ready, not terminating daemon pods there;
/// and the number of daemon pods of any state.
async fn placement(pods: &Api<Pod>) -> (BTreeMap<String, Vec<String>>, usize) {
    let all = pods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items;
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in &all {
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let node = p.spec.as_ref().and_then(|s| s.node_name.clone());
        if let (true, None, Some(node)) = (ready, &p.metadata.deletion_timestamp, node) {
            let hash = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("controller-revision-hash"))
                .cloned()
                .unwrap_or_default();
            out.entry(node).or_default().push(hash);
        }
    }
    (out, all.len())
}

/// Waits until exactly `nodes` each run one ready daemon pod, and there are no others.
async fn wait_on(pods: &Api<Pod>, nodes: &[&str], what: &str) -> BTreeMap<String, Vec<String>> {
    let want: BTreeSet<String> = nodes.iter().map(|n| n.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (on, total) = placement(pods).await;
        let placed: BTreeSet<String> = on.keys().cloned().collect();
        if placed == want && on.values().all(|v| v.len() == 1) && total == want.len() {
            return on;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: want one ready pod on each of {want:?} only, have {on:?} ({total} pods)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn patch_node(client: &Client, name: &str, patch: serde_json::Value) {
    let nodes: Api<Node> = Api::all(client.clone());
    nodes
        .patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// A merge patch of the DaemonSet, retried on 409: the API server answers a PATCH that
/// races another write (the controller's status) with a Conflict instead of retrying it
/// itself as kube-apiserver does.
async fn patch_set(sets: &Api<DaemonSet>, patch: serde_json::Value) {
    for _ in 0..20 {
        match sets
            .patch("agent", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("patching the DaemonSet: {e}"),
        }
    }
    panic!("patching the DaemonSet: still conflicting after 20 tries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pod_per_eligible_node() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 4, Duration::from_secs(20))
        .await
        .unwrap();
    // sim-0, sim-1: eligible; sim-2: matching but tainted; sim-3: not matching.
    for n in ["sim-0", "sim-1", "sim-2"] {
        patch_node(
            &client,
            n,
            json!({"metadata": {"labels": {"role": "edge"}}}),
        )
        .await;
    }
    patch_node(
        &client,
        "sim-2",
        json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
    )
    .await;
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
                 "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                 "template": {"metadata": {"labels": {"app": "agent"}},
                              "spec": {"nodeSelector": {"role": "edge"},
                                       "containers": [{"name": "agent", "image": "busybox"}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &ds).await.unwrap();
    let first = wait_on(&pods, &["sim-0", "sim-1"], "initial placement").await;

    // The pods: pinned by matchFields, with kube's default tolerations and labels.
    let pod = pods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items
        .remove(0);
    let spec = pod.spec.clone().unwrap();
    let term = &spec
        .affinity
        .unwrap()
        .node_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap()
        .node_selector_terms[0];
    let field = &term.match_fields.as_ref().unwrap()[0];
    assert_eq!(field.key, "metadata.name");
    assert_eq!(
        field.values.as_ref().unwrap(),
        &vec![spec.node_name.clone().unwrap()]
    );
    let tolerated: BTreeSet<String> = spec
        .tolerations
        .unwrap()
        .into_iter()
        .filter_map(|t| t.key)
        .collect();
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/unschedulable",
    ] {
        assert!(
            tolerated.contains(key),
            "{key} not tolerated: {tolerated:?}"
        );
    }
    let labels = pod.metadata.labels.unwrap();
    assert_eq!(
        labels.get("pod-template-generation").map(String::as_str),
        Some("1")
    );
    let hash = labels.get("controller-revision-hash").unwrap().clone();
    let revisions: Api<ControllerRevision> = Api::namespaced(client.clone(), "default");
    let revision = revisions.get(&format!("agent-{hash}")).await.unwrap();
    assert_eq!(revision.revision, 1);
    assert!(
        revision
            .data
            .as_ref()
            .is_some_and(|d| d.0["spec"]["template"]["spec"]["containers"][0]["name"] == "agent"),
        "the revision records the template: {:?}",
        revision.data
    );
    // As Go marshals it (kube's `daemon.Match` compares bytes): sorted keys, the patch
    // marker first, no null creationTimestamp (Go's omitzero).
    let data = revision.data.as_ref().unwrap().0.to_string();
    assert!(
        data.starts_with(r#"{"spec":{"template":{"$patch":"replace","metadata":{"labels":"#),
        "{data}"
    );
    assert!(first.values().all(|h| h == &vec![hash.clone()]));

    // Status counts.
    let status = |s: &DaemonSet| {
        let s = s.status.clone().unwrap_or_default();
        (
            s.desired_number_scheduled,
            s.current_number_scheduled,
            s.number_ready,
            s.number_available.unwrap_or(0),
            s.updated_number_scheduled.unwrap_or(0),
            s.number_misscheduled,
        )
    };
    wait_for(&sets, "agent", Duration::from_secs(20), |s| {
        status(s) == (2, 2, 2, 2, 2, 0)
            && s.status.as_ref().and_then(|s| s.observed_generation) == s.metadata.generation
    })
    .await
    .unwrap_or_else(|e| panic!("status: {e}"));

    // A new node gets its pod; a node that stops matching loses it.
    orquestra_node_agent::simulated::spawn_ready(
        client.clone(),
        "extra",
        1,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    patch_node(
        &client,
        "extra-0",
        json!({"metadata": {"labels": {"role": "edge"}}}),
    )
    .await;
    wait_on(&pods, &["sim-0", "sim-1", "extra-0"], "a new node").await;
    patch_node(
        &client,
        "sim-0",
        json!({"metadata": {"labels": {"role": "core"}}}),
    )
    .await;
    wait_on(&pods, &["sim-1", "extra-0"], "a node no longer matching").await;
    patch_node(
        &client,
        "sim-0",
        json!({"metadata": {"labels": {"role": "edge"}}}),
    )
    .await;
    wait_on(&pods, &["sim-0", "sim-1", "extra-0"], "matching again").await;

    // A template change rolls the pods, never more than one node without a ready pod.
    patch_set(
        &sets,
        json!({"spec": {"template": {"metadata": {"annotations": {"v": "2"}}}}}),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut worst = 3;
    loop {
        let (on, _) = placement(&pods).await;
        let available = ["sim-0", "sim-1", "extra-0"]
            .iter()
            .filter(|n| on.contains_key(**n))
            .count();
        worst = worst.min(available);
        assert!(
            available >= 2,
            "more than maxUnavailable=1 nodes without a ready pod during the rollout: {on:?}"
        );
        let done = on.len() == 3 && on.values().all(|h| h.len() == 1 && h[0] != hash);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "rollout did not finish: {on:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(worst, 2, "the rollout replaced pods one at a time");
    let done = wait_for(&sets, "agent", Duration::from_secs(20), |s| {
        status(s) == (3, 3, 3, 3, 3, 0)
            && s.status.as_ref().and_then(|s| s.observed_generation) == s.metadata.generation
    })
    .await
    .unwrap_or_else(|e| panic!("status after the rollout: {e}"));
    assert_eq!(done.metadata.generation, Some(2));
    let listed = revisions.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(listed.len(), 2, "one revision per template");
    let pod = pods
        .list(&ListParams::default().labels("app=agent"))
        .await
        .unwrap()
        .items
        .remove(0);
    let labels = pod.metadata.labels.unwrap();
    let new_hash = labels.get("controller-revision-hash").unwrap().clone();
    assert_eq!(
        labels.get("pod-template-generation").map(String::as_str),
        Some("2")
    );

    // revisionHistoryLimit 0: the unused old revision goes, the current one stays.
    patch_set(&sets, json!({"spec": {"revisionHistoryLimit": 0}})).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names: Vec<String> = revisions
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .filter_map(|r| r.metadata.name)
            .collect();
        if names == vec![format!("agent-{new_hash}")] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "old revisions not pruned: {names:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // OnDelete: a template change replaces nothing until a pod is deleted.
    patch_set(
        &sets,
        json!({"spec": {"updateStrategy": {"type": "OnDelete", "rollingUpdate": null},
            "template": {"metadata": {"annotations": {"v": "3"}}}}}),
    )
    .await;
    wait_for(&sets, "agent", Duration::from_secs(20), |s| {
        s.status.as_ref().and_then(|s| s.observed_generation) == s.metadata.generation
            && s.status.as_ref().and_then(|s| s.updated_number_scheduled) == Some(0)
    })
    .await
    .unwrap_or_else(|e| panic!("status after an OnDelete template change: {e}"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let on = wait_on(&pods, &["sim-0", "sim-1", "extra-0"], "OnDelete keeps pods").await;
    assert!(
        on.values().all(|h| h == &vec![new_hash.clone()]),
        "OnDelete replaced pods by itself: {on:?}"
    );
    let victim = pods
        .list(
            &ListParams::default()
                .fields("spec.nodeName=sim-1")
                .labels("app=agent"),
        )
        .await
        .unwrap()
        .items
        .remove(0);
    pods.delete(
        victim.metadata.name.as_deref().unwrap(),
        &Default::default(),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (on, total) = placement(&pods).await;
        let replaced = on
            .get("sim-1")
            .is_some_and(|h| h.len() == 1 && h[0] != new_hash);
        let others_kept = ["sim-0", "extra-0"]
            .iter()
            .all(|n| on.get(*n) == Some(&vec![new_hash.clone()]));
        if replaced && others_kept && total == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "OnDelete: want only sim-1's pod replaced, have {on:?} ({total} pods)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
