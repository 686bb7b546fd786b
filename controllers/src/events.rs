//! core/v1 Events from the control loops — what `kubectl describe` and `kubectl get events`
//! show (`ScalingReplicaSet`, `SuccessfulCreate`, `FailedScheduling`, …). Best effort: a
//! lost event is logged at debug level and never fails a reconcile.

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

/// Whether an event reports the normal course of things or something to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Expected progress.
    Normal,
    /// Something failed or is stuck.
    Warning,
}

/// Publishes an event about `object` from `component` (the controller's name).
pub async fn publish<K>(
    client: &Client,
    component: &str,
    object: &K,
    type_: EventType,
    reason: &str,
    message: &str,
) where
    K: Resource<DynamicType = ()>,
{
    let namespace = object.namespace().unwrap_or_else(|| "default".into());
    let api: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let now = jiff::Timestamp::now();
    let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let event = json!({
        "metadata": {
            "name": format!("{}.{:x}", object.name_any(), now.as_nanosecond()),
            "namespace": namespace,
        },
        "involvedObject": {
            "apiVersion": K::api_version(&()), "kind": K::kind(&()),
            "name": object.name_any(), "namespace": object.namespace(),
            "uid": object.uid(), "resourceVersion": object.resource_version(),
        },
        "reason": reason, "message": message,
        "type": match type_ { EventType::Normal => "Normal", EventType::Warning => "Warning" },
        "source": {"component": component}, "reportingComponent": component,
        "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
    });
    match serde_json::from_value::<Event>(event) {
        Ok(event) => {
            if let Err(error) = api.create(&PostParams::default(), &event).await {
                tracing::debug!(%error, reason, "publishing an event failed");
            }
        }
        Err(error) => tracing::debug!(%error, reason, "building an event failed"),
    }
}
