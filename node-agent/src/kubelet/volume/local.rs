//! This node's side of the built-in local-path provisioner: the node advertises where its
//! local-path volumes live (the [`ANN_ROOT`] annotation on its Node, `<data dir>/storage`),
//! and reclaims the ones it holds — a volume labelled [`LABEL_NODE`] with this node's name
//! that is `Released` with reclaim policy `Delete` has its directory removed, then the
//! volume itself. `Retain` keeps both, as the administrator's to clean. (The provisioning
//! is the server's: `orquestra_controllers::storage::localpath`.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::{Api, DeleteParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};

/// On the Node: the directory its local-path volumes live under (the provisioner reads it).
pub const ANN_ROOT: &str = "orquestra.io/local-path-root";
/// On a local-path PersistentVolume: the node holding its directory.
pub const LABEL_NODE: &str = "orquestra.io/local-path-node";
/// The provisioner's name, on the volumes it made (`pv.kubernetes.io/provisioned-by`).
pub const PROVISIONER: &str = "orquestra.io/local-path";

/// The node's local-path root under the agent's data dir.
pub fn root(data_dir: &Path) -> PathBuf {
    data_dir.join("storage")
}

/// Watches this node's local-path volumes and reclaims the released ones, until dropped.
pub async fn reclaim(client: Client, node: String, root: PathBuf) {
    let api: Api<PersistentVolume> = Api::all(client.clone());
    let config = watcher::Config::default().labels(&format!("{LABEL_NODE}={node}"));
    let mut events = watcher::watcher(api.clone(), config).boxed();
    loop {
        match events.next().await {
            Some(Ok(watcher::Event::Apply(pv) | watcher::Event::InitApply(pv))) => {
                if let Err(e) = reclaim_one(&api, &pv, &root).await {
                    tracing::warn!(volume = %pv.name_any(), error = %e, "reclaiming a local-path volume");
                }
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "watching local-path volumes");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            None => return,
        }
    }
}

/// Removes a released `Delete` volume's directory (only ever one under `root`), then the
/// volume.
async fn reclaim_one(
    api: &Api<PersistentVolume>,
    pv: &PersistentVolume,
    root: &Path,
) -> Result<(), String> {
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let spec = pv.spec.clone().unwrap_or_default();
    let delete = spec.persistent_volume_reclaim_policy.as_deref() == Some("Delete");
    let ours = pv
        .annotations()
        .get("pv.kubernetes.io/provisioned-by")
        .map(String::as_str)
        == Some(PROVISIONER);
    if !released || !delete || !ours || pv.metadata.deletion_timestamp.is_some() {
        return Ok(());
    }
    if let Some(host) = &spec.host_path {
        let path = PathBuf::from(&host.path);
        // Never outside the root this node advertised, whatever the volume says.
        if path.parent() == Some(root) && path.starts_with(root) {
            match std::fs::remove_dir_all(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("removing {}: {e}", path.display()));
                }
                _ => {}
            }
        } else {
            return Err(format!(
                "{} is not under this node's local-path root {}",
                path.display(),
                root.display()
            ));
        }
    }
    match api.delete(&pv.name_any(), &DeleteParams::default()).await {
        Ok(_) => {
            tracing::info!(volume = %pv.name_any(), "local-path volume reclaimed");
            Ok(())
        }
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(format!("deleting the volume: {e}")),
    }
}
