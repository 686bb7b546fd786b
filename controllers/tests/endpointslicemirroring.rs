//! The EndpointSlice mirroring controller against the real API server in-process: the
//! Endpoints a user writes for a Service without a selector appear as EndpointSlices (per
//! address family, ready and not ready, with the Endpoints' labels and annotations, owned by
//! it), follow its updates, and go when it is deleted, labelled `skip-mirror`, or its
//! Service goes or gains a selector — and come back when that is undone.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use orquestra_operator::Manager;
use orquestra_operator::testing::TestApi;
use serde_json::json;

/// A slice as the test compares it: address type, ports, and (address, ready) endpoints.
type Summary = (String, Vec<i32>, Vec<(String, bool)>);

/// The mirrored slices of Service `custom`, summarized and sorted.
async fn mirrored(slices: &Api<EndpointSlice>) -> (Vec<Summary>, Vec<EndpointSlice>) {
    let items = slices
        .list(&ListParams::default().labels("kubernetes.io/service-name=custom"))
        .await
        .unwrap()
        .items;
    let mut out: Vec<Summary> = items
        .iter()
        .map(|s| {
            let mut ports: Vec<i32> = s.ports.iter().flatten().filter_map(|p| p.port).collect();
            ports.sort();
            let mut endpoints: Vec<(String, bool)> = s
                .endpoints
                .iter()
                .flatten()
                .map(|e| {
                    let ready = e.conditions.as_ref().and_then(|c| c.ready) == Some(true);
                    (e.addresses.join(","), ready)
                })
                .collect();
            endpoints.sort();
            (s.address_type.clone(), ports, endpoints)
        })
        .collect();
    out.sort();
    (out, items)
}

/// Waits until the mirrored slices are exactly `want`; returns them.
async fn wait_mirrored(
    slices: &Api<EndpointSlice>,
    want: &[Summary],
    what: &str,
) -> Vec<EndpointSlice> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (have, items) = mirrored(slices).await;
        if have == want {
            return items;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: want {want:?}\n have {have:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn v4(endpoints: &[(&str, bool)]) -> Summary {
    (
        "IPv4".into(),
        vec![80],
        endpoints.iter().map(|(a, r)| ((*a).into(), *r)).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_endpoints_are_mirrored() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let mut manager = Manager::new(client.clone());
    orquestra_controllers::services::endpointslicemirroring::add(&mut manager);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let endpoints: Api<Endpoints> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");

    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "custom"},
        "spec": {"ports": [{"name": "example", "port": 80}]},
    }))
    .unwrap();
    services.create(&PostParams::default(), &svc).await.unwrap();
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "custom", "labels": {"team": "a"},
                     "annotations": {"note": "x",
                                     "kubectl.kubernetes.io/last-applied-configuration": "{}"}},
        "subsets": [{
            "addresses": [
                {"ip": "10.1.2.3", "hostname": "one", "nodeName": "n1",
                 "targetRef": {"kind": "Pod", "namespace": "default", "name": "p1"}},
                {"ip": "2001:db8::5"}],
            "notReadyAddresses": [{"ip": "10.1.2.4"}],
            "ports": [{"name": "example", "port": 80}]}],
    }))
    .unwrap();
    let ep = endpoints.create(&PostParams::default(), &ep).await.unwrap();

    // Created: one slice per family, ready and not-ready addresses, the Endpoints' metadata.
    let items = wait_mirrored(
        &slices,
        &[
            v4(&[("10.1.2.3", true), ("10.1.2.4", false)]),
            ("IPv6".into(), vec![80], vec![("2001:db8::5".into(), true)]),
        ],
        "created",
    )
    .await;
    let slice = items.iter().find(|s| s.address_type == "IPv4").unwrap();
    let labels = slice.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("endpointslicemirroring-controller.k8s.io")
    );
    assert_eq!(labels.get("team").map(String::as_str), Some("a"));
    let annotations = slice.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations.keys().collect::<Vec<_>>(),
        vec!["note"],
        "kubectl's record is not copied"
    );
    let owner = &slice.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str(), Some(&owner.uid)),
        ("Endpoints", "custom", ep.metadata.uid.as_ref())
    );
    let port = &slice.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.protocol.as_deref()),
        (Some("example"), Some("TCP"))
    );
    let first = slice
        .endpoints
        .iter()
        .flatten()
        .find(|e| e.addresses == ["10.1.2.3"])
        .unwrap();
    assert_eq!(first.hostname.as_deref(), Some("one"));
    assert_eq!(first.node_name.as_deref(), Some("n1"));
    assert_eq!(
        first.target_ref.as_ref().and_then(|t| t.name.as_deref()),
        Some("p1")
    );
    let v4_name = slice.metadata.name.clone().unwrap();

    // Quiet once settled: nothing rewritten while nothing changes.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, again) = mirrored(&slices).await;
    let versions = |items: &[EndpointSlice]| {
        let mut v: Vec<_> = items
            .iter()
            .map(|s| s.metadata.resource_version.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        versions(&again),
        versions(&items),
        "the slices were rewritten"
    );

    // Updated: the IPv4 slice in place, the IPv6 one gone.
    let patch = Patch::Merge(json!({"subsets": [{
        "addresses": [{"ip": "10.2.3.4"}], "ports": [{"name": "example", "port": 80}]}]}));
    endpoints
        .patch("custom", &PatchParams::default(), &patch)
        .await
        .unwrap();
    let items = wait_mirrored(&slices, &[v4(&[("10.2.3.4", true)])], "updated").await;
    assert_eq!(items[0].metadata.name.as_ref(), Some(&v4_name));

    // A mirrored slice deleted by someone else comes back.
    slices
        .delete(&v4_name, &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait_mirrored(&slices, &[v4(&[("10.2.3.4", true)])], "deleted slice").await;

    // skip-mirror: not mirrored while it is there.
    let label = |value: Option<&str>| {
        Patch::Merge(
            json!({"metadata": {"labels": {"endpointslice.kubernetes.io/skip-mirror": value}}}),
        )
    };
    endpoints
        .patch("custom", &PatchParams::default(), &label(Some("true")))
        .await
        .unwrap();
    wait_mirrored(&slices, &[], "skip-mirror").await;
    endpoints
        .patch("custom", &PatchParams::default(), &label(None))
        .await
        .unwrap();
    wait_mirrored(&slices, &[v4(&[("10.2.3.4", true)])], "skip-mirror removed").await;

    // A Service with a selector has the endpoint controller's Endpoints: not mirrored.
    let selector = |value: serde_json::Value| Patch::Merge(json!({"spec": {"selector": value}}));
    services
        .patch(
            "custom",
            &PatchParams::default(),
            &selector(json!({"app": "x"})),
        )
        .await
        .unwrap();
    wait_mirrored(&slices, &[], "selector").await;
    services
        .patch("custom", &PatchParams::default(), &selector(json!(null)))
        .await
        .unwrap();
    wait_mirrored(&slices, &[v4(&[("10.2.3.4", true)])], "selector removed").await;

    // Deleted Endpoints: its slices go.
    endpoints
        .delete("custom", &DeleteParams::default())
        .await
        .unwrap();
    wait_mirrored(&slices, &[], "endpoints deleted").await;

    // Endpoints without a Service are not mirrored; with the Service back they are, and
    // go again with it.
    services
        .delete("custom", &DeleteParams::default())
        .await
        .unwrap();
    let ep: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": "custom"},
        "subsets": [{"addresses": [{"ip": "10.3.4.5"}], "ports": [{"name": "example", "port": 80}]}],
    }))
    .unwrap();
    endpoints.create(&PostParams::default(), &ep).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_mirrored(&slices, &[], "no service").await;
    services.create(&PostParams::default(), &svc).await.unwrap();
    wait_mirrored(&slices, &[v4(&[("10.3.4.5", true)])], "service back").await;
    services
        .delete("custom", &DeleteParams::default())
        .await
        .unwrap();
    wait_mirrored(&slices, &[], "service deleted").await;
}
