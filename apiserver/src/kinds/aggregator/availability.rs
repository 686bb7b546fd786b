//! The APIServices' `Available` condition, as kube-apiserver's availability controller keeps
//! it: a local one (no Service) is available; a Service-backed one is when its server
//! answers its group/version's discovery through the proxy, checked every few seconds. Only
//! the `Available` condition is written; others a user set stay.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::request::{Params, Target};

/// How often every APIService is checked.
const PERIOD: Duration = Duration::from_secs(5);

/// Checks every APIService each period, for as long as the task runs.
pub async fn run(engine: Engine) {
    loop {
        check_all(&engine).await;
        tokio::time::sleep(PERIOD).await;
    }
}

async fn check_all(engine: &Engine) {
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
    for api_service in list["items"].as_array().into_iter().flatten() {
        let (status, reason, message) = check(engine, api_service).await;
        let current = api_service["status"]["conditions"]
            .as_array()
            .and_then(|c| c.iter().find(|c| c["type"] == "Available"));
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
            tracing::debug!(%error, "writing an APIService's availability");
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
    };
    let answer = super::proxy(
        engine,
        api_service,
        axum::http::Method::GET,
        &path,
        &axum::http::HeaderMap::new(),
        Some(&caller),
        axum::body::Bytes::new(),
    )
    .await;
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
