//! The HorizontalPodAutoscaler controller (`horizontalpodautoscaling`), as
//! kube-controller-manager's for `autoscaling/v2` resource metrics: every sync period it
//! reads the target's `scale` subresource (any kind that has one — Deployments,
//! ReplicaSets, StatefulSets, custom resources), the pods its selector names, and their CPU
//! or memory use; it computes the replicas that bring the average utilization (of the pods'
//! requests) or value to the target, as kube's replica calculator does (a 10 % tolerance;
//! pods without metrics counted against the direction of change), applies the `behavior`
//! (stabilization windows — 300 s for scaling down by default — and the rate policies), the
//! min/max bounds, and writes the new `scale`.
//!
//! **Where usage comes from.** From `metrics.k8s.io` ([`ResourceMetricsApi`]), as kube's
//! controller reads it: Orquestra's API server serves it, as metrics-server does elsewhere.
//! Where no server serves it, the pods' use is read from their node agents' cAdvisor-named
//! counters (`container_cpu_usage_seconds_total`, `container_memory_working_set_bytes`)
//! through `nodes/proxy`, CPU rates taken between this controller's own successive samples
//! ([`NodeMetrics`]). [`UsageSource`] is the seam.
//!
//! Status carries `currentReplicas`, `desiredReplicas`, `currentMetrics`, `lastScaleTime`
//! and the `AbleToScale`, `ScalingActive` and `ScalingLimited` conditions; a rescale is a
//! `SuccessfulRescale` event naming the reason.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::autoscaling::v2::{HPAScalingRules, HorizontalPodAutoscaler, MetricSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::quantity;
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::{Value, json};

use crate::events::{EventType, publish};
use crate::objects::ready;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["autoscaling"],
        resources: &["horizontalpodautoscalers"],
        verbs: READ,
    },
    Rule {
        api_groups: &["autoscaling"],
        resources: &["horizontalpodautoscalers/status"],
        verbs: &["patch", "update"],
    },
    Rule {
        api_groups: &["*"],
        resources: &["*/scale"],
        verbs: &["get", "patch", "update"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list"],
    },
    Rule {
        api_groups: &["metrics.k8s.io"],
        resources: &["pods"],
        verbs: &["get", "list"],
    },
    Rule {
        api_groups: &[""],
        resources: &["nodes/proxy"],
        verbs: &["get"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "horizontal-pod-autoscaler";
/// How close to the target counts as there (`--horizontal-pod-autoscaler-tolerance`).
const TOLERANCE: f64 = 0.1;

/// What can go wrong in one sync (retried with backoff; the status says it too).
#[derive(Debug, thiserror::Error)]
pub enum AutoscalerError {
    /// An API request failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
}

/// A pod's use of CPU (cores) and memory (bytes) now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// CPU in cores (a rate).
    pub cpu: Option<f64>,
    /// Memory working set in bytes.
    pub memory: Option<f64>,
}

/// Where pods' resource use comes from.
#[async_trait::async_trait]
pub trait UsageSource: Send + Sync {
    /// The use of each of `pods` that is known (namespace/name → usage).
    async fn usage(&self, pods: &[Pod]) -> HashMap<(String, String), Usage>;
}

/// Pods' use read from their node agents' metrics through `nodes/proxy`, CPU rates taken
/// between successive samples (at least a second apart).
pub struct NodeMetrics {
    client: Client,
    samples: Mutex<HashMap<(String, String), (f64, Instant)>>,
    rates: Mutex<HashMap<(String, String), f64>>,
}

impl std::fmt::Debug for NodeMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMetrics").finish_non_exhaustive()
    }
}

impl NodeMetrics {
    /// A source reading through `client`.
    pub fn new(client: Client) -> Self {
        NodeMetrics {
            client,
            samples: Mutex::default(),
            rates: Mutex::default(),
        }
    }
}

/// `(namespace, pod) → (cpu seconds, memory bytes)` summed over containers, from
/// Prometheus text.
fn parse_metrics(text: &str) -> HashMap<(String, String), (f64, f64)> {
    let mut out: HashMap<(String, String), (f64, f64)> = HashMap::new();
    for line in text.lines() {
        let (cpu, rest) =
            if let Some(rest) = line.strip_prefix("container_cpu_usage_seconds_total{") {
                (true, rest)
            } else if let Some(rest) = line.strip_prefix("container_memory_working_set_bytes{") {
                (false, rest)
            } else {
                continue;
            };
        let Some((labels, value)) = rest.split_once('}') else {
            continue;
        };
        let Ok(value) = value.split_whitespace().next().unwrap_or("").parse::<f64>() else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                (k.trim() == name).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        let (Some(namespace), Some(pod)) = (label("namespace"), label("pod")) else {
            continue;
        };
        let entry = out.entry((namespace, pod)).or_default();
        if cpu {
            entry.0 += value;
        } else {
            entry.1 += value;
        }
    }
    out
}

#[async_trait::async_trait]
impl UsageSource for NodeMetrics {
    async fn usage(&self, pods: &[Pod]) -> HashMap<(String, String), Usage> {
        let mut nodes: Vec<String> = pods
            .iter()
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
        nodes.sort();
        nodes.dedup();
        let mut measured: HashMap<(String, String), (f64, f64)> = HashMap::new();
        for node in nodes {
            let request =
                http::Request::get(format!("/api/v1/nodes/{node}/proxy/metrics")).body(Vec::new());
            let Ok(request) = request else { continue };
            match self.client.request_text(request).await {
                Ok(text) => measured.extend(parse_metrics(&text)),
                Err(error) => tracing::debug!(%node, %error, "reading the node's metrics failed"),
            }
        }
        let now = Instant::now();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let mut rates = self.rates.lock().unwrap_or_else(|e| e.into_inner());
        let mut out = HashMap::new();
        for pod in pods {
            let key = (pod.namespace().unwrap_or_default(), pod.name_any());
            let Some(&(cpu_seconds, memory)) = measured.get(&key) else {
                continue;
            };
            if let Some(&(before, at)) = samples.get(&key) {
                let elapsed = now.duration_since(at).as_secs_f64();
                if elapsed >= 1.0 && cpu_seconds >= before {
                    rates.insert(key.clone(), (cpu_seconds - before) / elapsed);
                }
            }
            if samples
                .get(&key)
                .is_none_or(|(_, at)| now.duration_since(*at) >= Duration::from_secs(1))
            {
                samples.insert(key.clone(), (cpu_seconds, now));
            }
            out.insert(
                key.clone(),
                Usage {
                    cpu: rates.get(&key).copied(),
                    memory: Some(memory),
                },
            );
        }
        // Forget pods that are gone.
        let live: std::collections::HashSet<_> = out.keys().cloned().collect();
        samples.retain(|k, _| {
            live.contains(k)
                || !pods
                    .iter()
                    .any(|p| p.namespace().as_deref() == Some(k.0.as_str()))
        });
        rates.retain(|k, _| samples.contains_key(k));
        out
    }
}

/// Pods' use read from `metrics.k8s.io` (`PodMetrics`, summed over containers), falling
/// back to [`NodeMetrics`] where the API is not served.
pub struct ResourceMetricsApi {
    client: Client,
    fallback: NodeMetrics,
}

impl std::fmt::Debug for ResourceMetricsApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResourceMetricsApi").finish_non_exhaustive()
    }
}

impl ResourceMetricsApi {
    /// A source reading through `client`.
    pub fn new(client: Client) -> Self {
        ResourceMetricsApi {
            fallback: NodeMetrics::new(client.clone()),
            client,
        }
    }

    /// The use of the pods of `namespace` that have metrics, or the error reading them.
    async fn namespace(
        &self,
        namespace: &str,
    ) -> Result<HashMap<(String, String), Usage>, kube::Error> {
        let request = http::Request::get(format!(
            "/apis/metrics.k8s.io/v1beta1/namespaces/{namespace}/pods"
        ))
        .body(Vec::new())
        .map_err(kube::Error::HttpError)?;
        let list: Value = self.client.request(request).await?;
        Ok(pod_metrics_usage(&list))
    }
}

/// `(namespace, pod)` → usage of a `PodMetricsList`.
fn pod_metrics_usage(list: &Value) -> HashMap<(String, String), Usage> {
    let mut out = HashMap::new();
    for item in list["items"].as_array().into_iter().flatten() {
        let (Some(namespace), Some(name)) = (
            item.pointer("/metadata/namespace").and_then(Value::as_str),
            item.pointer("/metadata/name").and_then(Value::as_str),
        ) else {
            continue;
        };
        let mut usage = Usage {
            cpu: Some(0.0),
            memory: Some(0.0),
        };
        for container in item["containers"].as_array().into_iter().flatten() {
            let read = |resource: &str, scale: f64| {
                container["usage"][resource]
                    .as_str()
                    .and_then(|q| quantity::parse(q, scale))
                    .map(|v| v as f64 / scale)
            };
            usage.cpu = usage.cpu.zip(read("cpu", 1e9)).map(|(a, b)| a + b);
            usage.memory = usage.memory.zip(read("memory", 1.0)).map(|(a, b)| a + b);
        }
        out.insert((namespace.to_owned(), name.to_owned()), usage);
    }
    out
}

#[async_trait::async_trait]
impl UsageSource for ResourceMetricsApi {
    async fn usage(&self, pods: &[Pod]) -> HashMap<(String, String), Usage> {
        let mut namespaces: Vec<String> = pods.iter().filter_map(|p| p.namespace()).collect();
        namespaces.sort();
        namespaces.dedup();
        let mut out = HashMap::new();
        for namespace in namespaces {
            match self.namespace(&namespace).await {
                Ok(usage) => out.extend(usage),
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    // Not served here: the agents' counters instead.
                    return self.fallback.usage(pods).await;
                }
                Err(error) => {
                    tracing::debug!(%namespace, %error, "reading the pods' metrics failed");
                }
            }
        }
        out
    }
}

/// Past recommendations and scale changes of one autoscaler (for its behavior).
#[derive(Debug, Default)]
struct History {
    recommendations: Vec<(Instant, i32)>,
    changes: Vec<(Instant, i32)>,
}

/// What the reconciler shares.
pub struct Context {
    client: Client,
    source: Box<dyn UsageSource>,
    period: Duration,
    history: Mutex<HashMap<String, History>>,
    kinds: Mutex<HashMap<(String, String), ApiResource>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoscalerContext").finish_non_exhaustive()
    }
}

/// Adds the autoscaler to `manager`, syncing every `period` (kube's default is 15 s).
pub fn add(manager: &mut Manager, period: Duration) {
    let client = manager.client();
    add_with(manager, period, Box::new(ResourceMetricsApi::new(client)));
}

/// Adds the autoscaler with its usage read from `source`.
pub fn add_with(manager: &mut Manager, period: Duration, source: Box<dyn UsageSource>) {
    let hpas = manager.cache::<HorizontalPodAutoscaler>(watcher::Config::default());
    let context = Arc::new(Context {
        client: manager.client(),
        source,
        period,
        history: Mutex::default(),
        kinds: Mutex::default(),
    });
    let runner = Runner::for_cache("horizontalpodautoscaling", &hpas)
        .expect("the cache was just created, before run");
    manager.add(runner, reconcile, context);
}

fn condition(type_: &str, status: bool, reason: &str, message: &str, now: &str) -> Value {
    json!({"type": type_, "status": if status { "True" } else { "False" },
           "reason": reason, "message": message, "lastTransitionTime": now})
}

/// The sum of the pod's containers' requests of `resource` (cores or bytes); `None` when a
/// container requests none (utilization is then undefined, as kube says).
fn requests(pod: &Pod, resource: &str, container: Option<&str>) -> Option<f64> {
    let spec = pod.spec.as_ref()?;
    let mut total = 0.0;
    for c in spec
        .containers
        .iter()
        .filter(|c| container.is_none_or(|n| n == c.name))
    {
        let q = c.resources.as_ref()?.requests.as_ref()?.get(resource)?;
        total += match resource {
            "cpu" => quantity::millicores(&q.0)? as f64 / 1000.0,
            _ => quantity::bytes(&q.0)? as f64,
        };
    }
    (total > 0.0).then_some(total)
}

/// One metric's verdict: the replicas it asks for and what it measured.
struct Proposal {
    replicas: i32,
    status: Value,
    description: String,
}

/// kube's replica calculator for a resource metric (utilization or average value).
fn propose(
    metric: &MetricSpec,
    pods: &[Pod],
    usage: &HashMap<(String, String), Usage>,
    current: i32,
) -> Result<Proposal, String> {
    let (name, target, container) = match metric.type_.as_str() {
        "Resource" => {
            let r = metric
                .resource
                .as_ref()
                .ok_or("a Resource metric without resource")?;
            (r.name.as_str(), &r.target, None)
        }
        "ContainerResource" => {
            let r = metric
                .container_resource
                .as_ref()
                .ok_or("a ContainerResource metric without containerResource")?;
            (r.name.as_str(), &r.target, Some(r.container.as_str()))
        }
        other => {
            return Err(format!(
                "the {other} metric type is not supported yet (only Resource and ContainerResource)"
            ));
        }
    };
    let used = |p: &Pod| {
        let u = usage.get(&(p.namespace().unwrap_or_default(), p.name_any()))?;
        match name {
            "cpu" => u.cpu,
            "memory" => u.memory,
            _ => None,
        }
    };
    let mut with_metrics: Vec<(f64, f64)> = Vec::new(); // (usage, request)
    let mut missing: Vec<f64> = Vec::new(); // requests of pods without metrics
    let mut unready: Vec<f64> = Vec::new();
    for pod in pods {
        let request = match target.type_.as_str() {
            "Utilization" => requests(pod, name, container)
                .ok_or_else(|| format!("missing request for {name} in pod {}", pod.name_any()))?,
            _ => 1.0,
        };
        match used(pod) {
            Some(u) if name == "cpu" && !ready(pod) => {
                let _ = u;
                unready.push(request)
            }
            Some(u) => with_metrics.push((u, request)),
            None => missing.push(request),
        }
    }
    if with_metrics.is_empty() {
        return Err(format!(
            "did not receive metrics for targeted pods (pods might be unready): no {name} usage yet"
        ));
    }
    let usage_sum: f64 = with_metrics.iter().map(|(u, _)| u).sum();
    let request_sum: f64 = with_metrics.iter().map(|(_, r)| r).sum();
    let (ratio, current_value, status) = match target.type_.as_str() {
        "Utilization" => {
            let want = f64::from(target.average_utilization.unwrap_or(80).max(1));
            let utilization = usage_sum / request_sum * 100.0;
            let average = usage_sum / with_metrics.len() as f64;
            (
                utilization / want,
                utilization,
                json!({"averageUtilization": utilization.round() as i64, "averageValue": format_quantity(name, average)}),
            )
        }
        _ => {
            let want = target
                .average_value
                .as_ref()
                .and_then(|q| match name {
                    "cpu" => quantity::millicores(&q.0).map(|m| m as f64 / 1000.0),
                    _ => quantity::bytes(&q.0).map(|b| b as f64),
                })
                .filter(|v| *v > 0.0)
                .ok_or("an AverageValue target without a value")?;
            let average = usage_sum / with_metrics.len() as f64;
            (
                average / want,
                average,
                json!({"averageValue": format_quantity(name, average)}),
            )
        }
    };
    let mut status_metric =
        json!({"type": metric.type_, "resource": {"name": name, "current": status}});
    if let Some(c) = container {
        status_metric = json!({"type": metric.type_, "containerResource": {"name": name, "container": c, "current": status_metric["resource"]["current"]}});
    }
    let mut replicas = current;
    if (ratio - 1.0).abs() > TOLERANCE || !missing.is_empty() || !unready.is_empty() {
        // Pods without metrics count against the change; unready ones as idle on scale up.
        let scale_up = ratio > 1.0;
        let mut usage_all = usage_sum;
        let mut request_all = request_sum;
        let per_pod = |r: f64| {
            if target.type_ == "Utilization" {
                r
            } else {
                1.0
            }
        };
        for r in &missing {
            request_all += r;
            if !scale_up {
                usage_all += if target.type_ == "Utilization" {
                    *r
                } else {
                    current_value
                };
            }
        }
        if scale_up {
            request_all += unready.iter().map(|r| per_pod(*r)).sum::<f64>();
        }
        let counted = with_metrics.len() + missing.len() + if scale_up { unready.len() } else { 0 };
        let new_ratio = match target.type_.as_str() {
            "Utilization" => {
                usage_all / request_all * 100.0
                    / f64::from(target.average_utilization.unwrap_or(80).max(1))
            }
            _ => ratio * with_metrics.len() as f64 / counted.max(1) as f64,
        };
        let crosses = (scale_up && new_ratio < 1.0) || (!scale_up && new_ratio > 1.0);
        if (new_ratio - 1.0).abs() > TOLERANCE && !crosses {
            replicas = (new_ratio * counted as f64).ceil() as i32;
            if missing.is_empty() && unready.is_empty() {
                replicas = (ratio * with_metrics.len() as f64).ceil() as i32;
            }
        }
    }
    let description = match target.type_.as_str() {
        "Utilization" => format!("{name} resource utilization (percentage of request)"),
        _ => format!("{name} resource"),
    };
    Ok(Proposal {
        replicas,
        status: status_metric,
        description,
    })
}

fn format_quantity(resource: &str, value: f64) -> String {
    match resource {
        "cpu" => format!("{}m", (value * 1000.0).round() as i64),
        _ => format!("{}", value.round() as i64),
    }
}

/// The change `rules` allow in `period`-long windows: the limit on replicas from
/// `start` replicas (kube's `calculateScaleUpLimitWithScalingRules` and its down twin).
fn limit(
    rules: &HPAScalingRules,
    up: bool,
    current: i32,
    changes: &[(Instant, i32)],
    now: Instant,
) -> i32 {
    let policies = rules.policies.clone().unwrap_or_default();
    let select = rules.select_policy.as_deref().unwrap_or("Max");
    if select == "Disabled" {
        return current;
    }
    let mut best: Option<i32> = None;
    for policy in &policies {
        let window = Duration::from_secs(policy.period_seconds.max(0) as u64);
        let moved: i32 = changes
            .iter()
            .filter(|(at, change)| now.duration_since(*at) < window && (*change > 0) == up)
            .map(|(_, c)| *c)
            .sum();
        let start = current - moved;
        let allowed = match (policy.type_.as_str(), up) {
            ("Pods", true) => start + policy.value,
            ("Pods", false) => start - policy.value,
            (_, true) => (f64::from(start) * (1.0 + f64::from(policy.value) / 100.0)).ceil() as i32,
            (_, false) => {
                (f64::from(start) * (1.0 - f64::from(policy.value) / 100.0)).floor() as i32
            }
        };
        // Max selects the largest change, Min the smallest.
        best = Some(match (best, select == "Min", up) {
            (None, _, _) => allowed,
            (Some(b), false, true) | (Some(b), true, false) => b.max(allowed),
            (Some(b), _, _) => b.min(allowed),
        });
    }
    best.unwrap_or(if up { i32::MAX } else { 0 })
}

fn default_rules(up: bool) -> HPAScalingRules {
    let policies = if up {
        json!([{"type": "Percent", "value": 100, "periodSeconds": 15}, {"type": "Pods", "value": 4, "periodSeconds": 15}])
    } else {
        json!([{"type": "Percent", "value": 100, "periodSeconds": 15}])
    };
    serde_json::from_value(json!({
        "policies": policies, "selectPolicy": "Max",
        "stabilizationWindowSeconds": if up { 0 } else { 300 },
    }))
    .unwrap_or_default()
}

async fn reconcile(
    hpa: Arc<HorizontalPodAutoscaler>,
    ctx: Arc<Context>,
) -> Result<Action, AutoscalerError> {
    let namespace = hpa.namespace().unwrap_or_default();
    let name = hpa.name_any();
    let key = hpa.uid().unwrap_or_default();
    let spec = hpa.spec.clone();
    let now_stamp = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(ctx.client.clone(), &namespace);
    let write_status = |status: Value| {
        let hpas = hpas.clone();
        let name = name.clone();
        async move {
            hpas.patch_status(
                &name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map(|_| ())
            .map_err(|source| AutoscalerError::Api {
                action: format!("updating the status of {name}"),
                source,
            })
        }
    };
    let again = Action::requeue(ctx.period);
    let target = &spec.scale_target_ref;
    let (group, version) = match target
        .api_version
        .as_deref()
        .unwrap_or("v1")
        .split_once('/')
    {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (
            String::new(),
            target.api_version.clone().unwrap_or_else(|| "v1".into()),
        ),
    };
    let resource = {
        let cached = ctx
            .kinds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(format!("{}/{}", group, version), target.kind.clone()))
            .cloned();
        match cached {
            Some(r) => Some(r),
            None => {
                let gvk = GroupVersionKind::gvk(&group, &version, &target.kind);
                match kube::discovery::pinned_kind(&ctx.client, &gvk).await {
                    Ok((r, _)) => {
                        ctx.kinds.lock().unwrap_or_else(|e| e.into_inner()).insert(
                            (format!("{group}/{version}"), target.kind.clone()),
                            r.clone(),
                        );
                        Some(r)
                    }
                    Err(_) => None,
                }
            }
        }
    };
    let Some(resource) = resource else {
        let message = format!(
            "the HPA controller was unable to get the target's current scale: no kind {} in {}",
            target.kind,
            target.api_version.as_deref().unwrap_or("v1")
        );
        write_status(json!({"conditions": [condition("AbleToScale", false, "FailedGetScale", &message, &now_stamp)]})).await?;
        return Ok(again);
    };
    let targets: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), &namespace, &resource);
    let scale = match targets.get_scale(&target.name).await {
        Ok(s) => s,
        Err(e) => {
            let message =
                format!("the HPA controller was unable to get the target's current scale: {e}");
            write_status(json!({"conditions": [condition("AbleToScale", false, "FailedGetScale", &message, &now_stamp)]})).await?;
            return Ok(again);
        }
    };
    let current = scale.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
    let selector = scale
        .status
        .as_ref()
        .and_then(|s| s.selector.clone())
        .unwrap_or_default();
    let min = spec.min_replicas.unwrap_or(1);
    let max = spec.max_replicas;
    let mut conditions = vec![condition(
        "AbleToScale",
        true,
        "SucceededGetScale",
        "the HPA controller was able to get the target's current scale",
        &now_stamp,
    )];
    if current == 0 && min > 0 {
        conditions.push(condition(
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero",
            &now_stamp,
        ));
        write_status(json!({"currentReplicas": 0, "desiredReplicas": 0, "conditions": conditions}))
            .await?;
        return Ok(again);
    }
    let pods: Vec<Pod> = Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(|source| AutoscalerError::Api {
            action: format!("listing the pods of {name}"),
            source,
        })?
        .items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && !matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Failed" | "Succeeded")
                )
        })
        .collect();
    let usage = ctx.source.usage(&pods).await;
    let metrics = spec.metrics.clone().unwrap_or_else(|| {
        serde_json::from_value(json!([{"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}])).unwrap_or_default()
    });
    let mut proposals = Vec::new();
    let mut failure = None;
    for metric in &metrics {
        match propose(metric, &pods, &usage, current) {
            Ok(p) => proposals.push(p),
            Err(e) => failure = Some(e),
        }
    }
    let Some(best) = proposals.iter().max_by_key(|p| p.replicas) else {
        let message = failure.unwrap_or_else(|| "no metrics".into());
        conditions.push(condition(
            "ScalingActive",
            false,
            "FailedGetResourceMetric",
            &format!("the HPA was unable to compute the replica count: {message}"),
            &now_stamp,
        ));
        write_status(json!({"currentReplicas": current, "desiredReplicas": current, "conditions": conditions})).await?;
        return Ok(Action::requeue(ctx.period.min(Duration::from_secs(5))));
    };
    conditions.push(condition(
        "ScalingActive",
        true,
        "ValidMetricFound",
        &format!(
            "the HPA was able to successfully calculate a replica count from {}",
            best.description
        ),
        &now_stamp,
    ));

    // Behavior: stabilization, then the rate limits, then the bounds.
    let behavior = spec.behavior.clone().unwrap_or_default();
    let up_rules = behavior
        .scale_up
        .clone()
        .map(|r| merge_rules(r, true))
        .unwrap_or_else(|| default_rules(true));
    let down_rules = behavior
        .scale_down
        .clone()
        .map(|r| merge_rules(r, false))
        .unwrap_or_else(|| default_rules(false));
    let now = Instant::now();
    let desired = {
        let mut history = ctx.history.lock().unwrap_or_else(|e| e.into_inner());
        let h = history.entry(key.clone()).or_default();
        let window = |r: &HPAScalingRules| {
            Duration::from_secs(r.stabilization_window_seconds.unwrap_or(0).max(0) as u64)
        };
        let (mut up, mut down) = (best.replicas, best.replicas);
        for (at, r) in &h.recommendations {
            if now.duration_since(*at) <= window(&up_rules) {
                up = up.min(*r);
            }
            if now.duration_since(*at) <= window(&down_rules) {
                down = down.max(*r);
            }
        }
        h.recommendations.push((now, best.replicas));
        let keep = window(&up_rules).max(window(&down_rules));
        h.recommendations
            .retain(|(at, _)| now.duration_since(*at) <= keep);
        let mut stabilized = current;
        if stabilized < up {
            stabilized = up;
        }
        if stabilized > down {
            stabilized = down;
        }
        h.changes
            .retain(|(at, _)| now.duration_since(*at) <= Duration::from_secs(1800));
        let limited = if stabilized > current {
            stabilized.min(limit(&up_rules, true, current, &h.changes, now))
        } else if stabilized < current {
            stabilized.max(limit(&down_rules, false, current, &h.changes, now))
        } else {
            current
        };
        limited.clamp(min, max.max(min))
    };
    let limited_by = if best.replicas > max {
        Some((
            "TooManyReplicas",
            "the desired replica count is more than the maximum replica count",
        ))
    } else if best.replicas < min {
        Some((
            "TooFewReplicas",
            "the desired replica count is less than the minimum replica count",
        ))
    } else {
        None
    };
    conditions.push(match limited_by {
        Some((reason, message)) => condition("ScalingLimited", true, reason, message, &now_stamp),
        None => condition(
            "ScalingLimited",
            false,
            "DesiredWithinRange",
            "the desired count is within the acceptable range",
            &now_stamp,
        ),
    });
    let mut status = json!({
        "currentReplicas": current, "desiredReplicas": desired,
        "currentMetrics": proposals.iter().map(|p| p.status.clone()).collect::<Vec<_>>(),
        "observedGeneration": hpa.metadata.generation,
    });
    if desired != current {
        targets
            .patch_scale(
                &target.name,
                &PatchParams {
                    field_manager: Some(MANAGER.into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"spec": {"replicas": desired}})),
            )
            .await
            .map_err(|source| AutoscalerError::Api {
                action: format!("rescaling {} {}", target.kind, target.name),
                source,
            })?;
        ctx.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .changes
            .push((now, desired - current));
        let direction = if desired > current { "above" } else { "below" };
        publish(
            &ctx.client,
            MANAGER,
            hpa.as_ref(),
            EventType::Normal,
            "SuccessfulRescale",
            &format!(
                "New size: {desired}; reason: {} {direction} target",
                best.description
            ),
        )
        .await;
        status["lastScaleTime"] = json!(now_stamp);
        conditions[0] = condition(
            "AbleToScale",
            true,
            "SucceededRescale",
            &format!("the HPA controller was able to update the target scale to {desired}"),
            &now_stamp,
        );
    }
    // Keep transition times of conditions whose status did not change.
    let old: BTreeMap<String, (String, Option<String>)> = hpa
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| {
            (
                c.type_,
                (c.status, c.last_transition_time.map(|t| t.0.to_string())),
            )
        })
        .collect();
    for c in &mut conditions {
        if let Some((status, Some(at))) = c["type"].as_str().and_then(|t| old.get(t))
            && c["status"] == status.as_str()
        {
            c["lastTransitionTime"] = json!(at);
        }
    }
    status["conditions"] = json!(conditions);
    write_status(status).await?;
    Ok(again)
}

/// A user's rules with the defaults kube fills for what they leave out.
fn merge_rules(mut rules: HPAScalingRules, up: bool) -> HPAScalingRules {
    let defaults = default_rules(up);
    if rules.policies.as_ref().is_none_or(|p| p.is_empty()) {
        rules.policies = defaults.policies;
    }
    if rules.select_policy.is_none() {
        rules.select_policy = defaults.select_policy;
    }
    if rules.stabilization_window_seconds.is_none() {
        rules.stabilization_window_seconds = defaults.stabilization_window_seconds;
    }
    rules
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, cpu_request: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"containers": [{"name": "c", "resources": {"requests": {"cpu": cpu_request}}}]},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap()
    }

    fn cpu_metric(utilization: i32) -> MetricSpec {
        serde_json::from_value(json!({"type": "Resource", "resource": {"name": "cpu",
            "target": {"type": "Utilization", "averageUtilization": utilization}}}))
        .unwrap()
    }

    fn usage(pairs: &[(&str, f64)]) -> HashMap<(String, String), Usage> {
        pairs
            .iter()
            .map(|(n, cpu)| {
                (
                    ("ns".to_string(), n.to_string()),
                    Usage {
                        cpu: Some(*cpu),
                        memory: None,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn replicas_follow_utilization_with_tolerance() {
        let pods = [pod("a", "100m"), pod("b", "100m")];
        // 200 % of a 50 % target: four times the replicas.
        let p = propose(&cpu_metric(50), &pods, &usage(&[("a", 0.1), ("b", 0.1)]), 2).unwrap();
        assert_eq!(p.replicas, 4);
        assert_eq!(p.status["resource"]["current"]["averageUtilization"], 100);
        // Within 10 %: unchanged.
        let p = propose(
            &cpu_metric(50),
            &pods,
            &usage(&[("a", 0.052), ("b", 0.052)]),
            2,
        )
        .unwrap();
        assert_eq!(p.replicas, 2);
        // Idle: down to one.
        let p = propose(
            &cpu_metric(50),
            &pods,
            &usage(&[("a", 0.0), ("b", 0.001)]),
            2,
        )
        .unwrap();
        assert_eq!(p.replicas, 1);
        // No request: no utilization.
        assert!(propose(&cpu_metric(50), &[pod("c", "0")], &usage(&[("c", 1.0)]), 1).is_err());
    }

    #[test]
    fn metrics_parse_from_the_agent() {
        let text = "# HELP x\ncontainer_cpu_usage_seconds_total{container=\"a\",namespace=\"ns\",pod=\"p\"} 1.5\n\
                    container_cpu_usage_seconds_total{container=\"b\",namespace=\"ns\",pod=\"p\"} 0.5\n\
                    container_memory_working_set_bytes{container=\"a\",namespace=\"ns\",pod=\"p\"} 1024\n";
        let parsed = parse_metrics(text);
        assert_eq!(parsed[&("ns".to_string(), "p".to_string())], (2.0, 1024.0));
    }

    #[test]
    fn pod_metrics_sum_their_containers() {
        let list = json!({"items": [{"metadata": {"name": "p", "namespace": "ns"},
            "containers": [{"name": "a", "usage": {"cpu": "250000000n", "memory": "1024Ki"}},
                           {"name": "b", "usage": {"cpu": "50m", "memory": "1Mi"}}]}]});
        let usage = pod_metrics_usage(&list);
        let p = usage[&("ns".to_string(), "p".to_string())];
        assert!((p.cpu.unwrap() - 0.3).abs() < 1e-9, "{p:?}");
        assert_eq!(p.memory, Some(2.0 * 1024.0 * 1024.0));
    }

    #[test]
    fn rate_policies_limit_the_step() {
        let now = Instant::now();
        let up = default_rules(true);
        // From 1: +100 % is 2, +4 pods is 5; Max picks 5.
        assert_eq!(limit(&up, true, 1, &[], now), 5);
        // Already +4 in this window from 1: the window started at 1.
        assert_eq!(limit(&up, true, 5, &[(now, 4)], now), 5);
        let down = default_rules(false);
        assert_eq!(limit(&down, false, 4, &[], now), 0);
    }
}
