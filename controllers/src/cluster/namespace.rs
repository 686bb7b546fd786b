//! The namespace controller, as kube-controller-manager's: empties a namespace that is being
//! deleted, then takes its `kubernetes` finalizer off through the `finalize` subresource —
//! after which the API server removes it.
//!
//! Every namespaced resource discovery finds (custom resources included) is listed in the
//! namespace and each object deleted (Background) — pods first: nothing else is deleted while
//! a pod remains (kube's OrderedNamespaceDeletion), so a pod's volumes, secrets and service
//! account outlive it. Objects that take time to go — pods
//! stopping on their nodes, objects with finalizers — are waited for by looking again every
//! few seconds; the namespace's status conditions say what is left
//! (`NamespaceContentRemaining`: `Some resources are remaining: pods. has 2 resource
//! instances`), as kubectl users know them. New objects cannot appear meanwhile: the API
//! server refuses creation in a terminating namespace.

use orquestra_operator::rbac::Rule;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams, PropagationPolicy,
};
use kube::discovery::{Discovery, Scope, verbs};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::{Value, json};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["namespaces"],
        verbs: &["get", "list", "watch", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["namespaces/status"],
        verbs: &["patch"],
    },
    // A terminating namespace's contents, of every kind discovery finds.
    Rule {
        api_groups: &["*"],
        resources: &["*"],
        verbs: &["get", "list", "delete", "deletecollection"],
    },
];

/// The finalizer in `spec.finalizers` this controller owns.
pub const FINALIZER: &str = "kubernetes";
/// The field manager of the controller's status writes.
pub const MANAGER: &str = "namespace-controller";
/// How soon a namespace whose content is still going is looked at again.
pub const RECHECK: Duration = Duration::from_secs(2);

/// What can go wrong emptying one namespace (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    /// A request failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Some content could not be listed or deleted.
    #[error("deleting the content of namespace {namespace}: {failures}")]
    Content {
        /// The namespace.
        namespace: String,
        /// What failed, per resource.
        failures: String,
    },
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NamespaceController")
            .finish_non_exhaustive()
    }
}

/// Adds the namespace controller to `manager`.
pub fn add(manager: &mut Manager) {
    let namespaces = manager.cache::<Namespace>(watcher::Config::default());
    let runner = Runner::for_cache("namespace", &namespaces)
        .expect("the cache was just created, before run");
    manager.add(
        runner,
        reconcile,
        Arc::new(Controller {
            client: manager.client(),
        }),
    );
}

/// What one pass over a namespace's content found.
#[derive(Debug, Default)]
struct Content {
    /// `resource.group` → objects still there.
    remaining: BTreeMap<String, usize>,
    /// Finalizer → objects still carrying it.
    finalizers: BTreeMap<String, usize>,
    /// Failures to list or delete, per resource.
    failures: Vec<String>,
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Controller>) -> Result<Action, NamespaceError> {
    let finalizers = ns
        .spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default();
    if ns.metadata.deletion_timestamp.is_none() || !finalizers.iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    let name = ns.name_any();
    let discovery = match crate::discovery::discover(&ctx.client).await {
        Ok(discovery) => discovery,
        Err(source) => {
            let message = format!("Discovery failed for some groups: {source}");
            let conditions = conditions(None, Some(&message));
            write_conditions(&ctx.client, &ns, conditions).await?;
            return Err(NamespaceError::Api {
                action: format!("discovering the resources of namespace {name}"),
                source,
            });
        }
    };
    let content = delete_content(&ctx.client, &name, &discovery).await;
    let resource_version =
        write_conditions(&ctx.client, &ns, conditions(Some(&content), None)).await?;
    if !content.failures.is_empty() {
        return Err(NamespaceError::Content {
            namespace: name,
            failures: content.failures.join("; "),
        });
    }
    if !content.remaining.is_empty() {
        return Ok(Action::requeue(RECHECK));
    }
    // Empty: take our finalizer off (with the version just written as the precondition).
    let mut body = (*ns).clone();
    body.metadata.resource_version = resource_version.or(body.metadata.resource_version);
    body.metadata.managed_fields = None;
    if let Some(spec) = body.spec.as_mut() {
        spec.finalizers = Some(finalizers.into_iter().filter(|f| f != FINALIZER).collect());
    }
    let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
    match namespaces
        .replace_subresource::<Namespace>("finalize", &name, &PostParams::default(), &body)
        .await
    {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(Action::await_change()),
        Err(source) => Err(NamespaceError::Api {
            action: format!("finalizing namespace {name}"),
            source,
        }),
    }
}

/// Deletes every object in namespace `ns` (Background), and counts what is still there.
async fn delete_content(client: &Client, ns: &str, discovery: &Discovery) -> Content {
    let mut content = Content::default();
    let mut resources: Vec<_> = discovery
        .groups()
        .flat_map(|group| group.recommended_resources())
        .filter(|(_, caps)| {
            caps.scope == Scope::Namespaced
                && caps.supports_operation(verbs::LIST)
                && caps.supports_operation(verbs::DELETE)
        })
        .collect();
    // Pods first.
    let is_pods = |r: &kube::discovery::ApiResource| r.group.is_empty() && r.plural == "pods";
    resources.sort_by_key(|(r, _)| !is_pods(r));
    let params = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    for (resource, _) in resources {
        if !is_pods(&resource) && content.remaining.contains_key("pods.") {
            break; // the rest waits for the pods to be gone
        }
        let label = format!("{}.{}", resource.plural, resource.group);
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &resource);
        let listed = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(error) => {
                content.failures.push(format!("listing {label}: {error}"));
                continue;
            }
        };
        if listed.is_empty() {
            continue;
        }
        for object in listed
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
        {
            match api.delete(&object.name_any(), &params).await {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(error) => content
                    .failures
                    .push(format!("deleting {label} {}: {error}", object.name_any())),
            }
        }
        // What the deletes left: objects with finalizers, pods stopping gracefully.
        let left = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(error) => {
                content.failures.push(format!("listing {label}: {error}"));
                continue;
            }
        };
        if left.is_empty() {
            continue;
        }
        content.remaining.insert(label, left.len());
        for finalizer in left.iter().flat_map(|o| o.finalizers()) {
            *content.finalizers.entry(finalizer.clone()).or_default() += 1;
        }
    }
    content
}

/// The namespace's deletion conditions, as kube-controller-manager words them: from what
/// the content pass found, or from a discovery failure.
fn conditions(content: Option<&Content>, discovery_failure: Option<&str>) -> Vec<Value> {
    let condition = |type_: &str, failing: bool, reason: &str, message: String| {
        json!({
            "type": type_,
            "status": if failing { "True" } else { "False" },
            "reason": reason,
            "message": message,
        })
    };
    let mut out = vec![match discovery_failure {
        Some(message) => condition(
            "NamespaceDeletionDiscoveryFailure",
            true,
            "DiscoveryFailed",
            message.to_owned(),
        ),
        None => condition(
            "NamespaceDeletionDiscoveryFailure",
            false,
            "ResourcesDiscovered",
            "All resources successfully discovered".into(),
        ),
    }];
    out.push(condition(
        "NamespaceDeletionGroupVersionParsingFailure",
        false,
        "ParsedGroupVersions",
        "All legacy kube types successfully parsed".into(),
    ));
    let Some(content) = content else {
        return out;
    };
    out.push(if content.failures.is_empty() {
        condition(
            "NamespaceDeletionContentFailure",
            false,
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization".into(),
        )
    } else {
        condition(
            "NamespaceDeletionContentFailure",
            true,
            "ContentDeletionFailed",
            format!(
                "Failed to delete all resource types, {} remaining: {}",
                content.failures.len(),
                content.failures.join(", ")
            ),
        )
    });
    out.push(if content.remaining.is_empty() {
        condition(
            "NamespaceContentRemaining",
            false,
            "ContentRemoved",
            "All content successfully removed".into(),
        )
    } else {
        let remaining: Vec<String> = content
            .remaining
            .iter()
            .map(|(resource, n)| format!("{resource} has {n} resource instances"))
            .collect();
        condition(
            "NamespaceContentRemaining",
            true,
            "SomeResourcesRemain",
            format!("Some resources are remaining: {}", remaining.join(", ")),
        )
    });
    out.push(if content.finalizers.is_empty() {
        condition(
            "NamespaceFinalizersRemaining",
            false,
            "ContentHasNoFinalizers",
            "All content-preserving finalizers finished".into(),
        )
    } else {
        let remaining: Vec<String> = content
            .finalizers
            .iter()
            .map(|(finalizer, n)| format!("{finalizer} in {n} resource instances"))
            .collect();
        condition(
            "NamespaceFinalizersRemaining",
            true,
            "SomeFinalizersRemain",
            format!(
                "Some content in the namespace has finalizers remaining: {}",
                remaining.join(", ")
            ),
        )
    });
    out
}

/// Writes `wanted` as the namespace's conditions unless they already say the same (a
/// condition keeps its lastTransitionTime while its status stays). Returns the namespace's
/// new resourceVersion when it wrote.
async fn write_conditions(
    client: &Client,
    ns: &Namespace,
    mut wanted: Vec<Value>,
) -> Result<Option<String>, NamespaceError> {
    let current: Vec<Value> = ns
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| {
            c.iter()
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect()
        })
        .unwrap_or_default();
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    for condition in &mut wanted {
        let previous = current.iter().find(|c| c["type"] == condition["type"]);
        condition["lastTransitionTime"] = match previous {
            Some(p) if p["status"] == condition["status"] => p["lastTransitionTime"].clone(),
            _ => json!(now),
        };
    }
    let unchanged = wanted.len() == current.len()
        && wanted.iter().all(|w| {
            current.iter().any(|c| {
                ["type", "status", "reason", "message"]
                    .iter()
                    .all(|k| c[*k] == w[*k])
            })
        });
    if unchanged {
        return Ok(None);
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let written = namespaces
        .patch_status(
            &ns.name_any(),
            &PatchParams {
                field_manager: Some(MANAGER.into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"status": {"conditions": wanted}})),
        )
        .await
        .map_err(|source| NamespaceError::Api {
            action: format!("updating the conditions of namespace {}", ns.name_any()),
            source,
        })?;
    Ok(written.metadata.resource_version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_say_what_remains_as_kubernetes_does() {
        let mut content = Content::default();
        content.remaining.insert("pods.".into(), 2);
        content.remaining.insert("widgets.example.com".into(), 1);
        content.finalizers.insert("example.com/hold".into(), 1);
        let all = conditions(Some(&content), None);
        let find = |t: &str| all.iter().find(|c| c["type"] == t).unwrap().clone();
        let remaining = find("NamespaceContentRemaining");
        assert_eq!(remaining["status"], "True");
        assert_eq!(
            remaining["message"],
            "Some resources are remaining: pods. has 2 resource instances, \
             widgets.example.com has 1 resource instances"
        );
        assert_eq!(
            find("NamespaceFinalizersRemaining")["message"],
            "Some content in the namespace has finalizers remaining: example.com/hold in 1 \
             resource instances"
        );
        assert_eq!(find("NamespaceDeletionContentFailure")["status"], "False");
        let done = conditions(Some(&Content::default()), None);
        assert!(done.iter().all(|c| c["status"] == "False"));
        assert_eq!(done.len(), 5);
    }
}
