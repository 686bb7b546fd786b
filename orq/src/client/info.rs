//! `orq cluster-info` and `orq version`.

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use serde_json::json;

use super::ConnectArgs;

/// `orq cluster-info` flags.
#[derive(Debug, Args)]
pub struct ClusterInfoArgs {
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs `orq cluster-info`: where the API server is, its version and its nodes.
pub async fn cluster_info(args: ClusterInfoArgs) -> anyhow::Result<()> {
    let session = args.connect.connect().await?;
    let version = session
        .client
        .apiserver_version()
        .await
        .map_err(|e| session.error(e))?;
    println!("Kubernetes control plane is running at {}", session.url);
    println!(
        "Server version: {} ({})",
        version.git_version, version.platform
    );
    // Nodes are a nicety: a user who may not list them still gets the rest.
    let nodes: kube::Api<Node> = kube::Api::all(session.client.clone());
    if let Ok(nodes) = nodes.list(&ListParams::default()).await {
        let ready = nodes
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        println!("Nodes: {} ({ready} ready)", nodes.items.len());
    }
    Ok(())
}

/// `orq version -o`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VersionOutput {
    /// `clientVersion` and `serverVersion` as YAML.
    Yaml,
    /// `clientVersion` and `serverVersion` as JSON.
    Json,
}

/// `orq version` flags.
#[derive(Debug, Args)]
pub struct VersionArgs {
    /// Only the client's version; don't contact a server.
    #[arg(long)]
    client: bool,
    /// Print YAML or JSON instead of text.
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    output: Option<VersionOutput>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Runs `orq version`: the client's version, then the server's; when the server can't be
/// reached the client's is still printed, then the error (and the exit status is 1).
pub async fn version(args: VersionArgs) -> anyhow::Result<()> {
    let client_version = json!({
        "gitVersion": concat!("v", env!("CARGO_PKG_VERSION")),
        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH),
    });
    let server = if args.client {
        None
    } else {
        Some(
            async {
                let session = args.connect.connect().await?;
                session
                    .client
                    .apiserver_version()
                    .await
                    .map_err(|e| session.error(e))
            }
            .await,
        )
    };
    let (server_version, error) = match server {
        None => (None, None),
        Some(Ok(info)) => (Some(info), None),
        Some(Err(error)) => (None, Some(error)),
    };
    match args.output {
        None => {
            println!(
                "Client Version: {} (orq)",
                client_version["gitVersion"].as_str().unwrap_or_default()
            );
            if let Some(info) = &server_version {
                println!("Server Version: {}", info.git_version);
            }
        }
        Some(format) => {
            let mut value = json!({"clientVersion": client_version});
            if let Some(info) = &server_version {
                value["serverVersion"] = serde_json::to_value(info)?;
            }
            match format {
                VersionOutput::Json => println!("{}", serde_json::to_string_pretty(&value)?),
                VersionOutput::Yaml => print!("{}", serde_yaml::to_string(&value)?),
            }
        }
    }
    match error {
        Some(error) => Err(error).context("the server's version is unknown"),
        None => Ok(()),
    }
}
