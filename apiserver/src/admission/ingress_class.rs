//! The DefaultIngressClass admission plugin: a new Ingress that names no class (neither
//! `spec.ingressClassName` nor the deprecated `kubernetes.io/ingress.class` annotation)
//! gets the cluster's default, the IngressClass annotated
//! `ingressclass.kubernetes.io/is-default-class: "true"` (the newest, when several are), as
//! kube-apiserver's plugin does. Orquestra's own class, `orquestra`, is created default.

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;

/// The annotation marking the default class.
pub const IS_DEFAULT: &str = "ingressclass.kubernetes.io/is-default-class";
/// The deprecated annotation naming an Ingress' class.
pub const ANN_CLASS: &str = "kubernetes.io/ingress.class";

/// Admits a new object of `def` (only Ingresses are touched).
pub async fn admit(
    engine: &Engine,
    def: &ResourceDef,
    ingress: &mut Value,
) -> Result<(), ApiError> {
    if !(def.group == "networking.k8s.io" && def.plural == "ingresses") || has_class(ingress) {
        return Ok(());
    }
    let classes = crate::quota::list(engine, "networking.k8s.io", "ingressclasses", None).await?;
    if let Some(name) = default_class(&classes) {
        if !ingress["spec"].is_object() {
            ingress["spec"] = json!({});
        }
        ingress["spec"]["ingressClassName"] = json!(name);
    }
    Ok(())
}

/// Whether `ingress` already names a class, by field or by the deprecated annotation.
fn has_class(ingress: &Value) -> bool {
    ingress
        .pointer("/spec/ingressClassName")
        .is_some_and(|v| !v.is_null())
        || ingress
            .pointer(&format!(
                "/metadata/annotations/{}",
                ANN_CLASS.replace('/', "~1")
            ))
            .is_some()
}

/// The default class's name: the newest class marked default (then the first by name).
fn default_class(classes: &[Value]) -> Option<&str> {
    classes
        .iter()
        .filter(|c| {
            c.pointer(&format!(
                "/metadata/annotations/{}",
                IS_DEFAULT.replace('/', "~1")
            ))
            .and_then(Value::as_str)
                == Some("true")
        })
        .max_by(|a, b| {
            let created = |c: &Value| {
                c.pointer("/metadata/creationTimestamp")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            created(a).cmp(&created(b)).then_with(|| {
                b["metadata"]["name"]
                    .as_str()
                    .cmp(&a["metadata"]["name"].as_str())
            })
        })
        .and_then(|c| c.pointer("/metadata/name"))
        .and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: &str, created: &str, default: Option<&str>) -> Value {
        let annotations = match default {
            Some(v) => json!({IS_DEFAULT: v}),
            None => json!({}),
        };
        json!({"metadata": {"name": name, "creationTimestamp": created,
                            "annotations": annotations}})
    }

    #[test]
    fn the_newest_default_class_wins() {
        let classes = vec![
            class("old", "2026-01-01T00:00:00Z", Some("true")),
            class("new", "2026-02-01T00:00:00Z", Some("true")),
            class("newest", "2026-03-01T00:00:00Z", None),
            class("off", "2026-04-01T00:00:00Z", Some("false")),
        ];
        assert_eq!(default_class(&classes), Some("new"));
        assert_eq!(default_class(&classes[2..]), None);
    }

    #[test]
    fn a_named_class_is_kept() {
        assert!(has_class(&json!({"spec": {"ingressClassName": "nginx"}})));
        assert!(has_class(
            &json!({"metadata": {"annotations": {ANN_CLASS: "nginx"}}, "spec": {}})
        ));
        assert!(!has_class(&json!({"spec": {"rules": []}})));
        assert!(!has_class(&json!({"spec": {"ingressClassName": null}})));
    }
}
