//! Orquestra's controller framework and built-in control loops.
//!
//! Not implemented yet: this crate is a placeholder in the workspace layout. It will talk to
//! the API only through a kube `Client` (issues 4 and 6).
