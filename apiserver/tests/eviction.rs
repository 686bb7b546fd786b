//! `pods/<name>/eviction`, as `kubectl drain` and kube-rs's `Api::evict` use it: a running
//! pod goes only when its PodDisruptionBudget allows it, the budget records the disruption,
//! and a refusal is a 429 the client retries.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{EvictParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

mod common;

use common::cluster;

/// Creates a pod labelled `app=db` and sets its status as a kubelet would.
async fn pod(pods: &Api<Pod>, name: &str, phase: &str, ready: bool) {
    let pod = json!({"metadata": {"name": name, "labels": {"app": "db"}},
                     "spec": {"containers": [{"name": "c", "image": "busybox"}]}});
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(pod).unwrap(),
    )
    .await
    .unwrap();
    let status = json!({"status": {"phase": phase, "conditions": [
        {"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// Sets the budget's status as the disruption controller would.
async fn budget_status(budgets: &Api<PodDisruptionBudget>, allowed: i64, healthy: (i64, i64)) {
    let generation = budgets
        .get("db")
        .await
        .unwrap()
        .metadata
        .generation
        .unwrap();
    let status = json!({"status": {"observedGeneration": generation,
        "disruptionsAllowed": allowed, "currentHealthy": healthy.0, "desiredHealthy": healthy.1,
        "expectedPods": 3}});
    budgets
        .patch_status("db", &PatchParams::default(), &Patch::Merge(status))
        .await
        .unwrap();
}

/// POSTs an Eviction for `pod` (dry run if `dry_run`) on a connection of its own — not through
/// kube-rs, whose client retries a 429 itself — and returns the status code, the
/// `Retry-After` header and the body.
async fn evict(c: &common::Cluster, pod: &str, dry_run: bool) -> (u16, Option<String>, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = json!({"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod}});
    let body = serde_json::to_vec(&body).unwrap();
    let query = if dry_run { "?dryRun=All" } else { "" };
    let mut stream = tokio::net::TcpStream::connect(c.addr).await.unwrap();
    let head = format!(
        "POST /api/v1/namespaces/default/pods/{pod}/eviction{query} HTTP/1.1\r\nHost: x\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head[9..12].parse().unwrap();
    let retry_after = head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("retry-after: ")
            .map(str::to_owned)
    });
    // The JSON object is between the first '{' and the last '}' (the body may be chunked).
    let json = &body[body.find('{').unwrap()..=body.rfind('}').unwrap()];
    (code, retry_after, serde_json::from_str(json).unwrap())
}

fn api_error(result: Result<impl std::fmt::Debug, kube::Error>) -> kube::core::Status {
    match result {
        Err(kube::Error::Api(status)) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn an_eviction_spends_the_disruption_budget_or_is_refused_with_429() {
    let c = cluster().await;
    let pods: Api<Pod> = Api::namespaced(c.client.clone(), "default");
    let budgets: Api<PodDisruptionBudget> = Api::namespaced(c.client.clone(), "default");
    for name in ["a", "b", "c"] {
        pod(&pods, name, "Running", true).await;
    }
    let budget = json!({"metadata": {"name": "db"},
                        "spec": {"minAvailable": 2, "selector": {"matchLabels": {"app": "db"}}}});
    budgets
        .create(
            &PostParams::default(),
            &serde_json::from_value(budget).unwrap(),
        )
        .await
        .unwrap();

    // Not yet seen by the disruption controller: retry later.
    let (code, retry_after, status) = evict(&c, "a", false).await;
    assert_eq!(
        (code, status["reason"].as_str()),
        (429, Some("TooManyRequests"))
    );
    assert_eq!(
        status["details"]["causes"][0],
        json!({"reason": "DisruptionBudget",
               "message": "The disruption budget db is still being processed by the server."})
    );
    assert_eq!(status["details"]["retryAfterSeconds"], 10);
    assert_eq!(retry_after.as_deref(), Some("10"));

    // One disruption allowed: the first eviction takes it, the second is refused.
    budget_status(&budgets, 1, (3, 2)).await;
    pods.evict("a", &EvictParams::default()).await.unwrap();
    let gone = pods.get_opt("a").await.unwrap();
    assert!(
        gone.as_ref()
            .is_none_or(|p| p.metadata.deletion_timestamp.is_some()),
        "{gone:?}"
    );
    let status = budgets.get_status("db").await.unwrap().status.unwrap();
    assert_eq!(status.disruptions_allowed, Some(0));
    assert!(status.disrupted_pods.unwrap().contains_key("a"));
    let allowed = status
        .conditions
        .unwrap()
        .into_iter()
        .find(|c| c.type_ == "DisruptionAllowed")
        .unwrap();
    assert_eq!(
        (allowed.status.as_str(), allowed.reason.as_str()),
        ("False", "InsufficientPods")
    );
    budget_status(&budgets, 0, (2, 2)).await;
    let (code, _, status) = evict(&c, "b", false).await;
    assert_eq!(code, 429);
    assert_eq!(
        status["message"],
        "Cannot evict pod as it would violate the pod's disruption budget."
    );
    assert_eq!(
        status["details"]["causes"][0]["message"],
        "The disruption budget db needs 2 healthy pods and has 2 currently"
    );
    assert!(
        pods.get("b")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    // A dry run spends nothing and deletes nothing.
    budget_status(&budgets, 1, (3, 2)).await;
    let (code, _, status) = evict(&c, "b", true).await;
    assert_eq!(code, 201, "{status}");
    assert!(
        pods.get("b")
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );
    let status = budgets.get_status("db").await.unwrap().status.unwrap();
    assert_eq!(status.disruptions_allowed, Some(1));

    // A pod that is not running disrupts nothing: it goes whatever the budget says.
    budget_status(&budgets, 0, (2, 2)).await;
    pod(&pods, "pending", "Pending", false).await;
    pods.evict("pending", &EvictParams::default())
        .await
        .unwrap();
    // An unready pod goes without spending the budget while the budget is met.
    pod(&pods, "unready", "Running", false).await;
    budget_status(&budgets, 0, (2, 2)).await;
    pods.evict("unready", &EvictParams::default())
        .await
        .unwrap();
    assert_eq!(
        budgets
            .get_status("db")
            .await
            .unwrap()
            .status
            .unwrap()
            .disruptions_allowed,
        Some(0)
    );

    // What is not a pod's eviction is refused, and said why.
    let request = http::Request::post("/api/v1/namespaces/default/pods/b/eviction")
        .header("content-type", "application/json")
        .body(
            serde_json::to_vec(&json!({"apiVersion": "policy/v1", "kind": "Eviction",
                                       "metadata": {"name": "c"}}))
            .unwrap(),
        )
        .unwrap();
    let status = api_error(c.client.request::<Value>(request).await);
    assert_eq!(
        (status.code, status.message.as_str()),
        (400, "name in URL does not match name in Eviction object")
    );
    let status = api_error(pods.evict("missing", &EvictParams::default()).await);
    assert_eq!(status.code, 404);
    // The pods the budget protects are still there.
    let names: Vec<String> = pods
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| p.name_any())
        .collect();
    assert_eq!(names, ["b", "c"]);
}
