//! Job controller benchmark (issue 21), one run, release build, everything in one process as
//! `orq server` runs it (API server over SQLite, the scheduler and the Job controller,
//! simulated nodes whose pods exit 0 once running):
//!
//! 1,000 Jobs of 10 completions each (parallelism 10): seconds until every Job is `Complete`
//! — side by side with the anchor measured in the same run, the same API work done
//! directly, 64 at a time and with no decisions: each Job created, its 10 pods created
//! (with the tracking finalizer), bound, marked Running, marked Succeeded, their finalizer
//! removed, and the Job's status written as done. The ratio is what the controllers'
//! bookkeeping costs over the writes any Job controller must make.
//!
//! `cargo bench -p orq --bench jobs`

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_node_agent::simulated;
use orquestra_operator::Manager;
use orquestra_operator::testing::TestApi;
use serde_json::json;

const CONCURRENCY: usize = 64;
const JOBS: usize = 1_000;
const COMPLETIONS: usize = 10;
const NODES: usize = 100;

async fn namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn job(name: &str, annotations: serde_json::Value) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"completions": COMPLETIONS, "parallelism": COMPLETIONS,
            "template": {"metadata": {"annotations": annotations},
                "spec": {"restartPolicy": "Never", "schedulerName": "nobody",
                    "containers": [{"name": "c", "image": "busybox"}]}}},
    }))
    .unwrap()
}

/// The anchor: the Job controller's writes for one Job, done directly.
async fn one_job_directly(client: Client, i: usize) {
    let jobs: Api<Job> = Api::namespaced(client.clone(), "anchor");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "anchor");
    let name = format!("j{i}");
    let created = jobs
        .create(&PostParams::default(), &job(&name, json!({})))
        .await
        .unwrap();
    let owner = json!([{"apiVersion": "batch/v1", "kind": "Job", "name": name,
        "uid": created.metadata.uid, "controller": true, "blockOwnerDeletion": true}]);
    for k in 0..COMPLETIONS {
        let pod_name = format!("{name}-{k}");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": pod_name, "ownerReferences": owner,
                "finalizers": ["batch.kubernetes.io/job-tracking"]},
            "spec": {"schedulerName": "nobody", "restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &pod).await.unwrap();
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod_name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": format!("elsewhere-{}", i % NODES)},
        });
        pods.create_subresource::<serde_json::Value, serde_json::Value>(
            "binding",
            &pod_name,
            &PostParams::default(),
            &binding,
        )
        .await
        .unwrap();
        for phase in ["Running", "Succeeded"] {
            pods.patch_status(
                &pod_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": phase}})),
            )
            .await
            .unwrap();
        }
        pods.patch(
            &pod_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": []}})),
        )
        .await
        .unwrap();
    }
    let now = jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    jobs.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"succeeded": COMPLETIONS, "completionTime": now,
            "conditions": [{"type": "Complete", "status": "True", "lastTransitionTime": now}]}}),
        ),
    )
    .await
    .unwrap();
}

async fn jobs_to_completion() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    simulated::spawn_ready(client.clone(), "node", NODES, Duration::from_secs(120))
        .await
        .unwrap();

    namespace(&client, "anchor").await;
    let started = Instant::now();
    futures::stream::iter(0..JOBS)
        .map(|i| one_job_directly(client.clone(), i))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let direct = started.elapsed().as_secs_f64();
    println!(
        "{JOBS} Jobs x {COMPLETIONS} pods, the API work done directly (anchor): {direct:>7.2} s"
    );

    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(
        &mut manager,
        &["scheduler".into(), "job".into()],
        &Default::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    // Let the controllers' caches fill before the clock starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    namespace(&client, "bench").await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "bench");
    let started = Instant::now();
    futures::stream::iter(0..JOBS)
        .map(|i| {
            let jobs = jobs.clone();
            async move {
                let mut j = job(&format!("j{i}"), json!({simulated::EXIT_CODE: "0"}));
                if let Some(spec) = j.spec.as_mut().and_then(|s| s.template.spec.as_mut()) {
                    spec.scheduler_name = None;
                }
                jobs.create(&PostParams::default(), &j).await.unwrap();
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    let created = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let list = jobs.list(&ListParams::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|j| orquestra_controllers::workloads::job::finished(j).is_some())
            .count();
        if done == JOBS {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {JOBS} Jobs finished"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let took = started.elapsed().as_secs_f64();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let all = pods.list(&ListParams::default()).await.unwrap().items;
    let succeeded = all
        .iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded"))
        .count();
    println!("{JOBS} Jobs created through the API in {created:.2} s");
    println!(
        "{JOBS} Jobs x {COMPLETIONS} completions, scheduler + Job controller on {NODES} simulated nodes: {took:>7.2} s = {:.2}x the anchor ({succeeded} pods succeeded, {} pods in all)",
        took / direct,
        all.len()
    );
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("== 1,000 Jobs of 10 completions ==");
        jobs_to_completion().await;
    });
}
