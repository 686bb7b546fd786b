//! Discovery documents: `/version`, `/api`, `/apis`, and one resource list per group
//! version — the legacy (plain JSON) format kube-rs reads — and the aggregated form
//! (`apidiscovery.k8s.io/v2` `APIGroupDiscoveryList`: every group, version and resource in one
//! document at `/api` and `/apis`) that kubectl ≥ 1.30 and client-go ask for first.

use serde_json::{Value, json};

use crate::registry::{Registry, ResourceDef};

/// The Kubernetes version Orquestra speaks; kubectl warns beyond one minor version of skew.
pub const KUBERNETES_MINOR: u32 = 36;

/// `/version`.
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": KUBERNETES_MINOR.to_string(),
        "gitVersion": format!("v1.{KUBERNETES_MINOR}.0+orquestra-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "",
        "goVersion": "",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if cfg!(target_arch = "x86_64") { "amd64" } else { std::env::consts::ARCH }),
    })
}

/// `/api`.
pub fn core_versions() -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [],
    })
}

fn group_entry(group: &str, versions: &[String]) -> Value {
    let versions: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "name": group,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or_default(),
    })
}

/// `/apis`.
pub fn groups(registry: &Registry) -> Value {
    let groups: Vec<Value> = registry
        .groups()
        .iter()
        .filter(|(group, _)| !group.is_empty())
        .map(|(group, versions)| group_entry(group, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`.
pub fn group(registry: &Registry, name: &str) -> Option<Value> {
    let (group, versions) = registry.groups().into_iter().find(|(g, _)| g == name)?;
    let mut entry = group_entry(&group, &versions);
    entry["kind"] = json!("APIGroup");
    entry["apiVersion"] = json!("v1");
    Some(entry)
}

const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];

/// The verbs a resource serves: everything, only `create` for the reviews that are
/// answered and never stored, or only `get` and `list` for what the server computes.
fn verbs(def: &ResourceDef) -> &'static [&'static str] {
    if def.create_only {
        &["create"]
    } else if def.read_only {
        &["get", "list"]
    } else {
        VERBS
    }
}

fn resource_entries(def: &ResourceDef) -> Vec<Value> {
    let mut entries = vec![json!({
        "name": def.plural,
        "singularName": def.singular,
        "namespaced": def.namespaced,
        "kind": def.kind,
        "verbs": verbs(def),
        "shortNames": def.short_names,
        "categories": def.categories,
    })];
    if def.status {
        entries.push(json!({
            "name": format!("{}/status", def.plural),
            "singularName": "",
            "namespaced": def.namespaced,
            "kind": def.kind,
            "verbs": ["get", "patch", "update"],
        }));
    }
    if def.scale.is_some() {
        entries.push(json!({
            "name": format!("{}/scale", def.plural),
            "singularName": "",
            "namespaced": def.namespaced,
            "group": "autoscaling",
            "version": "v1",
            "kind": "Scale",
            "verbs": ["get", "patch", "update"],
        }));
    }
    // Subresources of one kind, as kube-apiserver lists them.
    if def.group.is_empty() && def.plural == "namespaces" {
        entries.push(json!({
            "name": "namespaces/finalize",
            "singularName": "",
            "namespaced": false,
            "kind": "Namespace",
            "verbs": ["update"],
        }));
    }
    if crate::engine::is_csr(def) {
        entries.push(json!({
            "name": "certificatesigningrequests/approval",
            "singularName": "",
            "namespaced": false,
            "kind": "CertificateSigningRequest",
            "verbs": ["get", "patch", "update"],
        }));
    }
    if def.group.is_empty() && def.plural == "serviceaccounts" {
        entries.push(json!({
            "name": "serviceaccounts/token",
            "singularName": "",
            "namespaced": true,
            "group": "authentication.k8s.io",
            "version": "v1",
            "kind": "TokenRequest",
            "verbs": ["create"],
        }));
    }
    if def.group.is_empty() && def.plural == "pods" {
        entries.push(json!({
            "name": "pods/binding",
            "singularName": "",
            "namespaced": true,
            "kind": "Binding",
            "verbs": ["create"],
        }));
        entries.push(json!({
            "name": "pods/eviction",
            "singularName": "",
            "namespaced": true,
            "group": "policy",
            "version": "v1",
            "kind": "Eviction",
            "verbs": ["create"],
        }));
        entries.push(json!({
            "name": "pods/log",
            "singularName": "",
            "namespaced": true,
            "kind": "Pod",
            "verbs": ["get"],
        }));
        for sub in ["ephemeralcontainers", "resize"] {
            entries.push(json!({
                "name": format!("pods/{sub}"),
                "singularName": "",
                "namespaced": true,
                "kind": "Pod",
                "verbs": ["get", "patch", "update"],
            }));
        }
        for (sub, kind) in [
            ("attach", "PodAttachOptions"),
            ("exec", "PodExecOptions"),
            ("portforward", "PodPortForwardOptions"),
        ] {
            entries.push(json!({
                "name": format!("pods/{sub}"),
                "singularName": "",
                "namespaced": true,
                "kind": kind,
                "verbs": ["create", "get"],
            }));
        }
    }
    // The proxies, with the verbs kube-apiserver lists for them.
    if def.group.is_empty() && matches!(def.plural.as_str(), "pods" | "services" | "nodes") {
        entries.push(json!({
            "name": format!("{}/proxy", def.plural),
            "singularName": "",
            "namespaced": def.namespaced,
            "kind": format!("{}ProxyOptions", def.kind),
            "verbs": ["create", "delete", "get", "patch", "update"],
        }));
    }
    entries
}

/// `/api/v1` or `/apis/<group>/<version>`.
pub fn resources(registry: &Registry, group: &str, version: &str) -> Option<Value> {
    let defs = registry.resources(group, version)?;
    let group_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let resources: Vec<Value> = defs.iter().flat_map(|d| resource_entries(d)).collect();
    Some(json!({
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": group_version,
        "resources": resources,
    }))
}

/// The media type of aggregated discovery, as a client asks for it (`Accept`) and as the
/// response says it is (`Content-Type`).
pub const AGGREGATED: &str = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList";

/// Which aggregated discovery version an `Accept` header asks for (`v2` or `v2beta1`), if any.
pub fn aggregated_version(accept: &str) -> Option<&'static str> {
    accept.split(',').find_map(|part| {
        let part = part.replace(' ', "");
        if !part.contains("g=apidiscovery.k8s.io") || !part.contains("as=APIGroupDiscoveryList") {
            return None;
        }
        if part.contains("v=v2beta1") {
            Some("v2beta1")
        } else if part.contains("v=v2") {
            Some("v2")
        } else {
            None
        }
    })
}

/// One resource in aggregated form, with its subresources.
fn aggregated_resource(def: &ResourceDef) -> Value {
    let entries = resource_entries(def);
    let response_kind = |entry: &Value| {
        json!({
            "group": entry.get("group").cloned().unwrap_or_else(|| json!(def.group)),
            "version": entry.get("version").cloned().unwrap_or_else(|| json!(def.version)),
            "kind": entry["kind"],
        })
    };
    let subresources: Vec<Value> = entries[1..]
        .iter()
        .map(|entry| {
            let name = entry["name"].as_str().unwrap_or_default();
            json!({
                "subresource": name.split_once('/').map_or(name, |(_, sub)| sub),
                "responseKind": response_kind(entry),
                "verbs": entry["verbs"],
            })
        })
        .collect();
    let mut resource = json!({
        "resource": def.plural,
        "responseKind": response_kind(&entries[0]),
        "scope": if def.namespaced { "Namespaced" } else { "Cluster" },
        "singularResource": def.singular,
        "verbs": verbs(def),
    });
    if !def.short_names.is_empty() {
        resource["shortNames"] = json!(def.short_names);
    }
    if !def.categories.is_empty() {
        resource["categories"] = json!(def.categories);
    }
    if !subresources.is_empty() {
        resource["subresources"] = json!(subresources);
    }
    resource
}

/// The aggregated document of the core group (`legacy`, at `/api`) or of every other group
/// (at `/apis`), in `apidiscovery.k8s.io/<version>`. Versions are listed newest first, as
/// kube-apiserver orders them (the preferred one leads).
pub fn aggregated(registry: &Registry, legacy: bool, version: &str) -> Value {
    let items: Vec<Value> = registry
        .groups()
        .into_iter()
        .filter(|(group, _)| group.is_empty() == legacy)
        .map(|(group, versions)| {
            let versions: Vec<Value> = versions
                .iter()
                .map(|v| {
                    let mut resources: Vec<Value> = registry
                        .resources(&group, v)
                        .unwrap_or_default()
                        .iter()
                        .map(|def| aggregated_resource(def))
                        .collect();
                    resources.sort_by(|a, b| a["resource"].as_str().cmp(&b["resource"].as_str()));
                    json!({"version": v, "resources": resources, "freshness": "Current"})
                })
                .collect();
            json!({"metadata": {"name": group}, "versions": versions})
        })
        .collect();
    json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": format!("apidiscovery.k8s.io/{version}"),
        "metadata": {},
        "items": items,
    })
}
