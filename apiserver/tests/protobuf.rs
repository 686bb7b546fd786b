//! Protobuf request bodies: objects encoded with k8s-pb (prost types generated from the
//! upstream .proto files), wrapped in the `k8s\0` + runtime.Unknown envelope as client-go
//! does, decoded by the server into the JSON a JSON client would have sent.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use k8s_pb::api::apps::v1 as apps;
use k8s_pb::api::core::v1 as core;
use k8s_pb::apimachinery::pkg::apis::meta::v1 as meta;
use k8s_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
use k8s_pb::apimachinery::pkg::util::intstr::IntOrString;
use orquestra_apiserver::proto;
use prost::Message;
use serde_json::json;

fn envelope(api_version: &str, kind: &str, raw: Vec<u8>) -> Vec<u8> {
    let unknown = Unknown {
        type_meta: Some(TypeMeta {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
        }),
        raw: Some(raw),
        content_encoding: Some(String::new()),
        content_type: Some(String::new()),
    };
    let mut body = proto::MAGIC.to_vec();
    body.extend(unknown.encode_to_vec());
    body
}

#[test]
fn a_deployment_decodes_to_its_json() {
    let deployment = apps::Deployment {
        metadata: Some(meta::ObjectMeta {
            name: Some("web".into()),
            namespace: Some(String::new()), // Go writes unset strings as ""
            labels: [("app".to_owned(), "web".to_owned())].into(),
            creation_timestamp: Some(meta::Time {
                seconds: Some(0),
                nanos: Some(0),
            }),
            ..Default::default()
        }),
        spec: Some(apps::DeploymentSpec {
            replicas: Some(0), // explicitly zero: must survive
            selector: Some(meta::LabelSelector {
                match_labels: [("app".to_owned(), "web".to_owned())].into(),
                ..Default::default()
            }),
            template: Some(core::PodTemplateSpec {
                metadata: Some(meta::ObjectMeta {
                    labels: [("app".to_owned(), "web".to_owned())].into(),
                    ..Default::default()
                }),
                spec: Some(core::PodSpec {
                    containers: vec![core::Container {
                        name: Some("web".into()),
                        image: Some("nginx:1.27".into()),
                        ports: vec![core::ContainerPort {
                            container_port: Some(80),
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                    volumes: vec![core::Volume {
                        name: Some("cache".into()),
                        volume_source: Some(core::VolumeSource {
                            empty_dir: Some(core::EmptyDirVolumeSource::default()),
                            ..Default::default()
                        }),
                    }],
                    ..Default::default()
                }),
            }),
            strategy: Some(apps::DeploymentStrategy {
                r#type: Some("RollingUpdate".into()),
                rolling_update: Some(apps::RollingUpdateDeployment {
                    max_surge: Some(IntOrString {
                        r#type: Some(1),
                        int_val: None,
                        str_val: Some("25%".into()),
                    }),
                    max_unavailable: Some(IntOrString {
                        r#type: Some(0),
                        int_val: Some(1),
                        str_val: None,
                    }),
                }),
            }),
            ..Default::default()
        }),
        status: None,
    };
    let body = envelope("apps/v1", "Deployment", deployment.encode_to_vec());
    let object = proto::decode(&body).unwrap();
    assert_eq!(
        object,
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}},
            "spec": {
                "replicas": 0,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {"labels": {"app": "web"}},
                    "spec": {
                        "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}],
                        "volumes": [{"name": "cache", "emptyDir": {}}]
                    }
                },
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}}
            }
        })
    );
}

#[test]
fn secrets_keep_bytes_as_base64_and_acronym_fields_their_names() {
    let secret = core::Secret {
        metadata: Some(meta::ObjectMeta {
            name: Some("s".into()),
            ..Default::default()
        }),
        data: [("k".to_owned(), b"\x00\xffv".to_vec())].into(),
        r#type: Some("Opaque".into()),
        ..Default::default()
    };
    let object = proto::decode(&envelope("v1", "Secret", secret.encode_to_vec())).unwrap();
    assert_eq!(object["data"]["k"], "AP92");
    let service = core::Service {
        metadata: Some(meta::ObjectMeta {
            name: Some("svc".into()),
            ..Default::default()
        }),
        spec: Some(core::ServiceSpec {
            cluster_ip: Some("10.43.0.9".into()),
            external_ips: vec!["192.0.2.1".into()],
            ..Default::default()
        }),
        status: None,
    };
    let object = proto::decode(&envelope("v1", "Service", service.encode_to_vec())).unwrap();
    assert_eq!(
        object["spec"],
        json!({"clusterIP": "10.43.0.9", "externalIPs": ["192.0.2.1"]})
    );
}

#[test]
fn bad_protobuf_is_a_bad_request_not_a_panic() {
    let mut body = proto::MAGIC.to_vec();
    body.extend([0x0a, 0xff, 0xff]); // a length running past the end
    assert!(proto::decode(&body).is_err());
    assert!(proto::decode(b"not protobuf").is_err());
    let unknown_kind = envelope("example.com/v1", "Widget", vec![]);
    assert!(proto::decode(&unknown_kind).is_err());
}
