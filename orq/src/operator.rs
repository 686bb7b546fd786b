//! `orq operator`: the built-in control loops — scheduler, workload, endpoints, garbage
//! collection, namespace and node lifecycle — against any cluster, as kube-scheduler and
//! kube-controller-manager are run beside kube-apiserver. `orq server` runs the same loops
//! in-process; this is for running them apart (more replicas behind leader election, another
//! machine, a cluster whose API server is not Orquestra's).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use orquestra_operator::webhook::{Tls, WebhookServer};
use orquestra_operator::{LeaderElection, Manager};

/// The control loops' flags, shared by `orq server` and `orq operator`.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Which control loops run, like kube-controller-manager's `--controllers`: `*` for all
    /// built-in ones, a name to add one, `-name` to leave one out. Built-in: scheduler,
    /// deployment, replicaset, replicationcontroller, daemonset, statefulset, job, cronjob,
    /// ttl-after-finished, horizontalpodautoscaling, disruption, endpoint, endpointslice,
    /// endpointslicemirroring, garbagecollector, namespace, serviceaccount,
    /// root-ca-cert-publisher, csrsigning, nodelifecycle,
    /// taint-eviction-controller, servicelb, nodeipam, persistentvolume-binder,
    /// local-path-provisioner.
    /// Controllers of Orquestra's own custom resources run only when named, since their CRDs
    /// may not be installed: staticsite.
    #[arg(long, value_delimiter = ',', default_value = "*")]
    pub controllers: Vec<String>,
    /// How long a node's Lease may go unrenewed before the node is Unknown and tainted
    /// unreachable (a Go duration).
    #[arg(long, default_value = "40s", value_parser = duration)]
    pub node_monitor_grace_period: Duration,
    /// How long a node that has never posted its status may stay silent before the same.
    #[arg(long, default_value = "60s", value_parser = duration)]
    pub node_startup_grace_period: Duration,
    /// How often each HorizontalPodAutoscaler is evaluated (kube-controller-manager's
    /// `--horizontal-pod-autoscaler-sync-period`).
    #[arg(long, default_value = "15s", value_parser = duration)]
    pub horizontal_pod_autoscaler_sync_period: Duration,
    /// The range each node's `podCIDR` is allocated from.
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// The prefix length of each node's `podCIDR`.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// Addresses for LoadBalancer Services (repeatable): an IPv4 CIDR (`10.0.0.200/30`) or
    /// range (`10.0.0.200-10.0.0.210`), one address per Service, announced on a node's
    /// interface. Without one, LoadBalancer Services get the Ready nodes' addresses (k3s'
    /// ServiceLB).
    #[arg(long = "service-lb-pool", value_name = "RANGE")]
    pub service_lb_pools: Vec<String>,
    /// The CA certificate (PEM) that signs approved client CertificateSigningRequests
    /// (kube-controller-manager's flag; `orq server`: its own CA). With
    /// `--cluster-signing-key-file`.
    #[arg(long, value_name = "FILE", requires = "cluster_signing_key_file")]
    pub cluster_signing_cert_file: Option<PathBuf>,
    /// The signing CA's private key (PEM).
    #[arg(long, value_name = "FILE", requires = "cluster_signing_cert_file")]
    pub cluster_signing_key_file: Option<PathBuf>,
    /// The cluster CA (PEM) published to every namespace as the ConfigMap `kube-root-ca.crt`.
    /// Default: `orq server`'s own CA; for `orq operator`, the in-cluster service account's
    /// `ca.crt`, else the kubeconfig's CA.
    #[arg(long, value_name = "FILE")]
    pub root_ca_file: Option<PathBuf>,
}

/// Controllers of Orquestra's own custom resources, selected by name only: `staticsite`
/// (examples/static-site; its CRD is crds/example.orquestra.dev_staticsites.yaml).
pub(crate) const CUSTOM: &[Custom] = &[Custom {
    name: "staticsite",
    add: static_site::controller,
    rules: static_site::RULES,
    webhooks: Some(static_site::webhooks),
}];

/// A controller of one of Orquestra's own custom resources.
pub(crate) struct Custom {
    /// The name `--controllers` selects it by.
    pub name: &'static str,
    /// Wires it into a manager (`None`: the manager already runs).
    pub add: fn(&mut Manager) -> Option<()>,
    /// The RBAC rules its requests need.
    pub rules: &'static [orquestra_operator::rbac::Rule],
    /// Its admission webhooks, if it has any: `orq operator --webhook-listen` serves them and
    /// `orq chartgen` writes their configurations into the chart.
    pub webhooks: Option<fn() -> WebhookServer>,
}

impl ControllerArgs {
    /// Whether any control loop is selected.
    pub fn selects_any(&self) -> bool {
        orquestra_controllers::BUILTIN
            .iter()
            .any(|b| orquestra_controllers::enabled(&self.controllers, b.name))
            || self.selects_custom()
    }

    /// Whether a controller of Orquestra's own custom resources is selected.
    pub fn selects_custom(&self) -> bool {
        CUSTOM
            .iter()
            .any(|c| self.controllers.iter().any(|s| s.trim() == c.name))
    }

    /// Adds the selected control loops to `manager`; returns their names. `default_ca` is
    /// the CA to publish when `--root-ca-file` names none.
    pub fn add_to(
        &self,
        manager: &mut Manager,
        default_ca: Option<String>,
    ) -> anyhow::Result<Vec<&'static str>> {
        let custom_name = |item: &String| {
            let name = item.trim().trim_start_matches('-');
            CUSTOM.iter().any(|c| c.name == name)
        };
        let builtin: Vec<String> = self
            .controllers
            .iter()
            .filter(|c| !custom_name(c))
            .cloned()
            .collect();
        let mut settings = self.settings()?;
        if settings.root_ca.is_none() {
            settings.root_ca = default_ca;
        }
        let mut added = orquestra_controllers::add_selected(manager, &builtin, &settings)?;
        for custom in CUSTOM {
            let named = |item: &str| self.controllers.iter().any(|c| c.trim() == item);
            let name = custom.name;
            if named(name) && !named(&format!("-{name}")) {
                (custom.add)(manager).with_context(|| format!("adding the {name} controller"))?;
                added.push(name);
            }
        }
        Ok(added)
    }

    /// The settings the control loops take; an invalid CIDR is an error here, at start.
    pub fn settings(&self) -> anyhow::Result<orquestra_controllers::Settings> {
        let node_ipam = orquestra_controllers::nodes::nodeipam::Config::new(
            &self.cluster_cidr,
            self.node_cidr_mask_size,
        )
        .context("--cluster-cidr/--node-cidr-mask-size")?;
        let root_ca = match &self.root_ca_file {
            Some(file) => Some(
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading --root-ca-file {}", file.display()))?,
            ),
            None => None,
        };
        let service_lb_pool = orquestra_controllers::services::servicelb::Pool::new(
            self.service_lb_pools
                .iter()
                .map(|r| r.parse())
                .collect::<Result<_, _>>()
                .context("--service-lb-pool")?,
        );
        let cluster_signing = match (
            &self.cluster_signing_cert_file,
            &self.cluster_signing_key_file,
        ) {
            (Some(cert), Some(key)) => {
                let read = |file: &PathBuf| {
                    std::fs::read_to_string(file)
                        .with_context(|| format!("reading {}", file.display()))
                };
                Some(orquestra_controllers::cluster::csrsigning::SigningCa {
                    cert_pem: read(cert)?,
                    key_pem: read(key)?,
                })
            }
            _ => None,
        };
        Ok(orquestra_controllers::Settings {
            cluster_signing,
            root_ca,
            node_monitor_grace_period: self.node_monitor_grace_period,
            node_startup_grace_period: self.node_startup_grace_period,
            node_ipam,
            horizontal_pod_autoscaler_sync_period: self.horizontal_pod_autoscaler_sync_period,
            service_lb_pool,
        })
    }
}

/// A positive Go duration (`40s`, `1m30s`).
pub fn duration(text: &str) -> Result<Duration, String> {
    orquestra_apiserver::request::go_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{text:?} is not a positive duration like 40s or 1m30s"))
}

/// Where a pod finds its cluster's CA.
const IN_CLUSTER_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

/// `orq operator` flags.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// The cluster to manage (default: $KUBECONFIG, ~/.kube/config, or the in-cluster
    /// service account).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The cluster's API servers (repeatable, or comma-separated), overriding the
    /// kubeconfig's: with several, the loops dial them through a local load balancer that
    /// fails over between them (the kubeconfig's credentials and CA are used for all).
    #[arg(long, value_delimiter = ',', requires = "kubeconfig")]
    server: Vec<String>,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, default_value = "127.0.0.1:10257")]
    listen: SocketAddr,
    /// Run the loops only while holding the Lease `kube-system/orquestra-operator`, so
    /// several replicas can run (one acts at a time).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Serve the admission webhooks of the selected controllers that have any (staticsite's)
    /// over HTTPS on this address, as controller-runtime's webhook server does; the chart
    /// points its webhook configurations' Service here. Every replica serves, leader or not.
    #[arg(long, value_name = "ADDR", requires = "webhook_cert_dir")]
    webhook_listen: Option<SocketAddr>,
    /// The webhooks' serving certificate: `tls.crt`, `tls.key` and the `ca.crt` that signed
    /// them, in this directory (a mounted `kubernetes.io/tls` Secret, as the chart mounts).
    #[arg(long, value_name = "DIR", requires = "webhook_listen")]
    webhook_cert_dir: Option<PathBuf>,
    #[command(flatten)]
    controllers: ControllerArgs,
}

/// The webhooks of the custom controllers in `added`, on one server; `None` if they have none.
fn webhooks_of(added: &[&str]) -> Option<WebhookServer> {
    CUSTOM
        .iter()
        .filter(|c| added.contains(&c.name))
        .filter_map(|c| c.webhooks)
        .map(|webhooks| webhooks())
        .reduce(WebhookServer::merge)
}

/// Binds `addr` now (so a taken port fails the start) and serves `server` there with the
/// certificate in `dir` on a task of its own.
fn serve_webhooks(
    server: WebhookServer,
    addr: SocketAddr,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let ca = Some(dir.join("ca.crt"))
        .filter(|ca| ca.exists())
        .unwrap_or_else(|| dir.join("tls.crt"));
    let tls = Tls::from_files(&dir.join("tls.crt"), &dir.join("tls.key"), &ca)
        .context("--webhook-cert-dir")?;
    let listener = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("--webhook-listen {addr}"))?;
    tracing::info!(%addr, routes = ?server.routes(), "serving admission webhooks");
    tokio::spawn(async move {
        if let Err(error) = server.serve_on(listener, &tls).await {
            tracing::error!(%error, "the webhook server stopped");
        }
    });
    Ok(())
}

/// Runs the selected control loops until SIGTERM/SIGINT.
pub async fn run(args: OperatorArgs) -> anyhow::Result<()> {
    let client = match &args.kubeconfig {
        Some(path) if !args.server.is_empty() => {
            let config = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
                .await
                .context("loading the kubeconfig")?;
            crate::balancer::client(config, &args.server).await?.0
        }
        Some(path) => crate::agent::client(path).await?,
        None => kube::Client::try_default().await.context(
            "no kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and not in a cluster",
        )?,
    };
    let mut manager = Manager::new(client);
    // The CA to publish: the in-cluster one, else the kubeconfig's.
    let default_ca = std::fs::read_to_string(IN_CLUSTER_CA).ok().or_else(|| {
        args.kubeconfig
            .as_deref()
            .and_then(crate::agent::kubeconfig_ca)
    });
    let added = args.controllers.add_to(&mut manager, default_ca)?;
    anyhow::ensure!(!added.is_empty(), "--controllers selects no control loop");
    if let (Some(addr), Some(dir)) = (args.webhook_listen, &args.webhook_cert_dir) {
        let server = webhooks_of(&added).with_context(|| {
            format!("--webhook-listen: none of the selected controllers ({added:?}) has webhooks")
        })?;
        server.register_metrics(manager.registry())?;
        serve_webhooks(server, addr, dir)?;
    }
    if args.leader_elect {
        // Unique per process, readable in `kubectl get lease`: host and pid.
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "orq".into());
        let identity = format!("{host}_{}", std::process::id());
        manager.leader_election(LeaderElection::new(
            "kube-system",
            "orquestra-operator",
            identity,
        ))?;
    }
    tracing::info!(controllers = ?added, listen = %args.listen, "starting the control loops");
    manager.run(args.listen, std::future::pending()).await?;
    Ok(())
}
