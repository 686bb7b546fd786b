//! The cluster-wide housekeeping loops: garbage collection by owner references
//! ([`garbage`]), namespace deletion ([`namespace`]), every namespace's `default`
//! ServiceAccount ([`serviceaccount`]) and `kube-root-ca.crt` ([`rootcacert`]), and client
//! certificates signed for approved CertificateSigningRequests ([`csrsigning`]).

pub mod csrsigning;
pub mod garbage;
pub mod namespace;
pub mod rootcacert;
pub mod serviceaccount;
