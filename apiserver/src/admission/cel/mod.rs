//! CEL as Kubernetes uses it: one environment (the standard library, cel-go's strings and
//! lists extensions, and Kubernetes' own list, regex and quantity functions — [`library`]),
//! expressions compiled once when the object that holds them is written, and a cost
//! estimate ([`cost`]) that keeps any one evaluation bounded.
//!
//! kube-apiserver stops an evaluation whose running cost passes its budget. The interpreter
//! here (the `cel` crate) cannot be interrupted, so Orquestra bounds an evaluation before it
//! starts instead: the worst case for the sizes at hand — a CRD schema's `maxItems` and
//! `maxLength` when a rule is written, the largest list and string of the actual input when
//! a policy runs — must fit the budget. The estimate is conservative; what passes it runs
//! in bounded time.

pub mod cost;
pub mod library;

use std::sync::{Arc, LazyLock};

use cel::{Context, Env, Program, Value as CelValue};
use serde_json::Value;

pub use cost::{Shape, Sizes};

/// kube-apiserver's per-expression budget for an evaluation (`PerCallLimit`).
pub const PER_CALL_LIMIT: u64 = 1_000_000;

/// kube-apiserver's limit on a CRD rule's estimated cost (`StaticEstimatedCostLimit`).
pub const STATIC_COST_LIMIT: u64 = 10_000_000;

/// The longest expression accepted (kube-apiserver's `MaxExpressionLength`-like bound on
/// what is parsed at all).
const MAX_SOURCE_BYTES: usize = 5 * 1024;

/// Why an expression cannot be used or did not evaluate.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CelError {
    /// It does not parse (or uses a macro wrongly).
    #[error("compilation failed: {0}")]
    Compile(String),
    /// Its worst case is over the budget.
    #[error(
        "estimated rule cost exceeds budget by factor of {factor:.1}x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )]
    Cost {
        /// The estimate over the limit.
        factor: f64,
    },
    /// It ran and failed (a missing field, a type with no such overload, …).
    #[error("{0}")]
    Eval(String),
}

/// The environment every expression compiles and runs in.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    env.add_extension(cel::extensions::strings)
        .and_then(|()| env.add_extension(cel::extensions::lists))
        .and_then(|()| env.add_extension(library::extension))
        .expect("the Kubernetes CEL library declares each overload once");
    Arc::new(env)
});

/// A compiled expression and its source.
#[derive(Clone)]
pub struct Expression {
    source: Arc<str>,
    program: Arc<Program>,
    /// The environment it runs in: the shared one, or — for an expression that builds
    /// `Object{…}` values (a mutation) — one that also knows those type names.
    env: Arc<Env>,
}

impl std::fmt::Debug for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Expression").field(&self.source).finish()
    }
}

impl PartialEq for Expression {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Expression {
    /// Parses `source`; a syntax error is a [`CelError::Compile`] with cel's message.
    pub fn compile(source: &str) -> Result<Expression, CelError> {
        if source.trim().is_empty() {
            return Err(CelError::Compile("expression is empty".into()));
        }
        if source.len() > MAX_SOURCE_BYTES {
            return Err(CelError::Compile(format!(
                "expression is longer than {MAX_SOURCE_BYTES} bytes"
            )));
        }
        let program = ENV
            .compile(source)
            .map_err(|errors| CelError::Compile(errors.to_string().trim().to_owned()))?;
        Ok(Expression {
            source: source.into(),
            program: Arc::new(program),
            env: Arc::clone(&ENV),
        })
    }

    /// Compiles an expression that may construct objects as Kubernetes' mutations do —
    /// `Object{spec: Object.spec{replicas: 3}}`, `JSONPatch{op: "add", …}`: each type name
    /// it uses builds a plain map of its fields.
    pub fn compile_with_objects(source: &str) -> Result<Expression, CelError> {
        let mut expression = Expression::compile(source)?;
        let mut names = std::collections::BTreeSet::new();
        library::struct_names(expression.program.expression(), &mut names);
        if names.is_empty() {
            return Ok(expression);
        }
        let mut env = Env::stdlib();
        env.add_extension(cel::extensions::strings)
            .and_then(|()| env.add_extension(cel::extensions::lists))
            .and_then(|()| env.add_extension(library::extension))
            .map_err(|e| CelError::Compile(e.to_string()))?;
        for name in names {
            if !(name == "Object" || name.starts_with("Object.") || name == "JSONPatch") {
                return Err(CelError::Compile(format!(
                    "unknown type {name:?}: mutations build Object{{…}}, Object.<field>{{…}} or JSONPatch{{…}} values"
                )));
            }
            env.add_type(library::ObjectType::new(name))
                .map_err(|e| CelError::Compile(e.to_string()))?;
        }
        expression.env = Arc::new(env);
        Ok(expression)
    }

    /// The text it was compiled from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether it mentions the variable `name` (`oldSelf` makes a CRD rule a transition rule).
    pub fn references(&self, name: &str) -> bool {
        self.program.references().has_variable(name)
    }

    /// The worst-case cost of one evaluation when the variables have the given shapes.
    pub fn cost(&self, variables: &[(&str, Shape<'_>)], sizes: Sizes) -> u64 {
        cost::estimate(self.program.expression(), variables, sizes)
    }

    /// Refuses an expression whose worst case is over `limit`.
    pub fn check_cost(
        &self,
        variables: &[(&str, Shape<'_>)],
        sizes: Sizes,
        limit: u64,
    ) -> Result<(), CelError> {
        let cost = self.cost(variables, sizes);
        if cost > limit {
            Err(CelError::Cost {
                factor: cost as f64 / limit as f64,
            })
        } else {
            Ok(())
        }
    }

    /// Evaluates with `variables` bound (JSON values, converted as Kubernetes does).
    pub fn eval(&self, variables: &Activation) -> Result<CelValue, CelError> {
        let mut context = Context::with_env(Arc::clone(&self.env));
        for (name, value) in &variables.bindings {
            context.add_variable_from_value(name.as_str(), value.clone());
        }
        self.program
            .execute(&context)
            .map_err(|e| CelError::Eval(e.to_string()))
    }

    /// Evaluates to a boolean; anything else is an error naming the type.
    pub fn eval_bool(&self, variables: &Activation) -> Result<bool, CelError> {
        match self.eval(variables)? {
            CelValue::Bool(b) => Ok(b),
            other => Err(CelError::Eval(format!(
                "expression must evaluate to a bool, not {}",
                other.type_of()
            ))),
        }
    }

    /// Evaluates to a string (a `messageExpression`, an audit annotation's value).
    pub fn eval_string(&self, variables: &Activation) -> Result<String, CelError> {
        match self.eval(variables)? {
            CelValue::String(s) => Ok(s.to_string()),
            other => Err(CelError::Eval(format!(
                "expression must evaluate to a string, not {}",
                other.type_of()
            ))),
        }
    }
}

/// The variables of one evaluation.
#[derive(Default, Clone, Debug)]
pub struct Activation {
    bindings: Vec<(String, CelValue)>,
}

impl Activation {
    /// An empty activation.
    pub fn new() -> Activation {
        Activation::default()
    }

    /// Binds `name` to a JSON value (`null` when absent, as Kubernetes binds `oldObject`
    /// on a create).
    pub fn bind_json(&mut self, name: &str, value: Option<&Value>) -> &mut Activation {
        let value = value.map(to_cel).unwrap_or(CelValue::Null);
        self.bind(name, value)
    }

    /// Binds `name` to a CEL value.
    pub fn bind(&mut self, name: &str, value: CelValue) -> &mut Activation {
        match self.bindings.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.bindings.push((name.to_owned(), value)),
        }
        self
    }
}

/// A JSON value as CEL sees it: objects are maps with string keys, integers `int` (or
/// `uint` past `int`'s range), other numbers `double`.
pub fn to_cel(value: &Value) -> CelValue {
    match value {
        Value::Null => CelValue::Null,
        Value::Bool(b) => CelValue::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => CelValue::Int(i),
            (None, Some(u)) => CelValue::UInt(u),
            _ => CelValue::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => CelValue::String(Arc::new(s.clone())),
        Value::Array(items) => CelValue::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let entries: std::collections::HashMap<String, CelValue> =
                map.iter().map(|(k, v)| (k.clone(), to_cel(v))).collect();
            CelValue::from(entries)
        }
    }
}

/// A CEL value as JSON (what a variable or a mutation produces). Durations and timestamps
/// become their Kubernetes text forms; types and functions have none and become `null`.
pub fn to_json(value: &CelValue) -> Value {
    match value {
        CelValue::Null => Value::Null,
        CelValue::Bool(b) => Value::Bool(*b),
        CelValue::Int(i) => Value::from(*i),
        CelValue::UInt(u) => Value::from(*u),
        CelValue::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        CelValue::String(s) => Value::String(s.to_string()),
        CelValue::Bytes(b) => {
            use base64::Engine as _;
            Value::String(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        CelValue::List(items) => Value::Array(items.iter().map(to_json).collect()),
        CelValue::Map(map) => Value::Object(
            map.map
                .iter()
                .map(|(k, v)| (key_text(k), to_json(v)))
                .collect(),
        ),
        CelValue::Duration(d) => Value::String(format!("{}s", d.num_milliseconds() as f64 / 1e3)),
        CelValue::Timestamp(t) => Value::String(t.to_rfc3339()),
        _ => Value::Null,
    }
}

fn key_text(key: &cel::objects::Key) -> String {
    use cel::objects::Key;
    match key {
        Key::String(s) => s.to_string(),
        Key::Int(i) => i.to_string(),
        Key::Uint(u) => u.to_string(),
        Key::Bool(b) => b.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn eval(source: &str, object: Value) -> Result<CelValue, CelError> {
        let mut vars = Activation::new();
        vars.bind_json("self", Some(&object));
        Expression::compile(source)?.eval(&vars)
    }

    #[test]
    fn objects_read_as_maps() {
        let object = json!({"spec": {"replicas": 3, "name": "web", "ports": [80, 443]}});
        assert_eq!(
            eval("self.spec.replicas > 1", object.clone()),
            Ok(true.into())
        );
        assert_eq!(
            eval("has(self.spec.paused)", object.clone()),
            Ok(false.into())
        );
        assert_eq!(
            eval("self.spec.ports.all(p, p < 1024)", object.clone()),
            Ok(true.into())
        );
        assert_eq!(
            eval(
                "self.spec.name.startsWith('w') && self.spec.name.upperAscii() == 'WEB'",
                object
            ),
            Ok(true.into())
        );
    }

    #[test]
    fn errors_name_the_problem() {
        let err = eval("self.spec.missing > 1", json!({"spec": {}})).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
        let err = eval("'a' + 1", json!({})).unwrap_err();
        assert!(matches!(err, CelError::Eval(_)), "{err}");
        let err = Expression::compile("self.spec.(").unwrap_err();
        assert!(matches!(err, CelError::Compile(_)), "{err}");
    }

    #[test]
    fn values_round_trip_to_json() {
        let object = json!({"a": [1, "x", true, null, {"b": 2.5}]});
        assert_eq!(to_json(&to_cel(&object)), object);
    }
}
