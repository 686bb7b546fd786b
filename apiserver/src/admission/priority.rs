//! kube-apiserver's `Priority` admission and PriorityClass validation.
//!
//! The scheduler orders and preempts by `spec.priority`, an integer; users name a
//! PriorityClass instead. So a new pod's `spec.priorityClassName` is resolved here, once, to
//! `spec.priority` and `spec.preemptionPolicy` (the class's), a pod naming no class gets
//! the `globalDefault` class (else priority 0), and a pod naming an unknown class is
//! refused (403). The built-in classes `system-node-critical` and `system-cluster-critical`
//! always exist ([`ensure_system_classes`], at start), above any user class: user classes
//! are capped at [`HIGHEST_USER_PRIORITY`] and may not take the `system-` prefix. At most
//! one class is the `globalDefault`, and a class's `value` and `preemptionPolicy` never
//! change (pods already carry them).

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::{ApiError, Cause};
use crate::registry::ResourceDef;

/// The highest `value` a user-defined PriorityClass may have.
pub const HIGHEST_USER_PRIORITY: i64 = 1_000_000_000;

/// The built-in classes: name, value, description.
pub const SYSTEM_CLASSES: &[(&str, i64, &str)] = &[
    (
        "system-node-critical",
        2_000_001_000,
        "Used for system critical pods that must not be moved from their current node.",
    ),
    (
        "system-cluster-critical",
        2_000_000_000,
        "Used for system critical pods that must run in the cluster, but can be moved to \
         another node if necessary.",
    ),
];

/// The preemption policy of a class or pod that names none.
pub const PREEMPT_LOWER_PRIORITY: &str = "PreemptLowerPriority";

fn is_pod(def: &ResourceDef) -> bool {
    def.group.is_empty() && def.plural == "pods"
}

fn is_class(def: &ResourceDef) -> bool {
    def.group == "scheduling.k8s.io" && def.plural == "priorityclasses"
}

/// Admits a new object of `def`: pods get their priority, PriorityClasses are checked
/// (name, value, only one global default). Other kinds pass untouched.
pub async fn admit(engine: &Engine, def: &ResourceDef, object: &mut Value) -> Result<(), ApiError> {
    if is_pod(def) {
        admit_pod(engine, object).await
    } else if is_class(def) {
        admit_class(engine, def, object).await
    } else {
        Ok(())
    }
}

async fn admit_pod(engine: &Engine, pod: &mut Value) -> Result<(), ApiError> {
    let named = pod
        .pointer("/spec/priorityClassName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let classes = crate::quota::list(engine, "scheduling.k8s.io", "priorityclasses", None).await?;
    let class = match &named {
        Some(name) => {
            let found = classes.iter().find(|c| name_of(c) == name.as_str());
            // The built-in classes exist even before the bootstrap has written them.
            let builtin = SYSTEM_CLASSES
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(n, value, _)| json!({"metadata": {"name": n}, "value": value}));
            match found.cloned().or(builtin) {
                Some(class) => Some(class),
                None => {
                    return Err(forbidden(
                        pod,
                        format!("no PriorityClass with name {name} was found"),
                    ));
                }
            }
        }
        None => global_default(&classes).cloned(),
    };
    let (priority, policy) = match &class {
        Some(class) => (
            class["value"].as_i64().unwrap_or(0),
            class["preemptionPolicy"]
                .as_str()
                .unwrap_or(PREEMPT_LOWER_PRIORITY)
                .to_owned(),
        ),
        None => (0, PREEMPT_LOWER_PRIORITY.to_owned()),
    };
    if let Some(given) = pod.pointer("/spec/priority").and_then(Value::as_i64)
        && given != priority
    {
        return Err(forbidden(
            pod,
            format!(
                "the integer value of priority ({given}) must not be provided in pod spec; \
                 priority admission controller computed {priority} from the given \
                 PriorityClass name"
            ),
        ));
    }
    if !pod["spec"].is_object() {
        pod["spec"] = json!({});
    }
    if let Some(class) = &class {
        pod["spec"]["priorityClassName"] = json!(name_of(class));
    }
    pod["spec"]["priority"] = json!(priority);
    if pod
        .pointer("/spec/preemptionPolicy")
        .and_then(Value::as_str)
        .is_none()
    {
        pod["spec"]["preemptionPolicy"] = json!(policy);
    }
    Ok(())
}

/// The `globalDefault` class pods naming none get: the lowest-valued one if several (as
/// kube, which tolerates several created concurrently).
fn global_default(classes: &[Value]) -> Option<&Value> {
    classes
        .iter()
        .filter(|c| c["globalDefault"].as_bool() == Some(true))
        .min_by_key(|c| c["value"].as_i64().unwrap_or(0))
}

fn name_of(object: &Value) -> &str {
    object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

async fn admit_class(
    engine: &Engine,
    def: &ResourceDef,
    class: &mut Value,
) -> Result<(), ApiError> {
    if class["preemptionPolicy"].as_str().is_none() {
        class["preemptionPolicy"] = json!(PREEMPT_LOWER_PRIORITY);
    }
    let causes = validate_class(class);
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            kind: def.kind.clone(),
            name: name_of(class).to_owned(),
            group: def.group.clone(),
            causes,
        });
    }
    if class["globalDefault"].as_bool() == Some(true) {
        let classes =
            crate::quota::list(engine, "scheduling.k8s.io", "priorityclasses", None).await?;
        if let Some(other) = global_default(&classes) {
            let name = name_of(class).to_owned();
            return Err(ApiError::Forbidden {
                message: format!(
                    "priorityclasses.scheduling.k8s.io \"{name}\" is forbidden: PriorityClass {} \
                     is already marked as default. Only one default can exist",
                    name_of(other)
                ),
                resource: "priorityclasses".into(),
                name,
                group: def.group.clone(),
                causes: Vec::new(),
            });
        }
    }
    Ok(())
}

/// A new class's own checks: reserved names and values, the policy enumerated.
pub fn validate_class(class: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let name = name_of(class);
    let value = class["value"].as_i64().unwrap_or(0);
    if name.starts_with("system-") {
        match SYSTEM_CLASSES.iter().find(|(n, _, _)| *n == name) {
            Some((_, expected, _)) if *expected != value => causes.push(Cause {
                reason: "FieldValueInvalid".into(),
                message: format!(
                    "Invalid value: {value}: value of {name} PriorityClass must be {expected}"
                ),
                field: "value".into(),
            }),
            Some(_) => {}
            None => causes.push(Cause {
                reason: "FieldValueInvalid".into(),
                message: format!(
                    "Invalid value: \"{name}\": priority class names with 'system-' prefix are \
                     reserved"
                ),
                field: "metadata.name".into(),
            }),
        }
    } else if value > HIGHEST_USER_PRIORITY {
        causes.push(Cause {
            reason: "FieldValueForbidden".into(),
            message: format!(
                "Forbidden: maximum allowed value of a user defined priority is \
                 {HIGHEST_USER_PRIORITY}"
            ),
            field: "value".into(),
        });
    }
    match class["preemptionPolicy"].as_str() {
        None | Some("PreemptLowerPriority" | "Never") => {}
        Some(other) => causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: \"{other}\": supported values: \"Never\", \
                 \"PreemptLowerPriority\""
            ),
            field: "preemptionPolicy".into(),
        }),
    }
    causes
}

/// What an update of a class may not change: its `value` and `preemptionPolicy`.
pub fn validate_class_update(old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    if old["value"] != new["value"] {
        causes.push(Cause {
            reason: "FieldValueForbidden".into(),
            message: "Forbidden: may not be changed in an update.".into(),
            field: "value".into(),
        });
    }
    let policy = |c: &Value| {
        c["preemptionPolicy"]
            .as_str()
            .unwrap_or(PREEMPT_LOWER_PRIORITY)
            .to_owned()
    };
    if policy(old) != policy(new) {
        causes.push(Cause {
            reason: "FieldValueInvalid".into(),
            message: format!("Invalid value: \"{}\": field is immutable", policy(new)),
            field: "preemptionPolicy".into(),
        });
    }
    causes
}

/// Creates the built-in classes unless they exist (kube-apiserver's bootstrap does the same).
pub async fn ensure_system_classes(engine: &Engine) -> Result<(), ApiError> {
    let Some(def) = crate::quota::served(engine, "scheduling.k8s.io", "priorityclasses") else {
        return Ok(());
    };
    for (name, value, description) in SYSTEM_CLASSES {
        let class = json!({
            "apiVersion": format!("scheduling.k8s.io/{}", def.version),
            "kind": "PriorityClass",
            "metadata": {"name": name},
            "value": value,
            "description": description,
            "preemptionPolicy": PREEMPT_LOWER_PRIORITY,
        });
        match engine.create(&def, None, class, false).await {
            Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// kube's refusal: `pods "x" is forbidden: …`.
fn forbidden(pod: &Value, why: String) -> ApiError {
    let name = name_of(pod).to_owned();
    ApiError::Forbidden {
        message: format!("pods \"{name}\" is forbidden: {why}"),
        resource: "pods".into(),
        name,
        group: String::new(),
        causes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_checked() {
        let user = json!({"metadata": {"name": "high"}, "value": 1000});
        assert!(validate_class(&user).is_empty());
        let too_high = json!({"metadata": {"name": "high"}, "value": 1_000_000_001});
        assert_eq!(validate_class(&too_high).len(), 1);
        let reserved = json!({"metadata": {"name": "system-mine"}, "value": 1});
        assert_eq!(validate_class(&reserved).len(), 1);
        let builtin = json!({"metadata": {"name": "system-node-critical"}, "value": 2_000_001_000});
        assert!(validate_class(&builtin).is_empty());
        let bad_policy = json!({"metadata": {"name": "p"}, "value": 1, "preemptionPolicy": "x"});
        assert_eq!(validate_class(&bad_policy).len(), 1);
    }

    #[test]
    fn value_and_policy_are_immutable() {
        let old = json!({"value": 1, "preemptionPolicy": "Never", "description": "a"});
        let described = json!({"value": 1, "preemptionPolicy": "Never", "description": "b"});
        assert!(validate_class_update(&old, &described).is_empty());
        let revalued = json!({"value": 10, "preemptionPolicy": "Never"});
        assert_eq!(validate_class_update(&old, &revalued).len(), 1);
        let repolicied = json!({"value": 1, "preemptionPolicy": "PreemptLowerPriority"});
        assert_eq!(validate_class_update(&old, &repolicied).len(), 1);
    }

    #[test]
    fn the_lowest_global_default_wins() {
        let classes = vec![
            json!({"metadata": {"name": "a"}, "value": 5, "globalDefault": true}),
            json!({"metadata": {"name": "b"}, "value": 3, "globalDefault": true}),
            json!({"metadata": {"name": "c"}, "value": 1}),
        ];
        assert_eq!(global_default(&classes).map(name_of), Some("b"));
    }
}
