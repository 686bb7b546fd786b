//! The server's resource types, from its discovery documents, and resolving what a user
//! typed (`po`, `pods`, `pod`, `Pod`, `deployments.apps`, `deploy.v1.apps`) to one of them.
//!
//! kube-rs's `Discovery` drops the short and singular names, so this reads the same
//! `APIResourceList`s through the client's own discovery calls and keeps them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::APIResource;
use kube::core::{ApiResource, DynamicObject};

/// One resource type the server serves, at its group's preferred version.
#[derive(Debug, Clone)]
pub struct Resource {
    /// Group, version, kind and plural, as kube-rs's dynamic APIs take them.
    pub api: ApiResource,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// The singular name (lowercase kind when the server sends none).
    pub singular: String,
    /// Short names (`po`, `deploy`).
    pub short_names: Vec<String>,
}

impl Resource {
    /// How kubectl names the type in `kind/name` lines: `configmap`, `deployment.apps`.
    pub fn type_name(&self) -> String {
        let kind = self.api.kind.to_lowercase();
        if self.api.group.is_empty() {
            kind
        } else {
            format!("{kind}.{}", self.api.group)
        }
    }

    /// The path of the collection, in `namespace` when namespaced.
    pub fn url_path(&self, namespace: Option<&str>) -> String {
        use kube::Resource as _;
        let namespace = if self.namespaced { namespace } else { None };
        DynamicObject::url_path(&self.api, namespace)
    }

    /// A dynamic API for the type: namespaced in `namespace` (or across all namespaces when
    /// it is `None`), or cluster-wide for cluster-scoped types.
    pub fn api(&self, client: &kube::Client, namespace: Option<&str>) -> kube::Api<DynamicObject> {
        match namespace {
            Some(ns) if self.namespaced => {
                kube::Api::namespaced_with(client.clone(), ns, &self.api)
            }
            _ => kube::Api::all_with(client.clone(), &self.api),
        }
    }
}

/// Every resource type the server serves.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    all: Vec<Resource>,
    /// Every served version of every kind (for manifests that name a non-preferred one).
    versions: Vec<Resource>,
}

fn resource(r: &APIResource, group: &str, version: &str) -> Option<Resource> {
    if r.name.contains('/') {
        return None; // a subresource
    }
    let api_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(Resource {
        api: ApiResource {
            group: group.to_owned(),
            version: version.to_owned(),
            api_version,
            kind: r.kind.clone(),
            plural: r.name.clone(),
        },
        namespaced: r.namespaced,
        singular: if r.singular_name.is_empty() {
            r.kind.to_lowercase()
        } else {
            r.singular_name.clone()
        },
        short_names: r.short_names.clone().unwrap_or_default(),
    })
}

impl Resources {
    /// Reads the discovery documents: `/api/v1` and every group's versions.
    pub async fn discover(client: &kube::Client) -> Result<Resources, kube::Error> {
        let mut found = Resources::default();
        let core = client.list_core_api_versions().await?;
        for version in &core.versions {
            let list = client.list_core_api_resources(version).await?;
            found.add(&list.resources, "", version, version == "v1");
        }
        let groups = client.list_api_groups().await?;
        for group in &groups.groups {
            let preferred = group
                .preferred_version
                .as_ref()
                .map(|v| v.version.clone())
                .or_else(|| group.versions.first().map(|v| v.version.clone()));
            for version in &group.versions {
                let list = client
                    .list_api_group_resources(&version.group_version)
                    .await?;
                let is_preferred = Some(&version.version) == preferred.as_ref();
                found.add(&list.resources, &group.name, &version.version, is_preferred);
            }
        }
        Ok(found)
    }

    fn add(&mut self, list: &[APIResource], group: &str, version: &str, preferred: bool) {
        for r in list.iter().filter_map(|r| resource(r, group, version)) {
            if preferred {
                self.all.push(r.clone());
            }
            self.versions.push(r);
        }
    }

    /// Resolves what a user typed, as kubectl does: a plural, singular, short or kind name,
    /// optionally qualified by group (`deployments.apps`) or version and group
    /// (`deployments.v1.apps`), case-insensitively.
    pub fn resolve(&self, typed: &str) -> Result<Resource, UnknownKind> {
        let typed_lower = typed.to_lowercase();
        let matches = |r: &Resource, name: &str| {
            r.api.plural == name
                || r.singular == name
                || r.api.kind.to_lowercase() == name
                || r.short_names.iter().any(|s| s == name)
        };
        // Unqualified first: core types before groups, as kubectl prefers.
        let unqualified = self
            .all
            .iter()
            .filter(|r| matches(r, &typed_lower))
            .min_by_key(|r| (!r.api.group.is_empty(), r.api.group.clone()));
        if let Some(found) = unqualified {
            return Ok(found.clone());
        }
        if let Some((name, rest)) = typed_lower.split_once('.') {
            // `name.version.group`, then `name.group`.
            if let Some((version, group)) = rest.split_once('.')
                && let Some(found) = self
                    .versions
                    .iter()
                    .find(|r| r.api.version == version && r.api.group == group && matches(r, name))
            {
                return Ok(found.clone());
            }
            if let Some(found) = self
                .all
                .iter()
                .find(|r| r.api.group == rest && matches(r, name))
            {
                return Ok(found.clone());
            }
        }
        Err(UnknownKind(typed.to_owned()))
    }

    /// The type a manifest's `apiVersion` and `kind` name (any served version).
    pub fn for_manifest(&self, api_version: &str, kind: &str) -> Option<Resource> {
        self.versions
            .iter()
            .find(|r| r.api.api_version == api_version && r.api.kind == kind)
            .cloned()
    }
}

/// A KIND the server doesn't serve.
#[derive(Debug, thiserror::Error)]
#[error("the server doesn't have a resource type \"{0}\"")]
pub struct UnknownKind(pub String);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn api_resource(name: &str, kind: &str, short: &[&str]) -> APIResource {
        APIResource {
            name: name.into(),
            kind: kind.into(),
            namespaced: true,
            short_names: Some(short.iter().map(|s| s.to_string()).collect()),
            verbs: vec!["get".into()],
            ..Default::default()
        }
    }

    fn resources() -> Resources {
        let mut r = Resources::default();
        r.add(
            &[
                api_resource("pods", "Pod", &["po"]),
                api_resource("pods/log", "Pod", &[]),
                api_resource("events", "Event", &["ev"]),
            ],
            "",
            "v1",
            true,
        );
        r.add(
            &[api_resource("deployments", "Deployment", &["deploy"])],
            "apps",
            "v1",
            true,
        );
        r.add(
            &[api_resource("events", "Event", &[])],
            "events.k8s.io",
            "v1",
            true,
        );
        r
    }

    #[test]
    fn resolves_every_name_form() {
        let r = resources();
        for typed in ["po", "pod", "pods", "Pod", "PODS"] {
            assert_eq!(r.resolve(typed).unwrap().api.plural, "pods", "{typed}");
        }
        for typed in [
            "deploy",
            "deployment",
            "deployments.apps",
            "deployments.v1.apps",
        ] {
            assert_eq!(r.resolve(typed).unwrap().api.kind, "Deployment", "{typed}");
        }
        // The core group wins an unqualified name, a group picks the other.
        assert_eq!(r.resolve("events").unwrap().api.group, "");
        assert_eq!(
            r.resolve("events.events.k8s.io").unwrap().api.group,
            "events.k8s.io"
        );
        assert_eq!(r.resolve("deploy").unwrap().type_name(), "deployment.apps");
        assert_eq!(
            r.resolve("foo").unwrap_err().to_string(),
            "the server doesn't have a resource type \"foo\""
        );
        assert!(r.resolve("log").is_err(), "subresources are not kinds");
    }
}
