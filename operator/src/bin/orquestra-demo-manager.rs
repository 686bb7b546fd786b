//! A small leader-elected manager, for the framework's end-to-end tests (and as the shortest
//! complete example): it reconciles ConfigMaps by annotating them with its identity.
//!
//! `orquestra-demo-manager <api-url> <identity> <metrics-addr> <lease-seconds>`

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use orquestra_operator::{LeaderElection, Manager, Runner};

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Error(#[from] kube::Error);

struct Context {
    client: Client,
    identity: String,
}

async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &cm.namespace().unwrap_or_default());
    let patch =
        serde_json::json!({"metadata": {"annotations": {"demo/reconciled-by": ctx.identity}}});
    api.patch(
        &cm.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(Action::await_change())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, url, identity, metrics, lease] = args.as_slice() else {
        return Err(
            "usage: orquestra-demo-manager <api-url> <identity> <metrics-addr> <lease-seconds>"
                .into(),
        );
    };
    let client = Client::try_from(kube::Config::new(url.parse()?))?;
    let lease: u64 = lease.parse()?;
    let mut manager = Manager::new(client.clone());
    let mut election = LeaderElection::new("default", "demo-manager", identity.clone());
    election.lease_duration = Duration::from_secs(lease);
    election.renew_deadline = Duration::from_secs(lease * 2 / 3);
    election.retry_period = Duration::from_millis(500);
    manager.leader_election(election)?;
    let configmaps = manager.cache::<ConfigMap>(watcher::Config::default());
    let controller = Controller::for_shared_stream(
        configmaps.subscribe().ok_or("subscribe before run")?,
        configmaps.store(),
    );
    manager.add(
        Runner::new("demo", controller),
        reconcile,
        Arc::new(Context {
            client,
            identity: identity.clone(),
        }),
    );
    manager
        .run(metrics.parse()?, std::future::pending())
        .await?;
    Ok(())
}
