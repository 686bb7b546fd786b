//! What a scheduling cycle reads: the nodes parsed once, and what is placed on each (bound
//! pods plus the ones the scheduler assumed or nominated there). Parsing quantities and
//! selectors per node per pod would dominate a cycle over hundreds of nodes, so it happens
//! here once per snapshot, and a placed pod's requests once per pod.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Container, Node, Pod};
use kube::ResourceExt;
use orquestra_operator::quantity;

/// Resources the node agent reports but the scheduler does not account (the agent reports
/// no ephemeral storage).
const UNACCOUNTED: &[&str] = &["cpu", "memory", "pods", "ephemeral-storage"];

/// A node as the filters read it, its quantities parsed once per snapshot.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub(crate) node: Arc<Node>,
    pub(crate) name: String,
    pub(crate) ready: bool,
    pub(crate) cpu: Option<i64>,
    pub(crate) memory: Option<i64>,
    pub(crate) pods: Option<i64>,
    /// Extended resources (`example.com/foo`, hugepages) in milli-units.
    pub(crate) scalars: Vec<(String, i64)>,
}

impl NodeInfo {
    /// Parses `node` for the filters and scores.
    pub fn new(node: Arc<Node>) -> NodeInfo {
        let status = node.status.as_ref();
        let ready = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        let allocatable = status.and_then(|s| s.allocatable.as_ref());
        let alloc = |name: &str, parse: fn(&str) -> Option<i64>| {
            allocatable
                .and_then(|a| a.get(name))
                .and_then(|q| parse(&q.0))
        };
        let scalars = allocatable
            .into_iter()
            .flatten()
            .filter(|(name, _)| !UNACCOUNTED.contains(&name.as_str()))
            .filter_map(|(name, q)| Some((name.clone(), quantity::millicores(&q.0)?)))
            .collect();
        NodeInfo {
            name: node.name_any(),
            ready,
            cpu: alloc("cpu", quantity::millicores),
            memory: alloc("memory", quantity::bytes),
            pods: alloc("pods", |q| q.parse().ok()),
            scalars,
            node,
        }
    }

    /// The node's value of label `key`.
    pub(crate) fn label(&self, key: &str) -> Option<&String> {
        self.node.metadata.labels.as_ref()?.get(key)
    }

    /// Allocatable of extended resource `name` (0 when the node has none).
    pub(crate) fn scalar(&self, name: &str) -> i64 {
        self.scalars
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, q)| *q)
    }
}

/// A host port a container binds: IP (empty for all), port, protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPort {
    /// `hostIP`; empty or `0.0.0.0` for every address.
    pub ip: String,
    /// `hostPort`.
    pub port: i32,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
}

impl HostPort {
    /// Whether two pods binding these could not share a node: same port and protocol, and
    /// the same address or either binding every address.
    pub fn conflicts(&self, other: &HostPort) -> bool {
        let any = |ip: &str| ip.is_empty() || ip == "0.0.0.0" || ip == "::";
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || any(&self.ip) || any(&other.ip))
    }
}

/// CPU (millicores), memory (bytes), extended resources and host ports a pod asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// Millicores.
    pub cpu: i64,
    /// Bytes.
    pub memory: i64,
    /// Extended resources, in milli-units.
    pub scalars: Vec<(String, i64)>,
    /// The host ports.
    pub ports: Vec<HostPort>,
}

/// A pod's effective requests: the sum over containers, or the largest init container's if
/// larger (init containers run one at a time), plus the pod overhead.
pub fn requests(pod: &Pod) -> Requests {
    let mut wanted = Requests::default();
    let Some(spec) = pod.spec.as_ref() else {
        return wanted;
    };
    let each = |c: &Container| {
        c.resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .into_iter()
            .flatten()
            .filter(|(name, _)| name.as_str() != "ephemeral-storage")
            .filter_map(|(name, q)| {
                let parse = if name == "memory" {
                    quantity::bytes
                } else {
                    quantity::millicores
                };
                Some((name.clone(), parse(&q.0)?))
            })
            .collect::<Vec<_>>()
    };
    let mut totals: Vec<(String, i64)> = Vec::new();
    for c in &spec.containers {
        for (name, q) in each(c) {
            match totals.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total += q,
                None => totals.push((name, q)),
            }
        }
        for p in c.ports.iter().flatten() {
            if let Some(port) = p.host_port.filter(|p| *p > 0) {
                wanted.ports.push(HostPort {
                    ip: p.host_ip.clone().unwrap_or_default(),
                    port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                });
            }
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (name, q) in each(c) {
            match totals.iter_mut().find(|(n, _)| *n == name) {
                Some((_, total)) => *total = (*total).max(q),
                None => totals.push((name, q)),
            }
        }
    }
    for (name, q) in spec.overhead.iter().flatten() {
        let parse = if name == "memory" {
            quantity::bytes
        } else {
            quantity::millicores
        };
        if let Some(q) = parse(&q.0) {
            match totals.iter_mut().find(|(n, _)| n == name) {
                Some((_, total)) => *total += q,
                None => totals.push((name.clone(), q)),
            }
        }
    }
    for (name, q) in totals {
        match name.as_str() {
            "cpu" => wanted.cpu = q,
            "memory" => wanted.memory = q,
            _ if q > 0 => wanted.scalars.push((name, q)),
            _ => {}
        }
    }
    wanted
}

/// A pod's priority (`spec.priority`, resolved at admission; 0 if unset).
pub fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// What is parsed once per placed pod: requests, owner, priority.
#[derive(Debug)]
pub struct Parsed {
    /// What it takes from its node.
    pub wanted: Requests,
    /// Its controller's UID.
    pub owner: Option<String>,
    /// `spec.priority`.
    pub priority: i32,
    /// Whether it has pod (anti-)affinity terms others must respect.
    pub affinity: bool,
    /// Those terms resolved, when none has a `namespaceSelector` (whose answer changes
    /// with the namespaces' labels: such terms are resolved at each snapshot).
    pub terms: Option<Arc<super::interpod::PodTerms>>,
}

impl Parsed {
    /// Parses `pod`.
    pub fn of(pod: &Pod) -> Parsed {
        let affinity = pod
            .spec
            .as_ref()
            .and_then(|s| s.affinity.as_ref())
            .is_some_and(|a| a.pod_affinity.is_some() || a.pod_anti_affinity.is_some());
        let terms = (affinity && !super::interpod::selects_namespaces(pod)).then(|| {
            Arc::new(super::interpod::PodTerms::of(
                pod,
                &super::interpod::NamespaceLabels::new(),
            ))
        });
        Parsed {
            wanted: requests(pod),
            owner: crate::objects::controller_uid(pod).map(str::to_owned),
            priority: priority(pod),
            affinity,
            terms,
        }
    }
}

/// A pod on a node: the object as last seen, and what was parsed of it.
#[derive(Clone, Debug)]
pub struct Placed {
    /// The pod.
    pub pod: Arc<Pod>,
    /// Its requests, owner, priority.
    pub parsed: Arc<Parsed>,
}

/// What is placed on a node.
#[derive(Debug, Default, Clone)]
pub struct Usage {
    pub(crate) cpu: i64,
    pub(crate) memory: i64,
    pub(crate) pods: i64,
    pub(crate) scalars: Vec<(String, i64)>,
    pub(crate) ports: Vec<HostPort>,
    /// Pods per owner UID, for spreading.
    pub(crate) owners: HashMap<String, i64>,
    /// The pods themselves, for preemption and pod affinity.
    pub(crate) placed: Vec<Placed>,
}

impl Usage {
    /// Counts `placed` on the node.
    pub(crate) fn add(&mut self, placed: Placed) {
        let parsed = &placed.parsed;
        let r = &parsed.wanted;
        self.cpu += r.cpu;
        self.memory += r.memory;
        self.pods += 1;
        for (name, q) in &r.scalars {
            match self.scalars.iter_mut().find(|(n, _)| n == name) {
                Some((_, used)) => *used += q,
                None => self.scalars.push((name.clone(), *q)),
            }
        }
        self.ports.extend(r.ports.iter().cloned());
        if let Some(owner) = parsed.owner.as_deref() {
            match self.owners.get_mut(owner) {
                Some(count) => *count += 1,
                None => {
                    self.owners.insert(owner.to_owned(), 1);
                }
            }
        }
        self.placed.push(placed);
    }

    /// Takes pod `uid` off the node (a preemption victim, in a what-if).
    pub(crate) fn remove(&mut self, uid: &str) -> Option<Placed> {
        let at = self
            .placed
            .iter()
            .position(|p| p.pod.metadata.uid.as_deref() == Some(uid))?;
        let placed = self.placed.swap_remove(at);
        let r = &placed.parsed.wanted;
        self.cpu -= r.cpu;
        self.memory -= r.memory;
        self.pods -= 1;
        for (name, q) in &r.scalars {
            if let Some((_, used)) = self.scalars.iter_mut().find(|(n, _)| n == name) {
                *used -= q;
            }
        }
        for port in &r.ports {
            if let Some(at) = self.ports.iter().position(|p| p == port) {
                self.ports.swap_remove(at);
            }
        }
        if let Some(owner) = placed.parsed.owner.as_deref()
            && let Some(count) = self.owners.get_mut(owner)
        {
            *count -= 1;
        }
        Some(placed)
    }

    /// How much of extended resource `name` is taken.
    pub(crate) fn scalar(&self, name: &str) -> i64 {
        self.scalars
            .iter()
            .find(|(n, _)| n == name)
            .map_or(0, |(_, q)| *q)
    }
}

/// What the cluster looked like at the start of a stretch of cycles.
#[derive(Debug)]
pub struct Snapshot {
    pub(crate) taken: Instant,
    pub(crate) nodes: Vec<NodeInfo>,
    /// What is placed on each node, by its index in `nodes`: a cycle looks at hundreds of
    /// nodes, so no hashing of names there.
    pub(crate) usage: Vec<Usage>,
    /// Node name → index.
    pub(crate) index: HashMap<String, usize>,
    /// Placed pods with pod (anti-)affinity terms, and their node's index: the terms every
    /// new pod must respect.
    pub(crate) with_affinity: Vec<(usize, Arc<super::interpod::PodTerms>)>,
    /// Namespace labels, for terms' `namespaceSelector`s.
    pub(crate) namespaces: super::interpod::NamespaceLabels,
    /// Pending pods (not gated), higher priority first: `(priority, uid)`.
    pub(crate) pending: Vec<(i32, String)>,
    /// Whether any node has a `PreferNoSchedule` taint (scored only then).
    pub(crate) soft_taints: bool,
}

impl Snapshot {
    /// Counts `placed` on node `at`.
    pub(crate) fn place(&mut self, at: usize, placed: Placed) {
        if placed.parsed.affinity {
            let terms = match &placed.parsed.terms {
                Some(terms) => Arc::clone(terms),
                None => Arc::new(super::interpod::PodTerms::of(&placed.pod, &self.namespaces)),
            };
            self.with_affinity.push((at, terms));
        }
        if let Some(usage) = self.usage.get_mut(at) {
            usage.add(placed);
        }
    }
}
