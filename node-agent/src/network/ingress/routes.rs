//! The route table: which backend answers a request, built from the Ingresses this node
//! serves, the Services they name and those Services' EndpointSlices. Pure — no I/O — so
//! every rule of the Ingress spec is unit-tested here.
//!
//! Matching, as the Ingress spec (`networking.k8s.io/v1`) says:
//! - hosts are exact (`a.example.com`) or wildcards of one label (`*.example.com` matches
//!   `x.example.com`, not `example.com` nor `x.y.example.com`); a rule without a host
//!   matches every host;
//! - paths are `Exact` (the whole path, case-sensitive), `Prefix` (element by element:
//!   `/foo` matches `/foo` and `/foo/bar`, not `/foobar`; a trailing `/` is ignored) or
//!   `ImplementationSpecific` (taken as `Prefix`); the longest match wins, and at equal
//!   length `Exact` before `Prefix`;
//! - a request is tried against its exact host's rules, then the wildcard's, then the rules
//!   without a host, then `spec.defaultBackend` — falling through as Traefik (k3s' ingress)
//!   does, so a host-less `/` catches what a host's rules leave;
//! - when two Ingresses claim the same host, path and type (or both have a default backend)
//!   the older one wins (then namespace/name), as ingress-nginx decides.
//!
//! Only Ingresses of this controller's class are served ([`served`]). A backend resolves to
//! the ready endpoints of the Service port it names (by number or by name), which the
//! server dials directly (pod IP and target port, as ingress-nginx does); a backend that
//! resolves to none carries the reason instead, and the server answers 503 with it.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use kube::ResourceExt;

/// The `spec.controller` of this controller's IngressClasses.
pub const CONTROLLER: &str = "orquestra.dev/ingress";
/// The IngressClass the cluster is given at start (k3s' `traefik` class plays this role).
pub const CLASS: &str = "orquestra";
/// The deprecated annotation naming an Ingress' class (before `spec.ingressClassName`).
pub const ANN_CLASS: &str = "kubernetes.io/ingress.class";
/// The annotation marking the default IngressClass.
pub const ANN_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// Whether `class` is the cluster's default IngressClass.
pub fn is_default(class: &IngressClass) -> bool {
    class
        .annotations()
        .get(ANN_DEFAULT_CLASS)
        .map(String::as_str)
        == Some("true")
}

/// The default IngressClass among `classes`: the newest of those marked default, as the
/// API server's DefaultIngressClass admission picks it.
pub fn default_class(classes: &[Arc<IngressClass>]) -> Option<&Arc<IngressClass>> {
    classes.iter().filter(|c| is_default(c)).max_by(|a, b| {
        let created = |c: &IngressClass| c.metadata.creation_timestamp.clone().map(|t| t.0);
        created(a)
            .cmp(&created(b))
            .then_with(|| b.name_any().cmp(&a.name_any()))
    })
}

/// Whether `ingress` is this controller's: its class (`spec.ingressClassName`, else the
/// deprecated annotation) is an IngressClass of [`CONTROLLER`] — or [`CLASS`] before that
/// class exists — or it names none and the default class is ours.
pub fn served(ingress: &Ingress, classes: &[Arc<IngressClass>]) -> bool {
    let ours = |class: &IngressClass| {
        class.spec.as_ref().and_then(|s| s.controller.as_deref()) == Some(CONTROLLER)
    };
    let named = ingress
        .spec
        .as_ref()
        .and_then(|s| s.ingress_class_name.clone())
        .or_else(|| ingress.annotations().get(ANN_CLASS).cloned())
        .filter(|n| !n.is_empty());
    match named {
        Some(name) => match classes.iter().find(|c| c.name_any() == name) {
            Some(class) => ours(class),
            None => name == CLASS,
        },
        None => default_class(classes).is_some_and(|c| ours(c)),
    }
}

/// `ingresses` in the order conflicts are decided: oldest first, then namespace/name.
pub fn by_age(ingresses: &[Arc<Ingress>]) -> Vec<&Arc<Ingress>> {
    let mut sorted: Vec<&Arc<Ingress>> = ingresses.iter().collect();
    sorted.sort_by_key(|i| {
        (
            i.metadata.creation_timestamp.clone().map(|t| t.0),
            i.namespace().unwrap_or_default(),
            i.name_any(),
        )
    });
    sorted
}

/// How a path matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PathKind {
    /// The whole path, exactly.
    Exact,
    /// Path elements from the start (`Prefix` and `ImplementationSpecific`).
    Prefix,
}

impl PathKind {
    fn of(path_type: &str) -> PathKind {
        match path_type {
            "Exact" => PathKind::Exact,
            _ => PathKind::Prefix,
        }
    }
}

/// Where a route's requests go, and what it is called in errors and metrics.
#[derive(Debug)]
pub struct Backend {
    /// The Ingress' namespace (also the Service's).
    pub namespace: String,
    /// The Ingress' name.
    pub ingress: String,
    /// The rule's host, `*` for none (the default backend's too).
    pub host: String,
    /// The path as written (empty for the default backend).
    pub path: String,
    /// The Service's name (empty for a resource backend).
    pub service: String,
    /// The Service port as named: a number or a port name.
    pub port: String,
    /// The ready endpoints (pod address and target port).
    pub endpoints: Vec<SocketAddr>,
    /// Why there is no endpoint, when there is none.
    pub problem: Option<String>,
    /// The round robin's position.
    next: AtomicUsize,
}

impl Backend {
    /// The next endpoint, round robin; `None` without endpoints.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        Some(self.endpoints[i % self.endpoints.len()])
    }
}

impl fmt::Display for Backend {
    /// The route, as the 503 body and the logs name it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ingress {}/{}, host {}, path {}, service {}:{}",
            self.namespace,
            self.ingress,
            self.host,
            if self.path.is_empty() {
                "(default backend)"
            } else {
                &self.path
            },
            self.service,
            self.port
        )
    }
}

/// One path of a host.
#[derive(Debug)]
struct Route {
    kind: PathKind,
    /// For `Prefix`, without its trailing `/` (so `/` is empty and matches everything).
    path: String,
    backend: Arc<Backend>,
}

impl Route {
    fn matches(&self, path: &str) -> bool {
        match self.kind {
            PathKind::Exact => path == self.path,
            PathKind::Prefix => {
                self.path.is_empty()
                    || path
                        .strip_prefix(self.path.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            }
        }
    }
}

/// The routes of one host, longest path first, `Exact` before `Prefix` at equal length.
#[derive(Debug, Default)]
struct Paths(Vec<Route>);

impl Paths {
    fn add(&mut self, route: Route) {
        if !self
            .0
            .iter()
            .any(|r| r.kind == route.kind && r.path == route.path)
        {
            self.0.push(route);
        }
    }

    fn sort(&mut self) {
        self.0
            .sort_by(|a, b| b.path.len().cmp(&a.path.len()).then(a.kind.cmp(&b.kind)));
    }

    fn find(&self, path: &str) -> Option<&Arc<Backend>> {
        self.0.iter().find(|r| r.matches(path)).map(|r| &r.backend)
    }
}

/// Every route this node serves; built anew on each change and swapped in whole.
#[derive(Debug, Default)]
pub struct RouteTable {
    exact: HashMap<String, Paths>,
    /// `*.example.com`'s routes under `example.com`.
    wildcard: HashMap<String, Paths>,
    any_host: Paths,
    default_backend: Option<Arc<Backend>>,
    backends: Vec<Arc<Backend>>,
}

/// The Services and their ready endpoints, indexed for backend resolution.
struct Catalog<'a> {
    services: HashMap<(&'a str, &'a str), &'a Service>,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> Catalog<'a> {
    fn new(services: &'a [Arc<Service>], slices: &'a [Arc<EndpointSlice>]) -> Catalog<'a> {
        let services = services
            .iter()
            .filter_map(|s| {
                Some((
                    (
                        s.metadata.namespace.as_deref()?,
                        s.metadata.name.as_deref()?,
                    ),
                    &**s,
                ))
            })
            .collect();
        let mut by_service: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
        for slice in slices {
            let labels = slice.metadata.labels.as_ref();
            if let (Some(namespace), Some(service)) = (
                slice.metadata.namespace.as_deref(),
                labels.and_then(|l| l.get(SERVICE_NAME)),
            ) {
                by_service
                    .entry((namespace, service.as_str()))
                    .or_default()
                    .push(slice);
            }
        }
        Catalog {
            services,
            slices: by_service,
        }
    }

    /// The ready endpoints of `backend` in `namespace`, or why there are none; with the
    /// Service's name and port as written.
    fn resolve(
        &self,
        namespace: &str,
        backend: &IngressBackend,
    ) -> (String, String, Result<Vec<SocketAddr>, String>) {
        let Some(service) = &backend.service else {
            let kind = backend
                .resource
                .as_ref()
                .map(|r| format!("{} {}", r.kind, r.name))
                .unwrap_or_default();
            return (
                String::new(),
                String::new(),
                Err(format!("resource backends ({kind}) are not supported")),
            );
        };
        let wanted = service.port.as_ref();
        let port = wanted
            .and_then(|p| p.name.clone().filter(|n| !n.is_empty()))
            .or_else(|| wanted.and_then(|p| p.number).map(|n| n.to_string()))
            .unwrap_or_default();
        let named = (service.name.clone(), port);
        let Some(svc) = self.services.get(&(namespace, service.name.as_str())) else {
            return (
                named.0,
                named.1,
                Err(format!("service {namespace}/{} not found", service.name)),
            );
        };
        let spec = svc.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return (
                named.0,
                named.1,
                Err(format!(
                    "service {namespace}/{} is an ExternalName service, which is not supported",
                    service.name
                )),
            );
        }
        let Some(port) = spec
            .into_iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|p| {
                p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                    && match (
                        wanted.and_then(|w| w.name.as_deref().filter(|n| !n.is_empty())),
                        wanted.and_then(|w| w.number),
                    ) {
                        (Some(name), _) => p.name.as_deref() == Some(name),
                        (None, Some(number)) => p.port == number,
                        (None, None) => false,
                    }
            })
        else {
            return (
                named.0.clone(),
                named.1.clone(),
                Err(format!(
                    "service {namespace}/{} has no TCP port {}",
                    named.0, named.1
                )),
            );
        };
        let port_name = port.name.clone().unwrap_or_default();
        let mut endpoints = BTreeSet::new();
        for slice in self
            .slices
            .get(&(namespace, service.name.as_str()))
            .into_iter()
            .flatten()
        {
            let Some(target) = slice.ports.iter().flatten().find(|p| {
                p.name.clone().unwrap_or_default() == port_name
                    && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
            }) else {
                continue;
            };
            let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for endpoint in slice.endpoints.iter().flatten() {
                if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for address in &endpoint.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        endpoints.insert(SocketAddr::new(ip, target_port));
                    }
                }
            }
        }
        let result = if endpoints.is_empty() {
            Err(format!(
                "service {namespace}/{} has no ready endpoint",
                named.0
            ))
        } else {
            Ok(endpoints.into_iter().collect())
        };
        (named.0, named.1, result)
    }
}

impl RouteTable {
    /// The routes of the `ingresses` of this controller's class (see [`served`]), their
    /// backends resolved against `services` and `slices`.
    pub fn build(
        ingresses: &[Arc<Ingress>],
        classes: &[Arc<IngressClass>],
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
    ) -> RouteTable {
        let catalog = Catalog::new(services, slices);
        let mut table = RouteTable::default();
        for ingress in by_age(ingresses) {
            if !served(ingress, classes) || ingress.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let Some(spec) = &ingress.spec else { continue };
            let namespace = ingress.namespace().unwrap_or_default();
            let name = ingress.name_any();
            let mut backend = |host: &str, path: &str, backend: &IngressBackend| {
                let (service, port, endpoints) = catalog.resolve(&namespace, backend);
                let (endpoints, problem) = match endpoints {
                    Ok(endpoints) => (endpoints, None),
                    Err(problem) => (Vec::new(), Some(problem)),
                };
                let backend = Arc::new(Backend {
                    namespace: namespace.clone(),
                    ingress: name.clone(),
                    host: host.to_owned(),
                    path: path.to_owned(),
                    service,
                    port,
                    endpoints,
                    problem,
                    next: AtomicUsize::new(0),
                });
                table.backends.push(Arc::clone(&backend));
                backend
            };
            if let Some(default) = &spec.default_backend
                && table.default_backend.is_none()
            {
                table.default_backend = Some(backend("*", "", default));
            }
            for rule in spec.rules.iter().flatten() {
                let host = rule
                    .host
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .map(str::to_ascii_lowercase);
                for path in rule.http.iter().flat_map(|h| &h.paths) {
                    let written = path.path.clone().unwrap_or_else(|| "/".into());
                    let kind = PathKind::of(&path.path_type);
                    let route = Route {
                        kind,
                        path: match kind {
                            PathKind::Exact => written.clone(),
                            PathKind::Prefix => written.trim_end_matches('/').to_owned(),
                        },
                        backend: backend(host.as_deref().unwrap_or("*"), &written, &path.backend),
                    };
                    let paths = match host.as_deref() {
                        None => &mut table.any_host,
                        Some(h) => match h.strip_prefix("*.") {
                            Some(domain) => table.wildcard.entry(domain.to_owned()).or_default(),
                            None => table.exact.entry(h.to_owned()).or_default(),
                        },
                    };
                    paths.add(route);
                }
            }
        }
        table.exact.values_mut().for_each(Paths::sort);
        table.wildcard.values_mut().for_each(Paths::sort);
        table.any_host.sort();
        table
    }

    /// The backend for a request to `host` (any case, a `:port` ignored) and `path` (no
    /// query); `None` when nothing matches (a 404).
    pub fn route(&self, host: &str, path: &str) -> Option<&Arc<Backend>> {
        let host = strip_port(host).to_ascii_lowercase();
        let host = host.trim_end_matches('.');
        self.exact
            .get(host)
            .and_then(|p| p.find(path))
            .or_else(|| {
                let (_, domain) = host.split_once('.')?;
                self.wildcard.get(domain)?.find(path)
            })
            .or_else(|| self.any_host.find(path))
            .or(self.default_backend.as_ref())
    }

    /// Every backend of the table (a route's, or a default backend).
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }
}

/// `host` without its `:port` (IPv6 literals keep their brackets' content).
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        // One colon: a name or IPv4 address and a port (a bare IPv6 address has several).
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => host,
    }
}

/// Looks `host` up in a table keyed by exact hosts and by wildcards' domains (`*.a.b` under
/// `a.b`), as route hosts and TLS hosts are; the exact key wins.
pub fn lookup_host<'a, T>(
    exact: &'a HashMap<String, T>,
    wildcard: &'a HashMap<String, T>,
    host: &str,
) -> Option<&'a T> {
    exact
        .get(host)
        .or_else(|| wildcard.get(host.split_once('.')?.1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(name: &str, created: &str, spec: serde_json::Value) -> Arc<Ingress> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default",
                             "creationTimestamp": created},
                "spec": spec,
            }))
            .unwrap(),
        )
    }

    fn class(name: &str, controller: &str, default: bool) -> Arc<IngressClass> {
        let annotations = if default {
            json!({ANN_DEFAULT_CLASS: "true"})
        } else {
            json!({})
        };
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": annotations,
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"controller": controller},
            }))
            .unwrap(),
        )
    }

    fn service(name: &str, ports: serde_json::Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default"},
                "spec": {"ports": ports},
            }))
            .unwrap(),
        )
    }

    fn slice(
        service: &str,
        port_name: &str,
        port: u16,
        ips: &[(&str, bool)],
    ) -> Arc<EndpointSlice> {
        let endpoints: Vec<_> = ips
            .iter()
            .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
            .collect();
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-x"), "namespace": "default",
                             "labels": {SERVICE_NAME: service}},
                "addressType": "IPv4",
                "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
                "endpoints": endpoints,
            }))
            .unwrap(),
        )
    }

    fn path(path: &str, kind: &str, service: &str) -> serde_json::Value {
        json!({"path": path, "pathType": kind,
               "backend": {"service": {"name": service, "port": {"number": 80}}}})
    }

    /// The classes, Services and slices a table is built from.
    type World = (
        Vec<Arc<IngressClass>>,
        Vec<Arc<Service>>,
        Vec<Arc<EndpointSlice>>,
    );

    /// Services `a` … `f` on port 80 (named `http`), each with one ready endpoint whose
    /// last octet tells them apart.
    fn world() -> World {
        let names = ["a", "b", "c", "d", "e", "f"];
        let services = names
            .iter()
            .map(|n| service(n, json!([{"name": "http", "port": 80, "targetPort": 8080}])))
            .collect();
        let slices = names
            .iter()
            .enumerate()
            .map(|(i, n)| slice(n, "http", 8080, &[(&format!("10.0.0.{}", i + 1), true)]))
            .collect();
        (vec![class(CLASS, CONTROLLER, true)], services, slices)
    }

    fn service_of(table: &RouteTable, host: &str, path: &str) -> Option<String> {
        table.route(host, path).map(|b| b.service.clone())
    }

    #[test]
    fn paths_match_element_wise_longest_first_exact_before_prefix() {
        let (classes, services, slices) = world();
        let table = RouteTable::build(
            &[ingress(
                "web",
                "2026-01-01T00:00:00Z",
                json!({"rules": [{"host": "x.example.com", "http": {"paths": [
                    path("/", "Prefix", "a"),
                    path("/foo", "Prefix", "b"),
                    path("/foo/bar/", "ImplementationSpecific", "c"),
                    path("/foo/bar", "Exact", "d"),
                ]}}]}),
            )],
            &classes,
            &services,
            &slices,
        );
        let at = |p: &str| service_of(&table, "x.example.com", p);
        assert_eq!(at("/").as_deref(), Some("a"));
        assert_eq!(at("/foo").as_deref(), Some("b"));
        assert_eq!(at("/foo/").as_deref(), Some("b"));
        assert_eq!(at("/foo/baz").as_deref(), Some("b"));
        assert_eq!(
            at("/foobar").as_deref(),
            Some("a"),
            "not element-wise a prefix"
        );
        assert_eq!(at("/foo/bar").as_deref(), Some("d"), "Exact before Prefix");
        assert_eq!(at("/foo/bar/").as_deref(), Some("c"));
        assert_eq!(at("/foo/bar/x").as_deref(), Some("c"), "longest match");
        assert_eq!(at("/FOO").as_deref(), Some("a"), "paths are case-sensitive");
    }

    #[test]
    fn hosts_exact_then_wildcard_of_one_label_then_any_then_default() {
        let (classes, services, slices) = world();
        let table = RouteTable::build(
            &[ingress(
                "web",
                "2026-01-01T00:00:00Z",
                json!({
                    "defaultBackend": {"service": {"name": "f", "port": {"name": "http"}}},
                    "rules": [
                        {"host": "a.example.com", "http": {"paths": [path("/api", "Prefix", "a")]}},
                        {"host": "*.example.com", "http": {"paths": [path("/", "Prefix", "b")]}},
                        {"http": {"paths": [path("/shared", "Exact", "c")]}},
                    ],
                }),
            )],
            &classes,
            &services,
            &slices,
        );
        assert_eq!(
            service_of(&table, "A.Example.com:80", "/api/v1").as_deref(),
            Some("a")
        );
        assert_eq!(
            service_of(&table, "a.example.com", "/other").as_deref(),
            Some("b"),
            "a host's rules fall through to the wildcard"
        );
        assert_eq!(
            service_of(&table, "z.example.com", "/").as_deref(),
            Some("b")
        );
        assert_eq!(
            service_of(&table, "y.z.example.com", "/shared").as_deref(),
            Some("c"),
            "a wildcard covers one label only"
        );
        assert_eq!(
            service_of(&table, "example.com", "/shared").as_deref(),
            Some("c")
        );
        assert_eq!(service_of(&table, "other.org", "/x").as_deref(), Some("f"));
        let default = table.route("other.org", "/x").unwrap();
        assert_eq!(default.port, "http");
        assert_eq!(default.pick(), Some("10.0.0.6:8080".parse().unwrap()));
    }

    #[test]
    fn nothing_matches_without_a_default_backend() {
        let (classes, services, slices) = world();
        let table = RouteTable::build(
            &[ingress(
                "web",
                "2026-01-01T00:00:00Z",
                json!({"rules": [{"host": "a.example.com",
                                  "http": {"paths": [path("/api", "Prefix", "a")]}}]}),
            )],
            &classes,
            &services,
            &slices,
        );
        assert!(table.route("a.example.com", "/").is_none());
        assert!(table.route("b.example.com", "/api").is_none());
    }

    #[test]
    fn the_older_ingress_wins_a_conflict() {
        let (classes, services, slices) = world();
        let rule = |svc| {
            json!({"rules": [{"host": "h", "http": {"paths": [path("/", "Prefix", svc)]}}],
                                "defaultBackend": {"service": {"name": svc, "port": {"number": 80}}}})
        };
        let table = RouteTable::build(
            &[
                ingress("young", "2026-02-01T00:00:00Z", rule("b")),
                ingress("old", "2026-01-01T00:00:00Z", rule("a")),
            ],
            &classes,
            &services,
            &slices,
        );
        assert_eq!(service_of(&table, "h", "/").as_deref(), Some("a"));
        assert_eq!(service_of(&table, "elsewhere", "/").as_deref(), Some("a"));
        assert_eq!(table.route("h", "/").unwrap().ingress, "old");
    }

    #[test]
    fn backends_resolve_ports_by_number_or_name_to_ready_endpoints_round_robin() {
        let (classes, _, _) = world();
        let services = vec![service(
            "web",
            json!([{"name": "metrics", "port": 9090, "targetPort": 9090},
                   {"name": "http", "port": 80, "targetPort": "web"}]),
        )];
        let slices = vec![
            slice(
                "web",
                "http",
                8080,
                &[("10.0.0.1", true), ("10.0.0.2", false)],
            ),
            slice("web", "http", 8080, &[("10.0.0.3", true)]),
        ];
        let by = |port: serde_json::Value| {
            RouteTable::build(
                &[ingress(
                    "web",
                    "2026-01-01T00:00:00Z",
                    json!({"defaultBackend": {"service": {"name": "web", "port": port}}}),
                )],
                &classes,
                &services,
                &slices,
            )
        };
        for table in [by(json!({"number": 80})), by(json!({"name": "http"}))] {
            let backend = table.route("any", "/").unwrap();
            assert_eq!(backend.problem, None);
            let picks: Vec<String> = (0..4)
                .map(|_| backend.pick().unwrap().to_string())
                .collect();
            assert_eq!(
                picks,
                [
                    "10.0.0.1:8080",
                    "10.0.0.3:8080",
                    "10.0.0.1:8080",
                    "10.0.0.3:8080"
                ],
                "ready endpoints only, in turn"
            );
        }
    }

    #[test]
    fn unresolvable_backends_say_why() {
        let (classes, _, _) = world();
        let services = vec![
            service("web", json!([{"name": "http", "port": 80}])),
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "ext", "namespace": "default"},
                    "spec": {"type": "ExternalName", "externalName": "example.org"},
                }))
                .unwrap(),
            ),
        ];
        let problem = |backend: serde_json::Value| {
            let table = RouteTable::build(
                &[ingress(
                    "web",
                    "2026-01-01T00:00:00Z",
                    json!({"defaultBackend": backend}),
                )],
                &classes,
                &services,
                &[],
            );
            let backend = table.route("x", "/").unwrap();
            assert!(backend.pick().is_none());
            backend.problem.clone().unwrap()
        };
        assert_eq!(
            problem(json!({"service": {"name": "gone", "port": {"number": 80}}})),
            "service default/gone not found"
        );
        assert_eq!(
            problem(json!({"service": {"name": "web", "port": {"number": 81}}})),
            "service default/web has no TCP port 81"
        );
        assert_eq!(
            problem(json!({"service": {"name": "web", "port": {"number": 80}}})),
            "service default/web has no ready endpoint"
        );
        assert!(
            problem(json!({"service": {"name": "ext", "port": {"number": 80}}}))
                .contains("ExternalName")
        );
        assert!(
            problem(json!({"resource": {"apiGroup": "x", "kind": "Bucket", "name": "b"}}))
                .contains("Bucket b")
        );
    }

    #[test]
    fn the_route_is_named_for_the_503() {
        let (classes, services, _) = world();
        let table = RouteTable::build(
            &[ingress(
                "shop",
                "2026-01-01T00:00:00Z",
                json!({"rules": [{"host": "shop.example.com",
                                  "http": {"paths": [path("/cart", "Prefix", "missing")]}}]}),
            )],
            &classes,
            &services,
            &[],
        );
        let backend = table.route("shop.example.com", "/cart/1").unwrap();
        assert_eq!(
            backend.to_string(),
            "ingress default/shop, host shop.example.com, path /cart, service missing:80"
        );
        assert_eq!(table.backends().len(), 1);
    }

    #[test]
    fn only_this_controllers_class_is_served() {
        let ours = class(CLASS, CONTROLLER, true);
        let theirs = class("nginx", "k8s.io/ingress-nginx", false);
        let mine_too = class("internal", CONTROLLER, false);
        let with = |spec: serde_json::Value, annotations: serde_json::Value| -> Ingress {
            serde_json::from_value(json!({
                "metadata": {"name": "i", "namespace": "default", "annotations": annotations},
                "spec": spec,
            }))
            .unwrap()
        };
        let classes = vec![Arc::clone(&ours), theirs.clone(), mine_too];
        assert!(served(
            &with(json!({"ingressClassName": "orquestra"}), json!({})),
            &classes
        ));
        assert!(served(
            &with(json!({"ingressClassName": "internal"}), json!({})),
            &classes
        ));
        assert!(!served(
            &with(json!({"ingressClassName": "nginx"}), json!({})),
            &classes
        ));
        assert!(!served(
            &with(json!({"ingressClassName": "unknown"}), json!({})),
            &classes
        ));
        assert!(served(
            &with(json!({}), json!({ANN_CLASS: "orquestra"})),
            &classes
        ));
        assert!(!served(
            &with(json!({}), json!({ANN_CLASS: "nginx"})),
            &classes
        ));
        assert!(
            served(&with(json!({}), json!({})), &classes),
            "ours is the default"
        );
        assert!(
            served(
                &with(json!({"ingressClassName": "orquestra"}), json!({})),
                &[]
            ),
            "before the class exists"
        );
        let no_default = vec![class(CLASS, CONTROLLER, false), theirs.clone()];
        assert!(!served(&with(json!({}), json!({})), &no_default));
        let other_default = vec![class(CLASS, CONTROLLER, false), class("nginx", "x", true)];
        assert!(!served(&with(json!({}), json!({})), &other_default));
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("a.example.com:8443"), "a.example.com");
        assert_eq!(strip_port("a.example.com"), "a.example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }
}
