//! The node's networking: the pod network ([`pods`]: bridge, a namespace, veth and address
//! per pod, routes to other nodes' pods), Services proxied in the kernel ([`proxy`], as
//! kube-proxy's nftables mode; the load balancer addresses this node announces in
//! [`announce`]), NetworkPolicies enforced in the kernel ([`policy`]),
//! cluster DNS ([`dns`], as CoreDNS) and the ingress controller's HTTP(S) proxy
//! ([`ingress`], as k3s' Traefik).
//!
//! The pod network's types are re-exported here (`network::Network`, …), where the rest
//! of the agent has always found them.

pub mod announce;
pub mod dns;
pub mod ingress;
pub mod pods;
pub mod policy;
pub mod proxy;

pub use pods::*;
