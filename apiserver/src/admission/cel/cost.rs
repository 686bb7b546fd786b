//! The worst-case cost of evaluating an expression, in the units of cel-go's cost model
//! (about one per node visited, a tenth per character a string function scans), so the
//! limits read as kube-apiserver's do.
//!
//! The estimate follows the data: a comprehension (`all`, `exists`, `map`, `filter`, …)
//! costs its body once per element of the largest collection its range can be; a string
//! function costs in proportion to the longest string it can be given. How large those can
//! be is the [`Shape`] of each variable — a CRD schema node (its `maxItems`, `maxLength`,
//! `maxProperties`), the actual JSON of a request, or unknown, when [`Sizes`] says.

use cel::common::ast::{Expr, IdedExpr};
use serde_json::Value;

use crate::schema::Structural;

/// How large collections and strings of unknown shape can be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sizes {
    /// Elements of a list, or entries of a map.
    pub list: f64,
    /// Characters of a string.
    pub string: f64,
}

impl Sizes {
    /// What fits in a request (kube-apiserver's 3 MiB): a list of one-byte elements and
    /// their commas, a string filling it.
    pub const UNBOUNDED: Sizes = Sizes {
        list: (3 * 1024 * 1024 / 2) as f64,
        string: (3 * 1024 * 1024) as f64,
    };

    /// The largest list or map and the longest string in `values`.
    pub fn of<'a>(values: impl IntoIterator<Item = &'a Value>) -> Sizes {
        let mut sizes = Sizes {
            list: 1.0,
            string: 1.0,
        };
        for value in values {
            measure(value, &mut sizes);
        }
        sizes
    }
}

fn measure(value: &Value, sizes: &mut Sizes) {
    match value {
        Value::String(s) => sizes.string = sizes.string.max(s.len() as f64),
        Value::Array(items) => {
            sizes.list = sizes.list.max(items.len() as f64);
            items.iter().for_each(|v| measure(v, sizes));
        }
        Value::Object(map) => {
            sizes.list = sizes.list.max(map.len() as f64);
            for (key, v) in map {
                sizes.string = sizes.string.max(key.len() as f64);
                measure(v, sizes);
            }
        }
        _ => {}
    }
}

/// What is known of the values an expression can reach.
#[derive(Clone, Debug)]
pub enum Shape<'a> {
    /// A node of a structural schema.
    Schema(&'a Structural),
    /// Any one of these actual values.
    Json(Vec<&'a Value>),
    /// A value of at most this many elements or characters (a literal, a function's result).
    Sized(f64),
    /// Nothing: [`Sizes`] bound it.
    Unknown,
}

impl<'a> Shape<'a> {
    /// The shape of one JSON value.
    pub fn json(value: &'a Value) -> Shape<'a> {
        Shape::Json(vec![value])
    }

    /// The shape of `self.<name>`.
    fn field(&self, name: &str) -> Shape<'a> {
        match self {
            Shape::Schema(node) => node.cel_field(name).map_or(Shape::Unknown, Shape::Schema),
            Shape::Json(values) => Shape::Json(
                values
                    .iter()
                    .filter_map(|v| v.as_object().and_then(|m| m.get(name)))
                    .collect(),
            ),
            Shape::Sized(_) | Shape::Unknown => Shape::Unknown,
        }
    }

    /// The shape of an element of a list, or a value of a map.
    fn element(&self) -> Shape<'a> {
        match self {
            Shape::Schema(node) => node.cel_element().map_or(Shape::Unknown, Shape::Schema),
            Shape::Json(values) => Shape::Json(
                values
                    .iter()
                    .flat_map(|v| -> Box<dyn Iterator<Item = &'a Value>> {
                        match v {
                            Value::Array(items) => Box::new(items.iter()),
                            Value::Object(map) => Box::new(map.values()),
                            _ => Box::new(std::iter::empty()),
                        }
                    })
                    .collect(),
            ),
            Shape::Sized(_) | Shape::Unknown => Shape::Unknown,
        }
    }

    /// The most elements (a collection) or characters (a string) it can have.
    fn size(&self, sizes: Sizes, string: bool) -> f64 {
        match self {
            Shape::Schema(node) if node.cel_is_scalar() => 1.0,
            Shape::Schema(node) => node
                .cel_bound()
                .map_or(if string { sizes.string } else { sizes.list }, |b| b as f64),
            Shape::Sized(n) => *n,
            Shape::Json(values) => values
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.len() as f64,
                    Value::Array(items) => items.len() as f64,
                    Value::Object(map) => map.len() as f64,
                    _ => 1.0,
                })
                .fold(0.0, f64::max),
            Shape::Unknown if string => sizes.string,
            Shape::Unknown => sizes.list,
        }
    }
}

/// Functions whose cost grows with the length of a string (or, for some, a list) operand.
const LINEAR: &[&str] = &[
    "contains",
    "startsWith",
    "endsWith",
    "matches",
    "find",
    "findAll",
    "split",
    "replace",
    "lowerAscii",
    "upperAscii",
    "trim",
    "indexOf",
    "lastIndexOf",
    "substring",
    "charAt",
    "format",
    "join",
    "reverse",
    "quote",
    "_+_",
    "_==_",
    "_!=_",
    "_<_",
    "_<=_",
    "_>_",
    "_>=_",
    "@in",
    "sum",
    "min",
    "max",
    "isSorted",
    "sort",
    "flatten",
    "slice",
    "string",
    "bytes",
];

/// The worst-case cost of `expr` with `variables` of the given shapes.
pub fn estimate(expr: &IdedExpr, variables: &[(&str, Shape<'_>)], sizes: Sizes) -> u64 {
    let mut scope: Vec<(String, Shape<'_>)> = variables
        .iter()
        .map(|(name, shape)| ((*name).to_owned(), shape.clone()))
        .collect();
    let (cost, _) = walk(expr, &mut scope, sizes);
    if cost.is_finite() && cost < u64::MAX as f64 {
        cost.ceil() as u64
    } else {
        u64::MAX
    }
}

fn walk<'a>(
    expr: &IdedExpr,
    scope: &mut Vec<(String, Shape<'a>)>,
    sizes: Sizes,
) -> (f64, Shape<'a>) {
    match &expr.expr {
        Expr::Unspecified => (0.0, Shape::Sized(1.0)),
        Expr::Literal(literal) => {
            use cel::common::ast::LiteralValue;
            let len = match literal {
                LiteralValue::String(s) => s.len(),
                LiteralValue::Bytes(b) => b.len(),
                _ => 1,
            };
            (0.0, Shape::Sized(len as f64))
        }
        Expr::Ident(name) => {
            let shape = scope
                .iter()
                .rev()
                .find(|(n, _)| n == name)
                .map_or(Shape::Unknown, |(_, s)| s.clone());
            (1.0, shape)
        }
        Expr::Select(select) => {
            let (cost, shape) = walk(&select.operand, scope, sizes);
            (cost + 1.0, shape.field(&select.field))
        }
        Expr::List(list) => {
            let cost: f64 = list.elements.iter().map(|e| walk(e, scope, sizes).0).sum();
            (cost + 10.0, Shape::Sized(list.elements.len() as f64))
        }
        Expr::Map(map) => {
            let cost: f64 = map
                .entries
                .iter()
                .map(|entry| entry_cost(&entry.expr, scope, sizes))
                .sum();
            (cost + 30.0, Shape::Sized(map.entries.len() as f64))
        }
        Expr::Struct(object) => {
            let cost: f64 = object
                .entries
                .iter()
                .map(|entry| entry_cost(&entry.expr, scope, sizes))
                .sum();
            (cost + 40.0, Shape::Unknown)
        }
        Expr::Call(call) => {
            let mut cost = 0.0;
            let mut shapes = Vec::new();
            if let Some(target) = &call.target {
                let (c, s) = walk(target, scope, sizes);
                cost += c;
                shapes.push(s);
            }
            for arg in &call.args {
                let (c, s) = walk(arg, scope, sizes);
                cost += c;
                shapes.push(s);
            }
            let name = call.func_name.as_str();
            // The largest operand: what a linear function scans, and at most what it returns.
            let largest = shapes
                .iter()
                .map(|s| s.size(sizes, true).max(s.size(sizes, false)))
                .fold(1.0, f64::max);
            let own = if LINEAR.contains(&name) {
                let scanned = shapes
                    .iter()
                    .map(|s| (s.size(sizes, true) * 0.1).max(s.size(sizes, false)))
                    .fold(0.0, f64::max);
                1.0 + scanned
            } else if name == "distinct" {
                let n = shapes.first().map_or(1.0, |s| s.size(sizes, false));
                1.0 + n * n
            } else {
                1.0
            };
            let shape = match (name, shapes.first()) {
                ("_[_]" | "_[?_]", Some(target)) => target.element(),
                _ if LINEAR.contains(&name) || name == "distinct" => Shape::Sized(largest),
                _ => Shape::Sized(1.0),
            };
            (cost + own, shape)
        }
        Expr::Comprehension(comp) => {
            let (range_cost, range) = walk(&comp.iter_range, scope, sizes);
            let n = range.size(sizes, false);
            let (init_cost, _) = walk(&comp.accu_init, scope, sizes);
            let depth = scope.len();
            let element = match &comp.iter_var2 {
                // Two variables: index (or key) and value.
                Some(_) => range.element(),
                // One: a list's elements, a map's keys (strings of unknown length).
                None => match &range {
                    Shape::Schema(node) if node.cel_is_map() => Shape::Unknown,
                    Shape::Json(values) if values.iter().any(|v| v.is_object()) => Shape::Unknown,
                    _ => range.element(),
                },
            };
            match &comp.iter_var2 {
                Some(second) => {
                    scope.push((comp.iter_var.clone(), Shape::Unknown));
                    scope.push((second.clone(), element));
                }
                None => scope.push((comp.iter_var.clone(), element)),
            }
            // The accumulator grows to at most one entry per element (`map`, `filter`).
            scope.push((comp.accu_var.clone(), Shape::Sized(n)));
            let (cond, _) = walk(&comp.loop_cond, scope, sizes);
            let (step, _) = walk(&comp.loop_step, scope, sizes);
            let (result, _) = walk(&comp.result, scope, sizes);
            scope.truncate(depth);
            let cost = range_cost + init_cost + n * (cond + step + 1.0) + result;
            (cost, Shape::Sized(n))
        }
    }
}

fn entry_cost<'a>(
    entry: &cel::common::ast::EntryExpr,
    scope: &mut Vec<(String, Shape<'a>)>,
    sizes: Sizes,
) -> f64 {
    use cel::common::ast::EntryExpr;
    match entry {
        EntryExpr::StructField(field) => walk(&field.value, scope, sizes).0,
        EntryExpr::MapEntry(entry) => {
            walk(&entry.key, scope, sizes).0 + walk(&entry.value, scope, sizes).0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::cel::Expression;
    use serde_json::json;

    fn cost(source: &str, schema: &Value) -> u64 {
        let schema = Structural::compile(schema);
        Expression::compile(source)
            .unwrap()
            .cost(&[("self", Shape::Schema(&schema))], Sizes::UNBOUNDED)
    }

    #[test]
    fn bounded_lists_are_cheap_and_unbounded_ones_are_not() {
        let unbounded = json!({"type": "array", "items": {"type": "string"}});
        let bounded = json!({"type": "array", "maxItems": 10,
                             "items": {"type": "string", "maxLength": 64}});
        let rule = "self.all(x, x.matches('^[a-z]+$'))";
        assert!(cost(rule, &bounded) < 1_000, "{}", cost(rule, &bounded));
        assert!(cost(rule, &unbounded) > super::super::STATIC_COST_LIMIT);
        // Nested loops multiply.
        let nested = "self.all(x, self.all(y, x == y))";
        assert!(cost(nested, &bounded) < 10_000);
        assert!(cost(nested, &unbounded) > super::super::STATIC_COST_LIMIT);
        // A size check does not loop at all.
        assert!(cost("self.size() < 5", &unbounded) < 10);
    }

    #[test]
    fn actual_values_bound_a_request() {
        let object = json!({"spec": {"containers": [{"image": "a"}, {"image": "b"}],
                                     "note": "x".repeat(100_000)}});
        let expr =
            Expression::compile("object.spec.containers.all(c, c.image.startsWith('r/'))").unwrap();
        let cost = expr.cost(&[("object", Shape::json(&object))], Sizes::of([&object]));
        // Two containers, one-character images: the long note does not count.
        assert!(cost < 50, "{cost}");
    }
}
