//! Objects as the engine handles them: JSON values, with the server-owned metadata set here
//! and nowhere else.

use serde_json::{Map, Value};

use crate::error::{ApiError, Cause};
use crate::registry::ResourceDef;
use crate::request::FieldValidation;

/// `metadata.<field>` as a string.
pub fn meta_str<'v>(object: &'v Value, field: &str) -> Option<&'v str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// The object's `metadata`, created if missing.
pub fn metadata_mut(object: &mut Value) -> Result<&mut Map<String, Value>, ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("the request body must be a JSON object".into()))?;
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if meta.is_null() {
        *meta = Value::Object(Map::new());
    }
    meta.as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("metadata must be an object".into()))
}

/// The current time as Kubernetes writes it: RFC 3339, seconds, `Z`.
pub fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default()
}

/// Checks `apiVersion` and `kind`, filling them in when absent.
pub fn check_type(def: &ResourceDef, object: &mut Value) -> Result<(), ApiError> {
    let map = object
        .as_object_mut()
        .ok_or_else(|| ApiError::BadRequest("the request body must be a JSON object".into()))?;
    let api_version = def.api_version();
    match map.get("apiVersion").and_then(Value::as_str) {
        None => {
            map.insert("apiVersion".into(), Value::String(api_version));
        }
        Some(v) if v == api_version => {}
        Some(v) => {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({v}) does not match the expected API version ({api_version})"
            )));
        }
    }
    match map.get("kind").and_then(Value::as_str) {
        None => {
            map.insert("kind".into(), Value::String(def.kind.clone()));
        }
        Some(k) if k == def.kind => {}
        Some(k) => {
            return Err(ApiError::BadRequest(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                def.kind
            )));
        }
    }
    Ok(())
}

/// Why `name` is not a DNS-1123 subdomain (or label, for `label = true`), if it is not.
pub fn dns1123_problem(name: &str, label: bool) -> Option<String> {
    let max = if label { 63 } else { 253 };
    let what = if label {
        "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"
    } else {
        "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"
    };
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !name.is_empty()
        && name.len() <= max
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name
            .chars()
            .all(|c| alnum(c) || c == '-' || (!label && c == '.'));
    if ok {
        None
    } else if name.len() > max {
        Some(format!("must be no more than {max} characters"))
    } else {
        Some(what.to_owned())
    }
}

/// Why `name` cannot name an IPAddress: it must be the address itself in canonical form
/// (`10.0.0.1`, `2001:db8::1` — RFC 5952 for IPv6), as upstream's `ValidateIPAddressName`.
pub fn ip_address_name_problem(name: &str) -> Option<String> {
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) if ip.to_string() == name => None,
        Ok(ip) => Some(format!("must be in canonical form (\"{ip}\")")),
        Err(_) => Some("must be a valid IP address, (e.g. 10.9.8.7 or 2001:db8::ffff)".into()),
    }
}

/// Why `name` cannot be a path segment (upstream's `ValidatePathSegmentName`), if it cannot.
pub fn path_segment_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("name or generateName is required".into())
    } else if name == "." || name == ".." {
        Some(format!("may not be '{name}'"))
    } else if name.contains('/') || name.contains('%') {
        Some("may not contain '/' or '%'".into())
    } else {
        None
    }
}

/// Validates `metadata.name` (and namespace) of an object about to be stored.
pub fn validate_meta(def: &ResourceDef, object: &Value) -> Result<(), ApiError> {
    let name = meta_str(object, "name").unwrap_or_default();
    let mut causes = Vec::new();
    // Namespaces are DNS labels; RBAC's kinds path segments (`system:node`), as upstream
    // validates them; everything else here a DNS subdomain.
    let problem = if def.group == "rbac.authorization.k8s.io" {
        path_segment_problem(name)
    } else if def.group == "networking.k8s.io" && def.plural == "ipaddresses" {
        ip_address_name_problem(name)
    } else {
        dns1123_problem(name, def.kind == "Namespace")
    };
    if let Some(problem) = problem {
        causes.push(Cause {
            reason: "FieldValueInvalid".into(),
            message: format!("Invalid value: {name:?}: {problem}"),
            field: "metadata.name".into(),
        });
    }
    for map_field in ["labels", "annotations"] {
        if let Some(map) = object.pointer(&format!("/metadata/{map_field}")) {
            if !map.is_null()
                && !map
                    .as_object()
                    .is_some_and(|m| m.values().all(Value::is_string))
            {
                causes.push(Cause {
                    reason: "FieldValueInvalid".into(),
                    message: "must be a map of strings".into(),
                    field: format!("metadata.{map_field}"),
                });
            }
        }
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            kind: def.kind.clone(),
            name: name.to_owned(),
            group: def.group.clone(),
            causes,
        })
    }
}

/// An object as `PartialObjectMetadata`: its metadata only.
pub fn partial_metadata(object: &Value) -> Value {
    serde_json::json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object.get("metadata").cloned().unwrap_or_default(),
    })
}

/// Brings `object` in line with its kind's structural schema: unknown fields pruned, schema
/// defaults filled in, then validated (every violation a cause of one `Invalid`) — last the
/// schema's CEL rules, transition rules against `old` on an update.
pub fn conform(def: &ResourceDef, object: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let Some(schema) = def.schema.as_deref() else {
        return Ok(());
    };
    crate::schema::prune_and_default(schema, object);
    let mut causes = if matches!(def.openapi, crate::registry::SchemaSource::Builtin(_)) {
        crate::schema::validate_builtin(schema, object)
    } else {
        crate::schema::validate(schema, object)
    };
    if causes.is_empty() {
        causes = crate::admission::validate(def, object);
    }
    if causes.is_empty() && schema.has_rules() {
        causes = crate::schema::rules::check(schema, object, old);
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::Invalid {
            kind: def.kind.clone(),
            name: meta_str(object, "name").unwrap_or_default().to_owned(),
            group: def.group.clone(),
            causes,
        })
    }
}

/// What the engine will make of `object` before storing it, as far as its fields go: nulls
/// dropped, kind defaults and schema defaults filled in, unknown fields pruned. Field
/// management looks at this form, so a write that only leaves defaults out changes nothing.
/// (The engine does it again; every step is idempotent.)
pub fn normalize(def: &ResourceDef, object: &mut Value) {
    strip_nulls_of(def, object);
    crate::admission::on_write(def, object);
    if let Some(schema) = def.schema.as_deref() {
        crate::schema::prune_and_default(schema, object);
    }
}

/// The unknown fields (metadata's too) of an object about to be written, and the fields its
/// body repeated (`duplicates`, as [`crate::body`] names them), handled as
/// `?fieldValidation=` says: refused under Strict, returned as warnings under Warn, ignored
/// under Ignore (the engine prunes unknown fields either way). A custom resource sent by
/// server-side apply (`apply`) is checked against its schema as kube-apiserver's typed
/// conversion does, and named the way it says it (`.spec.x: field not declared in schema`).
pub fn unknown_field_warnings(
    def: &ResourceDef,
    object: &Value,
    duplicates: &[String],
    mode: FieldValidation,
    apply: bool,
) -> Result<Vec<String>, ApiError> {
    if mode == FieldValidation::Ignore {
        return Ok(Vec::new());
    }
    let unknown = def
        .schema
        .as_deref()
        .map(|schema| crate::schema::unknown_fields(schema, object))
        .unwrap_or_default();
    let custom = matches!(def.openapi, crate::registry::SchemaSource::Custom(_));
    if apply && custom && mode == FieldValidation::Strict && !unknown.is_empty() {
        let fields: Vec<String> = unknown
            .iter()
            .map(|path| format!(".{path}: field not declared in schema"))
            .collect();
        return Err(ApiError::BadRequest(format!(
            "failed to create typed patch object ({}, Kind={}): {}",
            def.api_version(),
            def.kind,
            fields.join(", ")
        )));
    }
    let problems: Vec<String> = unknown
        .into_iter()
        .map(|path| format!("unknown field \"{path}\""))
        .chain(duplicates.iter().cloned())
        .collect();
    if mode == FieldValidation::Strict && !problems.is_empty() {
        return Err(ApiError::BadRequest(format!(
            "{} in version \"{}\" cannot be handled as a {}: strict decoding error: {}",
            def.kind,
            def.version,
            def.kind,
            problems.join(", ")
        )));
    }
    Ok(problems)
}

/// A random suffix for `generateName`, from kube-apiserver's alphabet (no vowels, no
/// look-alikes).
pub fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5]
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

/// [`strip_nulls`] for an object of `def`, leaving opaque embedded data as it was sent: a
/// ControllerRevision's `data` is a RawExtension that controllers (and the conformance
/// suite) compare byte for byte with what Go marshals, `"creationTimestamp": null` included.
pub fn strip_nulls_of(def: &ResourceDef, object: &mut Value) {
    let opaque = (def.group == "apps" && def.kind == "ControllerRevision")
        .then(|| object.as_object_mut().and_then(|o| o.remove("data")))
        .flatten();
    strip_nulls(object);
    if let (Some(data), Some(map)) = (opaque, object.as_object_mut()) {
        map.insert("data".into(), data);
    }
}

/// Removes `null`s from maps, recursively: kube-apiserver drops them, and clients send them
/// (`creationTimestamp: null`).
pub fn strip_nulls(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

/// Go's omitempty for the metadata lists and maps clients compare with `null`.
pub fn drop_empty_metadata(object: &mut Value) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in [
            "finalizers",
            "ownerReferences",
            "labels",
            "annotations",
            "managedFields",
        ] {
            let empty = match meta.get(field) {
                Some(Value::Array(a)) => a.is_empty(),
                Some(Value::Object(o)) => o.is_empty(),
                _ => false,
            };
            if empty {
                meta.remove(field);
            }
        }
    }
}

/// Everything but `metadata` and `status`: what `generation` counts changes of. A pod's
/// `spec.nodeName` is not counted: only its binding sets it, which kube-apiserver writes
/// without a new generation (a bound pod is still generation 1).
pub fn spec_of(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    if object["kind"] == "Pod"
        && let Some(spec) = copy.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.remove("nodeName");
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names() {
        assert_eq!(dns1123_problem("web-1.example", false), None);
        assert!(dns1123_problem("web-1.example", true).is_some());
        assert!(dns1123_problem("Web", false).is_some());
        assert!(dns1123_problem("-a", false).is_some());
        assert!(dns1123_problem("", false).is_some());
        assert!(dns1123_problem(&"a".repeat(64), true).is_some());
    }

    #[test]
    fn ip_address_names() {
        assert_eq!(ip_address_name_problem("10.0.0.1"), None);
        assert_eq!(ip_address_name_problem("fe80::42:1dff:fe84:f9e2"), None);
        assert!(ip_address_name_problem("2001:DB8::1").is_some());
        assert!(ip_address_name_problem("2001:db8:0::1").is_some());
        assert!(ip_address_name_problem("web").is_some());
    }

    #[test]
    fn timestamps_are_rfc3339_seconds_utc() {
        let t = now();
        assert_eq!(t.len(), 20, "{t}");
        assert!(t.ends_with('Z'));
    }

    #[test]
    fn suffixes_use_the_safe_alphabet() {
        let s = random_suffix();
        assert_eq!(s.len(), 5);
        assert!(s.chars().all(|c| "bcdfghjklmnpqrstvwxz2456789".contains(c)));
    }
}
