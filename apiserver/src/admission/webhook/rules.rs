//! Whether a webhook is called for a request (kube's `ShouldCallHook`): one of its rules
//! covers the operation, group, version, resource (`resource/subresource`, `*`, `*/*`,
//! `resource/*`) and scope; the namespace's labels match its `namespaceSelector`; the new or
//! the old object's labels match its `objectSelector`; its `matchConditions` (CEL over
//! `object`, `oldObject` and `request`) all hold.

use serde_json::Value;

use super::{Attributes, Hook};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;

/// Whether `hook` is to be called for the request `attributes` writing `object`.
pub(super) async fn matches(
    engine: &Engine,
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<bool, ApiError> {
    if !hook.rules.iter().any(|rule| rule_matches(rule, attributes)) {
        return Ok(false);
    }
    if !object_selected(&hook.object_selector, object, attributes.old_object) {
        return Ok(false);
    }
    if !namespace_selected(engine, &hook.namespace_selector, attributes, object).await? {
        return Ok(false);
    }
    conditions_hold(hook, attributes, object)
}

/// The webhook's `matchConditions`: all must be true for it to be called. One that errors
/// fails the request under `failurePolicy: Fail` and skips the webhook under `Ignore`.
fn conditions_hold(
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<bool, ApiError> {
    use crate::admission::cel::{self, Activation, Expression, Shape, Sizes};
    if hook.match_conditions.is_empty() {
        return Ok(true);
    }
    let request = super::call::request("", attributes, object)["request"].clone();
    let mut vars = Activation::new();
    vars.bind_json("object", object)
        .bind_json("oldObject", attributes.old_object)
        .bind_json("request", Some(&request));
    let shapes = [
        ("object", object.map_or(Shape::Unknown, Shape::json)),
        (
            "oldObject",
            attributes.old_object.map_or(Shape::Unknown, Shape::json),
        ),
        ("request", Shape::json(&request)),
    ];
    let sizes = Sizes::of([object, attributes.old_object].into_iter().flatten());
    for (name, source) in &hook.match_conditions {
        let outcome = Expression::compile(source).and_then(|e| {
            e.check_cost(&shapes, sizes, cel::PER_CALL_LIMIT)?;
            e.eval_bool(&vars)
        });
        match outcome {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(_) if hook.ignore_failures => return Ok(false),
            Err(e) => {
                return Err(ApiError::Internal(format!(
                    "Internal error occurred: failed calling webhook {:?}: failed to evaluate match condition {name:?}: {e}",
                    hook.name
                )));
            }
        }
    }
    Ok(true)
}

fn listed(items: &Value, requested: &str) -> bool {
    items
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|item| item == "*" || item == requested)
}

/// One `RuleWithOperations` against the request.
pub(crate) fn rule_matches(rule: &Value, attributes: &Attributes<'_>) -> bool {
    let def = attributes.def;
    let is_namespace = def.group.is_empty() && def.plural == "namespaces";
    let scope = match rule["scope"].as_str().unwrap_or("*") {
        "*" => true,
        "Namespaced" => !is_namespace && attributes.namespace.is_some(),
        "Cluster" => is_namespace || attributes.namespace.is_none(),
        _ => false,
    };
    let subresource = attributes.subresource.unwrap_or("");
    let resource = rule["resources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .any(|item| {
            let (res, sub) = item.split_once('/').unwrap_or((item, ""));
            (res == "*" || res == def.plural) && (sub == "*" || sub == subresource)
        });
    scope
        && listed(&rule["operations"], attributes.operation.as_str())
        && listed(&rule["apiGroups"], &def.group)
        && listed(&rule["apiVersions"], &def.version)
        && resource
}

/// The `objectSelector`: empty selects everything; otherwise the new or the old object's
/// labels must match.
pub(crate) fn object_selected(
    selector: &Value,
    object: Option<&Value>,
    old: Option<&Value>,
) -> bool {
    if is_empty(selector) {
        return true;
    }
    [object, old]
        .into_iter()
        .flatten()
        .any(|o| crate::admission::selector_matches(selector, &o["metadata"]["labels"]))
}

/// The `namespaceSelector`: empty selects everything, and so does any cluster-scoped object
/// other than a Namespace; a Namespace is matched by its own labels, anything else by its
/// namespace's.
pub(crate) async fn namespace_selected(
    engine: &Engine,
    selector: &Value,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<bool, ApiError> {
    if is_empty(selector) {
        return Ok(true);
    }
    let def = attributes.def;
    if def.group.is_empty() && def.plural == "namespaces" {
        let labels = object
            .or(attributes.old_object)
            .map(|o| o["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        return Ok(crate::admission::selector_matches(selector, &labels));
    }
    let Some(namespace) = attributes.namespace else {
        return Ok(true);
    };
    let target = Target::parse(
        &engine.registry,
        "",
        "v1",
        &format!("namespaces/{namespace}"),
    )?;
    let labels = match engine.get(&target).await {
        Ok(ns) => ns["metadata"]["labels"].clone(),
        Err(ApiError::NotFound { .. }) => Value::Null,
        Err(e) => return Err(e),
    };
    Ok(crate::admission::selector_matches(selector, &labels))
}

fn is_empty(selector: &Value) -> bool {
    selector.as_object().is_none_or(|s| {
        s.get("matchLabels")
            .and_then(Value::as_object)
            .is_none_or(|m| m.is_empty())
            && s.get("matchExpressions")
                .and_then(Value::as_array)
                .is_none_or(|e| e.is_empty())
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::registry::Registry;

    fn attributes<'a>(
        def: &'a crate::registry::ResourceDef,
        namespace: Option<&'a str>,
        subresource: Option<&'a str>,
        operation: super::super::Operation,
    ) -> Attributes<'a> {
        Attributes {
            def,
            namespace,
            name: "x",
            subresource,
            operation,
            old_object: None,
            dry_run: false,
        }
    }

    #[test]
    fn rules_match_operation_group_version_resource_and_scope() {
        use super::super::Operation::*;
        let registry = Registry::new(crate::registry::builtin_resources());
        let pods = registry.get("", "v1", "pods").unwrap();
        let namespaces = registry.get("", "v1", "namespaces").unwrap();
        let rule = json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
            "resources": ["pods"]});
        assert!(rule_matches(
            &rule,
            &attributes(&pods, Some("a"), None, Create)
        ));
        assert!(!rule_matches(
            &rule,
            &attributes(&pods, Some("a"), None, Update)
        ));
        // `pods` does not cover `pods/status`; `pods/*` and `*/*` do, `*` does not.
        assert!(!rule_matches(
            &rule,
            &attributes(&pods, Some("a"), Some("status"), Create)
        ));
        for (resources, status) in [
            (json!(["pods/*"]), true),
            (json!(["*/*"]), true),
            (json!(["*"]), false),
            (json!(["pods/status"]), true),
        ] {
            let rule = json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"],
                "resources": resources});
            assert_eq!(
                rule_matches(&rule, &attributes(&pods, Some("a"), Some("status"), Update)),
                status,
                "{resources}"
            );
        }
        let cluster = json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"],
            "resources": ["*"], "scope": "Cluster"});
        assert!(!rule_matches(
            &cluster,
            &attributes(&pods, Some("a"), None, Create)
        ));
        assert!(rule_matches(
            &cluster,
            &attributes(&namespaces, None, None, Delete)
        ));
        let namespaced = json!({"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"],
            "resources": ["*"], "scope": "Namespaced"});
        assert!(rule_matches(
            &namespaced,
            &attributes(&pods, Some("a"), None, Create)
        ));
        assert!(!rule_matches(
            &namespaced,
            &attributes(&namespaces, None, None, Create)
        ));
    }

    #[test]
    fn object_selectors_match_the_new_or_the_old_labels() {
        let selector = json!({"matchLabels": {"webhook": "on"}});
        let on = json!({"metadata": {"labels": {"webhook": "on"}}});
        let off = json!({"metadata": {}});
        assert!(object_selected(&json!({}), None, None));
        assert!(object_selected(&selector, Some(&on), None));
        assert!(object_selected(&selector, Some(&off), Some(&on)));
        assert!(!object_selected(&selector, Some(&off), None));
    }
}
