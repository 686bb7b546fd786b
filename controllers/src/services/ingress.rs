//! The built-in ingress controller's control side (`ingress`); the node agents serve the
//! traffic (`orquestra-node-agent`'s `network::ingress`).
//!
//! - At start it creates the IngressClass [`CLASS`] (controller [`CONTROLLER`], the
//!   cluster's default) unless one of that name exists — as k3s applies Traefik's manifest;
//!   a user's deletion or change holds until the next start.
//! - For every Ingress of this controller's class it keeps `status.loadBalancer.ingress`
//!   at the InternalIPs of the Ready nodes whose agent serves Ingresses (annotated
//!   [`ANN_NODE_SERVES`]), as ingress-nginx publishes its Service's addresses.
//! - It records a Warning event on an Ingress whose backend Service (or Service port) does
//!   not exist (`BackendNotFound`) or whose TLS Secret does not (`TLSSecretNotFound`): once
//!   each time the set of such problems changes, not on every reconcile nor per request.
//!   The agents answer such a route's requests with 503 naming it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{self, EventType};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["networking.k8s.io"],
        resources: &["ingresses"],
        verbs: READ,
    },
    Rule {
        api_groups: &["networking.k8s.io"],
        resources: &["ingresses/status"],
        verbs: &["patch"],
    },
    Rule {
        api_groups: &["networking.k8s.io"],
        resources: &["ingressclasses"],
        verbs: &["get", "list", "watch", "create"],
    },
    Rule {
        api_groups: &[""],
        resources: &["services", "nodes"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["secrets"],
        verbs: &["get"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The `spec.controller` of this controller's IngressClasses (the node agent's too).
pub const CONTROLLER: &str = "orquestra.dev/ingress";
/// The IngressClass created at start, the cluster's default.
pub const CLASS: &str = "orquestra";
/// The deprecated annotation naming an Ingress' class.
pub const ANN_CLASS: &str = "kubernetes.io/ingress.class";
/// The annotation marking the default IngressClass.
pub const ANN_DEFAULT_CLASS: &str = "ingressclass.kubernetes.io/is-default-class";
/// On a Node: its agent serves Ingresses (set by the agent).
pub const ANN_NODE_SERVES: &str = "orquestra.dev/ingress";
/// The field manager of the loop's writes.
pub const MANAGER: &str = "ingress-controller";
/// How often an Ingress with a problem is looked at again (a TLS Secret is not watched).
const RECHECK: Duration = Duration::from_secs(30);

/// The IngressClass created at start.
pub fn ingress_class() -> IngressClass {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": CLASS, "annotations": {ANN_DEFAULT_CLASS: "true"}},
        "spec": {"controller": CONTROLLER},
    }))
    .unwrap_or_default()
}

/// What can go wrong reconciling an Ingress (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    /// The status could not be written.
    #[error("updating the status of ingress {ingress}: {source}")]
    Status {
        /// `namespace/name`.
        ingress: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    classes: Store<IngressClass>,
    services: Store<Service>,
    nodes: Store<Node>,
    /// Ingress UID → the problems last reported as events.
    reported: Mutex<HashMap<String, BTreeSet<Problem>>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngressController").finish_non_exhaustive()
    }
}

/// Adds the ingress controller to `manager` (see the module documentation).
pub fn add(manager: &mut Manager) {
    let client = manager.client();
    manager.add_source(move |shutdown| {
        Box::pin(async move {
            tokio::select! {
                () = ensure_class(client) => {}
                () = shutdown => {}
            }
        })
    });
    let ingresses = manager.cache::<Ingress>(watcher::Config::default());
    let classes = manager.cache::<IngressClass>(watcher::Config::default());
    let services = manager.cache::<Service>(watcher::Config::default());
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let every_ingress = {
        let ingresses = ingresses.store();
        move || {
            ingresses
                .state()
                .iter()
                .map(|i| ObjectRef::from_obj(&**i))
                .collect::<Vec<_>>()
        }
    };
    let naming_service = {
        let ingresses = ingresses.store();
        move |service: Arc<Service>| {
            let namespace = service.namespace();
            let name = service.name_any();
            ingresses
                .state()
                .iter()
                .filter(|i| i.namespace() == namespace && services_of(i).contains(&name))
                .map(|i| ObjectRef::from_obj(&**i))
                .collect::<Vec<_>>()
        }
    };
    let (all, all_again) = (every_ingress.clone(), every_ingress);
    let runner = Runner::for_cache(MANAGER, &ingresses)
        .and_then(|r| r.watches(&services, naming_service.clone()))
        .and_then(|r| r.watches_deleted(&services, naming_service))
        .and_then(|r| r.watches(&classes, move |_: Arc<IngressClass>| all()))
        .and_then(|r| r.watches(&nodes, move |_: Arc<Node>| all_again()))
        .expect("the caches were just created, before run");
    manager.add(
        runner,
        reconcile,
        Arc::new(Controller {
            client: manager.client(),
            classes: classes.store(),
            services: services.store(),
            nodes: nodes.store(),
            reported: Mutex::new(HashMap::new()),
        }),
    );
}

/// Creates [`ingress_class`] unless a class of that name exists; retried until it is there.
async fn ensure_class(client: Client) {
    let api: Api<IngressClass> = Api::all(client);
    let params = PostParams {
        field_manager: Some(MANAGER.into()),
        ..PostParams::default()
    };
    loop {
        match api.create(&params, &ingress_class()).await {
            Ok(_) => tracing::info!(class = CLASS, "created the default IngressClass"),
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => {
                tracing::warn!(error = %e, "creating the IngressClass {CLASS}");
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        }
        return;
    }
}

/// Whether `ingress` is this controller's: its class (`spec.ingressClassName`, else the
/// deprecated annotation) is an IngressClass of [`CONTROLLER`] — or [`CLASS`] before that
/// class exists — or it names none and the default class (the newest marked) is ours.
/// The node agent decides the same way (a test holds them together).
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
        None => classes
            .iter()
            .filter(|c| c.annotations().get(ANN_DEFAULT_CLASS).map(String::as_str) == Some("true"))
            .max_by(|a, b| {
                let created = |c: &IngressClass| c.metadata.creation_timestamp.clone().map(|t| t.0);
                created(a)
                    .cmp(&created(b))
                    .then_with(|| b.name_any().cmp(&a.name_any()))
            })
            .is_some_and(|c| ours(c)),
    }
}

/// Every backend of `ingress` with where it is used: `(host, path, backend)`, the default
/// backend as host `*` and an empty path.
fn backends(ingress: &Ingress) -> Vec<(String, String, &IngressBackend)> {
    let Some(spec) = &ingress.spec else {
        return Vec::new();
    };
    let mut out: Vec<(String, String, &IngressBackend)> = spec
        .default_backend
        .iter()
        .map(|b| ("*".to_owned(), String::new(), b))
        .collect();
    for rule in spec.rules.iter().flatten() {
        let host = rule
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "*".into());
        for path in rule.http.iter().flat_map(|h| &h.paths) {
            out.push((
                host.clone(),
                path.path.clone().unwrap_or_else(|| "/".into()),
                &path.backend,
            ));
        }
    }
    out
}

/// The names of the Services `ingress` routes to.
fn services_of(ingress: &Ingress) -> BTreeSet<String> {
    backends(ingress)
        .into_iter()
        .filter_map(|(_, _, b)| Some(b.service.as_ref()?.name.clone()))
        .collect()
}

/// Something wrong with an Ingress, as its event says it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    /// The event's reason.
    pub reason: &'static str,
    /// The event's message.
    pub message: String,
}

/// The backends of `ingress` whose Service, or Service port, is not in `services`.
pub fn missing_backends(ingress: &Ingress, services: &Store<Service>) -> Vec<Problem> {
    let namespace = ingress.namespace().unwrap_or_default();
    let mut problems = Vec::new();
    for (host, path, backend) in backends(ingress) {
        let Some(wanted) = &backend.service else {
            continue;
        };
        let route = if path.is_empty() {
            "the default backend".to_owned()
        } else {
            format!("host {host}, path {path}")
        };
        let service = services.get(&ObjectRef::new(&wanted.name).within(&namespace));
        let message = match service {
            None => format!(
                "service {namespace}/{} not found ({route}): its requests are answered 503",
                wanted.name
            ),
            Some(service) => {
                let port = wanted.port.as_ref();
                let found = service
                    .spec
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .any(|p| {
                        match (
                            port.and_then(|p| p.name.as_deref()),
                            port.and_then(|p| p.number),
                        ) {
                            (Some(name), _) => p.name.as_deref() == Some(name),
                            (None, Some(number)) => p.port == number,
                            (None, None) => false,
                        }
                    });
                if found {
                    continue;
                }
                let port = port
                    .and_then(|p| p.name.clone().or_else(|| p.number.map(|n| n.to_string())))
                    .unwrap_or_default();
                format!(
                    "service {namespace}/{} has no port {port} ({route}): its requests are answered 503",
                    wanted.name
                )
            }
        };
        problems.push(Problem {
            reason: "BackendNotFound",
            message,
        });
    }
    problems
}

async fn reconcile(ingress: Arc<Ingress>, ctx: Arc<Controller>) -> Result<Action, IngressError> {
    let uid = ingress.uid().unwrap_or_default();
    if !served(&ingress, &ctx.classes.state()) || ingress.metadata.deletion_timestamp.is_some() {
        forget(&ctx, &uid);
        return Ok(Action::await_change());
    }
    let namespace = ingress.namespace().unwrap_or_default();
    let name = ingress.name_any();

    let addresses = serving_addresses(&ctx.nodes.state());
    let current: Vec<String> = ingress
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect();
    if current != addresses {
        let api: Api<Ingress> = Api::namespaced(ctx.client.clone(), &namespace);
        let entries: Vec<_> = addresses.iter().map(|ip| json!({"ip": ip})).collect();
        let patch = json!({"status": {"loadBalancer": {"ingress": entries}}});
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        match api
            .patch_status(&name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Action::await_change()),
            Err(source) => {
                return Err(IngressError::Status {
                    ingress: format!("{namespace}/{name}"),
                    source,
                });
            }
        }
    }

    let mut problems: BTreeSet<Problem> = missing_backends(&ingress, &ctx.services)
        .into_iter()
        .collect();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    for tls in ingress.spec.iter().flat_map(|s| s.tls.iter().flatten()) {
        let Some(secret) = tls.secret_name.as_deref().filter(|s| !s.is_empty()) else {
            continue;
        };
        if let Ok(None) = secrets.get_opt(secret).await {
            problems.insert(Problem {
                reason: "TLSSecretNotFound",
                message: format!(
                    "secret {namespace}/{secret} for TLS hosts {} not found: they get the default certificate",
                    tls.hosts.iter().flatten().cloned().collect::<Vec<_>>().join(", ")
                ),
            });
        }
    }
    let new: Vec<Problem> = {
        let mut reported = ctx.reported.lock().unwrap_or_else(|e| e.into_inner());
        let before = reported.insert(uid, problems.clone()).unwrap_or_default();
        problems.difference(&before).cloned().collect()
    };
    for problem in &new {
        events::publish(
            &ctx.client,
            MANAGER,
            &*ingress,
            EventType::Warning,
            problem.reason,
            &problem.message,
        )
        .await;
    }
    Ok(if problems.is_empty() {
        Action::await_change()
    } else {
        Action::requeue(RECHECK)
    })
}

fn forget(ctx: &Controller, uid: &str) {
    ctx.reported
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(uid);
}

/// The InternalIPs of the Ready nodes whose agent serves Ingresses, sorted.
pub fn serving_addresses(nodes: &[Arc<Node>]) -> Vec<String> {
    let mut addresses: Vec<String> = nodes
        .iter()
        .filter(|n| n.annotations().get(ANN_NODE_SERVES).map(String::as_str) == Some("true"))
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
        .flat_map(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.addresses.clone())
                .unwrap_or_default()
                .into_iter()
                .filter(|a| a.type_ == "InternalIP")
                .map(|a| a.address)
        })
        .collect();
    addresses.sort();
    addresses.dedup();
    addresses
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, ip: &str, ready: &str, serves: bool) -> Arc<Node> {
        let annotations = if serves {
            json!({ANN_NODE_SERVES: "true"})
        } else {
            json!({})
        };
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "annotations": annotations},
                "status": {
                    "conditions": [{"type": "Ready", "status": ready}],
                    "addresses": [{"type": "InternalIP", "address": ip},
                                  {"type": "Hostname", "address": name}],
                },
            }))
            .unwrap(),
        )
    }

    #[test]
    fn ready_serving_nodes_are_published() {
        let nodes = [
            node("b", "10.0.0.2", "True", true),
            node("a", "10.0.0.1", "True", true),
            node("down", "10.0.0.3", "False", true),
            node("other", "10.0.0.4", "True", false),
        ];
        assert_eq!(serving_addresses(&nodes), ["10.0.0.1", "10.0.0.2"]);
    }

    #[tokio::test]
    async fn missing_services_and_ports_are_problems() {
        let (store, mut writer) = kube::runtime::reflector::store::<Service>();
        let web: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"ports": [{"name": "http", "port": 80}]},
        }))
        .unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(web));
        let ingress: Ingress = serde_json::from_value(json!({
            "metadata": {"name": "shop", "namespace": "default"},
            "spec": {
                "defaultBackend": {"service": {"name": "web", "port": {"name": "http"}}},
                "rules": [{"host": "shop.example.com", "http": {"paths": [
                    {"path": "/", "pathType": "Prefix",
                     "backend": {"service": {"name": "web", "port": {"number": 80}}}},
                    {"path": "/cart", "pathType": "Prefix",
                     "backend": {"service": {"name": "cart", "port": {"number": 80}}}},
                    {"path": "/admin", "pathType": "Exact",
                     "backend": {"service": {"name": "web", "port": {"number": 8080}}}},
                ]}}],
            },
        }))
        .unwrap();
        let problems = missing_backends(&ingress, &store);
        let messages: Vec<&str> = problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "service default/cart not found (host shop.example.com, path /cart): its requests are answered 503",
                "service default/web has no port 8080 (host shop.example.com, path /admin): its requests are answered 503",
            ]
        );
        assert!(problems.iter().all(|p| p.reason == "BackendNotFound"));
        assert_eq!(
            services_of(&ingress),
            ["cart".to_owned(), "web".to_owned()].into()
        );
    }

    /// The node agent serves exactly the Ingresses this controller looks after, under the
    /// same names.
    #[test]
    fn the_node_agent_agrees_on_what_is_served() {
        use orquestra_node_agent::ingress as agent;
        assert_eq!(agent::CONTROLLER, CONTROLLER);
        assert_eq!(agent::CLASS, CLASS);
        assert_eq!(agent::ANN_CLASS, ANN_CLASS);
        assert_eq!(agent::ANN_DEFAULT_CLASS, ANN_DEFAULT_CLASS);
        assert_eq!(agent::ANN_NODE_SERVES, ANN_NODE_SERVES);
        let class = |name: &str, controller: &str, default: bool| -> Arc<IngressClass> {
            let mut c: IngressClass = serde_json::from_value(json!({
                "metadata": {"name": name, "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"controller": controller},
            }))
            .unwrap();
            if default {
                c.metadata.annotations = Some([(ANN_DEFAULT_CLASS.into(), "true".into())].into());
            }
            Arc::new(c)
        };
        let worlds = [
            vec![],
            vec![ingress_class()].into_iter().map(Arc::new).collect(),
            vec![class(CLASS, CONTROLLER, false), class("nginx", "x", true)],
            vec![class("mine", CONTROLLER, false), class("nginx", "x", false)],
        ];
        let ingresses: Vec<Ingress> = [
            json!({}),
            json!({"ingressClassName": "orquestra"}),
            json!({"ingressClassName": "nginx"}),
            json!({"ingressClassName": "mine"}),
        ]
        .into_iter()
        .map(|spec| {
            serde_json::from_value(json!({"metadata": {"name": "i"}, "spec": spec})).unwrap()
        })
        .collect();
        for classes in &worlds {
            for ingress in &ingresses {
                assert_eq!(
                    served(ingress, classes),
                    agent::served(ingress, classes),
                    "{ingress:?} with {classes:?}"
                );
            }
        }
    }
}
