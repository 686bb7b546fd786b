//! Namespace deletion end to end, against the real API server in-process with simulated
//! nodes and the scheduler, ReplicaSet, garbage collector and namespace controllers running:
//! the namespace turns Terminating, refuses new content, reports what remains, and goes
//! once its content (pods stopping on their nodes, a custom resource, an object held by a
//! finalizer) is gone.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams,
};
use kube::{Api, ResourceExt};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for, wait_gone};
use serde_json::json;

const NS: &str = "team";

fn condition(ns: &Namespace, type_: &str) -> Option<(String, String)> {
    ns.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone().unwrap_or_default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_namespace_is_emptied_then_removed() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 2, Duration::from_secs(20))
        .await
        .unwrap();
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
    let mut manager = Manager::new(client.clone());
    let selection: Vec<String> = ["scheduler", "replicaset", "garbagecollector", "namespace"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    orquestra_controllers::add_selected(&mut manager, &selection, &Default::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    // The content: ConfigMaps (one held by a finalizer), a Secret, a widget, a ReplicaSet
    // with two running pods.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap();
    let created_ns = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    for name in ["one", "two"] {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": name}, "data": {"k": "v"}}))
                .unwrap();
        configmaps
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
    let held: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "held", "finalizers": ["example.com/hold"]}
    }))
    .unwrap();
    configmaps
        .create(&PostParams::default(), &held)
        .await
        .unwrap();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NS);
    let secret: Secret =
        serde_json::from_value(json!({"metadata": {"name": "creds"}, "stringData": {"p": "x"}}))
            .unwrap();
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let widgets: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("example.com", "v1", "Widget"),
            "widgets",
        ),
    );
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
    }))
    .unwrap();
    widgets
        .create(&PostParams::default(), &widget)
        .await
        .unwrap();
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), NS);
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &rs).await.unwrap();
    wait_for(&sets, "web", Duration::from_secs(30), |rs| {
        rs.status.as_ref().and_then(|s| s.ready_replicas) == Some(2)
    })
    .await
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        2
    );

    // Delete: Terminating at once; nothing new may be created.
    let terminating = namespaces
        .delete(NS, &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(
        terminating.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Terminating")
    );
    let late: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "late"}})).unwrap();
    match configmaps.create(&PostParams::default(), &late).await {
        Err(kube::Error::Api(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
            assert_eq!(
                status.message,
                "configmaps \"late\" is forbidden: unable to create new content in namespace \
                 team because it is being terminated"
            );
        }
        other => panic!("expected 403 Forbidden, got {other:?}"),
    }

    // Everything but the held ConfigMap goes; the conditions say what is left and why.
    let reported = wait_for(&namespaces, NS, Duration::from_secs(30), |ns| {
        condition(ns, "NamespaceContentRemaining").is_some_and(|(status, message)| {
            status == "True"
                && message == "Some resources are remaining: configmaps. has 1 resource instances"
        })
    })
    .await
    .unwrap();
    assert_eq!(
        condition(&reported, "NamespaceFinalizersRemaining"),
        Some((
            "True".into(),
            "Some content in the namespace has finalizers remaining: example.com/hold in 1 \
             resource instances"
                .into()
        ))
    );
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(sets.get_opt("web").await.unwrap().is_none());
    assert!(secrets.get_opt("creds").await.unwrap().is_none());
    assert!(widgets.get_opt("w").await.unwrap().is_none());
    let still = namespaces.get(NS).await.unwrap();
    assert_eq!(still.uid(), created_ns.uid());
    assert_eq!(
        still.spec.as_ref().and_then(|s| s.finalizers.clone()),
        Some(vec!["kubernetes".to_owned()])
    );

    // Releasing the last object lets the namespace go.
    let released = Instant::now();
    configmaps
        .patch(
            "held",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    wait_gone(&namespaces, NS, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(released.elapsed() < Duration::from_secs(15));

    // A namespace of the same name starts empty.
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert!(
        configmaps
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        pods.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
