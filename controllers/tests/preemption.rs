//! Priority, preemption and pod placement against the real API server in-process and
//! simulated nodes: Priority admission; a high-priority pod preempting a low-priority one
//! (victim marked `DisruptionTarget` and deleted, preemptor nominated then bound);
//! `preemptionPolicy: Never`; a PodDisruptionBudget steering the choice of victim;
//! anti-affinity, topology spread and scheduling gates.
//!
//! Nodes are made "full" as the conformance specs do: an extended resource patched onto
//! their status, requested by the pods.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::json;

const SLOT: &str = "example.com/slot";

async fn start(nodes: usize) -> (TestApi, Client) {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(
        client.clone(),
        "sim",
        nodes,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::scheduler::add(&mut manager).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    (api, client)
}

/// Gives node `name` `count` slots of the extended resource.
async fn slots(client: &Client, name: &str, count: u32) {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({"status": {"capacity": {SLOT: count.to_string()},
        "allocatable": {SLOT: count.to_string()}}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

async fn class(client: &Client, name: &str, value: i32, extra: serde_json::Value) {
    let classes: Api<PriorityClass> = Api::all(client.clone());
    let mut class = json!({"metadata": {"name": name}, "value": value});
    if let Some(obj) = extra.as_object() {
        for (k, v) in obj {
            class[k] = v.clone();
        }
    }
    classes
        .create(
            &PostParams::default(),
            &serde_json::from_value(class).unwrap(),
        )
        .await
        .unwrap();
}

/// A pod of `class` taking `slots` slots, with `extra` merged into its spec.
fn pod(name: &str, class: &str, slots: u32, extra: serde_json::Value) -> Pod {
    let mut pod = json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "busybox",
            "resources": {"requests": {SLOT: slots.to_string()}}}]},
    });
    if !class.is_empty() {
        pod["spec"]["priorityClassName"] = json!(class);
    }
    if slots == 0 {
        pod["spec"]["containers"][0]["resources"] = json!({});
    }
    if let Some(obj) = extra.as_object() {
        for (k, v) in obj {
            pod["spec"][k] = v.clone();
        }
    }
    serde_json::from_value(pod).unwrap()
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

fn has_condition(pod: &Pod, type_: &str, reason: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == type_ && c.reason.as_deref() == Some(reason))
        })
}

async fn bound(pods: &Api<Pod>, name: &str) -> String {
    let pod = wait_for(pods, name, Duration::from_secs(20), |p| {
        node_of(p).is_some()
    })
    .await
    .unwrap();
    node_of(&pod).unwrap().to_owned()
}

async fn gone(pods: &Api<Pod>, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while pods.get_opt(name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "{name} still there");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn failed_scheduling(client: &Client, name: &str) -> String {
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .into_iter()
            .rev()
            .find(|e| {
                e.reason.as_deref() == Some("FailedScheduling")
                    && e.involved_object.name.as_deref() == Some(name)
            });
        if let Some(e) = found {
            return e.message.unwrap_or_default();
        }
        assert!(Instant::now() < deadline, "no FailedScheduling for {name}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_admission() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let classes: Api<PriorityClass> = Api::all(client.clone());
    assert_eq!(
        classes.get("system-node-critical").await.unwrap().value,
        Some(2_000_001_000)
    );
    assert_eq!(
        classes.get("system-cluster-critical").await.unwrap().value,
        Some(2_000_000_000)
    );
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // No class, no default: priority 0.
    let plain = pods
        .create(&PostParams::default(), &pod("plain", "", 0, json!({})))
        .await
        .unwrap();
    assert_eq!(plain.spec.as_ref().unwrap().priority, Some(0));

    // An unknown class: 403, kube's words.
    let refused = pods
        .create(&PostParams::default(), &pod("lost", "nope", 0, json!({})))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = refused else {
        panic!("{refused:?}")
    };
    assert_eq!(status.code, 403);
    assert_eq!(
        status.message,
        "pods \"lost\" is forbidden: no PriorityClass with name nope was found"
    );

    // The global default applies to pods naming no class; only one default may exist.
    class(
        &client,
        "everyday",
        7,
        json!({"globalDefault": true, "preemptionPolicy": "Never"}),
    )
    .await;
    let defaulted = pods
        .create(&PostParams::default(), &pod("defaulted", "", 0, json!({})))
        .await
        .unwrap();
    let spec = defaulted.spec.unwrap();
    assert_eq!(spec.priority, Some(7));
    assert_eq!(spec.priority_class_name.as_deref(), Some("everyday"));
    assert_eq!(spec.preemption_policy.as_deref(), Some("Never"));
    let second: PriorityClass = serde_json::from_value(
        json!({"metadata": {"name": "another"}, "value": 8, "globalDefault": true}),
    )
    .unwrap();
    assert!(
        classes
            .create(&PostParams::default(), &second)
            .await
            .is_err()
    );

    // A critical pod gets the system value.
    let critical = pods
        .create(
            &PostParams::default(),
            &pod("critical", "system-cluster-critical", 0, json!({})),
        )
        .await
        .unwrap();
    assert_eq!(critical.spec.unwrap().priority, Some(2_000_000_000));

    // User classes stay below the system ones and out of their names.
    for bad in [
        json!({"metadata": {"name": "too-high"}, "value": 1_000_000_001}),
        json!({"metadata": {"name": "system-mine"}, "value": 1}),
    ] {
        let bad: PriorityClass = serde_json::from_value(bad).unwrap();
        assert!(classes.create(&PostParams::default(), &bad).await.is_err());
    }

    // Value immutable, description not.
    let revalue = json!({"value": 70});
    assert!(
        classes
            .patch("everyday", &PatchParams::default(), &Patch::Merge(revalue))
            .await
            .is_err()
    );
    let describe = json!({"description": "updated description"});
    let described = classes
        .patch("everyday", &PatchParams::default(), &Patch::Merge(describe))
        .await
        .unwrap();
    assert_eq!(
        described.description.as_deref(),
        Some("updated description")
    );
    let mut updated = classes.get("everyday").await.unwrap();
    updated.value = Some(9);
    assert!(
        classes
            .replace("everyday", &PostParams::default(), &updated)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_preempts_lower() {
    let (_api, client) = start(1).await;
    slots(&client, "sim-0", 1).await;
    class(&client, "low", 1, json!({})).await;
    class(&client, "high", 1000, json!({})).await;
    class(
        &client,
        "polite",
        2000,
        json!({"preemptionPolicy": "Never"}),
    )
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // The victim holds a finalizer, so its DisruptionTarget condition can be seen while it
    // terminates.
    let mut victim = pod("victim", "low", 1, json!({}));
    victim.metadata.finalizers = Some(vec!["example.com/hold".into()]);
    pods.create(&PostParams::default(), &victim).await.unwrap();
    assert_eq!(bound(&pods, "victim").await, "sim-0");

    pods.create(
        &PostParams::default(),
        &pod("preemptor", "high", 1, json!({})),
    )
    .await
    .unwrap();
    wait_for(&pods, "preemptor", Duration::from_secs(20), |p| {
        p.status
            .as_ref()
            .and_then(|s| s.nominated_node_name.as_deref())
            == Some("sim-0")
    })
    .await
    .unwrap();
    let victim = wait_for(&pods, "victim", Duration::from_secs(20), |p| {
        p.metadata.deletion_timestamp.is_some()
    })
    .await
    .unwrap();
    assert!(has_condition(
        &victim,
        "DisruptionTarget",
        "PreemptionByScheduler"
    ));
    let condition = victim
        .status
        .unwrap()
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "DisruptionTarget")
        .unwrap();
    assert_eq!(
        condition.message.as_deref(),
        Some("default-scheduler: preempting to accommodate a higher priority pod")
    );
    assert_eq!(bound(&pods, "preemptor").await, "sim-0");
    pods.patch(
        "victim",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
    )
    .await
    .unwrap();
    gone(&pods, "victim").await;

    // A pod that may not preempt waits, however high its priority.
    pods.create(
        &PostParams::default(),
        &pod("polite", "polite", 1, json!({})),
    )
    .await
    .unwrap();
    let message = failed_scheduling(&client, "polite").await;
    assert!(
        message.contains("1 Insufficient example.com/slot"),
        "{message}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let preemptor = pods.get("preemptor").await.unwrap();
    assert!(preemptor.metadata.deletion_timestamp.is_none());
    assert!(node_of(&pods.get("polite").await.unwrap()).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn victims_protected_by_a_budget_are_avoided() {
    let (_api, client) = start(2).await;
    slots(&client, "sim-0", 1).await;
    slots(&client, "sim-1", 1).await;
    class(&client, "low", 1, json!({})).await;
    class(&client, "high", 1000, json!({})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    // `guarded` (on sim-0) is covered by a budget allowing no disruption; `free` (sim-1)
    // is not. Both have the same priority, so only the budget tells them apart.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), "default");
    let pdb: PodDisruptionBudget = serde_json::from_value(json!({
        "metadata": {"name": "guard"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "guarded"}}},
    }))
    .unwrap();
    pdbs.create(&PostParams::default(), &pdb).await.unwrap();
    let status = json!({"status": {"disruptionsAllowed": 0, "currentHealthy": 1,
        "desiredHealthy": 1, "expectedPods": 1, "observedGeneration": 1}});
    pdbs.patch_status("guard", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
    pods.create(
        &PostParams::default(),
        &pod("guarded", "low", 1, on("sim-0")),
    )
    .await
    .unwrap();
    pods.create(&PostParams::default(), &pod("free", "low", 1, on("sim-1")))
        .await
        .unwrap();
    for name in ["guarded", "free"] {
        wait_for(&pods, name, Duration::from_secs(20), |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await
        .unwrap();
    }
    pods.create(
        &PostParams::default(),
        &pod("preemptor", "high", 1, json!({})),
    )
    .await
    .unwrap();
    assert_eq!(bound(&pods, "preemptor").await, "sim-1");
    gone(&pods, "free").await;
    let guarded = pods.get("guarded").await.unwrap();
    assert!(guarded.metadata.deletion_timestamp.is_none());
}

/// A pod spec pinned to `node` through the scheduler (a nodeSelector, not `nodeName`), so the
/// scheduler has placed — and so counts — the pod before anything is preempted.
fn on(node: &str) -> serde_json::Value {
    json!({"nodeSelector": {"kubernetes.io/hostname": node}})
}

/// Where the pods named `prefix-*` went: node → count; and how many are pending.
async fn placement(pods: &Api<Pod>, prefix: &str) -> (BTreeMap<String, usize>, usize) {
    let mut per_node = BTreeMap::new();
    let mut pending = 0;
    for p in pods.list(&ListParams::default()).await.unwrap().items {
        if !p
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .starts_with(prefix)
        {
            continue;
        }
        match node_of(&p) {
            Some(node) => *per_node.entry(node.to_owned()).or_default() += 1,
            None => pending += 1,
        }
    }
    (per_node, pending)
}

async fn settle(pods: &Api<Pod>, prefix: &str, bound: usize) -> (BTreeMap<String, usize>, usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (per_node, pending) = placement(pods, prefix).await;
        if per_node.values().sum::<usize>() >= bound {
            return (per_node, pending);
        }
        assert!(Instant::now() < deadline, "{per_node:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn affinity_spread_and_gates() {
    let (_api, client) = start(3).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");

    // Required anti-affinity by hostname: one web pod per node; the fourth waits.
    let anti = json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"labelSelector": {"matchLabels": {"tier": "web"}}, "topologyKey": "kubernetes.io/hostname"}]}}});
    for i in 0..4 {
        let mut p = pod(&format!("web-{i}"), "", 0, anti.clone());
        p.metadata
            .labels
            .get_or_insert_default()
            .insert("tier".into(), "web".into());
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let (per_node, _) = settle(&pods, "web-", 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (later, pending) = placement(&pods, "web-").await;
    assert_eq!(per_node.len(), 3, "{per_node:?}");
    assert!(later.values().all(|n| *n == 1), "{later:?}");
    assert_eq!(pending, 1);
    let unplaced = pods
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .find(|p| p.metadata.name.as_deref().unwrap().starts_with("web-") && node_of(p).is_none())
        .unwrap();
    let message = failed_scheduling(&client, unplaced.metadata.name.as_deref().unwrap()).await;
    assert!(message.contains("anti-affinity"), "{message}");
    assert!(has_condition(
        &pods
            .get(unplaced.metadata.name.as_deref().unwrap())
            .await
            .unwrap(),
        "PodScheduled",
        "Unschedulable"
    ));

    // Spread with maxSkew 1 beats a strong preference for sim-0.
    let spread = json!({
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"tier": "batch"}}}],
        "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "preference": {"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["sim-0"]}]}}]}},
    });
    for i in 0..6 {
        let mut p = pod(&format!("batch-{i}"), "", 0, spread.clone());
        p.metadata
            .labels
            .get_or_insert_default()
            .insert("tier".into(), "batch".into());
        pods.create(&PostParams::default(), &p).await.unwrap();
    }
    let (per_node, _) = settle(&pods, "batch-", 6).await;
    assert_eq!(
        per_node.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2]
    );
    // Without the constraint, the preference wins.
    let prefer = json!({"affinity": spread["affinity"].clone()});
    for i in 0..2 {
        pods.create(
            &PostParams::default(),
            &pod(&format!("fond-{i}"), "", 0, prefer.clone()),
        )
        .await
        .unwrap();
    }
    let (per_node, _) = settle(&pods, "fond-", 2).await;
    assert_eq!(per_node.get("sim-0"), Some(&2), "{per_node:?}");

    // A gated pod waits, marked SchedulingGated, until its gates are gone.
    pods.create(
        &PostParams::default(),
        &pod(
            "gated",
            "",
            0,
            json!({"schedulingGates": [{"name": "example.com/wait"}]}),
        ),
    )
    .await
    .unwrap();
    let gated = wait_for(&pods, "gated", Duration::from_secs(20), |p| {
        has_condition(p, "PodScheduled", "SchedulingGated")
    })
    .await
    .unwrap();
    assert!(node_of(&gated).is_none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(node_of(&pods.get("gated").await.unwrap()).is_none());
    pods.patch(
        "gated",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"schedulingGates": null}})),
    )
    .await
    .unwrap();
    bound(&pods, "gated").await;
    pods.delete("gated", &DeleteParams::default())
        .await
        .unwrap();
}
