//! The agent's own HTTPS endpoint (the kubelet's port 10250): containers' logs for the API
//! server's `pods/log`, `exec` streams for its `pods/exec` ([`crate::stream`]), the agent's
//! metrics, and a health check.
//!
//! Served over TLS with a self-signed certificate kept in the data dir. Every request but
//! `/healthz` needs `Authorization: Bearer <token>` with the token the agent itself uses
//! against the API server — the API server presents the same one when it proxies.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::agent::Context;
use crate::logs::{self, LogOptions};

/// Why the endpoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// The certificate could not be created or read.
    #[error("the agent's serving certificate: {0}")]
    Certificate(String),
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
}

/// A bound, not yet serving, endpoint.
pub struct Endpoint {
    listener: std::net::TcpListener,
    tls: axum_server::tls_rustls::RustlsConfig,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("addr", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// Binds `addr` (port 0 picks one) with a certificate for `names` kept in `tls_dir`.
    pub async fn bind(
        addr: SocketAddr,
        tls_dir: &Path,
        names: &[String],
    ) -> Result<Endpoint, EndpointError> {
        let (cert, key) = certificate(tls_dir, names)?;
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem(cert, key)
            .await
            .map_err(|e| EndpointError::Certificate(e.to_string()))?;
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| EndpointError::Bind { addr, source })?;
        Ok(Endpoint { listener, tls })
    }

    /// The bound port (what the Node's `daemonEndpoints` report).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map_or(0, |a| a.port())
    }

    /// Serves until the task is dropped.
    pub async fn serve(self, ctx: Arc<Context>, registry: prometheus::Registry) {
        let token = ctx.config.endpoint_token.clone();
        let app = Router::new()
            .route(
                "/containerLogs/{namespace}/{pod}/{container}",
                get(container_logs),
            )
            .route("/exec/{namespace}/{pod}/{container}", get(exec).post(exec))
            .route(
                "/attach/{namespace}/{pod}/{container}",
                get(attach).post(attach),
            )
            .route(
                "/portforward/{namespace}/{pod}",
                get(portforward).post(portforward),
            )
            .route("/metrics", get(metrics))
            .route("/metrics/resource", get(resource_metrics))
            .with_state((ctx, registry))
            .layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let token = token.clone();
                    async move { authenticate(token.as_deref(), req, next).await }
                },
            ))
            .route("/healthz", get(|| async { "ok" }));
        match axum_server::from_tcp_rustls(self.listener, self.tls) {
            Ok(server) => {
                if let Err(e) = server.serve(app.into_make_service()).await {
                    tracing::error!(error = %e, "the agent endpoint stopped");
                }
            }
            Err(e) => tracing::error!(error = %e, "the agent endpoint could not start"),
        }
    }
}

type AppState = (Arc<Context>, prometheus::Registry);

async fn authenticate(token: Option<&str>, req: Request, next: Next) -> Response {
    let Some(token) = token else {
        return next.run(req).await;
    };
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes())) {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, "Unauthorized\n").into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn metrics(State((_, registry)): State<AppState>) -> Response {
    use prometheus::Encoder;
    let mut body = Vec::new();
    match prometheus::TextEncoder::new().encode(&registry.gather(), &mut body) {
        Ok(()) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// `GET /metrics/resource`: see [`crate::metrics::resource_metrics`].
async fn resource_metrics(State((ctx, _)): State<AppState>) -> Response {
    let body = crate::metrics::resource_metrics(&ctx);
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response()
}

/// `GET|POST /exec/{namespace}/{pod}/{container}?command=…`: see [`crate::stream`].
async fn exec(
    State((ctx, _)): State<AppState>,
    path: UrlPath<(String, String, String)>,
    query: axum::extract::RawQuery,
    request: Request,
) -> Response {
    crate::stream::exec(ctx, path, query, request).await
}

async fn attach(
    State((ctx, _)): State<AppState>,
    path: UrlPath<(String, String, String)>,
    query: axum::extract::RawQuery,
    request: Request,
) -> Response {
    crate::stream::attach(ctx, path, query, request).await
}

async fn portforward(
    State((ctx, _)): State<AppState>,
    path: UrlPath<(String, String)>,
    query: axum::extract::RawQuery,
    request: Request,
) -> Response {
    crate::stream::portforward(ctx, path, query, request).await
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, message).into_response()
}

/// `GET /containerLogs/{namespace}/{pod}/{container}` with `pods/log`'s query.
async fn container_logs(
    State((ctx, _)): State<AppState>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    Query(options): Query<LogOptions>,
) -> Response {
    let Some(uid) = ctx.pod_uid(&namespace, &pod) else {
        return (
            StatusCode::NOT_FOUND,
            format!("pod \"{pod}\" in namespace \"{namespace}\" is not on this node"),
        )
            .into_response();
    };
    let pod_dir = ctx.pods_dir().join(&uid);
    let attempts = crate::pod::attempt_numbers(&pod_dir.join("containers").join(&container));
    let latest = attempts.iter().max().copied();
    let attempt = match (latest, options.previous) {
        (None, _) => {
            return bad_request(format!(
                "container \"{container}\" in pod \"{pod}\" is waiting to start: ContainerCreating"
            ));
        }
        (Some(0), true) => {
            return bad_request(format!(
                "previous terminated container \"{container}\" in pod \"{pod}\" not found"
            ));
        }
        (Some(n), true) => n - 1,
        (Some(n), false) => n,
    };
    let log = pod_dir
        .join("logs")
        .join(&container)
        .join(format!("{attempt}.log"));
    let bundle = pod_dir
        .join("containers")
        .join(&container)
        .join(attempt.to_string());
    let (lines, offset) = {
        let (log, options) = (log.clone(), options.clone());
        tokio::task::spawn_blocking(move || logs::read(&log, &options))
            .await
            .unwrap_or_default()
    };
    let mut budget = options.limit_bytes.filter(|l| *l > 0).map(|l| l as usize);
    let mut take = move |text: String| -> Option<String> {
        match budget.as_mut() {
            None => Some(text),
            Some(0) => None,
            Some(left) => {
                let cut: String = if text.len() > *left {
                    let mut end = *left;
                    while !text.is_char_boundary(end) {
                        end -= 1;
                    }
                    text[..end].to_owned()
                } else {
                    text
                };
                *left -= cut.len().min(*left);
                Some(cut)
            }
        }
    };
    let mut head = String::new();
    let mut exhausted = false;
    for line in &lines {
        match take(line.render(options.timestamps)) {
            Some(t) => head.push_str(&t),
            None => {
                exhausted = true;
                break;
            }
        }
    }
    let following = options.follow && !options.previous && !exhausted;
    if !following {
        return ([(header::CONTENT_TYPE, "text/plain")], head).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(64);
    let (lines_tx, mut lines_rx) = tokio::sync::mpsc::channel::<logs::Line>(256);
    let since = logs::since(&options);
    let timestamps = options.timestamps;
    let done = move || bundle.join(crate::shim::EXITED).exists() || !bundle.exists();
    tokio::spawn(logs::follow(log, offset, done, lines_tx));
    tokio::spawn(async move {
        if !head.is_empty() && tx.send(Ok(head)).await.is_err() {
            return;
        }
        while let Some(line) = lines_rx.recv().await {
            if since.is_some_and(|s| line.time.parse::<jiff::Timestamp>().is_ok_and(|t| t < s)) {
                continue;
            }
            let Some(text) = take(line.render(timestamps)) else {
                return;
            };
            if tx.send(Ok(text)).await.is_err() {
                return;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    (
        [(header::CONTENT_TYPE, "text/plain")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// The agent's self-signed serving certificate (PEM cert, PEM key), created once.
fn certificate(dir: &Path, names: &[String]) -> Result<(Vec<u8>, Vec<u8>), EndpointError> {
    let failed = |e: &dyn std::fmt::Display| EndpointError::Certificate(e.to_string());
    let (cert_path, key_path) = (dir.join("agent.crt"), dir.join("agent.key"));
    if let (Ok(cert), Ok(key)) = (std::fs::read(&cert_path), std::fs::read(&key_path)) {
        return Ok((cert, key));
    }
    std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
    let key = rcgen::KeyPair::generate().map_err(|e| failed(&e))?;
    let params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| failed(&e))?;
    let cert = params.self_signed(&key).map_err(|e| failed(&e))?;
    let (cert, key) = (cert.pem().into_bytes(), key.serialize_pem().into_bytes());
    std::fs::write(&cert_path, &cert).map_err(|e| failed(&e))?;
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&key_path)
            .map_err(|e| failed(&e))?;
        file.write_all(&key).map_err(|e| failed(&e))?;
    }
    Ok((cert, key))
}
