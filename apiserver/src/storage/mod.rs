//! Objects in the store: the generic engine (create, read, update, delete, list, watch)
//! with its watch cache, conversion between a kind's versions, object metadata, patches and
//! managed fields, and label and field selectors.

pub mod cache;
pub mod convert;
pub mod engine;
pub mod managed;
pub mod object;
pub mod patch;
pub mod selector;
pub mod smp;
