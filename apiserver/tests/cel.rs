//! CEL through the API: a CRD's `x-kubernetes-validations` (rules, messageExpression,
//! transition rules), refused when they do not compile or cost too much, and
//! ValidatingAdmissionPolicies with their bindings and params.

#![allow(clippy::unwrap_used)]

mod common;

use common::cluster;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

fn crd(plural: &str, spec_schema: Value) -> CustomResourceDefinition {
    serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.example.com")},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": plural, "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": spec_schema,
                }}}}]
        }
    }))
    .unwrap()
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn crd_rules_validate_custom_resources_and_transition_rules_refuse_updates() {
    let c = cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let schema = json!({
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.replicas <= self.maxReplicas",
             "messageExpression": "'replicas ' + string(self.replicas) + ' is over maxReplicas ' + string(self.maxReplicas)"},
            {"rule": "self.tier == oldSelf.tier", "message": "tier is immutable",
             "reason": "FieldValueForbidden"},
        ],
        "properties": {
            "replicas": {"type": "integer"},
            "maxReplicas": {"type": "integer"},
            "tier": {"type": "string", "maxLength": 16},
            "hosts": {"type": "array", "maxItems": 8,
                      "items": {"type": "string", "maxLength": 64},
                      "x-kubernetes-validations": [
                          {"rule": "self.all(h, h.endsWith('.example.com'))",
                           "message": "hosts must be under example.com"}]},
        }
    });
    crds.create(&PostParams::default(), &crd("widgets", schema))
        .await
        .unwrap();
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Widget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "widgets");
    let widgets: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource);
    let widget = |name: &str, spec: Value| -> DynamicObject {
        serde_json::from_value(json!({"apiVersion": "example.com/v1", "kind": "Widget",
                                      "metadata": {"name": name}, "spec": spec}))
        .unwrap()
    };

    // A rule that fails: 422 naming the field, with the messageExpression's text.
    let status = api_error(
        widgets
            .create(
                &PostParams::default(),
                &widget("big", json!({"replicas": 5, "maxReplicas": 3, "tier": "a"})),
            )
            .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status
            .message
            .contains("spec: Invalid value: \"object\": replicas 5 is over maxReplicas 3"),
        "{status:?}"
    );
    let status = api_error(
        widgets
            .create(
                &PostParams::default(),
                &widget(
                    "elsewhere",
                    json!({"replicas": 1, "maxReplicas": 3, "tier": "a",
                           "hosts": ["a.example.com", "b.example.org"]}),
                ),
            )
            .await,
    );
    assert!(
        status
            .message
            .contains("spec.hosts: Invalid value: \"array\": hosts must be under example.com"),
        "{status:?}"
    );

    // A valid one is stored; the transition rule refuses changing the tier, not the rest.
    widgets
        .create(
            &PostParams::default(),
            &widget(
                "w",
                json!({"replicas": 1, "maxReplicas": 3, "tier": "gold"}),
            ),
        )
        .await
        .unwrap();
    let patch = |spec: Value| Patch::Merge(json!({"spec": spec}));
    widgets
        .patch("w", &PatchParams::default(), &patch(json!({"replicas": 2})))
        .await
        .unwrap();
    let status = api_error(
        widgets
            .patch(
                "w",
                &PatchParams::default(),
                &patch(json!({"tier": "silver"})),
            )
            .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status
            .message
            .contains("spec: Forbidden: tier is immutable"),
        "{status:?}"
    );
}

#[tokio::test]
async fn crd_rules_that_do_not_compile_or_cost_too_much_are_refused_when_written() {
    let c = cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let status = api_error(
        crds.create(
            &PostParams::default(),
            &crd(
                "broken",
                json!({"type": "object",
                       "x-kubernetes-validations": [{"rule": "self.replicas >"}],
                       "properties": {"replicas": {"type": "integer"}}}),
            ),
        )
        .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status.message.contains(
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule"
        ) && status.message.contains("compilation failed"),
        "{status:?}"
    );

    // Every pair of unbounded strings in an unbounded list: far over the budget.
    let status = api_error(
        crds.create(
            &PostParams::default(),
            &crd(
                "costly",
                json!({"type": "object", "properties": {"names": {
                    "type": "array", "items": {"type": "string"},
                    "x-kubernetes-validations": [
                        {"rule": "self.all(a, self.all(b, a == b || !a.contains(b)))"}]}}}),
            ),
        )
        .await,
    );
    assert_eq!(status.code, 422, "{status:?}");
    assert!(
        status
            .message
            .contains("Forbidden: estimated rule cost exceeds budget"),
        "{status:?}"
    );
    // The same rule with bounds fits.
    crds.create(
        &PostParams::default(),
        &crd(
            "bounded",
            json!({"type": "object", "properties": {"names": {
                "type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 32},
                "x-kubernetes-validations": [
                    {"rule": "self.all(a, self.all(b, a == b || !a.contains(b)))"}]}}}),
        ),
    )
    .await
    .unwrap();
}
