//! The StatefulSet controller with the scheduler, the PersistentVolume binder and the
//! local-path provisioner against the real API server in-process and simulated nodes: pods
//! created one at a time in ordinal order with their identity and claims, scale-up halted
//! while a pod is unready, scale-down from the highest ordinal with the claims kept; a
//! rolling update honouring the partition, a deleted pod restored at its revision, and a
//! rollback reusing the earlier revision; a claim whose StorageClass does not exist
//! holding its pod back with an event naming the claim; the retention policy's claims
//! deleted with their scaled-away pod and with the set; and `Parallel` scaling past
//! unready pods.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{ControllerRevision, StatefulSet};
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use orquestra_controllers::storage::{localpath, persistentvolume};
use orquestra_controllers::workloads::statefulset;
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::{Value, json};

/// An API server, two simulated nodes, and the controllers a StatefulSet needs.
async fn cluster() -> (TestApi, Client) {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 2, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::scheduler::add(&mut manager).unwrap();
    persistentvolume::add(&mut manager);
    localpath::add(&mut manager);
    statefulset::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    (api, client)
}

fn web(replicas: i32, extra: Value) -> StatefulSet {
    let mut set = json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": replicas, "serviceName": "web",
                 "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}},
                 "volumeClaimTemplates": [{"metadata": {"name": "data"},
                     "spec": {"accessModes": ["ReadWriteOnce"],
                              "resources": {"requests": {"storage": "1Gi"}}}}]},
    });
    if let (Some(spec), Some(extra)) = (set["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(set).unwrap()
}

/// Pod names in the order something happened to them.
type Log = Arc<Mutex<Vec<String>>>;

/// Records the order pods of the set first appear and disappear in.
fn record(client: &Client) -> (Log, Log) {
    let added = Arc::new(Mutex::new(Vec::new()));
    let deleted = Arc::new(Mutex::new(Vec::new()));
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let (a, d) = (Arc::clone(&added), Arc::clone(&deleted));
    tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default().labels("app=web")).boxed();
        while let Some(Ok(event)) = stream.next().await {
            match event {
                watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                    let mut a = a.lock().unwrap();
                    if !a.contains(&p.name_any()) {
                        a.push(p.name_any());
                    }
                }
                watcher::Event::Delete(p) => d.lock().unwrap().push(p.name_any()),
                _ => {}
            }
        }
    });
    (added, deleted)
}

/// The names of the set's pods that are Running, Ready and not terminating, and the number
/// of its pods in any state.
async fn ready_pods(pods: &Api<Pod>) -> (Vec<String>, usize) {
    let all = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    let mut ready: Vec<String> = all
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && p.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .map(|p| p.name_any())
        .collect();
    ready.sort();
    (ready, all.len())
}

/// Waits until exactly the pods `names` exist, each Running and Ready.
async fn wait_ready(pods: &Api<Pod>, names: &[&str], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ready, total) = ready_pods(pods).await;
        if ready == names && total == names.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: want {names:?} ready, have {ready:?} ready of {total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sets the Ready condition of a pod, as a failing or passing readiness probe would.
async fn set_ready(pods: &Api<Pod>, name: &str, ready: bool) {
    let pod = pods.get(name).await.unwrap();
    let mut conditions = pod.status.unwrap().conditions.unwrap();
    for c in conditions
        .iter_mut()
        .filter(|c| c.type_ == "Ready" || c.type_ == "ContainersReady")
    {
        c.status = if ready { "True" } else { "False" }.into();
    }
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await
    .unwrap();
}

/// A merge patch of the set, retried on 409 (the controller's status writes race it).
async fn patch_set(sets: &Api<StatefulSet>, patch: Value) {
    for _ in 0..40 {
        match sets
            .patch("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 409 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("patching the StatefulSet: {e}"),
        }
    }
    panic!("patching the StatefulSet: still conflicting");
}

fn revision_of(pod: &Pod) -> String {
    pod.labels()
        .get(statefulset::REVISION_HASH)
        .cloned()
        .unwrap_or_default()
}

/// Each pod's revision label, by ordinal.
async fn pod_revisions(pods: &Api<Pod>, replicas: usize) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..replicas {
        out.push(revision_of(&pods.get(&format!("web-{i}")).await.unwrap()));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_scaling_with_identity_and_claims() {
    let (_api, client) = cluster().await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let (added, deleted) = record(&client);

    sets.create(&PostParams::default(), &web(3, json!({})))
        .await
        .unwrap();
    wait_ready(&pods, &["web-0", "web-1", "web-2"], "initial scale-up").await;
    assert_eq!(*added.lock().unwrap(), ["web-0", "web-1", "web-2"]);

    // Identity: hostname, subdomain, labels, owner, and its own bound claim.
    let pod = pods.get("web-1").await.unwrap();
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.hostname.as_deref(), Some("web-1"));
    assert_eq!(spec.subdomain.as_deref(), Some("web"));
    let labels = pod.labels();
    assert_eq!(labels[statefulset::POD_NAME], "web-1");
    assert_eq!(labels[statefulset::POD_INDEX], "1");
    let volume = &spec.volumes.unwrap()[0];
    assert_eq!(volume.name, "data");
    assert_eq!(
        volume.persistent_volume_claim.as_ref().unwrap().claim_name,
        "data-web-1"
    );
    let owner = &pod.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.controller),
        ("StatefulSet", Some(true))
    );
    let claim = wait_for(&claims, "data-web-1", Duration::from_secs(20), |c| {
        c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
    })
    .await
    .unwrap();
    assert_eq!(claim.labels()["app"], "web");

    let set = wait_for(&sets, "web", Duration::from_secs(20), |s| {
        let st = s.status.clone().unwrap_or_default();
        st.replicas == 3
            && st.ready_replicas == Some(3)
            && st.available_replicas == Some(3)
            && st.current_replicas == Some(3)
            && st.updated_replicas == Some(3)
            && st.observed_generation == s.metadata.generation
    })
    .await
    .unwrap();
    let status = set.status.unwrap();
    let revision = status.update_revision.clone().unwrap();
    assert_eq!(status.current_revision.as_deref(), Some(revision.as_str()));
    assert_eq!(revision_of(&pod), revision);

    // Scale-up halts while a pod is unready, and resumes in order.
    set_ready(&pods, "web-2", false).await;
    patch_set(&sets, json!({"spec": {"replicas": 5}})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        pods.list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .len(),
        3,
        "no pod beyond an unready one"
    );
    set_ready(&pods, "web-2", true).await;
    wait_ready(
        &pods,
        &["web-0", "web-1", "web-2", "web-3", "web-4"],
        "scale-up resumed",
    )
    .await;
    assert_eq!(
        *added.lock().unwrap(),
        ["web-0", "web-1", "web-2", "web-3", "web-4"]
    );

    // Scale-down halts while a pod is unready, then goes from the highest ordinal.
    set_ready(&pods, "web-0", false).await;
    patch_set(&sets, json!({"spec": {"replicas": 2}})).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        deleted.lock().unwrap().is_empty(),
        "no scale-down while web-0 is unready"
    );
    set_ready(&pods, "web-0", true).await;
    wait_ready(&pods, &["web-0", "web-1"], "scale-down").await;
    assert_eq!(*deleted.lock().unwrap(), ["web-4", "web-3", "web-2"]);
    // whenScaled: Retain keeps the claims.
    for i in 0..5 {
        claims.get(&format!("data-web-{i}")).await.unwrap();
    }
    wait_for(&sets, "web", Duration::from_secs(20), |s| {
        s.status.as_ref().is_some_and(|st| st.replicas == 2)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_rolling_update_and_rollback() {
    let (_api, client) = cluster().await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let revisions: Api<ControllerRevision> = Api::namespaced(client.clone(), "default");
    sets.create(&PostParams::default(), &web(3, json!({})))
        .await
        .unwrap();
    wait_ready(&pods, &["web-0", "web-1", "web-2"], "initial").await;
    let first = wait_for(&sets, "web", Duration::from_secs(20), |s| {
        s.status
            .as_ref()
            .is_some_and(|st| st.update_revision.is_some())
    })
    .await
    .unwrap()
    .status
    .unwrap()
    .update_revision
    .unwrap();

    // A canary: only ordinals at or above the partition get the new template.
    patch_set(
        &sets,
        json!({"spec": {
            "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 2}},
            "template": {"spec": {"containers": [{"name": "c", "image": "busybox:1.37"}]}}}}),
    )
    .await;
    let set = wait_for(&sets, "web", Duration::from_secs(30), |s| {
        s.status.as_ref().is_some_and(|st| {
            st.update_revision.as_deref() != Some(first.as_str())
                && st.updated_replicas == Some(1)
                && st.ready_replicas == Some(3)
        })
    })
    .await
    .unwrap();
    let status = set.status.unwrap();
    let second = status.update_revision.unwrap();
    assert_eq!(status.current_revision.as_deref(), Some(first.as_str()));
    wait_ready(&pods, &["web-0", "web-1", "web-2"], "canary").await;
    assert_eq!(
        pod_revisions(&pods, 3).await,
        [first.clone(), first.clone(), second.clone()]
    );
    assert_eq!(revisions.get(&second).await.unwrap().revision, 2);

    // A pod below the partition, deleted, comes back under its name at the old revision.
    let old_uid = pods.get("web-0").await.unwrap().uid();
    pods.delete("web-0", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    let back = wait_for(&pods, "web-0", Duration::from_secs(20), |p| {
        p.uid() != old_uid && p.metadata.deletion_timestamp.is_none()
    })
    .await
    .unwrap();
    assert_eq!(revision_of(&back), first);
    assert_eq!(
        back.spec.unwrap().containers[0].image.as_deref(),
        Some("busybox:1.36")
    );

    // Partition 0: everything rolls, and the update revision becomes current.
    patch_set(
        &sets,
        json!({"spec": {"updateStrategy": {"rollingUpdate": {"partition": 0}}}}),
    )
    .await;
    wait_for(&sets, "web", Duration::from_secs(30), |s| {
        s.status.as_ref().is_some_and(|st| {
            st.current_revision.as_deref() == Some(second.as_str())
                && st.updated_replicas == Some(3)
                && st.ready_replicas == Some(3)
        })
    })
    .await
    .unwrap();
    assert_eq!(
        pod_revisions(&pods, 3).await,
        [second.clone(), second.clone(), second.clone()]
    );

    // Back to the first template: the first revision again, renumbered as the newest.
    patch_set(
        &sets,
        json!({"spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}}}),
    )
    .await;
    wait_for(&sets, "web", Duration::from_secs(30), |s| {
        s.status.as_ref().is_some_and(|st| {
            st.update_revision.as_deref() == Some(first.as_str())
                && st.current_revision.as_deref() == Some(first.as_str())
                && st.updated_replicas == Some(3)
                && st.ready_replicas == Some(3)
        })
    })
    .await
    .unwrap();
    assert_eq!(
        pod_revisions(&pods, 3).await,
        [first.clone(), first.clone(), first.clone()]
    );
    assert_eq!(revisions.get(&first).await.unwrap().revision, 3);
    let all = revisions
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    assert_eq!(all.len(), 2, "a rollback makes no new revision");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_of_a_missing_storage_class_holds_its_pod() {
    let (_api, client) = cluster().await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let mut set = web(2, json!({}));
    if let Some(template) = set
        .spec
        .as_mut()
        .and_then(|s| s.volume_claim_templates.as_mut())
        .and_then(|t| t.first_mut())
        .and_then(|t| t.spec.as_mut())
    {
        template.storage_class_name = Some("missing".into());
    }
    sets.create(&PostParams::default(), &set).await.unwrap();

    // The claim is made, the pod is not, and a warning on the set names the claim.
    let deadline = Instant::now() + Duration::from_secs(20);
    let warning = loop {
        let found = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .find(|e| {
                e.involved_object.kind.as_deref() == Some("StatefulSet")
                    && e.type_.as_deref() == Some("Warning")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("data-web-0"))
            });
        if let Some(event) = found {
            break event;
        }
        assert!(Instant::now() < deadline, "no warning naming the claim");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        warning.message.as_deref().unwrap_or("").contains("missing"),
        "the warning says why: {:?}",
        warning.message
    );
    claims.get("data-web-0").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        pods.get_opt("web-0").await.unwrap().is_none(),
        "web-0 waits"
    );

    // Once the class exists, the claim is provisioned and the pods come.
    let classes: Api<StorageClass> = Api::all(client.clone());
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": "missing"}, "provisioner": localpath::PROVISIONER,
        "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"}))
    .unwrap();
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    wait_ready(&pods, &["web-0", "web-1"], "after the class appeared").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_policy_deletes_claims() {
    let (_api, client) = cluster().await;
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::cluster::garbage::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let policy = json!({"persistentVolumeClaimRetentionPolicy":
        {"whenDeleted": "Delete", "whenScaled": "Delete"}});
    sets.create(&PostParams::default(), &web(2, policy))
        .await
        .unwrap();
    wait_ready(&pods, &["web-0", "web-1"], "initial").await;
    let claim = claims.get("data-web-0").await.unwrap();
    let owner = &claim.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("StatefulSet", "web")
    );

    // Scaled away: the pod owns its claim, and both go.
    patch_set(&sets, json!({"spec": {"replicas": 1}})).await;
    wait_ready(&pods, &["web-0"], "scale-down").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while claims.get_opt("data-web-1").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "data-web-1 not deleted with its pod"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    claims.get("data-web-0").await.unwrap();

    // The set deleted: its claims go with it.
    sets.delete("web", &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while claims.get_opt("data-web-0").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "data-web-0 not deleted with the set"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_scaling_does_not_wait() {
    let (_api, client) = cluster().await;
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let parallel = json!({"podManagementPolicy": "Parallel"});
    sets.create(&PostParams::default(), &web(1, parallel))
        .await
        .unwrap();
    wait_ready(&pods, &["web-0"], "initial").await;
    set_ready(&pods, "web-0", false).await;
    patch_set(&sets, json!({"spec": {"replicas": 3}})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ready, total) = ready_pods(&pods).await;
        if ready == ["web-1", "web-2"] && total == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "burst past an unready pod: {ready:?} ready of {total}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Down to none at once, unready pods and all.
    for name in ["web-1", "web-2"] {
        set_ready(&pods, name, false).await;
    }
    patch_set(&sets, json!({"spec": {"replicas": 0}})).await;
    wait_ready(&pods, &[], "burst scale-down").await;
}
