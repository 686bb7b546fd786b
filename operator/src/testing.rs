//! Orquestra's envtest: the real API server, in-process, for controller tests.
//!
//! [`TestApi::start`] opens a fresh SQLite store in a temporary directory, starts the embedded
//! API server on a free loopback port and hands back a [`kube::Client`] for it. Nothing to
//! download and no process to manage; it starts in milliseconds, so every test gets its own.
//! The server stops when the runtime that started it does (the end of a `#[tokio::test]`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use k8s_openapi::api::core::v1::ConfigMap;
//! use kube::Api;
//!
//! let api = orquestra_operator::testing::TestApi::start().await?;
//! let configmaps: Api<ConfigMap> = Api::namespaced(api.client(), "default");
//! assert!(configmaps.list(&Default::default()).await?.items.is_empty());
//! # Ok(()) }
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use orquestra_store::Store;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};
use serde::de::DeserializeOwned;

/// Why the harness could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// The temporary directory or the listener could not be set up.
    #[error("setting up the test API server: {0}")]
    Io(#[from] std::io::Error),
    /// The store could not be opened.
    #[error("opening the test store: {0}")]
    Store(#[from] orquestra_store::Error),
    /// The API server refused to start.
    #[error("starting the API server: {0}")]
    ApiServer(#[from] orquestra_apiserver::error::ApiError),
    /// A request failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// The client configuration is invalid.
    #[error("configuring the client: {0}")]
    Config(String),
    /// A condition did not become true in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The webhook server could not be set up.
    #[error(transparent)]
    Webhook(#[from] crate::webhook::WebhookError),
}

/// Webhooks served for a test: they stop, and their configurations stay (the server goes
/// with the test), when this is dropped.
#[derive(Debug)]
pub struct ServedWebhooks {
    task: tokio::task::JoinHandle<()>,
    /// Where the handlers listen (HTTPS, loopback).
    pub addr: SocketAddr,
    /// How the API server reaches them (URL and `caBundle`): for a CRD's conversion,
    /// [`crate::webhook::conversion`].
    pub client: k8s_openapi::api::admissionregistration::v1::WebhookClientConfig,
}

impl Drop for ServedWebhooks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A running in-process API server with a client for it.
pub struct TestApi {
    server: orquestra_apiserver::ApiServer,
    client: Client,
    addr: SocketAddr,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

impl std::fmt::Debug for TestApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestApi")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TestApi {
    /// Starts a fresh API server over an empty store.
    pub async fn start() -> Result<TestApi, TestError> {
        let dir = tempfile::tempdir()?;
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open(
            &dir.path().join("state.db"),
            SqliteOptions::default(),
        )?);
        let server = orquestra_apiserver::ApiServer::new(Arc::clone(&store)).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let router = server.router();
        let server_handle = server.clone();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let url = format!("http://{addr}")
            .parse()
            .map_err(|e| TestError::Config(format!("{e}")))?;
        let client = Client::try_from(kube::Config::new(url))
            .map_err(|e| TestError::Config(e.to_string()))?;
        Ok(TestApi {
            server: server_handle,
            client,
            addr,
            store,
            _dir: dir,
        })
    }

    /// A client for the server (cheap to clone).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Where the server listens (plain HTTP, no authentication).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API server itself (its engine, its watch cache's counters).
    pub fn server(&self) -> &orquestra_apiserver::ApiServer {
        &self.server
    }

    /// The store under the server, for tests that look beneath the API.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Serves `webhooks` on a loopback port with a fresh certificate and registers every
    /// handler with this API server (configurations named `name`, reached by URL with the
    /// certificate's CA as `caBundle`) — so requests through the real API server reach them.
    pub async fn serve_webhooks(
        &self,
        name: &str,
        webhooks: crate::webhook::WebhookServer,
    ) -> Result<ServedWebhooks, TestError> {
        use k8s_openapi::api::admissionregistration::v1::{
            MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
        };
        let tls = crate::webhook::Tls::generate(&["127.0.0.1"])?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let client = WebhookClientConfig {
            url: Some(format!("https://{addr}")),
            ca_bundle: Some(tls.ca_bundle()),
            service: None,
        };
        let (validating, mutating) = webhooks.configurations(name, &client);
        let task = tokio::spawn(async move {
            if let Err(error) = webhooks.serve_on(listener, &tls).await {
                tracing::error!(%error, "the test's webhook server stopped");
            }
        });
        let served = ServedWebhooks { task, addr, client };
        let pp = PostParams::default();
        if let Some(configuration) = validating {
            Api::<ValidatingWebhookConfiguration>::all(self.client())
                .create(&pp, &configuration)
                .await?;
        }
        if let Some(configuration) = mutating {
            Api::<MutatingWebhookConfiguration>::all(self.client())
                .create(&pp, &configuration)
                .await?;
        }
        Ok(served)
    }

    /// Creates a CustomResourceDefinition and waits until it is Established.
    pub async fn apply_crd(&self, crd: CustomResourceDefinition) -> Result<(), TestError> {
        let crds: Api<CustomResourceDefinition> = Api::all(self.client());
        let name = crd.metadata.name.clone().unwrap_or_default();
        match crds.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.reason == "AlreadyExists" => {}
            Err(e) => return Err(e.into()),
        }
        wait_for(&crds, &name, Duration::from_secs(10), |crd| {
            crd.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| {
                    c.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                })
        })
        .await
        .map(|_| ())
    }
}

/// One plain HTTP/1.1 GET of `path` on its own connection (a manager's `/metrics`,
/// `/readyz`, a Prometheus query): the status code and the body, or `None` if nothing
/// answers.
pub async fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let code = response.get(9..12)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_owned();
    Some((code, body))
}

/// Polls `name` until `condition` holds (returning the object) or `timeout` passes.
pub async fn wait_for<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    condition: impl Fn(&K) -> bool,
) -> Result<K, TestError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(object) = api.get_opt(name).await? {
            if condition(&object) {
                return Ok(object);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(TestError::Timeout(
                timeout,
                format!("{name} to reach its condition"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls until `name` no longer exists or `timeout` passes.
pub async fn wait_gone<K>(api: &Api<K>, name: &str, timeout: Duration) -> Result<(), TestError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while api.get_opt(name).await?.is_some() {
        if tokio::time::Instant::now() >= deadline {
            return Err(TestError::Timeout(timeout, format!("{name} to be deleted")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
