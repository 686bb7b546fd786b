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
    /// The kubeconfig to reach the API server with (`orq server` writes an admin one to
    /// DATA_DIR/kubeconfig.yaml).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// The Node's name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// The address the node reports as its InternalIP.
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
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
    /// Leave Services and the cross-node pod network to something else (k3s' flag): no
    /// service proxy rules, no routes to other nodes' pods, and the node's network is set
    /// up only once a pod needs it.
    #[arg(long)]
    disable_kube_proxy: bool,
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

/// The agent's configuration: node `name` (default: the hostname) at `ip`, state under
/// `node.agent_data_dir` (default `default_dir`), containers run through this binary's shim.
pub fn config(
    name: Option<String>,
    ip: &str,
    node: &NodeArgs,
    default_dir: PathBuf,
) -> anyhow::Result<AgentConfig> {
    let name = name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| HostInfo::read().hostname.to_lowercase());
    let exe = std::env::current_exe().context("finding the orq binary for the shim")?;
    let mut config = AgentConfig::new(
        name,
        ip,
        node.agent_data_dir.clone().unwrap_or(default_dir),
        vec![exe.into(), "shim".into()],
    );
    config.pod_cidr = node.pod_cidr.clone();
    config.bridge = node.bridge.clone();
    if let Some(listen) = node.agent_listen {
        config.listen = listen;
    }
    config.insecure_registries = node.insecure_registries.clone();
    config.kube_proxy = !node.disable_kube_proxy;
    Ok(config)
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
    use tokio::signal::unix::{SignalKind, signal};
    let default_dir = PathBuf::from("/var/lib/orquestra/agent");
    if args.cleanup {
        let config = config(args.node_name, &args.node_ip, &args.node, default_dir)?;
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
    let kubeconfig = args
        .kubeconfig
        .context("--kubeconfig (or KUBECONFIG) is required")?;
    let client = client(&kubeconfig).await?;
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
            let mut config = config(args.node_name, &args.node_ip, &args.node, default_dir)?;
            config.endpoint_token = kubeconfig_token(&kubeconfig);
            config.cluster_ca = kubeconfig_ca(&kubeconfig);
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
