//! The Runner against the real API server in-process: reconciles converge, metrics carry
//! controller-runtime's names, and a reconciler that panics or fails neither stops the
//! controller nor its other objects — it is retried with backoff and counted.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::Controller;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use orquestra_operator::testing::{TestApi, wait_for};
use orquestra_operator::{Backoff, ControllerMetrics, Runner};
use prometheus::Registry;
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

struct Ctx {
    client: kube::Client,
}

async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, Failure> {
    let name = cm.metadata.name.clone().unwrap_or_default();
    match name.as_str() {
        "boom" => panic!("reconciler bug on {name}"),
        "bad" => return Err(Failure("cannot reconcile bad".into())),
        _ => {}
    }
    let ns = cm.metadata.namespace.clone().unwrap_or_default();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    let value = cm
        .data
        .as_ref()
        .and_then(|d| d.get("want"))
        .cloned()
        .unwrap_or_default();
    let patch = json!({"metadata": {"annotations": {"example.com/seen": value}}});
    api.patch(
        &name,
        &PatchParams::apply("runner-test"),
        &Patch::Apply(patch),
    )
    .await
    .map_err(|e| Failure(e.to_string()))?;
    Ok(Action::await_change())
}

fn configmap(name: &str, want: &str) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "data": {"want": want},
    }))
    .unwrap()
}

fn value(registry: &Registry, name: &str, labels: &[(&str, &str)]) -> f64 {
    registry
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric().iter())
        .filter(|metric| {
            labels.iter().all(|(k, v)| {
                metric
                    .get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|metric| metric.get_counter().get_value() + metric.get_gauge().get_value())
        .sum()
}

#[tokio::test]
async fn reconciles_converge_and_failures_are_contained_and_counted() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let registry = Registry::new();
    let metrics = ControllerMetrics::register(&registry).unwrap();
    let controller = Controller::new(cms.clone(), watcher::Config::default());
    let runner = Runner::new("configmaps", controller)
        .concurrency(4)
        .backoff(Backoff {
            base: Duration::from_millis(20),
            max: Duration::from_millis(200),
        });
    let task = tokio::spawn(runner.run(
        reconcile,
        Arc::new(Ctx {
            client: client.clone(),
        }),
        metrics,
    ));

    for (name, want) in [("a", "1"), ("boom", "x"), ("bad", "y"), ("b", "2")] {
        cms.create(&PostParams::default(), &configmap(name, want))
            .await
            .unwrap();
    }
    for (name, want) in [("a", "1"), ("b", "2")] {
        wait_for(&cms, name, Duration::from_secs(10), |cm| {
            cm.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("example.com/seen"))
                .is_some_and(|v| v == want)
        })
        .await
        .unwrap();
    }
    // Level-based: a change is reconciled again.
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"want": "3"}})),
    )
    .await
    .unwrap();
    wait_for(&cms, "a", Duration::from_secs(10), |cm| {
        cm.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("example.com/seen"))
            .is_some_and(|v| v == "3")
    })
    .await
    .unwrap();

    // The failing objects are retried with backoff; the panics are contained and counted.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while value(
        &registry,
        "workqueue_retries_total",
        &[("name", "configmaps")],
    ) < 6.0
    {
        assert!(tokio::time::Instant::now() < deadline, "retries happen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let c = [("controller", "configmaps")];
    assert!(value(&registry, "controller_runtime_reconcile_panics_total", &c) >= 2.0);
    assert!(value(&registry, "controller_runtime_reconcile_errors_total", &c) >= 4.0);
    assert!(
        value(
            &registry,
            "controller_runtime_reconcile_total",
            &[("controller", "configmaps"), ("result", "success")]
        ) >= 5.0,
        "a, b, the SSA-triggered echoes and the change"
    );
    assert_eq!(
        value(
            &registry,
            "controller_runtime_max_concurrent_reconciles",
            &c
        ),
        4.0
    );
    assert!(!task.is_finished(), "the controller keeps running");
    task.abort();
}
