//! Control-plane benchmark (issue 6), one run, release build, everything in one process as
//! `orq server` runs it (API server over SQLite, controllers, simulated nodes):
//!
//! 1. Scheduler throughput: 10,000 pending pods, 1,000 simulated nodes; pods bound per
//!    second by the scheduler — side by side with the anchor measured in the same run, the
//!    same API server taking 10,000 bindings posted directly (64 at a time, no decisions):
//!    the ceiling any scheduler on this API server can reach.
//! 2. A 1,000-replica Deployment on 100 simulated nodes: seconds until all 1,000 pods are
//!    Running and available — beside the same API work done directly (create, bind and
//!    mark Running 1,000 pods, 64 at a time).
//! 3. The scheduler with its heavier features in play, 200 simulated nodes (pod sync on),
//!    each beside the bare run of the same size in the same process: 2,000 pods with
//!    required pod anti-affinity (20 groups, one pod of a group per node) against 2,000
//!    plain ones; 200 high-priority pods each preempting a low-priority one off a full
//!    node against 200 plain pods.
//!
//! `cargo bench -p orq --bench scheduling`

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_node_agent::simulated;
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

const CONCURRENCY: usize = 64;

fn pod(name: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"bench": "sched"}},
        "spec": {"containers": [{"name": "app", "image": "busybox",
                                 "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]},
    }))
    .unwrap()
}

async fn namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

/// Creates `count` pending pods in `ns`; returns pods created per second.
async fn create_pods(client: &Client, ns: &str, count: usize) -> f64 {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    futures::stream::iter(0..count)
        .map(|i| {
            let pods = pods.clone();
            async move {
                pods.create(&PostParams::default(), &pod(&format!("p{i}")))
                    .await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    count as f64 / started.elapsed().as_secs_f64()
}

async fn bind(pods: &Api<Pod>, name: &str, node: &str) {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    });
    pods.create_subresource::<serde_json::Value, serde_json::Value>(
        "binding",
        name,
        &PostParams::default(),
        &binding,
    )
    .await
    .unwrap();
}

/// Counts the pods in `ns` with a node, until `count`; returns when the last was seen.
async fn wait_bound(client: &Client, ns: &str, count: usize, timeout: Duration) -> Instant {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + timeout;
    loop {
        let list = pods
            .list_metadata(&ListParams::default().fields("spec.nodeName!="))
            .await
            .unwrap();
        if list.items.len() >= count {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} pods bound",
            list.items.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the scheduler's `scheduler_schedule_attempts_total{result="scheduled"}`
/// reaches `count`; returns when it did.
async fn wait_scheduled(
    registry: &prometheus::Registry,
    count: usize,
    timeout: Duration,
) -> Instant {
    let deadline = Instant::now() + timeout;
    loop {
        let scheduled: f64 = registry
            .gather()
            .iter()
            .filter(|f| f.name() == "scheduler_schedule_attempts_total")
            .flat_map(|f| f.get_metric())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "result" && l.value() == "scheduled")
            })
            .map(|m| m.get_counter().get_value())
            .sum();
        if scheduled >= count as f64 {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{scheduled} of {count} pods scheduled"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn scheduler_throughput() {
    const NODES: usize = 1_000;
    const PODS: usize = 10_000;
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    // The nodes register and become Ready, then go quiet (no heartbeats, no pod sync), so
    // the scheduler is all that runs.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let nodes = tokio::spawn(simulated::run(client.clone(), "node", NODES, async {
        let _ = stopped.await;
    }));
    let started = Instant::now();
    let all: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for name in simulated::node_names("node", NODES) {
        wait_for(&all, &name, Duration::from_secs(300), |n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .await
        .unwrap();
    }
    let _ = stop.send(());
    let _ = nodes.await;
    println!(
        "{NODES} simulated nodes registered and Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Anchor: bindings posted straight to the API server.
    namespace(&client, "anchor").await;
    let created = create_pods(&client, "anchor", PODS).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "anchor");
    let started = Instant::now();
    futures::stream::iter(0..PODS)
        .map(|i| {
            let pods = pods.clone();
            async move { bind(&pods, &format!("p{i}"), &format!("node-{}", i % NODES)).await }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let direct = PODS as f64 / started.elapsed().as_secs_f64();

    // The scheduler: started over 10,000 pending pods.
    namespace(&client, "sched").await;
    create_pods(&client, "sched", PODS).await;
    let registry = prometheus::Registry::new();
    let mut manager = Manager::with_registry(client.clone(), registry.clone());
    orquestra_controllers::add_selected(&mut manager, &["scheduler".into()], &Default::default())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = Instant::now();
    let (stop_manager, manager_stopped) = tokio::sync::oneshot::channel::<()>();
    let manager = tokio::spawn(manager.run_on(listener, async {
        let _ = manager_stopped.await;
    }));
    // The clock stops at the scheduler's 10,000th acknowledged binding, read from its own
    // counter: listing 10,000 pods every few milliseconds would load the API server it
    // measures. A list afterwards confirms every pod carries a node.
    let done = wait_scheduled(&registry, PODS, Duration::from_secs(600)).await;
    let scheduled = PODS as f64 / done.duration_since(started).as_secs_f64();
    wait_bound(&client, "sched", PODS, Duration::from_secs(10)).await;
    let _ = stop_manager.send(());
    let _ = manager.await;

    // Spread: pods per node.
    let mut per_node = std::collections::HashMap::<String, usize>::new();
    for p in pods_of(&client, "sched").await {
        *per_node
            .entry(p.spec.and_then(|s| s.node_name).unwrap_or_default())
            .or_default() += 1;
    }
    let (min, max) = (
        per_node.values().min().copied().unwrap_or(0),
        per_node.values().max().copied().unwrap_or(0),
    );
    println!("pods created directly:              {created:>8.0} pods/s");
    println!("bindings posted directly (anchor):  {direct:>8.0} pods/s");
    println!(
        "scheduler, {PODS} pods on {NODES} nodes: {scheduled:>8.0} pods/s  = {:.2}x the anchor (target >= 1,000 pods/s)",
        scheduled / direct
    );
    println!(
        "  spread: {min}..{max} pods per node over {} nodes",
        per_node.len()
    );
}

async fn pods_of(client: &Client, ns: &str) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.list(&ListParams::default()).await.unwrap().items
}

async fn deployment_to_running() {
    const NODES: usize = 100;
    const REPLICAS: usize = 1_000;
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    simulated::spawn_ready(client.clone(), "node", NODES, Duration::from_secs(120))
        .await
        .unwrap();

    // Anchor: the same API work, done directly — create, bind, mark Running.
    namespace(&client, "anchor").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "anchor");
    let started = Instant::now();
    futures::stream::iter(0..REPLICAS)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let name = format!("p{i}");
                let mut p = pod(&name);
                // Not bound through the scheduler, and not picked up by the simulated
                // nodes either: the anchor does their writes itself.
                p.spec.as_mut().unwrap().scheduler_name = Some("nobody".into());
                pods.create(&PostParams::default(), &p).await.unwrap();
                bind(&pods, &name, &format!("elsewhere-{}", i % NODES)).await;
                let status = json!({"status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True"}]}});
                pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
                    .await
                    .unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let direct = started.elapsed().as_secs_f64();

    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(
        &mut manager,
        &["scheduler".into(), "replicaset".into(), "deployment".into()],
        &Default::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    // Let the controllers' caches fill before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "default");
    let d: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "big"},
        "spec": {"replicas": REPLICAS, "selector": {"matchLabels": {"app": "big"}},
                 "template": {"metadata": {"labels": {"app": "big"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}},
    }))
    .unwrap();
    let started = Instant::now();
    deployments
        .create(&PostParams::default(), &d)
        .await
        .unwrap();
    wait_for(&deployments, "big", Duration::from_secs(600), |d| {
        d.status.as_ref().and_then(|s| s.available_replicas) == Some(REPLICAS as i32)
    })
    .await
    .unwrap();
    let took = started.elapsed().as_secs_f64();
    println!("create+bind+Running {REPLICAS} pods directly (anchor): {direct:>6.2} s");
    println!(
        "Deployment of {REPLICAS} replicas on {NODES} nodes to all Running: {took:>6.2} s  = {:.2}x the anchor (target <= 10 s)",
        took / direct
    );
}

/// Creates `count` pods made by `make` in `ns` (64 at a time) and waits until all are bound;
/// returns pods bound per second, from the first create.
async fn create_and_bind(
    client: &Client,
    ns: &str,
    count: usize,
    make: impl Fn(usize) -> Pod,
) -> f64 {
    namespace(client, ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    futures::stream::iter((0..count).map(make))
        .map(|p| {
            let pods = pods.clone();
            async move { pods.create(&PostParams::default(), &p).await }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let done = wait_bound(client, ns, count, Duration::from_secs(600)).await;
    count as f64 / done.duration_since(started).as_secs_f64()
}

/// A pod of `class` wanting one `example.com/slot`.
fn slot_pod(name: &str, class: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"priorityClassName": class,
                 "containers": [{"name": "app", "image": "busybox",
                                 "resources": {"requests": {"example.com/slot": "1"}}}]},
    }))
    .unwrap()
}

async fn scheduler_features() {
    const NODES: usize = 200;
    const PODS: usize = 2_000;
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    simulated::spawn_ready(client.clone(), "node", NODES, Duration::from_secs(120))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(&mut manager, &["scheduler".into()], &Default::default())
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    tokio::time::sleep(Duration::from_secs(1)).await;

    let bare = create_and_bind(&client, "bare", PODS, |i| pod(&format!("p{i}"))).await;
    let anti = create_and_bind(&client, "anti", PODS, |i| {
        let mut p = pod(&format!("p{i}"));
        let group = format!("g{}", i % 20);
        p.metadata.labels = Some([("group".to_owned(), group.clone())].into());
        p.spec.as_mut().unwrap().affinity = Some(
            serde_json::from_value(json!({"podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{
                    "labelSelector": {"matchLabels": {"group": group}},
                    "topologyKey": "kubernetes.io/hostname"}]}}))
            .unwrap(),
        );
        p
    })
    .await;
    println!("bare, {PODS} pods on {NODES} nodes:                 {bare:>8.0} pods/s");
    println!(
        "required anti-affinity, {PODS} pods on {NODES} nodes: {anti:>8.0} pods/s  = {:.2}x bare",
        anti / bare
    );

    // Preemption: every node gets one slot, filled by a low-priority pod; then as many
    // high-priority pods, each of which must evict one.
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    for name in simulated::node_names("node", NODES) {
        let status = json!({"status": {"capacity": {"example.com/slot": "1"},
            "allocatable": {"example.com/slot": "1"}}});
        nodes
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .unwrap();
    }
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(client.clone());
    for (name, value) in [("low", 1), ("high", 1000)] {
        let class =
            serde_json::from_value(json!({"metadata": {"name": name}, "value": value})).unwrap();
        classes
            .create(&PostParams::default(), &class)
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let bare_small = create_and_bind(&client, "bare-small", NODES, |i| pod(&format!("p{i}"))).await;
    let fill = create_and_bind(&client, "victims", NODES, |i| {
        slot_pod(&format!("v{i}"), "low")
    })
    .await;
    let preempting = create_and_bind(&client, "preemptors", NODES, |i| {
        slot_pod(&format!("h{i}"), "high")
    })
    .await;
    let left = pods_of(&client, "victims").await.len();
    println!("bare, {NODES} pods on {NODES} nodes:                  {bare_small:>8.0} pods/s");
    println!("{NODES} low-priority pods filling every node:          {fill:>8.0} pods/s");
    println!(
        "{NODES} high-priority pods, each preempting one:      {preempting:>8.0} pods/s  = {:.2}x bare ({left} victims left)",
        preempting / bare_small
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("== scheduler throughput ==");
        scheduler_throughput().await;
        println!("== 1,000-replica Deployment ==");
        deployment_to_running().await;
        println!("== scheduler with anti-affinity and preemption ==");
        scheduler_features().await;
    });
}
