//! Calling one webhook: where it is (`url`, or a Service reached through its endpoints, as
//! kube-apiserver's aggregator routing does), TLS trusting only its `caBundle`, the
//! AdmissionReview sent and the answer checked as kube-apiserver checks it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use base64::Engine as _;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use serde_json::{Value, json};

use super::{Attributes, Hook, user_info, warn};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;

/// What calling webhooks keeps between requests: HTTP clients per trust and address (a
/// client holds its root certificates and resolved address, and keeps its connections), and
/// kube-apiserver's `apiserver_admission_webhook_*` metrics.
#[derive(Debug)]
pub struct Webhooks {
    clients: Mutex<HashMap<String, reqwest::Client>>,
    metrics: Metrics,
}

impl Default for Webhooks {
    fn default() -> Webhooks {
        Webhooks {
            clients: Mutex::default(),
            metrics: Metrics::new(),
        }
    }
}

/// The webhook metrics, under kube-apiserver's names and labels.
#[derive(Debug)]
struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    rejections: IntCounterVec,
    fail_open: IntCounterVec,
    /// `apiserver_crd_conversion_webhook_duration_seconds`.
    conversion: HistogramVec,
}

impl Metrics {
    fn new() -> Metrics {
        #[allow(clippy::expect_used)] // constant, valid metric definitions
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric")
        };
        #[allow(clippy::expect_used)]
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "apiserver_admission_webhook_admission_duration_seconds",
                "Admission webhook latency histogram in seconds, identified by name and broken \
                 out for each operation and API resource and type (validate or admit).",
            )
            .buckets(vec![0.005, 0.025, 0.1, 0.5, 1.0, 2.5, 10.0, 25.0]),
            &["name", "type", "operation", "rejected"],
        )
        .expect("valid metric");
        Metrics {
            requests: counter(
                "apiserver_admission_webhook_request_total",
                "Admission webhook request total, identified by name and broken out for each \
                 admission type (validating or mutating) and operation.",
                &["name", "type", "operation", "code", "rejected"],
            ),
            duration,
            rejections: counter(
                "apiserver_admission_webhook_rejection_count",
                "Admission webhook rejection count, identified by name and broken out for each \
                 admission type and operation; error_type is calling_webhook_error, \
                 apiserver_internal_error or no_error.",
                &["name", "type", "operation", "error_type", "rejection_code"],
            ),
            fail_open: counter(
                "apiserver_admission_webhook_fail_open_count",
                "Admission webhook fail open count, identified by name and broken out for each \
                 admission type (validating or admit).",
                &["name", "type"],
            ),
            #[allow(clippy::expect_used)] // a constant, valid metric definition
            conversion: HistogramVec::new(
                HistogramOpts::new(
                    "apiserver_crd_conversion_webhook_duration_seconds",
                    "CRD webhook conversion duration in seconds",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0]),
                &["crd_name", "from_version", "to_version", "succeeded"],
            )
            .expect("valid metric"),
        }
    }
}

impl Webhooks {
    /// Registers the webhook metrics in `registry` (the server's `/metrics`).
    pub fn register(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.metrics.requests.clone()))?;
        registry.register(Box::new(self.metrics.duration.clone()))?;
        registry.register(Box::new(self.metrics.rejections.clone()))?;
        registry.register(Box::new(self.metrics.fail_open.clone()))?;
        registry.register(Box::new(self.metrics.conversion.clone()))
    }

    /// Records one conversion webhook call ([`crate::convert::webhook`]).
    pub(crate) fn observe_conversion(&self, crd: &str, from: &str, to: &str, ok: bool, secs: f64) {
        self.metrics
            .conversion
            .with_label_values(&[crd, from, to, &ok.to_string()])
            .observe(secs);
    }

    /// The HTTP client for a webhook trusting `ca_bundle` (base64 PEM; empty: the system's
    /// roots), with its host name resolved to `resolve` when reached through a Service.
    pub(crate) fn client(
        &self,
        ca_bundle: &str,
        resolve: Option<(&str, SocketAddr)>,
    ) -> Result<reqwest::Client, String> {
        let key = format!("{ca_bundle}|{resolve:?}");
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok(client.clone());
        }
        let mut builder = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy();
        if !ca_bundle.is_empty() {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(ca_bundle)
                .map_err(|e| format!("caBundle is not base64: {e}"))?;
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("caBundle holds no PEM certificate: {e}"))?;
            builder = builder.tls_built_in_root_certs(false);
            for certificate in certificates {
                builder = builder.add_root_certificate(certificate);
            }
        }
        if let Some((host, address)) = resolve {
            builder = builder.resolve(host, address);
        }
        let client = builder
            .build()
            .map_err(|e| format!("building its client: {e}"))?;
        if clients.len() > 256 {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// What an allowing webhook answered.
#[derive(Debug)]
pub(super) struct Answer {
    /// The JSONPatch to apply (mutating webhooks).
    pub patch: Option<json_patch::Patch>,
}

/// Sends the review for `attributes` to `hook`: its answer if it allowed the request;
/// `None` if it could not be called and its failure policy is Ignore; a refusal otherwise.
pub(super) async fn review(
    engine: &Engine,
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<Option<Answer>, ApiError> {
    if attributes.dry_run && !hook.dry_run_safe {
        return Err(ApiError::BadRequest(format!(
            "admission webhook {:?} does not support dry run",
            hook.name
        )));
    }
    let started = std::time::Instant::now();
    let outcome = call(engine, hook, attributes, object).await;
    let metrics = &engine.webhooks().metrics;
    let operation = attributes.operation.as_str();
    let (code, rejected) = match &outcome {
        Ok(_) => (200, false),
        Err(Failure::Denied(status)) => (status["code"].as_u64().unwrap_or(400), true),
        Err(Failure::Call(_)) => (500, !hook.ignore_failures),
    };
    let (name, kind, rejected_label) = (hook.name.as_str(), hook.kind, &rejected.to_string());
    metrics
        .requests
        .with_label_values(&[name, kind, operation, &code.to_string(), rejected_label])
        .inc();
    metrics
        .duration
        .with_label_values(&[name, kind, operation, rejected_label])
        .observe(started.elapsed().as_secs_f64());
    if rejected {
        let error_type = match outcome {
            Err(Failure::Denied(_)) => "no_error",
            _ => "calling_webhook_error",
        };
        metrics
            .rejections
            .with_label_values(&[name, kind, operation, error_type, &code.to_string()])
            .inc();
    }
    match outcome {
        Ok(answer) => Ok(Some(answer)),
        Err(Failure::Denied(status)) => Err(ApiError::Rejected(Box::new(status))),
        Err(Failure::Call(reason)) => {
            let message = format!("failed calling webhook {:?}: {reason}", hook.name);
            if hook.ignore_failures {
                tracing::warn!(webhook = %hook.name, "{message}; failing open");
                metrics.fail_open.with_label_values(&[name, kind]).inc();
                Ok(None)
            } else {
                Err(ApiError::Internal(format!(
                    "Internal error occurred: {message}"
                )))
            }
        }
    }
}

/// Why a webhook did not allow a request.
enum Failure {
    /// It answered no: the Status to return.
    Denied(Value),
    /// It could not be called, or answered something that is not a review.
    Call(String),
}

async fn call(
    engine: &Engine,
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<Answer, Failure> {
    if !hook.speaks_v1 {
        return Err(Failure::Call(
            "it accepts no AdmissionReview version this server sends (v1)".into(),
        ));
    }
    let timeout = hook.timeout;
    let (url, resolve) = locate(engine, &hook.client_config)
        .await
        .map_err(|e| Failure::Call(format!("failed to call webhook: {e}")))?;
    let url = format!(
        "{url}{}timeout={}s",
        if url.contains('?') { '&' } else { '?' },
        timeout.as_secs()
    );
    let ca_bundle = hook.client_config["caBundle"].as_str().unwrap_or_default();
    let client = engine
        .webhooks()
        .client(ca_bundle, resolve.as_ref().map(|(h, a)| (h.as_str(), *a)))
        .map_err(Failure::Call)?;
    let uid = uuid::Uuid::new_v4().to_string();
    let body = request(&uid, attributes, object);
    let bytes = post_json(&client, &url, timeout, &body)
        .await
        .map_err(|e| Failure::Call(format!("failed to call webhook: {e}")))?;
    let review: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Failure::Call(format!(
            "failed to call webhook: its answer is not JSON: {e}"
        ))
    })?;
    verify(&uid, &review).map_err(|failure| match failure {
        Failure::Denied(status) => Failure::Denied(denial(&hook.name, &status)),
        other => other,
    })
}

/// POSTs `body` as JSON to a webhook (admission or conversion) and returns its answer's bytes,
/// or why there is none: `Post "URL": REASON`, a non-2xx status with the start of its body.
pub(crate) async fn post_json(
    client: &reqwest::Client,
    url: &str,
    timeout: std::time::Duration,
    body: &Value,
) -> Result<bytes::Bytes, String> {
    let failed = |e: &dyn std::fmt::Display| format!("Post {url:?}: {e}");
    let response = client
        .post(url)
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        // Not reqwest's default `*/*`: a Go webhook may then answer in YAML.
        .header(reqwest::header::ACCEPT, "application/json")
        .body(body.to_string())
        .send()
        .await
        .map_err(|e| failed(&reqwest_reason(&e)))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| failed(&reqwest_reason(&e)))?;
    if !status.is_success() {
        let text = String::from_utf8_lossy(&bytes);
        return Err(failed(&format!(
            "the server answered {status}: {}",
            text.chars().take(200).collect::<String>()
        )));
    }
    Ok(bytes)
}

/// Why reqwest failed, in the words kube's users search for (`context deadline exceeded`).
fn reqwest_reason(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "context deadline exceeded".into();
    }
    let mut reason = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    reason
}

/// The AdmissionReview sent.
pub(crate) fn request(uid: &str, attributes: &Attributes<'_>, object: Option<&Value>) -> Value {
    let def = attributes.def;
    // A CONNECT is about its options object (`PodAttachOptions`), not the pod.
    let kind_name = match (attributes.operation, object) {
        (super::Operation::Connect, Some(options)) => options["kind"].as_str().unwrap_or(&def.kind),
        _ => &def.kind,
    };
    let kind = json!({"group": def.group, "version": def.version, "kind": kind_name});
    let resource = json!({"group": def.group, "version": def.version, "resource": def.plural});
    let mut request = json!({
        "uid": uid,
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": attributes.name,
        "operation": attributes.operation.as_str(),
        "userInfo": user_info(),
        "object": object.cloned().unwrap_or(Value::Null),
        "oldObject": attributes.old_object.cloned().unwrap_or(Value::Null),
        "dryRun": attributes.dry_run,
        "options": attributes.operation.options(attributes.dry_run),
    });
    if let Some(namespace) = attributes.namespace {
        request["namespace"] = json!(namespace);
    }
    if let Some(sub) = attributes.subresource {
        request["subResource"] = json!(sub);
        request["requestSubResource"] = json!(sub);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// Checks the answer as kube-apiserver's `VerifyAdmissionResponse` does: a v1 review about
/// this request; a refusal's Status made a proper failure; a patch only as a JSONPatch.
fn verify(uid: &str, review: &Value) -> Result<Answer, Failure> {
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(Failure::Call(format!(
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {}, Kind={}",
            review["apiVersion"].as_str().unwrap_or_default(),
            review["kind"].as_str().unwrap_or_default()
        )));
    }
    let response = &review["response"];
    if response.is_null() {
        return Err(Failure::Call("webhook response was absent".into()));
    }
    let answered = response["uid"].as_str().unwrap_or_default();
    if answered != uid {
        return Err(Failure::Call(format!(
            "expected response.uid={uid:?}, got {answered:?}"
        )));
    }
    warn(
        response["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned),
    );
    if response["allowed"] != true {
        return Err(Failure::Denied(response["status"].clone()));
    }
    let patch = match response["patch"].as_str().filter(|p| !p.is_empty()) {
        None => None,
        Some(encoded) => {
            if response["patchType"] != "JSONPatch" {
                return Err(Failure::Call(format!(
                    "webhook returned a patch with patchType {}, only JSONPatch is supported",
                    response["patchType"]
                )));
            }
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| Failure::Call(format!("the patch it returned is not base64: {e}")))?;
            Some(serde_json::from_slice(&bytes).map_err(|e| {
                Failure::Call(format!("the patch it returned is not a JSONPatch: {e}"))
            })?)
        }
    };
    Ok(Answer { patch })
}

/// The Status a refusal is returned with (kube's `ToStatusErr`): at least 400, `Failure`,
/// its message prefixed with who denied it.
fn denial(webhook: &str, status: &Value) -> Value {
    let mut status = if status.is_object() {
        status.clone()
    } else {
        json!({})
    };
    let denied_by = format!("admission webhook {webhook:?} denied the request");
    let message = status["message"].as_str().filter(|m| !m.is_empty());
    let reason = status["reason"].as_str().filter(|r| !r.is_empty());
    status["message"] = json!(match (message, reason) {
        (Some(message), _) => format!("{denied_by}: {message}"),
        (None, Some(reason)) => format!("{denied_by}: {reason}"),
        (None, None) => format!("{denied_by} without explanation"),
    });
    let code = status["code"]
        .as_u64()
        .filter(|c| (400..600).contains(c))
        .unwrap_or(400);
    status["code"] = json!(code);
    status["status"] = json!("Failure");
    status["kind"] = json!("Status");
    status["apiVersion"] = json!("v1");
    status
}

/// Where the webhook is: its URL, and for a Service the address its host name stands for
/// (one of its ready endpoints; TLS still checks the name `NAME.NAMESPACE.svc`).
pub(crate) async fn locate(
    engine: &Engine,
    config: &Value,
) -> Result<(String, Option<(String, SocketAddr)>), String> {
    if let Some(url) = config["url"].as_str() {
        return Ok((url.to_owned(), None));
    }
    let service = &config["service"];
    let (Some(namespace), Some(name)) = (service["namespace"].as_str(), service["name"].as_str())
    else {
        return Err("its clientConfig names neither a url nor a service".into());
    };
    let port = service["port"].as_i64().unwrap_or(443);
    let path = service["path"].as_str().unwrap_or("");
    let host = format!("{name}.{namespace}.svc");
    let url = format!("https://{host}:{port}{path}");
    let address = endpoint(engine, namespace, name, port)
        .await
        .map_err(|e| format!("Post {url:?}: {e}"))?;
    // The client resolves the name to the endpoint, but a port written in the URL wins over
    // the resolved one: name the endpoint's port (the Service's target) in the URL itself.
    let url = format!("https://{host}:{}{path}", address.port());
    Ok((url, Some((host, address))))
}

/// A ready endpoint of Service `namespace/name` for its port `port`.
async fn endpoint(
    engine: &Engine,
    namespace: &str,
    name: &str,
    port: i64,
) -> Result<SocketAddr, String> {
    let get = |path: String| async move {
        let target = Target::parse(&engine.registry, "", "v1", &path).map_err(|e| e.to_string())?;
        engine.get(&target).await.map_err(|e| e.to_string())
    };
    let service = get(format!("namespaces/{namespace}/services/{name}")).await?;
    let port_name = service["spec"]["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["port"].as_i64() == Some(port))
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .ok_or_else(|| format!("service \"{namespace}/{name}\" has no port {port}"))?;
    let endpoints = get(format!("namespaces/{namespace}/endpoints/{name}")).await?;
    endpoints["subsets"]
        .as_array()
        .into_iter()
        .flatten()
        .find_map(|subset| {
            let number = subset["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str().unwrap_or_default() == port_name)
                .and_then(|p| p["port"].as_u64())
                .and_then(|p| u16::try_from(p).ok())?;
            subset["addresses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["ip"].as_str()?.parse().ok())
                .map(|ip| SocketAddr::new(ip, number))
                .next()
        })
        .ok_or_else(|| format!("no endpoints available for service \"{name}\""))
}
