//! `orq server`: the control plane process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use orquestra_store::{CompactionPolicy, Compactor, Store};
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use tokio::signal::unix::{SignalKind, signal};

/// Flags of `orq server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Where state lives (the SQLite store, and later the admin kubeconfig).
    #[arg(long, env = "ORQ_DATA_DIR", default_value = "/var/lib/orquestra")]
    data_dir: PathBuf,
    /// Address to serve on.
    #[arg(long, env = "ORQ_LISTEN", default_value = "0.0.0.0:6443")]
    listen: SocketAddr,
    /// The store: `sqlite:///path/state.db` or `etcd://host:port[,host:port…]`.
    /// Default: `sqlite://DATA_DIR/state.db`.
    #[arg(long, env = "ORQ_DATASTORE")]
    datastore: Option<String>,
    /// Keep at least this many of the latest store revisions when compacting.
    #[arg(long, default_value_t = 10_000)]
    compaction_keep_revisions: i64,
    /// Keep store history written within this many seconds, and compact this often.
    #[arg(long, default_value_t = 300)]
    compaction_interval_seconds: u64,
    /// Serve the Kubernetes API over plain HTTP, without authentication. Until TLS and
    /// token authentication land, this is the only way the API is served; without it
    /// `orq server` runs the store and its health and metrics endpoints only.
    #[arg(long, env = "ORQ_INSECURE_HTTP")]
    insecure_http: bool,
}

/// What the HTTP handlers read.
struct AppState {
    store: Arc<dyn Store>,
    registry: Registry,
    revision: IntGauge,
    db_size: IntGauge,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    let datastore = args
        .datastore
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("state.db").display()));
    let store = orquestra_store::open(&datastore)
        .await
        .with_context(|| format!("opening the store at {datastore}"))?;
    tracing::info!(%datastore, revision = store.current_revision().await?, "store open");

    let registry = Registry::new();
    let revision = IntGauge::new("orquestra_store_revision", "The store's current revision.")?;
    let db_size = IntGauge::new(
        "orquestra_store_db_size_bytes",
        "Size of the store's database in bytes.",
    )?;
    registry.register(Box::new(revision.clone()))?;
    registry.register(Box::new(db_size.clone()))?;
    let state = Arc::new(AppState {
        store: Arc::clone(&store),
        registry,
        revision,
        db_size,
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let policy = CompactionPolicy {
        keep_revisions: args.compaction_keep_revisions,
        keep_for: Duration::from_secs(args.compaction_interval_seconds),
        interval: Duration::from_secs(args.compaction_interval_seconds),
    };
    let compactor =
        tokio::spawn(Compactor::new(Arc::clone(&store), policy).run(stopped(stop_rx.clone())));

    let mut app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state);
    if args.insecure_http {
        let api = orquestra_apiserver::ApiServer::new(Arc::clone(&store))
            .await
            .context("starting the API server")?;
        app = app.merge(api.router());
    } else {
        tracing::warn!(
            "the Kubernetes API is not served: it needs --insecure-http until TLS and authentication land"
        );
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let local = listener.local_addr()?;
    tracing::info!(listen = %local, "serving /healthz, /readyz, /metrics");
    if args.insecure_http {
        let path = write_kubeconfig(&args.data_dir, local)?;
        tracing::info!(kubeconfig = %path.display(), "Kubernetes API over plain HTTP, unauthenticated");
    }
    let server = axum::serve(listener, app).with_graceful_shutdown(stopped(stop_rx));

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = server.into_future() => result.context("HTTP server failed")?,
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    let _ = stop_tx.send(true);
    let _ = compactor.await;
    drop(store);
    Ok(())
}

/// Writes the admin kubeconfig into the data dir (atomically, mode 0600) and returns its path.
fn write_kubeconfig(data_dir: &std::path::Path, listen: SocketAddr) -> anyhow::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let host = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    let server = SocketAddr::new(host, listen.port());
    let contents = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: orquestra
  cluster:
    server: http://{server}
users:
- name: admin
  user: {{}}
contexts:
- name: orquestra
  context:
    cluster: orquestra
    user: admin
    namespace: default
current-context: orquestra
"
    );
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("kubeconfig.yaml");
    let tmp = data_dir.join(".kubeconfig.yaml.tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, String) {
    match state.store.current_revision().await {
        Ok(_) => (StatusCode::OK, "ok".into()),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("store: {error}")),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> (StatusCode, String) {
    if let Ok(revision) = state.store.current_revision().await {
        state.revision.set(revision);
    }
    if let Ok(size) = state.store.size().await {
        state.db_size.set(size as i64);
    }
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.registry.gather(), &mut body) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&body).into_owned()),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}
