//! The agent's metrics under the kubelet's names, so existing dashboards work: pods and
//! containers running and their usage (counted at scrape time, so never stale), pod start
//! and worker durations, runtime operations, image pulls.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The agent's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    pod_start: Histogram,
    pod_worker: Histogram,
    operations: IntCounterVec,
    operation_errors: IntCounterVec,
    operation_duration: HistogramVec,
    image_pull: Histogram,
    inflight: prometheus::IntGaugeVec,
}

/// Counts one in-flight request in `kubelet_http_inflight_requests` until dropped.
#[derive(Debug)]
pub struct Inflight(prometheus::IntGauge);

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<Metrics> {
        let histogram = |name: &str, help: &str| {
            Histogram::with_opts(HistogramOpts::new(name, help).buckets(BUCKETS.to_vec()))
        };
        let metrics = Metrics {
            pod_start: histogram(
                "kubelet_pod_start_duration_seconds",
                "Duration in seconds from the agent seeing a pod to it running.",
            )?,
            pod_worker: histogram(
                "kubelet_pod_worker_duration_seconds",
                "Duration in seconds to sync a single pod.",
            )?,
            operations: IntCounterVec::new(
                Opts::new(
                    "kubelet_runtime_operations_total",
                    "Cumulative number of runtime operations by operation type.",
                ),
                &["operation_type"],
            )?,
            operation_errors: IntCounterVec::new(
                Opts::new(
                    "kubelet_runtime_operations_errors_total",
                    "Cumulative number of runtime operation errors by operation type.",
                ),
                &["operation_type"],
            )?,
            operation_duration: HistogramVec::new(
                HistogramOpts::new(
                    "kubelet_runtime_operations_duration_seconds",
                    "Duration in seconds of runtime operations.",
                )
                .buckets(BUCKETS.to_vec()),
                &["operation_type"],
            )?,
            image_pull: histogram(
                "kubelet_image_pull_duration_seconds",
                "Duration in seconds to pull an image.",
            )?,
            inflight: prometheus::IntGaugeVec::new(
                Opts::new(
                    "kubelet_http_inflight_requests",
                    "Number of the HTTP requests in flight on the agent's endpoint (streams \
                     until they end).",
                ),
                &["method", "path", "server_type", "long_running"],
            )?,
        };
        registry.register(Box::new(metrics.pod_start.clone()))?;
        registry.register(Box::new(metrics.pod_worker.clone()))?;
        registry.register(Box::new(metrics.operations.clone()))?;
        registry.register(Box::new(metrics.operation_errors.clone()))?;
        registry.register(Box::new(metrics.operation_duration.clone()))?;
        registry.register(Box::new(metrics.image_pull.clone()))?;
        registry.register(Box::new(metrics.inflight.clone()))?;
        Ok(metrics)
    }

    /// A runtime operation took `took` and failed or not.
    pub fn runtime_operation(&self, operation: &str, took: Duration, failed: bool) {
        self.operations.with_label_values(&[operation]).inc();
        if failed {
            self.operation_errors.with_label_values(&[operation]).inc();
        }
        self.operation_duration
            .with_label_values(&[operation])
            .observe(took.as_secs_f64());
    }

    /// A long-running request (`exec`, `attach`, `portforward`) is open until the returned
    /// guard is dropped; `path` is its first path segment, as the kubelet labels it.
    pub fn stream_open(&self, method: &str, path: &str) -> Inflight {
        let gauge = self
            .inflight
            .with_label_values(&[method, path, "readwrite", "true"]);
        gauge.inc();
        Inflight(gauge)
    }

    /// A pod first reported Running, `took` after the agent first saw it.
    pub fn pod_started(&self, took: Duration) {
        self.pod_start.observe(took.as_secs_f64());
    }

    /// One pod sync took `took`.
    pub fn pod_worker(&self, took: Duration) {
        self.pod_worker.observe(took.as_secs_f64());
    }

    /// An image pull took `took`.
    pub fn image_pull(&self, took: Duration, failed: bool) {
        self.image_pull.observe(took.as_secs_f64());
        self.runtime_operation("pull_image", took, failed);
    }
}

/// What runs on the node, read at scrape time: `kubelet_running_pods` and
/// `kubelet_running_containers` from the runtime's state on disk, and per-container usage
/// from the cgroups under cAdvisor's names, `container_cpu_usage_seconds_total` and
/// `container_memory_working_set_bytes`, labelled `namespace`, `pod`, `container`.
pub struct Running {
    ctx: std::sync::Weak<crate::agent::Context>,
    pods: IntGauge,
    containers: IntGauge,
    cpu: prometheus::CounterVec,
    memory: prometheus::GaugeVec,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").finish_non_exhaustive()
    }
}

impl Running {
    /// A collector over the agent's pods and containers.
    pub fn new(ctx: std::sync::Weak<crate::agent::Context>) -> prometheus::Result<Self> {
        let labels = &["namespace", "pod", "container"];
        Ok(Running {
            ctx,
            pods: IntGauge::new(
                "kubelet_running_pods",
                "Number of pods that have a running pod sandbox.",
            )?,
            containers: IntGauge::new(
                "kubelet_running_containers",
                "Number of containers currently running.",
            )?,
            cpu: prometheus::CounterVec::new(
                Opts::new(
                    "container_cpu_usage_seconds_total",
                    "Cumulative CPU time consumed by the container, in seconds.",
                ),
                labels,
            )?,
            memory: prometheus::GaugeVec::new(
                Opts::new(
                    "container_memory_working_set_bytes",
                    "The container's memory working set (usage minus inactive file cache), in bytes.",
                ),
                labels,
            )?,
        })
    }
}

impl prometheus::core::Collector for Running {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        let mut descs = self.pods.desc();
        descs.extend(self.containers.desc());
        descs.extend(self.cpu.desc());
        descs.extend(self.memory.desc());
        descs
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.cpu.reset();
        self.memory.reset();
        if let Some(ctx) = self.ctx.upgrade() {
            let (pods, containers) = ctx.running_counts();
            self.pods.set(pods);
            self.containers.set(containers);
            for (namespace, pod, container, cgroup) in ctx.running_containers() {
                let labels = [namespace.as_str(), pod.as_str(), container.as_str()];
                if let Some(cpu) = cgroup_cpu_seconds(&cgroup) {
                    self.cpu.with_label_values(&labels).inc_by(cpu);
                }
                if let Some(bytes) = cgroup_working_set(&cgroup) {
                    self.memory.with_label_values(&labels).set(bytes);
                }
            }
        }
        let mut families = self.pods.collect();
        families.extend(self.containers.collect());
        families.extend(self.cpu.collect());
        families.extend(self.memory.collect());
        families
    }
}

/// CPU time of a cgroup (v1 `cpuacct.usage` in ns, or v2 `cpu.stat` `usage_usec`).
fn cgroup_cpu_seconds(path: &str) -> Option<f64> {
    let rel = path.trim_start_matches('/');
    for dir in ["cpuacct", "cpu,cpuacct", "cpu"] {
        if let Ok(text) =
            std::fs::read_to_string(format!("/sys/fs/cgroup/{dir}/{rel}/cpuacct.usage"))
        {
            return text.trim().parse::<f64>().ok().map(|ns| ns / 1e9);
        }
    }
    let stat = std::fs::read_to_string(format!("/sys/fs/cgroup/{rel}/cpu.stat")).ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|us| us / 1e6)
}

/// Memory working set of a cgroup: usage minus inactive file pages, as cAdvisor computes it.
fn cgroup_working_set(path: &str) -> Option<f64> {
    let rel = path.trim_start_matches('/');
    let stat_value = |text: &str, key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    let v1 = format!("/sys/fs/cgroup/memory/{rel}");
    if let Ok(usage) = std::fs::read_to_string(format!("{v1}/memory.usage_in_bytes")) {
        let usage: f64 = usage.trim().parse().ok()?;
        let stat = std::fs::read_to_string(format!("{v1}/memory.stat")).unwrap_or_default();
        let inactive = stat_value(&stat, "total_inactive_file ").unwrap_or(0.0);
        return Some((usage - inactive).max(0.0));
    }
    let v2 = format!("/sys/fs/cgroup/{rel}");
    let usage: f64 = std::fs::read_to_string(format!("{v2}/memory.current"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = std::fs::read_to_string(format!("{v2}/memory.stat")).unwrap_or_default();
    let inactive = stat_value(&stat, "inactive_file ").unwrap_or(0.0);
    Some((usage - inactive).max(0.0))
}

/// The kubelet's `/metrics/resource`: what metrics-server (and Orquestra's built-in
/// `metrics.k8s.io`) reads — the node's and every running container's cumulative CPU time and
/// memory working set, each sample with the millisecond timestamp it was read at, under the
/// kubelet's names (`node_cpu_usage_seconds_total`, `container_memory_working_set_bytes`, …).
pub fn resource_metrics(ctx: &crate::agent::Context) -> String {
    use std::fmt::Write as _;
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    };
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    family(
        "node_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the node in core-seconds",
    );
    family(
        "node_memory_working_set_bytes",
        "gauge",
        "Current working set of the node in bytes",
    );
    family(
        "container_cpu_usage_seconds_total",
        "counter",
        "Cumulative cpu time consumed by the container in core-seconds",
    );
    family(
        "container_memory_working_set_bytes",
        "gauge",
        "Current working set of the container in bytes",
    );
    let mut scrape_error = 0;
    match (node_cpu_seconds(), node_working_set()) {
        (Some(cpu), Some(memory)) => {
            let at = now();
            let _ = writeln!(out, "node_cpu_usage_seconds_total {cpu} {at}");
            let _ = writeln!(out, "node_memory_working_set_bytes {memory} {at}");
        }
        _ => scrape_error = 1,
    }
    for (namespace, pod, container, cgroup) in ctx.running_containers() {
        let (Some(cpu), Some(memory)) = (cgroup_cpu_seconds(&cgroup), cgroup_working_set(&cgroup))
        else {
            continue;
        };
        let at = now();
        let labels = format!(
            "container={},namespace={},pod={}",
            quoted(&container),
            quoted(&namespace),
            quoted(&pod)
        );
        let _ = writeln!(
            out,
            "container_cpu_usage_seconds_total{{{labels}}} {cpu} {at}"
        );
        let _ = writeln!(
            out,
            "container_memory_working_set_bytes{{{labels}}} {memory} {at}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP resource_scrape_error 1 if there was an error while getting container metrics, 0 otherwise\n\
         # TYPE resource_scrape_error gauge\nresource_scrape_error {scrape_error}"
    );
    out
}

/// A label value in the text format's quotes and escapes.
fn quoted(value: &str) -> String {
    let escaped = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("\"{escaped}\"")
}

/// The node's CPU time in core-seconds: the non-idle jiffies of `/proc/stat`'s `cpu` line.
fn node_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user and nice).
    let busy: f64 = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| fields.get(i))
        .sum();
    // USER_HZ is 100 on every Linux this runs on.
    Some(busy / 100.0)
}

/// The node's memory working set: in use, less the inactive file cache (what cAdvisor
/// reports for the root cgroup), from `/proc/meminfo`.
fn node_working_set() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let used = kib("MemTotal:")? - kib("MemFree:")?;
    let inactive_file = kib("Inactive(file):").unwrap_or(0.0);
    Some((used - inactive_file).max(0.0) * 1024.0)
}
