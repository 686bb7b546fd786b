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

/// POSTs `body` under `path`; the status code, `Warning` headers and JSON answer.
async fn post(c: &common::Cluster, path: &str, body: &Value) -> (u16, Vec<String>, Value) {
    let request = http::Request::post(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body).unwrap().into())
        .unwrap();
    let response = c.client.send(request).await.unwrap();
    let status = response.status().as_u16();
    let warnings = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .collect();
    let bytes = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap();
    (status, warnings, serde_json::from_slice(&bytes).unwrap())
}

const POLICIES: &str = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies";
const BINDINGS: &str = "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings";

fn deployment(name: &str, replicas: i64) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                 "template": {"metadata": {"labels": {"app": name}},
                              "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}
    })
}

#[tokio::test]
async fn a_validating_admission_policy_with_params_denies_warns_and_allows() {
    let c = cluster().await;
    // The limit comes from a ConfigMap: the binding's params.
    let (code, _, _) = post(
        &c,
        "/api/v1/namespaces/default/configmaps",
        &json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "replica-limit"}, "data": {"max": "3"}}),
    )
    .await;
    assert_eq!(code, 201);
    let (code, _, body) = post(
        &c,
        POLICIES,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": "replica-limit"},
            "spec": {
                "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
                "matchConstraints": {"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
                    "operations": ["CREATE", "UPDATE"], "resources": ["deployments"]}]},
                "variables": [{"name": "limit", "expression": "int(params.data.max)"}],
                "validations": [
                    {"expression": "object.spec.replicas <= variables.limit",
                     "messageExpression": "'replicas must be at most ' + string(variables.limit)"},
                    {"expression": "namespaceObject.metadata.name == object.metadata.namespace",
                     "message": "namespaceObject is the request's namespace"},
                ],
            }
        }),
    )
    .await;
    assert_eq!(code, 201, "{body}");
    let (code, _, body) = post(
        &c,
        BINDINGS,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": "replica-limit"},
            "spec": {"policyName": "replica-limit", "validationActions": ["Deny"],
                     "paramRef": {"name": "replica-limit", "parameterNotFoundAction": "Deny"}}
        }),
    )
    .await;
    assert_eq!(code, 201, "{body}");

    let deployments = "/apis/apps/v1/namespaces/default/deployments";
    let (code, _, body) = post(&c, deployments, &deployment("small", 2)).await;
    assert_eq!(code, 201, "{body}");
    let (code, _, body) = post(&c, deployments, &deployment("big", 5)).await;
    assert_eq!(code, 422, "{body}");
    assert_eq!(body["reason"], "Invalid");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains(
            "ValidatingAdmissionPolicy 'replica-limit' with binding 'replica-limit' denied request: replicas must be at most 3"
        ),
        "{message}"
    );

    // Where the param is missing, `parameterNotFoundAction: Deny` refuses.
    let (code, _, namespace) = post(
        &c,
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "other"}}),
    )
    .await;
    assert_eq!(code, 201);
    // Every namespace is labelled with its name, for namespace selectors.
    assert_eq!(
        namespace["metadata"]["labels"]["kubernetes.io/metadata.name"], "other",
        "{namespace}"
    );
    let (code, _, body) = post(
        &c,
        "/apis/apps/v1/namespaces/other/deployments",
        &deployment("small", 1),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("no params found for policy binding with `Deny` parameterNotFoundAction"),
        "{body}"
    );

    // A Warn binding lets the request through with a warning.
    let binding = json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": "replica-limit"},
        "spec": {"policyName": "replica-limit", "validationActions": ["Warn"],
                 "paramRef": {"name": "replica-limit", "namespace": "default"}}
    });
    let request = http::Request::put(format!("{BINDINGS}/replica-limit"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&binding).unwrap().into())
        .unwrap();
    let response = c.client.send(request).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (code, warnings, body) = post(&c, deployments, &deployment("bigger", 9)).await;
    assert_eq!(code, 201, "{body}");
    assert!(
        warnings.iter().any(|w| w.contains(
            "Validation failed for ValidatingAdmissionPolicy 'replica-limit' with binding 'replica-limit': replicas must be at most 3"
        )),
        "{warnings:?}"
    );
}

#[tokio::test]
async fn policy_expressions_that_do_not_compile_are_refused_when_written() {
    let c = cluster().await;
    let (code, _, body) = post(
        &c,
        POLICIES,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": "broken"},
            "spec": {
                "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["CREATE"], "resources": ["configmaps"]}]},
                "validations": [{"expression": "object.data.size() <"}],
            }
        }),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("spec.validations[0].expression")
            && message.contains("compilation failed"),
        "{message}"
    );
}

#[tokio::test]
async fn mutating_admission_policies_apply_configurations_and_json_patches() {
    let c = cluster().await;
    let policies = "/apis/admissionregistration.k8s.io/v1/mutatingadmissionpolicies";
    let bindings = "/apis/admissionregistration.k8s.io/v1/mutatingadmissionpolicybindings";
    let rules = json!({"resourceRules": [{"apiGroups": ["apps"], "apiVersions": ["v1"],
        "operations": ["CREATE"], "resources": ["deployments"]}]});
    for (name, mutation) in [
        (
            "annotate",
            json!({"patchType": "ApplyConfiguration", "applyConfiguration": {"expression":
                r#"Object{metadata: Object.metadata{annotations: {"mutated-by": "admission-policy"}}}"#}}),
        ),
        (
            "label",
            json!({"patchType": "JSONPatch", "jsonPatch": {"expression":
                r#"[JSONPatch{op: "add", path: "/metadata/labels", value: {"replicas": string(object.spec.replicas)}}]"#}}),
        ),
    ] {
        let (code, _, body) = post(
            &c,
            policies,
            &json!({
                "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
                "metadata": {"name": name},
                "spec": {"matchConstraints": rules, "mutations": [mutation],
                         "reinvocationPolicy": "Never"}
            }),
        )
        .await;
        assert_eq!(code, 201, "{body}");
        let (code, _, body) = post(
            &c,
            bindings,
            &json!({
                "apiVersion": "admissionregistration.k8s.io/v1",
                "kind": "MutatingAdmissionPolicyBinding",
                "metadata": {"name": name}, "spec": {"policyName": name}
            }),
        )
        .await;
        assert_eq!(code, 201, "{body}");
    }
    let (code, _, created) = post(
        &c,
        "/apis/apps/v1/namespaces/default/deployments",
        &deployment("mutated", 2),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        created["metadata"]["annotations"]["mutated-by"], "admission-policy",
        "{created}"
    );
    assert_eq!(created["metadata"]["labels"]["replicas"], "2", "{created}");

    // A mutation that builds something other than Object{…} is refused when written.
    let (code, _, body) = post(
        &c,
        policies,
        &json!({
            "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
            "metadata": {"name": "wrong"},
            "spec": {"matchConstraints": rules, "mutations": [{"patchType": "ApplyConfiguration",
                "applyConfiguration": {"expression": "Deployment{spec: 1}"}}]}
        }),
    )
    .await;
    assert_eq!(code, 422, "{body}");
}
