//! The StaticSite controller against the real API server in-process (the framework's test
//! harness): children created and owned, status conditions, events, updates, the schema's
//! Invalid error and CEL rule, the controller's validating webhook called by the API server,
//! and deletion through the finalizer.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for, wait_gone};
use serde_json::json;
use static_site::{FINALIZER, StaticSite};

const WAIT: Duration = Duration::from_secs(10);

async fn start() -> TestApi {
    let api = TestApi::start().await.unwrap();
    api.apply_crd(static_site::crd()).await.unwrap();
    let mut manager = Manager::new(api.client());
    static_site::controller(&mut manager).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    api
}

fn site(name: &str, content: &str, replicas: i64) -> StaticSite {
    serde_json::from_value(json!({
        "apiVersion": "example.orquestra.dev/v1", "kind": "StaticSite",
        "metadata": {"name": name},
        "spec": {"content": content, "replicas": replicas},
    }))
    .unwrap()
}

#[tokio::test]
async fn a_site_gets_its_children_status_and_events_and_goes_with_them() {
    let api = start().await;
    let client = api.client();
    let sites: Api<StaticSite> = Api::namespaced(client.clone(), "default");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");

    sites
        .create(&PostParams::default(), &site("home", "<h1>hi</h1>", 2))
        .await
        .unwrap();

    // Children, owned by the site.
    let page = wait_for(&cms, "home-content", WAIT, |_| true)
        .await
        .unwrap();
    assert_eq!(page.data.unwrap()["index.html"], "<h1>hi</h1>");
    let deployment = wait_for(&deployments, "home", WAIT, |_| true)
        .await
        .unwrap();
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), owner.controller),
        ("StaticSite", "home", Some(true))
    );
    wait_for(&services, "home", WAIT, |_| true).await.unwrap();

    // The finalizer and the Ready condition (no Deployment controller runs here, so it is
    // Progressing), for the generation observed.
    let observed = wait_for(&sites, "home", WAIT, |s| {
        s.status
            .as_ref()
            .is_some_and(|st| !st.conditions.is_empty())
    })
    .await
    .unwrap();
    assert!(
        observed
            .metadata
            .finalizers
            .as_ref()
            .unwrap()
            .iter()
            .any(|f| f == FINALIZER)
    );
    let ready = &observed.status.as_ref().unwrap().conditions[0];
    assert_eq!(
        (
            ready.type_.as_str(),
            ready.status.as_str(),
            ready.reason.as_str()
        ),
        ("Ready", "False", "Progressing")
    );
    assert_eq!(ready.observed_generation, Some(1));

    // The event the controller published.
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let list = events.list(&ListParams::default()).await.unwrap();
        if list.items.iter().any(|e| {
            e.reason.as_deref() == Some("Reconciled")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("home")
        }) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "a Reconciled event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // An update reaches the children, and the condition follows the generation.
    sites
        .patch(
            "home",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"content": "<h1>bye</h1>"}})),
        )
        .await
        .unwrap();
    wait_for(&cms, "home-content", WAIT, |cm| {
        cm.data
            .as_ref()
            .is_some_and(|d| d["index.html"] == "<h1>bye</h1>")
    })
    .await
    .unwrap();
    wait_for(&sites, "home", WAIT, |s| {
        s.status
            .as_ref()
            .is_some_and(|st| st.conditions[0].observed_generation == Some(2))
    })
    .await
    .unwrap();

    // Delete: the finalizer removes the children first.
    sites
        .delete("home", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&sites, "home", WAIT).await.unwrap();
    assert!(cms.get_opt("home-content").await.unwrap().is_none());
    assert!(deployments.get_opt("home").await.unwrap().is_none());
    assert!(services.get_opt("home").await.unwrap().is_none());
}

#[tokio::test]
async fn the_crd_schema_refuses_bad_sites() {
    let api = start().await;
    let sites: Api<StaticSite> = Api::namespaced(api.client(), "default");
    let err = sites
        .create(&PostParams::default(), &site("huge", "x", 101))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!((status.reason.as_str(), status.code), ("Invalid", 422));
    assert!(
        status.message.contains("spec.replicas"),
        "{}",
        status.message
    );
    assert!(sites.get_opt("huge").await.unwrap().is_none());
}

async fn refused(sites: &Api<StaticSite>, site: &StaticSite) -> kube::core::Status {
    let err = sites
        .create(&PostParams::default(), site)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error, got {err:?}")
    };
    *status
}

#[tokio::test]
async fn the_webhook_and_the_cel_rule_refuse_bad_sites_through_the_api_server() {
    let api = start().await;
    let _webhooks = api
        .serve_webhooks("static-site", static_site::webhooks())
        .await
        .unwrap();
    let sites: Api<StaticSite> = Api::namespaced(api.client(), "default");

    // The webhook: an unpinned image is refused, naming the webhook and why.
    let mut unpinned = site("unpinned", "<h1>hi</h1>", 1);
    unpinned.spec.image = "nginx:latest".into();
    let status = refused(&sites, &unpinned).await;
    assert_eq!(status.code, 403, "{status:?}");
    assert!(
        status.message.contains(
            "admission webhook \"vstaticsite.staticsites.example.orquestra.dev\" denied the request: \
             spec.image \"nginx:latest\" is not pinned"
        ),
        "{}",
        status.message
    );
    unpinned.spec.image = "nginx".into();
    assert_eq!(refused(&sites, &unpinned).await.code, 403);

    // The CEL rule, checked by the API server itself: replicas without content.
    let status = refused(&sites, &site("empty", "", 2)).await;
    assert_eq!((status.reason.as_str(), status.code), ("Invalid", 422));
    assert!(
        status
            .message
            .contains("a site with replicas needs content"),
        "{}",
        status.message
    );

    // What both accept is stored; an update is checked too.
    let pp = PostParams::default();
    sites.create(&pp, &site("parked", "", 0)).await.unwrap();
    let mut pinned = site("pinned", "<h1>hi</h1>", 1);
    pinned.spec.image = "registry.example/nginx@sha256:0123".into();
    sites.create(&pp, &pinned).await.unwrap();
    let err = sites
        .patch(
            "pinned",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"image": "nginx:latest"}})),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, kube::Error::Api(s) if s.code == 403));
}

/// `crds/` holds the CRD this crate's types generate (`orq crdgen --out crds` rewrites it).
#[test]
fn the_crd_in_crds_is_current() {
    let manifest = orquestra_apiserver::crdgen::manifest(&static_site::crd()).unwrap();
    let path = format!(
        "{}/../../crds/{}",
        env!("CARGO_MANIFEST_DIR"),
        manifest.file_name
    );
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == manifest.yaml,
        "{path} is stale: run `cargo run -p orq -- crdgen --out crds`"
    );
}
