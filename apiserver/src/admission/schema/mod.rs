//! Structural schemas: what a kind's OpenAPI v3 schema says about its objects, compiled
//! once into a compact tree and applied to every write — built-in and custom kinds alike.
//!
//! Three things happen to an object on its way to the store, in kube-apiserver's order:
//! unknown fields are found (reported under `fieldValidation=Strict`/`Warn`) and pruned,
//! schema defaults are filled in, and the result is validated (types, required fields, enums,
//! formats, patterns, bounds), every problem becoming one `details.causes` entry of a 422.
//!
//! The root's `apiVersion`, `kind` and `metadata` are the engine's business (ObjectMeta has
//! its own rules), so the walk starts below them. A CRD's `x-kubernetes-validations` (CEL
//! rules, transition rules against the old object) run last, once the rest holds ([`rules`]).

pub mod rules;

use std::fmt::Write as _;

use serde_json::{Map, Value};

use crate::error::Cause;

/// The JSON type a schema node admits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Type {
    Object,
    Array,
    String,
    Integer,
    Number,
    Boolean,
    /// `x-kubernetes-int-or-string`.
    IntOrString,
    /// No type: anything (only with `x-kubernetes-preserve-unknown-fields`).
    Any,
}

impl Type {
    fn name(self) -> &'static str {
        match self {
            Type::Object => "object",
            Type::Array => "array",
            Type::String => "string",
            Type::Integer => "integer",
            Type::Number => "number",
            Type::Boolean => "boolean",
            Type::IntOrString => "integer or string",
            Type::Any => "any",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match self {
            Type::Object => value.is_object(),
            Type::Array => value.is_array(),
            Type::String => value.is_string(),
            Type::Integer => value.is_i64() || value.is_u64(),
            Type::Number => value.is_number(),
            Type::Boolean => value.is_boolean(),
            Type::IntOrString => value.is_string() || value.is_i64() || value.is_u64(),
            Type::Any => true,
        }
    }
}

/// How a map's keys beyond `properties` are treated.
#[derive(Clone, Debug, PartialEq)]
enum Additional {
    /// Unknown: pruned (and reported).
    Unknown,
    /// Kept as they are (`x-kubernetes-preserve-unknown-fields`, `additionalProperties: true`).
    Preserved,
    /// A map: every value follows this schema.
    Values(Box<Structural>),
}

/// One compiled schema node.
#[derive(Clone, Debug, PartialEq)]
pub struct Structural {
    ty: Type,
    /// Sorted by name, for binary search.
    properties: Vec<(String, Structural)>,
    additional: Additional,
    items: Option<Box<Structural>>,
    required: Vec<String>,
    enumeration: Vec<Value>,
    default: Option<Value>,
    format: Option<String>,
    pattern: Option<Pattern>,
    minimum: Option<f64>,
    maximum: Option<f64>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    max_properties: Option<u64>,
    /// `x-kubernetes-validations`, compiled (a rule that does not compile is left out: CRD
    /// admission refuses it before it gets here).
    rules: Vec<rules::Rule>,
    /// Whether this node or one below has rules: a write walks only where they are.
    rules_below: bool,
    /// `x-kubernetes-list-type: map`'s keys: how an item finds its old self.
    list_map_keys: Vec<String>,
    /// `x-kubernetes-embedded-resource`: apiVersion, kind and metadata are implied.
    embedded: bool,
}

/// A compiled `pattern`; equal when the source is.
#[derive(Clone, Debug)]
struct Pattern(regex::Regex);

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

impl Structural {
    /// Compiles an `openAPIV3Schema`. Parts it cannot use (an invalid pattern, an unknown
    /// type) are left out rather than refused: CRD admission checks schemas before this.
    pub fn compile(schema: &Value) -> Structural {
        let field = |name: &str| schema.get(name);
        let flag = |name: &str| field(name).and_then(Value::as_bool).unwrap_or(false);
        let preserve = flag("x-kubernetes-preserve-unknown-fields");
        let ty = if flag("x-kubernetes-int-or-string") {
            Type::IntOrString
        } else {
            match field("type").and_then(Value::as_str) {
                Some("object") => Type::Object,
                Some("array") => Type::Array,
                Some("string") => Type::String,
                Some("integer") => Type::Integer,
                Some("number") => Type::Number,
                Some("boolean") => Type::Boolean,
                _ => Type::Any,
            }
        };
        let mut properties: Vec<(String, Structural)> = field("properties")
            .and_then(Value::as_object)
            .map(|props| {
                props
                    .iter()
                    .map(|(name, sub)| (name.clone(), Structural::compile(sub)))
                    .collect()
            })
            .unwrap_or_default();
        properties.sort_by(|a, b| a.0.cmp(&b.0));
        let additional = match field("additionalProperties") {
            Some(Value::Object(sub)) => {
                Additional::Values(Box::new(Structural::compile(&Value::Object(sub.clone()))))
            }
            Some(Value::Bool(true)) => Additional::Preserved,
            _ if preserve || ty == Type::Any => Additional::Preserved,
            _ => Additional::Unknown,
        };
        let strings = |name: &str| -> Vec<String> {
            field(name)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let number = |name: &str| field(name).and_then(Value::as_f64);
        let count = |name: &str| field(name).and_then(Value::as_u64);
        let items = field("items").map(|items| Box::new(Structural::compile(items)));
        let rules = rules::compile_all(field("x-kubernetes-validations"));
        let rules_below = !rules.is_empty()
            || properties.iter().any(|(_, sub)| sub.rules_below)
            || items.as_ref().is_some_and(|i| i.rules_below)
            || matches!(&additional, Additional::Values(sub) if sub.rules_below);
        Structural {
            ty,
            properties,
            additional,
            items,
            required: strings("required"),
            enumeration: field("enum")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
            default: field("default").cloned(),
            format: field("format").and_then(Value::as_str).map(str::to_owned),
            pattern: field("pattern")
                .and_then(Value::as_str)
                .and_then(|p| regex::Regex::new(p).ok())
                .map(Pattern),
            minimum: number("minimum"),
            maximum: number("maximum"),
            min_length: count("minLength"),
            max_length: count("maxLength"),
            min_items: count("minItems"),
            max_items: count("maxItems"),
            max_properties: count("maxProperties"),
            rules,
            rules_below,
            list_map_keys: if field("x-kubernetes-list-type").and_then(Value::as_str) == Some("map")
            {
                strings("x-kubernetes-list-map-keys")
            } else {
                Vec::new()
            },
            embedded: flag("x-kubernetes-embedded-resource"),
        }
    }

    fn property(&self, name: &str) -> Option<&Structural> {
        self.properties
            .binary_search_by(|(key, _)| key.as_str().cmp(name))
            .ok()
            .map(|i| &self.properties[i].1)
    }

    /// What the schema says about the value under `key` of an object.
    /// The Go zero value, as text, of the field at the dotted `path` (`spec.unschedulable`
    /// → `"false"`): what kube-apiserver's field selectors compare an absent field as.
    pub fn zero_value(&self, path: &str) -> &'static str {
        let mut node = self;
        for key in path.split('.') {
            match node.child(key) {
                Child::Known(sub) => node = sub,
                Child::Preserved | Child::Unknown => return "",
            }
        }
        match node.ty {
            Type::Boolean => "false",
            Type::Integer | Type::Number => "0",
            _ => "",
        }
    }

    /// Whether the schema declares `name` as an object property (`spec`, `status`).
    pub fn declares_object(&self, name: &str) -> bool {
        self.property(name).is_some_and(|p| p.ty == Type::Object)
    }

    /// Whether `path` (`spec.color`) names a field this schema declares as a string, boolean
    /// or integer: what a CRD's `selectableFields` may point to.
    pub fn is_selectable_scalar(&self, path: &str) -> bool {
        let mut node = self;
        for key in path.split('.') {
            match node.property(key) {
                Some(sub) => node = sub,
                None => return false,
            }
        }
        matches!(node.ty, Type::String | Type::Boolean | Type::Integer)
    }

    /// Whether any node has `x-kubernetes-validations` rules.
    pub fn has_rules(&self) -> bool {
        self.rules_below
    }

    /// What CEL's `self.<name>` reaches: a property, or a map's values.
    pub(crate) fn cel_field(&self, name: &str) -> Option<&Structural> {
        match self.child(name) {
            Child::Known(sub) => Some(sub),
            _ => None,
        }
    }

    /// A list's items, or a map's values.
    pub(crate) fn cel_element(&self) -> Option<&Structural> {
        match (&self.items, &self.additional) {
            (Some(items), _) => Some(items),
            (None, Additional::Values(values)) => Some(values),
            _ => None,
        }
    }

    /// The declared bound on its size: `maxItems`, `maxProperties` or `maxLength`.
    pub(crate) fn cel_bound(&self) -> Option<u64> {
        match self.ty {
            Type::Array => self.max_items,
            Type::Object => self.max_properties,
            Type::String | Type::IntOrString => self.max_length,
            _ => None,
        }
    }

    /// Whether CEL iterates it as a map (keys first).
    pub(crate) fn cel_is_map(&self) -> bool {
        self.ty == Type::Object
    }

    /// Whether it is a number or a boolean: constant-size for CEL.
    pub(crate) fn cel_is_scalar(&self) -> bool {
        matches!(self.ty, Type::Integer | Type::Number | Type::Boolean)
    }

    fn child(&self, key: &str) -> Child<'_> {
        if let Some(sub) = self.property(key) {
            return Child::Known(sub);
        }
        if self.embedded && matches!(key, "apiVersion" | "kind" | "metadata") {
            return Child::Preserved;
        }
        match &self.additional {
            Additional::Values(sub) => Child::Known(sub),
            Additional::Preserved => Child::Preserved,
            Additional::Unknown => Child::Unknown,
        }
    }
}

enum Child<'a> {
    Known(&'a Structural),
    Preserved,
    Unknown,
}

/// The fields of `object` its schema does not know, as kube-apiserver names them
/// (`spec.template.spec.containers[0].foo`). The root's metadata is not looked into.
pub fn unknown_fields(schema: &Structural, object: &Value) -> Vec<String> {
    let mut found = Vec::new();
    if let Value::Object(map) = object {
        for (key, value) in map {
            if key == "metadata" {
                collect_unknown(&OBJECT_META, value, &mut key.clone(), &mut found);
                continue;
            }
            if is_root_meta(key) {
                continue;
            }
            let mut path = key.clone();
            match schema.child(key) {
                Child::Known(sub) => collect_unknown(sub, value, &mut path, &mut found),
                Child::Preserved => {}
                Child::Unknown => found.push(path),
            }
        }
    }
    found
}

/// `metadata` of every object: ObjectMeta's schema, for finding and pruning unknown fields in
/// the root's (and an embedded resource's) metadata as Go's decoding drops them.
static OBJECT_META: std::sync::LazyLock<Structural> = std::sync::LazyLock::new(|| {
    Structural::compile(&crate::crdgen::plain_schema_of::<
        k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    >())
});

fn is_root_meta(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind" | "metadata")
}

fn collect_unknown(schema: &Structural, value: &Value, path: &mut String, found: &mut Vec<String>) {
    match value {
        Value::Object(map) if schema.ty == Type::Object => {
            for (key, child) in map {
                let len = path.len();
                let _ = write!(path, ".{key}");
                match schema.child(key) {
                    // An embedded resource's metadata is an ObjectMeta.
                    Child::Preserved if schema.embedded && key == "metadata" => {
                        collect_unknown(&OBJECT_META, child, path, found)
                    }
                    Child::Known(sub) => collect_unknown(sub, child, path, found),
                    Child::Preserved => {}
                    Child::Unknown => found.push(path.clone()),
                }
                path.truncate(len);
            }
        }
        Value::Array(items) => {
            if let Some(sub) = &schema.items {
                for (i, item) in items.iter().enumerate() {
                    let len = path.len();
                    let _ = write!(path, "[{i}]");
                    collect_unknown(sub, item, path, found);
                    path.truncate(len);
                }
            }
        }
        _ => {}
    }
}

/// Drops the fields the schema does not know (CRD pruning; Go's decoding does the same for
/// built-in kinds), then fills in schema defaults for absent fields.
pub fn prune_and_default(schema: &Structural, object: &mut Value) {
    if let Value::Object(map) = object {
        map.retain(|key, _| is_root_meta(key) || !matches!(schema.child(key), Child::Unknown));
        for (key, value) in map.iter_mut() {
            if key == "metadata" {
                prune_metadata(value);
            } else if let (false, Child::Known(sub)) = (is_root_meta(key), schema.child(key)) {
                prune_value(sub, value);
            }
        }
        fill_defaults(schema, map, true);
    }
}

/// Fills in schema defaults for absent fields without pruning anything: what a custom
/// resource read from the store gets when its CRD gained defaults after it was written.
pub fn default_only(schema: &Structural, object: &mut Value) {
    if let Value::Object(map) = object {
        for (key, value) in map.iter_mut() {
            if let (false, Child::Known(sub)) = (is_root_meta(key), schema.child(key)) {
                default_value(sub, value);
            }
        }
        fill_defaults(schema, map, true);
    }
}

fn default_value(schema: &Structural, value: &mut Value) {
    match value {
        Value::Object(map) if schema.ty == Type::Object => {
            for (key, child) in map.iter_mut() {
                if let Child::Known(sub) = schema.child(key) {
                    default_value(sub, child);
                }
            }
            fill_defaults(schema, map, false);
        }
        Value::Array(items) => {
            if let Some(sub) = &schema.items {
                items.iter_mut().for_each(|item| default_value(sub, item));
            }
        }
        _ => {}
    }
}

/// Whether a schema (anywhere in it) has a default.
pub fn has_defaults(schema: &Structural) -> bool {
    schema.default.is_some()
        || schema.properties.iter().any(|(_, p)| has_defaults(p))
        || schema.items.as_deref().is_some_and(has_defaults)
        || matches!(&schema.additional, Additional::Values(v) if has_defaults(v))
}

/// Drops the fields ObjectMeta does not have (without defaulting anything in it).
fn prune_metadata(value: &mut Value) {
    if let Value::Object(map) = value {
        map.retain(|key, _| !matches!(OBJECT_META.child(key), Child::Unknown));
    }
}

fn prune_value(schema: &Structural, value: &mut Value) {
    match value {
        Value::Object(map) if schema.ty == Type::Object => {
            map.retain(|key, _| !matches!(schema.child(key), Child::Unknown));
            for (key, child) in map.iter_mut() {
                match schema.child(key) {
                    Child::Known(sub) => prune_value(sub, child),
                    Child::Preserved if schema.embedded && key == "metadata" => {
                        prune_metadata(child)
                    }
                    _ => {}
                }
            }
            fill_defaults(schema, map, false);
        }
        Value::Array(items) => {
            if let Some(sub) = &schema.items {
                items.iter_mut().for_each(|item| prune_value(sub, item));
            }
        }
        _ => {}
    }
}

fn fill_defaults(schema: &Structural, map: &mut Map<String, Value>, root: bool) {
    for (name, sub) in &schema.properties {
        if root && is_root_meta(name) {
            continue;
        }
        if let (Some(default), false) = (&sub.default, map.contains_key(name)) {
            let mut value = default.clone();
            prune_value(sub, &mut value);
            map.insert(name.clone(), value);
        }
    }
}

/// [`validate`] for a built-in kind: `required` is not enforced under `status`, nor for
/// lists anywhere. Built-in kinds' status is written by their controllers, and
/// kube-apiserver holds it to its types, not to the OpenAPI `required` markers (a CRD's
/// status condition may lack a type); and a required list left empty is `null` in Go's JSON
/// (a CSINode with no drivers), which kube-apiserver accepts.
pub fn validate_builtin(schema: &Structural, object: &Value) -> Vec<Cause> {
    validate_with(schema, object, true)
}

/// Every way `object` breaks its schema, as `Invalid` causes.
pub fn validate(schema: &Structural, object: &Value) -> Vec<Cause> {
    validate_with(schema, object, false)
}

fn validate_with(schema: &Structural, object: &Value, lenient_status: bool) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Value::Object(map) = object {
        check_required(schema, map, "", &mut causes, true, lenient_status);
        for (key, value) in map {
            if let (false, Child::Known(sub)) = (is_root_meta(key), schema.child(key)) {
                check(sub, value, key, &mut causes, lenient_status);
            }
        }
    }
    causes
}

fn check_required(
    schema: &Structural,
    map: &Map<String, Value>,
    path: &str,
    causes: &mut Vec<Cause>,
    root: bool,
    builtin: bool,
) {
    for name in &schema.required {
        if root && is_root_meta(name) {
            continue;
        }
        if builtin && schema.property(name).is_some_and(|p| p.ty == Type::Array) {
            continue;
        }
        if !map.contains_key(name) {
            causes.push(Cause {
                reason: "FieldValueRequired".into(),
                message: "Required value".into(),
                field: join(path, name),
            });
        }
    }
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn invalid(path: &str, value: &Value, detail: String) -> Cause {
    Cause {
        reason: "FieldValueInvalid".into(),
        message: format!("Invalid value: {}: {detail}", short(value)),
        field: path.to_owned(),
    }
}

/// A value as kube-apiserver quotes it in messages: scalars as JSON, containers by type.
fn short(value: &Value) -> String {
    match value {
        Value::Object(_) => "\"object\"".into(),
        Value::Array(_) => "\"array\"".into(),
        other => other.to_string(),
    }
}

fn check(
    schema: &Structural,
    value: &Value,
    path: &str,
    causes: &mut Vec<Cause>,
    lenient_status: bool,
) {
    if !schema.ty.admits(value) {
        let detail = format!("{path} in body must be of type {}", schema.ty.name());
        causes.push(invalid(path, &Value::String(type_of(value).into()), detail));
        return;
    }
    if !schema.enumeration.is_empty() && !schema.enumeration.contains(value) {
        let supported: Vec<String> = schema.enumeration.iter().map(Value::to_string).collect();
        causes.push(Cause {
            reason: "FieldValueNotSupported".into(),
            message: format!(
                "Unsupported value: {value}: supported values: {}",
                supported.join(", ")
            ),
            field: path.to_owned(),
        });
    }
    match value {
        Value::String(text) => check_string(schema, text, value, path, causes),
        Value::Number(number) => {
            let n = number.as_f64().unwrap_or_default();
            if schema.minimum.is_some_and(|min| n < min) {
                let min = schema.minimum.unwrap_or_default();
                let detail = format!("{path} in body should be greater than or equal to {min}");
                causes.push(invalid(path, value, detail));
            }
            if schema.maximum.is_some_and(|max| n > max) {
                let max = schema.maximum.unwrap_or_default();
                let detail = format!("{path} in body should be less than or equal to {max}");
                causes.push(invalid(path, value, detail));
            }
            if schema.format.as_deref() == Some("int32")
                && number.as_i64().is_some_and(|n| i32::try_from(n).is_err())
            {
                let detail = format!("{path} in body must be of type int32");
                causes.push(invalid(path, value, detail));
            }
        }
        Value::Array(items) => {
            let len = items.len() as u64;
            if schema.min_items.is_some_and(|min| len < min) {
                let detail = format!(
                    "{path} in body should have at least {} items",
                    schema.min_items.unwrap_or_default()
                );
                causes.push(invalid(path, value, detail));
            }
            if schema.max_items.is_some_and(|max| len > max) {
                causes.push(Cause {
                    reason: "FieldValueTooMany".into(),
                    message: format!(
                        "Too many: {len}: must have at most {} items",
                        schema.max_items.unwrap_or_default()
                    ),
                    field: path.to_owned(),
                });
            }
            if let Some(sub) = &schema.items {
                for (i, item) in items.iter().enumerate() {
                    check(sub, item, &format!("{path}[{i}]"), causes, lenient_status);
                }
            }
        }
        Value::Object(map) => {
            let in_status =
                path == "status" || path.starts_with("status.") || path.starts_with("status[");
            if !(lenient_status && in_status) {
                check_required(schema, map, path, causes, false, lenient_status);
            }
            for (key, child) in map {
                if let Child::Known(sub) = schema.child(key) {
                    check(sub, child, &join(path, key), causes, lenient_status);
                }
            }
        }
        _ => {}
    }
}

fn check_string(
    schema: &Structural,
    text: &str,
    value: &Value,
    path: &str,
    causes: &mut Vec<Cause>,
) {
    let chars = text.chars().count() as u64;
    if let Some(max) = schema.max_length.filter(|max| chars > *max) {
        causes.push(Cause {
            reason: "FieldValueTooLong".into(),
            message: format!("Too long: may not be more than {max} bytes"),
            field: path.to_owned(),
        });
    }
    if let Some(min) = schema.min_length.filter(|min| chars < *min) {
        let detail = format!("{path} in body should be at least {min} chars long");
        causes.push(invalid(path, value, detail));
    }
    if let Some(Pattern(pattern)) = &schema.pattern {
        if !pattern.is_match(text) {
            let detail = format!("{path} in body should match '{}'", pattern.as_str());
            causes.push(invalid(path, value, detail));
        }
    }
    let format_ok = match schema.format.as_deref() {
        Some("date-time") => text.parse::<jiff::Timestamp>().is_ok(),
        Some("byte") => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .is_ok()
        }
        _ => true,
    };
    if !format_ok {
        let format = schema.format.as_deref().unwrap_or_default();
        let detail = format!("{path} in body must be of type {format}: {value}");
        causes.push(invalid(path, value, detail));
    }
}

fn type_of(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Structural {
        Structural::compile(&json!({
            "type": "object",
            "properties": {
                "metadata": { "type": "object" },
                "spec": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": { "type": "string", "minLength": 1 },
                        "replicas": { "type": "integer", "format": "int32", "minimum": 0, "default": 1 },
                        "mode": { "type": "string", "enum": ["A", "B"] },
                        "port": { "x-kubernetes-int-or-string": true },
                        "labels": { "type": "object", "additionalProperties": { "type": "string" } },
                        "raw": { "type": "object", "x-kubernetes-preserve-unknown-fields": true },
                        "items": { "type": "array", "items": {
                            "type": "object", "properties": { "name": { "type": "string" } }
                        } },
                        "when": { "type": "string", "format": "date-time" },
                    }
                }
            }
        }))
    }

    #[test]
    fn unknown_fields_are_named_by_path_and_pruned() {
        let schema = schema();
        let mut object = json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": { "name": "a", "whatever": 1 },
            "extra": true,
            "spec": {
                "image": "i", "bogus": 1, "labels": { "any": "thing" },
                "raw": { "free": { "form": 1 } },
                "items": [{ "name": "n" }, { "name": "m", "nope": 2 }],
            }
        });
        assert_eq!(
            unknown_fields(&schema, &object),
            vec![
                "extra",
                "metadata.whatever",
                "spec.bogus",
                "spec.items[1].nope"
            ]
        );
        prune_and_default(&schema, &mut object);
        assert_eq!(unknown_fields(&schema, &object), Vec::<String>::new());
        assert_eq!(
            object["metadata"],
            json!({"name": "a"}),
            "root metadata keeps ObjectMeta's fields only"
        );
        assert_eq!(object["spec"]["raw"]["free"]["form"], 1);
        assert_eq!(object["spec"]["replicas"], 1, "defaulted");
        assert!(validate(&schema, &object).is_empty());
    }

    #[test]
    fn violations_become_causes() {
        let schema = schema();
        let object = json!({ "spec": {
            "replicas": "three", "mode": "C", "port": true, "labels": { "a": 1 },
            "when": "yesterday", "items": [{ "name": 5 }],
        }});
        let causes = validate(&schema, &object);
        let mut causes = causes;
        causes.sort_by(|a, b| a.field.cmp(&b.field));
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.image",
                "spec.items[0].name",
                "spec.labels.a",
                "spec.mode",
                "spec.port",
                "spec.replicas",
                "spec.when",
            ]
        );
        assert_eq!(causes[0].message, "Required value");
        assert!(
            causes[5]
                .message
                .contains("spec.replicas in body must be of type integer"),
            "{:?}",
            causes[5]
        );
        assert!(causes[3].message.starts_with("Unsupported value: \"C\""));
    }

    #[test]
    fn int_or_string_and_bounds() {
        let schema = schema();
        let ok = json!({ "spec": { "image": "i", "port": "http", "replicas": 2 } });
        assert!(validate(&schema, &ok).is_empty());
        let ok = json!({ "spec": { "image": "i", "port": 8080 } });
        assert!(validate(&schema, &ok).is_empty());
        let bad = json!({ "spec": { "image": "", "replicas": -1 } });
        assert_eq!(validate(&schema, &bad).len(), 2);
        let big = json!({ "spec": { "image": "i", "replicas": 1u64 << 40 } });
        assert_eq!(validate(&schema, &big).len(), 1);
    }
}
