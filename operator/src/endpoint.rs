//! The manager's HTTP endpoint: `/metrics` (Prometheus text format), `/healthz` (the process
//! is up) and `/readyz` (every cache synced, and the API server answering).

use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, Registry, TextEncoder};

use crate::manager::Readiness;

pub(crate) fn router(registry: Registry, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = Vec::new();
                    match TextEncoder::new().encode(&registry.gather(), &mut body) {
                        Ok(()) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                            body,
                        )
                            .into_response(),
                        Err(e) => {
                            (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response()
                        }
                    }
                }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let readiness = Arc::clone(&readiness);
                async move {
                    match readiness.check() {
                        Ok(()) => (StatusCode::OK, "ok".to_owned()),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
                    }
                }
            }),
        )
}
