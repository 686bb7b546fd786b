//! The cluster DNS server against the real API server in-process: Services and EndpointSlices
//! created through a kube client, followed by reflector stores, answered on loopback UDP and
//! TCP to raw DNS messages; forwarding to a second, real hickory server as the upstream.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hickory_server::net::runtime::TokioRuntimeProvider;
use hickory_server::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_server::proto::rr::rdata::{A, SOA};
use hickory_server::proto::rr::{Name, RData, Record, RecordType};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use orquestra_node_agent::dns::{ClusterDns, DnsConfig, DnsError};
use orquestra_operator::testing::TestApi;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::oneshot;

/// A ClusterDns serving on loopback from stores that follow `client`'s API server.
struct Dns {
    addr: SocketAddr,
    registry: prometheus::Registry,
    stop: Option<oneshot::Sender<()>>,
    served: tokio::task::JoinHandle<Result<(), DnsError>>,
}

impl Dns {
    async fn start(client: Client, upstreams: Vec<SocketAddr>) -> Dns {
        let services = follow::<Service>(Api::all(client.clone())).await;
        let slices = follow::<EndpointSlice>(Api::all(client)).await;
        let registry = prometheus::Registry::new();
        let config = DnsConfig {
            upstreams,
            ..DnsConfig::new("cluster.local")
        };
        let dns = ClusterDns::new(services, slices, config, &registry).unwrap();
        let bound = dns.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = bound.local_addr();
        assert_ne!(addr.port(), 0);
        let (stop, stopped) = oneshot::channel::<()>();
        let served = tokio::spawn(bound.serve(async move {
            let _ = stopped.await;
        }));
        Dns {
            addr,
            registry,
            stop: Some(stop),
            served,
        }
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.served)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
            .unwrap();
    }

    /// The value of a counter in the registry, by its labels.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric())
            .filter(|metric| {
                labels.iter().all(|(key, value)| {
                    metric
                        .get_label()
                        .iter()
                        .any(|l| l.name() == *key && l.value() == *value)
                })
            })
            .map(|metric| metric.get_counter().get_value())
            .sum()
    }
}

/// A reflector store kept by a watch on `api`, as the agent keeps them for its service proxy.
async fn follow<K>(api: Api<K>) -> reflector::Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    );
    tokio::spawn(stream.for_each(|_| async {}));
    tokio::time::timeout(Duration::from_secs(10), store.wait_until_ready())
        .await
        .unwrap()
        .unwrap();
    store
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).unwrap()
}

fn question(text: &str, qtype: RecordType) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(name(text), qtype));
    message.metadata.recursion_desired = true;
    message
}

/// One query over UDP from a fresh socket; the answer must carry the query's id.
async fn udp(server: SocketAddr, message: &Message) -> Message {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&message.to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buffer = vec![0; 65535];
    let (len, from) = tokio::time::timeout(Duration::from_secs(6), socket.recv_from(&mut buffer))
        .await
        .expect("an answer over UDP")
        .unwrap();
    assert_eq!(from, server);
    let answer = Message::from_vec(&buffer[..len]).unwrap();
    assert_eq!(answer.metadata.id, message.metadata.id);
    answer
}

/// One query over a fresh TCP connection (RFC 1035 4.2.2: a two-byte length, then the
/// message).
async fn tcp(server: SocketAddr, message: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    let bytes = message.to_vec().unwrap();
    let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
    stream
        .write_all(&[&len[..], &bytes].concat())
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(6), async {
        let len = stream.read_u16().await.unwrap();
        let mut buffer = vec![0; usize::from(len)];
        stream.read_exact(&mut buffer).await.unwrap();
        buffer
    })
    .await
    .expect("an answer over TCP");
    let answer = Message::from_vec(&answer).unwrap();
    assert_eq!(answer.metadata.id, message.metadata.id);
    answer
}

async fn ask(server: SocketAddr, text: &str, qtype: RecordType) -> Message {
    udp(server, &question(text, qtype)).await
}

fn addresses(records: &[Record]) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect();
    ips.sort();
    ips
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn has_soa(answer: &Message) -> bool {
    answer
        .authorities
        .iter()
        .any(|r| r.record_type() == RecordType::SOA && r.name == name("cluster.local."))
}

/// Polls until `text` answers with at least one record (the stores have caught up).
async fn resolves(server: SocketAddr, text: &str, qtype: RecordType) -> (Message, Duration) {
    let started = Instant::now();
    loop {
        let answer = ask(server, text, qtype).await;
        if !answer.answers.is_empty() {
            return (answer, started.elapsed());
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{text} never resolved: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_service(client: &Client, object: serde_json::Value) -> Service {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let service = serde_json::from_value(object).unwrap();
    services
        .create(&PostParams::default(), &service)
        .await
        .unwrap()
}

async fn create_slice(client: &Client, object: serde_json::Value) {
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let slice = serde_json::from_value(object).unwrap();
    slices.create(&PostParams::default(), &slice).await.unwrap();
}

/// `web` (ClusterIP, ports http/TCP 80 and dns/UDP 53) and `db` (headless, port pg) with a
/// slice of two ready endpoints (one with a hostname) and one that isn't ready.
async fn fixtures(client: &Client) -> IpAddr {
    let web = create_service(
        client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080},
                {"name": "dns", "protocol": "UDP", "port": 53},
            ]},
        }),
    )
    .await;
    create_service(
        client,
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "default"},
            "spec": {"clusterIP": "None", "selector": {"app": "db"},
                     "ports": [{"name": "pg", "port": 5432}]},
        }),
    )
    .await;
    create_slice(
        client,
        json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "db-abcde", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "ports": [{"name": "pg", "protocol": "TCP", "port": 15432}],
            "endpoints": [
                {"addresses": ["10.42.0.5"], "hostname": "db-0", "conditions": {"ready": true}},
                {"addresses": ["10.42.0.6"], "conditions": {"ready": true}},
                {"addresses": ["10.42.0.7"], "conditions": {"ready": false}},
            ],
        }),
    )
    .await;
    web.spec.unwrap().cluster_ip.unwrap().parse().unwrap()
}

#[tokio::test]
async fn cluster_names_resolve_from_the_stores_over_udp_and_tcp() {
    let api = TestApi::start().await.unwrap();
    let dns = Dns::start(api.client(), Vec::new()).await;
    let cluster_ip = fixtures(&api.client()).await;
    let server = dns.addr;

    // A ClusterIP Service: its allocated IP, authoritatively, with CoreDNS' TTL.
    let (answer, _) = resolves(server, "web.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.metadata.authoritative);
    assert_eq!(addresses(&answer.answers), vec![cluster_ip]);
    assert_eq!(answer.answers[0].ttl, 5);
    let over_tcp = tcp(
        server,
        &question("WEB.default.svc.Cluster.Local", RecordType::A),
    )
    .await;
    assert_eq!(addresses(&over_tcp.answers), vec![cluster_ip]);

    // A headless Service: its ready endpoints.
    let (answer, _) = resolves(server, "db.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(
        addresses(&answer.answers),
        vec![ip("10.42.0.5"), ip("10.42.0.6")]
    );
    let answer = ask(server, "db-0.db.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(addresses(&answer.answers), vec![ip("10.42.0.5")]);

    // SRV for a named port, with the target's address alongside.
    let answer = ask(
        server,
        "_http._tcp.web.default.svc.cluster.local",
        RecordType::SRV,
    )
    .await;
    let srvs: Vec<_> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.priority, srv.weight, srv.port, srv.target.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        srvs,
        vec![(0, 100, 80, name("web.default.svc.cluster.local."))]
    );
    assert_eq!(addresses(&answer.additionals), vec![cluster_ip]);
    let answer = ask(
        server,
        "_pg._tcp.db.default.svc.cluster.local",
        RecordType::SRV,
    )
    .await;
    let mut targets: Vec<(u16, String)> = answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some((srv.port, srv.target.to_ascii())),
            _ => None,
        })
        .collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![
            (15432, "10-42-0-6.db.default.svc.cluster.local.".to_owned()),
            (15432, "db-0.db.default.svc.cluster.local.".to_owned()),
        ]
    );
    assert_eq!(
        addresses(&answer.additionals),
        vec![ip("10.42.0.5"), ip("10.42.0.6")]
    );

    // A pod by its dashed address.
    let answer = ask(
        server,
        "10-244-0-5.default.pod.cluster.local",
        RecordType::A,
    )
    .await;
    assert_eq!(addresses(&answer.answers), vec![ip("10.244.0.5")]);

    // A missing Service, namespace or endpoint: NXDOMAIN, authoritative, with the SOA.
    let nxdomains = dns.counter("coredns_dns_responses_total", &[("rcode", "NXDOMAIN")]);
    for missing in [
        "nope.default.svc.cluster.local",
        "web.nowhere.svc.cluster.local",
        "10-42-0-7.db.default.svc.cluster.local",
    ] {
        let answer = ask(server, missing, RecordType::A).await;
        assert_eq!(
            answer.metadata.response_code,
            ResponseCode::NXDomain,
            "{missing}"
        );
        assert!(answer.metadata.authoritative, "{missing}");
        assert!(answer.answers.is_empty() && has_soa(&answer), "{missing}");
    }
    // With no upstreams, nothing under the domain depends on one.

    // A type the name doesn't have: NODATA.
    let answer = ask(server, "web.default.svc.cluster.local", RecordType::AAAA).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert!(answer.answers.is_empty());
    assert!(has_soa(&answer));

    // Counted, by protocol, type and rcode.
    assert!(
        dns.counter(
            "coredns_dns_requests_total",
            &[("proto", "tcp"), ("type", "A")]
        ) >= 1.0
    );
    assert!(
        dns.counter(
            "coredns_dns_requests_total",
            &[("proto", "udp"), ("type", "SRV")]
        ) == 2.0
    );
    assert_eq!(
        dns.counter("coredns_dns_responses_total", &[("rcode", "NXDOMAIN")]) - nxdomains,
        3.0
    );

    // Stopping: serve returns and the port no longer takes connections.
    dns.stop().await;
    assert!(TcpStream::connect(server).await.is_err());
}

#[tokio::test]
async fn the_answers_follow_the_watch() {
    let api = TestApi::start().await.unwrap();
    let dns = Dns::start(api.client(), Vec::new()).await;
    let server = dns.addr;

    let before = ask(server, "late.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(before.metadata.response_code, ResponseCode::NXDomain);
    let late = create_service(
        &api.client(),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "late", "namespace": "default"},
            "spec": {"ports": [{"port": 80}]},
        }),
    )
    .await;
    let cluster_ip: IpAddr = late.spec.unwrap().cluster_ip.unwrap().parse().unwrap();
    let (answer, took) = resolves(server, "late.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(addresses(&answer.answers), vec![cluster_ip]);
    assert!(
        took < Duration::from_secs(2),
        "resolved only after {took:?}"
    );

    let services: Api<Service> = Api::namespaced(api.client(), "default");
    services
        .delete("late", &DeleteParams::default())
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let answer = ask(server, "late.default.svc.cluster.local", RecordType::A).await;
        if answer.metadata.response_code == ResponseCode::NXDomain {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "still answers: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dns.stop().await;
}

#[tokio::test]
async fn garbage_does_not_stop_the_server() {
    let api = TestApi::start().await.unwrap();
    let dns = Dns::start(api.client(), Vec::new()).await;
    let server = dns.addr;
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Too short for a header, random bytes, a header promising a question that isn't there,
    // a response (never answered, against reflection), an empty datagram.
    let mut response = question("pod.cluster.local", RecordType::A);
    response.metadata.message_type = hickory_server::proto::op::MessageType::Response;
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xde, 0xad],
        (0..=255u8).rev().cycle().take(700).collect(),
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ],
        vec![0xff; 40],
        response.to_vec().unwrap(),
        Vec::new(),
    ];
    for datagram in &garbage {
        socket.send_to(datagram, server).await.unwrap();
    }
    // Garbage over TCP: a length longer than what follows, then the connection goes.
    let mut stream = TcpStream::connect(server).await.unwrap();
    stream.write_all(&[0x10, 0x00, 1, 2, 3]).await.unwrap();
    drop(stream);

    // The header-only message is parseable enough to be told FORMERR, under its id.
    let mut buffer = vec![0; 4096];
    let formerr = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (len, _) = socket.recv_from(&mut buffer).await.unwrap();
            if let Ok(message) = Message::from_vec(&buffer[..len]) {
                if message.metadata.id == 0x1234 {
                    return message;
                }
            }
        }
    })
    .await
    .expect("a FORMERR for the truncated question");
    assert_eq!(formerr.metadata.response_code, ResponseCode::FormErr);

    // And a valid query after all that is answered, over both transports.
    let answer = ask(server, "10-1-2-3.default.pod.cluster.local", RecordType::A).await;
    assert_eq!(addresses(&answer.answers), vec![ip("10.1.2.3")]);
    let answer = tcp(
        server,
        &question("10-1-2-3.default.pod.cluster.local", RecordType::A),
    )
    .await;
    assert_eq!(addresses(&answer.answers), vec![ip("10.1.2.3")]);
    dns.stop().await;
}

/// A real hickory server on loopback, authoritative for `example.test.` (`www` has one
/// address, `big` has a hundred) and — as a trap — for `cluster.local.`.
async fn upstream() -> SocketAddr {
    let mut catalog = Catalog::new();
    let example = name("example.test.");
    let mut records = vec![Record::from_rdata(
        name("www.example.test."),
        60,
        RData::A(A::new(192, 0, 2, 10)),
    )];
    for i in 0..100u8 {
        records.push(Record::from_rdata(
            name("big.example.test."),
            60,
            RData::A(A::new(198, 51, 100, i)),
        ));
    }
    catalog.upsert(
        example.clone().into(),
        vec![Arc::new(zone(&example, records))],
    );
    let cluster = name("cluster.local.");
    let trap = Record::from_rdata(
        name("web.default.svc.cluster.local."),
        60,
        RData::A(A::new(192, 0, 2, 99)),
    );
    catalog.upsert(
        cluster.clone().into(),
        vec![Arc::new(zone(&cluster, vec![trap]))],
    );

    // A UDP port whose TCP twin is free too (another test may hold it).
    let mut attempts = 0;
    let (socket, listener) = loop {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        match TcpListener::bind(socket.local_addr().unwrap()).await {
            Ok(listener) => break (socket, listener),
            Err(e) => {
                attempts += 1;
                assert!(attempts < 50, "no free UDP+TCP port pair: {e}");
            }
        }
    };
    let addr = socket.local_addr().unwrap();
    let mut server = hickory_server::Server::new(catalog);
    server.register_socket(socket);
    server.register_listener(listener, Duration::from_secs(5), 32);
    tokio::spawn(async move { server.block_until_done().await });
    addr
}

fn zone(origin: &Name, records: Vec<Record>) -> InMemoryZoneHandler<TokioRuntimeProvider> {
    let mut zone = InMemoryZoneHandler::empty(origin.clone(), ZoneType::Primary, AxfrPolicy::Deny);
    let soa = SOA::new(
        name("ns").append_domain(origin).unwrap(),
        name("hostmaster").append_domain(origin).unwrap(),
        1,
        3600,
        600,
        86400,
        60,
    );
    assert!(zone.upsert_mut(Record::from_rdata(origin.clone(), 60, RData::SOA(soa)), 1));
    for record in records {
        assert!(zone.upsert_mut(record, 1));
    }
    zone
}

#[tokio::test]
async fn other_names_are_forwarded_to_the_upstream() {
    let api = TestApi::start().await.unwrap();
    let upstream = upstream().await;
    let dns = Dns::start(api.client(), vec![upstream]).await;
    let server = dns.addr;

    // Resolved through ClusterDns, under the client's id (checked by `udp` and `tcp`).
    let answer = ask(server, "www.example.test", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer.answers), vec![ip("192.0.2.10")]);
    let answer = tcp(server, &question("www.example.test", RecordType::A)).await;
    assert_eq!(addresses(&answer.answers), vec![ip("192.0.2.10")]);
    // The upstream's NXDOMAIN is passed on.
    let answer = ask(server, "missing.example.test", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert!(!has_soa(&answer), "the upstream's SOA, not ours");

    // A big answer: truncated upstream over UDP, fetched again over TCP; then truncated to
    // the client's 512 bytes over UDP, whole over TCP.
    let answer = ask(server, "big.example.test", RecordType::A).await;
    assert!(answer.metadata.truncation);
    // A client with a 4096-byte EDNS buffer gets it whole over UDP: the upstream's UDP answer
    // (to our 1232 bytes) was truncated, so it was fetched again over TCP.
    let mut large = question("big.example.test", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    large.set_edns(edns);
    let answer = udp(server, &large).await;
    assert!(!answer.metadata.truncation);
    assert_eq!(answer.answers.len(), 100);
    assert_eq!(answer.edns.map(|e| e.max_payload()), Some(4096));
    let answer = tcp(server, &question("big.example.test", RecordType::A)).await;
    assert!(!answer.metadata.truncation);
    assert_eq!(answer.answers.len(), 100);

    // Names under the cluster domain never go upstream (it would answer 192.0.2.99).
    let answer = ask(server, "web.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert!(answer.metadata.authoritative && has_soa(&answer));

    // An ExternalName: the CNAME, and its target's address from the upstream.
    create_service(
        &api.client(),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "search", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "www.example.test"},
        }),
    )
    .await;
    let (answer, _) = resolves(server, "search.default.svc.cluster.local", RecordType::A).await;
    assert_eq!(
        answer.answers[0].data,
        RData::CNAME(hickory_server::proto::rr::rdata::CNAME(name(
            "www.example.test."
        )))
    );
    assert_eq!(addresses(&answer.answers), vec![ip("192.0.2.10")]);
    dns.stop().await;
}

#[tokio::test]
async fn no_upstream_answering_is_servfail_and_a_silent_one_is_skipped() {
    let api = TestApi::start().await.unwrap();
    // Bound and never read: queries to it go unanswered, without even an ICMP error.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let dead = silent.local_addr().unwrap();

    let dns = Dns::start(api.client(), vec![dead]).await;
    let started = Instant::now();
    let answer = ask(dns.addr, "www.example.test", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        dns.counter("coredns_dns_responses_total", &[("rcode", "SERVFAIL")]),
        1.0
    );
    dns.stop().await;

    let upstream = upstream().await;
    let dns = Dns::start(api.client(), vec![dead, upstream]).await;
    let answer = ask(dns.addr, "www.example.test", RecordType::A).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer.answers), vec![ip("192.0.2.10")]);
    dns.stop().await;
    drop(silent);
}

#[tokio::test]
async fn binding_a_taken_address_is_a_typed_error() {
    let (services, _services) = reflector::store::<Service>();
    let (slices, _slices) = reflector::store::<EndpointSlice>();
    let taken = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = taken.local_addr().unwrap();
    let dns = ClusterDns::new(
        services,
        slices,
        DnsConfig::new("cluster.local"),
        &prometheus::Registry::new(),
    )
    .unwrap();
    match dns.bind(addr).await {
        Err(DnsError::Bind {
            protocol,
            addr: at,
            source,
        }) => {
            assert_eq!((protocol, at), ("udp", addr));
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse);
        }
        other => panic!("expected a bind error, got {other:?}"),
    }
}
