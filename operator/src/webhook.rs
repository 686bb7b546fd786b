//! Admission webhooks, served by the framework: a controller's author writes a typed handler
//! and gets the HTTPS server, the AdmissionReview plumbing, metrics and the webhook
//! configuration that registers it.
//!
//! ```no_run
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use orquestra_operator::webhook::{Operation, Request, Response, WebhookServer};
//!
//! fn no_empty_maps(request: &Request<ConfigMap>) -> Response<ConfigMap> {
//!     match request.object.as_ref().and_then(|c| c.data.as_ref()) {
//!         Some(data) if !data.is_empty() => Response::allow(),
//!         _ => Response::deny("a ConfigMap here needs data"),
//!     }
//! }
//!
//! fn labelled(request: &Request<ConfigMap>) -> Response<ConfigMap> {
//!     let mut map = request.object.clone().unwrap_or_default();
//!     map.metadata.labels.get_or_insert_default().insert("team".into(), "web".into());
//!     Response::mutated(map)
//! }
//!
//! let server = WebhookServer::new("example.orquestra.dev")
//!     .validate(&[Operation::Create, Operation::Update], no_empty_maps)
//!     .mutate(&[Operation::Create], labelled);
//! ```
//!
//! A **validating** handler answers [`Response::allow`] or [`Response::deny`] (with
//! [`Response::warn`] warnings). A **mutating** handler returns the object as it should be
//! ([`Response::mutated`]); the framework sends the API server the JSONPatch from the typed
//! object it received to the one returned — no hand-written patches. A handler that panics
//! denies the request with a 500 rather than taking the server down.
//!
//! [`WebhookServer::configurations`] writes the Validating- and MutatingWebhookConfiguration
//! that register every handler (`rules` from the kind and the operations, `sideEffects:
//! None`, `failurePolicy: Fail`), for a `clientConfig` reaching the server: a Service and the
//! `caBundle` of its certificate in a cluster, or the loopback URL in the test harness
//! ([`crate::testing::TestApi::serve_webhooks`]). [`Tls::generate`] makes a CA and a
//! serving certificate when none is provided. Metrics are controller-runtime's:
//! `controller_runtime_webhook_requests_total{webhook,code}`,
//! `controller_runtime_webhook_latency_seconds{webhook}` and
//! `controller_runtime_webhook_requests_in_flight{webhook}`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::routing::post;
use base64::Engine as _;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations, ValidatingWebhook,
    ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::Resource;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

pub use kube::core::admission::{AdmissionRequest as Request, Operation};

/// Why the webhook server could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// The certificate could not be made or loaded.
    #[error("the webhook server's certificate: {0}")]
    Certificate(String),
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Registering the metrics failed (registered twice).
    #[error("registering the webhook metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A handler's answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Response<K> {
    denied: Option<(u16, String)>,
    warnings: Vec<String>,
    mutated: Option<K>,
}

impl<K> Response<K> {
    /// Let the request through unchanged.
    pub fn allow() -> Self {
        Response {
            denied: None,
            warnings: Vec::new(),
            mutated: None,
        }
    }

    /// Refuse the request; the client sees `admission webhook "NAME" denied the request:
    /// REASON` (403).
    pub fn deny(reason: impl Into<String>) -> Self {
        Response {
            denied: Some((403, reason.into())),
            ..Self::allow()
        }
    }

    /// Let the request through with `object` in place of the one sent (mutating handlers).
    pub fn mutated(object: K) -> Self {
        Response {
            mutated: Some(object),
            ..Self::allow()
        }
    }

    /// Adds a warning the client shows (`kubectl` prints `Warning: …`).
    #[must_use]
    pub fn warn(mut self, warning: impl Into<String>) -> Self {
        self.warnings.push(warning.into());
        self
    }

    /// Whether the request is allowed.
    pub fn allowed(&self) -> bool {
        self.denied.is_none()
    }
}

/// Validating, mutating, or converting between a CRD's versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Type {
    Validating,
    Mutating,
    Converting,
}

type Handler = Arc<dyn Fn(&Value) -> Result<Value, String> + Send + Sync>;

/// One handler and what it is registered for.
struct Hook {
    /// `v<kind>.<plural>.<domain>` or `m…`: the webhook's name in its configuration.
    name: String,
    path: String,
    kind: Type,
    rule: RuleWithOperations,
    handler: Handler,
}

/// A set of typed admission handlers, served over HTTPS.
pub struct WebhookServer {
    domain: String,
    hooks: Vec<Hook>,
    metrics: Metrics,
}

impl std::fmt::Debug for WebhookServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookServer")
            .field("domain", &self.domain)
            .field(
                "hooks",
                &self.hooks.iter().map(|h| &h.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl WebhookServer {
    /// An empty server; webhook names end in `domain` (`example.orquestra.dev`), as
    /// Kubernetes requires them to be fully qualified.
    pub fn new(domain: impl Into<String>) -> Self {
        WebhookServer {
            domain: domain.into(),
            hooks: Vec::new(),
            metrics: Metrics::new(),
        }
    }

    /// Adds a validating handler for `K` on `operations`.
    #[must_use]
    pub fn validate<K, F>(self, operations: &[Operation], handler: F) -> Self
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Serialize + Clone + Send + 'static,
        F: Fn(&Request<K>) -> Response<K> + Send + Sync + 'static,
    {
        self.add(Type::Validating, operations, handler)
    }

    /// Adds a mutating handler for `K` on `operations`: what it returns with
    /// [`Response::mutated`] becomes a JSONPatch.
    #[must_use]
    pub fn mutate<K, F>(self, operations: &[Operation], handler: F) -> Self
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Serialize + Clone + Send + 'static,
        F: Fn(&Request<K>) -> Response<K> + Send + Sync + 'static,
    {
        self.add(Type::Mutating, operations, handler)
    }

    fn add<K, F>(mut self, kind: Type, operations: &[Operation], handler: F) -> Self
    where
        K: Resource<DynamicType = ()> + DeserializeOwned + Serialize + Clone + Send + 'static,
        F: Fn(&Request<K>) -> Response<K> + Send + Sync + 'static,
    {
        let (group, version, plural) = (K::group(&()), K::version(&()), K::plural(&()));
        let prefix = match kind {
            Type::Validating => "validate",
            Type::Mutating => "mutate",
            Type::Converting => "convert",
        };
        let group_path = if group.is_empty() { "core" } else { &group };
        let path = format!("/{prefix}/{group_path}/{version}/{plural}");
        let name = format!(
            "{}{}.{plural}.{}",
            &prefix[..1],
            K::kind(&()).to_lowercase(),
            self.domain
        );
        let operations = operations
            .iter()
            .map(|op| {
                match op {
                    Operation::Create => "CREATE",
                    Operation::Update => "UPDATE",
                    Operation::Delete => "DELETE",
                    Operation::Connect => "CONNECT",
                }
                .to_owned()
            })
            .collect();
        let rule = RuleWithOperations {
            api_groups: Some(vec![group.to_string()]),
            api_versions: Some(vec![version.to_string()]),
            resources: Some(vec![plural.to_string()]),
            operations: Some(operations),
            scope: None,
        };
        let handler: Handler = Arc::new(move |review: &Value| answer(kind, review, &handler));
        self.hooks.push(Hook {
            name,
            path,
            kind,
            rule,
            handler,
        });
        self
    }

    /// `self` with `other`'s handlers too: one server for several controllers' webhooks (as
    /// `orq operator` serves every selected controller's on one port). Metrics are `self`'s.
    #[must_use]
    pub fn merge(mut self, other: WebhookServer) -> Self {
        self.hooks.extend(other.hooks);
        self
    }

    /// Each handler's webhook name and path.
    pub fn routes(&self) -> BTreeMap<String, String> {
        self.hooks
            .iter()
            .map(|h| (h.name.clone(), h.path.clone()))
            .collect()
    }

    /// Adds a conversion handler between two versions of one custom resource, `A` and `B`
    /// (their Rust types, as `kube::CustomResource` derives them): `up` turns an `A` into a
    /// `B`, `down` the reverse. Served at `/convert/GROUP/PLURAL`. Objects already in the
    /// version asked for pass unchanged; one in neither fails the review. Point the CRD's
    /// `spec.conversion` at it with [`conversion`].
    #[must_use]
    pub fn convert<A, B>(
        mut self,
        up: impl Fn(A) -> B + Send + Sync + 'static,
        down: impl Fn(B) -> A + Send + Sync + 'static,
    ) -> Self
    where
        A: Resource<DynamicType = ()> + DeserializeOwned + Serialize,
        B: Resource<DynamicType = ()> + DeserializeOwned + Serialize,
    {
        let (group, plural) = (A::group(&()).to_string(), A::plural(&()).to_string());
        let (a, b) = (
            A::api_version(&()).to_string(),
            B::api_version(&()).to_string(),
        );
        let one = move |object: Value, to: &str| -> Result<Value, String> {
            let from = object["apiVersion"].as_str().unwrap_or_default().to_owned();
            let parse = |e: serde_json::Error| format!("{from} object does not parse: {e}");
            let write = |e: serde_json::Error| e.to_string();
            match (from.as_str(), to) {
                (f, t) if f == t => Ok(object),
                (f, t) if f == a && t == b => {
                    let old: A = serde_json::from_value(object).map_err(parse)?;
                    serde_json::to_value(up(old)).map_err(write)
                }
                (f, t) if f == b && t == a => {
                    let old: B = serde_json::from_value(object).map_err(parse)?;
                    serde_json::to_value(down(old)).map_err(write)
                }
                (f, t) => Err(format!("no conversion from {f:?} to {t:?}")),
            }
        };
        let handler: Handler = Arc::new(move |review: &Value| Ok(conversion_answer(review, &one)));
        self.hooks.push(Hook {
            name: format!("c.{plural}.{group}"),
            path: format!("/convert/{group}/{plural}"),
            kind: Type::Converting,
            rule: RuleWithOperations::default(),
            handler,
        });
        self
    }

    /// Registers the webhook metrics in `registry` (a [`crate::Manager::registry`]).
    pub fn register_metrics(&self, registry: &Registry) -> Result<(), WebhookError> {
        self.metrics.register(registry)
    }

    /// The HTTP routes (one per handler, `POST /validate/GROUP/VERSION/PLURAL` and
    /// `/mutate/…`), without TLS: for embedding in another server.
    pub fn router(&self) -> Router {
        let mut router = Router::new();
        for hook in &self.hooks {
            let handler = Arc::clone(&hook.handler);
            let metrics = self.metrics.clone();
            let name = hook.name.clone();
            router = router.route(
                &hook.path,
                post(move |Json(review): Json<Value>| {
                    let (handler, metrics, name) =
                        (Arc::clone(&handler), metrics.clone(), name.clone());
                    async move { serve(&handler, &metrics, &name, review).await }
                }),
            );
        }
        router
    }

    /// Serves every handler over HTTPS with `tls` on `addr` until the task is dropped.
    pub async fn serve(&self, addr: SocketAddr, tls: &Tls) -> Result<(), WebhookError> {
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| WebhookError::Bind { addr, source })?;
        self.serve_on(listener, tls).await
    }

    /// [`WebhookServer::serve`] on a bound listener.
    pub async fn serve_on(
        &self,
        listener: std::net::TcpListener,
        tls: &Tls,
    ) -> Result<(), WebhookError> {
        let config = axum_server::tls_rustls::RustlsConfig::from_pem(
            tls.cert_pem.clone().into_bytes(),
            tls.key_pem.clone().into_bytes(),
        )
        .await
        .map_err(|e| WebhookError::Certificate(e.to_string()))?;
        let server = axum_server::from_tcp_rustls(listener, config)
            .map_err(|e| WebhookError::Certificate(e.to_string()))?;
        if let Err(error) = server.serve(self.router().into_make_service()).await {
            tracing::error!(%error, "the webhook server stopped");
        }
        Ok(())
    }

    /// The configurations registering every handler under `name`, each reached through
    /// `client` with the handler's path appended (`client.url` or `client.service.path`).
    pub fn configurations(
        &self,
        name: &str,
        client: &WebhookClientConfig,
    ) -> (
        Option<ValidatingWebhookConfiguration>,
        Option<MutatingWebhookConfiguration>,
    ) {
        let client_for = |path: &str| client_with_path(client, path);
        let versions = Some(vec!["v1".to_owned()]);
        let validating: Vec<ValidatingWebhook> = self
            .hooks
            .iter()
            .filter(|h| h.kind == Type::Validating)
            .map(|h| ValidatingWebhook {
                name: h.name.clone(),
                client_config: client_for(&h.path),
                rules: Some(vec![h.rule.clone()]),
                side_effects: "None".into(),
                admission_review_versions: versions.clone().unwrap_or_default(),
                failure_policy: Some("Fail".into()),
                timeout_seconds: Some(10),
                ..ValidatingWebhook::default()
            })
            .collect();
        let mutating: Vec<MutatingWebhook> = self
            .hooks
            .iter()
            .filter(|h| h.kind == Type::Mutating)
            .map(|h| MutatingWebhook {
                name: h.name.clone(),
                client_config: client_for(&h.path),
                rules: Some(vec![h.rule.clone()]),
                side_effects: "None".into(),
                admission_review_versions: versions.clone().unwrap_or_default(),
                failure_policy: Some("Fail".into()),
                timeout_seconds: Some(10),
                reinvocation_policy: Some("Never".into()),
                ..MutatingWebhook::default()
            })
            .collect();
        let metadata = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        (
            (!validating.is_empty()).then(|| ValidatingWebhookConfiguration {
                metadata: metadata.clone(),
                webhooks: Some(validating),
            }),
            (!mutating.is_empty()).then_some(MutatingWebhookConfiguration {
                metadata,
                webhooks: Some(mutating),
            }),
        )
    }
}

/// The `spec.conversion` of `A`'s CRD pointing at a [`WebhookServer::convert`] handler for
/// it, reached through `client` (as [`WebhookServer::configurations`] takes it).
pub fn conversion<A: Resource<DynamicType = ()>>(
    client: &WebhookClientConfig,
) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceConversion {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    let path = format!("/convert/{}/{}", A::group(&()), A::plural(&()));
    let client = client_with_path(client, &path);
    ext::CustomResourceConversion {
        strategy: "Webhook".into(),
        webhook: Some(ext::WebhookConversion {
            client_config: Some(ext::WebhookClientConfig {
                ca_bundle: client.ca_bundle,
                url: client.url,
                service: client.service.map(|s| ext::ServiceReference {
                    name: s.name,
                    namespace: s.namespace,
                    path: s.path,
                    port: s.port,
                }),
            }),
            conversion_review_versions: vec!["v1".into()],
        }),
    }
}

/// `client` with `path` appended to its URL or its Service's path.
fn client_with_path(client: &WebhookClientConfig, path: &str) -> WebhookClientConfig {
    let mut client = client.clone();
    if let Some(url) = client.url.as_mut() {
        url.push_str(path);
    }
    if let Some(service) = client.service.as_mut() {
        let base = service.path.take().unwrap_or_default();
        service.path = Some(format!("{}{path}", base.trim_end_matches('/')));
    }
    client
}

/// Answers a ConversionReview: every object converted by `one`, or the first failure.
fn conversion_answer(review: &Value, one: &dyn Fn(Value, &str) -> Result<Value, String>) -> Value {
    let request = &review["request"];
    let to = request["desiredAPIVersion"].as_str().unwrap_or_default();
    let converted: Result<Vec<Value>, String> = request["objects"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|object| one(object.clone(), to))
        .collect();
    let response = match converted {
        Ok(objects) => json!({"uid": request["uid"], "convertedObjects": objects,
                              "result": {"status": "Success"}}),
        Err(message) => json!({"uid": request["uid"],
                               "result": {"status": "Failure", "message": message}}),
    };
    let api_version = review["apiVersion"]
        .as_str()
        .unwrap_or("apiextensions.k8s.io/v1");
    json!({"apiVersion": api_version, "kind": "ConversionReview", "response": response})
}

/// Answers one review: the handler's response, or a 400 review for a body that is not one.
async fn serve(handler: &Handler, metrics: &Metrics, name: &str, review: Value) -> Json<Value> {
    let started = std::time::Instant::now();
    let in_flight = metrics.in_flight.with_label_values(&[name]);
    in_flight.inc();
    let handler = Arc::clone(handler);
    // A handler is the user's code: run apart, so a panic is a refusal, not a dead server.
    let answered = tokio::task::spawn_blocking(move || handler(&review)).await;
    in_flight.dec();
    let (code, body) = match answered {
        Ok(Ok(body)) => (200, body),
        Ok(Err(message)) => (400, failure(400, &message)),
        Err(_) => (500, failure(500, "the webhook's handler panicked")),
    };
    metrics
        .requests
        .with_label_values(&[name, &code.to_string()])
        .inc();
    metrics
        .latency
        .with_label_values(&[name])
        .observe(started.elapsed().as_secs_f64());
    Json(body)
}

/// A review answering no, for a request that could not be handled.
fn failure(code: u16, message: &str) -> Value {
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "response": {"uid": "", "allowed": false,
            "status": {"code": code, "message": message, "status": "Failure"}}})
}

/// Runs `handler` on the review's request; the review to answer with.
fn answer<K, F>(kind: Type, review: &Value, handler: &F) -> Result<Value, String>
where
    K: Resource<DynamicType = ()> + DeserializeOwned + Serialize + Clone,
    F: Fn(&Request<K>) -> Response<K>,
{
    let raw = review
        .get("request")
        .ok_or("the body is not an AdmissionReview with a request")?;
    let request: Request<K> = serde_json::from_value(raw.clone())
        .map_err(|e| format!("the review's request does not parse: {e}"))?;
    let uid = request.uid.clone();
    let response = handler(&request);
    let mut answer = json!({"uid": uid, "allowed": response.allowed()});
    if let Some((code, message)) = &response.denied {
        answer["status"] = json!({"code": code, "message": message, "reason": "Forbidden",
                                  "status": "Failure"});
    }
    if !response.warnings.is_empty() {
        answer["warnings"] = json!(response.warnings);
    }
    if let (Type::Mutating, Some(new), Some(old)) =
        (kind, response.mutated.as_ref(), request.object.as_ref())
    {
        let before = serde_json::to_value(old).map_err(|e| e.to_string())?;
        let after = serde_json::to_value(new).map_err(|e| e.to_string())?;
        let patch = json_patch::diff(&before, &after);
        if !patch.0.is_empty() {
            let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            answer["patchType"] = json!("JSONPatch");
            answer["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    Ok(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
              "response": answer}),
    )
}

/// controller-runtime's webhook metrics.
#[derive(Clone)]
struct Metrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    in_flight: IntGaugeVec,
}

impl Metrics {
    fn new() -> Metrics {
        #[allow(clippy::expect_used)] // constant, valid metric definitions
        Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "controller_runtime_webhook_requests_total",
                    "Total number of admission requests by HTTP status code.",
                ),
                &["webhook", "code"],
            )
            .expect("valid metric"),
            latency: HistogramVec::new(
                HistogramOpts::new(
                    "controller_runtime_webhook_latency_seconds",
                    "Histogram of the latency of processing admission requests",
                ),
                &["webhook"],
            )
            .expect("valid metric"),
            in_flight: IntGaugeVec::new(
                Opts::new(
                    "controller_runtime_webhook_requests_in_flight",
                    "Current number of admission requests being served.",
                ),
                &["webhook"],
            )
            .expect("valid metric"),
        }
    }

    fn register(&self, registry: &Registry) -> Result<(), WebhookError> {
        registry.register(Box::new(self.requests.clone()))?;
        registry.register(Box::new(self.latency.clone()))?;
        registry.register(Box::new(self.in_flight.clone()))?;
        Ok(())
    }
}

/// A serving certificate, its key, and the CA that signed it (what `caBundle` holds).
#[derive(Clone)]
pub struct Tls {
    /// The serving certificate, PEM.
    pub cert_pem: String,
    /// Its private key, PEM.
    pub key_pem: String,
    /// The CA certificate, PEM.
    pub ca_pem: String,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// A fresh CA and a certificate it signs for `names` (DNS names, or IP addresses), as
    /// the webhook's Service is reached (`NAME.NAMESPACE.svc`) or the harness dials it.
    pub fn generate(names: &[&str]) -> Result<Tls, WebhookError> {
        let failed = |e: rcgen::Error| WebhookError::Certificate(e.to_string());
        let ca_key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orquestra-webhook-ca");
        let ca = ca_params.self_signed(&ca_key).map_err(failed)?;
        let key = rcgen::KeyPair::generate().map_err(failed)?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(rcgen::SanType::IpAddress(ip)),
                Err(_) => (*n).to_owned().try_into().map(rcgen::SanType::DnsName),
            })
            .collect::<Result<_, _>>()
            .map_err(failed)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "orquestra-webhook");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let cert = params.signed_by(&key, &issuer).map_err(failed)?;
        Ok(Tls {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: ca.pem(),
        })
    }

    /// A certificate and key from files (a Secret mounted by the chart, say), with the CA
    /// that signed them (for `caBundle`; may be the certificate itself).
    pub fn from_files(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Tls, WebhookError> {
        let read = |path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map_err(|e| WebhookError::Certificate(format!("{}: {e}", path.display())))
        };
        Ok(Tls {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            ca_pem: read(ca)?,
        })
    }

    /// The CA as a `caBundle` (base64 of the PEM).
    pub fn ca_bundle(&self) -> k8s_openapi::ByteString {
        k8s_openapi::ByteString(self.ca_pem.clone().into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn review(operation: &str, object: Value) -> Value {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "u1", "kind": {"group": "", "version": "v1", "kind": "ConfigMap"},
            "resource": {"group": "", "version": "v1", "resource": "configmaps"},
            "operation": operation, "userInfo": {"username": "alice"},
            "object": object, "name": "c", "namespace": "default"}})
    }

    #[test]
    fn a_mutation_becomes_a_json_patch_and_a_denial_a_status() {
        let mutate = |request: &Request<ConfigMap>| {
            let mut map = request.object.clone().unwrap_or_default();
            map.data
                .get_or_insert_default()
                .insert("added".into(), "yes".into());
            Response::mutated(map).warn("changed")
        };
        let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "c"}, "data": {"a": "1"}});
        let mutated = answer(Type::Mutating, &review("CREATE", object.clone()), &mutate).unwrap();
        let response = &mutated["response"];
        assert_eq!(response["uid"], "u1");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["warnings"][0], "changed");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let patch: Value = serde_json::from_slice(&patch).unwrap();
        assert_eq!(
            patch,
            json!([{"op": "add", "path": "/data/added", "value": "yes"}])
        );

        let deny = |_: &Request<ConfigMap>| Response::deny("not today");
        let denied = answer(Type::Validating, &review("CREATE", object), &deny).unwrap();
        assert_eq!(denied["response"]["allowed"], false);
        assert_eq!(denied["response"]["status"]["message"], "not today");
        assert!(denied["response"].get("patch").is_none());
    }

    #[test]
    fn configurations_name_each_handler_and_its_rules() {
        let server = WebhookServer::new("example.orquestra.dev")
            .validate(&[Operation::Create], |_: &Request<ConfigMap>| {
                Response::allow()
            })
            .mutate(&[Operation::Update], |_: &Request<ConfigMap>| {
                Response::allow()
            });
        let client = WebhookClientConfig {
            url: Some("https://127.0.0.1:9443".into()),
            ..Default::default()
        };
        let (validating, mutating) = server.configurations("hooks", &client);
        let validating = validating.unwrap().webhooks.unwrap();
        assert_eq!(
            validating[0].name,
            "vconfigmap.configmaps.example.orquestra.dev"
        );
        assert_eq!(
            validating[0].client_config.url.as_deref(),
            Some("https://127.0.0.1:9443/validate/core/v1/configmaps")
        );
        let rule = &validating[0].rules.as_ref().unwrap()[0];
        assert_eq!(rule.operations.as_deref(), Some(&["CREATE".to_owned()][..]));
        let mutating = mutating.unwrap().webhooks.unwrap();
        assert_eq!(
            server.routes()[&mutating[0].name],
            "/mutate/core/v1/configmaps"
        );
        assert!(
            Tls::generate(&["127.0.0.1"])
                .unwrap()
                .ca_pem
                .contains("BEGIN CERTIFICATE")
        );
    }
}
