//! Shared by the API server's tests: the in-process server on a free loopback port over a
//! real SQLite store, and a kube client for it.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;

use kube::Client;
use orquestra_apiserver::ApiServer;
use orquestra_store::Store;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};

/// A running API server and a client for it.
pub struct Cluster {
    pub client: Client,
    pub store: Arc<dyn Store>,
    pub engine: orquestra_apiserver::engine::Engine,
    /// `host:port` of the server (plain HTTP).
    pub addr: std::net::SocketAddr,
    _dir: tempfile::TempDir,
}

pub async fn cluster() -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("state.db"), SqliteOptions::default()).unwrap(),
    );
    let server = ApiServer::new(Arc::clone(&store)).await.unwrap();
    let engine = server.engine().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    tokio::spawn(async move { axum::serve(listener, server.router()).await });
    let config = kube::Config::new(url.parse().unwrap());
    Cluster {
        client: Client::try_from(config).unwrap(),
        store,
        engine,
        addr,
        _dir: dir,
    }
}

impl Cluster {
    /// Compacts the store's whole history up to now.
    pub async fn compact_everything(&self) {
        let now = self.store.current_revision().await.unwrap();
        self.store.compact(now).await.unwrap();
    }
}

impl Cluster {
    /// One plain HTTP/1.1 GET on its own connection, without kube-rs (which retries 5xx
    /// answers such as 504): the status code and the body.
    pub async fn raw_get(&self, path: &str) -> (u16, String) {
        self.raw_get_accept(path, "application/json").await
    }

    /// [`Cluster::raw_get`] with an Accept header.
    pub async fn raw_get_accept(&self, path: &str, accept: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let code = response[9..12].parse().unwrap();
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    }
}

/// Serves `app` over TLS on a free loopback port with a certificate (of its own CA, made in
/// `dir`) for 127.0.0.1 and `sans`: its address and the CA as `caBundle` holds it (base64
/// PEM). The test webhooks and extension servers.
pub async fn serve_tls(
    dir: &std::path::Path,
    sans: &[String],
    app: axum::Router,
) -> (std::net::SocketAddr, String) {
    use base64::Engine as _;
    let identity = orquestra_apiserver::identity::Identity::load_or_create(dir, sans).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        identity.cert_pem.into_bytes(),
        identity.key_pem.into_bytes(),
    )
    .await
    .unwrap();
    let serving = axum_server::from_tcp_rustls(listener, tls).unwrap();
    tokio::spawn(serving.serve(app.into_make_service()));
    let ca = base64::engine::general_purpose::STANDARD.encode(identity.ca_pem);
    (addr, ca)
}
