//! Facts about objects that several control loops read the same way: which object controls
//! another (its controller owner reference), and whether a pod is Ready.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;

/// The owner reference marked `controller: true`, if any.
pub fn controller_ref<K: Resource>(object: &K) -> Option<&OwnerReference> {
    object
        .meta()
        .owner_references
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|o| o.controller == Some(true))
}

/// The UID of the object's controller, if it has one.
pub fn controller_uid<K: Resource>(object: &K) -> Option<&str> {
    controller_ref(object).map(|o| o.uid.as_str())
}

/// Whether the pod's `Ready` condition is `True`.
pub fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}
