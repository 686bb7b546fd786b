//! Request metrics with kube-apiserver's names, so existing dashboards and alerts apply:
//! `apiserver_request_total{verb,resource,code}` and
//! `apiserver_request_duration_seconds{verb,resource}`. Long-running WATCH requests count
//! when they start and are left out of the latency histogram, as upstream does.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// The API server's request metrics.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl ApiMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<ApiMetrics> {
        let requests = IntCounterVec::new(
            Opts::new(
                "apiserver_request_total",
                "API requests by verb, resource and HTTP code.",
            ),
            &["verb", "resource", "code"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "apiserver_request_duration_seconds",
                "API request latency by verb and resource (watches excluded).",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["verb", "resource"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        Ok(ApiMetrics { requests, latency })
    }
}

/// kube-apiserver's verb and the resource (`plural` or `plural/subresource`) of a request.
fn classify(method: &Method, path: &str, query: &str) -> Option<(&'static str, String)> {
    let rest = if let Some(rest) = path.strip_prefix("/api/v1/") {
        rest
    } else {
        let rest = path.strip_prefix("/apis/")?;
        let mut parts = rest.splitn(3, '/');
        let (_group, _version) = (parts.next()?, parts.next()?);
        parts.next()?
    };
    let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let segments = match segments.as_slice() {
        ["namespaces", _, resource, tail @ ..] if !matches!(*resource, "status" | "finalize") => {
            [&[*resource][..], tail].concat()
        }
        other => other.to_vec(),
    };
    let resource = match segments.as_slice() {
        [plural] | [plural, _] => (*plural).to_owned(),
        [plural, _, sub, ..] => format!("{plural}/{sub}"),
        [] => return None,
    };
    let named = segments.len() >= 2;
    let watch = query
        .split('&')
        .any(|kv| kv == "watch=true" || kv == "watch=1");
    let verb = match (method, named) {
        (&Method::GET, false) if watch => "WATCH",
        (&Method::GET, false) => "LIST",
        (&Method::GET, true) => "GET",
        (&Method::POST, _) => "POST",
        (&Method::PUT, _) => "PUT",
        (&Method::PATCH, _) => "PATCH",
        (&Method::DELETE, false) => "DELETECOLLECTION",
        (&Method::DELETE, true) => "DELETE",
        _ => "OTHER",
    };
    Some((verb, resource))
}

/// Middleware recording every API request.
pub async fn record(
    State(metrics): State<Arc<ApiMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let class = classify(
        request.method(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    );
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some((verb, resource)) = class {
        let code = response.status().as_u16().to_string();
        metrics
            .requests
            .with_label_values(&[verb, &resource, &code])
            .inc();
        if verb != "WATCH" {
            metrics
                .latency
                .with_label_values(&[verb, &resource])
                .observe(started.elapsed().as_secs_f64());
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbs_and_resources() {
        let c = |m: Method, p: &str, q: &str| classify(&m, p, q);
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/default/pods", ""),
            Some(("LIST", "pods".into()))
        );
        assert_eq!(
            c(Method::GET, "/api/v1/pods", "watch=true"),
            Some(("WATCH", "pods".into()))
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/default", ""),
            Some(("GET", "namespaces".into()))
        );
        assert_eq!(
            c(Method::PUT, "/api/v1/namespaces/x/status", ""),
            Some(("PUT", "namespaces/status".into()))
        );
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/apps/v1/namespaces/d/deployments/web/scale",
                ""
            ),
            Some(("PATCH", "deployments/scale".into()))
        );
        assert_eq!(c(Method::GET, "/healthz", ""), None);
    }
}
