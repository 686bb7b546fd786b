//! ServiceLB against the real API server in-process. Pool mode: one address for two
//! Services leaves the second pending with an `AllocationFailed` event naming the pool; a
//! restarted controller keeps the first's address and announcer; deleting the first gives
//! the second the address; a Service that stops being a LoadBalancer lets go of it. Node
//! mode: the Ready nodes' addresses, a node whose pod holds the port as a host port left
//! out (with an event naming the pod), and a second Service on the same port pending
//! (naming the first) until the first goes.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, Pod, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_controllers::services::servicelb::{self, ANNOUNCE_NODE, Pool};
use orquestra_operator::Manager;
use orquestra_operator::testing::TestApi;
use serde_json::json;

/// Runs ServiceLB with `pool` until the returned sender is dropped or fired.
async fn start(
    client: &Client,
    pool: Pool,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let mut manager = Manager::new(client.clone());
    servicelb::add(&mut manager, pool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        manager
            .run_on(listener, async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (stop, task)
}

async fn ready_node(client: &Client, name: &str, ip: &str) {
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

async fn load_balancer(services: &Api<Service>, name: &str) {
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "selector": {"app": name},
                 "ports": [{"port": 80, "targetPort": 8080}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
}

fn ingress(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .map(|i| {
            assert_eq!(i.ip_mode.as_deref(), Some("VIP"));
            i.ip.clone().unwrap()
        })
        .collect()
}

/// Waits until Service `name`'s ingress addresses are `want`.
async fn wait_ingress(services: &Api<Service>, name: &str, want: &[&str]) -> Service {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let svc = services.get(name).await.unwrap();
        if ingress(&svc) == want {
            return svc;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: want {want:?}, have {:?}",
            svc.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until Service `name`'s announcing node is `want`.
async fn wait_announcer(services: &Api<Service>, name: &str, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let svc = services.get(name).await.unwrap();
        let annotations = svc.metadata.annotations.unwrap_or_default();
        if annotations.get(ANNOUNCE_NODE).map(String::as_str) == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: want announcer {want:?}, have {annotations:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a Warning event about `name` with `reason` whose message contains `text`.
async fn wait_event(client: &Client, name: &str, reason: &str, text: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all = events.list(&ListParams::default()).await.unwrap().items;
        if all.iter().any(|e| {
            e.involved_object.name.as_deref() == Some(name)
                && e.reason.as_deref() == Some(reason)
                && e.type_.as_deref() == Some("Warning")
                && e.message.as_deref().is_some_and(|m| m.contains(text))
        }) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {reason} event about {name} containing {text:?}: {:?}",
            all.iter()
                .map(|e| (&e.involved_object.name, &e.reason, &e.message))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_address_waits_for_the_one_holding_it() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    ready_node(&client, "h0", "10.214.0.11").await;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let pool = || Pool::new(vec!["10.214.0.200/32".parse().unwrap()]);
    let (stop, task) = start(&client, pool()).await;
    load_balancer(&services, "first").await;
    wait_ingress(&services, "first", &["10.214.0.200"]).await;
    // The only Ready node announces it.
    wait_announcer(&services, "first", Some("h0")).await;
    load_balancer(&services, "second").await;
    wait_event(
        &client,
        "second",
        "AllocationFailed",
        "pool 10.214.0.200/32",
    )
    .await;
    assert!(ingress(&services.get("second").await.unwrap()).is_empty());

    // A restart keeps what is held.
    let _ = stop.send(());
    task.await.unwrap();
    let (_stop, _task) = start(&client, pool()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_ingress(&services, "first", &["10.214.0.200"]).await;
    assert!(ingress(&services.get("second").await.unwrap()).is_empty());

    // The holder goes: the waiting one gets the address.
    services
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_ingress(&services, "second", &["10.214.0.200"]).await;
    wait_announcer(&services, "second", Some("h0")).await;

    // No longer a LoadBalancer: address and announcer go.
    let patch = json!({"spec": {"type": "ClusterIP"}});
    services
        .patch("second", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    wait_ingress(&services, "second", &[]).await;
    wait_announcer(&services, "second", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_addresses_leave_out_host_ports_and_go_to_one_service_per_port() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    ready_node(&client, "h0", "10.214.0.11").await;
    ready_node(&client, "h1", "10.214.0.12").await;
    // A pod on h1 holds port 80 as a host port.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "holder"},
        "spec": {"nodeName": "h1", "containers": [{"name": "c", "image": "busybox",
                 "ports": [{"containerPort": 8080, "hostPort": 80}]}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let (_stop, _task) = start(&client, Pool::default()).await;
    load_balancer(&services, "first").await;
    wait_ingress(&services, "first", &["10.214.0.11"]).await;
    wait_event(&client, "first", "HostPortConflict", "default/holder").await;

    // The host port goes: h1 serves too.
    pods.delete("holder", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_ingress(&services, "first", &["10.214.0.11", "10.214.0.12"]).await;

    load_balancer(&services, "second").await;
    wait_event(&client, "second", "AllocationFailed", "default/first").await;
    assert!(ingress(&services.get("second").await.unwrap()).is_empty());
    services
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_ingress(&services, "second", &["10.214.0.11", "10.214.0.12"]).await;
}
