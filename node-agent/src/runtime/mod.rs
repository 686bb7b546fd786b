//! Running containers: images pulled into a content-addressed store ([`image`], with
//! registry credentials from [`auth`]), bundles and their OCI specs ([`container`]), and the
//! single-threaded per-container shim around youki's libcontainer ([`shim`]), and the
//! seccomp profiles it applies ([`seccomp`]).

pub mod auth;
pub mod container;
pub mod image;
pub mod seccomp;
pub mod shim;
