//! CustomResourceDefinitions: users' kinds, served by the same engine as the built-in ones.
//!
//! A CRD that is stored registers its resources at once (the creating request sees them),
//! and a watch on the CRDs keeps the registry in step with the store — so every API server
//! sharing an etcd serves the same kinds, and a restarted one serves them from the start.
//! Deleting a CRD removes its resources and every object stored under them.

use serde_json::{Value, json};

use crate::engine::{Engine, decode};
use crate::error::{ApiError, Cause};
use crate::registry::{ResourceDef, from_crd};

/// The CRD resource's group.
pub const GROUP: &str = "apiextensions.k8s.io";

/// Whether `def` is the CustomResourceDefinition resource itself.
pub fn is_crd(def: &ResourceDef) -> bool {
    def.group == GROUP && def.plural == "customresourcedefinitions"
}

/// Checks a CRD (its names, versions, selectable fields and CEL rules) and sets the status a
/// CRD gets once its names are accepted: `NamesAccepted` and `Established` true,
/// `acceptedNames`, and `storedVersions` — on an update (`old`), the versions stored before
/// stay listed until a user removes them from the status, as kube-apiserver keeps them.
pub fn admit(def: &ResourceDef, crd: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    let spec = &crd["spec"];
    let group = spec["group"].as_str().unwrap_or_default();
    let plural = spec
        .pointer("/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = spec
        .pointer("/names/kind")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let name = crd
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let versions = spec["versions"].as_array().cloned().unwrap_or_default();
    let mut causes = Vec::new();
    let mut require = |ok: bool, field: &str, message: String| {
        if !ok {
            causes.push(Cause {
                reason: "FieldValueInvalid".into(),
                message,
                field: field.into(),
            });
        }
    };
    require(!group.is_empty(), "spec.group", "Required value".into());
    require(
        !plural.is_empty(),
        "spec.names.plural",
        "Required value".into(),
    );
    require(!kind.is_empty(), "spec.names.kind", "Required value".into());
    require(
        name == format!("{plural}.{group}"),
        "metadata.name",
        format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
    );
    require(
        matches!(spec["scope"].as_str(), Some("Namespaced" | "Cluster")),
        "spec.scope",
        "Unsupported value: must be \"Namespaced\" or \"Cluster\"".into(),
    );
    let storage: Vec<&str> = versions
        .iter()
        .filter(|v| v["storage"].as_bool() == Some(true))
        .filter_map(|v| v["name"].as_str())
        .collect();
    require(
        !versions.is_empty(),
        "spec.versions",
        "Required value: must have at least one version".into(),
    );
    require(
        storage.len() == 1,
        "spec.versions",
        "Invalid value: must have exactly one version marked as storage version".into(),
    );
    causes.extend(conversion_causes(spec));
    for (i, version) in versions.iter().enumerate() {
        causes.extend(selectable_field_causes(i, version));
        if let Some(schema) = version.pointer("/schema/openAPIV3Schema") {
            let at = format!("spec.versions[{i}].schema.openAPIV3Schema");
            causes.extend(crate::schema::rules::problems(schema, &at));
        }
    }
    if !causes.is_empty() {
        return Err(ApiError::Invalid {
            kind: def.kind.clone(),
            name: name.to_owned(),
            group: def.group.clone(),
            causes,
        });
    }
    let condition = |kind: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": "True", "reason": reason, "message": message,
               "lastTransitionTime": crate::object::now()})
    };
    crd["status"] = json!({
        "conditions": [
            condition("NamesAccepted", "NoConflicts", "no conflicts found"),
            condition("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        ],
        "acceptedNames": spec["names"].clone(),
        "storedVersions": stored_versions(old, &storage),
    });
    Ok(())
}

/// The old status's `storedVersions` with the current storage version added.
fn stored_versions(old: Option<&Value>, storage: &[&str]) -> Vec<String> {
    let mut stored: Vec<String> = old
        .and_then(|o| o.pointer("/status/storedVersions"))
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for version in storage {
        if !stored.iter().any(|s| s == version) {
            stored.push((*version).to_owned());
        }
    }
    stored
}

/// What is wrong with `spec.conversion`, as kube-apiserver validates it: a known strategy;
/// `Webhook` with a webhook that is reached by exactly one of an `https` URL or a Service and
/// speaks a ConversionReview version this server sends; `None` without one.
fn conversion_causes(spec: &Value) -> Vec<Cause> {
    let conversion = &spec["conversion"];
    if conversion.is_null() {
        return Vec::new();
    }
    let mut causes = Vec::new();
    let mut cause = |reason: &str, field: &str, message: String| {
        causes.push(Cause {
            reason: reason.into(),
            message,
            field: field.into(),
        })
    };
    let webhook = &conversion["webhook"];
    match conversion["strategy"].as_str() {
        Some("None") | None => {
            if !webhook.is_null() {
                cause(
                    "FieldValueForbidden",
                    "spec.conversion.webhook",
                    "Forbidden: should not be set when strategy is not set to Webhook".into(),
                );
            }
        }
        Some("Webhook") => {
            if webhook.is_null() || webhook["clientConfig"].is_null() {
                cause(
                    "FieldValueRequired",
                    "spec.conversion.webhook.clientConfig",
                    "Required value: required when strategy is set to Webhook".into(),
                );
                return causes;
            }
            let versions: Vec<&str> = webhook["conversionReviewVersions"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if !versions.iter().any(|v| matches!(*v, "v1" | "v1beta1")) {
                cause(
                    "FieldValueInvalid",
                    "spec.conversion.webhook.conversionReviewVersions",
                    format!(
                        "Invalid value: {versions:?}: must include at least one of v1, v1beta1"
                    ),
                );
            }
            let config = &webhook["clientConfig"];
            match (config["url"].as_str(), config["service"].is_object()) {
                (Some(_), true) | (None, false) => cause(
                    "FieldValueRequired",
                    "spec.conversion.webhook.clientConfig",
                    "Required value: exactly one of url or service is required".into(),
                ),
                (Some(url), false) if !url.starts_with("https://") => cause(
                    "FieldValueInvalid",
                    "spec.conversion.webhook.clientConfig.url",
                    format!("Unsupported value: {url:?}: supported values: \"https\""),
                ),
                _ => {}
            }
            if spec["preserveUnknownFields"] == true {
                cause(
                    "FieldValueInvalid",
                    "spec.conversion.strategy",
                    "Invalid value: \"Webhook\": must be None if spec.preserveUnknownFields is true"
                        .into(),
                );
            }
        }
        Some(other) => cause(
            "FieldValueNotSupported",
            "spec.conversion.strategy",
            format!("Unsupported value: {other:?}: supported values: \"None\", \"Webhook\""),
        ),
    }
    causes
}

/// kube-apiserver's limit on a version's `selectableFields`.
const MAX_SELECTABLE_FIELDS: usize = 8;

/// What is wrong with the `selectableFields` of `spec.versions[index]`: each must name a
/// string, boolean or integer field of the schema outside `metadata`, once.
fn selectable_field_causes(index: usize, version: &Value) -> Vec<Cause> {
    let Some(fields) = version["selectableFields"].as_array() else {
        return Vec::new();
    };
    let at = format!("spec.versions[{index}].selectableFields");
    let invalid = |field: String, message: String| Cause {
        reason: "FieldValueInvalid".into(),
        message,
        field,
    };
    let Some(schema) = version.pointer("/schema/openAPIV3Schema") else {
        return vec![invalid(
            at,
            "Invalid value: \"\": may only be set when `version.schema.openAPIV3Schema` is not included"
                .into(),
        )];
    };
    let schema = crate::schema::Structural::compile(schema);
    let mut causes = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for (j, selectable) in fields.iter().enumerate() {
        let field = format!("{at}[{j}].jsonPath");
        let path = selectable["jsonPath"].as_str().unwrap_or_default();
        let Some(dotted) = path.strip_prefix('.').filter(|p| !p.is_empty()) else {
            let message = if path.is_empty() {
                "Required value".to_owned()
            } else {
                format!("Invalid value: {path:?}: is an invalid path: must start with a '.'")
            };
            causes.push(invalid(field, message));
            continue;
        };
        if dotted == "metadata" || dotted.starts_with("metadata.") {
            causes.push(invalid(
                field.clone(),
                format!("Invalid value: {path:?}: must not point to fields in metadata"),
            ));
        } else if !schema.is_selectable_scalar(dotted) {
            causes.push(invalid(
                field.clone(),
                format!(
                    "Invalid value: {path:?}: must point to a field of type string, boolean or \
                     integer. Enum string fields and strings with formats are allowed."
                ),
            ));
        }
        if !seen.insert(dotted) {
            causes.push(Cause {
                reason: "FieldValueDuplicate".into(),
                message: format!("Duplicate value: {path:?}"),
                field,
            });
        }
    }
    if seen.len() > MAX_SELECTABLE_FIELDS {
        causes.push(Cause {
            reason: "FieldValueTooMany".into(),
            message: format!(
                "Too many: {}: must have at most {MAX_SELECTABLE_FIELDS} items",
                seen.len()
            ),
            field: at,
        });
    }
    causes
}

/// Serves the resources of a stored CRD (or stops serving them once it is gone).
pub fn register(engine: &Engine, crd: &Value, gone: bool) {
    let group = crd
        .pointer("/spec/group")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let plural = crd
        .pointer("/spec/names/plural")
        .and_then(Value::as_str)
        .unwrap_or_default();
    engine.registry.remove(group, plural);
    if !gone {
        for def in from_crd(crd) {
            engine.registry.add(def);
        }
    }
}

/// Deletes every object stored under a deleted CRD's resources.
pub async fn delete_objects(engine: &Engine, crd: &Value) -> Result<(), ApiError> {
    let Some(def) = from_crd(crd).into_iter().next() else {
        return Ok(());
    };
    let prefix = def.key_prefix();
    loop {
        let page = engine
            .store
            .list(
                &prefix,
                &orquestra_store::ListOptions {
                    limit: Some(500),
                    ..Default::default()
                },
            )
            .await?;
        for kv in &page.kvs {
            match engine.store.delete(&kv.key, None).await {
                Ok(_) | Err(orquestra_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if page.kvs.is_empty() {
            return Ok(());
        }
    }
}

/// Loads the stored CRDs, then follows changes to them for as long as the engine lives.
pub async fn sync(engine: Engine) -> Result<(), ApiError> {
    let Some(def) = engine
        .registry
        .get(GROUP, "v1", "customresourcedefinitions")
    else {
        return Ok(());
    };
    let prefix = def.key_prefix();
    let mut options = orquestra_store::ListOptions::default();
    let revision = loop {
        let page = engine.store.list(&prefix, &options).await?;
        for kv in &page.kvs {
            register(&engine, &decode(kv)?, false);
        }
        match page.next(None) {
            Some(next) => options = next,
            None => break page.revision,
        }
    };
    tokio::spawn(async move {
        use futures::StreamExt;
        let mut after = revision;
        loop {
            let Ok(mut changes) = engine.store.watch(&prefix, after).await else {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            };
            while let Some(item) = changes.next().await {
                match item {
                    Ok(orquestra_store::WatchEvent::Change(event)) => {
                        after = event.revision();
                        match event.kind {
                            orquestra_store::EventKind::Delete => {
                                if let Some(prev) = event.prev.as_ref().and_then(|p| decode(p).ok())
                                {
                                    register(&engine, &prev, true);
                                }
                            }
                            _ => {
                                if let Ok(crd) = decode(&event.kv) {
                                    register(&engine, &crd, false);
                                }
                            }
                        }
                    }
                    Ok(orquestra_store::WatchEvent::Progress(revision)) => after = revision,
                    Err(orquestra_store::Error::Closed) => return,
                    Err(error) => {
                        tracing::warn!(%error, "CRD watch ended; resuming");
                        break;
                    }
                }
            }
        }
    });
    Ok(())
}
