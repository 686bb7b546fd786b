//! `orq logs`: a container's log through the Pod's `log` subresource, optionally followed.

use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use kube::api::LogParams;

use super::{ConnectArgs, NamespaceArgs};

/// `orq logs` flags.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// The Pod: `NAME` or `pod/NAME`.
    #[arg(value_name = "POD")]
    pod: String,
    /// The container (default: the Pod's only one, else the one its
    /// `kubectl.kubernetes.io/default-container` annotation names, else its first).
    #[arg(short, long, value_name = "NAME")]
    container: Option<String>,
    /// Keep printing new lines as the container writes them, until interrupted.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines.
    #[arg(long, value_name = "N")]
    tail: Option<i64>,
    /// The log of the container's previous instance (before its last restart).
    #[arg(short, long)]
    previous: bool,
    /// Prefix every line with its RFC 3339 timestamp.
    #[arg(long)]
    timestamps: bool,
    /// Only lines newer than this (a duration: 30s, 5m, 1h).
    #[arg(long, value_parser = super::duration, value_name = "DURATION")]
    since: Option<Duration>,
    #[command(flatten)]
    namespace: NamespaceArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs `orq logs`.
pub async fn run(args: LogsArgs) -> anyhow::Result<()> {
    let name = match args.pod.split_once('/') {
        Some(("pod" | "pods" | "po", name)) => name,
        Some((kind, _)) => bail!("orq logs reads Pods' logs, not a {kind}'s: pass a Pod name"),
        None => args.pod.as_str(),
    };
    let session = args.connect.connect().await?;
    let namespace = session.namespace(&args.namespace);
    let api: kube::Api<Pod> = kube::Api::namespaced(session.client.clone(), &namespace);
    let container = match args.container.clone() {
        Some(container) => container,
        None => {
            let pod = api.get(name).await.map_err(|e| session.error(e))?;
            let names: Vec<String> = pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                .collect();
            let annotated = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubectl.kubernetes.io/default-container"))
                .filter(|c| names.contains(c))
                .cloned();
            let Some(chosen) = annotated.or_else(|| names.first().cloned()) else {
                bail!("pod/{name} has no containers");
            };
            if names.len() > 1 {
                eprintln!(
                    "Defaulted container {chosen:?} out of: {} (pick one with -c)",
                    names.join(", ")
                );
            }
            chosen
        }
    };
    let params = LogParams {
        container: Some(container.clone()),
        follow: args.follow,
        tail_lines: args.tail.filter(|n| *n >= 0),
        previous: args.previous,
        timestamps: args.timestamps,
        since_seconds: args.since.map(|d| d.as_secs() as i64),
        ..LogParams::default()
    };
    let stream = api
        .log_stream(name, &params)
        .await
        .map_err(|e| session.error(e))?;
    let mut stdout = futures::io::AllowStdIo::new(std::io::stdout());
    futures::io::copy(stream, &mut stdout)
        .await
        .with_context(|| format!("reading the log of pod/{name} container {container}"))?;
    Ok(())
}
