//! `pods/log`: the API server finds the pod's node and proxies the request to that node
//! agent's HTTPS endpoint (`/containerLogs/{namespace}/{pod}/{container}`), streaming the
//! answer back — as kube-apiserver proxies to the kubelet. A WebSocket upgrade
//! (`binary.k8s.io`, `base64.binary.k8s.io`) gets the same stream as messages.
//!
//! The agent's certificate is self-signed and not verified (kube-apiserver's default without
//! `--kubelet-certificate-authority`); the request carries the bearer token the agents
//! accept (see [`Engine::kubelet_token`]).

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;

/// Whether `target` is `pods/log`.
pub fn is_pod_log(target: &Target) -> bool {
    target.def.group.is_empty()
        && target.def.kind == "Pod"
        && target.subresource.as_deref() == Some("log")
}

/// Serves `GET …/pods/{name}/log?{query}`.
pub async fn serve(engine: &Engine, target: &Target, query: &str) -> Result<Response, ApiError> {
    let pod_target = Target {
        subresource: None,
        ..target.clone()
    };
    let pod = engine.get(&pod_target).await?;
    let name = target.name.clone().unwrap_or_default();
    let namespace = target.namespace.clone().unwrap_or_default();
    let mut params: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| ApiError::BadRequest(format!("invalid query parameters: {e}")))?;
    let container = crate::stream::container_of(&pod, &name, &params)?;
    params.retain(|(k, _)| k != "container");
    let (node_name, base) = crate::stream::node_agent_url(engine, &pod, &name).await?;
    let query = serde_urlencoded::to_string(&params).unwrap_or_default();
    let url = format!("{base}/containerLogs/{namespace}/{name}/{container}?{query}");
    let mut request = engine.node_client()?.get(&url);
    if let Some(token) = engine.kubelet_token.get() {
        request = request.bearer_auth(token);
    }
    let unreachable = |e: &dyn std::fmt::Display| {
        ApiError::Internal(format!(
            "error talking to the node agent of {node_name} ({url}): {e}"
        ))
    };
    let response = request.send().await.map_err(|e| unreachable(&e))?;
    let status = response.status();
    if !status.is_success() {
        let message = response.text().await.unwrap_or_default();
        return Err(match status.as_u16() {
            400 => ApiError::BadRequest(message.trim().to_owned()),
            404 => ApiError::BadRequest(message.trim().to_owned()),
            _ => unreachable(&format!("{status}: {}", message.trim())),
        });
    }
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(response.bytes_stream()),
    )
        .into_response())
}

/// Serves `pods/log` as a WebSocket (`binary.k8s.io`: each message the next bytes of the
/// log; `base64.binary.k8s.io`: the same, base64 in text messages). Errors are answered
/// before anything upgrades.
pub async fn serve_websocket(
    engine: &Engine,
    target: &Target,
    query: &str,
    request: axum::extract::Request,
) -> Result<Response, ApiError> {
    use axum::extract::FromRequest as _;
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use futures::{SinkExt as _, StreamExt as _};
    let upgrade = WebSocketUpgrade::from_request(request, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("not a WebSocket upgrade: {e}")))?;
    let log = serve(engine, target, query).await?;
    let mut body = log.into_body().into_data_stream();
    Ok(upgrade
        .protocols(["binary.k8s.io", "base64.binary.k8s.io"])
        .on_upgrade(move |socket| async move {
            let base64 = socket
                .protocol()
                .is_some_and(|p| p.as_bytes() == b"base64.binary.k8s.io");
            let (mut sink, _incoming) = socket.split();
            while let Some(Ok(chunk)) = body.next().await {
                let message = if base64 {
                    use base64::Engine as _;
                    Message::Text(
                        base64::engine::general_purpose::STANDARD
                            .encode(&chunk)
                            .into(),
                    )
                } else {
                    Message::Binary(chunk)
                };
                if sink.send(message).await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        }))
}
