//! Truth tables in the manner of the upstream `netpol` e2e suite: nine pods (`x/a` … `z/c`,
//! labelled `pod=<name>`, in namespaces labelled `ns=<name>` and
//! `kubernetes.io/metadata.name=<name>`) spread over two nodes, every pod serving TCP, UDP
//! and SCTP on 80 and 81 under the names `serve-<port>-<protocol>`. For each case the
//! rulesets of both nodes are computed and every ordered pair of pods is asked, as the
//! packet path would (the client's node for egress, the server's for ingress), whether a
//! new connection passes; a mismatch prints the whole table.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

use super::rules::{Ruleset, desired};

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const TCP: u8 = 6;
const UDP: u8 = 17;
const SCTP: u8 = 132;

/// Pod `ns/name`: its address and node. Pods alternate between the nodes, so every case
/// checks traffic within a node and across nodes.
fn place(index: usize) -> (Ipv4Addr, &'static str) {
    let node = if index % 2 == 0 { "n1" } else { "n2" };
    let subnet = if index % 2 == 0 { 1 } else { 2 };
    let host = u8::try_from(10 + index).unwrap();
    (Ipv4Addr::new(10, 244, subnet, host), node)
}

/// The cluster of one case: pods, namespaces and the policies under test.
struct Cluster {
    pods: Vec<Arc<Pod>>,
    namespaces: Vec<Arc<Namespace>>,
    /// `ns/name` → (address, node).
    where_: BTreeMap<String, (Ipv4Addr, &'static str)>,
}

impl Cluster {
    fn new() -> Cluster {
        let mut pods = Vec::new();
        let mut where_ = BTreeMap::new();
        let mut ports = Vec::new();
        for port in [80, 81] {
            for protocol in ["TCP", "UDP", "SCTP"] {
                ports.push(
                    json!({"name": format!("serve-{port}-{}", protocol.to_lowercase()),
                                  "containerPort": port, "protocol": protocol}),
                );
            }
        }
        for (i, (ns, pod)) in NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| (*ns, *p)))
            .enumerate()
        {
            let (ip, node) = place(i);
            pods.push(Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                    "spec": {"nodeName": node, "containers": [{"name": "c", "ports": ports}]},
                    "status": {"phase": "Running", "podIP": ip.to_string(),
                               "podIPs": [{"ip": ip.to_string()}]},
                }))
                .unwrap(),
            ));
            where_.insert(format!("{ns}/{pod}"), (ip, node));
        }
        let namespaces = NAMESPACES
            .iter()
            .map(|ns| {
                Arc::new(
                    serde_json::from_value(json!({"metadata": {"name": ns, "labels": {
                        "ns": ns, "kubernetes.io/metadata.name": ns}}}))
                    .unwrap(),
                )
            })
            .collect();
        Cluster {
            pods,
            namespaces,
            where_,
        }
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.where_[pod].0
    }

    /// Relabels pod `ns/name` (the upstream "updated pod" cases).
    fn label_pod(&mut self, pod: &str, key: &str, value: &str) {
        let (ns, name) = pod.split_once('/').unwrap();
        for p in &mut self.pods {
            if p.metadata.namespace.as_deref() == Some(ns)
                && p.metadata.name.as_deref() == Some(name)
            {
                let mut changed = (**p).clone();
                changed
                    .metadata
                    .labels
                    .get_or_insert_default()
                    .insert(key.into(), value.into());
                *p = Arc::new(changed);
            }
        }
    }

    /// Relabels namespace `ns`.
    fn label_namespace(&mut self, ns: &str, key: &str, value: &str) {
        for n in &mut self.namespaces {
            if n.metadata.name.as_deref() == Some(ns) {
                let mut changed = (**n).clone();
                changed
                    .metadata
                    .labels
                    .get_or_insert_default()
                    .insert(key.into(), value.into());
                *n = Arc::new(changed);
            }
        }
    }

    /// The rulesets of both nodes under `policies`.
    fn rules(&self, policies: &[Arc<NetworkPolicy>]) -> BTreeMap<&'static str, Ruleset> {
        ["n1", "n2"]
            .into_iter()
            .map(|node| (node, desired(policies, &self.pods, &self.namespaces, node)))
            .collect()
    }

    /// The observed table: for every ordered pair, whether a new connection on
    /// `protocol`/`port` passes both nodes' rules.
    fn observe(&self, policies: &[Arc<NetworkPolicy>], protocol: u8, port: u16) -> Table {
        let rules = self.rules(policies);
        let mut table = Table::new(true);
        for from in self.where_.keys() {
            for to in self.where_.keys() {
                let (src, src_node) = self.where_[from];
                let (dst, dst_node) = self.where_[to];
                let allowed = rules[src_node].allows(src, dst, protocol, port)
                    && rules[dst_node].allows(src, dst, protocol, port);
                table.set(from, to, allowed);
            }
        }
        table
    }

    /// Asserts that `policies` give exactly `expected` on `protocol`/`port`.
    #[track_caller]
    fn check(&self, policies: &[Value], protocol: u8, port: u16, expected: &Table) {
        let policies: Vec<Arc<NetworkPolicy>> = policies
            .iter()
            .map(|p| Arc::new(serde_json::from_value(p.clone()).unwrap()))
            .collect();
        let observed = self.observe(&policies, protocol, port);
        assert!(
            observed == *expected,
            "protocol {protocol} port {port}\nexpected:\n{}\nobserved:\n{}",
            expected.render(),
            observed.render()
        );
    }
}

/// A reachability matrix: `from` → `to` → allowed. Loopback is always allowed here (the
/// spec leaves it undefined; these rules never cut a pod off from itself).
#[derive(Clone, PartialEq, Eq)]
struct Table(BTreeMap<(String, String), bool>);

impl Table {
    fn new(default: bool) -> Table {
        let mut cells = BTreeMap::new();
        let all = all_pods();
        for from in &all {
            for to in &all {
                cells.insert((from.clone(), to.clone()), default || from == to);
            }
        }
        Table(cells)
    }

    fn set(&mut self, from: &str, to: &str, allowed: bool) {
        self.0
            .insert((from.into(), to.into()), allowed || from == to);
    }

    /// Every pair from pods matching `from` to pods matching `to` (`"x/*"`, `"*"`, `"x/a"`).
    fn expect(mut self, from: &str, to: &str, allowed: bool) -> Table {
        let all = all_pods();
        for f in all.iter().filter(|p| matches(from, p)) {
            for t in all.iter().filter(|p| matches(to, p)) {
                self.set(f, t, allowed);
            }
        }
        self
    }

    fn render(&self) -> String {
        let all = all_pods();
        let mut out = String::from("       ");
        for to in &all {
            out.push_str(&format!("{to:>4}"));
        }
        out.push('\n');
        for from in &all {
            out.push_str(&format!("{from:>6} "));
            for to in &all {
                let cell = if self.0[&(from.clone(), to.clone())] {
                    "."
                } else {
                    "X"
                };
                out.push_str(&format!("{cell:>4}"));
            }
            out.push('\n');
        }
        out
    }
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

fn matches(pattern: &str, pod: &str) -> bool {
    match pattern {
        "*" => true,
        _ => match pattern.strip_suffix("/*") {
            Some(ns) => pod.starts_with(&format!("{ns}/")),
            None => pattern == pod,
        },
    }
}

/// A policy in `ns` selecting pods by `selector` (`{}`: all) with `spec` merged in.
fn policy(ns: &str, name: &str, selector: Value, spec: Value) -> Value {
    let mut full = json!({"podSelector": selector});
    if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
        for (k, v) in extra {
            full.insert(k.clone(), v.clone());
        }
    }
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": ns}, "spec": full})
}

fn pod_a() -> Value {
    json!({"matchLabels": {"pod": "a"}})
}

#[test]
fn no_policy_allows_everything() {
    let c = Cluster::new();
    c.check(&[], TCP, 80, &Table::new(true));
}

#[test]
fn default_deny_ingress() {
    let c = Cluster::new();
    let deny = policy(
        "x",
        "deny-ingress",
        json!({}),
        json!({"policyTypes": ["Ingress"]}),
    );
    let expected = Table::new(true).expect("*", "x/*", false);
    for (protocol, port) in [(TCP, 80), (UDP, 81), (SCTP, 80), (1, 0)] {
        c.check(std::slice::from_ref(&deny), protocol, port, &expected);
    }
}

#[test]
fn default_deny_egress() {
    let c = Cluster::new();
    let deny = policy(
        "x",
        "deny-egress",
        json!({}),
        json!({"policyTypes": ["Egress"]}),
    );
    c.check(
        &[deny],
        TCP,
        80,
        &Table::new(true).expect("x/*", "*", false),
    );
}

#[test]
fn default_deny_all() {
    let c = Cluster::new();
    let deny = policy(
        "x",
        "deny-all",
        json!({}),
        json!({"policyTypes": ["Ingress", "Egress"]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/*", false)
        .expect("x/*", "*", false);
    c.check(&[deny], TCP, 80, &expected);
}

#[test]
fn allow_from_pods_in_the_policy_namespace() {
    let c = Cluster::new();
    let p = policy(
        "x",
        "x-a-from-x-b",
        pod_a(),
        json!({"ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("x/b", "x/a", true);
    c.check(&[p], TCP, 80, &expected);
}

#[test]
fn allow_from_all_namespaces_and_from_one() {
    let c = Cluster::new();
    let all = policy(
        "x",
        "from-all-namespaces",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {}}]}]}),
    );
    c.check(&[all], TCP, 80, &Table::new(true));
    let y = policy(
        "x",
        "from-y",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("y/*", "x/a", true);
    c.check(&[y], TCP, 80, &expected);
    // The label the API server puts on every namespace works the same.
    let by_name = policy(
        "x",
        "from-y-by-name",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels":
            {"kubernetes.io/metadata.name": "y"}}}]}]}),
    );
    c.check(&[by_name], TCP, 80, &expected);
}

#[test]
fn match_expressions() {
    let c = Cluster::new();
    let pods = policy(
        "x",
        "pod-in",
        pod_a(),
        json!({"ingress": [{"from": [{"podSelector": {"matchExpressions":
            [{"key": "pod", "operator": "In", "values": ["b"]}]}}]}]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("x/b", "x/a", true);
    c.check(&[pods], TCP, 80, &expected);
    let namespaces = policy(
        "x",
        "ns-not-in",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchExpressions":
            [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}}]}]}),
    );
    let expected = Table::new(true)
        .expect("x/*", "x/a", false)
        .expect("x/a", "x/a", true);
    c.check(&[namespaces], TCP, 80, &expected);
}

#[test]
fn pod_selector_or_namespace_selector() {
    let c = Cluster::new();
    // Two peers: either matches.
    let p = policy(
        "x",
        "or",
        pod_a(),
        json!({"ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]}},
            {"podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    let expected = Table::new(true).expect("x/c", "x/a", false);
    c.check(&[p], TCP, 80, &expected);
}

#[test]
fn pod_selector_and_namespace_selector() {
    let c = Cluster::new();
    // One peer with both: pods named b in namespaces other than x.
    let p = policy(
        "x",
        "and",
        pod_a(),
        json!({"ingress": [{"from": [{
            "namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "NotIn", "values": ["x"]}]},
            "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("y/b", "x/a", true)
        .expect("z/b", "x/a", true);
    c.check(&[p], TCP, 80, &expected);
    // Several such peers: the union of each one's pods.
    let multiple = policy(
        "x",
        "multiple",
        pod_a(),
        json!({"ingress": [{"from": [
            {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}},
            {"namespaceSelector": {"matchLabels": {"ns": "z"}}, "podSelector": {"matchLabels": {"pod": "c"}}}]}]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("y/b", "x/a", true)
        .expect("z/c", "x/a", true);
    c.check(&[multiple], TCP, 80, &expected);
}

#[test]
fn any_pod_selector() {
    let c = Cluster::new();
    let p = policy(
        "x",
        "any-pod",
        pod_a(),
        json!({"ingress": [{"from": [{"podSelector": {}}]}]}),
    );
    // Every pod of the policy's namespace, no other.
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("x/*", "x/a", true);
    c.check(&[p], TCP, 80, &expected);
}

#[test]
fn ports_and_stacked_policies_are_a_union() {
    let c = Cluster::new();
    let port_81 = policy(
        "x",
        "81-from-y",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                           "ports": [{"port": 81, "protocol": "TCP"}]}]}),
    );
    let allowed = Table::new(true)
        .expect("*", "x/a", false)
        .expect("y/*", "x/a", true);
    let denied = Table::new(true).expect("*", "x/a", false);
    c.check(std::slice::from_ref(&port_81), TCP, 81, &allowed);
    c.check(std::slice::from_ref(&port_81), TCP, 80, &denied);
    c.check(std::slice::from_ref(&port_81), UDP, 81, &denied);
    // A second policy on the same pod adds port 80: the union, not the intersection.
    let port_80 = policy(
        "x",
        "80-from-y",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                           "ports": [{"port": 80, "protocol": "TCP"}]}]}),
    );
    let both = [port_81, port_80];
    c.check(&both, TCP, 81, &allowed);
    c.check(&both, TCP, 80, &allowed);
}

#[test]
fn allow_all_takes_precedence() {
    let c = Cluster::new();
    let allow_all = policy("x", "allow-all", json!({}), json!({"ingress": [{}]}));
    c.check(std::slice::from_ref(&allow_all), TCP, 80, &Table::new(true));
    c.check(std::slice::from_ref(&allow_all), TCP, 81, &Table::new(true));
    let only_80 = policy(
        "x",
        "only-80",
        pod_a(),
        json!({"ingress": [{"ports": [{"port": 80}]}]}),
    );
    c.check(
        std::slice::from_ref(&only_80),
        TCP,
        81,
        &Table::new(true).expect("*", "x/a", false),
    );
    c.check(&[only_80.clone(), allow_all], TCP, 81, &Table::new(true));
    // The same for egress.
    let egress_80 = policy(
        "x",
        "egress-80",
        pod_a(),
        json!({"egress": [{"ports": [{"port": 80}]}], "policyTypes": ["Egress"]}),
    );
    let egress_all = policy(
        "x",
        "egress-all",
        pod_a(),
        json!({"egress": [{}], "policyTypes": ["Egress"]}),
    );
    c.check(
        std::slice::from_ref(&egress_80),
        TCP,
        81,
        &Table::new(true).expect("x/a", "*", false),
    );
    c.check(&[egress_80, egress_all], TCP, 81, &Table::new(true));
}

#[test]
fn named_ports_resolve_on_the_destination() {
    let mut c = Cluster::new();
    let ingress = policy(
        "x",
        "named",
        pod_a(),
        json!({"ingress": [{"ports": [{"port": "serve-80-tcp"}]}]}),
    );
    c.check(std::slice::from_ref(&ingress), TCP, 80, &Table::new(true));
    let denied = Table::new(true).expect("*", "x/a", false);
    c.check(std::slice::from_ref(&ingress), TCP, 81, &denied);
    // The name is the destination's, with its protocol.
    c.check(std::slice::from_ref(&ingress), UDP, 80, &denied);
    let from_y = policy(
        "x",
        "named-from-y",
        pod_a(),
        json!({"ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                           "ports": [{"port": "serve-81-udp", "protocol": "UDP"}]}]}),
    );
    let allowed = Table::new(true)
        .expect("*", "x/a", false)
        .expect("y/*", "x/a", true);
    c.check(std::slice::from_ref(&from_y), UDP, 81, &allowed);
    c.check(std::slice::from_ref(&from_y), UDP, 80, &denied);
    // Egress: resolved on each peer. z/b calls its port 80 `web`; nobody else has it.
    let egress = policy(
        "x",
        "egress-named",
        pod_a(),
        json!({"egress": [{"ports": [{"port": "serve-80-tcp"}]}], "policyTypes": ["Egress"]}),
    );
    c.check(std::slice::from_ref(&egress), TCP, 80, &Table::new(true));
    c.check(
        std::slice::from_ref(&egress),
        TCP,
        81,
        &Table::new(true).expect("x/a", "*", false),
    );
    c.pods = c
        .pods
        .iter()
        .map(|p| {
            if p.metadata.namespace.as_deref() == Some("z")
                && p.metadata.name.as_deref() == Some("b")
            {
                let mut p = (**p).clone();
                if let Some(spec) = &mut p.spec {
                    spec.containers[0].ports = Some(vec![
                        serde_json::from_value(
                            json!({"name": "web", "containerPort": 8080, "protocol": "TCP"}),
                        )
                        .unwrap(),
                    ]);
                }
                Arc::new(p)
            } else {
                Arc::clone(p)
            }
        })
        .collect();
    let web = policy(
        "x",
        "egress-web",
        pod_a(),
        json!({"egress": [{"ports": [{"port": "web"}]}], "policyTypes": ["Egress"]}),
    );
    let expected = Table::new(true)
        .expect("x/a", "*", false)
        .expect("x/a", "z/b", true);
    c.check(std::slice::from_ref(&web), TCP, 8080, &expected);
    c.check(
        std::slice::from_ref(&web),
        TCP,
        80,
        &Table::new(true).expect("x/a", "*", false),
    );
}

#[test]
fn port_ranges_and_protocol_only_ports() {
    let c = Cluster::new();
    let range = policy(
        "x",
        "range",
        pod_a(),
        json!({"ingress": [{"ports": [{"port": 79, "endPort": 80, "protocol": "TCP"}]}]}),
    );
    let denied = Table::new(true).expect("*", "x/a", false);
    c.check(std::slice::from_ref(&range), TCP, 80, &Table::new(true));
    c.check(std::slice::from_ref(&range), TCP, 79, &Table::new(true));
    c.check(std::slice::from_ref(&range), TCP, 81, &denied);
    // A protocol without a port: every port of that protocol, no other protocol.
    let tcp = policy(
        "x",
        "any-tcp",
        pod_a(),
        json!({"ingress": [{"ports": [{"protocol": "TCP"}]}]}),
    );
    c.check(std::slice::from_ref(&tcp), TCP, 81, &Table::new(true));
    c.check(std::slice::from_ref(&tcp), TCP, 65535, &Table::new(true));
    c.check(std::slice::from_ref(&tcp), UDP, 81, &denied);
}

#[test]
fn protocols_are_not_confused() {
    let c = Cluster::new();
    let denied = Table::new(true).expect("*", "x/a", false);
    let sctp = policy(
        "x",
        "sctp",
        pod_a(),
        json!({"ingress": [{"ports": [{"port": 80, "protocol": "SCTP"}]}]}),
    );
    c.check(std::slice::from_ref(&sctp), SCTP, 80, &Table::new(true));
    c.check(std::slice::from_ref(&sctp), TCP, 80, &denied);
    let udp = policy(
        "x",
        "udp",
        pod_a(),
        json!({"ingress": [{"ports": [{"port": 81, "protocol": "UDP"}]}]}),
    );
    c.check(std::slice::from_ref(&udp), UDP, 81, &Table::new(true));
    c.check(std::slice::from_ref(&udp), TCP, 81, &denied);
}

#[test]
fn egress_by_pod_selector_and_namespace() {
    let c = Cluster::new();
    let deny_a = policy(
        "x",
        "deny-a-egress",
        pod_a(),
        json!({"policyTypes": ["Egress"]}),
    );
    c.check(
        &[deny_a],
        TCP,
        80,
        &Table::new(true).expect("x/a", "*", false),
    );
    let to_y_b = policy(
        "x",
        "to-y-b",
        pod_a(),
        json!({"policyTypes": ["Egress"], "egress": [{"to": [{
            "namespaceSelector": {"matchLabels": {"ns": "y"}},
            "podSelector": {"matchLabels": {"pod": "b"}}}]}]}),
    );
    let expected = Table::new(true)
        .expect("x/a", "*", false)
        .expect("x/a", "y/b", true);
    c.check(&[to_y_b], TCP, 80, &expected);
}

#[test]
fn ingress_and_egress_together_and_independent() {
    let c = Cluster::new();
    let p = policy(
        "x",
        "both",
        pod_a(),
        json!({
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}],
            "policyTypes": ["Ingress", "Egress"]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("y/*", "x/a", true)
        .expect("x/a", "*", false)
        .expect("x/a", "z/*", true);
    c.check(&[p], TCP, 80, &expected);
    // Egress rules present and no policyTypes: both directions are isolated.
    let defaulted = policy(
        "x",
        "defaulted",
        pod_a(),
        json!({"egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}]}]}),
    );
    let expected = Table::new(true)
        .expect("*", "x/a", false)
        .expect("x/a", "*", false)
        .expect("x/a", "z/*", true);
    c.check(&[defaulted], TCP, 80, &expected);
}

#[test]
fn egress_deny_wins_over_the_servers_allow() {
    let c = Cluster::new();
    // y/a accepts everyone on 80; x/a may send nowhere.
    let server = policy(
        "y",
        "server-allows",
        pod_a(),
        json!({"ingress": [{"ports": [{"port": 80}]}]}),
    );
    let client = policy(
        "x",
        "client-denies",
        pod_a(),
        json!({"policyTypes": ["Egress"]}),
    );
    let expected = Table::new(true).expect("x/a", "*", false);
    c.check(&[server, client], TCP, 80, &expected);
}

#[test]
fn ip_blocks_with_except() {
    let c = Cluster::new();
    let y_b = c.ip("y/b");
    let to_cidr = policy(
        "x",
        "to-y-b",
        pod_a(),
        json!({"egress": [{"to": [{"ipBlock": {"cidr": format!("{y_b}/32")}}]}], "policyTypes": ["Egress"]}),
    );
    let expected = Table::new(true)
        .expect("x/a", "*", false)
        .expect("x/a", "y/b", true);
    c.check(std::slice::from_ref(&to_cidr), TCP, 80, &expected);
    // All of 10.0.0.0/8 but x/b.
    let x_b = c.ip("x/b");
    let except = policy(
        "x",
        "except-x-b",
        pod_a(),
        json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("{x_b}/32")]}}]}], "policyTypes": ["Egress"]}),
    );
    let expected = Table::new(true).expect("x/a", "x/b", false);
    c.check(std::slice::from_ref(&except), TCP, 80, &expected);
    // Another policy allowing x/b's address: the union lets it through.
    let x_b_too = policy(
        "x",
        "x-b-too",
        pod_a(),
        json!({"egress": [{"to": [{"ipBlock": {"cidr": format!("{x_b}/32")}}]}], "policyTypes": ["Egress"]}),
    );
    c.check(&[except.clone(), x_b_too], TCP, 80, &Table::new(true));
    // Ingress from a block with a hole: one node's pods but x/c.
    let x_c = c.ip("x/c");
    let from_block = policy(
        "y",
        "from-n1",
        json!({"matchLabels": {"pod": "b"}}),
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/24", "except": [format!("{x_c}/32")]}}]}]}),
    );
    let mut expected = Table::new(true).expect("*", "y/b", false);
    for pod in all_pods() {
        if c.where_[&pod].1 == "n1" && pod != "x/c" {
            expected.set(&pod, "y/b", true);
        }
    }
    c.check(&[from_block], TCP, 80, &expected);
    // An IPv6 block matches no IPv4 peer.
    let v6 = policy(
        "x",
        "v6",
        pod_a(),
        json!({"ingress": [{"from": [{"ipBlock": {"cidr": "fd00::/8"}}]}]}),
    );
    c.check(&[v6], TCP, 80, &Table::new(true).expect("*", "x/a", false));
}

#[test]
fn updated_pods_and_namespaces_change_the_verdict() {
    let mut c = Cluster::new();
    let p = policy(
        "x",
        "from-labelled",
        pod_a(),
        json!({"ingress": [{"from": [
            {"podSelector": {"matchLabels": {"pod": "b"}}, "namespaceSelector": {}},
            {"namespaceSelector": {"matchLabels": {"team": "blue"}}}]}]}),
    );
    let before = Table::new(true)
        .expect("*", "x/a", false)
        .expect("x/b", "x/a", true)
        .expect("y/b", "x/a", true)
        .expect("z/b", "x/a", true);
    c.check(std::slice::from_ref(&p), TCP, 80, &before);
    c.label_namespace("z", "team", "blue");
    c.check(
        std::slice::from_ref(&p),
        TCP,
        80,
        &before.clone().expect("z/*", "x/a", true),
    );
    // x/a relabelled out of the policy: no longer isolated.
    c.label_pod("x/a", "pod", "renamed");
    c.check(std::slice::from_ref(&p), TCP, 80, &Table::new(true));
}

#[test]
fn policies_of_other_namespaces_select_nothing_here() {
    let c = Cluster::new();
    // A policy in y selecting `pod=a` isolates y/a, not x/a.
    let p = policy("y", "deny", pod_a(), json!({"policyTypes": ["Ingress"]}));
    c.check(&[p], TCP, 80, &Table::new(true).expect("*", "y/a", false));
}

#[test]
fn each_node_holds_only_its_own_pods() {
    let c = Cluster::new();
    let deny: Arc<NetworkPolicy> = Arc::new(
        serde_json::from_value(policy(
            "x",
            "deny",
            json!({}),
            json!({"policyTypes": ["Ingress", "Egress"]}),
        ))
        .unwrap(),
    );
    let rules = c.rules(&[deny]);
    for (node, ruleset) in &rules {
        for ip in ruleset.ingress.keys().chain(ruleset.egress.keys()) {
            let pod = c.where_.iter().find(|(_, (a, _))| a == ip).unwrap();
            assert_eq!(pod.1.1, *node, "{} programmed on {node}", pod.0);
        }
    }
    assert_eq!(rules["n1"].ingress.len() + rules["n2"].ingress.len(), 3);
}

/// The kernel takes what the truth tables were computed from: a whole table, then one
/// change after another as deltas, loaded into a private network namespace (`unshare
/// --net`, gone with the process) — root only, skipped otherwise.
#[test]
fn the_kernel_accepts_the_transactions() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a network namespace and nftables");
        return;
    }
    let c = Cluster::new();
    let parse = |v: Value| -> Arc<NetworkPolicy> { Arc::new(serde_json::from_value(v).unwrap()) };
    let x_b = c.ip("x/b");
    let steps: Vec<Vec<Arc<NetworkPolicy>>> = vec![
        vec![parse(policy(
            "x",
            "deny",
            json!({}),
            json!({"policyTypes": ["Ingress", "Egress"]}),
        ))],
        vec![
            parse(policy(
                "x",
                "deny",
                json!({}),
                json!({"policyTypes": ["Ingress", "Egress"]}),
            )),
            parse(policy(
                "x",
                "except",
                pod_a(),
                json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("{x_b}/32")]}}],
                                   "ports": [{"port": 80, "endPort": 90}, {"port": "serve-81-udp", "protocol": "UDP"}]}],
                       "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "SCTP"}]}]}),
            )),
        ],
        // x/b's address allowed too: its elements merge with their neighbours.
        vec![parse(policy(
            "x",
            "except",
            pod_a(),
            json!({"egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                                   "ports": [{"port": 80, "endPort": 90}]}]}),
        ))],
        vec![],
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut previous: Option<Ruleset> = None;
    let mut script = String::from("set -e\n");
    for (i, policies) in steps.iter().enumerate() {
        let next = desired(policies, &c.pods, &c.namespaces, "n1");
        let text = super::table::transaction(previous.as_ref(), &next);
        let path = dir.path().join(format!("{i}.nft"));
        std::fs::write(&path, &text).unwrap();
        script.push_str(&format!("nft -f {}\n", path.display()));
        previous = Some(next);
    }
    // And a whole replacement on top of what is there (a resync).
    let path = dir.path().join("resync.nft");
    std::fs::write(
        &path,
        super::table::transaction(None, previous.as_ref().unwrap()),
    )
    .unwrap();
    script.push_str(&format!(
        "nft -f {}\nnft list table ip {}\n",
        path.display(),
        super::TABLE
    ));
    let out = std::process::Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{script}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("hook forward"), "{listed}");
}
