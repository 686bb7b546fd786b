//! Orquestra's built-in control loops, written with the same framework users write theirs
//! with (`orquestra-operator`), grouped by what they look after: the [`scheduler`],
//! [`workloads`] (ReplicaSets, Deployments, DaemonSets, …), [`services`] (Endpoints,
//! EndpointSlices, LoadBalancer addresses), [`nodes`] (lifecycle, IPAM), [`storage`] (the
//! PersistentVolume binder, the local-path provisioner) and [`cluster`] housekeeping
//! (garbage collection, namespaces, ServiceAccounts, the root CA). [`BUILTIN`] names them
//! for `--controllers`, as kube-controller-manager does.

#![deny(missing_docs)]

pub mod cluster;
mod discovery;
pub mod events;
pub mod labels;
pub mod nodes;
pub mod objects;
pub mod scheduler;
pub mod services;
pub mod storage;
pub mod workloads;

use cluster::{csrsigning, garbage, namespace, rootcacert, serviceaccount};
use nodes::{nodeipam, nodelifecycle, tainteviction};
use services::{endpoints, endpointslice, endpointslicemirroring, servicelb};
use storage::{localpath, persistentvolume};
use workloads::{daemonset, deployment, disruption, replicaset, statefulset};

use std::time::Duration;

use orquestra_operator::Manager;

/// Why a built-in control loop could not be added to a manager.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// Its metrics could not be registered (a name already taken in the registry).
    #[error("registering the metrics of {name}: {source}")]
    Metrics {
        /// The control loop.
        name: &'static str,
        /// The registry's error.
        source: prometheus::Error,
    },
    /// `--controllers` named a control loop that does not exist.
    #[error("unknown controller {0:?} (known: {known})", known = names().join(", "))]
    Unknown(String),
}

/// The knobs of the built-in control loops (kube-controller-manager's flags of the same
/// names).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The cluster CA (PEM) the `root-ca-cert-publisher` puts into every namespace; without
    /// one that loop does not run.
    pub root_ca: Option<String>,
    /// How long a node's Lease may go unrenewed before the node is `Ready=Unknown` and
    /// tainted unreachable (`--node-monitor-grace-period`, 40 s).
    pub node_monitor_grace_period: Duration,
    /// How long a node that has never posted its status may stay silent before the same
    /// (`--node-startup-grace-period`, 60 s).
    pub node_startup_grace_period: Duration,
    /// The range node IPAM hands each node's `podCIDR` out of (`--cluster-cidr`,
    /// `--node-cidr-mask-size`).
    pub node_ipam: nodeipam::Config,
    /// How often each HorizontalPodAutoscaler is evaluated
    /// (`--horizontal-pod-autoscaler-sync-period`, 15 s).
    pub horizontal_pod_autoscaler_sync_period: Duration,
    /// The addresses LoadBalancer Services get (`--service-lb-pool`); empty: the nodes'
    /// own addresses, as k3s' ServiceLB gives them.
    pub service_lb_pool: servicelb::Pool,
    /// The CA that signs approved client CertificateSigningRequests
    /// (`--cluster-signing-cert-file`/`--cluster-signing-key-file`); without one, `csrsigning`
    /// does not run.
    pub cluster_signing: Option<csrsigning::SigningCa>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            root_ca: None,
            node_monitor_grace_period: Duration::from_secs(40),
            node_startup_grace_period: Duration::from_secs(60),
            node_ipam: nodeipam::Config::default(),
            horizontal_pod_autoscaler_sync_period: Duration::from_secs(15),
            service_lb_pool: servicelb::Pool::default(),
            cluster_signing: None,
        }
    }
}

/// A built-in control loop: its `--controllers` name and how it joins a [`Manager`].
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    /// The name `--controllers` selects it by.
    pub name: &'static str,
    /// Adds its caches and reconcilers to the manager.
    pub add: fn(&mut Manager, &Settings) -> Result<(), prometheus::Error>,
    /// The RBAC rules its requests need.
    pub rules: &'static [orquestra_operator::rbac::Rule],
}

/// Every built-in control loop, in the order they are added.
pub const BUILTIN: &[Builtin] = &[
    Builtin {
        name: "scheduler",
        rules: scheduler::RULES,
        add: |m, _| scheduler::add(m),
    },
    Builtin {
        name: "deployment",
        rules: deployment::RULES,
        add: |m, _| {
            deployment::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "nodelifecycle",
        rules: nodelifecycle::RULES,
        add: |m, s| {
            nodelifecycle::add(
                m,
                nodelifecycle::Grace {
                    monitor: s.node_monitor_grace_period,
                    startup: s.node_startup_grace_period,
                },
            );
            Ok(())
        },
    },
    Builtin {
        name: "replicaset",
        rules: replicaset::RULES,
        add: |m, _| {
            replicaset::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "replicationcontroller",
        rules: replicaset::RC_RULES,
        add: |m, _| {
            replicaset::add_replication_controllers(m);
            Ok(())
        },
    },
    Builtin {
        name: "garbagecollector",
        rules: garbage::RULES,
        add: |m, _| {
            garbage::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "namespace",
        rules: namespace::RULES,
        add: |m, _| {
            namespace::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "serviceaccount",
        rules: serviceaccount::RULES,
        add: |m, _| {
            serviceaccount::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "root-ca-cert-publisher",
        rules: rootcacert::RULES,
        add: |m, s| {
            match &s.root_ca {
                Some(ca) => rootcacert::add(m, ca.clone()),
                None => tracing::warn!(
                    "no cluster CA to publish: namespaces get no kube-root-ca.crt ConfigMap"
                ),
            }
            Ok(())
        },
    },
    Builtin {
        name: "csrsigning",
        rules: csrsigning::RULES,
        add: |m, s| {
            match &s.cluster_signing {
                Some(ca) => csrsigning::add(m, ca.clone()),
                None => tracing::warn!(
                    "no cluster signing CA (--cluster-signing-cert-file): CertificateSigningRequests are not signed"
                ),
            }
            Ok(())
        },
    },
    Builtin {
        name: "endpoint",
        rules: endpoints::RULES,
        add: |m, _| {
            endpoints::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "endpointslice",
        rules: endpointslice::RULES,
        add: |m, _| {
            endpointslice::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "endpointslicemirroring",
        rules: endpointslicemirroring::RULES,
        add: |m, _| {
            endpointslicemirroring::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "servicelb",
        rules: servicelb::RULES,
        add: |m, s| {
            servicelb::add(m, s.service_lb_pool.clone());
            Ok(())
        },
    },
    Builtin {
        name: "ingress",
        rules: services::ingress::RULES,
        add: |m, _| {
            services::ingress::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "nodeipam",
        rules: nodeipam::RULES,
        add: |m, s| {
            nodeipam::add_with(m, s.node_ipam);
            Ok(())
        },
    },
    Builtin {
        name: "persistentvolume-binder",
        rules: persistentvolume::RULES,
        add: |m, _| {
            persistentvolume::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "local-path-provisioner",
        rules: localpath::RULES,
        add: |m, _| {
            localpath::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "daemonset",
        rules: daemonset::RULES,
        add: |m, _| {
            daemonset::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "job",
        rules: workloads::job::RULES,
        add: |m, _| {
            workloads::job::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "cronjob",
        rules: workloads::cronjob::RULES,
        add: |m, _| {
            workloads::cronjob::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "ttl-after-finished",
        rules: workloads::ttlafterfinished::RULES,
        add: |m, _| {
            workloads::ttlafterfinished::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "horizontalpodautoscaling",
        rules: workloads::autoscaler::RULES,
        add: |m, s| {
            workloads::autoscaler::add(m, s.horizontal_pod_autoscaler_sync_period);
            Ok(())
        },
    },
    Builtin {
        name: "statefulset",
        rules: statefulset::RULES,
        add: |m, _| {
            statefulset::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "disruption",
        rules: disruption::RULES,
        add: |m, _| {
            disruption::add(m);
            Ok(())
        },
    },
    Builtin {
        name: "taint-eviction-controller",
        rules: tainteviction::RULES,
        add: |m, _| {
            tainteviction::add(m);
            Ok(())
        },
    },
];

/// The names of the built-in control loops.
pub fn names() -> Vec<&'static str> {
    BUILTIN.iter().map(|b| b.name).collect()
}

/// Whether control loop `name` is selected by a `--controllers` list: `*` for all, `name`
/// to add one, `-name` to leave one out (which wins).
pub fn enabled(selection: &[String], name: &str) -> bool {
    let mut on = false;
    for item in selection {
        match item.trim() {
            "*" => on = true,
            n if n == name => on = true,
            n if n.strip_prefix('-') == Some(name) => return false,
            _ => {}
        }
    }
    on
}

/// Adds the control loops `selection` selects to `manager`; returns their names. An unknown
/// name in the selection is an error, not silently ignored.
pub fn add_selected(
    manager: &mut Manager,
    selection: &[String],
    settings: &Settings,
) -> Result<Vec<&'static str>, AddError> {
    for item in selection {
        let name = item.trim().trim_start_matches('-');
        if name != "*" && !name.is_empty() && !BUILTIN.iter().any(|b| b.name == name) {
            return Err(AddError::Unknown(name.to_owned()));
        }
    }
    let mut added = Vec::new();
    for builtin in BUILTIN.iter().filter(|b| enabled(selection, b.name)) {
        (builtin.add)(manager, settings).map_err(|source| AddError::Metrics {
            name: builtin.name,
            source,
        })?;
        added.push(builtin.name);
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selection() {
        assert!(enabled(&list(&["*"]), "scheduler"));
        assert!(!enabled(&list(&["*", "-scheduler"]), "scheduler"));
        assert!(!enabled(&list(&["-scheduler", "*"]), "scheduler"));
        assert!(enabled(&list(&["replicaset"]), "replicaset"));
        assert!(!enabled(&list(&["replicaset"]), "scheduler"));
        assert!(!enabled(&list(&[]), "scheduler"));
    }
}
