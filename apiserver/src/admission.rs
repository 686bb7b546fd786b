//! Kind-specific steps, kept small and named so the engine stays generic.

use serde_json::{Value, json};

use crate::registry::ResourceDef;

/// Defaults applied to a new object before validation.
pub fn default_on_create(def: &ResourceDef, object: &mut Value) {
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Namespace") => namespace_defaults(object),
        ("apps", "Deployment") => deployment_defaults(object),
        _ => {}
    }
    on_write(def, object);
}

/// Steps for every write (create and update).
pub fn on_write(def: &ResourceDef, object: &mut Value) {
    if def.group.is_empty() && def.kind == "Secret" {
        secret_string_data(object);
    }
}

/// `stringData` is write-only convenience: merged into `data` (base64) and dropped.
fn secret_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(string_data) = object.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let Some(entries) = string_data.as_object() else {
        return;
    };
    if !object["data"].is_object() {
        object["data"] = json!({});
    }
    for (key, value) in entries {
        let text = value.as_str().unwrap_or_default();
        object["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

/// A namespace is `Active` and carries the `kubernetes` finalizer (the namespace
/// controller empties it before it goes).
fn namespace_defaults(object: &mut Value) {
    if object.pointer("/spec/finalizers").is_none() {
        object["spec"] = json!({"finalizers": ["kubernetes"]});
    }
    object["status"] = json!({"phase": "Active"});
}

/// What Helm and `kubectl rollout` dereference without checking: replicas, the rolling
/// update strategy, revision history and progress deadline.
fn deployment_defaults(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("replicas").or_insert(json!(1));
    spec.entry("revisionHistoryLimit").or_insert(json!(10));
    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
    let strategy = spec.entry("strategy").or_insert_with(|| json!({}));
    if let Some(strategy) = strategy.as_object_mut() {
        let kind = strategy
            .entry("type")
            .or_insert(json!("RollingUpdate"))
            .clone();
        if kind == "RollingUpdate" {
            strategy
                .entry("rollingUpdate")
                .or_insert_with(|| json!({"maxUnavailable": "25%", "maxSurge": "25%"}));
        }
    }
}
