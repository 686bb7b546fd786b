//! Admission webhooks through the API: a real HTTPS webhook server (its own CA, trusted via
//! `caBundle`) called by URL and behind a Service with hand-written Endpoints; denials,
//! JSONPatch mutations, timeouts under `Fail` and `Ignore`, and every way a webhook can
//! fail — each a `Status` naming the webhook and the failure, nothing written.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use axum::Json;
use axum::extract::Path;
use base64::Engine as _;
use common::cluster;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{DeleteParams, DynamicObject, PostParams};
use orquestra_apiserver::identity::Identity;
use serde_json::{Value, json};

/// Answers a review as `mode` says.
async fn answer(Path(mode): Path<String>, Json(review): Json<Value>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let uid = review["request"]["uid"].clone();
    let allowed = |extra: Value| {
        let mut response = json!({"uid": uid, "allowed": true});
        if let (Some(r), Some(e)) = (response.as_object_mut(), extra.as_object()) {
            r.extend(e.clone());
        }
        Json(
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": response}),
        )
        .into_response()
    };
    match mode.as_str() {
        "allow" => allowed(json!({"warnings": ["looked at by allow"]})),
        "deny" => {
            let name = review["request"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let user = review["request"]["userInfo"]["username"].clone();
            Json(
                json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "response": {"uid": uid, "allowed": false, "status": {"code": 403,
                    "reason": "Forbidden",
                    "message": format!("{name} is not welcome ({user} asked)")}}}),
            )
            .into_response()
        }
        "mutate" => {
            let patch = json!([{"op": "add", "path": "/data/added-by", "value": "webhook"}]);
            allowed(json!({"patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch.to_string())}))
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            allowed(json!({}))
        }
        "garbage" => "<html>not a review</html>".into_response(),
        "error" => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "boom").into_response(),
        "wrong-uid" => Json(json!({"apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview", "response": {"uid": "someone-else", "allowed": true}}))
        .into_response(),
        _ => (axum::http::StatusCode::NOT_FOUND, "no such mode").into_response(),
    }
}

/// Serves [`answer`] over TLS with a certificate for 127.0.0.1 and `sans`; its address and
/// the CA (base64 PEM, as `caBundle` holds it).
async fn webhook_server(dir: &std::path::Path, sans: &[String]) -> (std::net::SocketAddr, String) {
    let app = axum::Router::new().route("/{mode}", axum::routing::post(answer));
    common::serve_tls(dir, sans, app).await
}

/// A webhook on ConfigMap creates labelled `hook: <label>`.
fn hook(name: &str, label: &str, client_config: Value, extra: Value) -> Value {
    let mut hook = json!({
        "name": name,
        "clientConfig": client_config,
        "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["configmaps"]}],
        "objectSelector": {"matchLabels": {"hook": label}},
        "sideEffects": "None",
        "admissionReviewVersions": ["v1"],
        "timeoutSeconds": 1,
    });
    if let (Some(h), Some(e)) = (hook.as_object_mut(), extra.as_object()) {
        h.extend(e.clone());
    }
    hook
}

async fn configure(
    c: &common::Cluster,
    kind: &str,
    name: &str,
    webhooks: Vec<Value>,
) -> Api<DynamicObject> {
    let plural = format!("{}s", kind.to_lowercase());
    let api = Api::<DynamicObject>::all_with(
        c.client.clone(),
        &kube::api::ApiResource {
            group: "admissionregistration.k8s.io".into(),
            version: "v1".into(),
            api_version: "admissionregistration.k8s.io/v1".into(),
            kind: kind.into(),
            plural,
        },
    );
    let configuration = json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
        "metadata": {"name": name}, "webhooks": webhooks});
    api.create(
        &PostParams::default(),
        &serde_json::from_value(configuration).unwrap(),
    )
    .await
    .unwrap();
    api
}

fn config_map(name: &str, hook: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name, "labels": {"hook": hook}},
        "data": {"k": "v"}}))
    .unwrap()
}

/// Creates a ConfigMap labelled for `hook`; the Status it failed with.
async fn refused(maps: &Api<ConfigMap>, name: &str, hook: &str) -> kube::core::Status {
    match maps
        .create(&PostParams::default(), &config_map(name, hook))
        .await
    {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("{name}: expected a refusal, got {other:?}"),
    }
}

/// An upgrade request (as kubectl attach sends) on its own connection: status and body.
async fn upgrade(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\n\
         Upgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    // Until the Status body has arrived (the server keeps the connection open).
    while !String::from_utf8_lossy(&answer).contains("\"code\"") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer))
            .await
            .unwrap()
            .unwrap();
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let text = String::from_utf8_lossy(&answer).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

#[tokio::test]
async fn webhooks_deny_mutate_time_out_and_fail_with_a_status_naming_them() {
    let c = cluster().await;
    let certs = tempfile::tempdir().unwrap();
    let (addr, ca) = webhook_server(certs.path(), &["hooks.default.svc".into()]).await;
    let untrusted = tempfile::tempdir().unwrap();
    let other_ca = Identity::load_or_create(untrusted.path(), &[])
        .unwrap()
        .ca_pem;
    let other_ca = base64::engine::general_purpose::STANDARD.encode(other_ca);
    let url = |mode: &str| {
        json!({"url": format!("https://127.0.0.1:{}/{mode}", addr.port()),
        "caBundle": ca})
    };

    // Behind a Service without a selector: its Endpoints are the webhook server.
    let services: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "default",
        &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Service>(&()),
    );
    let service = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hooks"},
        "spec": {"ports": [{"name": "https", "port": 8443, "targetPort": addr.port()}]}});
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(service).unwrap(),
        )
        .await
        .unwrap();
    let endpoints: Api<DynamicObject> = Api::namespaced_with(
        c.client.clone(),
        "default",
        &kube::api::ApiResource::erase::<k8s_openapi::api::core::v1::Endpoints>(&()),
    );
    let addresses = json!({"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": "hooks"},
        "subsets": [{"addresses": [{"ip": "127.0.0.1"}],
            "ports": [{"name": "https", "port": addr.port()}]}]});
    endpoints
        .create(
            &PostParams::default(),
            &serde_json::from_value(addresses).unwrap(),
        )
        .await
        .unwrap();
    let service = |path: &str| {
        // The Service's port is not the endpoint's: the call goes to the endpoint's.
        json!({"service": {"namespace": "default", "name": "hooks", "port": 8443,
        "path": path}, "caBundle": ca})
    };

    configure(
        &c,
        "MutatingWebhookConfiguration",
        "e2e",
        vec![hook(
            "mutate.e2e.orquestra.dev",
            "mutate",
            url("mutate"),
            json!({}),
        )],
    )
    .await;
    let validating = configure(
        &c,
        "ValidatingWebhookConfiguration",
        "e2e",
        vec![
            hook(
                "deny.e2e.orquestra.dev",
                "deny",
                service("/deny"),
                json!({}),
            ),
            hook(
                "allow.e2e.orquestra.dev",
                "allow",
                service("/allow"),
                json!({}),
            ),
            hook(
                "slow-fail.e2e.orquestra.dev",
                "slow-fail",
                url("slow"),
                json!({}),
            ),
            hook(
                "slow-ignore.e2e.orquestra.dev",
                "slow-ignore",
                url("slow"),
                json!({"failurePolicy": "Ignore"}),
            ),
            hook(
                "garbage.e2e.orquestra.dev",
                "garbage",
                url("garbage"),
                json!({}),
            ),
            hook("error.e2e.orquestra.dev", "error", url("error"), json!({})),
            hook(
                "wrong-uid.e2e.orquestra.dev",
                "wrong-uid",
                url("wrong-uid"),
                json!({}),
            ),
            hook(
                "untrusted.e2e.orquestra.dev",
                "untrusted",
                json!({"url": format!("https://127.0.0.1:{}/allow", addr.port()),
                "caBundle": other_ca}),
                json!({}),
            ),
            hook(
                "nobody.e2e.orquestra.dev",
                "nobody",
                json!({"url": "https://127.0.0.1:1/allow", "caBundle": ca}),
                json!({}),
            ),
            hook(
                "conditional.e2e.orquestra.dev",
                "conditional",
                service("/deny"),
                json!({"matchConditions": [
                    {"name": "not-exempt", "expression": "object.metadata.name != 'exempt'"},
                    {"name": "creates", "expression": "request.operation == 'CREATE'"},
                ]}),
            ),
        ],
    )
    .await;
    let maps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");

    // Denied behind the Service, with the webhook's Status and who asked.
    let status = refused(&maps, "denied", "deny").await;
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        status.message,
        "admission webhook \"deny.e2e.orquestra.dev\" denied the request: \
         denied is not welcome (\"system:apiserver\" asked)"
    );
    // Allowed, and unmatched objects never reach a webhook.
    maps.create(&PostParams::default(), &config_map("allowed", "allow"))
        .await
        .unwrap();
    maps.create(&PostParams::default(), &config_map("unlabelled", "none"))
        .await
        .unwrap();
    // matchConditions (CEL) decide whether the webhook is called at all.
    maps.create(&PostParams::default(), &config_map("exempt", "conditional"))
        .await
        .unwrap();
    let status = refused(&maps, "caught", "conditional").await;
    assert!(
        status
            .message
            .contains("\"conditional.e2e.orquestra.dev\" denied the request"),
        "{status:?}"
    );
    // Mutated by a JSONPatch: what is stored carries the webhook's key.
    let mutated = maps
        .create(&PostParams::default(), &config_map("mutated", "mutate"))
        .await
        .unwrap();
    assert_eq!(mutated.data.unwrap()["added-by"], "webhook");
    assert_eq!(
        maps.get("mutated").await.unwrap().data.unwrap()["added-by"],
        "webhook"
    );

    // A webhook slower than its timeout: refused under Fail, skipped under Ignore.
    let status = refused(&maps, "slow", "slow-fail").await;
    assert_eq!(status.code, 500);
    assert!(
        status
            .message
            .contains("failed calling webhook \"slow-fail.e2e.orquestra.dev\"")
            && status.message.contains("context deadline exceeded")
            && status.message.contains("/slow?timeout=1s"),
        "{}",
        status.message
    );
    maps.create(
        &PostParams::default(),
        &config_map("slow-ignored", "slow-ignore"),
    )
    .await
    .unwrap();

    // Every other way to fail names the webhook and what went wrong, and writes nothing.
    for (label, says) in [
        ("garbage", "not JSON"),
        ("error", "500"),
        ("wrong-uid", "expected response.uid"),
        ("untrusted", "certificate"),
        ("nobody", "Connection refused"),
    ] {
        let status = refused(&maps, label, label).await;
        assert_eq!(status.code, 500, "{label}: {}", status.message);
        assert!(
            status.message.contains(&format!(
                "failed calling webhook \"{label}.e2e.orquestra.dev\""
            )) && status.message.contains(says),
            "{label}: {}",
            status.message
        );
        assert!(
            maps.get_opt(label).await.unwrap().is_none(),
            "{label} was written"
        );
    }

    // A CONNECT is admitted too: attaching to a pod is refused before any stream opens.
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(c.client.clone(), "default");
    let pod = json!({"metadata": {"name": "attached"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
    let attach = json!({"name": "attach.e2e.orquestra.dev", "clientConfig": url("deny"),
        "rules": [{"operations": ["CONNECT"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["pods/attach"]}],
        "sideEffects": "None", "admissionReviewVersions": ["v1"]});
    configure(&c, "ValidatingWebhookConfiguration", "attach", vec![attach]).await;
    let (code, body) = upgrade(
        c.addr,
        "/api/v1/namespaces/default/pods/attached/attach?container=c&stdout=true",
    )
    .await;
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("admission webhook \\\"attach.e2e.orquestra.dev\\\" denied the request"),
        "{body}"
    );

    // The configurations themselves are never subject to webhooks: a catch-all denying
    // webhook refuses everything else, but not its own removal.
    let everything = json!({"name": "lockout.e2e.orquestra.dev", "clientConfig": url("deny"),
        "rules": [{"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"],
            "resources": ["*/*"]}],
        "sideEffects": "None", "admissionReviewVersions": ["v1"]});
    configure(
        &c,
        "ValidatingWebhookConfiguration",
        "lockout",
        vec![everything],
    )
    .await;
    let status = refused(&maps, "locked-out", "none").await;
    assert!(
        status.message.contains("lockout.e2e.orquestra.dev"),
        "{}",
        status.message
    );
    validating
        .delete("lockout", &DeleteParams::default())
        .await
        .unwrap();
    validating
        .delete("e2e", &DeleteParams::default())
        .await
        .unwrap();
    maps.create(&PostParams::default(), &config_map("after", "deny"))
        .await
        .unwrap();
}
