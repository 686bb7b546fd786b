//! `orq apply -f`: server-side apply of every object in the manifests, under the field
//! manager `orq`, reporting each as `created`, `configured` or `unchanged` as kubectl's
//! client-side apply does (told apart by the object's resourceVersion before and after).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use clap::Args;
use kube::api::{Patch, PatchParams, ValidationDirective};
use serde_json::Value;

use super::manifest::{self, Manifest};
use super::{ConnectArgs, NamespaceArgs, Resource, Resources, Session};

/// `orq apply` flags.
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A manifest file, a directory of them (`.yaml`, `.yml`, `.json`) or `-` for stdin;
    /// repeatable. A file may hold several YAML documents or a `kind: List`.
    #[arg(
        short = 'f',
        long = "filename",
        required = true,
        value_name = "FILE|DIR|-"
    )]
    files: Vec<PathBuf>,
    /// Also read the manifests in a directory's subdirectories.
    #[arg(short = 'R', long)]
    recursive: bool,
    #[command(flatten)]
    namespace: NamespaceArgs,
    /// Take over fields another field manager owns instead of failing with a conflict.
    #[arg(long)]
    force_conflicts: bool,
    /// The field manager the applied fields are recorded under.
    #[arg(long, default_value = "orq", value_name = "NAME")]
    field_manager: String,
    /// Have the server validate, default and merge the objects without storing them.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// The namespace an object goes to: its own, else the flag's, else the context's; a flag
/// that disagrees with the object's own is an error, as in kubectl.
pub fn object_namespace(
    manifest: &Manifest,
    flag: &NamespaceArgs,
    session: &Session,
) -> anyhow::Result<String> {
    let own = manifest
        .object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty());
    match (own, &flag.namespace) {
        (Some(own), Some(flag)) if own != flag => bail!(
            "{}: the namespace from the provided object {own:?} does not match the namespace \
             {flag:?}: pass --namespace={own} or remove the flag",
            manifest.origin()
        ),
        (Some(own), _) => Ok(own.to_owned()),
        (None, _) => Ok(session.namespace(flag)),
    }
}

/// The type a manifest names. A miss is retried with fresh discovery for a while when a
/// CRD was applied earlier in the same run (its kinds appear once it is established).
pub async fn resolve(
    session: &Session,
    resources: &mut Resources,
    manifest: &Manifest,
    wait_for_new_kinds: bool,
) -> anyhow::Result<Resource> {
    let api_version = manifest.object["apiVersion"].as_str().unwrap_or_default();
    let kind = manifest.object["kind"].as_str().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(resource) = resources.for_manifest(api_version, kind) {
            return Ok(resource);
        }
        if !wait_for_new_kinds || Instant::now() > deadline {
            bail!(
                "{}: no matches for kind {kind:?} in version {api_version:?}: the server \
                 doesn't serve it (install its CustomResourceDefinition first)",
                manifest.origin()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        *resources = session.resources().await?;
    }
}

/// Runs `orq apply`.
pub async fn run(args: ApplyArgs) -> anyhow::Result<()> {
    let manifests = manifest::read(&args.files, args.recursive, "apply")?;
    if manifests.is_empty() {
        bail!("no objects passed to apply");
    }
    let session = args.connect.connect().await?;
    let mut resources = session.resources().await?;
    let mut params = PatchParams::apply(&args.field_manager);
    params.force = args.force_conflicts;
    params.dry_run = args.dry_run;
    params.field_validation = Some(ValidationDirective::Strict);
    let mut failed = 0;
    let mut crd_applied = false;
    for manifest in &manifests {
        match apply_one(
            &session,
            &mut resources,
            manifest,
            &args,
            &params,
            crd_applied,
        )
        .await
        {
            Ok((resource, line)) => {
                crd_applied |= resource.api.kind == "CustomResourceDefinition";
                println!("{line}");
            }
            Err(error) => {
                failed += 1;
                eprintln!("error: {error:#}");
            }
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} objects could not be applied",
            manifests.len()
        );
    }
    Ok(())
}

async fn apply_one(
    session: &Session,
    resources: &mut Resources,
    manifest: &Manifest,
    args: &ApplyArgs,
    params: &PatchParams,
    wait_for_new_kinds: bool,
) -> anyhow::Result<(Resource, String)> {
    let resource = resolve(session, resources, manifest, wait_for_new_kinds).await?;
    let mut object = manifest.object.clone();
    let namespace = if resource.namespaced {
        let namespace = object_namespace(manifest, &args.namespace, session)?;
        object["metadata"]["namespace"] = Value::String(namespace.clone());
        Some(namespace)
    } else {
        None
    };
    let name = object["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let api = resource.api(&session.client, namespace.as_deref());
    let before = api
        .get_opt(&name)
        .await
        .map_err(|e| session.error(e))?
        .and_then(|o| o.metadata.resource_version);
    let after = api
        .patch(&name, params, &Patch::Apply(&object))
        .await
        .map_err(|error| {
            let conflict = matches!(&error, kube::Error::Api(s) if s.code == 409);
            let error = session.error(error);
            if conflict {
                anyhow!(
                    "{}: {error:#}\nthe fields above are owned by other managers: change them \
                     in the manifest to match, or pass --force-conflicts to take them over",
                    manifest.origin()
                )
            } else {
                anyhow!("{}: {error:#}", manifest.origin())
            }
        })?;
    let verb = match before {
        None => "created",
        Some(before) if Some(&before) == after.metadata.resource_version.as_ref() => "unchanged",
        Some(_) => "configured",
    };
    let dry = if args.dry_run {
        " (server dry run)"
    } else {
        ""
    };
    let line = format!("{}/{name} {verb}{dry}", resource.type_name());
    Ok((resource, line))
}
