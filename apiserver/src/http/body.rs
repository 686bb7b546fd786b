//! Request bodies into the engine's JSON: JSON, YAML (server-side apply), or Kubernetes
//! protobuf — and the duplicate fields a JSON or YAML body had, which `fieldValidation=Strict`
//! refuses as kube-apiserver's strict decoding does (JSON and YAML decoders otherwise keep the
//! last value silently).

use std::cell::RefCell;
use std::fmt;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::proto;

/// A parsed body.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    /// The object (for a duplicate field, its last value).
    pub object: Value,
    /// Each duplicate, as kube-apiserver's strict decoding names it: `duplicate field
    /// "spec.replicas"` (JSON), `line 9: key "foo" already set in map` (YAML).
    pub duplicates: Vec<String>,
}

/// Parses `bytes`: protobuf if it starts with the `k8s\0` magic, YAML if `yaml` (an apply
/// patch), else JSON.
pub fn parse(bytes: &[u8], yaml: bool) -> Result<Body, ApiError> {
    if bytes.starts_with(proto::MAGIC) {
        return Ok(Body {
            object: proto::decode(bytes)?,
            duplicates: Vec::new(),
        });
    }
    if yaml {
        return parse_yaml(bytes);
    }
    let duplicates = RefCell::new(Vec::new());
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let object = Collect {
        path: String::new(),
        duplicates: &duplicates,
    }
    .deserialize(&mut deserializer)
    .and_then(|object| deserializer.end().map(|()| object))
    .map_err(|e| ApiError::BadRequest(format!("the request body is not valid JSON: {e}")))?;
    Ok(Body {
        object,
        duplicates: duplicates.into_inner(),
    })
}

/// YAML (JSON is YAML too). serde_yaml refuses a mapping with a repeated key and says where;
/// the body is then read again keeping the last value, and the repeat reported in Go's words.
fn parse_yaml(bytes: &[u8]) -> Result<Body, ApiError> {
    let invalid = |e: serde_yaml::Error| {
        ApiError::BadRequest(format!("the request body is not valid YAML: {e}"))
    };
    match serde_yaml::from_slice::<serde_yaml::Value>(bytes) {
        Ok(value) => Ok(Body {
            object: serde_json::to_value(value).map_err(|e| {
                ApiError::BadRequest(format!(
                    "the request body is not a JSON-compatible object: {e}"
                ))
            })?,
            duplicates: Vec::new(),
        }),
        Err(error) if error.to_string().contains("duplicate entry with key ") => {
            let message = error.to_string();
            let key = message
                .split("duplicate entry with key ")
                .nth(1)
                .and_then(|rest| rest.split(" at line").next())
                .unwrap_or_default()
                .to_owned();
            let location = error.location();
            let line = repeated_key_line(
                bytes,
                key.trim_matches('"'),
                location.as_ref().map_or(1, |l| l.line()),
                location.as_ref().map_or(1, |l| l.column()),
            );
            let object = serde_yaml::from_slice::<Value>(bytes).map_err(invalid)?;
            Ok(Body {
                object,
                duplicates: vec![format!("line {line}: key {key} already set in map")],
            })
        }
        Err(error) => Err(invalid(error)),
    }
}

/// The line of the second `key:` of the block mapping that starts at `line`, `column` (where
/// serde_yaml says the duplicate is): Go's YAML decoder names the repeat's line. For a flow
/// mapping (`{a: 1, a: 2}`) that is the mapping's own line.
fn repeated_key_line(bytes: &[u8], key: &str, line: usize, column: usize) -> usize {
    let text = String::from_utf8_lossy(bytes);
    let indent = column.saturating_sub(1);
    let mut seen = 0;
    for (number, text) in text.lines().enumerate().skip(line.saturating_sub(1)) {
        let (lead, rest) = text.split_at(text.len() - text.trim_start().len());
        if !rest.is_empty() && lead.len() < indent && number + 1 > line {
            break; // the mapping ended
        }
        let named = rest.strip_prefix(key).or_else(|| {
            rest.strip_prefix(&format!("\"{key}\""))
                .or_else(|| rest.strip_prefix(&format!("'{key}'")))
        });
        if lead.len() == indent && named.is_some_and(|r| r.trim_start().starts_with(':')) {
            seen += 1;
            if seen == 2 {
                return number + 1;
            }
        }
    }
    line
}

/// Builds a `Value` like serde_json's, noting every key a map repeats.
struct Collect<'a> {
    path: String,
    duplicates: &'a RefCell<Vec<String>>,
}

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        loop {
            let seed = Collect {
                path: format!("{}[{}]", self.path, items.len()),
                duplicates: self.duplicates,
            };
            match seq.next_element_seed(seed)? {
                Some(item) => items.push(item),
                None => return Ok(Value::Array(items)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let path = if self.path.is_empty() {
                key.clone()
            } else {
                format!("{}.{key}", self.path)
            };
            let value = map.next_value_seed(Collect {
                path: path.clone(),
                duplicates: self.duplicates,
            })?;
            if object.insert(key, value).is_some() {
                self.duplicates
                    .borrow_mut()
                    .push(format!("duplicate field \"{path}\""));
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_duplicates_are_named_by_path_and_the_last_value_kept() {
        let body = parse(
            br#"{"spec": {"replicas": 2, "replicas": 3, "c": [{"n": 1, "n": 2}]}}"#,
            false,
        )
        .unwrap();
        assert_eq!(
            body.object,
            json!({"spec": {"replicas": 3, "c": [{"n": 2}]}})
        );
        assert_eq!(
            body.duplicates,
            [
                "duplicate field \"spec.replicas\"",
                "duplicate field \"spec.c[0].n\""
            ]
        );
        assert!(parse(b"{\"a\": 1", false).is_err());
        assert!(parse(b"{} trailing", false).is_err());
    }

    #[test]
    fn yaml_duplicates_say_their_line() {
        let yaml = b"apiVersion: v1\nkind: X\nspec:\n  foo: a\n  foo: b\n";
        let body = parse(yaml, true).unwrap();
        assert_eq!(body.duplicates, ["line 5: key \"foo\" already set in map"]);
        // The conformance suite's case: the repeat's line, after a sibling key.
        let yaml = b"\napiVersion: x/v1\nkind: X\nmetadata:\n  name: a\nspec:\n  unknown: uk1\n  foo: foo1\n  foo: foo2\n  cronSpec: x\n";
        assert_eq!(
            parse(yaml, true).unwrap().duplicates,
            ["line 9: key \"foo\" already set in map"]
        );
        assert_eq!(
            parse(b"a: 1\nb: [1, 2]\n", true).unwrap().object,
            json!({"a": 1, "b": [1, 2]})
        );
    }
}
