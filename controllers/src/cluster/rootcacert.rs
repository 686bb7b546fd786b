//! The root CA publisher (`root-ca-cert-publisher`), as kube-controller-manager's: every
//! namespace has a ConfigMap `kube-root-ca.crt` holding the cluster CA under `ca.crt`, which
//! pods (projected service account volumes) and charts mount to verify the API server. A
//! changed or deleted one is put back; a terminating namespace gets none.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["namespaces"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["configmaps"],
        verbs: &["get", "list", "watch", "create", "update"],
    },
];

/// The ConfigMap every namespace gets.
pub const NAME: &str = "kube-root-ca.crt";
/// Its key holding the CA bundle.
pub const KEY: &str = "ca.crt";
/// The field manager of the controller's writes.
pub const MANAGER: &str = "root-ca-cert-publisher";
const DESCRIPTION: &str = "Contains a CA bundle that can be used to verify the kube-apiserver \
    when using internal endpoints such as the internal service IP or kubernetes.default.svc. \
    No other usage is guaranteed across distributions of Kubernetes clusters.";

/// What can go wrong publishing the CA into a namespace (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum RootCaError {
    /// Creating or updating the ConfigMap failed.
    #[error("writing configmap {namespace}/{NAME}: {source}")]
    Write {
        /// The namespace.
        namespace: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    configmaps: Store<ConfigMap>,
    ca: String,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootCaPublisher").finish_non_exhaustive()
    }
}

/// Adds the publisher of `ca` (PEM) to `manager`: it reconciles namespaces, and the
/// namespace of a `kube-root-ca.crt` that changes or goes.
pub fn add(manager: &mut Manager, ca: String) {
    let namespaces = manager.cache::<Namespace>(watcher::Config::default());
    let configmaps = manager
        .cache::<ConfigMap>(watcher::Config::default().fields(&format!("metadata.name={NAME}")));
    let namespace_of = |cm: Arc<ConfigMap>| {
        Some(ObjectRef::<Namespace>::new(
            &cm.namespace().unwrap_or_default(),
        ))
    };
    let runner = Runner::for_cache(MANAGER, &namespaces)
        .and_then(|r| r.watches(&configmaps, namespace_of))
        .and_then(|r| r.watches_deleted(&configmaps, namespace_of))
        .expect("the caches were just created, before run");
    manager.add(
        runner,
        reconcile,
        Arc::new(Controller {
            client: manager.client(),
            configmaps: configmaps.store(),
            ca,
        }),
    );
}

fn wanted(ca: &str, mut cm: ConfigMap) -> ConfigMap {
    cm.metadata.name = Some(NAME.into());
    cm.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert("kubernetes.io/description".into(), DESCRIPTION.into());
    cm.data = Some(BTreeMap::from([(KEY.to_owned(), ca.to_owned())]));
    cm.binary_data = None;
    cm
}

async fn reconcile(ns: Arc<Namespace>, ctx: Arc<Controller>) -> Result<Action, RootCaError> {
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    if terminating {
        return Ok(Action::await_change());
    }
    let namespace = ns.name_any();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    let result = match ctx.configmaps.get(&ObjectRef::new(NAME).within(&namespace)) {
        None => api
            .create(&params, &wanted(&ctx.ca, ConfigMap::default()))
            .await
            .map(drop),
        Some(current) => {
            let fixed = wanted(&ctx.ca, (*current).clone());
            if fixed == *current {
                return Ok(Action::await_change());
            }
            api.replace(NAME, &params, &fixed).await.map(drop)
        }
    };
    match result {
        Ok(()) => Ok(Action::await_change()),
        // Already there or changed meanwhile (the cache is behind: the watch brings it back
        // here), or the namespace is going away.
        Err(kube::Error::Api(s)) if matches!(s.code, 409 | 403 | 404) => Ok(Action::await_change()),
        Err(source) => Err(RootCaError::Write { namespace, source }),
    }
}
