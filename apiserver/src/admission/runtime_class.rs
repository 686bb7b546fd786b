//! The RuntimeClass admission plugin: a new pod naming a `runtimeClassName` must name one
//! that exists, and gets its class's pod overhead (`spec.overhead`) and scheduling
//! constraints (node selector, tolerations) — what the scheduler and quotas then count.

use serde_json::{Map, Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;
use crate::request::Target;

/// Admits a new pod of `def` (nothing to do for other kinds or pods naming no class).
pub async fn admit(engine: &Engine, def: &ResourceDef, pod: &mut Value) -> Result<(), ApiError> {
    if !(def.group.is_empty() && def.plural == "pods") {
        return Ok(());
    }
    let Some(class_name) = pod
        .pointer("/spec/runtimeClassName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned)
    else {
        return Ok(());
    };
    let Some(classes) = crate::quota::served(engine, "node.k8s.io", "runtimeclasses") else {
        return Ok(());
    };
    let target = Target {
        def: classes,
        namespace: None,
        name: Some(class_name.clone()),
        subresource: None,
    };
    let class = match engine.get(&target).await {
        Ok(class) => class,
        Err(ApiError::NotFound { .. }) => {
            return Err(rejected(
                pod,
                format!("RuntimeClass \"{class_name}\" not found"),
            ));
        }
        Err(e) => return Err(e),
    };
    if let Some(fixed) = class.pointer("/overhead/podFixed").filter(|o| !o.is_null()) {
        match pod.pointer("/spec/overhead") {
            Some(given) if !given.is_null() && !same_quantities(given, fixed) => {
                return Err(rejected(
                    pod,
                    "Pod's Overhead doesn't match RuntimeClass's defined Overhead".into(),
                ));
            }
            _ => pod["spec"]["overhead"] = fixed.clone(),
        }
    }
    if let Some(scheduling) = class.get("scheduling").filter(|s| !s.is_null()) {
        if let Some(selector) = scheduling["nodeSelector"].as_object() {
            let mut merged: Map<String, Value> = pod["spec"]["nodeSelector"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            for (key, value) in selector {
                match merged.get(key) {
                    Some(have) if have != value => {
                        return Err(rejected(
                            pod,
                            "conflict: runtimeClass.scheduling.nodeSelector selector conflicts \
                             with pod.spec.nodeSelector"
                                .into(),
                        ));
                    }
                    _ => {
                        merged.insert(key.clone(), value.clone());
                    }
                }
            }
            pod["spec"]["nodeSelector"] = Value::Object(merged);
        }
        if let Some(tolerations) = scheduling["tolerations"].as_array() {
            let mut all = pod["spec"]["tolerations"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for toleration in tolerations {
                if !all.contains(toleration) {
                    all.push(toleration.clone());
                }
            }
            pod["spec"]["tolerations"] = json!(all);
        }
    }
    Ok(())
}

/// Whether two resource lists name the same quantities (`1000m` is `1`).
fn same_quantities(a: &Value, b: &Value) -> bool {
    let quantities = |v: &Value| {
        crate::quota::parse_list(v)
            .into_iter()
            .map(|(name, (quantity, _))| (name, quantity))
            .collect::<Vec<_>>()
    };
    quantities(a) == quantities(b)
}

/// kube's refusal: `pods "x" is forbidden: pod rejected: …`.
fn rejected(pod: &Value, why: String) -> ApiError {
    let name = pod
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    ApiError::Forbidden {
        message: format!("pods \"{name}\" is forbidden: pod rejected: {why}"),
        resource: "pods".into(),
        name: name.to_owned(),
        group: String::new(),
        causes: Vec::new(),
    }
}
