//! The simulated runtime (like kwok): many fake nodes in one process whose pods become
//! Running at once — for control-plane tests and scale benchmarks, behind the same node
//! registration as the real agent.
//!
//! Each node registers and heartbeats like a real one. One watch over all Pods picks the
//! ones bound to these nodes; a pod not yet Running gets a Running status (every container
//! running and ready, a pod IP, the usual conditions); a running pod annotated with
//! [`EXIT_CODE`] then finishes (`Succeeded` or `Failed`, as a Job's pods do); a pod being
//! deleted ends `Failed` and gets the final delete a kubelet sends once its containers are
//! gone.

use std::collections::BTreeSet;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::node::{Heartbeat, HostInfo, NodeConfig};

/// The field manager of the simulated kubelets.
pub const MANAGER: &str = "orq-agent-simulated";

/// Names of `count` simulated nodes: `<prefix>-0` … `<prefix>-<count-1>`.
pub fn node_names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i}")).collect()
}

/// Why simulated nodes did not come up.
#[derive(Debug, thiserror::Error)]
pub enum SimulatedError {
    /// The API refused or could not be reached.
    #[error("talking to the API server: {0}")]
    Api(#[from] kube::Error),
    /// A node was not Ready in time.
    #[error("simulated node {0} not Ready in time")]
    NotReady(String),
}

/// Starts `count` simulated nodes in the background (for the life of the runtime) and waits
/// until every one is Ready; returns their names. For tests and benchmarks of the control
/// plane.
pub async fn spawn_ready(
    client: Client,
    prefix: &str,
    count: usize,
    timeout: std::time::Duration,
) -> Result<Vec<String>, SimulatedError> {
    let names = node_names(prefix, count);
    tokio::spawn({
        let (client, prefix) = (client.clone(), prefix.to_owned());
        async move { run(client, &prefix, count, std::future::pending()).await }
    });
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client);
    let deadline = tokio::time::Instant::now() + timeout;
    for name in &names {
        loop {
            let ready = nodes.get_opt(name).await?.is_some_and(|n| {
                n.status
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            if ready {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SimulatedError::NotReady(name.clone()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    Ok(names)
}

/// Runs `count` simulated nodes until `shutdown` resolves.
pub async fn run(
    client: Client,
    prefix: &str,
    count: usize,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    run_with(
        client,
        prefix,
        count,
        NodeConfig::new("", "").lease_renew,
        shutdown,
    )
    .await;
}

/// Runs `count` simulated nodes renewing their Leases every `lease_renew` (tests of node
/// lifecycle use short periods) until `shutdown` resolves — which, for the control plane,
/// is the nodes going silent: their pods stay as they were.
pub async fn run_with(
    client: Client,
    prefix: &str,
    count: usize,
    lease_renew: std::time::Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let names = node_names(prefix, count);
    let host = HostInfo::read();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for name in &names {
        let mut config = NodeConfig::new(name.clone(), "127.0.0.1");
        config.lease_renew = lease_renew;
        let heartbeat = Heartbeat::new(client.clone(), config, host.clone());
        let mut stopped = stopped.clone();
        tasks.push(tokio::spawn(heartbeat.run(async move {
            let _ = stopped.wait_for(|s| *s).await;
        })));
    }
    let nodes: Arc<BTreeSet<String>> = Arc::new(names.into_iter().collect());
    let pods: Api<Pod> = Api::all(client.clone());
    let sync = watcher(pods, watcher::Config::default())
        .default_backoff()
        .applied_objects()
        .for_each_concurrent(16, |pod| {
            let client = client.clone();
            let nodes = Arc::clone(&nodes);
            async move {
                match pod {
                    Ok(pod) => {
                        if let Err(error) = sync_pod(&client, &nodes, &pod).await {
                            tracing::debug!(pod = %pod.name_any(), %error, "simulated pod sync failed");
                        }
                    }
                    Err(error) => tracing::warn!(%error, "pod watch failing; retrying"),
                }
            }
        });
    tokio::select! {
        () = sync => {}
        () = shutdown => {}
    }
    let _ = stop.send(true);
    for task in tasks {
        let _ = task.await;
    }
}

/// The annotation that makes a simulated pod's containers exit, with this code, once it
/// runs (Job pods in tests and benchmarks); without it a pod runs until deleted.
pub const EXIT_CODE: &str = "sim.orquestra.dev/exit-code";

/// Brings one pod to where a kubelet with instant containers would have it.
async fn sync_pod(client: &Client, nodes: &BTreeSet<String>, pod: &Pod) -> Result<(), kube::Error> {
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
        return Ok(());
    };
    if !nodes.contains(node) {
        return Ok(());
    }
    let ns = pod.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    let terminal = matches!(phase, Some("Succeeded" | "Failed"));
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    if pod.metadata.deletion_timestamp.is_some() {
        // As the real agent: a deleted pod ends Failed before it goes, for whoever holds a
        // finalizer on it.
        if !terminal {
            let failed = json!({"status": {"phase": "Failed"}});
            let _ = api
                .patch_status(&pod.name_any(), &params, &Patch::Merge(failed))
                .await;
        }
        api.delete(&pod.name_any(), &DeleteParams::default().grace_period(0))
            .await
            .map(|_| ())
            .or_else(|e| match e {
                kube::Error::Api(s) if s.code == 404 => Ok(()),
                e => Err(e),
            })?;
        return Ok(());
    }
    let exit_code = pod
        .annotations()
        .get(EXIT_CODE)
        .and_then(|c| c.parse::<i32>().ok());
    if terminal || (phase == Some("Running") && exit_code.is_none()) {
        return Ok(());
    }
    if let (Some("Running"), Some(code)) = (phase, exit_code) {
        return finish(&api, pod, code, &params).await;
    }
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let uid = pod.uid().unwrap_or_default();
    let containers: Vec<serde_json::Value> = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image.clone().unwrap_or_default(), "imageID": "",
                "containerID": format!("simulated://{uid}-{}", c.name),
                "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": now}},
            })
        })
        .collect();
    let condition = |type_: &str| json!({"type": type_, "status": "True", "lastTransitionTime": now, "lastProbeTime": null});
    let status = json!({
        "status": {
            "phase": "Running",
            "conditions": [condition("PodScheduled"), condition("Initialized"),
                           condition("ContainersReady"), condition("Ready")],
            "containerStatuses": containers,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": pod_ip(&uid),
            "podIPs": [{"ip": pod_ip(&uid)}],
            "startTime": now,
            "qosClass": "BestEffort",
        }
    });
    api.patch_status(&pod.name_any(), &params, &Patch::Merge(status))
        .await?;
    Ok(())
}

/// A running pod whose containers all exit with `code`: `Succeeded` for 0, else `Failed`.
async fn finish(
    api: &Api<Pod>,
    pod: &Pod,
    code: i32,
    params: &PatchParams,
) -> Result<(), kube::Error> {
    let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let containers: Vec<serde_json::Value> = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "imageID": c.image_id,
                "containerID": c.container_id, "ready": false, "started": false,
                "restartCount": c.restart_count,
                "state": {"terminated": {"exitCode": code, "finishedAt": now,
                    "reason": if code == 0 { "Completed" } else { "Error" }}},
            })
        })
        .collect();
    let phase = if code == 0 { "Succeeded" } else { "Failed" };
    let not_ready = |type_: &str| json!({"type": type_, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now, "lastProbeTime": null});
    let status = json!({"status": {
        "phase": phase,
        "containerStatuses": containers,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now, "lastProbeTime": null},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now, "lastProbeTime": null},
            not_ready("ContainersReady"), not_ready("Ready"),
        ],
    }});
    api.patch_status(&pod.name_any(), params, &Patch::Merge(status))
        .await?;
    Ok(())
}

/// A stable fake pod IP in 10.244.0.0/16 from the pod's uid.
fn pod_ip(uid: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    uid.hash(&mut hasher);
    let n = hasher.finish();
    format!("10.244.{}.{}", (n >> 8) & 0xff, (n & 0xfe).max(2))
}
