//! `orq server`: the control plane process.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use orquestra_apiserver::authorization::{Authorizer, authorize};
use orquestra_apiserver::identity::{Authenticator, Identity, authenticate};
use orquestra_apiserver::impersonation::{Impersonation, impersonate};
use orquestra_apiserver::kubernetes_service::KubernetesService;
use orquestra_apiserver::token::TokenIssuer;
use orquestra_store::{CompactionPolicy, Compactor, Store};
use prometheus::{Encoder, IntGauge, Registry, TextEncoder};
use tokio::signal::unix::{SignalKind, signal};

/// Flags of `orq server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// A YAML file of settings, keyed by these flags' long names (`data-dir: /srv/orq`);
    /// flags on the command line win. Default: /etc/orquestra/config.yaml, if it exists.
    #[arg(long, env = "ORQ_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where state lives: the SQLite store, the TLS identity and token, the admin kubeconfig.
    #[arg(long, env = "ORQ_DATA_DIR", default_value = "/var/lib/orquestra")]
    data_dir: PathBuf,
    /// Address to serve on.
    #[arg(long, env = "ORQ_LISTEN", default_value = "0.0.0.0:6443")]
    listen: SocketAddr,
    /// The store: `sqlite:///path/state.db` or `etcd://host:port[,host:port…]`.
    /// Default: `sqlite://DATA_DIR/state.db`.
    #[arg(long, env = "ORQ_DATASTORE")]
    datastore: Option<String>,
    /// Keep at least this many of the latest store revisions when compacting (0: only the
    /// time bound, as kube-apiserver over etcd).
    #[arg(long, default_value_t = 0)]
    compaction_keep_revisions: i64,
    /// Keep store history written within this many seconds (compacting every fifth of it).
    #[arg(long, default_value_t = 300)]
    compaction_interval_seconds: u64,
    /// Serve over plain HTTP without authentication (local experiments only). By default
    /// everything is served over HTTPS with a CA and certificate generated into the data dir,
    /// and API requests need the admin token (`DATA_DIR/token`, also in the kubeconfig).
    #[arg(long, env = "ORQ_INSECURE_HTTP")]
    insecure_http: bool,
    /// The address pods reach this server at: the `kubernetes` Service's endpoint, and a
    /// name in the serving certificate. Default: the listen address when it is a specific,
    /// non-loopback one, else the host's primary IPv4 (the default route's source address).
    #[arg(long, env = "ORQ_ADVERTISE_ADDRESS")]
    advertise_address: Option<IpAddr>,
    /// The longest lifetime of the service account tokens the server issues (`1h`, `90s`):
    /// longer TokenRequests are shortened to it, and the node agents renew pods' tokens at
    /// 80 % of it. Default: as requested (pods' tokens live an hour).
    #[arg(
        long,
        env = "ORQ_SERVICE_ACCOUNT_MAX_TOKEN_EXPIRATION",
        value_name = "DURATION"
    )]
    service_account_max_token_expiration: Option<jiff::SignedDuration>,
    /// How API requests are authorized, as kube-apiserver's flag: `RBAC` (Roles and
    /// ClusterRoles bound to a caller decide; the admin token, in `system:masters`, may do
    /// anything) or `AlwaysAllow` (every authenticated request).
    #[arg(
        long,
        env = "ORQ_AUTHORIZATION_MODE",
        value_enum,
        default_value = "RBAC"
    )]
    authorization_mode: AuthorizationMode,
    /// The range Services' cluster IPs come from (an IPv4 CIDR, /12 to /28); its first
    /// address is the `kubernetes` Service's. Set it when the cluster is created: Services
    /// keep the addresses they were given.
    #[arg(long, env = "ORQ_SERVICE_CIDR", default_value = "10.43.0.0/16")]
    service_cidr: orquestra_apiserver::service::ServiceCidr,
    /// Extra names or addresses for the serving certificate (repeatable).
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// How long a non-watch API request may run before it gets a 504 `Timeout` (a Go
    /// duration, as kube-apiserver's flag: `60s`, `1m30s`). Clients may ask for less.
    #[arg(long, default_value = "60s", value_parser = request_timeout)]
    request_timeout: Duration,
    /// How often the node agents' resource use is read for `metrics.k8s.io` (`kubectl top`,
    /// the HorizontalPodAutoscaler); CPU is a rate over this window (metrics-server's flag).
    #[arg(long, default_value = "15s", value_parser = request_timeout)]
    metric_resolution: Duration,
    /// The cluster's server token: a server started on a datastore that already holds a
    /// cluster joins it with this token (the first server's DATA_DIR/server-token), taking
    /// its CAs, keys and tokens from the datastore. The first server generates one unless
    /// given.
    #[arg(long, env = "ORQ_CLUSTER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Do not run the local node agent (by default this host registers as a node).
    #[arg(long)]
    no_agent: bool,
    /// The local node's name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    #[command(flatten)]
    controllers: crate::operator::ControllerArgs,
    /// How long new pods tolerate a not-ready or unreachable node before they are evicted
    /// (kube-apiserver's `--default-unreachable-toleration-seconds`).
    #[arg(long, default_value_t = 300)]
    default_unreachable_toleration_seconds: i64,
    #[command(flatten)]
    node: crate::agent::NodeArgs,
}

/// `--authorization-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum AuthorizationMode {
    /// Role-based access control.
    #[value(name = "RBAC")]
    Rbac,
    /// Every authenticated request is allowed.
    #[value(name = "AlwaysAllow")]
    AlwaysAllow,
}

fn request_timeout(text: &str) -> Result<Duration, String> {
    orquestra_apiserver::request::go_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration like 60s or 1m30s"))
}

/// What the HTTP handlers read.
struct AppState {
    store: Arc<dyn Store>,
    registry: Registry,
    revision: IntGauge,
    db_size: IntGauge,
    /// The control loops' current managers: their metrics, and their health (a stalled
    /// controller makes the server unready).
    controllers: crate::control::Running,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    if let Some(config) = &args.config {
        tracing::info!(config = %config.display(), "settings from a config file (flags on the command line win)");
    }
    // The data dir holds the store, keys and tokens: private when we create it.
    if !args.data_dir.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&args.data_dir)
            .with_context(|| format!("creating {}", args.data_dir.display()))?;
        std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    // Held until the server exits (the OS releases it even on SIGKILL).
    let _lock = crate::lock::data_dir(&args.data_dir)?;
    // A local agent that programs the host's network is the only one there.
    let _network_lock = if !args.no_agent && args.node.programs_network() {
        Some(crate::lock::node_network(
            &args.data_dir,
            "start this one with --no-agent (or --disable-kube-proxy), or in a network namespace of its own",
        )?)
    } else {
        None
    };
    let datastore = args
        .datastore
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("state.db").display()));
    let store = orquestra_store::open(&datastore)
        .await
        .with_context(|| format!("opening the store at {datastore}"))?;
    tracing::info!(%datastore, revision = store.current_revision().await?, "store open");
    // A datastore that holds a cluster gives this server its secrets before it makes any;
    // on one that does not, this server makes them and stores them there.
    if !args.insecure_http {
        let token = crate::bootstrap::token(&args.data_dir, args.token.as_deref());
        crate::bootstrap::bootstrap(store.as_ref(), &args.data_dir, token).await?;
    }

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
        registry: registry.clone(),
        revision,
        db_size,
        controllers: crate::control::Running::default(),
    });

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // The control loops stop first (see the end of this function).
    let (controllers_stop_tx, controllers_stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let policy = CompactionPolicy {
        keep_revisions: args.compaction_keep_revisions,
        keep_for: Duration::from_secs(args.compaction_interval_seconds),
        // Often enough that history is dropped soon after it is old enough.
        interval: Duration::from_secs((args.compaction_interval_seconds / 5).max(1)),
    };
    let compactor =
        tokio::spawn(Compactor::new(Arc::clone(&store), policy).run(stopped(stop_rx.clone())));

    let health = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Arc::clone(&state));
    let mut api = orquestra_apiserver::ApiServer::with_request_timeout(
        Arc::clone(&store),
        args.request_timeout,
    )
    .await
    .context("starting the API server")?;
    api.set_default_toleration_seconds(args.default_unreachable_toleration_seconds);
    api.set_service_cidr(args.service_cidr);
    let api_metrics = Arc::new(orquestra_apiserver::metrics::ApiMetrics::register(
        &registry,
    )?);
    api.engine().webhooks().register(&registry)?;
    orquestra_apiserver::metrics::StorageObjects::register(
        &registry,
        api.engine().cache().clone(),
    )?;
    let app = health.merge(api.router().layer(axum::middleware::from_fn_with_state(
        api_metrics,
        orquestra_apiserver::metrics::record,
    )));

    let listener = std::net::TcpListener::bind(args.listen).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "cannot listen on {}: the port is in use by another process (stop it, or pass another --listen)",
                args.listen
            )
        } else {
            anyhow::Error::new(e).context(format!("binding {}", args.listen))
        }
    })?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let advertise = args
        .advertise_address
        .unwrap_or_else(|| advertise_address(local.ip()));
    if advertise.is_loopback() {
        tracing::warn!(%advertise, "advertising a loopback address: pods cannot reach the API server (set --advertise-address)");
    }
    // Service account tokens keep their key in the data dir, so they survive restarts.
    let mut issuer = TokenIssuer::load_or_create(&args.data_dir)
        .context("loading the service account signing key")?;
    if let Some(max) = args.service_account_max_token_expiration {
        issuer = issuer.with_max_expiration(max.as_secs());
    }
    api.engine().set_token_issuer(issuer);
    let identity = crate::control::identity(&args.data_dir)?;
    let endpoint = KubernetesService {
        address: advertise,
        port: local.port(),
        identity: identity.clone(),
    };
    let kubernetes_service = tokio::spawn(endpoint.clone().run(api.engine().clone()));
    // ResourceQuotas' status (used vs hard), as kube-controller-manager's quota controller.
    let quota_status = tokio::spawn(orquestra_apiserver::quota::status::run(
        api.engine().clone(),
    ));
    // `metrics.k8s.io`, from the agents' `/metrics/resource`, as metrics-server.
    let resource_metrics = tokio::spawn(orquestra_apiserver::resource_metrics::scrape::run(
        api.engine().clone(),
        args.metric_resolution,
    ));
    // APIServices' `Available` condition, as kube-apiserver's availability controller.
    let api_services = tokio::spawn(orquestra_apiserver::aggregator::availability::run(
        api.engine().clone(),
    ));
    let handle = axum_server::Handle::new();
    let server = if args.insecure_http {
        tracing::warn!(listen = %local, "serving plain HTTP without authentication (--insecure-http)");
        let path = write_kubeconfig(&args.data_dir, local, None, KubeconfigUser::Admin)?;
        // No tokens without TLS: the local agent uses the admin kubeconfig.
        let _ = std::fs::remove_file(args.data_dir.join(NODE_KUBECONFIG));
        tracing::info!(kubeconfig = %path.display(), "admin kubeconfig written");
        let server = axum_server::from_tcp(listener)?.handle(handle.clone());
        tokio::spawn(server.serve(app.into_make_service()))
    } else {
        let mut sans = args.tls_sans.clone();
        if !local.ip().is_unspecified() {
            sans.push(local.ip().to_string());
        }
        sans.push(advertise.to_string());
        if let Ok(host) = std::fs::read_to_string("/etc/hostname") {
            sans.push(host.trim().to_owned());
        }
        // In-cluster clients dial the `kubernetes` Service's cluster IP.
        sans.push(args.service_cidr.first().to_string());
        sans.retain(|s| !s.is_empty());
        let identity =
            Identity::load_or_create(&args.data_dir, &sans).context("creating the TLS identity")?;
        let tls = serving_tls(&identity).context("loading the serving certificate")?;
        let path = write_kubeconfig(
            &args.data_dir,
            local,
            Some(&identity),
            KubeconfigUser::Admin,
        )?;
        write_kubeconfig(
            &args.data_dir,
            local,
            Some(&identity),
            KubeconfigUser::NodeAgent,
        )?;
        tracing::info!(listen = %local, kubeconfig = %path.display(), "serving HTTPS; admin kubeconfig written");

        // What agents join with, and what this server shows their endpoints.
        let _ = api.engine().kubelet_token.set(identity.node_token.clone());
        // Aggregated API servers: the proxy's client identity, and how they trust it.
        api.engine().set_front_proxy(identity.front_proxy.clone());
        orquestra_apiserver::aggregator::publish_authentication(
            api.engine(),
            &identity.ca_pem,
            &identity.front_proxy,
        )
        .await
        .context("publishing the extension-apiserver-authentication ConfigMap")?;
        let auth = Arc::new(
            Authenticator::new(identity.token.clone(), api.engine().clone())
                .with_node_token(identity.node_token.clone()),
        );
        // The reviews (TokenReview, SubjectAccessReview, …) answer as the layers decide.
        api.engine().set_access(
            Some(Arc::clone(&auth)),
            args.authorization_mode == AuthorizationMode::Rbac,
        );
        // Layers run outside in: authentication names the caller, impersonation may make it
        // someone else, then RBAC judges.
        let (app, authorizer) = match args.authorization_mode {
            AuthorizationMode::Rbac => {
                let authorizer = Arc::new(Authorizer::new(api.engine().clone()));
                let app = app.layer(axum::middleware::from_fn_with_state(
                    Arc::clone(&authorizer),
                    authorize,
                ));
                (app, Some(authorizer))
            }
            AuthorizationMode::AlwaysAllow => (app, None),
        };
        let app = app.layer(axum::middleware::from_fn_with_state(
            Arc::new(Impersonation { authorizer }),
            impersonate,
        ));
        let app = app
            .layer(axum::middleware::from_fn_with_state(auth, authenticate))
            .layer(axum::middleware::from_fn(client_certificate));
        let server = axum_server::from_tcp_rustls(listener, tls)?.handle(handle.clone());
        tokio::spawn(server.serve(app.into_make_service()))
    };

    // The control loops, through the API like any client (the admin kubeconfig), each group
    // behind its leader Lease.
    let mut controllers = Vec::new();
    if args.controllers.selects_any() {
        let kubeconfig = args.data_dir.join("kubeconfig.yaml");
        let client = crate::agent::client(&kubeconfig).await?;
        let own_ca = std::fs::read_to_string(args.data_dir.join("tls/ca.crt")).ok();
        // The cluster CA signs approved client certificate requests, as kube-apiserver's
        // `--client-ca-file` trusts them.
        let mut controller_args = args.controllers.clone();
        if controller_args.cluster_signing_cert_file.is_none() && !args.insecure_http {
            controller_args.cluster_signing_cert_file = Some(args.data_dir.join("tls/ca.crt"));
            controller_args.cluster_signing_key_file = Some(args.data_dir.join("tls/ca.key"));
        }
        for group in crate::control::Group::ALL {
            let elected = crate::control::Elected {
                group,
                client: client.clone(),
                args: controller_args.clone(),
                own_ca: own_ca.clone(),
                identity: identity.clone(),
                running: state.controllers.clone(),
            };
            if !elected.selects_any() {
                continue;
            }
            let stop = controllers_stop_rx.clone();
            controllers.push(tokio::spawn(async move {
                if let Err(e) = elected.run(stop).await {
                    tracing::error!(error = %e, lease = group.lease(), "the control loops stopped");
                }
            }));
        }
    }

    // The local node: its heartbeat talks to this server like any agent would, as a node
    // (the node token; the admin kubeconfig's in insecure mode, which has none).
    let mut agent = if args.no_agent {
        None
    } else {
        let kubeconfig = Some(args.data_dir.join(NODE_KUBECONFIG))
            .filter(|p| p.exists())
            .unwrap_or_else(|| args.data_dir.join("kubeconfig.yaml"));
        let client = crate::agent::client(&kubeconfig).await?;
        let mut config = crate::agent::config(
            args.node_name.clone(),
            &args.node,
            args.data_dir.join("agent"),
        )?;
        if args.node.agent_listen.is_none() {
            // A free port, reachable at the node's address (the API server proxies logs there).
            config.listen = SocketAddr::from(([0, 0, 0, 0], 0));
        }
        config.endpoint_token = crate::agent::kubeconfig_token(&kubeconfig);
        config.cluster_ca = crate::agent::kubeconfig_ca(&kubeconfig);
        let registry = registry.clone();
        let stop = stopped(stop_rx.clone());
        Some(tokio::spawn(async move {
            orquestra_node_agent::run(client, config, &registry, stop).await
        }))
    };

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // The local agent retries what can recover by itself (its network, DNS, the API); if
    // it stops on its own, the node is gone for good and the server says so and stops, as
    // k3s does when its kubelet exits.
    let agent_stopped = async {
        match agent.as_mut() {
            Some(task) => task,
            None => std::future::pending().await,
        }
        .await
    };
    tokio::select! {
        result = server => result.context("HTTP server task failed")?.context("HTTP server failed")?,
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        result = agent_stopped => {
            let error = match result {
                Ok(Ok(())) => anyhow::anyhow!("the local node agent stopped"),
                Ok(Err(e)) => anyhow::Error::new(e).context("the local node agent failed"),
                Err(e) => anyhow::Error::new(e).context("the local node agent's task failed"),
            };
            handle.graceful_shutdown(Some(Duration::from_secs(5)));
            let _ = controllers_stop_tx.send(true);
            let _ = stop_tx.send(true);
            return Err(error);
        }
    }
    // The control loops first, while this server still serves: they finish their
    // reconciles and release their Leases through it, so a standby takes over at once.
    let _ = controllers_stop_tx.send(true);
    for controllers in controllers {
        let _ = tokio::time::timeout(Duration::from_secs(10), controllers).await;
    }
    handle.graceful_shutdown(Some(Duration::from_secs(5)));
    let _ = stop_tx.send(true);
    kubernetes_service.abort();
    quota_status.abort();
    resource_metrics.abort();
    api_services.abort();
    if let Some(agent) = agent {
        let _ = agent.await;
    }
    // Out of the `kubernetes` endpoints now rather than when the Lease expires.
    endpoint.release(api.engine()).await;
    let _ = compactor.await;
    drop(store);
    Ok(())
}

/// The serving TLS: this server's certificate, and client certificates asked for and
/// verified against the cluster CA (as kube-apiserver's `--client-ca-file`) but not
/// required — bearer tokens work without one.
fn serving_tls(identity: &Identity) -> anyhow::Result<axum_server::tls_rustls::RustlsConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(identity.ca_pem.as_bytes()) {
        roots.add(ca.context("the cluster CA")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .allow_unauthenticated()
    .build()
    .context("the client certificate verifier")?;
    let chain = CertificateDer::pem_slice_iter(identity.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the serving certificate")?;
    let key =
        PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).context("the serving key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(axum_server::tls_rustls::RustlsConfig::from_config(
        Arc::new(config),
    ))
}

/// Hands the connection's verified client certificate (axum-server's `TlsInfo`) to the
/// authentication layer.
async fn client_certificate(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let leaf = request
        .extensions()
        .get::<Arc<axum_server::tls::TlsInfo>>()
        .and_then(|info| info.peer_certificates.first().cloned());
    if let Some(leaf) = leaf {
        request
            .extensions_mut()
            .insert(orquestra_apiserver::identity::ClientCertificate(leaf));
    }
    next.run(request).await
}

/// The address to advertise when none is given: `listen` if it is a specific non-loopback
/// address (the server is reachable only there), else the host's primary address.
fn advertise_address(listen: IpAddr) -> IpAddr {
    if !listen.is_unspecified() && !listen.is_loopback() {
        return listen;
    }
    crate::agent::primary_address()
}

/// The node agents' kubeconfig in the data dir: the admin one's cluster, the node token.
pub const NODE_KUBECONFIG: &str = "node-kubeconfig.yaml";

/// Who a kubeconfig written into the data dir is for.
#[derive(Debug, Clone, Copy)]
enum KubeconfigUser {
    /// `kubeconfig.yaml`, the admin token.
    Admin,
    /// [`NODE_KUBECONFIG`], the node token.
    NodeAgent,
}

/// Writes a kubeconfig for `who` into the data dir (atomically, mode 0600) and returns its
/// path.
fn write_kubeconfig(
    data_dir: &std::path::Path,
    listen: SocketAddr,
    identity: Option<&Identity>,
    who: KubeconfigUser,
) -> anyhow::Result<PathBuf> {
    let (file, user_name) = match who {
        KubeconfigUser::Admin => ("kubeconfig.yaml", "admin"),
        KubeconfigUser::NodeAgent => (NODE_KUBECONFIG, "node-agent"),
    };
    use base64::Engine as _;
    let host = if listen.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        listen.ip()
    };
    let server = SocketAddr::new(host, listen.port());
    let (cluster, user) = match identity {
        Some(identity) => (
            format!(
                "    server: https://{server}\n    certificate-authority-data: {}",
                base64::engine::general_purpose::STANDARD.encode(&identity.ca_pem)
            ),
            format!(
                "    token: {}",
                match who {
                    KubeconfigUser::Admin => &identity.token,
                    KubeconfigUser::NodeAgent => &identity.node_token,
                }
            ),
        ),
        None => (format!("    server: http://{server}"), "    {}".to_owned()),
    };
    let contents = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: orquestra
  cluster:
{cluster}
users:
- name: {user_name}
  user:
{user}
contexts:
- name: orquestra
  context:
    cluster: orquestra
    user: {user_name}
    namespace: default
current-context: orquestra
"
    );
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join(file);
    orquestra_apiserver::identity::write_private(&path, contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, String) {
    if let Err(error) = state.store.current_revision().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("store: {error}"));
    }
    match state.controllers.controllers() {
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why),
        Ok(()) => (StatusCode::OK, "ok".into()),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> (StatusCode, String) {
    // Bounded: a server cut off from etcd still serves its metrics (the store gauges keep
    // their last values), which is when its leader-election gauges matter most.
    let bound = Duration::from_millis(500);
    if let Ok(Ok(revision)) = tokio::time::timeout(bound, state.store.current_revision()).await {
        state.revision.set(revision);
    }
    if let Ok(Ok(size)) = tokio::time::timeout(bound, state.store.size()).await {
        state.db_size.set(size as i64);
    }
    let mut body = Vec::new();
    match TextEncoder::new().encode(&state.controllers.gather(&state.registry), &mut body) {
        Ok(()) => (StatusCode::OK, String::from_utf8_lossy(&body).into_owned()),
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}
