//! MutatingAdmissionPolicy: each binding whose policy matches a create or update (or a
//! connect) evaluates the policy's `matchConditions` and `variables`, then applies its
//! `mutations` in order, each seeing the object as the ones before left it:
//!
//! - `ApplyConfiguration`: the expression builds a partial object
//!   (`Object{spec: Object.spec{replicas: 3}}`) merged into the object — maps by key, lists
//!   by their strategic merge keys for built-in kinds, as server-side apply merges them;
//! - `JSONPatch`: the expression builds a list of `JSONPatch{op, path, value}` operations.
//!
//! Policies run before mutating webhooks; what they change gets the kind's defaults again.
//! An expression that fails, or a patch that does not apply, refuses the request under
//! `failurePolicy: Fail` and is skipped under `Ignore`. With `reinvocationPolicy: IfNeeded`
//! a policy runs once more when a later policy changed the object.

use std::collections::HashMap;

use ::cel::Value as CelValue;
use serde_json::Value;

use super::{
    Compiled, ParamSet, compile_at, compiled, list, namespace_of, params, resources_match,
};
use crate::admission::cel::{self, Activation, Shape, Sizes, to_json};
use crate::admission::webhook::{Attributes, Operation};
use crate::engine::Engine;
use crate::error::{ApiError, Cause};

/// How a mutation's result is applied.
#[derive(Debug, Clone, Copy, PartialEq)]
enum PatchType {
    ApplyConfiguration,
    JsonPatch,
}

/// A policy, compiled.
#[derive(Debug)]
pub struct Policy {
    name: String,
    param_kind: Option<(String, String)>,
    match_constraints: Value,
    match_conditions: Vec<Compiled>,
    variables: Vec<(String, Compiled)>,
    mutations: Vec<(PatchType, Compiled)>,
    ignore_failures: bool,
    reinvoke: bool,
    broken: Vec<Cause>,
}

impl Policy {
    /// Compiles a stored policy.
    pub fn compile(policy: &Value) -> Policy {
        let spec = &policy["spec"];
        let mut broken = Vec::new();
        let mut take = |pointer: String, field: String, objects: bool| match compile_at(
            spec, &pointer, field, objects,
        ) {
            Some(Ok(compiled)) => Some(compiled),
            Some(Err(cause)) => {
                broken.push(cause);
                None
            }
            None => None,
        };
        let items = |list: &str| spec[list].as_array().cloned().unwrap_or_default();
        let match_conditions = (0..items("matchConditions").len())
            .filter_map(|i| {
                take(
                    format!("/matchConditions/{i}/expression"),
                    format!("spec.matchConditions[{i}].expression"),
                    false,
                )
            })
            .collect();
        let variables = items("variables")
            .iter()
            .enumerate()
            .filter_map(|(i, v)| {
                let name = v["name"].as_str().unwrap_or_default().to_owned();
                take(
                    format!("/variables/{i}/expression"),
                    format!("spec.variables[{i}].expression"),
                    false,
                )
                .map(|c| (name, c))
            })
            .collect();
        let mutations = items("mutations")
            .iter()
            .enumerate()
            .filter_map(|(i, m)| {
                let (kind, pointer, field) = match m["patchType"].as_str() {
                    Some("JSONPatch") => (PatchType::JsonPatch, "jsonPatch", "jsonPatch"),
                    _ => (
                        PatchType::ApplyConfiguration,
                        "applyConfiguration",
                        "applyConfiguration",
                    ),
                };
                take(
                    format!("/mutations/{i}/{pointer}/expression"),
                    format!("spec.mutations[{i}].{field}.expression"),
                    true,
                )
                .map(|c| (kind, c))
            })
            .collect();
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
            mutations,
            ignore_failures: spec["failurePolicy"] == "Ignore",
            reinvoke: spec["reinvocationPolicy"] == "IfNeeded",
            broken,
        }
    }
}

static CACHE: super::Cache<Policy> = std::sync::LazyLock::new(Default::default);

/// Runs the mutating policies that match on `object`.
pub async fn mutate(
    engine: &Engine,
    attributes: &Attributes<'_>,
    object: &mut Value,
) -> Result<(), ApiError> {
    if attributes.exempt() || attributes.operation == Operation::Delete {
        return Ok(());
    }
    let bindings = list(engine, "mutatingadmissionpolicybindings").await?;
    if bindings.is_empty() {
        return Ok(());
    }
    let policies: HashMap<String, Value> = list(engine, "mutatingadmissionpolicies")
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
    let namespace_object = namespace_of(engine, attributes).await?;
    // (policy, binding, params) of every binding that applies, in binding order.
    let mut applied = Vec::new();
    let mut changed_by = None;
    for binding in &bindings {
        let spec = &binding["spec"];
        let Some(stored) = spec["policyName"].as_str().and_then(|n| policies.get(n)) else {
            continue;
        };
        let policy = compiled(&CACHE, stored, Policy::compile);
        if policy.match_constraints.is_null()
            || !resources_match(engine, &policy.match_constraints, attributes, Some(object)).await?
            || !resources_match(engine, &spec["matchResources"], attributes, Some(object)).await?
        {
            continue;
        }
        let binding_name = binding["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let param_set = params(
            engine,
            &policy.name,
            policy.param_kind.as_ref(),
            spec,
            attributes,
        )
        .await
        .map_err(|message| refusal(&policy.name, &binding_name, &message, attributes))?;
        let ParamSet::Each(each) = param_set else {
            continue;
        };
        for params in each {
            let before = object.clone();
            run(
                &policy,
                &binding_name,
                attributes,
                object,
                params.as_ref(),
                namespace_object.as_ref(),
            )?;
            if *object != before {
                changed_by = Some(applied.len());
            }
            applied.push((policy.clone(), binding_name.clone(), params));
        }
    }
    // Reinvocation: a policy that asked for it runs once more if a later one changed the
    // object after it ran.
    if let Some(last) = changed_by {
        for (policy, binding, params) in applied.iter().take(last) {
            if policy.reinvoke {
                run(
                    policy,
                    binding,
                    attributes,
                    object,
                    params.as_ref(),
                    namespace_object.as_ref(),
                )?;
            }
        }
    }
    Ok(())
}

fn refusal(policy: &str, binding: &str, message: &str, attributes: &Attributes<'_>) -> ApiError {
    let def = attributes.def;
    ApiError::Invalid {
        kind: def.kind.clone(),
        name: attributes.name.to_owned(),
        group: def.group.clone(),
        causes: vec![Cause {
            reason: "FieldValueInvalid".into(),
            message: format!(
                "MutatingAdmissionPolicy '{policy}' with binding '{binding}' denied request: {message}"
            ),
            field: String::new(),
        }],
    }
}

/// Applies one policy's mutations for one parameter object.
fn run(
    policy: &Policy,
    binding: &str,
    attributes: &Attributes<'_>,
    object: &mut Value,
    params: Option<&Value>,
    namespace_object: Option<&Value>,
) -> Result<(), ApiError> {
    let fail = |message: String| -> Result<(), ApiError> {
        if policy.ignore_failures {
            tracing::debug!(policy = %policy.name, "mutation skipped: {message}");
            Ok(())
        } else {
            Err(refusal(&policy.name, binding, &message, attributes))
        }
    };
    if !policy.broken.is_empty() {
        let what: Vec<String> = policy.broken.iter().map(|c| c.message.clone()).collect();
        return fail(format!("policy does not compile: {}", what.join("; ")));
    }
    let request =
        crate::admission::webhook::call::request("", attributes, Some(object))["request"].clone();
    let mut vars = activation(object, attributes, params, namespace_object, &request);
    let evaluate = |compiled: &Compiled, object: &Value, vars: &Activation| {
        let values = [
            Some(object),
            attributes.old_object,
            params,
            namespace_object,
        ];
        let sizes = Sizes::of(values.into_iter().flatten());
        let shapes = [
            ("object", Shape::json(object)),
            (
                "oldObject",
                attributes.old_object.map_or(Shape::Unknown, Shape::json),
            ),
            ("params", params.map_or(Shape::Unknown, Shape::json)),
            (
                "namespaceObject",
                namespace_object.map_or(Shape::Unknown, Shape::json),
            ),
        ];
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
    for condition in &policy.match_conditions {
        match evaluate(condition, object, &vars) {
            Ok(CelValue::Bool(true)) => {}
            Ok(CelValue::Bool(false)) => return Ok(()),
            Ok(other) => {
                return fail(format!(
                    "{} must evaluate to bool, not {}",
                    condition.field,
                    other.type_of()
                ));
            }
            Err(e) => return fail(e),
        }
    }
    let mut variables = HashMap::new();
    for (name, compiled) in &policy.variables {
        if let Ok(value) = evaluate(compiled, object, &vars) {
            variables.insert(name.clone(), value);
            vars.bind("variables", CelValue::from(variables.clone()));
        }
    }
    for (kind, compiled) in &policy.mutations {
        let result = match evaluate(compiled, object, &vars) {
            Ok(value) => to_json(&value),
            Err(e) => return fail(e),
        };
        let patched = match kind {
            PatchType::ApplyConfiguration => apply_configuration(attributes, object, &result),
            PatchType::JsonPatch => {
                let mut patched = object.clone();
                crate::patch::json_patch(&mut patched, &result)
                    .map(|()| patched)
                    .map_err(|e| e.to_string())
            }
        };
        match patched {
            Ok(patched) => {
                *object = patched;
                // The next mutation sees this one's result.
                vars.bind_json("object", Some(object));
            }
            Err(e) => {
                return fail(format!(
                    "the {} of {} does not apply: {e}",
                    if *kind == PatchType::JsonPatch {
                        "JSON patch"
                    } else {
                        "apply configuration"
                    },
                    compiled.field
                ));
            }
        }
    }
    Ok(())
}

fn activation(
    object: &Value,
    attributes: &Attributes<'_>,
    params: Option<&Value>,
    namespace_object: Option<&Value>,
    request: &Value,
) -> Activation {
    let mut vars = Activation::new();
    vars.bind_json("object", Some(object))
        .bind_json("oldObject", attributes.old_object)
        .bind_json("params", params)
        .bind_json("namespaceObject", namespace_object)
        .bind_json("request", Some(request))
        .bind(
            "variables",
            CelValue::from(HashMap::<String, CelValue>::new()),
        );
    vars
}

/// Merges an apply configuration into `object`: strategically for built-in kinds (lists
/// with merge keys merged by key), as a JSON merge for the rest.
fn apply_configuration(
    attributes: &Attributes<'_>,
    object: &Value,
    configuration: &Value,
) -> Result<Value, String> {
    if !configuration.is_object() {
        return Err("the expression must build an Object{…}".into());
    }
    let def = attributes.def;
    match crate::smp::strategies(&def.group, &def.kind) {
        Some(schema) => crate::smp::apply(schema, object, configuration).map_err(|e| e.to_string()),
        None => {
            let mut merged = object.clone();
            crate::patch::merge(&mut merged, configuration);
            Ok(merged)
        }
    }
}
