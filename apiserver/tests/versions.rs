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
