//! Concurrent writers through kube-rs: patches that name no resourceVersion all land (the
//! server retries its own read-modify-write on a conflict, as kube-apiserver does), and a
//! patch that names a stale one is a 409.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::json;

mod common;

use common::cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_patches_without_a_resource_version_all_land() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "shared"}})).unwrap();
    let created = api.create(&PostParams::default(), &cm).await.unwrap();
    let writers = 16;
    let patches = (0..writers).map(|i| {
        let api = api.clone();
        async move {
            api.patch(
                "shared",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {format!("k{i}"): "v"}})),
            )
            .await
        }
    });
    for result in futures::future::join_all(patches).await {
        result.unwrap();
    }
    let data = api.get("shared").await.unwrap().data.unwrap();
    assert_eq!(data.len(), writers, "{data:?}");

    // Naming a resourceVersion makes it a precondition: stale is a Conflict.
    let stale = api
        .patch(
            "shared",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": created.metadata.resource_version},
                "data": {"late": "v"}
            })),
        )
        .await
        .unwrap_err();
    match stale {
        kube::Error::Api(status) => {
            assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"))
        }
        other => panic!("expected a Conflict, got {other:?}"),
    }
}
