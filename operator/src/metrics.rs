//! Controller metrics under controller-runtime's names, so the dashboards and alerts
//! Kubernetes users already have work unchanged. Recorded by the framework around every
//! reconcile; reconcilers record nothing themselves.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The metrics of every controller of one manager (labelled by controller name).
#[derive(Clone, Debug)]
pub struct ControllerMetrics {
    pub(crate) reconcile_total: IntCounterVec,
    pub(crate) reconcile_errors: IntCounterVec,
    pub(crate) reconcile_panics: IntCounterVec,
    pub(crate) reconcile_timeouts: IntCounterVec,
    pub(crate) reconcile_time: HistogramVec,
    pub(crate) active_workers: IntGaugeVec,
    pub(crate) max_concurrent: IntGaugeVec,
    pub(crate) work_duration: HistogramVec,
    pub(crate) retries: IntCounterVec,
    pub(crate) depth: IntGaugeVec,
    pub(crate) adds: IntCounterVec,
    pub(crate) queue_duration: HistogramVec,
}

/// controller-runtime's reconcile-time buckets (seconds).
const RECONCILE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9,
    1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 15.0, 20.0,
    25.0, 30.0, 40.0, 50.0, 60.0,
];

impl ControllerMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> prometheus::Result<ControllerMetrics> {
        let counter = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
        };
        let metrics = ControllerMetrics {
            reconcile_total: counter(
                "controller_runtime_reconcile_total",
                "Total number of reconciliations per controller, by result.",
                &["controller", "result"],
            )?,
            reconcile_errors: counter(
                "controller_runtime_reconcile_errors_total",
                "Total number of reconciliation errors per controller.",
                &["controller"],
            )?,
            reconcile_panics: counter(
                "controller_runtime_reconcile_panics_total",
                "Total number of reconciliation panics per controller.",
                &["controller"],
            )?,
            reconcile_timeouts: counter(
                "controller_runtime_reconcile_timeouts_total",
                "Total number of reconciles cancelled for running past the controller's time \
                 limit.",
                &["controller"],
            )?,
            reconcile_time: HistogramVec::new(
                HistogramOpts::new(
                    "controller_runtime_reconcile_time_seconds",
                    "Length of time per reconciliation per controller.",
                )
                .buckets(RECONCILE_BUCKETS.to_vec()),
                &["controller"],
            )?,
            active_workers: IntGaugeVec::new(
                Opts::new(
                    "controller_runtime_active_workers",
                    "Number of currently used workers per controller.",
                ),
                &["controller"],
            )?,
            max_concurrent: IntGaugeVec::new(
                Opts::new(
                    "controller_runtime_max_concurrent_reconciles",
                    "Maximum number of concurrent reconciles per controller (0: unlimited).",
                ),
                &["controller"],
            )?,
            work_duration: HistogramVec::new(
                HistogramOpts::new(
                    "workqueue_work_duration_seconds",
                    "How long in seconds processing an item from workqueue takes.",
                )
                .buckets(prometheus::exponential_buckets(1e-8, 10.0, 10)?),
                &["name"],
            )?,
            retries: counter(
                "workqueue_retries_total",
                "Total number of retries handled by workqueue.",
                &["name"],
            )?,
            depth: IntGaugeVec::new(
                Opts::new("workqueue_depth", "Current depth of workqueue."),
                &["name"],
            )?,
            adds: counter(
                "workqueue_adds_total",
                "Total number of adds handled by workqueue.",
                &["name"],
            )?,
            queue_duration: HistogramVec::new(
                HistogramOpts::new(
                    "workqueue_queue_duration_seconds",
                    "How long in seconds an item stays in workqueue before being requested.",
                )
                .buckets(prometheus::exponential_buckets(1e-8, 10.0, 10)?),
                &["name"],
            )?,
        };
        registry.register(Box::new(metrics.reconcile_total.clone()))?;
        registry.register(Box::new(metrics.reconcile_errors.clone()))?;
        registry.register(Box::new(metrics.reconcile_panics.clone()))?;
        registry.register(Box::new(metrics.reconcile_timeouts.clone()))?;
        registry.register(Box::new(metrics.reconcile_time.clone()))?;
        registry.register(Box::new(metrics.active_workers.clone()))?;
        registry.register(Box::new(metrics.max_concurrent.clone()))?;
        registry.register(Box::new(metrics.work_duration.clone()))?;
        registry.register(Box::new(metrics.retries.clone()))?;
        registry.register(Box::new(metrics.depth.clone()))?;
        registry.register(Box::new(metrics.adds.clone()))?;
        registry.register(Box::new(metrics.queue_duration.clone()))?;
        Ok(metrics)
    }

    /// Makes every series of `controller` visible at zero before its first reconcile, as
    /// controller-runtime does, so rates and alerts have a baseline.
    pub(crate) fn init(&self, controller: &str, concurrency: u16) {
        for result in ["success", "error", "requeue", "requeue_after"] {
            self.reconcile_total
                .with_label_values(&[controller, result]);
        }
        self.reconcile_errors.with_label_values(&[controller]);
        self.reconcile_panics.with_label_values(&[controller]);
        self.reconcile_timeouts.with_label_values(&[controller]);
        self.active_workers.with_label_values(&[controller]).set(0);
        self.max_concurrent
            .with_label_values(&[controller])
            .set(i64::from(concurrency));
        self.retries.with_label_values(&[controller]);
        self.depth.with_label_values(&[controller]).set(0);
        self.adds.with_label_values(&[controller]);
    }
}
