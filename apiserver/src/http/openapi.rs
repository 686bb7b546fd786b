//! The OpenAPI documents, generated from the kinds' schemas: `/openapi/v3` (an index of
//! group versions, then one OpenAPI 3.0 document per group version) and `/openapi/v2` (one
//! Swagger 2.0 document for everything).
//!
//! kubectl 1.29+ reads the v3 documents: `explain` walks the schemas, and a PATCH operation
//! tagged with its group/version/kind that lists a `fieldValidation` parameter tells kubectl to
//! leave validation to the server (which it does, see [`crate::schema`]). Documents are built
//! when asked for, not kept: the built-in schemas with their descriptions are megabytes. Each
//! has an ETag (a hash of the kinds it is made of), so a client polling with `If-None-Match`
//! gets a 304 without a document being built.

use std::hash::{Hash, Hasher};
use std::sync::LazyLock;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta};
use serde_json::{Map, Value, json};

use crate::registry::{Registry, ResourceDef, SchemaSource};

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";
const LIST_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ListMeta";

/// Which flavour of document, for the `$ref` prefix and the int-or-string spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavour {
    V2,
    V3,
}

impl Flavour {
    fn reference(self, name: &str) -> Value {
        match self {
            Flavour::V2 => json!({ "$ref": format!("#/definitions/{name}") }),
            Flavour::V3 => json!({ "$ref": format!("#/components/schemas/{name}") }),
        }
    }
}

/// The definition name of a kind, as upstream spells it: `io.k8s.api.apps.v1.Deployment`
/// for built-in groups, the reversed group for others (`com.example.v1.Widget`).
pub fn definition_name(def: &ResourceDef) -> String {
    let prefix = match def.group.as_str() {
        "" => "io.k8s.api.core".to_owned(),
        "apiextensions.k8s.io" => {
            "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions".to_owned()
        }
        group if group.ends_with(".k8s.io") || !group.contains('.') => {
            format!("io.k8s.api.{}", group.split('.').next().unwrap_or(group))
        }
        group => group.split('.').rev().collect::<Vec<_>>().join("."),
    };
    format!("{prefix}.{}.{}", def.version, def.kind)
}

/// The path of a group version in the index: `api/v1` or `apis/<group>/<version>`.
fn gv_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

/// A content hash of what a group version's document (or, given every kind, the v2
/// document) is made of: kubectl caches by it, and it is the documents' ETag.
fn gv_hash(defs: &[std::sync::Arc<ResourceDef>]) -> String {
    static BUILTIN: LazyLock<u64> = LazyLock::new(|| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for (name, text) in crate::registry::BUILTIN_MANIFESTS {
            (name, text).hash(&mut hasher);
        }
        hasher.finish()
    });
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    env!("CARGO_PKG_VERSION").hash(&mut hasher);
    for def in defs {
        (&def.plural, &def.kind, def.namespaced, def.status).hash(&mut hasher);
        match &def.openapi {
            SchemaSource::None => 0u64.hash(&mut hasher),
            SchemaSource::Builtin(_) => BUILTIN.hash(&mut hasher),
            SchemaSource::Custom(schema) => schema.to_string().hash(&mut hasher),
        }
    }
    format!("{:016X}", hasher.finish())
}

/// `/openapi/v3`: every group version and where its document is.
pub fn v3_index(registry: &Registry) -> Value {
    let mut paths = Map::new();
    for (group, versions) in registry.groups() {
        for version in versions {
            let defs = registry.resources(&group, &version).unwrap_or_default();
            let path = gv_path(&group, &version);
            let url = format!("/openapi/v3/{path}?hash={}", gv_hash(&defs));
            paths.insert(path, json!({ "serverRelativeURL": url }));
        }
    }
    json!({ "paths": paths })
}

/// `/openapi/v3/api/v1`, `/openapi/v3/apis/<group>/<version>`: one group version's document.
pub fn v3_group_version(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = registry.resources(group, version)?;
    let mut schemas = shared_definitions(Flavour::V3);
    let mut paths = Map::new();
    for def in &defs {
        add_resource(def, Flavour::V3, &mut schemas, &mut paths);
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": info(),
        "paths": paths,
        "components": { "schemas": schemas },
    }))
}

/// The ETag of `/openapi/v2`: a content hash of everything it is made of, so a client that
/// polls with `If-None-Match` (the e2e suite's CRD publishing specs, ten times in a row per
/// check) gets a 304 without the document being built.
pub fn v2_etag(registry: &Registry) -> String {
    let defs: Vec<_> = registry
        .groups()
        .into_iter()
        .flat_map(|(group, versions)| {
            versions
                .into_iter()
                .flat_map(|version| registry.resources(&group, &version).unwrap_or_default())
                .collect::<Vec<_>>()
        })
        .collect();
    gv_hash(&defs)
}

/// The ETag of one group version's v3 document (the `hash` its index URL carries).
pub fn v3_etag(registry: &Registry, group: &str, version: &str) -> Option<String> {
    Some(gv_hash(&registry.resources(group, version)?))
}

/// `/openapi/v2`: the Swagger 2.0 document of everything served.
pub fn v2(registry: &Registry) -> Value {
    let mut definitions = shared_definitions(Flavour::V2);
    let mut paths = Map::new();
    for (group, versions) in registry.groups() {
        for version in versions {
            for def in registry.resources(&group, &version).unwrap_or_default() {
                add_resource(&def, Flavour::V2, &mut definitions, &mut paths);
            }
        }
    }
    json!({
        "swagger": "2.0",
        "info": info(),
        "paths": paths,
        "definitions": definitions,
    })
}

fn info() -> Value {
    json!({
        "title": "Kubernetes",
        "version": crate::discovery::version()["gitVersion"],
    })
}

/// ObjectMeta and ListMeta, which every kind refers to.
fn shared_definitions(flavour: Flavour) -> Map<String, Value> {
    let mut map = Map::new();
    let mut object_meta = crate::crdgen::plain_schema_of::<ObjectMeta>();
    let mut list_meta = crate::crdgen::plain_schema_of::<ListMeta>();
    if flavour == Flavour::V2 {
        to_v2(&mut object_meta);
        to_v2(&mut list_meta);
    }
    map.insert(OBJECT_META.into(), object_meta);
    map.insert(LIST_META.into(), list_meta);
    map
}

/// Swagger 2.0 has no `anyOf`: int-or-string is `type: string, format: int-or-string` there.
fn to_v2(schema: &mut Value) {
    if let Value::Object(map) = schema {
        if map.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
            map.remove("anyOf");
            map.insert("type".into(), json!("string"));
            map.insert("format".into(), json!("int-or-string"));
        }
        map.values_mut().for_each(to_v2);
    } else if let Value::Array(items) = schema {
        items.iter_mut().for_each(to_v2);
    }
}

const PRESERVE: &str = "x-kubernetes-preserve-unknown-fields";

/// The `metadata` property of a kind's schema: a reference to ObjectMeta.
fn metadata_property(flavour: Flavour) -> Value {
    json!({
        "allOf": [flavour.reference(OBJECT_META)],
        "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata",
    })
}

/// A custom resource's schema as kube-apiserver publishes it: `apiVersion`, `kind` and
/// `metadata` at the root (what `kubectl explain` lists), and the same inside every
/// `x-kubernetes-embedded-resource` object, where they are required — except, in v2, below
/// `x-kubernetes-preserve-unknown-fields`, where kubectl would then refuse unknown fields.
fn add_type_meta(schema: &mut Value, flavour: Flavour) {
    let Value::Object(map) = schema else {
        return;
    };
    let properties = map
        .entry("properties")
        .or_insert_with(|| json!({}))
        .as_object_mut();
    if let Some(properties) = properties {
        properties.insert(
            "apiVersion".into(),
            json!({
                "type": "string",
                "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources",
            }),
        );
        properties.insert(
            "kind".into(),
            json!({
                "type": "string",
                "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds",
            }),
        );
        properties.insert("metadata".into(), metadata_property(flavour));
    }
    add_embedded_type_meta(schema, flavour, true);
}

fn add_embedded_type_meta(schema: &mut Value, flavour: Flavour, root: bool) {
    let Value::Object(map) = schema else {
        return;
    };
    for key in ["properties", "additionalProperties"] {
        match map.get_mut(key) {
            Some(Value::Object(children)) if key == "properties" => children
                .values_mut()
                .for_each(|child| add_embedded_type_meta(child, flavour, false)),
            Some(child @ Value::Object(_)) => add_embedded_type_meta(child, flavour, false),
            _ => {}
        }
    }
    if let Some(items) = map.get_mut("items") {
        add_embedded_type_meta(items, flavour, false);
    }
    let preserves = map.get(PRESERVE) == Some(&Value::Bool(true));
    let embedded = map.get("x-kubernetes-embedded-resource") == Some(&Value::Bool(true));
    if root || !embedded || (preserves && flavour == Flavour::V2) {
        return;
    }
    let properties = map.entry("properties").or_insert_with(|| json!({}));
    if let Value::Object(properties) = properties {
        properties.insert(
            "apiVersion".into(),
            json!({"type": "string", "description": "apiVersion defines the versioned schema of this representation of an object. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"}),
        );
        properties.insert(
            "kind".into(),
            json!({"type": "string", "description": "kind is a string value representing the type of this object. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"}),
        );
        properties.insert("metadata".into(), metadata_property(flavour));
    }
    let required = map.entry("required").or_insert_with(|| json!([]));
    if let Value::Array(required) = required {
        for field in ["kind", "apiVersion"] {
            if !required.iter().any(|r| r == field) {
                required.push(json!(field));
            }
        }
    }
}

/// Adds a resource's kind, its list and its paths.
fn add_resource(
    def: &ResourceDef,
    flavour: Flavour,
    definitions: &mut Map<String, Value>,
    paths: &mut Map<String, Value>,
) {
    let name = definition_name(def);
    let gvk = json!({ "group": def.group, "version": def.version, "kind": def.kind });
    let mut schema = def.openapi.load(&def.version).unwrap_or_else(
        || json!({ "type": "object", "x-kubernetes-preserve-unknown-fields": true }),
    );
    let custom = matches!(def.openapi, SchemaSource::Custom(_));
    if flavour == Flavour::V2 && custom && schema[PRESERVE] == true {
        // As kube-apiserver publishes such a CRD in v2: a bare object, since kubectl's
        // client-side validation would refuse every field a listed property leaves out.
        schema = json!({ "type": "object" });
    } else {
        if flavour == Flavour::V2 {
            to_v2(&mut schema);
        }
        if custom {
            add_type_meta(&mut schema, flavour);
        } else if let Some(properties) = schema.get_mut("properties").and_then(Value::as_object_mut)
        {
            properties.insert("metadata".into(), metadata_property(flavour));
        }
    }
    schema["x-kubernetes-group-version-kind"] = json!([gvk]);
    definitions.insert(name.clone(), schema);
    let list_name = format!("{name}List");
    definitions.insert(
        list_name.clone(),
        json!({
            "description": format!("{}List is a list of {}.", def.kind, def.kind),
            "type": "object",
            "required": ["items"],
            "properties": {
                "apiVersion": { "type": "string" },
                "kind": { "type": "string" },
                "items": { "type": "array", "items": flavour.reference(&name) },
                "metadata": { "allOf": [flavour.reference(LIST_META)] },
            },
            "x-kubernetes-group-version-kind": [{
                "group": def.group, "version": def.version, "kind": format!("{}List", def.kind),
            }],
        }),
    );

    let prefix = if def.group.is_empty() {
        format!("/api/{}", def.version)
    } else {
        format!("/apis/{}/{}", def.group, def.version)
    };
    let scope = if def.namespaced {
        "/namespaces/{namespace}"
    } else {
        ""
    };
    let collection = format!("{prefix}{scope}/{}", def.plural);
    let item = format!("{collection}/{{name}}");
    let op = Operations {
        def,
        flavour,
        gvk: &gvk,
        object: &name,
        list: &list_name,
    };
    let mut collection_ops = Map::new();
    collection_ops.insert("get".into(), op.make("list", "list"));
    collection_ops.insert("post".into(), op.make("create", "post"));
    collection_ops.insert("parameters".into(), op.path_parameters(false));
    paths.insert(collection, Value::Object(collection_ops));
    let mut item_ops = Map::new();
    item_ops.insert("get".into(), op.make("read", "get"));
    item_ops.insert("put".into(), op.make("replace", "put"));
    item_ops.insert("patch".into(), op.make("patch", "patch"));
    item_ops.insert("delete".into(), op.make("delete", "delete"));
    item_ops.insert("parameters".into(), op.path_parameters(true));
    paths.insert(item.clone(), Value::Object(item_ops));
    if def.status {
        let mut status_ops = Map::new();
        status_ops.insert("get".into(), op.make("readStatus", "get"));
        status_ops.insert("put".into(), op.make("replaceStatus", "put"));
        status_ops.insert("patch".into(), op.make("patchStatus", "patch"));
        status_ops.insert("parameters".into(), op.path_parameters(true));
        paths.insert(format!("{item}/status"), Value::Object(status_ops));
    }
    if def.namespaced {
        let mut all_ops = Map::new();
        let mut list_all = op.make("listForAllNamespaces", "list");
        list_all["operationId"] = json!(format!("{}ForAllNamespaces", op.operation_id("list")));
        all_ops.insert("get".into(), list_all);
        paths.insert(format!("{prefix}/{}", def.plural), Value::Object(all_ops));
    }
}

/// Builds the operations of one resource's paths.
struct Operations<'a> {
    def: &'a ResourceDef,
    flavour: Flavour,
    gvk: &'a Value,
    object: &'a str,
    list: &'a str,
}

fn query(name: &str, kind: &str, description: &str, flavour: Flavour) -> Value {
    match flavour {
        Flavour::V2 => {
            json!({ "name": name, "in": "query", "type": kind, "uniqueItems": true, "description": description })
        }
        Flavour::V3 => {
            json!({ "name": name, "in": "query", "schema": { "type": kind, "uniqueItems": true }, "description": description })
        }
    }
}

impl Operations<'_> {
    fn operation_id(&self, verb: &str) -> String {
        let scope = if self.def.namespaced {
            "Namespaced"
        } else {
            ""
        };
        let group: String = self
            .def
            .group
            .split('.')
            .next()
            .map(|g| {
                let mut chars = g.chars();
                chars
                    .next()
                    .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                    .unwrap_or_else(|| "Core".into())
            })
            .unwrap_or_default();
        let version = {
            let mut chars = self.def.version.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        };
        format!("{verb}{group}{version}{scope}{}", self.def.kind)
    }

    fn path_parameters(&self, named: bool) -> Value {
        let path = |name: &str, description: &str| match self.flavour {
            Flavour::V2 => {
                json!({ "name": name, "in": "path", "required": true, "type": "string", "uniqueItems": true, "description": description })
            }
            Flavour::V3 => {
                json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string", "uniqueItems": true }, "description": description })
            }
        };
        let mut parameters = Vec::new();
        if named {
            parameters.push(path("name", &format!("name of the {}", self.def.kind)));
        }
        if self.def.namespaced {
            parameters.push(path(
                "namespace",
                "object name and auth scope, such as for teams and projects",
            ));
        }
        Value::Array(parameters)
    }

    fn make(&self, verb: &str, action: &str) -> Value {
        let f = self.flavour;
        let mut parameters = Vec::new();
        match action {
            "list" => {
                for (name, kind) in [
                    ("labelSelector", "string"),
                    ("fieldSelector", "string"),
                    ("limit", "integer"),
                    ("continue", "string"),
                    ("resourceVersion", "string"),
                    ("resourceVersionMatch", "string"),
                    ("timeoutSeconds", "integer"),
                    ("watch", "boolean"),
                    ("allowWatchBookmarks", "boolean"),
                    ("sendInitialEvents", "boolean"),
                ] {
                    parameters.push(query(name, kind, "", f));
                }
            }
            "post" | "put" | "patch" => {
                parameters.push(query(
                    "dryRun",
                    "string",
                    "When present, indicates that modifications should not be persisted. The only valid value is All.",
                    f,
                ));
                parameters.push(query(
                    "fieldManager",
                    "string",
                    "A name associated with the actor or entity that is making these changes.",
                    f,
                ));
                parameters.push(query(
                    "fieldValidation",
                    "string",
                    "How the server handles fields of the request object it does not know: Ignore, Warn (the default) or Strict.",
                    f,
                ));
                if action == "patch" {
                    parameters.push(query(
                        "force",
                        "boolean",
                        "Force is going to \"force\" Apply requests.",
                        f,
                    ));
                }
            }
            "delete" => {
                for (name, kind) in [
                    ("dryRun", "string"),
                    ("gracePeriodSeconds", "integer"),
                    ("propagationPolicy", "string"),
                ] {
                    parameters.push(query(name, kind, "", f));
                }
            }
            _ => {}
        }
        let response = match action {
            "list" => self.list,
            _ => self.object,
        };
        let mut operation = json!({
            "description": format!("{verb} {}", self.def.kind),
            "operationId": self.operation_id(verb),
            "tags": [self.def.api_version().replace(['/', '.'], "_")],
            "parameters": parameters,
            "x-kubernetes-action": action,
            "x-kubernetes-group-version-kind": self.gvk,
        });
        let media = [
            "application/json",
            "application/yaml",
            "application/vnd.kubernetes.protobuf",
        ];
        match f {
            Flavour::V3 => {
                let content: Map<String, Value> = media
                    .iter()
                    .map(|m| ((*m).to_owned(), json!({ "schema": f.reference(response) })))
                    .collect();
                operation["responses"] =
                    json!({ "200": { "description": "OK", "content": content } });
                if matches!(action, "post" | "put" | "patch") {
                    // Strategic merge patch only where the server has merge keys for the
                    // kind: kubectl ≥ 1.27 sends it to whatever advertises it (a custom
                    // resource's would be refused with a 415).
                    let strategic =
                        crate::smp::strategies(&self.def.group, &self.def.kind).is_some();
                    let body_types: &[&str] = if action == "patch" && strategic {
                        &[
                            "application/json-patch+json",
                            "application/merge-patch+json",
                            "application/strategic-merge-patch+json",
                            "application/apply-patch+yaml",
                        ]
                    } else if action == "patch" {
                        &[
                            "application/json-patch+json",
                            "application/merge-patch+json",
                            "application/apply-patch+yaml",
                        ]
                    } else {
                        &["application/json"]
                    };
                    let schema = if action == "patch" {
                        json!({ "type": "object" })
                    } else {
                        f.reference(self.object)
                    };
                    let content: Map<String, Value> = body_types
                        .iter()
                        .map(|m| ((*m).to_owned(), json!({ "schema": schema })))
                        .collect();
                    operation["requestBody"] = json!({ "content": content, "required": true });
                }
            }
            Flavour::V2 => {
                operation["responses"] =
                    json!({ "200": { "description": "OK", "schema": f.reference(response) } });
                operation["produces"] = json!(media);
                if matches!(action, "post" | "put" | "patch") {
                    let schema = if action == "patch" {
                        json!({ "type": "object" })
                    } else {
                        f.reference(self.object)
                    };
                    if let Some(parameters) = operation["parameters"].as_array_mut() {
                        parameters.insert(
                            0,
                            json!({ "name": "body", "in": "body", "required": true, "schema": schema }),
                        );
                    }
                }
            }
        }
        operation
    }
}
