//! The ServiceAccount admission plugin's token volume: a new pod that automounts its service
//! account's token (`spec.automountServiceAccountToken`, else its ServiceAccount's, else
//! yes) gets a projected volume `kube-api-access-XXXXX` — a bound token (3607 s, renewed by
//! the node), the cluster CA from the `kube-root-ca.crt` ConfigMap and the namespace — mounted
//! read-only at `/var/run/secrets/kubernetes.io/serviceaccount` in every container and init
//! container that does not mount something there already. Clients (and the conformance suite)
//! see the mount in the pod's spec, as on any Kubernetes.

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;
use crate::request::Target;

/// Where in-cluster clients look for the token, CA and namespace.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The projected token's lifetime, as kube-apiserver asks for it (an hour and 7 s, so that
/// the 7 s tell it apart from tokens users ask for).
const EXPIRATION_SECONDS: i64 = 3607;

/// Admits a new pod of `def`: adds the token volume and mounts when it automounts.
pub async fn admit(engine: &Engine, def: &ResourceDef, pod: &mut Value) -> Result<(), ApiError> {
    if !(def.group.is_empty() && def.plural == "pods") {
        return Ok(());
    }
    if !automounts(engine, pod).await? {
        return Ok(());
    }
    let containers = ["containers", "initContainers"];
    let mounted_already = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["mountPath"] == MOUNT_PATH))
    };
    let wanting: usize = containers
        .iter()
        .filter_map(|field| pod["spec"][field].as_array())
        .flatten()
        .filter(|c| !mounted_already(c))
        .count();
    if wanting == 0 {
        return Ok(());
    }
    let name = format!("kube-api-access-{}", suffix());
    let volume = json!({"name": name, "projected": {"defaultMode": 420, "sources": [
        {"serviceAccountToken": {"expirationSeconds": EXPIRATION_SECONDS, "path": "token"}},
        {"configMap": {"name": "kube-root-ca.crt",
            "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"downwardAPI": {"items": [{"path": "namespace",
            "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
    ]}});
    let spec = &mut pod["spec"];
    match spec["volumes"].as_array_mut() {
        Some(volumes) => volumes.push(volume),
        None => spec["volumes"] = json!([volume]),
    }
    for field in containers {
        // `get_mut`, not indexing: `spec[field]` would add a null `initContainers`.
        let listed = spec.get_mut(field).and_then(Value::as_array_mut);
        for container in listed.into_iter().flatten() {
            if mounted_already(container) {
                continue;
            }
            let mount = json!({"name": name, "readOnly": true, "mountPath": MOUNT_PATH});
            match container["volumeMounts"].as_array_mut() {
                Some(mounts) => mounts.push(mount),
                None => container["volumeMounts"] = json!([mount]),
            }
        }
    }
    Ok(())
}

/// Whether the pod gets its token: its own `automountServiceAccountToken`, else its
/// ServiceAccount's, else yes. (A ServiceAccount that does not exist yet does not stop the
/// pod here; the node waits for it.)
async fn automounts(engine: &Engine, pod: &Value) -> Result<bool, ApiError> {
    if let Some(set) = pod["spec"]["automountServiceAccountToken"].as_bool() {
        return Ok(set);
    }
    let (Some(namespace), Some(account)) = (
        pod["metadata"]["namespace"].as_str(),
        pod["spec"]["serviceAccountName"].as_str(),
    ) else {
        return Ok(true);
    };
    let Some(def) = engine.registry.get("", "v1", "serviceaccounts") else {
        return Ok(true);
    };
    let target = Target {
        def,
        namespace: Some(namespace.to_owned()),
        name: Some(account.to_owned()),
        subresource: None,
    };
    match engine.get(&target).await {
        Ok(account) => Ok(account["automountServiceAccountToken"]
            .as_bool()
            .unwrap_or(true)),
        Err(ApiError::NotFound { .. }) => Ok(true),
        Err(e) => Err(e),
    }
}

/// Five characters of a generated name's alphabet (kube's `utilrand.String(5)`).
fn suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect()
}
