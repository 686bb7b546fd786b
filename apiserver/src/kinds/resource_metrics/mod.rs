//! The resource metrics API, `metrics.k8s.io/v1beta1`, built into the API server: what
//! metrics-server serves in a Kubernetes cluster (and k3s ships as a pod), answered here from
//! the node agents' `/metrics/resource` without an aggregated server in between.
//!
//! [`scrape`] reads every node's agent each `--metric-resolution` (15 s, as metrics-server)
//! and keeps, per node and per container, the CPU rate between the last two samples and the
//! last memory working set. `NodeMetrics` and `PodMetrics` are then only read (get and list,
//! the verbs discovery names): joined with the Node or Pod objects they describe, so label
//! and field selectors select as they do on those, and a pod without two samples yet is not
//! listed (as metrics-server leaves it out). `kubectl top` and the HorizontalPodAutoscaler
//! read them.

pub mod scrape;

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;
use crate::request::{Params, Target};

/// The group served.
pub const GROUP: &str = "metrics.k8s.io";

/// A node's resource use (`metrics.k8s.io/v1beta1` NodeMetrics).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeMetrics {
    /// The node's name and labels.
    pub metadata: ObjectMeta,
    /// When the usage was measured: the end of the window.
    pub timestamp: Time,
    /// The span the CPU rate is taken over (`15s`).
    pub window: String,
    /// `cpu` (cores) and `memory` (working set bytes).
    pub usage: BTreeMap<String, Quantity>,
}

/// A pod's resource use, per container (`metrics.k8s.io/v1beta1` PodMetrics).
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodMetrics {
    /// The pod's name, namespace and labels.
    pub metadata: ObjectMeta,
    /// When the usage was measured: the end of the window.
    pub timestamp: Time,
    /// The span the CPU rate is taken over.
    pub window: String,
    /// Each container's use.
    pub containers: Vec<ContainerMetrics>,
}

/// One container's use.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
pub struct ContainerMetrics {
    /// The container's name.
    pub name: String,
    /// `cpu` and `memory`.
    pub usage: BTreeMap<String, Quantity>,
}

macro_rules! metrics_resource {
    ($type:ty, $kind:literal, $plural:literal, $scope:ty) => {
        impl k8s_openapi::Resource for $type {
            const API_VERSION: &'static str = "metrics.k8s.io/v1beta1";
            const GROUP: &'static str = GROUP;
            const KIND: &'static str = $kind;
            const VERSION: &'static str = "v1beta1";
            const URL_PATH_SEGMENT: &'static str = $plural;
            type Scope = $scope;
        }
        impl k8s_openapi::ListableResource for $type {
            const LIST_KIND: &'static str = concat!($kind, "List");
        }
    };
}

metrics_resource!(
    NodeMetrics,
    "NodeMetrics",
    "nodes",
    k8s_openapi::ClusterResourceScope
);
metrics_resource!(
    PodMetrics,
    "PodMetrics",
    "pods",
    k8s_openapi::NamespaceResourceScope
);

/// One measurement: a CPU rate over a window, and memory at its end.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    /// CPU in cores.
    pub cpu: f64,
    /// Memory working set in bytes.
    pub memory: f64,
    /// When the window ended, in seconds since the Unix epoch.
    pub at: f64,
    /// The window's length in seconds.
    pub window: f64,
}

/// Pods' use: `(namespace, pod)` → container name → usage.
pub type PodUsage = HashMap<(String, String), BTreeMap<String, Usage>>;

/// The latest measurements, written by [`scrape`] and read by requests.
#[derive(Debug, Default)]
pub struct ResourceMetrics {
    latest: RwLock<Latest>,
}

#[derive(Debug, Default)]
struct Latest {
    /// Node name → usage.
    nodes: HashMap<String, Usage>,
    pods: PodUsage,
}

impl ResourceMetrics {
    /// Replaces what is known of node `node`: its own use and that of the pods on it.
    pub fn update(
        &self,
        node: &str,
        usage: Option<Usage>,
        pods: PodUsage,
        previous_pods: &[(String, String)],
    ) {
        let mut latest = self.latest.write().unwrap_or_else(|e| e.into_inner());
        match usage {
            Some(usage) => latest.nodes.insert(node.to_owned(), usage),
            None => latest.nodes.remove(node),
        };
        for key in previous_pods {
            latest.pods.remove(key);
        }
        latest.pods.extend(pods);
    }

    /// Forgets nodes that are gone.
    pub fn retain_nodes(&self, live: &dyn Fn(&str) -> bool) {
        let mut latest = self.latest.write().unwrap_or_else(|e| e.into_inner());
        latest.nodes.retain(|name, _| live(name));
    }

    fn node(&self, name: &str) -> Option<Usage> {
        let latest = self.latest.read().unwrap_or_else(|e| e.into_inner());
        latest.nodes.get(name).copied()
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<BTreeMap<String, Usage>> {
        let latest = self.latest.read().unwrap_or_else(|e| e.into_inner());
        latest
            .pods
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }
}

/// Whether `def` is one of the resource metrics.
pub fn is_resource_metrics(def: &ResourceDef) -> bool {
    def.group == GROUP && def.read_only
}

/// Answers a GET of `target` (one object, or a list filtered by the request's selectors).
pub async fn serve(engine: &Engine, target: &Target, params: &Params) -> Result<Value, ApiError> {
    if params.is_watch() {
        return Err(ApiError::MethodNotAllowed);
    }
    let pods = target.def.plural == "pods";
    // The objects described: the Node or Pod objects, selected as the request says.
    let described = Target {
        def: crate::quota::served(engine, "", if pods { "pods" } else { "nodes" })
            .ok_or_else(|| ApiError::Internal("pods and nodes are not served".into()))?,
        namespace: target.namespace.clone(),
        name: target.name.clone(),
        subresource: None,
    };
    let metrics = engine.resource_metrics();
    let describe = |object: &Value| -> Option<Value> {
        let meta = &object["metadata"];
        let name = meta["name"].as_str()?;
        let mut metadata = json!({"name": name, "creationTimestamp": crate::object::now()});
        if let Some(labels) = meta.get("labels") {
            metadata["labels"] = labels.clone();
        }
        if pods {
            let namespace = meta["namespace"].as_str()?;
            metadata["namespace"] = json!(namespace);
            let containers = metrics.pod(namespace, name)?;
            let first = containers.values().next().copied()?;
            let containers: Vec<Value> = containers
                .iter()
                .map(|(name, usage)| json!({"name": name, "usage": quantities(usage)}))
                .collect();
            Some(
                json!({"kind": "PodMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": metadata, "timestamp": timestamp(first.at),
                "window": window(first.window), "containers": containers}),
            )
        } else {
            let usage = metrics.node(name)?;
            Some(
                json!({"kind": "NodeMetrics", "apiVersion": "metrics.k8s.io/v1beta1",
                "metadata": metadata, "timestamp": timestamp(usage.at),
                "window": window(usage.window), "usage": quantities(&usage)}),
            )
        }
    };
    if let Some(name) = &target.name {
        let object = engine.get(&described).await.map_err(|error| match error {
            ApiError::NotFound { .. } => ApiError::not_found(&target.def, name),
            other => other,
        })?;
        return describe(&object).ok_or_else(|| ApiError::not_found(&target.def, name));
    }
    let selected = Params {
        label_selector: params.label_selector.clone(),
        field_selector: params.field_selector.clone(),
        ..Params::default()
    };
    let list = engine.list(&described, &selected).await?;
    let items: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(describe)
        .collect();
    Ok(json!({
        "kind": format!("{}List", target.def.kind),
        "apiVersion": "metrics.k8s.io/v1beta1",
        "metadata": {},
        "items": items,
    }))
}

/// `cpu` in nanocores and `memory` in KiB, as metrics-server writes them.
fn quantities(usage: &Usage) -> Value {
    let nanocores = (usage.cpu * 1e9).round().max(0.0) as u64;
    let kib = (usage.memory / 1024.0).round().max(0.0) as u64;
    json!({"cpu": format!("{nanocores}n"), "memory": format!("{kib}Ki")})
}

fn timestamp(at: f64) -> String {
    jiff::Timestamp::from_millisecond((at * 1000.0) as i64)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|_| crate::object::now())
}

/// A Go duration of whole milliseconds (`15.012s`).
fn window(seconds: f64) -> String {
    let millis = (seconds * 1000.0).round() as u64;
    let (whole, fraction) = (millis / 1000, millis % 1000);
    if fraction == 0 {
        format!("{whole}s")
    } else {
        format!(
            "{whole}.{}s",
            format!("{fraction:03}").trim_end_matches('0')
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_written_as_metrics_server_writes_it() {
        let usage = Usage {
            cpu: 0.25,
            memory: 10.0 * 1024.0 * 1024.0,
            at: 1_700_000_000.5,
            window: 15.0,
        };
        assert_eq!(
            quantities(&usage),
            json!({"cpu": "250000000n", "memory": "10240Ki"})
        );
        assert_eq!(window(15.0), "15s");
        assert_eq!(window(15.25), "15.25s");
        assert_eq!(timestamp(1_700_000_000.5), "2023-11-14T22:13:20Z");
    }
}
