//! The OpenAPI documents generated from the kinds' schemas: the v3 index and group-version
//! documents kubectl reads (explain, and whether the server validates fields), and v2; and
//! aggregated discovery, the one document kubectl ≥ 1.30 and client-go read first.

#![allow(clippy::unwrap_used)]

mod common;

use common::cluster;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

async fn get(c: &common::Cluster, path: &str, accept: &str) -> (u16, Vec<u8>) {
    let request = http::Request::get(path)
        .header("accept", accept)
        .body(Vec::new().into())
        .unwrap();
    let response = c.client.send(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

async fn get_json(c: &common::Cluster, path: &str) -> Value {
    let (status, body) = get(c, path, "application/json").await;
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

/// The PATCH operation kubectl looks for: tagged with the kind, listing fieldValidation.
fn patch_validates_fields(doc: &Value, path: &str, kind: &str) -> bool {
    let patch = &doc["paths"][path]["patch"];
    patch["x-kubernetes-group-version-kind"]["kind"] == kind
        && patch["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
}

#[tokio::test]
async fn v3_documents_describe_built_in_and_custom_kinds() {
    let c = cluster().await;
    let index = get_json(&c, "/openapi/v3").await;
    let apps = index["paths"]["apis/apps/v1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        apps.starts_with("/openapi/v3/apis/apps/v1?hash="),
        "{index}"
    );
    assert!(index["paths"]["api/v1"].is_object());

    let doc = get_json(&c, &apps).await;
    assert_eq!(doc["openapi"], "3.0.0");
    let deployment = &doc["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
    assert_eq!(
        deployment["x-kubernetes-group-version-kind"],
        json!([{"group": "apps", "version": "v1", "kind": "Deployment"}])
    );
    let replicas = &deployment["properties"]["spec"]["properties"]["replicas"];
    assert_eq!(replicas["type"], "integer");
    assert!(
        replicas["description"]
            .as_str()
            .unwrap()
            .contains("desired pods")
    );
    let meta_ref = &deployment["properties"]["metadata"]["allOf"][0]["$ref"];
    let meta_name = meta_ref
        .as_str()
        .unwrap()
        .trim_start_matches("#/components/schemas/");
    assert!(doc["components"]["schemas"][meta_name]["properties"]["labels"].is_object());
    assert!(patch_validates_fields(
        &doc,
        "/apis/apps/v1/namespaces/{namespace}/deployments/{name}",
        "Deployment"
    ));
    // Merge keys, for kubectl's three-way apply.
    let containers = &deployment["properties"]["spec"]["properties"]["template"]["properties"]["spec"]
        ["properties"]["containers"];
    assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");

    // A CRD's schema shows up in its own group's document, and the hash changes with it.
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {
            "group": "example.com", "scope": "Cluster",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "description": "What a widget wants.",
                             "properties": {"size": {"type": "integer"}}}}}}}]
        }
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let index = get_json(&c, "/openapi/v3").await;
    let url = index["paths"]["apis/example.com/v1"]["serverRelativeURL"]
        .as_str()
        .unwrap()
        .to_owned();
    let doc = get_json(&c, &url).await;
    let widget = &doc["components"]["schemas"]["com.example.v1.Widget"];
    assert_eq!(
        widget["properties"]["spec"]["description"],
        "What a widget wants."
    );
    assert!(patch_validates_fields(
        &doc,
        "/apis/example.com/v1/widgets/{name}",
        "Widget"
    ));
    // Type meta at the root, as kube-apiserver publishes it (`kubectl explain` lists them).
    for field in ["apiVersion", "kind", "metadata"] {
        assert!(widget["properties"][field].is_object(), "{field}");
    }

    let (status, _) = get(
        &c,
        "/openapi/v3/apis/nope.example.com/v1",
        "application/json",
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn v2_is_one_swagger_document() {
    let c = cluster().await;
    let doc = get_json(&c, "/openapi/v2").await;
    assert_eq!(doc["swagger"], "2.0");
    let service = &doc["definitions"]["io.k8s.api.core.v1.Service"];
    assert_eq!(
        service["x-kubernetes-group-version-kind"][0]["kind"],
        "Service"
    );
    // Swagger 2 spells int-or-string as a string format.
    let target_port =
        &service["properties"]["spec"]["properties"]["ports"]["items"]["properties"]["targetPort"];
    assert_eq!(
        (target_port["type"].as_str(), target_port["format"].as_str()),
        (Some("string"), Some("int-or-string"))
    );
    assert!(doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["patch"].is_object());
    // kubectl ≤ 1.28 asks for protobuf only: an empty document, which it accepts.
    let (status, body) = get(
        &c,
        "/openapi/v2",
        "application/com.github.proto-openapi.spec.v2@v1.0+protobuf",
    )
    .await;
    assert_eq!((status, body.len()), (200, 0));
}

/// CRDs in v2 as kube-apiserver publishes them (the CustomResourcePublishOpenAPI specs):
/// type meta and metadata added, also inside embedded resources; a schema that preserves
/// unknown fields at its root is a bare object, so kubectl accepts any field.
#[tokio::test]
async fn v2_publishes_custom_resources_as_kube_apiserver_does() {
    let c = cluster().await;
    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    for (kind, schema) in [
        (
            "Open",
            json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        ),
        (
            "Closed",
            json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
                "template": {"type": "object", "x-kubernetes-embedded-resource": true,
                             "properties": {"data": {"type": "string"}}}}}}}),
        ),
    ] {
        let plural = format!("{}s", kind.to_lowercase());
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "metadata": {"name": format!("{plural}.example.com")},
            "spec": {
                "group": "example.com", "scope": "Namespaced",
                "names": {"plural": plural, "singular": kind.to_lowercase(), "kind": kind},
                "versions": [{"name": "v1", "served": true, "storage": true,
                              "schema": {"openAPIV3Schema": schema}}]
            }
        }))
        .unwrap();
        crds.create(&PostParams::default(), &crd).await.unwrap();
    }
    let mut doc = Value::Null;
    for _ in 0..50 {
        doc = get_json(&c, "/openapi/v2").await;
        if doc["definitions"]["com.example.v1.Closed"].is_object()
            && doc["definitions"]["com.example.v1.Open"].is_object()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let open = &doc["definitions"]["com.example.v1.Open"];
    assert_eq!(open["type"], "object");
    assert!(open.get("properties").is_none(), "{open}");
    assert!(open.get("x-kubernetes-preserve-unknown-fields").is_none());
    assert_eq!(open["x-kubernetes-group-version-kind"][0]["kind"], "Open");
    let closed = &doc["definitions"]["com.example.v1.Closed"];
    assert_eq!(closed["properties"]["apiVersion"]["type"], "string");
    assert!(
        closed["properties"]["kind"]["description"]
            .as_str()
            .unwrap()
            .starts_with("Kind is a string value")
    );
    let template = &closed["properties"]["spec"]["properties"]["template"];
    assert!(template["properties"]["metadata"].is_object());
    assert_eq!(template["required"], json!(["kind", "apiVersion"]));
}

/// The documents carry an ETag: asked again with it, the answer is a 304 (nothing built);
/// once a CRD changes what the document holds, the tag changes and the document comes anew.
#[tokio::test]
async fn documents_answer_304_to_their_etag_until_a_kind_changes() {
    let c = cluster().await;
    let fetch = |path: &'static str, etag: Option<String>| {
        let client = c.client.clone();
        async move {
            let mut request = http::Request::get(path).header("accept", "application/json");
            if let Some(etag) = etag {
                request = request.header("if-none-match", etag);
            }
            let response = client
                .send(request.body(Vec::new().into()).unwrap())
                .await
                .unwrap();
            let etag = response.headers()["etag"].to_str().unwrap().to_owned();
            (response.status().as_u16(), etag)
        }
    };
    let (status, etag) = fetch("/openapi/v2", None).await;
    assert_eq!(status, 200);
    assert!(etag.starts_with('"') && etag.ends_with('"'), "{etag}");
    assert_eq!(
        fetch("/openapi/v2", Some(etag.clone())).await,
        (304, etag.clone())
    );
    let (status, v3) = fetch("/openapi/v3/apis/apps/v1", None).await;
    assert_eq!(status, 200);
    assert_eq!(
        fetch("/openapi/v3/apis/apps/v1", Some(v3.clone())).await.0,
        304
    );

    let crds: Api<CustomResourceDefinition> = Api::all(c.client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(json!({
        "metadata": {"name": "gadgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced",
                 "names": {"plural": "gadgets", "singular": "gadget", "kind": "Gadget"},
                 "versions": [{"name": "v1", "served": true, "storage": true,
                               "schema": {"openAPIV3Schema": {"type": "object"}}}]}
    }))
    .unwrap();
    crds.create(&PostParams::default(), &crd).await.unwrap();
    let mut changed = None;
    for _ in 0..50 {
        let (status, tag) = fetch("/openapi/v2", Some(etag.clone())).await;
        if status == 200 {
            changed = Some(tag);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(changed.is_some_and(|tag| tag != etag));
    // Another group's document is unchanged.
    assert_eq!(fetch("/openapi/v3/apis/apps/v1", Some(v3)).await.0, 304);
}

/// The legacy discovery documents also answer with a trailing slash, as kube-apiserver's do
/// (the e2e Discovery spec reads `/apis/<group>/` for every group).
#[tokio::test]
async fn discovery_paths_answer_with_a_trailing_slash() {
    let c = cluster().await;
    for (path, kind) in [
        ("/api/", "APIVersions"),
        ("/api/v1/", "APIResourceList"),
        ("/apis/", "APIGroupList"),
        ("/apis/admissionregistration.k8s.io/", "APIGroup"),
        ("/apis/apps/v1/", "APIResourceList"),
    ] {
        let (status, body) = get(&c, path, "application/json").await;
        assert_eq!(status, 200, "{path}");
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["kind"], kind, "{path}");
    }
}

#[tokio::test]
async fn aggregated_discovery_is_served_as_kubectl_asks_for_it() {
    let c = cluster().await;
    // kubectl 1.33's Accept: v2, then v2beta1, then plain JSON (the legacy documents).
    let accept = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,\
                  application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,\
                  application/json";
    let fetch = |path: &'static str, accept: &'static str| {
        let client = c.client.clone();
        async move {
            let request = http::Request::get(path)
                .header("accept", accept)
                .body(Vec::new().into())
                .unwrap();
            let response = client.send(request).await.unwrap();
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_owned();
            let bytes =
                axum::body::to_bytes(axum::body::Body::new(response.into_body()), usize::MAX)
                    .await
                    .unwrap();
            (
                content_type,
                serde_json::from_slice::<Value>(&bytes).unwrap(),
            )
        }
    };
    let resource = |doc: &Value, group: &str, version: &str, plural: &str| -> Value {
        let group = doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["metadata"]["name"] == group)
            .unwrap_or_else(|| panic!("{group} in {doc}"));
        let version = group["versions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["version"] == version)
            .unwrap();
        version["resources"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["resource"] == plural)
            .unwrap()
            .clone()
    };

    let (content_type, apis) = fetch("/apis", accept).await;
    assert_eq!(
        content_type,
        "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
    );
    assert_eq!(
        (&apis["kind"], &apis["apiVersion"]),
        (
            &json!("APIGroupDiscoveryList"),
            &json!("apidiscovery.k8s.io/v2")
        )
    );
    let deployments = resource(&apis, "apps", "v1", "deployments");
    assert_eq!(deployments["scope"], "Namespaced");
    assert_eq!(deployments["shortNames"], json!(["deploy"]));
    assert_eq!(deployments["responseKind"]["kind"], "Deployment");
    assert!(
        deployments["verbs"]
            .as_array()
            .unwrap()
            .contains(&json!("patch"))
    );
    let scale = deployments["subresources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["subresource"] == "scale")
        .unwrap();
    assert_eq!(
        scale["responseKind"],
        json!({"group": "autoscaling", "version": "v1", "kind": "Scale"})
    );
    // The preferred version leads: autoscaling/v2 before v1.
    let autoscaling = apis["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["metadata"]["name"] == "autoscaling")
        .unwrap();
    assert_eq!(autoscaling["versions"][0]["version"], "v2");

    let (content_type, core) = fetch("/api", accept).await;
    assert!(
        content_type.contains("as=APIGroupDiscoveryList"),
        "{content_type}"
    );
    let pods = resource(&core, "", "v1", "pods");
    let subresources: Vec<&str> = pods["subresources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["subresource"].as_str().unwrap())
        .collect();
    for sub in ["status", "log", "eviction", "binding"] {
        assert!(subresources.contains(&sub), "{sub} in {subresources:?}");
    }

    // v2beta1 alone still gets v2beta1; plain JSON gets the legacy APIGroupList.
    let (content_type, beta) = fetch(
        "/apis",
        "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList",
    )
    .await;
    assert!(content_type.contains("v=v2beta1"), "{content_type}");
    assert_eq!(beta["apiVersion"], "apidiscovery.k8s.io/v2beta1");
    let (content_type, legacy) = fetch("/apis", "application/json").await;
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    assert_eq!(legacy["kind"], "APIGroupList");
}
