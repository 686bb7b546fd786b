//! Admission benchmark (issue 22), one run, release build, the in-process API server over
//! SQLite as `orq server` runs it: ConfigMap creates per second, 64 at a time, with no
//! admission, then through one ValidatingAdmissionPolicy (two CEL validations, bound to its
//! own namespace), then through one validating webhook that allows everything (HTTPS on
//! loopback, its CA in `caBundle`, answered by an axum server in the same process) — side
//! by side in the same run, as ratios. What the webhook's ratio costs is the review's
//! encoding, the TLS round trip and the webhook's answer; the policy's, listing the
//! bindings and evaluating the compiled expressions.
//!
//! `cargo bench -p orq --bench admission`

#![allow(clippy::unwrap_used)]

use std::time::Instant;

use axum::Json;
use base64::Engine as _;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::{Api, Client};
use orquestra_apiserver::identity::Identity;
use orquestra_operator::testing::TestApi;
use serde_json::{Value, json};

const CONCURRENCY: usize = 64;
const CREATES: usize = 5_000;

async fn allow(Json(review): Json<Value>) -> Json<Value> {
    Json(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": review["request"]["uid"], "allowed": true}}),
    )
}

/// Serves [`allow`] over TLS on loopback: its URL and CA bundle.
async fn webhook(dir: &std::path::Path) -> (String, String) {
    let identity = Identity::load_or_create(dir, &[]).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        identity.cert_pem.into_bytes(),
        identity.key_pem.into_bytes(),
    )
    .await
    .unwrap();
    let app = axum::Router::new().route("/allow", axum::routing::post(allow));
    let serving = axum_server::from_tcp_rustls(listener, tls).unwrap();
    tokio::spawn(serving.serve(app.into_make_service()));
    (
        format!("https://127.0.0.1:{}/allow", addr.port()),
        base64::engine::general_purpose::STANDARD.encode(identity.ca_pem),
    )
}

/// Creates [`CREATES`] ConfigMaps in `namespace`, [`CONCURRENCY`] at a time: creates/s.
async fn creates(client: &Client, namespace: &str) -> f64 {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": namespace}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let started = Instant::now();
    futures::stream::iter(0..CREATES)
        .map(|i| {
            let maps = maps.clone();
            async move {
                let map: ConfigMap = serde_json::from_value(
                    json!({"metadata": {"name": format!("m{i}")}, "data": {"k": "v"}}),
                )
                .unwrap();
                maps.create(&PostParams::default(), &map).await.unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    CREATES as f64 / started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let bare = creates(&client, "bare").await;

    let resource = |kind: &str, plural: &str| ApiResource {
        group: "admissionregistration.k8s.io".into(),
        version: "v1".into(),
        api_version: "admissionregistration.k8s.io/v1".into(),
        kind: kind.into(),
        plural: plural.into(),
    };
    let policies: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &resource("ValidatingAdmissionPolicy", "validatingadmissionpolicies"),
    );
    let bindings: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &resource(
            "ValidatingAdmissionPolicyBinding",
            "validatingadmissionpolicybindings",
        ),
    );
    let policy = json!({"apiVersion": "admissionregistration.k8s.io/v1",
    "kind": "ValidatingAdmissionPolicy", "metadata": {"name": "small-maps"},
    "spec": {
        "matchConstraints": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "policy"}},
            "resourceRules": [{"operations": ["CREATE"], "apiGroups": [""],
                "apiVersions": ["v1"], "resources": ["configmaps"]}]},
        "validations": [
            {"expression": "object.data.all(k, size(object.data[k]) < 1024)",
             "message": "values must be under 1 KiB"},
            {"expression": "object.metadata.name.startsWith('m')"},
        ]}});
    policies
        .create(
            &PostParams::default(),
            &serde_json::from_value(policy).unwrap(),
        )
        .await
        .unwrap();
    let binding = json!({"apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding", "metadata": {"name": "small-maps"},
        "spec": {"policyName": "small-maps", "validationActions": ["Deny"]}});
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(binding).unwrap(),
        )
        .await
        .unwrap();
    let policed = creates(&client, "policy").await;

    let dir = tempfile::tempdir().unwrap();
    let (url, ca) = webhook(dir.path()).await;
    let configurations: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: "ValidatingWebhookConfiguration".into(),
            plural: "validatingwebhookconfigurations".into(),
        },
    );
    let configuration = json!({"apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration", "metadata": {"name": "allow"},
        "webhooks": [{"name": "allow.bench.orquestra.dev",
            "clientConfig": {"url": url, "caBundle": ca},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                "resources": ["configmaps"]}],
            "sideEffects": "None", "admissionReviewVersions": ["v1"]}]});
    configurations
        .create(
            &PostParams::default(),
            &serde_json::from_value(configuration).unwrap(),
        )
        .await
        .unwrap();
    let webhooked = creates(&client, "webhook").await;

    println!("ConfigMap creates, {CREATES} at concurrency {CONCURRENCY}:");
    println!("  no admission                {bare:>8.0}/s");
    println!(
        "  one CEL policy (2 rules)    {policed:>8.0}/s   ({:.2}x the bare rate)",
        policed / bare
    );
    println!(
        "  one validating webhook      {webhooked:>8.0}/s   ({:.2}x the bare rate)",
        webhooked / bare
    );
}
