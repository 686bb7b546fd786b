//! The Endpoints and EndpointSlice controllers with the scheduler and the ReplicaSet
//! controller against the real API server in-process and simulated nodes: a Service with a
//! named targetPort over a ReplicaSet's pods lists every ready pod's IP with the resolved
//! port (Endpoints and slices alike), scaling down removes addresses, a pod turned not ready
//! moves to `notReadyAddresses`, and deleting the Service deletes its Endpoints and slices.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use orquestra_operator::Manager;
use orquestra_operator::testing::{TestApi, wait_gone};
use serde_json::json;

/// The IPs of the running, not terminating pods of `app=web`.
async fn pod_ips(pods: &Api<Pod>) -> BTreeSet<String> {
    pods.list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| p.status.and_then(|s| s.pod_ip))
        .collect()
}

/// (ready IPs, not ready IPs, ports) of the Endpoints `web`, if any.
type Listed = (BTreeSet<String>, BTreeSet<String>, BTreeSet<i32>);

fn listed(ep: &Endpoints) -> Listed {
    let mut out = Listed::default();
    for s in ep.subsets.iter().flatten() {
        out.0
            .extend(s.addresses.iter().flatten().map(|a| a.ip.clone()));
        out.1
            .extend(s.not_ready_addresses.iter().flatten().map(|a| a.ip.clone()));
        out.2.extend(s.ports.iter().flatten().map(|p| p.port));
    }
    out
}

/// (ready IPs, not ready IPs, ports) over the slices of Service `web`.
async fn sliced(slices: &Api<EndpointSlice>) -> (Listed, Vec<EndpointSlice>) {
    let items = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
        .await
        .unwrap()
        .items;
    let mut out = Listed::default();
    for s in &items {
        for e in s.endpoints.iter().flatten() {
            let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
            let set = if ready { &mut out.0 } else { &mut out.1 };
            set.extend(e.addresses.iter().cloned());
        }
        out.2
            .extend(s.ports.iter().flatten().filter_map(|p| p.port));
    }
    (out, items)
}

/// Waits until both the Endpoints and the slices list exactly `want`.
async fn wait_listed(
    endpoints: &Api<Endpoints>,
    slices: &Api<EndpointSlice>,
    want: &Listed,
    what: &str,
) -> Vec<EndpointSlice> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ep = endpoints.get_opt("web").await.unwrap().map(|e| listed(&e));
        let (sl, items) = sliced(slices).await;
        if ep.as_ref() == Some(want) && &sl == want {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: want {want:?}\n endpoints have {ep:?}\n slices have {sl:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_running(pods: &Api<Pod>, n: usize) -> BTreeSet<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ips = pod_ips(pods).await;
        let all = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .unwrap()
            .items
            .len();
        if ips.len() == n && all == n {
            return ips;
        }
        assert!(
            Instant::now() < deadline,
            "want {n} pods with IPs, have {} ({all} pods)",
            ips.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_the_pods() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    orquestra_node_agent::simulated::spawn_ready(client.clone(), "sim", 2, Duration::from_secs(20))
        .await
        .unwrap();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::scheduler::add(&mut manager).unwrap();
    orquestra_controllers::workloads::replicaset::add(&mut manager);
    orquestra_controllers::services::endpoints::add(&mut manager);
    orquestra_controllers::services::endpointslice::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"team": "a"}},
        "spec": {"selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": "web-port"}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    // A Service without a selector is left alone: its Endpoints are the user's.
    let manual: Service = serde_json::from_value(json!({
        "metadata": {"name": "manual"},
        "spec": {"ports": [{"port": 80}]},
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &manual)
        .await
        .unwrap();
    let users: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "manual"},
        "subsets": [{"addresses": [{"ip": "192.0.2.1"}], "ports": [{"port": 9000}]}],
    }))
    .unwrap();
    let users = endpoints
        .create(&PostParams::default(), &users)
        .await
        .unwrap();

    // Selecting nothing yet: an empty Endpoints and one empty placeholder slice.
    let items = wait_listed(&endpoints, &slices, &Listed::default(), "no pods yet").await;
    assert_eq!(items.len(), 1, "one placeholder slice: {items:#?}");

    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"replicas": 4, "selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox",
                                  "ports": [{"name": "web-port", "containerPort": 8080}]}]}}},
    }))
    .unwrap();
    sets.create(&PostParams::default(), &rs).await.unwrap();
    let ips = wait_running(&pods, 4).await;
    let items = wait_listed(
        &endpoints,
        &slices,
        &(ips.clone(), BTreeSet::new(), [8080].into()),
        "four ready pods",
    )
    .await;

    // The Endpoints: labelled as kube's, every address with its node and pod.
    let ep = endpoints.get("web").await.unwrap();
    let labels = ep.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("endpointslice.kubernetes.io/skip-mirror")
            .map(String::as_str),
        Some("true")
    );
    assert_eq!(labels.get("team").map(String::as_str), Some("a"));
    let subset = &ep.subsets.as_ref().unwrap()[0];
    let port = &subset.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.port, port.protocol.as_deref()),
        (Some("http"), 8080, Some("TCP"))
    );
    for a in subset.addresses.iter().flatten() {
        assert!(
            a.node_name.as_deref().is_some_and(|n| n.starts_with("sim")),
            "{a:?}"
        );
        let target = a.target_ref.as_ref().unwrap();
        assert_eq!(target.kind.as_deref(), Some("Pod"));
        assert!(target.name.as_deref().unwrap().starts_with("web-"));
    }

    // The slice: named after the Service, owned by it, labelled as kube's.
    assert_eq!(items.len(), 1, "{items:#?}");
    let slice = &items[0];
    assert!(slice.metadata.name.as_deref().unwrap().starts_with("web-"));
    assert_eq!(slice.address_type, "IPv4");
    let slice_labels = slice.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        slice_labels
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("endpointslice-controller.k8s.io")
    );
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Service", "web")
    );
    for e in slice.endpoints.iter().flatten() {
        let c = e.conditions.as_ref().unwrap();
        assert_eq!(
            (c.ready, c.serving, c.terminating),
            (Some(true), Some(true), Some(false))
        );
        assert!(e.node_name.is_some() && e.target_ref.is_some());
    }

    // Quiet once settled: no writes while nothing changes.
    let (ep_rv, slice_rv) = (
        ep.metadata.resource_version.clone(),
        slice.metadata.resource_version.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        endpoints
            .get("web")
            .await
            .unwrap()
            .metadata
            .resource_version,
        ep_rv,
        "the Endpoints were rewritten without a change"
    );
    let (_, again) = sliced(&slices).await;
    assert_eq!(
        again[0].metadata.resource_version, slice_rv,
        "the slice was rewritten"
    );

    // A pod that is no longer ready moves to notReadyAddresses (and ready=false).
    let all = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    let sick = &all[0];
    let sick_ip = sick.status.as_ref().unwrap().pod_ip.clone().unwrap();
    pods.patch_status(
        sick.metadata.name.as_deref().unwrap(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": [
            {"type": "Ready", "status": "False"}, {"type": "ContainersReady", "status": "False"}]}})),
    )
    .await
    .unwrap();
    let mut ready = ips.clone();
    ready.remove(&sick_ip);
    wait_listed(
        &endpoints,
        &slices,
        &(ready, [sick_ip.clone()].into(), [8080].into()),
        "one pod not ready",
    )
    .await;

    // Scaling down removes addresses.
    // Retried on 409: the API server answers a PATCH racing another write (the
    // controller's status) with a Conflict rather than retrying it as kube-apiserver does.
    let scale = Patch::Merge(json!({"spec": {"replicas": 1}}));
    let mut tries = 0;
    while let Err(e) = sets.patch("web", &PatchParams::default(), &scale).await {
        tries += 1;
        assert!(
            tries < 20 && matches!(&e, kube::Error::Api(s) if s.code == 409),
            "scaling down: {e}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_running(&pods, 1).await;
    let left = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap()
        .items;
    let left_ip = left[0].status.as_ref().unwrap().pod_ip.clone().unwrap();
    let want = if left_ip == sick_ip {
        ([].into(), [left_ip].into(), [8080].into())
    } else {
        ([left_ip].into(), [].into(), [8080].into())
    };
    wait_listed(&endpoints, &slices, &want, "scaled down to one").await;

    // The user's Endpoints of the selector-less Service were never touched.
    assert_eq!(
        endpoints
            .get("manual")
            .await
            .unwrap()
            .metadata
            .resource_version,
        users.metadata.resource_version,
        "the Endpoints of a Service without a selector were touched"
    );

    // Deleting the Service deletes its Endpoints and slices — but not the user's Endpoints
    // of a deleted selector-less Service.
    services
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    services
        .delete("manual", &DeleteParams::default())
        .await
        .unwrap();
    wait_gone(&endpoints, "web", Duration::from_secs(20))
        .await
        .expect("the Endpoints of a deleted Service are deleted");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, items) = sliced(&slices).await;
        if items.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "slices of a deleted Service left: {:?}",
            items.iter().map(|s| &s.metadata.name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        endpoints.get_opt("manual").await.unwrap().is_some(),
        "unmanaged Endpoints were deleted"
    );
}
