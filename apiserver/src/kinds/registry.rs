//! What the engine serves: one [`ResourceDef`] per resource, CRD-style, and the
//! [`Registry`] that finds them by group/version/plural, kind or short name.
//!
//! Every resource goes through the same code path; a definition says how it is named, scoped
//! and shown, and carries its compiled structural schema. Built-in kinds and users' custom
//! resources come from the same place, a CustomResourceDefinition: the built-in ones are the
//! manifests under the repository's `crds/` (written by `orq crdgen`, see [`crate::crdgen`]),
//! embedded in the binary and read once per process.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock, RwLock};

use crate::schema::Structural;

/// Where a scalable resource keeps what its `/scale` subresource shows: JSON paths in the
/// CRD style (`.spec.replicas`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScalePaths {
    /// Desired replicas.
    pub spec_replicas: String,
    /// Observed replicas.
    pub status_replicas: String,
    /// The label selector (a LabelSelector object or a string).
    pub label_selector: Option<String>,
}

/// How one resource is named, scoped and served.
#[derive(Clone, Debug, PartialEq)]
pub struct ResourceDef {
    /// API group; empty for the core group.
    pub group: String,
    /// Version within the group.
    pub version: String,
    /// `Kind` of its objects.
    pub kind: String,
    /// Lower-case plural: the URL segment.
    pub plural: String,
    /// Lower-case singular.
    pub singular: String,
    /// Short names for kubectl (`po`, `deploy`, …).
    pub short_names: Vec<String>,
    /// Categories (`all`).
    pub categories: Vec<String>,
    /// Namespaced, or cluster-scoped.
    pub namespaced: bool,
    /// Has a `/status` subresource.
    pub status: bool,
    /// The `/scale` subresource, if any: where replicas and the selector live.
    pub scale: Option<ScalePaths>,
    /// A custom resource's `additionalPrinterColumns` (server-side table columns).
    pub printer_columns: Vec<serde_json::Value>,
    /// The compiled `openAPIV3Schema`: pruning, defaults, validation. None only for a CRD
    /// version without a schema (`apiextensions.k8s.io/v1` requires one).
    pub schema: Option<Arc<Structural>>,
    /// Where the schema as written (with its descriptions) is found, for the OpenAPI
    /// documents; kept out of memory for the large built-in schemas.
    pub openapi: SchemaSource,
    /// A custom resource whose schema has defaults: objects read from the store get them
    /// (they may predate the defaults), as kube-apiserver defaults custom resources on read.
    pub defaults_on_read: bool,
    /// The version objects are stored in ([`crate::convert`]): a kind served in several
    /// versions has one storage version; reads and writes through the others convert.
    pub storage: bool,
    /// Only `create` is served, and nothing is stored: the reviews (TokenReview,
    /// SubjectAccessReview, …) answered from the request. Marked in a built-in manifest by
    /// the annotation [`CREATE_ONLY`].
    pub create_only: bool,
    /// Only `get` and `list` are served, from what the server computes rather than from the
    /// store: the resource metrics (`metrics.k8s.io`, [`crate::metrics`]). Marked in a
    /// built-in manifest by the annotation [`READ_ONLY`].
    pub read_only: bool,
    /// The field labels a field selector may name beyond `metadata.name` and
    /// `metadata.namespace`: a custom resource's `selectableFields` (`spec.color` for the
    /// JSONPath `.spec.color`); anything else is refused as kube-apiserver refuses it. `None`
    /// for the built-in kinds, whose selectors may name any field.
    pub selectable_fields: Option<Vec<String>>,
    /// A custom resource whose CRD converts between versions by webhook (`spec.conversion`
    /// with `strategy: Webhook`): the webhook's `clientConfig` and `conversionReviewVersions`.
    /// `None` converts by relabelling.
    pub conversion: Option<Arc<serde_json::Value>>,
}

/// The annotation of a built-in manifest whose kind is only created, never stored.
pub const CREATE_ONLY: &str = "orquestra.dev/create-only";
/// The annotation of a built-in manifest whose kind is only read, computed by the server.
pub const READ_ONLY: &str = "orquestra.dev/read-only";

/// Where a resource's schema as written lives.
#[derive(Clone, Debug, PartialEq)]
pub enum SchemaSource {
    /// No schema.
    None,
    /// The embedded manifest text of a built-in kind (parsed when a document is asked for).
    Builtin(&'static str),
    /// A custom resource's `openAPIV3Schema`.
    Custom(Arc<serde_json::Value>),
}

impl SchemaSource {
    /// The `openAPIV3Schema` of `version`, as written.
    pub fn load(&self, version: &str) -> Option<serde_json::Value> {
        match self {
            SchemaSource::None => None,
            SchemaSource::Custom(schema) => Some(schema.as_ref().clone()),
            SchemaSource::Builtin(text) => {
                let crd: serde_json::Value = serde_yaml::from_str(text).ok()?;
                crd["spec"]["versions"]
                    .as_array()?
                    .iter()
                    .find(|v| v["name"] == version)?
                    .pointer("/schema/openAPIV3Schema")
                    .cloned()
            }
        }
    }
}

impl ResourceDef {
    /// Whether objects read from the store are served exactly as stored (no conversion, no
    /// defaults to fill in): the fast paths that pass stored JSON through.
    pub fn reads_as_stored(&self) -> bool {
        // A custom resource's objects may be stored in an earlier storage version.
        self.storage && !self.defaults_on_read && !matches!(self.openapi, SchemaSource::Custom(_))
    }

    /// `group/version`, or `version` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The store key prefix of all its objects: `/registry/<group>/<plural>/`.
    pub fn key_prefix(&self) -> String {
        let group = match crate::convert::stored_in(&self.group, &self.plural) {
            Some((group, _)) => group,
            None => &self.group,
        };
        let group = if group.is_empty() { "core" } else { group };
        format!("/registry/{group}/{}/", self.plural)
    }

    /// The store key of one object.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}{ns}/{name}", self.key_prefix()),
            _ => format!("{}{name}", self.key_prefix()),
        }
    }
}

/// `(file, text)` of one manifest under `crds/`.
macro_rules! builtin {
    ($file:literal) => {
        ($file, include_str!(concat!("../../../crds/", $file)))
    };
}

/// The built-in kinds' manifests (`crds/`, written by `orq crdgen`): file name and text.
pub const BUILTIN_MANIFESTS: &[(&str, &str)] = &[
    builtin!("admissionregistration.k8s.io_mutatingadmissionpolicies.yaml"),
    builtin!("admissionregistration.k8s.io_mutatingadmissionpolicybindings.yaml"),
    builtin!("admissionregistration.k8s.io_mutatingwebhookconfigurations.yaml"),
    builtin!("admissionregistration.k8s.io_validatingadmissionpolicies.yaml"),
    builtin!("admissionregistration.k8s.io_validatingadmissionpolicybindings.yaml"),
    builtin!("admissionregistration.k8s.io_validatingwebhookconfigurations.yaml"),
    builtin!("apiextensions.k8s.io_customresourcedefinitions.yaml"),
    builtin!("apiregistration.k8s.io_apiservices.yaml"),
    builtin!("apps_controllerrevisions.yaml"),
    builtin!("apps_daemonsets.yaml"),
    builtin!("apps_deployments.yaml"),
    builtin!("apps_replicasets.yaml"),
    builtin!("apps_statefulsets.yaml"),
    builtin!("authentication.k8s.io_selfsubjectreviews.yaml"),
    builtin!("authentication.k8s.io_tokenreviews.yaml"),
    builtin!("authorization.k8s.io_localsubjectaccessreviews.yaml"),
    builtin!("authorization.k8s.io_selfsubjectaccessreviews.yaml"),
    builtin!("authorization.k8s.io_selfsubjectrulesreviews.yaml"),
    builtin!("authorization.k8s.io_subjectaccessreviews.yaml"),
    builtin!("autoscaling_horizontalpodautoscalers.yaml"),
    builtin!("batch_cronjobs.yaml"),
    builtin!("batch_jobs.yaml"),
    builtin!("certificates.k8s.io_certificatesigningrequests.yaml"),
    builtin!("coordination.k8s.io_leases.yaml"),
    builtin!("core_configmaps.yaml"),
    builtin!("core_endpoints.yaml"),
    builtin!("core_events.yaml"),
    builtin!("core_limitranges.yaml"),
    builtin!("core_namespaces.yaml"),
    builtin!("core_nodes.yaml"),
    builtin!("core_persistentvolumeclaims.yaml"),
    builtin!("core_persistentvolumes.yaml"),
    builtin!("core_pods.yaml"),
    builtin!("core_podtemplates.yaml"),
    builtin!("core_replicationcontrollers.yaml"),
    builtin!("core_resourcequotas.yaml"),
    builtin!("core_secrets.yaml"),
    builtin!("core_serviceaccounts.yaml"),
    builtin!("core_services.yaml"),
    builtin!("discovery.k8s.io_endpointslices.yaml"),
    builtin!("events.k8s.io_events.yaml"),
    builtin!("flowcontrol.apiserver.k8s.io_flowschemas.yaml"),
    builtin!("flowcontrol.apiserver.k8s.io_prioritylevelconfigurations.yaml"),
    builtin!("metrics.k8s.io_nodes.yaml"),
    builtin!("metrics.k8s.io_pods.yaml"),
    builtin!("networking.k8s.io_ingressclasses.yaml"),
    builtin!("networking.k8s.io_ingresses.yaml"),
    builtin!("networking.k8s.io_ipaddresses.yaml"),
    builtin!("networking.k8s.io_networkpolicies.yaml"),
    builtin!("networking.k8s.io_servicecidrs.yaml"),
    builtin!("node.k8s.io_runtimeclasses.yaml"),
    builtin!("policy_poddisruptionbudgets.yaml"),
    builtin!("rbac.authorization.k8s.io_clusterrolebindings.yaml"),
    builtin!("rbac.authorization.k8s.io_clusterroles.yaml"),
    builtin!("rbac.authorization.k8s.io_rolebindings.yaml"),
    builtin!("rbac.authorization.k8s.io_roles.yaml"),
    builtin!("resource.k8s.io_deviceclasses.yaml"),
    builtin!("resource.k8s.io_resourceclaims.yaml"),
    builtin!("resource.k8s.io_resourceclaimtemplates.yaml"),
    builtin!("resource.k8s.io_resourceslices.yaml"),
    builtin!("scheduling.k8s.io_priorityclasses.yaml"),
    builtin!("storage.k8s.io_csidrivers.yaml"),
    builtin!("storage.k8s.io_csinodes.yaml"),
    builtin!("storage.k8s.io_csistoragecapacities.yaml"),
    builtin!("storage.k8s.io_storageclasses.yaml"),
    builtin!("storage.k8s.io_volumeattachments.yaml"),
    builtin!("storage.k8s.io_volumeattributesclasses.yaml"),
];

/// The built-in kinds served at boot, parsed once per process from [`BUILTIN_MANIFESTS`].
pub fn builtin_resources() -> Vec<ResourceDef> {
    static PARSED: LazyLock<Vec<ResourceDef>> = LazyLock::new(|| {
        BUILTIN_MANIFESTS
            .iter()
            .flat_map(|(file, text)| {
                // A parse failure is a build defect, caught by the crdgen staleness test.
                let crd: serde_json::Value = serde_yaml::from_str(text).unwrap_or_else(|error| {
                    tracing::error!(file, %error, "embedded CRD manifest does not parse");
                    serde_json::Value::Null
                });
                from_crd(&crd).into_iter().map(|def| ResourceDef {
                    openapi: SchemaSource::Builtin(text),
                    selectable_fields: None,
                    conversion: None,
                    // Kept in another group's storage version: converted both ways.
                    storage: def.storage
                        && crate::convert::stored_in(&def.group, &def.plural).is_none(),
                    ..def
                })
            })
            .collect()
    });
    PARSED.clone()
}

/// The resources a CustomResourceDefinition object defines: one per served version.
pub fn from_crd(crd: &serde_json::Value) -> Vec<ResourceDef> {
    let spec = &crd["spec"];
    let names = &spec["names"];
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let kind = text(&names["kind"]);
    let plural = text(&names["plural"]);
    let annotated = |key: &str| {
        crd.pointer(&format!("/metadata/annotations/{}", key.replace('/', "~1")))
            .is_some_and(|v| v == "true")
    };
    let (create_only, read_only) = (annotated(CREATE_ONLY), annotated(READ_ONLY));
    let singular = match names["singular"].as_str() {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => kind.to_ascii_lowercase(),
    };
    let conversion = (spec
        .pointer("/conversion/strategy")
        .and_then(|s| s.as_str())
        == Some("Webhook"))
    .then(|| {
        Arc::new(
            spec.pointer("/conversion/webhook")
                .cloned()
                .unwrap_or_default(),
        )
    });
    spec["versions"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter(|v| v["served"].as_bool().unwrap_or(true))
        .map(|v| {
            let schema = v
                .pointer("/schema/openAPIV3Schema")
                .map(|schema| Arc::new(Structural::compile(schema)));
            (v, schema)
        })
        .map(|(v, schema)| ResourceDef {
            group: text(&spec["group"]),
            version: text(&v["name"]),
            kind: kind.clone(),
            plural: plural.clone(),
            singular: singular.clone(),
            short_names: list(&names["shortNames"]),
            categories: list(&names["categories"]),
            namespaced: spec["scope"].as_str() != Some("Cluster"),
            status: v.pointer("/subresources/status").is_some(),
            scale: v.pointer("/subresources/scale").map(|scale| ScalePaths {
                spec_replicas: text(&scale["specReplicasPath"]),
                status_replicas: text(&scale["statusReplicasPath"]),
                label_selector: scale["labelSelectorPath"].as_str().map(str::to_owned),
            }),
            printer_columns: v["additionalPrinterColumns"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
            defaults_on_read: schema.as_deref().is_some_and(crate::schema::has_defaults),
            schema,
            openapi: match v.pointer("/schema/openAPIV3Schema") {
                Some(schema) => SchemaSource::Custom(Arc::new(schema.clone())),
                None => SchemaSource::None,
            },
            storage: v["storage"].as_bool().unwrap_or(true),
            create_only,
            read_only,
            selectable_fields: Some(
                v["selectableFields"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|f| f["jsonPath"].as_str())
                    .map(|path| path.trim_start_matches('.').to_owned())
                    .collect(),
            ),
            conversion: conversion.clone(),
        })
        .collect()
}

/// Group → version → plural → definition.
type Table = BTreeMap<String, BTreeMap<String, BTreeMap<String, Arc<ResourceDef>>>>;

/// The resources the server currently serves. Cheap to read; custom resources will be
/// added and removed at runtime.
#[derive(Debug, Default)]
pub struct Registry {
    table: RwLock<Table>,
}

impl Registry {
    /// A registry holding `defs`.
    pub fn new(defs: impl IntoIterator<Item = ResourceDef>) -> Registry {
        let registry = Registry::default();
        for def in defs {
            registry.add(def);
        }
        registry
    }

    /// Adds (or replaces) a definition.
    pub fn add(&self, def: ResourceDef) {
        if let Ok(mut table) = self.table.write() {
            table
                .entry(def.group.clone())
                .or_default()
                .entry(def.version.clone())
                .or_default()
                .insert(def.plural.clone(), Arc::new(def));
        }
    }

    /// Removes every version of `group/plural`.
    pub fn remove(&self, group: &str, plural: &str) {
        if let Ok(mut table) = self.table.write() {
            if let Some(versions) = table.get_mut(group) {
                for resources in versions.values_mut() {
                    resources.remove(plural);
                }
                versions.retain(|_, resources| !resources.is_empty());
            }
            table.retain(|_, versions| !versions.is_empty());
        }
    }

    /// The definition of `group/version/plural`.
    pub fn get(&self, group: &str, version: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        let table = self.table.read().ok()?;
        table.get(group)?.get(version)?.get(plural).cloned()
    }

    /// Every group with its versions, core group (`""`) included; each group's versions
    /// in Kubernetes' priority order, the preferred one first.
    pub fn groups(&self) -> Vec<(String, Vec<String>)> {
        let Ok(table) = self.table.read() else {
            return Vec::new();
        };
        table
            .iter()
            .map(|(group, versions)| {
                let mut versions: Vec<String> = versions.keys().cloned().collect();
                versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
                (group.clone(), versions)
            })
            .collect()
    }

    /// The definition of `group/plural` in its storage version.
    pub fn storage_version(&self, group: &str, plural: &str) -> Option<Arc<ResourceDef>> {
        let table = self.table.read().ok()?;
        table
            .get(group)?
            .values()
            .filter_map(|resources| resources.get(plural))
            .find(|def| def.storage)
            .cloned()
    }

    /// Whether this server serves `group/version` itself (not an APIService's server).
    pub fn serves(&self, group: &str, version: &str) -> bool {
        self.table
            .read()
            .is_ok_and(|table| table.get(group).is_some_and(|v| v.contains_key(version)))
    }

    /// The resources of one group version, by plural.
    pub fn resources(&self, group: &str, version: &str) -> Option<Vec<Arc<ResourceDef>>> {
        let table = self.table.read().ok()?;
        Some(table.get(group)?.get(version)?.values().cloned().collect())
    }
}

/// How Kubernetes ranks API versions: GA over beta over alpha, then the higher major, then
/// the higher minor (`v2` > `v1` > `v1beta2` > `v1beta1` > `v1alpha1`); anything else last.
pub fn version_priority(version: &str) -> (u8, u32, u32) {
    let Some(rest) = version.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let Ok(major) = rest[..digits].parse::<u32>() else {
        return (0, 0, 0);
    };
    let (stability, minor) = match &rest[digits..] {
        "" => (3, 0),
        tail => match (tail.strip_prefix("beta"), tail.strip_prefix("alpha")) {
            (Some(n), _) => (2, n.parse().unwrap_or(0)),
            (_, Some(n)) => (1, n.parse().unwrap_or(0)),
            _ => return (0, 0, 0),
        },
    };
    (stability, major, minor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_named_and_scoped_like_kubernetes() {
        let registry = Registry::new(builtin_resources());
        let pods = registry.get("", "v1", "pods").unwrap();
        assert_eq!((pods.kind.as_str(), pods.namespaced), ("Pod", true));
        assert_eq!(
            pods.key(Some("default"), "web"),
            "/registry/core/pods/default/web"
        );
        let nodes = registry.get("", "v1", "nodes").unwrap();
        assert!(!nodes.namespaced);
        assert_eq!(nodes.key(None, "n1"), "/registry/core/nodes/n1");
        let deploy = registry.get("apps", "v1", "deployments").unwrap();
        assert_eq!(deploy.api_version(), "apps/v1");
        assert!(deploy.scale.is_some() && deploy.status);
        let events = registry.get("events.k8s.io", "v1", "events").unwrap();
        assert_eq!(events.key(Some("ns"), "e"), "/registry/core/events/ns/e");
        assert!(!events.storage);
        let crds = registry
            .get("apiextensions.k8s.io", "v1", "customresourcedefinitions")
            .unwrap();
        assert!(!crds.namespaced);
        assert!(registry.get("", "v1", "nope").is_none());
    }

    #[test]
    fn versions_rank_as_kubernetes_ranks_them() {
        let mut versions = vec!["v1alpha1", "v1", "v1beta2", "v2", "v1beta1", "foo", "v10"];
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(
            versions,
            ["v10", "v2", "v1", "v1beta2", "v1beta1", "v1alpha1", "foo"]
        );
    }
}
