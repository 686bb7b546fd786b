//! LimitRanges, as kube-apiserver's LimitRanger admission applies them: a new pod's containers
//! get the `default` limits and `defaultRequest` requests they lack (noted in the pod's
//! `kubernetes.io/limit-ranger` annotation), then every `Container` and `Pod` item's `min`,
//! `max` and `maxLimitRequestRatio` must hold, as must a `PersistentVolumeClaim` item's
//! storage bounds for a new claim. A LimitRange's own items are defaulted (a `default` from
//! `max`, a `defaultRequest` from `default` or `min`).

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::usage::pod_resources;
use crate::quantity::Quantity;

/// A LimitRange item's defaults, as the API server fills them in on write.
pub fn default_items(limit_range: &mut Value) {
    for item in limit_range
        .pointer_mut("/spec/limits")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
    {
        if item.get("type").and_then(Value::as_str) != Some("Container") {
            continue;
        }
        let take = |item: &Value, from: &str| item[from].as_object().cloned().unwrap_or_default();
        let (max, min) = (take(item, "max"), take(item, "min"));
        let mut default = take(item, "default");
        for (k, v) in max {
            default.entry(k).or_insert(v);
        }
        let mut default_request = take(item, "defaultRequest");
        for (k, v) in default.iter().chain(min.iter()) {
            default_request
                .entry(k.clone())
                .or_insert_with(|| v.clone());
        }
        if !default.is_empty() {
            item["default"] = Value::Object(default);
        }
        if !default_request.is_empty() {
            item["defaultRequest"] = Value::Object(default_request);
        }
    }
}

/// Fills a new pod's missing container requests and limits from the `Container` items'
/// defaults of `limit_ranges`.
pub fn default_pod(limit_ranges: &[Value], pod: &mut Value) {
    let mut default_limits = serde_json::Map::new();
    let mut default_requests = serde_json::Map::new();
    for item in limit_ranges
        .iter()
        .flat_map(|lr| lr["spec"]["limits"].as_array().into_iter().flatten())
        .filter(|item| item["type"] == "Container")
    {
        default_requests.extend(
            item["defaultRequest"]
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        default_limits.extend(item["default"].as_object().cloned().unwrap_or_default());
    }
    if default_limits.is_empty() && default_requests.is_empty() {
        return;
    }
    let mut notes = Vec::new();
    for (list, what) in [
        ("containers", "container"),
        ("initContainers", "init container"),
    ] {
        // `get_mut`, not indexing: indexing would add a null `initContainers`.
        let containers = pod
            .get_mut("spec")
            .and_then(|spec| spec.get_mut(list))
            .and_then(Value::as_array_mut);
        for container in containers.into_iter().flatten() {
            let name = container["name"].as_str().unwrap_or_default().to_owned();
            let resources = container
                .as_object_mut()
                .map(|c| c.entry("resources").or_insert_with(|| json!({})));
            let Some(resources) = resources else { continue };
            for (field, defaults, label) in [
                ("limits", &default_limits, "limit"),
                ("requests", &default_requests, "request"),
            ] {
                let Some(target) = resources
                    .as_object_mut()
                    .map(|r| r.entry(field).or_insert_with(|| json!({})))
                    .and_then(Value::as_object_mut)
                else {
                    continue;
                };
                let mut set: Vec<&str> = Vec::new();
                for (k, v) in defaults {
                    if !target.contains_key(k) {
                        target.insert(k.clone(), v.clone());
                        set.push(k);
                    }
                }
                if !set.is_empty() {
                    set.sort_unstable();
                    notes.push(format!("{} {label} for {what} {name}", set.join(", ")));
                }
            }
        }
    }
    if !notes.is_empty() {
        pod["metadata"]["annotations"]["kubernetes.io/limit-ranger"] =
            json!(format!("LimitRanger plugin set: {}", notes.join("; ")));
    }
}

/// Every way `requests`/`limits` break an item's bounds, in kube's words.
fn check(
    item: &Value,
    kind: &str,
    requests: &BTreeMap<String, Quantity>,
    limits: &BTreeMap<String, Quantity>,
    problems: &mut Vec<String>,
) {
    for (resource, (bound, text)) in super::parse_list(&item["min"]) {
        match (requests.get(&resource), limits.get(&resource)) {
            (None, _) => problems.push(format!(
                "minimum {resource} usage per {kind} is {text}.  No request is specified"
            )),
            (Some(r), _) if *r < bound => problems.push(format!(
                "minimum {resource} usage per {kind} is {text}, but request is {r}"
            )),
            (_, Some(l)) if *l < bound => problems.push(format!(
                "minimum {resource} usage per {kind} is {text}, but limit is {l}"
            )),
            _ => {}
        }
    }
    for (resource, (bound, text)) in super::parse_list(&item["max"]) {
        match (requests.get(&resource), limits.get(&resource)) {
            (_, None) => problems.push(format!(
                "maximum {resource} usage per {kind} is {text}.  No limit is specified"
            )),
            (_, Some(l)) if *l > bound => problems.push(format!(
                "maximum {resource} usage per {kind} is {text}, but limit is {l}"
            )),
            (Some(r), _) if *r > bound => problems.push(format!(
                "maximum {resource} usage per {kind} is {text}, but request is {r}"
            )),
            _ => {}
        }
    }
    for (resource, (ratio, text)) in super::parse_list(&item["maxLimitRequestRatio"]) {
        let stated = |q: Option<&Quantity>| q.copied().filter(|q| !q.is_zero());
        match (stated(requests.get(&resource)), stated(limits.get(&resource))) {
            (None, _) => problems.push(format!(
                "{resource} max limit to request ratio per {kind} is {text}, but no request is specified or request is 0"
            )),
            (_, None) => problems.push(format!(
                "{resource} max limit to request ratio per {kind} is {text}, but no limit is specified or limit is 0"
            )),
            (Some(r), Some(l)) => {
                let observed = l.ratio(r);
                if observed > ratio.as_f64() {
                    problems.push(format!(
                        "{resource} max limit to request ratio per {kind} is {text}, but provided ratio is {observed:.6}"
                    ));
                }
            }
        }
    }
}

/// The problems of `pod` under `limit_ranges`' `Container` and `Pod` items.
pub fn validate_pod(limit_ranges: &[Value], pod: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let container_resources = |c: &Value, which: &str| -> BTreeMap<String, Quantity> {
        super::parse_list(&c["resources"][which])
            .into_iter()
            .map(|(k, (q, _))| (k, q))
            .collect()
    };
    for item in limit_ranges
        .iter()
        .flat_map(|lr| lr["spec"]["limits"].as_array().into_iter().flatten())
    {
        match item["type"].as_str() {
            Some("Container") => {
                for list in ["containers", "initContainers"] {
                    for c in pod["spec"][list].as_array().into_iter().flatten() {
                        let (requests, limits) = (
                            container_resources(c, "requests"),
                            container_resources(c, "limits"),
                        );
                        check(item, "Container", &requests, &limits, &mut problems);
                    }
                }
            }
            Some("Pod") => {
                let (requests, limits) =
                    (pod_resources(pod, "requests"), pod_resources(pod, "limits"));
                check(item, "Pod", &requests, &limits, &mut problems);
            }
            _ => {}
        }
    }
    problems
}

/// The problems of a new PersistentVolumeClaim under the `PersistentVolumeClaim` items.
pub fn validate_claim(limit_ranges: &[Value], claim: &Value) -> Vec<String> {
    let mut problems = Vec::new();
    let requests: BTreeMap<String, Quantity> =
        super::parse_list(&claim["spec"]["resources"]["requests"])
            .into_iter()
            .map(|(k, (q, _))| (k, q))
            .collect();
    for item in limit_ranges
        .iter()
        .flat_map(|lr| lr["spec"]["limits"].as_array().into_iter().flatten())
        .filter(|item| item["type"] == "PersistentVolumeClaim")
    {
        for (resource, (bound, text)) in super::parse_list(&item["min"]) {
            match requests.get(&resource) {
                None => problems.push(format!(
                    "minimum {resource} usage per PersistentVolumeClaim is {text}.  No request is specified"
                )),
                Some(r) if *r < bound => problems.push(format!(
                    "minimum {resource} usage per PersistentVolumeClaim is {text}, but request is {r}"
                )),
                _ => {}
            }
        }
        for (resource, (bound, text)) in super::parse_list(&item["max"]) {
            match requests.get(&resource) {
                None => problems.push(format!(
                    "maximum {resource} usage per PersistentVolumeClaim is {text}.  No request is specified"
                )),
                Some(r) if *r > bound => problems.push(format!(
                    "maximum {resource} usage per PersistentVolumeClaim is {text}, but request is {r}"
                )),
                _ => {}
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit_range() -> Value {
        let mut lr = json!({"spec": {"limits": [{"type": "Container",
            "min": {"cpu": "100m", "memory": "50Mi"},
            "max": {"cpu": "500m", "memory": "500Mi"},
            "defaultRequest": {"cpu": "100m"}}]}});
        default_items(&mut lr);
        lr
    }

    #[test]
    fn items_default_from_max_and_min() {
        let lr = limit_range();
        let item = &lr["spec"]["limits"][0];
        assert_eq!(item["default"], json!({"cpu": "500m", "memory": "500Mi"}));
        assert_eq!(
            item["defaultRequest"],
            json!({"cpu": "100m", "memory": "500Mi"})
        );
    }

    #[test]
    fn pods_get_defaults_and_are_held_to_the_bounds() {
        let lr = limit_range();
        let mut pod = json!({"metadata": {}, "spec": {"containers": [{"name": "c"}]}});
        default_pod(std::slice::from_ref(&lr), &mut pod);
        assert_eq!(
            pod["spec"]["containers"][0]["resources"],
            json!({"limits": {"cpu": "500m", "memory": "500Mi"},
                   "requests": {"cpu": "100m", "memory": "500Mi"}})
        );
        assert!(
            pod["metadata"]["annotations"]["kubernetes.io/limit-ranger"]
                .as_str()
                .unwrap()
                .starts_with("LimitRanger plugin set: cpu, memory limit for container c")
        );
        assert!(validate_pod(std::slice::from_ref(&lr), &pod).is_empty());
        let big = json!({"spec": {"containers": [{"name": "c", "resources": {
            "requests": {"cpu": "50m", "memory": "500Mi"}, "limits": {"cpu": "1", "memory": "500Mi"}}}]}});
        assert_eq!(
            validate_pod(&[lr], &big),
            [
                "minimum cpu usage per Container is 100m, but request is 50m",
                "maximum cpu usage per Container is 500m, but limit is 1"
            ]
        );
    }
}
