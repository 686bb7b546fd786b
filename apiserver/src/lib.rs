//! Orquestra's Kubernetes-compatible API server.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout so that the
//! dependency direction is fixed from the start (`apiserver` depends on `orquestra-store`,
//! never the other way round). The API server is the subject of issue 3.
