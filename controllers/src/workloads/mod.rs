//! The workload controllers: what keeps pods from templates — ReplicaSets and
//! ReplicationControllers ([`replicaset`]), Deployments rolling ReplicaSets ([`deployment`]),
//! DaemonSets ([`daemonset`]), StatefulSets' ordered pods with stable names and storage
//! ([`statefulset`]), Jobs run to completion ([`job`]) on a schedule ([`cronjob`]) and expired once
//! finished ([`ttlafterfinished`]), replicas that follow load ([`autoscaler`]); and what guards them: PodDisruptionBudgets' status
//! ([`disruption`]).

pub mod autoscaler;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod job;
pub mod replicaset;
pub mod statefulset;
pub mod ttlafterfinished;
