//! The filters and scores that look at other pods across topology domains (kube-scheduler's
//! InterPodAffinity and PodTopologySpread): required and preferred pod affinity and
//! anti-affinity — the pod's own terms and the anti-affinity of pods already placed — and
//! `topologySpreadConstraints`.
//!
//! They are computed once per scheduling cycle into [`Constraints`]: the placed pods are
//! counted per topology value once, so checking each node is a lookup. A pod without such
//! terms in a cluster where no placed pod has any gets [`Constraints::none`], and costs
//! nothing.

use std::collections::{BTreeMap, HashMap, HashSet};

use k8s_openapi::api::core::v1::{Namespace, Pod, PodAffinityTerm, TopologySpreadConstraint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::ResourceExt;

use super::filter;
use super::snapshot::{NodeInfo, Snapshot};

/// A node breaking a `DoNotSchedule` spread constraint.
pub const SPREAD_UNSATISFIED: &str = "node(s) didn't match pod topology spread constraints";
/// A node without a spread constraint's topology label.
pub const SPREAD_MISSING: &str =
    "node(s) didn't match pod topology spread constraints (missing required label)";
/// A node without the pods the pod's required affinity asks for.
pub const AFFINITY_UNSATISFIED: &str = "node(s) didn't match pod affinity rules";
/// A node (domain) with pods the pod's required anti-affinity rules out.
pub const ANTI_AFFINITY: &str = "node(s) didn't match pod anti-affinity rules";
/// A node (domain) whose pods' anti-affinity rules the pod out.
pub const EXISTING_ANTI: &str = "node(s) didn't satisfy existing pods anti-affinity rules";

/// Namespace name → labels, for `namespaceSelector`s.
pub type NamespaceLabels = HashMap<String, BTreeMap<String, String>>;

/// Builds the namespace label map from the cached namespaces.
pub fn namespace_labels(namespaces: &[std::sync::Arc<Namespace>]) -> NamespaceLabels {
    namespaces
        .iter()
        .map(|n| (n.name_any(), n.labels().clone()))
        .collect()
}

/// Whether any of `pod`'s pod (anti-)affinity terms selects namespaces by label.
pub fn selects_namespaces(pod: &Pod) -> bool {
    let Some(affinity) = pod.spec.as_ref().and_then(|s| s.affinity.as_ref()) else {
        return false;
    };
    let required = |terms: Option<&Vec<PodAffinityTerm>>| {
        terms
            .into_iter()
            .flatten()
            .any(|t| t.namespace_selector.is_some())
    };
    let weighted = |terms: Option<&Vec<k8s_openapi::api::core::v1::WeightedPodAffinityTerm>>| {
        terms
            .into_iter()
            .flatten()
            .any(|t| t.pod_affinity_term.namespace_selector.is_some())
    };
    let aff = affinity.pod_affinity.as_ref();
    let anti = affinity.pod_anti_affinity.as_ref();
    required(aff.and_then(|a| {
        a.required_during_scheduling_ignored_during_execution
            .as_ref()
    })) || required(anti.and_then(|a| {
        a.required_during_scheduling_ignored_during_execution
            .as_ref()
    })) || weighted(aff.and_then(|a| {
        a.preferred_during_scheduling_ignored_during_execution
            .as_ref()
    })) || weighted(anti.and_then(|a| {
        a.preferred_during_scheduling_ignored_during_execution
            .as_ref()
    }))
}

/// A pod affinity term resolved against the pod that has it.
#[derive(Debug)]
struct Term {
    key: String,
    /// `None`: every namespace.
    namespaces: Option<HashSet<String>>,
    selector: Option<LabelSelector>,
}

impl Term {
    fn of(term: &PodAffinityTerm, owner: &Pod, namespaces: &NamespaceLabels) -> Term {
        let owner_ns = owner.namespace().unwrap_or_default();
        let mut set: HashSet<String> = term.namespaces.iter().flatten().cloned().collect();
        let mut all = false;
        match &term.namespace_selector {
            Some(s)
                if s.match_labels.as_ref().is_none_or(|m| m.is_empty())
                    && s.match_expressions.as_ref().is_none_or(|e| e.is_empty()) =>
            {
                all = true;
            }
            Some(s) => set.extend(
                namespaces
                    .iter()
                    .filter(|(_, labels)| crate::labels::matches(s, labels))
                    .map(|(name, _)| name.clone()),
            ),
            None if set.is_empty() => {
                set.insert(owner_ns);
            }
            None => {}
        }
        let selector = term.label_selector.clone().map(|mut s| {
            let labels = owner.labels();
            let extra = |keys: &Option<Vec<String>>, op: &str| {
                keys.iter()
                    .flatten()
                    .filter_map(|k| {
                        Some(LabelSelectorRequirement {
                            key: k.clone(),
                            operator: op.into(),
                            values: Some(vec![labels.get(k)?.clone()]),
                        })
                    })
                    .collect::<Vec<_>>()
            };
            let mut more = extra(&term.match_label_keys, "In");
            more.extend(extra(&term.mismatch_label_keys, "NotIn"));
            if !more.is_empty() {
                s.match_expressions
                    .get_or_insert_with(Vec::new)
                    .extend(more);
            }
            s
        });
        Term {
            key: term.topology_key.clone(),
            namespaces: (!all).then_some(set),
            selector,
        }
    }

    /// Whether `pod` is one the term is about (a nil selector matches nothing).
    fn matches(&self, pod: &Pod) -> bool {
        let Some(selector) = &self.selector else {
            return false;
        };
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        self.namespaces.as_ref().is_none_or(|set| set.contains(ns))
            && crate::labels::matches(selector, pod.labels())
    }
}

/// A placed pod's pod (anti-)affinity terms, resolved once when a snapshot places it.
#[derive(Debug, Default)]
pub struct PodTerms {
    affinity: Vec<Term>,
    anti: Vec<Term>,
    /// Preferred terms, anti-affinity ones with negative weights.
    preferred: Vec<(i64, Term)>,
}

impl PodTerms {
    /// Resolves `pod`'s terms.
    pub fn of(pod: &Pod, namespaces: &NamespaceLabels) -> PodTerms {
        let affinity = pod.spec.as_ref().and_then(|s| s.affinity.as_ref());
        let aff = affinity.and_then(|a| a.pod_affinity.as_ref());
        let anti = affinity.and_then(|a| a.pod_anti_affinity.as_ref());
        let resolve = |terms: Option<&Vec<PodAffinityTerm>>| {
            terms
                .into_iter()
                .flatten()
                .map(|t| Term::of(t, pod, namespaces))
                .collect::<Vec<_>>()
        };
        let weighted =
            |terms: Option<&Vec<k8s_openapi::api::core::v1::WeightedPodAffinityTerm>>,
             sign: i64| {
                terms
                    .into_iter()
                    .flatten()
                    .map(|w| {
                        (
                            sign * i64::from(w.weight),
                            Term::of(&w.pod_affinity_term, pod, namespaces),
                        )
                    })
                    .collect::<Vec<_>>()
            };
        let mut preferred = weighted(
            aff.and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            1,
        );
        preferred.extend(weighted(
            anti.and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            }),
            -1,
        ));
        PodTerms {
            affinity: resolve(aff.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            anti: resolve(anti.and_then(|a| {
                a.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })),
            preferred,
        }
    }
}

/// One spread constraint, counted.
#[derive(Debug)]
struct Spread {
    key: String,
    max_skew: i64,
    /// Matching pods per topology value, over the eligible nodes.
    counts: HashMap<String, i64>,
    min: i64,
    self_match: i64,
}

/// What the pod's affinity, anti-affinity and spread constraints ask of each node this cycle.
#[derive(Debug, Default)]
pub struct Constraints {
    /// Required affinity: per term, its topology key and the matching pods per value.
    affinity: Vec<(String, HashMap<String, usize>)>,
    /// No pod anywhere matches the affinity terms, and the pod matches them itself: the
    /// first of a group goes anywhere its terms' topology labels exist.
    affinity_first: bool,
    anti: Vec<(String, HashMap<String, usize>)>,
    /// Domains `(key, value)` placed pods' anti-affinity keeps the pod out of.
    existing_anti: HashSet<(String, String)>,
    /// Preferred terms (both ways): key → value → weight.
    preferred: HashMap<String, HashMap<String, i64>>,
    hard_spread: Vec<Spread>,
    soft_spread: Vec<Spread>,
}

impl Constraints {
    /// No constraints.
    pub fn none() -> Constraints {
        Constraints::default()
    }

    /// Whether any score here could differ between nodes.
    pub fn scores(&self) -> bool {
        !self.preferred.is_empty() || !self.soft_spread.is_empty()
    }

    /// Counts what `pod`'s terms and the placed pods' terms need this cycle.
    pub fn of(pod: &Pod, snapshot: &Snapshot) -> Constraints {
        let namespaces = &snapshot.namespaces;
        let mut c = Constraints::none();
        let spec = pod.spec.as_ref();
        let affinity = spec.and_then(|s| s.affinity.as_ref());
        let pod_affinity = affinity.and_then(|a| a.pod_affinity.as_ref());
        let pod_anti = affinity.and_then(|a| a.pod_anti_affinity.as_ref());
        let count = |term: &Term| -> HashMap<String, usize> {
            let mut counts = HashMap::new();
            for (node, usage) in snapshot.nodes.iter().zip(&snapshot.usage) {
                let Some(value) = node.label(&term.key) else {
                    continue;
                };
                let n = usage.placed.iter().filter(|p| term.matches(&p.pod)).count();
                if n > 0 {
                    *counts.entry(value.clone()).or_default() += n;
                }
            }
            counts
        };
        let required = |terms: Option<&Vec<PodAffinityTerm>>| {
            terms
                .into_iter()
                .flatten()
                .map(|t| Term::of(t, pod, namespaces))
                .collect::<Vec<_>>()
        };
        let affinity_terms = required(pod_affinity.and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        }));
        for term in &affinity_terms {
            c.affinity.push((term.key.clone(), count(term)));
        }
        c.affinity_first = !affinity_terms.is_empty()
            && c.affinity.iter().all(|(_, counts)| counts.is_empty())
            && affinity_terms.iter().all(|t| t.matches(pod));
        for term in required(pod_anti.and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        })) {
            c.anti.push((term.key.clone(), count(&term)));
        }
        // Preferred terms of the pod: weight per domain of each matching placed pod.
        let mut weights: HashMap<String, HashMap<String, i64>> = HashMap::new();
        let mut add = |key: &str, value: &String, weight: i64| {
            *weights
                .entry(key.to_owned())
                .or_default()
                .entry(value.clone())
                .or_default() += weight;
        };
        let preferred = pod_affinity
            .and_then(|a| {
                a.preferred_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .into_iter()
            .flatten()
            .map(|w| (i64::from(w.weight), &w.pod_affinity_term))
            .chain(
                pod_anti
                    .and_then(|a| {
                        a.preferred_during_scheduling_ignored_during_execution
                            .as_ref()
                    })
                    .into_iter()
                    .flatten()
                    .map(|w| (-i64::from(w.weight), &w.pod_affinity_term)),
            );
        for (weight, term) in preferred {
            let term = Term::of(term, pod, namespaces);
            for (value, n) in count(&term) {
                add(&term.key, &value, weight * n as i64);
            }
        }
        // The placed pods' terms about this pod (resolved when the snapshot placed them).
        for (at, terms) in &snapshot.with_affinity {
            let Some(node) = snapshot.nodes.get(*at) else {
                continue;
            };
            for term in terms.anti.iter().filter(|t| t.matches(pod)) {
                if let Some(value) = node.label(&term.key) {
                    c.existing_anti.insert((term.key.clone(), value.clone()));
                }
            }
            // kube's hardPodAffinityWeight: a placed pod's required affinity draws the pod.
            let draws = terms.affinity.iter().map(|t| (1, t));
            for (weight, term) in draws.chain(terms.preferred.iter().map(|(w, t)| (*w, t))) {
                if term.matches(pod)
                    && let Some(value) = node.label(&term.key)
                {
                    add(&term.key, value, weight);
                }
            }
        }
        weights.retain(|_, values| values.values().any(|w| *w != 0));
        c.preferred = weights;
        for constraint in spec
            .and_then(|s| s.topology_spread_constraints.as_ref())
            .into_iter()
            .flatten()
        {
            let spread = Spread::of(constraint, pod, snapshot);
            if constraint.when_unsatisfiable == "DoNotSchedule" {
                c.hard_spread.push(spread);
            } else {
                c.soft_spread.push(spread);
            }
        }
        c
    }

    /// Whether `pod` may go to `node` by these constraints.
    pub fn allows(&self, node: &NodeInfo) -> Result<(), &'static str> {
        for spread in &self.hard_spread {
            let Some(value) = node.label(&spread.key) else {
                return Err(SPREAD_MISSING);
            };
            let here = spread.counts.get(value).copied().unwrap_or(0);
            if here + spread.self_match - spread.min > spread.max_skew {
                return Err(SPREAD_UNSATISFIED);
            }
        }
        for (key, counts) in &self.affinity {
            match node.label(key) {
                None => return Err(AFFINITY_UNSATISFIED),
                Some(value) if !self.affinity_first && !counts.contains_key(value) => {
                    return Err(AFFINITY_UNSATISFIED);
                }
                Some(_) => {}
            }
        }
        for (key, counts) in &self.anti {
            if node.label(key).is_some_and(|v| counts.contains_key(v)) {
                return Err(ANTI_AFFINITY);
            }
        }
        if !self.existing_anti.is_empty()
            && self
                .existing_anti
                .iter()
                .any(|(key, value)| node.label(key) == Some(value))
        {
            return Err(EXISTING_ANTI);
        }
        Ok(())
    }

    /// The raw preference for `node`: preferred (anti-)affinity weights, then minus the
    /// matching pods in its domain per soft spread constraint. Normalized across the
    /// feasible nodes by the caller.
    pub fn raw_scores(&self, node: &NodeInfo) -> (i64, i64) {
        let affinity = self
            .preferred
            .iter()
            .filter_map(|(key, values)| values.get(node.label(key)?))
            .sum();
        let spread = self
            .soft_spread
            .iter()
            .map(|s| match node.label(&s.key) {
                Some(value) => -s.counts.get(value).copied().unwrap_or(0),
                None => -s.counts.values().copied().max().unwrap_or(0) - 1,
            })
            .sum();
        (affinity, spread)
    }
}

impl Spread {
    fn of(constraint: &TopologySpreadConstraint, pod: &Pod, snapshot: &Snapshot) -> Spread {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let mut selector = constraint.label_selector.clone();
        if let Some(s) = selector.as_mut() {
            let labels = pod.labels();
            let more: Vec<_> = constraint
                .match_label_keys
                .iter()
                .flatten()
                .filter_map(|k| {
                    Some(LabelSelectorRequirement {
                        key: k.clone(),
                        operator: "In".into(),
                        values: Some(vec![labels.get(k)?.clone()]),
                    })
                })
                .collect();
            s.match_expressions
                .get_or_insert_with(Vec::new)
                .extend(more);
        }
        let matches = |p: &Pod| {
            selector
                .as_ref()
                .is_some_and(|s| crate::labels::matches(s, p.labels()))
        };
        let honor_affinity = constraint.node_affinity_policy.as_deref() != Some("Ignore");
        let honor_taints = constraint.node_taints_policy.as_deref() == Some("Honor");
        let tolerations = pod
            .spec
            .as_ref()
            .and_then(|s| s.tolerations.as_deref())
            .unwrap_or_default();
        let mut counts: HashMap<String, i64> = HashMap::new();
        for (node, usage) in snapshot.nodes.iter().zip(&snapshot.usage) {
            let Some(value) = node.label(&constraint.topology_key) else {
                continue;
            };
            if honor_affinity
                && !pod
                    .spec
                    .as_ref()
                    .is_some_and(|s| filter::placeable(s, &node.node))
            {
                continue;
            }
            if honor_taints && filter::untolerated(tolerations, &node.node).is_some() {
                continue;
            }
            let n = usage
                .placed
                .iter()
                .filter(|p| {
                    p.pod.metadata.deletion_timestamp.is_none()
                        && p.pod.metadata.namespace.as_deref() == Some(ns)
                        && matches(&p.pod)
                })
                .count() as i64;
            *counts.entry(value.clone()).or_default() += n;
        }
        let min_domains = constraint.min_domains.unwrap_or(1).max(1) as usize;
        let min = if counts.len() < min_domains {
            0
        } else {
            counts.values().copied().min().unwrap_or(0)
        };
        Spread {
            key: constraint.topology_key.clone(),
            max_skew: i64::from(constraint.max_skew.max(1)),
            counts,
            min,
            self_match: i64::from(matches(pod)),
        }
    }
}
