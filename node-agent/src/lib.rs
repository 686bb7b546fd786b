//! Orquestra's node agent (the kubelet). Today: registering the host as a `Node` and keeping
//! it alive — its status (capacity, allocatable, conditions, addresses, nodeInfo) and a Lease
//! in `kube-node-lease` renewed every 10 s, as the kubelet does — and a [`simulated`] runtime
//! of many fake nodes whose pods run instantly. Pod sync through libcontainer comes next
//! (issue 5).
//!
//! The agent talks to the cluster only through a kube `Client`.

#![deny(missing_docs)]

pub mod node;
pub mod simulated;

pub use node::{Heartbeat, HostInfo, NodeConfig};
