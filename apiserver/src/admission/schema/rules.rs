//! A CRD schema's `x-kubernetes-validations`: CEL rules over `self` (the value at the
//! rule's node) and, in transition rules, `oldSelf` (the same value before an update).
//!
//! Rules are checked when the CRD is written — each must compile and its worst-case cost,
//! from the schema's bounds, must fit kube-apiserver's budget ([`problems`]) — and evaluated
//! on every write of a custom resource once the rest of its schema holds ([`check`]). A
//! transition rule runs only where the old value can be found: under an unchanged property
//! path, a map's same key, or a `listType: map` list's item with the same keys.

use serde_json::Value;

use super::Structural;
use crate::admission::cel::{self, Activation, CelError, Expression, Shape, Sizes};
use crate::error::Cause;

/// One compiled rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    rule: Expression,
    message: Option<String>,
    message_expression: Option<Expression>,
    reason: Reason,
    field_path: Option<String>,
    /// It mentions `oldSelf`: evaluated on updates only, where the old value exists.
    transition: bool,
    /// `optionalOldSelf`: evaluated on creates too, `oldSelf` then a null.
    optional_old_self: bool,
}

/// What a failed rule reports, as the rule's `reason` says.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Reason {
    Invalid,
    Forbidden,
    Required,
    Duplicate,
}

impl Reason {
    fn parse(text: Option<&str>) -> Option<Reason> {
        match text {
            None | Some("FieldValueInvalid") => Some(Reason::Invalid),
            Some("FieldValueForbidden") => Some(Reason::Forbidden),
            Some("FieldValueRequired") => Some(Reason::Required),
            Some("FieldValueDuplicate") => Some(Reason::Duplicate),
            Some(_) => None,
        }
    }
}

/// The rules of one schema node; those that do not compile are left out.
pub(super) fn compile_all(rules: Option<&Value>) -> Vec<Rule> {
    let Some(rules) = rules.and_then(Value::as_array) else {
        return Vec::new();
    };
    rules.iter().filter_map(|r| compile(r).ok()).collect()
}

/// Compiles one rule, or says what is wrong with it as `(field under the rule, message)`.
fn compile(rule: &Value) -> Result<Rule, (&'static str, String)> {
    let text = rule["rule"].as_str().unwrap_or_default();
    let expression = Expression::compile(text).map_err(|e| ("rule", e.to_string()))?;
    let message_expression = match rule["messageExpression"].as_str() {
        Some(source) => Some(
            Expression::compile(source)
                .map_err(|e| ("messageExpression", format!("messageExpression {e}")))?,
        ),
        None => None,
    };
    let reason = Reason::parse(rule["reason"].as_str()).ok_or((
        "reason",
        "Unsupported value: supported values: \"FieldValueInvalid\", \"FieldValueForbidden\", \"FieldValueRequired\", \"FieldValueDuplicate\"".to_owned(),
    ))?;
    let optional_old_self = rule["optionalOldSelf"].as_bool().unwrap_or(false);
    let transition = expression.references("oldSelf");
    if optional_old_self && !transition {
        return Err((
            "optionalOldSelf",
            "Forbidden: may not be set if oldSelf is not used in rule".to_owned(),
        ));
    }
    Ok(Rule {
        rule: expression,
        message: rule["message"].as_str().map(str::to_owned),
        message_expression,
        reason,
        field_path: rule["fieldPath"].as_str().map(str::to_owned),
        transition,
        optional_old_self,
    })
}

/// What is wrong with the rules anywhere in the schema `schema` (at `path`, for the causes'
/// field names): rules that do not compile, and rules whose cost is over the budget.
pub fn problems(schema: &Value, path: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    walk_schema(schema, path, &mut causes);
    causes
}

fn walk_schema(schema: &Value, path: &str, causes: &mut Vec<Cause>) {
    let Some(map) = schema.as_object() else {
        return;
    };
    if let Some(rules) = map
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        let node = Structural::compile(schema);
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("{path}.x-kubernetes-validations[{i}]");
            match compile(rule) {
                Err((field, message)) => causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    message: format!(
                        "Invalid value: {}: {message}",
                        rule.get(field).unwrap_or(&Value::Null)
                    ),
                    field: format!("{at}.{field}"),
                }),
                Ok(compiled) => {
                    let shapes = [
                        ("self", Shape::Schema(&node)),
                        ("oldSelf", Shape::Schema(&node)),
                    ];
                    let checks = [Some(&compiled.rule), compiled.message_expression.as_ref()];
                    for (field, expression) in ["rule", "messageExpression"].iter().zip(checks) {
                        let Some(expression) = expression else {
                            continue;
                        };
                        if let Err(e) =
                            expression.check_cost(&shapes, Sizes::UNBOUNDED, cel::STATIC_COST_LIMIT)
                        {
                            causes.push(Cause {
                                reason: "FieldValueForbidden".into(),
                                message: format!("Forbidden: {e}"),
                                field: format!("{at}.{field}"),
                            });
                        }
                    }
                }
            }
        }
    }
    if let Some(properties) = map.get("properties").and_then(Value::as_object) {
        for (name, sub) in properties {
            walk_schema(sub, &format!("{path}.properties[{name}]"), causes);
        }
    }
    if let Some(items) = map.get("items") {
        walk_schema(items, &format!("{path}.items"), causes);
    }
    if let Some(values) = map.get("additionalProperties").filter(|v| v.is_object()) {
        walk_schema(values, &format!("{path}.additionalProperties"), causes);
    }
}

/// Every rule `object` breaks, against `old` (the stored object) on an update.
pub fn check(schema: &Structural, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    visit(schema, object, old, "", &mut causes);
    causes
}

fn visit(
    schema: &Structural,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    if !schema.rules_below {
        return;
    }
    for rule in &schema.rules {
        evaluate(rule, value, old, path, causes);
    }
    match value {
        Value::Object(map) => {
            let old_map = old.and_then(Value::as_object);
            for (key, child) in map {
                if let Some(sub) = schema.cel_field(key) {
                    let old_child = old_map.and_then(|m| m.get(key));
                    visit(sub, child, old_child, &super::join(path, key), causes);
                }
            }
        }
        Value::Array(items) => {
            let Some(sub) = schema.items.as_deref() else {
                return;
            };
            let old_items = old.and_then(Value::as_array);
            for (i, item) in items.iter().enumerate() {
                let old_item =
                    old_items.and_then(|olds| same_item(&schema.list_map_keys, item, olds));
                visit(sub, item, old_item, &format!("{path}[{i}]"), causes);
            }
        }
        _ => {}
    }
}

/// The old item a `listType: map` item corresponds to: the one with the same keys.
fn same_item<'a>(keys: &[String], item: &Value, olds: &'a [Value]) -> Option<&'a Value> {
    if keys.is_empty() {
        return None;
    }
    olds.iter()
        .find(|old| keys.iter().all(|k| old.get(k) == item.get(k)))
}

fn evaluate(rule: &Rule, value: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    if rule.transition && old.is_none() && !rule.optional_old_self {
        return;
    }
    let mut vars = Activation::new();
    vars.bind_json("self", Some(value));
    if rule.transition {
        vars.bind_json("oldSelf", old);
    }
    // `fieldPath` is relative to the rule's node: `.spec.x` or `['key']`.
    let field = match &rule.field_path {
        Some(sub) if path.is_empty() => sub.trim_start_matches('.').to_owned(),
        Some(sub) => format!("{path}{sub}"),
        None => path.to_owned(),
    };
    let shown = super::short(&Value::String(kind_of(value).into()));
    match rule.rule.eval_bool(&vars) {
        Ok(true) => {}
        Ok(false) => {
            let message = rule
                .message_expression
                .as_ref()
                .and_then(|e| e.eval_string(&vars).ok().filter(|m| !m.trim().is_empty()))
                .or_else(|| rule.message.clone())
                .unwrap_or_else(|| format!("failed rule: {}", rule.rule.source()));
            let (reason, message) = match rule.reason {
                Reason::Invalid => (
                    "FieldValueInvalid",
                    format!("Invalid value: {shown}: {message}"),
                ),
                Reason::Forbidden => ("FieldValueForbidden", format!("Forbidden: {message}")),
                Reason::Required => ("FieldValueRequired", format!("Required value: {message}")),
                Reason::Duplicate => ("FieldValueDuplicate", format!("Duplicate value: {shown}")),
            };
            causes.push(Cause {
                reason: reason.into(),
                message,
                field,
            });
        }
        Err(e) => causes.push(Cause {
            reason: "FieldValueInvalid".into(),
            message: format!(
                "Invalid value: {shown}: {}",
                evaluation_error(&e, &rule.rule)
            ),
            field,
        }),
    }
}

fn evaluation_error(error: &CelError, rule: &Expression) -> String {
    format!("rule evaluation error: {error} (rule: {})", rule.source())
}

/// The schema type name Kubernetes shows for a value in a rule's message.
fn kind_of(value: &Value) -> &'static str {
    match value {
        Value::Object(_) => "object",
        Value::Array(_) => "array",
        Value::String(_) => "string",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "x-kubernetes-validations": [
                        {"rule": "self.replicas <= self.maxReplicas",
                         "messageExpression": "'replicas ' + string(self.replicas) + ' over ' + string(self.maxReplicas)"},
                        {"rule": "self.mode == oldSelf.mode", "message": "mode is immutable",
                         "reason": "FieldValueForbidden"},
                    ],
                    "properties": {
                        "replicas": {"type": "integer"},
                        "maxReplicas": {"type": "integer"},
                        "mode": {"type": "string"},
                        "tags": {"type": "array", "maxItems": 8,
                                 "items": {"type": "string", "maxLength": 16},
                                 "x-kubernetes-validations": [{"rule": "self.all(t, t.matches('^[a-z]+$'))"}]},
                    }
                }
            }
        })
    }

    #[test]
    fn rules_and_transition_rules() {
        let schema = Structural::compile(&schema());
        let good = json!({"spec": {"replicas": 1, "maxReplicas": 3, "mode": "a", "tags": ["x"]}});
        assert!(check(&schema, &good, None).is_empty());
        let over = json!({"spec": {"replicas": 5, "maxReplicas": 3, "mode": "a"}});
        let causes = check(&schema, &over, None);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec");
        assert_eq!(
            causes[0].message,
            "Invalid value: \"object\": replicas 5 over 3"
        );
        // The transition rule runs on updates only.
        let changed = json!({"spec": {"replicas": 1, "maxReplicas": 3, "mode": "b"}});
        assert!(check(&schema, &changed, None).is_empty());
        let causes = check(&schema, &changed, Some(&good));
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].reason, "FieldValueForbidden");
        assert_eq!(causes[0].message, "Forbidden: mode is immutable");
        let bad_tag =
            json!({"spec": {"replicas": 1, "maxReplicas": 3, "mode": "a", "tags": ["X"]}});
        let causes = check(&schema, &bad_tag, None);
        assert_eq!(causes[0].field, "spec.tags");
    }

    #[test]
    fn bad_rules_are_refused_when_written() {
        assert!(
            problems(&schema(), "s").is_empty(),
            "{:?}",
            problems(&schema(), "s")
        );
        let bad = json!({"type": "object", "x-kubernetes-validations": [{"rule": "self.a >"}]});
        let causes = problems(&bad, "s");
        assert_eq!(causes[0].field, "s.x-kubernetes-validations[0].rule");
        assert!(
            causes[0].message.contains("compilation failed"),
            "{causes:?}"
        );
        let costly = json!({"type": "array", "items": {"type": "string"},
            "x-kubernetes-validations": [{"rule": "self.all(x, self.all(y, x.contains(y)))"}]});
        let causes = problems(&costly, "s");
        assert_eq!(causes[0].reason, "FieldValueForbidden");
        assert!(causes[0].message.contains("exceeds budget"), "{causes:?}");
    }
}
