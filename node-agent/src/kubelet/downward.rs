//! The downward API: what a pod may learn about itself, for environment variables and
//! `downwardAPI` volumes — its own fields (`fieldRef`) and its containers' resources
//! (`resourceFieldRef`, a limit left unset reading as the node's allocatable, as the kubelet
//! reports it).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Container, Pod};
use kube::ResourceExt;
use orquestra_operator::quantity;

use crate::resolve::ConfigError;

/// What the node offers pods: the `allocatable` the agent reports on its Node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocatable {
    /// Millicores.
    pub cpu_millis: i64,
    /// Bytes of memory.
    pub memory: i64,
    /// Bytes of ephemeral storage (the data directory's file system).
    pub ephemeral_storage: i64,
}

impl Allocatable {
    /// This host's, read once: its CPUs, `MemTotal`, and the size of the file system holding
    /// `data_dir`.
    pub fn of_host(data_dir: &std::path::Path) -> Allocatable {
        static HOST: OnceLock<Allocatable> = OnceLock::new();
        *HOST.get_or_init(|| {
            let host = crate::node::HostInfo::read();
            Allocatable {
                cpu_millis: host.cpus as i64 * 1000,
                memory: host.memory_bytes as i64,
                ephemeral_storage: filesystem_size(data_dir),
            }
        })
    }
}

/// The size in bytes of the file system holding `path` (0 when unknown).
pub fn filesystem_size(path: &std::path::Path) -> i64 {
    let mut probe = path.to_path_buf();
    while !probe.exists() && probe.pop() {}
    nix::sys::statvfs::statvfs(&probe)
        .map(|s| (s.blocks() as u128 * s.fragment_size() as u128).min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// The IPs a pod's `status.podIP(s)`/`status.hostIP(s)` fields read.
#[derive(Clone, Debug, Default)]
pub struct Addresses {
    /// The pod's address.
    pub pod_ip: String,
    /// The node's address.
    pub host_ip: String,
}

/// The value of `fieldRef.fieldPath` for `pod`.
pub fn field_ref(pod: &Pod, path: &str, addresses: &Addresses) -> Result<String, ConfigError> {
    let spec = pod.spec.as_ref();
    let meta_map = |map: Option<&BTreeMap<String, String>>, key: &str| {
        map.and_then(|m| m.get(key)).cloned().unwrap_or_default()
    };
    let bracket = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix("']"))
            .map(str::to_owned)
    };
    Ok(match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "metadata.labels" => format_map(pod.metadata.labels.as_ref()),
        "metadata.annotations" => format_map(pod.metadata.annotations.as_ref()),
        "spec.nodeName" => spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_default(),
        "status.podIP" | "status.podIPs" => addresses.pod_ip.clone(),
        "status.hostIP" | "status.hostIPs" => addresses.host_ip.clone(),
        _ => {
            if let Some(key) = bracket("metadata.labels['") {
                meta_map(pod.metadata.labels.as_ref(), &key)
            } else if let Some(key) = bracket("metadata.annotations['") {
                meta_map(pod.metadata.annotations.as_ref(), &key)
            } else {
                return Err(ConfigError(format!("unsupported fieldRef {path:?}")));
            }
        }
    })
}

/// Labels or annotations as the kubelet writes them into a file: `key="value"` lines,
/// sorted, the value quoted as Go's `%q` does.
pub fn format_map(map: Option<&BTreeMap<String, String>>) -> String {
    map.into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", go_quote(v)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Go's `strconv.Quote` for the characters labels and annotations hold.
fn go_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The value of `resourceFieldRef` (`limits.cpu`, `requests.memory`, …) of `container`,
/// divided by `divisor` and rounded up; an unset limit reads as the node's allocatable.
pub fn resource_field(
    container: &Container,
    resource: &str,
    divisor: Option<&str>,
    node: &Allocatable,
) -> Result<String, ConfigError> {
    let unsupported = || ConfigError(format!("unsupported container resource: {resource}"));
    let (kind, name) = resource.split_once('.').ok_or_else(unsupported)?;
    let res = container.resources.as_ref();
    let list = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(unsupported()),
    };
    let set = list.and_then(|m| m.get(name)).map(|q| q.0.as_str());
    let divisor = divisor
        .filter(|d| !d.is_empty() && *d != "0")
        .unwrap_or("1");
    let bad_divisor = || ConfigError(format!("invalid divisor {divisor:?} for {resource}"));
    let node_default = |value: i64| (kind == "limits").then_some(value);
    let (value, divisor) = match name {
        "cpu" => {
            let value = match set.and_then(quantity::millicores) {
                Some(v) if v > 0 => v,
                _ => node_default(node.cpu_millis).unwrap_or(0),
            };
            let divisor = quantity::millicores(divisor).filter(|d| *d > 0);
            (value, divisor.ok_or_else(bad_divisor)?)
        }
        "memory" | "ephemeral-storage" => {
            let allocatable = if name == "memory" {
                node.memory
            } else {
                node.ephemeral_storage
            };
            let value = match set.and_then(quantity::bytes) {
                Some(v) if v > 0 => v,
                _ => node_default(allocatable).unwrap_or(0),
            };
            let divisor = quantity::bytes(divisor).filter(|d| *d > 0);
            (value, divisor.ok_or_else(bad_divisor)?)
        }
        huge if huge.starts_with("hugepages-") => {
            let value = set.and_then(quantity::bytes).unwrap_or(0);
            let divisor = quantity::bytes(divisor).filter(|d| *d > 0);
            (value, divisor.ok_or_else(bad_divisor)?)
        }
        _ => return Err(unsupported()),
    };
    Ok(((value as f64 / divisor as f64).ceil() as i64).to_string())
}

/// The container `name` of `pod` (main, init or ephemeral), for a volume's
/// `resourceFieldRef.containerName`.
pub fn container<'a>(pod: &'a Pod, name: &str) -> Option<&'a Container> {
    let spec = pod.spec.as_ref()?;
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(resources: serde_json::Value) -> Container {
        serde_json::from_value(serde_json::json!({"name": "c", "resources": resources})).unwrap()
    }

    const NODE: Allocatable = Allocatable {
        cpu_millis: 4000,
        memory: 8 << 30,
        ephemeral_storage: 100 << 30,
    };

    #[test]
    fn resources_with_divisors_and_node_defaults() {
        let c = container(serde_json::json!({
            "limits": {"cpu": "1250m", "memory": "64Mi"},
            "requests": {"cpu": "250m", "memory": "32Mi"},
        }));
        let get = |r: &str, d: Option<&str>| resource_field(&c, r, d, &NODE).unwrap();
        assert_eq!(get("limits.cpu", None), "2");
        assert_eq!(get("limits.cpu", Some("1m")), "1250");
        assert_eq!(get("requests.cpu", None), "1");
        assert_eq!(get("limits.memory", None), (64 << 20).to_string());
        assert_eq!(get("requests.memory", Some("1Mi")), "32");
        let none = container(serde_json::json!({}));
        let get = |r: &str| resource_field(&none, r, None, &NODE).unwrap();
        assert_eq!(get("limits.cpu"), "4");
        assert_eq!(get("limits.memory"), (8i64 << 30).to_string());
        assert_eq!(get("requests.memory"), "0");
        assert!(resource_field(&none, "limits.gpu", None, &NODE).is_err());
    }

    #[test]
    fn maps_as_go_quotes_them() {
        let map: BTreeMap<String, String> = [
            ("b".to_owned(), "two \"q\"".to_owned()),
            ("a".to_owned(), "one\n".to_owned()),
        ]
        .into();
        assert_eq!(format_map(Some(&map)), "a=\"one\\n\"\nb=\"two \\\"q\\\"\"");
    }
}
