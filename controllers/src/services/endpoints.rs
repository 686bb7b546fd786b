//! The Endpoints controller (`endpoint`): for every Service with a selector, keeps the
//! `Endpoints` object of the same name listing the selected pods — ready ones under
//! `addresses`, the others under `notReadyAddresses` — grouped into subsets by the ports
//! their containers resolve the Service's `targetPort`s to, as kube-controller-manager's
//! endpoints controller does. Services without a selector are left alone: their Endpoints
//! belong to the user.
//!
//! The Endpoints it manages carry `endpointslice.kubernetes.io/skip-mirror: "true"` (as
//! kube's do), which is also how it knows which ones to delete when their Service is gone:
//! an Endpoints has no owner reference, so the garbage collector would not.
//!
//! It writes only when the content changed, and never from a stale cache: a create of an
//! existing name and an update at an old `resourceVersion` both fail and are retried.
//!
//! The helpers shared with the [`crate::services::endpointslice`] controller (which pods a Service
//! selects, and what a named `targetPort` resolves to) live here.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{EndpointSubset, Endpoints, Pod, Service, ServicePort};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::{Value, json};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["services", "pods"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["endpoints"],
        verbs: &["get", "list", "watch", "create", "update", "delete"],
    },
];

/// The label on Endpoints this controller manages (kube's: it tells the EndpointSlice
/// mirroring controller to skip them).
pub const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";

/// The label kube puts on the Endpoints and EndpointSlices of headless Services.
pub const HEADLESS: &str = "service.kubernetes.io/headless";

/// What can go wrong reconciling one Service's Endpoints (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum EndpointsError {
    /// The Endpoints could not be written or deleted.
    #[error("{action}: {source}")]
    Api {
        /// What was being done, naming the object.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The desired Endpoints did not serialize (a defect).
    #[error("building the Endpoints of {service}: {source}")]
    Build {
        /// The Service.
        service: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// What the reconcilers share.
pub struct Controller {
    client: Client,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoints: Store<Endpoints>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointsController")
            .finish_non_exhaustive()
    }
}

/// Adds the Endpoints controller to `manager`: one runner keeping each Service's Endpoints,
/// one deleting the managed Endpoints whose Service is gone.
pub fn add(manager: &mut Manager) {
    let services = manager.cache::<Service>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let endpoints = manager.cache::<Endpoints>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        pods: pods.store(),
        services: services.store(),
        endpoints: endpoints.store(),
    });
    let pod_mapper = {
        let services = services.store();
        let endpoints = endpoints.store();
        move |pod: Arc<Pod>| {
            let mut refs = selecting(&services, &pod);
            // A pod that left (relabelled, deleted) is still listed by its old Endpoints.
            let name = pod.name_any();
            for ep in endpoints.state() {
                if ep.namespace() == pod.namespace() && lists(&ep, &name) {
                    refs.push(
                        ObjectRef::new(&ep.name_any()).within(&ep.namespace().unwrap_or_default()),
                    );
                }
            }
            refs
        }
    };
    let same_name = |ep: Arc<Endpoints>| {
        Some(ObjectRef::<Service>::new(&ep.name_any()).within(&ep.namespace().unwrap_or_default()))
    };
    let runner = Runner::for_cache("endpoint", &services)
        .and_then(|r| r.watches(&pods, pod_mapper.clone()))
        .and_then(|r| r.watches_deleted(&pods, pod_mapper))
        // Someone else's edit or deletion of a managed Endpoints is undone.
        .and_then(|r| r.watches(&endpoints, same_name))
        .and_then(|r| r.watches_deleted(&endpoints, same_name))
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, Arc::clone(&context));
    let cleanup = Runner::for_cache("endpoint-cleanup", &endpoints)
        .and_then(|r| {
            r.watches_deleted(&services, |svc: Arc<Service>| {
                Some(
                    ObjectRef::<Endpoints>::new(&svc.name_any())
                        .within(&svc.namespace().unwrap_or_default()),
                )
            })
        })
        .expect("the caches were just created, before run");
    manager.add(cleanup, cleanup_reconcile, context);
}

/// Whether `ep` lists pod `name` (ready or not).
fn lists(ep: &Endpoints, name: &str) -> bool {
    ep.subsets.iter().flatten().any(|s| {
        s.addresses
            .iter()
            .chain(s.not_ready_addresses.iter())
            .flatten()
            .any(|a| a.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some(name))
    })
}

/// A Service's selector, if it has a non-empty one (an empty selector selects nothing: the
/// Service's endpoints are managed by the user).
pub fn selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    svc.spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
}

/// Whether `svc` selects `pod`: same namespace, and the selector matches its labels.
pub fn selects(svc: &Service, pod: &Pod) -> bool {
    let Some(selector) = selector(svc) else {
        return false;
    };
    let labels = pod.metadata.labels.as_ref();
    svc.namespace() == pod.namespace()
        && selector
            .iter()
            .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The Services (from `services`) that select `pod`.
pub fn selecting(services: &Store<Service>, pod: &Pod) -> Vec<ObjectRef<Service>> {
    services
        .state()
        .into_iter()
        .filter(|svc| selects(svc, pod))
        .map(|svc| ObjectRef::from_obj(svc.as_ref()))
        .collect()
}

/// The container port a Service port's `targetPort` means on `pod`: a number as is (the
/// Service port when unset), a name looked up among the pod's container ports of the same
/// protocol. `None` when the name is not found (the pod then lacks that port).
pub fn resolve_port(pod: &Pod, port: &ServicePort) -> Option<i32> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(0)) => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod
            .spec
            .iter()
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && p.protocol.as_deref().unwrap_or("TCP") == protocol
            })
            .map(|p| p.container_port)
            // A number in a string (as kube's FindPort accepts).
            .or_else(|| name.parse().ok()),
    }
}

pub use crate::objects::ready as pod_ready;

/// The pod's IP, if it has one yet.
pub fn pod_ip(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()
        .and_then(|s| s.pod_ip.as_deref())
        .filter(|ip| !ip.is_empty())
}

/// Whether the pod has finished for good (`Succeeded` or `Failed`).
pub fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The Service's headless-ness, as kube tells it (`clusterIP: None`).
pub fn headless(svc: &Service) -> bool {
    svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

/// Whether the Service publishes pods that are not ready.
pub fn publish_not_ready(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.publish_not_ready_addresses)
        .unwrap_or(false)
}

/// The pod reference an address or endpoint carries.
pub fn target_ref(pod: &Pod) -> Value {
    json!({"kind": "Pod", "namespace": pod.namespace(), "name": pod.name_any(), "uid": pod.uid()})
}

/// The pod's DNS hostname under the Service: only when its `subdomain` names the Service.
pub fn hostname(pod: &Pod, svc: &Service) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    (spec.subdomain.as_deref() == Some(svc.name_any().as_str()))
        .then(|| spec.hostname.clone())
        .flatten()
        .filter(|h| !h.is_empty())
}

/// The ports a pod resolves a Service's to: (name, port, protocol, appProtocol) each.
type PortSet = Vec<(String, i32, String, String)>;

/// The subsets of the Endpoints of `svc` over `pods` (every pod of the cache; those the
/// Service selects are taken), in a canonical order: subsets by their ports, addresses by IP.
pub fn subsets(svc: &Service, pods: &[Arc<Pod>]) -> Vec<Value> {
    let ports: &[ServicePort] = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let publish = publish_not_ready(svc);
    // Resolved ports → (ready, not ready) addresses, keyed by IP for the order.
    let mut groups: BTreeMap<PortSet, [BTreeMap<String, Value>; 2]> = BTreeMap::new();
    for pod in pods.iter().filter(|p| selects(svc, p) && !terminal(p)) {
        let Some(ip) = pod_ip(pod) else { continue };
        let terminating = pod.metadata.deletion_timestamp.is_some();
        // Terminating pods leave the Endpoints (kube's ShouldPodBeInEndpoints), unless the
        // Service publishes every pod.
        if terminating && !publish {
            continue;
        }
        let mut resolved: PortSet = ports
            .iter()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    resolve_port(pod, p)?,
                    p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    p.app_protocol.clone().unwrap_or_default(),
                ))
            })
            .collect();
        // A pod none of whose ports resolve serves nothing — except for a headless
        // Service without ports, which lists addresses only.
        if resolved.is_empty() && !(ports.is_empty() && headless(svc)) {
            continue;
        }
        resolved.sort();
        let mut address = json!({"ip": ip, "targetRef": target_ref(pod)});
        if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
            address["nodeName"] = json!(node);
        }
        if let Some(host) = hostname(pod, svc) {
            address["hostname"] = json!(host);
        }
        let ready = publish || pod_ready(pod);
        // Keyed by IP for the order, and by name too in case two pods share an IP.
        let key = format!("{ip}/{}", pod.name_any());
        groups.entry(resolved).or_default()[usize::from(!ready)].insert(key, address);
    }
    groups
        .into_iter()
        .map(|(ports, [ready, not_ready])| {
            let mut subset = json!({});
            if !ready.is_empty() {
                subset["addresses"] = json!(ready.into_values().collect::<Vec<_>>());
            }
            if !not_ready.is_empty() {
                subset["notReadyAddresses"] = json!(not_ready.into_values().collect::<Vec<_>>());
            }
            if !ports.is_empty() {
                let ports: Vec<Value> = ports
                    .into_iter()
                    .map(|(name, port, protocol, app)| {
                        let mut p = json!({"port": port, "protocol": protocol});
                        if !name.is_empty() {
                            p["name"] = json!(name);
                        }
                        if !app.is_empty() {
                            p["appProtocol"] = json!(app);
                        }
                        p
                    })
                    .collect();
                subset["ports"] = json!(ports);
            }
            subset
        })
        .collect()
}

/// The labels of the Endpoints of `svc`: the Service's own, plus kube's markers.
fn labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels = svc.labels().clone();
    labels.insert(SKIP_MIRROR.into(), "true".into());
    if headless(svc) {
        labels.insert(HEADLESS.into(), String::new());
    } else {
        labels.remove(HEADLESS);
    }
    labels
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Controller>) -> Result<Action, EndpointsError> {
    if svc.metadata.deletion_timestamp.is_some() || selector(&svc).is_none() {
        return Ok(Action::await_change());
    }
    let name = svc.name_any();
    let namespace = svc.namespace().unwrap_or_default();
    let build = |source| EndpointsError::Build {
        service: format!("{namespace}/{name}"),
        source,
    };
    // Through the typed form, so that the comparison sees what the server would store.
    let subsets: Vec<EndpointSubset> =
        serde_json::from_value(json!(subsets(&svc, &ctx.pods.state()))).map_err(build)?;
    let subsets = (!subsets.is_empty()).then_some(subsets);
    let labels = labels(&svc);
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &namespace);
    let current = ctx.endpoints.get(&ObjectRef::new(&name).within(&namespace));
    match current {
        Some(current) => {
            let empty = |s: &Option<Vec<EndpointSubset>>| s.as_ref().is_none_or(Vec::is_empty);
            let same_subsets =
                current.subsets == subsets || (empty(&current.subsets) && empty(&subsets));
            if same_subsets && current.labels() == &labels {
                return Ok(Action::await_change());
            }
            let mut updated = (*current).clone();
            updated.metadata.labels = Some(labels);
            updated.subsets = subsets;
            updated.metadata.managed_fields = None;
            api.replace(&name, &PostParams::default(), &updated)
                .await
                .map_err(|source| EndpointsError::Api {
                    action: format!("updating endpoints {namespace}/{name}"),
                    source,
                })?;
        }
        None => {
            let endpoints = Endpoints {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels),
                    ..Default::default()
                },
                subsets,
            };
            api.create(&PostParams::default(), &endpoints)
                .await
                .map_err(|source| EndpointsError::Api {
                    action: format!("creating endpoints {namespace}/{name}"),
                    source,
                })?;
        }
    }
    Ok(Action::await_change())
}

/// Deletes a managed Endpoints whose Service is gone (checked with the API server, not
/// only the cache, which may not have seen a new Service yet).
async fn cleanup_reconcile(
    ep: Arc<Endpoints>,
    ctx: Arc<Controller>,
) -> Result<Action, EndpointsError> {
    let name = ep.name_any();
    let namespace = ep.namespace().unwrap_or_default();
    let managed = ep.labels().get(SKIP_MIRROR).map(String::as_str) == Some("true");
    if !managed
        || ep.metadata.deletion_timestamp.is_some()
        || ctx
            .services
            .get(&ObjectRef::new(&name).within(&namespace))
            .is_some()
    {
        return Ok(Action::await_change());
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    match services.get_opt(&name).await {
        Ok(Some(_)) => return Ok(Action::await_change()),
        Ok(None) => {}
        Err(source) => {
            return Err(EndpointsError::Api {
                action: format!("looking up service {namespace}/{name}"),
                source,
            });
        }
    }
    let api: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: ep.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&name, &params).await {
        Ok(_) => {
            tracing::debug!(endpoints = %format!("{namespace}/{name}"), "service gone; endpoints deleted");
            Ok(Action::await_change())
        }
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Action::await_change()),
        Err(source) => Err(EndpointsError::Api {
            action: format!("deleting endpoints {namespace}/{name}"),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str, ready: bool) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "uid": name, "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c",
                    "ports": [{"name": "http", "containerPort": if name == "odd" { 9090 } else { 8080 }}]}]},
                "status": {"podIP": ip, "phase": "Running",
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
            }))
            .unwrap(),
        )
    }

    fn service(extra: Value) -> Service {
        let mut svc = json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "web", "port": 80, "targetPort": "http"}]},
        });
        for (k, v) in extra.as_object().unwrap() {
            svc["spec"][k] = v.clone();
        }
        serde_json::from_value(svc).unwrap()
    }

    #[test]
    fn named_ports_group_pods_into_subsets() {
        let pods = vec![
            pod("b", "10.0.0.2", true),
            pod("a", "10.0.0.1", true),
            pod("odd", "10.0.0.3", true),
            pod("slow", "10.0.0.4", false),
            pod("new", "", true),
        ];
        let subsets = subsets(&service(json!({})), &pods);
        assert_eq!(subsets.len(), 2, "{subsets:#?}");
        assert_eq!(
            subsets[0]["ports"],
            json!([{"name": "web", "port": 8080, "protocol": "TCP"}])
        );
        assert_eq!(subsets[0]["addresses"][0]["ip"], "10.0.0.1");
        assert_eq!(subsets[0]["addresses"][1]["ip"], "10.0.0.2");
        assert_eq!(subsets[0]["addresses"][0]["nodeName"], "n1");
        assert_eq!(subsets[0]["addresses"][0]["targetRef"]["name"], "a");
        assert_eq!(subsets[0]["notReadyAddresses"][0]["ip"], "10.0.0.4");
        assert_eq!(subsets[1]["ports"][0]["port"], 9090);
        let published = super::subsets(&service(json!({"publishNotReadyAddresses": true})), &pods);
        assert!(published[0].get("notReadyAddresses").is_none());
    }

    #[test]
    fn unresolvable_ports_and_other_services() {
        let pods = vec![pod("a", "10.0.0.1", true)];
        let numeric =
            service(json!({"ports": [{"port": 80, "targetPort": 8000, "protocol": "UDP"}]}));
        let s = subsets(&numeric, &pods);
        assert_eq!(s[0]["ports"], json!([{"port": 8000, "protocol": "UDP"}]));
        let missing = service(json!({"ports": [{"port": 80, "targetPort": "nope"}]}));
        assert!(subsets(&missing, &pods).is_empty());
        let other = service(json!({"selector": {"app": "db"}}));
        assert!(subsets(&other, &pods).is_empty());
        let none = service(json!({"selector": {}}));
        assert!(selector(&none).is_none());
    }
}
