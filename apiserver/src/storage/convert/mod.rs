//! Versions of one kind. A kind served in several versions keeps its objects in one, its
//! storage version, as kube-apiserver does: a write in another version is converted on the
//! way in, and a read through another version on the way out.
//!
//! Most kinds convert by relabelling alone (their versions have one shape, as a CRD's
//! versions without a conversion webhook do). The HorizontalPodAutoscaler's `autoscaling/v1`
//! and `autoscaling/v2` differ: v1's `targetCPUUtilizationPercentage` is v2's CPU
//! `Utilization` metric, and v1's `currentCPUUtilizationPercentage` the current one; what v1
//! cannot say (other metrics, conditions, behavior) is kept in the annotations kube-apiserver
//! keeps it in, so a round trip through v1 loses nothing.
//!
//! One resource is served by two groups: `events.k8s.io/v1` Events are core `v1` Events
//! under other field names ([`SHARED_STORAGE`]), kept in one place, so an event written
//! through either API is read, listed, watched and selected through both.
//!
//! A CRD may convert by webhook instead ([`webhook`]): the engine sends its objects there
//! before relabelling.

pub(crate) mod webhook;

use serde_json::{Value, json};

/// The annotations a v1 HorizontalPodAutoscaler carries v2's extra fields in.
const METRICS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/metrics";
const CONDITIONS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/conditions";
const CURRENT_METRICS_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/current-metrics";
const BEHAVIOR_ANNOTATION: &str = "autoscaling.alpha.kubernetes.io/behavior";

/// `(group, plural)`.
type GroupResource = (&'static str, &'static str);
/// `(group, version)`.
type GroupVersion = (&'static str, &'static str);

/// Resources kept in another group's storage, as kube-apiserver keeps them: the served
/// `(group, plural)`, and the `(group, version)` its objects are stored in.
pub const SHARED_STORAGE: &[(GroupResource, GroupVersion)] =
    &[(("events.k8s.io", "events"), ("", "v1"))];

/// Where `group/plural`'s objects are stored, if in another group: `(group, version)`.
pub fn stored_in(group: &str, plural: &str) -> Option<(&'static str, &'static str)> {
    SHARED_STORAGE
        .iter()
        .find(|((g, p), _)| *g == group && *p == plural)
        .map(|(_, stored)| *stored)
}

/// Core v1 Event fields and their `events.k8s.io/v1` names (the rest are named alike).
const EVENT_FIELDS: &[(&str, &str)] = &[
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("reportingComponent", "reportingController"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
];

/// `object`, as stored, converted for a client of `def`'s version (nothing to do when it is
/// stored in that version). An object is compared by its own `apiVersion`, not by whether
/// `def` is the storage version: a CRD's storage version can change, and the objects written
/// before stay in the old one until they are written again.
pub fn for_client(def: &crate::registry::ResourceDef, object: &mut Value) {
    convert(&def.group, &def.kind, object, &def.api_version());
    if let (true, Some(schema)) = (def.defaults_on_read, def.schema.as_deref()) {
        crate::schema::default_only(schema, object);
    }
}

/// Converts `object` (of `group`'s `kind`) to `api_version`, in place.
pub fn convert(group: &str, kind: &str, object: &mut Value, api_version: &str) {
    let from = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if from == api_version {
        return;
    }
    if group == "autoscaling" && kind == "HorizontalPodAutoscaler" {
        match (from.as_str(), api_version) {
            ("autoscaling/v2", "autoscaling/v1") => hpa_to_v1(object),
            ("autoscaling/v1", "autoscaling/v2") => hpa_to_v2(object),
            _ => {}
        }
    }
    if kind == "Event" {
        match (from.as_str(), api_version) {
            ("v1", "events.k8s.io/v1") => rename(object, EVENT_FIELDS.iter().copied()),
            ("events.k8s.io/v1", "v1") => rename(
                object,
                EVENT_FIELDS.iter().map(|(core, events)| (*events, *core)),
            ),
            _ => {}
        }
    }
    object["apiVersion"] = json!(api_version);
}

/// Renames top-level fields `from` → `to`.
fn rename<'a>(object: &mut Value, names: impl Iterator<Item = (&'a str, &'a str)>) {
    let Some(fields) = object.as_object_mut() else {
        return;
    };
    for (from, to) in names {
        if let Some(value) = fields.remove(from) {
            fields.insert(to.to_owned(), value);
        }
    }
}

fn is_cpu_utilization(metric: &Value) -> bool {
    metric["type"] == "Resource"
        && metric["resource"]["name"] == "cpu"
        && metric["resource"]["target"]["type"] == "Utilization"
}

fn annotate(object: &mut Value, key: &str, value: &Value) {
    object["metadata"]["annotations"][key] = json!(value.to_string());
}

fn take_annotation(object: &mut Value, key: &str) -> Option<Value> {
    let annotations = object
        .get_mut("metadata")?
        .get_mut("annotations")?
        .as_object_mut()?;
    let text = annotations.remove(key)?;
    if annotations.is_empty()
        && let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut)
    {
        meta.remove("annotations");
    }
    serde_json::from_str(text.as_str()?).ok()
}

/// v2 → v1.
fn hpa_to_v1(object: &mut Value) {
    let spec = object["spec"].take();
    let status = object.get_mut("status").map(Value::take);
    let metrics = spec["metrics"].as_array().cloned().unwrap_or_default();
    let (cpu, others): (Vec<Value>, Vec<Value>) = metrics.into_iter().partition(is_cpu_utilization);
    let mut v1 = json!({
        "scaleTargetRef": spec["scaleTargetRef"],
        "maxReplicas": spec["maxReplicas"],
    });
    if let Some(min) = spec.get("minReplicas") {
        v1["minReplicas"] = min.clone();
    }
    if let Some(target) = cpu
        .first()
        .map(|m| m["resource"]["target"]["averageUtilization"].clone())
    {
        v1["targetCPUUtilizationPercentage"] = target;
    }
    object["spec"] = v1;
    if !others.is_empty() {
        annotate(object, METRICS_ANNOTATION, &json!(others));
    }
    if let Some(behavior) = spec.get("behavior") {
        annotate(object, BEHAVIOR_ANNOTATION, behavior);
    }
    if let Some(status) = status.filter(Value::is_object) {
        let mut v1 = json!({});
        for field in [
            "observedGeneration",
            "lastScaleTime",
            "currentReplicas",
            "desiredReplicas",
        ] {
            if let Some(value) = status.get(field) {
                v1[field] = value.clone();
            }
        }
        let current = status["currentMetrics"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let (cpu, others): (Vec<Value>, Vec<Value>) = current
            .into_iter()
            .partition(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu");
        if let Some(value) = cpu
            .first()
            .and_then(|m| m["resource"]["current"].get("averageUtilization"))
        {
            v1["currentCPUUtilizationPercentage"] = value.clone();
        }
        object["status"] = v1;
        if !others.is_empty() {
            annotate(object, CURRENT_METRICS_ANNOTATION, &json!(others));
        }
        if let Some(conditions) = status.get("conditions") {
            annotate(object, CONDITIONS_ANNOTATION, conditions);
        }
    }
}

/// v1 → v2.
fn hpa_to_v2(object: &mut Value) {
    let spec = object["spec"].take();
    let status = object.get_mut("status").map(Value::take);
    let mut metrics: Vec<Value> = Vec::new();
    if let Some(target) = spec.get("targetCPUUtilizationPercentage") {
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": target}}}));
    }
    if let Some(Value::Array(others)) = take_annotation(object, METRICS_ANNOTATION) {
        metrics.extend(others);
    }
    let mut v2 = json!({
        "scaleTargetRef": spec["scaleTargetRef"],
        "maxReplicas": spec["maxReplicas"],
    });
    if let Some(min) = spec.get("minReplicas") {
        v2["minReplicas"] = min.clone();
    }
    if !metrics.is_empty() {
        v2["metrics"] = json!(metrics);
    }
    if let Some(behavior) = take_annotation(object, BEHAVIOR_ANNOTATION) {
        v2["behavior"] = behavior;
    }
    object["spec"] = v2;
    let conditions = take_annotation(object, CONDITIONS_ANNOTATION);
    let current_others = take_annotation(object, CURRENT_METRICS_ANNOTATION);
    if let Some(status) = status.filter(Value::is_object) {
        let mut v2 = json!({});
        for field in [
            "observedGeneration",
            "lastScaleTime",
            "currentReplicas",
            "desiredReplicas",
        ] {
            if let Some(value) = status.get(field) {
                v2[field] = value.clone();
            }
        }
        let mut current: Vec<Value> = Vec::new();
        if let Some(value) = status.get("currentCPUUtilizationPercentage") {
            current.push(json!({"type": "Resource", "resource": {"name": "cpu",
                "current": {"averageUtilization": value}}}));
        }
        if let Some(Value::Array(others)) = current_others {
            current.extend(others);
        }
        if !current.is_empty() {
            v2["currentMetrics"] = json!(current);
        }
        if let Some(conditions) = conditions {
            v2["conditions"] = conditions;
        }
        object["status"] = v2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2() -> Value {
        json!({
            "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "web"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "web"},
                "minReplicas": 1, "maxReplicas": 5,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 50}}},
                    {"type": "Pods", "pods": {"metric": {"name": "qps"},
                        "target": {"type": "AverageValue", "averageValue": "1k"}}}
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}},
            },
            "status": {"currentReplicas": 2, "desiredReplicas": 3,
                "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu",
                    "current": {"averageUtilization": 40}}}],
                "conditions": [{"type": "AbleToScale", "status": "True"}]},
        })
    }

    #[test]
    fn an_hpa_reads_as_v1_and_back_without_loss() {
        let mut object = v2();
        convert(
            "autoscaling",
            "HorizontalPodAutoscaler",
            &mut object,
            "autoscaling/v1",
        );
        assert_eq!(object["apiVersion"], "autoscaling/v1");
        assert_eq!(object["spec"]["targetCPUUtilizationPercentage"], 50);
        assert_eq!(object["spec"]["maxReplicas"], 5);
        assert!(object["spec"].get("metrics").is_none());
        assert_eq!(object["status"]["currentCPUUtilizationPercentage"], 40);
        assert!(object["metadata"]["annotations"][METRICS_ANNOTATION].is_string());
        convert(
            "autoscaling",
            "HorizontalPodAutoscaler",
            &mut object,
            "autoscaling/v2",
        );
        assert_eq!(object, v2());
    }

    #[test]
    fn an_event_reads_through_both_apis() {
        let core = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": "e", "namespace": "ns"},
            "involvedObject": {"kind": "Pod", "name": "web", "namespace": "ns"},
            "reason": "Started", "message": "Started container", "type": "Normal",
            "source": {"component": "kubelet"}, "count": 2,
            "firstTimestamp": "2026-01-01T00:00:00Z", "lastTimestamp": "2026-01-01T00:00:01Z",
            "eventTime": null, "reportingComponent": "kubelet", "reportingInstance": "n1",
        });
        let mut object = core.clone();
        convert("", "Event", &mut object, "events.k8s.io/v1");
        assert_eq!(object["apiVersion"], "events.k8s.io/v1");
        assert_eq!(object["regarding"]["name"], "web");
        assert_eq!(object["note"], "Started container");
        assert_eq!(object["reportingController"], "kubelet");
        assert_eq!(object["deprecatedSource"]["component"], "kubelet");
        assert_eq!(object["deprecatedCount"], 2);
        assert!(object.get("involvedObject").is_none() && object.get("message").is_none());
        convert("events.k8s.io", "Event", &mut object, "v1");
        assert_eq!(object, core);
    }

    #[test]
    fn other_kinds_are_relabelled() {
        let mut object =
            json!({"apiVersion": "example.com/v1", "kind": "Widget", "spec": {"a": 1}});
        convert("example.com", "Widget", &mut object, "example.com/v2");
        assert_eq!(
            object,
            json!({"apiVersion": "example.com/v2", "kind": "Widget", "spec": {"a": 1}})
        );
    }
}
