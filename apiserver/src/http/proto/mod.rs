//! `application/vnd.kubernetes.protobuf`, both ways: request bodies decoded into the JSON the
//! engine handles ([`decode`]), and responses encoded from it for clients that ask for
//! protobuf first, as client-go does ([`encode`], [`respond`]) — objects, lists, and watch
//! streams (length-delimited `WatchEvent` frames).
//!
//! The envelope is the magic `k8s\0` and a `runtime.Unknown` (type meta + raw message). The
//! messages follow the wire schema in `schema.json`: field numbers and types from the
//! upstream `generated.proto` (through the k8s-pb crate), JSON names from the Kubernetes API
//! (through k8s-openapi), for every kind the server serves and their lists
//! (`scripts/gen-proto-schema.py`; a test says when it is stale).

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;

use crate::error::ApiError;

mod decode;
mod encode;
mod example;
pub mod respond;

pub use encode::{EncodeError, encode, encode_list, encode_message, watch_frame};
/// For tests: an object of a kind with every field set.
#[doc(hidden)]
pub use example::example;

/// The magic that starts every Kubernetes protobuf body.
pub const MAGIC: &[u8] = b"k8s\0";
/// The content type.
pub const CONTENT_TYPE: &str = "application/vnd.kubernetes.protobuf";

/// One field of a message: JSON name (empty for a Go struct embedded inline), kind (a
/// scalar type, `message` or `map`), type (the message, or `string,<value type>` for a map)
/// and whether it repeats.
#[derive(Debug, Deserialize)]
struct Field(String, String, String, bool);

#[derive(Debug, Default, Deserialize)]
struct Schema {
    /// `apiVersion/Kind` → message.
    roots: HashMap<String, String>,
    /// Message → tag → field.
    messages: HashMap<String, HashMap<u32, Field>>,
    /// Message → its tags in ascending order (the encoder's order), derived once on load.
    #[serde(skip)]
    ordered: HashMap<String, Vec<u32>>,
}

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut schema: Schema = serde_json::from_str(include_str!("schema.json")).unwrap_or_default();
    schema.ordered = schema
        .messages
        .iter()
        .map(|(name, fields)| {
            let mut tags: Vec<u32> = fields.keys().copied().collect();
            tags.sort_unstable();
            (name.clone(), tags)
        })
        .collect();
    schema
});

fn bad(message: &str) -> ApiError {
    ApiError::BadRequest(format!("invalid protobuf body: {message}"))
}

/// Decodes a protobuf request body into the object's JSON: a 400 `Status` naming what is
/// wrong for a body that is not one (truncated, no envelope), a 415 for a kind without a
/// protobuf schema.
pub fn decode(body: &[u8]) -> Result<serde_json::Value, ApiError> {
    decode::decode(body)
}

/// Whether objects of `api_version`/`kind` have a protobuf form here.
pub fn has_schema(api_version: &str, kind: &str) -> bool {
    SCHEMA.roots.contains_key(&format!("{api_version}/{kind}"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_schema_is_current() {
        crate::assert_generated_current(
            "gen-proto-schema.py",
            "apiserver/src/http/proto/schema.json",
        );
    }
}
