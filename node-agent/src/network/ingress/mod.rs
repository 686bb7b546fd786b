//! The built-in ingress controller's data plane, as k3s ships one: every node agent that
//! programs its network serves the Ingresses of class [`CLASS`](routes::CLASS) (the
//! cluster's default IngressClass, controller [`CONTROLLER`](routes::CONTROLLER)) on its
//! own HTTP and HTTPS ports, proxying to the backends' pods directly.
//!
//! - [`routes`]: the route table from Ingresses, Services and EndpointSlices (pure);
//! - [`tls`]: the certificates by SNI from `kubernetes.io/tls` Secrets;
//! - [`server`]: the reverse proxy and its metrics.
//!
//! [`IngressController`] ties them to the agent's caches: every change of an Ingress,
//! IngressClass, TLS Secret, Service or EndpointSlice rebuilds both tables, swapped in
//! whole so a request sees one consistent table. The listeners are bound in the
//! background: a port another process holds (another agent in the same network namespace,
//! a web server on the host) is logged and retried, and never makes the node NotReady —
//! Services, pods and DNS do not depend on it. What the control side does (the
//! IngressClass, Ingress status, Warning events for missing backends) lives in the
//! controllers crate; this module only serves.
//!
//! Built on hyper 1 and hyper-util (already the agent's and the API server's HTTP stack, and
//! the de-facto Rust HTTP library: HTTP/1.1, HTTP/2, upgrades, a pooled client) with rustls
//! through tokio-rustls (the TLS the workspace already uses, ring provider). Pingora was the
//! other candidate: it brings its own runtime, server lifecycle and TLS stack (BoringSSL or
//! OpenSSL), which would not share the agent's Tokio runtime, caches or metrics registry.

pub mod routes;
pub mod server;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::reflector::Store;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::health::Backoff;
pub use routes::{ANN_CLASS, ANN_DEFAULT_CLASS, CLASS, CONTROLLER, RouteTable, served};
pub use server::{IngressMetrics, Proxy};

/// The annotation a node agent serving Ingresses puts on its Node, so the control side
/// publishes that node's address in the Ingresses' status.
pub const ANN_NODE_SERVES: &str = "orquestra.dev/ingress";

/// Where the ingress listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressConfig {
    /// Plain HTTP (`--ingress-http-listen`, default `0.0.0.0:80`).
    pub http: SocketAddr,
    /// HTTPS (`--ingress-https-listen`, default `0.0.0.0:443`).
    pub https: SocketAddr,
}

impl Default for IngressConfig {
    fn default() -> Self {
        IngressConfig {
            http: SocketAddr::from(([0, 0, 0, 0], 80)),
            https: SocketAddr::from(([0, 0, 0, 0], 443)),
        }
    }
}

/// Why the ingress could not start (what retrying cannot fix).
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The metrics could not be registered (registered twice on one registry).
    #[error("registering the ingress metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The fallback certificate could not be made.
    #[error(transparent)]
    Certificate(#[from] tls::CertError),
    /// rustls refused the server configuration.
    #[error("configuring TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The caches the ingress reads (the Service and EndpointSlice ones shared with the
/// service proxy and DNS).
#[derive(Clone, Debug)]
pub struct Stores {
    /// Every Ingress.
    pub ingresses: Store<Ingress>,
    /// Every IngressClass.
    pub classes: Store<IngressClass>,
    /// The `kubernetes.io/tls` Secrets.
    pub secrets: Store<Secret>,
    /// Every Service.
    pub services: Store<Service>,
    /// Every EndpointSlice.
    pub slices: Store<EndpointSlice>,
}

impl Stores {
    /// Resolves once every cache has its first list.
    pub async fn ready(&self) {
        tokio::join!(
            ready(&self.ingresses),
            ready(&self.classes),
            ready(&self.secrets),
            ready(&self.services),
            ready(&self.slices),
        );
    }
}

/// Resolves once `store` has its first list. kube-runtime 5's ready signal wakes only the
/// latest task waiting on it, and the Service and EndpointSlice caches have other waiters
/// (the service proxy's): asking again every 100 ms cannot be starved.
async fn ready<K>(store: &Store<K>)
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    loop {
        match tokio::time::timeout(Duration::from_millis(100), store.wait_until_ready()).await {
            Ok(_) => return,
            Err(_) => continue,
        }
    }
}

/// The node's ingress: its tables, kept current from [`Stores`], and its listeners.
#[derive(Debug)]
pub struct IngressController {
    config: IngressConfig,
    stores: Stores,
    proxy: Arc<Proxy>,
    certificates: Arc<tls::CertResolver>,
    tls: Arc<rustls::ServerConfig>,
    parsed: tls::ParsedSecrets,
    /// The TLS problems last logged.
    tls_problems: Vec<String>,
}

impl IngressController {
    /// An ingress listening where `config` says, reading `stores`, with its metrics on
    /// `registry`.
    pub fn new(
        config: IngressConfig,
        stores: Stores,
        registry: &prometheus::Registry,
    ) -> Result<IngressController, IngressError> {
        let certificates = Arc::new(tls::CertResolver::new()?);
        let tls = Arc::new(tls::server_config(Arc::clone(&certificates))?);
        Ok(IngressController {
            config,
            stores,
            proxy: Arc::new(Proxy::new(IngressMetrics::register(registry)?)),
            certificates,
            tls,
            parsed: tls::ParsedSecrets::new(),
            tls_problems: Vec::new(),
        })
    }

    /// The proxy (its current routes).
    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Rebuilds the route and certificate tables from the caches.
    pub fn sync(&mut self) {
        let ingresses = self.stores.ingresses.state();
        let classes = self.stores.classes.state();
        let routes = RouteTable::build(
            &ingresses,
            &classes,
            &self.stores.services.state(),
            &self.stores.slices.state(),
        );
        let (certificates, problems) = tls::build(
            &ingresses,
            &classes,
            &self.stores.secrets.state(),
            &mut self.parsed,
        );
        // Said once per change (the control side records them as events).
        if problems != self.tls_problems {
            for problem in problems.iter().filter(|p| !self.tls_problems.contains(p)) {
                tracing::warn!(%problem, "ingress TLS: {problem}");
            }
            self.tls_problems = problems;
        }
        self.proxy.set_routes(routes);
        self.certificates.set(certificates);
    }

    /// Serves until dropped: waits for the caches, then keeps the tables current (on each
    /// `changed` notification) while both listeners serve.
    pub async fn run(mut self, changed: Arc<Notify>) {
        self.stores.ready().await;
        self.sync();
        let http = {
            let proxy = Arc::clone(&self.proxy);
            listen(self.config.http, "HTTP", move |listener| {
                Arc::clone(&proxy).serve_http(listener)
            })
        };
        let https = {
            let (proxy, tls) = (Arc::clone(&self.proxy), Arc::clone(&self.tls));
            listen(self.config.https, "HTTPS", move |listener| {
                Arc::clone(&proxy).serve_https(listener, Arc::clone(&tls))
            })
        };
        let sync = async move {
            loop {
                changed.notified().await;
                self.sync();
            }
        };
        tokio::join!(http, https, sync);
    }
}

/// Binds `addr` and serves it, forever: a bind that fails (the port taken, no permission)
/// is retried with back-off, logged as a warning when the error is new; the node's
/// readiness is not touched.
async fn listen<F, Fut>(addr: SocketAddr, what: &'static str, serve: F)
where
    F: Fn(TcpListener) -> Fut,
    Fut: std::future::Future<Output = std::io::Error>,
{
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut last_error: Option<String> = None;
    loop {
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                tracing::info!(%addr, "ingress serving {what}");
                last_error = None;
                backoff.reset();
                let e = serve(listener).await;
                tracing::warn!(%addr, error = %e, "ingress {what} listener failed; binding again");
            }
            Err(e) => {
                let message = e.to_string();
                if last_error.as_deref() != Some(message.as_str()) {
                    tracing::warn!(
                        %addr,
                        error = %message,
                        "ingress cannot listen for {what} on {addr}: {message} (retrying in the background; the node stays Ready)"
                    );
                    last_error = Some(message);
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{cache, cache_of};
    use kube::Api;
    use kube::api::PostParams;
    use orquestra_operator::testing::TestApi;
    use serde_json::json;

    /// The tables follow the API through the agent's caches: an Ingress' route and its TLS
    /// Secret's certificate are in place once both are written.
    #[tokio::test]
    async fn tables_follow_the_api() {
        let api = TestApi::start().await.unwrap();
        let client = api.client();
        let changed = Arc::new(Notify::new());
        let notify = || vec![Arc::clone(&changed)];
        let (ingresses, f1) = cache::<Ingress>(&client, notify());
        let (classes, f2) = cache::<IngressClass>(&client, notify());
        let (secrets, f3) = cache_of::<Secret>(
            &client,
            kube::runtime::watcher::Config::default().fields("type=kubernetes.io/tls"),
            notify(),
        );
        let (services, f4) = cache::<Service>(&client, notify());
        let (slices, f5) = cache::<EndpointSlice>(&client, notify());
        for feed in [
            tokio::spawn(f1),
            tokio::spawn(f2),
            tokio::spawn(f3),
            tokio::spawn(f4),
            tokio::spawn(f5),
        ] {
            drop(feed);
        }
        let stores = Stores {
            ingresses,
            classes,
            secrets,
            services,
            slices,
        };
        let mut controller = IngressController::new(
            IngressConfig::default(),
            stores.clone(),
            &prometheus::Registry::new(),
        )
        .unwrap();
        stores.ready().await;

        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["secure.example.com".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let pp = PostParams::default();
        Api::<Secret>::namespaced(client.clone(), "default")
            .create(
                &pp,
                &serde_json::from_value(json!({
                    "metadata": {"name": "secure"}, "type": "kubernetes.io/tls",
                    "stringData": {"tls.crt": cert.pem(), "tls.key": key.serialize_pem()},
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        Api::<Ingress>::namespaced(client.clone(), "default")
            .create(
                &pp,
                &serde_json::from_value(json!({
                    "metadata": {"name": "web"},
                    "spec": {
                        "ingressClassName": "orquestra",
                        "tls": [{"hosts": ["secure.example.com"], "secretName": "secure"}],
                        "rules": [{"host": "secure.example.com", "http": {"paths": [
                            {"path": "/", "pathType": "Prefix",
                             "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}],
                    },
                }))
                .unwrap(),
            )
            .await
            .unwrap();
        let fallback = controller.certificates.certificate(None);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            controller.sync();
            let routed = controller
                .proxy()
                .routes()
                .route("secure.example.com", "/")
                .is_some();
            let certified = !Arc::ptr_eq(
                &controller
                    .certificates
                    .certificate(Some("secure.example.com")),
                &fallback,
            );
            if routed && certified {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "routed {routed}, certified {certified}; problems {:?}; secrets {}",
                controller.tls_problems,
                controller.stores.secrets.state().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
