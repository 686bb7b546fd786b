//! ValidatingAdmissionPolicy: each binding whose policy matches the request evaluates the
//! policy's `matchConditions`, then its `variables`, then its `validations`, once per
//! parameter object, with kube-apiserver's variables bound — `object`, `oldObject`,
//! `request`, `params`, `namespaceObject`, `variables`.
//!
//! A validation that is false fails with its `message` (or `messageExpression`, or
//! `failed expression: …`); one that errors fails under `failurePolicy: Fail` and is
//! skipped under `Ignore`. The binding's `validationActions` say what a failure does:
//! `Deny` refuses the request (422 Invalid unless the validation's `reason` says 401, 403
//! or 413), `Warn` adds a `Warning` header, `Audit` is recorded nowhere yet (Orquestra has
//! no audit log) and changes nothing.

use std::collections::HashMap;

use ::cel::Value as CelValue;
use serde_json::{Value, json};

use super::{
    Compiled, ParamSet, compile_at, compiled, list, namespace_of, params, resources_match,
};
use crate::admission::cel::{self, Activation, Shape, Sizes};
use crate::admission::webhook::{self, Attributes};
use crate::engine::Engine;
use crate::error::{ApiError, Cause};

/// One validation.
#[derive(Debug)]
struct Validation {
    expression: Compiled,
    message: Option<String>,
    message_expression: Option<Compiled>,
    reason: Option<String>,
}

/// A policy, compiled.
#[derive(Debug)]
pub struct Policy {
    name: String,
    /// `paramKind` as (apiVersion, kind).
    param_kind: Option<(String, String)>,
    match_constraints: Value,
    match_conditions: Vec<(String, Compiled)>,
    variables: Vec<(String, Compiled)>,
    validations: Vec<Validation>,
    /// `failurePolicy: Ignore` (the default is Fail).
    ignore_failures: bool,
    /// Expressions that did not compile (a policy stored before they were checked): each
    /// evaluation of the policy fails with them.
    broken: Vec<Cause>,
}

impl Policy {
    /// Compiles a stored policy.
    pub fn compile(policy: &Value) -> Policy {
        let spec = &policy["spec"];
        let mut broken = Vec::new();
        let mut take =
            |pointer: String, field: String| match compile_at(spec, &pointer, field, false) {
                Some(Ok(compiled)) => Some(compiled),
                Some(Err(cause)) => {
                    broken.push(cause);
                    None
                }
                None => None,
            };
        let named = |list: &str, take: &mut dyn FnMut(String, String) -> Option<Compiled>| {
            spec[list]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, item)| {
                    let name = item["name"].as_str().unwrap_or_default().to_owned();
                    take(
                        format!("/{list}/{i}/expression"),
                        format!("spec.{list}[{i}].expression"),
                    )
                    .map(|c| (name, c))
                })
                .collect::<Vec<_>>()
        };
        let match_conditions = named("matchConditions", &mut take);
        let variables = named("variables", &mut take);
        let mut validations = Vec::new();
        for (i, v) in spec["validations"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let expression = take(
                format!("/validations/{i}/expression"),
                format!("spec.validations[{i}].expression"),
            );
            let message_expression = take(
                format!("/validations/{i}/messageExpression"),
                format!("spec.validations[{i}].messageExpression"),
            );
            if let Some(expression) = expression {
                validations.push(Validation {
                    expression,
                    message: v["message"].as_str().map(str::to_owned),
                    message_expression,
                    reason: v["reason"].as_str().map(str::to_owned),
                });
            }
        }
        let param_kind = spec["paramKind"].as_object().map(|p| {
            let text = |k: &str| {
                p.get(k)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            (text("apiVersion"), text("kind"))
        });
        Policy {
            name: policy["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            param_kind,
            match_constraints: spec["matchConstraints"].clone(),
            match_conditions,
            variables,
            validations,
            ignore_failures: spec["failurePolicy"] == "Ignore",
            broken,
        }
    }
}

static CACHE: super::Cache<Policy> = std::sync::LazyLock::new(Default::default);

/// One failed validation of one binding.
#[derive(Debug)]
struct Failure {
    message: String,
    reason: Option<String>,
}

/// Runs every binding that matches the request; the first whose policy fails with `Deny`
/// among its actions refuses it.
pub async fn validate(
    engine: &Engine,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<(), ApiError> {
    if attributes.exempt() {
        return Ok(());
    }
    let bindings = list(engine, "validatingadmissionpolicybindings").await?;
    if bindings.is_empty() {
        return Ok(());
    }
    let policies: HashMap<String, Value> = list(engine, "validatingadmissionpolicies")
        .await?
        .into_iter()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p,
            )
        })
        .collect();
    let mut namespace_object: Option<Option<Value>> = None;
    for binding in &bindings {
        let spec = &binding["spec"];
        let Some(stored) = spec["policyName"].as_str().and_then(|n| policies.get(n)) else {
            continue;
        };
        let policy = compiled(&CACHE, stored, Policy::compile);
        if policy.match_constraints.is_null()
            || !resources_match(engine, &policy.match_constraints, attributes, object).await?
            || !resources_match(engine, &spec["matchResources"], attributes, object).await?
        {
            continue;
        }
        if namespace_object.is_none() {
            namespace_object = Some(namespace_of(engine, attributes).await?);
        }
        let binding_name = binding["metadata"]["name"].as_str().unwrap_or_default();
        let failures = match params(
            engine,
            &policy.name,
            policy.param_kind.as_ref(),
            spec,
            attributes,
        )
        .await
        {
            Err(message) => vec![Failure {
                message,
                reason: None,
            }],
            Ok(ParamSet::Allow) => continue,
            Ok(ParamSet::Each(params)) => params
                .iter()
                .flat_map(|p| {
                    evaluate(
                        &policy,
                        attributes,
                        object,
                        p.as_ref(),
                        namespace_object.as_ref().and_then(Option::as_ref),
                    )
                })
                .collect(),
        };
        let Some(failure) = failures.into_iter().next() else {
            continue;
        };
        act(
            &policy.name,
            binding_name,
            &spec["validationActions"],
            failure,
            attributes,
        )?;
    }
    Ok(())
}

/// Evaluates a policy for one parameter object; its failures (empty: it passed, or did not
/// apply by its match conditions).
fn evaluate(
    policy: &Policy,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
    params: Option<&Value>,
    namespace_object: Option<&Value>,
) -> Vec<Failure> {
    let fail = |message: String| Failure {
        message,
        reason: None,
    };
    if !policy.broken.is_empty() {
        if policy.ignore_failures {
            return Vec::new();
        }
        let what: Vec<String> = policy
            .broken
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        return vec![fail(format!(
            "policy does not compile: {}",
            what.join("; ")
        ))];
    }
    let request = webhook::call::request("", attributes, object)["request"].clone();
    let mut vars = Activation::new();
    vars.bind_json("object", object)
        .bind_json("oldObject", attributes.old_object)
        .bind_json("params", params)
        .bind_json("namespaceObject", namespace_object)
        .bind_json("request", Some(&request))
        .bind(
            "variables",
            CelValue::from(HashMap::<String, CelValue>::new()),
        );
    let values = [object, attributes.old_object, params, namespace_object];
    let sizes = Sizes::of(values.into_iter().flatten());
    let shapes = [
        ("object", object.map_or(Shape::Unknown, Shape::json)),
        (
            "oldObject",
            attributes.old_object.map_or(Shape::Unknown, Shape::json),
        ),
        ("params", params.map_or(Shape::Unknown, Shape::json)),
        (
            "namespaceObject",
            namespace_object.map_or(Shape::Unknown, Shape::json),
        ),
        ("request", Shape::json(&request)),
    ];
    // Runs one expression within the per-call budget.
    let run = |compiled: &Compiled, vars: &Activation| -> Result<CelValue, String> {
        compiled
            .expression
            .check_cost(&shapes, sizes, cel::PER_CALL_LIMIT)
            .and_then(|()| compiled.expression.eval(vars))
            .map_err(|e| {
                format!(
                    "expression '{}' resulted in error: {e}",
                    compiled.expression.source()
                )
            })
    };
    for (_, condition) in &policy.match_conditions {
        match run(condition, &vars) {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => return Vec::new(),
            Ok(other) => {
                if !policy.ignore_failures {
                    return vec![fail(format!(
                        "matchCondition {} must evaluate to bool, not {}",
                        condition.field,
                        other.type_of()
                    ))];
                }
                return Vec::new();
            }
            Err(e) if policy.ignore_failures => {
                tracing::debug!(policy = %policy.name, "match condition failed: {e}");
                return Vec::new();
            }
            Err(e) => return vec![fail(e)],
        }
    }
    // Variables in order, each seeing those before it; one that fails is left unset, so
    // only the expressions that use it fail.
    let mut variables = HashMap::new();
    for (name, compiled) in &policy.variables {
        if let Ok(value) = run(compiled, &vars) {
            variables.insert(name.clone(), value);
            vars.bind("variables", CelValue::from(variables.clone()));
        }
    }
    let mut failures = Vec::new();
    for validation in &policy.validations {
        match run(&validation.expression, &vars) {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => {
                let message = validation
                    .message_expression
                    .as_ref()
                    .and_then(|m| match run(m, &vars) {
                        Ok(CelValue::String(s)) if !s.trim().is_empty() => Some(s.to_string()),
                        _ => None,
                    })
                    .or_else(|| validation.message.clone())
                    .unwrap_or_else(|| {
                        format!(
                            "failed expression: {}",
                            validation.expression.expression.source()
                        )
                    });
                failures.push(Failure {
                    message,
                    reason: validation.reason.clone(),
                });
            }
            Ok(other) if !policy.ignore_failures => failures.push(fail(format!(
                "expression '{}' must evaluate to bool, not {}",
                validation.expression.expression.source(),
                other.type_of()
            ))),
            Err(e) if !policy.ignore_failures => failures.push(fail(e)),
            _ => {}
        }
    }
    failures
}

/// What a binding's `validationActions` make of a failure.
fn act(
    policy: &str,
    binding: &str,
    actions: &Value,
    failure: Failure,
    attributes: &Attributes<'_>,
) -> Result<(), ApiError> {
    let has = |action: &str| {
        actions
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == action))
    };
    if has("Warn") {
        webhook::warn([format!(
            "Validation failed for ValidatingAdmissionPolicy '{policy}' with binding '{binding}': {}",
            failure.message
        )]);
    }
    if !has("Deny") {
        return Ok(());
    }
    let message = format!(
        "ValidatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: {}",
        failure.message
    );
    let def = attributes.def;
    let (reason, code) = match failure.reason.as_deref() {
        Some("Forbidden") => ("Forbidden", 403),
        Some("Unauthorized") => ("Unauthorized", 401),
        Some("RequestEntityTooLarge") => ("RequestEntityTooLarge", 413),
        _ => {
            return Err(ApiError::Invalid {
                kind: def.kind.clone(),
                name: attributes.name.to_owned(),
                group: def.group.clone(),
                causes: vec![Cause {
                    reason: "FieldValueInvalid".into(),
                    message,
                    field: String::new(),
                }],
            });
        }
    };
    Err(ApiError::Rejected(Box::new(json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
        "details": {"name": attributes.name, "group": def.group, "kind": def.plural},
    }))))
}
