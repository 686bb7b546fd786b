//! The kubelet proper: the agent's loop over the pods bound to its node ([`agent`]), the
//! node's registration and heartbeat ([`node`]), one level-based worker per pod ([`pod`])
//! with its probes ([`probe`]), lifecycle hooks ([`hook`]), resolved configuration
//! ([`resolve`]), the downward API ([`downward`]), Services' environment ([`links`]), its
//! names and `/etc/hosts` ([`hosts`]), volumes ([`volume`]), termination messages
//! ([`termination`]), in-place resize ([`resize`]), service account tokens
//! ([`serviceaccount`]) and events ([`events`]); the node's health conditions ([`health`]);
//! containers' logs ([`logs`]) and the agent's HTTPS endpoint ([`endpoint`]); and a
//! [`simulated`] runtime of many fake nodes.

pub mod agent;
pub mod downward;
pub mod endpoint;
pub mod events;
pub mod health;
pub mod hook;
pub mod hosts;
pub mod links;
pub mod logs;
pub mod node;
pub mod pod;
pub mod probe;
pub mod resize;
pub mod resolve;
pub mod serviceaccount;
pub mod simulated;
pub mod termination;
pub mod volume;
