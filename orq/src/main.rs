//! `orq`: the one Orquestra binary. Thin on purpose: it parses flags, sets up logging, wires
//! the library crates together and handles signals.

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
    /// Today this opens the versioned store (embedded SQLite or etcd), runs its compaction,
    /// and serves /healthz, /readyz and /metrics. The Kubernetes API, the controllers and the
    /// local node agent join it as they land.
    Server(server::ServerArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Server(args) => server::run(args).await,
    }
}
