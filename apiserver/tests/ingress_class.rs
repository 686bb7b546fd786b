//! The DefaultIngressClass admission against the real server, in-process: an Ingress
//! created without a class gets the default IngressClass; one naming a class (by field or
//! by the deprecated annotation) keeps it; without a default class nothing is set.

#![allow(clippy::unwrap_used)]

mod common;

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Api, PostParams};
use serde_json::json;

fn ingress(name: &str, extra: serde_json::Value) -> Ingress {
    let mut value = json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name},
        "spec": {"defaultBackend": {"service": {"name": "web", "port": {"number": 80}}}},
    });
    json_patch::merge(&mut value, &extra);
    serde_json::from_value(value).unwrap()
}

#[tokio::test]
async fn ingresses_without_a_class_get_the_default_one() {
    let cluster = common::cluster().await;
    let ingresses: Api<Ingress> = Api::namespaced(cluster.client.clone(), "default");
    let classes: Api<IngressClass> = Api::all(cluster.client.clone());
    let pp = PostParams::default();
    let class_of = |i: &Ingress| i.spec.as_ref().and_then(|s| s.ingress_class_name.clone());

    let before = ingresses
        .create(&pp, &ingress("before", json!({})))
        .await
        .unwrap();
    assert_eq!(class_of(&before), None, "no default class yet");

    for (name, default) in [("other", "false"), ("orquestra", "true")] {
        let class: IngressClass = serde_json::from_value(json!({
            "metadata": {"name": name,
                         "annotations": {"ingressclass.kubernetes.io/is-default-class": default}},
            "spec": {"controller": format!("example.com/{name}")},
        }))
        .unwrap();
        classes.create(&pp, &class).await.unwrap();
    }
    let defaulted = ingresses
        .create(&pp, &ingress("plain", json!({})))
        .await
        .unwrap();
    assert_eq!(class_of(&defaulted).as_deref(), Some("orquestra"));
    let named = ingresses
        .create(
            &pp,
            &ingress("named", json!({"spec": {"ingressClassName": "other"}})),
        )
        .await
        .unwrap();
    assert_eq!(class_of(&named).as_deref(), Some("other"));
    let annotated = ingresses
        .create(
            &pp,
            &ingress(
                "annotated",
                json!({"metadata": {"annotations": {"kubernetes.io/ingress.class": "other"}}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(class_of(&annotated), None, "the annotation names the class");
}
