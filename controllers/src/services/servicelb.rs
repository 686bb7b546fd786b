//! ServiceLB (`servicelb`): gives every Service of `type: LoadBalancer` without a
//! `spec.loadBalancerClass` an address in `status.loadBalancer.ingress` (`ipMode: VIP`),
//! as k3s' ServiceLB does; the node agents' service proxies DNAT it. Two modes:
//!
//! - **Node addresses** (no pool, k3s' default): the InternalIPs of the Ready nodes (only
//!   those labelled [`ENABLE_LB`]`=true` when any node is; never those labelled `false`).
//!   Every node's proxy DNATs `node address . protocol . port`, so a port is held by one
//!   Service at a time: a later Service wanting it stays pending (as k3s' svclb pods stay
//!   Pending on the host port) and gets the nodes when the holder lets go. A node where a
//!   pod holds the port as a host port is left out, with a `HostPortConflict` event. With
//!   `externalTrafficPolicy: Local`, the nodes with a ready endpoint of the Service (all
//!   eligible ones while none has).
//! - **A pool** (`--service-lb-pool`): one address per Service, the lowest free one or
//!   `spec.loadBalancerIP` (which must then be in the pool and free: a Service asking for
//!   an address is not given another). When none is free the Service stays pending until
//!   one frees. One Ready node (one with a ready endpoint under `externalTrafficPolicy:
//!   Local`), named in the annotation [`ANNOUNCE_NODE`], puts the address on its interface
//!   so that it answers ARP for it; another is picked when it stops qualifying.
//!
//! What is held is read back from the Services' own status (the cache), so a restarted
//! controller keeps every address; a status written but not yet seen in the cache is
//! *assumed*, and one reconcile runs at a time, so two Services never get one address. A
//! conflict found in the status (written by hand, or by two controllers) goes to the older
//! Service. Pending Services are looked at again when any Service changes or is deleted.
//! Problems are Warning events on the Service (`AllocationFailed`, `HostPortConflict`),
//! each published once while it lasts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

use crate::events::{self, EventType};
use crate::services::endpoints::terminal;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["services"],
        verbs: &["get", "list", "watch", "patch"],
    },
    Rule {
        api_groups: &[""],
        resources: &["services/status"],
        verbs: &["patch", "update"],
    },
    Rule {
        api_groups: &[""],
        resources: &["nodes", "pods"],
        verbs: READ,
    },
    Rule {
        api_groups: &["discovery.k8s.io"],
        resources: &["endpointslices"],
        verbs: READ,
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The field manager of the controller's writes, and its events' source.
pub const MANAGER: &str = "service-lb-controller";

/// The annotation naming the node that announces a pool address (answers ARP for it).
pub const ANNOUNCE_NODE: &str = "orquestra.dev/load-balancer-node";

/// k3s' node label choosing the nodes whose addresses Services get: when any node has it
/// `true`, only those; a node with it `false` never.
pub const ENABLE_LB: &str = "svccontroller.k3s.cattle.io/enablelb";

/// An inclusive range of IPv4 addresses of the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    first: Ipv4Addr,
    last: Ipv4Addr,
    /// As it was given (what events name).
    text: String,
}

/// A pool range that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "invalid load balancer pool range {0:?} (want an IPv4 CIDR a.b.c.d/n or a range a.b.c.d-a.b.c.e)"
)]
pub struct RangeError(String);

impl std::str::FromStr for Range {
    type Err = RangeError;

    fn from_str(s: &str) -> Result<Range, RangeError> {
        let invalid = || RangeError(s.to_owned());
        let ip = |t: &str| t.trim().parse::<Ipv4Addr>().map_err(|_| invalid());
        if let Some((addr, prefix)) = s.split_once('/') {
            let addr = ip(addr)?;
            let prefix: u8 = prefix.trim().parse().map_err(|_| invalid())?;
            if prefix > 32 {
                return Err(invalid());
            }
            let host_bits = u32::MAX.checked_shr(u32::from(prefix)).unwrap_or(0);
            if u32::from(addr) & host_bits != 0 {
                return Err(invalid());
            }
            return Ok(Range {
                first: addr,
                last: Ipv4Addr::from(u32::from(addr) | host_bits),
                text: s.trim().to_owned(),
            });
        }
        let (first, last) = match s.split_once('-') {
            Some((first, last)) => (ip(first)?, ip(last)?),
            None => (ip(s)?, ip(s)?),
        };
        if first > last {
            return Err(invalid());
        }
        Ok(Range {
            first,
            last,
            text: s.trim().to_owned(),
        })
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl Range {
    fn contains(&self, ip: Ipv4Addr) -> bool {
        (self.first..=self.last).contains(&ip)
    }

    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        (u32::from(self.first)..=u32::from(self.last)).map(Ipv4Addr::from)
    }
}

/// The addresses LoadBalancer Services get (`--service-lb-pool`, repeatable); empty: the
/// nodes' own addresses. Every address of a range is given out, network and broadcast
/// addresses of a CIDR included (as MetalLB does): they are single /32s on a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pool {
    ranges: Vec<Range>,
}

impl Pool {
    /// A pool of `ranges`, handed out in their order.
    pub fn new(ranges: Vec<Range>) -> Pool {
        Pool { ranges }
    }

    /// Whether no range is configured (node-address mode).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether `ip` is in the pool.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        self.ranges.iter().any(|r| r.contains(ip))
    }

    fn addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.ranges.iter().flat_map(Range::addresses)
    }
}

impl std::fmt::Display for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, range) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{range}")?;
        }
        Ok(())
    }
}

/// What can go wrong writing one Service's load balancer (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum ServiceLbError {
    /// The Service's status or annotation could not be written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done, naming the Service.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    services: Store<Service>,
    nodes: Store<Node>,
    pods: Store<Pod>,
    slices: Store<EndpointSlice>,
    pool: Pool,
    /// Service UID → (the addresses written, when): not yet seen in the cache.
    assumed: Mutex<HashMap<String, (Vec<Ipv4Addr>, Instant)>>,
    /// Service UID → the warnings already published, so each is said once while it lasts.
    warned: Mutex<HashMap<String, BTreeSet<(String, String)>>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceLbController")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Whether this controller gives `svc` its address: a LoadBalancer of no other class.
pub fn ours(svc: &Service) -> bool {
    svc.spec.as_ref().is_some_and(|s| {
        s.type_.as_deref() == Some("LoadBalancer") && s.load_balancer_class.is_none()
    }) && svc.metadata.deletion_timestamp.is_none()
}

/// The addresses in `svc`'s `status.loadBalancer.ingress`.
fn ingress_ips(svc: &Service) -> Vec<Ipv4Addr> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The `(port, protocol)` pairs of `svc`.
fn ports(svc: &Service) -> BTreeSet<(i32, String)> {
    svc.spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .map(|p| (p.port, p.protocol.clone().unwrap_or_else(|| "TCP".into())))
        .collect()
}

fn local_policy(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
        == Some("Local")
}

/// Older first: creation time, then namespace/name (what wins a conflict).
fn seniority(svc: &Service) -> (Option<Time>, String) {
    (svc.metadata.creation_timestamp.clone(), key(svc))
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

fn ready(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_none()
        && node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn internal_ip(node: &Node) -> Option<Ipv4Addr> {
    node.status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// The Ready nodes with an IPv4 InternalIP that may serve load balancers, by name.
fn eligible(nodes: &[Arc<Node>]) -> BTreeMap<String, Ipv4Addr> {
    fn label(n: &Node) -> Option<&str> {
        n.labels().get(ENABLE_LB).map(String::as_str)
    }
    let chosen = nodes.iter().any(|n| label(n) == Some("true"));
    nodes
        .iter()
        .filter(|n| ready(n) && label(n) != Some("false"))
        .filter(|n| !chosen || label(n) == Some("true"))
        .filter_map(|n| Some((n.name_any(), internal_ip(n)?)))
        .collect()
}

/// The nodes holding a ready endpoint of `svc`.
fn endpoint_nodes(svc: &Service, slices: &[Arc<EndpointSlice>]) -> BTreeSet<String> {
    let (namespace, name) = (svc.namespace(), svc.name_any());
    slices
        .iter()
        .filter(|s| {
            s.namespace() == namespace
                && s.labels().get("kubernetes.io/service-name") == Some(&name)
        })
        .flat_map(|s| s.endpoints.iter().flatten())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.node_name.clone())
        .collect()
}

/// Another Service of this controller and what it holds.
#[derive(Debug, Clone)]
struct Holder {
    key: String,
    seniority: (Option<Time>, String),
    ips: Vec<Ipv4Addr>,
    ports: BTreeSet<(i32, String)>,
}

/// What one reconcile found: the world a Service's load balancer is decided in.
struct View<'a> {
    pool: &'a Pool,
    /// The other Services of this controller, with what they hold.
    others: Vec<Holder>,
    /// What this Service holds now.
    current: Vec<Ipv4Addr>,
    nodes: &'a [Arc<Node>],
    pods: &'a [Arc<Pod>],
    slices: &'a [Arc<EndpointSlice>],
}

/// A Service's load balancer as decided: its addresses (empty: pending), the node
/// announcing them (pool mode), and what to warn about (reason, message).
#[derive(Debug, Default, PartialEq, Eq)]
struct Plan {
    ips: Vec<Ipv4Addr>,
    announcer: Option<String>,
    warnings: Vec<(String, String)>,
}

impl Plan {
    fn failed(reason: &str, message: String) -> Plan {
        Plan {
            warnings: vec![(reason.to_owned(), message)],
            ..Plan::default()
        }
    }
}

const ALLOCATION_FAILED: &str = "AllocationFailed";
const HOST_PORT_CONFLICT: &str = "HostPortConflict";

/// Decides `svc`'s load balancer.
fn plan(svc: &Service, view: &View) -> Plan {
    if view.pool.is_empty() {
        plan_nodes(svc, view)
    } else {
        plan_pool(svc, view)
    }
}

/// Pool mode: one address (asked for, kept, or the lowest free) and its announcer.
fn plan_pool(svc: &Service, view: &View) -> Plan {
    let me = seniority(svc);
    // The holder `ip` is taken from: another Service holding it that is older than this
    // one, or any holder when this one does not hold it yet.
    let holder = |ip: Ipv4Addr| {
        view.others
            .iter()
            .filter(|o| o.ips.contains(&ip))
            .find(|o| !view.current.contains(&ip) || o.seniority < me)
    };
    let pool = view.pool;
    let requested = svc
        .spec
        .as_ref()
        .and_then(|s| s.load_balancer_ip.as_deref())
        .filter(|ip| !ip.is_empty());
    let ip = match requested {
        Some(text) => match text.parse::<Ipv4Addr>() {
            Ok(ip) if pool.contains(ip) => match holder(ip) {
                None => ip,
                Some(o) => {
                    return Plan::failed(
                        ALLOCATION_FAILED,
                        format!(
                            "requested loadBalancerIP {ip} is held by Service {} (pool {pool})",
                            o.key
                        ),
                    );
                }
            },
            _ => {
                return Plan::failed(
                    ALLOCATION_FAILED,
                    format!("requested loadBalancerIP {text} is not in the pool {pool}"),
                );
            }
        },
        None => {
            let kept = view
                .current
                .iter()
                .copied()
                .find(|ip| pool.contains(*ip) && holder(*ip).is_none());
            let held: BTreeSet<Ipv4Addr> = view.others.iter().flat_map(|o| o.ips.clone()).collect();
            match kept.or_else(|| pool.addresses().find(|ip| !held.contains(ip))) {
                Some(ip) => ip,
                None => {
                    return Plan::failed(
                        ALLOCATION_FAILED,
                        format!("no free address in pool {pool}: every one is held"),
                    );
                }
            }
        }
    };
    Plan {
        ips: vec![ip],
        announcer: announcer(svc, view),
        warnings: Vec::new(),
    }
}

/// The node to announce `svc`'s pool address: the current one while it qualifies, else one
/// of the qualifying nodes (spread by the Service's UID); the current one is kept when no
/// node qualifies.
fn announcer(svc: &Service, view: &View) -> Option<String> {
    let current = svc.annotations().get(ANNOUNCE_NODE).cloned();
    let mut candidates: Vec<String> = eligible(view.nodes).into_keys().collect();
    if local_policy(svc) {
        let with_endpoints = endpoint_nodes(svc, view.slices);
        if candidates.iter().any(|n| with_endpoints.contains(n)) {
            candidates.retain(|n| with_endpoints.contains(n));
        }
    }
    if let Some(current) = current.as_ref().filter(|c| candidates.contains(c)) {
        return Some(current.clone());
    }
    if candidates.is_empty() {
        return current;
    }
    let uid = svc.uid().unwrap_or_else(|| key(svc));
    let hash = uid.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let index = usize::try_from(hash % candidates.len() as u64).unwrap_or(0);
    candidates.get(index).cloned()
}

/// Node-address mode: the eligible nodes' addresses, unless another Service holds one of
/// the ports there; nodes where a pod holds the port as a host port left out.
fn plan_nodes(svc: &Service, view: &View) -> Plan {
    let me = seniority(svc);
    let mine = ports(svc);
    let holds = !view.current.is_empty();
    let blocking = view
        .others
        .iter()
        .filter(|o| !o.ips.is_empty() && (!holds || o.seniority < me))
        .find_map(|o| Some((o, o.ports.intersection(&mine).next()?)));
    if let Some((o, (port, protocol))) = blocking {
        return Plan::failed(
            ALLOCATION_FAILED,
            format!(
                "port {port}/{protocol} is held on the nodes' addresses by LoadBalancer Service {}",
                o.key
            ),
        );
    }
    let mut warnings = Vec::new();
    let mut nodes = eligible(view.nodes);
    for pod in view.pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) else {
            continue;
        };
        let Some(node_ip) = nodes.get(node).copied() else {
            continue;
        };
        if terminal(pod) || pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let spec = pod.spec.iter();
        let collision = spec
            .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                let protocol = p.protocol.as_deref().unwrap_or("TCP");
                let on_node = match p.host_ip.as_deref().unwrap_or("") {
                    "" | "0.0.0.0" => true,
                    ip => ip.parse::<Ipv4Addr>().ok() == Some(node_ip),
                };
                p.host_port
                    .is_some_and(|hp| mine.contains(&(hp, protocol.to_owned())))
                    && on_node
            });
        if let Some(p) = collision {
            warnings.push((
                HOST_PORT_CONFLICT.to_owned(),
                format!(
                    "port {}/{} collides with the host port of pod {}/{} on node {node}: \
                     the node is left out",
                    p.host_port.unwrap_or_default(),
                    p.protocol.as_deref().unwrap_or("TCP"),
                    pod.namespace().unwrap_or_default(),
                    pod.name_any()
                ),
            ));
            nodes.remove(node);
        }
    }
    if local_policy(svc) {
        let with_endpoints = endpoint_nodes(svc, view.slices);
        if nodes.keys().any(|n| with_endpoints.contains(n)) {
            nodes.retain(|n, _| with_endpoints.contains(n));
        }
    }
    let mut ips: Vec<Ipv4Addr> = nodes.into_values().collect();
    ips.sort();
    ips.dedup();
    if ips.is_empty() && warnings.is_empty() {
        warnings.push((
            ALLOCATION_FAILED.to_owned(),
            "no Ready node with an IPv4 InternalIP to serve on".to_owned(),
        ));
    }
    warnings.sort();
    Plan {
        ips,
        announcer: None,
        warnings,
    }
}

/// Adds ServiceLB to `manager`, handing out the node addresses (`pool` empty) or `pool`.
pub fn add(manager: &mut Manager, pool: Pool) {
    let services = manager.cache::<Service>(watcher::Config::default());
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let slices = manager.cache::<EndpointSlice>(watcher::Config::default());
    let node_mode = pool.is_empty();
    let context = Arc::new(Controller {
        client: manager.client(),
        services: services.store(),
        nodes: nodes.store(),
        pods: pods.store(),
        slices: slices.store(),
        pool,
        assumed: Mutex::default(),
        warned: Mutex::default(),
    });
    let refs = |services: Vec<Arc<Service>>| {
        services
            .iter()
            .map(|s| ObjectRef::from_obj(s.as_ref()))
            .collect::<Vec<_>>()
    };
    // A Service that changed or went may have freed what pending ones wait for.
    let pending = {
        let store = services.store();
        move |changed: Arc<Service>| {
            refs(
                store
                    .state()
                    .into_iter()
                    .filter(|s| ours(s) && ingress_ips(s).is_empty() && s.uid() != changed.uid())
                    .collect(),
            )
        }
    };
    // Nodes decide the addresses (node mode) and the announcers (pool mode).
    let all = {
        let store = services.store();
        move |_: Arc<Node>| refs(store.state().into_iter().filter(|s| ours(s)).collect())
    };
    // A pod's host ports can take a node from the Services on the same port.
    let colliding = {
        let store = services.store();
        move |pod: Arc<Pod>| {
            let held: BTreeSet<(i32, String)> = pod
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
                .flat_map(|c| c.ports.iter().flatten())
                .filter_map(|p| Some((p.host_port?, p.protocol.clone().unwrap_or("TCP".into()))))
                .collect();
            if !node_mode || held.is_empty() {
                return Vec::new();
            }
            refs(
                store
                    .state()
                    .into_iter()
                    .filter(|s| ours(s) && !ports(s).is_disjoint(&held))
                    .collect(),
            )
        }
    };
    // Endpoints moving between nodes matter under `externalTrafficPolicy: Local`.
    let local = {
        let store = services.store();
        move |slice: Arc<EndpointSlice>| {
            let name = slice.labels().get("kubernetes.io/service-name")?;
            let svc = store.get(&ObjectRef::new(name).within(&slice.namespace()?))?;
            (ours(&svc) && local_policy(&svc)).then(|| ObjectRef::from_obj(svc.as_ref()))
        }
    };
    let runner = Runner::for_cache("servicelb", &services)
        .and_then(|r| r.watches(&services, pending.clone()))
        .and_then(|r| r.watches_deleted(&services, pending))
        .and_then(|r| r.watches(&nodes, all.clone()))
        .and_then(|r| r.watches_deleted(&nodes, all))
        .and_then(|r| r.watches(&pods, colliding.clone()))
        .and_then(|r| r.watches_deleted(&pods, colliding))
        .and_then(|r| r.watches(&slices, local))
        .expect("the caches were just created, before run")
        // One at a time: an address is decided against every other Service's.
        .concurrency(1);
    manager.add(runner, reconcile, context);
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Controller>) -> Result<Action, ServiceLbError> {
    let uid = svc.uid().unwrap_or_default();
    if svc.metadata.deletion_timestamp.is_some() {
        ctx.forget(&uid);
        return Ok(Action::await_change());
    }
    if !ours(&svc) {
        ctx.forget(&uid);
        return ctx.release(&svc).await;
    }
    let Some(view) = ctx.view(&svc) else {
        // Its last write is not in the cache yet.
        return Ok(Action::requeue(Duration::from_millis(500)));
    };
    let plan = plan(
        &svc,
        &View {
            pool: &ctx.pool,
            others: view.0,
            current: view.1,
            nodes: &ctx.nodes.state(),
            pods: &if ctx.pool.is_empty() {
                ctx.pods.state()
            } else {
                Vec::new()
            },
            slices: &ctx.slices.state(),
        },
    );
    ctx.warn(&svc, &plan.warnings).await;
    let result = ctx.write(&svc, &plan).await;
    if let Err(ServiceLbError::Api {
        source: kube::Error::Api(s),
        ..
    }) = &result
        && (s.code == 409 || s.code == 404)
    {
        // Changed meanwhile (its next event brings it back) or gone.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    result.map(|()| Action::await_change())
}

impl Controller {
    /// The other Services of this controller with what they hold, and what `svc` holds;
    /// `None` while `svc`'s own last write is not in the cache.
    fn view(&self, svc: &Service) -> Option<(Vec<Holder>, Vec<Ipv4Addr>)> {
        let uid = svc.uid().unwrap_or_default();
        let mut assumed = self.assumed.lock().unwrap_or_else(|e| e.into_inner());
        let services = self.services.state();
        let present: BTreeMap<String, &Arc<Service>> = services
            .iter()
            .filter_map(|s| Some((s.uid()?, s)))
            .collect();
        // Forget what the cache shows now, what is a minute old, and Services gone.
        assumed.retain(|u, (ips, at)| {
            present
                .get(u)
                .is_some_and(|s| ingress_ips(s) != *ips && at.elapsed() < Duration::from_secs(60))
        });
        self.warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|u, _| present.contains_key(u));
        if assumed.contains_key(&uid) {
            return None;
        }
        let others = services
            .iter()
            .filter(|s| ours(s) && s.uid().as_deref() != Some(uid.as_str()))
            .map(|s| Holder {
                key: key(s),
                seniority: seniority(s),
                ips: s
                    .uid()
                    .and_then(|u| assumed.get(&u))
                    .map_or_else(|| ingress_ips(s), |(ips, _)| ips.clone()),
                ports: ports(s),
            })
            .collect();
        Some((others, ingress_ips(svc)))
    }

    fn forget(&self, uid: &str) {
        self.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        self.warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// A Service that is no longer ours: its address and announcer go.
    async fn release(&self, svc: &Service) -> Result<Action, ServiceLbError> {
        let is_lb = svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer");
        // Another class's controller owns the status of its LoadBalancers.
        if !is_lb && !ingress_ips(svc).is_empty() {
            self.patch_status(svc, &[]).await?;
        }
        if svc.annotations().contains_key(ANNOUNCE_NODE) {
            self.patch_announcer(svc, None).await?;
        }
        Ok(Action::await_change())
    }

    /// Writes what differs from `plan`: the status (guarded by the resourceVersion the plan
    /// was made on), then the announcer.
    async fn write(&self, svc: &Service, plan: &Plan) -> Result<(), ServiceLbError> {
        let current = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default();
        let unchanged = current.len() == plan.ips.len()
            && current.iter().zip(&plan.ips).all(|(i, ip)| {
                i.ip.as_deref() == Some(ip.to_string().as_str())
                    && i.ip_mode.as_deref() == Some("VIP")
                    && i.hostname.is_none()
                    && i.ports.is_none()
            });
        if !unchanged {
            self.patch_status(svc, &plan.ips).await?;
            if !plan.ips.is_empty() {
                let list: Vec<String> = plan.ips.iter().map(Ipv4Addr::to_string).collect();
                events::publish(
                    &self.client,
                    MANAGER,
                    svc,
                    EventType::Normal,
                    "IPAllocated",
                    &format!("Assigned IP {list:?}"),
                )
                .await;
            }
        }
        let announcer = if plan.ips.is_empty() {
            None
        } else {
            plan.announcer.clone()
        };
        if svc.annotations().get(ANNOUNCE_NODE) != announcer.as_ref() {
            self.patch_announcer(svc, announcer.as_deref()).await?;
        }
        Ok(())
    }

    async fn patch_status(&self, svc: &Service, ips: &[Ipv4Addr]) -> Result<(), ServiceLbError> {
        let name = svc.name_any();
        let namespace = svc.namespace().unwrap_or_default();
        let ingress: Vec<serde_json::Value> = ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string(), "ipMode": "VIP"}))
            .collect();
        let patch = json!({
            "metadata": {"resourceVersion": svc.resource_version()},
            "status": {"loadBalancer": {"ingress": if ips.is_empty() {
                serde_json::Value::Null
            } else {
                json!(ingress)
            }}},
        });
        let api: Api<Service> = Api::namespaced(self.client.clone(), &namespace);
        api.patch_status(&name, &params(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ServiceLbError::Api {
                action: format!("writing the load balancer status of service {namespace}/{name}"),
                source,
            })?;
        if let Some(uid) = svc.uid() {
            self.assumed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid, (ips.to_vec(), Instant::now()));
        }
        tracing::info!(service = %key(svc), addresses = ?ips, "load balancer addresses");
        Ok(())
    }

    async fn patch_announcer(
        &self,
        svc: &Service,
        node: Option<&str>,
    ) -> Result<(), ServiceLbError> {
        let name = svc.name_any();
        let namespace = svc.namespace().unwrap_or_default();
        let patch = json!({"metadata": {"annotations": {ANNOUNCE_NODE: node}}});
        let api: Api<Service> = Api::namespaced(self.client.clone(), &namespace);
        api.patch(&name, &params(), &Patch::Merge(&patch))
            .await
            .map_err(|source| ServiceLbError::Api {
                action: format!("naming the announcing node of service {namespace}/{name}"),
                source,
            })?;
        Ok(())
    }

    /// Publishes the warnings not published yet; forgets those no longer true, so they are
    /// said again should they return.
    async fn warn(&self, svc: &Service, warnings: &[(String, String)]) {
        let Some(uid) = svc.uid() else {
            return;
        };
        let fresh: Vec<(String, String)> = {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            let now: BTreeSet<(String, String)> = warnings.iter().cloned().collect();
            let before = warned.insert(uid.clone(), now.clone()).unwrap_or_default();
            if now.is_empty() {
                warned.remove(&uid);
            }
            now.difference(&before).cloned().collect()
        };
        for (reason, message) in fresh {
            tracing::warn!(service = %key(svc), reason, "{message}");
            events::publish(
                &self.client,
                MANAGER,
                svc,
                EventType::Warning,
                &reason,
                &message,
            )
            .await;
        }
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, created: &str, extra: serde_json::Value) -> Service {
        let mut svc = json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "creationTimestamp": created},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80, "protocol": "TCP"}]},
        });
        merge(&mut svc, extra);
        serde_json::from_value(svc).unwrap()
    }

    fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
        match (into, from) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    fn node(name: &str, ip: &str, ready: bool) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {
                    "addresses": [{"type": "InternalIP", "address": ip}],
                    "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
                },
            }))
            .unwrap(),
        )
    }

    fn holder(svc: &Service, ips: &[&str]) -> Holder {
        Holder {
            key: key(svc),
            seniority: seniority(svc),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ports: ports(svc),
        }
    }

    fn ip(text: &str) -> Ipv4Addr {
        text.parse().unwrap()
    }

    const T0: &str = "2025-01-01T00:00:00Z";
    const T1: &str = "2025-01-01T00:01:00Z";

    #[test]
    fn ranges() {
        let r: Range = "10.214.0.200/30".parse().unwrap();
        assert_eq!(r.addresses().count(), 4);
        assert_eq!(r.to_string(), "10.214.0.200/30");
        let r: Range = "10.0.0.5-10.0.0.7".parse().unwrap();
        assert_eq!(
            r.addresses().collect::<Vec<_>>(),
            [ip("10.0.0.5"), ip("10.0.0.6"), ip("10.0.0.7")]
        );
        assert_eq!(r.to_string(), "10.0.0.5-10.0.0.7");
        let r: Range = "10.0.0.9".parse().unwrap();
        assert_eq!(r.addresses().count(), 1);
        assert_eq!(
            "10.0.0.0/32".parse::<Range>().unwrap().addresses().count(),
            1
        );
        for bad in [
            "10.0.0.1/30",
            "10.0.0.7-10.0.0.5",
            "10.0.0.0/33",
            "nonsense",
            "fd00::/64",
        ] {
            assert!(bad.parse::<Range>().is_err(), "{bad}");
        }
        let pool = Pool::new(vec![
            "10.0.0.8/31".parse().unwrap(),
            "10.0.1.1".parse().unwrap(),
        ]);
        assert_eq!(pool.to_string(), "10.0.0.8/31, 10.0.1.1");
        assert!(pool.contains(ip("10.0.1.1")) && !pool.contains(ip("10.0.0.10")));
    }

    #[test]
    fn pool_hands_out_the_lowest_free_address_and_waits_when_exhausted() {
        let pool = Pool::new(vec!["10.214.0.200/31".parse().unwrap()]);
        let nodes = [
            node("h0", "10.214.0.11", true),
            node("h1", "10.214.0.12", false),
        ];
        let a = service("a", T0, json!({}));
        let b = service("b", T1, json!({}));
        let c = service("c", T1, json!({}));
        let view = |others: Vec<Holder>, current: &[&str]| View {
            pool: &pool,
            others,
            current: current.iter().map(|i| ip(i)).collect(),
            nodes: &nodes,
            pods: &[],
            slices: &[],
        };
        let first = plan(&b, &view(vec![holder(&a, &["10.214.0.200"])], &[]));
        assert_eq!(first.ips, [ip("10.214.0.201")]);
        assert_eq!(
            first.announcer.as_deref(),
            Some("h0"),
            "the only Ready node"
        );
        let full = plan(
            &c,
            &view(
                vec![holder(&a, &["10.214.0.200"]), holder(&b, &["10.214.0.201"])],
                &[],
            ),
        );
        assert!(full.ips.is_empty());
        assert_eq!(full.warnings[0].0, "AllocationFailed");
        assert!(
            full.warnings[0].1.contains("pool 10.214.0.200/31"),
            "{full:?}"
        );
        // A Service keeps what it holds; a conflict goes to the older one.
        let kept = plan(&b, &view(vec![holder(&a, &[])], &["10.214.0.201"]));
        assert_eq!(kept.ips, [ip("10.214.0.201")]);
        let lost = plan(
            &b,
            &view(vec![holder(&a, &["10.214.0.201"])], &["10.214.0.201"]),
        );
        assert_eq!(lost.ips, [ip("10.214.0.200")]);
        let won = plan(
            &a,
            &view(vec![holder(&b, &["10.214.0.201"])], &["10.214.0.201"]),
        );
        assert_eq!(won.ips, [ip("10.214.0.201")]);
    }

    #[test]
    fn pool_honours_load_balancer_ip() {
        let pool = Pool::new(vec!["10.214.0.200-10.214.0.203".parse().unwrap()]);
        let nodes = [node("h0", "10.214.0.11", true)];
        let view = |others: Vec<Holder>| View {
            pool: &pool,
            others,
            current: Vec::new(),
            nodes: &nodes,
            pods: &[],
            slices: &[],
        };
        let asks = |ip: &str| service("b", T1, json!({"spec": {"loadBalancerIP": ip}}));
        let a = service("a", T0, json!({}));
        assert_eq!(
            plan(&asks("10.214.0.202"), &view(Vec::new())).ips,
            [ip("10.214.0.202")]
        );
        let taken = plan(
            &asks("10.214.0.202"),
            &view(vec![holder(&a, &["10.214.0.202"])]),
        );
        assert!(
            taken.ips.is_empty() && taken.warnings[0].1.contains("default/a"),
            "{taken:?}"
        );
        let outside = plan(&asks("10.9.9.9"), &view(Vec::new()));
        assert!(outside.ips.is_empty() && outside.warnings[0].1.contains("not in the pool"));
    }

    #[test]
    fn announcer_stays_while_ready_and_follows_local_endpoints() {
        let pool = Pool::new(vec!["10.214.0.200/32".parse().unwrap()]);
        let nodes = [
            node("h0", "10.214.0.11", true),
            node("h1", "10.214.0.12", true),
        ];
        let slices = [Arc::new(
            serde_json::from_value::<EndpointSlice>(json!({
                "metadata": {"name": "a-x", "namespace": "default",
                             "labels": {"kubernetes.io/service-name": "a"}},
                "addressType": "IPv4",
                "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "h1",
                               "conditions": {"ready": true}}],
            }))
            .unwrap(),
        )];
        let view = View {
            pool: &pool,
            others: Vec::new(),
            current: Vec::new(),
            nodes: &nodes,
            pods: &[],
            slices: &slices,
        };
        let on = |node: &str, extra: serde_json::Value| {
            let mut extra = extra;
            merge(
                &mut extra,
                json!({"metadata": {"annotations": {ANNOUNCE_NODE: node}}}),
            );
            service("a", T0, extra)
        };
        assert_eq!(
            plan(&on("h0", json!({})), &view).announcer.as_deref(),
            Some("h0")
        );
        assert!(plan(&on("gone", json!({})), &view).announcer.is_some());
        let local = json!({"spec": {"externalTrafficPolicy": "Local"}});
        assert_eq!(
            plan(&on("h0", local), &view).announcer.as_deref(),
            Some("h1")
        );
    }

    #[test]
    fn node_addresses_one_service_per_port() {
        let pool = Pool::default();
        let nodes = [
            node("h0", "10.214.0.11", true),
            node("h1", "10.214.0.12", true),
            node("h2", "10.214.0.13", false),
        ];
        let view = |others: Vec<Holder>, current: &[&str]| View {
            pool: &pool,
            others,
            current: current.iter().map(|i| ip(i)).collect(),
            nodes: &nodes,
            pods: &[],
            slices: &[],
        };
        let a = service("a", T0, json!({}));
        let b = service("b", T1, json!({}));
        let other_port = service("c", T1, json!({"spec": {"ports": [{"port": 81}]}}));
        let got = plan(&a, &view(Vec::new(), &[]));
        assert_eq!(
            got.ips,
            [ip("10.214.0.11"), ip("10.214.0.12")],
            "Ready nodes only"
        );
        assert!(got.announcer.is_none() && got.warnings.is_empty());
        // b wants a's port: pending, naming a; another port is fine.
        let a_holds = || holder(&a, &["10.214.0.11", "10.214.0.12"]);
        let pending = plan(&b, &view(vec![a_holds()], &[]));
        assert!(pending.ips.is_empty());
        assert_eq!(pending.warnings[0].0, "AllocationFailed");
        assert!(
            pending.warnings[0].1.contains("80/TCP") && pending.warnings[0].1.contains("default/a")
        );
        assert_eq!(plan(&other_port, &view(vec![a_holds()], &[])).ips.len(), 2);
        // UDP on the same number is another port.
        let udp = service(
            "u",
            T1,
            json!({"spec": {"ports": [{"port": 80, "protocol": "UDP"}]}}),
        );
        assert_eq!(plan(&udp, &view(vec![a_holds()], &[])).ips.len(), 2);
        // Both holding (a conflict in the status): the older keeps it.
        let b_holds = holder(&b, &["10.214.0.11"]);
        assert_eq!(
            plan(&a, &view(vec![b_holds], &["10.214.0.11"])).ips.len(),
            2
        );
        assert!(
            plan(&b, &view(vec![a_holds()], &["10.214.0.11"]))
                .ips
                .is_empty()
        );
    }

    #[test]
    fn node_addresses_leave_out_host_port_collisions_and_follow_labels() {
        let pool = Pool::default();
        let mut nodes = vec![
            node("h0", "10.214.0.11", true),
            node("h1", "10.214.0.12", true),
        ];
        let pod = |name: &str, node: &str, port: serde_json::Value| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "hp"},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "ports": [port]}]},
                    "status": {"phase": "Running"},
                }))
                .unwrap(),
            )
        };
        let pods = [
            pod(
                "on-h0",
                "h0",
                json!({"containerPort": 8080, "hostPort": 80}),
            ),
            // Another address, another protocol: no collision.
            pod(
                "other-ip",
                "h1",
                json!({"containerPort": 1, "hostPort": 80, "hostIP": "10.9.9.9"}),
            ),
            pod(
                "udp",
                "h1",
                json!({"containerPort": 1, "hostPort": 80, "protocol": "UDP"}),
            ),
        ];
        let svc = service("a", T0, json!({}));
        let got = plan(
            &svc,
            &View {
                pool: &pool,
                others: Vec::new(),
                current: Vec::new(),
                nodes: &nodes,
                pods: &pods,
                slices: &[],
            },
        );
        assert_eq!(got.ips, [ip("10.214.0.12")]);
        assert_eq!(got.warnings.len(), 1, "{got:?}");
        assert_eq!(got.warnings[0].0, "HostPortConflict");
        assert!(got.warnings[0].1.contains("hp/on-h0"), "{got:?}");
        // Every node taken: pending, the conflicts say why.
        let all = [
            pods[0].clone(),
            pod("on-h1", "h1", json!({"containerPort": 1, "hostPort": 80})),
        ];
        let none = plan(
            &svc,
            &View {
                pool: &pool,
                others: Vec::new(),
                current: Vec::new(),
                nodes: &nodes,
                pods: &all,
                slices: &[],
            },
        );
        assert!(none.ips.is_empty() && none.warnings.len() == 2, "{none:?}");
        // k3s' label picks the nodes.
        let labelled: Node = serde_json::from_value(json!({
            "metadata": {"name": "h1", "labels": {ENABLE_LB: "true"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.214.0.12"}],
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .unwrap();
        nodes[1] = Arc::new(labelled);
        let got = plan(
            &svc,
            &View {
                pool: &pool,
                others: Vec::new(),
                current: Vec::new(),
                nodes: &nodes,
                pods: &[],
                slices: &[],
            },
        );
        assert_eq!(got.ips, [ip("10.214.0.12")]);
    }
}
