//! Orquestra's node agent (the kubelet): node registration, pod sync and the libcontainer runtime.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout (issue 5).
