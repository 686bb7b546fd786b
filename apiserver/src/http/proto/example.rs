//! An object of a kind with every field of its wire schema set (to a depth), for tests that
//! send it through protobuf and back: a field with the wrong number, type or JSON name shows
//! as a difference.

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::{Field, SCHEMA};

/// How deep messages are filled in: deep enough for a pod template inside a CronJob's job
/// template, shallow enough that recursive schemas (JSONSchemaProps) end.
const DEPTH: usize = 9;

/// An object of `api_version`/`kind` with every field set, or `None` without a schema.
pub fn example(api_version: &str, kind: &str) -> Option<Value> {
    let root = SCHEMA.roots.get(&format!("{api_version}/{kind}"))?;
    let mut object = message(root, 0)?;
    let map = object.as_object_mut()?;
    map.insert("apiVersion".into(), json!(api_version));
    map.insert("kind".into(), json!(kind));
    Some(object)
}

fn message(name: &str, depth: usize) -> Option<Value> {
    if let Some(value) = special(name) {
        return Some(value);
    }
    if depth > DEPTH {
        return None;
    }
    let fields = SCHEMA.messages.get(name)?;
    let mut object = Map::new();
    for (tag, Field(json_name, kind, typ, repeated)) in fields {
        let value = match kind.as_str() {
            "message" => match message(typ, depth + 1) {
                Some(v) => v,
                None => continue,
            },
            "map" => {
                let value_kind = typ.split_once(',').map_or("string", |(_, v)| v);
                let value = if value_kind.contains('.') {
                    match message(value_kind, depth + 1) {
                        Some(v) => v,
                        None => continue,
                    }
                } else {
                    scalar(value_kind, *tag)
                };
                json!({ "k": value })
            }
            scalar_kind => scalar(scalar_kind, *tag),
        };
        if json_name.is_empty() {
            // Inline: the embedded message's fields are this object's.
            if let Value::Object(inner) = value {
                object.extend(inner);
            }
        } else if *repeated && kind != "map" {
            object.insert(json_name.clone(), json!([value]));
        } else {
            object.insert(json_name.clone(), value);
        }
    }
    Some(Value::Object(object))
}

fn scalar(kind: &str, tag: u32) -> Value {
    match kind {
        "string" => json!(format!("s{tag}")),
        "bytes" => json!(base64::engine::general_purpose::STANDARD.encode(format!("b{tag}"))),
        "bool" => json!(true),
        "int32" => json!(-(tag as i64)),
        "int64" => json!(1_000_000_000_000 + i64::from(tag)),
        "double" => json!(1.5),
        "float" => json!(0.25),
        _ => Value::Null,
    }
}

fn special(name: &str) -> Option<Value> {
    let short = name.rsplit('.').next().unwrap_or(name);
    Some(match (name, short) {
        ("apimachinery.pkg.apis.meta.v1.Time", _) => json!("2026-01-02T03:04:05Z"),
        ("apimachinery.pkg.apis.meta.v1.MicroTime", _) => json!("2026-01-02T03:04:05.123456Z"),
        ("apimachinery.pkg.apis.meta.v1.Duration", _) => json!("90s"),
        ("apimachinery.pkg.util.intstr.IntOrString", _) => json!("25%"),
        ("apimachinery.pkg.api.resource.Quantity", _) => json!("1500m"),
        ("apimachinery.pkg.runtime.RawExtension", _)
        | ("apimachinery.pkg.apis.meta.v1.FieldsV1", _)
        | (_, "Json") => json!({"any": ["json", 1]}),
        (_, "JsonSchemaPropsOrBool") => json!(true),
        (_, "JsonSchemaPropsOrStringArray") => json!(["a", "b"]),
        (_, "JsonSchemaPropsOrArray") => json!({"type": "string"}),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every field path of `value` (objects' keys, through arrays).
    fn paths(value: &Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    let path = format!("{prefix}.{k}");
                    out.insert(path.clone());
                    paths(v, &path, out);
                }
            }
            Value::Array(items) => items.iter().for_each(|v| paths(v, prefix, out)),
            _ => {}
        }
    }

    /// The JSON names of the wire schema are the API's: an object with every field set
    /// survives k8s-openapi's typed round trip whole (a misspelt name, such as an
    /// embedded struct's `downwardApi` for `downwardAPI`, would be dropped).
    fn round_trips<K: serde::Serialize + serde::de::DeserializeOwned>(
        api_version: &str,
        kind: &str,
    ) {
        let example = example(api_version, kind).unwrap();
        let typed: K = serde_json::from_value(example.clone()).unwrap();
        let back = serde_json::to_value(&typed).unwrap();
        let (mut want, mut got) = (Default::default(), Default::default());
        paths(&example, "", &mut want);
        paths(&back, "", &mut got);
        // `spec.workloadRef` is in the wire schema but not (yet) in k8s-openapi's PodSpec: the
        // schema generator names it so.
        let lost: Vec<&String> = want
            .difference(&got)
            .filter(|p| !p.starts_with(".spec.workloadRef"))
            .collect();
        assert!(lost.is_empty(), "{kind}: fields lost: {lost:?}");
    }

    #[test]
    fn json_names_are_the_apis() {
        use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
        round_trips::<Pod>("v1", "Pod");
        round_trips::<PersistentVolume>("v1", "PersistentVolume");
    }
}
