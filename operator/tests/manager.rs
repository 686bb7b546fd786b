//! The manager against the in-process API server: one watch per kind however many
//! controllers read it, /metrics with controller-runtime's series, /healthz and /readyz, and
//! a graceful shutdown.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::ResourceExt;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use orquestra_operator::testing::{TestApi, http_get};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

#[derive(Default)]
struct Counts {
    first: AtomicUsize,
    second: AtomicUsize,
    secrets: AtomicUsize,
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_get(addr, path).await.unwrap()
}

#[tokio::test]
async fn shared_caches_metrics_health_and_graceful_shutdown() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    for i in 0..5 {
        let cm: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let counts = Arc::new(Counts::default());

    let mut manager = Manager::new(client.clone());
    let configmaps = manager.cache::<ConfigMap>(watcher::Config::default());
    let again = manager.cache::<ConfigMap>(watcher::Config::default());
    let secrets = manager.cache::<Secret>(watcher::Config::default());

    let second = Controller::for_shared_stream(again.subscribe().unwrap(), again.store());
    // Secrets are also reconciled when the ConfigMap of the same name changes.
    let third = Runner::for_cache("secrets", &secrets)
        .unwrap()
        .watches(&again, |cm: Arc<ConfigMap>| {
            let mut secret = ObjectRef::<Secret>::new(&cm.name_any());
            if let Some(ns) = cm.namespace() {
                secret = secret.within(&ns);
            }
            Some(secret)
        })
        .unwrap();
    manager.add(
        Runner::for_cache("first", &configmaps).unwrap(),
        |_: Arc<ConfigMap>, c: Arc<Counts>| async move {
            c.first.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Never>(Action::await_change())
        },
        Arc::clone(&counts),
    );
    manager.add(
        Runner::new("second", second),
        |_: Arc<ConfigMap>, c: Arc<Counts>| async move {
            c.second.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Never>(Action::await_change())
        },
        Arc::clone(&counts),
    );
    manager.add(
        third,
        |_: Arc<Secret>, c: Arc<Counts>| async move {
            c.secrets.fetch_add(1, Ordering::Relaxed);
            Ok::<_, Never>(Action::await_change())
        },
        Arc::clone(&counts),
    );

    let watches_before = api.server().engine().cache().watches();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(manager.run_on(listener, async move {
        let _ = stopped.await;
    }));

    // Both ConfigMap controllers see every ConfigMap, through one cache.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts.first.load(Ordering::Relaxed) < 5 || counts.second.load(Ordering::Relaxed) < 5 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "controllers reconcile"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(configmaps.store().state().len(), 5);
    assert_eq!(
        api.server().engine().cache().watches() - watches_before,
        2,
        "one watch per kind (ConfigMaps, Secrets), not one per controller"
    );
    assert!(
        configmaps.subscribe().is_none(),
        "subscribing after run is refused"
    );

    // Health and metrics.
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (code, why) = get(addr, "/readyz").await;
        if code == 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ready once caches sync: {why}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (code, metrics) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for series in [
        "controller_runtime_reconcile_total{controller=\"first\",result=\"success\"} 5",
        "controller_runtime_reconcile_total{controller=\"second\",result=\"success\"} 5",
        "controller_runtime_active_workers{controller=\"secrets\"} 0",
        "controller_runtime_reconcile_time_seconds_count{controller=\"first\"} 5",
        // The runner built from the cache sees its queue.
        "workqueue_adds_total{name=\"first\"} 5",
        "workqueue_depth{name=\"first\"} 0",
        "workqueue_queue_duration_seconds_count{name=\"first\"} 5",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }

    // A ConfigMap change reconciles the Secret of that name (watches), and only once the
    // Secret exists (a reconcile is for an object that is there).
    let secrets_api: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret: Secret = serde_json::from_value(json!({"metadata": {"name": "c1"}})).unwrap();
    secrets_api
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts.secrets.load(Ordering::Relaxed) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the secret is reconciled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = counts.secrets.load(Ordering::Relaxed);
    cms.patch(
        "c1",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while counts.secrets.load(Ordering::Relaxed) <= before {
        assert!(
            tokio::time::Instant::now() < deadline,
            "watches triggers the secret"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Graceful shutdown: run returns.
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), run)
        .await
        .expect("the manager stops")
        .unwrap()
        .unwrap();
}

/// Deleted objects reach `Cache::deletions` (which `Runner::watches_deleted` reads), with
/// their last state; `subscribe` never announces them.
#[tokio::test]
async fn deletions_are_announced() {
    use futures::StreamExt;
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut manager = Manager::new(client.clone());
    let configmaps = manager.cache::<ConfigMap>(watcher::Config::default());
    let mut deleted = configmaps.deletions().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "doomed"}, "data": {"k": "v"}}))
            .unwrap();
    cms.create(&PostParams::default(), &cm).await.unwrap();
    // Deleted only once the cache has it, so that the watch sees a Delete.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while configmaps
        .store()
        .get(&ObjectRef::new("doomed").within("default"))
        .is_none()
    {
        assert!(tokio::time::Instant::now() < deadline, "never cached");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cms.delete("doomed", &Default::default()).await.unwrap();
    let gone = tokio::time::timeout(Duration::from_secs(10), deleted.next())
        .await
        .expect("the deletion is announced")
        .unwrap();
    assert_eq!(gone.name_any(), "doomed");
    assert_eq!(
        gone.data
            .as_ref()
            .and_then(|d| d.get("k"))
            .map(String::as_str),
        Some("v")
    );
}

/// A subscriber that hears of an object only after it was deleted still gets it (as it
/// was), and everything after it. (kube-runtime's shared `ReflectHandle` answered `Pending`
/// without a wake-up for an object already gone from the store: the subscriber stopped for
/// good, and once its buffer filled, the watch and every controller on the cache with it.)
#[tokio::test]
async fn a_subscriber_late_to_a_deleted_object_keeps_flowing() {
    use futures::StreamExt;
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut manager = Manager::new(client.clone());
    let configmaps = manager.cache::<ConfigMap>(watcher::Config::default());
    let mut changed = configmaps.subscribe().unwrap();
    let mut deleted = configmaps.deletions().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    };
    cms.create(&PostParams::default(), &cm("brief"))
        .await
        .unwrap();
    // Not reading `changed` until "brief" is gone from the cache, then "after" exists.
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let _ = cms.delete("brief", &Default::default()).await;
            if let Ok(Some(gone)) =
                tokio::time::timeout(Duration::from_millis(200), deleted.next()).await
            {
                break gone;
            }
        }
    })
    .await
    .expect("the deletion is announced");
    assert_eq!(gone.name_any(), "brief");
    cms.create(&PostParams::default(), &cm("after"))
        .await
        .unwrap();
    let mut names = Vec::new();
    let seen_after = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(object) = changed.next().await {
            names.push(object.name_any());
            if object.name_any() == "after" {
                return;
            }
        }
    })
    .await;
    assert!(seen_after.is_ok(), "the subscriber stalled after {names:?}");
    assert_eq!(names.first().map(String::as_str), Some("brief"));
}

/// A reconciler that hangs on ConfigMaps labelled `hang=true` until told to stop hanging.
async fn maybe_hang(
    cm: Arc<ConfigMap>,
    release: Arc<tokio::sync::watch::Receiver<bool>>,
) -> Result<Action, Never> {
    if cm.labels().get("hang").map(String::as_str) == Some("true") {
        let mut release = (*release).clone();
        let _ = release.wait_for(|released| *released).await;
    }
    Ok(Action::await_change())
}

#[tokio::test]
async fn a_hung_reconcile_is_cancelled_and_readyz_names_the_stalled_controller() {
    let api = TestApi::start().await.unwrap();
    let client = api.client();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let mut manager = Manager::new(client.clone());
    let configmaps = manager.cache::<ConfigMap>(watcher::Config::default());
    // One worker: while it hangs, everything else waits behind it.
    let runner = Runner::for_cache("hangs", &configmaps)
        .unwrap()
        .concurrency(1)
        .reconcile_timeout(Duration::from_secs(3))
        .stall_after(Duration::from_secs(1));
    let (release, released) = tokio::sync::watch::channel(false);
    manager.add(runner, maybe_hang, Arc::new(released));
    let health = manager.health();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    let eventually = |what: &'static str, check: Box<dyn Fn() -> bool + Send>| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ready = || async move { get(addr, "/readyz").await };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ready().await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "ready at first");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let cm = |name: &str, hang: bool| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name,
            "labels": {"hang": hang.to_string()}}}))
        .unwrap()
    };
    cms.create(&PostParams::default(), &cm("stuck", true))
        .await
        .unwrap();
    cms.create(&PostParams::default(), &cm("waiting", false))
        .await
        .unwrap();

    // Stalled: /readyz names the controller, and so does the manager's health handle.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (code, why) = loop {
        let (code, why) = ready().await;
        if code == 503 {
            break (code, why);
        }
        assert!(tokio::time::Instant::now() < deadline, "stall reported");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(code, 503);
    assert!(why.contains("controller hangs"), "{why}");
    assert!(
        health
            .controllers()
            .unwrap_err()
            .contains("controller hangs")
    );

    // Cancelled at its time limit, counted, and retried; the object behind it gets its turn.
    let metric = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = get(addr, "/metrics").await;
        if metric(
            &text,
            "controller_runtime_reconcile_timeouts_total{controller=\"hangs\"}",
        ) >= 1.0
            && metric(
                &text,
                "controller_runtime_reconcile_total{controller=\"hangs\",result=\"success\"}",
            ) >= 1.0
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cancelled and moved on: {text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Once the reconciler stops hanging, the runner progresses and is ready again.
    release.send(true).unwrap();
    eventually(
        "ready again",
        Box::new(move || health.controllers().is_ok()),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while ready().await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz ready again"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
