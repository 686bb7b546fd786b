//! The workload controllers: what keeps pods from templates — ReplicaSets and
//! ReplicationControllers ([`replicaset`]), Deployments rolling ReplicaSets ([`deployment`]),
//! DaemonSets ([`daemonset`]), StatefulSets' ordered pods with stable names and storage
//! ([`statefulset`]), Jobs run to completion ([`job`]) on a schedule ([`cronjob`]) and expired once
//! finished ([`ttlafterfinished`]), replicas that follow load ([`autoscaler`]); and what guards them: PodDisruptionBudgets' status
//! ([`disruption`]).

pub mod autoscaler;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod job;
pub mod replicaset;
pub mod statefulset;
pub mod ttlafterfinished;

/// The metadata a pod made from `template` starts with, as kube-controller-manager's
/// `GetPodFromTemplate` copies it: the template's labels, annotations and finalizers only —
/// never its name (a template with `metadata.name` would otherwise make one pod, then fail
/// every create with AlreadyExists).
pub(crate) fn pod_metadata(
    template: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>,
) -> serde_json::Value {
    let mut metadata = serde_json::json!({});
    if let Some(template) = template {
        if let Some(labels) = &template.labels {
            metadata["labels"] = serde_json::json!(labels);
        }
        if let Some(annotations) = &template.annotations {
            metadata["annotations"] = serde_json::json!(annotations);
        }
        if let Some(finalizers) = &template.finalizers {
            metadata["finalizers"] = serde_json::json!(finalizers);
        }
    }
    metadata
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use serde_json::json;

    #[test]
    fn pods_take_only_labels_annotations_and_finalizers_from_their_template() {
        let template = ObjectMeta {
            name: Some("rc-test".into()),
            namespace: Some("elsewhere".into()),
            labels: Some([("app".to_owned(), "web".to_owned())].into()),
            finalizers: Some(vec!["example.com/keep".into()]),
            ..ObjectMeta::default()
        };
        assert_eq!(
            super::pod_metadata(Some(&template)),
            json!({"labels": {"app": "web"}, "finalizers": ["example.com/keep"]})
        );
        assert_eq!(super::pod_metadata(None), json!({}));
    }
}
