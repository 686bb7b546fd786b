//! `orq agent`: the node agent joining a cluster — it registers the node, keeps its Lease and
//! status fresh, and runs the pods bound to it through libcontainer (or, with `--runtime
//! simulated`, many fake nodes whose pods run instantly). `orq server` runs the same agent
//! for its local node.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use orquestra_node_agent::network::{Cidr, Network};
use orquestra_node_agent::{AgentConfig, HostInfo};

/// Flags of `orq agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// A YAML file of settings, keyed by these flags' long names (`data-dir: /srv/orq`);
    /// flags on the command line win. Default: /etc/orquestra/config.yaml, if it exists.
    #[arg(long, env = "ORQ_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The kubeconfig to reach the API server with (`orq server` writes an admin one to
    /// DATA_DIR/kubeconfig.yaml). Or join with `--server` and `--token`, which win.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The API server to join, e.g. `https://10.0.0.1:6443` (with `--token` or
    /// `--token-file`, and `--ca-file`). Repeat it (or separate with commas) for several
    /// servers of one cluster: the agent then dials them through a local load balancer that
    /// fails over between them and learns the others from the `kubernetes` Endpoints.
    #[arg(long, env = "ORQ_SERVER", value_delimiter = ',')]
    server: Vec<String>,
    /// The bearer token to join with: `orq server`'s node token, DATA_DIR/node-token.
    #[arg(
        long,
        env = "ORQ_TOKEN",
        conflicts_with = "token_file",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The cluster CA to verify the server with (`orq server`'s DATA_DIR/tls/ca.crt);
    /// default: the system's roots.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// The Node's name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// `libcontainer`: this host is the node and runs its pods' containers.
    /// `simulated`: `--nodes` fake nodes whose pods run instantly, for control-plane tests
    /// and scale benchmarks.
    #[arg(long, value_enum, default_value_t = Runtime::Libcontainer)]
    runtime: Runtime,
    /// How many simulated nodes (`--runtime simulated`), named `<node-name>-<i>`.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    #[command(flatten)]
    node: NodeArgs,
    /// Stop every container this agent started (SIGKILL), remove the pods' state and the
    /// node's pod network, then exit: for taking a node out of service.
    #[arg(long)]
    cleanup: bool,
}

/// Flags shared by `orq agent` and `orq server`'s local agent.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// The address the node reports as its InternalIP (pods' hostIP; where the API server
    /// reaches the agent). Default: the host's primary IPv4 address (the default route's
    /// source), as the kubelet picks it.
    #[arg(long, env = "ORQ_NODE_IP")]
    node_ip: Option<std::net::IpAddr>,
    /// Where the agent keeps images, pods, logs and runtime state.
    #[arg(long = "agent-data-dir", env = "ORQ_AGENT_DATA_DIR")]
    agent_data_dir: Option<PathBuf>,
    /// The pods' address range on this node (default: the Node's spec.podCIDR, else
    /// 10.88.0.0/16).
    #[arg(long)]
    pod_cidr: Option<String>,
    /// The node bridge pods are attached to.
    #[arg(long, default_value = "orq0")]
    bridge: String,
    /// Where the agent's HTTPS endpoint (container logs for `kubectl logs`, metrics)
    /// listens (default 0.0.0.0:10250 for `orq agent`; a free loopback port inside
    /// `orq server`).
    #[arg(long = "agent-listen")]
    pub(crate) agent_listen: Option<std::net::SocketAddr>,
    /// A registry (`host[:port]`) to pull from over plain HTTP (repeatable); loopback
    /// registries always are, everything else is HTTPS.
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// A registry mirror, `REGISTRY=ENDPOINT` (repeatable, tried in order before the
    /// registry; `http://` endpoints over plain HTTP), as k3s' `registries.yaml` mirrors:
    /// `--registry-mirror registry.k8s.io=http://10.0.0.5:5000`.
    #[arg(long = "registry-mirror", value_name = "REGISTRY=ENDPOINT")]
    registry_mirrors: Vec<String>,
    /// Taints the Node is created with, `key[=value]:Effect` (comma-separated or
    /// repeated), e.g. `orquestra.dev/runtime=libcontainer:NoSchedule`.
    #[arg(
        long = "register-with-taints",
        value_delimiter = ',',
        value_name = "TAINT"
    )]
    pub(crate) register_with_taints: Vec<orquestra_node_agent::node::RegisterTaint>,
    /// Leave Services and the cross-node pod network to something else (k3s' flag): no
    /// service proxy rules, no routes to other nodes' pods, and the node's network is set
    /// up only once a pod needs it.
    #[arg(long)]
    disable_kube_proxy: bool,
    /// Where the built-in ingress serves plain HTTP (Ingresses of the default class
    /// `orquestra`, as k3s' Traefik). A port another process holds is retried in the
    /// background; the node stays Ready.
    #[arg(long, default_value = "0.0.0.0:80", value_name = "ADDR")]
    ingress_http_listen: std::net::SocketAddr,
    /// Where the built-in ingress serves HTTPS (certificates from the Ingresses' TLS
    /// Secrets, by SNI).
    #[arg(long, default_value = "0.0.0.0:443", value_name = "ADDR")]
    ingress_https_listen: std::net::SocketAddr,
    /// Serve no Ingresses on this node (k3s' `--disable traefik`). Implied by
    /// `--disable-kube-proxy`: the ingress is part of the network the agent programs.
    #[arg(long)]
    disable_ingress: bool,
}

impl NodeArgs {
    /// Whether the agent programs the network of its host (namespace): bridge, service
    /// proxy, routes, cluster DNS.
    pub fn programs_network(&self) -> bool {
        !self.disable_kube_proxy
    }
}

/// Which runtime the agent runs pods with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Runtime {
    /// Real containers through youki's libcontainer.
    Libcontainer,
    /// Fake nodes, pods Running at once (like kwok).
    Simulated,
}

/// A client from a kubeconfig file.
pub async fn client(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .context("loading the kubeconfig")?;
    kube::Client::try_from(config).context("building the API client")
}

/// The agent's configuration: node `name` (default: the hostname) at `--node-ip` (default:
/// the host's primary address), state under `node.agent_data_dir` (default `default_dir`),
/// containers run through this binary's shim.
pub fn config(
    name: Option<String>,
    node: &NodeArgs,
    default_dir: PathBuf,
) -> anyhow::Result<AgentConfig> {
    let name = name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| HostInfo::read().hostname.to_lowercase());
    let exe = std::env::current_exe().context("finding the orq binary for the shim")?;
    let ip = node.node_ip.unwrap_or_else(primary_address);
    let mut config = AgentConfig::new(
        name,
        ip.to_string(),
        node.agent_data_dir.clone().unwrap_or(default_dir),
        vec![exe.into(), "shim".into()],
    );
    config.pod_cidr = node.pod_cidr.clone();
    config.bridge = node.bridge.clone();
    if let Some(listen) = node.agent_listen {
        config.listen = listen;
    }
    config.insecure_registries = node.insecure_registries.clone();
    config.registry_mirrors = node.registry_mirrors.clone();
    config.kube_proxy = !node.disable_kube_proxy;
    config.ingress =
        (!node.disable_ingress).then_some(orquestra_node_agent::ingress::IngressConfig {
            http: node.ingress_http_listen,
            https: node.ingress_https_listen,
        });
    config.register_with_taints = node.register_with_taints.clone();
    Ok(config)
}

/// The host's primary IPv4 address: the source address of the default route (a UDP
/// socket's `connect` picks it without sending anything), else loopback.
pub fn primary_address() -> std::net::IpAddr {
    let routed = std::net::UdpSocket::bind("0.0.0.0:0").and_then(|socket| {
        // TEST-NET-1: never contacted; connect only consults the routing table.
        socket.connect("192.0.2.1:9")?;
        socket.local_addr()
    });
    match routed {
        Ok(local) if !local.ip().is_unspecified() => local.ip(),
        _ => std::net::IpAddr::from([127, 0, 0, 1]),
    }
}

/// The bearer token of the kubeconfig's current user, if it authenticates with one: the
/// agent's endpoint accepts the same token from the API server.
pub fn kubeconfig_token(kubeconfig: &Path) -> Option<String> {
    let text = std::fs::read_to_string(kubeconfig).ok()?;
    let config: serde_yaml::Value = serde_yaml::from_str(&text).ok()?;
    let current = config.get("current-context")?.as_str()?;
    let context = config
        .get("contexts")?
        .as_sequence()?
        .iter()
        .find(|c| c.get("name").and_then(|n| n.as_str()) == Some(current))?;
    let user = context.get("context")?.get("user")?.as_str()?;
    config
        .get("users")?
        .as_sequence()?
        .iter()
        .find(|u| u.get("name").and_then(|n| n.as_str()) == Some(user))?
        .get("user")?
        .get("token")?
        .as_str()
        .map(str::to_owned)
}

/// The CA (PEM) of the kubeconfig's current cluster, from `certificate-authority-data` or
/// the `certificate-authority` file: pods get it as their service account `ca.crt`.
pub fn kubeconfig_ca(kubeconfig: &Path) -> Option<String> {
    use base64::Engine as _;
    let config = kube::config::Kubeconfig::read_from(kubeconfig).ok()?;
    let current = config.current_context.as_deref()?;
    let context = config
        .contexts
        .iter()
        .find(|c| c.name == current)?
        .context
        .as_ref()?;
    let cluster = config
        .clusters
        .iter()
        .find(|c| c.name == context.cluster)?
        .cluster
        .as_ref()?;
    if let Some(data) = &cluster.certificate_authority_data {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .ok()?;
        return String::from_utf8(pem).ok();
    }
    std::fs::read_to_string(cluster.certificate_authority.as_ref()?).ok()
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    if let Some(config) = &args.config {
        tracing::info!(config = %config.display(), "settings from a config file (flags on the command line win)");
    }
    use tokio::signal::unix::{SignalKind, signal};
    let default_dir = PathBuf::from("/var/lib/orquestra/agent");
    if args.cleanup {
        let config = config(args.node_name, &args.node, default_dir)?;
        let cidr = config
            .pod_cidr
            .clone()
            .unwrap_or_else(|| orquestra_node_agent::agent::DEFAULT_POD_CIDR.into());
        let network = Network::new(
            &config.bridge,
            Cidr::parse(&cidr)?,
            config.data_dir.join("network/ips"),
        );
        orquestra_node_agent::agent::cleanup(&config.data_dir, Some(&network))
            .await
            .with_context(|| format!("cleaning up {}", config.data_dir.display()))?;
        return Ok(());
    }
    let (client, token) = match (args.server.is_empty(), &args.kubeconfig) {
        (false, _) => join(&args.server, &args).await?,
        (true, Some(kubeconfig)) => (client(kubeconfig).await?, kubeconfig_token(kubeconfig)),
        (true, None) => anyhow::bail!(
            "no cluster to join: pass --server URL --token TOKEN (or --token-file) [--ca-file], \
             or --kubeconfig FILE (orq server writes DATA_DIR/kubeconfig.yaml)"
        ),
    };
    let servers = args.server.join(", ");
    check_access(
        &client,
        if servers.is_empty() {
            "the kubeconfig's server"
        } else {
            &servers
        },
    )
    .await?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = int.recv() => tracing::info!("SIGINT: stopping"),
        }
    };
    match args.runtime {
        Runtime::Libcontainer => {
            let _network_lock = if args.node.programs_network() {
                let dir = args
                    .node
                    .agent_data_dir
                    .clone()
                    .unwrap_or(default_dir.clone());
                Some(crate::lock::node_network(
                    &dir,
                    "run this one with --disable-kube-proxy or in a network namespace of its own",
                )?)
            } else {
                None
            };
            let mut config = config(args.node_name, &args.node, default_dir)?;
            config.endpoint_token = token;
            // `--server` wins over a kubeconfig (KUBECONFIG may be set in the environment).
            config.cluster_ca = match (args.server.is_empty(), &args.kubeconfig) {
                (false, _) => args
                    .ca_file
                    .as_ref()
                    .and_then(|ca| std::fs::read_to_string(ca).ok()),
                (true, Some(kubeconfig)) => kubeconfig_ca(kubeconfig),
                (true, None) => None,
            };
            let registry = prometheus::Registry::new();
            orquestra_node_agent::run(client, config, &registry, stop).await?;
        }
        Runtime::Simulated => {
            let prefix = args.node_name.unwrap_or_else(|| "simulated".into());
            orquestra_node_agent::simulated::run(client, &prefix, args.nodes, stop).await;
        }
    }
    Ok(())
}

/// A client for `--server` (one, or several through a [`Balancer`]) with
/// `--token`/`--token-file` and `--ca-file`, and the token.
///
/// [`Balancer`]: crate::balancer::Balancer
async fn join(
    servers: &[String],
    args: &AgentArgs,
) -> anyhow::Result<(kube::Client, Option<String>)> {
    use kube::config::{
        AuthInfo, Cluster, Context as KubeContext, Kubeconfig, NamedAuthInfo, NamedCluster,
        NamedContext,
    };
    for server in servers {
        anyhow::ensure!(
            server.starts_with("https://") || server.starts_with("http://"),
            "--server {server:?} is not a URL like https://HOST:6443"
        );
    }
    let server = servers.first().context("no --server")?;
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => token.trim().to_owned(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading --token-file {}", file.display()))?
            .trim()
            .to_owned(),
        (None, None) => anyhow::bail!("--server needs --token or --token-file"),
    };
    anyhow::ensure!(!token.is_empty(), "the token is empty");
    if let Some(ca) = &args.ca_file {
        anyhow::ensure!(ca.is_file(), "--ca-file {}: no such file", ca.display());
    }
    // An in-memory kubeconfig, so that kube reads the CA file as it reads any other.
    let kubeconfig = Kubeconfig {
        clusters: vec![NamedCluster {
            name: "join".into(),
            cluster: Some(Cluster {
                server: Some(server.to_owned()),
                certificate_authority: args.ca_file.as_ref().map(|p| p.display().to_string()),
                ..Cluster::default()
            }),
            other: Default::default(),
        }],
        auth_infos: vec![NamedAuthInfo {
            name: "join".into(),
            auth_info: Some(AuthInfo {
                token: Some(token.clone().into()),
                ..AuthInfo::default()
            }),
            other: Default::default(),
        }],
        contexts: vec![NamedContext {
            name: "join".into(),
            context: Some(KubeContext {
                cluster: "join".into(),
                user: Some("join".into()),
                ..KubeContext::default()
            }),
            other: Default::default(),
        }],
        current_context: Some("join".into()),
        ..Kubeconfig::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .context("loading --ca-file")?;
    let (client, _) = crate::balancer::client(config, servers).await?;
    Ok((client, Some(token)))
}

/// Fails with a message naming what went wrong if the API server cannot be reached or
/// does not accept the credentials — before the agent starts retrying forever.
async fn check_access(client: &kube::Client, server: &str) -> anyhow::Result<()> {
    match client.list_core_api_resources("v1").await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 401 => anyhow::bail!(
            "the API server at {server} rejected the token (401 Unauthorized): check --token \
             (agents join with the node token, DATA_DIR/node-token of orq server)"
        ),
        Err(e) => Err(anyhow::Error::new(e).context(format!(
            "cannot reach the API server at {server}: is the URL right and the server up? \
             (with HTTPS, --ca-file must name the cluster CA)"
        ))),
    }
}
