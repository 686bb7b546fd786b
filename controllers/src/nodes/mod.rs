//! The node controllers: node lifecycle (heartbeats, `Ready=Unknown`, the unreachable and
//! not-ready taints) ([`nodelifecycle`]) and each node's pod CIDR ([`nodeipam`]).

pub mod nodeipam;
pub mod nodelifecycle;
