//! `orq`: the one Orquestra binary. Thin on purpose: it parses flags, sets up logging, wires
//! the library crates together and handles signals. The client commands (`get`, `apply`, …)
//! live in [`client`].

mod agent;
mod backup;
mod balancer;
mod bootstrap;
mod chartgen;
mod client;
mod config;
mod control;
mod image;
mod lock;
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
    Server(Box<server::ServerArgs>),
    /// Join a cluster as a node: register it and keep its Lease and status fresh (pods
    /// follow with the rest of the node agent).
    Agent(agent::AgentArgs),
    /// Run the built-in control loops (scheduler, workloads, endpoints, garbage collection,
    /// namespaces, node lifecycle) against a cluster, with leader election — what
    /// `orq server` runs in-process, as a process of its own.
    Operator(operator::OperatorArgs),
    /// Manage the node's images: import an OCI layout without a registry, list, remove, pull.
    Image(image::ImageArgs),
    /// Snapshot a server's store (online: SQLite's backup API, or etcd's snapshot) and the
    /// secrets of its data dir into one archive.
    Backup(backup::BackupArgs),
    /// Make a new data dir (and, for etcd, a new etcd data dir) from an `orq backup`
    /// archive: a server started on it serves the same objects at the same revisions.
    Restore(backup::RestoreArgs),
    /// The per-container helper the node agent runs containers through (internal: started
    /// by the agent, single-threaded because libcontainer must not run in a threaded process).
    #[command(hide = true)]
    Shim {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Runs a command inside a running container (internal: the node agent's exec probes
    /// and `kubectl exec`).
    #[command(hide = true)]
    ShimExec {
        /// libcontainer's state root.
        #[arg(long)]
        root: std::path::PathBuf,
        /// The container's ID.
        #[arg(long)]
        id: String,
        /// Kill the command after this many milliseconds (0: never).
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Set `NAME=VALUE` in the command's environment (repeatable).
        #[arg(long = "env", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Run the command on a terminal whose master is sent to this Unix socket.
        #[arg(long)]
        console_socket: Option<std::path::PathBuf>,
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
    /// Write the Helm chart's generated files: Orquestra's own CRDs and the operator's RBAC
    /// rules, from what each control loop declares.
    Chartgen {
        /// The chart's directory.
        #[arg(long, default_value = "charts/orquestra")]
        chart: std::path::PathBuf,
    },
    /// Print where the cluster's API server runs, its version and how many nodes are ready.
    #[command(name = "cluster-info")]
    ClusterInfo(client::info::ClusterInfoArgs),
    /// Print the client's version and the server's (the client's alone with --client).
    Version(client::info::VersionArgs),
    /// List objects of a kind, or get some by name: as a table, YAML, JSON or names; -w
    /// keeps watching.
    Get(client::get::GetArgs),
    /// Create or update objects from manifests with server-side apply (field manager `orq`).
    Apply(client::apply::ApplyArgs),
    /// Delete objects by kind and name, label selector or manifest, waiting until they are gone.
    Delete(client::delete::DeleteArgs),
    /// Create a Pod running one image, labelled run=NAME (like `kubectl run`).
    Run(client::run::RunArgs),
    /// Print (or follow) the log of a Pod's container.
    Logs(client::logs::LogsArgs),
    /// Show an object's details: metadata, state, conditions and its Events.
    Describe(client::describe::DescribeArgs),
    /// Run a command in a Pod's container (`-i` passes stdin, `-t` a terminal); exits with
    /// the command's code.
    Exec(client::exec::ExecArgs),
    /// Forward local ports to a Pod's ports until interrupted.
    #[command(name = "port-forward")]
    PortForward(client::exec::PortForwardArgs),
    /// Copy files or directories into or out of a Pod's container (`tar` through exec).
    Cp(client::exec::CpArgs),
    /// Print a shell completion script: `source <(orq completion bash)`.
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

impl Command {
    /// Whether this is a client command: it logs warnings only, to stderr, and reports
    /// errors kubectl's way (`error: …`, exit status 1).
    fn is_client(&self) -> bool {
        matches!(
            self,
            Command::ClusterInfo(_)
                | Command::Version(_)
                | Command::Get(_)
                | Command::Apply(_)
                | Command::Delete(_)
                | Command::Run(_)
                | Command::Logs(_)
                | Command::Describe(_)
                | Command::Exec(_)
                | Command::PortForward(_)
                | Command::Cp(_)
                | Command::Completion { .. }
        )
    }
}

fn main() -> anyhow::Result<()> {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            // hickory logs every DNS request at info.
            "info,hickory_server=warn".into()
        })
    };
    let args = {
        use clap::CommandFactory as _;
        config::expand(std::env::args_os().collect(), &Cli::command())?
    };
    let command = Cli::parse_from(args).command;
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
        env,
        console_socket,
        command,
    } = command
    {
        // Same single-threaded rule as the shim; libcontainer's logs stay out of the way (the
        // command's stderr is the user's): its failure is reported once, by `exec`.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("off"))
            .with_writer(std::io::stderr)
            .init();
        let timeout = std::time::Duration::from_millis(timeout_ms);
        std::process::exit(orquestra_node_agent::shim::exec(
            &root,
            &id,
            command,
            env,
            timeout,
            console_socket.as_deref(),
        ));
    }
    if let Command::Completion { shell } = command {
        use clap::CommandFactory as _;
        clap_complete::generate(shell, &mut Cli::command(), "orq", &mut std::io::stdout());
        return Ok(());
    }
    if command.is_client() {
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    // kube-client logs the errors it returns; they are reported once, below.
                    .unwrap_or_else(|_| "warn,kube_client=off".into()),
            )
            .with_writer(std::io::stderr)
            .init();
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(async move {
                let done = match command {
                    // The command's own exit code.
                    Command::Exec(args) => return client::exec::run(args).await,
                    Command::PortForward(args) => client::exec::port_forward(args).await,
                    Command::Cp(args) => client::exec::cp(args).await,
                    Command::ClusterInfo(args) => client::info::cluster_info(args).await,
                    Command::Version(args) => client::info::version(args).await,
                    Command::Get(args) => client::get::run(args).await,
                    Command::Apply(args) => client::apply::run(args).await,
                    Command::Delete(args) => client::delete::run(args).await,
                    Command::Run(args) => client::run::run(args).await,
                    Command::Logs(args) => client::logs::run(args).await,
                    Command::Describe(args) => client::describe::run(args).await,
                    _ => Ok(()),
                };
                done.map(|()| 0)
            });
        match result {
            Err(error) => {
                eprintln!("error: {error:#}");
                std::process::exit(1);
            }
            // Exit at once: a read of stdin may still be blocked in a helper thread.
            Ok(code) => {
                use std::io::Write as _;
                let _ = std::io::stdout().flush();
                std::process::exit(code);
            }
        }
    }
    tracing_subscriber::fmt().with_env_filter(filter()).init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            match command {
                Command::Server(args) => server::run(*args).await,
                Command::Agent(args) => agent::run(args).await,
                Command::Operator(args) => operator::run(args).await,
                Command::Image(args) => image::run(args).await,
                Command::Backup(args) => backup::backup(args).await,
                Command::Restore(args) => backup::restore(args).await,
                Command::Crdgen { out } => crdgen(&out),
                Command::Chartgen { chart } => chartgen::run(&chart),
                // Handled above.
                Command::ClusterInfo(_)
                | Command::Version(_)
                | Command::Get(_)
                | Command::Apply(_)
                | Command::Delete(_)
                | Command::Run(_)
                | Command::Logs(_)
                | Command::Describe(_)
                | Command::Exec(_)
                | Command::PortForward(_)
                | Command::Cp(_)
                | Command::Completion { .. } => Ok(()),
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

/// `NAME=VALUE`, for `--env`.
fn parse_env(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, value)| (name.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected NAME=VALUE, got {s:?}"))
}
