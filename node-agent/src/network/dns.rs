//! The cluster DNS server (the role CoreDNS plays with its `kubernetes` and `forward` plugins).
//!
//! It answers names under the cluster domain from the reflector stores of Services and
//! EndpointSlices that the agent keeps for its service proxy, and forwards every other name to
//! the node's upstream resolvers. It owns no watch of its own and never writes to the API.
//!
//! ```text
//! SVC.NS.svc.DOMAIN                  A/AAAA  the ClusterIPs; for a headless Service the ready
//!                                            endpoint addresses; ExternalName: CNAME
//!                                    SRV     one per port (per ready endpoint if headless)
//! _PORT._PROTO.SVC.NS.svc.DOMAIN     SRV     0 100 PORT SVC.NS.svc.DOMAIN. (headless: one per
//!                                            ready endpoint, target HOST.SVC.NS.svc.DOMAIN.)
//! HOST.SVC.NS.svc.DOMAIN             A/AAAA  that endpoint of a headless Service; HOST is its
//!                                            `hostname`, else its IP with dashes
//! A-B-C-D.NS.pod.DOMAIN              A       A.B.C.D (IPv6 with dashes for colons: AAAA)
//! D.C.B.A.in-addr.arpa (and ip6.arpa) PTR    SVC.NS.svc.DOMAIN for a ClusterIP, and
//!                                            HOST.SVC.NS.svc.DOMAIN for a headless Service's
//!                                            ready endpoint; any other address is forwarded
//! ```
//!
//! Answers under the domain are authoritative: a name that doesn't exist is NXDOMAIN, a type a
//! name doesn't have is NODATA, both with the zone's SOA in the authority section. Names under
//! the domain are never forwarded, so the search-path expansions of external names that every
//! pod's resolver tries first (`example.com.default.svc.cluster.local`) end here, quickly.
//!
//! Forwarded answers are cached for their TTL, at most 30 s (CoreDNS' `cache 30`), negative
//! ones for their SOA's minimum: a pod's resolver asks for the same external names again and
//! again, each through its search path.
//!
//! Serving is hickory-server's (UDP and TCP on one port; it answers FORMERR to a request it
//! can't parse past the header and drops anything shorter); this module is its
//! [`RequestHandler`]. hickory logs every request at `info` under the `hickory_server`
//! target, so an agent's log filter wants `hickory_server=warn`.
//!
//! ```no_run
//! # async fn demo(
//! #     services: kube::runtime::reflector::Store<k8s_openapi::api::core::v1::Service>,
//! #     slices: kube::runtime::reflector::Store<k8s_openapi::api::discovery::v1::EndpointSlice>,
//! # ) -> Result<(), orquestra_node_agent::dns::DnsError> {
//! use orquestra_node_agent::dns::{ClusterDns, DnsConfig};
//!
//! let resolv_conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
//! let config = DnsConfig::from_resolv_conf(&resolv_conf, "cluster.local");
//! let dns = ClusterDns::new(services, slices, config, &prometheus::Registry::new())?;
//! let bound = dns.bind("10.43.0.10:53".parse().expect("an address")).await?;
//! bound.serve(std::future::pending()).await?;
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::net::tcp::TcpClientStream;
use hickory_server::net::udp::UdpClientStream;
use hickory_server::net::xfer::{DnsExchange, FirstAnswer, Protocol};
use hickory_server::net::{DnsHandle, NetError};
use hickory_server::proto::ProtoError;
use hickory_server::proto::op::{
    DnsRequest, DnsRequestOptions, Edns, Header, HeaderCounts, Message, Metadata, OpCode, Query,
    ResponseCode,
};
use hickory_server::proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_server::proto::rr::{DNSClass, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use tokio::net::{TcpListener, UdpSocket};

/// How long one upstream gets to answer before the next one is tried.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a TCP client may stay idle between queries.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Responses queued per TCP connection.
const TCP_RESPONSE_BUFFER: usize = 32;
/// CNAMEs followed inside the zone (ExternalName pointing at another Service) before giving up.
const MAX_CNAME_CHAIN: usize = 8;
/// The longest a forwarded answer is kept (CoreDNS' `cache 30`).
const CACHE_MAX_TTL: u32 = 30;
/// Forwarded answers kept at most; when full, expired ones go first, then everything.
const CACHE_ENTRIES: usize = 10_000;
/// The label that ties an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the server serves and where it forwards.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// The cluster domain, e.g. `cluster.local` (a trailing dot is optional).
    pub cluster_domain: String,
    /// Resolvers for every name outside the cluster domain, tried in order.
    pub upstreams: Vec<SocketAddr>,
    /// TTL of the answers under the cluster domain. Short, since they follow the stores.
    pub ttl: u32,
}

impl DnsConfig {
    /// No upstreams, and CoreDNS' default TTL of 5 seconds.
    pub fn new(cluster_domain: &str) -> DnsConfig {
        DnsConfig {
            cluster_domain: cluster_domain.to_owned(),
            upstreams: Vec::new(),
            ttl: 5,
        }
    }

    /// The `nameserver` lines of a resolv.conf (the node's) as upstreams on port 53, in order;
    /// lines that aren't an IP address (an IPv6 one with a zone) are skipped.
    pub fn from_resolv_conf(text: &str, cluster_domain: &str) -> DnsConfig {
        let upstreams = text
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                match (words.next(), words.next()) {
                    (Some("nameserver"), Some(address)) => address.parse::<IpAddr>().ok(),
                    _ => None,
                }
            })
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        DnsConfig {
            upstreams,
            ..DnsConfig::new(cluster_domain)
        }
    }
}

/// Why the DNS server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The cluster domain is not a DNS name.
    #[error("cluster domain {domain:?}: {source}")]
    Domain {
        /// The domain as configured.
        domain: String,
        /// Why it doesn't parse.
        #[source]
        source: ProtoError,
    },
    /// The metrics could not be registered (e.g. a second server on the same registry).
    #[error("registering the DNS metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// A socket could not be bound (the address is in use, or not ours).
    #[error("{}", bind_message(protocol, addr, source))]
    Bind {
        /// `udp` or `tcp`.
        protocol: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: std::io::Error,
    },
    /// A listener stopped on its own.
    #[error("the DNS server stopped: {0}")]
    Serve(#[source] NetError),
}

/// A bind failure in plain words: "10.244.0.1:53 is in use by another process (udp)".
fn bind_message(protocol: &str, addr: &SocketAddr, error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::AddrInUse => {
            format!("{addr} is in use by another process ({protocol})")
        }
        std::io::ErrorKind::AddrNotAvailable => {
            format!("{addr} is not an address of this host ({protocol})")
        }
        _ => format!("binding {addr} ({protocol}): {error}"),
    }
}

/// The cluster DNS server, configured but not yet listening.
#[derive(Debug)]
pub struct ClusterDns {
    zone: Zone,
    upstreams: Vec<SocketAddr>,
    metrics: Metrics,
}

impl ClusterDns {
    /// A server answering from `services` and `slices` (stores kept by the caller's
    /// reflectors), with its metrics registered on `registry`.
    pub fn new(
        services: Store<Service>,
        slices: Store<EndpointSlice>,
        config: DnsConfig,
        registry: &Registry,
    ) -> Result<ClusterDns, DnsError> {
        let zone = Zone::new(services, slices, &config.cluster_domain, config.ttl)?;
        Ok(ClusterDns {
            zone,
            upstreams: config.upstreams,
            metrics: Metrics::register(registry)?,
        })
    }

    /// Binds UDP and TCP on `addr`, on the same port: with port 0, UDP picks one and TCP
    /// follows it. Can be retried after a failure (the address taken, say).
    pub async fn bind(&self, addr: SocketAddr) -> Result<BoundDns, DnsError> {
        let (udp, tcp) = bind_pair(addr).await?;
        let local_addr = udp.local_addr().map_err(|source| DnsError::Bind {
            protocol: "udp",
            addr,
            source,
        })?;
        // The forwarder spawns its background task here, inside the runtime.
        let forwarder = Forwarder::new(&self.upstreams, self.metrics.clone());
        Ok(BoundDns {
            handler: Handler {
                zone: self.zone.clone(),
                forwarder,
                metrics: self.metrics.clone(),
            },
            udp,
            tcp,
            local_addr,
        })
    }
}

/// Binds UDP on `addr`, then TCP on the port UDP got. With port 0 that port may be taken for
/// TCP, so a few fresh ports are tried.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_error = |protocol, source| DnsError::Bind {
        protocol,
        addr,
        source,
    };
    let mut attempts = if addr.port() == 0 { 8 } else { 1 };
    loop {
        let udp = UdpSocket::bind(addr)
            .await
            .map_err(|e| bind_error("udp", e))?;
        let bound = udp.local_addr().map_err(|e| bind_error("udp", e))?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if attempts > 1 && e.kind() == std::io::ErrorKind::AddrInUse => attempts -= 1,
            Err(e) => return Err(bind_error("tcp", e)),
        }
    }
}

/// The server with its sockets bound, not yet answering (queries wait in the sockets).
#[derive(Debug)]
pub struct BoundDns {
    handler: Handler,
    udp: UdpSocket,
    tcp: TcpListener,
    local_addr: SocketAddr,
}

impl BoundDns {
    /// Where the server listens, over both UDP and TCP.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Answers until `shutdown` completes, then stops accepting and waits for the listeners.
    /// Returns early with an error only if a listener dies on its own.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), DnsError> {
        let mut server = hickory_server::Server::new(self.handler);
        server.register_socket(self.udp);
        server.register_listener(self.tcp, TCP_IDLE_TIMEOUT, TCP_RESPONSE_BUFFER);
        tokio::select! {
            () = shutdown => {}
            stopped = server.block_until_done() => return stopped.map_err(DnsError::Serve),
        }
        server.shutdown_gracefully().await.map_err(DnsError::Serve)
    }
}

/// Answers each request: from the zone if the name is under the cluster domain, otherwise
/// from an upstream.
#[derive(Debug)]
struct Handler {
    zone: Zone,
    forwarder: Forwarder,
    metrics: Metrics,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let qtype = request
            .queries
            .queries()
            .first()
            .map(|q| type_label(q.query_type()))
            .unwrap_or("other");
        let info = self.respond(request, response_handle).await;
        self.metrics
            .observe(request.protocol(), qtype, info.response_code, started);
        info
    }
}

impl Handler {
    async fn respond<R: ResponseHandler>(&self, request: &Request, handle: R) -> ResponseInfo {
        // A request with EDNS gets EDNS back, else the client's buffer size is unknown to it.
        let edns = request.edns.as_ref().map(|requested| {
            let mut edns = Edns::new();
            edns.set_max_payload(requested.max_payload().max(512));
            edns.set_version(0);
            edns
        });
        let reply = Reply {
            request,
            edns: edns.as_ref(),
            handle,
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return reply.error(ResponseCode::BADVERS).await;
        }
        if request.metadata.op_code != OpCode::Query {
            return reply.error(ResponseCode::NotImp).await;
        }
        let Ok(info) = request.request_info() else {
            // Not exactly one question.
            return reply.error(ResponseCode::FormErr).await;
        };
        let query = info.query.original();
        if let Some(answer) = self.zone.reverse(query.name(), query.query_type()) {
            // A cluster address: the reverse zones' fallthrough (CoreDNS' `in-addr.arpa
            // ip6.arpa` with `fallthrough`) forwards every other one.
            return reply.authoritative(answer).await;
        }
        if self.zone.contains(query.name()) {
            if query.query_class() != DNSClass::IN {
                return reply.error(ResponseCode::Refused).await;
            }
            let mut answer = self.zone.answer(query.name(), query.query_type());
            if let Some(target) = answer.external.take() {
                // An ExternalName: resolve its target too, as CoreDNS does, since stub
                // resolvers don't chase a CNAME that comes without addresses.
                let chased = Query::query(target, query.query_type());
                if let Some(upstream) = self.forward(request, chased).await {
                    if upstream.metadata.response_code == ResponseCode::NoError {
                        answer.answers.extend(upstream.answers);
                    }
                }
            }
            return reply.authoritative(answer).await;
        }
        match self.forward(request, query.clone()).await {
            Some(upstream) => reply.forwarded(upstream).await,
            None => reply.error(ResponseCode::ServFail).await,
        }
    }

    async fn forward(&self, request: &Request, query: Query) -> Option<Message> {
        let mut options = DnsRequestOptions::default();
        options.recursion_desired = request.metadata.recursion_desired;
        options.edns_set_dnssec_ok = request.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok);
        self.forwarder
            .forward(query, options, request.protocol().is_stream())
            .await
    }
}

/// One response being put together for a request.
struct Reply<'q, R> {
    request: &'q Request,
    edns: Option<&'q Edns>,
    handle: R,
}

impl<R: ResponseHandler> Reply<'_, R> {
    fn metadata(&self, response_code: ResponseCode) -> Metadata {
        let mut metadata = Metadata::response_from_request(&self.request.metadata);
        metadata.recursion_available = true;
        metadata.response_code = response_code;
        metadata
    }

    async fn error(self, response_code: ResponseCode) -> ResponseInfo {
        let metadata = self.metadata(response_code);
        self.send(metadata, &[], &[], &[]).await
    }

    async fn authoritative(self, answer: ZoneAnswer) -> ResponseInfo {
        let mut metadata = self.metadata(answer.rcode);
        metadata.authoritative = true;
        self.send(
            metadata,
            &answer.answers,
            &answer.authority,
            &answer.additionals,
        )
        .await
    }

    /// The upstream's answer under the client's id and question.
    async fn forwarded(self, upstream: Message) -> ResponseInfo {
        let mut metadata = self.metadata(upstream.metadata.response_code);
        metadata.authoritative = upstream.metadata.authoritative;
        metadata.authentic_data = upstream.metadata.authentic_data;
        metadata.recursion_available = upstream.metadata.recursion_available;
        self.send(
            metadata,
            &upstream.answers,
            &upstream.authorities,
            &upstream.additionals,
        )
        .await
    }

    async fn send(
        mut self,
        metadata: Metadata,
        answers: &[Record],
        authorities: &[Record],
        additionals: &[Record],
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::new(&self.request.queries, self.edns);
        // Over UDP the encoder truncates to the client's buffer and sets TC.
        let response = builder.build(metadata, answers, authorities, [], additionals);
        match self.handle.send_response(response).await {
            Ok(info) => info,
            Err(error) => {
                tracing::debug!(%error, src = %self.request.src(), "sending a DNS response");
                let mut metadata = metadata;
                metadata.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata,
                    counts: HeaderCounts::default(),
                })
            }
        }
    }
}

/// The cluster zone: the names under the cluster domain, read from the stores per query.
#[derive(Clone, Debug)]
struct Zone {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// Lower case, fully qualified.
    domain: Name,
    ttl: u32,
    soa: Record,
}

/// What the zone holds at one name.
#[derive(Debug, PartialEq)]
enum Node {
    /// Nothing: NXDOMAIN.
    Missing,
    /// The name exists, with these records (none for an empty non-terminal such as
    /// `svc.DOMAIN`) and the address records of the SRV targets among them.
    Exists {
        records: Vec<Record>,
        glue: Vec<Record>,
    },
}

impl Node {
    fn empty() -> Node {
        Node::Exists {
            records: Vec::new(),
            glue: Vec::new(),
        }
    }
}

/// The zone's answer to one question.
#[derive(Debug)]
struct ZoneAnswer {
    rcode: ResponseCode,
    answers: Vec<Record>,
    /// The SOA, when there are no answers (NXDOMAIN or NODATA), so resolvers cache the
    /// negative answer for its minimum TTL.
    authority: Vec<Record>,
    additionals: Vec<Record>,
    /// The target of an ExternalName outside the zone, for an A or AAAA question: the
    /// forwarder adds its addresses.
    external: Option<Name>,
}

impl Zone {
    fn new(
        services: Store<Service>,
        slices: Store<EndpointSlice>,
        cluster_domain: &str,
        ttl: u32,
    ) -> Result<Zone, DnsError> {
        let invalid = |source| DnsError::Domain {
            domain: cluster_domain.to_owned(),
            source,
        };
        let domain = Name::from_ascii(cluster_domain)
            .and_then(|name| name.append_domain(&Name::root()))
            .map_err(invalid)?
            .to_lowercase();
        if domain.is_root() {
            // The whole namespace would be "the cluster": nothing would ever be forwarded.
            return Err(invalid(ProtoError::from("the cluster domain is empty")));
        }
        let mname = Name::from_ascii("ns.dns")
            .and_then(|n| n.append_domain(&domain))
            .map_err(invalid)?;
        let rname = Name::from_ascii("hostmaster")
            .and_then(|n| n.append_domain(&domain))
            .map_err(invalid)?;
        // CoreDNS' values; the serial only has to be stable, nothing transfers this zone.
        let soa = SOA::new(mname, rname, 1, 7200, 1800, 86400, ttl);
        let soa = Record::from_rdata(domain.clone(), ttl, RData::SOA(soa));
        Ok(Zone {
            services,
            slices,
            domain,
            ttl,
            soa,
        })
    }

    fn contains(&self, name: &Name) -> bool {
        self.domain.zone_of(name)
    }

    /// The answer to `qtype` at `name` (a name in the zone), following CNAMEs inside it.
    fn answer(&self, name: &Name, qtype: RecordType) -> ZoneAnswer {
        let mut answer = ZoneAnswer {
            rcode: ResponseCode::NoError,
            answers: Vec::new(),
            authority: Vec::new(),
            additionals: Vec::new(),
            external: None,
        };
        let mut owner = name.clone();
        for _ in 0..MAX_CNAME_CHAIN {
            let (records, glue) = match self.lookup(&owner) {
                Node::Missing => {
                    answer.rcode = ResponseCode::NXDomain;
                    break;
                }
                Node::Exists { records, glue } => (records, glue),
            };
            let cname = records.iter().find_map(|r| match &r.data {
                RData::CNAME(CNAME(target)) => Some((r, target.clone())),
                _ => None,
            });
            if let Some((record, target)) = cname {
                if !matches!(qtype, RecordType::CNAME | RecordType::ANY) {
                    answer.answers.push(record.clone());
                    if self.contains(&target) {
                        owner = target;
                        continue;
                    }
                    if matches!(qtype, RecordType::A | RecordType::AAAA) {
                        answer.external = Some(target);
                    }
                    break;
                }
            }
            let before = answer.answers.len();
            answer.answers.extend(
                records
                    .into_iter()
                    .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype),
            );
            if answer.answers[before..]
                .iter()
                .any(|r| r.record_type() == RecordType::SRV)
            {
                answer.additionals = glue;
            }
            break;
        }
        if answer.answers.is_empty() || answer.rcode == ResponseCode::NXDomain {
            answer.authority.push(self.soa.clone());
        }
        answer
    }

    /// The answer to a PTR (or ANY) question for a cluster address: a Service's ClusterIP, or
    /// a ready endpoint of a headless Service. `None` for any other question or address, which
    /// is the upstream's to answer.
    fn reverse(&self, name: &Name, qtype: RecordType) -> Option<ZoneAnswer> {
        if !matches!(qtype, RecordType::PTR | RecordType::ANY) {
            return None;
        }
        let net = name.parse_arpa_name().ok()?;
        if net.prefix_len() != net.max_prefix_len() {
            return None;
        }
        let ip = net.addr();
        let mut targets: Vec<Name> = Vec::new();
        for service in self.services.state() {
            let (Some(namespace), Some(service_name)) =
                (service.namespace(), service.metadata.name.as_deref())
            else {
                continue;
            };
            match Kind::of(&service) {
                Kind::ClusterIp(ips) if ips.contains(&ip) => {
                    targets.extend(self.service_name(&namespace, service_name));
                }
                Kind::Headless => {
                    for backend in self.backends(&namespace, service_name) {
                        if backend.ip == ip {
                            targets.extend(self.endpoint_name(
                                &backend.host,
                                &namespace,
                                service_name,
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        targets.sort();
        targets.dedup();
        if targets.is_empty() {
            return None;
        }
        Some(ZoneAnswer {
            rcode: ResponseCode::NoError,
            answers: targets
                .into_iter()
                .map(|target| Record::from_rdata(name.clone(), self.ttl, RData::PTR(PTR(target))))
                .collect(),
            authority: Vec::new(),
            additionals: Vec::new(),
            external: None,
        })
    }

    /// What exists at `name`, a name in the zone.
    fn lookup(&self, name: &Name) -> Node {
        let depth = usize::from(name.num_labels().saturating_sub(self.domain.num_labels()));
        let labels: Vec<String> = name
            .iter()
            .take(depth)
            .map(|label| String::from_utf8_lossy(label).to_ascii_lowercase())
            .collect();
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        match labels.as_slice() {
            [] => Node::Exists {
                records: vec![self.soa.clone()],
                glue: Vec::new(),
            },
            ["svc" | "pod"] => Node::empty(),
            [namespace, "svc"] => {
                // Without a Namespace store, a namespace exists while it has a Service.
                let known = self
                    .services
                    .find(|s| s.namespace().as_deref() == Some(*namespace))
                    .is_some();
                if known { Node::empty() } else { Node::Missing }
            }
            [service, namespace, "svc"] => self.service(name, namespace, service),
            [host, service, namespace, "svc"] => self.endpoint(name, namespace, service, host),
            [port, protocol, service, namespace, "svc"] => {
                match (port.strip_prefix('_'), protocol.strip_prefix('_')) {
                    (Some(port), Some(protocol)) if !port.is_empty() => {
                        self.named_port(name, namespace, service, port, protocol)
                    }
                    _ => Node::Missing,
                }
            }
            [_namespace, "pod"] => Node::empty(),
            [address, _namespace, "pod"] => match undash(address) {
                Some(ip) => Node::Exists {
                    records: vec![self.address(name, ip)],
                    glue: Vec::new(),
                },
                None => Node::Missing,
            },
            _ => Node::Missing,
        }
    }

    /// `SVC.NS.svc.DOMAIN`.
    fn service(&self, owner: &Name, namespace: &str, name: &str) -> Node {
        let Some(service) = self.service_object(namespace, name) else {
            return Node::Missing;
        };
        let mut records = Vec::new();
        let mut glue = Vec::new();
        match Kind::of(&service) {
            Kind::ExternalName(target) => {
                if let Some(target) = fqdn(&target) {
                    records.push(Record::from_rdata(
                        owner.clone(),
                        self.ttl,
                        RData::CNAME(CNAME(target)),
                    ));
                }
            }
            Kind::Headless => {
                let backends = self.backends(namespace, name);
                let mut seen = HashSet::new();
                for backend in &backends {
                    if seen.insert(backend.ip) {
                        records.push(self.address(owner, backend.ip));
                    }
                }
                for (target, port, ip) in self.backend_ports(&backends, namespace, name, None) {
                    records.push(self.srv(owner, port, target.clone()));
                    glue.push(self.address(&target, ip));
                }
            }
            Kind::ClusterIp(ips) => {
                records.extend(ips.iter().map(|ip| self.address(owner, *ip)));
                if let Some(target) = self.service_name(namespace, name) {
                    for port in service_ports(&service) {
                        records.push(self.srv(owner, port.port, target.clone()));
                    }
                    glue.extend(ips.iter().map(|ip| self.address(&target, *ip)));
                }
            }
        }
        Node::Exists { records, glue }
    }

    /// `HOST.SVC.NS.svc.DOMAIN`: one endpoint of a headless Service.
    fn endpoint(&self, owner: &Name, namespace: &str, service: &str, host: &str) -> Node {
        let Some(object) = self.service_object(namespace, service) else {
            return Node::Missing;
        };
        if !matches!(Kind::of(&object), Kind::Headless) {
            return Node::Missing;
        }
        let mut seen = HashSet::new();
        let records: Vec<Record> = self
            .backends(namespace, service)
            .iter()
            .filter(|b| b.host == host && seen.insert(b.ip))
            .map(|b| self.address(owner, b.ip))
            .collect();
        if records.is_empty() {
            return Node::Missing;
        }
        Node::Exists {
            records,
            glue: Vec::new(),
        }
    }

    /// `_PORT._PROTO.SVC.NS.svc.DOMAIN`.
    fn named_port(
        &self,
        owner: &Name,
        namespace: &str,
        service: &str,
        port: &str,
        protocol: &str,
    ) -> Node {
        let Some(object) = self.service_object(namespace, service) else {
            return Node::Missing;
        };
        let wanted = NamedPort { port, protocol };
        let declared: Vec<ServicePort> = service_ports(&object)
            .into_iter()
            .filter(|p| wanted.matches(p.name.as_deref(), &p.protocol))
            .collect();
        if declared.is_empty() {
            return Node::Missing;
        }
        let mut records = Vec::new();
        let mut glue = Vec::new();
        match Kind::of(&object) {
            Kind::ExternalName(_) => return Node::Missing,
            Kind::Headless => {
                let backends = self.backends(namespace, service);
                for (target, port, ip) in
                    self.backend_ports(&backends, namespace, service, Some(&wanted))
                {
                    records.push(self.srv(owner, port, target.clone()));
                    glue.push(self.address(&target, ip));
                }
            }
            Kind::ClusterIp(ips) => {
                if let Some(target) = self.service_name(namespace, service) {
                    for port in &declared {
                        records.push(self.srv(owner, port.port, target.clone()));
                    }
                    glue.extend(ips.iter().map(|ip| self.address(&target, *ip)));
                }
            }
        }
        Node::Exists { records, glue }
    }

    fn service_object(&self, namespace: &str, name: &str) -> Option<Arc<Service>> {
        self.services.get(&ObjectRef::new(name).within(namespace))
    }

    /// The ready endpoints of a Service, from all its slices.
    fn backends(&self, namespace: &str, service: &str) -> Vec<Backend> {
        let slices = self.slices.state_filter(|slice| {
            slice.namespace().as_deref() == Some(namespace)
                && slice.labels().get(SERVICE_NAME_LABEL).map(String::as_str) == Some(service)
        });
        let mut backends = Vec::new();
        for slice in slices {
            let ports: Vec<ServicePort> = slice
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    Some(ServicePort {
                        name: p.name.clone(),
                        protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                        port: u16::try_from(p.port?).ok()?,
                    })
                })
                .collect();
            for endpoint in slice.endpoints.iter().flatten() {
                let ready = endpoint.conditions.as_ref().and_then(|c| c.ready) != Some(false);
                if !ready {
                    continue;
                }
                for address in &endpoint.addresses {
                    // FQDN slices and garbage addresses have nothing to answer with.
                    let Ok(ip) = address.parse::<IpAddr>() else {
                        continue;
                    };
                    let host = match &endpoint.hostname {
                        Some(hostname) => hostname.to_ascii_lowercase(),
                        None => dash(ip),
                    };
                    backends.push(Backend {
                        host,
                        ip,
                        ports: ports.clone(),
                    });
                }
            }
        }
        backends
    }

    /// (target name, port, address) per backend and port (those matching `wanted`, if given),
    /// without duplicates.
    fn backend_ports(
        &self,
        backends: &[Backend],
        namespace: &str,
        service: &str,
        wanted: Option<&NamedPort<'_>>,
    ) -> Vec<(Name, u16, IpAddr)> {
        let mut seen = HashSet::new();
        let mut out = Vec::new();
        for backend in backends {
            let Some(target) = self.endpoint_name(&backend.host, namespace, service) else {
                continue;
            };
            for port in &backend.ports {
                if wanted.is_some_and(|w| !w.matches(port.name.as_deref(), &port.protocol)) {
                    continue;
                }
                if seen.insert((target.clone(), port.port)) {
                    out.push((target.clone(), port.port, backend.ip));
                }
            }
        }
        out
    }

    /// `SVC.NS.svc.DOMAIN.`, the target of its SRV records.
    fn service_name(&self, namespace: &str, service: &str) -> Option<Name> {
        Name::from_ascii(format!("{service}.{namespace}.svc"))
            .and_then(|n| n.append_domain(&self.domain))
            .ok()
    }

    /// `HOST.SVC.NS.svc.DOMAIN.`
    fn endpoint_name(&self, host: &str, namespace: &str, service: &str) -> Option<Name> {
        Name::from_ascii(format!("{host}.{service}.{namespace}.svc"))
            .and_then(|n| n.append_domain(&self.domain))
            .ok()
    }

    fn address(&self, owner: &Name, ip: IpAddr) -> Record {
        let data = match ip {
            IpAddr::V4(ip) => RData::A(A(ip)),
            IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
        };
        Record::from_rdata(owner.clone(), self.ttl, data)
    }

    fn srv(&self, owner: &Name, port: u16, target: Name) -> Record {
        Record::from_rdata(
            owner.clone(),
            self.ttl,
            RData::SRV(SRV::new(0, 100, port, target)),
        )
    }
}

/// How a Service is answered for.
enum Kind {
    ExternalName(String),
    Headless,
    ClusterIp(Vec<IpAddr>),
}

impl Kind {
    fn of(service: &Service) -> Kind {
        let Some(spec) = &service.spec else {
            return Kind::ClusterIp(Vec::new());
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return Kind::ExternalName(spec.external_name.clone().unwrap_or_default());
        }
        if spec.cluster_ip.as_deref() == Some("None") {
            return Kind::Headless;
        }
        // `clusterIPs` holds both families of a dual-stack Service, `clusterIP` the first.
        let ips = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.clone(),
            _ => spec.cluster_ip.iter().cloned().collect(),
        };
        Kind::ClusterIp(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    }
}

/// One ready endpoint address.
#[derive(Debug)]
struct Backend {
    /// Its label under the Service's name: the endpoint's hostname, else its dashed IP.
    host: String,
    ip: IpAddr,
    ports: Vec<ServicePort>,
}

/// A port of a Service or of an EndpointSlice.
#[derive(Clone, Debug)]
struct ServicePort {
    name: Option<String>,
    /// Lower case, as in SRV names.
    protocol: String,
    port: u16,
}

/// The `_PORT._PROTO` of an SRV question.
struct NamedPort<'a> {
    port: &'a str,
    protocol: &'a str,
}

impl NamedPort<'_> {
    fn matches(&self, name: Option<&str>, protocol: &str) -> bool {
        name.is_some_and(|n| n.eq_ignore_ascii_case(self.port)) && protocol == self.protocol
    }
}

fn service_ports(service: &Service) -> Vec<ServicePort> {
    service
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter_map(|p| {
            Some(ServicePort {
                name: p.name.clone(),
                protocol: p.protocol.as_deref().unwrap_or("TCP").to_ascii_lowercase(),
                port: u16::try_from(p.port).ok()?,
            })
        })
        .collect()
}

/// `example.com` or `example.com.` as a fully qualified name.
fn fqdn(name: &str) -> Option<Name> {
    Name::from_ascii(name)
        .and_then(|n| n.append_domain(&Name::root()))
        .ok()
}

/// `10.0.0.1` → `10-0-0-1`; `fd00::1` → `fd00--1`.
fn dash(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

/// The inverse of [`dash`]: `10-0-0-1` → `10.0.0.1`.
fn undash(label: &str) -> Option<IpAddr> {
    if let Ok(ip) = label.replace('-', ".").parse::<Ipv4Addr>() {
        return Some(IpAddr::V4(ip));
    }
    label
        .replace('-', ":")
        .parse::<Ipv6Addr>()
        .ok()
        .map(IpAddr::V6)
}

/// The upstream resolvers, tried in order, behind a cache of their answers.
struct Forwarder {
    upstreams: Vec<Upstream>,
    cache: std::sync::Mutex<HashMap<CacheKey, Cached>>,
    metrics: Metrics,
}

/// What makes two forwarded questions the same.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct CacheKey {
    /// Lower case: names compare without case.
    name: Name,
    qtype: RecordType,
    class: DNSClass,
    recursion_desired: bool,
    dnssec_ok: bool,
}

impl CacheKey {
    fn of(query: &Query, options: &DnsRequestOptions) -> CacheKey {
        CacheKey {
            name: query.name().to_lowercase(),
            qtype: query.query_type(),
            class: query.query_class(),
            recursion_desired: options.recursion_desired,
            dnssec_ok: options.edns_set_dnssec_ok,
        }
    }
}

/// A forwarded answer and how long it may be served from the cache.
#[derive(Debug)]
struct Cached {
    message: Message,
    stored: Instant,
    ttl: u32,
}

impl Cached {
    /// An upstream's answer worth keeping: a positive one for its smallest TTL, a negative
    /// one (NXDOMAIN, NODATA) for its SOA's (RFC 2308), at most [`CACHE_MAX_TTL`]. Failures and
    /// truncated answers are not kept.
    fn new(message: &Message, now: Instant) -> Option<Cached> {
        if message.metadata.truncation
            || !matches!(
                message.metadata.response_code,
                ResponseCode::NoError | ResponseCode::NXDomain
            )
        {
            return None;
        }
        let ttl = if message.answers.is_empty() {
            message
                .authorities
                .iter()
                .filter_map(|r| match &r.data {
                    RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                    _ => None,
                })
                .min()?
        } else {
            message.answers.iter().map(|r| r.ttl).min()?
        };
        let ttl = ttl.min(CACHE_MAX_TTL);
        (ttl > 0).then(|| Cached {
            message: message.clone(),
            stored: now,
            ttl,
        })
    }

    /// The answer with its TTLs counted down to `now`; `None` once expired.
    fn at(&self, now: Instant) -> Option<Message> {
        let age = u32::try_from(now.duration_since(self.stored).as_secs()).unwrap_or(u32::MAX);
        if age >= self.ttl {
            return None;
        }
        let mut message = self.message.clone();
        for record in message
            .answers
            .iter_mut()
            .chain(message.authorities.iter_mut())
            .chain(message.additionals.iter_mut())
        {
            record.ttl = record.ttl.saturating_sub(age);
        }
        Some(message)
    }
}

struct Upstream {
    addr: SocketAddr,
    /// Owns the background tasks of the exchanges (a `JoinSet` that aborts them when the last
    /// clone goes), so it must outlive each TCP exchange.
    runtime: TokioRuntimeProvider,
    /// Each query goes out from a fresh random port with a random id, and the answer must
    /// match both and the question (hickory's spoofing checks).
    udp: DnsExchange<TokioRuntimeProvider>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs: Vec<SocketAddr> = self.upstreams.iter().map(|u| u.addr).collect();
        f.debug_struct("Forwarder")
            .field("upstreams", &addrs)
            .finish()
    }
}

/// Why one upstream gave no answer.
#[derive(Debug, thiserror::Error)]
enum ForwardError {
    #[error("no answer in {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Net(#[from] NetError),
}

impl Forwarder {
    fn new(upstreams: &[SocketAddr], metrics: Metrics) -> Forwarder {
        let upstreams = upstreams
            .iter()
            .map(|&addr| {
                let runtime = TokioRuntimeProvider::default();
                let udp = UdpClientStream::builder(addr, runtime.clone())
                    .with_timeout(Some(UPSTREAM_TIMEOUT))
                    .exchange();
                Upstream { addr, runtime, udp }
            })
            .collect();
        Forwarder {
            upstreams,
            cache: std::sync::Mutex::default(),
            metrics,
        }
    }

    /// The first upstream's answer; an upstream that fails (SERVFAIL, REFUSED) is passed over
    /// for the next, and its answer returned only if none does better. `None` when no upstream
    /// answers at all.
    async fn forward(
        &self,
        query: Query,
        options: DnsRequestOptions,
        over_tcp: bool,
    ) -> Option<Message> {
        let key = CacheKey::of(&query, &options);
        if let Some(message) = self.cached(&key) {
            return Some(message);
        }
        self.metrics.cache_misses.inc();
        let answer = self.ask_upstreams(query, options, over_tcp).await?;
        if let Some(entry) = Cached::new(&answer, Instant::now()) {
            let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= CACHE_ENTRIES {
                let now = Instant::now();
                cache.retain(|_, entry| entry.at(now).is_some());
                if cache.len() >= CACHE_ENTRIES {
                    cache.clear();
                }
            }
            cache.insert(key, entry);
        }
        Some(answer)
    }

    fn cached(&self, key: &CacheKey) -> Option<Message> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let entry = cache.get(key)?;
        match entry.at(Instant::now()) {
            Some(message) => {
                let kind = if message.answers.is_empty() {
                    "denial"
                } else {
                    "success"
                };
                self.metrics.cache_hits.with_label_values(&[kind]).inc();
                Some(message)
            }
            None => {
                cache.remove(key);
                None
            }
        }
    }

    async fn ask_upstreams(
        &self,
        query: Query,
        options: DnsRequestOptions,
        over_tcp: bool,
    ) -> Option<Message> {
        let mut failed = None;
        for upstream in &self.upstreams {
            match upstream.exchange(&query, options, over_tcp).await {
                Ok(answer)
                    if matches!(
                        answer.metadata.response_code,
                        ResponseCode::ServFail | ResponseCode::Refused
                    ) =>
                {
                    failed = Some(answer);
                }
                Ok(answer) => return Some(answer),
                Err(error) => {
                    tracing::debug!(%error, upstream = %upstream.addr, query = %query, "forwarding")
                }
            }
        }
        failed
    }
}

impl Upstream {
    /// Over UDP, then over TCP if the answer was truncated; over TCP straight away if the
    /// client came over TCP (it may want more than a datagram holds).
    async fn exchange(
        &self,
        query: &Query,
        options: DnsRequestOptions,
        over_tcp: bool,
    ) -> Result<Message, ForwardError> {
        let request = DnsRequest::from_query(query.clone(), options);
        if !over_tcp {
            let answer = within(self.udp.send(request.clone()).first_answer()).await?;
            if !answer.metadata.truncation {
                return Ok(answer.into_message());
            }
        }
        let tcp = within(TcpClientStream::exchange(
            self.addr,
            None,
            UPSTREAM_TIMEOUT,
            None,
            self.runtime.clone(),
        ))
        .await?;
        let answer = within(tcp.send(request).first_answer()).await?;
        Ok(answer.into_message())
    }
}

async fn within<T>(future: impl Future<Output = Result<T, NetError>>) -> Result<T, ForwardError> {
    match tokio::time::timeout(UPSTREAM_TIMEOUT, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(ForwardError::Timeout(UPSTREAM_TIMEOUT)),
    }
}

/// CoreDNS' request metrics, so its dashboards work.
#[derive(Clone, Debug)]
struct Metrics {
    requests: IntCounterVec,
    responses: IntCounterVec,
    duration: HistogramVec,
    /// Forwarded questions answered from the cache, by `success` or `denial`.
    cache_hits: IntCounterVec,
    cache_misses: prometheus::IntCounter,
}

impl Metrics {
    fn register(registry: &Registry) -> Result<Metrics, prometheus::Error> {
        let metrics = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "coredns_dns_requests_total",
                    "Counter of DNS requests made per protocol and query type.",
                ),
                &["proto", "type"],
            )?,
            responses: IntCounterVec::new(
                Opts::new(
                    "coredns_dns_responses_total",
                    "Counter of DNS responses per response code.",
                ),
                &["rcode"],
            )?,
            duration: HistogramVec::new(
                HistogramOpts::new(
                    "coredns_dns_request_duration_seconds",
                    "Histogram of the time (in seconds) each request took per query type.",
                )
                .buckets(prometheus::exponential_buckets(0.00025, 2.0, 16)?),
                &["type"],
            )?,
            cache_hits: IntCounterVec::new(
                Opts::new(
                    "coredns_cache_hits_total",
                    "The count of cache hits (forwarded answers served from the cache).",
                ),
                &["type"],
            )?,
            cache_misses: prometheus::IntCounter::new(
                "coredns_cache_misses_total",
                "The count of cache misses (questions sent upstream).",
            )?,
        };
        registry.register(Box::new(metrics.cache_hits.clone()))?;
        registry.register(Box::new(metrics.cache_misses.clone()))?;
        registry.register(Box::new(metrics.requests.clone()))?;
        registry.register(Box::new(metrics.responses.clone()))?;
        registry.register(Box::new(metrics.duration.clone()))?;
        Ok(metrics)
    }

    fn observe(&self, protocol: Protocol, qtype: &str, rcode: ResponseCode, started: Instant) {
        let proto = if protocol.is_stream() { "tcp" } else { "udp" };
        self.requests.with_label_values(&[proto, qtype]).inc();
        self.responses
            .with_label_values(&[rcode_label(rcode)])
            .inc();
        self.duration
            .with_label_values(&[qtype])
            .observe(started.elapsed().as_secs_f64());
    }
}

/// The `type` label: common types by name, the rest as `other`, so a client can't grow the
/// metric without bound.
fn type_label(qtype: RecordType) -> &'static str {
    match qtype {
        RecordType::A => "A",
        RecordType::AAAA => "AAAA",
        RecordType::ANY => "ANY",
        RecordType::CAA => "CAA",
        RecordType::CNAME => "CNAME",
        RecordType::HTTPS => "HTTPS",
        RecordType::MX => "MX",
        RecordType::NS => "NS",
        RecordType::PTR => "PTR",
        RecordType::SOA => "SOA",
        RecordType::SRV => "SRV",
        RecordType::SVCB => "SVCB",
        RecordType::TXT => "TXT",
        _ => "other",
    }
}

/// The `rcode` label, spelled as dig and CoreDNS spell it.
fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::BADVERS => "BADVERS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::collections::BTreeMap;

    use k8s_openapi::api::core::v1::{ServicePort as Port, ServiceSpec};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
    use kube::runtime::reflector::store;
    use kube::runtime::watcher;

    use super::*;

    fn port(name: &str, protocol: &str, port: i32) -> Port {
        Port {
            name: Some(name.into()),
            protocol: Some(protocol.into()),
            port,
            ..Port::default()
        }
    }

    fn service(namespace: &str, name: &str, spec: ServiceSpec) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            spec: Some(spec),
            status: None,
        }
    }

    fn cluster_ip(namespace: &str, name: &str, ip: &str, ports: Vec<Port>) -> Service {
        service(
            namespace,
            name,
            ServiceSpec {
                cluster_ip: Some(ip.into()),
                cluster_ips: Some(vec![ip.into()]),
                ports: Some(ports),
                ..ServiceSpec::default()
            },
        )
    }

    /// (hostname, address, ready)
    fn slice(
        namespace: &str,
        service: &str,
        name: &str,
        ports: &[(&str, i32)],
        endpoints: &[(Option<&str>, &str, Option<bool>)],
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_owned(),
                    service.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                endpoints
                    .iter()
                    .map(|(hostname, address, ready)| Endpoint {
                        addresses: vec![(*address).into()],
                        hostname: hostname.map(Into::into),
                        conditions: Some(EndpointConditions {
                            ready: *ready,
                            ..EndpointConditions::default()
                        }),
                        ..Endpoint::default()
                    })
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, port)| EndpointPort {
                        name: Some((*name).into()),
                        port: Some(*port),
                        protocol: Some("TCP".into()),
                        ..EndpointPort::default()
                    })
                    .collect(),
            ),
        }
    }

    /// A zone over stores holding the fixtures below.
    fn zone() -> Zone {
        let (services, mut service_writer) = store::<Service>();
        let (slices, mut slice_writer) = store::<EndpointSlice>();
        let fixtures = [
            cluster_ip(
                "default",
                "web",
                "10.43.0.20",
                vec![port("http", "TCP", 80), port("dns", "UDP", 53)],
            ),
            service(
                "default",
                "db",
                ServiceSpec {
                    cluster_ip: Some("None".into()),
                    ports: Some(vec![port("pg", "TCP", 5432)]),
                    ..ServiceSpec::default()
                },
            ),
            service(
                "default",
                "search",
                ServiceSpec {
                    type_: Some("ExternalName".into()),
                    external_name: Some("search.example.com".into()),
                    ..ServiceSpec::default()
                },
            ),
            service(
                "other",
                "alias",
                ServiceSpec {
                    type_: Some("ExternalName".into()),
                    external_name: Some("WEB.default.svc.cluster.local.".into()),
                    ..ServiceSpec::default()
                },
            ),
        ];
        for object in fixtures {
            service_writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        let db_slices = [
            slice(
                "default",
                "db",
                "db-a",
                &[("pg", 15432)],
                &[
                    (Some("db-0"), "10.42.0.5", Some(true)),
                    (None, "10.42.0.6", None),
                    (None, "10.42.0.7", Some(false)),
                ],
            ),
            // The same endpoint again, as while a slice is being replaced.
            slice(
                "default",
                "db",
                "db-b",
                &[("pg", 15432)],
                &[(Some("db-0"), "10.42.0.5", Some(true))],
            ),
            // Another Service's slice in the same namespace.
            slice(
                "default",
                "web",
                "web-a",
                &[("http", 8080)],
                &[(None, "10.42.0.9", Some(true))],
            ),
        ];
        for object in db_slices {
            slice_writer.apply_watcher_event(&watcher::Event::Apply(object));
        }
        Zone::new(services, slices, "Cluster.Local", 5).unwrap()
    }

    fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    fn ask(zone: &Zone, text: &str, qtype: RecordType) -> ZoneAnswer {
        let name = name(text);
        assert!(zone.contains(&name), "{text} is in the zone");
        zone.answer(&name, qtype)
    }

    fn addresses(records: &[Record]) -> Vec<IpAddr> {
        let mut ips: Vec<IpAddr> = records
            .iter()
            .filter_map(|r| match r.data {
                RData::A(A(ip)) => Some(IpAddr::V4(ip)),
                RData::AAAA(AAAA(ip)) => Some(IpAddr::V6(ip)),
                _ => None,
            })
            .collect();
        ips.sort();
        ips
    }

    fn srvs(records: &[Record]) -> Vec<(u16, u16, u16, String)> {
        let mut srvs: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => {
                    Some((srv.priority, srv.weight, srv.port, srv.target.to_ascii()))
                }
                _ => None,
            })
            .collect();
        srvs.sort();
        srvs
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn is_soa(records: &[Record]) -> bool {
        matches!(records, [record] if record.record_type() == RecordType::SOA
            && record.name == name("cluster.local."))
    }

    #[test]
    fn resolv_conf_nameservers_become_upstreams_on_port_53() {
        let text = "# generated\nsearch example.com\nnameserver 192.0.2.1\n\
                    nameserver   2001:db8::1 \nnameserver fe80::1%eth0\noptions ndots:1\n\
                    ; nameserver 192.0.2.9\nnameserver\n";
        let config = DnsConfig::from_resolv_conf(text, "cluster.local");
        assert_eq!(
            config.upstreams,
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap(),
            ]
        );
        assert_eq!(
            (config.cluster_domain.as_str(), config.ttl),
            ("cluster.local", 5)
        );
    }

    #[test]
    fn an_invalid_cluster_domain_is_refused() {
        let (services, _) = store::<Service>();
        let (slices, _) = store::<EndpointSlice>();
        for domain in [
            "a".repeat(64),
            String::new(),
            ".".into(),
            "bad..domain".into(),
        ] {
            let err = Zone::new(services.clone(), slices.clone(), &domain, 5).unwrap_err();
            assert!(matches!(err, DnsError::Domain { .. }), "{domain:?}: {err}");
        }
        assert!(Zone::new(services, slices, "cluster.local.", 5).is_ok());
    }

    #[test]
    fn dashed_addresses_round_trip() {
        for text in ["10.0.0.1", "fd00::1", "2001:db8:0:1::a"] {
            assert_eq!(undash(&dash(ip(text))), Some(ip(text)));
        }
        assert_eq!(dash(ip("10.0.0.1")), "10-0-0-1");
        assert_eq!(undash("10-0-0"), None);
        assert_eq!(undash("web"), None);
        assert_eq!(undash("300-0-0-1"), None);
    }

    #[test]
    fn cluster_addresses_have_reverse_names_and_others_are_forwarded() {
        let zone = zone();
        let ptrs = |text: &str, qtype| {
            zone.reverse(&name(text), qtype).map(|answer| {
                answer
                    .answers
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::PTR(PTR(target)) => Some(target.to_ascii()),
                        _ => None,
                    })
                    .collect::<Vec<_>>()
            })
        };
        assert_eq!(
            ptrs("20.0.43.10.in-addr.arpa.", RecordType::PTR),
            Some(vec!["web.default.svc.cluster.local.".to_owned()])
        );
        // A headless Service's ready endpoints, by hostname or dashed address.
        assert_eq!(
            ptrs("5.0.42.10.IN-ADDR.ARPA.", RecordType::PTR),
            Some(vec!["db-0.db.default.svc.cluster.local.".to_owned()])
        );
        assert_eq!(
            ptrs("6.0.42.10.in-addr.arpa.", RecordType::ANY),
            Some(vec!["10-42-0-6.db.default.svc.cluster.local.".to_owned()])
        );
        // Not ready, a ClusterIP Service's endpoint, an unknown address, a network, another
        // type: the upstream's.
        for text in [
            "7.0.42.10.in-addr.arpa.",
            "9.0.42.10.in-addr.arpa.",
            "1.1.168.192.in-addr.arpa.",
            "42.10.in-addr.arpa.",
            "web.default.svc.cluster.local.",
        ] {
            assert_eq!(ptrs(text, RecordType::PTR), None, "{text}");
        }
        assert_eq!(ptrs("20.0.43.10.in-addr.arpa.", RecordType::A), None);
    }

    #[test]
    fn a_cluster_ip_service_answers_its_ip_whatever_the_case() {
        let zone = zone();
        let answer = ask(&zone, "WeB.Default.SVC.cluster.LOCAL.", RecordType::A);
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert_eq!(addresses(&answer.answers), vec![ip("10.43.0.20")]);
        assert_eq!(answer.answers[0].ttl, 5);
        // The owner is the name as asked.
        assert_eq!(
            answer.answers[0].name.to_ascii(),
            "WeB.Default.SVC.cluster.LOCAL."
        );
        assert!(answer.authority.is_empty());
    }

    #[test]
    fn a_type_the_name_lacks_is_nodata_with_the_soa() {
        let zone = zone();
        let answer = ask(&zone, "web.default.svc.cluster.local.", RecordType::AAAA);
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
        assert!(is_soa(&answer.authority), "{:?}", answer.authority);
        // Empty non-terminals exist too.
        for text in ["svc.cluster.local.", "default.svc.cluster.local."] {
            let answer = ask(&zone, text, RecordType::A);
            assert_eq!(answer.rcode, ResponseCode::NoError, "{text}");
            assert!(is_soa(&answer.authority), "{text}");
        }
    }

    #[test]
    fn missing_names_are_nxdomain_with_the_soa() {
        let zone = zone();
        for text in [
            "nope.default.svc.cluster.local.",
            "web.nowhere.svc.cluster.local.",
            "nowhere.svc.cluster.local.",
            "www.example.com.default.svc.cluster.local.",
            "x.cluster.local.",
            "_http._udp.web.default.svc.cluster.local.",
            "_ftp._tcp.web.default.svc.cluster.local.",
            "db-9.db.default.svc.cluster.local.",
            "10-42-0-9.web.default.svc.cluster.local.",
            "not-an-ip.default.pod.cluster.local.",
        ] {
            let answer = ask(&zone, text, RecordType::A);
            assert_eq!(answer.rcode, ResponseCode::NXDomain, "{text}");
            assert!(answer.answers.is_empty(), "{text}");
            assert!(is_soa(&answer.authority), "{text}");
        }
    }

    #[test]
    fn the_apex_has_the_soa() {
        let zone = zone();
        let answer = ask(&zone, "cluster.local.", RecordType::SOA);
        assert!(is_soa(&answer.answers));
        assert!(!zone.contains(&name("local.")));
        assert!(!zone.contains(&name("web.default.svc.cluster.example.")));
    }

    #[test]
    fn a_headless_service_answers_its_ready_endpoints_once_each() {
        let zone = zone();
        let answer = ask(&zone, "db.default.svc.cluster.local.", RecordType::A);
        assert_eq!(
            addresses(&answer.answers),
            vec![ip("10.42.0.5"), ip("10.42.0.6")]
        );
        let answer = ask(&zone, "db-0.db.default.svc.cluster.local.", RecordType::A);
        assert_eq!(addresses(&answer.answers), vec![ip("10.42.0.5")]);
        let answer = ask(
            &zone,
            "10-42-0-6.db.default.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(addresses(&answer.answers), vec![ip("10.42.0.6")]);
        // Not ready: not there.
        let answer = ask(
            &zone,
            "10-42-0-7.db.default.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(answer.rcode, ResponseCode::NXDomain);
    }

    #[test]
    fn named_ports_answer_srv_with_the_target_address_as_glue() {
        let zone = zone();
        let answer = ask(
            &zone,
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(
            srvs(&answer.answers),
            vec![(0, 100, 80, "web.default.svc.cluster.local.".into())]
        );
        assert_eq!(addresses(&answer.additionals), vec![ip("10.43.0.20")]);
        assert_eq!(
            answer.additionals[0].name.to_ascii(),
            "web.default.svc.cluster.local."
        );
        let answer = ask(
            &zone,
            "_dns._udp.web.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(srvs(&answer.answers)[0].2, 53);
        // The SRV name has no address.
        let answer = ask(
            &zone,
            "_http._tcp.web.default.svc.cluster.local.",
            RecordType::A,
        );
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert!(answer.answers.is_empty() && answer.additionals.is_empty());
        // SRV on the service name: every port.
        let answer = ask(&zone, "web.default.svc.cluster.local.", RecordType::SRV);
        assert_eq!(
            srvs(&answer.answers)
                .iter()
                .map(|s| s.2)
                .collect::<Vec<_>>(),
            vec![53, 80]
        );
    }

    #[test]
    fn a_headless_srv_names_each_ready_endpoint_on_its_endpoint_port() {
        let zone = zone();
        let answer = ask(
            &zone,
            "_pg._tcp.db.default.svc.cluster.local.",
            RecordType::SRV,
        );
        assert_eq!(
            srvs(&answer.answers),
            vec![
                (
                    0,
                    100,
                    15432,
                    "10-42-0-6.db.default.svc.cluster.local.".into()
                ),
                (0, 100, 15432, "db-0.db.default.svc.cluster.local.".into()),
            ]
        );
        let mut glue: Vec<(String, IpAddr)> = answer
            .additionals
            .iter()
            .map(|r| (r.name.to_ascii(), addresses(std::slice::from_ref(r))[0]))
            .collect();
        glue.sort();
        assert_eq!(
            glue,
            vec![
                (
                    "10-42-0-6.db.default.svc.cluster.local.".into(),
                    ip("10.42.0.6")
                ),
                ("db-0.db.default.svc.cluster.local.".into(), ip("10.42.0.5")),
            ]
        );
    }

    #[test]
    fn an_external_name_is_a_cname_and_its_target_goes_upstream() {
        let zone = zone();
        let answer = ask(&zone, "search.default.svc.cluster.local.", RecordType::A);
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert!(
            matches!(&answer.answers[..], [r] if r.data == RData::CNAME(CNAME(name("search.example.com."))))
        );
        assert_eq!(answer.external, Some(name("search.example.com.")));
        // Asked for the CNAME itself: nothing to chase.
        let answer = ask(
            &zone,
            "search.default.svc.cluster.local.",
            RecordType::CNAME,
        );
        assert_eq!(answer.answers.len(), 1);
        assert_eq!(answer.external, None);
    }

    #[test]
    fn an_external_name_inside_the_zone_is_followed_there() {
        let zone = zone();
        let answer = ask(&zone, "alias.other.svc.cluster.local.", RecordType::A);
        assert_eq!(answer.external, None);
        assert_eq!(answer.answers.len(), 2);
        assert_eq!(answer.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(addresses(&answer.answers), vec![ip("10.43.0.20")]);
    }

    #[test]
    fn pod_names_are_their_dashed_address() {
        let zone = zone();
        let answer = ask(
            &zone,
            "10-244-1-7.any-namespace.pod.cluster.local.",
            RecordType::A,
        );
        assert_eq!(addresses(&answer.answers), vec![ip("10.244.1.7")]);
        let answer = ask(
            &zone,
            "fd00--7.default.pod.cluster.local.",
            RecordType::AAAA,
        );
        assert_eq!(addresses(&answer.answers), vec![ip("fd00::7")]);
        let answer = ask(
            &zone,
            "10-244-1-7.default.pod.cluster.local.",
            RecordType::AAAA,
        );
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert!(answer.answers.is_empty());
    }

    #[test]
    fn forwarded_answers_are_cached_for_their_ttl_at_most_30_s() {
        let now = Instant::now();
        let owner = name("example.com.");
        let mut message = Message::new(
            7,
            hickory_server::proto::op::MessageType::Response,
            OpCode::Query,
        );
        message.answers.push(Record::from_rdata(
            owner.clone(),
            300,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
        ));
        message.answers.push(Record::from_rdata(
            owner.clone(),
            20,
            RData::A(A(Ipv4Addr::new(192, 0, 2, 2))),
        ));
        let entry = Cached::new(&message, now).unwrap();
        assert_eq!(entry.ttl, 20, "the smallest TTL");
        let later = entry.at(now + Duration::from_secs(5)).unwrap();
        assert_eq!(
            later.answers.iter().map(|r| r.ttl).collect::<Vec<_>>(),
            [295, 15],
            "TTLs count down"
        );
        assert!(entry.at(now + Duration::from_secs(20)).is_none(), "expired");
        // Capped at 30 s.
        message.answers.truncate(1);
        assert_eq!(Cached::new(&message, now).unwrap().ttl, CACHE_MAX_TTL);
        // NXDOMAIN: the SOA's minimum; SERVFAIL and truncated answers: not kept.
        let mut negative = Message::new(
            7,
            hickory_server::proto::op::MessageType::Response,
            OpCode::Query,
        );
        negative.metadata.response_code = ResponseCode::NXDomain;
        let soa = SOA::new(owner.clone(), owner.clone(), 1, 7200, 1800, 86400, 10);
        negative
            .authorities
            .push(Record::from_rdata(owner.clone(), 60, RData::SOA(soa)));
        assert_eq!(Cached::new(&negative, now).unwrap().ttl, 10);
        negative.metadata.response_code = ResponseCode::ServFail;
        assert!(Cached::new(&negative, now).is_none());
        message.metadata.truncation = true;
        assert!(Cached::new(&message, now).is_none());
        // Keys ignore case.
        let options = DnsRequestOptions::default();
        assert_eq!(
            CacheKey::of(&Query::query(name("Example.COM."), RecordType::A), &options),
            CacheKey::of(&Query::query(name("example.com."), RecordType::A), &options)
        );
    }

    #[test]
    fn the_metric_names_follow_coredns() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).unwrap();
        metrics.observe(Protocol::Udp, "A", ResponseCode::NXDomain, Instant::now());
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|family| family.name().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                "coredns_cache_misses_total",
                "coredns_dns_request_duration_seconds",
                "coredns_dns_requests_total",
                "coredns_dns_responses_total",
            ]
        );
        assert_eq!(metrics.responses.with_label_values(&["NXDOMAIN"]).get(), 1);
        // A second server on the same registry is a typed error, not a panic.
        assert!(Metrics::register(&registry).is_err());
    }
}
