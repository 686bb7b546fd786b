//! Orquestra's built-in control loops, written with the same framework users write theirs
//! with (`orquestra-operator`). Today: the [`scheduler`]. The workload, endpoints, garbage
//! collection, namespace and node lifecycle controllers follow (issue 6).

#![deny(missing_docs)]

pub mod labels;
pub mod replicaset;
pub mod scheduler;
