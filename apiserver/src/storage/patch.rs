//! PATCH bodies: JSON merge patch (RFC 7386) and JSON patch (RFC 6902, with Kubernetes'
//! leniency for `test` against an absent path). Strategic merge and server-side apply are
//! refused with 415 until they are implemented.

use serde_json::Value;

use crate::error::ApiError;

/// The patch formats, by request Content-Type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml`.
    Apply,
}

impl PatchType {
    /// The patch type a Content-Type names.
    pub fn from_content_type(content_type: &str) -> Result<PatchType, ApiError> {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        match essence {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/json-patch+json" => Ok(PatchType::Json),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/apply-patch+yaml" | "application/apply-patch+cbor" => Ok(PatchType::Apply),
            other => Err(ApiError::UnsupportedMediaType(format!(
                "the body of the request was in an unknown format - accepted media types include: \
                 application/json-patch+json, application/merge-patch+json, \
                 application/apply-patch+yaml (got {other:?})"
            ))),
        }
    }
}

/// Applies a JSON merge patch to `target`.
pub fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        (_, Some(_)) => {
            *target = Value::Object(Default::default());
            merge(target, patch);
        }
        _ => *target = patch.clone(),
    }
}

/// Applies a JSON patch to `target`. A `test` that the value is `null` passes when the path
/// is absent, as in client-go's library (kube-rs' finalizer helper relies on it).
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::BadRequest("a JSON patch must be a list of operations".into()))?;
    let kept: Vec<Value> = ops
        .iter()
        .filter(|op| {
            let null_test = op.get("op").and_then(Value::as_str) == Some("test")
                && op.get("value").is_some_and(Value::is_null);
            let absent = op
                .get("path")
                .and_then(Value::as_str)
                .is_some_and(|p| target.pointer(p).is_none_or(Value::is_null));
            !(null_test && absent)
        })
        .cloned()
        .collect();
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(kept))
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
    json_patch::patch(target, &patch).map_err(|e| match e.kind {
        json_patch::PatchErrorKind::TestFailed => ApiError::Invalid {
            kind: String::new(),
            name: String::new(),
            group: String::new(),
            causes: vec![crate::error::Cause {
                reason: "FieldValueInvalid".into(),
                message: format!("the test operation failed: {e}"),
                field: e.path.to_string(),
            }],
        },
        _ => ApiError::Invalid {
            kind: String::new(),
            name: String::new(),
            group: String::new(),
            causes: vec![crate::error::Cause {
                reason: "FieldValueInvalid".into(),
                message: format!("the JSON patch could not be applied: {e}"),
                field: e.path.to_string(),
            }],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge(&mut doc, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}}));
        let mut doc = json!({"a": [1, 2]});
        merge(&mut doc, &json!({"a": [3]}));
        assert_eq!(doc, json!({"a": [3]}));
    }

    #[test]
    fn json_patch_test_null_on_absent_path_passes() {
        let mut doc = json!({"metadata": {"name": "x"}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "test", "path": "/metadata/finalizers", "value": null},
                {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}
            ]),
        )
        .unwrap();
        assert_eq!(doc["metadata"]["finalizers"], json!(["f"]));
        let failed = json_patch(
            &mut doc,
            &json!([{"op": "test", "path": "/metadata/finalizers", "value": null}]),
        );
        assert!(matches!(failed, Err(ApiError::Invalid { .. })));
    }
}
