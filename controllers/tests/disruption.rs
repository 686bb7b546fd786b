//! The disruption controller with the scheduler and the ReplicaSet controller against the real
//! API server in-process (its `pods/eviction`) and simulated nodes: PodDisruptionBudget status
//! for an integer and a percentage `minAvailable` and for `maxUnavailable`; an eviction no
//! budget covers goes through; one a budget at its limit protects is refused with a 429 whose
//! cause names the budget; once the evicted pod's replacement is Ready the budget allows an
//! eviction again.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, EvictParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

async fn start() -> (TestApi, Client) {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 2, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(
        &mut manager,
        &["scheduler".into(), "replicaset".into(), "disruption".into()],
        &orquestra_controllers::Settings::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    (api, client)
}

async fn replica_set(client: &Client, replicas: i32) {
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &rs).await.unwrap();
    wait_for(&sets, "web", WAIT, |rs| {
        rs.status.as_ref().and_then(|s| s.ready_replicas) == Some(replicas)
    })
    .await
    .unwrap();
}

async fn budget(client: &Client, name: &str, spec: serde_json::Value) {
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    let mut spec = spec;
    spec["selector"] = json!({"matchLabels": {"app": "web"}});
    let pdb: PodDisruptionBudget =
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap();
    budgets.create(&PostParams::default(), &pdb).await.unwrap();
}

/// (expectedPods, desiredHealthy, currentHealthy, disruptionsAllowed) once processed.
fn counts(pdb: &PodDisruptionBudget) -> Option<(i32, i32, i32, i32)> {
    let s = pdb.status.as_ref()?;
    (s.observed_generation == pdb.metadata.generation).then_some((
        s.expected_pods.unwrap_or(0),
        s.desired_healthy.unwrap_or(0),
        s.current_healthy.unwrap_or(0),
        s.disruptions_allowed.unwrap_or(0),
    ))
}

async fn wait_counts(
    client: &Client,
    name: &str,
    want: (i32, i32, i32, i32),
) -> PodDisruptionBudget {
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + WAIT;
    loop {
        let pdb = budgets.get(name).await.unwrap();
        if counts(&pdb) == Some(want) {
            return pdb;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: want {want:?}, status {:?}",
            pdb.status
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn condition(pdb: &PodDisruptionBudget) -> (String, String) {
    let c = pdb
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "DisruptionAllowed"))
        .unwrap();
    (c.status.clone(), c.reason.clone())
}

async fn ready_pods(client: &Client) -> Vec<String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && orquestra_controllers::objects::ready(p)
        })
        .map(|p| p.name_any())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_status() {
    let (_api, client) = start().await;
    replica_set(&client, 3).await;
    budget(&client, "min-int", json!({"minAvailable": 2})).await;
    budget(&client, "min-pct", json!({"minAvailable": "50%"})).await;
    budget(&client, "max-int", json!({"maxUnavailable": 1})).await;
    budget(&client, "max-pct", json!({"maxUnavailable": "34%"})).await;
    budget(&client, "all", json!({"minAvailable": "100%"})).await;
    // minAvailable 2 of 3 pods; 50% of 3 (the ReplicaSet's scale) rounds up to 2; 3 - 1;
    // 3 - ceil(1.02) = 1; all 3.
    let pdb = wait_counts(&client, "min-int", (3, 2, 3, 1)).await;
    assert_eq!(condition(&pdb), ("True".into(), "SufficientPods".into()));
    wait_counts(&client, "min-pct", (3, 2, 3, 1)).await;
    wait_counts(&client, "max-int", (3, 2, 3, 1)).await;
    wait_counts(&client, "max-pct", (3, 1, 3, 2)).await;
    let pdb = wait_counts(&client, "all", (3, 3, 3, 0)).await;
    assert_eq!(condition(&pdb), ("False".into(), "InsufficientPods".into()));

    // A pod going away is replaced; the budget follows.
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let victim = ready_pods(&client).await.remove(0);
    pods.delete(&victim, &DeleteParams::default())
        .await
        .unwrap();
    orquestra_operator::testing::wait_gone(&pods, &victim, WAIT)
        .await
        .unwrap();
    wait_counts(&client, "min-int", (3, 2, 3, 1)).await;

    // A spec change is observed (observedGeneration follows generation).
    let patched = budgets
        .patch(
            "max-int",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxUnavailable": 0}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.metadata.generation, Some(2));
    wait_counts(&client, "max-int", (3, 3, 3, 0)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evictions_honour_the_budget() {
    let (api, client) = start().await;
    // kube's client retries a 429 on its own (for minutes, by default): evict with one that
    // does not, to see the refusal.
    let mut config = kube::Config::new(format!("http://{}", api.addr()).parse().unwrap());
    config.default_retry = false;
    let pods: Api<Pod> = Api::namespaced(Client::try_from(config).unwrap(), "default");

    // A pod no budget covers is evicted at once.
    let lone: Pod = serde_json::from_value(json!({
        "metadata": {"name": "lone", "labels": {"app": "other"}},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &lone).await.unwrap();
    wait_for(&pods, "lone", WAIT, orquestra_controllers::objects::ready)
        .await
        .unwrap();
    let status = pods.evict("lone", &EvictParams::default()).await.unwrap();
    assert_eq!(status.code, 201, "{status:?}");

    // Three replicas, all three wanted available: the budget is at its limit and the
    // eviction is refused, naming the budget.
    replica_set(&client, 3).await;
    budget(&client, "web-pdb", json!({"minAvailable": 3})).await;
    wait_counts(&client, "web-pdb", (3, 3, 3, 0)).await;
    let mut ready = ready_pods(&client).await;
    let (first, second) = (ready.remove(0), ready.remove(0));
    match pods.evict(&first, &EvictParams::default()).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 429, "{status:?}");
            let causes = status
                .details
                .as_ref()
                .map(|d| d.causes.clone())
                .unwrap_or_default();
            assert!(
                causes.iter().any(|c| c.reason == "DisruptionBudget"
                    && c.message
                        == "The disruption budget web-pdb needs 3 healthy pods and has 3 currently"),
                "{status:?}"
            );
        }
        other => panic!("the eviction went through: {other:?}"),
    }
    assert!(
        pods.get(&first)
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    // At least two: one disruption allowed, which the eviction takes.
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    budgets
        .patch(
            "web-pdb",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"minAvailable": 2}})),
        )
        .await
        .unwrap();
    wait_counts(&client, "web-pdb", (3, 2, 3, 1)).await;
    let status = pods.evict(&first, &EvictParams::default()).await.unwrap();
    assert_eq!(status.code, 201, "{status:?}");
    if let Some(evicted) = pods.get_opt(&first).await.unwrap() {
        let marked = evicted
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "DisruptionTarget"
                        && c.status == "True"
                        && c.reason.as_deref() == Some("EvictionByEvictionAPI")
                })
            });
        assert!(
            marked,
            "an evicted pod is a DisruptionTarget: {:?}",
            evicted.status
        );
    }

    // The replacement is Ready: one disruption allowed again, and the eviction goes through.
    wait_counts(&client, "web-pdb", (3, 2, 3, 1)).await;
    let pdb = budgets.get("web-pdb").await.unwrap();
    assert!(
        pdb.status
            .as_ref()
            .and_then(|s| s.disrupted_pods.as_ref())
            .is_none_or(|m| m.is_empty()),
        "the deleted pod left disruptedPods: {:?}",
        pdb.status
    );
    let status = pods.evict(&second, &EvictParams::default()).await.unwrap();
    assert_eq!(status.code, 201, "{status:?}");
}
