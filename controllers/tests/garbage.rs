//! The garbage collector against the real API server in-process: background cascade,
//! foreground deletion held by blocking dependents, orphaning, a dangling reference to an
//! owner that never existed, and a custom resource as a dependent.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
    PropagationPolicy,
};
use kube::{Api, Client, Resource, ResourceExt};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for, wait_gone};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn start() -> (TestApi, Client) {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::cluster::garbage::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    (api, client)
}

fn owned_by(owner: &impl Resource<DynamicType = ()>, block: bool) -> OwnerReference {
    let mut reference = owner.controller_owner_ref(&()).unwrap();
    reference.controller = None;
    reference.block_owner_deletion = Some(block);
    reference
}

fn configmap(name: &str, owners: Vec<OwnerReference>) -> ConfigMap {
    let mut cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}})).unwrap();
    cm.metadata.owner_references = Some(owners).filter(|o| !o.is_empty());
    cm
}

fn pod(name: &str, owners: Vec<OwnerReference>) -> Pod {
    let mut pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }))
    .unwrap();
    pod.metadata.owner_references = Some(owners);
    pod
}

async fn create_cm(api: &Api<ConfigMap>, name: &str, owners: Vec<OwnerReference>) -> ConfigMap {
    api.create(&PostParams::default(), &configmap(name, owners))
        .await
        .unwrap()
}

fn policy(policy: PropagationPolicy) -> DeleteParams {
    DeleteParams {
        propagation_policy: Some(policy),
        ..DeleteParams::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_deletion_cascades_to_dependents() {
    let (_api, client) = start().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let owner = create_cm(&configmaps, "owner", vec![]).await;
    let child = create_cm(&configmaps, "child", vec![owned_by(&owner, false)]).await;
    // A grandchild: the cascade goes on down the chain.
    create_cm(&configmaps, "grandchild", vec![owned_by(&child, false)]).await;
    pods.create(
        &PostParams::default(),
        &pod("worker", vec![owned_by(&owner, false)]),
    )
    .await
    .unwrap();
    let bystander = create_cm(&configmaps, "bystander", vec![]).await;

    configmaps
        .delete("owner", &policy(PropagationPolicy::Background))
        .await
        .unwrap();
    assert!(configmaps.get_opt("owner").await.unwrap().is_none());
    wait_gone(&configmaps, "child", WAIT).await.unwrap();
    wait_gone(&configmaps, "grandchild", WAIT).await.unwrap();
    wait_gone(&pods, "worker", WAIT).await.unwrap();
    assert_eq!(
        configmaps.get("bystander").await.unwrap().uid(),
        bystander.uid()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_deletion_waits_for_blocking_dependents() {
    let (_api, client) = start().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = create_cm(&configmaps, "owner", vec![]).await;
    // A blocking dependent held by a finalizer of its own: the owner must wait for it.
    let mut held = configmap("held", vec![owned_by(&owner, true)]);
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    configmaps
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    create_cm(&configmaps, "free", vec![owned_by(&owner, false)]).await;

    configmaps
        .delete("owner", &policy(PropagationPolicy::Foreground))
        .await
        .unwrap();
    // The dependents are deleted; the owner stays with its finalizer while `held` is held.
    wait_gone(&configmaps, "free", WAIT).await.unwrap();
    wait_for(&configmaps, "held", WAIT, |cm| {
        cm.metadata.deletion_timestamp.is_some()
    })
    .await
    .unwrap();
    let waiting = configmaps.get("owner").await.unwrap();
    assert!(waiting.metadata.deletion_timestamp.is_some());
    assert!(
        waiting
            .finalizers()
            .iter()
            .any(|f| f == "foregroundDeletion")
    );

    // Releasing the dependent lets the owner go.
    configmaps
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    wait_gone(&configmaps, "held", WAIT).await.unwrap();
    wait_gone(&configmaps, "owner", WAIT).await.unwrap();

    // An owner without dependents deleted in the foreground goes too.
    create_cm(&configmaps, "alone", vec![]).await;
    configmaps
        .delete("alone", &policy(PropagationPolicy::Foreground))
        .await
        .unwrap();
    wait_gone(&configmaps, "alone", WAIT).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphaned_dependents_stay_without_the_reference() {
    let (_api, client) = start().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let owner = create_cm(&configmaps, "owner", vec![]).await;
    let other = create_cm(&configmaps, "other", vec![]).await;
    let a = create_cm(&configmaps, "a", vec![owned_by(&owner, true)]).await;
    create_cm(
        &configmaps,
        "b",
        vec![owned_by(&owner, false), owned_by(&other, false)],
    )
    .await;

    configmaps
        .delete("owner", &policy(PropagationPolicy::Orphan))
        .await
        .unwrap();
    wait_gone(&configmaps, "owner", WAIT).await.unwrap();
    let a_now = configmaps.get("a").await.unwrap();
    assert_eq!(a_now.uid(), a.uid());
    assert!(a_now.owner_references().is_empty());
    let b_now = configmaps.get("b").await.unwrap();
    let owners: Vec<&str> = b_now
        .owner_references()
        .iter()
        .map(|o| o.name.as_str())
        .collect();
    assert_eq!(owners, ["other"]);
    // And they are not collected later either: their owner is gone, but they no longer
    // name it. (A marker created after them is collected, so the collector has looked.)
    let marker = create_cm(
        &configmaps,
        "marker",
        vec![OwnerReference {
            uid: "00000000-0000-0000-0000-00000000dead".into(),
            ..owned_by(&owner, false)
        }],
    )
    .await;
    wait_gone(&configmaps, &marker.name_any(), WAIT)
        .await
        .unwrap();
    assert!(configmaps.get_opt("a").await.unwrap().is_some());
    assert!(configmaps.get_opt("b").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dangling_references_are_collected() {
    let (_api, client) = start().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let alive = create_cm(&configmaps, "alive", vec![]).await;
    // An owner that never existed (a uid nobody has).
    let ghost = OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: "ghost".into(),
        uid: "00000000-0000-0000-0000-000000000001".into(),
        ..OwnerReference::default()
    };
    create_cm(&configmaps, "orphan", vec![ghost.clone()]).await;
    // An owner whose name exists with another uid is absent too.
    let impostor = OwnerReference {
        name: "alive".into(),
        ..ghost.clone()
    };
    create_cm(&configmaps, "fooled", vec![impostor]).await;
    // With a live owner as well, only the dangling reference goes.
    let mixed = create_cm(
        &configmaps,
        "mixed",
        vec![ghost.clone(), owned_by(&alive, false)],
    )
    .await;

    wait_gone(&configmaps, "orphan", WAIT).await.unwrap();
    wait_gone(&configmaps, "fooled", WAIT).await.unwrap();
    let mixed_now = wait_for(&configmaps, "mixed", WAIT, |cm| {
        cm.owner_references().len() == 1
    })
    .await
    .unwrap();
    assert_eq!(mixed_now.uid(), mixed.uid());
    assert_eq!(mixed_now.owner_references()[0].uid, alive.uid().unwrap());
    assert!(configmaps.get_opt("alive").await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_resources_are_collected_too() {
    let (api, client) = start().await;
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object",
                                     "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap();
    api.apply_crd(crd).await.unwrap();
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Widget"),
        "widgets",
    );
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");

    // A widget owned by a ConfigMap, and a ConfigMap owned by a widget.
    let owner = create_cm(&configmaps, "owner", vec![]).await;
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1", "ownerReferences": [owned_by(&owner, false)]},
        "spec": {"size": 1},
    }))
    .unwrap();
    let w1 = widgets
        .create(&PostParams::default(), &widget)
        .await
        .unwrap();
    let by_widget = OwnerReference {
        api_version: "example.com/v1".into(),
        kind: "Widget".into(),
        name: "w1".into(),
        uid: w1.uid().unwrap(),
        ..OwnerReference::default()
    };
    create_cm(&configmaps, "made-by-widget", vec![by_widget]).await;

    configmaps
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&widgets, "w1", WAIT).await.unwrap();
    wait_gone(&configmaps, "made-by-widget", WAIT)
        .await
        .unwrap();
}
