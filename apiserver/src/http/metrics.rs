//! Request and storage metrics with kube-apiserver's names and labels, so existing
//! dashboards and alerts apply: `apiserver_request_total`,
//! `apiserver_request_duration_seconds`, `apiserver_current_inflight_requests`,
//! `apiserver_longrunning_requests` and `apiserver_storage_objects`. Long-running requests
//! (watches, pod logs) count when they start, are left out of the latency histogram and the
//! in-flight gauge, and are counted in `apiserver_longrunning_requests` until their response
//! body ends — as upstream does.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use futures::StreamExt;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use crate::cache::WatchCache;
use crate::request_info::RequestInfo;

/// The labels kube-apiserver puts on a request's metrics, in order.
const REQUEST_LABELS: [&str; 8] = [
    "verb",
    "dry_run",
    "group",
    "version",
    "resource",
    "subresource",
    "scope",
    "component",
];

/// The API server's request metrics.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    requests: IntCounterVec,
    latency: HistogramVec,
    inflight_read: IntGauge,
    inflight_mutating: IntGauge,
    longrunning: IntGaugeVec,
}

impl ApiMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<ApiMetrics> {
        let mut with_code = REQUEST_LABELS.to_vec();
        with_code.push("code");
        let requests = IntCounterVec::new(
            Opts::new(
                "apiserver_request_total",
                "Counter of apiserver requests broken out for each verb, dry run value, group, \
                 version, resource, scope, component, and HTTP response code.",
            ),
            &with_code,
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "apiserver_request_duration_seconds",
                "Response latency distribution in seconds for each verb, dry run value, group, \
                 version, resource, subresource, scope and component (long-running requests \
                 excluded).",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6,
                0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0,
                8.0, 9.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0,
            ]),
            &REQUEST_LABELS,
        )?;
        let inflight = IntGaugeVec::new(
            Opts::new(
                "apiserver_current_inflight_requests",
                "Maximal number of currently used inflight request limit of this apiserver per \
                 request kind in last second (here: requests being served now).",
            ),
            &["request_kind"],
        )?;
        let longrunning = IntGaugeVec::new(
            Opts::new(
                "apiserver_longrunning_requests",
                "Gauge of all active long-running apiserver requests broken out by verb, group, \
                 version, resource, scope and component.",
            ),
            &REQUEST_LABELS,
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        registry.register(Box::new(longrunning.clone()))?;
        Ok(ApiMetrics {
            requests,
            latency,
            inflight_read: inflight.with_label_values(&["readOnly"]),
            inflight_mutating: inflight.with_label_values(&["mutating"]),
            longrunning,
        })
    }
}

/// Decrements a gauge when dropped: with the response body, when a long-running request
/// ends; with the handler's future, when a request finishes or its client goes away.
struct Active(IntGauge);

impl Active {
    fn new(gauge: IntGauge) -> Active {
        gauge.inc();
        Active(gauge)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// In the response of an upgraded request: resolves (or is dropped) when the stream it
/// opened ends, which is how long the request counts as long-running.
#[derive(Clone, Debug)]
pub struct StreamOpen(pub Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>);

impl StreamOpen {
    /// A marker and the sender whose drop ends the stream's count.
    pub fn new() -> (StreamOpen, tokio::sync::oneshot::Sender<()>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (StreamOpen(Arc::new(std::sync::Mutex::new(Some(rx)))), tx)
    }
}

/// Middleware recording every API request.
pub async fn record(
    State(metrics): State<Arc<ApiMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(info) = RequestInfo::parse(
        request.method(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    ) else {
        return next.run(request).await;
    };
    let labels = info.labels();
    let started = Instant::now();
    if info.long_running() {
        let active = Active::new(metrics.longrunning.with_label_values(&labels));
        let response = next.run(request).await;
        count(&metrics, &labels, &response);
        // An upgraded stream (`pods/exec`) is counted until its relay ends.
        if let Some(open) = response.extensions().get::<StreamOpen>() {
            let ended = open.0.lock().ok().and_then(|mut e| e.take());
            if let Some(ended) = ended {
                tokio::spawn(async move {
                    let _ = ended.await;
                    drop(active);
                });
                return response;
            }
        }
        // Counted until the stream ends (or the client goes away and hyper drops it).
        let (parts, body) = response.into_parts();
        let body = Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _ = &active;
            chunk
        }));
        return Response::from_parts(parts, body);
    }
    let inflight = if info.read_only() {
        &metrics.inflight_read
    } else {
        &metrics.inflight_mutating
    };
    let response = {
        let _active = Active::new(inflight.clone());
        next.run(request).await
    };
    count(&metrics, &labels, &response);
    metrics
        .latency
        .with_label_values(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}

fn count(metrics: &ApiMetrics, labels: &[&str; 8], response: &Response) {
    let code = response.status().as_u16().to_string();
    let mut with_code = labels.to_vec();
    with_code.push(&code);
    metrics.requests.with_label_values(&with_code).inc();
}

/// `apiserver_storage_objects{resource}`: the objects stored per resource, counted from the
/// watch cache when Prometheus scrapes (upstream's resource label: `pods`,
/// `deployments.apps`). Orquestra's own bookkeeping keys (allocated IPs and ports) are not
/// counted.
pub struct StorageObjects {
    cache: WatchCache,
    desc: Desc,
}

impl std::fmt::Debug for StorageObjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageObjects").finish_non_exhaustive()
    }
}

impl StorageObjects {
    /// Registers the collector over `cache` in `registry`.
    pub fn register(registry: &Registry, cache: WatchCache) -> prometheus::Result<()> {
        let desc = Desc::new(
            "apiserver_storage_objects".into(),
            "Number of stored objects at the time of last check split by kind.".into(),
            vec!["resource".into()],
            Default::default(),
        )?;
        registry.register(Box::new(StorageObjects { cache, desc }))
    }
}

impl Collector for StorageObjects {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for (group, plural, n) in self.cache.counts() {
            let resource = match group.as_str() {
                "core" => plural,
                "orquestra" => continue,
                _ => format!("{plural}.{group}"),
            };
            *counts.entry(resource).or_default() += n as i64;
        }
        let Ok(gauge) = IntGaugeVec::new(
            Opts::new(self.desc.fq_name.clone(), self.desc.help.clone()),
            &["resource"],
        ) else {
            return Vec::new();
        };
        for (resource, n) in counts {
            gauge.with_label_values(&[&resource]).set(n);
        }
        gauge.collect()
    }
}
