//! What an object consumes of a namespace's quota, by resource name, as kube's quota
//! evaluators count it: `count/<resource>[.<group>]` for every object; `pods` and the compute
//! resources (`requests.cpu`, `limits.memory`, `requests.<extended>`, …) for pods that have
//! not finished; `services`, `services.nodeports`, `services.loadbalancers`; the legacy object
//! counts (`configmaps`, `secrets`, …); `requests.storage` and per-StorageClass usage for
//! PersistentVolumeClaims. And which quotas see an object, by their scopes.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::quantity::Quantity;
use crate::registry::ResourceDef;

/// Resource name → amount.
pub type Usage = BTreeMap<String, Quantity>;

/// Core resources counted under their own names (besides `count/<plural>`).
const LEGACY_COUNTS: &[&str] = &[
    "configmaps",
    "persistentvolumeclaims",
    "pods",
    "replicationcontrollers",
    "resourcequotas",
    "secrets",
    "services",
];

/// The `count/…` name of a resource: `count/pods`, `count/replicasets.apps`.
pub fn count_name(def: &ResourceDef) -> String {
    if def.group.is_empty() {
        format!("count/{}", def.plural)
    } else {
        format!("count/{}.{}", def.plural, def.group)
    }
}

fn one() -> Quantity {
    Quantity::parse("1").unwrap_or_default()
}

fn quantity(value: &Value) -> Option<Quantity> {
    match value {
        Value::String(s) => Quantity::parse(s),
        Value::Number(n) => Quantity::parse(&n.to_string()),
        _ => None,
    }
}

/// A pod that still holds its resources: not Succeeded or Failed.
pub fn pod_is_live(pod: &Value) -> bool {
    !matches!(
        pod.pointer("/status/phase").and_then(Value::as_str),
        Some("Succeeded" | "Failed")
    )
}

/// Everything `object` (of `def`) consumes.
pub fn usage(def: &ResourceDef, object: &Value) -> Usage {
    let mut usage = Usage::new();
    if !def.namespaced {
        return usage;
    }
    usage.insert(count_name(def), one());
    let core = def.group.is_empty();
    match (core, def.plural.as_str()) {
        (true, "pods") if pod_is_live(object) => {
            usage.insert("pods".into(), one());
            pod_compute(object, &mut usage);
        }
        (true, "pods") => {}
        (true, "services") => {
            usage.insert("services".into(), one());
            let kind = object
                .pointer("/spec/type")
                .and_then(Value::as_str)
                .unwrap_or("ClusterIP");
            if matches!(kind, "NodePort" | "LoadBalancer") {
                let ports = object["spec"]["ports"].as_array().map_or(0, Vec::len);
                let n = Quantity::parse(&ports.to_string()).unwrap_or_default();
                usage.insert("services.nodeports".into(), n);
            }
            if kind == "LoadBalancer" {
                usage.insert("services.loadbalancers".into(), one());
            }
        }
        (true, "persistentvolumeclaims") => {
            usage.insert("persistentvolumeclaims".into(), one());
            let storage = object
                .pointer("/spec/resources/requests/storage")
                .and_then(quantity);
            if let Some(storage) = storage {
                usage.insert("requests.storage".into(), storage);
            }
            if let Some(class) = object
                .pointer("/spec/storageClassName")
                .and_then(Value::as_str)
                .filter(|c| !c.is_empty())
            {
                let prefix = format!("{class}.storageclass.storage.k8s.io/");
                usage.insert(format!("{prefix}persistentvolumeclaims"), one());
                if let Some(storage) = storage {
                    usage.insert(format!("{prefix}requests.storage"), storage);
                }
            }
        }
        (true, plural) if LEGACY_COUNTS.contains(&plural) => {
            usage.insert(plural.to_owned(), one());
        }
        _ => {}
    }
    usage
}

/// A container's resource list (`requests` or `limits`).
fn list<'a>(container: &'a Value, which: &str) -> impl Iterator<Item = (&'a String, Quantity)> {
    container["resources"][which]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, value)| Some((name, quantity(value)?)))
}

/// The pod's effective requests or limits: the larger of the app containers' sum (sidecars
/// included) and each init container's, plus the pod overhead (kube's resource helper).
pub fn pod_resources(pod: &Value, which: &str) -> BTreeMap<String, Quantity> {
    let spec = &pod["spec"];
    let mut total: BTreeMap<String, Quantity> = BTreeMap::new();
    for container in spec["containers"].as_array().into_iter().flatten() {
        for (name, q) in list(container, which) {
            *total.entry(name.clone()).or_default() += q;
        }
    }
    let mut sidecars: BTreeMap<String, Quantity> = BTreeMap::new();
    for init in spec["initContainers"].as_array().into_iter().flatten() {
        let sidecar = init.get("restartPolicy").and_then(Value::as_str) == Some("Always");
        for (name, q) in list(init, which) {
            if sidecar {
                *total.entry(name.clone()).or_default() += q;
                *sidecars.entry(name.clone()).or_default() += q;
            } else {
                // An init container runs alone (with the sidecars started before it).
                let with = q + sidecars.get(name).copied().unwrap_or_default();
                let entry = total.entry(name.clone()).or_default();
                if with > *entry {
                    *entry = with;
                }
            }
        }
    }
    if let Some(overhead) = spec["overhead"].as_object() {
        for (name, value) in overhead {
            if let (Some(q), Some(entry)) = (quantity(value), total.get_mut(name)) {
                *entry += q;
            }
        }
    }
    total
}

fn pod_compute(pod: &Value, usage: &mut Usage) {
    let requests = pod_resources(pod, "requests");
    let limits = pod_resources(pod, "limits");
    for resource in ["cpu", "memory", "ephemeral-storage"] {
        if let Some(q) = requests.get(resource) {
            usage.insert(resource.to_owned(), *q);
            usage.insert(format!("requests.{resource}"), *q);
        }
        if let Some(q) = limits.get(resource) {
            usage.insert(format!("limits.{resource}"), *q);
        }
    }
    for (name, q) in &requests {
        if name.starts_with("hugepages-") {
            usage.insert(name.clone(), *q);
            usage.insert(format!("requests.{name}"), *q);
        } else if name.contains('/') && !name.starts_with("kubernetes.io/") {
            // An extended resource: only `requests.<name>` is a quota resource.
            usage.insert(format!("requests.{name}"), *q);
        }
    }
}

/// A pod asks for nothing: no requests or limits in any container.
fn best_effort(pod: &Value) -> bool {
    let spec = &pod["spec"];
    spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain(spec["initContainers"].as_array().into_iter().flatten())
        .all(|c| {
            ["requests", "limits"]
                .iter()
                .all(|w| c["resources"][w].as_object().is_none_or(|m| m.is_empty()))
        })
}

fn cross_namespace_affinity(pod: &Value) -> bool {
    let affinity = &pod["spec"]["affinity"];
    ["podAffinity", "podAntiAffinity"].iter().any(|kind| {
        [
            "requiredDuringSchedulingIgnoredDuringExecution",
            "preferredDuringSchedulingIgnoredDuringExecution",
        ]
        .iter()
        .flat_map(|when| affinity[kind][when].as_array().into_iter().flatten())
        .any(|term| {
            let term = term.get("podAffinityTerm").unwrap_or(term);
            term["namespaces"].as_array().is_some_and(|n| !n.is_empty())
                || term.get("namespaceSelector").is_some_and(|s| !s.is_null())
        })
    })
}

/// Whether quota `quota` applies to `object` (of `def`): a quota without scopes sees every
/// object; one with scopes (`spec.scopes`, `spec.scopeSelector`) sees only the pods that
/// match every one.
pub fn in_scope(quota: &Value, def: &ResourceDef, object: &Value) -> bool {
    let mut scopes: Vec<(String, String, Vec<String>)> = quota["spec"]["scopes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| Some((s.as_str()?.to_owned(), "Exists".to_owned(), Vec::new())))
        .collect();
    for expression in quota
        .pointer("/spec/scopeSelector/matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let text = |k: &str| expression[k].as_str().unwrap_or_default().to_owned();
        let values = expression["values"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        scopes.push((text("scopeName"), text("operator"), values));
    }
    if scopes.is_empty() {
        return true;
    }
    if !(def.group.is_empty() && def.plural == "pods") {
        return false;
    }
    scopes.iter().all(|(scope, operator, values)| {
        let terminating = object
            .pointer("/spec/activeDeadlineSeconds")
            .and_then(Value::as_i64)
            .is_some_and(|s| s >= 0);
        match scope.as_str() {
            "Terminating" => terminating,
            "NotTerminating" => !terminating,
            "BestEffort" => best_effort(object),
            "NotBestEffort" => !best_effort(object),
            "CrossNamespacePodAffinity" => cross_namespace_affinity(object),
            "PriorityClass" => {
                let class = object
                    .pointer("/spec/priorityClassName")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match operator.as_str() {
                    "In" => values.iter().any(|v| v == class),
                    "NotIn" => !values.iter().any(|v| v == class),
                    "Exists" => !class.is_empty(),
                    "DoesNotExist" => class.is_empty(),
                    _ => false,
                }
            }
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(plural: &str) -> ResourceDef {
        crate::registry::builtin_resources()
            .into_iter()
            .find(|d| d.group.is_empty() && d.plural == plural)
            .unwrap()
    }

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap()
    }

    #[test]
    fn a_pod_counts_its_requests_limits_and_itself() {
        let pod = json!({"spec": {"containers": [
            {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "252Mi",
                "example.com/dongle": "2"}, "limits": {"example.com/dongle": "2"}}},
            {"name": "b", "resources": {"requests": {"cpu": "100m"}}}
        ], "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "1"}}}]}});
        let usage = usage(&def("pods"), &pod);
        assert_eq!(usage["pods"], q("1"));
        assert_eq!(usage["count/pods"], q("1"));
        assert_eq!(
            usage["requests.cpu"],
            q("1"),
            "the init container's is larger"
        );
        assert_eq!(usage["memory"], q("252Mi"));
        assert_eq!(usage["requests.example.com/dongle"], q("2"));
        assert!(!usage.contains_key("limits.cpu"));
        let done = json!({"spec": pod["spec"], "status": {"phase": "Succeeded"}});
        let usage = super::usage(&def("pods"), &done);
        assert!(!usage.contains_key("pods") && usage.contains_key("count/pods"));
    }

    #[test]
    fn services_count_node_ports_and_load_balancers() {
        let svc = json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 80}, {"port": 443}]}});
        let usage = usage(&def("services"), &svc);
        assert_eq!(usage["services.nodeports"], q("2"));
        assert_eq!(usage["services.loadbalancers"], q("1"));
    }

    #[test]
    fn scoped_quotas_see_only_matching_pods() {
        let pods = def("pods");
        let terminating = json!({"spec": {"scopes": ["Terminating"]}});
        let best_effort = json!({"spec": {"scopes": ["BestEffort"]}});
        let pod = json!({"spec": {"activeDeadlineSeconds": 3600, "containers": [{"name": "a"}]}});
        assert!(in_scope(&terminating, &pods, &pod));
        assert!(in_scope(&best_effort, &pods, &pod));
        let plain = json!({"spec": {"containers": [{"name": "a", "resources": {"requests": {"cpu": "1"}}}]}});
        assert!(!in_scope(&terminating, &pods, &plain));
        assert!(!in_scope(&best_effort, &pods, &plain));
        assert!(!in_scope(&terminating, &def("configmaps"), &json!({})));
        let class = json!({"spec": {"scopeSelector": {"matchExpressions": [
            {"scopeName": "PriorityClass", "operator": "In", "values": ["pclass1"]}]}}});
        let with_class = json!({"spec": {"priorityClassName": "pclass1", "containers": []}});
        assert!(in_scope(&class, &pods, &with_class));
        assert!(!in_scope(&class, &pods, &plain));
    }
}
