//! Namespace lifecycle and deletion propagation in the API server, as kube-rs sees them:
//! deleting a namespace makes it Terminating until its `spec.finalizers` are taken off
//! through `namespaces/<name>/finalize`; nothing new may be created in it meanwhile; the
//! Orphan and Foreground policies leave the object for the garbage collector.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, PropagationPolicy};
use kube::core::Status;
use kube::{Api, ResourceExt};
use serde_json::json;

mod common;

use common::cluster;

fn namespace(name: &str) -> Namespace {
    serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
}

fn configmap(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"metadata": {"name": name}, "data": {"a": "1"}})).unwrap()
}

fn status(error: kube::Error) -> Status {
    match error {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn finalizers(ns: &Namespace) -> Vec<String> {
    ns.spec
        .as_ref()
        .and_then(|s| s.finalizers.clone())
        .unwrap_or_default()
}

fn phase(ns: &Namespace) -> Option<String> {
    ns.status.as_ref().and_then(|s| s.phase.clone())
}

#[tokio::test]
async fn a_deleted_namespace_terminates_until_finalized() {
    let c = cluster().await;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    let created = namespaces
        .create(&PostParams::default(), &namespace("doomed"))
        .await
        .unwrap();
    assert_eq!(finalizers(&created), ["kubernetes"]);
    assert_eq!(phase(&created).as_deref(), Some("Active"));
    let configmaps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "doomed");
    configmaps
        .create(&PostParams::default(), &configmap("early"))
        .await
        .unwrap();

    // A PUT of the namespace cannot drop the controller's finalizer.
    let mut edited = namespaces.get("doomed").await.unwrap();
    edited.spec = None;
    let replaced = namespaces
        .replace("doomed", &PostParams::default(), &edited)
        .await
        .unwrap();
    assert_eq!(finalizers(&replaced), ["kubernetes"]);

    // Delete: 200 with the namespace, marked and Terminating; it stays.
    let deleted = namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .expect("the namespace itself, not a Status");
    assert!(deleted.metadata.deletion_timestamp.is_some());
    assert_eq!(phase(&deleted).as_deref(), Some("Terminating"));
    let kept = namespaces.get("doomed").await.unwrap();
    assert_eq!(phase(&kept).as_deref(), Some("Terminating"));
    assert_eq!(kept.uid(), created.uid());
    // Deleting it again changes nothing.
    let again = namespaces
        .delete("doomed", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert_eq!(again.resource_version(), kept.resource_version());

    // Nothing new in it: 403 with kube-apiserver's message and cause.
    let refused = status(
        configmaps
            .create(&PostParams::default(), &configmap("late"))
            .await
            .unwrap_err(),
    );
    assert_eq!((refused.reason.as_str(), refused.code), ("Forbidden", 403));
    assert_eq!(
        refused.message,
        "configmaps \"late\" is forbidden: unable to create new content in namespace doomed \
         because it is being terminated"
    );
    let details = refused.details.unwrap();
    assert_eq!(details.kind, "configmaps");
    assert_eq!(details.name, "late");
    assert_eq!(details.causes[0].reason, "NamespaceTerminating");
    assert_eq!(details.causes[0].field, "metadata.namespace");
    let mut generated = configmap("");
    generated.metadata.name = None;
    generated.metadata.generate_name = Some("gen-".into());
    let refused = status(
        configmaps
            .create(&PostParams::default(), &generated)
            .await
            .unwrap_err(),
    );
    assert!(
        refused
            .message
            .starts_with("configmaps \"gen-\" is forbidden"),
        "{}",
        refused.message
    );
    // A grouped resource is named with its group in the message, as kube-apiserver does.
    let sets: Api<k8s_openapi::api::apps::v1::ReplicaSet> =
        Api::namespaced(c.client.clone(), "doomed");
    let rs = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"app": "web"}},
                 "template": {"metadata": {"labels": {"app": "web"}},
                              "spec": {"containers": [{"name": "app", "image": "busybox"}]}}},
    }))
    .unwrap();
    let refused = status(sets.create(&PostParams::default(), &rs).await.unwrap_err());
    assert!(
        refused
            .message
            .starts_with("replicasets.apps \"web\" is forbidden: unable to create new content"),
        "{}",
        refused.message
    );
    let details = refused.details.unwrap();
    assert_eq!(
        (details.group.as_str(), details.kind.as_str()),
        ("apps", "replicasets")
    );
    // What is there can still be changed and deleted.
    configmaps
        .patch(
            "early",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"a": "2"}})),
        )
        .await
        .unwrap();
    configmaps
        .delete("early", &DeleteParams::default())
        .await
        .unwrap();

    // finalize takes only spec.finalizers; emptying them removes the namespace.
    let mut body = kept.clone();
    body.metadata.labels = Some([("ignored".to_owned(), "yes".to_owned())].into());
    body.spec.as_mut().unwrap().finalizers = Some(vec![]);
    let finalized: Namespace = namespaces
        .replace_subresource("finalize", "doomed", &PostParams::default(), &body)
        .await
        .unwrap();
    assert!(finalizers(&finalized).is_empty());
    assert!(finalized.labels().get("ignored").is_none());
    assert!(namespaces.get_opt("doomed").await.unwrap().is_none());
}

#[tokio::test]
async fn finalize_is_a_subresource_of_namespaces_only() {
    let c = cluster().await;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    namespaces
        .create(&PostParams::default(), &namespace("kept"))
        .await
        .unwrap();
    // On a live namespace it just sets the finalizers.
    let mut body = namespace("kept");
    body.spec = Some(k8s_openapi::api::core::v1::NamespaceSpec {
        finalizers: Some(vec!["example.com/x".into(), "kubernetes".into()]),
    });
    let updated: Namespace = namespaces
        .replace_subresource("finalize", "kept", &PostParams::default(), &body)
        .await
        .unwrap();
    assert_eq!(finalizers(&updated), ["example.com/x", "kubernetes"]);
    assert!(namespaces.get_opt("kept").await.unwrap().is_some());
    // Not for other kinds.
    let configmaps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    configmaps
        .create(&PostParams::default(), &configmap("cm"))
        .await
        .unwrap();
    let missing = status(
        configmaps
            .replace_subresource("finalize", "cm", &PostParams::default(), &configmap("cm"))
            .await
            .unwrap_err(),
    );
    assert_eq!(missing.code, 404);
    // A namespace without finalizers goes at once.
    let mut bare = namespace("bare");
    bare.spec = Some(Default::default());
    namespaces
        .create(&PostParams::default(), &bare)
        .await
        .unwrap();
    let mut emptied = namespaces.get("bare").await.unwrap();
    emptied.spec.as_mut().unwrap().finalizers = Some(vec![]);
    namespaces
        .replace_subresource("finalize", "bare", &PostParams::default(), &emptied)
        .await
        .unwrap();
    namespaces
        .delete("bare", &DeleteParams::default())
        .await
        .unwrap();
    assert!(namespaces.get_opt("bare").await.unwrap().is_none());

    // Discovery lists the subresource (kube-rs reads subresources from it).
    let (code, body) = c.raw_get("/api/v1").await;
    assert_eq!(code, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let finalize = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "namespaces/finalize")
        .expect("namespaces/finalize in discovery");
    assert_eq!(finalize["verbs"], json!(["update"]));
}

#[tokio::test]
async fn orphan_and_foreground_leave_the_owner_to_the_garbage_collector() {
    let c = cluster().await;
    let configmaps: Api<ConfigMap> = Api::namespaced(c.client.clone(), "default");
    for name in ["orphaned", "foreground", "background"] {
        configmaps
            .create(&PostParams::default(), &configmap(name))
            .await
            .unwrap();
    }
    for (name, policy, finalizer) in [
        ("orphaned", PropagationPolicy::Orphan, "orphan"),
        (
            "foreground",
            PropagationPolicy::Foreground,
            "foregroundDeletion",
        ),
    ] {
        let marked = configmaps
            .delete(
                name,
                &DeleteParams {
                    propagation_policy: Some(policy),
                    ..DeleteParams::default()
                },
            )
            .await
            .unwrap()
            .left()
            .unwrap();
        assert!(marked.metadata.deletion_timestamp.is_some());
        assert_eq!(marked.finalizers(), [finalizer]);
        assert!(configmaps.get_opt(name).await.unwrap().is_some());
    }
    // Background, the default: gone at once.
    configmaps
        .delete(
            "background",
            &DeleteParams {
                propagation_policy: Some(PropagationPolicy::Background),
                ..DeleteParams::default()
            },
        )
        .await
        .unwrap();
    assert!(configmaps.get_opt("background").await.unwrap().is_none());
}
