//! The service proxy: kube-proxy's nftables mode, inside the node agent.
//!
//! Every Service port with a cluster IP (and its node port, if any) becomes a chain that
//! picks one of the port's ready endpoints at random (`numgen random`) and DNATs to it; a
//! map from `address . protocol . port` to those chains is all the packet path consults, so
//! the cost per packet does not grow with the number of Services. Everything lives in one
//! table, [`TABLE`], of the agent's network namespace:
//!
//! - `services` (from the `nat` prerouting and output hooks) looks the destination up in
//!   the `service-ips` map (cluster IPs, and LoadBalancer addresses:
//!   `status.loadBalancer.ingress[].ip`, on every node as kube-proxy does), and for the
//!   node's own addresses in `service-nodeports`;
//! - `service-…` chains mark traffic from outside the pod network for masquerading, keep
//!   `sessionAffinity: ClientIP` clients on their endpoint (a dynamic set per endpoint,
//!   refreshed on every packet), then pick an endpoint; `external-…` chains (node ports
//!   and load balancer addresses) mark for masquerading and go to the service chain — or,
//!   with `externalTrafficPolicy: Local`, pick among this node's endpoints only and keep
//!   the client's address (pods and the node itself still reach every endpoint, as with
//!   kube-proxy);
//! - `endpoint-…` chains DNAT; a pod reaching itself through its Service (hairpin), or any
//!   local pod reaching an endpoint on the same bridge, is masqueraded so the reply comes
//!   back through the node and conntrack can undo the DNAT;
//! - host ports of this node's pods (the CNI `portmap` plugin's job under a kubelet) are in
//!   `host-ports` (a given host address) and `host-ports-any` (`0.0.0.0`: every local
//!   address, 127.0.0.1 too), looked up before node ports; `hostport-…` chains DNAT to the
//!   pod, masquerading a pod on the same bridge that reaches itself or a neighbour;
//! - Services without endpoints are in `no-endpoint-services` / `no-endpoint-nodeports`,
//!   which the `filter` hooks answer with a reject: a connection is refused at once instead
//!   of hanging;
//! - the pool addresses this node announces for ServiceLB are put on its interface after
//!   the rules that DNAT them ([`announce`]).
//!
//! Syncs are incremental: the proxy keeps the rules it last applied and sends `nft` one
//! transaction holding only the difference (new and changed chains rewritten, map elements
//! added and deleted, chains and sets of removed Services deleted). A transaction applies
//! atomically, so packets see the old rules or the new ones, never a half-built table. The
//! first sync, and any sync after a failure, replaces the whole table — still in one
//! transaction.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus::{Histogram, HistogramOpts, IntCounter, Registry};

use crate::health::{Backoff, Health, Part};
use crate::network::announce::{self, Announcer};
use crate::network::{Cidr, NetworkError, nft};

/// The nftables table the proxy owns (family `ip`).
pub const TABLE: &str = "orquestra-proxy";

/// The packet mark bit asking `nat-postrouting` to masquerade (kube-proxy's).
const MASQUERADE_BIT: u32 = 0x4000;

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

/// The annotation with the time of the change a slice carries.
const TRIGGER_TIME: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// How long a client stays with its endpoint under `sessionAffinity: ClientIP` when the
/// Service does not say (kube's default: three hours).
const DEFAULT_AFFINITY_SECONDS: i32 = 10_800;

/// What the proxy needs to know about its node.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The Node's name: endpoints on it are local.
    pub node_name: String,
    /// The node's own pod CIDR.
    pub pod_cidr: Cidr,
}

/// The proxy's metrics, under kube-proxy's names.
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    sync_duration: Histogram,
    last_sync: prometheus::Gauge,
    programming: Histogram,
    failures: IntCounter,
}

impl ProxyMetrics {
    /// Registers the metrics on `registry`.
    pub fn register(registry: &Registry) -> Result<ProxyMetrics, prometheus::Error> {
        let buckets = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let metrics = ProxyMetrics {
            sync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "kubeproxy_sync_proxy_rules_duration_seconds",
                    "SyncProxyRules latency in seconds.",
                )
                .buckets(buckets.clone()),
            )?,
            last_sync: prometheus::Gauge::new(
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced.",
            )?,
            programming: Histogram::with_opts(
                HistogramOpts::new(
                    "kubeproxy_network_programming_duration_seconds",
                    "In-cluster network programming latency in seconds: from the change \
                     an EndpointSlice records to its rules being in place on this node.",
                )
                .buckets(buckets),
            )?,
            failures: IntCounter::new(
                "kubeproxy_sync_proxy_rules_nftables_sync_failures_total",
                "Failed nftables transactions.",
            )?,
        };
        registry.register(Box::new(metrics.sync_duration.clone()))?;
        registry.register(Box::new(metrics.last_sync.clone()))?;
        registry.register(Box::new(metrics.programming.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        Ok(metrics)
    }
}

/// An endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Endpoint {
    ip: Ipv4Addr,
    port: u16,
    local: bool,
    /// Ready; otherwise serving while terminating, a fallback only (see [`prefer_ready`]).
    ready: bool,
}

/// The ready endpoints among `endpoints`, or — when none is ready — the ones still serving
/// while they terminate (kube-proxy's terminating-endpoint fallback, so a rolling update or
/// a drain of the last pods does not drop connections that could still be served).
fn prefer_ready<'a>(
    endpoints: impl IntoIterator<Item = &'a EndpointChain<'a>>,
) -> Vec<&'a EndpointChain<'a>> {
    let all: Vec<&EndpointChain> = endpoints.into_iter().collect();
    let ready: Vec<&EndpointChain> = all.iter().copied().filter(|(_, _, e)| e.ready).collect();
    if ready.is_empty() { all } else { ready }
}

/// One Service port, as the proxy programs it.
#[derive(Clone, Debug)]
struct ServicePort {
    /// `namespace/name/protocol/port-name` (the port number when unnamed).
    id: String,
    cluster_ip: Ipv4Addr,
    protocol: &'static str,
    port: u16,
    node_port: Option<u16>,
    /// The LoadBalancer's addresses the proxy DNATs (`ipMode: VIP` or unset).
    load_balancer_ips: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`: node port and load balancer traffic to this node's
    /// endpoints only, keeping the client's address.
    local_only: bool,
    /// `internalTrafficPolicy: Local`: cluster IP traffic to this node's endpoints only.
    internal_local: bool,
    affinity: Option<i32>,
    endpoints: Vec<Endpoint>,
}

/// Everything the proxy puts in its table besides the fixed skeleton.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ruleset {
    /// Chain name → its rules.
    chains: BTreeMap<String, Vec<String>>,
    /// Affinity set name → its declaration.
    sets: BTreeMap<String, String>,
    /// Map name → element key → verdict.
    maps: BTreeMap<&'static str, BTreeMap<String, String>>,
    /// Every node's pod CIDR: traffic from elsewhere to a cluster IP is masqueraded.
    pod_cidrs: BTreeSet<String>,
}

impl Ruleset {
    /// How many Service ports have rules (chains named `service-…`).
    pub fn services(&self) -> usize {
        self.chains
            .keys()
            .filter(|c| c.starts_with("service-"))
            .count()
    }
}

/// The maps the packet path consults.
const MAPS: [(&str, &str); 6] = [
    (
        "service-ips",
        "ipv4_addr . inet_proto . inet_service : verdict",
    ),
    ("service-nodeports", "inet_proto . inet_service : verdict"),
    (
        "no-endpoint-services",
        "ipv4_addr . inet_proto . inet_service : verdict",
    ),
    (
        "no-endpoint-nodeports",
        "inet_proto . inet_service : verdict",
    ),
    (
        "host-ports",
        "ipv4_addr . inet_proto . inet_service : verdict",
    ),
    ("host-ports-any", "inet_proto . inet_service : verdict"),
];

/// A short stable hash of `text`, so chain names stay unique however names are cut.
fn hash(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    hex::encode(&digest[..4]).to_uppercase()
}

/// The Service ports with a cluster IP, with their ready endpoints.
fn service_ports(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    node_name: &str,
) -> Vec<ServicePort> {
    // (namespace, service) → its slices.
    let mut by_service: HashMap<(String, String), Vec<&EndpointSlice>> = HashMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        if let Some(service) = slice.labels().get(SERVICE_NAME) {
            by_service
                .entry((slice.namespace().unwrap_or_default(), service.clone()))
                .or_default()
                .push(slice);
        }
    }
    let mut out = Vec::new();
    for svc in services {
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        else {
            // Headless and ExternalName Services are DNS only.
            continue;
        };
        let namespace = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_SECONDS)
        });
        let local_only = spec.external_traffic_policy.as_deref() == Some("Local");
        let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");
        // `ipMode: Proxy` addresses are a proxying load balancer's: traffic to them arrives
        // from it, addressed to the node.
        let load_balancer_ips: Vec<Ipv4Addr> = if kind == "LoadBalancer" {
            svc.status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
                .filter_map(|i| i.ip.as_deref()?.parse().ok())
                .collect()
        } else {
            Vec::new()
        };
        let slices = by_service.get(&(namespace.clone(), name.clone()));
        for port in spec.ports.iter().flatten() {
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "tcp",
                "UDP" => "udp",
                _ => continue,
            };
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            let mut endpoints = BTreeSet::new();
            for slice in slices.into_iter().flatten() {
                let Some(target) = slice.ports.iter().flatten().find(|p| {
                    p.name.clone().unwrap_or_default() == port_name
                        && p.protocol.as_deref().unwrap_or("TCP")
                            == port.protocol.as_deref().unwrap_or("TCP")
                }) else {
                    continue;
                };
                let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()) else {
                    continue;
                };
                for e in slice.endpoints.iter().flatten() {
                    // The conditions' defaults: ready unless said otherwise, serving as
                    // ready, not terminating.
                    let conditions = e.conditions.clone().unwrap_or_default();
                    let ready = conditions.ready != Some(false);
                    let serving = conditions.serving.unwrap_or(ready);
                    let terminating = conditions.terminating.unwrap_or(false);
                    // Neither ready nor a serving terminating endpoint: no use.
                    if !(ready || serving && terminating) {
                        continue;
                    }
                    let local = e.node_name.as_deref() == Some(node_name);
                    for address in &e.addresses {
                        if let Ok(ip) = address.parse() {
                            endpoints.insert(Endpoint {
                                ip,
                                port: target_port,
                                local,
                                ready,
                            });
                        }
                    }
                }
            }
            let node_port = matches!(kind, "NodePort" | "LoadBalancer")
                .then(|| port.node_port.and_then(|p| u16::try_from(p).ok()))
                .flatten();
            out.push(ServicePort {
                id: format!(
                    "{namespace}/{name}/{protocol}/{}",
                    if port_name.is_empty() {
                        number.to_string()
                    } else {
                        port_name
                    }
                ),
                cluster_ip,
                protocol,
                port: number,
                node_port,
                load_balancer_ips: load_balancer_ips.clone(),
                local_only,
                internal_local,
                affinity,
                endpoints: endpoints.into_iter().collect(),
            });
        }
    }
    out
}

/// An endpoint's chain, its affinity set if any, and the endpoint.
type EndpointChain<'a> = (String, Option<String>, &'a Endpoint);

/// The rules for `services` and `slices` on node `config.node_name`, given every node's
/// pod CIDR.
pub fn desired(
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
    pod_cidrs: &BTreeSet<String>,
    config: &ProxyConfig,
) -> Ruleset {
    let mut rules = Ruleset {
        pod_cidrs: pod_cidrs.clone(),
        ..Ruleset::default()
    };
    rules.pod_cidrs.insert(config.pod_cidr.to_string());
    for (map, _) in MAPS {
        rules.maps.insert(map, BTreeMap::new());
    }
    let mark = format!("meta mark set meta mark | {MASQUERADE_BIT:#x}");
    for sp in service_ports(services, slices, &config.node_name) {
        let h = hash(&sp.id);
        let ip_key = format!("{} . {} . {}", sp.cluster_ip, sp.protocol, sp.port);
        let node_key = sp.node_port.map(|p| format!("{} . {p}", sp.protocol));
        let lb_keys: Vec<String> = sp
            .load_balancer_ips
            .iter()
            .map(|ip| format!("{ip} . {} . {}", sp.protocol, sp.port))
            .collect();
        if sp.endpoints.is_empty() {
            let entries = rules.maps.entry("no-endpoint-services").or_default();
            entries.insert(ip_key, "goto reject-chain".into());
            for key in lb_keys {
                entries.insert(key, "goto reject-chain".into());
            }
            if let Some(key) = node_key {
                rules
                    .maps
                    .entry("no-endpoint-nodeports")
                    .or_default()
                    .insert(key, "goto reject-chain".into());
            }
            continue;
        }
        // One chain per endpoint: DNAT, hairpin and same-bridge masquerading, affinity.
        let mut endpoint_chains = Vec::new();
        for e in &sp.endpoints {
            let ep_id = format!("{}__{}/{}", sp.id, e.ip, e.port);
            let ep_hash = hash(&ep_id);
            let chain = format!("endpoint-{ep_hash}-{ep_id}");
            let mut body = vec![format!("ip saddr {} jump mark-for-masquerade", e.ip)];
            if e.local {
                // Without bridge netfilter the reply of a pod on this bridge would go
                // straight back to the client pod, around conntrack. (The node itself, on
                // the bridge's address, gets its replies through conntrack anyway.)
                body.push(format!(
                    "ip saddr {} ip saddr != {} jump mark-for-masquerade",
                    config.pod_cidr,
                    config.pod_cidr.gateway()
                ));
            }
            let set = sp.affinity.map(|timeout| {
                let set = format!("affinity-{ep_hash}-{timeout}-{ep_id}");
                rules.sets.insert(
                    set.clone(),
                    format!(
                        "type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; size 65535;"
                    ),
                );
                body.push(format!("update @{set} {{ ip saddr }}"));
                set
            });
            body.push(format!(
                "meta l4proto {} dnat to {}:{}",
                sp.protocol, e.ip, e.port
            ));
            rules.chains.insert(chain.clone(), body);
            endpoint_chains.push((chain, set, e));
        }
        // Affinity first (a known client goes back to its endpoint), then a random pick.
        let pick = |chains: &[&EndpointChain]| -> Vec<String> {
            let mut body = Vec::new();
            for (chain, set, _) in chains {
                if let Some(set) = set {
                    body.push(format!("ip saddr @{set} goto {chain}"));
                }
            }
            let arms = chains
                .iter()
                .enumerate()
                .map(|(i, (chain, _, _))| format!("{i} : goto {chain}"))
                .collect::<Vec<_>>()
                .join(", ");
            body.push(format!(
                "numgen random mod {} vmap {{ {arms} }}",
                chains.len()
            ));
            body
        };
        let all = prefer_ready(&endpoint_chains);
        let local = prefer_ready(endpoint_chains.iter().filter(|(_, _, e)| e.local));
        let service_chain = format!("service-{h}-{}", sp.id);
        let mut body = vec![format!(
            "ip daddr {} {} dport {} ip saddr != @pod-cidrs jump mark-for-masquerade",
            sp.cluster_ip, sp.protocol, sp.port
        )];
        match (sp.internal_local, local.is_empty()) {
            // `internalTrafficPolicy: Local` without an endpoint here: dropped, as
            // kube-proxy does (the client's own node is the point of the policy).
            (true, true) => body.push("drop".to_owned()),
            (true, false) => body.extend(pick(&local)),
            (false, _) => body.extend(pick(&all)),
        }
        rules.chains.insert(service_chain.clone(), body);
        rules
            .maps
            .entry("service-ips")
            .or_default()
            .insert(ip_key, format!("goto {service_chain}"));
        if node_key.is_some() || !lb_keys.is_empty() {
            let external = format!("external-{h}-{}", sp.id);
            let body = if sp.local_only {
                // As kube-proxy: pods and the node itself reaching a node port or load
                // balancer address are cluster traffic, not dropped where no endpoint is.
                let mut body = vec![
                    format!("ip saddr @pod-cidrs goto {service_chain}"),
                    "fib saddr type local jump mark-for-masquerade".to_owned(),
                    format!("fib saddr type local goto {service_chain}"),
                ];
                if local.is_empty() {
                    body.push("drop".to_owned());
                } else {
                    body.extend(pick(&local));
                }
                body
            } else if sp.internal_local {
                // External traffic is not bound by the internal policy: every endpoint.
                let mut body = vec![mark.clone()];
                body.extend(pick(&all));
                body
            } else {
                vec![mark.clone(), format!("goto {service_chain}")]
            };
            rules.chains.insert(external.clone(), body);
            if let Some(key) = node_key {
                rules
                    .maps
                    .entry("service-nodeports")
                    .or_default()
                    .insert(key, format!("goto {external}"));
            }
            let entries = rules.maps.entry("service-ips").or_default();
            for key in lb_keys {
                entries.insert(key, format!("goto {external}"));
            }
        }
    }
    rules
}

/// One host port of a running pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct HostPortMapping {
    /// `namespace/pod/protocol/hostIP/hostPort` (no colon: it names a chain).
    id: String,
    /// `None`: every local address (`hostIP` empty or `0.0.0.0`).
    host_ip: Option<Ipv4Addr>,
    protocol: &'static str,
    host_port: u16,
    pod_ip: Ipv4Addr,
    container_port: u16,
}

/// The host ports of `pods` (this node's): those of pods with an IPv4 address in the pod
/// network that have not finished. Host-network pods bind their ports themselves.
fn host_port_mappings(pods: &[Arc<Pod>]) -> Vec<HostPortMapping> {
    let mut out = Vec::new();
    for pod in pods {
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
            continue;
        };
        if spec.host_network == Some(true)
            || matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"))
            || pod.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let Some(pod_ip) = status.pod_ip.as_deref().and_then(|ip| ip.parse().ok()) else {
            continue;
        };
        let ports = spec
            .init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .flat_map(|c| c.ports.iter().flatten());
        for port in ports {
            let Some(host_port) = port.host_port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            let Ok(container_port) = u16::try_from(port.container_port) else {
                continue;
            };
            if host_port == 0 {
                continue;
            }
            let protocol = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => "tcp",
                "UDP" => "udp",
                _ => continue,
            };
            let host_ip: Option<Ipv4Addr> = match port.host_ip.as_deref().unwrap_or("") {
                "" | "0.0.0.0" => None,
                ip => match ip.parse() {
                    Ok(ip) => Some(ip),
                    // An IPv6 host address: the proxy programs IPv4 only.
                    Err(_) => continue,
                },
            };
            out.push(HostPortMapping {
                id: format!(
                    "{}/{}/{protocol}/{}/{host_port}",
                    pod.namespace().unwrap_or_default(),
                    pod.name_any(),
                    host_ip.map_or("0.0.0.0".to_owned(), |ip| ip.to_string()),
                ),
                host_ip,
                protocol,
                host_port,
                pod_ip,
                container_port,
            });
        }
    }
    out.sort();
    out
}

/// Adds the host ports of this node's `pods` to `rules`.
pub fn add_host_ports(rules: &mut Ruleset, pods: &[Arc<Pod>], config: &ProxyConfig) {
    for mapping in host_port_mappings(pods) {
        let chain = format!("hostport-{}-{}", hash(&mapping.id), mapping.id);
        let body = vec![
            // A pod on this bridge reaching itself or a neighbour through the node: its
            // reply must come back through the node for conntrack to undo the DNAT.
            format!(
                "ip saddr {} ip saddr != {} jump mark-for-masquerade",
                config.pod_cidr,
                config.pod_cidr.gateway()
            ),
            format!(
                "meta l4proto {} dnat to {}:{}",
                mapping.protocol, mapping.pod_ip, mapping.container_port
            ),
        ];
        let (map, key) = match mapping.host_ip {
            Some(ip) => (
                "host-ports",
                format!("{ip} . {} . {}", mapping.protocol, mapping.host_port),
            ),
            None => (
                "host-ports-any",
                format!("{} . {}", mapping.protocol, mapping.host_port),
            ),
        };
        // The kubelet admitted no two pods on one port and overlapping address; should two
        // ever be listed (one going, one coming), the first keeps the port.
        let entries = rules.maps.entry(map).or_default();
        if entries.contains_key(&key) {
            continue;
        }
        entries.insert(key, format!("goto {chain}"));
        rules.chains.insert(chain, body);
    }
}

/// The table's fixed part: hooks, dispatch chains and maps.
fn skeleton() -> String {
    let mut t = String::new();
    t.push_str(&format!("add table ip {TABLE}\n"));
    t.push_str(&format!(
        "add set ip {TABLE} pod-cidrs {{ type ipv4_addr; flags interval; auto-merge; }}\n"
    ));
    for (map, spec) in MAPS {
        t.push_str(&format!("add map ip {TABLE} {map} {{ type {spec}; }}\n"));
    }
    let base: [(&str, &str, &[&str]); 6] = [
        (
            "nat-prerouting",
            "type nat hook prerouting priority dstnat",
            &["jump services"],
        ),
        (
            "nat-output",
            "type nat hook output priority -100",
            &["jump services"],
        ),
        (
            "nat-postrouting",
            "type nat hook postrouting priority srcnat",
            &["jump masquerading"],
        ),
        (
            "filter-input",
            "type filter hook input priority -110",
            &[
                // With `route_localnet` on the bridge, loopback addresses arriving from
                // outside would be accepted: only replies of DNATed connections may
                // (kube-proxy's martian rule).
                "ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct status & dnat == 0 drop",
                "ct state new jump endpoints-check",
            ],
        ),
        (
            "filter-forward",
            "type filter hook forward priority -110",
            &["ct state new jump endpoints-check"],
        ),
        (
            "filter-output",
            "type filter hook output priority -110",
            &["ct state new jump endpoints-check"],
        ),
    ];
    let plain = [
        (
            "services",
            vec![
                "ip daddr . meta l4proto . th dport vmap @service-ips".to_owned(),
                "ip daddr . meta l4proto . th dport vmap @host-ports".to_owned(),
                "fib daddr type local meta l4proto . th dport vmap @host-ports-any".to_owned(),
                // Node ports answer on every local address, 127.0.0.1 too (kube-proxy's
                // iptables mode with `route_localnet`): users try localhost first.
                "fib daddr type local meta l4proto . th dport vmap @service-nodeports".to_owned(),
            ],
        ),
        (
            "endpoints-check",
            vec![
                "ip daddr . meta l4proto . th dport vmap @no-endpoint-services".to_owned(),
                "fib daddr type local meta l4proto . th dport vmap @no-endpoint-nodeports"
                    .to_owned(),
            ],
        ),
        (
            "masquerading",
            vec![
                // A node port dialled on 127.0.0.1, DNATed to a pod: the pod must answer
                // an address it can reach, whatever the Service's traffic policy.
                "ip saddr 127.0.0.0/8 oifname != \"lo\" masquerade".to_owned(),
                format!("meta mark & {MASQUERADE_BIT:#x} == 0 return"),
                format!("meta mark set meta mark ^ {MASQUERADE_BIT:#x}"),
                // Not `fully-random` (kube-proxy's choice, against a SNAT port race that
                // kernels since 5.0 resolve): with many short connections its random
                // ports land on the endpoint's TIME_WAIT sockets, which drop the SYNs as
                // PAWS-old (a 1 s retransmit each); wrk through a masqueraded cluster IP
                // fell from 4,300 to 900 requests/s over four runs, steady without it.
                "masquerade".to_owned(),
            ],
        ),
        (
            "mark-for-masquerade",
            vec![format!("meta mark set meta mark | {MASQUERADE_BIT:#x}")],
        ),
        ("reject-chain", vec!["reject".to_owned()]),
    ];
    for (chain, _) in &plain {
        t.push_str(&format!("add chain ip {TABLE} {chain}\n"));
    }
    for (chain, rules) in &plain {
        for rule in rules {
            t.push_str(&format!("add rule ip {TABLE} {chain} {rule}\n"));
        }
    }
    for (chain, hook, rules) in base {
        t.push_str(&format!(
            "add chain ip {TABLE} {chain} {{ {hook}; policy accept; }}\n"
        ));
        for rule in rules {
            t.push_str(&format!("add rule ip {TABLE} {chain} {rule}\n"));
        }
    }
    t
}

/// The nft transaction taking the table from `previous` (what was applied; `None`:
/// unknown, so the table is replaced whole) to `next`.
pub fn transaction(previous: Option<&Ruleset>, next: &Ruleset) -> String {
    let empty = Ruleset::default();
    let mut t = String::new();
    let previous = match previous {
        Some(p) => p,
        None => {
            // Replace whatever is there (an earlier agent's table) in the same transaction.
            t.push_str(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n"));
            t.push_str(&skeleton());
            &empty
        }
    };
    for (set, spec) in &next.sets {
        if !previous.sets.contains_key(set) {
            t.push_str(&format!("add set ip {TABLE} {set} {{ {spec} }}\n"));
        }
    }
    for chain in next.chains.keys() {
        if !previous.chains.contains_key(chain) {
            t.push_str(&format!("add chain ip {TABLE} {chain}\n"));
        }
    }
    for (chain, rules) in &next.chains {
        match previous.chains.get(chain) {
            Some(old) if old == rules => continue,
            Some(_) => t.push_str(&format!("flush chain ip {TABLE} {chain}\n")),
            None => {}
        }
        for rule in rules {
            t.push_str(&format!("add rule ip {TABLE} {chain} {rule}\n"));
        }
    }
    if previous.pod_cidrs != next.pod_cidrs {
        t.push_str(&format!("flush set ip {TABLE} pod-cidrs\n"));
        if !next.pod_cidrs.is_empty() {
            let cidrs: Vec<&str> = next.pod_cidrs.iter().map(String::as_str).collect();
            t.push_str(&format!(
                "add element ip {TABLE} pod-cidrs {{ {} }}\n",
                cidrs.join(", ")
            ));
        }
    }
    let no_elements = BTreeMap::new();
    for (map, _) in MAPS {
        let old = previous.maps.get(map).unwrap_or(&no_elements);
        let new = next.maps.get(map).unwrap_or(&no_elements);
        for (key, verdict) in old {
            if new.get(key) != Some(verdict) {
                t.push_str(&format!("delete element ip {TABLE} {map} {{ {key} }}\n"));
            }
        }
        for (key, verdict) in new {
            if old.get(key) != Some(verdict) {
                t.push_str(&format!(
                    "add element ip {TABLE} {map} {{ {key} : {verdict} }}\n"
                ));
            }
        }
    }
    // Gone last: by now nothing refers to them.
    let gone: Vec<&String> = previous
        .chains
        .keys()
        .filter(|c| !next.chains.contains_key(*c))
        .collect();
    for chain in &gone {
        t.push_str(&format!("flush chain ip {TABLE} {chain}\n"));
    }
    for chain in &gone {
        t.push_str(&format!("delete chain ip {TABLE} {chain}\n"));
    }
    for set in previous.sets.keys() {
        if !next.sets.contains_key(set) {
            t.push_str(&format!("delete set ip {TABLE} {set}\n"));
        }
    }
    t
}

/// The pod CIDRs of every Node, and the other nodes' `(pod CIDR, address)` for routes.
pub fn node_cidrs(nodes: &[Arc<Node>], own: &str) -> (BTreeSet<String>, Vec<(Cidr, Ipv4Addr)>) {
    let mut cidrs = BTreeSet::new();
    let mut peers = Vec::new();
    for node in nodes {
        let Some(cidr) = node
            .spec
            .as_ref()
            .and_then(|s| s.pod_cidr.as_deref())
            .and_then(|c| Cidr::parse(c).ok())
        else {
            continue;
        };
        cidrs.insert(cidr.to_string());
        if node.name_any() == own {
            continue;
        }
        let address = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .and_then(|a| a.address.parse::<Ipv4Addr>().ok());
        if let Some(address) = address.filter(|a| !a.is_loopback()) {
            peers.push((cidr, address));
        }
    }
    (cidrs, peers)
}

/// The service proxy of one node: the caches it programs from and what it last applied.
pub struct ServiceProxy {
    config: ProxyConfig,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<Node>,
    /// This node's pods, for their host ports.
    pods: Option<Store<Pod>>,
    metrics: ProxyMetrics,
    applied: Option<Ruleset>,
    /// Slice UID → the trigger time already measured, so each change counts once.
    triggers: HashMap<String, String>,
    /// Where failures and recoveries of the programming are reported.
    health: Health,
    /// The load balancer addresses this node announces (see [`announce`]).
    announcer: Announcer,
    /// The node's address and the addresses announced at the last sync of them.
    announced: Option<(Option<Ipv4Addr>, BTreeSet<Ipv4Addr>)>,
}

impl std::fmt::Debug for ServiceProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceProxy")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ServiceProxy {
    /// A proxy programming from these caches.
    pub fn new(
        config: ProxyConfig,
        services: Store<Service>,
        slices: Store<EndpointSlice>,
        nodes: Store<Node>,
        metrics: ProxyMetrics,
    ) -> ServiceProxy {
        ServiceProxy {
            config,
            services,
            slices,
            nodes,
            pods: None,
            metrics,
            applied: None,
            triggers: HashMap::new(),
            health: Health::new(),
            announcer: Announcer::default(),
            announced: None,
        }
    }

    /// Programs the host ports of the pods in `pods` (a cache of this node's pods).
    pub fn with_pods(mut self, pods: Store<Pod>) -> ServiceProxy {
        self.pods = Some(pods);
        self
    }

    /// Reports failed and recovered syncs to `health` (the Node's conditions).
    pub fn with_health(mut self, health: Health) -> ServiceProxy {
        self.health = health;
        self
    }

    /// Brings the table in line with the caches: one nft transaction, nothing sent when
    /// nothing changed. A failed transaction leaves the old rules (nft applies all or
    /// nothing) and makes the next sync replace the table whole.
    pub async fn sync(&mut self) -> Result<(), NetworkError> {
        let begun = Instant::now();
        let (cidrs, _) = node_cidrs(&self.nodes.state(), &self.config.node_name);
        let slices = self.slices.state();
        let services = self.services.state();
        let mut next = desired(&services, &slices, &cidrs, &self.config);
        if let Some(pods) = &self.pods {
            add_host_ports(&mut next, &pods.state(), &self.config);
        }
        if self.applied.as_ref() == Some(&next) {
            return self.announce(&services).await;
        }
        let transaction = transaction(self.applied.as_ref(), &next);
        let mut result = nft(&transaction).await;
        if result.is_ok() && self.applied.is_none() {
            result = allow_localhost_node_ports();
        }
        if let Err(e) = result {
            self.metrics.failures.inc();
            self.applied = None;
            return Err(e);
        }
        let first = self.applied.is_none() && self.triggers.is_empty();
        self.applied = Some(next);
        let now = jiff::Timestamp::now();
        for slice in &slices {
            let (Some(uid), Some(at)) =
                (slice.uid(), slice.annotations().get(TRIGGER_TIME).cloned())
            else {
                continue;
            };
            if self.triggers.get(&uid) == Some(&at) {
                continue;
            }
            // Changes made before this proxy's first sync are not its latency.
            if !first && let Ok(t) = at.parse::<jiff::Timestamp>() {
                let took = now.duration_since(t).as_secs_f64();
                if took >= 0.0 {
                    self.metrics.programming.observe(took);
                }
            }
            self.triggers.insert(uid, at);
        }
        let live: BTreeSet<String> = slices.iter().filter_map(|s| s.uid()).collect();
        self.triggers.retain(|uid, _| live.contains(uid));
        self.metrics
            .sync_duration
            .observe(begun.elapsed().as_secs_f64());
        self.metrics.last_sync.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
        );
        self.announce(&services).await
    }

    /// Puts the load balancer addresses this node announces on its interface (after the
    /// rules that DNAT them), when they or the node's address changed since the last time.
    async fn announce(&mut self, services: &[Arc<Service>]) -> Result<(), NetworkError> {
        let wanted = announce::wanted(services, &self.config.node_name);
        let node_ip = announce::node_ip(&self.nodes.state(), &self.config.node_name);
        let key = (node_ip, wanted);
        if self.announced.as_ref() == Some(&key) {
            return Ok(());
        }
        self.announced = None;
        self.announcer.sync(key.0, &key.1).await?;
        self.announced = Some(key);
        Ok(())
    }

    /// What was applied last.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Syncs whenever `changed` is notified (changes arriving during a sync are picked up
    /// by the next one), and every `resync` in case the table was changed behind its back,
    /// until `shutdown`. Start it once the caches have their first lists (an empty cache
    /// would remove every rule).
    pub async fn run(
        mut self,
        changed: Arc<tokio::sync::Notify>,
        resync: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut backoff = Backoff::default();
        loop {
            if let Err(e) = self.sync().await {
                self.health.failed(Part::ServiceProxy, &e);
                tokio::select! {
                    () = tokio::time::sleep(backoff.next_delay()) => continue,
                    () = &mut shutdown => return,
                }
            }
            backoff.reset();
            self.health.recovered(Part::ServiceProxy);
            tokio::select! {
                () = changed.notified() => {}
                () = tokio::time::sleep(resync) => {
                    self.applied = None;
                    self.announced = None;
                }
                () = &mut shutdown => return,
            }
        }
    }
}

/// Lets node ports answer on 127.0.0.1, as kube-proxy's iptables mode does: a connection
/// from a loopback address, DNATed to a pod here or on another node, may leave through a
/// real interface, and its replies come back to a loopback address (`route_localnet`, for
/// every interface, as kube-proxy sets it). The table's `filter-input` chain drops every
/// other loopback-addressed packet arriving from outside, so this opens nothing else.
fn allow_localhost_node_ports() -> Result<(), NetworkError> {
    std::fs::write("/proc/sys/net/ipv4/conf/all/route_localnet", "1")?;
    Ok(())
}

/// Removes the proxy's table and the load balancer addresses announced (`orq agent
/// --cleanup`).
pub async fn cleanup() -> Result<(), NetworkError> {
    let announced = announce::cleanup().await;
    nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")).await?;
    announced
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(json: serde_json::Value) -> Arc<Service> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    fn slice(json: serde_json::Value) -> Arc<EndpointSlice> {
        Arc::new(serde_json::from_value(json).unwrap())
    }

    fn config() -> ProxyConfig {
        ProxyConfig {
            node_name: "a".into(),
            pod_cidr: Cidr::parse("10.244.1.0/24").unwrap(),
        }
    }

    fn web(kind: &str) -> Arc<Service> {
        service(
            json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "type": kind, "clusterIP": "10.43.0.10",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]}}),
        )
    }

    fn endpoints(ips: &[(&str, &str, bool)]) -> Arc<EndpointSlice> {
        let endpoints: Vec<_> = ips
            .iter()
            .map(|(ip, node, ready)| {
                json!({"addresses": [ip], "nodeName": node,
                "conditions": {"ready": ready}})
            })
            .collect();
        slice(
            json!({"metadata": {"name": "web-abc", "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
        )
    }

    #[test]
    fn ready_endpoints_are_picked_at_random() {
        let rules = desired(
            &[web("NodePort")],
            &[endpoints(&[
                ("10.244.1.5", "a", true),
                ("10.244.2.5", "b", true),
                ("10.244.3.5", "c", false),
            ])],
            &BTreeSet::new(),
            &config(),
        );
        assert_eq!(rules.services(), 1);
        let service = rules
            .chains
            .iter()
            .find(|(c, _)| c.starts_with("service-"))
            .unwrap();
        let pick = service.1.last().unwrap();
        assert!(pick.starts_with("numgen random mod 2 vmap"), "{pick}");
        assert_eq!(
            rules.maps["service-ips"].keys().collect::<Vec<_>>(),
            ["10.43.0.10 . tcp . 80"]
        );
        assert_eq!(
            rules.maps["service-nodeports"].keys().collect::<Vec<_>>(),
            ["tcp . 30080"]
        );
        let local = rules
            .chains
            .iter()
            .find(|(c, _)| c.contains("10.244.1.5/8080"))
            .unwrap();
        assert!(local.1.iter().any(|r| r.contains("ip saddr 10.244.1.0/24")));
        assert!(local.1.last().unwrap().ends_with("dnat to 10.244.1.5:8080"));
        assert!(!rules.chains.keys().any(|c| c.contains("10.244.3.5")));
    }

    #[test]
    fn host_ports_dnat_by_address_and_protocol() {
        let pod = |name: &str, ip: &str, ports: serde_json::Value, phase: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": name, "namespace": "hp"},
                    "spec": {"containers": [{"name": "c", "ports": ports}]},
                    "status": {"phase": phase, "podIP": ip}
                }))
                .unwrap(),
            )
        };
        let pods = [
            pod(
                "pod1",
                "10.244.1.5",
                json!([{"containerPort": 8080, "hostPort": 54323, "hostIP": "127.0.0.1"}]),
                "Running",
            ),
            pod(
                "pod2",
                "10.244.1.6",
                json!([{"containerPort": 8080, "hostPort": 54323, "hostIP": "198.51.100.3"}]),
                "Running",
            ),
            pod(
                "pod3",
                "10.244.1.7",
                json!([{"containerPort": 8081, "hostPort": 54323, "hostIP": "198.51.100.3",
                        "protocol": "UDP"}, {"containerPort": 80, "hostPort": 8000},
                       {"containerPort": 81}, {"containerPort": 82, "hostPort": 8001,
                        "hostIP": "fd00::1"}]),
                "Running",
            ),
            // Finished, and not yet given an address: nothing to forward to.
            pod(
                "done",
                "10.244.1.8",
                json!([{"containerPort": 80, "hostPort": 9000}]),
                "Succeeded",
            ),
            pod(
                "new",
                "",
                json!([{"containerPort": 80, "hostPort": 9001}]),
                "Pending",
            ),
        ];
        let mut rules = desired(&[], &[], &BTreeSet::new(), &config());
        add_host_ports(&mut rules, &pods, &config());
        let keys = |map: &str| rules.maps[map].keys().cloned().collect::<Vec<_>>();
        assert_eq!(
            keys("host-ports"),
            [
                "127.0.0.1 . tcp . 54323",
                "198.51.100.3 . tcp . 54323",
                "198.51.100.3 . udp . 54323"
            ]
        );
        assert_eq!(keys("host-ports-any"), ["tcp . 8000"]);
        let chain = |key: &str, map: &str| {
            let verdict = &rules.maps[map][key];
            rules.chains[verdict.strip_prefix("goto ").unwrap()].clone()
        };
        assert_eq!(
            chain("198.51.100.3 . udp . 54323", "host-ports")
                .last()
                .unwrap(),
            "meta l4proto udp dnat to 10.244.1.7:8081"
        );
        assert_eq!(
            chain("tcp . 8000", "host-ports-any").last().unwrap(),
            "meta l4proto tcp dnat to 10.244.1.7:80"
        );
        assert!(chain("127.0.0.1 . tcp . 54323", "host-ports")[0].contains("mark-for-masquerade"));
        // Every name is an nft identifier (a colon, say, is a syntax error in a chain name).
        for name in rules.chains.keys() {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-./".contains(c)),
                "{name}"
            );
        }
        // They go with their pods, in the same incremental way.
        let before = rules.clone();
        let mut after = desired(&[], &[], &BTreeSet::new(), &config());
        add_host_ports(&mut after, &pods[..1], &config());
        let delta = transaction(Some(&before), &after);
        assert_eq!(delta.matches("delete element").count(), 3, "{delta}");
        assert_eq!(delta.matches("delete chain").count(), 3, "{delta}");
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready_and_internal_local_stays_local() {
        let slice_with = |endpoints: serde_json::Value| {
            slice(
                json!({"metadata": {"name": "web-abc", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"}},
                "addressType": "IPv4", "endpoints": endpoints,
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}),
            )
        };
        let picked = |rules: &Ruleset, prefix: &str| -> Vec<String> {
            let (_, body) = rules
                .chains
                .iter()
                .find(|(c, _)| c.starts_with(prefix))
                .unwrap();
            let last = body.last().unwrap();
            rules
                .chains
                .keys()
                .filter(|c| c.starts_with("endpoint-") && last.contains(c.as_str()))
                .map(|c| c.rsplit("__").next().unwrap().to_owned())
                .collect()
        };
        let terminating = json!({"ready": false, "serving": true, "terminating": true});
        // One ready, one terminating but serving, one terminating and not serving.
        let mixed = slice_with(json!([
            {"addresses": ["10.244.1.5"], "nodeName": "a", "conditions": {"ready": true}},
            {"addresses": ["10.244.2.5"], "nodeName": "b", "conditions": terminating},
            {"addresses": ["10.244.3.5"], "nodeName": "c",
             "conditions": {"ready": false, "serving": false, "terminating": true}},
        ]));
        let rules = desired(&[web("ClusterIP")], &[mixed], &BTreeSet::new(), &config());
        assert_eq!(picked(&rules, "service-"), ["10.244.1.5/8080"]);
        // None ready: the serving terminating one takes the traffic, not a reject.
        let draining = slice_with(json!([
            {"addresses": ["10.244.2.5"], "nodeName": "b", "conditions": terminating},
            {"addresses": ["10.244.3.5"], "nodeName": "c",
             "conditions": {"ready": false, "serving": false, "terminating": true}},
        ]));
        let rules = desired(
            &[web("ClusterIP")],
            &[draining],
            &BTreeSet::new(),
            &config(),
        );
        assert_eq!(picked(&rules, "service-"), ["10.244.2.5/8080"]);
        assert!(rules.maps["no-endpoint-services"].is_empty());

        // internalTrafficPolicy: Local picks this node's endpoints for the cluster IP only.
        let local_policy = service(json!({"metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "NodePort", "clusterIP": "10.43.0.10",
                     "internalTrafficPolicy": "Local",
                     "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}));
        let spread = endpoints(&[("10.244.1.5", "a", true), ("10.244.2.5", "b", true)]);
        let rules = desired(
            std::slice::from_ref(&local_policy),
            &[spread],
            &BTreeSet::new(),
            &config(),
        );
        assert_eq!(picked(&rules, "service-"), ["10.244.1.5/8080"]);
        let mut external = picked(&rules, "external-");
        external.sort();
        assert_eq!(external, ["10.244.1.5/8080", "10.244.2.5/8080"]);
        // No endpoint here: the cluster IP drops rather than leaving the node.
        let elsewhere = endpoints(&[("10.244.2.5", "b", true)]);
        let rules = desired(&[local_policy], &[elsewhere], &BTreeSet::new(), &config());
        let (_, body) = rules
            .chains
            .iter()
            .find(|(c, _)| c.starts_with("service-"))
            .unwrap();
        assert_eq!(body.last().unwrap(), "drop");
    }

    #[test]
    fn no_endpoints_means_reject() {
        let rules = desired(&[web("NodePort")], &[], &BTreeSet::new(), &config());
        assert_eq!(rules.services(), 0);
        assert!(rules.maps["no-endpoint-services"].contains_key("10.43.0.10 . tcp . 80"));
        assert!(rules.maps["no-endpoint-nodeports"].contains_key("tcp . 30080"));
    }

    #[test]
    fn transactions_carry_only_the_difference() {
        let one = desired(
            &[web("ClusterIP")],
            &[endpoints(&[("10.244.1.5", "a", true)])],
            &BTreeSet::new(),
            &config(),
        );
        let full = transaction(None, &one);
        assert!(full.starts_with(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")));
        assert!(transaction(Some(&one), &one).is_empty());
        let two = desired(
            &[web("ClusterIP")],
            &[endpoints(&[
                ("10.244.1.5", "a", true),
                ("10.244.2.5", "b", true),
            ])],
            &BTreeSet::new(),
            &config(),
        );
        let delta = transaction(Some(&one), &two);
        assert!(!delta.contains("delete table"), "{delta}");
        assert!(
            delta.contains("flush chain ip orquestra-proxy service-"),
            "{delta}"
        );
        assert!(delta.contains("10.244.2.5/8080"), "{delta}");
        // The Service goes: its chains are flushed, then deleted, after its map element.
        let gone = transaction(Some(&two), &desired(&[], &[], &BTreeSet::new(), &config()));
        let element = gone.find("delete element").unwrap();
        let chain = gone.find("delete chain").unwrap();
        assert!(element < chain, "{gone}");
        assert_eq!(gone.matches("delete chain").count(), 3, "{gone}");
    }

    fn load_balancer(extra: serde_json::Value) -> Arc<Service> {
        let mut svc = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "type": "LoadBalancer", "clusterIP": "10.43.0.10",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [
                {"ip": "10.214.0.200", "ipMode": "VIP"},
                {"ip": "10.214.0.11"},
                {"ip": "10.214.0.250", "ipMode": "Proxy"},
                {"hostname": "lb.example"}]}}});
        if let (Some(spec), Some(extra)) = (svc["spec"].as_object_mut(), extra.as_object()) {
            spec.extend(extra.clone());
        }
        service(svc)
    }

    #[test]
    fn load_balancer_addresses_go_where_node_ports_go() {
        let ready = [endpoints(&[
            ("10.244.1.5", "a", true),
            ("10.244.2.5", "b", true),
        ])];
        let rules = desired(
            &[load_balancer(json!({}))],
            &ready,
            &BTreeSet::new(),
            &config(),
        );
        let ips = &rules.maps["service-ips"];
        assert_eq!(
            ips.keys().collect::<Vec<_>>(),
            [
                "10.214.0.11 . tcp . 80",
                "10.214.0.200 . tcp . 80",
                "10.43.0.10 . tcp . 80"
            ],
            "VIP (and unset) addresses only, not a proxying load balancer's"
        );
        let external = &ips["10.214.0.200 . tcp . 80"];
        assert!(external.starts_with("goto external-"), "{external}");
        assert_eq!(&rules.maps["service-nodeports"]["tcp . 30080"], external);
        let chain = &rules.chains[external.strip_prefix("goto ").unwrap()];
        assert!(
            chain[0].starts_with("meta mark set"),
            "masqueraded: {chain:?}"
        );

        // `allocateLoadBalancerNodePorts: false`: no node port, the address still answers;
        // `externalTrafficPolicy: Local` picks this node's endpoints only.
        let no_node_port = load_balancer(json!({
            "allocateLoadBalancerNodePorts": false, "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80}]}));
        let rules = desired(&[no_node_port], &ready, &BTreeSet::new(), &config());
        assert!(rules.maps["service-nodeports"].is_empty());
        let external = &rules.maps["service-ips"]["10.214.0.200 . tcp . 80"];
        let chain = &rules.chains[external.strip_prefix("goto ").unwrap()];
        let pick = chain.last().unwrap();
        assert!(pick.starts_with("numgen random mod 1 "), "{chain:?}");
        assert!(pick.contains("10.244.1.5"), "{chain:?}");

        // Without endpoints the address refuses connections; once the Service is no longer
        // a LoadBalancer its stale status is ignored.
        let rules = desired(
            &[load_balancer(json!({}))],
            &[],
            &BTreeSet::new(),
            &config(),
        );
        assert!(rules.maps["no-endpoint-services"].contains_key("10.214.0.200 . tcp . 80"));
        let cluster_ip = load_balancer(json!({"type": "ClusterIP"}));
        let rules = desired(&[cluster_ip], &ready, &BTreeSet::new(), &config());
        assert_eq!(rules.maps["service-ips"].len(), 1);
    }

    #[test]
    fn affinity_and_local_policy() {
        let svc = service(
            json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {
            "type": "NodePort", "clusterIP": "10.43.0.10", "sessionAffinity": "ClientIP",
            "externalTrafficPolicy": "Local",
            "ports": [{"name": "http", "port": 80, "nodePort": 30080}]}}),
        );
        let rules = desired(
            &[svc],
            &[endpoints(&[
                ("10.244.1.5", "a", true),
                ("10.244.2.5", "b", true),
            ])],
            &BTreeSet::new(),
            &config(),
        );
        assert_eq!(rules.sets.len(), 2);
        let external = rules
            .chains
            .iter()
            .find(|(c, _)| c.starts_with("external-"))
            .unwrap();
        assert!(
            external
                .1
                .last()
                .unwrap()
                .starts_with("numgen random mod 1")
        );
        // Outside clients keep their address; pods and the node itself go to the Service.
        assert!(!external.1.iter().any(|r| r.starts_with("meta mark set")));
        assert!(external.1[0].starts_with("ip saddr @pod-cidrs goto service-"));
        let service = rules
            .chains
            .iter()
            .find(|(c, _)| c.starts_with("service-"))
            .unwrap();
        assert!(
            service
                .1
                .iter()
                .any(|r| r.starts_with("ip saddr @affinity-"))
        );
    }
}
