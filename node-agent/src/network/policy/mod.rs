//! NetworkPolicy enforcement (networking.k8s.io/v1) in nftables, for the pods of this node.
//!
//! [`rules`] computes, from the caches of NetworkPolicies, Pods (all of them: peers live on
//! every node) and Namespaces, which local pods are isolated for ingress and for egress and
//! what each may receive or send: a set of `(peer address, protocol, port)` boxes per pod,
//! the union of every rule of every policy selecting it. [`table`] turns that into one
//! table, [`TABLE`], in the agent's network namespace:
//!
//! - the `forward` chain (`filter` hook) accepts packets of established connections and
//!   their ICMP errors (`ct state established,related`), then looks the source up in the
//!   `egress-pods` map and the destination in `ingress-pods`: each maps an isolated local
//!   pod's address to its chain;
//! - a pod's chain returns for the pod's own address (a pod reaching itself through a
//!   Service), then asks one interval set — `peer . protocol . port`, named like the chain —
//!   and returns if the packet is in it, else drops it. However many policies and rules
//!   select a pod, a new connection costs two map lookups and one set lookup per
//!   direction. Pods the same policies select get equal sets, computed once.
//!
//! Each node checks only its own pods: the egress of a pod here and the ingress of a pod
//! here. A connection between two nodes is checked for egress on the client's node and for
//! ingress on the server's; one between two pods of this node, for both here.
//!
//! **Where packets are seen.** Policies are judged in the `ip` family's forward hook, after
//! the service proxy's DNAT (a policy names pods, not cluster IPs) and with conntrack (so
//! replies pass). Routed traffic — to and from other nodes, and a pod reaching a pod here
//! through a Service — passes that hook. Two pods on this node's bridge, however, talk at
//! layer 2, which the `ip` hooks see only with bridge netfilter (`br_netfilter`,
//! `net.bridge.bridge-nf-call-iptables`) on. The alternatives were worse: a `bridge`
//! family table needs `nf_conntrack_bridge` for `ct state` (many kernels, this project's
//! test hosts' among them, are built without it), and netdev hooks on the veths have no
//! connection tracking at all, so neither could let the replies of allowed connections
//! through without opening every reply-shaped packet. So, as k3s and kubeadm clusters do,
//! the agent turns bridge netfilter on (per network namespace; `modprobe br_netfilter` when
//! its sysctl is missing) once some pod here is isolated, checks it on every sync, and
//! reports the node unhealthy while it cannot.
//!
//! **What is always allowed.** Traffic between a pod and its own node never reaches the
//! forward hook (it enters through `input` or leaves through `output`), so the kubelet's
//! probes reach isolated pods, and pods reach the cluster DNS on the bridge's address and
//! any other address of the node, as Kubernetes requires for the former and leaves open
//! for the latter. A pod reaching itself is allowed too.
//!
//! **Syncs** are incremental like the service proxy's: the last applied [`Ruleset`] is
//! kept and `nft` gets one transaction with only the difference (elements added to and
//! deleted from the pods' sets, chains and sets of pods newly isolated or no longer), which
//! the kernel applies atomically. The first sync, a sync after a failure, and a periodic
//! resync replace the whole table, in one transaction too.
//!
//! A pod whose address is not yet in the pod cache is not yet isolated: the window between
//! its network coming up and the watch event reaching this node is not covered.

pub mod rules;
pub mod table;

#[cfg(test)]
mod matrix;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::reflector::Store;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::Notify;

use crate::health::{Backoff, Health, Part};
use crate::network::{NetworkError, nft};

pub use rules::{Ruleset, desired};
pub use table::{TABLE, transaction};

/// The sysctl that passes bridged IPv4 through the `ip` family's hooks.
const BRIDGE_NF_CALL_IPTABLES: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

/// What went wrong enforcing the policies.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// `nft` refused the transaction (the old rules stay).
    #[error("programming the network policies: {0}")]
    Nft(#[source] NetworkError),
    /// Bridge netfilter could not be turned on: traffic between pods on this node's
    /// bridge is not filtered.
    #[error(
        "turning on bridge netfilter ({path}), without which traffic between pods on this node \
         is not filtered: {source}"
    )]
    BridgeNetfilter {
        /// The sysctl.
        path: &'static str,
        /// Why it could not be read or written.
        #[source]
        source: std::io::Error,
    },
}

/// The enforcement's metrics.
#[derive(Clone, Debug)]
pub struct PolicyMetrics {
    sync_duration: Histogram,
    programming: Histogram,
    failures: IntCounter,
    last_sync: prometheus::Gauge,
    isolated: IntGaugeVec,
    elements: IntGauge,
}

impl PolicyMetrics {
    /// Registers the metrics on `registry`.
    pub fn register(registry: &Registry) -> Result<PolicyMetrics, prometheus::Error> {
        let buckets = prometheus::exponential_buckets(0.001, 2.0, 16)?;
        let metrics = PolicyMetrics {
            sync_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "orquestra_network_policy_sync_duration_seconds",
                    "How long a sync of the network policy rules took (computing and nft).",
                )
                .buckets(buckets.clone()),
            )?,
            programming: Histogram::with_opts(
                HistogramOpts::new(
                    "orquestra_network_policy_programming_duration_seconds",
                    "From a change of a NetworkPolicy, Pod or Namespace reaching this node to \
                     the rules it changes being in place.",
                )
                .buckets(buckets),
            )?,
            failures: IntCounter::new(
                "orquestra_network_policy_sync_failures_total",
                "Network policy syncs that failed (nft refused, or bridge netfilter is off).",
            )?,
            last_sync: prometheus::Gauge::new(
                "orquestra_network_policy_last_sync_timestamp_seconds",
                "The last time the network policy rules were synced successfully.",
            )?,
            isolated: IntGaugeVec::new(
                Opts::new(
                    "orquestra_network_policy_isolated_pods",
                    "Pods on this node isolated by network policies, per direction.",
                ),
                &["direction"],
            )?,
            elements: IntGauge::new(
                "orquestra_network_policy_set_elements",
                "Elements in the isolated pods' allow sets, together.",
            )?,
        };
        registry.register(Box::new(metrics.sync_duration.clone()))?;
        registry.register(Box::new(metrics.programming.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        registry.register(Box::new(metrics.last_sync.clone()))?;
        registry.register(Box::new(metrics.isolated.clone()))?;
        registry.register(Box::new(metrics.elements.clone()))?;
        Ok(metrics)
    }
}

/// The policy enforcement of one node: the caches it programs from and what it last
/// applied.
pub struct PolicyEnforcer {
    node_name: String,
    policies: Store<NetworkPolicy>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    metrics: PolicyMetrics,
    applied: Option<Ruleset>,
    /// Whether any sync succeeded yet (changes before the first are not its latency).
    synced: bool,
    health: Health,
}

impl std::fmt::Debug for PolicyEnforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEnforcer")
            .field("node_name", &self.node_name)
            .finish_non_exhaustive()
    }
}

impl PolicyEnforcer {
    /// Enforcement for node `node_name` from these caches (`pods`: every pod).
    pub fn new(
        node_name: String,
        policies: Store<NetworkPolicy>,
        pods: Store<Pod>,
        namespaces: Store<Namespace>,
        metrics: PolicyMetrics,
    ) -> PolicyEnforcer {
        PolicyEnforcer {
            node_name,
            policies,
            pods,
            namespaces,
            metrics,
            applied: None,
            synced: false,
            health: Health::new(),
        }
    }

    /// Reports failed and recovered syncs to `health` (the Node's conditions).
    pub fn with_health(mut self, health: Health) -> PolicyEnforcer {
        self.health = health;
        self
    }

    /// What was applied last.
    pub fn applied(&self) -> Option<&Ruleset> {
        self.applied.as_ref()
    }

    /// Brings the table in line with the caches: one nft transaction, nothing sent when
    /// nothing changed. Returns whether a transaction was applied. A failed transaction
    /// leaves the old rules (nft applies all or nothing) and makes the next sync replace
    /// the table whole.
    pub async fn sync(&mut self) -> Result<bool, PolicyError> {
        let begun = Instant::now();
        let next = desired(
            &self.policies.state(),
            &self.pods.state(),
            &self.namespaces.state(),
            &self.node_name,
        );
        let changed = self.applied.as_ref() != Some(&next);
        if changed {
            let transaction = transaction(self.applied.as_ref(), &next);
            if let Err(e) = nft(&transaction).await {
                self.metrics.failures.inc();
                self.applied = None;
                return Err(PolicyError::Nft(e));
            }
            self.metrics
                .isolated
                .with_label_values(&["ingress"])
                .set(i64::try_from(next.ingress.len()).unwrap_or(i64::MAX));
            self.metrics
                .isolated
                .with_label_values(&["egress"])
                .set(i64::try_from(next.egress.len()).unwrap_or(i64::MAX));
            self.metrics
                .elements
                .set(i64::try_from(next.elements()).unwrap_or(i64::MAX));
            self.applied = Some(next);
        }
        let isolating = self
            .applied
            .as_ref()
            .is_some_and(|r| !r.ingress.is_empty() || !r.egress.is_empty());
        if isolating && let Err(e) = bridge_netfilter().await {
            self.metrics.failures.inc();
            return Err(e);
        }
        self.metrics
            .sync_duration
            .observe(begun.elapsed().as_secs_f64());
        self.metrics.last_sync.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default(),
        );
        Ok(changed)
    }

    /// Syncs whenever `changed` is notified (changes arriving during a sync are picked up
    /// by the next one), and every `resync` in case the table was changed behind its back,
    /// until `shutdown`. Start it once the caches have their first lists (an empty pod
    /// cache would lift every isolation).
    pub async fn run(
        mut self,
        changed: Arc<Notify>,
        resync: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        // When the oldest change not yet programmed arrived: noted by a relay that runs
        // while a sync awaits nft, so the latency counts from the change, not from the
        // end of the sync it arrived during.
        let since: Mutex<Option<Instant>> = Mutex::new(None);
        let wake = Notify::new();
        let relay = async {
            loop {
                changed.notified().await;
                if let Ok(mut s) = since.lock() {
                    s.get_or_insert_with(Instant::now);
                }
                wake.notify_one();
            }
        };
        let work = async {
            let mut backoff = Backoff::default();
            loop {
                let pending = since.lock().ok().and_then(|mut s| s.take());
                match self.sync().await {
                    Err(e) => {
                        if let (Some(at), Ok(mut s)) = (pending, since.lock()) {
                            // Still not programmed: the next success measures from it.
                            *s = Some(s.map_or(at, |later| later.min(at)));
                        }
                        self.health.failed(Part::NetworkPolicy, &e);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                    Ok(applied) => {
                        if applied
                            && self.synced
                            && let Some(at) = pending
                        {
                            self.metrics.programming.observe(at.elapsed().as_secs_f64());
                        }
                        self.synced = true;
                    }
                }
                backoff.reset();
                self.health.recovered(Part::NetworkPolicy);
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(resync) => self.applied = None,
                }
            }
        };
        tokio::select! {
            () = relay => {}
            () = work => {}
            () = shutdown => {}
        }
    }
}

/// Turns bridge netfilter on in this network namespace, loading `br_netfilter` when its
/// sysctl is missing.
async fn bridge_netfilter() -> Result<(), PolicyError> {
    let failed = |source| PolicyError::BridgeNetfilter {
        path: BRIDGE_NF_CALL_IPTABLES,
        source,
    };
    if !std::path::Path::new(BRIDGE_NF_CALL_IPTABLES).exists() {
        // Best effort: the write below says what is wrong if this did not help.
        let _ = tokio::process::Command::new("modprobe")
            .arg("br_netfilter")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .await;
    }
    let now = std::fs::read_to_string(BRIDGE_NF_CALL_IPTABLES).map_err(failed)?;
    if now.trim() != "1" {
        tracing::info!(
            "turning bridge netfilter on, so network policies filter traffic between pods on this node"
        );
        std::fs::write(BRIDGE_NF_CALL_IPTABLES, "1").map_err(failed)?;
    }
    Ok(())
}

/// Removes the policy table (`orq agent --cleanup`). Bridge netfilter stays as it is:
/// something else may rely on it.
pub async fn cleanup() -> Result<(), NetworkError> {
    nft(&format!("add table ip {TABLE}\ndelete table ip {TABLE}\n")).await
}
