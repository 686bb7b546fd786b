//! `pods/exec`, `pods/attach` and `pods/portforward`: the API server checks the pod, then
//! relays the upgraded connection to the pod's node agent, which speaks the streaming
//! protocol itself — as kube-apiserver relays these to the kubelet.
//!
//! The client's upgrade request (WebSocket or SPDY, with the subprotocols it offers) is
//! repeated to the agent's `/exec|attach/{namespace}/{pod}/{container}` or
//! `/portforward/{namespace}/{pod}` with the agent's bearer token; once the agent answers
//! `101 Switching Protocols`, its answer goes back to the client and the two connections are
//! joined byte for byte until either side closes. An agent that refuses (no such container,
//! not running) is an error `Status` before anything is upgraded.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;

/// The request headers that make the upgrade, passed on to the agent.
const UPGRADE_HEADERS: &[&str] = &[
    "upgrade",
    "connection",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "x-stream-protocol-version",
];

/// The response headers of the agent's `101` the client needs.
const SWITCH_HEADERS: &[&str] = &[
    "upgrade",
    "connection",
    "sec-websocket-accept",
    "sec-websocket-protocol",
    "x-stream-protocol-version",
];

/// Whether `target` is a pod's streaming subresource.
pub fn is_stream(target: &Target) -> bool {
    target.def.group.is_empty()
        && target.def.kind == "Pod"
        && matches!(
            target.subresource.as_deref(),
            Some("exec" | "attach" | "portforward")
        )
}

/// The container a request names, or the pod's only one (as kube-apiserver chooses).
pub(crate) fn container_of(
    pod: &Value,
    name: &str,
    params: &[(String, String)],
) -> Result<String, ApiError> {
    let all: Vec<&str> = [
        "/spec/containers",
        "/spec/initContainers",
        "/spec/ephemeralContainers",
    ]
    .iter()
    .filter_map(|p| pod.pointer(p).and_then(Value::as_array))
    .flatten()
    .filter_map(|c| c["name"].as_str())
    .collect();
    if let Some((_, asked)) = params.iter().find(|(k, _)| k == "container") {
        if !all.contains(&asked.as_str()) {
            return Err(ApiError::BadRequest(format!(
                "container {asked} is not valid for pod {name}"
            )));
        }
        return Ok(asked.clone());
    }
    let main: Vec<&str> = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default();
    match main.as_slice() {
        [only] => Ok((*only).to_owned()),
        _ => Err(ApiError::BadRequest(format!(
            "a container name must be specified for pod {name}, choose one of: [{}]",
            main.join(" ")
        ))),
    }
}

/// `https://host:port` of the agent of the node pod `name` runs on.
pub(crate) async fn node_agent_url(
    engine: &Engine,
    pod: &Value,
    name: &str,
) -> Result<(String, String), ApiError> {
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::BadRequest(format!("pod {name} does not have a host assigned")))?;
    let node = NodeEndpoint::of(engine, node_name).await?;
    Ok((node_name.to_owned(), node.agent_url()))
}

/// Where a node is reached: the address it reports and its agent's port.
pub(crate) struct NodeEndpoint {
    /// The node's `InternalIP` (or first) address, bracketed when IPv6.
    pub host: String,
    /// `status.daemonEndpoints.kubeletEndpoint.Port`.
    pub port: u16,
}

impl NodeEndpoint {
    /// Reads node `node_name`'s reported address and agent port.
    pub(crate) async fn of(engine: &Engine, node_name: &str) -> Result<NodeEndpoint, ApiError> {
        let node_target = Target::parse(&engine.registry, "", "v1", &format!("nodes/{node_name}"))?;
        let node = engine.get(&node_target).await?;
        let address = node
            .pointer("/status/addresses")
            .and_then(Value::as_array)
            .and_then(|a| {
                a.iter()
                    .find(|a| a["type"] == "InternalIP")
                    .or_else(|| a.first())
            })
            .and_then(|a| a["address"].as_str())
            .ok_or_else(|| ApiError::BadRequest(format!("node {node_name} reports no address")))?;
        let port = node
            .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
            .and_then(Value::as_i64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                ApiError::BadRequest(format!("node {node_name} reports no agent port"))
            })?;
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address.to_owned()
        };
        Ok(NodeEndpoint { host, port })
    }

    /// `https://host:port` of the node's agent.
    pub(crate) fn agent_url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }
}

/// Serves an upgrade request for `pods/{exec,attach,portforward}`.
/// Admission for a CONNECT: webhooks see the options object (`PodExecOptions`,
/// `PodAttachOptions`, `PodPortForwardOptions`) built from the query, as kube-apiserver
/// passes it, and may refuse the stream before it opens.
async fn admit_connect(
    engine: &Engine,
    target: &Target,
    subresource: &str,
    name: &str,
    namespace: &str,
    params: &[(String, String)],
) -> Result<(), ApiError> {
    use crate::admission::webhook;
    let flag = |key: &str| {
        params
            .iter()
            .any(|(k, v)| k == key && (v == "true" || v == "1"))
    };
    let container = params
        .iter()
        .find(|(k, _)| k == "container")
        .map(|(_, v)| v.clone());
    let mut options = match subresource {
        "portforward" => serde_json::json!({"kind": "PodPortForwardOptions",
            "ports": params.iter().filter(|(k, _)| k == "ports")
                .filter_map(|(_, v)| v.parse::<i64>().ok()).collect::<Vec<_>>()}),
        "exec" => serde_json::json!({"kind": "PodExecOptions",
            "command": params.iter().filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone()).collect::<Vec<_>>()}),
        _ => serde_json::json!({"kind": "PodAttachOptions"}),
    };
    options["apiVersion"] = serde_json::json!("v1");
    if subresource != "portforward" {
        for key in ["stdin", "stdout", "stderr", "tty"] {
            options[key] = serde_json::json!(flag(key));
        }
        if let Some(container) = container {
            options["container"] = serde_json::json!(container);
        }
    }
    let attributes = webhook::Attributes {
        def: &target.def,
        namespace: Some(namespace),
        name,
        subresource: Some(subresource),
        operation: webhook::Operation::Connect,
        old_object: None,
        dry_run: false,
    };
    webhook::mutate(engine, &attributes, &mut options).await?;
    crate::admission::validate_request(engine, &attributes, Some(&options)).await
}

pub async fn serve(
    engine: &Engine,
    target: &Target,
    query: &str,
    mut request: Request,
) -> Result<Response, ApiError> {
    let subresource = target.subresource.clone().unwrap_or_default();
    let pod = engine
        .get(&Target {
            subresource: None,
            ..target.clone()
        })
        .await?;
    let name = target.name.clone().unwrap_or_default();
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut params: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::BadRequest(format!("invalid query parameters: {e}")))?;
    admit_connect(engine, target, &subresource, &name, &namespace, &params).await?;
    let path = if subresource == "portforward" {
        format!("/portforward/{namespace}/{name}")
    } else {
        let phase = pod.pointer("/status/phase").and_then(Value::as_str);
        if let Some(phase @ ("Succeeded" | "Failed")) = phase {
            return Err(ApiError::BadRequest(format!(
                "cannot {subresource} into a container in a completed pod; current phase is \
                 {phase}"
            )));
        }
        let container = container_of(&pod, &name, &params)?;
        params.retain(|(k, _)| k != "container");
        format!("/{subresource}/{namespace}/{name}/{container}")
    };
    if !request.headers().contains_key(header::UPGRADE) {
        return Err(ApiError::BadRequest(
            "Upgrade request required: use a client that streams (kubectl, client-go, kube-rs)"
                .into(),
        ));
    }
    let (node, base) = node_agent_url(engine, &pod, &name).await?;
    let query = serde_urlencoded::to_string(&params).unwrap_or_default();
    let url = format!("{base}{path}?{query}");
    let mut headers = HeaderMap::new();
    for name in UPGRADE_HEADERS {
        for value in request.headers().get_all(*name) {
            headers.append(HeaderName::from_static(name), value.clone());
        }
    }
    let mut upstream = engine
        .node_client()?
        .request(request.method().clone(), &url)
        .headers(headers);
    if let Some(token) = engine.kubelet_token.get() {
        upstream = upstream.bearer_auth(token);
    }
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::Internal(format!(
            "error talking to the node agent of {node} ({url}): {e}"
        ))
    };
    let answer = upstream.send().await.map_err(|e| unreachable(&e))?;
    let status = answer.status();
    if status != StatusCode::SWITCHING_PROTOCOLS {
        let message = answer.text().await.unwrap_or_default().trim().to_owned();
        return Err(match status.as_u16() {
            400 | 404 => ApiError::BadRequest(message),
            _ => unreachable(&format!("{status}: {message}")),
        });
    }
    Ok(relay(&mut request, answer, SWITCH_HEADERS))
}

/// Answers the client's upgrade request with the backend's `101` (its `headers` that the
/// client needs) and joins the two upgraded connections byte for byte until either closes.
/// The request counts as long-running until then.
pub(crate) fn relay(
    request: &mut Request,
    answer: reqwest::Response,
    headers: &[&str],
) -> Response {
    let mut response = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for name in headers {
        for value in answer.headers().get_all(*name) {
            response = response.header(*name, value.clone());
        }
    }
    let client = hyper::upgrade::on(request);
    let (open, ended) = crate::metrics::StreamOpen::new();
    tokio::spawn(async move {
        // Dropped when the relay ends: the request stops counting as long-running.
        let _ended = ended;
        let (agent, client) = match (answer.upgrade().await, client.await) {
            (Ok(agent), Ok(client)) => (agent, client),
            (Err(e), _) => {
                tracing::debug!(error = %e, "the backend's stream did not upgrade");
                return;
            }
            (_, Err(e)) => {
                tracing::debug!(error = %e, "the client's stream did not upgrade");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(client);
        let mut agent = agent;
        let _ = tokio::io::copy_bidirectional(&mut client, &mut agent).await;
    });
    response
        .extension(open)
        .body(Body::empty())
        .unwrap_or_else(|e| ApiError::Internal(e.to_string()).into_response())
}
