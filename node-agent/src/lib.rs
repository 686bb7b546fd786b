//! Orquestra's node agent (the kubelet). Today: registering the host as a `Node` and keeping
//! it alive — its status (capacity, allocatable, conditions, addresses, nodeInfo) and a Lease
//! in `kube-node-lease` renewed every 10 s, as the kubelet does. Pod sync and the libcontainer
//! runtime come next (issue 5).
//!
//! The agent talks to the cluster only through a kube `Client`.

#![deny(missing_docs)]

pub mod node;

pub use node::{Heartbeat, HostInfo, NodeConfig};
