//! Subresources with their own shape: `scale` (an `autoscaling/v1` Scale over a resource's
//! replicas) and `pods/binding` (the scheduler's way to set `spec.nodeName`).

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ScalePaths;
use crate::request::Target;

/// `.a.b` → `/a/b`.
fn pointer(path: &str) -> String {
    path.replace('.', "/")
}

/// A LabelSelector object as the string form Scale reports (`app=web,tier in (a)`).
pub(crate) fn selector_string(selector: &Value) -> String {
    if let Some(s) = selector.as_str() {
        return s.to_owned();
    }
    // A ReplicationController's selector is a plain map of labels.
    if let Some(map) = selector.as_object()
        && !map.contains_key("matchLabels")
        && !map.contains_key("matchExpressions")
    {
        return map
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
            .collect::<Vec<_>>()
            .join(",");
    }
    let mut parts: Vec<String> = selector["matchLabels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    for expr in selector["matchExpressions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let key = expr["key"].as_str().unwrap_or_default();
        let values: Vec<&str> = expr["values"]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        parts.push(match expr["operator"].as_str().unwrap_or_default() {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_owned(),
            _ => format!("!{key}"),
        });
    }
    parts.join(",")
}

/// The Scale view of an object.
pub fn scale_of(object: &Value, paths: &ScalePaths) -> Value {
    let meta = &object["metadata"];
    let mut status = json!({
        "replicas": object.pointer(&pointer(&paths.status_replicas)).and_then(Value::as_i64).unwrap_or(0)
    });
    if let Some(selector) = paths
        .label_selector
        .as_deref()
        .and_then(|p| object.pointer(&pointer(p)))
    {
        status["selector"] = json!(selector_string(selector));
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"],
            "resourceVersion": meta["resourceVersion"], "creationTimestamp": meta["creationTimestamp"],
        },
        "spec": {"replicas": object.pointer(&pointer(&paths.spec_replicas)).and_then(Value::as_i64).unwrap_or(0)},
        "status": status,
    })
}

/// Writes a Scale's `spec.replicas` back into its object (with the Scale's
/// resourceVersion as the precondition, when it has one).
pub async fn update_scale(
    engine: &Engine,
    target: &Target,
    scale: &Value,
    dry_run: bool,
) -> Result<Value, ApiError> {
    let paths = target.def.scale.clone().ok_or(ApiError::NoRoute)?;
    let replicas = scale
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|r| *r >= 0)
        .ok_or_else(|| {
            ApiError::invalid(
                &target.def,
                target.name.as_deref().unwrap_or_default(),
                "spec.replicas",
                "FieldValueInvalid",
                "Invalid value: must be a non-negative integer".into(),
            )
        })?;
    let mut object = engine.get(target).await?;
    if let Some(rv) = scale
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
    {
        if !rv.is_empty()
            && object
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                != Some(rv)
        {
            return Err(ApiError::stale(
                &target.def,
                target.name.as_deref().unwrap_or_default(),
            ));
        }
    }
    set_path(&mut object, &paths.spec_replicas, json!(replicas));
    let main = Target {
        subresource: None,
        ..target.clone()
    };
    let updated = engine.update(&main, object, dry_run).await?;
    Ok(scale_of(&updated, &paths))
}

fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut current = object;
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 == parts.len() {
            current[*part] = value;
            return;
        }
        if !current[*part].is_object() {
            current[*part] = json!({});
        }
        current = &mut current[*part];
    }
}

/// `POST pods/<name>/binding`: binds an unbound pod to a node.
pub async fn bind(engine: &Engine, target: &Target, binding: &Value) -> Result<Value, ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let node = binding
        .pointer("/target/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::invalid(
                &target.def,
                &name,
                "target.name",
                "FieldValueRequired",
                "Required value".into(),
            )
        })?;
    let main = Target {
        subresource: None,
        ..target.clone()
    };
    let mut pod = engine.get(&main).await?;
    if let Some(bound) = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    {
        return Err(ApiError::Conflict {
            resource: "pods".into(),
            name: name.clone(),
            group: String::new(),
            message: format!(
                "Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{bound}\""
            ),
        });
    }
    pod["spec"]["nodeName"] = json!(node);
    // The pod as read is the precondition: a concurrent bind loses with a Conflict.
    engine.update(&main, pod, false).await?;
    Ok(
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    )
}
