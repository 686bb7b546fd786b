//! `orq run`: creates a single-container Pod labelled `run=NAME`, as `kubectl run` does.

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, ValueEnum};
use k8s_openapi::api::core::v1::{Container, ContainerPort, EnvVar, Pod, PodSpec};
use kube::api::{ObjectMeta, PostParams};

use super::{ConnectArgs, NamespaceArgs, Session};

/// `--restart`: the Pod's restart policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Restart {
    /// Restart the container whenever it exits.
    Always,
    /// Restart it only when it fails.
    OnFailure,
    /// Never restart it.
    Never,
}

/// `orq run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The Pod's name (also its container's name and its `run` label's value).
    #[arg(value_name = "NAME")]
    name: String,
    /// The container image.
    #[arg(long, value_name = "IMAGE")]
    image: String,
    /// The port the container listens on.
    #[arg(long, value_name = "PORT")]
    port: Option<u16>,
    /// An environment variable for the container; repeatable.
    #[arg(long = "env", value_name = "NAME=VALUE")]
    env: Vec<String>,
    /// More labels for the Pod (`a=b,c=d`), besides `run=NAME`.
    #[arg(short = 'l', long, value_delimiter = ',', value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// The Pod's restart policy.
    #[arg(long, value_enum, default_value = "always", value_name = "POLICY")]
    restart: Restart,
    /// When to pull the image: Always, IfNotPresent or Never (default: the server's).
    #[arg(long, value_name = "POLICY")]
    image_pull_policy: Option<String>,
    /// Use the arguments after `--` as the container's command (replacing the image's
    /// entrypoint) instead of as arguments to it.
    #[arg(long)]
    command: bool,
    /// Print the Pod as YAML instead of creating it.
    #[arg(long)]
    dry_run: bool,
    /// Wait until the Pod runs (or has finished) before returning.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits (a duration: 30s, 2m).
    #[arg(long, default_value = "60s", value_parser = super::duration, value_name = "DURATION")]
    timeout: Duration,
    #[command(flatten)]
    namespace: NamespaceArgs,
    #[command(flatten)]
    connect: ConnectArgs,
    /// The container's arguments (its command with --command), after `--`.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<String>,
}

fn key_value(text: &str, what: &str) -> anyhow::Result<(String, String)> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| anyhow!("{what} {text:?} is not KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// The Pod `orq run` creates.
fn pod(args: &RunArgs, namespace: &str) -> anyhow::Result<Pod> {
    let mut labels = BTreeMap::from([("run".to_owned(), args.name.clone())]);
    for label in &args.labels {
        let (k, v) = key_value(label, "label")?;
        labels.insert(k, v);
    }
    let env = args
        .env
        .iter()
        .map(|e| {
            key_value(e, "--env").map(|(name, value)| EnvVar {
                name,
                value: Some(value),
                ..EnvVar::default()
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (command, container_args) = match (args.command, args.args.is_empty()) {
        (_, true) => (None, None),
        (true, false) => (Some(args.args.clone()), None),
        (false, false) => (None, Some(args.args.clone())),
    };
    let container = Container {
        name: args.name.clone(),
        image: Some(args.image.clone()),
        image_pull_policy: args.image_pull_policy.clone(),
        command,
        args: container_args,
        env: (!env.is_empty()).then_some(env),
        ports: args.port.map(|p| {
            vec![ContainerPort {
                container_port: i32::from(p),
                ..ContainerPort::default()
            }]
        }),
        ..Container::default()
    };
    let restart = match args.restart {
        Restart::Always => "Always",
        Restart::OnFailure => "OnFailure",
        Restart::Never => "Never",
    };
    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(args.name.clone()),
            namespace: Some(namespace.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some(restart.to_owned()),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// Runs `orq run`.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    if args.dry_run {
        let namespace = args
            .namespace
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let mut value = serde_json::to_value(pod(&args, &namespace)?)?;
        value["apiVersion"] = "v1".into();
        value["kind"] = "Pod".into();
        print!("{}", serde_yaml::to_string(&value)?);
        return Ok(());
    }
    let session = args.connect.connect().await?;
    let namespace = session.namespace(&args.namespace);
    let pod = pod(&args, &namespace)?;
    let api: kube::Api<Pod> = kube::Api::namespaced(session.client.clone(), &namespace);
    api.create(&PostParams::default(), &pod)
        .await
        .map_err(|e| session.error(e))
        .with_context(|| format!("creating pod/{}", args.name))?;
    println!("pod/{} created", args.name);
    if args.wait {
        wait_running(&session, &api, &args.name, args.timeout).await?;
    }
    Ok(())
}

/// What a Pod is waiting for, for progress and timeout messages.
fn pod_state(pod: &Pod) -> String {
    let status = pod.status.clone().unwrap_or_default();
    let phase = status.phase.unwrap_or_else(|| "Pending".into());
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    let waiting = status
        .container_statuses
        .unwrap_or_default()
        .into_iter()
        .filter_map(|c| c.state.and_then(|s| s.waiting).and_then(|w| w.reason))
        .collect::<Vec<_>>();
    if !scheduled {
        let why = status
            .conditions
            .unwrap_or_default()
            .into_iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")
            .and_then(|c| c.message)
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        format!("{phase}, not scheduled to a node yet{why}")
    } else if !waiting.is_empty() {
        format!("{phase}, containers waiting: {}", waiting.join(", "))
    } else {
        phase
    }
}

async fn wait_running(
    session: &Session,
    api: &kube::Api<Pod>,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let progress = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let pod = api.get(name).await.map_err(|e| session.error(e))?;
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default();
        if matches!(phase.as_str(), "Running" | "Succeeded" | "Failed") {
            if progress && !last.is_empty() {
                eprintln!();
            }
            println!("pod/{name} {}", phase.to_lowercase());
            return Ok(());
        }
        let state = pod_state(&pod);
        if start.elapsed() >= timeout {
            if progress && !last.is_empty() {
                eprintln!();
            }
            bail!(
                "timed out after {}s waiting for pod/{name} to run: {state}",
                timeout.as_secs()
            );
        }
        if progress && state != last {
            eprint!("\rpod/{name}: {state}\x1b[K");
            last = state;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
