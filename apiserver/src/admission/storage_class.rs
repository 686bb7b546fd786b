//! The DefaultStorageClass admission plugin: a new PersistentVolumeClaim that names no
//! class (`storageClassName` unset — an explicit `""` means "no class" and stays) gets the
//! cluster's default, the StorageClass annotated
//! `storageclass.kubernetes.io/is-default-class: "true"` (the newest, when several are).

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;

/// The annotation marking the default class.
pub const IS_DEFAULT: &str = "storageclass.kubernetes.io/is-default-class";

/// Admits a new object of `def` (only claims are touched).
pub async fn admit(engine: &Engine, def: &ResourceDef, claim: &mut Value) -> Result<(), ApiError> {
    if !(def.group.is_empty() && def.plural == "persistentvolumeclaims") {
        return Ok(());
    }
    if claim
        .pointer("/spec/storageClassName")
        .is_some_and(|v| !v.is_null())
    {
        return Ok(());
    }
    let classes = crate::quota::list(engine, "storage.k8s.io", "storageclasses", None).await?;
    let default = classes
        .iter()
        .filter(|c| {
            matches!(
                c.pointer(&format!(
                    "/metadata/annotations/{}",
                    IS_DEFAULT.replace('/', "~1")
                ))
                .and_then(Value::as_str),
                Some("true")
            )
        })
        .max_by(|a, b| {
            let created = |c: &Value| {
                c.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            created(a).cmp(&created(b)).then_with(|| {
                b["metadata"]["name"]
                    .as_str()
                    .cmp(&a["metadata"]["name"].as_str())
            })
        });
    if let Some(name) = default
        .and_then(|c| c.pointer("/metadata/name"))
        .and_then(Value::as_str)
    {
        if !claim["spec"].is_object() {
            claim["spec"] = json!({});
        }
        claim["spec"]["storageClassName"] = json!(name);
    }
    Ok(())
}
