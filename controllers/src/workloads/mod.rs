//! The workload controllers: what keeps pods from templates — ReplicaSets and
//! ReplicationControllers ([`replicaset`]), Deployments rolling ReplicaSets ([`deployment`]),
//! DaemonSets ([`daemonset`]).

pub mod daemonset;
pub mod deployment;
pub mod replicaset;
