//! Scoring the feasible nodes, higher is better. The base score (always computed) spreads a
//! controller's pods first, then prefers the least allocated node, then fewer pods. The
//! pod's preferences — preferred node affinity, preferred pod (anti-)affinity, soft
//! topology spread, `PreferNoSchedule` taints — are normalized to 0–100 across the feasible
//! nodes as kube-scheduler's plugins are, weighted as its default profile weighs them
//! (2, 2, 2 and 3), and dominate the base score; a pod without preferences skips this pass.

use k8s_openapi::api::core::v1::Pod;

use super::filter;
use super::snapshot::{NodeInfo, Requests, Usage};

/// The base score: each pod of the same owner already on the node costs 100,000; the least
/// allocated node gains up to 100,000; each pod there costs 1.
pub fn base(node: &NodeInfo, wanted: &Requests, used: Option<&Usage>, owner: Option<&str>) -> i64 {
    let default = Usage::default();
    let used = used.unwrap_or(&default);
    let free = |total: Option<i64>, used: i64| -> i64 {
        match total {
            Some(total) if total > 0 => ((total - used).max(0) * 100) / total,
            _ => 100,
        }
    };
    let least_allocated = (free(node.cpu, used.cpu + wanted.cpu)
        + free(node.memory, used.memory + wanted.memory))
        / 2;
    let same_owner = owner.and_then(|o| used.owners.get(o)).copied().unwrap_or(0);
    -same_owner * 100_000 + least_allocated * 1_000 - used.pods
}

/// The weights of matching preferred node affinity terms.
pub fn node_affinity(pod: &Pod, node: &NodeInfo) -> i64 {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .into_iter()
        .flatten()
        .filter(|t| filter::term_matches(&t.preference, &node.node))
        .map(|t| i64::from(t.weight))
        .sum()
}

/// Whether the pod has preferred node affinity terms.
pub fn prefers_nodes(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.preferred_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .is_some_and(|t| !t.is_empty())
}

/// `PreferNoSchedule` taints of the node the pod does not tolerate.
pub fn intolerable(pod: &Pod, node: &NodeInfo) -> i64 {
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    node.node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect == "PreferNoSchedule")
        .filter(|taint| !tolerations.iter().any(|t| filter::tolerates(t, taint)))
        .count() as i64
}

/// One feasible node's scores before normalizing.
#[derive(Clone, Copy, Debug, Default)]
pub struct Raw {
    /// Index of the node.
    pub at: usize,
    /// [`base`].
    pub base: i64,
    /// [`node_affinity`].
    pub node_affinity: i64,
    /// Preferred pod (anti-)affinity weights.
    pub pod_affinity: i64,
    /// Minus matching pods per soft spread domain.
    pub spread: i64,
    /// Minus [`intolerable`].
    pub taints: i64,
}

/// The best of `raw` (first among equals), each preference normalized to 0–100.
pub fn pick(raw: &[Raw]) -> Option<usize> {
    let range = |f: fn(&Raw) -> i64| {
        let min = raw.iter().map(f).min().unwrap_or(0);
        let max = raw.iter().map(f).max().unwrap_or(0);
        move |r: &Raw| {
            if max == min {
                0
            } else {
                (f(r) - min) * 100 / (max - min)
            }
        }
    };
    let (na, pa, sp, tt) = (
        range(|r| r.node_affinity),
        range(|r| r.pod_affinity),
        range(|r| r.spread),
        range(|r| r.taints),
    );
    let mut best: Option<(i64, usize)> = None;
    for r in raw {
        let preference = 2 * na(r) + 2 * pa(r) + 2 * sp(r) + 3 * tt(r);
        let total = preference * 10_000_000 + r.base;
        if best.is_none_or(|(s, _)| total > s) {
            best = Some((total, r.at));
        }
    }
    best.map(|(_, at)| at)
}
