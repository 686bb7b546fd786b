//! A kind served in two versions (the HorizontalPodAutoscaler: autoscaling/v2 stored,
//! autoscaling/v1 converted): written through either, read through either — get, list and
//! watch — with v1's CPU target and v2's metrics meaning the same, and discovery listing
//! both with v2 preferred.

#![allow(clippy::unwrap_used)]

mod common;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::autoscaling::{v1, v2};
use kube::Api;
use kube::api::{ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::json;

#[tokio::test]
async fn an_hpa_is_served_as_v2_and_v1() {
    let c = common::cluster().await;
    let new: Api<v2::HorizontalPodAutoscaler> = Api::namespaced(c.client.clone(), "default");
    let old: Api<v1::HorizontalPodAutoscaler> = Api::namespaced(c.client.clone(), "default");
    let hpa: v2::HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
            "minReplicas": 1, "maxReplicas": 5,
            "metrics": [
                {"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 60}}},
                {"type": "Pods", "pods": {"metric": {"name": "qps"},
                    "target": {"type": "AverageValue", "averageValue": "1k"}}},
            ],
        },
    }))
    .unwrap();
    new.create(&PostParams::default(), &hpa).await.unwrap();

    let as_v1 = old.get("web").await.unwrap();
    assert_eq!(as_v1.spec.target_cpu_utilization_percentage, Some(60));
    assert_eq!(as_v1.spec.max_replicas, 5);
    let listed = old.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        listed.items[0].spec.target_cpu_utilization_percentage,
        Some(60)
    );

    // Changed through v1: v2 sees the new target and still has the metric v1 cannot say.
    let mut changed = as_v1.clone();
    changed.spec.target_cpu_utilization_percentage = Some(75);
    old.replace("web", &PostParams::default(), &changed)
        .await
        .unwrap();
    let as_v2 = new.get("web").await.unwrap();
    let metrics = as_v2.spec.metrics.unwrap();
    assert_eq!(metrics.len(), 2, "{metrics:?}");
    assert_eq!(
        metrics[0]
            .resource
            .as_ref()
            .unwrap()
            .target
            .average_utilization,
        Some(75)
    );
    assert_eq!(metrics[1].type_, "Pods");

    // Created through v1; watched through v1 from a resourceVersion.
    let rv = listed.metadata.resource_version.unwrap();
    let made: v1::HorizontalPodAutoscaler = serde_json::from_value(json!({
        "metadata": {"name": "api"},
        "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "api"},
                 "maxReplicas": 3, "targetCPUUtilizationPercentage": 50},
    }))
    .unwrap();
    old.create(&PostParams::default(), &made).await.unwrap();
    let stored = new.get("api").await.unwrap();
    assert_eq!(stored.spec.metrics.unwrap().len(), 1);
    let mut events = old
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(h) | WatchEvent::Modified(h) => seen.push((
                h.metadata.name.unwrap(),
                h.spec.target_cpu_utilization_percentage,
            )),
            _ => {}
        }
    }
    assert_eq!(
        seen,
        [("web".to_owned(), Some(75)), ("api".to_owned(), Some(50))]
    );

    let group: serde_json::Value =
        serde_json::from_str(&c.raw_get("/apis/autoscaling").await.1).unwrap();
    assert_eq!(group["preferredVersion"]["version"], "v2");
    assert_eq!(group["versions"].as_array().unwrap().len(), 2);
}

/// One resource, two APIs: an `events.k8s.io/v1` Event is a core `v1` Event under other
/// field names. Written through either, it is read, listed, selected, patched, watched and
/// deleted through both, as the conformance "Events API" specs check.
#[tokio::test]
async fn events_are_one_resource_in_two_groups() {
    use k8s_openapi::api::core::v1::Event as CoreEvent;
    use k8s_openapi::api::events::v1::Event;
    use kube::api::{DeleteParams, Patch, PatchParams};

    let c = common::cluster().await;
    let events: Api<Event> = Api::namespaced(c.client.clone(), "default");
    let core: Api<CoreEvent> = Api::namespaced(c.client.clone(), "default");
    let rv = core
        .list(&ListParams::default())
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    let written: Event = serde_json::from_value(json!({
        "metadata": {"name": "e1", "labels": {"test": "true"}},
        "regarding": {"kind": "Pod", "name": "web", "namespace": "default"},
        "eventTime": "2017-09-19T13:49:16.000000Z",
        "note": "This is e1", "action": "Do", "reason": "Test", "type": "Normal",
        "reportingController": "test-controller", "reportingInstance": "test-node",
    }))
    .unwrap();
    let created = events
        .create(&PostParams::default(), &written)
        .await
        .unwrap();
    assert_eq!(created.note.as_deref(), Some("This is e1"));

    // Through the core API: the same object, under core names; `source` falls back to the
    // reporting controller.
    let as_core = core.get("e1").await.unwrap();
    assert_eq!(as_core.message.as_deref(), Some("This is e1"));
    assert_eq!(as_core.involved_object.name.as_deref(), Some("web"));
    assert_eq!(
        as_core.reporting_component.as_deref(),
        Some("test-controller")
    );
    let by = |s: &str| ListParams::default().fields(s);
    let names = |list: Vec<CoreEvent>| -> Vec<String> {
        list.into_iter().map(|e| e.metadata.name.unwrap()).collect()
    };
    assert_eq!(
        names(
            core.list(&by("source=test-controller"))
                .await
                .unwrap()
                .items
        ),
        ["e1"]
    );
    let selected = events
        .list(&by(
            "reportingController=test-controller,regarding.name=web",
        ))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 1);
    assert!(
        events
            .list(&by("regarding.name=db"))
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let all: Api<Event> = Api::all(c.client.clone());
    assert_eq!(
        all.list(&ListParams::default().labels("test=true"))
            .await
            .unwrap()
            .items
            .len(),
        1
    );

    // A strategic merge patch through events.k8s.io; the read-back equals what was sent.
    let patched = events
        .patch(
            "e1",
            &PatchParams::default(),
            &Patch::Strategic(
                json!({"series": {"count": 2, "lastObservedTime": "2017-09-19T13:49:11.000000Z"}}),
            ),
        )
        .await
        .unwrap();
    let mut expected = created.clone();
    expected.series = patched.series.clone();
    expected.metadata.resource_version = None;
    expected.metadata.managed_fields = None;
    let mut got = events.get("e1").await.unwrap();
    assert_eq!(got.series.as_ref().unwrap().count, 2);
    got.metadata.resource_version = None;
    got.metadata.managed_fields = None;
    assert_eq!(got, expected);

    // Written through the core API, watched through events.k8s.io.
    let mut watch = events
        .watch(&WatchParams::default().fields("reason=Pulled"), &rv)
        .await
        .unwrap()
        .boxed();
    let old: CoreEvent = serde_json::from_value(json!({
        "metadata": {"name": "e2"},
        "involvedObject": {"kind": "Pod", "name": "web", "namespace": "default"},
        "reason": "Pulled", "message": "pulled", "type": "Normal", "count": 3,
        "source": {"component": "kubelet"},
    }))
    .unwrap();
    core.create(&PostParams::default(), &old).await.unwrap();
    let seen = loop {
        if let WatchEvent::Added(e) = watch.try_next().await.unwrap().unwrap() {
            break e;
        }
    };
    assert_eq!(seen.metadata.name.as_deref(), Some("e2"));
    assert_eq!(seen.deprecated_count, Some(3));
    assert_eq!(
        seen.deprecated_source.unwrap().component.as_deref(),
        Some("kubelet")
    );

    // Deleted through events.k8s.io, gone from both.
    events
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("test=true"),
        )
        .await
        .unwrap();
    assert_eq!(
        names(core.list(&ListParams::default()).await.unwrap().items),
        ["e2"]
    );
}

/// A CRD served in v1 and v2 without a conversion webhook: objects are relabelled between
/// them. After the storage version moves to v2, objects written before are still stored as
/// v1 — and still read back (get, list, watch) in whichever version is asked for.
#[tokio::test]
async fn a_crds_objects_read_in_every_version_after_the_storage_version_moves() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

    let c = common::cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd = |storage: &str| -> CustomResourceDefinition {
        let version = |name: &str| {
            json!({"name": name, "served": true, "storage": name == storage,
                   "schema": {"openAPIV3Schema": {"type": "object",
                       "x-kubernetes-preserve-unknown-fields": true}}})
        };
        serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "gadgets.example.com"},
            "spec": {"group": "example.com", "scope": "Namespaced",
                     "names": {"plural": "gadgets", "kind": "Gadget"},
                     "versions": [version("v1"), version("v2")]}
        }))
        .unwrap()
    };
    crds.create(&PostParams::default(), &crd("v1"))
        .await
        .unwrap();
    let api = |version: &str| -> Api<DynamicObject> {
        let gvk = GroupVersionKind::gvk("example.com", version, "Gadget");
        Api::namespaced_with(
            c.client.clone(),
            "default",
            &ApiResource::from_gvk_with_plural(&gvk, "gadgets"),
        )
    };
    let gadget: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "example.com/v1", "kind": "Gadget",
        "metadata": {"name": "g"}, "spec": {"size": 1}}))
    .unwrap();
    api("v1")
        .create(&PostParams::default(), &gadget)
        .await
        .unwrap();

    // v2 becomes the storage version; the object is still stored as v1.
    crds.patch(
        "gadgets.example.com",
        &PatchParams::default(),
        &Patch::Merge(serde_json::to_value(crd("v2")).unwrap()),
    )
    .await
    .unwrap();
    let stored = crds.get("gadgets.example.com").await.unwrap();
    assert_eq!(
        stored.status.unwrap().stored_versions.unwrap(),
        vec!["v1", "v2"],
        "both versions have been storage versions"
    );
    for version in ["v1", "v2"] {
        let read = api(version).get("g").await.unwrap();
        let api_version = read.types.unwrap().api_version;
        assert_eq!(api_version, format!("example.com/{version}"));
        let listed = api(version).list(&ListParams::default()).await.unwrap();
        assert_eq!(
            listed.items[0].types.as_ref().unwrap().api_version,
            format!("example.com/{version}")
        );
        let mut events = api(version)
            .watch(&WatchParams::default(), "0")
            .await
            .unwrap()
            .boxed();
        match events.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(o) => {
                assert_eq!(
                    o.types.unwrap().api_version,
                    format!("example.com/{version}")
                );
            }
            other => panic!("{other:?}"),
        }
    }
    // A patch through v2 answers in v2 (client-go refuses anything else).
    let patched = api("v2")
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 2}})),
        )
        .await
        .unwrap();
    assert_eq!(patched.types.unwrap().api_version, "example.com/v2");
}
