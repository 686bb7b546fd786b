//! The node-local filters (kube-scheduler's NodeReady, NodeUnschedulable, TaintToleration,
//! NodeAffinity, NodeResourcesFit, NodePorts): whether a pod may go to one node by that
//! node alone and what is placed on it. Each failure reads as kube-scheduler words it, so
//! `FailedScheduling` messages match what users and e2e specs look for; [`resolvable`]
//! tells preemption which failures evicting pods can cure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelector, Pod, PodSpec, Taint, Toleration};
use kube::ResourceExt;

use super::snapshot::{NodeInfo, Requests, Usage};

/// The taint of a cordoned node (`spec.unschedulable`).
pub const UNSCHEDULABLE: &str = "node.kubernetes.io/unschedulable";

/// The reasons a node fails that taking pods off it may cure (room; pod affinity and
/// spread constraints are not re-evaluated without the victims).
pub fn resolvable(reason: &str) -> bool {
    reason.starts_with("Insufficient")
        || reason == "Too many pods"
        || reason.starts_with("node(s) didn't have free ports")
}

/// Whether `pod` may go to `node` by the node itself (readiness, cordon, taints, selectors);
/// the reason (kube-scheduler's wording) if not.
pub fn node_allows(pod: &Pod, info: &NodeInfo) -> Result<(), String> {
    if !info.ready {
        return Err("node(s) were not ready".into());
    }
    let node = info.node.as_ref();
    let spec = node.spec.as_ref();
    let tolerations = pod
        .spec
        .as_ref()
        .and_then(|s| s.tolerations.as_deref())
        .unwrap_or_default();
    // A cordoned node takes only pods tolerating its taint (DaemonSet pods do).
    if spec.and_then(|s| s.unschedulable).unwrap_or(false) {
        let cordon = Taint {
            key: UNSCHEDULABLE.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        if !tolerations.iter().any(|t| tolerates(t, &cordon)) {
            return Err("node(s) were unschedulable".into());
        }
    }
    if let Some(taint) = untolerated(tolerations, node) {
        return Err(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            taint.key,
            taint.value.clone().unwrap_or_default()
        ));
    }
    if !pod.spec.as_ref().is_some_and(|spec| placeable(spec, node)) {
        return Err("node(s) didn't match Pod's node affinity/selector".into());
    }
    Ok(())
}

/// The first `NoSchedule`/`NoExecute` taint of `node` none of `tolerations` tolerates.
pub fn untolerated<'n>(tolerations: &[Toleration], node: &'n Node) -> Option<&'n Taint> {
    node.spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .into_iter()
        .flatten()
        .filter(|t| t.effect != "PreferNoSchedule")
        .find(|taint| !tolerations.iter().any(|t| tolerates(t, taint)))
}

/// Whether what `pod` asks for fits in what `node` offers minus `used`.
pub fn resources_fit(info: &NodeInfo, wanted: &Requests, used: &Usage) -> Result<(), String> {
    if let Some(pods) = info.pods
        && used.pods + 1 > pods
    {
        return Err("Too many pods".into());
    }
    if let Some(cpu) = info.cpu
        && wanted.cpu > 0
        && used.cpu + wanted.cpu > cpu
    {
        return Err("Insufficient cpu".into());
    }
    if let Some(memory) = info.memory
        && wanted.memory > 0
        && used.memory + wanted.memory > memory
    {
        return Err("Insufficient memory".into());
    }
    for (name, q) in &wanted.scalars {
        if used.scalar(name) + q > info.scalar(name) {
            return Err(format!("Insufficient {name}"));
        }
    }
    if wanted
        .ports
        .iter()
        .any(|p| used.ports.iter().any(|u| u.conflicts(p)))
    {
        return Err("node(s) didn't have free ports for the requested pod ports".into());
    }
    Ok(())
}

/// Both: the node itself, then its room.
pub fn fits(
    pod: &Pod,
    info: &NodeInfo,
    wanted: &Requests,
    used: Option<&Usage>,
) -> Result<(), String> {
    node_allows(pod, info)?;
    let default = Usage::default();
    resources_fit(info, wanted, used.unwrap_or(&default))
}

/// Whether a pod with `spec` may go to `node` by its `nodeSelector` and required node
/// affinity.
pub fn placeable(spec: &PodSpec, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let selector = spec.node_selector.as_ref().unwrap_or(&empty);
    if selector.iter().any(|(k, v)| labels.get(k) != Some(v)) {
        return false;
    }
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    required.is_none_or(|required| selector_matches(required, node))
}

/// Whether `node` matches a NodeSelector: any term matching, a term matching when all its
/// `matchExpressions` (on the node's labels) and `matchFields` (`metadata.name`, the only
/// field kube supports) do. Pods' required node affinity and volumes' node affinity read
/// alike.
pub fn selector_matches(selector: &NodeSelector, node: &Node) -> bool {
    selector
        .node_selector_terms
        .iter()
        .any(|term| term_matches(term, node))
}

/// Whether one node selector term matches `node`.
pub fn term_matches(term: &k8s_openapi::api::core::v1::NodeSelectorTerm, node: &Node) -> bool {
    let empty = BTreeMap::new();
    let labels = node.metadata.labels.as_ref().unwrap_or(&empty);
    let name = node.name_any();
    term.match_expressions.iter().flatten().all(|e| {
        crate::labels::requirement(
            &e.operator,
            labels.get(&e.key),
            e.values.as_deref().unwrap_or_default(),
        )
    }) && term.match_fields.iter().flatten().all(|f| {
        let value = (f.key == "metadata.name").then_some(&name);
        f.key == "metadata.name"
            && crate::labels::requirement(
                &f.operator,
                value,
                f.values.as_deref().unwrap_or_default(),
            )
    })
}

/// Kubernetes' toleration matching: whether toleration `t` tolerates `taint`.
pub fn tolerates(t: &Toleration, taint: &Taint) -> bool {
    if let Some(effect) = t.effect.as_deref().filter(|e| !e.is_empty())
        && effect != taint.effect
    {
        return false;
    }
    match t.operator.as_deref().unwrap_or("Equal") {
        "Exists" => t
            .key
            .as_deref()
            .is_none_or(|k| k.is_empty() || k == taint.key),
        _ => {
            t.key.as_deref() == Some(taint.key.as_str())
                && t.value.clone().unwrap_or_default() == taint.value.clone().unwrap_or_default()
        }
    }
}
