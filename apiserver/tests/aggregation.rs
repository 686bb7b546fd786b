//! API aggregation through the API: an APIService backed by a Service (without a selector,
//! its Endpoints an in-process HTTPS "extension API server" with its own CA in `caBundle`)
//! makes `wardle.example.com/v1alpha1` served — listed in discovery (legacy and aggregated),
//! its requests proxied with the caller in the front-proxy headers — and `Available` once
//! its server answers; an APIService whose Service has no endpoints answers 503.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::HeaderMap;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, ListParams, PostParams};
use orquestra_apiserver::identity::Identity;
use serde_json::{Value, json};

/// What the extension server saw: each request's `X-Remote-User` and `X-Remote-Group`s.
type Seen = Arc<Mutex<Vec<(String, Vec<String>)>>>;

fn remember(seen: &Seen, headers: &HeaderMap) {
    let user = headers
        .get("x-remote-user")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let groups = headers
        .get_all("x-remote-group")
        .iter()
        .filter_map(|v| v.to_str().ok().map(str::to_owned))
        .collect();
    seen.lock().unwrap().push((user, groups));
}

async fn extension_server(dir: &std::path::Path, seen: Seen) -> (std::net::SocketAddr, String) {
    use axum::routing::get;
    let resources = |State(seen): State<Seen>, headers: HeaderMap| async move {
        remember(&seen, &headers);
        Json(json!({"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": "wardle.example.com/v1alpha1",
            "resources": [{"name": "flunders", "singularName": "flunder", "namespaced": true,
                "kind": "Flunder", "verbs": ["create", "get", "list"]}]}))
    };
    let flunders = |State(seen): State<Seen>, headers: HeaderMap| async move {
        remember(&seen, &headers);
        Json(
            json!({"kind": "FlunderList", "apiVersion": "wardle.example.com/v1alpha1",
            "metadata": {"resourceVersion": "1"},
            "items": [{"kind": "Flunder", "apiVersion": "wardle.example.com/v1alpha1",
                "metadata": {"name": "rest-flunder", "namespace": "default"}}]}),
        )
    };
    let create = |State(seen): State<Seen>, headers: HeaderMap, Json(mut body): Json<Value>| async move {
        remember(&seen, &headers);
        body["metadata"]["uid"] = json!("made-by-the-extension");
        (axum::http::StatusCode::CREATED, Json(body))
    };
    let app = axum::Router::new()
        .route("/apis/wardle.example.com/v1alpha1", get(resources))
        .route(
            "/apis/wardle.example.com/v1alpha1/namespaces/default/flunders",
            get(flunders).post(create),
        )
        .with_state(seen);
    common::serve_tls(dir, &["api.default.svc".into()], app).await
}

fn dynamic(c: &common::Cluster, resource: ApiResource) -> Api<DynamicObject> {
    Api::all_with(c.client.clone(), &resource)
}

fn erased<K: kube::Resource<DynamicType = ()>>() -> ApiResource {
    ApiResource::erase::<K>(&())
}

async fn create(api: &Api<DynamicObject>, object: Value) {
    api.create(
        &PostParams::default(),
        &serde_json::from_value(object).unwrap(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn an_api_service_serves_its_group_through_the_proxy() {
    let c = common::cluster().await;
    let ours = tempfile::tempdir().unwrap();
    let front_proxy = Identity::load_or_create(ours.path(), &[])
        .unwrap()
        .front_proxy;
    assert!(front_proxy.cert_pem.contains("BEGIN CERTIFICATE"));
    c.engine.set_front_proxy(front_proxy);
    tokio::spawn(orquestra_apiserver::aggregator::availability::run(
        c.engine.clone(),
    ));
    let theirs = tempfile::tempdir().unwrap();
    let seen = Seen::default();
    let (addr, ca) = extension_server(theirs.path(), Arc::clone(&seen)).await;

    use k8s_openapi::api::core::v1::{Endpoints, Service};
    let services =
        Api::<DynamicObject>::namespaced_with(c.client.clone(), "default", &erased::<Service>());
    let endpoints =
        Api::<DynamicObject>::namespaced_with(c.client.clone(), "default", &erased::<Endpoints>());
    create(
        &services,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api"},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": addr.port()}]}}),
    )
    .await;
    create(
        &endpoints,
        json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "api"},
        "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
                     "ports": [{"name": "https", "port": addr.port()}]}]}),
    )
    .await;
    let api_services = dynamic(
        &c,
        erased::<k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService>(),
    );
    create(
        &api_services,
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1alpha1.wardle.example.com"},
        "spec": {"group": "wardle.example.com", "version": "v1alpha1", "caBundle": ca,
                 "service": {"namespace": "default", "name": "api", "port": 443},
                 "groupPriorityMinimum": 2000, "versionPriority": 200}}),
    )
    .await;

    // Discovery: the group in /apis and /apis/GROUP, the resources from its server.
    let (code, groups) = c.raw_get("/apis").await;
    assert_eq!(code, 200);
    assert!(groups.contains("\"wardle.example.com\""), "{groups}");
    let (code, group) = c.raw_get("/apis/wardle.example.com").await;
    assert_eq!(code, 200, "{group}");
    let (code, resources) = c.raw_get("/apis/wardle.example.com/v1alpha1").await;
    assert_eq!(code, 200, "{resources}");
    assert!(resources.contains("flunders"), "{resources}");
    let discovery = kube::Discovery::new(c.client.clone())
        .run_aggregated()
        .await
        .unwrap();
    let wardle = discovery
        .groups()
        .find(|g| g.name() == "wardle.example.com")
        .expect("wardle.example.com in aggregated discovery");
    let (flunder, caps) = &wardle.recommended_resources()[0];
    assert_eq!(
        (flunder.plural.as_str(), flunder.kind.as_str()),
        ("flunders", "Flunder")
    );
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);

    // Requests are proxied, with who asked in the front-proxy headers.
    let flunders = Api::<DynamicObject>::namespaced_with(c.client.clone(), "default", flunder);
    let made = flunders
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"apiVersion": "wardle.example.com/v1alpha1",
                "kind": "Flunder", "metadata": {"name": "test-flunder"}}))
            .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(made.metadata.uid.as_deref(), Some("made-by-the-extension"));
    let listed = flunders.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        listed.items[0].metadata.name.as_deref(),
        Some("rest-flunder")
    );
    let (user, groups) = seen.lock().unwrap().last().cloned().unwrap();
    // This server does not authenticate: its callers are kube's old insecure-port user.
    assert_eq!(
        user, "system:unsecured",
        "the caller is named to the extension server"
    );
    assert!(groups.contains(&"system:masters".to_owned()), "{groups:?}");

    // Available once its server answers.
    let mut available = Value::Null;
    for _ in 0..100 {
        let current = api_services
            .get("v1alpha1.wardle.example.com")
            .await
            .unwrap();
        available = current.data["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Available").cloned())
            .unwrap_or_default();
        if available["status"] == "True" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(available["status"], "True", "{available}");

    // An APIService whose Service has no ready endpoint: 503, naming it.
    create(
        &services,
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "gone"},
        "spec": {"ports": [{"name": "https", "port": 443, "targetPort": 443}]}}),
    )
    .await;
    create(
        &api_services,
        json!({"apiVersion": "apiregistration.k8s.io/v1", "kind": "APIService",
        "metadata": {"name": "v1.gone.example.com"},
        "spec": {"group": "gone.example.com", "version": "v1", "caBundle": ca,
                 "service": {"namespace": "default", "name": "gone", "port": 443},
                 "groupPriorityMinimum": 2000, "versionPriority": 200}}),
    )
    .await;
    let (code, body) = c
        .raw_get("/apis/gone.example.com/v1/namespaces/default/things")
        .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("v1.gone.example.com"), "{body}");
}
