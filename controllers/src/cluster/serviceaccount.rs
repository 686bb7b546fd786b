//! The service account controller (`serviceaccount`), as kube-controller-manager's: every
//! namespace has a ServiceAccount named `default` — the one pods run as when they name none.
//! A deleted one is made again; a terminating namespace gets none (the API server would
//! refuse it).

use orquestra_operator::rbac::{READ, Rule};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
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
        resources: &["serviceaccounts"],
        verbs: &["get", "list", "watch", "create"],
    },
];

/// The ServiceAccount every namespace gets.
pub const DEFAULT: &str = "default";
/// The field manager of the controller's writes.
pub const MANAGER: &str = "service-account-controller";

/// What can go wrong making a namespace's `default` ServiceAccount (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ServiceAccountError {
    /// Creating it failed.
    #[error("creating serviceaccount {namespace}/default: {source}")]
    Create {
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
    accounts: Store<ServiceAccount>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountController")
            .finish_non_exhaustive()
    }
}

/// Adds the service account controller to `manager`: it reconciles namespaces, and the
/// namespace of a `default` ServiceAccount that changes or goes.
pub fn add(manager: &mut Manager) {
    let namespaces = manager.cache::<Namespace>(watcher::Config::default());
    let accounts = manager.cache::<ServiceAccount>(watcher::Config::default());
    let namespace_of = |account: Arc<ServiceAccount>| {
        (account.name_any() == DEFAULT)
            .then(|| ObjectRef::<Namespace>::new(&account.namespace().unwrap_or_default()))
    };
    let runner = Runner::for_cache("serviceaccount", &namespaces)
        .and_then(|r| r.watches(&accounts, namespace_of))
        .and_then(|r| r.watches_deleted(&accounts, namespace_of))
        .expect("the caches were just created, before run");
    manager.add(
        runner,
        reconcile,
        Arc::new(Controller {
            client: manager.client(),
            accounts: accounts.store(),
        }),
    );
}

async fn reconcile(
    ns: Arc<Namespace>,
    ctx: Arc<Controller>,
) -> Result<Action, ServiceAccountError> {
    let terminating = ns.metadata.deletion_timestamp.is_some()
        || ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Terminating");
    let name = ns.name_any();
    if terminating
        || ctx
            .accounts
            .get(&ObjectRef::new(DEFAULT).within(&name))
            .is_some()
    {
        return Ok(Action::await_change());
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &name);
    let account = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some(DEFAULT.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    match accounts.create(&params, &account).await {
        Ok(_) => Ok(Action::await_change()),
        // Already there (the cache is behind), or the namespace is going away meanwhile.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 403 || s.code == 404 => {
            Ok(Action::await_change())
        }
        Err(source) => Err(ServiceAccountError::Create {
            namespace: name,
            source,
        }),
    }
}
