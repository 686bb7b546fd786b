//! Admission policies in CEL (`admissionregistration.k8s.io/v1`), kube-apiserver's
//! ValidatingAdmissionPolicy plugin: a policy says what to check (`validations`, with
//! `variables`, `matchConditions`, `auditAnnotations`) and on which requests
//! (`matchConstraints`); a binding puts it to work for a further-narrowed set of requests
//! (`matchResources`), with its own parameters (`paramRef`, objects of the policy's
//! `paramKind`) and what a failure does (`validationActions`: Deny, Warn, Audit).
//!
//! Policies run in the validating phase, before validating webhooks, on every matching
//! write; their expressions are compiled once per policy revision ([`compiled`]) and any
//! that do not compile are refused when the policy is written ([`problems`]).

pub mod mutating;
pub mod validating;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use serde_json::Value;

use crate::admission::cel::{CelError, Expression};
use crate::admission::webhook::{Attributes, rules as webhook_rules};
use crate::engine::Engine;
use crate::error::{ApiError, Cause};
use crate::registry::ResourceDef;
use crate::request::{Params, Target};

/// The group of policies and bindings.
const GROUP: &str = "admissionregistration.k8s.io";

/// Whether a policy's or a binding's `matchResources` select the request: one of the
/// `resourceRules` covers it (and its `resourceNames`, if any, name the object), none of
/// the `excludeResourceRules` does, and the namespace and object selectors match.
/// A missing `matchResources` matches everything (what a binding without one means).
pub(crate) async fn resources_match(
    engine: &Engine,
    match_resources: &Value,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<bool, ApiError> {
    if match_resources.is_null() {
        return Ok(true);
    }
    let covers = |rule: &Value| {
        let named = rule["resourceNames"]
            .as_array()
            .is_none_or(|names| names.is_empty() || names.iter().any(|n| n == attributes.name));
        named && webhook_rules::rule_matches(rule, attributes)
    };
    let rules = match_resources["resourceRules"].as_array();
    // A binding may leave resourceRules out to mean "whatever the policy matches".
    if rules.is_some_and(|r| !r.iter().any(covers)) {
        return Ok(false);
    }
    if match_resources["excludeResourceRules"]
        .as_array()
        .is_some_and(|r| r.iter().any(covers))
    {
        return Ok(false);
    }
    if !webhook_rules::object_selected(
        &match_resources["objectSelector"],
        object,
        attributes.old_object,
    ) {
        return Ok(false);
    }
    webhook_rules::namespace_selected(
        engine,
        &match_resources["namespaceSelector"],
        attributes,
        object,
    )
    .await
}

/// Every object of a cluster-scoped admission registration resource (`plural`).
async fn list(engine: &Engine, plural: &str) -> Result<Vec<Value>, ApiError> {
    let Some(def) = engine.registry.get(GROUP, "v1", plural) else {
        return Ok(Vec::new());
    };
    let target = Target {
        def,
        namespace: None,
        name: None,
        subresource: None,
    };
    let list = engine.list(&target, &Params::default()).await?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// The resource of the given `apiVersion` and `kind` (a policy's `paramKind`).
fn resource_of_kind(engine: &Engine, api_version: &str, kind: &str) -> Option<Arc<ResourceDef>> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    engine
        .registry
        .resources(group, version)?
        .into_iter()
        .find(|def| def.kind == kind)
}

/// One expression of a policy: where it is written, and what it compiled to.
#[derive(Debug, Clone)]
pub(crate) struct Compiled {
    pub field: String,
    pub expression: Expression,
}

/// Compiles the expression at `field` of a policy; `None` when it is absent. A mutation's
/// (`objects`) may construct `Object{…}` values.
fn compile_at(
    spec: &Value,
    pointer: &str,
    field: String,
    objects: bool,
) -> Option<Result<Compiled, Cause>> {
    let source = spec.pointer(pointer)?.as_str()?;
    let compiled = if objects {
        Expression::compile_with_objects(source)
    } else {
        Expression::compile(source)
    };
    Some(
        compiled
            .map(|expression| Compiled {
                field: field.clone(),
                expression,
            })
            .map_err(|e| compile_cause(&field, source, &e)),
    )
}

fn compile_cause(field: &str, source: &str, error: &CelError) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message: format!("Invalid value: {source:?}: {error}"),
        field: field.to_owned(),
    }
}

/// What is wrong with the CEL of a policy, binding, or webhook configuration being
/// written: every expression must compile.
pub fn problems(def: &ResourceDef, object: &Value) -> Vec<Cause> {
    if def.group != GROUP {
        return Vec::new();
    }
    let mut causes = Vec::new();
    let mut check = |pointer: String, field: String| {
        let objects = pointer.contains("/mutations/");
        if let Some(Err(cause)) = compile_at(object, &pointer, field, objects) {
            causes.push(cause);
        }
    };
    let count = |pointer: &str| {
        object
            .pointer(pointer)
            .and_then(Value::as_array)
            .map_or(0, Vec::len)
    };
    match def.kind.as_str() {
        "ValidatingAdmissionPolicy" | "MutatingAdmissionPolicy" => {
            for (list, fields) in [
                ("validations", &["expression", "messageExpression"][..]),
                ("variables", &["expression"][..]),
                ("matchConditions", &["expression"][..]),
                ("auditAnnotations", &["valueExpression"][..]),
            ] {
                for i in 0..count(&format!("/spec/{list}")) {
                    for field in fields {
                        check(
                            format!("/spec/{list}/{i}/{field}"),
                            format!("spec.{list}[{i}].{field}"),
                        );
                    }
                }
            }
            for i in 0..count("/spec/mutations") {
                for (pointer, field) in [
                    (
                        "applyConfiguration/expression",
                        "applyConfiguration.expression",
                    ),
                    ("jsonPatch/expression", "jsonPatch.expression"),
                ] {
                    check(
                        format!("/spec/mutations/{i}/{pointer}"),
                        format!("spec.mutations[{i}].{field}"),
                    );
                }
            }
        }
        "ValidatingWebhookConfiguration" | "MutatingWebhookConfiguration" => {
            for w in 0..count("/webhooks") {
                for c in 0..count(&format!("/webhooks/{w}/matchConditions")) {
                    check(
                        format!("/webhooks/{w}/matchConditions/{c}/expression"),
                        format!("webhooks[{w}].matchConditions[{c}].expression"),
                    );
                }
            }
        }
        _ => {}
    }
    causes
}

/// Compiled policies, by uid and resourceVersion: a policy's expressions are compiled once
/// per revision, not once per request.
pub(crate) type Cache<T> = LazyLock<Mutex<HashMap<String, Arc<T>>>>;

/// The compiled form of `policy`, from `cache` when this revision was seen before.
pub(crate) fn compiled<T>(cache: &Cache<T>, policy: &Value, compile: fn(&Value) -> T) -> Arc<T> {
    let meta = &policy["metadata"];
    let key = format!(
        "{}/{}",
        meta["uid"].as_str().unwrap_or_default(),
        meta["resourceVersion"].as_str().unwrap_or_default()
    );
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(hit) = cache.get(&key) {
        return Arc::clone(hit);
    }
    let compiled = Arc::new(compile(policy));
    // Old revisions go once the cache outgrows any sensible number of live policies.
    if cache.len() > 4096 {
        cache.clear();
    }
    cache.insert(key, Arc::clone(&compiled));
    compiled
}

/// The parameter objects a binding evaluates its policy with.
pub(crate) enum ParamSet {
    /// None found and `parameterNotFoundAction: Allow`: the binding does nothing.
    Allow,
    /// One evaluation per entry; `None` when the policy takes no parameters.
    Each(Vec<Option<Value>>),
}

pub(crate) async fn params(
    engine: &Engine,
    policy: &str,
    param_kind: Option<&(String, String)>,
    binding: &Value,
    attributes: &Attributes<'_>,
) -> Result<ParamSet, String> {
    let Some((api_version, kind)) = param_kind else {
        return Ok(ParamSet::Each(vec![None]));
    };
    let param_ref = &binding["paramRef"];
    if param_ref.is_null() {
        return Err(format!(
            "policy {policy} has paramKind {kind} but its binding has no paramRef"
        ));
    }
    let def = resource_of_kind(engine, api_version, kind).ok_or_else(|| {
        format!("failed to find resource referenced by paramKind: '{api_version}, Kind={kind}'")
    })?;
    let namespace = match param_ref["namespace"].as_str() {
        Some(ns) if !ns.is_empty() => Some(ns.to_owned()),
        _ if def.namespaced => match attributes.namespace {
            Some(ns) => Some(ns.to_owned()),
            None => {
                return Err(
                    "cannot use namespaced paramRef in policy binding that matches cluster-scoped resources"
                        .into(),
                );
            }
        },
        _ => None,
    };
    let found: Vec<Value> = match param_ref["name"].as_str().filter(|n| !n.is_empty()) {
        Some(name) => {
            let target = Target {
                def: Arc::clone(&def),
                namespace: namespace.clone(),
                name: Some(name.to_owned()),
                subresource: None,
            };
            match engine.get(&target).await {
                Ok(object) => vec![object],
                Err(ApiError::NotFound { .. }) => Vec::new(),
                Err(e) => return Err(e.to_string()),
            }
        }
        None => {
            let target = Target {
                def: Arc::clone(&def),
                namespace: namespace.clone(),
                name: None,
                subresource: None,
            };
            let list = engine
                .list(&target, &Params::default())
                .await
                .map_err(|e| e.to_string())?;
            let selector = &param_ref["selector"];
            list["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|o| crate::admission::selector_matches(selector, &o["metadata"]["labels"]))
                .cloned()
                .collect()
        }
    };
    if found.is_empty() {
        return if param_ref["parameterNotFoundAction"] == "Deny" {
            Err("no params found for policy binding with `Deny` parameterNotFoundAction".into())
        } else {
            Ok(ParamSet::Allow)
        };
    }
    Ok(ParamSet::Each(found.into_iter().map(Some).collect()))
}

/// The request's namespace, as `namespaceObject` (null for cluster-scoped requests).
pub(crate) async fn namespace_of(
    engine: &Engine,
    attributes: &Attributes<'_>,
) -> Result<Option<Value>, ApiError> {
    let Some(namespace) = attributes.namespace else {
        return Ok(None);
    };
    let target = Target::parse(
        &engine.registry,
        "",
        "v1",
        &format!("namespaces/{namespace}"),
    )?;
    match engine.get(&target).await {
        Ok(ns) => Ok(Some(ns)),
        Err(ApiError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
