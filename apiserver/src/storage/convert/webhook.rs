//! Conversion webhooks: a CRD with `spec.conversion.strategy: Webhook` converts its objects
//! between versions by sending them to its webhook in an `apiextensions.k8s.io`
//! ConversionReview, as kube-apiserver's apiextensions server does — all the objects of one
//! read or write in one review (a list stored in several versions is one call), each answer
//! checked before it is used: as many objects as sent, each in the version asked for, of the
//! same kind, and with its metadata unchanged but for labels and annotations (the rest of the
//! metadata is the original's, whatever the webhook answered).
//!
//! The webhook is found as admission webhooks are (`url`, or a Service reached through its
//! endpoints, TLS trusting only the `caBundle`); a call that fails fails the request with a
//! 500 naming the kind and the failure.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::admission::webhook::call::{locate, post_json};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;

/// How long one conversion call may take (kube-apiserver's fixed conversion timeout).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Converts those of `objects` not already in `api_version` to it through `def`'s conversion
/// webhook `hook` (the CRD's `spec.conversion.webhook`), in place and in one review.
pub(crate) async fn convert(
    engine: &Engine,
    def: &ResourceDef,
    hook: &Value,
    api_version: &str,
    objects: &mut [Value],
) -> Result<(), ApiError> {
    let pending: Vec<usize> = (0..objects.len())
        .filter(|&i| objects[i]["apiVersion"].as_str() != Some(api_version))
        .collect();
    let Some(&first) = pending.first() else {
        return Ok(());
    };
    let from = objects[first]["apiVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let subject = format!(
        "{}, Kind={}",
        if from.is_empty() { "/" } else { &from },
        def.kind
    );
    let sent: Vec<Value> = pending.iter().map(|&i| objects[i].clone()).collect();
    let started = Instant::now();
    let outcome = review(engine, hook, api_version, &sent).await;
    engine.webhooks().observe_conversion(
        &format!("{}.{}", def.plural, def.group),
        from.rsplit('/').next().unwrap_or_default(),
        api_version.rsplit('/').next().unwrap_or_default(),
        outcome.is_ok(),
        started.elapsed().as_secs_f64(),
    );
    let converted = outcome
        .map_err(|e| ApiError::Internal(format!("conversion webhook for {subject} failed: {e}")))?;
    if converted.len() != sent.len() {
        return Err(ApiError::Internal(format!(
            "conversion webhook for {subject} returned {} objects, expected {}",
            converted.len(),
            sent.len()
        )));
    }
    let mut results = Vec::with_capacity(sent.len());
    for (index, (original, converted)) in sent.iter().zip(converted).enumerate() {
        let checked = accept(original, converted, api_version).map_err(|e| {
            ApiError::Internal(format!(
                "conversion webhook for {subject} returned invalid converted object at index \
                 {index}: {e}"
            ))
        })?;
        results.push(checked);
    }
    for (i, converted) in pending.into_iter().zip(results) {
        objects[i] = converted;
    }
    Ok(())
}

/// Sends one review and returns its `convertedObjects`.
async fn review(
    engine: &Engine,
    hook: &Value,
    api_version: &str,
    objects: &[Value],
) -> Result<Vec<Value>, String> {
    let versions: Vec<&str> = hook["conversionReviewVersions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    // v1 and v1beta1 reviews have one shape; the first the webhook speaks is used.
    let review_version = versions
        .iter()
        .find(|v| matches!(**v, "v1" | "v1beta1"))
        .ok_or("no supported conversion review versions")?;
    let config = &hook["clientConfig"];
    let (url, resolve) = locate(engine, config).await?;
    let ca_bundle = config["caBundle"].as_str().unwrap_or_default();
    let client = engine
        .webhooks()
        .client(ca_bundle, resolve.as_ref().map(|(h, a)| (h.as_str(), *a)))?;
    let uid = uuid::Uuid::new_v4().to_string();
    let review_api = format!("apiextensions.k8s.io/{review_version}");
    let body = json!({
        "apiVersion": review_api,
        "kind": "ConversionReview",
        "request": {"uid": uid, "desiredAPIVersion": api_version, "objects": objects},
    });
    let bytes = post_json(&client, &url, TIMEOUT, &body).await?;
    let mut answer: Value = serde_json::from_slice(&bytes)
        .map_err(|e| format!("its answer is not a ConversionReview: {e}"))?;
    if answer["apiVersion"] != review_api.as_str() || answer["kind"] != "ConversionReview" {
        return Err(format!(
            "expected webhook response of {review_api}, Kind=ConversionReview, got {}, Kind={}",
            answer["apiVersion"].as_str().unwrap_or_default(),
            answer["kind"].as_str().unwrap_or_default()
        ));
    }
    let response = answer
        .get_mut("response")
        .filter(|r| r.is_object())
        .ok_or("no response provided")?;
    if response["uid"] != uid.as_str() {
        return Err(format!(
            "expected response.uid={uid:?}, got {:?}",
            response["uid"].as_str().unwrap_or_default()
        ));
    }
    if response["result"]["status"] != "Success" {
        let message = response["result"]["message"].as_str().unwrap_or_default();
        return Err(format!(
            "response.result.status was '{}', not 'Success'{}",
            response["result"]["status"].as_str().unwrap_or_default(),
            if message.is_empty() {
                String::new()
            } else {
                format!(": {message}")
            }
        ));
    }
    match response["convertedObjects"].take() {
        Value::Array(objects) => Ok(objects),
        Value::Null => Ok(Vec::new()),
        other => Err(format!("convertedObjects is not a list: {other}")),
    }
}

/// Checks one converted object against its original and returns it with the original's
/// metadata, but for the labels and annotations the webhook may change.
fn accept(original: &Value, mut converted: Value, api_version: &str) -> Result<Value, String> {
    if !converted.is_object() {
        return Err("invalid type, expected an object".into());
    }
    let got = converted["apiVersion"].as_str().unwrap_or_default();
    if got != api_version {
        return Err(format!(
            "invalid groupVersion (expected {api_version}, received {got})"
        ));
    }
    if converted["kind"] != original["kind"] {
        return Err(format!(
            "invalid kind (expected {}, received {})",
            original["kind"].as_str().unwrap_or_default(),
            converted["kind"].as_str().unwrap_or_default()
        ));
    }
    let meta = &converted["metadata"];
    if !meta.is_object() {
        return Err("missing metadata in converted object".into());
    }
    for field in ["name", "namespace", "uid"] {
        if meta[field] != original["metadata"][field] {
            return Err(format!(
                "must have the same {field}: {} != {}",
                original["metadata"][field], meta[field]
            ));
        }
    }
    let mut restored = original["metadata"].clone();
    for field in ["labels", "annotations"] {
        match &meta[field] {
            Value::Null => {
                if let Some(m) = restored.as_object_mut() {
                    m.remove(field);
                }
            }
            Value::Object(entries) => {
                if let Some((key, _)) = entries.iter().find(|(_, v)| !v.is_string()) {
                    return Err(format!(
                        "metadata.{field}[{key}] must be a string in converted object"
                    ));
                }
                restored[field] = meta[field].clone();
            }
            other => {
                return Err(format!(
                    "invalid metadata.{field} of type {} in converted object",
                    json_type(other)
                ));
            }
        }
    }
    converted["metadata"] = restored;
    Ok(converted)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn original() -> Value {
        json!({"apiVersion": "example.com/v1", "kind": "Widget",
               "metadata": {"name": "w", "namespace": "ns", "uid": "u1",
                            "resourceVersion": "7", "labels": {"a": "1"}},
               "hostPort": "localhost:80"})
    }

    #[test]
    fn a_converted_object_keeps_its_metadata_but_labels_and_annotations() {
        let converted = json!({"apiVersion": "example.com/v2", "kind": "Widget",
            "metadata": {"name": "w", "namespace": "ns", "uid": "u1", "resourceVersion": "1",
                         "labels": {"a": "2"}, "annotations": {"b": "x"}},
            "host": "localhost", "port": "80"});
        let out = accept(&original(), converted, "example.com/v2").unwrap();
        assert_eq!(out["metadata"]["resourceVersion"], "7");
        assert_eq!(out["metadata"]["labels"]["a"], "2");
        assert_eq!(out["metadata"]["annotations"]["b"], "x");
        assert_eq!(out["host"], "localhost");
    }

    #[test]
    fn a_converted_object_in_the_wrong_version_kind_or_name_is_refused() {
        let mut wrong = original();
        let error = accept(&original(), wrong.clone(), "example.com/v2").unwrap_err();
        assert!(error.contains("invalid groupVersion"), "{error}");
        wrong["apiVersion"] = json!("example.com/v2");
        wrong["kind"] = json!("Gadget");
        assert!(
            accept(&original(), wrong.clone(), "example.com/v2")
                .unwrap_err()
                .contains("invalid kind")
        );
        wrong["kind"] = json!("Widget");
        wrong["metadata"]["name"] = json!("other");
        assert!(
            accept(&original(), wrong, "example.com/v2")
                .unwrap_err()
                .contains("same name")
        );
    }
}
