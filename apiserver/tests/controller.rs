//! A kube-runtime Controller against the API server, as a controller author would write one:
//! a finalizer, server-side apply of an owned object, an event recorder, a reflector — and a
//! watcher that survives a compaction by relisting after the in-stream 410.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::{reflector, watcher};

type Events =
    futures::stream::BoxStream<'static, Result<watcher::Event<ConfigMap>, watcher::Error>>;

async fn next(events: &mut Events) -> Result<watcher::Event<ConfigMap>, watcher::Error> {
    tokio::time::timeout(Duration::from_secs(15), events.next())
        .await
        .expect("watcher event")
        .unwrap()
}
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use common::cluster;

const FINALIZER: &str = "example.com/mirror";

#[derive(Debug, thiserror::Error)]
#[error(transparent)]
struct Error(#[from] kube::Error);

struct Ctx {
    client: Client,
    recorder: Recorder,
}

/// Mirrors every ConfigMap labelled `mirror=true` into `<name>-copy`, owned by it; removes
/// the copy (through the finalizer) when the original goes.
async fn reconcile(
    cm: Arc<ConfigMap>,
    ctx: Arc<Ctx>,
) -> Result<Action, kube::runtime::finalizer::Error<Error>> {
    let ns = cm.namespace().unwrap();
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, cm, |event| async {
        match event {
            Finalizer::Apply(cm) => {
                let copy = json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": format!("{}-copy", cm.name_any()),
                                 "ownerReferences": [cm.controller_owner_ref(&()).unwrap()]},
                    "data": cm.data.clone().unwrap_or_default(),
                });
                api.patch(
                    &format!("{}-copy", cm.name_any()),
                    &PatchParams::apply("mirror").force(),
                    &Patch::Apply(copy),
                )
                .await?;
                ctx.recorder
                    .publish(
                        &Event {
                            type_: EventType::Normal,
                            reason: "Mirrored".into(),
                            note: Some("copy is up to date".into()),
                            action: "Mirror".into(),
                            secondary: None,
                        },
                        &cm.object_ref(&()),
                    )
                    .await?;
                Ok(Action::await_change())
            }
            Finalizer::Cleanup(cm) => {
                match api
                    .delete(&format!("{}-copy", cm.name_any()), &DeleteParams::default())
                    .await
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                Ok(Action::await_change())
            }
        }
    })
    .await
}

fn error_policy(
    _: Arc<ConfigMap>,
    _: &kube::runtime::finalizer::Error<Error>,
    _: Arc<Ctx>,
) -> Action {
    Action::requeue(Duration::from_millis(200))
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_with_finalizer_events_and_server_side_apply_converges() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let ctx = Arc::new(Ctx {
        client: c.client.clone(),
        recorder: Recorder::new(c.client.clone(), Reporter::from("mirror-controller")),
    });
    let controller = Controller::new(
        api.clone(),
        watcher::Config::default().labels("mirror=true"),
    );
    // The controller's shared reflector cache, as a controller author would read it.
    let reader = controller.store();
    let controller = controller
        .run(reconcile, error_policy, ctx)
        .for_each(|_| async {});
    let running = tokio::spawn(controller);

    let original: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "settings", "labels": {"mirror": "true"}},
        "data": {"color": "blue"}
    }))
    .unwrap();
    api.create(&PostParams::default(), &original).await.unwrap();

    eventually("the copy exists with the original's data", || async {
        api.get_opt("settings-copy")
            .await
            .unwrap()
            .is_some_and(|copy| {
                copy.data
                    .unwrap_or_default()
                    .get("color")
                    .map(String::as_str)
                    == Some("blue")
            })
    })
    .await;
    let copy = api.get("settings-copy").await.unwrap();
    let owner = &copy.owner_references()[0];
    assert_eq!(owner.name, "settings");
    assert_eq!(owner.uid, api.get("settings").await.unwrap().uid().unwrap());
    assert!(
        api.get("settings")
            .await
            .unwrap()
            .finalizers()
            .contains(&FINALIZER.to_owned())
    );
    assert!(
        reader
            .get(&reflector::ObjectRef::new("settings").within("default"))
            .is_some(),
        "the reflector has it"
    );

    // A change converges too.
    api.patch(
        "settings",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"color": "green"}})),
    )
    .await
    .unwrap();
    eventually("the copy follows the change", || async {
        api.get("settings-copy")
            .await
            .unwrap()
            .data
            .unwrap_or_default()
            .get("color")
            .map(String::as_str)
            == Some("green")
    })
    .await;

    // The recorder's events are there.
    let events: Api<K8sEvent> = Api::namespaced(c.client.clone(), "default");
    eventually("a Mirrored event", || async {
        events
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Mirrored")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("settings")
            })
    })
    .await;

    // Deletion runs the cleanup, then the finalizer goes and with it the object.
    api.delete("settings", &DeleteParams::default())
        .await
        .unwrap();
    eventually("original and copy are gone", || async {
        api.get_opt("settings").await.unwrap().is_none()
            && api.get_opt("settings-copy").await.unwrap().is_none()
    })
    .await;
    running.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_relists_after_its_resume_point_is_compacted() {
    let c = cluster().await;
    let api: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}),
        )
        .unwrap()
    };
    api.create(&PostParams::default(), &cm("first"))
        .await
        .unwrap();
    // Watches end after a second, so the watcher soon resumes from its last resourceVersion.
    let mut events: Events = watcher(api.clone(), watcher::Config::default().timeout(1)).boxed();
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::Init
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitApply(_)
    ));
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));

    // History moves on elsewhere and is compacted past the watcher's resume point.
    let others: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(c.client.clone(), "default");
    for i in 0..5 {
        let secret = serde_json::from_value(
            json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": format!("s{i}")}}),
        )
        .unwrap();
        others
            .create(&PostParams::default(), &secret)
            .await
            .unwrap();
    }
    c.compact_everything().await;

    // The resumed watch gets the in-stream 410; the watcher relists and carries on.
    let mut saw_expired = false;
    loop {
        match next(&mut events).await {
            Err(watcher::Error::WatchError(status)) if status.code == 410 => saw_expired = true,
            Err(other) => panic!("unexpected watcher error: {other}"),
            Ok(watcher::Event::Init) => break,
            Ok(_) => {}
        }
    }
    assert!(
        saw_expired,
        "the watcher was told its resourceVersion is too old"
    );
    assert!(
        matches!(next(&mut events).await.unwrap(), watcher::Event::InitApply(cm) if cm.name_any() == "first")
    );
    assert!(matches!(
        next(&mut events).await.unwrap(),
        watcher::Event::InitDone
    ));
    api.create(&PostParams::default(), &cm("second"))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut events).await.unwrap(), watcher::Event::Apply(cm) if cm.name_any() == "second")
    );
}
