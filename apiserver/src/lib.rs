//! Orquestra's Kubernetes-compatible API server.
//!
//! One generic engine serves every resource the registry knows — the built-in kinds of
//! Kubernetes 1.36 and the CRDs users add — over the versioned store (`orquestra-store`). The
//! modules are grouped by the stage of a request they belong to:
//!
//! - [`http`]: the wire — request parsing, JSON and protobuf bodies and responses, tables,
//!   watch streams, discovery, OpenAPI, metrics;
//! - [`auth`]: who is asking (tokens, certificates, service-account tokens) and whether they
//!   may (RBAC), and the review kinds that answer those questions;
//! - [`admission`]: what a write must satisfy before it is stored — defaults, semantic
//!   checks, structural schemas (pruning, defaulting, validation, CEL rules), admission
//!   policies in CEL and webhooks, limits and quotas;
//! - [`storage`]: the engine (CRUD, list, watch over the store), its watch cache, version
//!   conversion (CRD conversion webhooks included), object metadata, patches and field
//!   management, selectors;
//! - [`kinds`]: what particular kinds add — the registry of resources, CRDs, subresources
//!   (scale, binding, eviction, log), Services and the `kubernetes` Service's endpoints,
//!   the resource metrics (`metrics.k8s.io`, read from the node agents), and API
//!   aggregation (APIServices proxied to their servers);
//!
//! and every failure is a Kubernetes `Status` ([`error`]). The modules are re-exported at
//! the crate root under their own names (`orquestra_apiserver::engine`, `::registry`, …).
//! docs/api-server.md says what is served and how it behaves.

pub mod admission;
pub mod auth;
pub mod error;
pub mod http;
pub mod kinds;
pub mod storage;

pub use admission::{quota, schema};
pub use auth::{authorization, identity, impersonation, review, token};
pub use http::{body, discovery, metrics, openapi, proto, request, request_info, table, watch};
pub use kinds::{
    aggregator, crd, crdgen, eviction, kubernetes_service, podlog, proxy, quantity, registry,
    resource_metrics, service, stream, subresource,
};
pub use storage::{cache, convert, engine, managed, object, patch, selector, smp};

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use orquestra_store::Store;
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::object::unknown_field_warnings;
use crate::patch::PatchType;
use crate::registry::{Registry, builtin_resources};
use crate::request::{Params, Representation, Target};

/// Largest request body accepted (kube-apiserver's limit is 3 MiB).
pub const MAX_BODY_BYTES: usize = 3 * 1024 * 1024;

/// How long a non-watch request may take unless configured otherwise (kube-apiserver's
/// `--request-timeout` default).
pub const DEFAULT_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// The API server: an engine and its HTTP routes.
#[derive(Debug, Clone)]
pub struct ApiServer {
    engine: Engine,
}

impl ApiServer {
    /// An API server over `store`, serving the built-in kinds. Creates the boot namespaces.
    pub async fn new(store: Arc<dyn Store>) -> Result<ApiServer, ApiError> {
        ApiServer::with_request_timeout(store, DEFAULT_REQUEST_TIMEOUT).await
    }

    /// An API server whose non-watch requests end with a 504 `Timeout` after `timeout`.
    pub async fn with_request_timeout(
        store: Arc<dyn Store>,
        timeout: std::time::Duration,
    ) -> Result<ApiServer, ApiError> {
        let registry = Arc::new(Registry::new(builtin_resources()));
        let mut engine = Engine::new(store, registry);
        engine.request_timeout = timeout;
        engine.ensure_boot_namespaces().await?;
        admission::priority::ensure_system_classes(&engine).await?;
        authorization::ensure_bootstrap_roles(&engine).await?;
        crd::sync(engine.clone()).await?;
        Ok(ApiServer { engine })
    }

    /// Sets how long new pods tolerate a `not-ready` or `unreachable` node by default
    /// (kube-apiserver's `--default-{not-ready,unreachable}-toleration-seconds`). Before
    /// [`ApiServer::router`].
    pub fn set_default_toleration_seconds(&mut self, seconds: i64) {
        self.engine.default_toleration_seconds = seconds;
    }

    /// Sets the range Services' cluster IPs come from (kube-apiserver's
    /// `--service-cluster-ip-range`). Before [`ApiServer::router`]; set it when the cluster
    /// is created (Services keep the addresses they were given).
    pub fn set_service_cidr(&mut self, cidr: service::ServiceCidr) {
        self.engine.service_cidr = cidr;
    }

    /// The engine, for in-process callers.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The HTTP routes of the Kubernetes API.
    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/version",
                get(|| async { json(StatusCode::OK, &discovery::version()) }),
            )
            .route("/api", get(core_groups))
            .route("/api/", get(core_groups))
            .route("/api/v1", get(core_resources))
            .route("/api/v1/", get(core_resources))
            .route("/apis", get(groups))
            .route("/apis/", get(groups))
            // With a trailing slash too, as kube-apiserver serves them (the e2e Discovery
            // spec asks for `/apis/<group>/`).
            .route("/apis/{group}", get(group))
            .route("/apis/{group}/", get(group))
            .route("/apis/{group}/{version}", get(group_resources))
            .route("/apis/{group}/{version}/", get(group_resources))
            .route("/api/v1/{*rest}", any(core_resource))
            .route("/apis/{group}/{version}/{*rest}", any(group_resource))
            .route("/openapi/v2", get(openapi_v2))
            .route(
                "/openapi/v3",
                get(|State(engine): State<Engine>| async move {
                    json(StatusCode::OK, &openapi::v3_index(&engine.registry))
                }),
            )
            .route("/openapi/v3/{*path}", get(openapi_v3))
            .route(
                "/.well-known/openid-configuration",
                get(|State(engine): State<Engine>| async move {
                    match engine.token_issuer() {
                        Ok(issuer) => json(StatusCode::OK, &issuer.openid_configuration()),
                        Err(e) => e.into_response(),
                    }
                }),
            )
            .route(
                "/openid/v1/jwks",
                get(|State(engine): State<Engine>| async move {
                    match engine.token_issuer() {
                        Ok(issuer) => json(StatusCode::OK, &issuer.jwks()),
                        Err(e) => e.into_response(),
                    }
                }),
            )
            .fallback(|| async { ApiError::NoRoute })
            .layer(axum::middleware::from_fn(proto::respond::negotiate))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(self.engine.clone())
    }
}

fn json(code: StatusCode, value: &Value) -> Response {
    let body = serde_json::to_vec(value).unwrap_or_default();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// `/openapi/v2`: JSON when JSON is acceptable. kubectl ≤ 1.28 asks only for the gnostic
/// protobuf encoding, which is not implemented: it gets an empty (valid) protobuf document,
/// so its client-side validation passes everything to the server, which validates itself.
async fn openapi_v2(State(engine): State<Engine>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if accept.contains("protobuf") && !accept.contains("json") {
        return (
            // Go's mime parser refuses the gnostic media type's `@`; kube-apiserver sends
            // this for it too.
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Vec::<u8>::new(),
        )
            .into_response();
    }
    let etag = format!("\"{}\"", openapi::v2_etag(&engine.registry));
    if let Some(unchanged) = not_modified(&headers, &etag) {
        return unchanged;
    }
    let document = tokio::task::spawn_blocking(move || openapi::v2(&engine.registry)).await;
    match document {
        Ok(document) => with_etag(json(StatusCode::OK, &document), &etag),
        Err(e) => ApiError::Internal(format!("building the OpenAPI document: {e}")).into_response(),
    }
}

/// A 304 when the client's `If-None-Match` names `etag`.
fn not_modified(headers: &HeaderMap, etag: &str) -> Option<Response> {
    let asked = headers.get(header::IF_NONE_MATCH)?.to_str().ok()?;
    asked
        .split(',')
        .any(|tag| tag.trim().trim_start_matches("W/") == etag)
        .then(|| with_etag(StatusCode::NOT_MODIFIED.into_response(), etag))
}

fn with_etag(mut response: Response, etag: &str) -> Response {
    if let Ok(value) = header::HeaderValue::from_str(etag) {
        response.headers_mut().insert(header::ETAG, value);
    }
    response
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/<group>/<version>` (a `?hash=` is ignored).
async fn openapi_v3(
    State(engine): State<Engine>,
    Path(path): Path<String>,
    headers: HeaderMap,
) -> Response {
    let parts: Vec<&str> = path.split('/').collect();
    let (group, version) = match parts.as_slice() {
        ["api", version] => (String::new(), (*version).to_owned()),
        ["apis", group, version] => ((*group).to_owned(), (*version).to_owned()),
        _ => return ApiError::NoRoute.into_response(),
    };
    let Some(etag) = openapi::v3_etag(&engine.registry, &group, &version) else {
        return ApiError::NoRoute.into_response();
    };
    let etag = format!("\"{etag}\"");
    if let Some(unchanged) = not_modified(&headers, &etag) {
        return unchanged;
    }
    let document = tokio::task::spawn_blocking(move || {
        openapi::v3_group_version(&engine.registry, &group, &version)
    })
    .await;
    match document {
        Ok(Some(document)) => with_etag(json(StatusCode::OK, &document), &etag),
        Ok(None) => ApiError::NoRoute.into_response(),
        Err(e) => ApiError::Internal(format!("building the OpenAPI document: {e}")).into_response(),
    }
}

async fn core_resources(State(engine): State<Engine>) -> Response {
    match discovery::resources(&engine.registry, "", "v1") {
        Some(list) => json(StatusCode::OK, &list),
        None => ApiError::NoRoute.into_response(),
    }
}

/// `/api`: the core group's versions, or its aggregated discovery document.
async fn core_groups(State(engine): State<Engine>, headers: HeaderMap) -> Response {
    aggregated(&engine, &headers, true, Vec::new())
        .unwrap_or_else(|| json(StatusCode::OK, &discovery::core_versions()))
}

/// `/apis`: the groups (the APIServices' included), or their aggregated discovery document.
async fn groups(State(engine): State<Engine>, headers: HeaderMap) -> Response {
    let remote = match discovery::aggregated_version(
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    ) {
        Some(_) => aggregator::aggregated_groups(&engine).await,
        None => aggregator::legacy_groups(&engine).await,
    };
    if let Some(response) = aggregated(&engine, &headers, false, remote.clone()) {
        return response;
    }
    let mut document = discovery::groups(&engine.registry);
    if let Some(groups) = document["groups"].as_array_mut() {
        groups.extend(remote);
    }
    json(StatusCode::OK, &document)
}

/// The aggregated discovery document, if the client's `Accept` asks for it (what it asks
/// first wins: kubectl lists v2, then v2beta1, then plain JSON), with `remote` groups (the
/// APIServices') added.
fn aggregated(
    engine: &Engine,
    headers: &HeaderMap,
    legacy: bool,
    remote: Vec<Value>,
) -> Option<Response> {
    let accept = headers.get(header::ACCEPT)?.to_str().ok()?;
    let version = discovery::aggregated_version(accept)?;
    let mut document = discovery::aggregated(&engine.registry, legacy, version);
    if let Some(items) = document["items"].as_array_mut() {
        items.extend(remote);
    }
    let content_type =
        format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList");
    let body = serde_json::to_vec(&document).unwrap_or_default();
    Some(
        (
            StatusCode::OK,
            [
                (header::CONTENT_TYPE, content_type),
                (header::VARY, "Accept".to_owned()),
            ],
            body,
        )
            .into_response(),
    )
}

async fn group(State(engine): State<Engine>, Path(group): Path<String>) -> Response {
    match discovery::group(&engine.registry, &group) {
        Some(g) => json(StatusCode::OK, &g),
        None => match aggregator::group(&engine, &group).await {
            Some(g) => json(StatusCode::OK, &g),
            None => ApiError::NoRoute.into_response(),
        },
    }
}

async fn group_resources(
    State(engine): State<Engine>,
    Path((group, version)): Path<(String, String)>,
    caller: Caller,
    http: axum::extract::Request,
) -> Response {
    match discovery::resources(&engine.registry, &group, &version) {
        Some(list) => json(StatusCode::OK, &list),
        None => {
            let caller = caller.map(|axum::Extension(user)| user);
            aggregator::serve(&engine, &group, &version, http, caller.as_ref())
                .await
                .unwrap_or_else(|| ApiError::NoRoute.into_response())
        }
    }
}

/// The authenticated caller, when the server authenticates (reviews answer about it).
type Caller = Option<axum::Extension<authorization::User>>;

#[allow(clippy::too_many_arguments)]
async fn core_resource(
    State(engine): State<Engine>,
    method: Method,
    Path(rest): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    caller: Caller,
    http: axum::extract::Request,
) -> Response {
    use axum::extract::FromRequest as _;
    let caller = caller.map(|axum::Extension(user)| user);
    let request = Request {
        engine: &engine,
        method,
        caller: caller.as_ref(),
        headers: &headers,
    };
    // Proxies relay the request as it is, body and all.
    if let Some(proxy) = proxy::ProxyRequest::parse(http.uri().path()) {
        return proxy::serve(&engine, proxy, http)
            .await
            .unwrap_or_else(IntoResponse::into_response);
    }
    // `pods/log` as a WebSocket.
    if headers.contains_key(header::UPGRADE)
        && let Ok(target) = Target::parse(&engine.registry, "", "v1", &rest)
        && podlog::is_pod_log(&target)
    {
        return podlog::serve_websocket(&engine, &target, query.as_deref().unwrap_or(""), http)
            .await
            .unwrap_or_else(IntoResponse::into_response);
    }
    // An upgrade (`pods/exec`, `attach`, `portforward`) keeps the connection to relay.
    if headers.contains_key(header::UPGRADE)
        && let Ok(target) = Target::parse(&engine.registry, "", "v1", &rest)
        && stream::is_stream(&target)
    {
        let (response, warnings) = admission::webhook::scoped(
            caller.clone(),
            stream::serve(&engine, &target, query.as_deref().unwrap_or(""), http),
        )
        .await;
        return response
            .map(|response| with_warnings(response, &warnings))
            .unwrap_or_else(IntoResponse::into_response);
    }
    let body = Bytes::from_request(http, &()).await;
    serve(request, "", "v1", &rest, query, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

#[allow(clippy::too_many_arguments)]
async fn group_resource(
    State(engine): State<Engine>,
    method: Method,
    Path((group, version, rest)): Path<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    caller: Caller,
    http: axum::extract::Request,
) -> Response {
    use axum::extract::FromRequest as _;
    let caller = caller.map(|axum::Extension(user)| user);
    // A group/version served by an APIService's server, not here: proxied there.
    if !engine.registry.serves(&group, &version) {
        match aggregator::serve(&engine, &group, &version, http, caller.as_ref()).await {
            Some(response) => return response,
            None => return ApiError::NoRoute.into_response(),
        }
    }
    let body = Bytes::from_request(http, &()).await;
    let request = Request {
        engine: &engine,
        method,
        caller: caller.as_ref(),
        headers: &headers,
    };
    serve(request, &group, &version, &rest, query, body)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

/// One resource request as it reached the API: who sent what.
struct Request<'a> {
    engine: &'a Engine,
    method: Method,
    caller: Option<&'a authorization::User>,
    headers: &'a HeaderMap,
}

/// Refuses bodies that are neither JSON nor Kubernetes protobuf.
fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence == "application/json"
        || essence.ends_with("+json")
        || essence == proto::CONTENT_TYPE
        || essence.is_empty()
    {
        Ok(())
    } else {
        Err(ApiError::UnsupportedMediaType(format!(
            "the body of the request was in an unknown format - accepted media types include: application/json, application/vnd.kubernetes.protobuf (got {content_type:?})"
        )))
    }
}

/// An update (PUT, or PATCH once applied) by `manager`: the fields it changes from
/// `current` (the object as read, if the caller already has it) are recorded as that
/// manager's in managedFields (main resource only), then the engine writes it.
/// Whether the client asked for protobuf first (client-go's clientsets do).
fn wants_protobuf(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(proto::respond::prefers_protobuf)
}

/// A LIST in protobuf written from the watch cache's per-object messages (each encoded once
/// per version of the object), so it costs what the JSON one does; `None` when the general
/// path (JSON, re-encoded by the negotiation layer) must answer.
async fn list_protobuf(
    engine: &Engine,
    target: &Target,
    params: &Params,
) -> Result<Option<Vec<u8>>, ApiError> {
    let def = &target.def;
    let api_version = def.api_version();
    let list_kind = format!("{}List", def.kind);
    if !proto::has_schema(&api_version, &list_kind) {
        return Ok(None);
    }
    let Some(list) = engine.list_cached_as_stored(target, params).await? else {
        return Ok(None);
    };
    let mut items = Vec::with_capacity(list.items.len());
    for entry in &list.items {
        match entry.protobuf(|object| proto::encode_message(object).ok()) {
            Some(message) => items.push(message),
            None => return Ok(None),
        }
    }
    Ok(proto::encode_list(
        &api_version,
        &list_kind,
        &list.metadata,
        items.iter().map(|b| &b[..]),
    )
    .ok())
}

async fn update_recorded(
    engine: &Engine,
    target: &Target,
    mut object: Value,
    current: Option<Value>,
    manager: &str,
    dry_run: bool,
) -> Result<Value, ApiError> {
    if target.subresource.is_none() {
        let old = match current {
            Some(current) => Some(current),
            None => engine.get(target).await.ok(),
        };
        object::normalize(&target.def, &mut object);
        managed::record_update(&target.def, old.as_ref(), &mut object, manager);
    }
    engine.update(target, object, dry_run).await
}

/// Adds one `Warning: 299 - "…"` header per warning (kubectl prints them as `Warning: …`).
fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    for warning in warnings {
        let quoted = warning.replace('\\', "\\\\").replace('"', "\\\"");
        if let Ok(value) = header::HeaderValue::from_str(&format!("299 - \"{quoted}\"")) {
            response.headers_mut().append(header::WARNING, value);
        }
    }
    response
}

/// A body that could not be read: too large (413) or broken (400).
fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge
    } else {
        ApiError::BadRequest(format!("the request body could not be read: {rejection}"))
    }
}

/// A JSON or protobuf body (repeated fields keep their last value).
fn parse_body(bytes: &[u8]) -> Result<Value, ApiError> {
    body::parse(bytes, false).map(|body| body.object)
}

/// `GET|PUT|PATCH <resource>/<name>/scale`.
async fn serve_scale(
    engine: &Engine,
    target: &Target,
    method: Method,
    params: &Params,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let paths = target.def.scale.clone().ok_or(ApiError::NoRoute)?;
    let main = Target {
        subresource: None,
        ..target.clone()
    };
    let current = subresource::scale_of(&engine.get(&main).await?, &paths);
    let dry_run = params.dry_run()?;
    let desired = match method {
        Method::GET => return Ok(json(StatusCode::OK, &current)),
        Method::PUT => parse_body(body)?,
        Method::PATCH => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch = parse_body(body)?;
            let mut scale = current.clone();
            match PatchType::from_content_type(content_type)? {
                PatchType::Merge | PatchType::Strategic => patch::merge(&mut scale, &patch),
                PatchType::Json => patch::json_patch(&mut scale, &patch)?,
                PatchType::Apply => {
                    return Err(ApiError::UnsupportedMediaType(
                        "server-side apply is not supported yet".into(),
                    ));
                }
            }
            scale
        }
        _ => return Err(ApiError::MethodNotAllowed),
    };
    Ok(json(
        StatusCode::OK,
        &subresource::update_scale(engine, target, &desired, dry_run).await?,
    ))
}

/// Server-side apply: creates the object if it is missing, otherwise merges the applied
/// configuration into it (by merge keys for built-in kinds, as a merge patch for custom
/// resources), with field ownership from [`managed`]: conflicts with other managers are a
/// 409 unless `force`, and fields the manager no longer applies are removed.
async fn apply(
    engine: &Engine,
    target: &Target,
    params: &Params,
    applied: Value,
    dry_run: bool,
) -> Result<Response, ApiError> {
    let manager = match params.field_manager.as_deref() {
        Some(manager) if !manager.is_empty() => manager,
        _ => {
            return Err(ApiError::BadRequest(
                "PATCH with application/apply-patch+yaml requires the fieldManager parameter"
                    .into(),
            ));
        }
    };
    let force = request::flag(&params.force);
    let name = target.name.clone().unwrap_or_default();
    if applied
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .is_some_and(|n| n != name)
    {
        return Err(ApiError::BadRequest(format!(
            "the name of the applied object does not match the name on the URL ({name})"
        )));
    }
    loop {
        let current = match engine.get(target).await {
            Ok(current) => current,
            Err(ApiError::NotFound { .. }) if target.subresource.is_none() => {
                let mut object = applied.clone();
                object["metadata"]["name"] = json!(name);
                managed::apply(&target.def, None, &applied, &mut object, manager, force)?;
                match engine
                    .create(&target.def, target.namespace.as_deref(), object, dry_run)
                    .await
                {
                    Ok(created) => return Ok(json(StatusCode::CREATED, &created)),
                    Err(ApiError::AlreadyExists { .. }) => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let mut merged = match smp::strategies(&target.def.group, &target.def.kind) {
            Some(schema) => smp::apply(schema, &current, &applied)?,
            None => {
                let mut object = current.clone();
                patch::merge(&mut object, &applied);
                object
            }
        };
        if target.subresource.is_none() {
            managed::apply(
                &target.def,
                Some(&current),
                &applied,
                &mut merged,
                manager,
                force,
            )?;
        }
        // The version read is the precondition, unless the applied object names one.
        if applied.pointer("/metadata/resourceVersion").is_none() {
            merged["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
        }
        match engine.update(target, merged, dry_run).await {
            Err(ApiError::Conflict { .. })
                if applied.pointer("/metadata/resourceVersion").is_none() =>
            {
                continue;
            }
            other => return Ok(json(StatusCode::OK, &other?)),
        }
    }
}

/// Dispatches one resource request by verb.
async fn serve(
    request: Request<'_>,
    group: &str,
    version: &str,
    rest: &str,
    query: Option<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let Request {
        engine,
        method,
        caller,
        headers,
    } = request;
    let body = body.map_err(body_error)?;
    let target = Target::parse(&engine.registry, group, version, rest)?;
    if target.def.create_only {
        if method != Method::POST || target.name.is_some() || target.subresource.is_some() {
            return Err(ApiError::MethodNotAllowed);
        }
        require_json(headers)?;
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        // A review has no Table or metadata-only form.
        if Representation::from_accept(accept) != Representation::Full {
            return Err(ApiError::NotAcceptable);
        }
        let answer = review::answer(engine, &target, caller, parse_body(&body)?).await?;
        return Ok(json(StatusCode::CREATED, &answer));
    }
    if target.def.read_only {
        return serve_read_only(engine, &target, &method, headers, query.as_deref()).await;
    }
    if stream::is_stream(&target) {
        return Err(ApiError::BadRequest(
            "Upgrade request required: use a client that streams (kubectl, client-go, kube-rs)"
                .into(),
        ));
    }
    // Logs stream for as long as they follow: no request timeout.
    if podlog::is_pod_log(&target) {
        if method != Method::GET {
            return Err(ApiError::MethodNotAllowed);
        }
        return podlog::serve(engine, &target, query.as_deref().unwrap_or("")).await;
    }
    let params: Params = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query parameters: {e}")))?;
    // Watches are long-running (their own timeoutSeconds ends them); everything else gets
    // the server's request timeout, or the shorter `?timeout=` the client asks for.
    if method == Method::GET && params.is_watch() {
        return dispatch(engine, method, target, params, headers, body).await;
    }
    let limit = match params.timeout()? {
        Some(asked) => asked.min(engine.request_timeout),
        None => engine.request_timeout,
    };
    // Admission webhooks learn who asks from the request's scope, and give warnings back.
    let (result, warnings) = admission::webhook::scoped(
        caller.cloned(),
        tokio::time::timeout(
            limit,
            dispatch(engine, method, target, params, headers, body),
        ),
    )
    .await;
    match result {
        Ok(result) => result.map(|response| with_warnings(response, &warnings)),
        Err(_) => Err(ApiError::Timeout(format!(
            "Timeout: request did not complete within the allotted timeout of {limit:?}"
        ))),
    }
}

/// Serves a GET of what the server computes rather than stores (the resource metrics).
async fn serve_read_only(
    engine: &Engine,
    target: &Target,
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Response, ApiError> {
    if *method != Method::GET || target.subresource.is_some() {
        return Err(ApiError::MethodNotAllowed);
    }
    let params: Params = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("invalid query parameters: {e}")))?;
    let answer = resource_metrics::serve(engine, target, &params).await?;
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if Representation::from_accept(accept) != Representation::Table {
        return Ok(json(StatusCode::OK, &answer));
    }
    let items = match answer.get("items") {
        Some(Value::Array(items)) => items.clone(),
        _ => vec![answer],
    };
    let include = params.include_object.as_deref();
    Ok(json(
        StatusCode::OK,
        &table::table(&target.def, None, &items, json!({}), include),
    ))
}

/// Serves one resource request by verb, once parsed.
async fn dispatch(
    engine: &Engine,
    method: Method,
    target: Target,
    params: Params,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    match target.subresource.as_deref() {
        None => {}
        Some("status") if target.def.status => {}
        Some("ephemeralcontainers" | "resize") if crate::engine::is_pod(&target.def) => {}
        Some("approval") if crate::engine::is_csr(&target.def) => {}
        Some("scale") if target.def.scale.is_some() => {
            return serve_scale(engine, &target, method, &params, headers, &body).await;
        }
        Some("binding")
            if target.def.group.is_empty()
                && target.def.kind == "Pod"
                && method == Method::POST =>
        {
            let binding = parse_body(&body)?;
            let status = subresource::bind(engine, &target, &binding).await?;
            return Ok(json(StatusCode::CREATED, &status));
        }
        Some("eviction") if eviction::is_eviction(&target) => {
            if method != Method::POST {
                return Err(ApiError::MethodNotAllowed);
            }
            require_json(headers)?;
            let status = eviction::evict(engine, &target, &parse_body(&body)?, &params).await?;
            return Ok(json(StatusCode::CREATED, &status));
        }
        Some("token") if token::is_token_request(&target) => {
            if method != Method::POST {
                return Err(ApiError::MethodNotAllowed);
            }
            require_json(headers)?;
            let request = if body.is_empty() {
                json!({})
            } else {
                parse_body(&body)?
            };
            let issuer = engine.token_issuer()?;
            let answer = token::request(engine, issuer, &target, &request).await?;
            return Ok(json(StatusCode::CREATED, &answer));
        }
        // `PUT namespaces/<name>/finalize`: the namespace controller's way to take its
        // `spec.finalizers` off (nothing else in the body is taken).
        Some("finalize") if engine::is_namespace(&target.def) => {
            if method != Method::PUT {
                return Err(ApiError::MethodNotAllowed);
            }
            require_json(headers)?;
            let namespace = engine
                .update(&target, parse_body(&body)?, params.dry_run()?)
                .await?;
            return Ok(json(StatusCode::OK, &namespace));
        }
        Some(_) => return Err(ApiError::NoRoute),
    }
    let dry_run = params.dry_run()?;
    let field_validation = params.field_validation()?;
    let manager = || {
        let user_agent = headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok());
        managed::manager_of(params.field_manager.as_deref(), user_agent)
    };
    let form = Representation::from_accept(
        headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(""),
    );
    let as_table = form == Representation::Table;
    let include_object = params.include_object.clone();
    let tabulate = |objects: &[Value], metadata: Value| {
        let columns = Some(target.def.printer_columns.as_slice()).filter(|c| !c.is_empty());
        table::table(
            &target.def,
            columns,
            objects,
            metadata,
            include_object.as_deref(),
        )
    };
    if matches!(method, Method::POST | Method::PUT) && !body.is_empty() {
        require_json(headers)?;
    }
    match (method, target.name.is_some()) {
        (Method::GET, false) if params.is_watch() => {
            let stream = watch::watch(engine, &target, &params, form).await?;
            Ok((
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                Body::from_stream(stream),
            )
                .into_response())
        }
        (Method::GET, false) => {
            if form == Representation::Full && wants_protobuf(headers) {
                if let Some(body) = list_protobuf(engine, &target, &params).await? {
                    return Ok((
                        StatusCode::OK,
                        [(header::CONTENT_TYPE, proto::CONTENT_TYPE)],
                        body,
                    )
                        .into_response());
                }
            }
            if form == Representation::Full {
                let body = engine.list_json(&target, &params).await?;
                return Ok((
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, "application/json")],
                    body,
                )
                    .into_response());
            }
            let list = engine.list(&target, &params).await?;
            if as_table {
                let items = list["items"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                return Ok(json(
                    StatusCode::OK,
                    &tabulate(items, list["metadata"].clone()),
                ));
            }
            let items: Vec<Value> = list["items"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(object::partial_metadata)
                .collect();
            Ok(json(
                StatusCode::OK,
                &json!({
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": list["metadata"],
                    "items": items,
                }),
            ))
        }
        (Method::GET, true) => {
            let object = engine.get(&target).await?;
            if as_table {
                let metadata = json!({"resourceVersion": object.pointer("/metadata/resourceVersion").cloned().unwrap_or_default()});
                return Ok(json(
                    StatusCode::OK,
                    &tabulate(std::slice::from_ref(&object), metadata),
                ));
            }
            if form == Representation::Metadata {
                return Ok(json(StatusCode::OK, &object::partial_metadata(&object)));
            }
            Ok(json(StatusCode::OK, &object))
        }
        (Method::POST, false) => {
            let body::Body {
                mut object,
                duplicates,
            } = body::parse(&body, false)?;
            let warnings =
                unknown_field_warnings(&target.def, &object, &duplicates, field_validation, false)?;
            object::normalize(&target.def, &mut object);
            managed::record_update(&target.def, None, &mut object, &manager());
            let object = engine
                .create(&target.def, target.namespace.as_deref(), object, dry_run)
                .await?;
            Ok(with_warnings(json(StatusCode::CREATED, &object), &warnings))
        }
        (Method::PUT, true) => {
            let body::Body { object, duplicates } = body::parse(&body, false)?;
            let warnings =
                unknown_field_warnings(&target.def, &object, &duplicates, field_validation, false)?;
            let object =
                update_recorded(engine, &target, object, None, &manager(), dry_run).await?;
            Ok(with_warnings(json(StatusCode::OK, &object), &warnings))
        }
        (Method::PATCH, true) => {
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let patch_type = PatchType::from_content_type(content_type)?;
            let body::Body {
                object: patch,
                duplicates,
            } = body::parse(&body, patch_type == PatchType::Apply)?;
            // Apply creates missing objects, so it does not start from a read.
            if patch_type == PatchType::Apply {
                let warnings = unknown_field_warnings(
                    &target.def,
                    &patch,
                    &duplicates,
                    field_validation,
                    true,
                )?;
                let response = apply(engine, &target, &params, patch, dry_run).await?;
                return Ok(with_warnings(response, &warnings));
            }
            // Custom resources have no Go types to take merge keys from: 415, as
            // kube-apiserver answers (kubectl then falls back to a merge patch).
            let strategies = match patch_type {
                PatchType::Strategic => Some(
                    smp::strategies(&target.def.group, &target.def.kind).ok_or_else(|| {
                        ApiError::UnsupportedMediaType(format!(
                            "strategic merge patch is not supported for {}; use a JSON or merge patch",
                            target.def.kind
                        ))
                    })?,
                ),
                _ => None,
            };
            // A patch that names no resourceVersion applies to whatever is current: a write
            // that slips in between our read and our write is a conflict we retry with the
            // patch applied afresh, as kube-apiserver's GuaranteedUpdate does (each conflict
            // means another write succeeded; the request timeout bounds the loop) — never a
            // lost update, and not the client's problem (`kubectl patch` does not retry).
            let pinned = match patch_type {
                PatchType::Json => patch.as_array().is_some_and(|ops| {
                    ops.iter()
                        .any(|op| op["path"] == "/metadata/resourceVersion")
                }),
                _ => patch.pointer("/metadata/resourceVersion").is_some(),
            };
            loop {
                let current = engine.get(&target).await?;
                let object = match strategies {
                    Some(schema) => smp::apply(schema, &current, &patch)?,
                    None if patch_type == PatchType::Json => {
                        let mut object = current.clone();
                        // A built-in kind's `spec` and `status` are Go structs, always in
                        // kube-apiserver's JSON even when empty: a patch may add below them.
                        let filled = fill_struct_fields(&target.def, &mut object);
                        patch::json_patch(&mut object, &patch).map_err(|e| match e {
                            ApiError::Invalid { causes, .. } => ApiError::Invalid {
                                kind: target.def.kind.clone(),
                                name: target.name.clone().unwrap_or_default(),
                                group: target.def.group.clone(),
                                causes,
                            },
                            other => other,
                        })?;
                        for field in filled {
                            if object[field] == json!({})
                                && let Some(map) = object.as_object_mut()
                            {
                                map.remove(field);
                            }
                        }
                        object
                    }
                    None => {
                        let mut object = current.clone();
                        patch::merge(&mut object, &patch);
                        object
                    }
                };
                let warnings = unknown_field_warnings(
                    &target.def,
                    &object,
                    &duplicates,
                    field_validation,
                    false,
                )?;
                match update_recorded(engine, &target, object, Some(current), &manager(), dry_run)
                    .await
                {
                    Err(ApiError::Conflict { .. }) if !pinned => continue,
                    result => return Ok(with_warnings(json(StatusCode::OK, &result?), &warnings)),
                }
            }
        }
        (Method::DELETE, named) => {
            let options = if body.is_empty() {
                Value::Null
            } else {
                parse_body(&body)?
            };
            let deleted = if named {
                engine.delete(&target, &options, &params).await?
            } else {
                engine.delete_collection(&target, &options, &params).await?
            };
            Ok(json(StatusCode::OK, &deleted))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Gives `object` the empty `spec` and `status` its built-in kind declares and it lacks;
/// returns which it added.
fn fill_struct_fields(def: &registry::ResourceDef, object: &mut Value) -> Vec<&'static str> {
    let builtin = matches!(def.openapi, registry::SchemaSource::Builtin(_));
    let Some(schema) = def.schema.as_ref().filter(|_| builtin) else {
        return Vec::new();
    };
    let mut filled = Vec::new();
    for field in ["spec", "status"] {
        if schema.declares_object(field)
            && let Some(map) = object.as_object_mut()
            && !map.contains_key(field)
        {
            map.insert(field.into(), json!({}));
            filled.push(field);
        }
    }
    filled
}

/// Test support: checks that a file generated by a script under `scripts/` is current.
#[cfg(test)]
pub(crate) fn assert_generated_current(script: &str, generated: &str) {
    let path = format!("{}/../scripts/{script}", env!("CARGO_MANIFEST_DIR"));
    let status = std::process::Command::new("python3")
        .args([path.as_str(), "--check"])
        .status()
        .expect("python3 runs the generator");
    assert!(
        status.success(),
        "{generated} is stale: run scripts/{script}"
    );
}
