//! `pods/<name>/resize`: the one way to change a running pod's CPU and memory (in-place pod
//! resize). Only the `resources` of its containers (and of its sidecars: init containers with
//! `restartPolicy: Always`) change; every other field of the request is ignored, as
//! kube-apiserver's resize strategy does. Refused: other resources than CPU and memory,
//! containers added or removed, a resize of a non-sidecar init container, and a change of
//! the pod's QoS class. The node agent applies it to the running containers' cgroups.

use serde_json::Value;

use crate::error::{ApiError, Cause};

fn invalid(old: &Value, field: String, message: String) -> ApiError {
    ApiError::Invalid {
        kind: "Pod".into(),
        name: old["metadata"]["name"].as_str().unwrap_or("").to_owned(),
        group: String::new(),
        causes: vec![Cause {
            reason: "FieldValueInvalid".into(),
            message,
            field,
        }],
    }
}

/// The resources of `container` other than CPU and memory (which may not change).
fn others(container: &Value) -> Value {
    let mut resources = container.get("resources").cloned().unwrap_or_default();
    for kind in ["limits", "requests"] {
        if let Some(map) = resources.get_mut(kind).and_then(Value::as_object_mut) {
            map.remove("cpu");
            map.remove("memory");
            if map.is_empty() {
                resources.as_object_mut().map(|r| r.remove(kind));
            }
        }
    }
    match resources.as_object() {
        Some(o) if o.is_empty() => Value::Null,
        _ => resources,
    }
}

/// The pod `old` with the containers' resources of `body`.
pub fn merge(old: &Value, body: &Value) -> Result<Value, ApiError> {
    let mut new = old.clone();
    for list in ["containers", "initContainers"] {
        let before = old
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let after = body
            .pointer(&format!("/spec/{list}"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let names = |cs: &[Value]| cs.iter().map(|c| c["name"].clone()).collect::<Vec<_>>();
        if names(&before) != names(&after) {
            return Err(invalid(
                old,
                format!("spec.{list}"),
                "containers may not be added, removed or reordered by a resize".into(),
            ));
        }
        for (i, (was, now)) in before.iter().zip(&after).enumerate() {
            let field = format!("spec.{list}[{i}].resources");
            if others(was) != others(now) {
                return Err(invalid(
                    old,
                    field,
                    "only cpu and memory resources are mutable".into(),
                ));
            }
            let resized = was.get("resources") != now.get("resources");
            let sidecar = now["restartPolicy"] == "Always";
            if resized && list == "initContainers" && !sidecar {
                return Err(invalid(
                    old,
                    field,
                    "resources of non-sidecar init containers are immutable".into(),
                ));
            }
            match now.get("resources") {
                Some(r) => new["spec"][list][i]["resources"] = r.clone(),
                None => {
                    if let Some(c) = new["spec"][list][i].as_object_mut() {
                        c.remove("resources");
                    }
                }
            }
        }
    }
    let was = old
        .pointer("/status/qosClass")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| super::qos_class(&old["spec"]).to_owned());
    if super::qos_class(&new["spec"]) != was {
        return Err(invalid(
            old,
            "spec".into(),
            "Pod QOS Class may not change as a result of resizing".into(),
        ));
    }
    Ok(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(cpu: &str) -> Value {
        json!({
            "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "x", "resources": {
                "limits": {"cpu": cpu, "memory": "64Mi"},
                "requests": {"cpu": cpu, "memory": "64Mi"},
            }}]},
            "status": {"qosClass": "Guaranteed"},
        })
    }

    #[test]
    fn only_cpu_and_memory_change_and_the_class_holds() {
        let old = pod("100m");
        let mut body = pod("200m");
        body["spec"]["containers"][0]["image"] = json!("ignored");
        let new = merge(&old, &body).unwrap();
        assert_eq!(
            new["spec"]["containers"][0]["resources"]["limits"]["cpu"],
            "200m"
        );
        assert_eq!(new["spec"]["containers"][0]["image"], "x");
        // Burstable would be a new class.
        let mut burst = pod("200m");
        burst["spec"]["containers"][0]["resources"]["requests"]["cpu"] = json!("100m");
        assert!(merge(&old, &burst).is_err());
        let mut gpu = pod("100m");
        gpu["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = json!("1");
        assert!(merge(&old, &gpu).is_err());
        let mut renamed = pod("100m");
        renamed["spec"]["containers"][0]["name"] = json!("d");
        assert!(merge(&old, &renamed).is_err());
    }
}
