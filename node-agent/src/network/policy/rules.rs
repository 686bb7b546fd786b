//! What the NetworkPolicies allow, for the pods of one node: pure computation from the
//! policies, pods and namespaces to a [`Ruleset`] — per isolated local pod, the set of
//! `(peer address, protocol, port)` boxes some policy's rule allows. Nothing here touches
//! the kernel; [`super::table`] turns a ruleset into nftables text.
//!
//! Semantics (networking.k8s.io/v1): a pod selected by a policy whose `policyTypes` name
//! Ingress (the default; Egress too when the policy has egress rules) is isolated for
//! ingress and accepts only what the union of those policies' ingress rules allows; the same
//! for egress. A rule's peers are pods by `podSelector` (in the policy's namespace),
//! `namespaceSelector` (every pod of the namespaces it selects), both (the pods the pod
//! selector picks in those namespaces), or an `ipBlock` (`cidr` minus `except`); no peers
//! means everyone. Its ports are numbers, ranges (`endPort`) or names, resolved against the
//! destination pod's container ports (the local pod for ingress, the peer pod for egress);
//! no ports means every protocol and port. A pod reaching itself is always allowed (the
//! spec leaves it undefined; the kubelet's loopback never passes here either).
//!
//! IPv4 only, as the service proxy: IPv6 blocks and addresses are ignored.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

/// An inclusive range of values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Span<T> {
    /// The first value.
    pub first: T,
    /// The last value (inclusive).
    pub last: T,
}

impl<T: Copy> Span<T> {
    /// The span of one value.
    pub fn one(value: T) -> Span<T> {
        Span {
            first: value,
            last: value,
        }
    }
}

/// Every protocol number.
pub const ANY_PROTOCOL: Span<u8> = Span {
    first: 0,
    last: u8::MAX,
};

/// Every port.
pub const ANY_PORT: Span<u16> = Span {
    first: 0,
    last: u16::MAX,
};

/// Every IPv4 address.
pub const ANY_ADDRESS: Span<u32> = Span {
    first: 0,
    last: u32::MAX,
};

/// IANA protocol numbers of the protocols a policy port can name.
const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

/// One element of a pod's allow set: peers in `peer`, with a protocol in `protocol` and a
/// destination port in `port`. Protocols without ports match on whatever `th dport`
/// reads, so rules without ports use [`ANY_PORT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Allowed {
    /// The peer's addresses (the source for ingress, the destination for egress).
    pub peer: Span<u32>,
    /// Protocol numbers.
    pub protocol: Span<u8>,
    /// Destination ports.
    pub port: Span<u16>,
}

impl Allowed {
    /// Whether a packet with these values falls in this element.
    pub fn contains(&self, peer: Ipv4Addr, protocol: u8, port: u16) -> bool {
        let peer = u32::from(peer);
        (self.peer.first..=self.peer.last).contains(&peer)
            && (self.protocol.first..=self.protocol.last).contains(&protocol)
            && (self.port.first..=self.port.last).contains(&port)
    }
}

/// A local pod isolated in one direction, and everything allowed to or from it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Isolated {
    /// `namespace/name`, for names in the table.
    pub pod: String,
    /// Disjoint elements: nftables refuses overlapping elements of an interval set. The
    /// pod's own address is not among them: its chain lets it through before the set.
    pub allowed: BTreeSet<Allowed>,
}

impl Isolated {
    /// Whether this set lets `peer` through on `protocol`/`port`.
    pub fn allows(&self, peer: Ipv4Addr, protocol: u8, port: u16) -> bool {
        self.allowed
            .iter()
            .any(|a| a.contains(peer, protocol, port))
    }
}

/// The policies' verdicts for this node's pods: its pods isolated for ingress and for
/// egress, by address. Pods in neither map are not restricted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Local pods isolated for ingress (what may reach them).
    pub ingress: BTreeMap<Ipv4Addr, Isolated>,
    /// Local pods isolated for egress (what they may reach).
    pub egress: BTreeMap<Ipv4Addr, Isolated>,
}

impl Ruleset {
    /// Whether this node lets a new connection from `from` to `to` through: the model of
    /// the packet path (egress of the source if isolated here, then ingress of the
    /// destination), for tests and diagnostics.
    pub fn allows(&self, from: Ipv4Addr, to: Ipv4Addr, protocol: u8, port: u16) -> bool {
        // A pod reaching itself (through a Service): its chains let it through.
        if from == to {
            return true;
        }
        self.egress
            .get(&from)
            .is_none_or(|e| e.allows(to, protocol, port))
            && self
                .ingress
                .get(&to)
                .is_none_or(|i| i.allows(from, protocol, port))
    }

    /// How many elements the pods' sets hold together.
    pub fn elements(&self) -> usize {
        self.ingress
            .values()
            .chain(self.egress.values())
            .map(|i| i.allowed.len())
            .sum()
    }
}

/// A pod that can be a target or a peer: it has an IPv4 address in the pod network and
/// has not finished (a finished pod's address may be handed to another).
#[derive(Debug)]
struct PodInfo<'a> {
    namespace: String,
    name: String,
    labels: &'a BTreeMap<String, String>,
    node: Option<&'a str>,
    ips: Vec<Ipv4Addr>,
    /// Container ports: (name, protocol, number).
    ports: Vec<(&'a str, u8, u16)>,
}

impl PodInfo<'_> {
    /// The number of the container port called `name` for `protocol`.
    fn named_port(&self, name: &str, protocol: u8) -> Option<u16> {
        self.ports
            .iter()
            .find(|(n, p, _)| *n == name && *p == protocol)
            .map(|(_, _, number)| *number)
    }
}

fn pod_info(pod: &Pod) -> Option<PodInfo<'_>> {
    let (spec, status) = (pod.spec.as_ref()?, pod.status.as_ref()?);
    if spec.host_network == Some(true)
        || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
    {
        return None;
    }
    let mut ips: Vec<Ipv4Addr> = status
        .pod_ips
        .iter()
        .flatten()
        .filter_map(|ip| ip.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(
            status
                .pod_ip
                .as_deref()
                .and_then(|ip| ip.parse::<Ipv4Addr>().ok()),
        );
    }
    if ips.is_empty() {
        return None;
    }
    let ports = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            Some((
                p.name.as_deref()?,
                protocol_number(p.protocol.as_deref())?,
                u16::try_from(p.container_port).ok()?,
            ))
        })
        .collect();
    static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
    Some(PodInfo {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.name_any(),
        labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
        node: spec.node_name.as_deref(),
        ips,
        ports,
    })
}

/// The protocol number of a policy or container port's `protocol` (default TCP).
fn protocol_number(protocol: Option<&str>) -> Option<u8> {
    match protocol.unwrap_or("TCP") {
        "TCP" => Some(TCP),
        "UDP" => Some(UDP),
        "SCTP" => Some(SCTP),
        _ => None,
    }
}

/// Whether `labels` satisfy `selector` (an empty selector selects everything). An
/// operator the API would have refused selects nothing.
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().flatten().all(|e| {
            let value = labels.get(&e.key);
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// The addresses of an IPv4 CIDR, `None` when it is not one.
fn cidr_span(cidr: &str) -> Option<Span<u32>> {
    let (addr, prefix) = cidr.split_once('/')?;
    let addr: Ipv4Addr = addr.parse().ok()?;
    let prefix: u32 = prefix.parse().ok()?;
    if prefix > 32 {
        return None;
    }
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let first = u32::from(addr) & mask;
    Some(Span {
        first,
        last: first | !mask,
    })
}

/// `spans` minus `holes`, as disjoint sorted spans.
fn subtract(spans: &[Span<u32>], holes: &[Span<u32>]) -> Vec<Span<u32>> {
    let mut out = merge(spans.to_vec());
    for hole in merge(holes.to_vec()) {
        let mut next = Vec::with_capacity(out.len() + 1);
        for s in out {
            if hole.last < s.first || hole.first > s.last {
                next.push(s);
                continue;
            }
            if hole.first > s.first {
                next.push(Span {
                    first: s.first,
                    last: hole.first - 1,
                });
            }
            if hole.last < s.last {
                next.push(Span {
                    first: hole.last + 1,
                    last: s.last,
                });
            }
        }
        out = next;
    }
    out
}

/// The union of `spans` as disjoint sorted spans, adjacent ones joined.
fn merge(mut spans: Vec<Span<u32>>) -> Vec<Span<u32>> {
    spans.sort();
    let mut out: Vec<Span<u32>> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if u64::from(s.first) <= u64::from(last.last) + 1 => {
                last.last = last.last.max(s.last);
            }
            _ => out.push(s),
        }
    }
    out
}

/// An ipBlock's addresses: `cidr` minus every `except`. IPv6 blocks give nothing.
fn block_spans(block: &IPBlock) -> Vec<Span<u32>> {
    let Some(cidr) = cidr_span(&block.cidr) else {
        return Vec::new();
    };
    let holes: Vec<Span<u32>> = block
        .except
        .iter()
        .flatten()
        .filter_map(|e| cidr_span(e))
        .collect();
    subtract(&[cidr], &holes)
}

/// The peers of one rule.
enum Peers<'a> {
    /// No `from`/`to`: everyone.
    All,
    /// The pods the selectors pick and the addresses of the ipBlocks.
    Some {
        pods: Vec<&'a PodInfo<'a>>,
        blocks: Vec<Span<u32>>,
    },
}

impl<'a> Peers<'a> {
    /// Their addresses.
    fn spans(&self) -> Vec<Span<u32>> {
        match self {
            Peers::All => vec![ANY_ADDRESS],
            Peers::Some { pods, blocks } => {
                let mut spans: Vec<Span<u32>> = blocks.clone();
                spans.extend(
                    pods.iter()
                        .flat_map(|p| &p.ips)
                        .map(|ip| Span::one(u32::from(*ip))),
                );
                merge(spans)
            }
        }
    }

    /// The pods among them, for named ports: those the selectors pick and those whose
    /// address an ipBlock holds.
    fn pods(&self, all: &'a [PodInfo<'a>]) -> Vec<&'a PodInfo<'a>> {
        match self {
            Peers::All => all.iter().collect(),
            Peers::Some { pods, blocks } => {
                let mut out = pods.clone();
                out.extend(all.iter().filter(|p| {
                    p.ips.iter().any(|ip| {
                        let ip = u32::from(*ip);
                        blocks.iter().any(|b| (b.first..=b.last).contains(&ip))
                    })
                }));
                out
            }
        }
    }
}

/// Everything the peers of a policy are resolved against, indexed so that a selector
/// naming a label looks only at the pods carrying it (a sync recomputes every policy, on
/// every pod change anywhere in the cluster).
struct World<'a> {
    pods: &'a [PodInfo<'a>],
    namespaces: HashMap<&'a str, &'a BTreeMap<String, String>>,
    /// Namespace → its pods (indices into `pods`).
    by_namespace: HashMap<&'a str, Vec<usize>>,
    /// `key=value` → the pods labelled so.
    by_label: HashMap<(&'a str, &'a str), Vec<usize>>,
}

impl<'a> World<'a> {
    fn new(pods: &'a [PodInfo<'a>], namespaces: &'a [Arc<Namespace>]) -> World<'a> {
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        let mut by_label: HashMap<(&str, &str), Vec<usize>> = HashMap::new();
        for (i, pod) in pods.iter().enumerate() {
            by_namespace.entry(&pod.namespace).or_default().push(i);
            for (k, v) in pod.labels {
                by_label.entry((k, v)).or_default().push(i);
            }
        }
        World {
            pods,
            namespaces: namespaces
                .iter()
                .filter_map(|ns| {
                    Some((
                        ns.metadata.name.as_deref()?,
                        ns.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
                    ))
                })
                .collect(),
            by_namespace,
            by_label,
        }
    }

    fn namespace_labels(&self, name: &str) -> &'a BTreeMap<String, String> {
        static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();
        self.namespaces.get(name).copied().unwrap_or(&NO_LABELS)
    }

    /// The pods of `namespace` (every namespace: `None`) that `selector` (`None`: all)
    /// picks, looking only at the shortest list an index offers.
    fn select(
        &self,
        namespace: Option<&str>,
        selector: Option<&LabelSelector>,
    ) -> Vec<&'a PodInfo<'a>> {
        static NONE: Vec<usize> = Vec::new();
        let mut shortest: Option<&Vec<usize>> =
            namespace.map(|ns| self.by_namespace.get(ns).unwrap_or(&NONE));
        for (k, v) in selector
            .and_then(|s| s.match_labels.as_ref())
            .into_iter()
            .flatten()
        {
            let list = self
                .by_label
                .get(&(k.as_str(), v.as_str()))
                .unwrap_or(&NONE);
            if shortest.is_none_or(|s| list.len() < s.len()) {
                shortest = Some(list);
            }
        }
        let keep = |p: &&PodInfo| {
            namespace.is_none_or(|ns| p.namespace == ns)
                && selector.is_none_or(|s| selects(s, p.labels))
        };
        let pods: &'a [PodInfo<'a>] = self.pods;
        match shortest {
            Some(list) => list.iter().map(|i| &pods[*i]).filter(keep).collect(),
            None => pods.iter().filter(keep).collect(),
        }
    }

    /// The peers of a rule of a policy in `namespace`.
    fn peers(&self, namespace: &str, peers: Option<&'a [NetworkPolicyPeer]>) -> Peers<'a> {
        let Some(peers) = peers.filter(|p| !p.is_empty()) else {
            return Peers::All;
        };
        let mut pods = Vec::new();
        let mut blocks = Vec::new();
        for peer in peers {
            if let Some(block) = &peer.ip_block {
                blocks.extend(block_spans(block));
                continue;
            }
            match (&peer.namespace_selector, &peer.pod_selector) {
                // The API refuses an empty peer; it selects nothing rather than everyone.
                (None, None) => {}
                (None, Some(pod_selector)) => {
                    pods.extend(self.select(Some(namespace), Some(pod_selector)));
                }
                (Some(ns_selector), pod_selector) => {
                    let mut namespaces: Vec<&str> = self
                        .by_namespace
                        .keys()
                        .copied()
                        .filter(|ns| selects(ns_selector, self.namespace_labels(ns)))
                        .collect();
                    namespaces.sort_unstable();
                    for ns in namespaces {
                        pods.extend(self.select(Some(ns), pod_selector.as_ref()));
                    }
                }
            }
        }
        Peers::Some { pods, blocks }
    }
}

/// A port entry of a rule, its name not yet resolved.
enum PortSpec<'a> {
    /// Numbers, or every port (no `port`).
    Numbers(u8, Span<u16>),
    /// A container port's name.
    Named(u8, &'a str),
    /// No ports at all: every protocol and port.
    Any,
}

/// The port entries of a rule; entries the kernel could not match (an unknown protocol, a
/// port out of range) are left out, so they allow nothing.
fn port_specs(ports: Option<&[NetworkPolicyPort]>) -> Vec<PortSpec<'_>> {
    let Some(ports) = ports.filter(|p| !p.is_empty()) else {
        return vec![PortSpec::Any];
    };
    ports
        .iter()
        .filter_map(|p| {
            let protocol = protocol_number(p.protocol.as_deref())?;
            Some(match &p.port {
                None => PortSpec::Numbers(protocol, ANY_PORT),
                Some(IntOrString::Int(n)) => {
                    let first = u16::try_from(*n).ok().filter(|n| *n > 0)?;
                    let last = match p.end_port {
                        Some(end) => u16::try_from(end).ok().filter(|end| *end >= first)?,
                        None => first,
                    };
                    PortSpec::Numbers(protocol, Span { first, last })
                }
                Some(IntOrString::String(name)) => PortSpec::Named(protocol, name),
            })
        })
        .collect()
}

/// The policy types of `policy`, with the API's default when unset: Ingress, plus Egress
/// when it has egress rules.
fn policy_types(policy: &NetworkPolicy) -> (bool, bool) {
    let Some(spec) = &policy.spec else {
        return (false, false);
    };
    match spec.policy_types.as_deref().filter(|t| !t.is_empty()) {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// The ruleset for the pods on node `node` under `policies`, given every pod of the
/// cluster (for peers) and every namespace (for namespace selectors).
pub fn desired(
    policies: &[Arc<NetworkPolicy>],
    pods: &[Arc<Pod>],
    namespaces: &[Arc<Namespace>],
    node: &str,
) -> Ruleset {
    let infos: Vec<PodInfo> = pods.iter().filter_map(|p| pod_info(p)).collect();
    let world = World::new(&infos, namespaces);
    // Boxes per local pod address, in no particular shape yet.
    let mut ingress: BTreeMap<Ipv4Addr, (String, Vec<Allowed>)> = BTreeMap::new();
    let mut egress: BTreeMap<Ipv4Addr, (String, Vec<Allowed>)> = BTreeMap::new();
    let mut ordered: Vec<&Arc<NetworkPolicy>> = policies.iter().collect();
    ordered.sort_by_key(|p| (p.metadata.namespace.clone(), p.metadata.name.clone()));
    for policy in ordered {
        let Some(spec) = &policy.spec else {
            continue;
        };
        let namespace = policy.namespace().unwrap_or_default();
        let mut selected = world.select(Some(&namespace), spec.pod_selector.as_ref());
        selected.retain(|p| p.node == Some(node));
        if selected.is_empty() {
            continue;
        }
        let (is_ingress, is_egress) = policy_types(policy);
        if is_ingress {
            let rules: Vec<(Vec<Span<u32>>, Vec<PortSpec>)> = spec
                .ingress
                .iter()
                .flatten()
                .map(|r| {
                    (
                        world.peers(&namespace, r.from.as_deref()).spans(),
                        port_specs(r.ports.as_deref()),
                    )
                })
                .collect();
            for target in &selected {
                let mut boxes = Vec::new();
                for (spans, ports) in &rules {
                    for port in ports {
                        // Named ports are the target's own.
                        let (protocol, port) = match port {
                            PortSpec::Any => (ANY_PROTOCOL, ANY_PORT),
                            PortSpec::Numbers(protocol, span) => (Span::one(*protocol), *span),
                            PortSpec::Named(protocol, name) => {
                                match target.named_port(name, *protocol) {
                                    Some(n) => (Span::one(*protocol), Span::one(n)),
                                    None => continue,
                                }
                            }
                        };
                        boxes.extend(spans.iter().map(|peer| Allowed {
                            peer: *peer,
                            protocol,
                            port,
                        }));
                    }
                }
                for ip in &target.ips {
                    let entry = ingress.entry(*ip).or_insert_with(|| {
                        (format!("{}/{}", target.namespace, target.name), Vec::new())
                    });
                    entry.1.extend(boxes.iter().copied());
                }
            }
        }
        if is_egress {
            // The same for every selected pod: named ports are the peers'.
            let mut boxes = Vec::new();
            for rule in spec.egress.iter().flatten() {
                let peers = world.peers(&namespace, rule.to.as_deref());
                let ports = port_specs(rule.ports.as_deref());
                let spans = peers.spans();
                let mut peer_pods = None;
                for port in &ports {
                    match port {
                        PortSpec::Any => boxes.extend(spans.iter().map(|peer| Allowed {
                            peer: *peer,
                            protocol: ANY_PROTOCOL,
                            port: ANY_PORT,
                        })),
                        PortSpec::Numbers(protocol, span) => {
                            boxes.extend(spans.iter().map(|peer| Allowed {
                                peer: *peer,
                                protocol: Span::one(*protocol),
                                port: *span,
                            }))
                        }
                        PortSpec::Named(protocol, name) => {
                            let candidates = peer_pods.get_or_insert_with(|| peers.pods(&infos));
                            for pod in candidates.iter() {
                                if let Some(n) = pod.named_port(name, *protocol) {
                                    boxes.extend(pod.ips.iter().map(|ip| Allowed {
                                        peer: Span::one(u32::from(*ip)),
                                        protocol: Span::one(*protocol),
                                        port: Span::one(n),
                                    }));
                                }
                            }
                        }
                    }
                }
            }
            for source in &selected {
                for ip in &source.ips {
                    let entry = egress.entry(*ip).or_insert_with(|| {
                        (format!("{}/{}", source.namespace, source.name), Vec::new())
                    });
                    entry.1.extend(boxes.iter().copied());
                }
            }
        }
    }
    // Pods the same policies select have the same boxes (replicas, mostly): made disjoint
    // once.
    let mut made: HashMap<Vec<Allowed>, BTreeSet<Allowed>> = HashMap::new();
    let mut finish = |map: BTreeMap<Ipv4Addr, (String, Vec<Allowed>)>| {
        map.into_iter()
            .map(|(ip, (pod, mut boxes))| {
                boxes.sort_unstable();
                boxes.dedup();
                let allowed = made
                    .entry(boxes)
                    .or_insert_with_key(|boxes| disjoint(boxes.clone()))
                    .clone();
                (ip, Isolated { pod, allowed })
            })
            .collect()
    };
    Ruleset {
        ingress: finish(ingress),
        egress: finish(egress),
    }
}

/// The union of `boxes` as disjoint boxes (an interval set's elements must not overlap),
/// few of them: the protocol and port axes are cut where some box starts or ends, the
/// peers of each cell merged, and neighbouring cells with the same peers joined again.
pub fn disjoint(boxes: Vec<Allowed>) -> BTreeSet<Allowed> {
    let mut out = BTreeSet::new();
    if boxes.is_empty() {
        return out;
    }
    // Cells along an axis: the stretches between consecutive cut points.
    fn cuts(bounds: impl Iterator<Item = (u32, u32)>) -> Vec<u32> {
        let mut points: Vec<u32> = bounds.flat_map(|(f, l)| [f, l + 1]).collect();
        points.sort_unstable();
        points.dedup();
        points
    }
    let protocol_cuts = cuts(
        boxes
            .iter()
            .map(|b| (u32::from(b.protocol.first), u32::from(b.protocol.last))),
    );
    // Per protocol cell: (port span, peers) rows, joined along the port axis.
    type Rows = Vec<(Span<u16>, Vec<Span<u32>>)>;
    let mut previous: Option<(Span<u8>, Rows)> = None;
    let emit = |protocols: Span<u8>, rows: &Rows, out: &mut BTreeSet<Allowed>| {
        for (port, peers) in rows {
            for peer in peers {
                out.insert(Allowed {
                    peer: *peer,
                    protocol: protocols,
                    port: *port,
                });
            }
        }
    };
    for window in protocol_cuts.windows(2) {
        let (Ok(first), Ok(last)) = (u8::try_from(window[0]), u8::try_from(window[1] - 1)) else {
            continue;
        };
        let here: Vec<&Allowed> = boxes
            .iter()
            .filter(|b| b.protocol.first <= first && b.protocol.last >= first)
            .collect();
        let mut rows: Rows = Vec::new();
        if !here.is_empty() {
            let port_cuts = cuts(
                here.iter()
                    .map(|b| (u32::from(b.port.first), u32::from(b.port.last))),
            );
            for w in port_cuts.windows(2) {
                let (Ok(pf), Ok(pl)) = (u16::try_from(w[0]), u16::try_from(w[1] - 1)) else {
                    continue;
                };
                let peers = merge(
                    here.iter()
                        .filter(|b| b.port.first <= pf && b.port.last >= pf)
                        .map(|b| b.peer)
                        .collect(),
                );
                if peers.is_empty() {
                    continue;
                }
                match rows.last_mut() {
                    Some((span, p)) if *p == peers && u32::from(span.last) + 1 == u32::from(pf) => {
                        span.last = pl;
                    }
                    _ => rows.push((
                        Span {
                            first: pf,
                            last: pl,
                        },
                        peers,
                    )),
                }
            }
        }
        let protocols = Span { first, last };
        match &mut previous {
            Some((span, prev_rows))
                if *prev_rows == rows && u32::from(span.last) + 1 == u32::from(first) =>
            {
                span.last = last;
            }
            _ => {
                if let Some((span, prev_rows)) = previous.take() {
                    emit(span, &prev_rows, &mut out);
                }
                previous = Some((protocols, rows));
            }
        }
    }
    if let Some((span, rows)) = previous {
        emit(span, &rows, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first: u32, last: u32) -> Span<u32> {
        Span { first, last }
    }

    #[test]
    fn cidrs_and_excepts() {
        assert_eq!(
            cidr_span("10.0.0.0/8"),
            Some(span(0x0A00_0000, 0x0AFF_FFFF))
        );
        assert_eq!(cidr_span("0.0.0.0/0"), Some(ANY_ADDRESS));
        assert_eq!(
            cidr_span("10.1.2.3/32"),
            Some(span(0x0A01_0203, 0x0A01_0203))
        );
        // Host bits are ignored, as the API's validation would have them zero.
        assert_eq!(cidr_span("10.1.2.3/24"), cidr_span("10.1.2.0/24"));
        assert_eq!(cidr_span("fd00::/8"), None);
        assert_eq!(cidr_span("10.0.0.0/33"), None);
        let block: IPBlock = serde_json::from_value(serde_json::json!({
            "cidr": "10.0.0.0/24", "except": ["10.0.0.0/26", "10.0.0.128/32", "192.168.0.0/16"]}))
        .unwrap();
        assert_eq!(
            block_spans(&block),
            [
                span(0x0A00_0040, 0x0A00_007F),
                span(0x0A00_0081, 0x0A00_00FF)
            ]
        );
        // Everything excepted: nothing left.
        let block: IPBlock = serde_json::from_value(
            serde_json::json!({"cidr": "10.0.0.0/24", "except": ["10.0.0.0/16"]}),
        )
        .unwrap();
        assert!(block_spans(&block).is_empty());
    }

    #[test]
    fn spans_merge_when_they_touch() {
        assert_eq!(
            merge(vec![
                span(5, 9),
                span(1, 3),
                span(4, 4),
                span(11, 12),
                span(0, u32::MAX)
            ]),
            [ANY_ADDRESS]
        );
        assert_eq!(
            merge(vec![span(5, 9), span(1, 3), span(11, 12)]),
            [span(1, 3), span(5, 9), span(11, 12)]
        );
    }

    /// A small deterministic generator (no dependency for one test).
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self, below: u32) -> u32 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            u32::try_from((self.0 >> 33) % u64::from(below)).unwrap()
        }

        fn span(&mut self, below: u32) -> (u32, u32) {
            let a = self.next(below);
            let b = self.next(below);
            (a.min(b), a.max(b))
        }
    }

    #[test]
    fn disjoint_keeps_the_union_without_overlaps() {
        let mut rng = Lcg(7);
        for round in 0..200 {
            let n = 1 + rng.next(12);
            let boxes: Vec<Allowed> = (0..n)
                .map(|_| {
                    let (pf, pl) = if rng.next(4) == 0 {
                        (0, 255)
                    } else {
                        let p = [6u8, 17, 132][usize::try_from(rng.next(3)).unwrap()];
                        (u32::from(p), u32::from(p))
                    };
                    let (qf, ql) = rng.span(40);
                    let (af, al) = rng.span(64);
                    Allowed {
                        peer: span(af, al),
                        protocol: Span {
                            first: u8::try_from(pf).unwrap(),
                            last: u8::try_from(pl).unwrap(),
                        },
                        port: Span {
                            first: u16::try_from(qf).unwrap(),
                            last: u16::try_from(ql).unwrap(),
                        },
                    }
                })
                .collect();
            let out = disjoint(boxes.clone());
            let all: Vec<&Allowed> = out.iter().collect();
            for (i, a) in all.iter().enumerate() {
                for b in &all[i + 1..] {
                    let overlap = |x: (u32, u32), y: (u32, u32)| x.0 <= y.1 && y.0 <= x.1;
                    assert!(
                        !(overlap((a.peer.first, a.peer.last), (b.peer.first, b.peer.last))
                            && overlap(
                                (a.protocol.first.into(), a.protocol.last.into()),
                                (b.protocol.first.into(), b.protocol.last.into())
                            )
                            && overlap(
                                (a.port.first.into(), a.port.last.into()),
                                (b.port.first.into(), b.port.last.into())
                            )),
                        "round {round}: {a:?} overlaps {b:?}"
                    );
                }
            }
            for peer in 0..66u32 {
                for protocol in [0u8, 6, 7, 17, 132, 255] {
                    for port in 0..42u16 {
                        let ip = Ipv4Addr::from(peer);
                        let want = boxes.iter().any(|b| b.contains(ip, protocol, port));
                        let got = out.iter().any(|b| b.contains(ip, protocol, port));
                        assert_eq!(
                            want, got,
                            "round {round}: {ip} {protocol} {port}\n{boxes:?}\n{out:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn disjoint_stays_small_for_many_ports() {
        // 1,000 rules each allowing one peer on its own port: one element each, and a wide
        // rule covering them all swallows them.
        let mut boxes: Vec<Allowed> = (0..1000u16)
            .map(|i| Allowed {
                peer: Span::one(u32::from(i)),
                protocol: Span::one(TCP),
                port: Span::one(1000 + i),
            })
            .collect();
        assert_eq!(disjoint(boxes.clone()).len(), 1000);
        boxes.push(Allowed {
            peer: ANY_ADDRESS,
            protocol: ANY_PROTOCOL,
            port: ANY_PORT,
        });
        assert_eq!(disjoint(boxes).len(), 1);
    }

    #[test]
    fn finished_and_host_network_pods_are_neither_targets_nor_peers() {
        let pod = |name: &str, ip: &str, extra: serde_json::Value| -> Arc<Pod> {
            let mut v = serde_json::json!({
                "metadata": {"name": name, "namespace": "x", "labels": {"app": "web"}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip},
            });
            if let (Some(v), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
                for (k, e) in extra {
                    if let (Some(inner), Some(e)) =
                        (v.get_mut(k).and_then(|x| x.as_object_mut()), e.as_object())
                    {
                        for (k2, e2) in e {
                            inner.insert(k2.clone(), e2.clone());
                        }
                    }
                }
            }
            Arc::new(serde_json::from_value(v).unwrap())
        };
        let pods = [
            pod("live", "10.244.1.2", serde_json::json!({})),
            pod(
                "done",
                "10.244.1.3",
                serde_json::json!({"status": {"phase": "Succeeded"}}),
            ),
            pod(
                "host",
                "10.0.0.5",
                serde_json::json!({"spec": {"hostNetwork": true}}),
            ),
            pod(
                "new",
                "",
                serde_json::json!({"status": {"phase": "Pending"}}),
            ),
        ];
        let policy: Arc<NetworkPolicy> = Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "p", "namespace": "x"},
                "spec": {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}}))
            .unwrap(),
        );
        let rules = desired(&[policy], &pods, &[], "n1");
        assert_eq!(
            rules.ingress.keys().collect::<Vec<_>>(),
            [&Ipv4Addr::new(10, 244, 1, 2)]
        );
        let live = &rules.ingress[&Ipv4Addr::new(10, 244, 1, 2)];
        assert_eq!(live.pod, "x/live");
        assert!(!live.allows(Ipv4Addr::new(10, 244, 1, 3), TCP, 80));
        assert!(!live.allows(Ipv4Addr::new(10, 0, 0, 5), TCP, 80));
    }
}
