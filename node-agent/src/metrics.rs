//! The agent's metrics under the kubelet's names, so existing dashboards work: pods and
//! containers running, pod start and worker durations, runtime operations, image pulls.

use std::time::Duration;

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The agent's metrics.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `kubelet_running_pods`.
    pub running_pods: IntGauge,
    /// `kubelet_running_containers`.
    pub running_containers: IntGauge,
    pod_start: Histogram,
    pod_worker: Histogram,
    operations: IntCounterVec,
    operation_errors: IntCounterVec,
    operation_duration: HistogramVec,
    image_pull: Histogram,
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
            running_pods: IntGauge::new(
                "kubelet_running_pods",
                "Number of pods that have a running pod sandbox.",
            )?,
            running_containers: IntGauge::new(
                "kubelet_running_containers",
                "Number of containers currently running.",
            )?,
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
        };
        registry.register(Box::new(metrics.running_pods.clone()))?;
        registry.register(Box::new(metrics.running_containers.clone()))?;
        registry.register(Box::new(metrics.pod_start.clone()))?;
        registry.register(Box::new(metrics.pod_worker.clone()))?;
        registry.register(Box::new(metrics.operations.clone()))?;
        registry.register(Box::new(metrics.operation_errors.clone()))?;
        registry.register(Box::new(metrics.operation_duration.clone()))?;
        registry.register(Box::new(metrics.image_pull.clone()))?;
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
