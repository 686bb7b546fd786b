//! Jobs and CronJobs as kube-apiserver admits them: the defaults of `batch/v1`, the
//! generated selector (a Job's pods are found by its UID, not by labels a user may reuse),
//! and the semantic checks a schema cannot express — a pod template that restarts
//! `Always`, an `Indexed` Job without completions, a schedule that does not parse.

use serde_json::{Value, json};

use super::{cause, pod_spec_defaults};
use crate::error::Cause;

/// The label and selector key of a Job's generated selector (its UID).
pub const CONTROLLER_UID: &str = "batch.kubernetes.io/controller-uid";
/// The label naming a Job on its pods.
pub const JOB_NAME: &str = "batch.kubernetes.io/job-name";

/// A Job's defaults (kube's `SetDefaults_Job` and `PrepareForCreate`): the selector on its
/// UID with the matching template labels (unless `manualSelector`), parallelism and
/// completions, `backoffLimit` 6 (unbounded with a per-index limit), `NonIndexed`, not
/// suspended, the pod replacement policy, and the pod template's own defaults.
pub fn job_defaults(object: &mut Value) {
    let name = object["metadata"]["name"].as_str().map(str::to_owned);
    let uid = object["metadata"]["uid"].as_str().map(str::to_owned);
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let manual = spec.get("manualSelector") == Some(&json!(true));
    if !manual
        && spec.get("selector").is_none_or(Value::is_null)
        && let (Some(uid), Some(name)) = (uid, name)
    {
        spec.insert(
            "selector".into(),
            json!({"matchLabels": {CONTROLLER_UID: uid}}),
        );
        let template = spec.entry("template").or_insert_with(|| json!({}));
        if let Some(template) = template.as_object_mut() {
            let metadata = template.entry("metadata").or_insert_with(|| json!({}));
            if let Some(metadata) = metadata.as_object_mut() {
                let labels = metadata.entry("labels").or_insert_with(|| json!({}));
                if let Some(labels) = labels.as_object_mut() {
                    labels.insert(CONTROLLER_UID.into(), json!(uid));
                    labels.insert("controller-uid".into(), json!(uid));
                    labels.insert(JOB_NAME.into(), json!(name));
                    labels.insert("job-name".into(), json!(name));
                }
            }
        }
    }
    job_spec_defaults(spec);
}

fn job_spec_defaults(spec: &mut serde_json::Map<String, Value>) {
    let unset =
        |spec: &serde_json::Map<String, Value>, k: &str| spec.get(k).is_none_or(Value::is_null);
    if unset(spec, "completions") && unset(spec, "parallelism") {
        spec.insert("completions".into(), json!(1));
        spec.insert("parallelism".into(), json!(1));
    }
    if unset(spec, "parallelism") {
        spec.insert("parallelism".into(), json!(1));
    }
    if unset(spec, "backoffLimit") {
        let limit = if unset(spec, "backoffLimitPerIndex") {
            6
        } else {
            i32::MAX as i64
        };
        spec.insert("backoffLimit".into(), json!(limit));
    }
    if unset(spec, "completionMode") {
        spec.insert("completionMode".into(), json!("NonIndexed"));
    }
    if unset(spec, "suspend") {
        spec.insert("suspend".into(), json!(false));
    }
    if unset(spec, "podReplacementPolicy") {
        let policy = if unset(spec, "podFailurePolicy") {
            "TerminatingOrFailed"
        } else {
            "Failed"
        };
        spec.insert("podReplacementPolicy".into(), json!(policy));
    }
    if let Some(rules) = spec
        .get_mut("podFailurePolicy")
        .and_then(|p| p.get_mut("rules"))
        .and_then(Value::as_array_mut)
    {
        for pattern in rules
            .iter_mut()
            .filter_map(|r| r.get_mut("onPodConditions"))
            .filter_map(Value::as_array_mut)
            .flatten()
            .filter_map(Value::as_object_mut)
        {
            pattern.entry("status").or_insert(json!("True"));
        }
    }
    if let Some(pod) = spec.get_mut("template").and_then(|t| t.get_mut("spec")) {
        pod_spec_defaults(pod);
    }
}

/// A CronJob's defaults (`SetDefaults_CronJob`) and its job template's pod defaults.
pub fn cronjob_defaults(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("concurrencyPolicy").or_insert(json!("Allow"));
    spec.entry("suspend").or_insert(json!(false));
    spec.entry("successfulJobsHistoryLimit").or_insert(json!(3));
    spec.entry("failedJobsHistoryLimit").or_insert(json!(1));
    if let Some(pod) = spec
        .get_mut("jobTemplate")
        .and_then(|t| t.pointer_mut("/spec/template/spec"))
    {
        pod_spec_defaults(pod);
    }
}

fn invalid(field: &str, value: &Value, message: &str) -> Cause {
    cause(
        "FieldValueInvalid",
        field.to_owned(),
        format!("Invalid value: {value}: {message}"),
    )
}

fn required(field: &str, message: &str) -> Cause {
    cause(
        "FieldValueRequired",
        field.to_owned(),
        format!("Required value: {message}"),
    )
}

/// A Job spec's checks (`ValidateJobSpec`), `path` its field path (`spec` of a Job,
/// `spec.jobTemplate.spec` of a CronJob).
pub fn validate_job_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    for field in [
        "parallelism",
        "completions",
        "backoffLimit",
        "backoffLimitPerIndex",
        "maxFailedIndexes",
    ] {
        if spec[field].as_i64().is_some_and(|n| n < 0) {
            causes.push(invalid(
                &format!("{path}.{field}"),
                &spec[field],
                "must be greater than or equal to 0",
            ));
        }
    }
    if spec["activeDeadlineSeconds"]
        .as_i64()
        .is_some_and(|n| n <= 0)
    {
        causes.push(invalid(
            &format!("{path}.activeDeadlineSeconds"),
            &spec["activeDeadlineSeconds"],
            "must be greater than 0",
        ));
    }
    let indexed = spec["completionMode"] == "Indexed";
    if !matches!(
        spec["completionMode"].as_str(),
        None | Some("NonIndexed" | "Indexed")
    ) {
        causes.push(cause(
            "FieldValueNotSupported",
            format!("{path}.completionMode"),
            format!(
                "Unsupported value: {}: supported values: \"NonIndexed\", \"Indexed\"",
                spec["completionMode"]
            ),
        ));
    }
    if indexed && spec["completions"].is_null() {
        causes.push(required(
            &format!("{path}.completions"),
            "when completion mode is Indexed",
        ));
    }
    if !indexed {
        for field in ["backoffLimitPerIndex", "maxFailedIndexes", "successPolicy"] {
            if !spec[field].is_null() {
                causes.push(invalid(
                    &format!("{path}.{field}"),
                    &spec[field],
                    "requires indexed completion mode",
                ));
            }
        }
    }
    if !spec["maxFailedIndexes"].is_null() && spec["backoffLimitPerIndex"].is_null() {
        causes.push(required(
            &format!("{path}.backoffLimitPerIndex"),
            "when maxFailedIndexes is specified",
        ));
    }
    let restart = &spec["template"]["spec"]["restartPolicy"];
    if !matches!(restart.as_str(), Some("OnFailure" | "Never")) {
        causes.push(cause(
            "FieldValueNotSupported",
            format!("{path}.template.spec.restartPolicy"),
            format!("Unsupported value: {restart}: supported values: \"OnFailure\", \"Never\""),
        ));
    }
    if let Some(rules) = spec["podFailurePolicy"]["rules"].as_array() {
        if restart.as_str() != Some("Never") {
            causes.push(invalid(
                &format!("{path}.template.spec.restartPolicy"),
                restart,
                "only \"Never\" is supported when podFailurePolicy is specified",
            ));
        }
        for (i, rule) in rules.iter().enumerate() {
            let at = format!("{path}.podFailurePolicy.rules[{i}]");
            let action = &rule["action"];
            if !matches!(
                action.as_str(),
                Some("FailJob" | "FailIndex" | "Ignore" | "Count")
            ) {
                causes.push(cause(
                    "FieldValueNotSupported",
                    format!("{at}.action"),
                    format!(
                        "Unsupported value: {action}: supported values: \"Count\", \"FailIndex\", \"FailJob\", \"Ignore\""
                    ),
                ));
            }
            if action == "FailIndex" && spec["backoffLimitPerIndex"].is_null() {
                causes.push(invalid(
                    &format!("{at}.action"),
                    action,
                    "requires the backoffLimitPerIndex to be set",
                ));
            }
            let exit = !rule["onExitCodes"].is_null();
            let conditions = !rule["onPodConditions"].is_null();
            if exit == conditions {
                causes.push(invalid(
                    &at,
                    &json!("specifying one of OnExitCodes and OnPodConditions is required"),
                    "specifying one of OnExitCodes and OnPodConditions is required",
                ));
            }
            if let Some(op) = rule["onExitCodes"]["operator"].as_str()
                && op == "In"
                && rule["onExitCodes"]["values"]
                    .as_array()
                    .is_some_and(|v| v.contains(&json!(0)))
            {
                causes.push(invalid(
                    &format!("{at}.onExitCodes.values"),
                    &json!(0),
                    "must not be 0 for the In operator",
                ));
            }
        }
    }
    super::validate_pod_spec(
        &spec["template"]["spec"],
        &format!("{path}.template.spec"),
        causes,
    );
}

/// A Job's checks: its spec, and a selector that matches its template.
pub fn validate_job(object: &Value, causes: &mut Vec<Cause>) {
    let spec = &object["spec"];
    if spec["selector"].is_null() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.selector".into(),
            "Required value".into(),
        ));
    } else if !super::selector_matches(&spec["selector"], &spec["template"]["metadata"]["labels"]) {
        causes.push(invalid(
            "spec.template.metadata.labels",
            &spec["template"]["metadata"]["labels"],
            "`selector` does not match template `labels`",
        ));
    }
    validate_job_spec(spec, "spec", causes);
}

/// A CronJob's checks: a schedule that parses, a known time zone, its job template.
pub fn validate_cronjob(object: &Value, causes: &mut Vec<Cause>) {
    let spec = &object["spec"];
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    if name.len() > 52 {
        causes.push(invalid(
            "metadata.name",
            &json!(name),
            "must be no more than 52 characters",
        ));
    }
    match spec["schedule"].as_str() {
        None | Some("") => causes.push(cause(
            "FieldValueRequired",
            "spec.schedule".into(),
            "Required value".into(),
        )),
        Some(schedule) => {
            if let Err(e) = orquestra_cron::Schedule::parse(schedule) {
                causes.push(invalid("spec.schedule", &spec["schedule"], &e.to_string()));
            }
        }
    }
    if let Some(zone) = spec["timeZone"].as_str()
        && jiff::tz::TimeZone::get(zone).is_err()
    {
        causes.push(invalid(
            "spec.timeZone",
            &spec["timeZone"],
            &format!("unknown time zone {zone}"),
        ));
    }
    if !matches!(
        spec["concurrencyPolicy"].as_str(),
        None | Some("Allow" | "Forbid" | "Replace")
    ) {
        causes.push(cause(
            "FieldValueNotSupported",
            "spec.concurrencyPolicy".into(),
            format!(
                "Unsupported value: {}: supported values: \"Allow\", \"Forbid\", \"Replace\"",
                spec["concurrencyPolicy"]
            ),
        ));
    }
    for field in [
        "startingDeadlineSeconds",
        "successfulJobsHistoryLimit",
        "failedJobsHistoryLimit",
    ] {
        if spec[field].as_i64().is_some_and(|n| n < 0) {
            causes.push(invalid(
                &format!("spec.{field}"),
                &spec[field],
                "must be greater than or equal to 0",
            ));
        }
    }
    validate_job_spec(
        &spec["jobTemplate"]["spec"],
        "spec.jobTemplate.spec",
        causes,
    );
}

/// What a Job update may not change (`ValidateJobUpdate`): its selector and completion mode
/// ever, and its pod template once it has started (a suspended Job that never ran may
/// still be changed, as Kueue-like schedulers do).
pub fn validate_job_update(old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    let immutable = |field: &str| {
        cause(
            "FieldValueInvalid",
            field.to_owned(),
            "Invalid value: field is immutable".into(),
        )
    };
    for field in ["selector", "completionMode"] {
        if old["spec"][field] != new["spec"][field] {
            causes.push(immutable(&format!("spec.{field}")));
        }
    }
    let never_started = old["spec"]["suspend"] == true && old["status"]["startTime"].is_null();
    if !never_started && old["spec"]["template"] != new["spec"]["template"] {
        causes.push(immutable("spec.template"));
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_job_gets_its_uid_selector_and_defaults() {
        let mut job = json!({
            "metadata": {"name": "pi", "uid": "u-1"},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                "containers": [{"name": "c", "image": "busybox"}]}}}
        });
        job_defaults(&mut job);
        assert_eq!(
            job["spec"]["selector"]["matchLabels"][CONTROLLER_UID],
            "u-1"
        );
        assert_eq!(
            job["spec"]["template"]["metadata"]["labels"]["job-name"],
            "pi"
        );
        assert_eq!(job["spec"]["completions"], 1);
        assert_eq!(job["spec"]["parallelism"], 1);
        assert_eq!(job["spec"]["backoffLimit"], 6);
        assert_eq!(job["spec"]["completionMode"], "NonIndexed");
        let mut causes = Vec::new();
        validate_job(&job, &mut causes);
        assert!(causes.is_empty(), "{causes:?}");
    }

    #[test]
    fn bad_jobs_and_schedules_are_invalid_with_the_field() {
        let mut job = json!({
            "metadata": {"name": "pi", "uid": "u-1"},
            "spec": {"completionMode": "Indexed", "template": {"spec": {"restartPolicy": "Always",
                "containers": [{"name": "c", "image": "busybox"}]}}}
        });
        job["spec"]["completions"] = Value::Null;
        job_defaults(&mut job);
        job["spec"]["completions"] = Value::Null;
        let mut causes = Vec::new();
        validate_job(&job, &mut causes);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.template.spec.restartPolicy"),
            "{fields:?}"
        );
        assert!(fields.contains(&"spec.completions"), "{fields:?}");

        let cronjob = json!({
            "metadata": {"name": "nightly"},
            "spec": {"schedule": "61 * * * *", "timeZone": "Mars/Olympus",
                "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "OnFailure",
                    "containers": [{"name": "c", "image": "busybox"}]}}}}}
        });
        let mut causes = Vec::new();
        validate_cronjob(&cronjob, &mut causes);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["spec.schedule", "spec.timeZone"]);
    }
}
