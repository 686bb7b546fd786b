//! Orquestra's node agent (the kubelet): it registers its host as a `Node` and keeps it alive
//! ([`node`]), watches the pods bound to it ([`agent`]) and converges each one with a
//! level-based worker ([`pod`]) — images pulled into a content-addressed store ([`image`]),
//! a network namespace per pod ([`network`]), containers run through youki's libcontainer in
//! a single-threaded shim process per container ([`shim`], [`container`]) — and reports
//! their status; it serves `kubectl exec` into them ([`stream`]) and their logs from its
//! own HTTPS endpoint ([`endpoint`]). A [`simulated`] runtime runs many fake nodes whose pods start instantly.
//!
//! The agent talks to the cluster only through a kube `Client`.

#![deny(missing_docs)]

pub mod agent;
pub mod auth;
pub mod container;
pub mod dns;
pub mod endpoint;
pub mod events;
pub mod health;
pub mod hook;
pub mod image;
pub mod logs;
pub mod metrics;
pub mod network;
pub mod node;
pub mod pod;
pub mod probe;
pub mod proxy;
pub mod resolve;
pub mod serviceaccount;
pub mod shim;
pub mod simulated;
pub mod stream;

pub use agent::{AgentConfig, run};
pub use node::{Heartbeat, HostInfo, NodeConfig};
