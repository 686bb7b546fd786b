//! Preemption (kube-scheduler's DefaultPreemption): a pod that fits nowhere, and whose
//! `preemptionPolicy` is not `Never`, looks for a node where evicting lower-priority pods
//! makes room.
//!
//! On each node that failed only for room (resources, pod count, host ports), every
//! lower-priority pod is taken off in a what-if; if the pod then fits, the victims are
//! *reprieved* one by one — most important first, those a PodDisruptionBudget protects
//! before the others — and whoever cannot be put back stays a victim. Among the candidate
//! nodes the one chosen has the fewest budget violations, then the lowest highest-victim
//! priority, the lowest sum of victim priorities, the fewest victims, the latest-started
//! highest-priority victims. The victims get the `DisruptionTarget` condition and are
//! deleted gracefully; the preemptor is *nominated* to the node (`status.nominatedNodeName`),
//! and the room it waits for is counted as taken for pods of no higher priority, so they
//! cannot take it meanwhile.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::filter;
use super::snapshot::{Placed, Requests, Snapshot, Usage};

/// The reason victims' `DisruptionTarget` condition gives.
pub const REASON: &str = "PreemptionByScheduler";

/// A node where preemption makes room, and what it costs.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The node's index in the snapshot.
    pub at: usize,
    /// The pods to evict.
    pub victims: Vec<Placed>,
    /// How many of them a PodDisruptionBudget would rather keep.
    pub violations: usize,
}

/// Whether `pod` may preempt at all: its policy allows it, and it is not already waiting
/// for victims of an earlier preemption to go (kube: no preempting again while lower-priority
/// pods on the nominated node are terminating).
pub fn eligible(pod: &Pod, priority: i32, nominated: Option<usize>, snapshot: &Snapshot) -> bool {
    let policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.preemption_policy.as_deref());
    if policy == Some("Never") {
        return false;
    }
    let Some(at) = nominated else {
        return true;
    };
    !snapshot.usage.get(at).is_some_and(|u| {
        u.placed
            .iter()
            .any(|p| p.pod.metadata.deletion_timestamp.is_some() && p.parsed.priority < priority)
    })
}

/// What a PodDisruptionBudget allows, matched to the pods it covers.
#[derive(Debug)]
pub struct Budgets {
    budgets: Vec<(Arc<PodDisruptionBudget>, i32)>,
}

impl Budgets {
    /// The budgets as cached.
    pub fn new(pdbs: Vec<Arc<PodDisruptionBudget>>) -> Budgets {
        let budgets = pdbs
            .into_iter()
            .map(|pdb| {
                let allowed = pdb
                    .status
                    .as_ref()
                    .and_then(|s| s.disruptions_allowed)
                    .unwrap_or(0);
                (pdb, allowed)
            })
            .collect();
        Budgets { budgets }
    }

    /// The budgets covering `pod` (same namespace, selector matching; a nil selector
    /// covers nothing).
    fn covering(&self, pod: &Pod) -> Vec<usize> {
        let ns = pod.namespace();
        self.budgets
            .iter()
            .enumerate()
            .filter(|(_, (pdb, _))| {
                pdb.namespace() == ns
                    && pdb
                        .spec
                        .as_ref()
                        .and_then(|s| s.selector.as_ref())
                        .is_some_and(|s| crate::labels::matches(s, pod.labels()))
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// Whether `wanted` fits on node `at` once `used` is what stays there.
type Fits<'a> = dyn Fn(usize, &Usage) -> bool + 'a;

/// The victims on node `at` that make room for a pod of `priority` wanting `wanted`, if any.
fn victims_on(
    at: usize,
    priority: i32,
    used: &Usage,
    budgets: &Budgets,
    fits: &Fits<'_>,
) -> Option<Candidate> {
    let mut what_if = used.clone();
    let mut potential: Vec<Placed> = used
        .placed
        .iter()
        .filter(|p| p.parsed.priority < priority)
        .cloned()
        .collect();
    if potential.is_empty() {
        return None;
    }
    for p in &potential {
        what_if.remove(p.pod.metadata.uid.as_deref().unwrap_or_default());
    }
    if !fits(at, &what_if) {
        return None;
    }
    // Most important first: higher priority, then started earlier.
    potential.sort_by(|a, b| {
        b.parsed
            .priority
            .cmp(&a.parsed.priority)
            .then_with(|| start(&a.pod).cmp(&start(&b.pod)))
    });
    let mut allowed: Vec<i32> = budgets.budgets.iter().map(|(_, a)| *a).collect();
    let (mut violating, mut other) = (Vec::new(), Vec::new());
    for p in potential {
        let mut violates = false;
        for i in budgets.covering(&p.pod) {
            allowed[i] -= 1;
            if allowed[i] < 0 {
                violates = true;
            }
        }
        if violates {
            violating.push(p);
        } else {
            other.push(p);
        }
    }
    let mut victims = Vec::new();
    let mut violations = 0;
    for (group, violate) in [(violating, true), (other, false)] {
        for p in group {
            let mut with = what_if.clone();
            with.add(p.clone());
            if fits(at, &with) {
                what_if = with;
            } else {
                violations += usize::from(violate);
                victims.push(p);
            }
        }
    }
    Some(Candidate {
        at,
        victims,
        violations,
    })
}

fn start(pod: &Pod) -> Option<jiff::Timestamp> {
    pod.status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .or(pod.metadata.creation_timestamp.as_ref())
        .map(|Time(t)| *t)
}

/// Picks the node to preempt on among the nodes at `failed` (indexes whose failure evicting
/// may cure), for `pod` wanting `wanted` at `priority`. `nominated` is the room others
/// already wait for on each node, counted as taken.
pub fn select(
    pod: &Pod,
    wanted: &Requests,
    priority: i32,
    snapshot: &Snapshot,
    failed: &[usize],
    nominated: &HashMap<usize, Usage>,
    budgets: &Budgets,
) -> Option<Candidate> {
    let fits = |at: usize, used: &Usage| {
        let Some(node) = snapshot.nodes.get(at) else {
            return false;
        };
        match nominated.get(&at) {
            Some(waiting) => {
                let mut used = used.clone();
                for p in &waiting.placed {
                    used.add(p.clone());
                }
                filter::resources_fit(node, wanted, &used).is_ok()
            }
            None => filter::resources_fit(node, wanted, used).is_ok(),
        }
    };
    let mut candidates: Vec<Candidate> = failed
        .iter()
        .filter(|&&at| {
            snapshot
                .nodes
                .get(at)
                .is_some_and(|n| filter::node_allows(pod, n).is_ok())
        })
        .filter_map(|&at| victims_on(at, priority, snapshot.usage.get(at)?, budgets, &fits))
        .filter(|c| !c.victims.is_empty())
        .collect();
    if candidates.is_empty() {
        return None;
    }
    let highest = |c: &Candidate| c.victims.iter().map(|v| v.parsed.priority).max();
    let sum = |c: &Candidate| {
        c.victims
            .iter()
            .map(|v| i64::from(v.parsed.priority) + i64::from(i32::MAX) + 1)
            .sum::<i64>()
    };
    // The earliest start among the highest-priority victims: later is better.
    let earliest = |c: &Candidate| {
        let top = highest(c);
        c.victims
            .iter()
            .filter(|v| Some(v.parsed.priority) == top)
            .filter_map(|v| start(&v.pod))
            .min()
    };
    candidates.sort_by(|a, b| {
        a.violations
            .cmp(&b.violations)
            .then_with(|| highest(a).cmp(&highest(b)))
            .then_with(|| sum(a).cmp(&sum(b)))
            .then_with(|| a.victims.len().cmp(&b.victims.len()))
            .then_with(|| earliest(b).cmp(&earliest(a)))
    });
    candidates.into_iter().next()
}

/// Carries out a preemption: the preemptor nominated to `node`, each victim marked
/// `DisruptionTarget` and deleted gracefully. Failures on a victim (gone meanwhile) are
/// ignored; the next cycle looks again.
pub async fn execute(
    client: &Client,
    scheduler: &str,
    pod: &Pod,
    node: &str,
    victims: &[Placed],
) -> Result<(), kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"nominatedNodeName": node}})),
    )
    .await?;
    let now = jiff::Timestamp::now().to_string();
    for victim in victims {
        let victim = &victim.pod;
        let api: Api<Pod> =
            Api::namespaced(client.clone(), &victim.namespace().unwrap_or_default());
        let condition = json!({"status": {"conditions": [{
            "type": "DisruptionTarget", "status": "True", "reason": REASON,
            "message": format!("{scheduler}: preempting to accommodate a higher priority pod"),
            "lastTransitionTime": now,
        }]}});
        let marked = api
            .patch_status(
                &victim.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(condition),
            )
            .await;
        if let Err(kube::Error::Api(s)) = &marked
            && s.code == 404
        {
            continue;
        }
        crate::events::publish(
            client,
            scheduler,
            victim.as_ref(),
            crate::events::EventType::Normal,
            "Preempted",
            &format!(
                "Preempted by pod {} on node {node}",
                pod.uid().unwrap_or_default()
            ),
        )
        .await;
        match api
            .delete(&victim.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::snapshot::{NodeInfo, Parsed};
    use serde_json::json;

    fn pod(name: &str, priority: i32, slots: u32, labels: serde_json::Value) -> Placed {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "uid": name, "labels": labels},
            "spec": {"priority": priority, "containers": [{"name": "c",
                "resources": {"requests": {"example.com/fakecpu": slots.to_string()}}}]},
        }))
        .unwrap();
        Placed {
            parsed: Arc::new(Parsed::of(&pod)),
            pod: Arc::new(pod),
        }
    }

    fn snapshot(nodes: &[(&str, u32, Vec<Placed>)]) -> Snapshot {
        let mut snapshot = Snapshot {
            taken: std::time::Instant::now(),
            nodes: Vec::new(),
            usage: Vec::new(),
            index: HashMap::new(),
            with_affinity: Vec::new(),
            namespaces: HashMap::new(),
            pending: Vec::new(),
            soft_taints: false,
        };
        for (at, (name, slots, placed)) in nodes.iter().enumerate() {
            let node = json!({"metadata": {"name": name}, "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "allocatable": {"cpu": "4", "memory": "4Gi", "pods": "110",
                    "example.com/fakecpu": slots.to_string()}}});
            snapshot.nodes.push(NodeInfo::new(Arc::new(
                serde_json::from_value(node).unwrap(),
            )));
            snapshot.usage.push(Usage::default());
            snapshot.index.insert((*name).to_owned(), at);
            for p in placed {
                snapshot.place(at, p.clone());
            }
        }
        snapshot
    }

    fn names(c: &Candidate) -> Vec<String> {
        let mut names: Vec<String> = c.victims.iter().map(|v| v.pod.name_any()).collect();
        names.sort();
        names
    }

    #[test]
    fn fewest_and_least_important_victims() {
        // The ReplicaSets conformance spec: 200 + 300 + 450 of 1000; a 500 at priority 4
        // evicts the 200 and the 300, and keeps the 450.
        let s = snapshot(&[(
            "n",
            1000,
            vec![
                pod("p1", 1, 200, json!({})),
                pod("p2", 2, 300, json!({})),
                pod("p3", 3, 450, json!({})),
            ],
        )]);
        let me = pod("p4", 4, 500, json!({}));
        let budgets = Budgets::new(Vec::new());
        let c = select(
            &me.pod,
            &me.parsed.wanted,
            4,
            &s,
            &[0],
            &HashMap::new(),
            &budgets,
        )
        .unwrap();
        assert_eq!(names(&c), ["p1", "p2"]);

        // Basic preemption: the node whose victim has the lowest priority.
        let s = snapshot(&[
            (
                "a",
                5,
                vec![pod("m1", 100, 2, json!({})), pod("m2", 100, 2, json!({}))],
            ),
            (
                "b",
                5,
                vec![pod("low", 1, 2, json!({})), pod("m3", 100, 2, json!({}))],
            ),
        ]);
        let me = pod("high", 1000, 2, json!({}));
        let c = select(
            &me.pod,
            &me.parsed.wanted,
            1000,
            &s,
            &[0, 1],
            &HashMap::new(),
            &budgets,
        )
        .unwrap();
        assert_eq!((c.at, names(&c)), (1, vec!["low".to_owned()]));

        // Nothing of lower priority: nothing to do.
        let me = pod("lowest", 1, 2, json!({}));
        assert!(
            select(
                &me.pod,
                &me.parsed.wanted,
                1,
                &s,
                &[0, 1],
                &HashMap::new(),
                &budgets
            )
            .is_none()
        );
    }

    #[test]
    fn budgets_steer_the_choice() {
        let s = snapshot(&[
            ("a", 1, vec![pod("guarded", 1, 1, json!({"app": "db"}))]),
            ("b", 1, vec![pod("free", 1, 1, json!({"app": "web"}))]),
        ]);
        let pdb: PodDisruptionBudget = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "db"}}},
            "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1,
                "expectedPods": 1},
        }))
        .unwrap();
        let budgets = Budgets::new(vec![Arc::new(pdb)]);
        let me = pod("high", 10, 1, json!({}));
        let c = select(
            &me.pod,
            &me.parsed.wanted,
            10,
            &s,
            &[0, 1],
            &HashMap::new(),
            &budgets,
        )
        .unwrap();
        assert_eq!((c.at, c.violations), (1, 0));
        // Held room (a nominated pod of higher priority) is not for taking.
        let mut held = HashMap::new();
        held.entry(1)
            .or_insert_with(Usage::default)
            .add(pod("waiting", 20, 1, json!({})));
        let c = select(&me.pod, &me.parsed.wanted, 10, &s, &[0, 1], &held, &budgets).unwrap();
        assert_eq!((c.at, c.violations), (0, 1));
    }
}
