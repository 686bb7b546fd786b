//! Orquestra's controller framework, on kube-rs's `kube-runtime`.
//!
//! Built-in Orquestra controllers and users' controllers are written the same way: a
//! level-based `reconcile(object, context) -> Result<Action, Error>` handed to a [`Runner`],
//! which records controller-runtime's metrics around every reconcile, contains panics, backs
//! off per object on errors and limits concurrency. [`webhook`] serves typed admission
//! handlers over HTTPS and writes the configurations that register them. [`testing`] (feature
//! `testing`) runs the real API server in-process for tests, webhooks included.
//!
//! The framework talks to the cluster only through a kube `Client`.

#![deny(missing_docs)]

pub mod conditions;
pub mod controller;
mod endpoint;
pub mod leader;
pub mod manager;
pub mod metrics;
pub mod quantity;
pub mod rbac;
#[cfg(feature = "testing")]
pub mod testing;
pub mod webhook;

pub use controller::{Backoff, Progress, ReconcileError, Runner};
pub use leader::LeaderElection;
pub use manager::{Cache, Health, Manager};
pub use metrics::ControllerMetrics;
