//! The quota controller: every ResourceQuota's status — `hard` as the spec says, `used`
//! counted from what its namespace holds — recomputed whenever the store has changed (checked
//! every half second), so what admission charged is corrected and what was deleted given back.
//!
//! It runs inside the API server (as kube-controller-manager's does beside kube-apiserver),
//! where the usage rules live; several servers compute the same answer, and a write that
//! loses a race is simply redone on the next change.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{Value, json};

use super::usage::{in_scope, usage};
use super::{list, parse_list, served, status_target};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::quantity::Quantity;

/// How often the store's revision is looked at.
const TICK: Duration = Duration::from_millis(500);

/// Keeps every quota's status until the task is dropped.
pub async fn run(engine: Engine) {
    let mut seen = 0;
    loop {
        let revision = engine.cache().revision();
        if revision != seen {
            seen = revision;
            if let Err(error) = sync_all(&engine).await {
                tracing::warn!(%error, "recomputing resource quota usage");
            }
        }
        tokio::time::sleep(TICK).await;
    }
}

/// Recomputes every quota once; writes the ones whose status changed.
pub async fn sync_all(engine: &Engine) -> Result<(), ApiError> {
    let quotas = list(engine, "", "resourcequotas", None).await?;
    let mut by_namespace: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for quota in quotas {
        let namespace = quota
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        by_namespace.entry(namespace).or_default().push(quota);
    }
    for (namespace, quotas) in by_namespace {
        // Each kind some quota here counts, listed once for the namespace.
        let mut kinds: BTreeSet<(String, String)> = BTreeSet::new();
        for quota in &quotas {
            for resource in quota["spec"]["hard"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, _)| k)
            {
                kinds.extend(kinds_counting(resource));
            }
        }
        let mut objects = Vec::new();
        for (group, plural) in kinds {
            if let Some(def) = served(engine, &group, &plural) {
                for object in list(engine, &group, &plural, Some(&namespace)).await? {
                    objects.push((def.clone(), object));
                }
            }
        }
        for quota in quotas {
            let hard = parse_list(&quota["spec"]["hard"]);
            let mut used: BTreeMap<String, Quantity> =
                hard.keys().map(|k| (k.clone(), Quantity::ZERO)).collect();
            for (def, object) in &objects {
                if object.pointer("/metadata/deletionTimestamp").is_some()
                    && def.group.is_empty()
                    && def.plural == "pods"
                {
                    continue; // a pod being deleted gives its resources back
                }
                if !in_scope(&quota, def, object) {
                    continue;
                }
                for (resource, amount) in usage(def, object) {
                    if let Some(total) = used.get_mut(&resource) {
                        *total += amount;
                    }
                }
            }
            let wanted_used: serde_json::Map<String, Value> = used
                .iter()
                .map(|(k, v)| {
                    let template = hard.get(k).map(|(_, t)| t.as_str()).unwrap_or("");
                    (k.clone(), json!(v.to_string_like(template)))
                })
                .collect();
            let current_used = parse_list(&quota["status"]["used"]);
            let same_used = current_used.len() == used.len()
                && used
                    .iter()
                    .all(|(k, v)| current_used.get(k).is_some_and(|(c, _)| c == v));
            let same_hard = quota["status"]["hard"] == quota["spec"]["hard"];
            if same_used && same_hard {
                continue;
            }
            let mut updated = quota.clone();
            updated["status"] = json!({"hard": quota["spec"]["hard"], "used": wanted_used});
            let name = quota
                .pointer("/metadata/name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            match engine
                .update(&status_target(engine, &namespace, name)?, updated, false)
                .await
            {
                Ok(_) | Err(ApiError::Conflict { .. } | ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// The kinds (`group`, `plural`) whose objects count toward quota resource `resource`.
fn kinds_counting(resource: &str) -> Vec<(String, String)> {
    let core = |plural: &str| (String::new(), plural.to_owned());
    if let Some(counted) = resource.strip_prefix("count/") {
        return vec![match counted.split_once('.') {
            Some((plural, group)) => (group.to_owned(), plural.to_owned()),
            None => core(counted),
        }];
    }
    if resource.contains(".storageclass.storage.k8s.io/") {
        return vec![core("persistentvolumeclaims")];
    }
    match resource {
        "services" | "services.nodeports" | "services.loadbalancers" => vec![core("services")],
        "persistentvolumeclaims" | "requests.storage" => vec![core("persistentvolumeclaims")],
        "configmaps" | "secrets" | "replicationcontrollers" | "resourcequotas" => {
            vec![core(resource)]
        }
        // pods, cpu, memory, requests.*, limits.*, ephemeral-storage, hugepages-*, extended.
        _ => vec![core("pods")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_name_the_kinds_that_count() {
        assert_eq!(
            kinds_counting("count/replicasets.apps"),
            [("apps".into(), "replicasets".into())]
        );
        assert_eq!(
            kinds_counting("count/pods"),
            [(String::new(), "pods".into())]
        );
        assert_eq!(
            kinds_counting("requests.cpu"),
            [(String::new(), "pods".into())]
        );
        assert_eq!(
            kinds_counting("gold.storageclass.storage.k8s.io/requests.storage"),
            [(String::new(), "persistentvolumeclaims".into())]
        );
        assert_eq!(
            kinds_counting("services.nodeports"),
            [(String::new(), "services".into())]
        );
    }
}
