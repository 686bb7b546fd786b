//! The API server's errors and their one mapping to a Kubernetes `metav1.Status`.
//!
//! Clients read the `reason` (kube-rs matches on it alone), the `code` (the HTTP status),
//! and for `Invalid` the `details.causes`. Messages follow kube-apiserver's wording, which
//! kubectl prints as is.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::registry::ResourceDef;

/// One field-level problem of an `Invalid` error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, ….
    pub reason: String,
    /// What is wrong.
    pub message: String,
    /// The field path (`metadata.name`).
    pub field: String,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404: the object does not exist.
    #[error("{resource} \"{name}\" not found")]
    NotFound {
        /// Plural (with group when not core), as kubectl prints it.
        resource: String,
        /// The object's name.
        name: String,
        /// Group, for `details`.
        group: String,
        /// Kind, for `details` (kube-apiserver reports the plural here).
        kind: String,
    },
    /// 404: no such path or resource.
    #[error("the server could not find the requested resource")]
    NoRoute,
    /// 409: create of an existing name.
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists {
        /// Plural.
        resource: String,
        /// Name.
        name: String,
        /// Group.
        group: String,
    },
    /// 409: stale resourceVersion or failed precondition.
    #[error("{message}")]
    Conflict {
        /// Plural.
        resource: String,
        /// Name.
        name: String,
        /// Group.
        group: String,
        /// The full message.
        message: String,
    },
    /// 409: server-side apply would take fields another manager owns (without `force`).
    #[error("{message}")]
    FieldConflict {
        /// Plural.
        resource: String,
        /// Name.
        name: String,
        /// Group.
        group: String,
        /// kube-apiserver's summary: `Apply failed with N conflicts: …`.
        message: String,
        /// One per conflicting field (`FieldManagerConflict`).
        causes: Vec<Cause>,
    },
    /// 422: the object is not valid.
    #[error("{kind} \"{name}\" is invalid: {}", causes_summary(.causes))]
    Invalid {
        /// Kind.
        kind: String,
        /// Name (may be empty for generateName).
        name: String,
        /// Group.
        group: String,
        /// What is wrong, field by field.
        causes: Vec<Cause>,
    },
    /// 401: no valid credentials.
    #[error("Unauthorized")]
    Unauthorized,
    /// 403: the request is understood but refused (creating in a terminating namespace).
    #[error("{message}")]
    Forbidden {
        /// Plural (without the group: kube-apiserver's `details.kind`).
        resource: String,
        /// The object's name.
        name: String,
        /// Group.
        group: String,
        /// The full message: `pods "x" is forbidden: …`.
        message: String,
        /// Why, for clients that look (`NamespaceTerminating`).
        causes: Vec<Cause>,
    },
    /// 400: the request itself is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 405: verb not supported on this resource.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// 410: the requested resourceVersion is too old.
    #[error("too old resource version: {requested} ({oldest})")]
    Expired {
        /// What was asked for.
        requested: i64,
        /// The oldest still available.
        oldest: i64,
    },
    /// 410: a LIST's continue token names a snapshot compacted away. `continue_token`
    /// continues from the same key at the latest revision (an inconsistent list), as
    /// kube-apiserver offers in the Status's `metadata.continue`.
    #[error(
        "The provided continue parameter is too old to display a consistent list result. You \
         can start a new list without the continue parameter, or use the continue token in \
         this response to retrieve the remainder of the results. Continuing with the provided \
         token results in an inconsistent list - objects that were created, modified, or \
         deleted between the time the first chunk was returned and now may show up in the list."
    )]
    ExpiredContinue {
        /// The token continuing at the latest revision.
        continue_token: String,
    },
    /// 406: the client accepts no form this resource has (a Table of a review).
    #[error("the server was unable to respond with a content type that the client supports")]
    NotAcceptable,
    /// 413: body too large.
    #[error("the request body is too large")]
    TooLarge,
    /// 415: unsupported content type (e.g. strategic merge patch on a custom resource).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429: not now; the client should retry after `retry_after` seconds (an eviction a
    /// disruption budget does not allow yet).
    #[error("{message}")]
    TooManyRequests {
        /// The full message.
        message: String,
        /// Seconds to wait (`details.retryAfterSeconds`, the `Retry-After` header).
        retry_after: u32,
        /// Why (`DisruptionBudget`).
        causes: Vec<Cause>,
    },
    /// A refusal an admission webhook answered with: its `Status` (code ≥ 400, message
    /// naming the webhook), returned as it is.
    #[error("{}", .0["message"].as_str().unwrap_or_default())]
    Rejected(Box<Value>),
    /// 500: a failure inside the server that is not the store's.
    #[error("{0}")]
    Internal(String),
    /// 504: the request did not finish in time.
    #[error("{0}")]
    Timeout(String),
    /// 503: a backend the request is relayed to (a proxied pod or service, a service with
    /// no endpoints) cannot be reached.
    #[error("{0}")]
    ServiceUnavailable(String),
    /// 500: the store failed.
    #[error("storage error: {0}")]
    Storage(#[source] orquestra_store::Error),
    /// 503: the store is unreachable.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] orquestra_store::Error),
}

fn causes_summary(causes: &[Cause]) -> String {
    causes
        .iter()
        .map(|c| format!("{}: {}", c.field, c.message))
        .collect::<Vec<_>>()
        .join(", ")
}

impl ApiError {
    /// `NotFound` for an object of `def`.
    pub fn not_found(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: qualified(def),
            name: name.to_owned(),
            group: def.group.clone(),
            kind: def.plural.clone(),
        }
    }

    /// `AlreadyExists` for an object of `def`.
    pub fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::AlreadyExists {
            resource: qualified(def),
            name: name.to_owned(),
            group: def.group.clone(),
        }
    }

    /// The optimistic-concurrency `Conflict`, worded as kube-apiserver does.
    pub fn stale(def: &ResourceDef, name: &str) -> ApiError {
        ApiError::Conflict {
            resource: qualified(def),
            name: name.to_owned(),
            group: def.group.clone(),
            message: format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
                 please apply your changes to the latest version and try again",
                qualified(def)
            ),
        }
    }

    /// kube-apiserver's NamespaceLifecycle refusal: no new objects in a namespace that is
    /// being deleted. `name` is the object's name, or its generateName prefix.
    pub fn namespace_terminating(def: &ResourceDef, name: &str, namespace: &str) -> ApiError {
        let resource = qualified(def);
        ApiError::Forbidden {
            message: format!(
                "{resource} \"{name}\" is forbidden: unable to create new content in namespace \
                 {namespace} because it is being terminated"
            ),
            resource: def.plural.clone(),
            name: name.to_owned(),
            group: def.group.clone(),
            causes: vec![Cause {
                reason: "NamespaceTerminating".into(),
                message: format!("namespace {namespace} is being terminated"),
                field: "metadata.namespace".into(),
            }],
        }
    }

    /// `Invalid` with one cause.
    pub fn invalid(
        def: &ResourceDef,
        name: &str,
        field: &str,
        reason: &str,
        message: String,
    ) -> ApiError {
        ApiError::Invalid {
            kind: def.kind.clone(),
            name: name.to_owned(),
            group: def.group.clone(),
            causes: vec![Cause {
                reason: reason.to_owned(),
                message,
                field: field.to_owned(),
            }],
        }
    }

    /// HTTP status code.
    pub fn code(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => StatusCode::NOT_FOUND,
            ApiError::AlreadyExists { .. }
            | ApiError::Conflict { .. }
            | ApiError::FieldConflict { .. } => StatusCode::CONFLICT,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Expired { .. } | ApiError::ExpiredContinue { .. } => StatusCode::GONE,
            ApiError::NotAcceptable => StatusCode::NOT_ACCEPTABLE,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Rejected(status) => status["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST),
            ApiError::Storage(_) | ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) | ApiError::ServiceUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The `metav1.Status` reason.
    pub fn reason(&self) -> &str {
        match self {
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } | ApiError::FieldConflict { .. } => "Conflict",
            ApiError::Invalid { .. } => "Invalid",
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden { .. } => "Forbidden",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::Expired { .. } | ApiError::ExpiredContinue { .. } => "Expired",
            ApiError::NotAcceptable => "NotAcceptable",
            ApiError::TooLarge => "RequestEntityTooLarge",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::TooManyRequests { .. } => "TooManyRequests",
            ApiError::Rejected(status) => status["reason"].as_str().unwrap_or_default(),
            ApiError::Storage(_) | ApiError::Internal(_) => "InternalError",
            ApiError::Timeout(_) => "Timeout",
            ApiError::Unavailable(_) | ApiError::ServiceUnavailable(_) => "ServiceUnavailable",
        }
    }

    /// The full `metav1.Status` object.
    pub fn status(&self) -> Value {
        if let ApiError::Rejected(status) = self {
            let mut status = (**status).clone();
            status["metadata"] = json!({});
            status["code"] = json!(self.code().as_u16());
            return status;
        }
        let details = match self {
            ApiError::NotFound {
                name, group, kind, ..
            } => Some(json!({"name": name, "group": group, "kind": kind})),
            ApiError::AlreadyExists {
                name,
                group,
                resource,
            }
            | ApiError::Conflict {
                name,
                group,
                resource,
                ..
            } => Some(json!({"name": name, "group": group, "kind": resource})),
            ApiError::FieldConflict {
                resource: kind,
                name,
                group,
                causes,
                ..
            }
            | ApiError::Forbidden {
                resource: kind,
                name,
                group,
                causes,
                ..
            }
            | ApiError::Invalid {
                kind,
                name,
                group,
                causes,
            } => Some(json!({
                "name": name,
                "group": group,
                "kind": kind,
                "causes": causes.iter().map(|c| json!({
                    "reason": c.reason, "message": c.message, "field": c.field
                })).collect::<Vec<_>>(),
            })),
            ApiError::TooManyRequests {
                retry_after,
                causes,
                ..
            } => Some(json!({
                "causes": causes.iter().map(|c| json!({"reason": c.reason, "message": c.message}))
                    .collect::<Vec<_>>(),
                "retryAfterSeconds": retry_after,
            })),
            _ => None,
        };
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code().as_u16(),
        });
        if let Some(details) = details {
            status["details"] = details;
        }
        if let ApiError::ExpiredContinue { continue_token } = self {
            status["metadata"]["continue"] = json!(continue_token);
        }
        status
    }
}

/// `plural` or `plural.group`, as kube-apiserver names a resource in messages.
fn qualified(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        def.plural.clone()
    } else {
        format!("{}.{}", def.plural, def.group)
    }
}

impl From<orquestra_store::Error> for ApiError {
    fn from(error: orquestra_store::Error) -> ApiError {
        use orquestra_store::Error as E;
        match error {
            E::Compacted { requested, oldest } => ApiError::Expired { requested, oldest },
            E::FutureRevision { requested, current } => ApiError::BadRequest(format!(
                "resourceVersion {requested} is newer than the current revision {current}"
            )),
            E::ValueTooLarge { .. } | E::KeyTooLarge { .. } => ApiError::TooLarge,
            e if e.is_transient() => ApiError::Unavailable(e),
            e => ApiError::Storage(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if matches!(self, ApiError::Storage(_) | ApiError::Unavailable(_)) {
            tracing::error!(error = %self, "request failed in the store");
        }
        let mut response = (self.code(), axum::Json(self.status())).into_response();
        if let ApiError::TooManyRequests { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, (*retry_after).into());
        }
        response
    }
}
