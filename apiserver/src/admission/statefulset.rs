//! A StatefulSet's defaults, as kube-apiserver's `SetDefaults_StatefulSet`: one replica,
//! `OrderedReady` pod management, a `RollingUpdate` strategy with partition 0, ten revisions
//! of history, claims kept (`Retain`) when the set is deleted or scaled down, and the pod
//! template's defaults. Idempotent, so an update that leaves a defaulted field out does not
//! read as a change.

use serde_json::{Value, json};

use super::{Cause, cause};

/// The spec fields an update may change (`ValidateStatefulSetUpdate`); the rest — selector,
/// serviceName, volumeClaimTemplates, podManagementPolicy — are fixed at creation, because
/// the pods and claims already made from them would no longer match.
const MUTABLE: [&str; 7] = [
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "minReadySeconds",
    "revisionHistoryLimit",
    "persistentVolumeClaimRetentionPolicy",
];

/// What a StatefulSet update may not change: anything in its spec beyond [`MUTABLE`] —
/// kube-apiserver's `Forbidden` on `spec`, with its message (tools match on it).
pub fn validate_update(old: &Value, new: &Value) -> Vec<Cause> {
    let fixed = |object: &Value| {
        let mut spec = object["spec"].clone();
        if let Some(spec) = spec.as_object_mut() {
            for field in MUTABLE {
                spec.remove(field);
            }
        }
        without_nulls(spec)
    };
    if fixed(old) == fixed(new) {
        return Vec::new();
    }
    vec![cause(
        "FieldValueForbidden",
        "spec".into(),
        "Forbidden: updates to statefulset spec for fields other than 'replicas', 'ordinals', \
         'template', 'updateStrategy', 'revisionHistoryLimit', \
         'persistentVolumeClaimRetentionPolicy' and 'minReadySeconds' are forbidden"
            .into(),
    )]
}

/// A value with its `null` members dropped, so `{"a": null}` and `{}` compare equal as Go's
/// semantic equality sees them.
fn without_nulls(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k, without_nulls(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(without_nulls).collect()),
        other => other,
    }
}

/// Fills in what a StatefulSet leaves out.
pub fn defaults(object: &mut Value) {
    if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
        spec.entry("replicas").or_insert(json!(1));
        spec.entry("podManagementPolicy")
            .or_insert(json!("OrderedReady"));
        spec.entry("revisionHistoryLimit").or_insert(json!(10));
        let strategy = spec.entry("updateStrategy").or_insert_with(|| json!({}));
        if let Some(strategy) = strategy.as_object_mut() {
            let kind = strategy
                .entry("type")
                .or_insert(json!("RollingUpdate"))
                .clone();
            if kind == "RollingUpdate" {
                let rolling = strategy.entry("rollingUpdate").or_insert_with(|| json!({}));
                if let Some(rolling) = rolling.as_object_mut() {
                    rolling.entry("partition").or_insert(json!(0));
                }
            }
        }
        let policy = spec
            .entry("persistentVolumeClaimRetentionPolicy")
            .or_insert_with(|| json!({}));
        if let Some(policy) = policy.as_object_mut() {
            policy.entry("whenDeleted").or_insert(json!("Retain"));
            policy.entry("whenScaled").or_insert(json!("Retain"));
        }
        for claim in spec
            .get_mut("volumeClaimTemplates")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(claim_spec) = claim.get_mut("spec").and_then(Value::as_object_mut) {
                claim_spec
                    .entry("volumeMode")
                    .or_insert(json!("Filesystem"));
            }
        }
    }
    super::template_defaults(object);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_mutable_spec_fields_may_change() {
        let set = json!({"spec": {"replicas": 3, "serviceName": "web",
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}}]}});
        let mut scaled = set.clone();
        scaled["spec"]["replicas"] = json!(5);
        scaled["spec"]["template"]["metadata"]["labels"]["v"] = json!("2");
        scaled["spec"]["updateStrategy"] = json!({"type": "OnDelete"});
        scaled["spec"]["minReadySeconds"] = Value::Null;
        assert!(validate_update(&set, &scaled).is_empty());

        for (field, value) in [
            ("serviceName", json!("other")),
            ("selector", json!({"matchLabels": {"app": "db"}})),
            ("volumeClaimTemplates", json!([])),
            ("podManagementPolicy", json!("Parallel")),
        ] {
            let mut changed = set.clone();
            changed["spec"][field] = value;
            let causes = validate_update(&set, &changed);
            assert_eq!(causes.len(), 1, "{field}");
            assert_eq!(causes[0].field, "spec");
            assert!(causes[0].message.contains("are forbidden"), "{field}");
        }
    }

    #[test]
    fn fills_kube_defaults_once() {
        let mut set = json!({"spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "template": {"metadata": {"labels": {"app": "web"}},
                         "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}},
            "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {}}],
        }});
        defaults(&mut set);
        let spec = &set["spec"];
        assert_eq!(spec["replicas"], 1);
        assert_eq!(spec["podManagementPolicy"], "OrderedReady");
        assert_eq!(spec["revisionHistoryLimit"], 10);
        assert_eq!(
            spec["updateStrategy"],
            json!({"type": "RollingUpdate", "rollingUpdate": {"partition": 0}})
        );
        assert_eq!(
            spec["persistentVolumeClaimRetentionPolicy"],
            json!({"whenDeleted": "Retain", "whenScaled": "Retain"})
        );
        assert_eq!(
            spec["volumeClaimTemplates"][0]["spec"]["volumeMode"],
            "Filesystem"
        );
        assert_eq!(spec["template"]["spec"]["restartPolicy"], "Always");
        let once = set.clone();
        defaults(&mut set);
        assert_eq!(set, once);

        let mut on_delete = json!({"spec": {"updateStrategy": {"type": "OnDelete"},
            "persistentVolumeClaimRetentionPolicy": {"whenScaled": "Delete"}}});
        defaults(&mut on_delete);
        assert_eq!(
            on_delete["spec"]["updateStrategy"],
            json!({"type": "OnDelete"})
        );
        assert_eq!(
            on_delete["spec"]["persistentVolumeClaimRetentionPolicy"],
            json!({"whenDeleted": "Retain", "whenScaled": "Delete"})
        );
    }
}
