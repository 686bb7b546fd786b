//! The HTTP(S) reverse proxy: accepts connections (HTTP/1.1, and HTTP/2 where TLS
//! negotiates it), routes each request by the current [`RouteTable`], and forwards it to
//! one of the backend's endpoints over pooled HTTP/1.1 connections, streaming both bodies.
//!
//! What a request gets when nothing can serve it: 404 when no rule (and no default backend)
//! matches; 503 naming the route and the reason when the backend has no ready endpoint
//! (its Service missing, say); 502 when the chosen endpoint cannot be reached. The proxy
//! adds `X-Forwarded-For`/`-Proto`/`-Host`/`-Port` and `X-Real-IP`, keeps the client's
//! `Host`, drops hop-by-hop headers, and passes upgrades (WebSocket) through as a byte
//! stream once the backend answers 101.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::routes::{Backend, RouteTable};

/// What the proxy answers with: the backend's streamed body, or one of its own.
pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// How long dialling an endpoint may take before the request fails with 502.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ingress' request metrics, under ingress-nginx's names (so its dashboards and alerts
/// apply) with a subset of its labels.
#[derive(Clone, Debug)]
pub struct IngressMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
}

impl IngressMetrics {
    /// Registers the metrics on `registry`.
    pub fn register(registry: &Registry) -> Result<IngressMetrics, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "nginx_ingress_controller_requests",
                "The total number of client requests, by the Ingress that routed them \
                 (empty when none did), its backend Service and the status answered.",
            ),
            &["namespace", "ingress", "service", "status"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "nginx_ingress_controller_request_duration_seconds",
                "The time from a request's arrival to its response's headers, in seconds.",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
            &["namespace", "ingress", "service"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        Ok(IngressMetrics { requests, duration })
    }

    fn record(&self, backend: Option<&Backend>, status: StatusCode, started: Instant) {
        let (namespace, ingress, service) = backend
            .map(|b| (b.namespace.as_str(), b.ingress.as_str(), b.service.as_str()))
            .unwrap_or_default();
        self.requests
            .with_label_values(&[namespace, ingress, service, status.as_str()])
            .inc();
        self.duration
            .with_label_values(&[namespace, ingress, service])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The proxy: the current routes and a pool of connections to endpoints.
#[derive(Debug)]
pub struct Proxy {
    routes: RwLock<Arc<RouteTable>>,
    client: Client<HttpConnector, Incoming>,
    metrics: IngressMetrics,
}

/// How a connection reached the proxy.
#[derive(Clone, Copy, Debug)]
struct Peer {
    client: SocketAddr,
    local: SocketAddr,
    tls: bool,
}

impl Proxy {
    /// A proxy with no routes yet.
    pub fn new(metrics: IngressMetrics) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Proxy {
            routes: RwLock::new(Arc::new(RouteTable::default())),
            client,
            metrics,
        }
    }

    /// Swaps in a new route table; requests already routed finish on the old one.
    pub fn set_routes(&self, table: RouteTable) {
        *self.routes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    /// The current route table.
    pub fn routes(&self) -> Arc<RouteTable> {
        Arc::clone(&self.routes.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Serves plain HTTP on `listener` until it fails; connections live in a set of tasks
    /// dropped (aborted) with this future.
    pub async fn serve_http(self: Arc<Self>, listener: TcpListener) -> std::io::Error {
        self.accept(listener, None).await
    }

    /// Serves HTTPS on `listener`, terminating TLS with `tls`.
    pub async fn serve_https(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Arc<rustls::ServerConfig>,
    ) -> std::io::Error {
        self.accept(listener, Some(tokio_rustls::TlsAcceptor::from(tls)))
            .await
    }

    async fn accept(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> std::io::Error {
        let local = match listener.local_addr() {
            Ok(local) => local,
            Err(e) => return e,
        };
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                Some(_) = connections.join_next() => continue,
            };
            let (stream, client) = match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors, or a connection reset before it was accepted:
                // the listener itself is fine.
                Err(e) if is_per_connection(&e) => {
                    tracing::debug!(error = %e, "ingress accept");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(e) => return e,
            };
            let _ = stream.set_nodelay(true);
            let peer = Peer {
                client,
                local,
                tls: tls.is_some(),
            };
            let proxy = Arc::clone(&self);
            let tls = tls.clone();
            connections.spawn(async move {
                match tls {
                    None => proxy.connection(stream, peer).await,
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(stream) => proxy.connection(stream, peer).await,
                        Err(e) => tracing::debug!(%client, error = %e, "ingress TLS handshake"),
                    },
                }
            });
        }
    }

    async fn connection<I>(self: Arc<Self>, io: I, peer: Peer)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |request| {
            let proxy = Arc::clone(&self);
            async move { Ok::<_, Infallible>(proxy.handle(request, peer).await) }
        });
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        if let Err(e) = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await
        {
            tracing::debug!(client = %peer.client, error = %e, "ingress connection");
        }
    }

    /// Routes and forwards one request.
    async fn handle(&self, mut request: Request<Incoming>, peer: Peer) -> Response<ProxyBody> {
        let started = Instant::now();
        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                request
                    .headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        let routes = self.routes();
        let Some(backend) = routes.route(&host, request.uri().path()) else {
            let response = text(StatusCode::NOT_FOUND, "default backend - 404\n".into());
            self.metrics.record(None, response.status(), started);
            return response;
        };
        let Some(endpoint) = backend.pick() else {
            let why = backend.problem.as_deref().unwrap_or("no ready endpoint");
            let response = text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("503 Service Unavailable: {backend}: {why}\n"),
            );
            self.metrics
                .record(Some(backend), response.status(), started);
            return response;
        };
        let upgrade = upgrade_requested(request.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
        let (mut parts, body) = request.into_parts();
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        parts.uri = match Uri::try_from(format!("http://{endpoint}{path}")) {
            Ok(uri) => uri,
            Err(e) => {
                let response = text(StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
                self.metrics
                    .record(Some(backend), response.status(), started);
                return response;
            }
        };
        parts.version = hyper::Version::HTTP_11;
        forwarded_headers(&mut parts.headers, &host, peer, upgrade);
        let sent = self.client.request(Request::from_parts(parts, body)).await;
        let response = match sent {
            Ok(mut response) => {
                if response.status() == StatusCode::SWITCHING_PROTOCOLS
                    && let Some(client_upgrade) = client_upgrade
                {
                    let backend_upgrade = hyper::upgrade::on(&mut response);
                    tokio::spawn(splice(client_upgrade, backend_upgrade));
                } else {
                    strip_hop_by_hop(response.headers_mut(), false);
                }
                response.map(Either::Left)
            }
            Err(e) => {
                tracing::debug!(%endpoint, route = %backend, error = %e, "ingress backend");
                text(
                    StatusCode::BAD_GATEWAY,
                    format!("502 Bad Gateway: {backend}: endpoint {endpoint}: {e}\n"),
                )
            }
        };
        self.metrics
            .record(Some(backend), response.status(), started);
        response
    }
}

/// Accept errors that concern one connection (or a passing shortage), not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionAborted | ConnectionReset | Interrupted)
        || matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        )
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Whether the client asks to switch protocols (`Connection: upgrade` and `Upgrade`).
fn upgrade_requested(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), those the `Connection` header names
/// included; an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ] {
        if !(upgrade && (name == header::CONNECTION || name == header::UPGRADE)) {
            headers.remove(name);
        }
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The request headers an endpoint gets: hop-by-hop ones dropped, `Host` kept (set from
/// the HTTP/2 authority if the request had none), and the client named in `X-Forwarded-*`
/// and `X-Real-IP` (appended to an `X-Forwarded-For` already there, as ingress-nginx does
/// when told to trust it; a client cannot hide behind a made-up one, it only adds to it).
fn forwarded_headers(headers: &mut HeaderMap, host: &str, peer: Peer, upgrade: bool) {
    strip_hop_by_hop(headers, upgrade);
    if !headers.contains_key(header::HOST)
        && let Ok(value) = HeaderValue::from_str(host)
    {
        headers.insert(header::HOST, value);
    }
    let client = peer.client.ip().to_string();
    let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(earlier) if !earlier.is_empty() => format!("{earlier}, {client}"),
        _ => client.clone(),
    };
    let set = |headers: &mut HeaderMap, name: &'static str, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(HeaderName::from_static(name), value);
        }
    };
    set(headers, "x-forwarded-for", &forwarded_for);
    set(headers, "x-real-ip", &client);
    set(
        headers,
        "x-forwarded-proto",
        if peer.tls { "https" } else { "http" },
    );
    set(headers, "x-forwarded-host", super::routes::strip_port(host));
    set(headers, "x-forwarded-port", &peer.local.port().to_string());
}

/// Copies bytes both ways between an upgraded client connection and backend connection.
async fn splice(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, backend) {
        Ok((client, backend)) => {
            let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
            if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
                tracing::debug!(error = %e, "ingress upgraded connection");
            }
        }
        Err(e) => tracing::debug!(error = %e, "ingress upgrade"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn hop_by_hop_headers_go_and_the_client_is_named() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.7"));
        headers.insert(header::HOST, HeaderValue::from_static("a.example.com:8080"));
        let peer = Peer {
            client: "10.0.0.9:40000".parse().unwrap(),
            local: "10.0.0.1:443".parse().unwrap(),
            tls: true,
        };
        forwarded_headers(&mut headers, "a.example.com:8080", peer, false);
        for gone in ["connection", "x-secret", "keep-alive", "transfer-encoding"] {
            assert!(!headers.contains_key(gone), "{gone} kept");
        }
        assert_eq!(headers["host"], "a.example.com:8080");
        assert_eq!(headers["x-forwarded-for"], "192.0.2.7, 10.0.0.9");
        assert_eq!(headers["x-real-ip"], "10.0.0.9");
        assert_eq!(headers["x-forwarded-proto"], "https");
        assert_eq!(headers["x-forwarded-host"], "a.example.com");
        assert_eq!(headers["x-forwarded-port"], "443");
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(upgrade_requested(&headers));
        let peer = Peer {
            client: "10.0.0.9:40000".parse().unwrap(),
            local: "10.0.0.1:80".parse().unwrap(),
            tls: false,
        };
        forwarded_headers(&mut headers, "h", peer, true);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["host"], "h", "set from the authority");
        headers.remove(header::CONNECTION);
        assert!(!upgrade_requested(&headers));
    }

    /// A backend on loopback answering `NAME <method> <path> <headers as JSON>`, and
    /// echoing bytes after a 101 to an `Upgrade: echo` request.
    async fn backend(name: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service =
                    hyper::service::service_fn(move |mut request: Request<Incoming>| async move {
                        if request.headers().contains_key(header::UPGRADE) {
                            let upgrade = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(upgrade.await.unwrap());
                                let mut buf = [0u8; 64];
                                let n = io.read(&mut buf).await.unwrap();
                                io.write_all(&buf[..n]).await.unwrap();
                            });
                            let mut response = Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                            response
                                .headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                            response
                                .headers_mut()
                                .insert(header::UPGRADE, HeaderValue::from_static("echo"));
                            return Ok::<_, Infallible>(response);
                        }
                        let headers: BTreeMap<String, String> = request
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_owned()))
                            .collect();
                        let body = format!(
                            "{name} {} {} {}",
                            request.method(),
                            request.uri(),
                            serde_json::to_string(&headers).unwrap()
                        );
                        Ok(Response::new(Full::new(Bytes::from(body))))
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades(),
                );
            }
        });
        addr
    }

    /// A route table: host `app.example.com` to the backends behind Service `app`, host
    /// `secure.example.com` to Service `secure`, `/gone` anywhere to a missing Service.
    fn table(app: &[SocketAddr], secure: SocketAddr) -> RouteTable {
        use serde_json::json;
        let ingress = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ingressClassName": "orquestra", "rules": [
                {"host": "app.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "app", "port": {"number": 80}}}}]}},
                {"host": "secure.example.com", "http": {"paths": [{"path": "/", "pathType": "Prefix",
                    "backend": {"service": {"name": "secure", "port": {"number": 80}}}}]}},
                {"http": {"paths": [{"path": "/gone", "pathType": "Prefix",
                    "backend": {"service": {"name": "gone", "port": {"number": 80}}}}]}},
            ]},
        }))
        .unwrap();
        let service = |name: &str| {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "default"},
                    "spec": {"ports": [{"port": 80}]},
                }))
                .unwrap(),
            )
        };
        let slice = |name: &str,
                     addrs: &[SocketAddr]|
         -> Vec<Arc<k8s_openapi::api::discovery::v1::EndpointSlice>> {
            addrs
                .iter()
                .map(|a| {
                    Arc::new(
                        serde_json::from_value(json!({
                            "metadata": {"name": format!("{name}-{}", a.port()), "namespace": "default",
                                         "labels": {"kubernetes.io/service-name": name}},
                            "addressType": "IPv4",
                            "ports": [{"port": a.port()}],
                            "endpoints": [{"addresses": [a.ip().to_string()]}],
                        }))
                        .unwrap(),
                    )
                })
                .collect()
        };
        let mut slices = slice("app", app);
        slices.extend(slice("secure", &[secure]));
        RouteTable::build(
            &[Arc::new(ingress)],
            &[],
            &[service("app"), service("secure")],
            &slices,
        )
    }

    /// One HTTP/1.1 request on a fresh connection: status and body.
    async fn get<S: AsyncRead + AsyncWrite + Unpin>(
        mut stream: S,
        host: &str,
        path: &str,
    ) -> (u16, String) {
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.unwrap_or_default();
        let response = String::from_utf8_lossy(&response).into_owned();
        let status = response[9..12].parse().unwrap();
        let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn requests_are_routed_forwarded_refused_and_upgraded() {
        let (a, b, s) = (backend("a").await, backend("b").await, backend("s").await);
        let registry = Registry::new();
        let proxy = Arc::new(Proxy::new(IngressMetrics::register(&registry).unwrap()));
        proxy.set_routes(table(&[a, b], s));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&proxy).serve_http(listener));
        let connect = || tokio::net::TcpStream::connect(addr);

        let mut seen = BTreeMap::new();
        for _ in 0..4 {
            let (status, body) = get(connect().await.unwrap(), "app.example.com", "/x?y=1").await;
            assert_eq!(status, 200, "{body}");
            let (name, rest) = body.split_once(' ').unwrap();
            *seen.entry(name.to_owned()).or_insert(0) += 1;
            assert!(rest.starts_with("GET /x?y=1 "), "{rest}");
            let headers: BTreeMap<String, String> =
                serde_json::from_str(rest.splitn(3, ' ').nth(2).unwrap()).unwrap();
            assert_eq!(headers["host"], "app.example.com");
            assert_eq!(headers["x-forwarded-for"], "127.0.0.1");
            assert_eq!(headers["x-forwarded-proto"], "http");
            assert_eq!(headers["x-forwarded-host"], "app.example.com");
            assert!(
                !headers.contains_key("connection"),
                "hop-by-hop: {headers:?}"
            );
        }
        assert_eq!(
            seen,
            BTreeMap::from([("a".into(), 2), ("b".into(), 2)]),
            "round robin"
        );

        let (status, body) = get(connect().await.unwrap(), "other.example.com", "/gone/x").await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            "503 Service Unavailable: ingress default/web, host *, path /gone, service gone:80: \
             service default/gone not found\n"
        );
        let (status, _) = get(connect().await.unwrap(), "other.example.com", "/").await;
        assert_eq!(status, 404);

        // An upgrade is passed through: bytes go both ways after the 101.
        let mut stream = connect().await.unwrap();
        stream
            .write_all(b"GET /ws HTTP/1.1\r\nHost: app.example.com\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 256];
        let n = stream.read(&mut head).await.unwrap();
        let head = String::from_utf8_lossy(&head[..n]);
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        stream.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");

        // An endpoint that is gone is a 502.
        let closed = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        proxy.set_routes(table(&[closed], s));
        let (status, body) = get(connect().await.unwrap(), "app.example.com", "/").await;
        assert_eq!(status, 502, "{body}");

        let metrics = prometheus::TextEncoder::new()
            .encode_to_string(&registry.gather())
            .unwrap();
        assert!(
            metrics.contains(
                r#"nginx_ingress_controller_requests{ingress="web",namespace="default",service="app",status="200"} 4"#
            ),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"service="gone",status="503"} 1"#),
            "{metrics}"
        );
        assert!(
            metrics.contains(r#"{ingress="",namespace="",service="",status="404"} 1"#),
            "{metrics}"
        );
    }

    #[tokio::test]
    async fn https_is_served_with_the_certificate_sni_names() {
        use super::super::tls;
        use k8s_openapi::ByteString;
        let s = backend("s").await;
        let proxy = Arc::new(Proxy::new(
            IngressMetrics::register(&Registry::new()).unwrap(),
        ));
        proxy.set_routes(table(&[], s));
        // A CA (clients trust it) and the host's certificate it signs.
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca =
            rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
                .unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["secure.example.com".to_owned()])
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        let mut secret: k8s_openapi::api::core::v1::Secret =
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "secure", "namespace": "default"}, "type": "kubernetes.io/tls",
            }))
            .unwrap();
        secret.data = Some(
            [
                ("tls.crt".to_owned(), ByteString(cert.pem().into_bytes())),
                (
                    "tls.key".to_owned(),
                    ByteString(key.serialize_pem().into_bytes()),
                ),
            ]
            .into(),
        );
        let ingress = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ingressClassName": "orquestra",
                     "tls": [{"hosts": ["secure.example.com"], "secretName": "secure"}]},
        }))
        .unwrap();
        let resolver = Arc::new(tls::CertResolver::new().unwrap());
        let (certificates, problems) = tls::build(
            &[Arc::new(ingress)],
            &[],
            &[Arc::new(secret)],
            &mut tls::ParsedSecrets::new(),
        );
        assert!(problems.is_empty(), "{problems:?}");
        resolver.set(certificates);
        let config = Arc::new(tls::server_config(resolver).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Arc::clone(&proxy).serve_https(listener, config));

        // A client trusting only the Secret's certificate, asking for the host by SNI.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("secure.example.com").unwrap();
        let stream = connector.connect(name, tcp).await.unwrap();
        let (status, body) = get(stream, "secure.example.com", "/").await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("s GET / "), "{body}");
        assert!(body.contains(r#""x-forwarded-proto":"https""#), "{body}");
        // Another name gets the fallback certificate, which this client does not trust.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let other = rustls::pki_types::ServerName::try_from("other.example.com").unwrap();
        assert!(connector.connect(other, tcp).await.is_err());
    }
}
