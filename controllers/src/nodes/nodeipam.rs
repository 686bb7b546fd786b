//! Node IPAM (`nodeipam`): gives each Node without a `spec.podCIDR` the lowest free subnet
//! (a /24 by default) of the cluster CIDR (`10.244.0.0/16` by default), in `spec.podCIDR`
//! and `spec.podCIDRs`, as kube-controller-manager's range allocator does. The node agent
//! takes its pod network from there when it has no `--pod-cidr` of its own.
//!
//! What is allocated is read from the Nodes themselves (the cache), so a restart keeps every
//! allocation; subnets given but not yet seen in the cache are *assumed* taken, so a slow
//! cache never gives one subnet twice. When the range is exhausted the node keeps no CIDR, a
//! `CIDRNotAvailable` event says so (once per node), and the node is tried again when a Node
//! is deleted — not in a loop.

use orquestra_operator::rbac::Rule;
use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Event, Node};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["nodes"],
        verbs: &["get", "list", "watch", "patch"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "node-ipam-controller";

/// The cluster CIDR when none is configured (flannel's, and kubeadm's usual choice).
pub const DEFAULT_CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The prefix length of each node's subnet when none is configured.
pub const DEFAULT_NODE_MASK: u8 = 24;

/// An IPv4 network: its first address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// The network address (host bits zero).
    pub addr: Ipv4Addr,
    /// The prefix length, 0–32.
    pub prefix: u8,
}

/// A CIDR that does not parse, or a configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not `a.b.c.d/n` with host bits zero.
    #[error("invalid IPv4 CIDR {0:?}")]
    Cidr(String),
    /// The node mask is not within the cluster CIDR.
    #[error("node mask /{node_mask} does not fit in cluster CIDR {cluster}")]
    Mask {
        /// The cluster CIDR.
        cluster: String,
        /// The node mask.
        node_mask: u8,
    },
}

impl std::str::FromStr for Cidr {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Cidr, ConfigError> {
        let invalid = || ConfigError::Cidr(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if prefix > 32 || u32::from(addr) & !mask(prefix) != 0 {
            return Err(invalid());
        }
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

/// Where node subnets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// The cluster CIDR, carved into node subnets.
    pub cluster_cidr: Cidr,
    /// The prefix length of each node's subnet.
    pub node_mask: u8,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            cluster_cidr: Cidr {
                addr: Ipv4Addr::new(10, 244, 0, 0),
                prefix: 16,
            },
            node_mask: DEFAULT_NODE_MASK,
        }
    }
}

impl Config {
    /// A configuration from `--cluster-cidr` and `--node-cidr-mask-size` style values.
    pub fn new(cluster_cidr: &str, node_mask: u8) -> Result<Config, ConfigError> {
        let cluster: Cidr = cluster_cidr.parse()?;
        if node_mask < cluster.prefix || node_mask > 32 || node_mask - cluster.prefix > 24 {
            return Err(ConfigError::Mask {
                cluster: cluster_cidr.to_owned(),
                node_mask,
            });
        }
        Ok(Config {
            cluster_cidr: cluster,
            node_mask,
        })
    }

    /// How many node subnets the cluster CIDR holds.
    pub fn capacity(&self) -> u32 {
        1 << (self.node_mask - self.cluster_cidr.prefix)
    }

    /// Node subnet number `index`.
    pub fn subnet(&self, index: u32) -> Cidr {
        let step = 1u64 << (32 - u32::from(self.node_mask));
        let addr = u64::from(u32::from(self.cluster_cidr.addr)) + u64::from(index) * step;
        Cidr {
            addr: Ipv4Addr::from(addr as u32),
            prefix: self.node_mask,
        }
    }

    /// The number of `cidr` as a node subnet of this configuration, if it is one.
    pub fn index(&self, cidr: &str) -> Option<u32> {
        let cidr: Cidr = cidr.parse().ok()?;
        let base = u32::from(self.cluster_cidr.addr);
        let addr = u32::from(cidr.addr);
        (cidr.prefix == self.node_mask && addr & mask(self.cluster_cidr.prefix) == base)
            .then(|| (addr - base) >> (32 - u32::from(self.node_mask)))
    }
}

/// What the reconciler shares.
pub struct Controller {
    client: Client,
    nodes: Store<Node>,
    config: Config,
    /// Node name → (subnet index, when): given, maybe not yet seen in the cache.
    assumed: Mutex<HashMap<String, (u32, Instant)>>,
    /// Nodes already told the range is exhausted.
    warned: Mutex<HashSet<String>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeIpamController")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Adds node IPAM with the default [`Config`] to `manager`.
pub fn add(manager: &mut Manager) {
    add_with(manager, Config::default());
}

/// Adds node IPAM allocating from `config` to `manager`.
pub fn add_with(manager: &mut Manager, config: Config) {
    let nodes = manager.cache::<Node>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        nodes: nodes.store(),
        config,
        assumed: Mutex::default(),
        warned: Mutex::default(),
    });
    let waiting = nodes.store();
    let runner = Runner::for_cache("nodeipam", &nodes)
        .and_then(|r| {
            // A deleted node frees its subnet: the nodes still waiting for one get a look.
            r.watches_deleted(&nodes, move |_gone: Arc<Node>| {
                waiting
                    .state()
                    .into_iter()
                    .filter(|n| pod_cidr(n).is_none())
                    .map(|n| ObjectRef::from_obj(n.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context);
}

fn pod_cidr(node: &Node) -> Option<&str> {
    node.spec
        .as_ref()
        .and_then(|s| s.pod_cidr.as_deref())
        .filter(|c| !c.is_empty())
}

/// What can go wrong giving one node its subnet (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum NodeIpamError {
    /// The Node could not be patched.
    #[error("setting the pod CIDR of node {node}: {source}")]
    Patch {
        /// The node.
        node: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Controller>) -> Result<Action, NodeIpamError> {
    let name = node.name_any();
    if pod_cidr(&node).is_some() || node.metadata.deletion_timestamp.is_some() {
        ctx.assumed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&name);
        return Ok(Action::await_change());
    }
    let index = {
        let mut assumed = ctx.assumed.lock().unwrap_or_else(|e| e.into_inner());
        if assumed.contains_key(&name) {
            // Given a moment ago; the cache has not caught up.
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
        let nodes = ctx.nodes.state();
        let present: HashSet<String> = nodes.iter().map(|n| n.name_any()).collect();
        assumed.retain(|n, (_, at)| present.contains(n) || at.elapsed() < Duration::from_secs(60));
        let used: HashSet<u32> = nodes
            .iter()
            .filter_map(|n| pod_cidr(n).and_then(|c| ctx.config.index(c)))
            .chain(assumed.values().map(|(i, _)| *i))
            .collect();
        let index = (0..ctx.config.capacity()).find(|i| !used.contains(i));
        if let Some(index) = index {
            assumed.insert(name.clone(), (index, Instant::now()));
        }
        index
    };
    let Some(index) = index else {
        ctx.exhausted(&node).await;
        return Ok(Action::await_change());
    };
    let cidr = ctx.config.subnet(index).to_string();
    let api: Api<Node> = Api::all(ctx.client.clone());
    // Only if still without one: a test-and-set on the resourceVersion.
    let patch = json!({
        "metadata": {"resourceVersion": node.resource_version()},
        "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    });
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    match api.patch(&name, &params, &Patch::Merge(&patch)).await {
        Ok(_) => {
            tracing::info!(node = %name, pod_cidr = %cidr, "pod CIDR allocated");
            ctx.warned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            Ok(Action::await_change())
        }
        Err(source) => {
            ctx.assumed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
            match source {
                // Changed or gone meanwhile: its next change (if any) brings it back.
                kube::Error::Api(s) if s.code == 404 => Ok(Action::await_change()),
                source => Err(NodeIpamError::Patch { node: name, source }),
            }
        }
    }
}

impl Controller {
    /// Says once per node that no subnet is left for it.
    async fn exhausted(&self, node: &Node) {
        let name = node.name_any();
        if !self
            .warned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.clone())
        {
            return;
        }
        let message = format!(
            "Node {name} status is now: CIDRNotAvailable (no /{} left in {})",
            self.config.node_mask, self.config.cluster_cidr
        );
        tracing::warn!(node = %name, "{message}");
        let api: Api<Event> = Api::namespaced(self.client.clone(), "default");
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        let event = json!({
            "metadata": {"name": format!("{name}.{:x}", jiff::Timestamp::now().as_nanosecond()), "namespace": "default"},
            "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.uid()},
            "reason": "CIDRNotAvailable", "message": message, "type": "Normal",
            "source": {"component": "cidrAllocator"}, "reportingComponent": "cidrAllocator",
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        });
        if let Ok(event) = serde_json::from_value(event)
            && let Err(e) = api.create(&PostParams::default(), &event).await
        {
            tracing::debug!(error = %e, "publishing CIDRNotAvailable failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        let c = Config::default();
        assert_eq!(c.capacity(), 256);
        assert_eq!(c.subnet(0).to_string(), "10.244.0.0/24");
        assert_eq!(c.subnet(255).to_string(), "10.244.255.0/24");
        assert_eq!(c.index("10.244.7.0/24"), Some(7));
        assert_eq!(c.index("10.245.7.0/24"), None);
        assert_eq!(c.index("10.244.7.0/25"), None);
        let small = Config::new("192.168.0.0/30", 31).unwrap();
        assert_eq!(small.capacity(), 2);
        assert_eq!(small.subnet(1).to_string(), "192.168.0.2/31");
        assert!(Config::new("10.0.0.1/16", 24).is_err());
        assert!(Config::new("10.0.0.0/24", 16).is_err());
        assert!("nonsense".parse::<Cidr>().is_err());
    }
}
