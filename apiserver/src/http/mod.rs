//! The wire: how a request is read and an answer written — paths and query parameters,
//! JSON and protobuf bodies and responses, server-side tables, watch streams, discovery and
//! the OpenAPI documents, and the request metrics.

pub mod body;
pub mod discovery;
pub mod metrics;
pub mod openapi;
pub mod proto;
pub mod request;
pub mod request_info;
pub mod table;
pub mod watch;
