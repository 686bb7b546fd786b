//! Content negotiation for responses: a client whose `Accept` names protobuf first (client-go's
//! clientsets send `application/vnd.kubernetes.protobuf, application/json`) gets objects,
//! lists and watch events in protobuf; everyone else gets JSON as the handlers wrote it.
//!
//! The handlers stay JSON-only: this layer re-encodes a successful JSON response whose kind has
//! a protobuf schema, and turns a JSON watch stream into length-delimited `WatchEvent` frames.
//! Anything else — errors (`Status`), tables, discovery, kinds without a schema (custom
//! resources) — stays JSON, which such a client also accepts.

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use serde_json::Value;

use super::CONTENT_TYPE;

/// Whether an `Accept` header prefers protobuf: its first media type is protobuf (or the
/// protobuf variant of a meta.k8s.io form).
pub fn prefers_protobuf(accept: &str) -> bool {
    accept
        .split(',')
        .next()
        .is_some_and(|first| first.trim().starts_with(CONTENT_TYPE))
}

/// The middleware: see the module documentation.
pub async fn negotiate(request: Request, next: Next) -> Response {
    let wants = request
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(prefers_protobuf);
    let watching = request.method() == axum::http::Method::GET
        && request.uri().query().is_some_and(|query| {
            query
                .split('&')
                .any(|kv| matches!(kv, "watch=1" | "watch=true"))
        });
    let response = next.run(request).await;
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.starts_with("application/json") && !t.contains(";as=") && !t.contains(";g=")
        });
    if !wants || !json || !response.status().is_success() {
        response
    } else if watching {
        watch(response)
    } else {
        whole(response).await
    }
}

/// A whole JSON body re-encoded, or left as it was if it has no protobuf form.
async fn whole(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let encoded = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|object| super::encode(&object).ok());
    match encoded {
        Some(protobuf) => {
            parts
                .headers
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
            parts.headers.remove(header::CONTENT_LENGTH);
            Response::from_parts(parts, Body::from(protobuf))
        }
        None => Response::from_parts(parts, Body::from(bytes)),
    }
}

/// A JSON watch stream (one event per line) as protobuf frames. An event that cannot be
/// encoded (no schema: the whole watch is of such a kind) ends the stream with what came
/// before; clients then watch again, as after any ended watch.
fn watch(response: Response) -> Response {
    let (mut parts, body) = response.into_parts();
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/vnd.kubernetes.protobuf;stream=watch"),
    );
    let mut pending: Vec<u8> = Vec::new();
    let frames = body
        .into_data_stream()
        .map(move |chunk| {
            let mut out = Vec::new();
            if let Ok(chunk) = chunk {
                pending.extend_from_slice(&chunk);
                while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=end).collect();
                    let Ok(event) = serde_json::from_slice::<Value>(&line) else {
                        continue;
                    };
                    let kind = event["type"].as_str().unwrap_or_default();
                    match super::watch_frame(kind, &event["object"]) {
                        Ok(frame) => out.extend(frame),
                        Err(error) => {
                            tracing::debug!(%error, "a watch event has no protobuf form");
                        }
                    }
                }
            }
            Ok::<_, std::convert::Infallible>(Bytes::from(out))
        })
        .filter(|chunk| futures::future::ready(!matches!(chunk, Ok(b) if b.is_empty())));
    Response::from_parts(parts, Body::from_stream(frames))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_gos_accept_prefers_protobuf() {
        assert!(prefers_protobuf(
            "application/vnd.kubernetes.protobuf, application/json"
        ));
        assert!(!prefers_protobuf(
            "application/json, application/vnd.kubernetes.protobuf"
        ));
        assert!(!prefers_protobuf("*/*"));
    }
}
