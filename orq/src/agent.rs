//! `orq agent`: the node agent joining a cluster. Today it registers the node and keeps its
//! Lease and status fresh; running pods comes with the rest of issue 5. `orq server` runs the
//! same heartbeat for its local node.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use orquestra_node_agent::{Heartbeat, HostInfo, NodeConfig};

/// Flags of `orq agent`.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The kubeconfig to reach the API server with (`orq server` writes an admin one to
    /// DATA_DIR/kubeconfig.yaml).
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// The Node's name (default: the hostname).
    #[arg(long)]
    node_name: Option<String>,
    /// The address the node reports as its InternalIP.
    #[arg(long, default_value = "127.0.0.1")]
    node_ip: String,
    /// `libcontainer`: this host is the node (running pods is still to come: it registers
    /// and heartbeats). `simulated`: `--nodes` fake nodes whose pods run instantly, for
    /// control-plane tests and scale benchmarks.
    #[arg(long, value_enum, default_value_t = Runtime::Libcontainer)]
    runtime: Runtime,
    /// How many simulated nodes (`--runtime simulated`), named `<node-name>-<i>`.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
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

/// The heartbeat of this host's node.
pub fn heartbeat(client: kube::Client, name: Option<String>, ip: &str) -> Heartbeat {
    let host = HostInfo::read();
    let name = name
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| host.hostname.to_lowercase());
    Heartbeat::new(client, NodeConfig::new(name, ip), host)
}

/// Runs until SIGTERM or SIGINT.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let client = client(&args.kubeconfig).await?;
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
            heartbeat(client, args.node_name, &args.node_ip)
                .run(stop)
                .await;
        }
        Runtime::Simulated => {
            let prefix = args.node_name.unwrap_or_else(|| "simulated".into());
            orquestra_node_agent::simulated::run(client, &prefix, args.nodes, stop).await;
        }
    }
    Ok(())
}
