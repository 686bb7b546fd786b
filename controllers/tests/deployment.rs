//! The Deployment controller with the ReplicaSet controller and the scheduler, against the
//! real API server in-process and simulated nodes: a rolling update that a watcher checks
//! never drops below `replicas - maxUnavailable` ready pods, a rollback to the previous
//! template, Recreate, pause/resume, the revision history limit, a progress deadline, and
//! 1,000 replicas spread evenly over 100 nodes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

/// The API server, `nodes` simulated nodes, and the scheduler with the workload
/// controllers.
async fn cluster(nodes: usize) -> (TestApi, Client, prometheus::Registry) {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(
        client.clone(),
        "sim",
        nodes,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(
        &mut manager,
        &[
            "scheduler".into(),
            "replicaset".into(),
            "deployment".into(),
            "garbagecollector".into(),
        ],
        &Default::default(),
    )
    .unwrap();
    let registry = manager.registry().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    (api, client, registry)
}

/// Reconciles of `controller` so far, whatever their result.
fn reconciles(registry: &prometheus::Registry, controller: &str) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "controller_runtime_reconcile_total")
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            m.get_label()
                .iter()
                .any(|l| l.name() == "controller" && l.value() == controller)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

fn deployment(name: &str, replicas: i32, image: &str, strategy: serde_json::Value) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "strategy": strategy,
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": image}]}},
        },
    }))
    .unwrap()
}

/// Waits until the rollout is complete as `kubectl rollout status` judges it.
async fn rolled_out(deployments: &Api<Deployment>, name: &str, timeout: Duration) -> Deployment {
    wait_for(deployments, name, timeout, |d| {
        let replicas = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let Some(status) = d.status.as_ref() else {
            return false;
        };
        status.observed_generation >= d.metadata.generation
            && status.updated_replicas == Some(replicas)
            && status.replicas == Some(replicas)
            && status.available_replicas == Some(replicas)
    })
    .await
    .unwrap()
}

async fn set_image(deployments: &Api<Deployment>, name: &str, image: &str) {
    let patch =
        json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": image}]}}}});
    deployments
        .patch(name, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .unwrap();
}

async fn sets_of(client: &Client, app: &str) -> Vec<ReplicaSet> {
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    sets.list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .unwrap()
        .items
}

fn image_of_pod(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .image
        .clone()
        .unwrap_or_default()
}

fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Watches the pods of `app` and records the fewest ready at any moment once armed, and
/// which images ran side by side.
struct Watcher {
    armed: Arc<AtomicBool>,
    min_ready: Arc<AtomicI64>,
    pods: Arc<std::sync::Mutex<BTreeMap<String, Pod>>>,
    mixed: Arc<AtomicBool>,
}

impl Watcher {
    fn start(client: &Client, app: &str) -> Watcher {
        let w = Watcher {
            armed: Arc::default(),
            min_ready: Arc::new(AtomicI64::new(i64::MAX)),
            pods: Arc::default(),
            mixed: Arc::default(),
        };
        let api: Api<Pod> = Api::namespaced(client.clone(), "default");
        let config = watcher::Config::default().labels(&format!("app={app}"));
        let (armed, min_ready, pods, mixed) = (
            Arc::clone(&w.armed),
            Arc::clone(&w.min_ready),
            Arc::clone(&w.pods),
            Arc::clone(&w.mixed),
        );
        tokio::spawn(async move {
            let mut stream = watcher(api, config).default_backoff().boxed();
            while let Some(event) = stream.next().await {
                let mut pods = pods.lock().unwrap();
                match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => {
                        pods.insert(p.name_any(), p);
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        pods.remove(&p.name_any());
                    }
                    _ => continue,
                }
                let ready = pods.values().filter(|p| ready(p)).count() as i64;
                let images: std::collections::BTreeSet<String> = pods
                    .values()
                    .filter(|p| {
                        p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    })
                    .map(image_of_pod)
                    .collect();
                if armed.load(Ordering::SeqCst) {
                    min_ready.fetch_min(ready, Ordering::SeqCst);
                    if images.len() > 1 {
                        mixed.store(true, Ordering::SeqCst);
                    }
                }
            }
        });
        w
    }

    fn ready_now(&self) -> i64 {
        self.pods
            .lock()
            .unwrap()
            .values()
            .filter(|p| ready(p))
            .count() as i64
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_update_keeps_availability_and_rolls_back() {
    let (_api, client, _registry) = cluster(4).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let strategy = json!({"type": "RollingUpdate",
                          "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}});
    deployments
        .create(
            &PostParams::default(),
            &deployment("web", 10, "busybox:1", strategy),
        )
        .await
        .unwrap();
    let d = rolled_out(&deployments, "web", Duration::from_secs(60)).await;
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("1")
    );
    let conditions = d.status.unwrap().conditions.unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
    );
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Progressing"
                && c.reason.as_deref() == Some("NewReplicaSetAvailable"))
    );

    let watcher = Watcher::start(&client, "web");
    let deadline = Instant::now() + Duration::from_secs(20);
    while watcher.ready_now() < 10 {
        assert!(
            Instant::now() < deadline,
            "the watcher never saw 10 ready pods"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.armed.store(true, Ordering::SeqCst);
    set_image(&deployments, "web", "busybox:2").await;
    let d = rolled_out(&deployments, "web", Duration::from_secs(60)).await;
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("2")
    );
    let min = watcher.min_ready.load(Ordering::SeqCst);
    assert!(
        min >= 8,
        "ready pods dropped to {min} during the rollout (floor 10 - 2)"
    );
    assert!(
        watcher.mixed.load(Ordering::SeqCst),
        "a rolling update runs both templates for a while"
    );

    // Two ReplicaSets: the new one with every pod, the old one at zero, both revisions kept.
    let sets = sets_of(&client, "web").await;
    assert_eq!(sets.len(), 2);
    let by_revision: BTreeMap<String, i32> = sets
        .iter()
        .map(|rs| {
            (
                rs.annotations()["deployment.kubernetes.io/revision"].clone(),
                rs.spec.as_ref().unwrap().replicas.unwrap(),
            )
        })
        .collect();
    assert_eq!(
        by_revision,
        BTreeMap::from([("1".into(), 0), ("2".into(), 10)])
    );
    for rs in &sets {
        let hash = &rs.labels()["pod-template-hash"];
        assert_eq!(rs.name_any(), format!("web-{hash}"));
    }

    // Rollback as `kubectl rollout undo` does it: revision 1's template back in the
    // Deployment. Its ReplicaSet becomes the new one, as revision 3.
    let old = sets
        .iter()
        .find(|rs| rs.annotations()["deployment.kubernetes.io/revision"] == "1")
        .unwrap();
    let mut template = old.spec.as_ref().unwrap().template.clone().unwrap();
    template
        .metadata
        .as_mut()
        .unwrap()
        .labels
        .as_mut()
        .unwrap()
        .remove("pod-template-hash");
    let patch = json!([{"op": "replace", "path": "/spec/template", "value": template}]);
    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Json::<()>(serde_json::from_value(patch).unwrap()),
        )
        .await
        .unwrap();
    let d = rolled_out(&deployments, "web", Duration::from_secs(60)).await;
    assert_eq!(
        d.annotations()
            .get("deployment.kubernetes.io/revision")
            .map(String::as_str),
        Some("3")
    );
    let sets = sets_of(&client, "web").await;
    assert_eq!(sets.len(), 2, "the rollback reuses the old ReplicaSet");
    let revived = sets.iter().find(|rs| rs.uid() == old.uid()).unwrap();
    assert_eq!(
        revived.annotations()["deployment.kubernetes.io/revision"],
        "3"
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let images: Vec<String> = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(image_of_pod)
        .collect();
    assert_eq!(images.len(), 10);
    assert!(images.iter().all(|i| i == "busybox:1"), "{images:?}");

    // Deleting the Deployment (in the background, as kubectl does) removes every
    // ReplicaSet and Pod through the garbage collector.
    deployments
        .delete("web", &kube::api::DeleteParams::background())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sets = sets_of(&client, "web").await.len();
        let left = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .len();
        if sets == 0 && left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{sets} ReplicaSets and {left} pods left after deleting the Deployment"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recreate_pause_history_and_deadline() {
    let (_api, client, registry) = cluster(2).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");

    // Recreate: the old pods are all gone before a new one runs.
    let mut d = deployment("db", 3, "busybox:1", json!({"type": "Recreate"}));
    d.spec.as_mut().unwrap().revision_history_limit = Some(1);
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    rolled_out(&deployments, "db", Duration::from_secs(60)).await;
    let watcher = Watcher::start(&client, "db");
    let deadline = Instant::now() + Duration::from_secs(20);
    while watcher.ready_now() < 3 {
        assert!(
            Instant::now() < deadline,
            "the watcher never saw 3 ready pods"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.armed.store(true, Ordering::SeqCst);
    set_image(&deployments, "db", "busybox:2").await;
    rolled_out(&deployments, "db", Duration::from_secs(60)).await;
    assert!(
        !watcher.mixed.load(Ordering::SeqCst),
        "Recreate ran both templates at once"
    );
    assert_eq!(watcher.min_ready.load(Ordering::SeqCst), 0);

    // History limit 1: after a third template only the current and one old ReplicaSet stay.
    set_image(&deployments, "db", "busybox:3").await;
    rolled_out(&deployments, "db", Duration::from_secs(60)).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sets = sets_of(&client, "db").await;
        let mut revisions: Vec<String> = sets
            .iter()
            .map(|rs| rs.annotations()["deployment.kubernetes.io/revision"].clone())
            .collect();
        revisions.sort();
        if revisions == ["2", "3"] {
            break;
        }
        assert!(Instant::now() < deadline, "revisions kept: {revisions:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Paused: a new template makes no ReplicaSet until resumed.
    deployments
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": true}})),
        )
        .await
        .unwrap();
    set_image(&deployments, "db", "busybox:4").await;
    wait_for(&deployments, "db", Duration::from_secs(20), |d| {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "Progressing" && c.reason.as_deref() == Some("DeploymentPaused")
                })
            })
            && d.status.as_ref().and_then(|s| s.observed_generation) == d.metadata.generation
    })
    .await
    .unwrap();
    assert_eq!(
        sets_of(&client, "db").await.len(),
        2,
        "paused, yet a ReplicaSet was made"
    );
    deployments
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"paused": false}})),
        )
        .await
        .unwrap();
    let d = rolled_out(&deployments, "db", Duration::from_secs(60)).await;
    assert_eq!(d.annotations()["deployment.kubernetes.io/revision"], "4");

    // Pods that can never be placed: the rollout times out after progressDeadlineSeconds.
    let mut stuck = deployment("stuck", 2, "busybox:1", json!({"type": "RollingUpdate"}));
    let spec = stuck.spec.as_mut().unwrap();
    spec.progress_deadline_seconds = Some(2);
    spec.template.spec.as_mut().unwrap().node_selector =
        Some(BTreeMap::from([("disk".into(), "none-has-it".into())]));
    deployments
        .create(&PostParams::default(), &stuck)
        .await
        .unwrap();
    let d = wait_for(&deployments, "stuck", Duration::from_secs(30), |d| {
        d.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| {
                cs.iter().any(|c| {
                    c.type_ == "Progressing"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
                })
            })
    })
    .await
    .unwrap();
    let status = d.status.unwrap();
    assert_eq!(status.available_replicas, Some(0));
    assert_eq!(status.unavailable_replicas, Some(2));

    // Settled — one Deployment complete, one past its deadline with pods that fit nowhere:
    // the loops go quiet instead of reconciling in circles.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = reconciles(&registry, "deployment") + reconciles(&registry, "replicaset");
    assert!(
        before > 0,
        "the reconcile counter is not where this test reads it"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = reconciles(&registry, "deployment") + reconciles(&registry, "replicaset");
    assert!(
        after - before <= 4,
        "{} reconciles in 3 s with nothing changing",
        after - before
    );
}

/// Must show: 1,000 replicas on 100 simulated nodes converge, spread evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_replicas_spread_over_a_hundred_nodes() {
    let (_api, client, _registry) = cluster(100).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &deployment("big", 1000, "busybox:1", json!({"type": "RollingUpdate"})),
        )
        .await
        .unwrap();
    rolled_out(&deployments, "big", Duration::from_secs(240)).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for pod in pods
        .list(&ListParams::default().labels("app=big"))
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| ready(p))
    {
        *per_node
            .entry(pod.spec.as_ref().unwrap().node_name.clone().unwrap())
            .or_default() += 1;
    }
    assert_eq!(per_node.values().sum::<usize>(), 1000);
    assert_eq!(per_node.len(), 100, "every node got pods");
    let (min, max) = (
        per_node.values().min().unwrap(),
        per_node.values().max().unwrap(),
    );
    assert!(max - min <= 2, "uneven spread: {min}..{max} pods per node");
}

/// The ReplicaSets of the Deployment `name`, by revision: `(revision, spec.replicas)`.
async fn set_sizes(client: &Client) -> BTreeMap<String, i32> {
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    sets.list(&ListParams::default().labels("app=prop"))
        .await
        .unwrap()
        .items
        .iter()
        .map(|rs| {
            (
                rs.annotations()
                    .get("deployment.kubernetes.io/revision")
                    .cloned()
                    .unwrap_or_default(),
                rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resize_mid_rollout_is_proportional() {
    let (_api, client, _registry) = cluster(3).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "prop"},
        "spec": {"replicas": 10, "selector": {"matchLabels": {"app": "prop"}},
                 "strategy": {"rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}},
                 "template": {"metadata": {"labels": {"app": "prop"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}},
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    wait_for(&deployments, "prop", Duration::from_secs(30), |d| {
        d.status.as_ref().and_then(|s| s.available_replicas) == Some(10)
    })
    .await
    .unwrap();
    // A template whose pods can never be placed: the rollout stalls at 8 old + 5 new.
    deployments
        .patch(
            "prop",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"template": {"spec": {"nodeSelector": {"nowhere": "true"}}}}}),
            ),
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stalled = BTreeMap::from([("1".to_string(), 8), ("2".to_string(), 5)]);
    while set_sizes(&client).await != stalled {
        assert!(Instant::now() < deadline, "{:?}", set_sizes(&client).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Resized to 30 mid-rollout: 8 + 20·8/13 = 20 and 5 + 20·5/13 = 13, as kube does.
    deployments
        .patch(
            "prop",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 30}})),
        )
        .await
        .unwrap();
    let resized = BTreeMap::from([("1".to_string(), 20), ("2".to_string(), 13)]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while set_sizes(&client).await != resized {
        assert!(Instant::now() < deadline, "{:?}", set_sizes(&client).await);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
