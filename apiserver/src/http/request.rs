//! Request parsing: which resource a URL names, and the query parameters clients send.

use std::sync::Arc;

use serde::Deserialize;

use crate::error::ApiError;
use crate::registry::{Registry, ResourceDef};

/// What a resource URL names.
#[derive(Clone, Debug)]
pub struct Target {
    /// The resource.
    pub def: Arc<ResourceDef>,
    /// The namespace in the path, for namespaced resources.
    pub namespace: Option<String>,
    /// The object name, unless the URL names the collection.
    pub name: Option<String>,
    /// `status`, `scale`, `binding`, … .
    pub subresource: Option<String>,
}

impl Target {
    /// Parses the part of the path after `/api/v1/` or `/apis/<group>/<version>/`.
    pub fn parse(
        registry: &Registry,
        group: &str,
        version: &str,
        rest: &str,
    ) -> Result<Target, ApiError> {
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let lookup = |plural: &str| registry.get(group, version, plural);
        // `namespaces/<ns>/<plural>/…` when <plural> is a namespaced resource; otherwise the
        // path names a cluster-scoped resource (Namespace objects included).
        if segments.len() >= 3 && segments[0] == "namespaces" {
            if let Some(def) = lookup(segments[2]).filter(|d| d.namespaced) {
                return Self::finish(def, Some(segments[1]), &segments[3..]);
            }
        }
        let (plural, rest) = segments.split_first().ok_or(ApiError::NoRoute)?;
        let def = lookup(plural).ok_or(ApiError::NoRoute)?;
        Self::finish(def, None, rest)
    }

    fn finish(
        def: Arc<ResourceDef>,
        namespace: Option<&str>,
        rest: &[&str],
    ) -> Result<Target, ApiError> {
        let (name, subresource) = match rest {
            [] => (None, None),
            [name] => (Some(*name), None),
            [name, sub] => (Some(*name), Some(*sub)),
            _ => return Err(ApiError::NoRoute),
        };
        Ok(Target {
            def,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: subresource.map(str::to_owned),
        })
    }

    /// The store key of the named object.
    pub fn key(&self) -> Option<String> {
        Some(
            self.def
                .key(self.namespace.as_deref(), self.name.as_deref()?),
        )
    }

    /// The store prefix of the collection: one namespace, or all of them.
    pub fn prefix(&self) -> String {
        match &self.namespace {
            Some(ns) if self.def.namespaced => format!("{}{ns}/", self.def.key_prefix()),
            _ => self.def.key_prefix(),
        }
    }
}

/// The query parameters the engine understands; unknown ones are ignored, as clients send
/// `pretty`, `fieldManager`, … freely.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Params {
    /// `?watch=true|1`.
    pub watch: Option<String>,
    /// Label selector.
    pub label_selector: Option<String>,
    /// Field selector.
    pub field_selector: Option<String>,
    /// Page size.
    pub limit: Option<String>,
    /// Continue token of the previous page.
    #[serde(rename = "continue")]
    pub continue_token: Option<String>,
    /// For lists: `0`/empty = latest; for watches: start after it.
    pub resource_version: Option<String>,
    /// `Exact` or `NotOlderThan`.
    pub resource_version_match: Option<String>,
    /// Watch duration.
    pub timeout_seconds: Option<String>,
    /// A shorter request timeout, as a Go duration (`30s`, `1m0s`).
    pub timeout: Option<String>,
    /// Send BOOKMARK events.
    pub allow_watch_bookmarks: Option<String>,
    /// Streaming list: initial ADDED events, then the `initial-events-end` bookmark.
    pub send_initial_events: Option<String>,
    /// `All`: validate and answer, but do not persist.
    pub dry_run: Option<String>,
    /// `Ignore`, `Warn` or `Strict`.
    pub field_validation: Option<String>,
    /// `Background`, `Foreground` or `Orphan`.
    pub propagation_policy: Option<String>,
    /// Graceful deletion period.
    pub grace_period_seconds: Option<String>,
    /// For Tables: `None`, `Metadata` (default) or `Object`.
    pub include_object: Option<String>,
    /// Who is writing (required for server-side apply).
    pub field_manager: Option<String>,
    /// Server-side apply: take fields other managers own instead of failing.
    pub force: Option<String>,
}

/// What a read answers with, from its Accept header (alternatives in the client's order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Representation {
    /// The objects themselves.
    Full,
    /// A `meta.k8s.io/v1` Table (kubectl get).
    Table,
    /// `PartialObjectMetadata` (and `…List`): metadata only (kube-rs `*_metadata`, client-go
    /// metadata informers).
    Metadata,
}

impl Representation {
    /// Reads an Accept header.
    pub fn from_accept(accept: &str) -> Representation {
        for part in accept.split(',') {
            if !part.contains("g=meta.k8s.io") {
                if part.contains("json") || part.contains("*/*") {
                    return Representation::Full;
                }
                continue;
            }
            if part.contains("as=Table") {
                return Representation::Table;
            }
            if part.contains("as=PartialObjectMetadata") {
                return Representation::Metadata;
            }
        }
        Representation::Full
    }
}

/// `?fieldValidation=`: unknown fields are dropped silently, dropped with a warning, or
/// refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldValidation {
    /// Drop them.
    Ignore,
    /// Drop them and say so in `Warning` headers.
    Warn,
    /// Refuse the request (400).
    Strict,
}

/// Parses a Go duration (`1h2m3.5s`, `500ms`, `30s`): what kubectl and client-go send.
pub fn go_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    std::time::Duration::try_from_secs_f64(total).ok()
}

/// Reads a boolean query parameter the way Kubernetes does (`true`, `1`).
pub fn flag(value: &Option<String>) -> bool {
    matches!(value.as_deref(), Some("true" | "1" | "True"))
}

impl Params {
    /// `?watch=true`.
    pub fn is_watch(&self) -> bool {
        flag(&self.watch)
    }

    /// `?dryRun=All`.
    pub fn dry_run(&self) -> Result<bool, ApiError> {
        match self.dry_run.as_deref() {
            None | Some("") => Ok(false),
            Some("All") => Ok(true),
            Some(other) => Err(ApiError::BadRequest(format!(
                "Invalid dry run value: {other:?} (supported: All)"
            ))),
        }
    }

    /// `?fieldValidation=`: what to do about fields the schema does not know. Unset means
    /// `Warn`, kube-apiserver's default.
    pub fn field_validation(&self) -> Result<FieldValidation, ApiError> {
        match self.field_validation.as_deref() {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some(other) => Err(ApiError::BadRequest(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, got {other:?}"
            ))),
        }
    }

    /// `?timeout=`: the client's request timeout, if it gives one.
    pub fn timeout(&self) -> Result<Option<std::time::Duration>, ApiError> {
        match self.timeout.as_deref() {
            None | Some("") => Ok(None),
            Some(text) => go_duration(text).map(Some).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid timeout {text:?}: expected a duration like 30s"
                ))
            }),
        }
    }

    /// `?limit=N` (0 or absent: no limit).
    pub fn limit(&self) -> Result<Option<usize>, ApiError> {
        match self.limit.as_deref() {
            None | Some("") => Ok(None),
            Some(n) => n
                .parse::<i64>()
                .map(|n| (n > 0).then_some(n as usize))
                .map_err(|_| ApiError::BadRequest(format!("invalid limit {n:?}"))),
        }
    }

    /// `?resourceVersion=N`, with `""` and `"0"` meaning "any".
    pub fn resource_version(&self) -> Result<Option<i64>, ApiError> {
        match self.resource_version.as_deref() {
            None | Some("") | Some("0") => Ok(None),
            Some(rv) => rv.parse::<i64>().map(Some).map_err(|_| {
                ApiError::BadRequest(format!(
                    "invalid resourceVersion {rv:?}: must be an integer"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn representations() {
        use Representation as R;
        let table = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json";
        assert_eq!(R::from_accept(table), R::Table);
        let meta = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
        assert_eq!(R::from_accept(meta), R::Metadata);
        assert_eq!(R::from_accept("application/json"), R::Full);
        assert_eq!(R::from_accept(""), R::Full);
        assert_eq!(
            R::from_accept("application/json, application/json;as=Table;v=v1;g=meta.k8s.io"),
            R::Full
        );
    }

    #[test]
    fn go_durations() {
        assert_eq!(go_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(go_duration("1m0s"), Some(Duration::from_secs(60)));
        assert_eq!(
            go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(go_duration("500ms"), Some(Duration::from_millis(500)));
        for bad in ["", "30", "s", "1x", "-1s", "1s2"] {
            assert_eq!(go_duration(bad), None, "{bad}");
        }
    }
}
