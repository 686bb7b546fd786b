//! The policy table in nftables text: its fixed skeleton, and the transaction taking it from
//! one [`Ruleset`] to the next (only the difference; the whole table when the previous
//! state is unknown). Pure, like [`super::rules`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use super::rules::{Allowed, Isolated, Ruleset, Span};

/// The nftables table the policy enforcement owns (family `ip`).
pub const TABLE: &str = "orquestra-policy";

/// The longest chain or set name we make (the kernel allows 255 bytes).
const MAX_NAME: usize = 200;

/// The two directions, with the maps the packet path consults for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        }
    }

    /// The map from a local pod's address to its chain.
    fn map(self) -> &'static str {
        match self {
            Direction::Ingress => "ingress-pods",
            Direction::Egress => "egress-pods",
        }
    }

    /// The packet's peer address: the source of what comes in, the destination of what
    /// goes out.
    fn peer(self) -> &'static str {
        match self {
            Direction::Ingress => "ip saddr",
            Direction::Egress => "ip daddr",
        }
    }

    fn of(self, rules: &Ruleset) -> &BTreeMap<Ipv4Addr, Isolated> {
        match self {
            Direction::Ingress => &rules.ingress,
            Direction::Egress => &rules.egress,
        }
    }
}

const DIRECTIONS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

/// A short stable hash of `text`, so names stay unique however they are cut.
fn hash(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    hex::encode(&digest[..4]).to_uppercase()
}

/// The name of the chain (and of its set) of a pod isolated in `direction`:
/// `ingress-<hash>-<namespace>/<pod>`, the hash over the address and the pod.
fn chain_name(direction: Direction, ip: Ipv4Addr, isolated: &Isolated) -> String {
    let mut name = format!(
        "{}-{}-{}",
        direction.name(),
        hash(&format!("{ip}/{}", isolated.pod)),
        isolated.pod
    );
    if name.len() > MAX_NAME {
        let mut cut = MAX_NAME;
        while !name.is_char_boundary(cut) {
            cut -= 1;
        }
        name.truncate(cut);
    }
    name
}

/// The isolated pods of `direction` by chain name.
fn named(direction: Direction, rules: &Ruleset) -> BTreeMap<String, (Ipv4Addr, &Isolated)> {
    direction
        .of(rules)
        .iter()
        .map(|(ip, i)| (chain_name(direction, *ip, i), (*ip, i)))
        .collect()
}

/// The rules of the chain of the pod at `ip`: the pod itself (reaching itself through a
/// Service) and what its set holds go on, anything else is dropped.
fn chain_rules(direction: Direction, chain: &str, ip: Ipv4Addr) -> [String; 3] {
    [
        format!("{} {ip} return", direction.peer()),
        format!(
            "{} . meta l4proto . th dport @{chain} return",
            direction.peer()
        ),
        "counter drop".to_owned(),
    ]
}

fn span_text<T: std::fmt::Display + PartialEq + Copy>(span: Span<T>) -> String {
    if span.first == span.last {
        span.first.to_string()
    } else {
        format!("{}-{}", span.first, span.last)
    }
}

/// An element in nft's syntax: `10.0.0.1-10.0.0.9 . 6 . 80-90`.
pub fn element_text(a: &Allowed) -> String {
    let peer = Span {
        first: Ipv4Addr::from(a.peer.first),
        last: Ipv4Addr::from(a.peer.last),
    };
    format!(
        "{} . {} . {}",
        span_text(peer),
        span_text(a.protocol),
        span_text(a.port)
    )
}

/// The table's fixed part: the forward hook and the two maps it consults.
fn skeleton(t: &mut String) {
    let _ = writeln!(t, "add table ip {TABLE}");
    for direction in DIRECTIONS {
        let _ = writeln!(
            t,
            "add map ip {TABLE} {} {{ type ipv4_addr : verdict; }}",
            direction.map()
        );
    }
    let _ = writeln!(
        t,
        "add chain ip {TABLE} forward {{ type filter hook forward priority filter; policy accept; }}"
    );
    for rule in [
        // Replies and the ICMP errors of allowed connections; policies judge new ones.
        "ct state established,related accept",
        "ip saddr vmap @egress-pods",
        "ip daddr vmap @ingress-pods",
    ] {
        let _ = writeln!(t, "add rule ip {TABLE} forward {rule}");
    }
}

/// Adds `elements` to (`add`) or deletes them from a set, a few hundred per command so no
/// line grows without bound.
fn elements(t: &mut String, verb: &str, set: &str, elements: &[&Allowed]) {
    for chunk in elements.chunks(256) {
        let list: Vec<String> = chunk.iter().map(|a| element_text(a)).collect();
        let _ = writeln!(
            t,
            "{verb} element ip {TABLE} {set} {{ {} }}",
            list.join(", ")
        );
    }
}

/// The nft transaction taking the table from `previous` (what was applied; `None`:
/// unknown, so the table is replaced whole) to `next`. Empty when nothing changes.
pub fn transaction(previous: Option<&Ruleset>, next: &Ruleset) -> String {
    let empty = Ruleset::default();
    let mut t = String::new();
    let previous = match previous {
        Some(p) => p,
        None => {
            // Replace whatever is there (an earlier agent's table) in the same transaction.
            let _ = writeln!(t, "add table ip {TABLE}\ndelete table ip {TABLE}");
            skeleton(&mut t);
            &empty
        }
    };
    let no_elements = BTreeSet::new();
    let mut gone = Vec::new();
    for direction in DIRECTIONS {
        // Chains and sets go by name (a pod's name and address), map elements by address.
        let (old, new) = (named(direction, previous), named(direction, next));
        for (name, (ip, isolated)) in &new {
            let before = match old.get(name) {
                Some((_, i)) => &i.allowed,
                None => {
                    let _ = writeln!(
                        t,
                        "add set ip {TABLE} {name} {{ type ipv4_addr . inet_proto . inet_service; flags interval; }}"
                    );
                    let _ = writeln!(t, "add chain ip {TABLE} {name}");
                    for rule in chain_rules(direction, name, *ip) {
                        let _ = writeln!(t, "add rule ip {TABLE} {name} {rule}");
                    }
                    &no_elements
                }
            };
            // Deletions first: a new element may overlap one it replaces.
            let removed: Vec<&Allowed> = before.difference(&isolated.allowed).collect();
            let added: Vec<&Allowed> = isolated.allowed.difference(before).collect();
            elements(&mut t, "delete", name, &removed);
            elements(&mut t, "add", name, &added);
        }
        let jumps =
            |named: &BTreeMap<String, (Ipv4Addr, &Isolated)>| -> BTreeMap<Ipv4Addr, String> {
                named
                    .iter()
                    .map(|(name, (ip, _))| (*ip, name.clone()))
                    .collect()
            };
        let (old_jumps, new_jumps) = (jumps(&old), jumps(&new));
        for (ip, name) in &old_jumps {
            if new_jumps.get(ip) != Some(name) {
                let _ = writeln!(
                    t,
                    "delete element ip {TABLE} {} {{ {ip} }}",
                    direction.map()
                );
            }
        }
        for (ip, name) in &new_jumps {
            if old_jumps.get(ip) != Some(name) {
                let _ = writeln!(
                    t,
                    "add element ip {TABLE} {} {{ {ip} : jump {name} }}",
                    direction.map()
                );
            }
        }
        gone.extend(old.into_keys().filter(|name| !new.contains_key(name)));
    }
    // Gone last: by now no map element jumps to them, and once flushed no rule refers to
    // their sets.
    for name in &gone {
        let _ = writeln!(t, "flush chain ip {TABLE} {name}");
    }
    for name in &gone {
        let _ = writeln!(t, "delete chain ip {TABLE} {name}");
    }
    for name in &gone {
        let _ = writeln!(t, "delete set ip {TABLE} {name}");
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::network::policy::rules::{ANY_PORT, ANY_PROTOCOL};

    fn isolated(pod: &str, peers: &[(u32, u32, u16)]) -> Isolated {
        Isolated {
            pod: pod.into(),
            allowed: peers
                .iter()
                .map(|(first, last, port)| Allowed {
                    peer: Span {
                        first: *first,
                        last: *last,
                    },
                    protocol: Span::one(6),
                    port: Span::one(*port),
                })
                .collect(),
        }
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
    const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

    fn one() -> Ruleset {
        Ruleset {
            ingress: [(A, isolated("x/a", &[(0x0A00_0001, 0x0A00_0001, 80)]))].into(),
            egress: BTreeMap::new(),
        }
    }

    #[test]
    fn elements_in_nft_syntax() {
        let a = Allowed {
            peer: Span {
                first: 0x0A00_0001,
                last: 0x0A00_0009,
            },
            protocol: Span::one(6),
            port: Span {
                first: 80,
                last: 90,
            },
        };
        assert_eq!(element_text(&a), "10.0.0.1-10.0.0.9 . 6 . 80-90");
        let any = Allowed {
            peer: Span::one(0x0A00_0001),
            protocol: ANY_PROTOCOL,
            port: ANY_PORT,
        };
        assert_eq!(element_text(&any), "10.0.0.1 . 0-255 . 0-65535");
    }

    #[test]
    fn a_full_transaction_replaces_the_table() {
        let full = transaction(None, &one());
        assert!(
            full.starts_with(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")),
            "{full}"
        );
        assert!(full.contains("type filter hook forward"), "{full}");
        assert!(
            full.contains(
                "add element ip orquestra-policy ingress-pods { 10.244.1.2 : jump ingress-"
            ),
            "{full}"
        );
        assert!(full.contains(" { 10.0.0.1 . 6 . 80 }"), "{full}");
        assert!(
            full.contains("ip saddr . meta l4proto . th dport @ingress-"),
            "{full}"
        );
        // Nothing changed, nothing sent.
        assert!(transaction(Some(&one()), &one()).is_empty());
        // Nothing isolated: an empty skeleton.
        let empty = transaction(None, &Ruleset::default());
        assert!(!empty.contains("add set"), "{empty}");
    }

    #[test]
    fn transactions_carry_only_the_difference() {
        let before = one();
        let mut after = one();
        if let Some(i) = after.ingress.get_mut(&A) {
            i.allowed = isolated("x/a", &[(0x0A00_0001, 0x0A00_0002, 80), (5, 5, 443)]).allowed;
        }
        after
            .egress
            .insert(B, isolated("x/b", &[(0x0A00_0001, 0x0A00_0001, 53)]));
        let delta = transaction(Some(&before), &after);
        assert!(!delta.contains("delete table"), "{delta}");
        // The replaced element goes before its wider successor comes (no overlap).
        let deleted = delta
            .find("delete element ip orquestra-policy ingress-")
            .unwrap();
        let added = delta
            .find("add element ip orquestra-policy ingress-")
            .unwrap();
        assert!(deleted < added, "{delta}");
        assert!(delta.contains("10.0.0.1-10.0.0.2 . 6 . 80"), "{delta}");
        assert!(
            delta.contains("add chain ip orquestra-policy egress-"),
            "{delta}"
        );
        assert!(
            delta.contains("egress-pods { 10.244.1.3 : jump egress-"),
            "{delta}"
        );
        assert!(!delta.contains("ingress-pods"), "x/a's jump stays: {delta}");
        // x/a no longer isolated: its jump, chain and set go, in that order.
        let gone = transaction(
            Some(&after),
            &Ruleset {
                ingress: BTreeMap::new(),
                egress: after.egress.clone(),
            },
        );
        let element = gone
            .find("delete element ip orquestra-policy ingress-pods")
            .unwrap();
        let chain = gone.find("delete chain").unwrap();
        let set = gone.find("delete set").unwrap();
        assert!(element < chain && chain < set, "{gone}");
        assert!(!gone.contains("egress"), "{gone}");
    }

    #[test]
    fn an_address_taken_over_by_another_pod_jumps_to_its_chain() {
        let before = one();
        let after = Ruleset {
            ingress: [(A, isolated("x/new", &[(1, 1, 80)]))].into(),
            egress: BTreeMap::new(),
        };
        let delta = transaction(Some(&before), &after);
        let delete = delta
            .find("delete element ip orquestra-policy ingress-pods { 10.244.1.2 }")
            .unwrap();
        let add = delta
            .find("add element ip orquestra-policy ingress-pods { 10.244.1.2 : jump")
            .unwrap();
        assert!(delete < add, "{delta}");
    }

    #[test]
    fn names_are_bounded() {
        let long = "n".repeat(63) + "/" + &"p".repeat(253);
        let name = chain_name(Direction::Ingress, A, &isolated(&long, &[]));
        assert!(name.len() <= MAX_NAME, "{}", name.len());
        assert!(name.starts_with("ingress-"));
    }
}
