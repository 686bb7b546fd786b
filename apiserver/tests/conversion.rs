//! A CRD served in two versions that differ in shape (v1's `hostPort` is v2's `host` and
//! `port`, as in the conformance suite's conversion test), converted by a real HTTPS
//! conversion webhook: objects written through either version are read, listed and watched
//! through both, a list stored in both versions converts in one review, and the stored form
//! is the storage version's. A webhook that answers nonsense fails reads with a Status naming
//! it; a CRD whose webhook cannot be spoken to is refused when written.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, State};
use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams, WatchEvent, WatchParams};
use serde_json::{Value, json};

/// How many reviews and how many objects the webhook has converted.
#[derive(Default)]
struct Calls {
    reviews: AtomicUsize,
    objects: AtomicUsize,
}

/// Converts each object between `hostPort` (v1) and `host` + `port` (v2); `garbage` answers
/// something that is not a review.
async fn convert(
    State(calls): State<Arc<Calls>>,
    Path(mode): Path<String>,
    Json(review): Json<Value>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if mode == "garbage" {
        return "<html>not a review</html>".into_response();
    }
    let request = &review["request"];
    let desired = request["desiredAPIVersion"].as_str().unwrap().to_owned();
    let objects = request["objects"].as_array().cloned().unwrap_or_default();
    calls.reviews.fetch_add(1, Ordering::SeqCst);
    calls.objects.fetch_add(objects.len(), Ordering::SeqCst);
    let converted: Vec<Value> = objects
        .into_iter()
        .map(|mut object| {
            let fields = object.as_object_mut().unwrap();
            if desired.ends_with("/v2") {
                if let Some(Value::String(host_port)) = fields.remove("hostPort") {
                    let (host, port) = host_port.split_once(':').unwrap();
                    fields.insert("host".into(), json!(host));
                    fields.insert("port".into(), json!(port));
                }
            } else if let (Some(Value::String(host)), Some(Value::String(port))) =
                (fields.remove("host"), fields.remove("port"))
            {
                fields.insert("hostPort".into(), json!(format!("{host}:{port}")));
            }
            fields.insert("apiVersion".into(), json!(desired));
            object
        })
        .collect();
    Json(
        json!({"apiVersion": review["apiVersion"], "kind": "ConversionReview",
        "response": {"uid": request["uid"], "convertedObjects": converted,
                     "result": {"status": "Success"}}}),
    )
    .into_response()
}

async fn webhook_server(
    dir: &std::path::Path,
    calls: Arc<Calls>,
) -> (std::net::SocketAddr, String) {
    let app = axum::Router::new()
        .route("/{mode}", axum::routing::post(convert))
        .with_state(calls);
    common::serve_tls(dir, &[], app).await
}

/// The CRD, storing `storage`, converting through `client_config`.
fn crd(storage: &str, client_config: Value) -> Value {
    let version = |name: &str, properties: Value| {
        json!({"name": name, "served": true, "storage": name == storage,
            "schema": {"openAPIV3Schema": {"type": "object", "properties": properties}}})
    };
    let v1 = version("v1", json!({"hostPort": {"type": "string"}}));
    let mut v2 = version(
        "v2",
        json!({"host": {"type": "string"}, "port": {"type": "string"}}),
    );
    v2["selectableFields"] = json!([{"jsonPath": ".host"}]);
    json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "endpoints.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "endpoints", "singular": "endpoint", "kind": "Endpoint",
                      "listKind": "EndpointList"},
            "versions": [v1, v2],
            "conversion": {"strategy": "Webhook", "webhook": {
                "clientConfig": client_config, "conversionReviewVersions": ["v1", "v1beta1"]}},
        },
    })
}

fn resource(version: &str) -> ApiResource {
    ApiResource {
        group: "example.com".into(),
        version: version.into(),
        api_version: format!("example.com/{version}"),
        kind: "Endpoint".into(),
        plural: "endpoints".into(),
    }
}

fn object(version: &str, name: &str, fields: Value) -> DynamicObject {
    let mut object = json!({"apiVersion": format!("example.com/{version}"), "kind": "Endpoint",
        "metadata": {"name": name}});
    object
        .as_object_mut()
        .unwrap()
        .extend(fields.as_object().unwrap().clone());
    serde_json::from_value(object).unwrap()
}

/// Waits until the CRD's resources are served (the registry follows the CRD's watch).
async fn served(api: &Api<DynamicObject>) {
    for _ in 0..100 {
        if api.list(&ListParams::default()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the CRD's resources are not served");
}

#[tokio::test]
async fn a_crd_with_two_versions_and_a_conversion_webhook_reads_in_both() {
    let c = common::cluster().await;
    let certs = tempfile::tempdir().unwrap();
    let calls = Arc::new(Calls::default());
    let (addr, ca) = webhook_server(certs.path(), Arc::clone(&calls)).await;
    let url = |mode: &str| json!({"url": format!("https://127.0.0.1:{}/{mode}", addr.port()), "caBundle": ca});
    let crds: Api<DynamicObject> = Api::all_with(
        c.client.clone(),
        &ApiResource::erase::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(&()),
    );
    crds.create(
        &PostParams::default(),
        &serde_json::from_value(crd("v1", url("convert"))).unwrap(),
    )
    .await
    .unwrap();
    let v1: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource("v1"));
    let v2: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource("v2"));
    served(&v2).await;

    // Written as v1 (the storage version), read as v2: converted by the webhook.
    let pp = PostParams::default();
    v1.create(
        &pp,
        &object("v1", "first", json!({"hostPort": "localhost:8080"})),
    )
    .await
    .unwrap();
    let read = v2.get("first").await.unwrap();
    assert_eq!(read.types.as_ref().unwrap().api_version, "example.com/v2");
    assert_eq!(read.data["host"], "localhost");
    assert_eq!(read.data["port"], "8080");
    assert!(read.data.get("hostPort").is_none(), "{:?}", read.data);
    assert!(calls.reviews.load(Ordering::SeqCst) >= 1);

    // Written as v2: stored as v1, and read back as v1.
    v2.create(
        &pp,
        &object("v2", "second", json!({"host": "db", "port": "5432"})),
    )
    .await
    .unwrap();
    let read = v1.get("second").await.unwrap();
    assert_eq!(read.data["hostPort"], "db:5432");
    let (_, stored) = c
        .store
        .get("/registry/example.com/endpoints/default/second", None)
        .await
        .unwrap();
    let stored: Value = serde_json::from_slice(&stored.unwrap().value).unwrap();
    assert_eq!(stored["apiVersion"], "example.com/v1");
    assert_eq!(stored["hostPort"], "db:5432");

    // The storage version moves to v2: a new object is stored as v2, the old stay v1, and a
    // list in either version holds both, converted in one review.
    let mut moved: DynamicObject = crds.get("endpoints.example.com").await.unwrap();
    moved.data["spec"] = crd("v2", url("convert"))["spec"].clone();
    crds.replace("endpoints.example.com", &pp, &moved)
        .await
        .unwrap();
    let mut created = false;
    for _ in 0..100 {
        v1.create(
            &pp,
            &object("v1", "third", json!({"hostPort": "cache:6379"})),
        )
        .await
        .unwrap();
        let (_, stored) = c
            .store
            .get("/registry/example.com/endpoints/default/third", None)
            .await
            .unwrap();
        let stored: Value = serde_json::from_slice(&stored.unwrap().value).unwrap();
        if stored["apiVersion"] == "example.com/v2" {
            created = true;
            break;
        }
        // The registry had not followed the CRD yet: try again.
        v1.delete("third", &Default::default()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(created, "the new storage version was never used");
    let before = calls.reviews.load(Ordering::SeqCst);
    let as_v1 = v1.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        calls.reviews.load(Ordering::SeqCst),
        before + 1,
        "one review per list"
    );
    let mut host_ports: Vec<&str> = as_v1
        .items
        .iter()
        .map(|o| o.data["hostPort"].as_str().unwrap())
        .collect();
    host_ports.sort();
    assert_eq!(host_ports, ["cache:6379", "db:5432", "localhost:8080"]);
    let as_v2 = v2.list(&ListParams::default()).await.unwrap();
    let mut hosts: Vec<&str> = as_v2
        .items
        .iter()
        .map(|o| o.data["host"].as_str().unwrap())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["cache", "db", "localhost"]);
    assert!(as_v2.items.iter().all(|o| o.data.get("hostPort").is_none()));

    // A field selector names the requested version's fields: v2's `host`, which the objects
    // stored as v1 only have once converted.
    let db = v2
        .list(&ListParams::default().fields("host=db"))
        .await
        .unwrap();
    let names: Vec<_> = db
        .items
        .iter()
        .map(|o| o.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["second"]);
    let mut selected = v2
        .watch(
            &WatchParams::default().fields("host=localhost").timeout(10),
            "0",
        )
        .await
        .unwrap()
        .boxed();
    let first = tokio::time::timeout(Duration::from_secs(10), selected.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let WatchEvent::Added(first) = first else {
        panic!("expected ADDED, got {first:?}");
    };
    assert_eq!(first.metadata.name.as_deref(), Some("first"));

    // Watched as v1 from the list: an update written as v2 arrives converted.
    let rv = as_v1.metadata.resource_version.unwrap();
    let mut events = v1
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .unwrap()
        .boxed();
    let mut changed = v2.get("first").await.unwrap();
    changed.data["port"] = json!("9090");
    v2.replace("first", &pp, &changed).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.try_next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let WatchEvent::Modified(object) = event else {
        panic!("expected MODIFIED, got {event:?}");
    };
    assert_eq!(object.data["hostPort"], "localhost:9090");
    assert_eq!(object.types.unwrap().api_version, "example.com/v1");
}

#[tokio::test]
async fn a_conversion_webhook_that_fails_or_cannot_be_spoken_to_is_named() {
    let c = common::cluster().await;
    let certs = tempfile::tempdir().unwrap();
    let (addr, ca) = webhook_server(certs.path(), Arc::default()).await;
    let crds: Api<DynamicObject> = Api::all_with(
        c.client.clone(),
        &ApiResource::erase::<
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        >(&()),
    );
    let pp = PostParams::default();

    // Refused when written: no review version this server sends, no way to reach it.
    let mut unspoken = crd("v1", json!({"url": "https://127.0.0.1:1/x"}));
    unspoken["spec"]["conversion"]["webhook"]["conversionReviewVersions"] = json!(["v2"]);
    let error = crds
        .create(&pp, &serde_json::from_value(unspoken).unwrap())
        .await
        .unwrap_err();
    let kube::Error::Api(status) = error else {
        panic!("expected a Status, got {error:?}");
    };
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains("conversionReviewVersions"),
        "{}",
        status.message
    );
    let unreachable = crd("v1", json!({"caBundle": ca}));
    let error = crds
        .create(&pp, &serde_json::from_value(unreachable).unwrap())
        .await
        .unwrap_err();
    let kube::Error::Api(status) = error else {
        panic!("expected a Status, got {error:?}");
    };
    assert!(
        status.message.contains("exactly one of url or service"),
        "{}",
        status.message
    );

    // A webhook answering garbage: the write in the storage version works, a read that needs
    // conversion fails with a 500 naming the kind and the failure.
    let garbage =
        json!({"url": format!("https://127.0.0.1:{}/garbage", addr.port()), "caBundle": ca});
    crds.create(&pp, &serde_json::from_value(crd("v1", garbage)).unwrap())
        .await
        .unwrap();
    let v1: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource("v1"));
    let v2: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource("v2"));
    served(&v2).await;
    v1.create(
        &pp,
        &object("v1", "first", json!({"hostPort": "localhost:8080"})),
    )
    .await
    .unwrap();
    let error = v2.get("first").await.unwrap_err();
    let kube::Error::Api(status) = error else {
        panic!("expected a Status, got {error:?}");
    };
    assert_eq!(status.code, 500, "{status:?}");
    assert!(
        status
            .message
            .contains("conversion webhook for example.com/v1, Kind=Endpoint failed"),
        "{}",
        status.message
    );
    assert!(
        status.message.contains("not a ConversionReview"),
        "{}",
        status.message
    );
    // Deleting still works: the object is not held hostage by its webhook.
    v2.delete("first", &Default::default()).await.unwrap();
    assert!(
        v1.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
