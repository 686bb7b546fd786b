//! The built-in kinds as CustomResourceDefinition manifests, generated from `k8s-openapi`'s
//! types through `schemars` (what `orq crdgen` writes into `crds/`).
//!
//! The engine serves built-in and custom kinds alike from CRD-shaped definitions; this module
//! is where the built-in ones come from. The schema pipeline is the one `kube-derive` uses for
//! custom resources (OpenAPI 3, inlined subschemas, then kube-core's structural rewrites),
//! followed by measured fix-ups: the root `metadata` is only
//! `type: object`, int-or-string branches get their types back, `Quantity` gets its pattern
//! and opaque fields (`fieldsV1`, `RawExtension`) keep unknown fields.
//!
//! These manifests are schema documents for Orquestra's own engine: upstream Kubernetes would
//! refuse them as CRDs (built-in groups are reserved, and the core group has no dot).

use k8s_openapi::api::{
    admissionregistration, apps, autoscaling, batch, certificates, coordination, core, discovery,
    events, flowcontrol, networking, node, policy, rbac, resource, scheduling, storage,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as apiextensions;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1 as apiregistration;
use kube_core::schema::{OptionalEnum, OptionalIntOrString, StructuralSchemaRewriter};
use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use schemars::transform::AddNullable;
use serde_json::{Value, json};

/// The pattern Kubernetes gives `resource.Quantity` in CRD schemas.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

/// One generated manifest: its file name under `crds/` and its YAML text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// `<group or "core">_<plural>.yaml`.
    pub file_name: String,
    /// The CustomResourceDefinition, as YAML.
    pub yaml: String,
}

/// How a built-in kind is served beyond what its type says.
struct Kind {
    short_names: &'static [&'static str],
    categories: &'static [&'static str],
    status: bool,
    scale: bool,
}

const fn kind(short_names: &'static [&'static str], categories: &'static [&'static str]) -> Kind {
    Kind {
        short_names,
        categories,
        status: false,
        scale: false,
    }
}

impl Kind {
    const fn status(mut self) -> Self {
        self.status = true;
        self
    }

    const fn scale(mut self) -> Self {
        self.scale = true;
        self
    }
}

/// k8s-openapi's scope marker types, as a CRD `scope`.
trait Scope {
    const SCOPE: &'static str;
}

impl Scope for k8s_openapi::NamespaceResourceScope {
    const SCOPE: &'static str = "Namespaced";
}

impl Scope for k8s_openapi::ClusterResourceScope {
    const SCOPE: &'static str = "Cluster";
}

/// Every built-in kind as a CRD object, in a stable order.
pub fn builtin_crds() -> Vec<Value> {
    use core::v1 as c;
    const ALL: &[&str] = &["all"];
    use admissionregistration::v1 as admission;
    const NONE: &[&str] = &[];
    vec![
        crd::<c::Namespace>(kind(&["ns"], NONE).status()),
        crd::<c::Node>(kind(&["no"], NONE).status()),
        crd::<c::Pod>(kind(&["po"], ALL).status()),
        crd::<c::PodTemplate>(kind(NONE, NONE)),
        crd::<c::ReplicationController>(kind(&["rc"], ALL).status().scale()),
        crd::<c::Service>(kind(&["svc"], ALL).status()),
        crd::<c::Endpoints>(kind(&["ep"], NONE)),
        crd::<c::ConfigMap>(kind(&["cm"], NONE)),
        crd::<c::Secret>(kind(NONE, NONE)),
        crd::<c::ServiceAccount>(kind(&["sa"], NONE)),
        crd::<c::Event>(kind(&["ev"], NONE)),
        crd::<c::PersistentVolume>(kind(&["pv"], NONE).status()),
        crd::<c::PersistentVolumeClaim>(kind(&["pvc"], NONE).status()),
        crd::<c::ResourceQuota>(kind(&["quota"], NONE).status()),
        crd::<c::LimitRange>(kind(&["limits"], NONE)),
        crd::<events::v1::Event>(kind(&["ev"], NONE)),
        crd::<coordination::v1::Lease>(kind(NONE, NONE)),
        crd::<discovery::v1::EndpointSlice>(kind(NONE, NONE)),
        crd::<apps::v1::Deployment>(kind(&["deploy"], ALL).status().scale()),
        crd::<apps::v1::ReplicaSet>(kind(&["rs"], ALL).status().scale()),
        crd::<apps::v1::DaemonSet>(kind(&["ds"], ALL).status()),
        crd::<apps::v1::StatefulSet>(kind(&["sts"], ALL).status().scale()),
        crd::<apps::v1::ControllerRevision>(kind(NONE, NONE)),
        crd::<batch::v1::Job>(kind(NONE, ALL).status()),
        crd::<batch::v1::CronJob>(kind(&["cj"], ALL).status()),
        also_served(
            crd::<autoscaling::v2::HorizontalPodAutoscaler>(kind(&["hpa"], ALL).status()),
            crd::<autoscaling::v1::HorizontalPodAutoscaler>(kind(&["hpa"], ALL).status()),
        ),
        crd::<policy::v1::PodDisruptionBudget>(kind(&["pdb"], NONE).status()),
        crd::<storage::v1::StorageClass>(kind(&["sc"], NONE)),
        crd::<storage::v1::VolumeAttachment>(kind(NONE, NONE).status()),
        crd::<storage::v1::VolumeAttributesClass>(kind(&["vac"], NONE)),
        crd::<storage::v1::CSIDriver>(kind(NONE, NONE)),
        crd::<storage::v1::CSINode>(kind(NONE, NONE)),
        crd::<storage::v1::CSIStorageCapacity>(kind(NONE, NONE)),
        crd::<node::v1::RuntimeClass>(kind(NONE, NONE)),
        crd::<scheduling::v1::PriorityClass>(kind(&["pc"], NONE)),
        crd::<networking::v1::Ingress>(kind(&["ing"], NONE).status()),
        crd::<networking::v1::IngressClass>(kind(NONE, NONE)),
        crd::<networking::v1::NetworkPolicy>(kind(&["netpol"], NONE)),
        crd::<networking::v1::IPAddress>(kind(&["ip"], NONE)),
        crd::<networking::v1::ServiceCIDR>(kind(NONE, NONE).status()),
        crd::<flowcontrol::v1::FlowSchema>(kind(NONE, NONE).status()),
        crd::<flowcontrol::v1::PriorityLevelConfiguration>(kind(NONE, NONE).status()),
        crd::<certificates::v1::CertificateSigningRequest>(kind(&["csr"], NONE).status()),
        crd::<admission::ValidatingWebhookConfiguration>(kind(NONE, &["api-extensions"])),
        crd::<admission::MutatingWebhookConfiguration>(kind(NONE, &["api-extensions"])),
        crd::<admission::ValidatingAdmissionPolicy>(kind(NONE, &["api-extensions"]).status()),
        crd::<admission::ValidatingAdmissionPolicyBinding>(kind(NONE, &["api-extensions"])),
        crd::<admission::MutatingAdmissionPolicy>(kind(NONE, &["api-extensions"])),
        crd::<admission::MutatingAdmissionPolicyBinding>(kind(NONE, &["api-extensions"])),
        crd::<resource::v1::DeviceClass>(kind(NONE, NONE)),
        crd::<resource::v1::ResourceClaim>(kind(NONE, NONE).status()),
        crd::<resource::v1::ResourceClaimTemplate>(kind(NONE, NONE)),
        crd::<resource::v1::ResourceSlice>(kind(NONE, NONE)),
        crd::<rbac::v1::Role>(kind(NONE, NONE)),
        crd::<rbac::v1::ClusterRole>(kind(NONE, NONE)),
        crd::<rbac::v1::RoleBinding>(kind(NONE, NONE)),
        crd::<rbac::v1::ClusterRoleBinding>(kind(NONE, NONE)),
        crd::<apiextensions::CustomResourceDefinition>(
            kind(&["crd", "crds"], &["api-extensions"]).status(),
        ),
        crd::<apiregistration::APIService>(kind(NONE, &["api-extensions"]).status()),
        computed::<crate::resource_metrics::NodeMetrics>(),
        computed::<crate::resource_metrics::PodMetrics>(),
        review::<k8s_openapi::api::authentication::v1::TokenReview>(),
        review::<k8s_openapi::api::authentication::v1::SelfSubjectReview>(),
        review::<k8s_openapi::api::authorization::v1::SubjectAccessReview>(),
        review::<k8s_openapi::api::authorization::v1::SelfSubjectAccessReview>(),
        review::<k8s_openapi::api::authorization::v1::SelfSubjectRulesReview>(),
        review::<k8s_openapi::api::authorization::v1::LocalSubjectAccessReview>(),
    ]
}

/// Every built-in kind as a manifest for `crds/`.
pub fn manifests() -> Result<Vec<Manifest>, serde_yaml::Error> {
    builtin_crds().iter().map(manifest).collect()
}

/// One CRD (any JSON-serializable form) as a manifest for `crds/`, named
/// `<group or "core">_<plural>.yaml`.
pub fn manifest(crd: &impl serde::Serialize) -> Result<Manifest, serde_yaml::Error> {
    let value =
        serde_json::to_value(crd).map_err(<serde_yaml::Error as serde::ser::Error>::custom)?;
    let group = value["spec"]["group"].as_str().unwrap_or_default();
    let plural = value["spec"]["names"]["plural"]
        .as_str()
        .unwrap_or_default();
    let group = if group.is_empty() { "core" } else { group };
    Ok(Manifest {
        file_name: format!("{group}_{plural}.yaml"),
        yaml: format!(
            "# Generated by `orq crdgen`; do not edit.\n{}",
            serde_yaml::to_string(&value)?
        ),
    })
}

fn crd<K>(how: Kind) -> Value
where
    K: k8s_openapi::Resource + k8s_openapi::ListableResource + JsonSchema,
    K::Scope: Scope,
{
    definition::<K>(how, Some(K::LIST_KIND))
}

/// `storage`'s CRD serving `other`'s version too (not stored: [`crate::convert`] converts).
fn also_served(mut storage: Value, other: Value) -> Value {
    let mut version = other["spec"]["versions"][0].clone();
    version["storage"] = json!(false);
    if let Some(versions) = storage["spec"]["versions"].as_array_mut() {
        versions.push(version);
    }
    storage
}

/// A review: only created, answered from the request and never stored (no list).
fn review<K>() -> Value
where
    K: k8s_openapi::Resource + JsonSchema,
    K::Scope: Scope,
{
    let mut crd = definition::<K>(kind(&[], &[]), None);
    crd["metadata"]["annotations"] = json!({ crate::registry::CREATE_ONLY: "true" });
    crd
}

/// What the server computes (the resource metrics): only read, never stored.
fn computed<K>() -> Value
where
    K: k8s_openapi::Resource + k8s_openapi::ListableResource + JsonSchema,
    K::Scope: Scope,
{
    let mut crd = crd::<K>(kind(NONE_NAMES, NONE_NAMES));
    crd["metadata"]["annotations"] = json!({ crate::registry::READ_ONLY: "true" });
    crd
}

const NONE_NAMES: &[&str] = &[];

fn definition<K>(how: Kind, list_kind: Option<&str>) -> Value
where
    K: k8s_openapi::Resource + JsonSchema,
    K::Scope: Scope,
{
    let mut schema = schema_of::<K>();
    annotate_patch_strategies(K::GROUP, K::KIND, &mut schema);
    let mut version = json!({
        "name": K::VERSION,
        "served": true,
        "storage": true,
        "schema": { "openAPIV3Schema": schema },
    });
    if how.status || how.scale {
        let mut subresources = json!({});
        if how.status {
            subresources["status"] = json!({});
        }
        if how.scale {
            subresources["scale"] = json!({
                "specReplicasPath": ".spec.replicas",
                "statusReplicasPath": ".status.replicas",
                "labelSelectorPath": ".spec.selector",
            });
        }
        version["subresources"] = subresources;
    }
    let mut names = json!({
        "kind": K::KIND,
        "plural": K::URL_PATH_SEGMENT,
        "singular": K::KIND.to_ascii_lowercase(),
    });
    if let Some(list_kind) = list_kind {
        names["listKind"] = json!(list_kind);
    }
    if !how.short_names.is_empty() {
        names["shortNames"] = json!(how.short_names);
    }
    if !how.categories.is_empty() {
        names["categories"] = json!(how.categories);
    }
    let name = if K::GROUP.is_empty() {
        K::URL_PATH_SEGMENT.to_owned()
    } else {
        format!("{}.{}", K::URL_PATH_SEGMENT, K::GROUP)
    };
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": { "name": name },
        "spec": {
            "group": K::GROUP,
            "names": names,
            "scope": <K::Scope as Scope>::SCOPE,
            "versions": [version],
        },
    })
}

/// The structural OpenAPI v3 schema of a kind `K`.
fn schema_of<K: JsonSchema>() -> Value {
    let mut schema = plain_schema_of::<K>();
    // A structural schema may not describe the root metadata beyond name/generateName.
    if let Some(metadata) = schema.pointer_mut("/properties/metadata") {
        *metadata = json!({ "type": "object" });
    }
    // Clients may leave metadata out (generateName needs it, but that is admission's call).
    if let Some(required) = schema.get_mut("required").and_then(Value::as_array_mut) {
        required.retain(|field| field != "metadata");
        if required.is_empty() {
            schema.as_object_mut().map(|root| root.remove("required"));
        }
    }
    schema
}

/// The OpenAPI v3 schema of any k8s-openapi type, through the same pipeline.
pub(crate) fn plain_schema_of<K: JsonSchema>() -> Value {
    let generator = SchemaSettings::openapi3()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .with_transform(AddNullable::default())
        .with_transform(StructuralSchemaRewriter)
        .with_transform(OptionalEnum)
        .with_transform(OptionalIntOrString)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<K>().to_value();
    if let Some(root) = schema.as_object_mut() {
        root.remove("title");
        root.remove("$schema");
    }
    fix_up(&mut schema);
    schema
}

/// Adds `x-kubernetes-patch-strategy` and `x-kubernetes-patch-merge-key` (which k8s-openapi
/// does not carry) from the strategic-merge table the server itself uses, so that clients
/// reading the OpenAPI documents (kubectl's 3-way apply) merge lists as upstream does.
fn annotate_patch_strategies(group: &str, kind: &str, schema: &mut Value) {
    let Some(strategies) = crate::smp::strategies(group, kind) else {
        return;
    };
    for (path, strategy, key) in strategies.entries() {
        let mut node = Some(&mut *schema);
        for segment in path.split('.') {
            let (name, item) = match segment.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (segment, false),
            };
            node = node
                .and_then(|n| n.get_mut("properties"))
                .and_then(|p| p.get_mut(name));
            if item {
                node = node.and_then(|n| n.get_mut("items"));
            }
        }
        // Paths under the root metadata have no schema here (it is only `type: object`).
        if let Some(Value::Object(field)) = node {
            field.insert("x-kubernetes-patch-strategy".into(), json!(strategy));
            if let Some(key) = key {
                field.insert("x-kubernetes-patch-merge-key".into(), json!(key));
            }
        }
    }
}

/// The post-processing every subschema needs (see the module docs).
fn fix_up(schema: &mut Value) {
    let Some(object) = schema.as_object_mut() else {
        return;
    };
    let description = object
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if object.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        // kube-core strips `type` from the anyOf branches; a structural schema wants them.
        object.insert(
            "anyOf".into(),
            json!([{ "type": "integer" }, { "type": "string" }]),
        );
        if description.starts_with("Quantity is a fixed-point representation") {
            object.insert("pattern".into(), json!(QUANTITY_PATTERN));
        }
    }
    if description.starts_with("FieldsV1 stores a set of fields")
        // managedFields[].fieldsV1: the field's description replaced the type's.
        || description.starts_with("FieldsV1 holds the first JSON version format")
        || description.starts_with("RawExtension is used to hold extensions")
        || description.starts_with("JSON represents any valid JSON value")
        // ControllerRevision.data: a RawExtension whose field description replaced the type's.
        || description == "Data is the serialized representation of the state."
    {
        object.insert("x-kubernetes-preserve-unknown-fields".into(), json!(true));
    }
    // The engine drops nulls from every object it is given (as Go's decoding does), so
    // `nullable` (added for every Option by schemars) would only mislead readers.
    // (The keyword, a boolean — not a property of that name: JSONSchemaProps has one.)
    if object.get("nullable").is_some_and(Value::is_boolean) {
        object.remove("nullable");
    }
    for value in object.values_mut() {
        match value {
            Value::Object(_) => fix_up(value),
            Value::Array(items) => items.iter_mut().for_each(fix_up),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::BUILTIN_MANIFESTS;

    /// The manifests in `crds/` (embedded by the registry) are what the generator writes today.
    #[test]
    fn crds_directory_is_current() {
        let generated = manifests().expect("manifests serialize");
        let mut names: Vec<&str> = generated.iter().map(|m| m.file_name.as_str()).collect();
        names.sort_unstable();
        let embedded: Vec<&str> = BUILTIN_MANIFESTS.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names, embedded,
            "the built-in kinds changed: run `orq crdgen --out crds` and update BUILTIN_MANIFESTS"
        );
        for manifest in &generated {
            let (_, text) = BUILTIN_MANIFESTS
                .iter()
                .find(|(name, _)| *name == manifest.file_name)
                .expect("listed");
            assert!(
                *text == manifest.yaml,
                "crds/{} is stale: run `orq crdgen --out crds`",
                manifest.file_name
            );
        }
    }

    #[test]
    fn schemas_are_structural_where_it_matters() {
        let crds = builtin_crds();
        let pods = crds
            .iter()
            .find(|c| c["spec"]["names"]["kind"] == "Pod")
            .expect("pods");
        let schema = &pods["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(
            schema["properties"]["metadata"],
            json!({ "type": "object" })
        );
        let port = schema
            .pointer("/properties/spec/properties/containers/items/properties/ports/items/properties/containerPort")
            .expect("containerPort");
        assert_eq!(port["type"], "integer");
        let cpu = schema
            .pointer("/properties/spec/properties/overhead/additionalProperties")
            .expect("overhead is a map of quantities");
        assert_eq!(cpu["pattern"], QUANTITY_PATTERN);
        assert_eq!(cpu["anyOf"][0]["type"], "integer");
        let containers = &schema["properties"]["spec"]["properties"]["containers"];
        assert_eq!(containers["x-kubernetes-patch-merge-key"], "name");
        assert_eq!(containers["x-kubernetes-patch-strategy"], "merge");
        assert!(
            !serde_json::to_string(schema)
                .expect("json")
                .contains("\"nullable\"")
        );
    }
}
