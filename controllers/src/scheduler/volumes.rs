//! The scheduler's volume binding (kube-scheduler's `VolumeBinding` plugin, simplified to
//! what local volumes need): a pod's PersistentVolumeClaims decide where it may go, and the
//! claims that wait for their first consumer learn the node chosen for it.
//!
//! - A claim that does not exist, or is being deleted, makes the pod unschedulable anywhere.
//! - A bound claim's volume may pin the pod (its `nodeAffinity`: a local-path volume lives
//!   on one node).
//! - An unbound claim of a `WaitForFirstConsumer` class goes with the pod: once a node is
//!   chosen, the claim is annotated `volume.kubernetes.io/selected-node` before the pod is
//!   bound, and the provisioner makes its volume there; the node agent waits for the
//!   binding before it starts the pod.
//! - An unbound claim of any other class must be bound first ("unbound immediate
//!   PersistentVolumeClaims").

use k8s_openapi::api::core::v1::{
    Node, NodeSelector, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::storage::persistentvolume::{ANN_SELECTED_NODE, class_of};

/// The caches the volume checks read.
#[derive(Clone)]
pub struct VolumeStores {
    /// PersistentVolumeClaims.
    pub claims: Store<PersistentVolumeClaim>,
    /// PersistentVolumes.
    pub volumes: Store<PersistentVolume>,
    /// StorageClasses.
    pub classes: Store<StorageClass>,
}

impl std::fmt::Debug for VolumeStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeStores").finish_non_exhaustive()
    }
}

/// What a pod's claims ask of its node.
#[derive(Debug, Default)]
pub struct ClaimNeeds {
    /// The node affinity of each bound volume: the node must match all of them.
    affinities: Vec<NodeSelector>,
    /// `(namespace, name)` of the unbound claims waiting for their first consumer.
    waiting: Vec<(String, String)>,
}

/// The claims the pod's volumes name: `persistentVolumeClaim` ones, and the
/// `<pod>-<volume>` claim of each generic `ephemeral` volume.
pub fn claim_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .iter()
        .flat_map(|s| s.volumes.iter().flatten())
        .filter_map(|v| {
            if let Some(claim) = &v.persistent_volume_claim {
                Some(claim.claim_name.clone())
            } else {
                v.ephemeral
                    .as_ref()
                    .map(|_| format!("{}-{}", pod.name_any(), v.name))
            }
        })
        .collect()
}

/// The selector of the node named `name`.
fn on_node(name: &str) -> NodeSelector {
    serde_json::from_value(json!({"nodeSelectorTerms": [{"matchFields": [
        {"key": "metadata.name", "operator": "In", "values": [name]}
    ]}]}))
    .unwrap_or_default()
}

impl ClaimNeeds {
    /// What `pod`'s claims need; `Err` with kube-scheduler's reason when no node can do.
    pub fn of(pod: &Pod, stores: &VolumeStores) -> Result<ClaimNeeds, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let mut needs = ClaimNeeds::default();
        for name in claim_names(pod) {
            let Some(claim) = stores.claims.get(&ObjectRef::new(&name).within(&namespace)) else {
                return Err(format!("persistentvolumeclaim \"{name}\" not found"));
            };
            if claim.metadata.deletion_timestamp.is_some() {
                return Err(format!("persistentvolumeclaim \"{name}\" is being deleted"));
            }
            let bound = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.clone())
                .filter(|v| !v.is_empty());
            match bound {
                Some(volume) => {
                    let Some(pv) = stores.volumes.get(&ObjectRef::new(&volume)) else {
                        return Err(format!(
                            "persistentvolume \"{volume}\" of claim \"{name}\" not found"
                        ));
                    };
                    if let Some(required) = pv
                        .spec
                        .as_ref()
                        .and_then(|s| s.node_affinity.as_ref())
                        .and_then(|a| a.required.clone())
                    {
                        needs.affinities.push(required);
                    }
                }
                None => {
                    // A node already chosen for it (by an earlier attempt) holds.
                    if let Some(node) = claim.annotations().get(ANN_SELECTED_NODE) {
                        needs.affinities.push(on_node(node));
                    }
                    let waits = stores
                        .classes
                        .get(&ObjectRef::new(&class_of(&claim)))
                        .is_some_and(|c| {
                            c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer")
                        });
                    if !waits {
                        return Err("pod has unbound immediate PersistentVolumeClaims".into());
                    }
                    needs.waiting.push((namespace.clone(), name));
                }
            }
        }
        Ok(needs)
    }

    /// Whether `node` suits the bound volumes.
    pub fn allows(&self, node: &Node) -> bool {
        self.affinities
            .iter()
            .all(|selector| super::selector_matches(selector, node))
    }

    /// Tells the waiting claims the chosen `node`, before the pod is bound to it.
    pub async fn select(&self, client: &Client, node: &str) -> Result<(), kube::Error> {
        for (namespace, name) in &self.waiting {
            let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
            let patch = json!({"metadata": {"annotations": {ANN_SELECTED_NODE: node}}});
            api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
        }
        Ok(())
    }
}
