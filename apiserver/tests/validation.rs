//! Schema-driven validation through the API, for built-in kinds (schemas generated from
//! k8s-openapi into `crds/`) and custom resources (the CRD's own schema): type and required
//! checks as 422 Invalid with causes, `fieldValidation` Strict/Warn/Ignore, pruning and
//! schema defaults.

#![allow(clippy::unwrap_used)]

mod common;

use common::cluster;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::{
    ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};

fn deployment(name: &str, spec_extra: Value) -> Value {
    let mut object = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}, "creationTimestamp": null},
                "spec": {"containers": [{"name": "web", "image": "nginx",
                                         "ports": [{"containerPort": 80}]}]}
            }
        }
    });
    if let (Some(spec), Value::Object(extra)) = (object["spec"].as_object_mut(), spec_extra) {
        spec.extend(extra);
    }
    object
}

/// POSTs `body` to `path` with the query `query`; the status code, the `Warning` headers and
/// the JSON body.
async fn post(
    c: &common::Cluster,
    path: &str,
    query: &str,
    body: &Value,
) -> (u16, Vec<String>, Value) {
    let request = http::Request::post(format!("{path}?{query}"))
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

const DEPLOYMENTS: &str = "/apis/apps/v1/namespaces/default/deployments";

#[tokio::test]
async fn built_in_kinds_are_validated_against_their_generated_schema() {
    let c = cluster().await;
    let bad = deployment("typed", json!({"replicas": "three", "paused": "no"}));
    let (code, _, status) = post(&c, DEPLOYMENTS, "", &bad).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (422, Some("Invalid")),
        "{status}"
    );
    let causes = status["details"]["causes"].as_array().unwrap();
    let fields: Vec<&str> = causes
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["spec.paused", "spec.replicas"], "{status}");
    assert!(
        causes[1]["message"]
            .as_str()
            .unwrap()
            .contains("spec.replicas in body must be of type integer"),
        "{status}"
    );
    assert!(
        status["message"]
            .as_str()
            .unwrap()
            .starts_with("Deployment \"typed\" is invalid"),
        "{status}"
    );

    // A required field missing deep inside: a container without an image is fine for the
    // schema (image is optional in the API), a container without a name is not.
    let mut nameless = deployment("nameless", json!({}));
    nameless["spec"]["template"]["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("name");
    let (code, _, status) = post(&c, DEPLOYMENTS, "", &nameless).await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.template.spec.containers[0].name"
    );

    // A quantity must look like one.
    let mut greedy = deployment("greedy", json!({}));
    greedy["spec"]["template"]["spec"]["containers"][0]["resources"] =
        json!({"limits": {"cpu": "lots"}});
    let (code, _, status) = post(&c, DEPLOYMENTS, "", &greedy).await;
    assert_eq!(code, 422, "{status}");

    // None of it was stored.
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    assert!(
        api.list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // A valid one (with the nulls clients send) is stored.
    let (code, warnings, created) = post(&c, DEPLOYMENTS, "", &deployment("good", json!({}))).await;
    assert_eq!(code, 201, "{created}");
    assert!(warnings.is_empty(), "{warnings:?}");
}

#[tokio::test]
async fn field_validation_strict_warn_and_ignore() {
    let c = cluster().await;
    let extra = json!({"replica": 3, "template": {
        "metadata": {"labels": {"app": "x"}},
        "spec": {"containers": [{"name": "web", "image": "nginx", "imagePullPolicyy": "Always"}]}
    }});

    let (code, _, status) = post(
        &c,
        DEPLOYMENTS,
        "fieldValidation=Strict",
        &deployment("x", extra.clone()),
    )
    .await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (400, Some("BadRequest")),
        "{status}"
    );
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("strict decoding error: unknown field \"spec.replica\", unknown field \"spec.template.spec.containers[0].imagePullPolicyy\""),
        "{message}"
    );
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    assert!(api.get_opt("x").await.unwrap().is_none(), "nothing stored");

    // Warn (the default): stored without the unknown fields, and told so.
    let (code, warnings, created) =
        post(&c, DEPLOYMENTS, "", &deployment("x", extra.clone())).await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(
        warnings,
        [
            "299 - \"unknown field \\\"spec.replica\\\"\"",
            "299 - \"unknown field \\\"spec.template.spec.containers[0].imagePullPolicyy\\\"\"",
        ]
    );
    assert!(created["spec"].get("replica").is_none(), "{created}");
    let stored = serde_json::to_value(api.get("x").await.unwrap()).unwrap();
    assert!(stored["spec"].get("replica").is_none());

    let mut y = deployment("y", extra);
    y["spec"]["template"]["metadata"]["labels"]["app"] = json!("y");
    // Ignore: stored, pruned, silent.
    let (code, warnings, _) = post(&c, DEPLOYMENTS, "fieldValidation=Ignore", &y).await;
    assert_eq!((code, warnings.len()), (201, 0));

    // Patches are checked on their result.
    let err = api
        .patch(
            "x",
            &PatchParams::default().validation_strict(),
            &Patch::Merge(json!({"spec": {"minReadySecondz": 5}})),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!(status.code, 400, "{status:?}");
    assert!(
        status
            .message
            .contains("unknown field \"spec.minReadySecondz\"")
    );

    // An unknown directive is refused.
    let (code, _, _) = post(
        &c,
        DEPLOYMENTS,
        "fieldValidation=Sometimes",
        &deployment("z", json!({})),
    )
    .await;
    assert_eq!(code, 400);

    // Maps and opaque fields are not "unknown".
    let cms: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "free", "labels": {"any-label": "x"}},
        "data": {"any-key": "v"}
    }))
    .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
}

#[tokio::test]
async fn custom_resources_are_pruned_defaulted_and_validated_by_their_crd_schema() {
    let c = cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "required": ["size"], "properties": {
                        "size": {"type": "integer", "minimum": 1, "maximum": 10},
                        "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                    }},
                    "status": {"type": "object", "properties": {"ready": {"type": "boolean"}}},
                }}}}]
        }
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Gadget");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "gadgets");
    let gadgets: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource);
    let path = "/apis/example.com/v1/namespaces/default/gadgets";

    let gadget = |name: &str, spec: Value| {
        json!({"apiVersion": "example.com/v1", "kind": "Gadget",
               "metadata": {"name": name}, "spec": spec})
    };
    // Pruned and defaulted.
    let (code, warnings, created) = post(
        &c,
        path,
        "",
        &gadget(
            "g1",
            json!({"size": 3, "shape": "round", "extra": {"kept": {"deep": true}}}),
        ),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    assert_eq!(warnings, ["299 - \"unknown field \\\"spec.shape\\\"\""]);
    let stored = gadgets.get("g1").await.unwrap();
    assert_eq!(
        stored.data["spec"],
        json!({"size": 3, "color": "red", "extra": {"kept": {"deep": true}}})
    );

    // Invalid: every problem is a cause.
    let (code, _, status) = post(
        &c,
        path,
        "",
        &gadget("g2", json!({"size": 11, "color": "green"})),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    let fields: Vec<&str> = status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    assert_eq!(fields, ["spec.color", "spec.size"], "{status}");
    let (code, _, status) = post(&c, path, "", &gadget("g3", json!({"color": "blue"}))).await;
    assert_eq!(
        (code, status["details"]["causes"][0]["field"].as_str()),
        (422, Some("spec.size"))
    );

    // Updates are held to the same schema.
    let err = gadgets
        .patch(
            "g1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"size": 0}})),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!((status.reason.as_str(), status.code), ("Invalid", 422));
    assert_eq!(gadgets.get("g1").await.unwrap().data["spec"]["size"], 3);
}

#[tokio::test]
async fn pods_and_workloads_get_kubernetes_defaults_and_semantic_checks() {
    let c = cluster().await;
    let pods = "/api/v1/namespaces/default/pods";
    let pod = |name: &str, containers: Value| {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
               "spec": {"containers": containers}})
    };
    let (code, _, created) = post(
        &c,
        pods,
        "",
        &pod(
            "p",
            json!([{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]},
                         {"name": "side", "image": "busybox:1.36"}]),
        ),
    )
    .await;
    assert_eq!(code, 201, "{created}");
    let spec = &created["spec"];
    assert_eq!(spec["restartPolicy"], "Always");
    assert_eq!(spec["dnsPolicy"], "ClusterFirst");
    assert_eq!(spec["terminationGracePeriodSeconds"], 30);
    assert_eq!(spec["schedulerName"], "default-scheduler");
    assert_eq!(
        spec["containers"][0]["imagePullPolicy"], "Always",
        "untagged means latest"
    );
    assert_eq!(spec["containers"][1]["imagePullPolicy"], "IfNotPresent");
    assert_eq!(spec["containers"][0]["ports"][0]["protocol"], "TCP");
    assert_eq!(
        spec["containers"][0]["terminationMessagePath"],
        "/dev/termination-log"
    );
    assert_eq!(created["status"]["phase"], "Pending");

    // Every semantic problem at once.
    let (code, _, status) = post(
        &c,
        pods,
        "",
        &pod(
            "bad",
            json!([{"name": "Web_1", "image": "x", "ports": [{"containerPort": 70000}]},
                           {"name": "dup", "image": "x"}, {"name": "dup"}]),
        ),
    )
    .await;
    assert_eq!(code, 422, "{status}");
    let mut fields: Vec<&str> = status["details"]["causes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["field"].as_str().unwrap())
        .collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        [
            "spec.containers[0].name",
            "spec.containers[0].ports[0].containerPort",
            "spec.containers[2].image",
            "spec.containers[2].name",
        ],
        "{status}"
    );
    let (code, _, status) = post(&c, pods, "", &pod("empty", json!([]))).await;
    assert_eq!(
        (code, status["details"]["causes"][0]["field"].as_str()),
        (422, Some("spec.containers"))
    );

    // A workload whose selector does not select its own template.
    let mut stray = deployment("stray", json!({}));
    stray["spec"]["selector"] = json!({"matchLabels": {"app": "other"}});
    let (code, _, status) = post(&c, DEPLOYMENTS, "", &stray).await;
    assert_eq!(code, 422, "{status}");
    assert_eq!(
        status["details"]["causes"][0]["field"],
        "spec.template.metadata.labels"
    );
    assert!(
        status["details"]["causes"][0]["message"]
            .as_str()
            .unwrap()
            .contains("`selector` does not match template `labels`")
    );
    // Templates are defaulted like pods, and defaulting again on update is not a change.
    let (code, _, created) = post(&c, DEPLOYMENTS, "", &deployment("tmpl", json!({}))).await;
    assert_eq!(code, 201);
    assert_eq!(
        created["spec"]["template"]["spec"]["restartPolicy"],
        "Always"
    );
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    let replaced = api
        .replace(
            "tmpl",
            &PostParams::default(),
            &serde_json::from_value(deployment("tmpl", json!({}))).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        replaced.metadata.resource_version.as_deref(),
        created["metadata"]["resourceVersion"].as_str(),
        "a PUT of the same object without its defaults is a no-op"
    );
}

/// A request as the bytes the client sent (duplicate keys included).
async fn send_raw(
    c: &common::Cluster,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", content_type)
        .body(body.as_bytes().to_vec().into())
        .unwrap();
    let response = c.client.send(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// What the conformance suite's FieldValidation specs send, with `fieldValidation=Strict`:
/// a typed object with an unknown and a duplicate field, one with an unknown metadata field,
/// and, for a custom resource through server-side apply, an unknown field (root, metadata,
/// an embedded resource's metadata) and a YAML key set twice — each refused naming it.
#[tokio::test]
async fn strict_field_validation_names_unknown_duplicate_and_metadata_fields() {
    let c = cluster().await;
    let strict = format!("{DEPLOYMENTS}?fieldValidation=Strict&fieldManager=m");
    let template = r#""selector": {"matchLabels": {"app": "nginx"}},
        "template": {"metadata": {"labels": {"app": "nginx"}},
                     "spec": {"containers": [{"name": "nginx", "image": "nginx"}]}}"#;
    let duplicate = format!(
        r#"{{"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {{"name": "d"}},
            "spec": {{"unknownField": "foo", "replicas": 2, "replicas": 3, {template}}}}}"#
    );
    let (code, body) = send_raw(&c, "POST", &strict, "application/json", &duplicate).await;
    assert_eq!(code, 400);
    assert!(
        body.contains(r#"strict decoding error: unknown field \"spec.unknownField\", duplicate field \"spec.replicas\""#),
        "{body}"
    );
    let metadata = format!(
        r#"{{"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {{"name": "d", "unknownMeta": "foo"}}, "spec": {{{template}}}}}"#
    );
    let (code, body) = send_raw(&c, "POST", &strict, "application/json", &metadata).await;
    assert_eq!(code, 400);
    assert!(
        body.contains(r#"strict decoding error: unknown field \"metadata.unknownMeta\""#),
        "{body}"
    );
    // Not strict: stored, the unknown metadata field dropped as Go's decoding drops it.
    let lenient = format!("{DEPLOYMENTS}?fieldValidation=Warn");
    let (code, body) = send_raw(&c, "POST", &lenient, "application/json", &metadata).await;
    assert_eq!(code, 201, "{body}");
    let created: Value = serde_json::from_str(&body).unwrap();
    assert!(
        created["metadata"].get("unknownMeta").is_none(),
        "{created}"
    );

    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "noxus.example.com"},
        "spec": {
            "group": "example.com", "scope": "Namespaced",
            "names": {"plural": "noxus", "singular": "noxu", "kind": "Noxu"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                             "properties": {
                        "foo": {"type": "string"},
                        "template": {"type": "object", "x-kubernetes-embedded-resource": true,
                                     "x-kubernetes-preserve-unknown-fields": true},
                    }},
                }}}}]
        }
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let apply = |name: &str| {
        format!(
            "/apis/example.com/v1/namespaces/default/noxus/{name}?fieldValidation=Strict&fieldManager=m"
        )
    };
    let cases = [
        (
            "a",
            "apiVersion: example.com/v1\nkind: Noxu\nmetadata:\n  name: a\nunknownField: x\nspec:\n  foo: f\n",
            ".unknownField: field not declared in schema",
        ),
        (
            "b",
            "apiVersion: example.com/v1\nkind: Noxu\nmetadata:\n  name: b\n  unknownMeta: x\nspec:\n  template:\n    apiVersion: foo/v1\n    kind: Sub\n    metadata:\n      name: sub\n      unknownSubMeta: x\n",
            ".metadata.unknownMeta: field not declared in schema",
        ),
        (
            "c",
            "\napiVersion: example.com/v1\nkind: Noxu\nmetadata:\n  name: c\nspec:\n  unknown: uk1\n  foo: foo1\n  foo: foo2\n",
            r#"line 9: key \"foo\" already set in map"#,
        ),
    ];
    for (name, yaml, expected) in cases {
        let (code, body) = send_raw(
            &c,
            "PATCH",
            &apply(name),
            "application/apply-patch+yaml",
            yaml,
        )
        .await;
        assert_eq!(code, 400, "{name}: {body}");
        assert!(body.contains(expected), "{name}: {body}");
    }
    assert!(
        send_raw(
            &c,
            "PATCH",
            &apply("b"),
            "application/apply-patch+yaml",
            cases[1].1
        )
        .await
        .1
        .contains(".spec.template.metadata.unknownSubMeta: field not declared in schema")
    );
}

/// A built-in kind's status is held to its types, not to the OpenAPI `required` markers:
/// the conformance suite writes a CRD condition with neither type nor status (as
/// kube-apiserver accepts it), while the spec's required fields stay required.
#[tokio::test]
async fn a_builtin_status_need_not_carry_its_required_fields() {
    let c = cluster().await;
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "gadgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
            "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object"}}}]},
    });
    let (code, _, created) = post(&c, crds, "", &crd).await;
    assert_eq!(code, 201, "{created}");
    let mut with_status = created.clone();
    with_status["status"] = json!({"conditions": [{"message": "set by a test"}],
        "acceptedNames": {"plural": "gadgets", "kind": "Gadget"}});
    let (code, body) = send_raw(
        &c,
        "PUT",
        &format!("{crds}/gadgets.example.com/status"),
        "application/json",
        &with_status.to_string(),
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let mut no_names = created;
    no_names["spec"]["names"] = json!({"plural": "gadgets"});
    no_names["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("resourceVersion");
    let (code, body) = send_raw(
        &c,
        "PUT",
        &format!("{crds}/gadgets.example.com"),
        "application/json",
        &no_names.to_string(),
    )
    .await;
    assert_eq!(code, 422, "{body}");
    assert!(body.contains("spec.names.kind"), "{body}");
}

#[tokio::test]
async fn a_crds_selectable_fields_are_what_field_selectors_may_name() {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};

    let c = cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd = |name: &str, selectable: Value| -> CustomResourceDefinition {
        serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": format!("{name}.example.com")},
            "spec": {
                "group": "example.com", "scope": "Namespaced",
                "names": {"plural": name, "kind": "Thing"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "selectableFields": selectable,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "properties": {
                            "color": {"type": "string"},
                            "size": {"type": "integer"},
                            "shiny": {"type": "boolean"},
                            "tags": {"type": "array", "items": {"type": "string"}},
                        }},
                    }}}}]
            }
        }))
        .unwrap()
    };

    // Only string, boolean and integer fields outside metadata, each once.
    let err = crds
        .create(
            &PostParams::default(),
            &crd(
                "badthings",
                json!([{"jsonPath": ".spec.tags"}, {"jsonPath": ".metadata.name"},
                       {"jsonPath": ".spec.color"}, {"jsonPath": ".spec.color"},
                       {"jsonPath": "spec.size"}]),
            ),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!(status.code, 422, "{status:?}");
    for fragment in [
        "selectableFields[0].jsonPath: Invalid value: \".spec.tags\": must point to a field of type string, boolean or integer",
        "selectableFields[1].jsonPath: Invalid value: \".metadata.name\": must not point to fields in metadata",
        "selectableFields[3].jsonPath: Duplicate value: \".spec.color\"",
        "selectableFields[4].jsonPath: Invalid value: \"spec.size\"",
    ] {
        assert!(
            status.message.contains(fragment),
            "{fragment} in {status:?}"
        );
    }

    crds.create(
        &PostParams::default(),
        &crd(
            "things",
            json!([{"jsonPath": ".spec.color"}, {"jsonPath": ".spec.shiny"}]),
        ),
    )
    .await
    .unwrap();
    let gvk = GroupVersionKind::gvk("example.com", "v1", "Thing");
    let resource = ApiResource::from_gvk_with_plural(&gvk, "things");
    let things: Api<DynamicObject> = Api::namespaced_with(c.client.clone(), "default", &resource);
    let names = |list: Vec<DynamicObject>| -> Vec<String> {
        list.into_iter().map(|o| o.metadata.name.unwrap()).collect()
    };
    let selected = |selector: &'static str| {
        let things = things.clone();
        async move {
            things
                .list(&ListParams::default().fields(selector))
                .await
                .map(|l| names(l.items))
        }
    };
    let mut watch = things
        .watch(&WatchParams::default().fields("spec.color=blue"), "0")
        .await
        .unwrap()
        .boxed();
    for (name, spec) in [
        ("a", json!({"color": "blue", "shiny": true})),
        ("b", json!({"color": "blue", "size": 2})),
        ("c", json!({"color": "red"})),
    ] {
        let thing = json!({"apiVersion": "example.com/v1", "kind": "Thing",
                           "metadata": {"name": name}, "spec": spec});
        things
            .create(
                &PostParams::default(),
                &serde_json::from_value(thing).unwrap(),
            )
            .await
            .unwrap();
    }
    assert_eq!(selected("spec.color=blue").await.unwrap(), ["a", "b"]);
    assert_eq!(
        selected("spec.color=blue,spec.shiny=true").await.unwrap(),
        ["a"]
    );
    // An absent selectable field reads as "".
    assert_eq!(selected("spec.shiny=").await.unwrap(), ["b", "c"]);
    assert_eq!(selected("metadata.name!=a").await.unwrap(), ["b", "c"]);
    // A field that is not selectable is a 400 naming it, for a list and a watch alike.
    for result in [
        selected("spec.size=2").await.map(|_| ()),
        things
            .watch(&WatchParams::default().fields("spec.size=2"), "0")
            .await
            .map(|_| ()),
    ] {
        let Err(kube::Error::Api(status)) = result else {
            panic!("refused: {result:?}")
        };
        assert_eq!(
            (status.code, status.message.as_str()),
            (400, "field label not supported: spec.size")
        );
    }

    // A watch sees what enters the selection as ADDED and what leaves it as DELETED.
    things
        .patch(
            "b",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"color": "green"}})),
        )
        .await
        .unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match watch.try_next().await.unwrap().unwrap() {
            WatchEvent::Added(o) => seen.push(format!("+{}", o.metadata.name.unwrap())),
            WatchEvent::Deleted(o) => seen.push(format!("-{}", o.metadata.name.unwrap())),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, ["+a", "+b", "-b"]);
}

/// What a workload update may not change: a Deployment's selector (422 naming the field,
/// nothing written), a StatefulSet's spec beyond the rolling fields — while scaling and a
/// new template still go through.
#[tokio::test]
async fn workload_updates_keep_their_fixed_fields() {
    let c = cluster().await;
    let deployments: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(deployment("fixed", json!({}))).unwrap(),
        )
        .await
        .unwrap();
    let patch = json!({"spec": {"selector": {"matchLabels": {"app": "fixed", "tier": "x"}},
        "template": {"metadata": {"labels": {"tier": "x"}}}}});
    let err = deployments
        .patch("fixed", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.contains("spec.selector"),
        "{}",
        status.message
    );
    let kept = deployments.get("fixed").await.unwrap();
    assert!(
        !kept
            .spec
            .unwrap()
            .selector
            .match_labels
            .unwrap()
            .contains_key("tier")
    );

    let sets = Api::<DynamicObject>::namespaced_with(
        c.client.clone(),
        "default",
        &ApiResource::from_gvk(&GroupVersionKind::gvk("apps", "v1", "StatefulSet")),
    );
    let set = json!({"apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "db"},
        "spec": {"serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
            "template": {"metadata": {"labels": {"app": "db"}},
                "spec": {"containers": [{"name": "db", "image": "postgres"}]}}}});
    sets.create(
        &PostParams::default(),
        &serde_json::from_value(set).unwrap(),
    )
    .await
    .unwrap();
    let rolled = json!({"spec": {"replicas": 3,
        "template": {"spec": {"containers": [{"name": "db", "image": "postgres:17"}]}}}});
    sets.patch("db", &PatchParams::default(), &Patch::Merge(&rolled))
        .await
        .unwrap();
    let err = sets
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(&json!({"spec": {"serviceName": "other"}})),
        )
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("{err}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status
            .message
            .contains("updates to statefulset spec for fields other than"),
        "{}",
        status.message
    );
    assert_eq!(
        sets.get("db").await.unwrap().data["spec"]["serviceName"],
        "db"
    );
}
