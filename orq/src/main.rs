//! `orq`: the one Orquestra binary. Thin on purpose: it parses flags, sets up logging, wires
//! the library crates together and handles signals.

mod agent;
mod image;
mod operator;
mod server;

use clap::{Parser, Subcommand};

/// Orquestra: a Kubernetes-compatible container orchestrator in one small binary.
#[derive(Debug, Parser)]
#[command(name = "orq", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the all-in-one control plane in the foreground until SIGTERM.
    ///
    /// Opens the versioned store (embedded SQLite or etcd) with its compaction, serves the
    /// Kubernetes API over HTTPS (writing an admin kubeconfig into the data dir) with
    /// /healthz, /readyz and /metrics, and runs the local node agent. The built-in
    /// controllers join it as they land.
    Server(server::ServerArgs),
    /// Join a cluster as a node: register it and keep its Lease and status fresh (pods
    /// follow with the rest of the node agent).
    Agent(agent::AgentArgs),
    /// Run the built-in control loops (scheduler, workloads, endpoints, garbage collection,
    /// namespaces, node lifecycle) against a cluster, with leader election — what
    /// `orq server` runs in-process, as a process of its own.
    Operator(operator::OperatorArgs),
    /// Manage the node's images: import an OCI layout without a registry, list, remove, pull.
    Image(image::ImageArgs),
    /// The per-container helper the node agent runs containers through (internal: started
    /// by the agent, single-threaded because libcontainer must not run in a threaded process).
    #[command(hide = true)]
    Shim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Runs a command inside a running container (internal: the node agent's exec probes).
    #[command(hide = true)]
    ShimExec {
        /// libcontainer's state root.
        #[arg(long)]
        root: std::path::PathBuf,
        /// The container's ID.
        #[arg(long)]
        id: String,
        /// Kill the command after this many milliseconds.
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Write the built-in kinds as CustomResourceDefinition manifests (generated from
    /// k8s-openapi) into a directory; the server embeds the ones in the repository's `crds/`.
    Crdgen {
        /// Where to write the manifests.
        #[arg(long, default_value = "crds")]
        out: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // hickory logs every DNS request at info.
            "info,hickory_server=warn".into()
        })
    };
    let command = Cli::parse().command;
    // The shim must stay single-threaded: it runs before any runtime (and its threads) exist.
    // Its logs (libcontainer's included, also from the container's init before it execs,
    // whose stdio is the container's) go to a file in the bundle, never to stdio.
    if let Command::Shim { args } = command {
        let args = orquestra_node_agent::shim::ShimArgs::parse(args).map_err(anyhow::Error::msg)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(args.bundle.join(orquestra_node_agent::shim::SHIM_LOG))?;
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(log))
            .init();
        std::process::exit(orquestra_node_agent::shim::main(args));
    }
    if let Command::ShimExec {
        root,
        id,
        timeout_ms,
        command,
    } = command
    {
        // Same single-threaded rule as the shim; libcontainer's logs stay out of the way.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
            .with_writer(std::io::stderr)
            .init();
        let timeout = std::time::Duration::from_millis(timeout_ms);
        std::process::exit(orquestra_node_agent::shim::exec(
            &root, &id, command, timeout,
        ));
    }
    tracing_subscriber::fmt().with_env_filter(filter()).init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            match command {
                Command::Server(args) => server::run(args).await,
                Command::Agent(args) => agent::run(args).await,
                Command::Operator(args) => operator::run(args).await,
                Command::Image(args) => image::run(args).await,
                Command::Crdgen { out } => crdgen(&out),
                // Ran (and exited) above.
                Command::Shim { .. } | Command::ShimExec { .. } => Ok(()),
            }
        })
}

/// `orq crdgen`: (re)writes every built-in kind's manifest into `out`.
fn crdgen(out: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut manifests = orquestra_apiserver::crdgen::manifests()?;
    // Custom resources written with the controller framework.
    manifests.push(orquestra_apiserver::crdgen::manifest(&static_site::crd())?);
    for manifest in manifests {
        let path = out.join(&manifest.file_name);
        std::fs::write(&path, &manifest.yaml)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("{}", path.display());
    }
    Ok(())
}
