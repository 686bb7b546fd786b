//! Server-side apply with field ownership: managedFields per manager, conflicts (409 with
//! FieldManagerConflict causes) unless forced, removal of fields a manager stops applying,
//! update operations taking fields over, and no-op applies that keep the resourceVersion.

#![allow(clippy::unwrap_used)]

mod common;

use common::cluster;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

fn config(replicas: i32, labels: Value, min_ready: Option<i32>) -> Value {
    let mut spec = json!({
        "replicas": replicas,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        }
    });
    if let Some(min_ready) = min_ready {
        spec["minReadySeconds"] = json!(min_ready);
    }
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "labels": labels},
        "spec": spec,
    })
}

fn managers(d: &Deployment) -> Vec<(String, String)> {
    d.metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|m| (m.manager.unwrap(), m.operation.unwrap()))
        .collect()
}

fn owns(d: &Deployment, manager: &str, pointer: &str) -> bool {
    d.metadata
        .managed_fields
        .clone()
        .unwrap_or_default()
        .iter()
        .filter(|m| m.manager.as_deref() == Some(manager))
        .any(|m| {
            let fields = serde_json::to_value(&m.fields_v1).unwrap();
            fields.pointer(pointer).is_some()
        })
}

async fn apply(
    api: &Api<Deployment>,
    manager: &str,
    force: bool,
    object: Value,
) -> Result<Deployment, kube::Error> {
    let mut params = PatchParams::apply(manager);
    params.force = force;
    api.patch("web", &params, &Patch::Apply(object)).await
}

#[tokio::test]
async fn apply_tracks_owners_conflicts_and_removals() {
    let c = cluster().await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");

    let created = apply(
        &api,
        "alice",
        false,
        config(2, json!({"x": "1", "y": "2"}), None),
    )
    .await
    .unwrap();
    assert_eq!(
        managers(&created),
        [("alice".to_owned(), "Apply".to_owned())]
    );
    assert!(owns(&created, "alice", "/f:spec/f:replicas"));
    assert!(owns(&created, "alice", "/f:metadata/f:labels/f:y"));
    assert!(owns(
        &created,
        "alice",
        "/f:spec/f:template/f:spec/f:containers/k:{\"name\":\"web\"}/f:image"
    ));

    // The same configuration again changes nothing, not even the resourceVersion.
    let again = apply(
        &api,
        "alice",
        false,
        config(2, json!({"x": "1", "y": "2"}), None),
    )
    .await
    .unwrap();
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );

    // A label alice stops applying is removed; the others stay.
    let dropped = apply(&api, "alice", false, config(2, json!({"x": "1"}), None))
        .await
        .unwrap();
    let labels = dropped.metadata.labels.clone().unwrap();
    assert_eq!(labels.get("x").map(String::as_str), Some("1"));
    assert!(!labels.contains_key("y"), "{labels:?}");

    // Bob applying a different replica count conflicts with alice.
    let err = apply(&api, "bob", false, config(3, json!({}), None))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert_eq!((status.reason.as_str(), status.code), ("Conflict", 409));
    assert!(
        status.message.starts_with("Apply failed with 1 conflict")
            && status.message.contains("conflict with \"alice\"")
            && status.message.contains(".spec.replicas"),
        "{}",
        status.message
    );
    assert_eq!(
        api.get("web").await.unwrap().spec.unwrap().replicas,
        Some(2)
    );

    // Applying a value equal to the live one shares ownership; forcing takes it over.
    let shared = apply(&api, "carol", false, config(2, json!({}), None))
        .await
        .unwrap();
    assert!(
        owns(&shared, "carol", "/f:spec/f:replicas")
            && owns(&shared, "alice", "/f:spec/f:replicas")
    );
    let forced = apply(&api, "bob", true, config(3, json!({}), None))
        .await
        .unwrap();
    assert_eq!(forced.spec.as_ref().unwrap().replicas, Some(3));
    assert!(owns(&forced, "bob", "/f:spec/f:replicas"));
    assert!(!owns(&forced, "alice", "/f:spec/f:replicas"));
    assert!(!owns(&forced, "carol", "/f:spec/f:replicas"));
    // Now alice's old configuration conflicts with bob.
    let err = apply(&api, "alice", false, config(2, json!({"x": "1"}), None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409 && s.message.contains("\"bob\""))
    );
}

#[tokio::test]
async fn updates_take_fields_from_appliers() {
    let c = cluster().await;
    let api: Api<Deployment> = Api::namespaced(c.client.clone(), "default");
    apply(&api, "alice", false, config(2, json!({}), Some(5)))
        .await
        .unwrap();
    // An ordinary patch by another manager takes the field it changes.
    let patched = api
        .patch(
            "web",
            &PatchParams {
                field_manager: Some("editor".into()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({"spec": {"minReadySeconds": 9}})),
        )
        .await
        .unwrap();
    assert!(managers(&patched).contains(&("editor".to_owned(), "Update".to_owned())));
    assert!(owns(&patched, "editor", "/f:spec/f:minReadySeconds"));
    assert!(!owns(&patched, "alice", "/f:spec/f:minReadySeconds"));
    // Alice re-applying her value now conflicts with the editor's update.
    let err = apply(&api, "alice", false, config(2, json!({}), Some(5)))
        .await
        .unwrap_err();
    let kube::Error::Api(status) = err else {
        panic!("an API error")
    };
    assert!(
        status
            .message
            .contains("conflict with \"editor\" using apps/v1: .spec.minReadySeconds"),
        "{}",
        status.message
    );
    // A field alice stops applying but the editor also set is kept.
    let kept = apply(&api, "alice", true, config(2, json!({}), None))
        .await
        .unwrap();
    assert_eq!(kept.spec.unwrap().min_ready_seconds, Some(9));
}
