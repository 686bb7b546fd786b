//! Jobs and CronJobs with real containers (root): `orq server` with its node agent in a
//! network namespace of the test's own, busybox from a real registry, the real kubectl. An
//! Indexed Job whose index 1 fails once (counted by its pod failure policy) is retried and
//! completes; a pod failure policy's `FailJob` ends another at its first matching exit
//! code; an evicted pod's failure ignored by the policy (`DisruptionTarget`); a CronJob
//! with `Forbid` whose Job outlives a minute skips the next run.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use host::{Host, IMAGE};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

fn get(host: &Host, kind: &str, name: &str) -> Value {
    serde_json::from_str(&host.kubectl(&["get", kind, name, "-o", "json"])).unwrap()
}

fn condition<'a>(object: &'a Value, type_: &str) -> Option<&'a Value> {
    object["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_ && c["status"] == "True")
}

/// Polls the object until `done` holds; panics with its status after `timeout`.
fn wait(
    host: &Host,
    kind: &str,
    name: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let object = get(host, kind, name);
        if done(&object) {
            return object;
        }
        assert!(
            Instant::now() < deadline,
            "{kind} {name} did not get there in {timeout:?}: {:#}\nserver log:\n{}",
            object["status"],
            host.server_log_tail()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Seconds until `past` seconds after the next whole minute.
fn until_next_minute(past: u64) -> Duration {
    let now = jiff::Timestamp::now().as_second() as u64;
    Duration::from_secs((now / 60 + 1) * 60 + past - now)
}

fn cronjob_jobs(host: &Host) -> Vec<String> {
    let list: Value = serde_json::from_str(&host.kubectl(&["get", "jobs", "-o", "json"])).unwrap();
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["metadata"]["ownerReferences"][0]["name"] == "every-minute")
        .filter_map(|j| j["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn indexed_jobs_retry_failed_indexes_and_cronjobs_forbid_overlap() {
    let host = Host::start("jobs");
    let marks = host.dir.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();

    // Index 1 fails once with exit code 3 (counted: one retry allowed per index), then
    // succeeds; exit code 42 would fail the whole Job.
    let script = "if [ \"$JOB_COMPLETION_INDEX\" = 1 ] && [ ! -e /marks/retried ]; then \
                  touch /marks/retried; exit 3; fi; echo index $JOB_COMPLETION_INDEX on $(hostname)";
    let policy = json!({"rules": [
        {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
        {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [42]}},
    ]});
    let job = |name: &str, script: &str| {
        json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"completionMode": "Indexed", "completions": 3, "parallelism": 3,
                "backoffLimitPerIndex": 1, "podFailurePolicy": policy,
                "template": {"spec": {"restartPolicy": "Never",
                    "volumes": [{"name": "marks", "hostPath": {"path": marks.display().to_string(), "type": "Directory"}}],
                    "containers": [{"name": "c", "image": IMAGE, "command": ["sh", "-c", script],
                        "volumeMounts": [{"name": "marks", "mountPath": "/marks"}]}]}}},
        })
    };
    host.apply(&job("indexed", script));
    host.apply(&job("fatal", "exit 42"));

    let done = wait(&host, "job", "indexed", Duration::from_secs(120), |j| {
        condition(j, "Complete").is_some() || condition(j, "Failed").is_some()
    });
    assert!(
        condition(&done, "Complete").is_some(),
        "{:#}",
        done["status"]
    );
    assert_eq!(done["status"]["completedIndexes"], "0-2");
    assert_eq!(done["status"]["failedIndexes"], "");
    assert_eq!(done["status"]["succeeded"], 3);
    assert_eq!(done["status"]["failed"], 1, "index 1 failed once");
    assert!(marks.join("retried").exists());
    // The retry of index 1 carried its failure count, and the logs show every index ran.
    let retried = host.kubectl(&[
        "get", "pods", "-l", "batch.kubernetes.io/job-completion-index=1,job-name=indexed",
        "-o", "jsonpath={range .items[*]}{.status.phase}:{.metadata.annotations.batch\\.kubernetes\\.io/job-index-failure-count} {end}",
    ]);
    let mut retried: Vec<&str> = retried.split_whitespace().collect();
    retried.sort();
    assert_eq!(retried, ["Failed:0", "Succeeded:1"]);
    let logs = host.kubectl(&["logs", "-l", "job-name=indexed", "--prefix=false"]);
    for i in 0..3 {
        assert!(
            logs.contains(&format!("index {i} on indexed-{i}")),
            "{logs}"
        );
    }

    let fatal = wait(&host, "job", "fatal", Duration::from_secs(60), |j| {
        condition(j, "Failed").is_some()
    });
    let failed = condition(&fatal, "Failed").unwrap();
    assert_eq!(failed["reason"], "PodFailurePolicy");
    assert!(
        failed["message"]
            .as_str()
            .unwrap()
            .contains("failed with exit code 42 matching FailJob rule at index 1"),
        "{failed}"
    );

    // An evicted pod is ignored by the policy (the eviction's DisruptionTarget condition
    // reaches the Job through the node's terminal status): with backoffLimit 0 the Job does
    // not fail, it replaces the pod.
    host.apply(&json!({
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": "evicted", "namespace": "default"},
        "spec": {"backoffLimit": 0, "podFailurePolicy": policy,
            "template": {"metadata": {"labels": {"app": "evicted"}}, "spec": {"restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "3600"]}]}}},
    }));
    wait(&host, "job", "evicted", Duration::from_secs(60), |j| {
        j["status"]["ready"] == 1
    });
    let first = host.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=evicted",
        "-o",
        "jsonpath={.items[0].metadata.name}",
    ]);
    host.kubectl(&[
        "drain",
        "n1",
        "--pod-selector",
        "app=evicted",
        "--ignore-daemonsets",
        "--delete-emptydir-data",
        "--timeout=60s",
    ]);
    host.kubectl(&["uncordon", "n1"]);
    let replaced = wait(&host, "job", "evicted", Duration::from_secs(60), |j| {
        j["status"]["ready"] == 1 && j["status"]["active"] == 1
    });
    assert!(
        condition(&replaced, "Failed").is_none(),
        "{:#}",
        replaced["status"]
    );
    assert_eq!(
        replaced["status"]["failed"].as_i64().unwrap_or(0),
        0,
        "the eviction was not ignored"
    );
    let now = host.kubectl(&[
        "get",
        "pods",
        "-l",
        "app=evicted",
        "--field-selector",
        "status.phase=Running",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert!(!now.contains(first.trim()), "{first} is still there: {now}");
    host.kubectl(&["delete", "job", "evicted", "--wait=false"]);

    // A CronJob every minute whose Job runs 80 s: one Job at the first minute, none at
    // the next while it runs (Forbid).
    host.apply(&json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": "every-minute", "namespace": "default"},
        "spec": {"schedule": "*/1 * * * *", "concurrencyPolicy": "Forbid",
            "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never",
                "terminationGracePeriodSeconds": 1,
                "containers": [{"name": "c", "image": IMAGE, "command": ["sleep", "80"]}]}}}}},
    }));

    let first = wait(
        &host,
        "cronjob",
        "every-minute",
        Duration::from_secs(75),
        |cj| {
            cj["status"]["active"]
                .as_array()
                .is_some_and(|a| a.len() == 1)
        },
    );
    let first_job = first["status"]["active"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(until_next_minute(10));
    assert_eq!(
        cronjob_jobs(&host),
        std::slice::from_ref(&first_job),
        "Forbid started a second run"
    );
    let cj = get(&host, "cronjob", "every-minute");
    assert_eq!(cj["status"]["active"][0]["name"], first_job.as_str());
}
