//! The Job controller with the scheduler and the garbage collector against the real API
//! server in-process and simulated nodes whose pods exit with a chosen code: completions
//! reached with the two-step conditions and no pod left holding the tracking finalizer, a
//! failing Job stopped by its backoff limit, an Indexed Job's indexes and hostnames, a
//! suspended Job that runs once resumed, a deleted Job's pods let go, and the API server's
//! `Invalid` for a template that restarts `Always`; CronJobs every minute under each
//! concurrency policy with their history limit, a finished Job expired by its TTL, and a
//! schedule that does not parse.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use orquestra_node_agent::simulated::EXIT_CODE;
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_for};
use serde_json::{Value, json};

async fn start() -> (TestApi, Client) {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 2, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::add_selected(
        &mut manager,
        &[
            "scheduler".into(),
            "job".into(),
            "cronjob".into(),
            "ttl-after-finished".into(),
            "garbagecollector".into(),
        ],
        &Default::default(),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));
    (api, client)
}

fn job(name: &str, exit_code: i32, extra: Value) -> Job {
    let mut job = json!({
        "metadata": {"name": name},
        "spec": {"template": {
            "metadata": {"annotations": {EXIT_CODE: exit_code.to_string()}},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}},
    });
    if let (Some(spec), Some(extra)) = (job["spec"].as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    serde_json::from_value(job).unwrap()
}

/// The Job with pods that run until deleted (no exit code).
fn never_exits(mut job: Job) -> Job {
    if let Some(t) = job.spec.as_mut().and_then(|s| s.template.metadata.as_mut()) {
        t.annotations = None;
    }
    job
}

fn condition(job: &Job, type_: &str) -> Option<(String, String)> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| {
            (
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default(),
            )
        })
}

async fn pods_of(client: &Client, job: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), "default")
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .unwrap()
        .items
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_complete_fail_index_and_suspend() {
    let (_api, client) = start().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");

    // Completions reached: SuccessCriteriaMet, then Complete, every pod counted once.
    jobs.create(
        &PostParams::default(),
        &job("ok", 0, json!({"completions": 5, "parallelism": 2})),
    )
    .await
    .unwrap();
    let done = wait_for(&jobs, "ok", Duration::from_secs(60), |j| {
        condition(j, "Complete").is_some()
    })
    .await
    .unwrap();
    let status = done.status.clone().unwrap();
    assert_eq!(status.succeeded, Some(5));
    assert_eq!(status.failed.unwrap_or(0), 0);
    assert_eq!(status.active.unwrap_or(0), 0);
    assert!(status.completion_time.is_some());
    assert_eq!(
        condition(&done, "SuccessCriteriaMet").unwrap().0,
        "CompletionsReached"
    );
    assert_eq!(
        condition(&done, "Complete").unwrap().0,
        "CompletionsReached"
    );
    let pods = pods_of(&client, "ok").await;
    assert_eq!(pods.len(), 5, "one pod per completion, none twice");
    assert!(
        pods.iter().all(|p| p
            .metadata
            .finalizers
            .as_deref()
            .unwrap_or_default()
            .is_empty()),
        "every pod released its tracking finalizer"
    );

    // A failing Job stops at its backoff limit (0: the first failure ends it).
    jobs.create(
        &PostParams::default(),
        &job("bad", 3, json!({"backoffLimit": 0})),
    )
    .await
    .unwrap();
    let failed = wait_for(&jobs, "bad", Duration::from_secs(60), |j| {
        condition(j, "Failed").is_some()
    })
    .await
    .unwrap();
    assert_eq!(
        condition(&failed, "Failed").unwrap(),
        (
            "BackoffLimitExceeded".to_string(),
            "Job has reached the specified backoff limit".to_string()
        )
    );
    assert_eq!(failed.status.unwrap().failed, Some(1));
    assert_eq!(pods_of(&client, "bad").await.len(), 1);

    // Indexed: each index once, with its hostname and index annotation.
    jobs.create(
        &PostParams::default(),
        &job(
            "idx",
            0,
            json!({"completions": 3, "parallelism": 3, "completionMode": "Indexed"}),
        ),
    )
    .await
    .unwrap();
    let done = wait_for(&jobs, "idx", Duration::from_secs(60), |j| {
        condition(j, "Complete").is_some()
    })
    .await
    .unwrap();
    assert_eq!(
        done.status.unwrap().completed_indexes.as_deref(),
        Some("0-2")
    );
    let mut hostnames: Vec<String> = pods_of(&client, "idx")
        .await
        .iter()
        .map(|p| p.spec.as_ref().unwrap().hostname.clone().unwrap())
        .collect();
    hostnames.sort();
    assert_eq!(hostnames, ["idx-0", "idx-1", "idx-2"]);

    // Suspended: no pods, the Suspended condition; resumed: it runs to completion.
    jobs.create(
        &PostParams::default(),
        &job("later", 0, json!({"suspend": true})),
    )
    .await
    .unwrap();
    wait_for(&jobs, "later", Duration::from_secs(30), |j| {
        condition(j, "Suspended").is_some()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(pods_of(&client, "later").await.is_empty());
    jobs.patch(
        "later",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"suspend": false}})),
    )
    .await
    .unwrap();
    wait_for(&jobs, "later", Duration::from_secs(60), |j| {
        condition(j, "Complete").is_some()
    })
    .await
    .unwrap();

    // A Job deleted while its pods run: the pods lose the finalizer and go with it.
    jobs.create(
        &PostParams::default(),
        &never_exits(job(
            "forever",
            0,
            json!({"parallelism": 2, "completions": 2}),
        )),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pods_of(&client, "forever").await.len() < 2 {
        assert!(std::time::Instant::now() < deadline, "pods never created");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    jobs.delete("forever", &DeleteParams::foreground())
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = pods_of(&client, "forever").await;
        if left.is_empty() && jobs.get_opt("forever").await.unwrap().is_none() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still there: {:?}",
            left.iter()
                .map(|p| (p.metadata.name.clone(), p.metadata.finalizers.clone()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_that_restarts_always_is_invalid() {
    let (_api, client) = start().await;
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");
    let mut bad = job("always", 0, json!({}));
    bad.spec
        .as_mut()
        .unwrap()
        .template
        .spec
        .as_mut()
        .unwrap()
        .restart_policy = Some("Always".into());
    let err = jobs.create(&PostParams::default(), &bad).await.unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("not an API error: {err}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("spec.template.spec.restartPolicy")
            && status
                .message
                .contains("supported values: \"OnFailure\", \"Never\""),
        "{}",
        status.message
    );
}

fn cronjob(name: &str, policy: &str, exits: bool) -> CronJob {
    let mut template = json!({"spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}});
    if exits {
        template["metadata"] = json!({"annotations": {EXIT_CODE: "0"}});
    }
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"schedule": "*/1 * * * *", "concurrencyPolicy": policy, "successfulJobsHistoryLimit": 0,
                 "jobTemplate": {"spec": {"template": template}}},
    }))
    .unwrap()
}

async fn jobs_of(client: &Client, cronjob: &str) -> Vec<String> {
    Api::<Job>::namespaced(client.clone(), "default")
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|j| {
            j.metadata
                .owner_references
                .iter()
                .flatten()
                .any(|o| o.name == cronjob)
                && j.metadata.deletion_timestamp.is_none()
        })
        .filter_map(|j| j.metadata.name)
        .collect()
}

/// Sleeps until `seconds` past the next whole minute.
async fn past_next_minute(seconds: u64) {
    let now = jiff::Timestamp::now().as_second() as u64;
    let next = (now / 60 + 1) * 60 + seconds;
    tokio::time::sleep(Duration::from_secs(next - now)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cronjobs_follow_their_concurrency_policy() {
    let (_api, client) = start().await;
    let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), "default");
    let jobs: Api<Job> = Api::namespaced(client.clone(), "default");

    // A schedule that does not parse is Invalid, naming the field.
    let mut bad = cronjob("bad", "Allow", true);
    bad.spec.schedule = "61 * * * *".into();
    let err = cronjobs
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("not an API error: {err}")
    };
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("spec.schedule"),
        "{}",
        status.message
    );

    // Every minute: Forbid and Replace with Jobs that never finish, Allow with Jobs that do
    // and no history kept.
    for (name, policy, exits) in [
        ("allow", "Allow", true),
        ("forbid", "Forbid", false),
        ("replace", "Replace", false),
    ] {
        cronjobs
            .create(&PostParams::default(), &cronjob(name, policy, exits))
            .await
            .unwrap();
    }
    past_next_minute(5).await;
    let forbid = jobs_of(&client, "forbid").await;
    let replace = jobs_of(&client, "replace").await;
    assert_eq!(forbid.len(), 1, "the first run: {forbid:?}");
    assert_eq!(replace.len(), 1, "the first run: {replace:?}");
    let cj = cronjobs.get("forbid").await.unwrap();
    assert_eq!(cj.status.unwrap().active.unwrap().len(), 1);
    // The next minute: Forbid skips it, Replace swaps its Job for a new one.
    past_next_minute(5).await;
    assert_eq!(
        jobs_of(&client, "forbid").await,
        forbid,
        "Forbid ran again while one was active"
    );
    let replaced = jobs_of(&client, "replace").await;
    assert_eq!(replaced.len(), 1, "{replaced:?}");
    assert_ne!(replaced, replace, "Replace kept the old Job");
    // Allow: its runs finished, and with no history kept they are gone.
    let allow = cronjobs.get("allow").await.unwrap();
    assert!(allow.status.unwrap().last_successful_time.is_some());
    assert!(jobs_of(&client, "allow").await.is_empty());

    // A finished Job with a TTL goes once it expires.
    jobs.create(
        &PostParams::default(),
        &job("short", 0, json!({"ttlSecondsAfterFinished": 2})),
    )
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let mut saw_finished = false;
    loop {
        match jobs.get_opt("short").await.unwrap() {
            Some(j) => saw_finished |= condition(&j, "Complete").is_some(),
            None if saw_finished => break,
            None => panic!("the Job went before it was seen finished"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the finished Job was never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
