//! The ReplicaSet controller with the scheduler against the real API server in-process and
//! simulated nodes: pods created to the count and Ready, a deleted pod replaced, scaling
//! down deletes the surplus, a matching orphan is adopted, a pod that stops matching is
//! released.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

async fn active_pods(pods: &Api<Pod>) -> Vec<Pod> {
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect()
}

async fn wait_count(pods: &Api<Pod>, n: usize) -> Vec<Pod> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = active_pods(pods).await;
        let running = active
            .iter()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
            .count();
        if active.len() == n && running == n {
            return active;
        }
        assert!(
            Instant::now() < deadline,
            "want {n} running pods, have {} ({running} running)",
            active.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_are_kept() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 3, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::scheduler::add(&mut manager).unwrap();
    orquestra_controllers::workloads::replicaset::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 5, "selector": {"matchLabels": {"app": "web"}},
                 // A template's name is not the pods' (kube ignores it; the conformance
                 // suite's ReplicationController sets one).
                 "template": {"metadata": {"name": "web", "labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &rs).await.unwrap();
    let running = wait_count(&pods, 5).await;
    assert!(
        running
            .iter()
            .all(|p| p.metadata.name.as_deref().unwrap().starts_with("web-"))
    );
    wait_for(&sets, "web", Duration::from_secs(20), |rs| {
        rs.status.as_ref().and_then(|s| s.ready_replicas) == Some(5)
    })
    .await
    .unwrap();

    // A deleted pod is replaced.
    let victim = running[0].metadata.name.clone().unwrap();
    pods.delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    let replaced = wait_count(&pods, 5).await;
    assert!(
        replaced
            .iter()
            .all(|p| p.metadata.name.as_deref() != Some(&victim))
    );

    // Scale down: the surplus goes.
    sets.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    wait_count(&pods, 2).await;

    // A matching orphan is adopted — and, being one too many, removed again.
    let orphan: Pod = serde_json::from_value(json!({
        "metadata": {"name": "stray", "labels": {"app": "web"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &orphan).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let active = active_pods(&pods).await;
        let owned = active.iter().all(|p| {
            p.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.controller == Some(true) && o.name == "web")
        });
        if active.len() == 2 && owned {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "orphan not adopted: {} pods",
            active.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A pod whose labels stop matching is released (no owner reference left) and replaced.
    let leaving = active_pods(&pods).await[0].metadata.name.clone().unwrap();
    pods.patch(
        &leaving,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": "elsewhere"}}})),
    )
    .await
    .unwrap();
    wait_for(&pods, &leaving, Duration::from_secs(30), |p| {
        p.metadata
            .owner_references
            .as_ref()
            .is_none_or(|o| o.is_empty())
    })
    .await
    .unwrap();
    wait_count(&pods, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exceeded_quota_shows_as_replica_failure() {
    use k8s_openapi::api::core::v1::{ReplicationController, ResourceQuota};
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::workloads::replicaset::add_replication_controllers(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let quotas: Api<ResourceQuota> = Api::namespaced(client.clone(), "default");
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "two"}, "spec": {"hard": {"pods": "2"}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    // The quota's usage is counted before pods are refused.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rcs: Api<ReplicationController> = Api::namespaced(client.clone(), "default");
    rcs.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "condition-test"},
            "spec": {"replicas": 3, "selector": {"name": "condition-test"},
                     "template": {"metadata": {"labels": {"name": "condition-test"}},
                                  "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    let failing = |rc: &ReplicationController| {
        rc.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "ReplicaFailure" && c.reason.as_deref() == Some("FailedCreate")
                })
            })
    };
    wait_for(&rcs, "condition-test", Duration::from_secs(30), failing)
        .await
        .unwrap();
    // Scaled within the quota: the condition goes.
    rcs.patch(
        "condition-test",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 2}})),
    )
    .await
    .unwrap();
    wait_for(&rcs, "condition-test", Duration::from_secs(60), |rc| {
        !failing(rc)
    })
    .await
    .unwrap();
}
