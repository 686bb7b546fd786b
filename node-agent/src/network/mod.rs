//! The node's networking: the pod network ([`pods`]: bridge, a namespace, veth and address
//! per pod, routes to other nodes' pods), Services proxied in the kernel ([`proxy`], as
//! kube-proxy's nftables mode; the load balancer addresses this node announces in
//! [`announce`]) and cluster DNS ([`dns`], as CoreDNS).
//!
//! The pod network's types are re-exported here (`network::Network`, …), where the rest
//! of the agent has always found them.

pub mod announce;
pub mod dns;
pub mod pods;
pub mod proxy;

pub use pods::*;
