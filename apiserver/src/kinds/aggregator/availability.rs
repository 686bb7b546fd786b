//! The APIServices' `Available` condition, as kube-apiserver's availability controller keeps
//! it: a local one (no Service) is available; a Service-backed one is when its server
//! answers its group/version's discovery through the proxy. A new or changed APIService is
//! checked at once, one not yet available every second, an available one every 10 s. Only the
//! `Available` condition is written; others a user set stay.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::request::{Params, Target};

/// How often the APIServices are looked at (a list from the watch cache): a new one is
/// checked at once, as kube-apiserver's controller does on its add event — clients read the
/// condition right after creating the APIService.
const TICK: Duration = Duration::from_millis(100);
/// How often an available, unchanged APIService is checked again.
const RECHECK: Duration = Duration::from_secs(10);

/// How long one check may take (a server that accepts and never answers must not stall the
/// others).
const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// When each APIService was last checked, and at which resourceVersion.
type Checked = HashMap<String, (Instant, String)>;

/// Checks the APIServices, for as long as the task runs.
pub async fn run(engine: Engine) {
    let mut checked = Checked::new();
    loop {
        check_all(&engine, &mut checked).await;
        tokio::time::sleep(TICK).await;
    }
}

async fn check_all(engine: &Engine, checked: &mut Checked) {
    let Some(def) = crate::quota::served(engine, super::GROUP, "apiservices") else {
        return;
    };
    let all = Target {
        def: def.clone(),
        namespace: None,
        name: None,
        subresource: None,
    };
    let Ok(list) = engine.list(&all, &Params::default()).await else {
        return;
    };
    let items = list["items"].as_array().cloned().unwrap_or_default();
    checked.retain(|name, _| items.iter().any(|s| s["metadata"]["name"] == name.as_str()));
    for api_service in &items {
        let name = api_service["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let version = api_service["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let current = api_service["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Available"));
        let due = match checked.get(&name) {
            None => true,
            Some((at, seen)) => {
                *seen != version
                    || (current.is_none_or(|c| c["status"] != "True")
                        && at.elapsed() >= Duration::from_secs(1))
                    || at.elapsed() >= RECHECK
            }
        };
        if !due {
            continue;
        }
        checked.insert(name.clone(), (Instant::now(), version));
        let (status, reason, message) = check(engine, api_service).await;
        tracing::debug!(apiservice = %name, status, reason, %message, "APIService checked");
        if current.is_some_and(|c| c["status"] == status && c["reason"] == reason) {
            continue;
        }
        let mut updated = api_service.clone();
        let mut conditions: Vec<Value> = updated["status"]["conditions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        conditions.retain(|c| c["type"] != "Available");
        conditions.push(
            json!({"type": "Available", "status": status, "reason": reason,
            "message": message, "lastTransitionTime": crate::object::now()}),
        );
        updated["status"] = json!({"conditions": conditions});
        let target = Target {
            def: def.clone(),
            namespace: None,
            name: api_service["metadata"]["name"].as_str().map(str::to_owned),
            subresource: Some("status".into()),
        };
        if let Err(error) = engine.update(&target, updated, false).await {
            tracing::warn!(%error, "writing an APIService's availability");
        }
    }
}

/// `(status, reason, message)` of one APIService's `Available` condition.
async fn check(engine: &Engine, api_service: &Value) -> (&'static str, &'static str, String) {
    if !api_service["spec"]["service"].is_object() {
        return (
            "True",
            "Local",
            "Local APIServices are always available".into(),
        );
    }
    let group = api_service["spec"]["group"].as_str().unwrap_or_default();
    let version = api_service["spec"]["version"].as_str().unwrap_or_default();
    let path = format!("/apis/{group}/{version}");
    let caller = crate::authorization::User {
        name: "system:kube-aggregator".into(),
        groups: vec![crate::authorization::MASTERS.into()],
        ..Default::default()
    };
    let answer = tokio::time::timeout(
        CHECK_TIMEOUT,
        super::proxy(
            engine,
            api_service,
            axum::http::Method::GET,
            &path,
            &axum::http::HeaderMap::new(),
            Some(&caller),
            axum::body::Bytes::new(),
        ),
    )
    .await
    .unwrap_or_else(|_| {
        Err(crate::error::ApiError::Timeout(format!(
            "no answer from {path} in {CHECK_TIMEOUT:?}"
        )))
    });
    match answer {
        Ok(response) if response.status() == StatusCode::OK => {
            ("True", "Passed", "all checks passed".into())
        }
        Ok(response) => (
            "False",
            "FailedDiscoveryCheck",
            format!(
                "failing or missing response from {path}: {}",
                response.status()
            ),
        ),
        Err(error) => ("False", "FailedDiscoveryCheck", error.to_string()),
    }
}
