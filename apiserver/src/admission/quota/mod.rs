//! A namespace's limits and quotas, as kube-apiserver's LimitRanger and ResourceQuota
//! admission and kube-controller-manager's quota controller keep them.
//!
//! - [`admit_create`] / [`admit_update`]: before an object is stored, the namespace's
//!   LimitRanges default and check a pod's (or claim's) resources ([`limits`]), and every
//!   ResourceQuota that sees the object ([`usage::in_scope`]) must have room for what it
//!   consumes ([`usage::usage`]): otherwise a 403 `exceeded quota: …`. What fits is charged to
//!   the quota's `status.used` at once (compare-and-swap), so concurrent creates cannot all
//!   slip under the limit.
//! - [`status::run`]: the quotas' status, recomputed from what the namespaces hold (`hard` from
//!   the spec, `used` counted), so deletions give room back.

pub mod limits;
pub mod status;
pub mod usage;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::quantity::Quantity;
use crate::registry::ResourceDef;
use crate::request::{Params, Target};
use usage::{Usage, in_scope, usage};

/// The objects of `group/plural` in `namespace` (every namespace with `None`).
pub(crate) async fn list(
    engine: &Engine,
    group: &str,
    plural: &str,
    namespace: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let Some(def) = served(engine, group, plural) else {
        return Ok(Vec::new());
    };
    let target = Target {
        def,
        namespace: namespace.map(str::to_owned),
        name: None,
        subresource: None,
    };
    let list = engine.list(&target, &Params::default()).await?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// The served definition of `group/plural`, in its preferred version.
pub(crate) fn served(engine: &Engine, group: &str, plural: &str) -> Option<Arc<ResourceDef>> {
    let (_, versions) = engine
        .registry
        .groups()
        .into_iter()
        .find(|(g, _)| g == group)?;
    versions
        .iter()
        .find_map(|version| engine.registry.get(group, version, plural))
}

fn is(def: &ResourceDef, plural: &str) -> bool {
    def.group.is_empty() && def.plural == plural
}

fn name_of(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn forbidden(def: &ResourceDef, object: &Value, reason: String) -> ApiError {
    let name = name_of(object);
    let resource = if def.group.is_empty() {
        def.plural.clone()
    } else {
        format!("{}.{}", def.plural, def.group)
    };
    ApiError::Forbidden {
        message: format!("{resource} \"{name}\" is forbidden: {reason}"),
        resource: def.plural.clone(),
        name: name.to_owned(),
        group: def.group.clone(),
        causes: Vec::new(),
    }
}

/// LimitRanger admission for a new pod or claim of `def` in `namespace`: defaults, then
/// bounds (a 403 naming every one broken).
pub async fn apply_limits(
    engine: &Engine,
    def: &ResourceDef,
    namespace: &str,
    object: &mut Value,
) -> Result<(), ApiError> {
    if is(def, "pods") || is(def, "persistentvolumeclaims") {
        let ranges = list(engine, "", "limitranges", Some(namespace)).await?;
        let problems = if is(def, "pods") {
            limits::default_pod(&ranges, object);
            limits::validate_pod(&ranges, object)
        } else {
            limits::validate_claim(&ranges, object)
        };
        if !problems.is_empty() {
            let reason = if problems.len() == 1 {
                problems.join("")
            } else {
                format!("[{}]", problems.join(", "))
            };
            return Err(forbidden(def, object, reason));
        }
    }
    Ok(())
}

/// ResourceQuota admission for a new object of `def` in `namespace`, once it is valid.
pub async fn admit_create(
    engine: &Engine,
    def: &ResourceDef,
    namespace: &str,
    object: &Value,
    dry_run: bool,
) -> Result<(), ApiError> {
    let consumed = usage(def, object);
    charge(engine, def, namespace, object, &consumed, dry_run).await
}

/// ResourceQuota admission for an update: what the new version consumes beyond the old
/// (a Service turned NodePort, a claim grown) must fit.
pub async fn admit_update(
    engine: &Engine,
    def: &ResourceDef,
    namespace: &str,
    old: &Value,
    new: &Value,
    dry_run: bool,
) -> Result<(), ApiError> {
    if !def.namespaced {
        return Ok(());
    }
    let before = usage(def, old);
    let mut delta = Usage::new();
    for (resource, amount) in usage(def, new) {
        let grown = amount - before.get(&resource).copied().unwrap_or_default();
        if grown > Quantity::ZERO {
            delta.insert(resource, grown);
        }
    }
    if delta.is_empty() {
        return Ok(());
    }
    charge(engine, def, namespace, new, &delta, dry_run).await
}

/// The compute resources a quota can require every container of a pod to state.
const REQUIRED_COMPUTE: &[&str] = &[
    "cpu",
    "requests.cpu",
    "limits.cpu",
    "memory",
    "requests.memory",
    "limits.memory",
];

/// One resource a request would take a quota past its hard limit on.
struct Exceeded {
    resource: String,
    requested: Quantity,
    used: Quantity,
    limited: String,
}

/// Checks `consumed` against every quota of `namespace` that sees `object`, then charges it.
async fn charge(
    engine: &Engine,
    def: &ResourceDef,
    namespace: &str,
    object: &Value,
    consumed: &Usage,
    dry_run: bool,
) -> Result<(), ApiError> {
    if consumed.is_empty() {
        return Ok(());
    }
    // A few rounds: another admission may charge a quota between our read and our write.
    for _ in 0..8 {
        let quotas = list(engine, "", "resourcequotas", Some(namespace)).await?;
        let mut charges = Vec::new();
        for quota in quotas.iter().filter(|q| in_scope(q, def, object)) {
            let hard = parse_list(&quota["spec"]["hard"]);
            if is(def, "pods") {
                missing_compute(quota, &hard, object)
                    .map_or(Ok(()), |reason| Err(forbidden(def, object, reason)))?;
            }
            let used = parse_list(&quota["status"]["used"]);
            let mut exceeded = Vec::new();
            let mut new_used = BTreeMap::new();
            for (resource, amount) in consumed {
                let Some((limit, limit_text)) = hard.get(resource) else {
                    continue;
                };
                let (was, _) = used.get(resource).cloned().unwrap_or_default();
                let now = was + *amount;
                if now > *limit {
                    exceeded.push(Exceeded {
                        resource: resource.clone(),
                        requested: *amount,
                        used: was,
                        limited: limit_text.clone(),
                    });
                }
                new_used.insert(resource.clone(), now.to_string_like(limit_text));
            }
            if !exceeded.is_empty() {
                let list = |f: fn(&Exceeded) -> String| {
                    exceeded.iter().map(f).collect::<Vec<_>>().join(",")
                };
                return Err(forbidden(
                    def,
                    object,
                    format!(
                        "exceeded quota: {}, requested: {}, used: {}, limited: {}",
                        name_of(quota),
                        list(|e| format!("{}={}", e.resource, e.requested)),
                        list(|e| format!("{}={}", e.resource, e.used)),
                        list(|e| format!("{}={}", e.resource, e.limited)),
                    ),
                ));
            }
            if !new_used.is_empty() {
                charges.push((quota, new_used));
            }
        }
        if dry_run || charges.is_empty() {
            return Ok(());
        }
        let mut conflicted = false;
        for (quota, new_used) in charges {
            let mut updated = quota.clone();
            for (resource, value) in new_used {
                updated["status"]["used"][resource] = json!(value);
            }
            let target = status_target(engine, namespace, name_of(quota))?;
            // Boxed: a quota's own update passes through this admission too.
            match Box::pin(engine.update(&target, updated, false)).await {
                Ok(_) => {}
                Err(ApiError::Conflict { .. }) => {
                    conflicted = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        if !conflicted {
            return Ok(());
        }
    }
    Err(ApiError::Conflict {
        resource: "resourcequotas".into(),
        name: String::new(),
        group: String::new(),
        message: "the namespace's quotas changed too often to charge this request; try again"
            .into(),
    })
}

/// `… must specify limits.cpu for: c1; memory for: c1`, if a container of `pod` does not state
/// a compute resource the quota limits.
fn missing_compute(
    quota: &Value,
    hard: &BTreeMap<String, (Quantity, String)>,
    pod: &Value,
) -> Option<String> {
    let required: Vec<&str> = REQUIRED_COMPUTE
        .iter()
        .copied()
        .filter(|r| hard.contains_key(*r))
        .collect();
    if required.is_empty() {
        return None;
    }
    let mut missing: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for list in ["containers", "initContainers"] {
        for container in pod["spec"][list].as_array().into_iter().flatten() {
            let has =
                |which: &str, resource: &str| container["resources"][which].get(resource).is_some();
            for resource in &required {
                let stated = match *resource {
                    "cpu" | "requests.cpu" => has("requests", "cpu"),
                    "memory" | "requests.memory" => has("requests", "memory"),
                    "limits.cpu" => has("limits", "cpu"),
                    _ => has("limits", "memory"),
                };
                if !stated {
                    missing
                        .entry(resource)
                        .or_default()
                        .push(container["name"].as_str().unwrap_or_default().to_owned());
                }
            }
        }
    }
    (!missing.is_empty()).then(|| {
        let parts: Vec<String> = missing
            .iter()
            .map(|(r, names)| format!("{r} for: {}", names.join(",")))
            .collect();
        format!(
            "failed quota: {}: must specify {}",
            name_of(quota),
            parts.join("; ")
        )
    })
}

/// A resource list (`{cpu: "1", pods: "5"}`) parsed, each with its text.
pub(crate) fn parse_list(value: &Value) -> BTreeMap<String, (Quantity, String)> {
    value
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Some((k.clone(), (Quantity::parse(&text)?, text)))
        })
        .collect()
}

fn status_target(engine: &Engine, namespace: &str, name: &str) -> Result<Target, ApiError> {
    let def = served(engine, "", "resourcequotas")
        .ok_or_else(|| ApiError::Internal("resourcequotas are not served".into()))?;
    Ok(Target {
        def,
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        subresource: Some("status".into()),
    })
}
