//! The API server as kube-rs sees it: the in-process server on a free loopback port over a
//! real SQLite store, driven by kube's typed `Api`, its discovery and its runtime watcher.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use orquestra_apiserver::ApiServer;

mod common;

use common::cluster;
use serde_json::json;

fn configmap(name: &str, data: serde_json::Value) -> ConfigMap {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "data": data,
    }))
    .unwrap()
}

fn reason(error: kube::Error) -> (String, u16) {
    match error {
        kube::Error::Api(status) => (status.reason.clone(), status.code),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn configmap_lifecycle_with_kubernetes_semantics() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");

    let created = api
        .create(&PostParams::default(), &configmap("cfg", json!({"a": "1"})))
        .await
        .unwrap();
    let meta = &created.metadata;
    assert!(meta.uid.is_some());
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    let rv1: i64 = created.resource_version().unwrap().parse().unwrap();

    // Duplicate create, missing object, missing namespace.
    let dup = api
        .create(&PostParams::default(), &configmap("cfg", json!({})))
        .await;
    assert_eq!(reason(dup.unwrap_err()), ("AlreadyExists".into(), 409));
    assert_eq!(
        reason(api.get("nope").await.unwrap_err()),
        ("NotFound".into(), 404)
    );
    assert!(api.get_opt("nope").await.unwrap().is_none());
    let elsewhere: Api<ConfigMap> = Api::namespaced(c.client.clone(), "missing");
    let err = elsewhere
        .create(&PostParams::default(), &configmap("x", json!({})))
        .await
        .unwrap_err();
    assert_eq!(reason(err), ("NotFound".into(), 404));

    // A PUT without changes keeps the resourceVersion; a real change moves it.
    let same = api
        .replace("cfg", &PostParams::default(), &created)
        .await
        .unwrap();
    assert_eq!(same.resource_version(), created.resource_version());
    let mut changed = created.clone();
    changed.data = Some([("a".to_owned(), "2".to_owned())].into());
    let updated = api
        .replace("cfg", &PostParams::default(), &changed)
        .await
        .unwrap();
    let rv2: i64 = updated.resource_version().unwrap().parse().unwrap();
    assert!(rv2 > rv1);
    assert_eq!(updated.uid(), created.uid());

    // A PUT with the old resourceVersion is a conflict.
    let stale = api.replace("cfg", &PostParams::default(), &changed).await;
    assert_eq!(reason(stale.unwrap_err()), ("Conflict".into(), 409));

    // Merge and JSON patches.
    let patched = api
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"b": "3"}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.data.as_ref().unwrap()["b"], "3");
    let patched = api
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/data/a", "value": "2"},
                    {"op": "remove", "path": "/data/a"}
                ]))
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert!(!patched.data.as_ref().unwrap().contains_key("a"));
    let failed = api
        .patch(
            "cfg",
            &PatchParams::default(),
            &Patch::<()>::Json(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/data/b", "value": "wrong"}
                ]))
                .unwrap(),
            ),
        )
        .await;
    assert_eq!(reason(failed.unwrap_err()), ("Invalid".into(), 422));

    // Delete, then it is gone.
    api.delete("cfg", &DeleteParams::default()).await.unwrap();
    assert!(api.get_opt("cfg").await.unwrap().is_none());
}

#[tokio::test]
async fn invalid_objects_are_refused_with_causes() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let err = api
        .create(&PostParams::default(), &configmap("Not_Valid", json!({})))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("expected an API error")
    };
    assert_eq!((status.reason.as_str(), status.code), ("Invalid", 422));
    assert!(
        status
            .message
            .contains("ConfigMap \"Not_Valid\" is invalid"),
        "{}",
        status.message
    );
    // Nothing was stored.
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}

#[tokio::test]
async fn generate_name_and_boot_namespaces() {
    let c = cluster().await;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    let names: Vec<String> = namespaces
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|n| n.name_any())
        .collect();
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(names.iter().any(|n| n == ns), "{ns} in {names:?}");
    }
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "kube-system");
    let mut cm = configmap("", json!({}));
    cm.metadata.name = None;
    cm.metadata.generate_name = Some("gen-".into());
    let created = api.create(&PostParams::default(), &cm).await.unwrap();
    assert!(created.name_any().starts_with("gen-"));
    assert_eq!(created.name_any().len(), "gen-".len() + 5);
}

#[tokio::test]
async fn lists_paginate_over_one_snapshot_and_filter_by_labels() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for i in 0..12 {
        let mut cm = configmap(&format!("cm-{i:02}"), json!({}));
        if i % 2 == 1 {
            cm.metadata.labels = Some([("app".to_owned(), "other".to_owned())].into());
        }
        api.create(&PostParams::default(), &cm).await.unwrap();
    }
    let first = api.list(&ListParams::default().limit(5)).await.unwrap();
    assert_eq!(first.items.len(), 5);
    // As kube-apiserver: how many are left, when nothing is filtered out.
    assert_eq!(first.metadata.remaining_item_count, Some(7));
    let filtered = api
        .list(&ListParams::default().labels("app=other").limit(2))
        .await
        .unwrap();
    assert_eq!(filtered.items.len(), 2);
    assert_eq!(
        filtered.metadata.remaining_item_count, None,
        "unknown with a selector"
    );
    let whole = api.list(&ListParams::default().limit(12)).await.unwrap();
    assert_eq!(whole.metadata.remaining_item_count, None, "nothing left");
    let token = first.metadata.continue_.clone().unwrap();
    // A change after the first page does not show in the next ones.
    api.delete("cm-11", &DeleteParams::default()).await.unwrap();
    let second = api
        .list(&ListParams::default().limit(5).continue_token(&token))
        .await
        .unwrap();
    let third = api
        .list(
            &ListParams::default()
                .limit(5)
                .continue_token(second.metadata.continue_.as_ref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(second.items.len() + third.items.len(), 7);
    assert!(
        third
            .metadata
            .continue_
            .as_deref()
            .is_none_or(str::is_empty)
    );
    assert!(
        third.items.iter().any(|cm| cm.name_any() == "cm-11"),
        "as of the first page"
    );

    let demo = api
        .list(&ListParams::default().labels("app=demo"))
        .await
        .unwrap();
    assert_eq!(demo.items.len(), 6);
    let others = api
        .list(&ListParams::default().labels("app in (other)"))
        .await
        .unwrap();
    assert_eq!(others.items.len(), 5);
    let by_name = api
        .list(&ListParams::default().fields("metadata.name=cm-03"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
}

#[tokio::test]
async fn finalizers_hold_deletion_until_removed() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let mut cm = configmap("held", json!({}));
    cm.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &cm).await.unwrap();
    api.delete("held", &DeleteParams::default()).await.unwrap();
    let marked = api.get("held").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    api.patch(
        "held",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    assert!(
        api.get_opt("held").await.unwrap().is_none(),
        "gone with its last finalizer"
    );
}

async fn next_event(
    events: &mut futures::stream::BoxStream<
        'static,
        Result<watcher::Event<ConfigMap>, watcher::Error>,
    >,
) -> watcher::Event<ConfigMap> {
    tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .expect("watcher event within 10s")
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn runtime_watcher_sees_changes_and_deletions() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    api.create(&PostParams::default(), &configmap("before", json!({})))
        .await
        .unwrap();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    assert!(matches!(
        next_event(&mut events).await,
        watcher::Event::Init
    ));
    assert!(
        matches!(next_event(&mut events).await, watcher::Event::InitApply(cm) if cm.name_any() == "before")
    );
    assert!(matches!(
        next_event(&mut events).await,
        watcher::Event::InitDone
    ));
    api.create(&PostParams::default(), &configmap("after", json!({})))
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut events).await, watcher::Event::Apply(cm) if cm.name_any() == "after")
    );
    api.delete("before", &DeleteParams::default())
        .await
        .unwrap();
    assert!(
        matches!(next_event(&mut events).await, watcher::Event::Delete(cm) if cm.name_any() == "before")
    );
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_gets_an_in_stream_410() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let first = api
        .create(&PostParams::default(), &configmap("a", json!({})))
        .await
        .unwrap();
    let old = first.resource_version().unwrap();
    for i in 0..3 {
        api.create(
            &PostParams::default(),
            &configmap(&format!("b{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    c.compact_everything().await;
    let mut stream = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .unwrap()
    {
        Some(Ok(WatchEvent::Error(status))) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
        }
        other => panic!("expected an in-stream 410, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_and_deployment_defaults() {
    let c = cluster().await;
    let discovery = kube::Discovery::new(c.client.clone()).run().await.unwrap();
    let apps = discovery
        .groups()
        .find(|g| g.name() == "apps")
        .expect("apps group");
    assert!(apps.recommended_kind("Deployment").is_some());
    let version = c.client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");

    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "web", "image": "nginx"}]}}
        }
    }))
    .unwrap();
    let created = api
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.replicas, Some(1));
    let strategy = spec.strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    assert!(strategy.rolling_update.is_some());
    assert_eq!(created.metadata.generation, Some(1));
}

#[tokio::test]
async fn custom_resources_through_the_same_engine() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

    let c = cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    }))
    .unwrap();
    let created = crds.create(&PostParams::default(), &crd).await.unwrap();
    let conditions = created.status.unwrap().conditions.unwrap();
    assert!(
        conditions
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
    );

    // A CRD whose name does not match its names is refused.
    let mut bad = crd.clone();
    bad.metadata.name = Some("wrong.example.com".into());
    let err = crds.create(&PostParams::default(), &bad).await.unwrap_err();
    assert_eq!(reason(err), ("Invalid".into(), 422));

    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource);
    let widget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3}
    }))
    .unwrap();
    widgets
        .create(&PostParams::default(), &widget)
        .await
        .unwrap();
    assert_eq!(widgets.get("w1").await.unwrap().data["spec"]["size"], 3);
    let discovery = kube::Discovery::new(c.client.clone()).run().await.unwrap();
    assert!(discovery.has_group("example.com"));

    // Strategic merge is for built-in kinds only.
    let smp = widgets
        .patch(
            "w1",
            &PatchParams::default(),
            &Patch::Strategic(json!({"spec": {"size": 4}})),
        )
        .await;
    assert_eq!(
        reason(smp.unwrap_err()),
        ("UnsupportedMediaType".into(), 415)
    );

    // A second API server over the same store (a restart) serves the CRD from the start.
    let restarted = ApiServer::new(Arc::clone(&c.store)).await.unwrap();
    assert!(
        restarted
            .engine()
            .registry
            .get("example.com", "v1", "widgets")
            .is_some()
    );

    // Deleting the CRD stops serving it and removes its objects.
    crds.delete("widgets.example.com", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(reason(widgets.get("w1").await.unwrap_err()).1, 404);
    let (_, left) = c
        .store
        .count("/registry/example.com/widgets/")
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test]
async fn scale_subresource_and_pod_binding() {
    use k8s_openapi::api::core::v1::Pod;

    let c = cluster().await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let scale = deployments.get_scale("web").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(1));
    assert_eq!(scale.status.unwrap().selector.as_deref(), Some("app=web"));
    let scaled = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();
    assert_eq!(scaled.spec.unwrap().replicas, Some(4));
    let after = deployments.get("web").await.unwrap();
    assert_eq!(after.spec.unwrap().replicas, Some(4));
    assert_eq!(
        after.metadata.generation,
        Some(2),
        "scaling is a spec change"
    );

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": "p"},
                         "target": {"apiVersion": "v1", "kind": "Node", "name": "node-1"}});
    let bind = |body: serde_json::Value| {
        let pods = pods.clone();
        async move {
            pods.create_subresource::<serde_json::Value, serde_json::Value>(
                "binding",
                "p",
                &PostParams::default(),
                &body,
            )
            .await
        }
    };
    bind(binding.clone()).await.unwrap();
    assert_eq!(
        pods.get("p")
            .await
            .unwrap()
            .spec
            .unwrap()
            .node_name
            .as_deref(),
        Some("node-1")
    );
    // Binding is not a new generation of the pod (kube-apiserver: a bound pod is still 1).
    assert_eq!(pods.get("p").await.unwrap().metadata.generation, Some(1));
    let again = bind(binding).await.unwrap_err();
    assert_eq!(
        reason(again),
        ("Conflict".into(), 409),
        "a bound pod stays bound"
    );
}

#[tokio::test]
async fn services_get_unique_cluster_ips_and_node_ports() {
    use k8s_openapi::api::core::v1::Service;

    let c = cluster().await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let svc = |name: &str, spec: serde_json::Value| -> Service {
        serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let mut ips = std::collections::HashSet::new();
    for i in 0..20 {
        let created = services
            .create(
                &PostParams::default(),
                &svc(&format!("s{i}"), json!({"ports": [{"port": 80}]})),
            )
            .await
            .unwrap();
        let spec = created.spec.unwrap();
        let ip = spec.cluster_ip.unwrap();
        assert!(ip.starts_with("10.43."), "{ip}");
        assert!(ips.insert(ip.clone()), "{ip} handed out twice");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        let port = &spec.ports.unwrap()[0];
        assert_eq!(port.protocol.as_deref(), Some("TCP"));
        assert!(port.target_port.is_some());
    }

    // An explicit IP is reserved; asking for a taken one is Invalid.
    let fixed = services
        .create(
            &PostParams::default(),
            &svc(
                "fixed",
                json!({"clusterIP": "10.43.200.7", "ports": [{"port": 80}]}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        fixed.spec.unwrap().cluster_ip.as_deref(),
        Some("10.43.200.7")
    );
    let taken = services
        .create(
            &PostParams::default(),
            &svc(
                "clash",
                json!({"clusterIP": "10.43.200.7", "ports": [{"port": 80}]}),
            ),
        )
        .await;
    assert_eq!(reason(taken.unwrap_err()), ("Invalid".into(), 422));

    // NodePort services get a node port in range; an update that leaves it out keeps it.
    let np = services
        .create(
            &PostParams::default(),
            &svc("np", json!({"type": "NodePort", "ports": [{"port": 80}]})),
        )
        .await
        .unwrap();
    let node_port = np.spec.as_ref().unwrap().ports.as_ref().unwrap()[0]
        .node_port
        .unwrap();
    assert!((30000..=32767).contains(&node_port));
    let mut again = np.clone();
    let spec = again.spec.as_mut().unwrap();
    spec.cluster_ip = None;
    spec.cluster_ips = None;
    spec.ports.as_mut().unwrap()[0].node_port = None;
    let kept = services
        .replace("np", &PostParams::default(), &again)
        .await
        .unwrap();
    let kept_spec = kept.spec.unwrap();
    assert_eq!(kept_spec.cluster_ip, np.spec.as_ref().unwrap().cluster_ip);
    assert_eq!(kept_spec.ports.unwrap()[0].node_port, Some(node_port));

    // The cluster IP is immutable.
    let mut moved = services.get("np").await.unwrap();
    moved.spec.as_mut().unwrap().cluster_ip = Some("10.43.99.99".into());
    moved.spec.as_mut().unwrap().cluster_ips = None;
    let err = services
        .replace("np", &PostParams::default(), &moved)
        .await
        .unwrap_err();
    assert_eq!(reason(err), ("Invalid".into(), 422));

    // Deleting a Service frees its IP.
    services
        .delete("fixed", &DeleteParams::default())
        .await
        .unwrap();
    services
        .create(
            &PostParams::default(),
            &svc(
                "reuse",
                json!({"clusterIP": "10.43.200.7", "ports": [{"port": 80}]}),
            ),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_service_changing_type_gets_and_gives_back_its_allocations() {
    use k8s_openapi::api::core::v1::Service;

    let c = cluster().await;
    let services: Api<Service> = Api::namespaced(c.client.clone(), "default");
    let external: Service = serde_json::from_value(json!({"metadata": {"name": "ext"},
        "spec": {"type": "ExternalName", "externalName": "example.com"}}))
    .unwrap();
    let created = services
        .create(&PostParams::default(), &external)
        .await
        .unwrap();
    assert_eq!(
        created.spec.unwrap().cluster_ip,
        None,
        "ExternalName: no IP"
    );

    // ExternalName → NodePort: a cluster IP and a node port, as kube-apiserver allocates them.
    let change = |spec: serde_json::Value| Patch::Merge(json!({"spec": spec}));
    let node_port = services
        .patch(
            "ext",
            &PatchParams::default(),
            &change(json!({"type": "NodePort", "externalName": null,
                           "ports": [{"name": "http", "port": 80, "targetPort": 9376}]})),
        )
        .await
        .unwrap()
        .spec
        .unwrap();
    let ip = node_port.cluster_ip.clone().unwrap();
    assert!(ip.starts_with("10.43."), "{ip}");
    assert_eq!(node_port.cluster_ips, Some(vec![ip.clone()]));
    let port = node_port.ports.unwrap()[0].node_port.unwrap();
    assert!((30000..=32767).contains(&port));

    // NodePort → ClusterIP: the node port goes back, the IP stays.
    let cluster_ip = services
        .patch(
            "ext",
            &PatchParams::default(),
            &change(json!({"type": "ClusterIP"})),
        )
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(cluster_ip.cluster_ip.as_deref(), Some(ip.as_str()));
    assert_eq!(cluster_ip.ports.unwrap()[0].node_port, None);
    let taker: Service = serde_json::from_value(json!({"metadata": {"name": "taker"},
        "spec": {"type": "NodePort", "ports": [{"port": 80, "nodePort": port}]}}))
    .unwrap();
    services
        .create(&PostParams::default(), &taker)
        .await
        .expect("the freed node port is free");
    // A LoadBalancer told not to gets no node port (its load balancer needs none).
    let lb: Service = serde_json::from_value(json!({"metadata": {"name": "lb"},
        "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                 "ports": [{"port": 80}]}}))
    .unwrap();
    let lb = services.create(&PostParams::default(), &lb).await.unwrap();
    assert_eq!(lb.spec.unwrap().ports.unwrap()[0].node_port, None);

    // → ExternalName: the cluster IP goes back too.
    let back = services
        .patch(
            "ext",
            &PatchParams::default(),
            &change(
                json!({"type": "ExternalName", "externalName": "example.org",
                           "clusterIP": "", "clusterIPs": null}),
            ),
        )
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!((back.cluster_ip, back.cluster_ips), (None, None));
    let reuse: Service = serde_json::from_value(json!({"metadata": {"name": "reuse"},
        "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
    .unwrap();
    services
        .create(&PostParams::default(), &reuse)
        .await
        .expect("the freed cluster IP is free");
}

#[tokio::test]
async fn a_status_write_takes_the_metadata_of_most_built_in_kinds_but_not_of_custom_resources() {
    use k8s_openapi::api::networking::v1::Ingress;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

    let c = cluster().await;
    // An Ingress (kube's ingress status strategy resets only the spec).
    let ingresses: Api<Ingress> = Api::namespaced(c.client.clone(), "default");
    let ingress: Ingress = serde_json::from_value(json!({"metadata": {"name": "web"},
        "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}}}))
    .unwrap();
    ingresses
        .create(&PostParams::default(), &ingress)
        .await
        .unwrap();
    let patched = ingresses
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"patchedstatus": "true"}},
                "spec": {"defaultBackend": {"service": {"name": "other"}}},
                "status": {"loadBalancer": {"ingress": [{"ip": "169.1.1.1"}]}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        patched
            .annotations()
            .get("patchedstatus")
            .map(String::as_str),
        Some("true")
    );
    let spec = patched.spec.unwrap();
    assert_eq!(
        spec.default_backend.unwrap().service.unwrap().name,
        "web",
        "spec kept"
    );
    assert_eq!(
        patched
            .status
            .unwrap()
            .load_balancer
            .unwrap()
            .ingress
            .unwrap()[0]
            .ip
            .as_deref(),
        Some("169.1.1.1")
    );

    // A custom resource: only the status.
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "gizmos.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "gizmos", "kind": "Gizmo"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object",
                    "x-kubernetes-preserve-unknown-fields": true}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("example.com", "v1", "Gizmo"),
        "gizmos",
    );
    let gizmos: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource);
    let gizmo: DynamicObject = serde_json::from_value(json!({"apiVersion": "example.com/v1",
        "kind": "Gizmo", "metadata": {"name": "g"}, "spec": {"size": 1}}))
    .unwrap();
    gizmos.create(&PostParams::default(), &gizmo).await.unwrap();
    let patched = gizmos
        .patch_status(
            "g",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"patchedstatus": "true"}},
                                 "status": {"ready": true}}),
            ),
        )
        .await
        .unwrap();
    assert!(patched.annotations().get("patchedstatus").is_none());
    assert_eq!(patched.data["status"]["ready"], true);
}

/// A CertificateSigningRequest's `approval` subresource (what `kubectl certificate approve`
/// writes) changes its conditions and metadata, nothing else, and discovery lists it.
#[tokio::test]
async fn a_csr_is_approved_through_its_approval_subresource() {
    use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
    let c = cluster().await;
    let csrs: Api<CertificateSigningRequest> = Api::all(c.client.clone());
    let csr: CertificateSigningRequest = serde_json::from_value(json!({
        "metadata": {"name": "alice"},
        "spec": {"request": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURSBSRVFVRVNULS0tLS0K",
            "signerName": "example.com/e2e", "usages": ["client auth"]}}))
    .unwrap();
    csrs.create(&PostParams::default(), &csr).await.unwrap();
    let patched: CertificateSigningRequest = c
        .client
        .request(
            http::Request::patch(
                "/apis/certificates.k8s.io/v1/certificatesigningrequests/alice/approval",
            )
            .header("Content-Type", "application/merge-patch+json")
            .body(
                serde_json::to_vec(&json!({
                    "metadata": {"annotations": {"approved-by": "e2e"}},
                    "spec": {"signerName": "example.com/other"},
                    "status": {"conditions": [{"type": "Approved", "status": "True",
                        "reason": "E2E", "message": "approved in a test"}],
                        "certificate": "Zm9v"}}))
                .unwrap(),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    let status = patched.status.unwrap();
    let conditions = status.conditions.unwrap();
    assert_eq!(conditions.len(), 1);
    assert_eq!(conditions[0].type_, "Approved");
    assert!(status.certificate.is_none(), "only conditions change");
    assert_eq!(patched.spec.signer_name, "example.com/e2e", "spec kept");
    assert_eq!(patched.metadata.annotations.unwrap()["approved-by"], "e2e");
    let resources = c
        .client
        .list_api_group_resources("certificates.k8s.io/v1")
        .await
        .unwrap();
    assert!(
        resources
            .resources
            .iter()
            .any(|r| r.name == "certificatesigningrequests/approval")
    );
}

#[tokio::test]
async fn a_json_patch_may_add_below_an_empty_status() {
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;

    let c = cluster().await;
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(c.client.clone(), "default");
    let budget: PodDisruptionBudget = serde_json::from_value(json!({"metadata": {"name": "b"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "b"}}}}))
    .unwrap();
    budgets
        .create(&PostParams::default(), &budget)
        .await
        .unwrap();
    // kube-apiserver always has `status: {}` (a Go struct): adding below it works there.
    let patch = json!([{"op": "add", "path": "/status/disruptionsAllowed", "value": 1}]);
    let request =
        http::Request::patch("/apis/policy/v1/namespaces/default/poddisruptionbudgets/b/status")
            .header("content-type", "application/json-patch+json")
            .body(serde_json::to_vec(&patch).unwrap())
            .unwrap();
    let patched: PodDisruptionBudget = c.client.request(request).await.unwrap();
    assert_eq!(patched.status.unwrap().disruptions_allowed, Some(1));
}

#[tokio::test]
async fn a_pod_gets_its_runtime_class_overhead_and_scheduling_or_is_refused() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::node::v1::RuntimeClass;

    let c = cluster().await;
    let classes: Api<RuntimeClass> = Api::all(c.client.clone());
    let class: RuntimeClass = serde_json::from_value(json!({"metadata": {"name": "kata"},
        "handler": "kata", "overhead": {"podFixed": {"cpu": "10m", "memory": "1Mi"}},
        "scheduling": {"nodeSelector": {"sandbox": "yes"},
                       "tolerations": [{"key": "sandbox", "operator": "Exists"}]}}))
    .unwrap();
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let pod = |name: &str, class: &str, extra: serde_json::Value| -> Pod {
        let mut spec = json!({"runtimeClassName": class,
            "containers": [{"name": "c", "image": "busybox"}]});
        for (k, v) in extra.as_object().into_iter().flatten() {
            spec[k] = v.clone();
        }
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec})).unwrap()
    };
    let created = pods
        .create(&PostParams::default(), &pod("p", "kata", json!({})))
        .await
        .unwrap()
        .spec
        .unwrap();
    let overhead = created.overhead.unwrap();
    assert_eq!(overhead["cpu"].0, "10m");
    assert_eq!(overhead["memory"].0, "1Mi");
    assert_eq!(created.node_selector.unwrap()["sandbox"], "yes");
    assert!(
        created
            .tolerations
            .unwrap()
            .iter()
            .any(|t| t.key.as_deref() == Some("sandbox"))
    );

    // A class that does not exist, an overhead that differs, a selector that conflicts: 403.
    for (name, class, extra, why) in [
        (
            "missing",
            "nope",
            json!({}),
            "pod rejected: RuntimeClass \"nope\" not found",
        ),
        (
            "greedy",
            "kata",
            json!({"overhead": {"cpu": "1"}}),
            "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead",
        ),
        (
            "elsewhere",
            "kata",
            json!({"nodeSelector": {"sandbox": "no"}}),
            "pod rejected: conflict: runtimeClass.scheduling.nodeSelector selector conflicts with pod.spec.nodeSelector",
        ),
    ] {
        let err = pods
            .create(&PostParams::default(), &pod(name, class, extra))
            .await
            .unwrap_err();
        let kube::Error::Api(status) = err else {
            panic!("an API error")
        };
        assert_eq!(
            (status.code, status.message),
            (403, format!("pods \"{name}\" is forbidden: {why}"))
        );
    }
}

#[tokio::test]
async fn immutable_data_stays_and_config_keys_are_checked() {
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::storage::v1::CSINode;

    let c = cluster().await;
    let maps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let mut frozen = configmap("frozen", json!({"a": "1"}));
    frozen.immutable = Some(true);
    maps.create(&PostParams::default(), &frozen).await.unwrap();
    for patch in [json!({"data": {"a": "2"}}), json!({"immutable": false})] {
        let err = maps
            .patch("frozen", &PatchParams::default(), &Patch::Merge(patch))
            .await
            .unwrap_err();
        let kube::Error::Api(status) = err else {
            panic!("an API error")
        };
        assert_eq!(status.code, 422, "{status:?}");
        assert!(
            status
                .message
                .contains("field is immutable when `immutable` is set"),
            "{status:?}"
        );
    }
    // Labels may still change.
    maps.patch(
        "frozen",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}})),
    )
    .await
    .unwrap();

    let secrets: Api<Secret> = Api::namespaced(c.client.clone(), "default");
    let bad: Secret =
        serde_json::from_value(json!({"metadata": {"name": "s"}, "data": {"": "eA=="}})).unwrap();
    let err = secrets
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!(status.code, 422);
    assert!(
        status
            .message
            .contains("a valid config key must consist of"),
        "{status:?}"
    );

    // A list Go sends as null when empty is not "required" (a CSINode with no drivers).
    let nodes: Api<CSINode> = Api::all(c.client.clone());
    let node: CSINode =
        serde_json::from_value(json!({"metadata": {"name": "n1"}, "spec": {"drivers": null}}))
            .unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
}

#[tokio::test]
async fn kinds_without_a_spec_have_no_new_generations() {
    let c = cluster().await;
    let maps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let created = maps
        .create(&PostParams::default(), &configmap("g", json!({"a": "1"})))
        .await
        .unwrap();
    let changed = maps
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "2"}})),
        )
        .await
        .unwrap();
    assert_eq!(changed.metadata.generation, created.metadata.generation);
}

#[tokio::test]
async fn an_oversized_body_is_a_413_status() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let big = "x".repeat(orquestra_apiserver::MAX_BODY_BYTES + 1);
    let err = api
        .create(&PostParams::default(), &configmap("big", json!({"k": big})))
        .await
        .unwrap_err();
    assert_eq!(reason(err), ("RequestEntityTooLarge".into(), 413));
}

#[tokio::test]
async fn lists_are_served_from_the_watch_cache_and_agree_with_the_store() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for i in 0..30 {
        let mut cm = configmap(&format!("c-{i:02}"), json!({"i": i.to_string()}));
        if i % 3 == 0 {
            cm.metadata.labels = Some([("three".to_owned(), "yes".to_owned())].into());
        }
        api.create(&PostParams::default(), &cm).await.unwrap();
    }
    let before = c.engine.cache().served();
    // Read-your-writes: a LIST right after a write sees it.
    let list = api.list(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 30);
    let rv = list.metadata.resource_version.clone().unwrap();
    let labelled = api
        .list(&ListParams::default().labels("three=yes"))
        .await
        .unwrap();
    assert_eq!(labelled.items.len(), 10);
    let named = api
        .list(&ListParams::default().fields("metadata.name=c-07"))
        .await
        .unwrap();
    assert_eq!(named.items.len(), 1);
    assert_eq!(
        c.engine.cache().served() - before,
        3,
        "answered from the cache"
    );

    // The same snapshot read from the store (an exact revision) is identical.
    let exact = api
        .list(
            &ListParams::default()
                .at(&rv)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&exact.items).unwrap(),
        serde_json::to_value(&list.items).unwrap()
    );

    // Pages come from the cache while nothing changes, and from the store's snapshot once
    // something has: either way one consistent snapshot.
    let first = api.list(&ListParams::default().limit(10)).await.unwrap();
    let token = first.metadata.continue_.clone().unwrap();
    let second = api
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    api.delete("c-25", &DeleteParams::default()).await.unwrap();
    let token = second.metadata.continue_.clone().unwrap();
    let third = api
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await
        .unwrap();
    let names: Vec<String> = [first, second, third]
        .iter()
        .flat_map(|page| page.items.iter().map(|cm| cm.name_any()))
        .collect();
    let expected: Vec<String> = (0..30).map(|i| format!("c-{i:02}")).collect();
    assert_eq!(
        names, expected,
        "c-25 is still in the snapshot the pages were read from"
    );
    assert_eq!(
        api.list(&ListParams::default()).await.unwrap().items.len(),
        29
    );
}

#[tokio::test]
async fn requests_time_out_with_a_timeout_status() {
    let c = cluster().await;
    // A LIST that must wait for a revision the store will not reach soon (the cache waits
    // 3 s for it): the client's 1 s timeout ends it first, with a 504 Timeout Status.
    let started = std::time::Instant::now();
    let (code, body) = c
        .raw_get("/api/v1/namespaces/default/configmaps?resourceVersion=999999999&timeout=1s")
        .await;
    assert_eq!(code, 504, "{body}");
    assert!(started.elapsed() < std::time::Duration::from_millis(2500));
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "Timeout", "{status}");
    assert_eq!(status["kind"], "Status");
    // A malformed timeout is a 400, and the server carries on.
    let (code, _) = c
        .raw_get("/api/v1/namespaces/default/configmaps?timeout=soon")
        .await;
    assert_eq!(code, 400);
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    api.list(&ListParams::default()).await.unwrap();
}

#[tokio::test]
async fn watches_are_served_from_the_watch_cache() {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};

    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let first = api
        .create(&PostParams::default(), &configmap("w-1", json!({"v": "1"})))
        .await
        .unwrap();
    let from = first.metadata.resource_version.clone().unwrap();
    for i in 2..=4 {
        api.create(
            &PostParams::default(),
            &configmap(&format!("w-{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    api.delete("w-2", &DeleteParams::default()).await.unwrap();
    let before = c.engine.cache().watches();

    // Resuming from a past revision replays exactly the later changes, from memory, and
    // a deletion carries its own revision.
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(2), &from)
        .await
        .unwrap()
        .take(4)
        .try_collect()
        .await
        .unwrap();
    let seen: Vec<(String, String)> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(cm) => ("ADDED".into(), cm.name_any()),
            WatchEvent::Deleted(cm) => ("DELETED".into(), cm.name_any()),
            other => (format!("{other:?}"), String::new()),
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ADDED".to_owned(), "w-2".to_owned()),
            ("ADDED".into(), "w-3".into()),
            ("ADDED".into(), "w-4".into()),
            ("DELETED".into(), "w-2".into()),
        ]
    );
    let WatchEvent::Deleted(gone) = &events[3] else {
        panic!("a deletion")
    };
    let deleted_rv: i64 = gone
        .metadata
        .resource_version
        .as_ref()
        .unwrap()
        .parse()
        .unwrap();
    let added_rv: i64 = match &events[0] {
        WatchEvent::Added(cm) => cm
            .metadata
            .resource_version
            .as_ref()
            .unwrap()
            .parse()
            .unwrap(),
        _ => unreachable!(),
    };
    assert!(deleted_rv > added_rv);

    // Two watchers with different selectors see the same live change their own way: one
    // sees the object stop matching (DELETED), the other sees it start (ADDED).
    let mut labelled = api.get("w-1").await.unwrap();
    labelled.metadata.labels = Some([("v".to_owned(), "1".to_owned())].into());
    api.replace("w-1", &PostParams::default(), &labelled)
        .await
        .unwrap();
    let now = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let v1 = api
        .watch(&WatchParams::default().labels("v=1").timeout(2), &now)
        .await
        .unwrap()
        .boxed();
    let v2 = api
        .watch(&WatchParams::default().labels("v=2").timeout(2), &now)
        .await
        .unwrap()
        .boxed();
    let mut relabelled = api.get("w-1").await.unwrap();
    relabelled.metadata.labels = Some([("v".to_owned(), "2".to_owned())].into());
    api.replace("w-1", &PostParams::default(), &relabelled)
        .await
        .unwrap();
    let (a, b) = futures::join!(
        v1.take(1).try_collect::<Vec<_>>(),
        v2.take(1).try_collect::<Vec<_>>()
    );
    assert!(matches!(a.unwrap()[0], WatchEvent::Deleted(_)));
    assert!(matches!(b.unwrap()[0], WatchEvent::Added(_)));
    assert_eq!(
        c.engine.cache().watches() - before,
        3,
        "all three from the cache"
    );
}

#[tokio::test]
async fn metadata_only_reads_lists_and_watches() {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};

    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    api.create(
        &PostParams::default(),
        &configmap("m-1", json!({"big": "x".repeat(1000)})),
    )
    .await
    .unwrap();
    let one = api.get_metadata("m-1").await.unwrap();
    assert_eq!(one.metadata.name.as_deref(), Some("m-1"));
    assert_eq!(one.types.as_ref().unwrap().kind, "PartialObjectMetadata");
    let list = api.list_metadata(&ListParams::default()).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(
        list.items[0]
            .metadata
            .labels
            .as_ref()
            .unwrap()
            .get("app")
            .map(String::as_str),
        Some("demo")
    );
    let rv = list.metadata.resource_version.clone().unwrap();
    let mut events = api
        .watch_metadata(&WatchParams::default().timeout(2), &rv)
        .await
        .unwrap()
        .boxed();
    api.create(&PostParams::default(), &configmap("m-2", json!({})))
        .await
        .unwrap();
    match events.try_next().await.unwrap() {
        Some(WatchEvent::Added(meta)) => {
            assert_eq!(meta.metadata.name.as_deref(), Some("m-2"));
            assert_eq!(meta.types.as_ref().unwrap().api_version, "meta.k8s.io/v1");
        }
        other => panic!("expected ADDED, got {other:?}"),
    }
    // The raw list really is metadata only.
    let (code, body) = c
        .raw_get_accept(
            "/api/v1/namespaces/default/configmaps",
            "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1",
        )
        .await;
    assert_eq!(code, 200);
    assert!(
        body.contains("PartialObjectMetadataList") && !body.contains("xxxx"),
        "{body}"
    );
}

/// DELETE on a collection (`Api::delete_collection`, client-go's DeleteCollection) deletes
/// what the selectors match, finalizers respected, and returns the deleted objects.
#[tokio::test]
async fn delete_collection_deletes_what_the_selector_matches() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let mut kept = configmap("kept", json!({}));
    kept.metadata.labels = Some([("app".to_owned(), "other".to_owned())].into());
    api.create(&PostParams::default(), &kept).await.unwrap();
    for name in ["one", "two"] {
        api.create(&PostParams::default(), &configmap(name, json!({})))
            .await
            .unwrap();
    }
    let mut held = configmap("held", json!({}));
    held.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    api.create(&PostParams::default(), &held).await.unwrap();

    let deleted = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=demo"),
        )
        .await
        .unwrap();
    let names: Vec<String> = deleted
        .left()
        .unwrap()
        .items
        .iter()
        .map(|cm| cm.name_any())
        .collect();
    assert_eq!(names, ["held", "one", "two"]);
    let left: Vec<(String, bool)> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|cm| (cm.name_any(), cm.metadata.deletion_timestamp.is_some()))
        .collect();
    assert_eq!(
        left,
        [("held".to_owned(), true), ("kept".to_owned(), false)],
        "the finalizer holds its object, marked for deletion; the other label is untouched"
    );
}

/// Marking an object for deletion is a new generation, once (kube-apiserver's graceful
/// delete; the e2e "custom-set generation on new pods and graceful delete" spec): a bound
/// pod's graceful delete takes it from 1 to 2, and a shorter grace period later does not.
#[tokio::test]
async fn a_graceful_delete_is_a_new_generation_once() {
    let c = cluster().await;
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    let pod = serde_json::from_value(json!({
        "metadata": {"name": "graceful", "generation": 100},
        "spec": {"nodeName": "elsewhere", "containers": [{"name": "c", "image": "busybox"}]}
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    pods.delete("graceful", &DeleteParams::default().grace_period(60))
        .await
        .unwrap();
    let marked = pods.get("graceful").await.unwrap();
    assert!(marked.metadata.deletion_timestamp.is_some());
    assert_eq!(marked.metadata.generation, Some(2));
    pods.delete("graceful", &DeleteParams::default().grace_period(30))
        .await
        .unwrap();
    let shortened = pods.get("graceful").await.unwrap();
    assert_eq!(shortened.metadata.deletion_grace_period_seconds, Some(30));
    assert_eq!(shortened.metadata.generation, Some(2));
}

/// A watch of a kind nothing writes still moves: bookmarks carry the store's revision, so
/// the watcher's resourceVersion does not fall behind compaction.
#[tokio::test]
async fn quiet_watches_get_bookmarks_at_the_stores_revision() {
    let c = cluster().await;
    let quiet: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let busy: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let start = quiet.list(&ListParams::default()).await.unwrap();
    let from = start.metadata.resource_version.unwrap();
    let mut events = quiet
        .watch(&WatchParams::default().timeout(60), &from)
        .await
        .unwrap()
        .boxed();
    // Other kinds move the store on.
    let written = busy
        .create(&PostParams::default(), &configmap("moving", json!({})))
        .await
        .unwrap();
    let moved: u64 = written.resource_version().unwrap().parse().unwrap();
    let bookmark = tokio::time::timeout(Duration::from_secs(45), async {
        while let Some(event) = events.try_next().await.unwrap() {
            if let WatchEvent::Bookmark(b) = event {
                let rv: u64 = b.metadata.resource_version.parse().unwrap();
                if rv >= moved {
                    return rv;
                }
            }
        }
        panic!("the watch ended without a bookmark");
    })
    .await
    .expect("no bookmark within 45 s");
    assert!(bookmark >= moved);
}
