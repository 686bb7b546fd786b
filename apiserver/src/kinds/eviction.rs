//! `POST pods/<name>/eviction`: a pod deleted only if its PodDisruptionBudget allows it —
//! what `kubectl drain` calls, as kube-apiserver's eviction REST does it.
//!
//! A pod that is pending, finished or already being deleted goes at once (it disrupts
//! nothing). Otherwise the one PodDisruptionBudget that selects it decides: the eviction takes
//! one of the budget's `disruptionsAllowed` (and notes the pod in `disruptedPods`, so the
//! disruption controller does not count it as available meanwhile), or is refused with a 429
//! the client retries. An unready pod may go without spending the budget when the budget is
//! met anyway (`IfHealthyBudget`) or its policy is `AlwaysAllow`. The pod gets the
//! `DisruptionTarget` condition before it is deleted, as the kubelet and controllers expect.

use std::sync::Arc;

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::{ApiError, Cause};
use crate::request::{Params, Target};
use crate::selector::LabelSelector;

/// How often the budget update is retried when another eviction updated it first.
const RETRIES: usize = 5;

/// kube-apiserver's bound on evictions the disruption controller has not yet confirmed.
const MAX_DISRUPTED_PODS: usize = 2000;

/// Whether `target` is a pod's eviction subresource.
pub fn is_eviction(target: &Target) -> bool {
    target.def.group.is_empty()
        && target.def.plural == "pods"
        && target.subresource.as_deref() == Some("eviction")
}

/// Evicts the pod `target` names, as `eviction` (a `policy/v1` Eviction) asks; `params` may
/// carry `dryRun`. The answer is kube's success `Status`.
pub async fn evict(
    engine: &Engine,
    target: &Target,
    eviction: &Value,
    params: &Params,
) -> Result<Value, ApiError> {
    let name = target.name.clone().unwrap_or_default();
    if eviction.pointer("/metadata/name").and_then(Value::as_str) != Some(name.as_str()) {
        return Err(ApiError::BadRequest(
            "name in URL does not match name in Eviction object".into(),
        ));
    }
    let mut options = match eviction.get("deleteOptions") {
        Some(Value::Object(o)) => Value::Object(o.clone()),
        _ => json!({}),
    };
    // As kube-apiserver: an eviction never bypasses the store's checks.
    if options["ignoreStoreReadErrorWithClusterBreakingPotential"] == json!(true) {
        return Err(ApiError::Invalid {
            kind: "Eviction".into(),
            name,
            group: "policy".into(),
            causes: vec![Cause {
                reason: "FieldValueInvalid".into(),
                message: "Invalid value: true: can not be set for pod eviction, try after \
                          removing the option"
                    .into(),
                field: "deleteOptions.ignoreStoreReadErrorWithClusterBreakingPotential".into(),
            }],
        });
    }
    let dry_run = dry_run(&mut options, params)?;
    let delete_params = Params {
        dry_run: dry_run.then(|| "All".to_owned()),
        ..Params::default()
    };
    let pod_target = Target {
        subresource: None,
        ..target.clone()
    };
    let pod = engine.get(&pod_target).await?;
    if can_ignore_budget(&pod) {
        let mut options = options.clone();
        if should_pin_version(&pod) && !has_version_precondition(&options) {
            pin_version(&mut options, &pod);
        }
        delete(engine, &pod_target, options, &delete_params).await?;
        return Ok(success());
    }

    let budgets = budgets_of(engine, &pod).await?;
    let mut pin = false;
    match budgets.as_slice() {
        [] => {}
        [_, _, ..] => {
            return Err(ApiError::Internal(
                "This pod has more than one PodDisruptionBudget, which the eviction subresource \
                 does not support."
                    .into(),
            ));
        }
        [budget] => {
            let status = &budget["status"];
            let int = |field: &str| status[field].as_i64().unwrap_or(0);
            let unhealthy_may_go = !is_ready(&pod)
                && (budget.pointer("/spec/unhealthyPodEvictionPolicy")
                    == Some(&json!("AlwaysAllow"))
                    || (int("currentHealthy") >= int("desiredHealthy")
                        && int("desiredHealthy") > 0));
            if unhealthy_may_go {
                // The budget is not spent; the pod must still be unready when it goes.
                pin = true;
            } else {
                spend(engine, budget.clone(), &name, dry_run).await?;
            }
        }
    }
    let version_given = has_version_precondition(&options);
    if pin {
        pin_version(&mut options, &pod);
    }
    match delete(engine, &pod_target, options, &delete_params).await {
        // The pod changed (became ready, say) since the budget was judged: try again.
        Err(ApiError::Conflict { .. }) if pin && !version_given => {
            let budget = budgets[0]["metadata"]["name"].as_str().unwrap_or_default();
            Err(too_many_requests(budget, 10, still_processing(budget)))
        }
        Err(error) => Err(error),
        Ok(()) => Ok(success()),
    }
}

/// The dry-run of the query and of the Eviction's `deleteOptions`, which must agree.
fn dry_run(options: &mut Value, params: &Params) -> Result<bool, ApiError> {
    let query = params.dry_run()?;
    let body: Vec<&str> = options["dryRun"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let body_dry = match body.as_slice() {
        [] => None,
        ["All"] => Some(true),
        other => {
            return Err(ApiError::BadRequest(format!(
                "Invalid dry run value: {other:?} (supported: All)"
            )));
        }
    };
    match (query, body_dry) {
        (true, None) => {
            options["dryRun"] = json!(["All"]);
            Ok(true)
        }
        (false, Some(_)) | (true, Some(_)) => Ok(true),
        (false, None) => Ok(false),
    }
}

/// A pod whose deletion disrupts nothing: not yet running, finished, or already going.
fn can_ignore_budget(pod: &Value) -> bool {
    matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed" | "Pending")
    ) || pod.pointer("/metadata/deletionTimestamp").is_some()
}

/// Whether the deletion must be of the pod as judged (not of a later version of it).
fn should_pin_version(pod: &Value) -> bool {
    !matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    ) && pod.pointer("/metadata/deletionTimestamp").is_none()
}

fn has_version_precondition(options: &Value) -> bool {
    options
        .pointer("/preconditions/resourceVersion")
        .is_some_and(|v| !v.is_null())
}

fn pin_version(options: &mut Value, pod: &Value) {
    options["preconditions"]["resourceVersion"] = pod["metadata"]["resourceVersion"].clone();
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|conditions| {
            conditions
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// The PodDisruptionBudgets of the pod's namespace whose selector selects it (a budget
/// without a selector selects nothing; an empty one selects every pod).
async fn budgets_of(engine: &Engine, pod: &Value) -> Result<Vec<Value>, ApiError> {
    let Some(def) = engine.registry.get("policy", "v1", "poddisruptionbudgets") else {
        return Ok(Vec::new());
    };
    let namespace = pod
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let list = engine
        .list(
            &Target {
                def: Arc::clone(&def),
                namespace,
                name: None,
                subresource: None,
            },
            &Params::default(),
        )
        .await?;
    let budgets = list["items"].as_array().cloned().unwrap_or_default();
    Ok(budgets
        .into_iter()
        .filter(|budget| {
            let selector = &budget["spec"]["selector"];
            !selector.is_null()
                && LabelSelector::parse(&crate::subresource::selector_string(selector))
                    .is_ok_and(|s| s.matches(pod))
        })
        .collect())
}

/// Takes one disruption from `budget` (re-reading it when another eviction got there first),
/// or refuses as kube-apiserver does.
async fn spend(
    engine: &Engine,
    mut budget: Value,
    pod: &str,
    dry_run: bool,
) -> Result<(), ApiError> {
    let name = budget["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let Some(def) = engine.registry.get("policy", "v1", "poddisruptionbudgets") else {
        return Ok(());
    };
    let target = Target {
        def,
        namespace: budget["metadata"]["namespace"].as_str().map(str::to_owned),
        name: Some(name.clone()),
        subresource: Some("status".into()),
    };
    for _ in 0..RETRIES {
        check(&budget, &name)?;
        let status = &mut budget["status"];
        let allowed = status["disruptionsAllowed"].as_i64().unwrap_or(0) - 1;
        status["disruptionsAllowed"] = json!(allowed);
        if allowed == 0 {
            set_insufficient(status);
        }
        if dry_run {
            return Ok(());
        }
        if !status["disruptedPods"].is_object() {
            status["disruptedPods"] = json!({});
        }
        status["disruptedPods"][pod] = json!(crate::object::now());
        match engine.update(&target, budget.clone(), false).await {
            Ok(_) => return Ok(()),
            Err(ApiError::Conflict { .. }) => {
                budget = engine
                    .get(&Target {
                        subresource: None,
                        ..target.clone()
                    })
                    .await?;
            }
            Err(error) => return Err(error),
        }
    }
    Err(ApiError::Timeout(format!(
        "couldn't update PodDisruptionBudget {name:?} due to conflicts"
    )))
}

/// Whether the budget as read allows one more disruption.
fn check(budget: &Value, name: &str) -> Result<(), ApiError> {
    let status = &budget["status"];
    let int = |field: &str| status[field].as_i64().unwrap_or(0);
    let generation = budget["metadata"]["generation"].as_i64().unwrap_or(0);
    if int("observedGeneration") < generation {
        return Err(too_many_requests(name, 10, still_processing(name)));
    }
    let forbidden = |why: &str| ApiError::Forbidden {
        resource: "poddisruptionbudget".into(),
        name: name.to_owned(),
        group: "policy".into(),
        message: format!("poddisruptionbudget.policy \"{name}\" is forbidden: {why}"),
        causes: Vec::new(),
    };
    if int("disruptionsAllowed") < 0 {
        return Err(forbidden("pdb disruptions allowed is negative"));
    }
    if status["disruptedPods"]
        .as_object()
        .is_some_and(|pods| pods.len() > MAX_DISRUPTED_PODS)
    {
        return Err(forbidden(
            "DisruptedPods map too big - too many evictions not confirmed by PDB controller",
        ));
    }
    if int("disruptionsAllowed") == 0 {
        let condition = status["conditions"]
            .as_array()
            .and_then(|conditions| conditions.iter().find(|c| c["type"] == "DisruptionAllowed"));
        let false_with = |reason: Option<&str>| {
            condition.filter(|c| {
                c["status"] == "False"
                    && c["message"].as_str().is_some_and(|m| !m.is_empty())
                    && reason.is_none_or(|r| c["reason"] == r)
            })
        };
        let message = if let Some(c) = false_with(Some("SyncFailed")) {
            format!(
                "The disruption budget {name} does not allow evicting pods currently because it failed sync: {}",
                c["message"].as_str().unwrap_or_default()
            )
        } else if int("currentHealthy") <= int("desiredHealthy") {
            format!(
                "The disruption budget {name} needs {} healthy pods and has {} currently",
                int("desiredHealthy"),
                int("currentHealthy")
            )
        } else if let Some(c) = false_with(None) {
            format!(
                "The disruption budget {name} does not allow evicting pods currently ({}): {}",
                c["reason"].as_str().unwrap_or_default(),
                c["message"].as_str().unwrap_or_default()
            )
        } else {
            format!("The disruption budget {name} does not allow evicting pods currently")
        };
        return Err(too_many_requests(name, 0, message));
    }
    Ok(())
}

/// The `DisruptionAllowed` condition once the budget is spent.
fn set_insufficient(status: &mut Value) {
    let condition = json!({
        "type": "DisruptionAllowed", "status": "False", "reason": "InsufficientPods",
        "message": "", "observedGeneration": status.get("observedGeneration").cloned().unwrap_or(json!(0)),
        "lastTransitionTime": crate::object::now(),
    });
    if !status["conditions"].is_array() {
        status["conditions"] = json!([]);
    }
    let Some(conditions) = status["conditions"].as_array_mut() else {
        return;
    };
    match conditions
        .iter_mut()
        .find(|c| c["type"] == "DisruptionAllowed")
    {
        Some(existing) if existing["status"] == "False" => {
            existing["reason"] = json!("InsufficientPods");
        }
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

fn still_processing(name: &str) -> String {
    format!("The disruption budget {name} is still being processed by the server.")
}

fn too_many_requests(_budget: &str, retry_after: u32, cause: String) -> ApiError {
    ApiError::TooManyRequests {
        message: "Cannot evict pod as it would violate the pod's disruption budget.".into(),
        retry_after,
        causes: vec![Cause {
            reason: "DisruptionBudget".into(),
            message: cause,
            field: String::new(),
        }],
    }
}

/// Marks the pod a `DisruptionTarget` (unless this is a dry run), then deletes it.
async fn delete(
    engine: &Engine,
    pod_target: &Target,
    mut options: Value,
    params: &Params,
) -> Result<(), ApiError> {
    if !params.dry_run()? {
        let mut pod = engine.get(pod_target).await?;
        if let Some(uid) = options
            .pointer("/preconditions/uid")
            .and_then(Value::as_str)
            && pod.pointer("/metadata/uid").and_then(Value::as_str) != Some(uid)
        {
            return Err(ApiError::Conflict {
                resource: "pods".into(),
                name: pod_target.name.clone().unwrap_or_default(),
                group: String::new(),
                message: format!(
                    "Operation cannot be fulfilled on pods \"{}\": the UID in the precondition \
                     ({uid}) does not match the UID in record ({}). The object might have been \
                     deleted and then recreated",
                    pod_target.name.as_deref().unwrap_or_default(),
                    pod["metadata"]["uid"].as_str().unwrap_or_default()
                ),
            });
        }
        if let Some(version) = options
            .pointer("/preconditions/resourceVersion")
            .and_then(Value::as_str)
            && pod["metadata"]["resourceVersion"] != version
        {
            return Err(ApiError::stale(
                &pod_target.def,
                &pod_target.name.clone().unwrap_or_default(),
            ));
        }
        mark_disruption_target(&mut pod);
        let status_target = Target {
            subresource: Some("status".into()),
            ..pod_target.clone()
        };
        let updated = engine.update(&status_target, pod, false).await?;
        if has_version_precondition(&options) {
            // The version judged is the one just written.
            options["preconditions"]["resourceVersion"] =
                updated["metadata"]["resourceVersion"].clone();
        }
    }
    engine.delete(pod_target, &options, params).await?;
    Ok(())
}

/// Sets the pod's `DisruptionTarget` condition to say the eviction API is evicting it.
fn mark_disruption_target(pod: &mut Value) {
    if !pod["status"]["conditions"].is_array() {
        pod["status"]["conditions"] = json!([]);
    }
    let Some(conditions) = pod["status"]["conditions"].as_array_mut() else {
        return;
    };
    let condition = json!({
        "type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI",
        "message": "Eviction API: evicting", "lastTransitionTime": crate::object::now(),
    });
    match conditions
        .iter_mut()
        .find(|c| c["type"] == "DisruptionTarget")
    {
        Some(existing) if existing["status"] == "True" => {
            existing["reason"] = condition["reason"].clone();
            existing["message"] = condition["message"].clone();
        }
        Some(existing) => *existing = condition,
        None => conditions.push(condition),
    }
}

fn success() -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201})
}
