//! Protobuf, both ways: objects encoded with k8s-pb (prost types generated from the upstream
//! .proto files), wrapped in the `k8s\0` + runtime.Unknown envelope as client-go does, decoded
//! by the server into the JSON a JSON client would have sent; and responses — objects, lists,
//! watch events — in protobuf for a client that asks for it first, read back with prost.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

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

/// Every kind the server serves goes through protobuf and back unchanged: an object with every
/// field set (to a depth) is encoded by the server, decoded by prost into k8s-pb's type for the
/// kind (generated from the upstream .proto files: a wrong field number or wire type fails
/// there, an unknown one is dropped), encoded again by prost and decoded by the server.
#[test]
fn every_served_kind_round_trips_through_protobuf() {
    use k8s_pb::*;
    macro_rules! kinds {
        ($(($api_version:literal, $kind:literal) => $type:ty,)*) => {{
            let mut checked = Vec::new();
            $(
                let sample = proto::example($api_version, $kind)
                    .unwrap_or_else(|| panic!("no protobuf schema for {}/{}", $api_version, $kind));
                let bytes = proto::encode(&sample).unwrap();
                let unknown = Unknown::decode(&bytes[proto::MAGIC.len()..]).unwrap();
                let typed = <$type>::decode(unknown.raw.unwrap_or_default().as_slice())
                    .unwrap_or_else(|e| panic!("{}/{}: prost cannot read it: {e}", $api_version, $kind));
                let back = proto::decode(&envelope($api_version, $kind, typed.encode_to_vec())).unwrap();
                assert_eq!(back, sample, "{}/{} changed on the way", $api_version, $kind);
                checked.push($kind);
            )*
            checked
        }};
    }
    let checked = kinds! {
        // v1 in Kubernetes 1.36 with the v1beta1 wire messages, which k8s-pb has (its v1 ones
        // not yet).
        ("admissionregistration.k8s.io/v1", "MutatingAdmissionPolicy") => api::admissionregistration::v1beta1::MutatingAdmissionPolicy,
        ("admissionregistration.k8s.io/v1", "MutatingAdmissionPolicyBinding") => api::admissionregistration::v1beta1::MutatingAdmissionPolicyBinding,
        ("admissionregistration.k8s.io/v1", "MutatingWebhookConfiguration") => api::admissionregistration::v1::MutatingWebhookConfiguration,
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicy") => api::admissionregistration::v1::ValidatingAdmissionPolicy,
        ("admissionregistration.k8s.io/v1", "ValidatingAdmissionPolicyBinding") => api::admissionregistration::v1::ValidatingAdmissionPolicyBinding,
        ("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration") => api::admissionregistration::v1::ValidatingWebhookConfiguration,
        ("apiextensions.k8s.io/v1", "CustomResourceDefinition") => apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
        ("apiregistration.k8s.io/v1", "APIService") => kube_aggregator::pkg::apis::apiregistration::v1::APIService,
        ("apps/v1", "ControllerRevision") => api::apps::v1::ControllerRevision,
        ("apps/v1", "DaemonSet") => api::apps::v1::DaemonSet,
        ("apps/v1", "Deployment") => api::apps::v1::Deployment,
        ("apps/v1", "ReplicaSet") => api::apps::v1::ReplicaSet,
        ("apps/v1", "StatefulSet") => api::apps::v1::StatefulSet,
        ("authentication.k8s.io/v1", "SelfSubjectReview") => api::authentication::v1::SelfSubjectReview,
        ("authentication.k8s.io/v1", "TokenReview") => api::authentication::v1::TokenReview,
        ("authorization.k8s.io/v1", "LocalSubjectAccessReview") => api::authorization::v1::LocalSubjectAccessReview,
        ("authorization.k8s.io/v1", "SelfSubjectAccessReview") => api::authorization::v1::SelfSubjectAccessReview,
        ("authorization.k8s.io/v1", "SelfSubjectRulesReview") => api::authorization::v1::SelfSubjectRulesReview,
        ("authorization.k8s.io/v1", "SubjectAccessReview") => api::authorization::v1::SubjectAccessReview,
        ("autoscaling/v2", "HorizontalPodAutoscaler") => api::autoscaling::v2::HorizontalPodAutoscaler,
        ("batch/v1", "CronJob") => api::batch::v1::CronJob,
        ("batch/v1", "Job") => api::batch::v1::Job,
        ("certificates.k8s.io/v1", "CertificateSigningRequest") => api::certificates::v1::CertificateSigningRequest,
        ("coordination.k8s.io/v1", "Lease") => api::coordination::v1::Lease,
        ("v1", "ConfigMap") => api::core::v1::ConfigMap,
        ("v1", "Endpoints") => api::core::v1::Endpoints,
        ("v1", "Event") => api::core::v1::Event,
        ("v1", "LimitRange") => api::core::v1::LimitRange,
        ("v1", "Namespace") => api::core::v1::Namespace,
        ("v1", "Node") => api::core::v1::Node,
        ("v1", "PersistentVolumeClaim") => api::core::v1::PersistentVolumeClaim,
        ("v1", "PersistentVolume") => api::core::v1::PersistentVolume,
        ("v1", "Pod") => api::core::v1::Pod,
        ("v1", "PodTemplate") => api::core::v1::PodTemplate,
        ("v1", "ReplicationController") => api::core::v1::ReplicationController,
        ("v1", "ResourceQuota") => api::core::v1::ResourceQuota,
        ("v1", "Secret") => api::core::v1::Secret,
        ("v1", "ServiceAccount") => api::core::v1::ServiceAccount,
        ("v1", "Service") => api::core::v1::Service,
        ("discovery.k8s.io/v1", "EndpointSlice") => api::discovery::v1::EndpointSlice,
        ("events.k8s.io/v1", "Event") => api::events::v1::Event,
        ("flowcontrol.apiserver.k8s.io/v1", "FlowSchema") => api::flowcontrol::v1::FlowSchema,
        ("flowcontrol.apiserver.k8s.io/v1", "PriorityLevelConfiguration") => api::flowcontrol::v1::PriorityLevelConfiguration,
        ("networking.k8s.io/v1", "IngressClass") => api::networking::v1::IngressClass,
        ("networking.k8s.io/v1", "Ingress") => api::networking::v1::Ingress,
        ("networking.k8s.io/v1", "IPAddress") => api::networking::v1::IPAddress,
        ("networking.k8s.io/v1", "NetworkPolicy") => api::networking::v1::NetworkPolicy,
        ("networking.k8s.io/v1", "ServiceCIDR") => api::networking::v1::ServiceCIDR,
        ("node.k8s.io/v1", "RuntimeClass") => api::node::v1::RuntimeClass,
        ("policy/v1", "PodDisruptionBudget") => api::policy::v1::PodDisruptionBudget,
        ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") => api::rbac::v1::ClusterRoleBinding,
        ("rbac.authorization.k8s.io/v1", "ClusterRole") => api::rbac::v1::ClusterRole,
        ("rbac.authorization.k8s.io/v1", "RoleBinding") => api::rbac::v1::RoleBinding,
        ("rbac.authorization.k8s.io/v1", "Role") => api::rbac::v1::Role,
        ("resource.k8s.io/v1", "DeviceClass") => api::resource::v1::DeviceClass,
        ("resource.k8s.io/v1", "ResourceClaim") => api::resource::v1::ResourceClaim,
        ("resource.k8s.io/v1", "ResourceClaimTemplate") => api::resource::v1::ResourceClaimTemplate,
        ("resource.k8s.io/v1", "ResourceSlice") => api::resource::v1::ResourceSlice,
        ("scheduling.k8s.io/v1", "PriorityClass") => api::scheduling::v1::PriorityClass,
        ("storage.k8s.io/v1", "CSIDriver") => api::storage::v1::CSIDriver,
        ("storage.k8s.io/v1", "CSINode") => api::storage::v1::CSINode,
        ("storage.k8s.io/v1", "CSIStorageCapacity") => api::storage::v1::CSIStorageCapacity,
        ("storage.k8s.io/v1", "StorageClass") => api::storage::v1::StorageClass,
        ("storage.k8s.io/v1", "VolumeAttachment") => api::storage::v1::VolumeAttachment,
        ("storage.k8s.io/v1", "VolumeAttributesClass") => api::storage::v1::VolumeAttributesClass,
    };
    let served = orquestra_apiserver::registry::builtin_resources();
    // The resource metrics are answered in JSON whatever is asked (client-go's metrics
    // clientset and kubectl top ask for JSON; k8s-pb has no metrics.k8s.io messages).
    for def in served.iter().filter(|d| !d.read_only) {
        let wire = proto::has_schema(&def.api_version(), &def.kind);
        let listed = checked.contains(&def.kind.as_str());
        assert!(
            listed,
            "{}/{} is served but not checked here",
            def.api_version(),
            def.kind
        );
        assert!(
            wire,
            "{}/{} has no protobuf schema",
            def.api_version(),
            def.kind
        );
    }
}

/// What client-go does with a typed clientset: protobuf request bodies, `Accept:
/// application/vnd.kubernetes.protobuf, application/json`; the answers are protobuf and prost
/// reads them — the created object, a list, a watch's frames; an error stays a JSON `Status`.
#[tokio::test]
async fn a_client_go_style_client_speaks_protobuf_both_ways() {
    let c = common::cluster().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", c.addr);
    const ACCEPT: &str = "application/vnd.kubernetes.protobuf, application/json";
    let pod = core::Pod {
        metadata: Some(meta::ObjectMeta {
            name: Some("p".into()),
            labels: [("app".to_owned(), "web".to_owned())].into(),
            ..Default::default()
        }),
        spec: Some(core::PodSpec {
            containers: vec![core::Container {
                name: Some("c".into()),
                image: Some("busybox".into()),
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    };
    let created = http
        .post(format!("{base}/api/v1/namespaces/default/pods"))
        .header("Content-Type", proto::CONTENT_TYPE)
        .header("Accept", ACCEPT)
        .body(envelope("v1", "Pod", pod.encode_to_vec()))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    assert_eq!(created.headers()["content-type"], proto::CONTENT_TYPE);
    let body = created.bytes().await.unwrap();
    let unknown = Unknown::decode(&body[proto::MAGIC.len()..]).unwrap();
    let type_meta = unknown.type_meta.unwrap();
    assert_eq!(
        (type_meta.api_version.as_deref(), type_meta.kind.as_deref()),
        (Some("v1"), Some("Pod"))
    );
    let created = core::Pod::decode(unknown.raw.unwrap().as_slice()).unwrap();
    let meta = created.metadata.unwrap();
    assert_eq!(meta.name.as_deref(), Some("p"));
    assert!(meta.uid.is_some_and(|u| !u.is_empty()) && meta.creation_timestamp.is_some());
    assert_eq!(created.status.unwrap().phase.as_deref(), Some("Pending"));

    // A list.
    let list = http
        .get(format!("{base}/api/v1/namespaces/default/pods"))
        .header("Accept", ACCEPT)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let unknown = Unknown::decode(&list[proto::MAGIC.len()..]).unwrap();
    assert_eq!(unknown.type_meta.unwrap().kind.as_deref(), Some("PodList"));
    let list = core::PodList::decode(unknown.raw.unwrap().as_slice()).unwrap();
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.unwrap().resource_version.is_some());

    // A watch: length-prefixed WatchEvents whose objects carry their own envelope.
    let mut watch = http
        .get(format!(
            "{base}/api/v1/namespaces/default/pods?watch=1&timeoutSeconds=2"
        ))
        .header("Accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(
        watch.headers()["content-type"],
        "application/vnd.kubernetes.protobuf;stream=watch"
    );
    let mut stream = Vec::new();
    while let Some(chunk) = watch.chunk().await.unwrap() {
        stream.extend_from_slice(&chunk);
    }
    let length = u32::from_be_bytes(stream[..4].try_into().unwrap()) as usize;
    let event = meta::WatchEvent::decode(&stream[4..4 + length]).unwrap();
    assert_eq!(event.r#type.as_deref(), Some("ADDED"));
    let raw = event.object.unwrap().raw.unwrap();
    let unknown = Unknown::decode(&raw[proto::MAGIC.len()..]).unwrap();
    let watched = core::Pod::decode(unknown.raw.unwrap().as_slice()).unwrap();
    assert_eq!(watched.metadata.unwrap().name.as_deref(), Some("p"));

    // Errors are JSON Statuses, which such a client reads too.
    let missing = http
        .get(format!("{base}/api/v1/namespaces/default/pods/nope"))
        .header("Accept", ACCEPT)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let status: serde_json::Value =
        serde_json::from_slice(&missing.bytes().await.unwrap()).unwrap();
    assert_eq!(status["reason"], "NotFound");
}

/// A protobuf LIST is written from each object's message, kept with the cached object: it
/// holds what the JSON list holds, pages alike, and an object's new version is encoded anew
/// (never the message of the version before).
#[tokio::test]
async fn protobuf_lists_match_json_lists_across_updates_and_pages() {
    let c = common::cluster().await;
    let http = reqwest::Client::new();
    let base = format!("http://{}/api/v1/namespaces/default/configmaps", c.addr);
    const ACCEPT: &str = "application/vnd.kubernetes.protobuf, application/json";
    for (name, value) in [("a", "1"), ("b", "2"), ("c", "3")] {
        let created = http
            .post(&base)
            .header("Content-Type", "application/json")
            .body(json!({"metadata": {"name": name}, "data": {"k": value}}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), 201);
    }
    let list = |query: &'static str| {
        let http = http.clone();
        let url = format!("{base}{query}");
        async move {
            let body = http
                .get(url)
                .header("Accept", ACCEPT)
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap();
            let unknown = Unknown::decode(&body[proto::MAGIC.len()..]).unwrap();
            assert_eq!(
                unknown.type_meta.unwrap().kind.as_deref(),
                Some("ConfigMapList")
            );
            core::ConfigMapList::decode(unknown.raw.unwrap().as_slice()).unwrap()
        }
    };
    let data = |list: &core::ConfigMapList| -> Vec<(String, String)> {
        list.items
            .iter()
            .filter(|cm| cm.data.contains_key("k"))
            .map(|cm| {
                let name = cm.metadata.as_ref().unwrap().name.clone().unwrap();
                (name, cm.data["k"].clone())
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    };
    assert_eq!(
        data(&list("").await),
        pairs(&[("a", "1"), ("b", "2"), ("c", "3")])
    );
    // The same list again (now from the kept messages), then after an update.
    assert_eq!(
        data(&list("").await),
        pairs(&[("a", "1"), ("b", "2"), ("c", "3")])
    );
    let patched = http
        .patch(format!("{base}/b"))
        .header("Content-Type", "application/merge-patch+json")
        .body(r#"{"data":{"k":"22"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    let after = list("").await;
    assert_eq!(data(&after), pairs(&[("a", "1"), ("b", "22"), ("c", "3")]));
    // Versions and the list's metadata are those of the JSON list.
    let json_list: serde_json::Value =
        serde_json::from_slice(&http.get(&base).send().await.unwrap().bytes().await.unwrap())
            .unwrap();
    let versions = |list: &core::ConfigMapList| -> Vec<String> {
        list.items
            .iter()
            .map(|cm| {
                cm.metadata
                    .as_ref()
                    .unwrap()
                    .resource_version
                    .clone()
                    .unwrap()
            })
            .collect()
    };
    let json_versions: Vec<String> = json_list["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|cm| {
            cm["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(versions(&after), json_versions);
    // A page: the continue token and remaining count come through.
    let page = list("?limit=1").await;
    assert_eq!(page.items.len(), 1);
    let meta = page.metadata.unwrap();
    assert!(meta.r#continue.is_some_and(|t| !t.is_empty()));
    assert!(meta.remaining_item_count.is_some_and(|n| n >= 2));
}

/// A RoleBinding sent as protobuf the way client-go encodes one whose `roleRef.apiGroup` is
/// left empty (the e2e suite's webhook tests do): created, with the group defaulted.
#[tokio::test]
async fn a_rolebinding_via_protobuf_is_defaulted_and_created() {
    use k8s_pb::api::rbac::v1 as rbac;
    let c = common::cluster().await;
    let binding = rbac::RoleBinding {
        metadata: Some(meta::ObjectMeta {
            name: Some("reader".into()),
            ..Default::default()
        }),
        subjects: vec![rbac::Subject {
            kind: Some("ServiceAccount".into()),
            api_group: Some(String::new()),
            name: Some("default".into()),
            namespace: Some("default".into()),
        }],
        role_ref: Some(rbac::RoleRef {
            api_group: Some(String::new()),
            kind: Some("Role".into()),
            name: Some("extension-apiserver-authentication-reader".into()),
        }),
    };
    let response = reqwest::Client::new()
        .post(format!(
            "http://{}/apis/rbac.authorization.k8s.io/v1/namespaces/kube-system/rolebindings",
            c.addr
        ))
        .header("Content-Type", proto::CONTENT_TYPE)
        .body(envelope(
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            binding.encode_to_vec(),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
    let created: serde_json::Value =
        serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
    assert_eq!(created["roleRef"]["apiGroup"], "rbac.authorization.k8s.io");
}

/// Bad protobuf over HTTP: a truncated body and a body of an unknown kind are refused with a
/// `Status` naming what is wrong (400, 415), a body of another kind than the URL's with 400;
/// the server keeps serving.
#[tokio::test]
async fn bad_protobuf_bodies_get_a_status_and_the_server_keeps_serving() {
    let c = common::cluster().await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/api/v1/namespaces/default/configmaps", c.addr);
    let post = |body: Vec<u8>| {
        http.post(&url)
            .header("Content-Type", proto::CONTENT_TYPE)
            .body(body)
            .send()
    };
    let config_map = core::ConfigMap {
        metadata: Some(meta::ObjectMeta {
            name: Some("cm".into()),
            ..Default::default()
        }),
        data: [("a".to_owned(), "b".to_owned())].into(),
        ..Default::default()
    };
    let mut truncated = envelope("v1", "ConfigMap", config_map.encode_to_vec());
    truncated.truncate(truncated.len() - 3);
    let cases = [
        (truncated, 400, "invalid protobuf body"),
        (
            envelope("example.com/v1", "Widget", vec![1, 2]),
            415,
            "example.com/v1/Widget",
        ),
        (
            envelope(
                "apps/v1",
                "Deployment",
                apps::Deployment::default().encode_to_vec(),
            ),
            400,
            "the API version in the data (apps/v1)",
        ),
    ];
    for (body, code, named) in cases {
        let response = post(body).await.unwrap();
        assert_eq!(response.status(), code);
        let status: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(status["kind"], "Status");
        let message = status["message"].as_str().unwrap();
        assert!(message.contains(named), "{message}");
    }
    let created = post(envelope("v1", "ConfigMap", config_map.encode_to_vec()))
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
}

/// client-go encodes DeleteOptions under the group version of what it deletes
/// (`apps/v1`, `admissionregistration.k8s.io/v1`): they are read as meta.k8s.io's.
#[test]
fn delete_options_decode_under_any_group_version() {
    let options = meta::DeleteOptions {
        propagation_policy: Some("Orphan".into()),
        ..Default::default()
    };
    for api_version in ["v1", "apps/v1", "admissionregistration.k8s.io/v1"] {
        let object = proto::decode(&envelope(
            api_version,
            "DeleteOptions",
            options.encode_to_vec(),
        ))
        .unwrap();
        assert_eq!(object["propagationPolicy"], "Orphan", "{api_version}");
    }
}
