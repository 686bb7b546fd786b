//! JSON → protobuf: the objects the engine returns, as Go's encoder writes them for a
//! client that asked for protobuf. Fields come out in tag order; absent fields are left out
//! (a Go decoder reads them as their zero values, exactly as if they had been written);
//! repeated scalars are unpacked (proto2, as `generated.proto` declares them).

use base64::Engine as _;
use serde_json::Value;

use super::{Field, MAGIC, SCHEMA};

/// Why an object could not be encoded (the response then stays JSON).
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// No protobuf schema for this kind.
    #[error("no protobuf schema for {0}")]
    NoSchema(String),
    /// A value does not have the type its field's schema says.
    #[error("{message}.{field}: {problem}")]
    Mismatch {
        /// The message being encoded.
        message: String,
        /// The field.
        field: String,
        /// What was wrong.
        problem: String,
    },
}

/// Encodes `object` (which names its `apiVersion` and `kind`) as a protobuf body: `k8s\0` +
/// `runtime.Unknown`.
pub fn encode(object: &Value) -> Result<Vec<u8>, EncodeError> {
    let text = |key: &str| object.get(key).and_then(Value::as_str).unwrap_or_default();
    let raw = encode_message(object)?;
    Ok(envelope(text("apiVersion"), text("kind"), &raw))
}

/// The message of `object` (which names its `apiVersion` and `kind`) without the envelope:
/// what a list holds for each item, so a server can keep it and write lists by
/// concatenation.
pub fn encode_message(object: &Value) -> Result<Vec<u8>, EncodeError> {
    let text = |key: &str| object.get(key).and_then(Value::as_str).unwrap_or_default();
    let root = root(text("apiVersion"), text("kind"))?;
    let mut raw = Vec::with_capacity(256);
    message(root, object, &mut raw)?;
    Ok(raw)
}

/// A whole list (`api_version`/`list_kind`, e.g. `v1`/`ConfigMapList`) from its `ListMeta`
/// as JSON and its items' messages as [`encode_message`] wrote them.
pub fn encode_list<'a>(
    api_version: &str,
    list_kind: &str,
    metadata: &Value,
    items: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<u8>, EncodeError> {
    let name = root(api_version, list_kind)?;
    let fields = SCHEMA
        .messages
        .get(name)
        .ok_or_else(|| EncodeError::NoSchema(name.to_owned()))?;
    let tag_of = |json_name: &str| {
        fields
            .iter()
            .find(|(_, field)| field.0 == json_name)
            .map(|(tag, field)| (*tag, field.2.as_str()))
            .ok_or_else(|| mismatch(name, json_name, "no such field"))
    };
    let (metadata_tag, metadata_type) = tag_of("metadata")?;
    let (items_tag, _) = tag_of("items")?;
    let mut meta = Vec::new();
    message(metadata_type, metadata, &mut meta)?;
    // Written once, straight into the envelope: the raw message's length is known first.
    let items: Vec<&[u8]> = items.into_iter().collect();
    let field_len =
        |tag: u32, len: usize| varint_len((u64::from(tag) << 3) | 2) + varint_len(len as u64) + len;
    let raw_len = field_len(metadata_tag, meta.len())
        + items
            .iter()
            .map(|item| field_len(items_tag, item.len()))
            .sum::<usize>();
    let mut type_meta = Vec::new();
    string_field(1, api_version, &mut type_meta);
    string_field(2, list_kind, &mut type_meta);
    let mut out = Vec::with_capacity(raw_len + type_meta.len() + 32);
    out.extend_from_slice(MAGIC);
    bytes_field(1, &type_meta, &mut out);
    key(2, 2, &mut out);
    varint(raw_len as u64, &mut out);
    bytes_field(metadata_tag, &meta, &mut out);
    for item in items {
        bytes_field(items_tag, item, &mut out);
    }
    Ok(out)
}

fn root(api_version: &str, kind: &str) -> Result<&'static str, EncodeError> {
    SCHEMA
        .roots
        .get(&format!("{api_version}/{kind}"))
        .map(String::as_str)
        .ok_or_else(|| EncodeError::NoSchema(format!("{api_version}/{kind}")))
}

/// `k8s\0` + `runtime.Unknown{typeMeta, raw}`.
fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
    let mut type_meta = Vec::new();
    string_field(1, api_version, &mut type_meta);
    string_field(2, kind, &mut type_meta);
    let mut out = Vec::with_capacity(raw.len() + type_meta.len() + 16);
    out.extend_from_slice(MAGIC);
    bytes_field(1, &type_meta, &mut out);
    bytes_field(2, raw, &mut out);
    out
}

/// One watch event as client-go's protobuf watch decoder reads it: a 4-byte big-endian
/// length, then a `meta.v1.WatchEvent` (type, and the object as a `RawExtension` holding its
/// own `k8s\0` envelope). A `BOOKMARK` or `ERROR` event's object is encoded the same way.
pub fn watch_frame(event_type: &str, object: &Value) -> Result<Vec<u8>, EncodeError> {
    let embedded = encode(object)?;
    let mut raw_extension = Vec::new();
    bytes_field(1, &embedded, &mut raw_extension);
    let mut event = Vec::new();
    string_field(1, event_type, &mut event);
    bytes_field(2, &raw_extension, &mut event);
    let length = u32::try_from(event.len()).unwrap_or(u32::MAX);
    let mut frame = length.to_be_bytes().to_vec();
    frame.extend(event);
    Ok(frame)
}

fn varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// How many bytes [`varint`] writes for `value`.
fn varint_len(value: u64) -> usize {
    (64 - (value | 1).leading_zeros() as usize).div_ceil(7)
}

fn key(tag: u32, wire: u8, out: &mut Vec<u8>) {
    varint((u64::from(tag) << 3) | u64::from(wire), out);
}

fn bytes_field(tag: u32, bytes: &[u8], out: &mut Vec<u8>) {
    key(tag, 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn string_field(tag: u32, text: &str, out: &mut Vec<u8>) {
    bytes_field(tag, text.as_bytes(), out);
}

fn int_field(tag: u32, value: i64, out: &mut Vec<u8>) {
    key(tag, 0, out);
    // Negative numbers, int32 too, are ten bytes: the two's complement as 64 bits.
    varint(value as u64, out);
}

fn mismatch(message: &str, field: &str, problem: impl Into<String>) -> EncodeError {
    EncodeError::Mismatch {
        message: message.to_owned(),
        field: field.to_owned(),
        problem: problem.into(),
    }
}

/// Writes the fields of message `name` from `value`.
fn message(name: &str, value: &Value, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if special(name, value, out)? {
        return Ok(());
    }
    let fields = SCHEMA
        .messages
        .get(name)
        .ok_or_else(|| EncodeError::NoSchema(name.to_owned()))?;
    let Value::Object(map) = value else {
        return Err(mismatch(name, "", "not an object"));
    };
    let tags = SCHEMA
        .ordered
        .get(name)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for tag in tags {
        let Field(json_name, kind, typ, repeated) = &fields[tag];
        let tag = *tag;
        if json_name.is_empty() {
            // A Go struct embedded inline: its fields are this object's.
            let mut inner = Vec::new();
            message(typ, value, &mut inner)?;
            if !inner.is_empty() {
                bytes_field(tag, &inner, out);
            }
            continue;
        }
        let Some(field) = map.get(json_name).filter(|v| !v.is_null()) else {
            continue;
        };
        match (kind.as_str(), *repeated) {
            ("map", _) => {
                let Value::Object(entries) = field else {
                    return Err(mismatch(name, json_name, "not a map"));
                };
                let value_kind = typ.split_once(',').map_or("string", |(_, v)| v);
                let mut keys: Vec<&String> = entries.keys().collect();
                keys.sort_unstable();
                for k in keys {
                    let mut entry = Vec::new();
                    string_field(1, k, &mut entry);
                    let v = &entries[k];
                    if value_kind.contains('.') {
                        let mut inner = Vec::new();
                        message(value_kind, v, &mut inner)?;
                        bytes_field(2, &inner, &mut entry);
                    } else if !v.is_null() {
                        scalar(2, value_kind, v, &mut entry)
                            .map_err(|p| mismatch(name, json_name, p))?;
                    }
                    bytes_field(tag, &entry, out);
                }
            }
            (_, true) => {
                let Value::Array(items) = field else {
                    return Err(mismatch(name, json_name, "not a list"));
                };
                for item in items {
                    one(name, json_name, tag, kind, typ, item, out)?;
                }
            }
            (_, false) => one(name, json_name, tag, kind, typ, field, out)?,
        }
    }
    Ok(())
}

/// One value of a field: a message or a scalar.
fn one(
    parent: &str,
    json_name: &str,
    tag: u32,
    kind: &str,
    typ: &str,
    value: &Value,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if kind == "message" {
        let mut inner = Vec::new();
        message(typ, value, &mut inner)?;
        bytes_field(tag, &inner, out);
        Ok(())
    } else {
        scalar(tag, kind, value, out).map_err(|p| mismatch(parent, json_name, p))
    }
}

fn scalar(tag: u32, kind: &str, value: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    match (kind, value) {
        ("string", Value::String(s)) => string_field(tag, s, out),
        ("bytes", Value::String(s)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(s)
                .map_err(|e| format!("not base64: {e}"))?;
            bytes_field(tag, &bytes, out);
        }
        ("bool", Value::Bool(b)) => int_field(tag, i64::from(*b), out),
        ("int32" | "int64", Value::Number(n)) => {
            let n = n
                .as_i64()
                .or_else(|| n.as_f64().filter(|f| f.fract() == 0.0).map(|f| f as i64))
                .ok_or_else(|| format!("{n} is not an integer"))?;
            int_field(tag, n, out);
        }
        ("double", Value::Number(n)) => {
            key(tag, 1, out);
            out.extend(n.as_f64().unwrap_or_default().to_le_bytes());
        }
        ("float", Value::Number(n)) => {
            key(tag, 5, out);
            out.extend((n.as_f64().unwrap_or_default() as f32).to_le_bytes());
        }
        (kind, other) => return Err(format!("{other} is not a {kind}")),
    }
    Ok(())
}

/// The messages whose JSON form is not an object of their fields; false for the others.
fn special(name: &str, value: &Value, out: &mut Vec<u8>) -> Result<bool, EncodeError> {
    let short = name.rsplit('.').next().unwrap_or(name);
    let wrong = |problem: &str| mismatch(name, "", problem);
    match (name, short) {
        ("apimachinery.pkg.apis.meta.v1.Time", _)
        | ("apimachinery.pkg.apis.meta.v1.MicroTime", _) => {
            let text = value.as_str().ok_or_else(|| wrong("not a timestamp"))?;
            let time: jiff::Timestamp = text.parse().map_err(|_| wrong("not an RFC 3339 time"))?;
            if time.as_second() != 0 {
                int_field(1, time.as_second(), out);
            }
            if time.subsec_nanosecond() != 0 && short == "MicroTime" {
                int_field(2, i64::from(time.subsec_nanosecond()), out);
            }
        }
        ("apimachinery.pkg.apis.meta.v1.Duration", _) => {
            let text = value.as_str().ok_or_else(|| wrong("not a duration"))?;
            let duration =
                crate::request::go_duration(text).ok_or_else(|| wrong("not a Go duration"))?;
            int_field(
                1,
                i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX),
                out,
            );
        }
        ("apimachinery.pkg.util.intstr.IntOrString", _) => match value {
            Value::String(s) => {
                int_field(1, 1, out);
                string_field(3, s, out);
            }
            Value::Number(n) => {
                int_field(1, 0, out);
                int_field(2, n.as_i64().ok_or_else(|| wrong("not an integer"))?, out);
            }
            _ => return Err(wrong("neither an integer nor a string")),
        },
        ("apimachinery.pkg.api.resource.Quantity", _) => match value {
            Value::String(s) => string_field(1, s, out),
            Value::Number(n) => string_field(1, &n.to_string(), out),
            _ => return Err(wrong("not a quantity")),
        },
        ("apimachinery.pkg.runtime.RawExtension", _)
        | ("apimachinery.pkg.apis.meta.v1.FieldsV1", _)
        | (_, "Json") => {
            let raw = serde_json::to_vec(value).unwrap_or_default();
            bytes_field(1, &raw, out);
        }
        (_, "JsonSchemaPropsOrBool") => match value {
            Value::Bool(allows) => int_field(1, i64::from(*allows), out),
            schema => {
                int_field(1, 1, out);
                let mut inner = Vec::new();
                message(&sibling(name, "JsonSchemaProps"), schema, &mut inner)?;
                bytes_field(2, &inner, out);
            }
        },
        (_, "JsonSchemaPropsOrArray" | "JsonSchemaPropsOrStringArray") => match value {
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::String(s) if short == "JsonSchemaPropsOrStringArray" => {
                            string_field(2, s, out)
                        }
                        schema => {
                            let mut inner = Vec::new();
                            message(&sibling(name, "JsonSchemaProps"), schema, &mut inner)?;
                            bytes_field(2, &inner, out);
                        }
                    }
                }
            }
            schema => {
                let mut inner = Vec::new();
                message(&sibling(name, "JsonSchemaProps"), schema, &mut inner)?;
                bytes_field(1, &inner, out);
            }
        },
        _ => return Ok(false),
    }
    Ok(true)
}

fn sibling(name: &str, short: &str) -> String {
    match name.rsplit_once('.') {
        Some((package, _)) => format!("{package}.{short}"),
        None => short.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_round_trip_through_the_decoder() {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "labels": {"a": "1", "b": "2"},
                         "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"containers": [{"name": "c", "image": "busybox",
                                     "ports": [{"containerPort": 80, "protocol": "TCP"}],
                                     "resources": {"limits": {"cpu": "500m"}},
                                     "livenessProbe": {"httpGet": {"port": "http", "path": "/"}}}],
                     "securityContext": {"runAsUser": -1}, "hostNetwork": true},
        });
        let bytes = encode(&pod).unwrap();
        assert_eq!(super::super::decode(&bytes).unwrap(), pod);
    }

    #[test]
    fn watch_frames_are_length_prefixed() {
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}});
        let frame = watch_frame("ADDED", &cm).unwrap();
        let length = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(length, frame.len() - 4);
    }

    #[test]
    fn varint_lengths_match_what_is_written() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(value, &mut out);
            assert_eq!(varint_len(value), out.len(), "{value}");
        }
    }

    #[test]
    fn a_kind_without_a_schema_is_named() {
        let err = encode(&json!({"apiVersion": "example.com/v1", "kind": "Widget"})).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no protobuf schema for example.com/v1/Widget"
        );
    }
}
