//! Node registration and heartbeats.
//!
//! The agent describes its host ([`HostInfo`], read from `/proc` and `/etc/os-release`),
//! applies the `Node` and its status with server-side apply under its own field manager, and
//! then keeps two clocks, as the kubelet does: the node Lease in `kube-node-lease` renewed
//! every `lease_renew` (10 s), which is what the node lifecycle controller watches, and the
//! status, re-applied when something in it changes or at least every `status_refresh`
//! (5 min), with each condition's `lastHeartbeatTime`. The status says what of the agent
//! fails now ([`Health`]): `Ready=False` with the cause, and `NetworkUnavailable` when the
//! agent programs the node's network — reported as soon as a problem comes or goes.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::health::{Health, Problems};

/// The field manager of every write the agent makes.
pub const MANAGER: &str = "orq-agent";

/// What the agent reports as its runtime (kubelet's `containerRuntimeVersion`).
pub const RUNTIME_VERSION: &str = "libcontainer://0.7.0";

/// Where node Leases live.
pub const LEASE_NAMESPACE: &str = "kube-node-lease";

/// Why registration or a heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The API refused or could not be reached.
    #[error("talking to the API server: {0}")]
    Api(#[from] kube::Error),
}

/// How this agent registers its node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    /// The Node's name (the hostname by default).
    pub name: String,
    /// The address other components reach the node at (`InternalIP`).
    pub internal_ip: String,
    /// Where the agent's own HTTPS endpoint listens (`daemonEndpoints`).
    pub port: u16,
    /// Pods this node accepts.
    pub max_pods: u32,
    /// How often the node Lease is renewed.
    pub lease_renew: Duration,
    /// How long the Lease is valid without renewal.
    pub lease_duration: Duration,
    /// The longest the status goes without being re-applied.
    pub status_refresh: Duration,
    /// Taints the Node is created with (kubelet's `--register-with-taints`).
    pub taints: Vec<RegisterTaint>,
    /// The agent programs the node's network (bridge, DNS, service proxy, routes), so the
    /// Node reports `NetworkUnavailable` for it.
    pub manages_network: bool,
    /// The agent serves Ingresses: the Node is annotated `orquestra.dev/ingress: "true"`,
    /// so the ingress controller publishes its address in the Ingresses' status.
    pub serves_ingress: bool,
    /// Where this node's local-path volumes live, advertised in the Node's
    /// `orquestra.io/local-path-root` annotation for the provisioner.
    pub local_path_root: Option<String>,
}

/// A taint a node registers with: `key[=value]:Effect`, as kubelet's flag takes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisterTaint {
    /// The taint's key.
    pub key: String,
    /// Its value, if any.
    pub value: Option<String>,
    /// `NoSchedule`, `PreferNoSchedule` or `NoExecute`.
    pub effect: String,
}

impl std::str::FromStr for RegisterTaint {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let invalid = || {
            format!(
                "{text:?} is not a taint: use key[=value]:Effect, e.g. dedicated=gpu:NoSchedule"
            )
        };
        let (pair, effect) = text.rsplit_once(':').ok_or_else(invalid)?;
        if !matches!(effect, "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
            return Err(format!(
                "{text:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"
            ));
        }
        let (key, value) = match pair.split_once('=') {
            Some((key, value)) => (key, Some(value.to_owned())),
            None => (pair, None),
        };
        if key.is_empty() {
            return Err(invalid());
        }
        Ok(RegisterTaint {
            key: key.to_owned(),
            value,
            effect: effect.to_owned(),
        })
    }
}

impl NodeConfig {
    /// The kubelet's defaults for a node called `name` reachable at `internal_ip`.
    pub fn new(name: impl Into<String>, internal_ip: impl Into<String>) -> NodeConfig {
        NodeConfig {
            name: name.into(),
            internal_ip: internal_ip.into(),
            port: 10250,
            max_pods: 110,
            lease_renew: Duration::from_secs(10),
            lease_duration: Duration::from_secs(40),
            status_refresh: Duration::from_secs(300),
            taints: Vec::new(),
            manages_network: false,
            serves_ingress: false,
            local_path_root: None,
        }
    }
}

/// What the host offers, as a Node reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    /// Logical CPUs.
    pub cpus: usize,
    /// Memory in bytes (`MemTotal`).
    pub memory_bytes: u64,
    /// The kernel release (`uname -r`).
    pub kernel: String,
    /// The OS image (`PRETTY_NAME` of `/etc/os-release`).
    pub os_image: String,
    /// `amd64`, `arm64`, … (Go's names).
    pub architecture: String,
    /// `/etc/machine-id`, if present.
    pub machine_id: String,
    /// The hostname.
    pub hostname: String,
}

impl HostInfo {
    /// Reads the host. Anything unreadable is reported empty or zero rather than failing:
    /// a node with an unknown kernel version can still run pods.
    pub fn read() -> HostInfo {
        let text = |path: &str| {
            std::fs::read_to_string(path)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        let memory_bytes = text("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0);
        let os_image = text("/etc/os-release")
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| "Linux".into());
        HostInfo {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            memory_bytes,
            kernel: text("/proc/sys/kernel/osrelease"),
            os_image,
            architecture: match std::env::consts::ARCH {
                "x86_64" => "amd64".into(),
                "aarch64" => "arm64".into(),
                other => other.into(),
            },
            machine_id: text("/etc/machine-id"),
            hostname: text("/proc/sys/kernel/hostname"),
        }
    }
}

/// The Node object the agent applies (spec and metadata).
fn node_object(config: &NodeConfig, host: &HostInfo) -> Value {
    let mut node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": config.name,
            "labels": {
                "kubernetes.io/hostname": config.name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": host.architecture,
                "beta.kubernetes.io/os": "linux",
                "beta.kubernetes.io/arch": host.architecture,
            },
        },
    });
    if let Some(root) = &config.local_path_root {
        node["metadata"]["annotations"][crate::volume::local::ANN_ROOT] = json!(root);
    }
    if config.serves_ingress {
        node["metadata"]["annotations"][crate::ingress::ANN_NODE_SERVES] = json!("true");
    }
    node
}

/// The status the agent applies: capacity, allocatable, conditions, addresses, nodeInfo.
/// `problems` are the parts of the agent failing now.
fn node_status(
    config: &NodeConfig,
    host: &HostInfo,
    heartbeat: &str,
    problems: &Problems,
) -> Value {
    let condition = |type_: &str, status: &str, reason: &str, message: &str| {
        json!({
            "type": type_, "status": status, "reason": reason, "message": message,
            "lastHeartbeatTime": heartbeat, "lastTransitionTime": heartbeat,
        })
    };
    let trouble = problems
        .iter()
        .map(|(part, error)| format!("{part}: {error}"))
        .collect::<Vec<_>>()
        .join("; ");
    let ready = if problems.is_empty() {
        condition(
            "Ready",
            "True",
            "KubeletReady",
            "orq agent is posting ready status",
        )
    } else {
        condition("Ready", "False", "KubeletNotReady", &trouble)
    };
    let mut conditions = vec![
        condition(
            "MemoryPressure",
            "False",
            "KubeletHasSufficientMemory",
            "kubelet has sufficient memory available",
        ),
        condition(
            "DiskPressure",
            "False",
            "KubeletHasNoDiskPressure",
            "kubelet has no disk pressure",
        ),
        condition(
            "PIDPressure",
            "False",
            "KubeletHasSufficientPID",
            "kubelet has sufficient PID available",
        ),
        ready,
    ];
    if config.manages_network {
        conditions.push(if problems.is_empty() {
            condition(
                "NetworkUnavailable",
                "False",
                "NodeNetworkReady",
                "orq agent has set up the node network",
            )
        } else {
            condition(
                "NetworkUnavailable",
                "True",
                "NodeNetworkNotReady",
                &trouble,
            )
        });
    }
    let resources = json!({
        "cpu": host.cpus.to_string(),
        "memory": format!("{}Ki", host.memory_bytes / 1024),
        "pods": config.max_pods.to_string(),
        "ephemeral-storage": "0",
    });
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": config.name},
        "status": {
            "capacity": resources,
            "allocatable": resources,
            "conditions": conditions,
            "addresses": [
                {"type": "InternalIP", "address": config.internal_ip},
                {"type": "Hostname", "address": config.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": config.port}},
            "nodeInfo": {
                "machineID": host.machine_id,
                "systemUUID": host.machine_id,
                "bootID": "",
                "kernelVersion": host.kernel,
                "osImage": host.os_image,
                "containerRuntimeVersion": RUNTIME_VERSION,
                "kubeletVersion": format!("v1.36.0-orquestra-{}", env!("CARGO_PKG_VERSION")),
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": host.architecture,
            },
        },
    })
}

/// Keeps one node registered and alive.
#[derive(Debug)]
pub struct Heartbeat {
    config: NodeConfig,
    host: HostInfo,
    nodes: Api<Node>,
    leases: Api<Lease>,
    health: Health,
}

impl Heartbeat {
    /// A heartbeat for `config` on this host, all parts healthy.
    pub fn new(client: Client, config: NodeConfig, host: HostInfo) -> Heartbeat {
        Heartbeat {
            config,
            host,
            nodes: Api::all(client.clone()),
            leases: Api::namespaced(client, LEASE_NAMESPACE),
            health: Health::new(),
        }
    }

    /// Reports the problems `health` collects in the Node's conditions.
    pub fn with_health(mut self, health: Health) -> Heartbeat {
        self.health = health;
        self
    }

    /// Applies the Node, its status and its Lease once. Safe to repeat: an agent that
    /// restarts registers again over the same objects.
    pub async fn register(&self) -> Result<(), NodeError> {
        let ssa = PatchParams::apply(MANAGER).force();
        let name = self.config.name.as_str();
        if !self.config.taints.is_empty() && self.nodes.get_opt(name).await?.is_none() {
            // Taints only at creation, as the kubelet does, and not under the agent's
            // field manager: its later applies must not take them back, nor the ones the
            // node lifecycle controller or an admin add.
            let taints: Vec<Value> = self
                .config
                .taints
                .iter()
                .map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect}))
                .collect();
            let mut node = node_object(&self.config, &self.host);
            node["spec"] = json!({"taints": taints});
            let node: Node = serde_json::from_value(node).map_err(kube::Error::SerdeError)?;
            let params = PostParams {
                field_manager: Some(format!("{MANAGER}-register")),
                ..PostParams::default()
            };
            match self.nodes.create(&params, &node).await {
                Ok(_) => {}
                // Another registration won the race: the node exists, as wanted.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.nodes
            .patch(
                name,
                &ssa,
                &Patch::Apply(node_object(&self.config, &self.host)),
            )
            .await?;
        self.report_status().await?;
        self.renew_lease().await
    }

    /// Re-applies the status with a fresh heartbeat time. Conditions keep their
    /// `lastTransitionTime` when their status does not change.
    pub async fn report_status(&self) -> Result<(), NodeError> {
        let now = Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
        let mut status = node_status(&self.config, &self.host, &now, &self.health.problems());
        if let Some(current) = self.nodes.get_opt(&self.config.name).await? {
            let previous = current
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default();
            if let Some(conditions) = status["status"]["conditions"].as_array_mut() {
                for condition in conditions {
                    let kept = previous.iter().find(|p| {
                        p.type_ == condition["type"].as_str().unwrap_or_default()
                            && p.status == condition["status"].as_str().unwrap_or_default()
                    });
                    if let Some(time) = kept.and_then(|p| p.last_transition_time.as_ref()) {
                        condition["lastTransitionTime"] =
                            serde_json::to_value(time).unwrap_or(Value::String(now.clone()));
                    }
                }
            }
        }
        self.nodes
            .patch_status(
                &self.config.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(status),
            )
            .await?;
        Ok(())
    }

    /// Renews (or creates) the node Lease: holder the node, `renewTime` now.
    pub async fn renew_lease(&self) -> Result<(), NodeError> {
        let now = Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
            .to_string();
        let seconds = i32::try_from(self.config.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": self.config.name, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": self.config.name,
                "leaseDurationSeconds": seconds,
                "renewTime": now,
            },
        });
        self.leases
            .patch(
                &self.config.name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(lease),
            )
            .await?;
        Ok(())
    }

    /// Registers, then renews the Lease every `lease_renew` and re-applies the status every
    /// `status_refresh` or as soon as the agent's problems change, until `shutdown`
    /// resolves. Failures are logged and retried on the next tick: an API server that is
    /// away for a while is not a reason to stop.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut registered = false;
        let mut last_status = tokio::time::Instant::now();
        let mut last_renewed = tokio::time::Instant::now();
        let mut problems = self.health.subscribe();
        let mut news = false;
        loop {
            let result = if registered {
                // After a gap (a partition, a stalled process) the node lifecycle controller
                // may have marked the node Unknown: report the status at once, not at the
                // next refresh.
                let gap = last_renewed.elapsed() > self.config.lease_renew * 2;
                let status = if std::mem::take(&mut news)
                    || gap
                    || last_status.elapsed() >= self.config.status_refresh
                {
                    last_status = tokio::time::Instant::now();
                    self.report_status().await
                } else {
                    Ok(())
                };
                match status {
                    Ok(()) => self.renew_lease().await,
                    Err(e) => Err(e),
                }
            } else {
                self.register().await
            };
            match result {
                Ok(()) => {
                    registered = true;
                    last_renewed = tokio::time::Instant::now();
                }
                Err(error) => {
                    tracing::warn!(node = %self.config.name, %error, "node heartbeat failed; retrying")
                }
            }
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(self.config.lease_renew) => {}
                changed = problems.changed() => {
                    // A problem came or went: say so now (a sleep of a few ms lets a burst
                    // of changes settle into one write).
                    if changed.is_ok() {
                        problems.mark_unchanged();
                        news = true;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_is_described() {
        let host = HostInfo::read();
        assert!(host.cpus >= 1);
        assert!(host.memory_bytes > 0, "MemTotal read from /proc/meminfo");
        assert!(!host.kernel.is_empty());
        let status = node_status(
            &NodeConfig::new("n1", "127.0.0.1"),
            &host,
            "2026-01-01T00:00:00Z",
            &Problems::new(),
        );
        assert_eq!(status["status"]["capacity"]["pods"], "110");
        assert_eq!(
            status["status"]["nodeInfo"]["containerRuntimeVersion"],
            RUNTIME_VERSION
        );
    }

    #[test]
    fn problems_make_the_node_not_ready_with_their_cause() {
        let mut config = NodeConfig::new("n1", "10.0.0.5");
        let host = HostInfo::read();
        let condition = |status: &Value, type_: &str| -> Option<(String, String, String)> {
            status["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == type_)
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                    (s("status"), s("reason"), s("message"))
                })
        };
        let healthy = node_status(&config, &host, "2026-01-01T00:00:00Z", &Problems::new());
        assert_eq!(condition(&healthy, "Ready").unwrap().0, "True");
        assert!(
            condition(&healthy, "NetworkUnavailable").is_none(),
            "not ours to report"
        );
        config.manages_network = true;
        let problems = Problems::from([(
            crate::health::Part::ClusterDns,
            "10.244.0.1:53 is in use by another process (udp)".to_owned(),
        )]);
        let sick = node_status(&config, &host, "2026-01-01T00:00:00Z", &problems);
        let message = "cluster DNS: 10.244.0.1:53 is in use by another process (udp)".to_owned();
        assert_eq!(
            condition(&sick, "Ready").unwrap(),
            ("False".into(), "KubeletNotReady".into(), message.clone())
        );
        assert_eq!(
            condition(&sick, "NetworkUnavailable").unwrap(),
            ("True".into(), "NodeNetworkNotReady".into(), message)
        );
    }
}
