//! The EndpointSlice controller (`endpointslice`): for every Service with a selector, keeps
//! `discovery.k8s.io/v1` EndpointSlices (`<service>-<random>`, IPv4, at most
//! [`MAX_ENDPOINTS`] endpoints each, owned by the Service) listing the selected pods that
//! have an IP, with their `ready`/`serving`/`terminating` conditions, as
//! kube-controller-manager's endpointslice controller does. Pods are grouped into slices by
//! the ports they resolve the Service's ports to; a Service selecting nothing keeps one
//! empty placeholder slice.
//!
//! Endpoints stay in the slice they are in while they exist (fewer writes for the proxies
//! watching); new ones fill slices with room before a new slice is made. A slice is written
//! only when its content changed. *Expectations* (as the ReplicaSet controller's) hold the
//! next reconcile of a Service until the cache shows its own writes, so a slow cache never
//! makes it create a slice twice.
//!
//! Slices whose Service is gone are deleted by the `endpointslice-cleanup` runner (there is
//! no garbage collector yet to follow their owner reference).

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort, EndpointSlice};
use kube::api::{Api, DeleteParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::services::endpoints::{
    HEADLESS, headless, hostname, pod_ip, pod_ready, publish_not_ready, resolve_port, selecting,
    selector, selects, target_ref, terminal,
};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["services", "pods"],
        verbs: READ,
    },
    Rule {
        api_groups: &["discovery.k8s.io"],
        resources: &["endpointslices"],
        verbs: &["get", "list", "watch", "create", "update", "delete"],
    },
];

/// The most endpoints one slice holds (kube's `--max-endpoints-per-slice` default).
pub const MAX_ENDPOINTS: usize = 100;

/// The label naming a slice's Service.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The label naming a slice's manager.
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
/// The annotation recording when the change a slice carries was made.
pub const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// This controller's value of [`MANAGED_BY`] (kube's).
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// What can go wrong reconciling one Service's slices (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum EndpointSliceError {
    /// A slice could not be written or deleted.
    #[error("{action}: {source}")]
    Api {
        /// What was being done, naming the object.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A desired endpoint did not serialize (a defect).
    #[error("building the slices of {service}: {source}")]
    Build {
        /// The Service.
        service: String,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
}

/// Slices written but not yet seen so in the cache: name → the resourceVersion written
/// (`None`: deleted).
#[derive(Debug, Default)]
struct Expectations {
    pending: HashMap<String, Option<String>>,
    since: Option<Instant>,
}

/// What the reconcilers share.
pub struct Controller {
    client: Client,
    pods: Store<Pod>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    expectations: Mutex<HashMap<String, Expectations>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSliceController")
            .finish_non_exhaustive()
    }
}

fn managed(slice: &EndpointSlice) -> bool {
    slice.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
}

fn service_of(slice: &EndpointSlice) -> Option<ObjectRef<Service>> {
    let name = slice.labels().get(SERVICE_NAME)?;
    Some(ObjectRef::new(name).within(&slice.namespace().unwrap_or_default()))
}

/// Adds the EndpointSlice controller to `manager`: one runner keeping each Service's
/// slices, one deleting the managed slices whose Service is gone.
pub fn add(manager: &mut Manager) {
    let services = manager.cache::<Service>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let slices = manager.cache::<EndpointSlice>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        pods: pods.store(),
        services: services.store(),
        slices: slices.store(),
        expectations: Mutex::default(),
    });
    let pod_mapper = {
        let services = services.store();
        let slices = slices.store();
        move |pod: Arc<Pod>| {
            let mut refs = selecting(&services, &pod);
            // A pod that left (relabelled, deleted) is still listed by its old slices.
            let name = pod.name_any();
            for slice in slices.state() {
                let listed = slice.endpoints.iter().flatten().any(|e| {
                    e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some(name.as_str())
                });
                if listed && managed(&slice) && slice.namespace() == pod.namespace() {
                    refs.extend(service_of(&slice));
                }
            }
            refs
        }
    };
    let runner = Runner::for_cache("endpointslice", &services)
        .and_then(|r| r.owns(&slices))
        .and_then(|r| r.watches(&pods, pod_mapper.clone()))
        .and_then(|r| r.watches_deleted(&pods, pod_mapper))
        // A managed slice deleted by someone else is made again.
        .and_then(|r| {
            r.watches_deleted(&slices, |slice: Arc<EndpointSlice>| {
                managed(&slice).then(|| service_of(&slice)).flatten()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, Arc::clone(&context));
    let all_slices = slices.store();
    let cleanup = Runner::for_cache("endpointslice-cleanup", &slices)
        .and_then(|r| {
            r.watches_deleted(&services, move |svc: Arc<Service>| {
                all_slices
                    .state()
                    .into_iter()
                    .filter(|s| {
                        managed(s) && service_of(s) == Some(ObjectRef::from_obj(svc.as_ref()))
                    })
                    .map(|s| ObjectRef::from_obj(s.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(cleanup, cleanup_reconcile, context);
}

/// A slice's ports in a canonical order, to group and compare by.
fn port_key(ports: &[EndpointPort]) -> String {
    let mut ports: Vec<String> = ports
        .iter()
        .map(|p| serde_json::to_string(p).unwrap_or_default())
        .collect();
    ports.sort();
    ports.join(",")
}

/// One pod as an endpoint of `svc` with the ports it resolves, or `None` when it is not
/// one (no IPv4 address yet, finished, not selected).
fn endpoint(svc: &Service, pod: &Pod) -> Option<(Endpoint, Vec<EndpointPort>)> {
    let ip = pod_ip(pod).filter(|ip| !ip.contains(':'))?;
    if !selects(svc, pod) || terminal(pod) {
        return None;
    }
    let serving = pod_ready(pod);
    let terminating = pod.metadata.deletion_timestamp.is_some();
    // kube: "ready" is never true for a terminating pod, unless every pod is published.
    let ready = publish_not_ready(svc) || (serving && !terminating);
    let mut e = json!({
        "addresses": [ip],
        "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
        "targetRef": target_ref(pod),
    });
    if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) {
        e["nodeName"] = json!(node);
    }
    if let Some(host) = hostname(pod, svc) {
        e["hostname"] = json!(host);
    }
    let ports: &[ServicePort] = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let mut ports: Vec<EndpointPort> = ports
        .iter()
        .filter_map(|p| {
            Some(EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(resolve_port(pod, p)?),
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                app_protocol: p.app_protocol.clone(),
            })
        })
        .collect();
    ports.sort_by_key(|p| serde_json::to_string(p).unwrap_or_default());
    Some((serde_json::from_value(e).ok()?, ports))
}

fn pod_name(e: &Endpoint) -> String {
    e.target_ref
        .as_ref()
        .and_then(|t| t.name.clone())
        .unwrap_or_default()
}

/// The labels of the slices of `svc`: the Service's own, plus kube's.
fn labels(svc: &Service) -> BTreeMap<String, String> {
    let mut labels = svc.labels().clone();
    labels.insert(SERVICE_NAME.into(), svc.name_any());
    labels.insert(MANAGED_BY.into(), CONTROLLER.into());
    if headless(svc) {
        labels.insert(HEADLESS.into(), String::new());
    } else {
        labels.remove(HEADLESS);
    }
    labels
}

/// The endpoints wanted, by port set (its [`port_key`]): the ports, and the endpoints by
/// pod name.
type Groups = BTreeMap<String, (Vec<EndpointPort>, BTreeMap<String, Endpoint>)>;

/// A slice as planned: the existing one it updates (if any), its ports and endpoints.
struct Planned {
    existing: Option<Arc<EndpointSlice>>,
    ports: Vec<EndpointPort>,
    endpoints: Vec<Endpoint>,
}

/// Plans the slices of one Service: which existing slices keep which endpoints, where new
/// endpoints go, which slices are created; the existing slices left out are deleted.
fn plan(existing: Vec<Arc<EndpointSlice>>, desired: Groups) -> Vec<Planned> {
    let mut desired = desired;
    let mut planned: Vec<Planned> = Vec::new();
    let first = existing.first().cloned();
    // Existing slices keep the endpoints still wanted with the same ports, updated.
    for slice in existing {
        let key = port_key(slice.ports.as_deref().unwrap_or_default());
        let Some((ports, wanted)) = desired.get_mut(&key) else {
            continue;
        };
        let kept: Vec<Endpoint> = slice
            .endpoints
            .iter()
            .flatten()
            .filter_map(|e| wanted.remove(&pod_name(e)))
            .collect();
        planned.push(Planned {
            existing: Some(slice),
            ports: ports.clone(),
            endpoints: kept,
        });
    }
    // New endpoints fill the slices of their ports with room, then new slices.
    for (key, (ports, wanted)) in desired {
        let mut wanted = wanted.into_values().peekable();
        for slot in planned.iter_mut().filter(|p| {
            p.existing
                .as_ref()
                .is_some_and(|s| port_key(s.ports.as_deref().unwrap_or_default()) == key)
        }) {
            while slot.endpoints.len() < MAX_ENDPOINTS
                && let Some(e) = wanted.next()
            {
                slot.endpoints.push(e);
            }
        }
        while wanted.peek().is_some() {
            planned.push(Planned {
                existing: None,
                ports: ports.clone(),
                endpoints: wanted.by_ref().take(MAX_ENDPOINTS).collect(),
            });
        }
    }
    let total: usize = planned.iter().map(|p| p.endpoints.len()).sum();
    if total == 0 {
        // No endpoints at all: one empty placeholder slice (kube's), reusing one if any.
        return vec![Planned {
            existing: first,
            ports: Vec::new(),
            endpoints: Vec::new(),
        }];
    }
    planned.retain(|p| !p.endpoints.is_empty());
    for p in &mut planned {
        p.endpoints.sort_by_key(pod_name);
    }
    planned
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Controller>) -> Result<Action, EndpointSliceError> {
    if svc.metadata.deletion_timestamp.is_some() || selector(&svc).is_none() {
        return Ok(Action::await_change());
    }
    let name = svc.name_any();
    let namespace = svc.namespace().unwrap_or_default();
    let uid = svc.uid().unwrap_or_default();
    let existing: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .state()
        .into_iter()
        .filter(|s| {
            managed(s)
                && s.namespace().as_deref() == Some(namespace.as_str())
                && s.labels().get(SERVICE_NAME) == Some(&name)
                && s.owner_references().iter().any(|o| o.uid == uid)
        })
        .collect();
    if ctx.waiting(&uid, &existing) {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let mut desired: Groups = BTreeMap::new();
    for pod in ctx.pods.state() {
        if let Some((e, ports)) = endpoint(&svc, &pod) {
            desired
                .entry(port_key(&ports))
                .or_insert_with(|| (ports, BTreeMap::new()))
                .1
                .insert(pod.name_any(), e);
        }
    }
    let labels = labels(&svc);
    let owner = svc.controller_owner_ref(&()).map(|mut o| {
        o.block_owner_deletion = Some(true);
        vec![o]
    });
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let planned = plan(existing.clone(), desired);
    // As kube's controller: when the change was made, so node proxies can report how long
    // programming it took (kubeproxy_network_programming_duration_seconds).
    let changed = jiff::Timestamp::now().to_string();
    let annotations = BTreeMap::from([(TRIGGER_TIME.to_owned(), changed)]);
    let mut written: Vec<(String, Option<String>)> = Vec::new();
    let mut failure = None;
    for p in &planned {
        let ports = (!p.ports.is_empty()).then(|| p.ports.clone());
        let result = match &p.existing {
            Some(slice) => {
                if slice.endpoints.as_deref().unwrap_or_default() == p.endpoints.as_slice()
                    && slice.ports.as_deref().unwrap_or_default() == p.ports.as_slice()
                    && slice.labels() == &labels
                {
                    continue;
                }
                let mut updated = (**slice).clone();
                updated.endpoints = Some(p.endpoints.clone());
                updated.ports = ports;
                updated.metadata.labels = Some(labels.clone());
                updated
                    .metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .extend(annotations.clone());
                updated.metadata.managed_fields = None;
                api.replace(&slice.name_any(), &PostParams::default(), &updated)
                    .await
            }
            None => {
                let slice = EndpointSlice {
                    metadata: kube::api::ObjectMeta {
                        generate_name: Some(format!("{name}-")),
                        namespace: Some(namespace.clone()),
                        labels: Some(labels.clone()),
                        annotations: Some(annotations.clone()),
                        owner_references: owner.clone(),
                        ..Default::default()
                    },
                    address_type: "IPv4".into(),
                    endpoints: Some(p.endpoints.clone()),
                    ports,
                };
                api.create(&PostParams::default(), &slice).await
            }
        };
        match result {
            Ok(s) => written.push((s.name_any(), s.resource_version())),
            Err(source) => failure = Some(source),
        }
    }
    for slice in existing.iter().filter(|s| {
        !planned
            .iter()
            .any(|p| p.existing.as_ref().is_some_and(|e| e.uid() == s.uid()))
    }) {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: slice.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&slice.name_any(), &params).await {
            Ok(_) => written.push((slice.name_any(), None)),
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(source) => failure = Some(source),
        }
    }
    ctx.remember(&uid, written);
    if let Some(source) = failure {
        return Err(EndpointSliceError::Api {
            action: format!("writing the endpoint slices of {namespace}/{name}"),
            source,
        });
    }
    Ok(Action::await_change())
}

impl Controller {
    /// Whether writes for Service `uid` are still missing from the cache (`existing` its
    /// slices there); forgets those seen, and all after a minute.
    fn waiting(&self, uid: &str, existing: &[Arc<EndpointSlice>]) -> bool {
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let Some(e) = expectations.get_mut(uid) else {
            return false;
        };
        let rv = |s: &EndpointSlice| {
            s.resource_version()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        e.pending.retain(|name, written| {
            let seen = existing.iter().find(|s| &s.name_any() == name);
            match (written, seen) {
                (None, seen) => seen.is_some(),
                (Some(_), None) => true,
                (Some(v), Some(s)) => {
                    s.resource_version().as_deref() != Some(v.as_str())
                        && rv(s) < v.parse::<u64>().unwrap_or(u64::MAX)
                }
            }
        });
        if e.pending.is_empty()
            || e.since
                .is_some_and(|s| s.elapsed() > Duration::from_secs(60))
        {
            expectations.remove(uid);
            return false;
        }
        true
    }

    fn remember(&self, uid: &str, written: Vec<(String, Option<String>)>) {
        if written.is_empty() {
            return;
        }
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let e = expectations.entry(uid.to_owned()).or_default();
        e.pending.extend(written);
        e.since = Some(Instant::now());
    }
}

/// Deletes a managed slice whose owning Service is gone (or replaced by a new one of the
/// same name), as checked with the API server, not only the cache.
async fn cleanup_reconcile(
    slice: Arc<EndpointSlice>,
    ctx: Arc<Controller>,
) -> Result<Action, EndpointSliceError> {
    if !managed(&slice) || slice.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = slice.namespace().unwrap_or_default();
    let Some(owner) = slice
        .owner_references()
        .iter()
        .find(|o| o.kind == "Service" && o.controller == Some(true))
        .cloned()
    else {
        return Ok(Action::await_change());
    };
    let cached = ctx
        .services
        .get(&ObjectRef::new(&owner.name).within(&namespace));
    if cached.is_some_and(|s| s.uid().as_deref() == Some(owner.uid.as_str())) {
        return Ok(Action::await_change());
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = services
        .get_opt(&owner.name)
        .await
        .map_err(|source| EndpointSliceError::Api {
            action: format!("looking up service {namespace}/{}", owner.name),
            source,
        })?;
    if live.is_some_and(|s| s.uid().as_deref() == Some(owner.uid.as_str())) {
        return Ok(Action::await_change());
    }
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: slice.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&slice.name_any(), &params).await {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Action::await_change()),
        Err(source) => Err(EndpointSliceError::Api {
            action: format!("deleting endpoint slice {namespace}/{}", slice.name_any()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str) -> Endpoint {
        serde_json::from_value(
            json!({"addresses": ["10.0.0.1"], "targetRef": {"kind": "Pod", "name": name}}),
        )
        .unwrap()
    }

    fn port(n: i32) -> Vec<EndpointPort> {
        vec![EndpointPort {
            name: Some("web".into()),
            port: Some(n),
            protocol: Some("TCP".into()),
            app_protocol: None,
        }]
    }

    fn desired(groups: &[(i32, usize)]) -> Groups {
        groups
            .iter()
            .map(|(p, n)| {
                let endpoints = (0..*n)
                    .map(|i| (format!("p{p}-{i:03}"), endpoint(&format!("p{p}-{i:03}"))))
                    .collect();
                (port_key(&port(*p)), (port(*p), endpoints))
            })
            .collect()
    }

    #[test]
    fn chunks_of_at_most_a_hundred_per_port_set() {
        let planned = plan(Vec::new(), desired(&[(80, 250), (81, 3)]));
        let sizes: Vec<usize> = planned.iter().map(|p| p.endpoints.len()).collect();
        assert_eq!(sizes, vec![100, 100, 50, 3]);
        assert_eq!(planned[3].ports[0].port, Some(81));
    }

    #[test]
    fn existing_slices_keep_their_endpoints_and_fill_up() {
        let slice = |names: &[&str]| -> Arc<EndpointSlice> {
            Arc::new(EndpointSlice {
                metadata: kube::api::ObjectMeta {
                    name: Some(format!("s-{}", names.len())),
                    ..Default::default()
                },
                address_type: "IPv4".into(),
                endpoints: Some(names.iter().map(|n| endpoint(n)).collect()),
                ports: Some(port(80)),
            })
        };
        let existing = vec![slice(&["p80-001", "gone"])];
        let planned = plan(existing, desired(&[(80, 3)]));
        assert_eq!(planned.len(), 1, "new endpoints go to the slice with room");
        assert!(planned[0].existing.is_some());
        let names: Vec<String> = planned[0].endpoints.iter().map(pod_name).collect();
        assert_eq!(names, vec!["p80-000", "p80-001", "p80-002"]);
        // Nothing wanted: the slice stays, empty, as the placeholder.
        let planned = plan(vec![slice(&["gone"])], BTreeMap::new());
        assert_eq!(planned.len(), 1);
        assert!(planned[0].existing.is_some() && planned[0].endpoints.is_empty());
    }
}
