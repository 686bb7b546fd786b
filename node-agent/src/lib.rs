//! Orquestra's node agent (the kubelet), grouped by stage: [`kubelet`] (the pod workers,
//! node, probes, hooks, endpoint), [`runtime`] (images, bundles, the libcontainer shim),
//! [`network`] (pod network, service proxy, DNS, ingress) and [`stream`] (exec, attach,
//! port-forward).
//!
//! It registers its host as a `Node` and keeps it alive
//! ([`node`]), watches the pods bound to it ([`agent`]) and converges each one with a
//! level-based worker ([`pod`]) — images pulled into a content-addressed store ([`image`]),
//! a network namespace per pod ([`network`]), containers run through youki's libcontainer in
//! a single-threaded shim process per container ([`shim`], [`container`]) — and reports
//! their status; it serves `kubectl exec`, `attach` and `port-forward` into them
//! ([`stream`]) and their logs from its own HTTPS endpoint ([`endpoint`]). A [`simulated`] runtime runs many fake nodes whose pods start instantly.
//!
//! The agent talks to the cluster only through a kube `Client`.

#![deny(missing_docs)]

pub mod kubelet;
pub mod metrics;
pub mod network;
pub mod runtime;
pub mod stream;

// The modules keep the paths they had before the crate was grouped into folders.
pub use kubelet::{
    agent, downward, endpoint, events, health, hook, hosts, links, logs, node, pod, probe, resize,
    resolve, serviceaccount, simulated, termination, volume,
};
pub use network::{dns, ingress, proxy};
pub use runtime::{auth, container, image, shim};

pub use agent::{AgentConfig, run};
pub use node::{Heartbeat, HostInfo, NodeConfig};
