//! The node controllers: node lifecycle (heartbeats, `Ready=Unknown`, the unreachable and
//! not-ready taints) ([`nodelifecycle`]), the evictions NoExecute taints cause
//! ([`tainteviction`]) and each node's pod CIDR ([`nodeipam`]).

pub mod nodeipam;
pub mod nodelifecycle;
pub mod tainteviction;
