//! LimitRanges and ResourceQuotas against the in-process API server and its quota status
//! loop: a pod gets a LimitRange's defaults and is held to its bounds; a quota's status counts
//! what its namespace holds, a create that would exceed it is refused naming the quota, what
//! is deleted is given back, and a quota on compute resources needs every container to state
//! them; a running pod's resources cannot be changed.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, LimitRange, Pod, ResourceQuota};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::{Value, json};

fn pod(name: &str, resources: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox", "resources": resources}]},
    }))
    .unwrap()
}

fn refusal(err: kube::Error) -> (u16, String) {
    match err {
        kube::Error::Api(status) => (status.code, status.message),
        other => panic!("not an API error: {other}"),
    }
}

#[tokio::test]
async fn limit_ranges_default_and_bound_pods() {
    let c = common::cluster().await;
    let ranges: Api<LimitRange> = Api::namespaced(c.client.clone(), "default");
    let range: LimitRange = serde_json::from_value(json!({
        "metadata": {"name": "limits"},
        "spec": {"limits": [{"type": "Container",
            "min": {"cpu": "100m", "memory": "50Mi"},
            "max": {"cpu": "500m", "memory": "500Mi"},
            "defaultRequest": {"cpu": "200m"}}]},
    }))
    .unwrap();
    let created = ranges.create(&PostParams::default(), &range).await.unwrap();
    let item = serde_json::to_value(&created.spec.unwrap().limits[0]).unwrap();
    assert_eq!(item["default"], json!({"cpu": "500m", "memory": "500Mi"}));

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let defaulted = pods
        .create(&PostParams::default(), &pod("plain", json!({})))
        .await
        .unwrap();
    let resources = serde_json::to_value(&defaulted.spec.unwrap().containers[0].resources).unwrap();
    assert_eq!(
        resources,
        json!({"limits": {"cpu": "500m", "memory": "500Mi"},
               "requests": {"cpu": "200m", "memory": "500Mi"}})
    );
    assert!(
        defaulted.metadata.annotations.unwrap()["kubernetes.io/limit-ranger"]
            .starts_with("LimitRanger plugin set:")
    );

    let (code, message) = refusal(
        pods.create(
            &PostParams::default(),
            &pod(
                "big",
                json!({"requests": {"cpu": "50m"}, "limits": {"cpu": "2"}}),
            ),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert_eq!(
        message,
        "pods \"big\" is forbidden: [minimum cpu usage per Container is 100m, but request is 50m, maximum cpu usage per Container is 500m, but limit is 2]"
    );
}

/// Polls the quota until `used` holds what `expected` says.
async fn wait_used(quotas: &Api<ResourceQuota>, expected: &[(&str, &str)]) -> ResourceQuota {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let quota = quotas.get("quota").await.unwrap();
        let used = quota
            .status
            .as_ref()
            .and_then(|s| s.used.clone())
            .unwrap_or_default();
        let parse = |s: &str| orquestra_apiserver::quantity::Quantity::parse(s).unwrap();
        if expected
            .iter()
            .all(|(k, v)| used.get(*k).is_some_and(|q| parse(&q.0) == parse(v)))
        {
            return quota;
        }
        assert!(
            Instant::now() < deadline,
            "used {used:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn resource_quotas_count_refuse_and_give_back() {
    let c = common::cluster().await;
    tokio::spawn(orquestra_apiserver::quota::status::run(c.engine.clone()));
    let quotas: Api<ResourceQuota> = Api::namespaced(c.client.clone(), "default");
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "quota"},
        "spec": {"hard": {"pods": "1", "requests.cpu": "1", "memory": "500Mi",
                          "configmaps": "2", "count/replicasets.apps": "1", "resourcequotas": "1"}},
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &quota).await.unwrap();
    let counted = wait_used(
        &quotas,
        &[
            ("pods", "0"),
            ("requests.cpu", "0"),
            ("resourcequotas", "1"),
        ],
    )
    .await;
    assert_eq!(
        serde_json::to_value(&counted.status.unwrap().hard).unwrap(),
        serde_json::to_value(&quota.spec.unwrap().hard).unwrap()
    );

    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let fits = json!({"requests": {"cpu": "500m", "memory": "252Mi"}});
    pods.create(&PostParams::default(), &pod("one", fits.clone()))
        .await
        .unwrap();
    // Charged at admission, before the status loop has seen the pod.
    let charged = quotas
        .get("quota")
        .await
        .unwrap()
        .status
        .unwrap()
        .used
        .unwrap();
    assert_eq!(charged["pods"].0, "1");
    assert_eq!(charged["memory"].0, "252Mi");

    let (code, message) = refusal(
        pods.create(&PostParams::default(), &pod("two", fits.clone()))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.starts_with("pods \"two\" is forbidden: exceeded quota: quota, requested: ")
            && message.contains("pods=1")
            && message.contains("limited: ")
            && message.contains("pods=1"),
        "{message}"
    );
    let (code, message) = refusal(
        pods.create(&PostParams::default(), &pod("bare", json!({})))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 403);
    assert!(
        message.contains("failed quota: quota: must specify memory for: c; requests.cpu for: c"),
        "{message}"
    );

    // A running pod's resources are fixed.
    let mut changed = pods.get("one").await.unwrap();
    changed.spec.as_mut().unwrap().containers[0].resources = Some(
        serde_json::from_value(json!({"requests": {"cpu": "100m", "memory": "252Mi"}})).unwrap(),
    );
    let (code, message) = refusal(
        pods.replace("one", &PostParams::default(), &changed)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 422);
    assert!(
        message.contains("pod updates may not change fields"),
        "{message}"
    );

    // Object counts, and what is deleted is given back.
    let configmaps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for name in ["a", "b"] {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        configmaps
            .create(&PostParams::default(), &cm)
            .await
            .unwrap();
    }
    let third: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "c"}})).unwrap();
    assert_eq!(
        refusal(
            configmaps
                .create(&PostParams::default(), &third)
                .await
                .unwrap_err()
        )
        .0,
        403
    );
    pods.delete("one", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    configmaps
        .delete("a", &DeleteParams::default())
        .await
        .unwrap();
    wait_used(
        &quotas,
        &[
            ("pods", "0"),
            ("requests.cpu", "0"),
            ("memory", "0"),
            ("configmaps", "1"),
        ],
    )
    .await;
    pods.create(&PostParams::default(), &pod("two", fits))
        .await
        .unwrap();
}
