//! API aggregation: an APIService (`apiregistration.k8s.io/v1`) backed by a Service makes its
//! group/version served by another API server, as kube-apiserver's aggregator does — every
//! request under `/apis/GROUP/VERSION` the registry does not serve itself is proxied to one
//! of the Service's ready endpoints over TLS (checked against the APIService's `caBundle`
//! for `NAME.NAMESPACE.svc`), with the requesting user in the front-proxy headers
//! (`X-Remote-User`, `X-Remote-Group`) and the server's front-proxy client certificate,
//! which extension servers trust through the `extension-apiserver-authentication` ConfigMap
//! in `kube-system` ([`publish_authentication`]).
//!
//! Discovery merges them: `/apis` lists their groups, `/apis/GROUP` is answered from the
//! APIServices, and the aggregated document (v2) carries each one's resources as its server
//! lists them. [`availability::run`] keeps each APIService's `Available` condition.

pub mod availability;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::authorization::{MASTERS, User};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::{Params, Target};

/// The APIService group.
pub const GROUP: &str = "apiregistration.k8s.io";
/// The ConfigMap extension API servers read to trust this server's proxied requests.
pub const AUTHENTICATION_CONFIGMAP: &str = "extension-apiserver-authentication";
/// The name extension servers expect in the front-proxy client certificate.
pub const FRONT_PROXY_CLIENT: &str = "front-proxy-client";

/// The client identity requests are proxied with, and the CA extension servers check it by.
#[derive(Clone)]
pub struct FrontProxy {
    /// The front-proxy CA certificate, PEM (`requestheader-client-ca-file`).
    pub ca_pem: String,
    /// The client certificate (CN `front-proxy-client`), PEM.
    pub cert_pem: String,
    /// Its key, PEM.
    pub key_pem: String,
}

impl std::fmt::Debug for FrontProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontProxy").finish_non_exhaustive()
    }
}

/// Writes the `extension-apiserver-authentication` ConfigMap: `client_ca` (the cluster CA)
/// and the front-proxy CA with the request-header names, as kube-apiserver publishes them.
pub async fn publish_authentication(
    engine: &Engine,
    client_ca: &str,
    front_proxy: &FrontProxy,
) -> Result<(), ApiError> {
    let data = json!({
        "client-ca-file": client_ca,
        "requestheader-client-ca-file": front_proxy.ca_pem,
        "requestheader-allowed-names": json!([FRONT_PROXY_CLIENT]).to_string(),
        "requestheader-username-headers": json!(["X-Remote-User"]).to_string(),
        "requestheader-group-headers": json!(["X-Remote-Group"]).to_string(),
        "requestheader-extra-headers-prefix": json!(["X-Remote-Extra-"]).to_string(),
        "requestheader-uid-headers": json!(["X-Remote-Uid"]).to_string(),
    });
    let target = Target::parse(
        &engine.registry,
        "",
        "v1",
        &format!("namespaces/kube-system/configmaps/{AUTHENTICATION_CONFIGMAP}"),
    )?;
    match engine.get(&target).await {
        Ok(mut current) => {
            if current["data"] != data {
                current["data"] = data;
                engine.update(&target, current, false).await?;
            }
            Ok(())
        }
        Err(ApiError::NotFound { .. }) => {
            let object = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": AUTHENTICATION_CONFIGMAP, "namespace": "kube-system"},
                "data": data});
            engine
                .create(&target.def, Some("kube-system"), object, false)
                .await
                .map(|_| ())
        }
        Err(error) => Err(error),
    }
}

/// Every APIService backed by a Service.
pub(crate) async fn remotes(engine: &Engine) -> Vec<Value> {
    let Some(def) = crate::quota::served(engine, GROUP, "apiservices") else {
        return Vec::new();
    };
    let target = Target {
        def,
        namespace: None,
        name: None,
        subresource: None,
    };
    match engine.list(&target, &Params::default()).await {
        Ok(list) => list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["spec"]["service"].is_object())
            .cloned()
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// The APIService serving `group/version` through a Service, if any.
pub(crate) async fn remote(engine: &Engine, group: &str, version: &str) -> Option<Value> {
    remotes(engine).await.into_iter().find(|s| {
        s["spec"]["group"].as_str() == Some(group) && s["spec"]["version"].as_str() == Some(version)
    })
}

/// The client for `api_service`'s server: trusting its `caBundle`, presenting the
/// front-proxy certificate, its Service's name resolved to `address`.
fn client(
    engine: &Engine,
    api_service: &Value,
    host: &str,
    address: std::net::SocketAddr,
) -> Result<reqwest::Client, String> {
    static CLIENTS: OnceLock<Mutex<HashMap<String, reqwest::Client>>> = OnceLock::new();
    let ca_bundle = api_service["spec"]["caBundle"].as_str().unwrap_or_default();
    let insecure = api_service["spec"]["insecureSkipTLSVerify"] == true;
    let key = format!("{ca_bundle}|{insecure}|{host}|{address}");
    let clients = CLIENTS.get_or_init(Mutex::default);
    if let Some(client) = clients.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(client.clone());
    }
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .resolve(host, address);
    if insecure {
        builder = builder.danger_accept_invalid_certs(true);
    } else if !ca_bundle.is_empty() {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(ca_bundle)
            .map_err(|e| format!("caBundle is not base64: {e}"))?;
        builder = builder.tls_built_in_root_certs(false);
        for certificate in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("caBundle holds no PEM certificate: {e}"))?
        {
            builder = builder.add_root_certificate(certificate);
        }
    }
    if let Some(front_proxy) = engine.front_proxy() {
        let pem = format!("{}\n{}", front_proxy.cert_pem, front_proxy.key_pem);
        let identity = reqwest::Identity::from_pem(pem.as_bytes())
            .map_err(|e| format!("the front-proxy certificate: {e}"))?;
        builder = builder.identity(identity);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let mut clients = clients.lock().unwrap_or_else(|e| e.into_inner());
    if clients.len() > 64 {
        clients.clear();
    }
    clients.insert(key, client.clone());
    Ok(client)
}

/// Where `api_service`'s server is: `https://NAME.NAMESPACE.svc:PORT`, the client for it.
async fn reach(engine: &Engine, api_service: &Value) -> Result<(String, reqwest::Client), String> {
    let service = &api_service["spec"]["service"];
    let config = json!({"service": {
        "namespace": service["namespace"], "name": service["name"],
        "port": service["port"].as_i64().unwrap_or(443)}});
    let (url, resolve) = crate::admission::webhook::call::locate(engine, &config).await?;
    let (host, address) = resolve.ok_or("the APIService names no Service")?;
    Ok((url, client(engine, api_service, &host, address)?))
}

/// Proxies one request under `api_service`'s group/version to its server as `caller`.
pub(crate) async fn proxy(
    engine: &Engine,
    api_service: &Value,
    method: Method,
    path_and_query: &str,
    headers: &HeaderMap,
    caller: Option<&User>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let name = api_service["metadata"]["name"].as_str().unwrap_or_default();
    let unavailable = |why: String| {
        ApiError::ServiceUnavailable(format!(
            "the server is currently unable to handle the request (APIService {name}: {why})"
        ))
    };
    let (base, client) = reach(engine, api_service).await.map_err(unavailable)?;
    let mut request = client.request(method, format!("{base}{path_and_query}"));
    for name in [
        header::ACCEPT,
        header::CONTENT_TYPE,
        header::USER_AGENT,
        header::ACCEPT_ENCODING,
    ] {
        if let Some(value) = headers.get(&name) {
            request = request.header(name, value);
        }
    }
    // A server that does not authenticate lets everyone do everything: its callers are named
    // as kube-apiserver's old insecure port named them.
    let unsecured = User {
        name: "system:unsecured".into(),
        groups: vec![MASTERS.into(), "system:authenticated".into()],
        ..User::default()
    };
    let user = caller.unwrap_or(&unsecured);
    request = request.header("X-Remote-User", &user.name);
    for group in &user.groups {
        request = request.header("X-Remote-Group", group);
    }
    // Extra keys travel percent-encoded in the header name, as kube-apiserver sends them.
    for (key, values) in &user.extra {
        let name = format!("X-Remote-Extra-{}", escape_extra_key(key));
        for value in values {
            request = request.header(name.as_str(), value);
        }
    }
    let response = request
        .body(body)
        .send()
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let status = StatusCode::from_u16(response.status().as_u16())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut out = Response::builder().status(status);
    for (name, value) in response.headers() {
        if matches!(
            name.as_str(),
            "content-type" | "content-encoding" | "cache-control" | "warning" | "location"
        ) {
            out = out.header(name.as_str(), value.as_bytes());
        }
    }
    // Streamed: a watch is proxied for as long as it runs.
    out.body(Body::from_stream(response.bytes_stream()))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// Serves a request under a group/version no local resource serves, if an APIService does.
pub(crate) async fn serve(
    engine: &Engine,
    group: &str,
    version: &str,
    http: axum::extract::Request,
    caller: Option<&User>,
) -> Option<Response> {
    let api_service = remote(engine, group, version).await?;
    let method = http.method().clone();
    let headers = http.headers().clone();
    let path_and_query = http
        .uri()
        .path_and_query()
        .map_or_else(|| http.uri().path().to_owned(), |p| p.as_str().to_owned());
    let body = match axum::body::to_bytes(http.into_body(), crate::MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(e) => return Some(ApiError::BadRequest(e.to_string()).into_response()),
    };
    Some(
        proxy(
            engine,
            &api_service,
            method,
            &path_and_query,
            &headers,
            caller,
            body,
        )
        .await
        .unwrap_or_else(IntoResponse::into_response),
    )
}

/// `/apis` groups for the APIServices' groups the registry does not serve.
pub(crate) async fn legacy_groups(engine: &Engine) -> Vec<Value> {
    let mut by_group: Vec<(String, Vec<String>)> = Vec::new();
    for api_service in remotes(engine).await {
        let (Some(group), Some(version)) = (
            api_service["spec"]["group"].as_str(),
            api_service["spec"]["version"].as_str(),
        ) else {
            continue;
        };
        if engine.registry.groups().iter().any(|(g, _)| g == group) {
            continue;
        }
        match by_group.iter_mut().find(|(g, _)| g == group) {
            Some((_, versions)) => versions.push(version.to_owned()),
            None => by_group.push((group.to_owned(), vec![version.to_owned()])),
        }
    }
    by_group
        .into_iter()
        .map(|(group, versions)| {
            let entries: Vec<Value> = versions
                .iter()
                .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                .collect();
            json!({"name": group, "versions": entries, "preferredVersion": entries[0]})
        })
        .collect()
}

/// `/apis/GROUP` for a group only APIServices serve.
pub(crate) async fn group(engine: &Engine, name: &str) -> Option<Value> {
    let mut entry = legacy_groups(engine)
        .await
        .into_iter()
        .find(|g| g["name"] == name)?;
    entry["kind"] = json!("APIGroup");
    entry["apiVersion"] = json!("v1");
    Some(entry)
}

/// The aggregated discovery entries (v2) of the APIServices' groups: each version's
/// resources as its server lists them (`/apis/GROUP/VERSION`), remembered for 10 s.
pub(crate) async fn aggregated_groups(engine: &Engine) -> Vec<Value> {
    static CACHE: OnceLock<Mutex<HashMap<String, (Instant, Value)>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Mutex::default);
    let mut out: Vec<Value> = Vec::new();
    for group in legacy_groups(engine).await {
        let name = group["name"].as_str().unwrap_or_default().to_owned();
        let mut versions = Vec::new();
        for version in group["versions"].as_array().into_iter().flatten() {
            let v = version["version"].as_str().unwrap_or_default().to_owned();
            let key = format!("{name}/{v}");
            let cached = cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .filter(|(at, _)| at.elapsed() < Duration::from_secs(10))
                .map(|(_, list)| list.clone());
            let list = match cached {
                Some(list) => Some(list),
                None => {
                    let fetched = resource_list(engine, &name, &v).await;
                    if let Some(list) = &fetched {
                        cache
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key, (Instant::now(), list.clone()));
                    }
                    fetched
                }
            };
            let (resources, freshness) = match list {
                Some(list) => (aggregated_resources(&name, &v, &list), "Current"),
                None => (Vec::new(), "Stale"),
            };
            versions.push(json!({"version": v, "resources": resources, "freshness": freshness}));
        }
        out.push(json!({"metadata": {"name": name}, "versions": versions}));
    }
    out
}

/// The APIResourceList `/apis/GROUP/VERSION` of an APIService's server.
async fn resource_list(engine: &Engine, group: &str, version: &str) -> Option<Value> {
    let api_service = remote(engine, group, version).await?;
    let (base, client) = reach(engine, &api_service).await.ok()?;
    let mut request = client
        .get(format!("{base}/apis/{group}/{version}"))
        .header(header::ACCEPT, "application/json")
        .timeout(Duration::from_secs(5));
    request = request
        .header("X-Remote-User", "system:kube-aggregator")
        .header("X-Remote-Group", "system:masters");
    let response = request.send().await.ok()?.error_for_status().ok()?;
    serde_json::from_slice(&response.bytes().await.ok()?).ok()
}

/// An APIResourceList's resources as aggregated discovery (v2) entries, subresources folded
/// into their resource.
fn aggregated_resources(group: &str, version: &str, list: &Value) -> Vec<Value> {
    let all: Vec<&Value> = list["resources"].as_array().into_iter().flatten().collect();
    let mut out: Vec<Value> = Vec::new();
    for resource in all
        .iter()
        .filter(|r| !r["name"].as_str().unwrap_or("").contains('/'))
    {
        let name = resource["name"].as_str().unwrap_or_default();
        let kind = |r: &Value| json!({"group": group, "version": version, "kind": r["kind"]});
        let subresources: Vec<Value> = all
            .iter()
            .filter_map(|r| {
                let (parent, sub) = r["name"].as_str()?.split_once('/')?;
                (parent == name).then(
                    || json!({"subresource": sub, "responseKind": kind(r), "verbs": r["verbs"]}),
                )
            })
            .collect();
        let mut entry = json!({
            "resource": name,
            "responseKind": kind(resource),
            "scope": if resource["namespaced"] == true { "Namespaced" } else { "Cluster" },
            "singularResource": resource["singularName"],
            "verbs": resource["verbs"],
        });
        for field in ["shortNames", "categories"] {
            if let Some(values) = resource.get(field) {
                entry[field] = values.clone();
            }
        }
        if !subresources.is_empty() {
            entry["subresources"] = json!(subresources);
        }
        out.push(entry);
    }
    out
}

/// An extra key as a header name's tail: bytes other than letters, digits and `-._~`
/// percent-encoded (kube-apiserver uses Go's `url.PathEscape`; `/` is the one that matters).
fn escape_extra_key(key: &str) -> String {
    key.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resource_list_becomes_aggregated_discovery() {
        let list = json!({"kind": "APIResourceList", "groupVersion": "wardle.example.com/v1alpha1",
        "resources": [
            {"name": "flunders", "singularName": "flunder", "namespaced": true,
             "kind": "Flunder", "verbs": ["get", "list", "create"]},
            {"name": "flunders/status", "singularName": "", "namespaced": true,
             "kind": "Flunder", "verbs": ["get", "patch"]},
            {"name": "fischers", "singularName": "fischer", "namespaced": false,
             "kind": "Fischer", "verbs": ["get"], "shortNames": ["fi"]},
        ]});
        let entries = aggregated_resources("wardle.example.com", "v1alpha1", &list);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0]["resource"], "flunders");
        assert_eq!(entries[0]["scope"], "Namespaced");
        assert_eq!(entries[0]["responseKind"]["kind"], "Flunder");
        assert_eq!(entries[0]["subresources"][0]["subresource"], "status");
        assert_eq!(entries[1]["scope"], "Cluster");
        assert_eq!(entries[1]["shortNames"][0], "fi");
    }
}
