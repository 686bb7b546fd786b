//! The service account controller against the real API server in-process: every namespace —
//! those there from the start and new ones — gets a `default` ServiceAccount, and one that
//! is deleted comes back (a new object, with a new UID).

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_namespace_gets_a_default_service_account() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let mut manager = Manager::new(client.clone());
    let added = orquestra_controllers::add_selected(
        &mut manager,
        &["serviceaccount".to_owned()],
        &Default::default(),
    )
    .unwrap();
    assert_eq!(added, ["serviceaccount"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let timeout = Duration::from_secs(10);
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
        wait_for(&accounts, "default", timeout, |_| true)
            .await
            .unwrap();
    }

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "team"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "team");
    let first = wait_for(&accounts, "default", timeout, |_| true)
        .await
        .unwrap();

    // Deleted: made again, as a new object.
    accounts
        .delete("default", &DeleteParams::default())
        .await
        .unwrap();
    let again = wait_for(&accounts, "default", timeout, |sa| sa.uid() != first.uid())
        .await
        .unwrap();
    assert_ne!(again.uid(), first.uid());
    // Other ServiceAccounts are left as they are.
    let other: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "robot"}})).unwrap();
    accounts
        .create(&PostParams::default(), &other)
        .await
        .unwrap();
    accounts
        .delete("robot", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(accounts.get_opt("robot").await.unwrap().is_none());
}
