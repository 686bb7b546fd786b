//! Kubernetes' CEL libraries beyond cel-go's extensions: the list functions (`isSorted`,
//! `sum`, `min`, `max`, `indexOf`, `lastIndexOf`) and the regex ones (`find`, `findAll`),
//! with kube-apiserver's names and semantics; and the object types mutations construct
//! (`Object{…}`, `JSONPatch{…}`), which build plain maps.
//!
//! Each overload converts its arguments to `cel::Value`s, which keeps the functions plain;
//! a list is copied once per call, which the cost estimate already charges for.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::common::types::Type;

use cel::common::types::{DYN_TYPE, INT_TYPE, LIST_TYPE, STRING_TYPE};
use cel::common::value::{CowVal, Val};
use cel::{DeclarationError, Env, ExecutionError, Value};

/// Registers the library on `env`.
pub fn extension(env: &mut Env) -> Result<(), DeclarationError> {
    env.add_member_overload("isSorted", "list.isSorted()", LIST_TYPE, vec![], is_sorted)?;
    env.add_member_overload("sum", "list.sum()", LIST_TYPE, vec![], sum)?;
    env.add_member_overload("min", "list.min()", LIST_TYPE, vec![], min)?;
    env.add_member_overload("max", "list.max()", LIST_TYPE, vec![], max)?;
    env.add_member_overload(
        "indexOf",
        "list.indexOf(dyn)",
        LIST_TYPE,
        vec![DYN_TYPE],
        index_of,
    )?;
    env.add_member_overload(
        "lastIndexOf",
        "list.lastIndexOf(dyn)",
        LIST_TYPE,
        vec![DYN_TYPE],
        last_index_of,
    )?;
    env.add_member_overload(
        "find",
        "string.find(string)",
        STRING_TYPE,
        vec![STRING_TYPE],
        find,
    )?;
    env.add_member_overload(
        "findAll",
        "string.findAll(string)",
        STRING_TYPE,
        vec![STRING_TYPE],
        find_all,
    )?;
    env.add_member_overload(
        "findAll",
        "string.findAll(string,int)",
        STRING_TYPE,
        vec![STRING_TYPE, INT_TYPE],
        find_all_n,
    )?;
    Ok(())
}

/// A type a mutation constructs (`Object.spec`): its value is the map of its fields, which
/// is what the apply configuration or JSON patch is made of.
#[derive(Debug)]
pub struct ObjectType {
    r#type: Type,
}

impl ObjectType {
    /// The type named `name`.
    pub fn new(name: String) -> ObjectType {
        ObjectType {
            r#type: Type::new_struct(name),
        }
    }
}

impl cel::StructType for ObjectType {
    fn get_type(&self) -> &Type {
        &self.r#type
    }

    fn new_value<'b, 'v>(
        &self,
        fields: BTreeMap<String, CowVal<'b, 'v>>,
    ) -> Result<Box<dyn Val + 'v>, ExecutionError> {
        let mut map = HashMap::new();
        for (name, value) in fields {
            map.insert(name, Value::try_from(value.as_ref())?);
        }
        Value::from(map)
            .try_into()
            .map_err(|_| ExecutionError::function_error("Object", "value has no CEL form"))
    }
}

/// The type names of the struct literals in `expr`.
pub fn struct_names(expr: &IdedExpr, names: &mut BTreeSet<String>) {
    match &expr.expr {
        Expr::Struct(object) => {
            names.insert(object.type_name.clone());
            for entry in &object.entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => struct_names(&field.value, names),
                    EntryExpr::MapEntry(e) => {
                        struct_names(&e.key, names);
                        struct_names(&e.value, names);
                    }
                }
            }
        }
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                struct_names(target, names);
            }
            call.args.iter().for_each(|a| struct_names(a, names));
        }
        Expr::Comprehension(c) => {
            for e in [
                &c.iter_range,
                &c.accu_init,
                &c.loop_cond,
                &c.loop_step,
                &c.result,
            ] {
                struct_names(e, names);
            }
        }
        Expr::List(list) => list.elements.iter().for_each(|e| struct_names(e, names)),
        Expr::Map(map) => {
            for entry in &map.entries {
                if let EntryExpr::MapEntry(e) = &entry.expr {
                    struct_names(&e.key, names);
                    struct_names(&e.value, names);
                }
            }
        }
        Expr::Select(select) => struct_names(&select.operand, names),
        Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The arguments as values.
fn values(args: &[CowVal<'_, '_>]) -> Result<Vec<Value>, ExecutionError> {
    args.iter().map(|a| Value::try_from(a.as_ref())).collect()
}

/// A value as the result of an overload.
fn result<'b, 'v>(value: Value) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let boxed: Box<dyn Val> = value
        .try_into()
        .map_err(|_| ExecutionError::function_error("result", "value has no CEL form"))?;
    Ok(CowVal::Owned(boxed))
}

fn list_of(function: &str, value: &Value) -> Result<Arc<Vec<Value>>, ExecutionError> {
    match value {
        Value::List(items) => Ok(Arc::clone(items)),
        other => Err(ExecutionError::function_error(
            function,
            format!("expected a list, got {}", other.type_of()),
        )),
    }
}

fn string_of(function: &str, value: &Value) -> Result<Arc<String>, ExecutionError> {
    match value {
        Value::String(s) => Ok(Arc::clone(s)),
        other => Err(ExecutionError::function_error(
            function,
            format!("expected a string, got {}", other.type_of()),
        )),
    }
}

fn compare(function: &str, a: &Value, b: &Value) -> Result<Ordering, ExecutionError> {
    a.partial_cmp(b).ok_or_else(|| {
        ExecutionError::function_error(
            function,
            format!("{} and {} cannot be compared", a.type_of(), b.type_of()),
        )
    })
}

fn is_sorted<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let list = list_of("isSorted", &args[0])?;
    for pair in list.windows(2) {
        if compare("isSorted", &pair[0], &pair[1])? == Ordering::Greater {
            return result(Value::Bool(false));
        }
    }
    result(Value::Bool(true))
}

/// The sum of a list of ints, uints, doubles or durations; `0` for an empty list.
fn sum<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let list = list_of("sum", &args[0])?;
    let overflow = || ExecutionError::function_error("sum", "integer overflow");
    let mut items = list.iter();
    let Some(first) = items.next() else {
        return result(Value::Int(0));
    };
    let mut total = first.clone();
    for item in items {
        total = match (&total, item) {
            (Value::Int(a), Value::Int(b)) => Value::Int(a.checked_add(*b).ok_or_else(overflow)?),
            (Value::UInt(a), Value::UInt(b)) => {
                Value::UInt(a.checked_add(*b).ok_or_else(overflow)?)
            }
            (Value::Float(a), Value::Float(b)) => Value::Float(a + b),
            (Value::Duration(a), Value::Duration(b)) => Value::Duration(*a + *b),
            (a, b) => {
                return Err(ExecutionError::function_error(
                    "sum",
                    format!("cannot add {} and {}", a.type_of(), b.type_of()),
                ));
            }
        };
    }
    result(total)
}

fn extreme<'b, 'v>(
    function: &str,
    args: Vec<CowVal<'b, 'v>>,
    keep: Ordering,
) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let list = list_of(function, &args[0])?;
    let mut items = list.iter();
    let Some(mut best) = items.next() else {
        return Err(ExecutionError::function_error(
            function,
            format!("{function} called on empty list"),
        ));
    };
    for item in items {
        if compare(function, item, best)? == keep {
            best = item;
        }
    }
    result(best.clone())
}

fn min<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    extreme("min", args, Ordering::Less)
}

fn max<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    extreme("max", args, Ordering::Greater)
}

fn index_of<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let list = list_of("indexOf", &args[0])?;
    let at = list.iter().position(|v| v == &args[1]);
    result(Value::Int(at.map_or(-1, |i| i as i64)))
}

fn last_index_of<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let list = list_of("lastIndexOf", &args[0])?;
    let at = list.iter().rposition(|v| v == &args[1]);
    result(Value::Int(at.map_or(-1, |i| i as i64)))
}

fn regex(function: &str, pattern: &str) -> Result<regex::Regex, ExecutionError> {
    regex::Regex::new(pattern).map_err(|e| ExecutionError::function_error(function, e))
}

/// The first match of the regex, or `""`.
fn find<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let text = string_of("find", &args[0])?;
    let pattern = regex("find", &string_of("find", &args[1])?)?;
    let found = pattern.find(&text).map(|m| m.as_str()).unwrap_or_default();
    result(Value::String(Arc::new(found.to_owned())))
}

fn all_matches(text: &str, pattern: &regex::Regex, limit: Option<usize>) -> Value {
    let found = pattern
        .find_iter(text)
        .take(limit.unwrap_or(usize::MAX))
        .map(|m| Value::String(Arc::new(m.as_str().to_owned())))
        .collect();
    Value::List(Arc::new(found))
}

fn find_all<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let text = string_of("findAll", &args[0])?;
    let pattern = regex("findAll", &string_of("findAll", &args[1])?)?;
    result(all_matches(&text, &pattern, None))
}

/// At most `n` matches; a negative `n` means all of them, zero none.
fn find_all_n<'b, 'v>(args: Vec<CowVal<'b, 'v>>) -> Result<CowVal<'b, 'v>, ExecutionError> {
    let args = values(&args)?;
    let text = string_of("findAll", &args[0])?;
    let pattern = regex("findAll", &string_of("findAll", &args[1])?)?;
    let limit = match &args[2] {
        Value::Int(n) if *n < 0 => None,
        Value::Int(n) => Some(*n as usize),
        other => {
            return Err(ExecutionError::function_error(
                "findAll",
                format!("expected an int, got {}", other.type_of()),
            ));
        }
    };
    result(all_matches(&text, &pattern, limit))
}

#[cfg(test)]
mod tests {
    use super::super::{Activation, Expression};
    use cel::Value;

    fn eval(source: &str) -> Value {
        Expression::compile(source)
            .unwrap()
            .eval(&Activation::new())
            .unwrap_or_else(|e| panic!("{source}: {e}"))
    }

    #[test]
    fn list_functions() {
        assert_eq!(eval("[1, 2, 3].isSorted()"), true.into());
        assert_eq!(eval("['b', 'a'].isSorted()"), false.into());
        assert_eq!(eval("[1, 2, 3].sum()"), 6.into());
        assert_eq!(eval("[].sum()"), 0.into());
        assert_eq!(eval("[3, 1, 2].min()"), 1.into());
        assert_eq!(eval("[3, 1, 2].max()"), 3.into());
        assert_eq!(eval("[1, 2, 1].indexOf(1)"), 0.into());
        assert_eq!(eval("[1, 2, 1].lastIndexOf(1)"), 2.into());
        assert_eq!(eval("'abc'.indexOf('c')"), 2.into());
    }

    #[test]
    fn objects_are_built_as_maps() {
        let source = r#"Object{metadata: Object.metadata{annotations: {"a": "b"}}, spec: Object.spec{replicas: 3}}"#;
        let value = Expression::compile_with_objects(source)
            .unwrap()
            .eval(&Activation::new())
            .unwrap();
        assert_eq!(
            super::super::to_json(&value),
            serde_json::json!({"metadata": {"annotations": {"a": "b"}}, "spec": {"replicas": 3}})
        );
        let patch = r#"[JSONPatch{op: "add", path: "/x", value: 1}]"#;
        let value = Expression::compile_with_objects(patch)
            .unwrap()
            .eval(&Activation::new())
            .unwrap();
        assert_eq!(
            super::super::to_json(&value),
            serde_json::json!([{"op": "add", "path": "/x", "value": 1}])
        );
        assert!(Expression::compile_with_objects("Other{a: 1}").is_err());
    }

    #[test]
    fn regex_functions() {
        assert_eq!(eval("'abc 123'.find('[0-9]+')"), "123".into());
        assert_eq!(eval("'abc'.find('[0-9]+')"), "".into());
        assert_eq!(eval("'1 2 3'.findAll('[0-9]').size()"), 3.into());
        assert_eq!(eval("'1 2 3'.findAll('[0-9]', 2).size()"), 2.into());
        assert_eq!(eval("'abc'.matches('^a')"), true.into());
    }
}
