//! User impersonation: a caller allowed the `impersonate` verb acts as another user, as
//! `kubectl --as/--as-group` and client-go's `rest.ImpersonationConfig` ask with the
//! `Impersonate-User`, `Impersonate-Group`, `Impersonate-Uid` and `Impersonate-Extra-*`
//! headers — kube-apiserver's impersonation filter. It runs after authentication and before
//! authorization, which then judges the impersonated user.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::authorization::{Attributes, Authorizer, ResourceAttributes, User, forbidden};
use crate::error::ApiError;

const USER: &str = "impersonate-user";
const GROUP: &str = "impersonate-group";
const UID: &str = "impersonate-uid";
const EXTRA: &str = "impersonate-extra-";

/// Who may impersonate whom: under RBAC the caller needs `impersonate` on each user,
/// group, uid and extra it names; with `None` (`--authorization-mode AlwaysAllow`) anyone
/// authenticated may.
#[derive(Debug, Clone)]
pub struct Impersonation {
    /// The authorizer that checks the `impersonate` verb, if requests are authorized.
    pub authorizer: Option<Arc<Authorizer>>,
}

/// What one request asks to be: the user, groups, uid and extras its headers name.
#[derive(Debug, Default, PartialEq)]
struct Asked {
    user: Option<String>,
    groups: Vec<String>,
    uid: Option<String>,
    extras: Vec<(String, String)>,
}

impl Asked {
    fn from_headers(headers: &HeaderMap) -> Asked {
        let text = |v: &axum::http::HeaderValue| v.to_str().ok().map(str::to_owned);
        Asked {
            user: headers.get(USER).and_then(text),
            groups: headers.get_all(GROUP).iter().filter_map(text).collect(),
            uid: headers.get(UID).and_then(text),
            extras: headers
                .iter()
                .filter_map(|(name, value)| {
                    let key = name.as_str().strip_prefix(EXTRA)?;
                    Some((key.to_owned(), text(value)?))
                })
                .collect(),
        }
    }

    fn any(&self) -> bool {
        self.user.is_some()
            || !self.groups.is_empty()
            || self.uid.is_some()
            || !self.extras.is_empty()
    }

    /// What the caller must be allowed to `impersonate`, one check each.
    fn checks(&self) -> Vec<ResourceAttributes> {
        let check =
            |group: &str, resource: &str, subresource: &str, name: &str| ResourceAttributes {
                verb: "impersonate".into(),
                group: group.into(),
                resource: resource.into(),
                subresource: subresource.into(),
                name: Some(name.into()),
                namespace: None,
            };
        let mut checks = Vec::new();
        if let Some(user) = &self.user {
            match service_account(user) {
                Some((namespace, name)) => checks.push(ResourceAttributes {
                    namespace: Some(namespace.into()),
                    ..check("", "serviceaccounts", "", name)
                }),
                None => checks.push(check("", "users", "", user)),
            }
        }
        for group in &self.groups {
            checks.push(check("", "groups", "", group));
        }
        if let Some(uid) = &self.uid {
            checks.push(check("authentication.k8s.io", "uids", "", uid));
        }
        for (key, value) in &self.extras {
            checks.push(check("authentication.k8s.io", "userextras", key, value));
        }
        checks
    }

    /// The user the request continues as: the named groups (a service account's own when
    /// none are named), and `system:authenticated` as every authenticated user has.
    fn user(&self, name: &str) -> User {
        let mut groups = self.groups.clone();
        if groups.is_empty()
            && let Some((namespace, _)) = service_account(name)
        {
            groups = vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
            ];
        }
        if name != "system:anonymous" && !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        User {
            name: name.to_owned(),
            groups,
            ..User::default()
        }
    }
}

/// `system:serviceaccount:NS:NAME` → `(NS, NAME)`.
fn service_account(user: &str) -> Option<(&str, &str)> {
    let rest = user.strip_prefix("system:serviceaccount:")?;
    rest.split_once(':')
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
}

/// Middleware, between [`crate::identity::authenticate`] and
/// [`crate::authorization::authorize`]: see the module documentation.
pub async fn impersonate(
    State(impersonation): State<Arc<Impersonation>>,
    mut request: Request,
    next: Next,
) -> Response {
    let asked = Asked::from_headers(request.headers());
    if !asked.any() {
        return next.run(request).await;
    }
    let Some(caller) = request.extensions().get::<User>().cloned() else {
        return next.run(request).await;
    };
    let Some(name) = asked.user.clone() else {
        return ApiError::BadRequest(
            "impersonating groups, a uid or extras requires impersonating a user \
             (Impersonate-User)"
                .into(),
        )
        .into_response();
    };
    if let Some(authorizer) = &impersonation.authorizer {
        for check in asked.checks() {
            let attributes = Attributes::Resource(check);
            match authorizer.allows(&caller, &attributes).await {
                Ok(true) => {}
                Ok(false) => return forbidden(&caller, &attributes).into_response(),
                Err(error) => return error.into_response(),
            }
        }
    }
    let user = asked.user(&name);
    tracing::debug!(caller = %caller.name, user = %user.name, "impersonating");
    let headers = request.headers_mut();
    let names: Vec<_> = headers
        .keys()
        .filter(|n| n.as_str().starts_with("impersonate-"))
        .cloned()
        .collect();
    for header in names {
        headers.remove(header);
    }
    request.extensions_mut().insert(user);
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn headers_name_what_must_be_allowed_and_who_results() {
        let asked = Asked::from_headers(&headers(&[
            ("Impersonate-User", "system:serviceaccount:ns:robot"),
            ("Impersonate-Uid", "1234"),
            ("Impersonate-Extra-Scopes", "view"),
        ]));
        let checks = asked.checks();
        assert_eq!(checks.len(), 3);
        assert_eq!(
            (checks[0].resource.as_str(), checks[0].namespace.as_deref()),
            ("serviceaccounts", Some("ns"))
        );
        assert_eq!(checks[1].resource, "uids");
        assert_eq!(
            (checks[2].resource.as_str(), checks[2].subresource.as_str()),
            ("userextras", "scopes")
        );
        let user = asked.user("system:serviceaccount:ns:robot");
        assert_eq!(
            user.groups,
            [
                "system:serviceaccounts",
                "system:serviceaccounts:ns",
                "system:authenticated"
            ]
        );

        let asked = Asked::from_headers(&headers(&[
            ("Impersonate-User", "jane"),
            ("Impersonate-Group", "devs"),
            ("Impersonate-Group", "ops"),
        ]));
        assert_eq!(
            asked
                .checks()
                .iter()
                .filter(|c| c.resource == "groups")
                .count(),
            2
        );
        assert_eq!(
            asked.user("jane").groups,
            ["devs", "ops", "system:authenticated"]
        );
        assert!(!Asked::from_headers(&HeaderMap::new()).any());
    }
}
