//! `orq delete`: deletes named objects, the objects of a label selector, or those in
//! manifests, and by default waits until they are gone (finalizers and dependents done).

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::{Args, ValueEnum};
use kube::api::{DeleteParams, ListParams, PropagationPolicy};

use super::manifest;
use super::{ConnectArgs, NamespaceArgs, Resource, Session, is_not_found};

/// `--cascade`: what happens to the objects' dependents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Cascade {
    /// The garbage collector deletes dependents after the owner is gone.
    Background,
    /// Dependents are deleted first; the owner goes last.
    Foreground,
    /// Dependents are left, without the owner reference.
    Orphan,
}

/// `orq delete` flags.
#[derive(Debug, Args)]
pub struct DeleteArgs {
    /// The resource type (as for `get`), or `TYPE/NAME`.
    #[arg(value_name = "KIND", required_unless_present = "files")]
    kind: Option<String>,
    /// The objects to delete (`TYPE/NAME` forms when KIND is one too).
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    /// Delete the objects in these manifests (files, directories or `-`) instead.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE|DIR|-",
        conflicts_with = "kind"
    )]
    files: Vec<PathBuf>,
    /// Also read the manifests in a directory's subdirectories.
    #[arg(short = 'R', long)]
    recursive: bool,
    #[command(flatten)]
    namespace: NamespaceArgs,
    /// Delete the objects of KIND whose labels match this selector.
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    selector: Option<String>,
    /// Wait until the objects are gone before returning (`--wait=false` to not wait).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1,
          default_missing_value = "true", value_name = "BOOL")]
    wait: bool,
    /// How long `--wait` waits (a duration: 30s, 2m).
    #[arg(long, default_value = "60s", value_parser = super::duration, value_name = "DURATION")]
    timeout: Duration,
    /// Treat objects that don't exist as deleted.
    #[arg(long)]
    ignore_not_found: bool,
    /// What happens to the objects' dependents.
    #[arg(long, value_enum, default_value = "background", value_name = "POLICY")]
    cascade: Cascade,
    /// Seconds the objects get to shut down (default: the object's own).
    #[arg(long, value_name = "SECONDS")]
    grace_period: Option<u32>,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// One object to delete.
struct Target {
    resource: Resource,
    namespace: Option<String>,
    name: String,
}

impl Target {
    fn label(&self) -> String {
        format!("{} {:?}", self.resource.type_name(), self.name)
    }
}

/// Runs `orq delete`.
pub async fn run(args: DeleteArgs) -> anyhow::Result<()> {
    let manifests = if args.files.is_empty() {
        Vec::new()
    } else {
        manifest::read(&args.files, args.recursive, "delete")?
    };
    let session = args.connect.connect().await?;
    let mut resources = session.resources().await?;
    let mut targets = Vec::new();
    for manifest in &manifests {
        let resource = super::apply::resolve(&session, &mut resources, manifest, false).await?;
        let namespace = if resource.namespaced {
            Some(super::apply::object_namespace(
                manifest,
                &args.namespace,
                &session,
            )?)
        } else {
            None
        };
        let name = manifest.object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        targets.push(Target {
            resource,
            namespace,
            name,
        });
    }
    if let Some(kind) = &args.kind {
        let namespace = session.namespace(&args.namespace);
        let mut pairs: Vec<(String, String)> = Vec::new();
        if kind.contains('/') {
            for arg in std::iter::once(kind).chain(&args.names) {
                let Some((k, n)) = arg.split_once('/') else {
                    bail!("{arg:?}: pass every object in TYPE/NAME form, or KIND NAME...");
                };
                pairs.push((k.to_owned(), n.to_owned()));
            }
        } else {
            pairs.extend(args.names.iter().map(|n| (kind.clone(), n.clone())));
        }
        if let Some(selector) = &args.selector {
            if kind.contains('/') || !args.names.is_empty() {
                bail!("pass either names or a --selector, not both");
            }
            let resource = resources.resolve(kind)?;
            let api = resource.api(&session.client, Some(&namespace));
            let listed = api
                .list(&ListParams::default().labels(selector))
                .await
                .map_err(|e| session.error(e))?;
            if listed.items.is_empty() {
                eprintln!("No resources found");
            }
            for object in listed.items {
                pairs.push((kind.clone(), object.metadata.name.unwrap_or_default()));
            }
        } else if pairs.is_empty() {
            bail!("name the objects to delete: orq delete {kind} NAME..., or pass --selector");
        }
        for (kind, name) in pairs {
            let resource = resources.resolve(&kind)?;
            let namespace = resource.namespaced.then(|| namespace.clone());
            targets.push(Target {
                resource,
                namespace,
                name,
            });
        }
    }
    let mut params = DeleteParams {
        grace_period_seconds: args.grace_period,
        ..DeleteParams::default()
    };
    params.propagation_policy = Some(match args.cascade {
        Cascade::Background => PropagationPolicy::Background,
        Cascade::Foreground => PropagationPolicy::Foreground,
        Cascade::Orphan => PropagationPolicy::Orphan,
    });
    let mut failed = 0;
    let mut deleted = Vec::new();
    for target in targets {
        let api = target
            .resource
            .api(&session.client, target.namespace.as_deref());
        match api.delete(&target.name, &params).await {
            Ok(either) => {
                let uid = either.left().and_then(|o| o.metadata.uid);
                println!("{} deleted", target.label());
                deleted.push((target, uid));
            }
            Err(e) if is_not_found(&e) && args.ignore_not_found => {}
            Err(e) => {
                failed += 1;
                eprintln!("error: {:#}", session.error(e));
            }
        }
    }
    if args.wait {
        for (target, uid) in &deleted {
            if let Err(error) = wait_gone(&session, target, uid.as_deref(), args.timeout).await {
                failed += 1;
                eprintln!("error: {error:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} object(s) could not be deleted");
    }
    Ok(())
}

/// Polls until the object (this `uid` of it, when known) no longer exists.
async fn wait_gone(
    session: &Session,
    target: &Target,
    uid: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api = target
        .resource
        .api(&session.client, target.namespace.as_deref());
    let start = Instant::now();
    let show_progress = std::io::stderr().is_terminal();
    let mut shown = false;
    loop {
        let current = api
            .get_opt(&target.name)
            .await
            .map_err(|e| session.error(e))?;
        let gone = match &current {
            None => true,
            Some(object) => uid.is_some() && object.metadata.uid.as_deref() != uid,
        };
        if gone {
            if shown {
                eprintln!();
            }
            return Ok(());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            if shown {
                eprintln!();
            }
            let finalizers = current
                .and_then(|o| o.metadata.finalizers)
                .filter(|f| !f.is_empty())
                .map(|f| format!(" (finalizers left: {})", f.join(", ")))
                .unwrap_or_default();
            return Err(anyhow!(
                "timed out after {}s waiting for {} to be deleted{finalizers}",
                timeout.as_secs(),
                target.label()
            ));
        }
        if show_progress && waited > Duration::from_secs(1) {
            eprint!(
                "\rwaiting for {} to be deleted ({}s)",
                target.label(),
                waited.as_secs()
            );
            shown = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
