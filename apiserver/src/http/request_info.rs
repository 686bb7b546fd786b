//! What a request asks for, read off its method, path and query the way kube-apiserver's
//! `RequestInfo` does: the verb, the group, version, resource and subresource, the namespace
//! and the name. The request metrics label by it and RBAC authorizes by it.

use axum::http::Method;

/// One API request (anything under `/api/v1` or `/apis/G/V`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestInfo {
    /// The metrics' verb: GET, LIST, WATCH, POST, PUT, PATCH, DELETE, DELETECOLLECTION.
    pub verb: &'static str,
    /// `All` for a dry run, else empty.
    pub dry_run: &'static str,
    /// API group (`""` for core).
    pub group: String,
    /// API version.
    pub version: String,
    /// The resource's plural.
    pub resource: String,
    /// `status`, `scale`, `log`, … or empty.
    pub subresource: String,
    /// The namespace in the path (a Namespace's own name for `/api/v1/namespaces/NAME`).
    pub namespace: Option<String>,
    /// The object's name, unless the request is for a collection.
    pub name: Option<String>,
    /// `resource` (one object), `namespace` (a namespace's collection) or `cluster`.
    pub scope: &'static str,
}

/// The name a `fieldSelector` requires exactly (`metadata.name=NAME`, alone or among others).
fn selected_name(query: &str) -> Option<String> {
    let (_, selector) = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(k, _)| k == "fieldSelector")?;
    selector.split(',').find_map(|term| {
        let value = term.trim().strip_prefix("metadata.name")?;
        let value = value
            .strip_prefix("==")
            .or_else(|| value.strip_prefix('='))?;
        (!value.is_empty()).then(|| value.trim().to_owned())
    })
}

impl RequestInfo {
    /// Parses a request; `None` for anything outside `/api/v1` and `/apis/G/V`.
    pub fn parse(method: &Method, path: &str, query: &str) -> Option<RequestInfo> {
        let (group, version, rest) = if let Some(rest) = path.strip_prefix("/api/v1/") {
            ("", "v1", rest)
        } else {
            let rest = path.strip_prefix("/apis/")?;
            let mut parts = rest.splitn(3, '/');
            (parts.next()?, parts.next()?, parts.next()?)
        };
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let (namespace, segments) = match segments.as_slice() {
            ["namespaces", ns, resource, tail @ ..]
                if !matches!(*resource, "status" | "finalize") =>
            {
                (Some(*ns), [&[*resource][..], tail].concat())
            }
            ["namespaces", ns, ..] => (Some(*ns), segments.clone()),
            other => (None, other.to_vec()),
        };
        let (resource, name, subresource) = match segments.as_slice() {
            [] => return None,
            [plural] => (*plural, None, ""),
            [plural, name] => (*plural, Some(*name), ""),
            [plural, name, sub, ..] => (*plural, Some(*name), *sub),
        };
        let flag = |key: &str| {
            query.split('&').any(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, v)| k == key && (v == "true" || v == "1" || v == "All"))
            })
        };
        let named = name.is_some();
        let verb = match (method, named) {
            (&Method::GET, false) if flag("watch") => "WATCH",
            (&Method::GET | &Method::HEAD, false) => "LIST",
            (&Method::GET | &Method::HEAD, true) => "GET",
            // Only proxies serve OPTIONS; RBAC rules name the verb as it is.
            (&Method::OPTIONS, _) => "OPTIONS",
            (&Method::POST, _) => "POST",
            (&Method::PUT, _) => "PUT",
            (&Method::PATCH, _) => "PATCH",
            (&Method::DELETE, false) => "DELETECOLLECTION",
            (&Method::DELETE, true) => "DELETE",
            _ => "OTHER",
        };
        let scope = match (named, namespace.is_some() && resource != "namespaces") {
            (true, _) => "resource",
            (false, true) => "namespace",
            (false, false) => "cluster",
        };
        // A list or watch selecting one name by field is about that name, as kube-apiserver
        // reads it: RBAC rules with `resourceNames` allow it (an informer on one ConfigMap).
        let name = match (name, verb) {
            (None, "LIST" | "WATCH") => selected_name(query),
            (name, _) => name.map(str::to_owned),
        };
        Some(RequestInfo {
            verb,
            dry_run: if flag("dryRun") { "All" } else { "" },
            group: group.to_owned(),
            version: version.to_owned(),
            resource: resource.to_owned(),
            subresource: subresource.to_owned(),
            namespace: namespace.map(str::to_owned),
            name,
            scope,
        })
    }

    /// `resource`, or `resource/subresource`: how RBAC rules name what is asked for.
    pub fn resource_path(&self) -> String {
        if self.subresource.is_empty() {
            self.resource.clone()
        } else {
            format!("{}/{}", self.resource, self.subresource)
        }
    }

    /// The verb RBAC rules name: get, list, watch, create, update, patch, delete,
    /// deletecollection.
    pub fn authorization_verb(&self) -> &'static str {
        match self.verb {
            "GET" => "get",
            "LIST" => "list",
            "WATCH" => "watch",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" => "delete",
            "DELETECOLLECTION" => "deletecollection",
            "OPTIONS" => "options",
            _ => "",
        }
    }

    /// The metrics' labels, in [`crate::metrics`]' order.
    pub(crate) fn labels(&self) -> [&str; 8] {
        [
            self.verb,
            self.dry_run,
            &self.group,
            &self.version,
            &self.resource,
            &self.subresource,
            self.scope,
            "apiserver",
        ]
    }

    /// Watches, and the subresources upstream treats as long-running (logs, exec, attach,
    /// port-forward, proxy).
    pub fn long_running(&self) -> bool {
        self.verb == "WATCH"
            || matches!(
                self.subresource.as_str(),
                "log" | "exec" | "attach" | "portforward" | "proxy"
            )
    }

    /// Reads: GET, LIST, WATCH.
    pub fn read_only(&self) -> bool {
        matches!(self.verb, "GET" | "LIST" | "WATCH")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(m: Method, p: &str, q: &str) -> Option<(&'static str, String, String, &'static str)> {
        RequestInfo::parse(&m, p, q).map(|i| (i.verb, i.group.clone(), i.resource_path(), i.scope))
    }

    #[test]
    fn a_list_selecting_one_name_is_about_that_name() {
        let list = |query: &str| {
            RequestInfo::parse(
                &Method::GET,
                "/api/v1/namespaces/kube-system/configmaps",
                query,
            )
            .unwrap()
        };
        let info = list("fieldSelector=metadata.name%3Dextension-apiserver-authentication&watch=1");
        assert_eq!(info.verb, "WATCH");
        assert_eq!(
            info.name.as_deref(),
            Some("extension-apiserver-authentication")
        );
        assert_eq!(
            list("fieldSelector=a%3Db,metadata.name%3D%3Dx")
                .name
                .as_deref(),
            Some("x")
        );
        assert_eq!(list("fieldSelector=metadata.name!%3Dx").name, None);
        assert_eq!(list("").name, None);
    }

    #[test]
    fn verbs_resources_and_scopes() {
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/default/pods", ""),
            Some(("LIST", "".into(), "pods".into(), "namespace"))
        );
        assert_eq!(
            c(Method::GET, "/api/v1/pods", "watch=true"),
            Some(("WATCH", "".into(), "pods".into(), "cluster"))
        );
        assert_eq!(
            c(Method::GET, "/api/v1/namespaces/default", ""),
            Some(("GET", "".into(), "namespaces".into(), "resource"))
        );
        assert_eq!(
            c(Method::PUT, "/api/v1/namespaces/x/status", ""),
            Some(("PUT", "".into(), "namespaces/status".into(), "resource"))
        );
        assert_eq!(
            c(
                Method::PATCH,
                "/apis/apps/v1/namespaces/d/deployments/web/scale",
                ""
            ),
            Some((
                "PATCH",
                "apps".into(),
                "deployments/scale".into(),
                "resource"
            ))
        );
        assert_eq!(c(Method::GET, "/healthz", ""), None);
    }

    #[test]
    fn namespaces_and_names() {
        let info = RequestInfo::parse(
            &Method::POST,
            "/api/v1/namespaces/ns/serviceaccounts/sa/token",
            "",
        )
        .unwrap();
        assert_eq!(
            (info.namespace.as_deref(), info.name.as_deref()),
            (Some("ns"), Some("sa"))
        );
        assert_eq!(info.authorization_verb(), "create");
        assert_eq!(info.subresource, "token");
        // A Namespace's own requests carry it as their namespace, as upstream's do.
        let info = RequestInfo::parse(&Method::GET, "/api/v1/namespaces/ns", "").unwrap();
        assert_eq!(info.namespace.as_deref(), Some("ns"));
        let info = RequestInfo::parse(&Method::DELETE, "/api/v1/namespaces/ns/pods", "").unwrap();
        assert_eq!(info.authorization_verb(), "deletecollection");
        assert_eq!(info.name, None);
    }

    #[test]
    fn long_running_and_dry_run() {
        let watch = RequestInfo::parse(&Method::GET, "/api/v1/pods", "watch=1").unwrap();
        assert!(watch.long_running() && watch.read_only());
        let logs = RequestInfo::parse(&Method::GET, "/api/v1/namespaces/d/pods/p/log", "").unwrap();
        assert!(logs.long_running());
        let create = RequestInfo::parse(
            &Method::POST,
            "/apis/apps/v1/namespaces/d/deployments",
            "dryRun=All",
        )
        .unwrap();
        assert!(!create.long_running() && !create.read_only());
        assert_eq!(create.dry_run, "All");
    }
}
