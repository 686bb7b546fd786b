//! RBAC authorization (`orq server --authorization-mode=RBAC`), as kube-apiserver's RBAC
//! authorizer decides: a request is allowed when a ClusterRoleBinding, or a RoleBinding in
//! the request's namespace, binds a subject matching the caller to a role with a rule
//! covering the request's verb, API group, resource (`resource/subresource`) and name.
//! Members of `system:masters` (the admin token) are always allowed; every authenticated
//! caller may read discovery, `/version`, the health checks and the OpenAPI document (the
//! bootstrap `system:discovery` and `system:public-info-viewer` roles). Denials are 403
//! `Forbidden` Statuses saying who cannot do what.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use serde::de::DeserializeOwned;

use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::{Params, Target};
use crate::request_info::RequestInfo;

/// Who made a request, as authentication established it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct User {
    /// `system:admin`, `system:serviceaccount:NS:NAME`.
    pub name: String,
    /// `system:masters`, `system:serviceaccounts`, `system:authenticated`, … .
    pub groups: Vec<String>,
    /// What else the authenticator knows (UserInfo's `extra`): for a service account token,
    /// `authentication.kubernetes.io/credential-id` (`JTI=…`) and the pod and node it is
    /// bound to.
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// The group whose members every authorizer allows (kube-apiserver's superusers).
pub const MASTERS: &str = "system:masters";
/// The node agents' group, bound to the bootstrap `system:node` ClusterRole.
pub const NODES: &str = "system:nodes";

/// What a node agent does (the bootstrap `system:node` ClusterRole): register and heartbeat
/// its Node and Lease, run the pods bound to it (their volumes' ConfigMaps and Secrets,
/// their service account tokens), report their status and finish their deletion, proxy
/// Services, serve DNS and Ingresses, record events, and request its client certificate.
fn node_rules() -> serde_json::Value {
    serde_json::json!([
        {"apiGroups": [""], "resources": ["nodes"],
         "verbs": ["get", "list", "watch", "create", "update", "patch"]},
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["update", "patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
         "verbs": ["get", "create", "update", "patch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["update", "patch"]},
        {"apiGroups": [""], "resources": ["configmaps", "secrets", "serviceaccounts"],
         "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"],
         "verbs": ["get", "list", "watch"]},
        // NetworkPolicy enforcement: the policies, every pod (above) and the namespaces
        // their selectors pick.
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
        // The built-in ingress: its routes, and the TLS Secrets it serves (a cluster-wide
        // read, as any ingress controller's).
        {"apiGroups": ["networking.k8s.io"], "resources": ["ingresses", "ingressclasses"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]},
        // Pods' claims and volumes; the local-path volumes a node holds, which it reclaims
        // (deletes) once released.
        {"apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["persistentvolumes"],
         "verbs": ["get", "list", "watch", "delete"]},
        {"apiGroups": ["certificates.k8s.io"], "resources": ["clustertrustbundles"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["node.k8s.io"], "resources": ["runtimeclasses"],
         "verbs": ["get", "list", "watch"]},
        // Its own client certificate: requested (kubeadm's `system:node-bootstrapper` and
        // the self-node-client renewal), and followed until signed.
        {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"],
         "verbs": ["create", "get", "list", "watch"]},
    ])
}

impl User {
    /// The admin token's holder.
    pub fn admin() -> User {
        User {
            name: "system:admin".into(),
            groups: vec![MASTERS.into(), "system:authenticated".into()],
            ..User::default()
        }
    }

    /// A node agent (the node token's holder), in `system:nodes`.
    pub fn node_agent() -> User {
        User {
            name: "system:orquestra:node-agent".into(),
            groups: vec![NODES.into(), "system:authenticated".into()],
            ..User::default()
        }
    }

    /// A ServiceAccount, with the groups Kubernetes gives it.
    pub fn service_account(namespace: &str, name: &str) -> User {
        User {
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
            ..User::default()
        }
    }
}

/// How requests are authorized (kube-apiserver's `--authorization-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Every authenticated request is allowed.
    AlwaysAllow,
    /// Role-based access control.
    Rbac,
}

/// Decides requests under RBAC from the roles and bindings in the store.
pub struct Authorizer {
    engine: Engine,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

/// What is being asked: an API request, or a path outside the API (`/metrics`).
#[derive(Debug)]
pub enum Attributes<'a> {
    /// A request under `/api` or `/apis/G/V`, or a review asking about one.
    Resource(ResourceAttributes),
    /// Another path, with the lower-case HTTP method as the verb.
    NonResource {
        /// The path.
        path: &'a str,
        /// `get`, `post`, … .
        verb: String,
    },
}

/// What a resource request (or a SubjectAccessReview's `resourceAttributes`) asks RBAC.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourceAttributes {
    /// The RBAC verb: get, list, watch, create, update, patch, delete, deletecollection, or
    /// any other a review names (`use`, `bind`, `escalate`, …).
    pub verb: String,
    /// API group (`""` for core).
    pub group: String,
    /// The resource's plural.
    pub resource: String,
    /// The subresource, or empty.
    pub subresource: String,
    /// The object's name, for a request on one object.
    pub name: Option<String>,
    /// The namespace, for a namespaced request.
    pub namespace: Option<String>,
}

impl ResourceAttributes {
    /// `resource` or `resource/subresource`, as RBAC rules name it.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }
}

impl From<&RequestInfo> for ResourceAttributes {
    fn from(info: &RequestInfo) -> Self {
        ResourceAttributes {
            verb: info.authorization_verb().to_owned(),
            group: info.group.clone(),
            resource: info.resource.clone(),
            subresource: info.subresource.clone(),
            name: info.name.clone(),
            namespace: info.namespace.clone(),
        }
    }
}

/// Paths every authenticated caller may GET.
fn discovery(path: &str) -> bool {
    matches!(path, "/api" | "/apis" | "/version" | "/openapi/v2")
        || path.starts_with("/api/")
        || path.starts_with("/apis/")
        || path.starts_with("/openapi/")
        || ["/healthz", "/livez", "/readyz"]
            .iter()
            .any(|p| path == *p || path.starts_with(&format!("{p}/")))
}

impl Authorizer {
    /// An authorizer reading roles and bindings through `engine`.
    pub fn new(engine: Engine) -> Authorizer {
        Authorizer { engine }
    }

    /// Whether `user` may do what `attributes` describe.
    pub async fn allows(&self, user: &User, attributes: &Attributes<'_>) -> Result<bool, ApiError> {
        if user.groups.iter().any(|g| g == MASTERS) {
            return Ok(true);
        }
        if let Attributes::NonResource { path, verb } = attributes
            && verb == "get"
            && discovery(path)
        {
            return Ok(true);
        }
        let namespace = match attributes {
            Attributes::Resource(info) => info.namespace.clone(),
            Attributes::NonResource { .. } => None,
        };
        for binding in self
            .list::<ClusterRoleBinding>("clusterrolebindings", None)
            .await?
        {
            if binds(&binding.subjects, user)
                && binding.role_ref.kind == "ClusterRole"
                && self
                    .cluster_role_rules(&binding.role_ref.name)
                    .await?
                    .iter()
                    .any(|r| covers(r, attributes))
            {
                return Ok(true);
            }
        }
        let Some(namespace) = namespace else {
            return Ok(false);
        };
        for binding in self
            .list::<RoleBinding>("rolebindings", Some(&namespace))
            .await?
        {
            if !binds(&binding.subjects, user) {
                continue;
            }
            let rules = match binding.role_ref.kind.as_str() {
                "ClusterRole" => self.cluster_role_rules(&binding.role_ref.name).await?,
                "Role" => self
                    .get::<Role>("roles", Some(&namespace), &binding.role_ref.name)
                    .await?
                    .and_then(|r| r.rules)
                    .unwrap_or_default(),
                _ => Vec::new(),
            };
            if rules.iter().any(|r| covers(r, attributes)) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Every rule bound to `user`: by ClusterRoleBindings, and in `namespace` by its
    /// RoleBindings (SelfSubjectRulesReview).
    pub async fn rules_for(
        &self,
        user: &User,
        namespace: Option<&str>,
    ) -> Result<Vec<PolicyRule>, ApiError> {
        let mut rules = Vec::new();
        for binding in self
            .list::<ClusterRoleBinding>("clusterrolebindings", None)
            .await?
        {
            if binds(&binding.subjects, user) && binding.role_ref.kind == "ClusterRole" {
                rules.extend(self.cluster_role_rules(&binding.role_ref.name).await?);
            }
        }
        if let Some(namespace) = namespace {
            for binding in self
                .list::<RoleBinding>("rolebindings", Some(namespace))
                .await?
            {
                if !binds(&binding.subjects, user) {
                    continue;
                }
                rules.extend(match binding.role_ref.kind.as_str() {
                    "ClusterRole" => self.cluster_role_rules(&binding.role_ref.name).await?,
                    "Role" => self
                        .get::<Role>("roles", Some(namespace), &binding.role_ref.name)
                        .await?
                        .and_then(|r| r.rules)
                        .unwrap_or_default(),
                    _ => Vec::new(),
                });
            }
        }
        Ok(rules)
    }

    async fn cluster_role_rules(&self, name: &str) -> Result<Vec<PolicyRule>, ApiError> {
        Ok(self
            .get::<ClusterRole>("clusterroles", None, name)
            .await?
            .and_then(|r| r.rules)
            .unwrap_or_default())
    }

    fn target(
        &self,
        plural: &str,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Target, ApiError> {
        let def = self
            .engine
            .registry
            .get("rbac.authorization.k8s.io", "v1", plural)
            .ok_or_else(|| ApiError::Internal(format!("no {plural} resource")))?;
        Ok(Target {
            def,
            namespace: namespace.map(str::to_owned),
            name: name.map(str::to_owned),
            subresource: None,
        })
    }

    async fn list<T: DeserializeOwned>(
        &self,
        plural: &str,
        namespace: Option<&str>,
    ) -> Result<Vec<T>, ApiError> {
        let list = self
            .engine
            .list(&self.target(plural, namespace, None)?, &Params::default())
            .await?;
        let items = list.get("items").cloned().unwrap_or_default();
        serde_json::from_value::<Vec<T>>(items)
            .map_err(|e| ApiError::Internal(format!("reading {plural}: {e}")))
    }

    async fn get<T: DeserializeOwned>(
        &self,
        plural: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<T>, ApiError> {
        match self
            .engine
            .get(&self.target(plural, namespace, Some(name))?)
            .await
        {
            Ok(object) => serde_json::from_value(object)
                .map(Some)
                .map_err(|e| ApiError::Internal(format!("reading {plural} {name}: {e}"))),
            Err(ApiError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// Creates the bootstrap roles every cluster has, if missing: `cluster-admin` (everything),
/// bound to `system:masters` — what `kubectl create clusterrolebinding
/// --clusterrole=cluster-admin` names — `system:node`, bound to `system:nodes`, and
/// `system:basic-user` (the self reviews), bound to `system:authenticated`, and
/// `system:service-account-issuer-discovery` (the OIDC documents), bound to
/// `system:serviceaccounts`.
pub async fn ensure_bootstrap_roles(engine: &Engine) -> Result<(), ApiError> {
    let group = "rbac.authorization.k8s.io";
    let labels = serde_json::json!({"kubernetes.io/bootstrapping": "rbac-defaults"});
    // A ClusterRole and the ClusterRoleBinding granting it to a group.
    let role_for_group = |name: &str, rules: serde_json::Value, subject: &str| {
        [
            (
                "clusterroles",
                serde_json::json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                    "metadata": {"name": name, "labels": labels},
                    "rules": rules,
                }),
            ),
            (
                "clusterrolebindings",
                serde_json::json!({
                    "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                    "metadata": {"name": name, "labels": labels},
                    "roleRef": {"apiGroup": group, "kind": "ClusterRole", "name": name},
                    "subjects": [{"apiGroup": group, "kind": "Group", "name": subject}],
                }),
            ),
        ]
    };
    let everything = serde_json::json!([
        {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
        {"nonResourceURLs": ["*"], "verbs": ["*"]},
    ]);
    // What any authenticated user may ask about itself (`kubectl auth can-i`, `auth whoami`).
    let basic_user = serde_json::json!([
        {"apiGroups": ["authorization.k8s.io"],
         "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
        {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
    ]);
    // What an aggregated API server's service account is bound to, to check who calls it.
    let auth_delegator = serde_json::json!([
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
    ]);
    // The service account issuer's OIDC documents, for every service account (token
    // consumers inside the cluster verify tokens with them).
    let issuer_discovery = serde_json::json!([
        {"nonResourceURLs": ["/.well-known/openid-configuration",
            "/.well-known/openid-configuration/", "/openid/v1/jwks", "/openid/v1/jwks/"],
         "verbs": ["get"]},
    ]);
    // Bound to nobody: users bind it (`system:auth-delegator`, as kube-apiserver has it).
    let [delegator_role, _] = role_for_group("system:auth-delegator", auth_delegator, "");
    let reader = (
        "roles",
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": "extension-apiserver-authentication-reader",
                         "namespace": "kube-system", "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"],
                       "resourceNames": [crate::aggregator::AUTHENTICATION_CONFIGMAP],
                       "verbs": ["get", "list", "watch"]}],
        }),
    );
    let objects = role_for_group("cluster-admin", everything, MASTERS)
        .into_iter()
        .chain([delegator_role, reader])
        .chain(role_for_group("system:node", node_rules(), NODES))
        .chain(role_for_group(
            "system:basic-user",
            basic_user,
            "system:authenticated",
        ))
        .chain(role_for_group(
            "system:service-account-issuer-discovery",
            issuer_discovery,
            "system:serviceaccounts",
        ));
    for (plural, object) in objects {
        let def = engine
            .registry
            .get(group, "v1", plural)
            .ok_or(ApiError::NoRoute)?;
        let namespace = object["metadata"]["namespace"].as_str().map(str::to_owned);
        match engine
            .create(&def, namespace.as_deref(), object.clone(), false)
            .await
        {
            Ok(_) => {}
            Err(ApiError::AlreadyExists { .. }) => reconcile_bootstrap(engine, def, object).await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Brings a bootstrap role or binding that exists back to what this version defines (its
/// rules, role reference and subjects), unless it is annotated
/// `rbac.authorization.kubernetes.io/autoupdate: "false"` — as kube-apiserver reconciles
/// its bootstrap policy at start.
async fn reconcile_bootstrap(
    engine: &Engine,
    def: Arc<crate::registry::ResourceDef>,
    wanted: serde_json::Value,
) -> Result<(), ApiError> {
    let name = wanted["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let target = Target {
        def,
        namespace: wanted["metadata"]["namespace"].as_str().map(str::to_owned),
        name: Some(name),
        subresource: None,
    };
    let mut current = engine.get(&target).await?;
    if current["metadata"]["annotations"]["rbac.authorization.kubernetes.io/autoupdate"] == "false"
    {
        return Ok(());
    }
    let mut changed = false;
    for field in ["rules", "roleRef", "subjects"] {
        if !wanted[field].is_null() && current[field] != wanted[field] {
            current[field] = wanted[field].clone();
            changed = true;
        }
    }
    if changed {
        match engine.update(&target, current, false).await {
            // Another server reconciled it meanwhile.
            Ok(_) | Err(ApiError::Conflict { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a binding's subjects include `user` (by name, group or ServiceAccount).
fn binds(subjects: &Option<Vec<k8s_openapi::api::rbac::v1::Subject>>, user: &User) -> bool {
    subjects.iter().flatten().any(|s| match s.kind.as_str() {
        "User" => s.name == user.name,
        "Group" => user.groups.contains(&s.name),
        "ServiceAccount" => s
            .namespace
            .as_deref()
            .is_some_and(|ns| user.name == format!("system:serviceaccount:{ns}:{}", s.name)),
        _ => false,
    })
}

/// Whether `rule` covers the request, with RBAC's wildcards.
fn covers(rule: &PolicyRule, attributes: &Attributes<'_>) -> bool {
    let has = |items: &Option<Vec<String>>, wanted: &str| {
        items.iter().flatten().any(|i| i == "*" || i == wanted)
    };
    let verb_ok = |verb: &str| rule.verbs.iter().any(|v| v == "*" || v == verb);
    match attributes {
        Attributes::Resource(info) => {
            let resource = info.resource_path();
            let resource_ok = rule.resources.iter().flatten().any(|r| {
                r == "*"
                    || *r == resource
                    || (!info.subresource.is_empty() && *r == format!("*/{}", info.subresource))
            });
            let name_ok = match (&rule.resource_names, &info.name) {
                (None, _) => true,
                (Some(names), _) if names.is_empty() => true,
                (Some(names), Some(name)) => names.contains(name),
                (Some(_), None) => false,
            };
            verb_ok(&info.verb) && has(&rule.api_groups, &info.group) && resource_ok && name_ok
        }
        Attributes::NonResource { path, verb } => {
            verb_ok(verb)
                && rule.non_resource_urls.iter().flatten().any(|u| {
                    u == path
                        || u.strip_suffix('*')
                            .is_some_and(|prefix| path.starts_with(prefix))
                })
        }
    }
}

/// kube-apiserver's refusal message: `pods is forbidden: User "u" cannot list resource
/// "pods" in API group "" in the namespace "default"`.
pub(crate) fn forbidden(user: &User, attributes: &Attributes<'_>) -> ApiError {
    match attributes {
        Attributes::Resource(info) => {
            let resource = info.resource_path();
            let qualified = if info.group.is_empty() {
                info.resource.clone()
            } else {
                format!("{}.{}", info.resource, info.group)
            };
            let object = match &info.name {
                Some(name) => format!("{qualified} \"{name}\""),
                None => qualified,
            };
            let scope = match &info.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".into(),
            };
            ApiError::Forbidden {
                message: format!(
                    "{object} is forbidden: User \"{}\" cannot {} resource \"{resource}\" in API group \"{}\" {scope}",
                    user.name, info.verb, info.group
                ),
                resource: info.resource.clone(),
                name: info.name.clone().unwrap_or_default(),
                group: info.group.clone(),
                causes: Vec::new(),
            }
        }
        Attributes::NonResource { path, verb } => ApiError::Forbidden {
            message: format!(
                "forbidden: User \"{}\" cannot {verb} path \"{path}\"",
                user.name
            ),
            resource: String::new(),
            name: String::new(),
            group: String::new(),
            causes: Vec::new(),
        },
    }
}

/// Middleware, inside [`crate::identity::authenticate`]: refuses what the caller's roles do
/// not allow. Requests without a [`User`] (the public health checks) pass.
pub async fn authorize(
    State(authorizer): State<Arc<Authorizer>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(user) = request.extensions().get::<User>().cloned() else {
        return next.run(request).await;
    };
    let info = RequestInfo::parse(
        request.method(),
        request.uri().path(),
        request.uri().query().unwrap_or(""),
    );
    let attributes = match &info {
        Some(info) => Attributes::Resource(info.into()),
        None => Attributes::NonResource {
            path: request.uri().path(),
            verb: request.method().as_str().to_ascii_lowercase(),
        },
    };
    match authorizer.allows(&user, &attributes).await {
        Ok(true) => next.run(request).await,
        Ok(false) => {
            tracing::debug!(user = %user.name, ?attributes, "forbidden");
            forbidden(&user, &attributes).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Method;

    fn rule(groups: &[&str], resources: &[&str], verbs: &[&str]) -> PolicyRule {
        let v = |s: &[&str]| s.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        PolicyRule {
            api_groups: Some(v(groups)),
            resources: Some(v(resources)),
            verbs: v(verbs),
            ..PolicyRule::default()
        }
    }

    fn covers_request(rule: &PolicyRule, method: Method, path: &str, query: &str) -> bool {
        let info = RequestInfo::parse(&method, path, query).unwrap();
        covers(rule, &Attributes::Resource((&info).into()))
    }

    #[test]
    fn rules_match_verbs_groups_resources_and_subresources() {
        let pods = rule(&[""], &["pods"], &["get", "list", "watch"]);
        let status = rule(&["apps"], &["deployments/status"], &["patch"]);
        let all = rule(&["*"], &["*"], &["*"]);
        let mut named = rule(&[""], &["configmaps"], &["get"]);
        named.resource_names = Some(vec!["one".into()]);
        let cases = [
            (
                &pods,
                Method::GET,
                "/api/v1/namespaces/d/pods",
                "watch=1",
                true,
            ),
            (&pods, Method::GET, "/api/v1/pods", "", true),
            (&pods, Method::POST, "/api/v1/namespaces/d/pods", "", false),
            (
                &pods,
                Method::GET,
                "/api/v1/namespaces/d/pods/p/log",
                "",
                false,
            ),
            (&pods, Method::GET, "/apis/apps/v1/deployments", "", false),
            (
                &status,
                Method::PATCH,
                "/apis/apps/v1/namespaces/d/deployments/x/status",
                "",
                true,
            ),
            (
                &status,
                Method::PATCH,
                "/apis/apps/v1/namespaces/d/deployments/x",
                "",
                false,
            ),
            (&all, Method::DELETE, "/apis/x.io/v1/things", "", true),
            (
                &named,
                Method::GET,
                "/api/v1/namespaces/d/configmaps/one",
                "",
                true,
            ),
            (
                &named,
                Method::GET,
                "/api/v1/namespaces/d/configmaps/two",
                "",
                false,
            ),
        ];
        for (rule, method, path, query, allowed) in cases {
            assert_eq!(
                covers_request(rule, method.clone(), path, query),
                allowed,
                "{method} {path}?{query}"
            );
        }
    }

    #[test]
    fn subjects_match_users_groups_and_service_accounts() {
        use k8s_openapi::api::rbac::v1::Subject;
        let user = User::service_account("ops", "bot");
        let subject = |kind: &str, name: &str, namespace: Option<&str>| {
            Some(vec![Subject {
                kind: kind.into(),
                name: name.into(),
                namespace: namespace.map(str::to_owned),
                ..Subject::default()
            }])
        };
        assert!(binds(&subject("ServiceAccount", "bot", Some("ops")), &user));
        assert!(!binds(
            &subject("ServiceAccount", "bot", Some("dev")),
            &user
        ));
        assert!(binds(
            &subject("Group", "system:serviceaccounts:ops", None),
            &user
        ));
        assert!(binds(
            &subject("User", "system:serviceaccount:ops:bot", None),
            &user
        ));
        assert!(!binds(&subject("Group", MASTERS, None), &user));
    }

    #[test]
    fn refusals_say_who_cannot_do_what() {
        let info =
            RequestInfo::parse(&Method::GET, "/apis/apps/v1/namespaces/d/deployments", "").unwrap();
        let message = forbidden(
            &User::service_account("d", "x"),
            &Attributes::Resource((&info).into()),
        )
        .to_string();
        assert_eq!(
            message,
            "deployments.apps is forbidden: User \"system:serviceaccount:d:x\" cannot list resource \"deployments\" in API group \"apps\" in the namespace \"d\""
        );
    }
}
