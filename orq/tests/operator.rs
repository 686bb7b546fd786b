//! A controller manager against a real `orq server` process that goes away: the manager
//! retries with backoff, reports not-ready on /readyz while the API server is gone, and
//! recovers — ready again, reconciling new objects — when it returns on the same data dir.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Server;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

async fn readyz(addr: std::net::SocketAddr) -> Option<u16> {
    orquestra_operator::testing::http_get(addr, "/readyz")
        .await
        .map(|(code, _)| code)
}

async fn until(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manager_is_not_ready_while_the_api_server_is_gone_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--insecure-http"]);
    let addr = server.addr;
    tokio::task::block_in_place(|| server.wait_ready());
    let client =
        Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();

    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut manager = Manager::new(client.clone());
    let cache = manager.cache::<ConfigMap>(watcher::Config::default());
    let controller = Controller::for_shared_stream(cache.subscribe().unwrap(), cache.store());
    manager.add(
        Runner::new("survivor", controller),
        |cm: Arc<ConfigMap>, seen: Arc<Mutex<Vec<String>>>| async move {
            seen.lock().unwrap().push(cm.name_any());
            Ok::<_, Never>(Action::await_change())
        },
        Arc::clone(&seen),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health = listener.local_addr().unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    until("ready", Duration::from_secs(20), async || {
        readyz(health).await == Some(200)
    })
    .await;

    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap()
    };
    cms.create(&PostParams::default(), &cm("before"))
        .await
        .unwrap();
    until("reconciled", Duration::from_secs(10), async || {
        seen.lock().unwrap().iter().any(|n| n == "before")
    })
    .await;

    // The API server dies (SIGKILL): the manager notices and says so.
    drop(server);
    until("not ready", Duration::from_secs(20), async || {
        readyz(health).await == Some(503)
    })
    .await;
    assert!(
        tokio::net::TcpStream::connect(health).await.is_ok(),
        "the manager itself is still up"
    );

    // It comes back on the same data dir and address: the manager recovers on its own.
    let server = Server::start_at(dir.path(), addr, &["--insecure-http"]);
    tokio::task::block_in_place(|| server.wait_ready());
    until("ready again", Duration::from_secs(45), async || {
        readyz(health).await == Some(200)
    })
    .await;
    cms.create(&PostParams::default(), &cm("after"))
        .await
        .unwrap();
    until("reconciling again", Duration::from_secs(10), async || {
        seen.lock().unwrap().iter().any(|n| n == "after")
    })
    .await;
    drop(server);
}

/// The operator process, killed (by its PID) when dropped.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orq_operator_runs_the_staticsite_controller_when_named() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use static_site::StaticSite;

    let dir = tempfile::tempdir().unwrap();
    // No control loops in the server: the operator process runs the one named.
    let server = Server::start(
        dir.path(),
        &["--insecure-http", "--no-agent", "--controllers="],
    );
    let addr = server.addr;
    tokio::task::block_in_place(|| server.wait_ready());
    let client =
        Client::try_from(kube::Config::new(format!("http://{addr}").parse().unwrap())).unwrap();

    // The CRD as the repository generates it (`orq crdgen`).
    let manifest = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../crds/example.orquestra.dev_staticsites.yaml"
    ))
    .unwrap();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&manifest).unwrap();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.create(&PostParams::default(), &crd).await.unwrap();

    let listen = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let _operator = Proc(
        std::process::Command::new(env!("CARGO_BIN_EXE_orq"))
            .arg("operator")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(["--listen", &listen.to_string(), "--controllers=staticsite"])
            .spawn()
            .unwrap(),
    );
    until(
        "the operator is ready",
        Duration::from_secs(30),
        async || readyz(listen).await == Some(200),
    )
    .await;

    let sites: Api<StaticSite> = Api::namespaced(client.clone(), "default");
    let site: StaticSite = serde_json::from_value(serde_json::json!({
        "apiVersion": "example.orquestra.dev/v1", "kind": "StaticSite",
        "metadata": {"name": "hello"},
        "spec": {"content": "<h1>hello</h1>", "replicas": 2},
    }))
    .unwrap();
    sites.create(&PostParams::default(), &site).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    until(
        "the StaticSite's ConfigMap, Deployment and Service",
        Duration::from_secs(30),
        async || {
            let replicas = deployments
                .get_opt("hello")
                .await
                .unwrap()
                .and_then(|d| d.spec?.replicas);
            replicas == Some(2)
                && services.get_opt("hello").await.unwrap().is_some()
                && cms
                    .list(&Default::default())
                    .await
                    .unwrap()
                    .items
                    .iter()
                    .any(|cm| {
                        cm.owner_references()
                            .iter()
                            .any(|o| o.kind == "StaticSite" && o.name == "hello")
                    })
        },
    )
    .await;
    // The built-in loops did not run: nothing made a ReplicaSet of the Deployment.
    let replicasets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(client, "default");
    assert!(
        replicasets
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
}
