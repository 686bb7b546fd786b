//! The agent: registers the node, watches the pods bound to it, and runs one
//! [`PodWorker`](crate::pod::PodWorker) per pod.
//!
//! Only pods with `spec.nodeName` = this node are watched (a field selector, as the kubelet
//! does). Each pod's worker gets the latest version of its pod through a `watch` channel —
//! intermediate versions are skipped, which is fine because syncs are level-based — and
//! `None` once the pod is gone. After the initial list, pod directories on disk that no
//! listed pod owns are orphans (their pods were deleted while the agent was down): they get
//! a worker that stops and removes them.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{mpsc, watch};

use crate::container::Runtime;
use crate::endpoint::Endpoint;
use crate::events::Events;
use crate::health::{Backoff, Health, Part, retry};
use crate::image::ImageStore;
use crate::metrics::Metrics;
use crate::network::{Cidr, Network, NetworkError};
use crate::node::{Heartbeat, HostInfo, NodeConfig};
use crate::pod::{Next, PodWorker};
use crate::proxy::{ProxyConfig, ProxyMetrics, ServiceProxy};

/// The cluster's DNS domain.
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The pod CIDR used when neither the flag nor the Node's `spec.podCIDR` gives one.
pub const DEFAULT_POD_CIDR: &str = "10.88.0.0/16";

/// A host port a pod's container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    port: i32,
    protocol: String,
    ip: String,
}

impl HostPort {
    fn of(pod: &Pod) -> Vec<HostPort> {
        pod.spec
            .iter()
            .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let port = p.host_port.filter(|h| *h > 0)?;
                Some(HostPort {
                    port,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    ip: p
                        .host_ip
                        .clone()
                        .filter(|ip| !ip.is_empty())
                        .unwrap_or_else(|| "0.0.0.0".into()),
                })
            })
            .collect()
    }

    fn clashes(&self, other: &HostPort) -> bool {
        self.port == other.port
            && self.protocol == other.protocol
            && (self.ip == other.ip || self.ip == "0.0.0.0" || other.ip == "0.0.0.0")
    }
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The Node's name.
    pub node_name: String,
    /// The node's address (`InternalIP`, pods' `hostIP`).
    pub node_ip: String,
    /// Images, pods, logs and runtime state live here.
    pub data_dir: PathBuf,
    /// The shim command: program and the arguments selecting shim mode.
    pub shim: Vec<OsString>,
    /// The pod CIDR; `None` takes the Node's `spec.podCIDR`, else [`DEFAULT_POD_CIDR`].
    pub pod_cidr: Option<String>,
    /// The node bridge's name.
    pub bridge: String,
    /// How often a pod with running containers is re-checked.
    pub sync_period: Duration,
    /// Where the agent's HTTPS endpoint (logs, metrics) listens; port 0 picks one. The
    /// Node's `daemonEndpoints` report the port.
    pub listen: std::net::SocketAddr,
    /// Registries (`host[:port]`) pulled from over plain HTTP besides loopback ones.
    pub insecure_registries: Vec<String>,
    /// Registry mirrors, `REGISTRY=ENDPOINT`, asked before the registry itself.
    pub registry_mirrors: Vec<String>,
    /// The bearer token the endpoint requires (the one the agent uses against the API
    /// server, which presents it when proxying `pods/log`); `None` leaves it open.
    pub endpoint_token: Option<String>,
    /// Program this node for Services and the pod network across nodes (the roles of
    /// kube-proxy and a host-gateway CNI): the node network is set up at start, Services'
    /// cluster IPs and node ports are proxied, other nodes' pod CIDRs routed, and cluster
    /// DNS served on the bridge's address (pods' resolver). Off, the node's network is
    /// touched only once a pod needs it, and pods get the host's resolver configuration.
    pub kube_proxy: bool,
    /// Taints the Node is created with (kubelet's `--register-with-taints`).
    pub register_with_taints: Vec<crate::node::RegisterTaint>,
    /// The cluster CA (PEM) pods get as `ca.crt` beside their service account token.
    pub cluster_ca: Option<String>,
    /// Serve Ingresses of the built-in class on these ports (k3s' Traefik's role), on nodes
    /// that program their network (`kube_proxy`); `None` leaves Ingresses to something else.
    pub ingress: Option<crate::ingress::IngressConfig>,
}

impl AgentConfig {
    /// Defaults for node `node_name` at `node_ip` keeping its state in `data_dir`, running
    /// containers through `shim`.
    pub fn new(
        node_name: impl Into<String>,
        node_ip: impl Into<String>,
        data_dir: impl Into<PathBuf>,
        shim: Vec<OsString>,
    ) -> Self {
        AgentConfig {
            node_name: node_name.into(),
            node_ip: node_ip.into(),
            data_dir: data_dir.into(),
            shim,
            pod_cidr: None,
            bridge: "orq0".into(),
            sync_period: Duration::from_millis(500),
            listen: std::net::SocketAddr::from(([0, 0, 0, 0], 10250)),
            endpoint_token: None,
            insecure_registries: Vec::new(),
            registry_mirrors: Vec::new(),
            kube_proxy: true,
            register_with_taints: Vec::new(),
            cluster_ca: None,
            ingress: None,
        }
    }
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The data dir or image store could not be opened.
    #[error("agent state in {path}: {source}")]
    State {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The image store could not be opened.
    #[error(transparent)]
    Images(#[from] crate::image::ImageError),
    /// The node network could not be set up.
    #[error("setting up the node network: {0}")]
    Network(#[from] NetworkError),
    /// The HTTPS endpoint could not start.
    #[error(transparent)]
    Endpoint(#[from] crate::endpoint::EndpointError),
    /// The metrics could not be registered.
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Cluster DNS could not start (its port taken, say).
    #[error("cluster DNS: {0}")]
    Dns(#[from] crate::dns::DnsError),
    /// The ingress could not start (its metrics or TLS configuration).
    #[error(transparent)]
    Ingress(#[from] crate::ingress::IngressError),
}

/// What every pod worker shares.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The configuration.
    pub config: AgentConfig,
    /// Images.
    pub images: ImageStore,
    /// Runs containers through the shim.
    pub runtime: Runtime,
    /// The pod network.
    pub network: Network,
    /// Publishes the pods' events.
    pub events: Events,
    /// The agent's metrics.
    pub metrics: Metrics,
    /// `(namespace, name)` → UID of the pods bound here, for the log endpoint.
    pods: std::sync::RwLock<HashMap<(String, String), String>>,
    /// UID → the images its containers name, for image garbage collection.
    pod_specs: std::sync::RwLock<HashMap<String, Vec<String>>>,
    /// The host ports of the pods admitted here and not finished, by pod UID.
    host_ports: std::sync::Mutex<HashMap<String, Vec<HostPort>>>,
    /// Set once the node side of the pod network (bridge, NAT) is in place: done on the
    /// first pod that needs it, so a node without pods leaves the host's network alone.
    node_network: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// `DATA/pods`: one directory per pod UID.
    pub fn pods_dir(&self) -> PathBuf {
        self.config.data_dir.join("pods")
    }

    /// The UID of pod `namespace/name` on this node.
    pub fn pod_uid(&self, namespace: &str, name: &str) -> Option<String> {
        self.pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    fn remember(&self, pod: &Pod) {
        if let Some(uid) = pod.uid() {
            let images = pod
                .spec
                .iter()
                .flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers))
                .filter_map(|c| c.image.clone())
                // Image volumes' images are in use too.
                .chain(pod.spec.iter().flat_map(|s| {
                    s.volumes
                        .iter()
                        .flatten()
                        .filter_map(|v| v.image.as_ref()?.reference.clone())
                }))
                .collect();
            self.pod_specs
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(uid.clone(), images);
            self.pods
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert((pod.namespace().unwrap_or_default(), pod.name_any()), uid);
        }
    }

    /// The kubelet's admission of a pod's host ports (its `NodePorts` predicate): a pod
    /// that asks for a port and protocol another admitted pod holds on an overlapping
    /// address (`0.0.0.0` overlaps every address) is rejected with the kubelet's message.
    /// `already_running` pods (admitted before an agent restart) are taken as they are.
    pub fn admit_ports(&self, uid: &str, pod: &Pod, already_running: bool) -> Result<(), String> {
        let wanted = HostPort::of(pod);
        let mut held = self.host_ports.lock().unwrap_or_else(|e| e.into_inner());
        if !already_running
            && let Some(clash) = held
                .iter()
                .filter(|(other, _)| *other != uid)
                .flat_map(|(_, ports)| ports)
                .find(|h| wanted.iter().any(|w| w.clashes(h)))
        {
            tracing::info!(pod = %pod.name_any(), port = clash.port, "rejected: host port taken");
            return Err(
                "Pod was rejected: Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports"
                    .into(),
            );
        }
        if !wanted.is_empty() {
            held.insert(uid.to_owned(), wanted);
        }
        Ok(())
    }

    /// Frees a pod's host ports (it finished or went).
    pub fn release_ports(&self, uid: &str) {
        self.host_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    fn forget(&self, uid: &str) {
        self.release_ports(uid);
        self.pod_specs
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, u| u != uid);
    }

    /// The images the pods bound here name.
    pub fn pod_images(&self) -> HashSet<String> {
        self.pod_specs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    /// `(namespace, pod, container, cgroup path)` of every running container.
    pub fn running_containers(&self) -> Vec<(String, String, String, String)> {
        let pods: Vec<((String, String), String)> = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut out = Vec::new();
        for ((namespace, pod), uid) in pods {
            let containers = self.pods_dir().join(&uid).join("containers");
            for name in fs::read_dir(&containers).into_iter().flatten().flatten() {
                let container = name.file_name().to_string_lossy().into_owned();
                let latest = crate::pod::attempt_numbers(&name.path()).into_iter().max();
                let Some(attempt) = latest else { continue };
                let bundle = name.path().join(attempt.to_string());
                if bundle.join(crate::shim::STARTED).exists()
                    && !bundle.join(crate::shim::EXITED).exists()
                    && let Some(cgroup) = crate::shim::cgroups_path(&bundle)
                {
                    out.push((namespace.clone(), pod.clone(), container, cgroup));
                }
            }
        }
        out
    }

    /// How many pods have a sandbox (a running container, or an address) and how many
    /// containers run, from the runtime's state on disk: what `kubelet_running_pods` and
    /// `kubelet_running_containers` report.
    pub fn running_counts(&self) -> (i64, i64) {
        let (mut pods, mut containers) = (0, 0);
        // Pods holding an address have a sandbox even with no container running.
        let addressed: HashSet<String> = self
            .network
            .allocated()
            .unwrap_or_default()
            .into_iter()
            .map(|(_, uid)| uid)
            .collect();
        for uid in pod_dirs(self) {
            let dir = self.pods_dir().join(&uid).join("containers");
            let mut running = 0;
            for name in fs::read_dir(&dir).into_iter().flatten().flatten() {
                for attempt in fs::read_dir(name.path()).into_iter().flatten().flatten() {
                    if attempt.path().join(crate::shim::STARTED).exists()
                        && !attempt.path().join(crate::shim::EXITED).exists()
                    {
                        running += 1;
                    }
                }
            }
            containers += running;
            if running > 0 || addressed.contains(&uid) {
                pods += 1;
            }
        }
        (pods, containers)
    }

    /// The command that runs an exec probe: the shim's program with `shim-exec`.
    pub fn shim_exec(&self) -> Vec<OsString> {
        let mut cmd: Vec<OsString> = self.config.shim.first().cloned().into_iter().collect();
        cmd.push("shim-exec".into());
        cmd
    }

    /// Sets up the node side of the pod network once.
    pub async fn ensure_node_network(&self) -> Result<(), NetworkError> {
        self.node_network
            .get_or_try_init(|| self.network.ensure_node())
            .await
            .map(|_| ())
    }
}

/// Runs the agent until `shutdown` resolves. Containers keep running after it returns, as
/// they do when a kubelet stops; the next agent re-adopts them.
pub async fn run(
    client: Client,
    config: AgentConfig,
    registry: &prometheus::Registry,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let state = |path: PathBuf| {
        move |source| AgentError::State {
            path: path.clone(),
            source,
        }
    };
    let pods_dir = config.data_dir.join("pods");
    fs::create_dir_all(&pods_dir).map_err(state(pods_dir.clone()))?;
    let images = ImageStore::open(config.data_dir.join("images"))?
        .with_insecure_registries(config.insecure_registries.clone())
        .with_mirrors(&config.registry_mirrors)?;
    let runtime = Runtime {
        shim: config.shim.clone(),
        state_root: config.data_dir.join("run/libcontainer"),
    };
    let names = vec![
        config.node_name.clone(),
        config.node_ip.clone(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    let endpoint = Endpoint::bind(config.listen, &config.data_dir.join("tls"), &names).await?;
    // The heartbeat registers the Node first: its spec.podCIDR may choose the pod network.
    let host = HostInfo::read();
    let mut node = NodeConfig::new(config.node_name.clone(), config.node_ip.clone());
    node.port = endpoint.port();
    node.taints = config.register_with_taints.clone();
    node.manages_network = config.kube_proxy;
    node.serves_ingress = config.kube_proxy && config.ingress.is_some();
    let local_root = crate::volume::local::root(&config.data_dir);
    node.local_path_root = Some(local_root.display().to_string());
    // What of the agent works; the heartbeat shows it on the Node.
    let health = Health::new();
    let heartbeat = Heartbeat::new(client.clone(), node, host).with_health(health.clone());
    let (stop, stopped) = watch::channel(false);
    let mut stop_heartbeat = stopped.clone();
    let heartbeat = tokio::spawn(heartbeat.run(async move {
        let _ = stop_heartbeat.wait_for(|s| *s).await;
    }));
    let cidr = match &config.pod_cidr {
        Some(cidr) => cidr.clone(),
        None => node_pod_cidr(&client, &config.node_name)
            .await
            .unwrap_or_else(|| DEFAULT_POD_CIDR.into()),
    };
    let network = Network::new(
        &config.bridge,
        Cidr::parse(&cidr)?,
        config.data_dir.join("network/ips"),
    );
    let ctx = Arc::new(Context {
        events: Events::new(client.clone(), config.node_name.clone()),
        metrics: Metrics::register(registry)?,
        client: client.clone(),
        config,
        images,
        runtime,
        network,
        node_network: tokio::sync::OnceCell::new(),
        pods: std::sync::RwLock::default(),
        pod_specs: std::sync::RwLock::default(),
        host_ports: std::sync::Mutex::default(),
    });
    registry.register(Box::new(crate::metrics::Running::new(Arc::downgrade(
        &ctx,
    ))?))?;
    let serving = tokio::spawn(endpoint.serve(Arc::clone(&ctx), registry.clone()));
    let services = if ctx.config.kube_proxy {
        let mut tasks = spawn_services(&ctx, registry, &health)?;
        tasks.extend(spawn_network_policy(&ctx, registry, &health)?);
        Some(tasks)
    } else {
        None
    };
    let reclaimer = tokio::spawn(crate::volume::local::reclaim(
        ctx.client.clone(),
        ctx.config.node_name.clone(),
        local_root,
    ));
    tracing::info!(node = %ctx.config.node_name, pod_cidr = %cidr, "node agent running");
    tokio::select! {
        () = dispatch(Arc::clone(&ctx)) => {}
        () = shutdown => {}
    }
    serving.abort();
    reclaimer.abort();
    for task in services.into_iter().flatten() {
        task.abort();
    }
    let _ = stop.send(true);
    let _ = heartbeat.await;
    Ok(())
}

/// Starts what programs the node for Services and other nodes' pods: caches of Services,
/// EndpointSlices and Nodes, the node network (bridge, NAT), then cluster DNS on the
/// bridge's address, the service proxy syncing on any change of the caches, and the routes
/// to other nodes' pod CIDRs syncing on Node changes. Each part that fails (a port taken,
/// a command refused) is retried with back-off and reported to `health`, so the Node says
/// why it is not ready and recovers by itself. Returns the tasks; errors only for what
/// retrying cannot fix (metrics registered twice, a bad cluster domain).
fn spawn_services(
    ctx: &Arc<Context>,
    registry: &prometheus::Registry,
    health: &Health,
) -> Result<Vec<tokio::task::JoinHandle<()>>, AgentError> {
    use tokio::sync::Notify;
    let changed = Arc::new(Notify::new());
    let nodes_changed = Arc::new(Notify::new());
    // The ingress rebuilds its routes on its own notifications (a Notify wakes one waiter).
    let ingress_changed = Arc::new(Notify::new());
    let (services, services_feed) = cache::<Service>(
        &ctx.client,
        vec![Arc::clone(&changed), Arc::clone(&ingress_changed)],
    );
    let (slices, slices_feed) = cache::<EndpointSlice>(
        &ctx.client,
        vec![Arc::clone(&changed), Arc::clone(&ingress_changed)],
    );
    let mut ingress_tasks = Vec::new();
    if let Some(config) = ctx.config.ingress {
        let notify = || vec![Arc::clone(&ingress_changed)];
        let (ingresses, ingresses_feed) = cache::<Ingress>(&ctx.client, notify());
        let (classes, classes_feed) = cache::<IngressClass>(&ctx.client, notify());
        // Only TLS Secrets: the ingress reads nothing else.
        let (secrets, secrets_feed) = cache_of::<Secret>(
            &ctx.client,
            watcher::Config::default().fields("type=kubernetes.io/tls"),
            notify(),
        );
        let ingress = crate::ingress::IngressController::new(
            config,
            crate::ingress::Stores {
                ingresses,
                classes,
                secrets,
                services: services.clone(),
                slices: slices.clone(),
            },
            registry,
        )?;
        ingress_tasks = vec![
            tokio::spawn(ingresses_feed),
            tokio::spawn(classes_feed),
            tokio::spawn(secrets_feed),
            tokio::spawn(ingress.run(Arc::clone(&ingress_changed))),
        ];
    }
    let resolv_conf = fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let dns = crate::dns::ClusterDns::new(
        services.clone(),
        slices.clone(),
        crate::dns::DnsConfig::from_resolv_conf(&resolv_conf, CLUSTER_DOMAIN),
        registry,
    )?;
    let (nodes, nodes_feed) = cache::<Node>(
        &ctx.client,
        vec![Arc::clone(&changed), Arc::clone(&nodes_changed)],
    );
    // This node's pods, for their host ports.
    let (pods, pods_feed) = cache_of::<Pod>(
        &ctx.client,
        watcher::Config::default().fields(&format!("spec.nodeName={}", ctx.config.node_name)),
        vec![Arc::clone(&changed)],
    );
    // Both start once every cache has its first list. One waiter per cache: kube-runtime
    // 5's ready signal wakes only the latest task waiting on it.
    let ready = {
        let (services, slices, nodes, pods) = (
            services.clone(),
            slices.clone(),
            nodes.clone(),
            pods.clone(),
        );
        async move {
            let _ = tokio::join!(
                services.wait_until_ready(),
                slices.wait_until_ready(),
                nodes.wait_until_ready(),
                pods.wait_until_ready()
            );
        }
    };
    let proxy = ServiceProxy::new(
        ProxyConfig {
            node_name: ctx.config.node_name.clone(),
            pod_cidr: ctx.network.cidr,
        },
        services,
        slices,
        nodes.clone(),
        ProxyMetrics::register(registry)?,
    )
    .with_pods(pods)
    .with_health(health.clone());
    let routes = {
        let (ctx, health) = (Arc::clone(ctx), health.clone());
        async move {
            let mut backoff = Backoff::default();
            loop {
                let (cidrs, peers) =
                    crate::proxy::node_cidrs(&nodes.state(), &ctx.config.node_name);
                if let Err(e) = ctx.network.sync_routes(&cidrs, &peers).await {
                    health.failed(Part::Routes, &e);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                backoff.reset();
                health.recovered(Part::Routes);
                tokio::select! {
                    () = nodes_changed.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
            }
        }
    };
    // DNS answers on the bridge's address: it needs the node network first. A server that
    // stops on its own is bound and served again.
    let dns = {
        let (ctx, health) = (Arc::clone(ctx), health.clone());
        let addr = std::net::SocketAddr::from((ctx.network.cidr.gateway(), 53));
        async move {
            loop {
                let bound = retry(&health, Part::ClusterDns, || dns.bind(addr)).await;
                if let Err(e) = bound.serve(std::future::pending()).await {
                    health.failed(Part::ClusterDns, &e);
                    tokio::time::sleep(Backoff::default().next_delay()).await;
                }
            }
        }
    };
    let network = {
        let (ctx, health) = (Arc::clone(ctx), health.clone());
        async move {
            retry(&health, Part::NodeNetwork, || ctx.ensure_node_network()).await;
            ready.await;
            tokio::join!(
                dns,
                proxy.run(changed, Duration::from_secs(30), std::future::pending()),
                routes
            );
        }
    };
    let mut tasks = vec![
        tokio::spawn(services_feed),
        tokio::spawn(slices_feed),
        tokio::spawn(nodes_feed),
        tokio::spawn(pods_feed),
        tokio::spawn(network),
    ];
    tasks.extend(ingress_tasks);
    Ok(tasks)
}

/// Starts NetworkPolicy enforcement ([`crate::network::policy`]) for this node: caches of
/// the policies, of every pod (peers live on every node; the proxy's cache holds only this
/// node's) and of the namespaces (for namespace selectors), then the enforcer syncing on
/// any change once all three are listed. It needs nothing of the node network: a pod's
/// traffic crosses the forward hook whether or not the bridge is up yet.
fn spawn_network_policy(
    ctx: &Arc<Context>,
    registry: &prometheus::Registry,
    health: &Health,
) -> Result<Vec<tokio::task::JoinHandle<()>>, AgentError> {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let changed = Arc::new(tokio::sync::Notify::new());
    let (policies, policies_feed) = cache::<NetworkPolicy>(&ctx.client, vec![Arc::clone(&changed)]);
    let (pods, pods_feed) = cache::<Pod>(&ctx.client, vec![Arc::clone(&changed)]);
    let (namespaces, namespaces_feed) = cache::<Namespace>(&ctx.client, vec![Arc::clone(&changed)]);
    let enforcer = crate::network::policy::PolicyEnforcer::new(
        ctx.config.node_name.clone(),
        policies.clone(),
        pods.clone(),
        namespaces.clone(),
        crate::network::policy::PolicyMetrics::register(registry)?,
    )
    .with_health(health.clone());
    let enforce = async move {
        // Before the first lists an empty pod cache would isolate nobody.
        let _ = tokio::join!(
            policies.wait_until_ready(),
            pods.wait_until_ready(),
            namespaces.wait_until_ready()
        );
        enforcer
            .run(changed, Duration::from_secs(30), std::future::pending())
            .await;
    };
    Ok(vec![
        tokio::spawn(policies_feed),
        tokio::spawn(pods_feed),
        tokio::spawn(namespaces_feed),
        tokio::spawn(enforce),
    ])
}

/// A cache of every `K`, and the future feeding it from a watch, waking `notify` on each
/// change (the service proxy's caches; its benchmark builds them the same way).
pub fn cache<K>(
    client: &Client,
    notify: Vec<Arc<tokio::sync::Notify>>,
) -> (
    kube::runtime::reflector::Store<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    cache_of(client, watcher::Config::default(), notify)
}

/// [`cache`] of the `K`s that `config` selects.
pub fn cache_of<K>(
    client: &Client,
    config: watcher::Config,
    notify: Vec<Arc<tokio::sync::Notify>>,
) -> (
    kube::runtime::reflector::Store<K>,
    impl std::future::Future<Output = ()> + Send + 'static,
)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use kube::runtime::WatchStreamExt;
    let (store, writer) = kube::runtime::reflector::store();
    let api: Api<K> = Api::all(client.clone());
    let stream = kube::runtime::reflector(writer, watcher(api, config).default_backoff());
    let feed = stream.for_each(move |event| {
        if let Err(e) = event {
            tracing::warn!(error = %e, "watch failed; retrying");
        }
        for n in &notify {
            n.notify_one();
        }
        futures::future::ready(())
    });
    (store, feed)
}

/// The Node's `spec.podCIDR`, if node IPAM gives it one. A node registered a moment ago
/// usually has none yet: wait up to 3 s for the allocation (node IPAM answers within
/// milliseconds when it runs) before falling back to the default range.
async fn node_pod_cidr(client: &Client, name: &str) -> Option<String> {
    let nodes: Api<Node> = Api::all(client.clone());
    for _ in 0..30 {
        if let Ok(Some(node)) = nodes.get_opt(name).await
            && let Some(cidr) = node.spec.and_then(|s| s.pod_cidr)
        {
            return Some(cidr);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

struct WorkerHandle {
    tx: watch::Sender<Option<Arc<Pod>>>,
}

/// Watches this node's pods and feeds their workers.
async fn dispatch(ctx: Arc<Context>) {
    let pods: Api<Pod> = Api::all(ctx.client.clone());
    let selector = format!("spec.nodeName={}", ctx.config.node_name);
    let mut events = watcher(pods, watcher::Config::default().fields(&selector)).boxed();
    let mut workers: HashMap<String, WorkerHandle> = HashMap::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<String>();
    let mut listing: Option<HashSet<String>> = None;
    let mut image_gc = tokio::time::interval(Duration::from_secs(300));
    loop {
        tokio::select! {
            Some(uid) = done_rx.recv() => {
                workers.remove(&uid);
                ctx.forget(&uid);
                ctx.events.forget(&uid);
            }
            _ = image_gc.tick() => collect_images(&ctx).await,
            event = events.next() => {
                let Some(event) = event else { return };
                match event {
                    Ok(watcher::Event::Init) => listing = Some(HashSet::new()),
                    Ok(watcher::Event::InitApply(pod)) => {
                        if let (Some(seen), Some(uid)) = (listing.as_mut(), pod.uid()) {
                            seen.insert(uid);
                        }
                        feed(&ctx, &mut workers, &done_tx, pod);
                    }
                    Ok(watcher::Event::Apply(pod)) => feed(&ctx, &mut workers, &done_tx, pod),
                    Ok(watcher::Event::Delete(pod)) => {
                        if let Some(w) = pod.uid().and_then(|uid| workers.get(&uid)) {
                            let _ = w.tx.send(None);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        let seen = listing.take().unwrap_or_default();
                        // Pods deleted while the watch was down.
                        for (uid, w) in &workers {
                            if !seen.contains(uid) {
                                let _ = w.tx.send(None);
                            }
                        }
                        // Orphans on disk: pods deleted while the agent was down.
                        for uid in pod_dirs(&ctx) {
                            if !seen.contains(&uid) && !workers.contains_key(&uid) {
                                tracing::info!(%uid, "cleaning up an orphaned pod");
                                spawn(&ctx, &mut workers, &done_tx, uid, None);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pod watch failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    }
}

fn feed(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, WorkerHandle>,
    done: &mpsc::UnboundedSender<String>,
    pod: Pod,
) {
    let Some(uid) = pod.uid() else { return };
    ctx.remember(&pod);
    let pod = Arc::new(pod);
    match workers.get(&uid) {
        Some(w) => {
            let _ = w.tx.send(Some(pod));
        }
        None => spawn(ctx, workers, done, uid, Some(pod)),
    }
}

fn spawn(
    ctx: &Arc<Context>,
    workers: &mut HashMap<String, WorkerHandle>,
    done: &mpsc::UnboundedSender<String>,
    uid: String,
    pod: Option<Arc<Pod>>,
) {
    let (tx, mut rx) = watch::channel(pod);
    workers.insert(uid.clone(), WorkerHandle { tx });
    let (ctx, done) = (Arc::clone(ctx), done.clone());
    tokio::spawn(async move {
        let mut worker = PodWorker::new(Arc::clone(&ctx), &uid);
        worker.watch_updates(rx.clone());
        loop {
            let pod = rx.borrow_and_update().clone();
            let begun = Instant::now();
            let next = worker.sync(pod.as_deref()).await;
            ctx.metrics.pod_worker(begun.elapsed());
            match next {
                Next::Done => break,
                Next::After(delay) => {
                    tokio::select! {
                        changed = rx.changed() => if changed.is_err() { break },
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        let _ = done.send(uid);
    });
}

/// Image garbage collection at the kubelet's default thresholds (85 % → 80 %), keeping
/// every image a pod on this node names.
async fn collect_images(ctx: &Arc<Context>) {
    let in_use: HashSet<String> = ctx.pod_images();
    let ctx = Arc::clone(ctx);
    let removed =
        tokio::task::spawn_blocking(move || ctx.images.collect_garbage(&in_use, 0.85, 0.80)).await;
    match removed {
        Ok(Ok(removed)) if !removed.is_empty() => {
            tracing::info!(?removed, "image garbage collection freed disk space");
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "image garbage collection failed"),
        _ => {}
    }
}

/// UIDs of the pods with a directory on disk.
fn pod_dirs(ctx: &Context) -> Vec<String> {
    fs::read_dir(ctx.pods_dir())
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Stops every container under `data_dir` (SIGKILL), unmounts and removes the pods' state
/// and network — `orq agent cleanup`, for tests and for taking a node out of service.
pub async fn cleanup(data_dir: &std::path::Path, network: Option<&Network>) -> std::io::Result<()> {
    let pods = data_dir.join("pods");
    for entry in fs::read_dir(&pods).into_iter().flatten().flatten() {
        let uid = entry.file_name().to_string_lossy().into_owned();
        for name in fs::read_dir(entry.path().join("containers"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for attempt in fs::read_dir(name.path()).into_iter().flatten().flatten() {
                let _ =
                    crate::container::signal(&attempt.path(), nix::sys::signal::Signal::SIGKILL);
            }
        }
        // Give the shims a moment to reap and record.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && fs::read_dir(entry.path().join("containers"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|name| {
                    fs::read_dir(name.path())
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|a| {
                            matches!(
                                crate::container::state(&a.path()),
                                crate::container::ContainerState::Running(_)
                            )
                        })
                })
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(network) = network {
            let _ = network.teardown_pod(&uid).await;
        }
        crate::pod::remove_pod_cgroups(&uid);
        crate::pod::remove_pod_dir(&entry.path())?;
    }
    if let Some(network) = network {
        let _ = network.remove_node().await;
        let _ = crate::proxy::cleanup().await;
        let _ = crate::network::policy::cleanup().await;
    }
    Ok(())
}
