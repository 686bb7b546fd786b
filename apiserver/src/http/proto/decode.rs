//! Protobuf → JSON: request bodies (`k8s\0` + `runtime.Unknown` + the object's message)
//! turned into the JSON the engine handles.
//!
//! Go's encoder writes unset value fields too, so empty strings are dropped (`""` means unset
//! throughout the Kubernetes API) and the zero time becomes absent; zeros and `false` stay.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use super::{Field, MAGIC, SCHEMA, bad};
use crate::error::ApiError;

/// A cursor over protobuf wire data.
struct Reader<'a> {
    data: &'a [u8],
}

/// One field as it comes off the wire.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

impl<'a> Reader<'a> {
    fn varint(&mut self) -> Result<u64, ApiError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = self
                .data
                .split_first()
                .ok_or_else(|| bad("truncated varint"))?;
            self.data = rest;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(bad("varint too long"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ApiError> {
        if self.data.len() < n {
            return Err(bad("truncated field"));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn field(&mut self) -> Result<Option<(u32, Wire<'a>)>, ApiError> {
        if self.data.is_empty() {
            return Ok(None);
        }
        let key = self.varint()?;
        let tag = u32::try_from(key >> 3).map_err(|_| bad("field number out of range"))?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(
                self.take(8)?.try_into().map_err(|_| bad("fixed64"))?,
            )),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| bad("length"))?;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(
                self.take(4)?.try_into().map_err(|_| bad("fixed32"))?,
            )),
            other => return Err(bad(&format!("unsupported wire type {other}"))),
        };
        Ok(Some((tag, wire)))
    }
}

/// Decodes a protobuf request body into the object's JSON.
pub(super) fn decode(body: &[u8]) -> Result<Value, ApiError> {
    let unknown = body
        .strip_prefix(MAGIC)
        .ok_or_else(|| bad("missing the k8s\\0 prefix"))?;
    let (mut api_version, mut kind, mut raw) = (String::new(), String::new(), &[][..]);
    let mut reader = Reader { data: unknown };
    while let Some((tag, wire)) = reader.field()? {
        match (tag, wire) {
            (1, Wire::Bytes(type_meta)) => {
                let mut tm = Reader { data: type_meta };
                while let Some((t, w)) = tm.field()? {
                    if let Wire::Bytes(b) = w {
                        let text = String::from_utf8_lossy(b).into_owned();
                        match t {
                            1 => api_version = text,
                            2 => kind = text,
                            _ => {}
                        }
                    }
                }
            }
            (2, Wire::Bytes(bytes)) => raw = bytes,
            (3, Wire::Bytes(encoding)) if !encoding.is_empty() => {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "protobuf content encoding {:?} is not supported",
                    String::from_utf8_lossy(encoding)
                )));
            }
            _ => {}
        }
    }
    // client-go sends DeleteOptions under the group version of the resource it deletes.
    let root = if kind == "DeleteOptions" {
        "meta.k8s.io/v1/DeleteOptions".to_owned()
    } else {
        format!("{api_version}/{kind}")
    };
    let message = SCHEMA.roots.get(&root).ok_or_else(|| {
        ApiError::UnsupportedMediaType(format!(
            "protobuf bodies are not supported for {api_version}/{kind}; send JSON"
        ))
    })?;
    let mut object = message_value(message, raw)?;
    if let Some(map) = object.as_object_mut() {
        map.insert("apiVersion".into(), json!(api_version));
        map.insert("kind".into(), json!(kind));
    }
    Ok(object)
}

fn text(bytes: &[u8]) -> Result<String, ApiError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| bad("a string field is not UTF-8"))
}

/// RFC 3339 from seconds (and nanos, for MicroTime). Go's zero time — encoded as an empty
/// message or as year 1 — means unset.
fn timestamp(seconds: i64, nanos: i64, micro: bool) -> Value {
    const GO_ZERO_TIME: i64 = -62_135_596_800;
    if (seconds == GO_ZERO_TIME || seconds == 0) && nanos == 0 {
        return Value::Null;
    }
    match jiff::Timestamp::new(seconds, if micro { nanos as i32 } else { 0 }) {
        Ok(t) if micro => json!(t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()),
        Ok(t) => json!(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
        Err(_) => Value::Null,
    }
}

/// The messages whose JSON form is not an object of their fields.
fn special(name: &str, data: &[u8]) -> Result<Option<Value>, ApiError> {
    let short = name.rsplit('.').next().unwrap_or(name);
    let fields = || -> Result<HashMap<u32, Vec<u8>>, ApiError> {
        let mut out = HashMap::new();
        let mut r = Reader { data };
        while let Some((tag, wire)) = r.field()? {
            let bytes = match wire {
                Wire::Bytes(b) => b.to_vec(),
                Wire::Varint(v) | Wire::Fixed64(v) => v.to_le_bytes().to_vec(),
                Wire::Fixed32(v) => u64::from(v).to_le_bytes().to_vec(),
            };
            out.insert(tag, bytes);
        }
        Ok(out)
    };
    let int = |f: &HashMap<u32, Vec<u8>>, tag| {
        f.get(&tag)
            .and_then(|b| b.get(..8).and_then(|b| b.try_into().ok()))
            .map(i64::from_le_bytes)
            .unwrap_or(0)
    };
    let raw_json = |bytes: Option<&Vec<u8>>| -> Value {
        bytes
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or(Value::Null)
    };
    Ok(Some(match (name, short) {
        ("apimachinery.pkg.apis.meta.v1.Time", _) => {
            let f = fields()?;
            timestamp(int(&f, 1), int(&f, 2), false)
        }
        ("apimachinery.pkg.apis.meta.v1.MicroTime", _) => {
            let f = fields()?;
            timestamp(int(&f, 1), int(&f, 2), true)
        }
        ("apimachinery.pkg.apis.meta.v1.Duration", _) => {
            let f = fields()?;
            json!(format!("{}s", int(&f, 1) as f64 / 1e9))
        }
        ("apimachinery.pkg.util.intstr.IntOrString", _) => {
            let f = fields()?;
            if int(&f, 1) == 1 {
                json!(text(f.get(&3).map(Vec::as_slice).unwrap_or_default())?)
            } else {
                json!(int(&f, 2) as i32)
            }
        }
        ("apimachinery.pkg.api.resource.Quantity", _) => {
            let f = fields()?;
            json!(text(f.get(&1).map(Vec::as_slice).unwrap_or_default())?)
        }
        ("apimachinery.pkg.runtime.RawExtension", _)
        | ("apimachinery.pkg.apis.meta.v1.FieldsV1", _) => raw_json(fields()?.get(&1)),
        (_, "Json") => raw_json(fields()?.get(&1)),
        (_, "JsonSchemaPropsOrBool") => {
            let f = fields()?;
            match f.get(&2) {
                Some(schema) => message_value(&sibling(name, "JsonSchemaProps"), schema)?,
                None => json!(int(&f, 1) != 0),
            }
        }
        (_, "JsonSchemaPropsOrArray" | "JsonSchemaPropsOrStringArray") => {
            let props = sibling(name, "JsonSchemaProps");
            let mut schema = None;
            let mut items = Vec::new();
            let mut r = Reader { data };
            while let Some((tag, wire)) = r.field()? {
                if let Wire::Bytes(b) = wire {
                    match tag {
                        1 => schema = Some(message_value(&props, b)?),
                        2 if short == "JsonSchemaPropsOrArray" => {
                            items.push(message_value(&props, b)?)
                        }
                        2 => items.push(json!(text(b)?)),
                        _ => {}
                    }
                }
            }
            schema.unwrap_or(Value::Array(items))
        }
        _ => return Ok(None),
    }))
}

fn sibling(name: &str, short: &str) -> String {
    match name.rsplit_once('.') {
        Some((package, _)) => format!("{package}.{short}"),
        None => short.to_owned(),
    }
}

fn scalar(kind: &str, wire: &Wire<'_>) -> Result<Value, ApiError> {
    Ok(match (kind, wire) {
        ("string", Wire::Bytes(b)) => json!(text(b)?),
        ("bytes", Wire::Bytes(b)) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        ("bool", Wire::Varint(v)) => json!(*v != 0),
        ("int32", Wire::Varint(v)) => json!(*v as i64 as i32),
        ("int64", Wire::Varint(v)) => json!(*v as i64),
        ("double", Wire::Fixed64(v)) => json!(f64::from_bits(*v)),
        ("float", Wire::Fixed32(v)) => json!(f32::from_bits(*v)),
        _ => return Err(bad(&format!("unexpected wire type for a {kind} field"))),
    })
}

/// Go `bool`s (not `*bool`) that Go's encoder always writes and its JSON omits when false:
/// kept, a CRD's schema would read back with `x-kubernetes-int-or-string: false` and the like.
const PLAIN_BOOLS: &[(&str, &[&str])] = &[(
    "JsonSchemaProps",
    &[
        "exclusiveMaximum",
        "exclusiveMinimum",
        "uniqueItems",
        "nullable",
        "x-kubernetes-embedded-resource",
        "x-kubernetes-int-or-string",
    ],
)];

/// The fields Go writes in protobuf even when zero and omits from JSON then (non-pointer
/// `omitempty` scalars: `stdin`, `hostPort`, `hostNetwork`, `generation`, …), per message —
/// generated from `k8s.io/api` by `scripts/go-zero-fields.sh`. kube-apiserver decodes into Go
/// structs, so such a zero never reaches storage; kept, it would show in what controllers
/// write (a DaemonSet's ControllerRevision would no longer match Go's view of its template).
static GO_ZERO_FIELDS: LazyLock<HashMap<String, HashSet<String>>> = LazyLock::new(|| {
    serde_json::from_str(include_str!("go_zero_fields.json")).unwrap_or_else(|error| {
        tracing::error!(%error, "go_zero_fields.json does not parse");
        HashMap::new()
    })
});

/// Whether `value` is a zero that Go's JSON would leave out for `message.field`.
fn omitted_false(message: &str, field: &str, value: &Value) -> bool {
    let short = message.rsplit('.').next().unwrap_or(message);
    let zero = match value {
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        _ => false,
    };
    zero && (GO_ZERO_FIELDS
        .get(message)
        .is_some_and(|fields| fields.contains(field))
        || *value == Value::Bool(false)
            && PLAIN_BOOLS
                .iter()
                .any(|(m, fields)| *m == short && fields.contains(&field)))
}

/// Decodes one message of the schema into JSON.
fn message_value(name: &str, data: &[u8]) -> Result<Value, ApiError> {
    if let Some(value) = special(name, data)? {
        return Ok(value);
    }
    let fields = SCHEMA
        .messages
        .get(name)
        .ok_or_else(|| bad(&format!("no schema for message {name}")))?;
    let mut object = Map::new();
    let mut reader = Reader { data };
    while let Some((tag, wire)) = reader.field()? {
        let Some(Field(json_name, kind, typ, repeated)) = fields.get(&tag) else {
            tracing::debug!(message = name, tag, "unknown protobuf field skipped");
            continue;
        };
        let value = match (kind.as_str(), &wire) {
            ("message", Wire::Bytes(b)) => message_value(typ, b)?,
            ("map", Wire::Bytes(b)) => {
                let (mut key, mut value) = (String::new(), Value::Null);
                let value_kind = typ.split_once(',').map(|(_, v)| v).unwrap_or("string");
                let mut entry = Reader { data: b };
                while let Some((t, w)) = entry.field()? {
                    match (t, &w) {
                        (1, Wire::Bytes(k)) => key = text(k)?,
                        (2, Wire::Bytes(v)) if value_kind.contains('.') => {
                            value = message_value(value_kind, v)?
                        }
                        (2, w) => value = scalar(value_kind, w)?,
                        _ => {}
                    }
                }
                let map = object
                    .entry(json_name.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if let Some(map) = map.as_object_mut() {
                    map.insert(key, value);
                }
                continue;
            }
            (scalar_kind, Wire::Bytes(b))
                if *repeated && scalar_kind != "string" && scalar_kind != "bytes" =>
            {
                // A packed repeated scalar.
                let items = object
                    .entry(json_name.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                let mut packed = Reader { data: b };
                while !packed.data.is_empty() {
                    let wire = match scalar_kind {
                        "double" => Wire::Fixed64(u64::from_le_bytes(
                            packed.take(8)?.try_into().map_err(|_| bad("packed"))?,
                        )),
                        "float" => Wire::Fixed32(u32::from_le_bytes(
                            packed.take(4)?.try_into().map_err(|_| bad("packed"))?,
                        )),
                        _ => Wire::Varint(packed.varint()?),
                    };
                    if let Some(items) = items.as_array_mut() {
                        items.push(scalar(scalar_kind, &wire)?);
                    }
                }
                continue;
            }
            (scalar_kind, wire) => scalar(scalar_kind, wire)?,
        };
        if json_name.is_empty() {
            // An embedded struct: its fields are the parent's in JSON.
            if let Value::Object(inner) = value {
                object.extend(inner);
            }
        } else if *repeated {
            let items = object
                .entry(json_name.clone())
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Some(items) = items.as_array_mut() {
                items.push(value);
            }
        } else if value.is_null() || value == json!("") || omitted_false(name, json_name, &value) {
            // Unset in Go terms: the zero time, an empty string, a plain bool left false.
        } else {
            object.insert(json_name.clone(), value);
        }
    }
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// Go writes `stdin: false`, `hostPort: 0`, `generation: 0` in protobuf; kube-apiserver's
    /// JSON leaves them out, and so does the decoder — but a pointer's `false` (a security
    /// context's `allowPrivilegeEscalation`) and a required zero (`containerPort`) stay.
    #[test]
    fn go_zero_values_of_omitempty_fields_are_left_out() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "generation": 0},
            "spec": {"hostNetwork": false, "containers": [{"name": "c", "image": "busybox",
                "stdin": false, "tty": false,
                "ports": [{"containerPort": 0, "hostPort": 0}],
                "securityContext": {"allowPrivilegeEscalation": false}}]}});
        let bytes = super::super::encode::encode(&pod).unwrap();
        let decoded = super::decode(&bytes).unwrap();
        assert_eq!(
            decoded,
            json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                "spec": {"containers": [{"name": "c", "image": "busybox",
                    "ports": [{"containerPort": 0}],
                    "securityContext": {"allowPrivilegeEscalation": false}}]}})
        );
    }
}
