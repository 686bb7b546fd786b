//! The reviews: kinds that are only created, answered from the request and never stored.
//!
//! - `SelfSubjectReview` (`kubectl auth whoami`): who the caller is;
//! - `SelfSubjectAccessReview` (`kubectl auth can-i`): may the caller do this;
//! - `SubjectAccessReview`, `LocalSubjectAccessReview` (in one namespace): may that user;
//! - `SelfSubjectRulesReview` (`kubectl auth can-i --list`): what the caller may do in a
//!   namespace;
//! - `TokenReview`: whose is this bearer token.
//!
//! Access is decided by the same [`Authorizer`] that guards every request (RBAC), or granted
//! when the server authorizes everything (`AlwaysAllow`, or plain HTTP without
//! authentication).

use serde_json::{Value, json};

use crate::authorization::{Attributes, Authorizer, ResourceAttributes, User};
use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;

/// The answer to a review `object` posted by `caller` to `target`: the object with its
/// `status` (and, for self reviews, the caller filled in).
pub async fn answer(
    engine: &Engine,
    target: &Target,
    caller: Option<&User>,
    mut object: Value,
) -> Result<Value, ApiError> {
    let def = &target.def;
    if object.get("kind").and_then(Value::as_str) != Some(def.kind.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "the body is not a {} (kind {:?})",
            def.kind,
            object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default()
        )));
    }
    // Everyone authenticated may ask about themselves; a plain-HTTP server has no caller
    // and answers for an anonymous administrator.
    let anonymous = User {
        name: "system:anonymous".into(),
        groups: vec!["system:masters".into(), "system:unauthenticated".into()],
        ..User::default()
    };
    let me = caller.unwrap_or(&anonymous);
    let status = match def.kind.as_str() {
        "SelfSubjectReview" => json!({"userInfo": user_info(me)}),
        "SelfSubjectAccessReview" => access(engine, me, &object["spec"], None).await?,
        "SubjectAccessReview" => {
            access(engine, &subject(&object["spec"])?, &object["spec"], None).await?
        }
        "LocalSubjectAccessReview" => {
            let namespace = target.namespace.as_deref().unwrap_or_default();
            let asked = object
                .pointer("/spec/resourceAttributes/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if asked != namespace {
                return Err(ApiError::invalid(
                    def,
                    "",
                    "spec.resourceAttributes.namespace",
                    "FieldValueInvalid",
                    format!("Invalid value: {asked:?}: must be {namespace:?}"),
                ));
            }
            access(
                engine,
                &subject(&object["spec"])?,
                &object["spec"],
                Some(namespace),
            )
            .await?
        }
        "SelfSubjectRulesReview" => {
            let namespace = object
                .pointer("/spec/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            rules(engine, me, &namespace).await?
        }
        "TokenReview" => token(engine, &object["spec"]).await,
        other => {
            return Err(ApiError::Internal(format!("no review for kind {other}")));
        }
    };
    object["status"] = status;
    if object.get("metadata").is_none() {
        object["metadata"] = json!({});
    }
    Ok(object)
}

fn user_info(user: &User) -> Value {
    let mut info = json!({"username": user.name, "groups": user.groups});
    if !user.extra.is_empty() {
        info["extra"] = json!(user.extra);
    }
    info
}

/// The user a (Local)SubjectAccessReview asks about.
fn subject(spec: &Value) -> Result<User, ApiError> {
    let name = spec
        .get("user")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let groups: Vec<String> = spec["groups"]
        .as_array()
        .map(|g| {
            g.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if name.is_empty() && groups.is_empty() {
        return Err(ApiError::BadRequest(
            "spec.user or spec.groups is required".into(),
        ));
    }
    Ok(User {
        name,
        groups,
        extra: spec["extra"]
            .as_object()
            .map(|extra| {
                extra
                    .iter()
                    .map(|(key, values)| {
                        let values = values
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect();
                        (key.clone(), values)
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// `{allowed, reason}` for the resource or non-resource attributes in `spec`.
async fn access(
    engine: &Engine,
    user: &User,
    spec: &Value,
    namespace: Option<&str>,
) -> Result<Value, ApiError> {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_owned();
    let attributes =
        if let Some(resource) = spec.get("resourceAttributes").filter(|v| v.is_object()) {
            let name = Some(text(resource, "name")).filter(|n| !n.is_empty());
            let asked = Some(text(resource, "namespace")).filter(|n| !n.is_empty());
            Attributes::Resource(ResourceAttributes {
                verb: text(resource, "verb"),
                group: text(resource, "group"),
                resource: text(resource, "resource"),
                subresource: text(resource, "subresource"),
                name,
                namespace: asked.or(namespace.map(str::to_owned)),
            })
        } else if let Some(other) = spec.get("nonResourceAttributes").filter(|v| v.is_object()) {
            let path = text(other, "path");
            return decide(
                engine,
                user,
                &Attributes::NonResource {
                    path: &path,
                    verb: text(other, "verb"),
                },
            )
            .await;
        } else {
            return Err(ApiError::BadRequest(
                "spec.resourceAttributes or spec.nonResourceAttributes is required".into(),
            ));
        };
    decide(engine, user, &attributes).await
}

async fn decide(
    engine: &Engine,
    user: &User,
    attributes: &Attributes<'_>,
) -> Result<Value, ApiError> {
    if !engine.authorizes_by_rbac() {
        return Ok(json!({"allowed": true, "reason": "every request is allowed (AlwaysAllow)"}));
    }
    let allowed = Authorizer::new(engine.clone())
        .allows(user, attributes)
        .await?;
    Ok(if allowed {
        json!({"allowed": true, "reason": "allowed by RBAC"})
    } else {
        json!({"allowed": false})
    })
}

/// What `user` may do in `namespace`, as rule lists.
async fn rules(engine: &Engine, user: &User, namespace: &str) -> Result<Value, ApiError> {
    if !engine.authorizes_by_rbac()
        || user
            .groups
            .iter()
            .any(|g| g == crate::authorization::MASTERS)
    {
        return Ok(json!({
            "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}],
            "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
            "incomplete": false,
        }));
    }
    let found = Authorizer::new(engine.clone())
        .rules_for(user, Some(namespace).filter(|n| !n.is_empty()))
        .await?;
    let mut resource_rules = Vec::new();
    let mut non_resource_rules = Vec::new();
    for rule in found {
        if rule
            .non_resource_urls
            .as_ref()
            .is_some_and(|u| !u.is_empty())
        {
            non_resource_rules
                .push(json!({"verbs": rule.verbs, "nonResourceURLs": rule.non_resource_urls}));
        } else {
            let mut entry = json!({
                "verbs": rule.verbs,
                "apiGroups": rule.api_groups.unwrap_or_default(),
                "resources": rule.resources.unwrap_or_default(),
            });
            if let Some(names) = rule.resource_names.filter(|n| !n.is_empty()) {
                entry["resourceNames"] = json!(names);
            }
            resource_rules.push(entry);
        }
    }
    // What every authenticated caller may do without a binding (discovery, reviews).
    non_resource_rules.push(json!({
        "verbs": ["get"],
        "nonResourceURLs": ["/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz", "/version", "/version/"],
    }));
    resource_rules.push(json!({
        "verbs": ["create"],
        "apiGroups": ["authorization.k8s.io"],
        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
    }));
    Ok(json!({
        "resourceRules": resource_rules,
        "nonResourceRules": non_resource_rules,
        "incomplete": false,
    }))
}

/// `{authenticated, user}` for the token in `spec`.
async fn token(engine: &Engine, spec: &Value) -> Value {
    let presented = spec
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let user = match engine.authenticator() {
        Some(authenticator) if !presented.is_empty() => authenticator.user(presented).await,
        _ => None,
    };
    match user {
        Some(user) => json!({
            "authenticated": true,
            "user": user_info(&user),
            "audiences": spec.get("audiences").cloned().unwrap_or_else(|| json!([])),
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    }
}
