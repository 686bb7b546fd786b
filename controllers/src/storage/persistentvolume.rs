//! The PersistentVolume binder (`persistentvolume-binder`), as kube-controller-manager's:
//! it pairs each PersistentVolumeClaim with a PersistentVolume and keeps both phases true.
//!
//! A claim moves `Pending → Bound` (or `Lost` when its volume disappears):
//!
//! - naming a volume (`spec.volumeName`), it binds to it if the volume is free or already
//!   reserved for it (`claimRef`);
//! - otherwise it takes the smallest `Available` volume of its class that fits (access
//!   modes, volume mode, size, selector), preferring one pre-bound to it — what a
//!   provisioner creates;
//! - with none, a class with a provisioner is asked for one (the `storage-provisioner`
//!   annotation) — at once for `Immediate` classes, once the scheduler has picked a node
//!   (`volume.kubernetes.io/selected-node`) for `WaitForFirstConsumer` ones; a class that
//!   does not exist leaves the claim `Pending` with a `ProvisioningFailed` event saying so.
//!
//! A volume is `Available` while unclaimed, `Bound` to its claim, and `Released` once that
//! claim is gone; then its reclaim policy applies: `Retain` keeps it (an administrator's to
//! clean), `Delete` is its provisioner's job (the local-path volumes' node agent removes the
//! directory and the volume).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner, quantity};
use serde_json::json;

use crate::events::{self, EventType};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumes", "persistentvolumeclaims"],
        verbs: &["get", "list", "watch", "update", "patch"],
    },
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumes/status", "persistentvolumeclaims/status"],
        verbs: &["update", "patch"],
    },
    Rule {
        api_groups: &["storage.k8s.io"],
        resources: &["storageclasses"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "persistentvolume-binder";
/// On a claim: the binding is complete.
pub const ANN_BIND_COMPLETED: &str = "pv.kubernetes.io/bind-completed";
/// On a claim or volume: this controller made the binding (not the user).
pub const ANN_BOUND_BY_CONTROLLER: &str = "pv.kubernetes.io/bound-by-controller";
/// On a claim: the node the scheduler picked for its first consumer.
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
/// On a claim: which provisioner should make its volume.
pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
/// The same, under its older name (external provisioners read either).
pub const ANN_BETA_STORAGE_PROVISIONER: &str = "volume.beta.kubernetes.io/storage-provisioner";
/// On a volume: the provisioner that made it.
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
/// The provisioner name of classes whose volumes are made by hand.
pub const NO_PROVISIONER: &str = "kubernetes.io/no-provisioner";

/// What can go wrong binding (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum BinderError {
    /// A write to a claim or volume failed.
    #[error("{what}: {source}")]
    Write {
        /// What was being written.
        what: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the reconcilers share.
pub struct Controller {
    client: Client,
    volumes: Store<PersistentVolume>,
    claims: Store<PersistentVolumeClaim>,
    classes: Store<StorageClass>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PersistentVolumeBinder")
            .finish_non_exhaustive()
    }
}

/// Adds the binder to `manager`: one loop over claims (woken by their volumes and by
/// classes appearing), one over volumes (woken by their claims).
pub fn add(manager: &mut Manager) {
    let volumes = manager.cache::<PersistentVolume>(watcher::Config::default());
    let claims = manager.cache::<PersistentVolumeClaim>(watcher::Config::default());
    let classes = manager.cache::<StorageClass>(watcher::Config::default());
    let controller = Arc::new(Controller {
        client: manager.client(),
        volumes: volumes.store(),
        claims: claims.store(),
        classes: classes.store(),
    });
    let claim_of = |pv: Arc<PersistentVolume>| claim_ref_of(&pv);
    let all_claims = claims.store();
    let claims_of_class = move |class: Arc<StorageClass>| {
        let name = class.name_any();
        all_claims
            .state()
            .into_iter()
            .filter(|c| class_of(c) == name)
            .map(|c| ObjectRef::from_obj(&*c))
            .collect::<Vec<_>>()
    };
    let all_volumes = volumes.store();
    // A new or freed volume may fit any pending claim.
    let pending_claims = {
        let claims = claims.store();
        move |_: Arc<PersistentVolume>| {
            claims
                .state()
                .into_iter()
                .filter(|c| phase_of_claim(c) == "Pending")
                .map(|c| ObjectRef::from_obj(&*c))
                .collect::<Vec<_>>()
        }
    };
    let claim_runner = Runner::for_cache(MANAGER, &claims)
        .and_then(|r| r.watches(&volumes, claim_of))
        .and_then(|r| r.watches(&volumes, pending_claims))
        .and_then(|r| r.watches_deleted(&volumes, claim_of))
        .and_then(|r| r.watches(&classes, claims_of_class))
        .expect("the caches were just created, before run");
    manager.add(claim_runner, reconcile_claim, Arc::clone(&controller));
    let volume_of = move |claim: Arc<PersistentVolumeClaim>| {
        let mut refs: Vec<ObjectRef<PersistentVolume>> = all_volumes
            .state()
            .into_iter()
            .filter(|pv| {
                pv.spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .is_some_and(|r| {
                        r.name.as_deref() == Some(&claim.name_any())
                            && r.namespace == claim.namespace()
                    })
            })
            .map(|pv| ObjectRef::from_obj(&*pv))
            .collect();
        if let Some(name) = claim.spec.as_ref().and_then(|s| s.volume_name.clone()) {
            refs.push(ObjectRef::new(&name));
        }
        refs
    };
    let volume_runner = Runner::for_cache(format!("{MANAGER}-volumes"), &volumes)
        .and_then(|r| r.watches(&claims, volume_of.clone()))
        .and_then(|r| r.watches_deleted(&claims, volume_of))
        .expect("the caches were just created, before run");
    manager.add(volume_runner, reconcile_volume, controller);
}

fn claim_ref_of(pv: &PersistentVolume) -> Option<ObjectRef<PersistentVolumeClaim>> {
    let r = pv.spec.as_ref()?.claim_ref.as_ref()?;
    Some(ObjectRef::new(r.name.as_deref()?).within(r.namespace.as_deref()?))
}

/// The claim's class: `spec.storageClassName` ("" for none; the API server defaulted it
/// to the default class at creation when it was unset).
pub fn class_of(claim: &PersistentVolumeClaim) -> String {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
        .unwrap_or_default()
}

fn phase_of_claim(claim: &PersistentVolumeClaim) -> &str {
    claim
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn phase_of_volume(pv: &PersistentVolume) -> &str {
    pv.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// The storage a claim asks for, in bytes.
fn requested(claim: &PersistentVolumeClaim) -> i64 {
    claim
        .spec
        .as_ref()
        .and_then(|s| s.resources.as_ref())
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| quantity::bytes(&q.0))
        .unwrap_or(0)
}

fn capacity(pv: &PersistentVolume) -> i64 {
    pv.spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity::bytes(&q.0))
        .unwrap_or(0)
}

/// Whether `pv` is reserved for `claim` (its `claimRef` names it, with its UID or none).
fn reserved_for(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .is_some_and(|r| {
            r.name.as_deref() == Some(&claim.name_any())
                && r.namespace == claim.namespace()
                && (r.uid.is_none() || r.uid == claim.uid())
        })
}

/// Whether `pv` can serve `claim`: same class, its access modes and volume mode, at least
/// the size asked, the claim's selector matching its labels.
pub fn fits(pv: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let (Some(spec), Some(want)) = (pv.spec.as_ref(), claim.spec.as_ref()) else {
        return false;
    };
    let pv_class = spec.storage_class_name.clone().unwrap_or_default();
    if pv_class != class_of(claim) {
        return false;
    }
    let modes = spec.access_modes.clone().unwrap_or_default();
    if !want
        .access_modes
        .iter()
        .flatten()
        .all(|m| modes.contains(m))
    {
        return false;
    }
    let mode = |m: &Option<String>| m.clone().unwrap_or_else(|| "Filesystem".into());
    if mode(&spec.volume_mode) != mode(&want.volume_mode) {
        return false;
    }
    if let Some(selector) = &want.selector
        && !crate::labels::matches(selector, &pv.labels().clone())
    {
        return false;
    }
    capacity(pv) >= requested(claim)
}

async fn reconcile_claim(
    claim: Arc<PersistentVolumeClaim>,
    ctx: Arc<Controller>,
) -> Result<Action, BinderError> {
    if claim.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = claim.namespace().unwrap_or_default();
    let name = claim.name_any();
    let named = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|n| !n.is_empty());
    if let Some(volume) = named {
        return match ctx.volumes.get(&ObjectRef::new(&volume)) {
            Some(pv) if reserved_for(&pv, &claim) => {
                bind(&ctx, &pv, &claim).await?;
                Ok(Action::await_change())
            }
            Some(pv)
                if pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .is_none() =>
            {
                bind(&ctx, &pv, &claim).await?;
                Ok(Action::await_change())
            }
            Some(_) => {
                // Taken by another claim: this one cannot have it.
                set_claim_phase(&ctx, &claim, "Pending").await?;
                Ok(Action::await_change())
            }
            None if phase_of_claim(&claim) == "Bound" => {
                events::publish(
                    &ctx.client,
                    MANAGER,
                    &*claim,
                    EventType::Warning,
                    "ClaimLost",
                    "Bound claim has lost its PersistentVolume. Data on the volume is lost!",
                )
                .await;
                set_claim_phase(&ctx, &claim, "Lost").await?;
                Ok(Action::await_change())
            }
            None => {
                set_claim_phase(&ctx, &claim, "Pending").await?;
                Ok(Action::await_change())
            }
        };
    }
    // The smallest volume that fits, one reserved for this claim first.
    let mut candidates: Vec<Arc<PersistentVolume>> = ctx
        .volumes
        .state()
        .into_iter()
        .filter(|pv| pv.metadata.deletion_timestamp.is_none())
        .filter(|pv| {
            let free = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .is_none()
                && matches!(phase_of_volume(pv), "Available" | "Pending");
            (free || reserved_for(pv, &claim)) && fits(pv, &claim)
        })
        .collect();
    candidates.sort_by_key(|pv| (!reserved_for(pv, &claim), capacity(pv), pv.name_any()));
    if let Some(pv) = candidates.first() {
        bind(&ctx, pv, &claim).await?;
        return Ok(Action::await_change());
    }
    set_claim_phase(&ctx, &claim, "Pending").await?;
    let class_name = class_of(&claim);
    if class_name.is_empty() {
        return Ok(Action::await_change());
    }
    let Some(class) = ctx.classes.get(&ObjectRef::new(&class_name)) else {
        events::publish(
            &ctx.client,
            MANAGER,
            &*claim,
            EventType::Warning,
            "ProvisioningFailed",
            &format!("storageclass.storage.k8s.io \"{class_name}\" not found"),
        )
        .await;
        return Ok(Action::await_change());
    };
    if class.provisioner == NO_PROVISIONER {
        return Ok(Action::await_change());
    }
    let annotations = claim.annotations();
    let wait = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    if wait && !annotations.contains_key(ANN_SELECTED_NODE) {
        if claim.annotations().get(ANN_STORAGE_PROVISIONER).is_none() {
            events::publish(
                &ctx.client,
                MANAGER,
                &*claim,
                EventType::Normal,
                "WaitForFirstConsumer",
                "waiting for first consumer to be created before binding",
            )
            .await;
        }
        return Ok(Action::await_change());
    }
    if annotations.get(ANN_STORAGE_PROVISIONER) != Some(&class.provisioner) {
        let patch = json!({"metadata": {"annotations": {
            ANN_STORAGE_PROVISIONER: class.provisioner,
            ANN_BETA_STORAGE_PROVISIONER: class.provisioner,
        }}});
        let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|source| BinderError::Write {
                what: format!("annotating persistentvolumeclaim {namespace}/{name}"),
                source,
            })?;
        events::publish(
            &ctx.client,
            MANAGER,
            &*claim,
            EventType::Normal,
            "ExternalProvisioning",
            &format!(
                "Waiting for a volume to be created either by the external provisioner '{}' or manually by the system administrator. If volume creation is delayed, please verify that the provisioner is running and correctly registered.",
                class.provisioner
            ),
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Binds `pv` and `claim` to each other: the volume's `claimRef` (and phase `Bound`), then
/// the claim's `volumeName`, annotations and status. Each step is idempotent, so a binding
/// cut short is finished by the next reconcile.
async fn bind(
    ctx: &Controller,
    pv: &PersistentVolume,
    claim: &PersistentVolumeClaim,
) -> Result<(), BinderError> {
    let namespace = claim.namespace().unwrap_or_default();
    let name = claim.name_any();
    let pv_name = pv.name_any();
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PatchParams::default();
    let write = |what: String| move |source| BinderError::Write { what, source };
    let claim_ref = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolumeClaim".into()),
        namespace: Some(namespace.clone()),
        name: Some(name.clone()),
        uid: claim.uid(),
        resource_version: claim.resource_version(),
        ..ObjectReference::default()
    };
    let current = pv.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
    if current.map(|r| (&r.uid, &r.name)) != Some((&claim_ref.uid, &claim_ref.name)) {
        let mut patch = json!({"spec": {"claimRef": claim_ref}});
        if current.is_none() {
            patch["metadata"] = json!({"annotations": {ANN_BOUND_BY_CONTROLLER: "yes"}});
        }
        volumes
            .patch(&pv_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(write(format!("binding persistentvolume {pv_name}")))?;
    }
    if phase_of_volume(pv) != "Bound" {
        volumes
            .patch_status(
                &pv_name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": {"phase": "Bound"}})),
            )
            .await
            .map_err(write(format!("persistentvolume {pv_name} status")))?;
    }
    let annotations = claim.annotations();
    let named = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if named != Some(&pv_name) || !annotations.contains_key(ANN_BIND_COMPLETED) {
        let mut meta: BTreeMap<&str, &str> = BTreeMap::from([(ANN_BIND_COMPLETED, "yes")]);
        if named.is_none() {
            meta.insert(ANN_BOUND_BY_CONTROLLER, "yes");
        }
        let patch = json!({
            "metadata": {"annotations": meta},
            "spec": {"volumeName": pv_name},
        });
        claims
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(write(format!(
                "binding persistentvolumeclaim {namespace}/{name}"
            )))?;
    }
    let spec = pv.spec.clone().unwrap_or_default();
    let status = json!({
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "status": {
            "phase": "Bound",
            "accessModes": spec.access_modes,
            "capacity": spec.capacity,
        },
    });
    if phase_of_claim(claim) != "Bound" {
        claims
            .patch_status(&name, &params, &Patch::Merge(&status))
            .await
            .map_err(write(format!(
                "persistentvolumeclaim {namespace}/{name} status"
            )))?;
    }
    Ok(())
}

async fn set_claim_phase(
    ctx: &Controller,
    claim: &PersistentVolumeClaim,
    phase: &str,
) -> Result<(), BinderError> {
    if claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some(phase) {
        return Ok(());
    }
    let namespace = claim.namespace().unwrap_or_default();
    let name = claim.name_any();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &namespace);
    claims
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {"phase": phase}})),
        )
        .await
        .map(drop)
        .or_else(|e| match e {
            kube::Error::Api(s) if s.code == 404 => Ok(()),
            source => Err(BinderError::Write {
                what: format!("persistentvolumeclaim {namespace}/{name} status"),
                source,
            }),
        })
}

async fn reconcile_volume(
    pv: Arc<PersistentVolume>,
    ctx: Arc<Controller>,
) -> Result<Action, BinderError> {
    if pv.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let phase = match claim_ref_of(&pv) {
        None => "Available",
        Some(claim_ref) => {
            let uid = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.clone());
            match ctx.claims.get(&claim_ref) {
                // Reserved for a claim that is still to come or to bind: unchanged.
                Some(claim) if uid.is_none() || uid == claim.uid() => {
                    let bound = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref())
                        == Some(&pv.name_any());
                    if bound { "Bound" } else { phase_of_volume(&pv) }
                }
                None if uid.is_none() => phase_of_volume(&pv),
                // Its claim is gone (or was replaced by a namesake).
                _ => "Released",
            }
        }
    };
    let phase = if phase == "Pending" {
        "Available"
    } else {
        phase
    };
    if phase_of_volume(&pv) == phase {
        return Ok(Action::await_change());
    }
    let name = pv.name_any();
    let volumes: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let mut status = json!({"phase": phase});
    if phase == "Released" {
        status["lastPhaseTransitionTime"] = json!(
            jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string()
        );
    }
    volumes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": status})),
        )
        .await
        .map_err(|source| BinderError::Write {
            what: format!("persistentvolume {name} status"),
            source,
        })?;
    if phase == "Released" {
        let policy = pv
            .spec
            .as_ref()
            .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
            .unwrap_or("Retain");
        tracing::info!(volume = %name, policy, "persistent volume released");
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pv(value: serde_json::Value) -> PersistentVolume {
        serde_json::from_value(value).unwrap()
    }

    fn claim(value: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn volumes_fit_claims_by_class_modes_size_and_selector() {
        let volume = pv(json!({
            "metadata": {"name": "pv1", "labels": {"tier": "fast"}},
            "spec": {"storageClassName": "manual", "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
                     "capacity": {"storage": "2Gi"}, "hostPath": {"path": "/x"}},
        }));
        let want =
            |spec: serde_json::Value| claim(json!({"metadata": {"name": "c"}, "spec": spec}));
        assert!(fits(
            &volume,
            &want(json!({"storageClassName": "manual",
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}))
        ));
        assert!(!fits(
            &volume,
            &want(json!({"storageClassName": "other",
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}))
        ));
        assert!(!fits(
            &volume,
            &want(json!({"storageClassName": "manual",
            "accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}}))
        ));
        assert!(!fits(
            &volume,
            &want(json!({"storageClassName": "manual",
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "3Gi"}}}))
        ));
        assert!(!fits(
            &volume,
            &want(json!({"storageClassName": "manual", "volumeMode": "Block",
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}))
        ));
        assert!(fits(
            &volume,
            &want(json!({"storageClassName": "manual",
            "selector": {"matchLabels": {"tier": "fast"}},
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}))
        ));
        assert!(!fits(
            &volume,
            &want(json!({"storageClassName": "manual",
            "selector": {"matchLabels": {"tier": "slow"}},
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}))
        ));
    }
}
