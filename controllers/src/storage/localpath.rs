//! The built-in local-path provisioner (`local-path-provisioner`), as k3s ships one: a
//! claim of the `local-path` StorageClass (the cluster's default) gets a PersistentVolume
//! that is a directory on the node its first pod was scheduled to.
//!
//! The class binds `WaitForFirstConsumer`, so the scheduler picks the node first
//! (`volume.kubernetes.io/selected-node`); this loop then creates `pvc-<claim UID>`: a
//! `hostPath` (`DirectoryOrCreate`) under the node's local-path root — the directory the
//! node agent advertises in its Node's [`ANN_ROOT`] annotation, else [`DEFAULT_ROOT`] —
//! pinned to that node by node affinity, labelled [`LABEL_NODE`], pre-bound to the claim
//! (the binder completes the binding). The node agent creates the directory when a pod
//! mounts it, and removes it (and the volume) once the volume is `Released` with reclaim
//! policy `Delete`; `Retain` keeps both.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{self, EventType};
use crate::storage::persistentvolume::{
    ANN_PROVISIONED_BY, ANN_SELECTED_NODE, ANN_STORAGE_PROVISIONER, class_of,
};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumeclaims", "nodes"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumes"],
        verbs: &["get", "list", "watch", "create"],
    },
    Rule {
        api_groups: &["storage.k8s.io"],
        resources: &["storageclasses"],
        verbs: &["get", "list", "watch", "create"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The provisioner's name (a StorageClass's `provisioner`).
pub const PROVISIONER: &str = "orquestra.io/local-path";
/// The StorageClass the server creates for it, the cluster's default (k3s' name).
pub const CLASS: &str = "local-path";
/// On a Node: the directory its local-path volumes live under.
pub const ANN_ROOT: &str = "orquestra.io/local-path-root";
/// On a local-path PersistentVolume: the node holding its directory.
pub const LABEL_NODE: &str = "orquestra.io/local-path-node";
/// The root of a node that advertises none.
pub const DEFAULT_ROOT: &str = "/var/lib/orquestra/storage";
/// The field manager of the loop's writes.
pub const MANAGER: &str = "local-path-provisioner";

/// The StorageClass the server creates at start (unless one of that name exists): the
/// default class, binding when the first pod is scheduled, deleting the data with the claim.
pub fn storage_class() -> StorageClass {
    serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": CLASS, "annotations": {
            "storageclass.kubernetes.io/is-default-class": "true",
        }},
        "provisioner": PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    }))
    .unwrap_or_default()
}

/// What can go wrong provisioning (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// Creating the volume failed.
    #[error("creating persistentvolume {name}: {source}")]
    Create {
        /// The volume.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    volumes: Store<PersistentVolume>,
    classes: Store<StorageClass>,
    nodes: Store<Node>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPathProvisioner")
            .finish_non_exhaustive()
    }
}

/// Adds the provisioner to `manager`: it reconciles claims; at start it creates the
/// [`storage_class`] if no class of that name exists (as k3s applies its manifest at start:
/// a user's deletion or change holds until the next start).
pub fn add(manager: &mut Manager) {
    let client = manager.client();
    manager.add_source(move |shutdown| {
        Box::pin(async move {
            let api: Api<StorageClass> = Api::all(client);
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..PostParams::default()
            };
            let ensure = async {
                loop {
                    match api.create(&params, &storage_class()).await {
                        Ok(_) => tracing::info!(class = CLASS, "created the default StorageClass"),
                        Err(kube::Error::Api(s)) if s.code == 409 => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "creating the local-path StorageClass");
                            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                            continue;
                        }
                    }
                    break;
                }
            };
            tokio::select! {
                () = ensure => {}
                () = shutdown => {}
            }
        })
    });
    let claims = manager.cache::<PersistentVolumeClaim>(watcher::Config::default());
    let volumes = manager.cache::<PersistentVolume>(watcher::Config::default());
    let classes = manager.cache::<StorageClass>(watcher::Config::default());
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let runner = Runner::for_cache(MANAGER, &claims)
        .and_then(|r| {
            r.watches_deleted(&volumes, |pv: Arc<PersistentVolume>| {
                let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
                Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
            })
        })
        .expect("the caches were just created, before run");
    manager.add(
        runner,
        reconcile,
        Arc::new(Controller {
            client: manager.client(),
            volumes: volumes.store(),
            classes: classes.store(),
            nodes: nodes.store(),
        }),
    );
}

/// The name of the volume provisioned for the claim with `uid`.
pub fn volume_name(uid: &str) -> String {
    format!("pvc-{uid}")
}

async fn reconcile(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Controller>,
) -> Result<Action, ProvisionError> {
    let annotations = claim.annotations();
    let ours = annotations.get(ANN_STORAGE_PROVISIONER).map(String::as_str) == Some(PROVISIONER);
    let bound = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_some_and(|v| !v.is_empty());
    if !ours || bound || claim.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let uid = claim.uid().unwrap_or_default();
    let name = volume_name(&uid);
    if ctx.volumes.get(&ObjectRef::new(&name)).is_some() {
        return Ok(Action::await_change());
    }
    let Some(node) = annotations.get(ANN_SELECTED_NODE).cloned() else {
        fail(
            &ctx,
            &claim,
            "configuration error, no node was specified: local-path volumes bind when their first pod is scheduled (volumeBindingMode: WaitForFirstConsumer)",
        )
        .await;
        return Ok(Action::await_change());
    };
    let spec = claim.spec.clone().unwrap_or_default();
    let modes = spec.access_modes.clone().unwrap_or_default();
    if let Some(mode) = modes
        .iter()
        .find(|m| !matches!(m.as_str(), "ReadWriteOnce" | "ReadWriteOncePod"))
    {
        fail(
            &ctx,
            &claim,
            &format!("local-path volumes are ReadWriteOnce or ReadWriteOncePod, not {mode}"),
        )
        .await;
        return Ok(Action::await_change());
    }
    if spec.volume_mode.as_deref() == Some("Block") {
        fail(
            &ctx,
            &claim,
            "local-path volumes are file systems, not block devices",
        )
        .await;
        return Ok(Action::await_change());
    }
    let class_name = class_of(&claim);
    let policy = ctx
        .classes
        .get(&ObjectRef::new(&class_name))
        .and_then(|c| c.reclaim_policy.clone())
        .unwrap_or_else(|| "Delete".into());
    let root = ctx
        .nodes
        .get(&ObjectRef::new(&node))
        .and_then(|n| n.annotations().get(ANN_ROOT).cloned())
        .unwrap_or_else(|| DEFAULT_ROOT.into());
    let namespace = claim.namespace().unwrap_or_default();
    let path = format!(
        "{}/{name}_{namespace}_{}",
        root.trim_end_matches('/'),
        claim.name_any()
    );
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .map(|q| q.0.clone())
        .unwrap_or_else(|| "1Gi".into());
    let volume: PersistentVolume = match serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "labels": {LABEL_NODE: node},
            "annotations": {ANN_PROVISIONED_BY: PROVISIONER, ANN_SELECTED_NODE: node},
        },
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": modes,
            "volumeMode": "Filesystem",
            "persistentVolumeReclaimPolicy": policy,
            "storageClassName": class_name,
            "hostPath": {"path": path, "type": "DirectoryOrCreate"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]},
            ]}]}},
            "claimRef": {
                "apiVersion": "v1", "kind": "PersistentVolumeClaim",
                "namespace": namespace, "name": claim.name_any(), "uid": uid,
            },
        },
    })) {
        Ok(v) => v,
        Err(e) => {
            fail(&ctx, &claim, &format!("building the volume: {e}")).await;
            return Ok(Action::await_change());
        }
    };
    let api: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    match api.create(&params, &volume).await {
        Ok(_) => {
            events::publish(
                &ctx.client,
                MANAGER,
                &*claim,
                EventType::Normal,
                "ProvisioningSucceeded",
                &format!("Successfully provisioned volume {name} on node {node} at {path}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Action::await_change()),
        Err(source) => Err(ProvisionError::Create { name, source }),
    }
}

async fn fail(ctx: &Controller, claim: &PersistentVolumeClaim, message: &str) {
    events::publish(
        &ctx.client,
        MANAGER,
        claim,
        EventType::Warning,
        "ProvisioningFailed",
        message,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The node agent advertises and reclaims under the same names the provisioner uses.
    #[test]
    fn the_node_agent_speaks_the_same_names() {
        use orquestra_node_agent::volume::local;
        assert_eq!(local::ANN_ROOT, ANN_ROOT);
        assert_eq!(local::LABEL_NODE, LABEL_NODE);
        assert_eq!(local::PROVISIONER, PROVISIONER);
        let class = storage_class();
        assert_eq!(class.provisioner, PROVISIONER);
        assert_eq!(
            class.volume_binding_mode.as_deref(),
            Some("WaitForFirstConsumer")
        );
    }
}
