//! The built-in ingress end to end on the three-host test bed (root; `common/bed.rs`, network
//! 10.215.0.0/24): two Deployments behind Services, one Ingress routing two hosts (and an
//! `Exact` path of one to the other Deployment) plus a TLS host whose certificate (made here
//! with rcgen) is in a `kubernetes.io/tls` Secret; requests from the machine's namespace to
//! every host's address on ports 80 and 443 with `Host` headers and SNI (`curl --resolve`).
//! The Ingress' status lists the three nodes. The bad input: an Ingress whose backend
//! Service does not exist answers 503 naming the route, with one `BackendNotFound` event
//! however many requests fail. A port the ingress wants that another process holds leaves
//! the node Ready, and is taken once freed.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "common/bed.rs"]
mod bed;
#[path = "common/busybox.rs"]
mod busybox;

use bed::{Bed, HOSTS, Proc, is_root};

/// A Deployment `name` of `replicas` busybox pods serving their pod name at `/` and
/// `/version` on port 8080 (named `http`).
fn site(name: &str, registry: &str, replicas: u32) -> Value {
    let script = "mkdir -p /www && hostname > /www/index.html && hostname > /www/version && \
                  exec httpd -f -p 8080 -h /www";
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web", "image": format!("{registry}/busybox:v1"),
                        "command": ["sh", "-c", script],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/", "port": 8080},
                                           "periodSeconds": 1},
                    }],
                },
            },
        },
    })
}

/// `curl -s` with `args`: the status code and the body.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    match code.trim().parse().unwrap_or(0) {
        // No answer: say why (curl's error) in the body.
        0 => (0, String::from_utf8_lossy(&out.stderr).into_owned()),
        code => (code, body.to_owned()),
    }
}

/// A plain HTTP GET of `http://HOST/PATH` sent to host `i` of the bed.
fn get(bed: &Bed, i: usize, host: &str, path: &str) -> (u16, String) {
    curl(&[
        "--resolve",
        &format!("{host}:80:{}", bed.host_ip(i)),
        &format!("http://{host}{path}"),
    ])
}

/// Retries `request` until `done` holds for its answer (routes reach every agent within
/// moments of a change); the last answer.
fn until(
    what: &str,
    bed: &Bed,
    request: impl Fn() -> (u16, String),
    done: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = request();
        if done(status, &body) {
            return (status, body);
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body:?}\n{}\n{}",
            bed.logs_tail(),
            std::fs::read_to_string(bed.dir.path().join("agent-0.log"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn ingress_routes_hosts_paths_and_tls_to_two_deployments() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables");
        return;
    }
    let mut bed = Bed::start(215);
    bed.wait("nodes", Duration::from_secs(60), |v| {
        let items = v["items"].as_array().unwrap();
        items.len() == HOSTS
            && items.iter().all(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    // The class the server creates, the default one.
    let class = bed.wait("ingressclass/orquestra", Duration::from_secs(30), |_| true);
    assert_eq!(class["spec"]["controller"], "orquestra.dev/ingress");
    assert_eq!(
        class["metadata"]["annotations"]["ingressclass.kubernetes.io/is-default-class"],
        "true"
    );

    bed.apply(&site("web", &bed.registry_addr, 2));
    bed.apply(&site("api", &bed.registry_addr, 2));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "api", "namespace": "default"},
        "spec": {"selector": {"app": "api"},
                 "ports": [{"name": "http", "port": 8080, "targetPort": "http"}]},
    }));

    // The TLS host's certificate, signed by a CA the client trusts.
    // Distinct subjects: OpenSSL takes a certificate whose issuer is its own subject for a
    // self-signed one (rcgen names both "rcgen self signed cert" by default).
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ingress test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["secure.example.com".to_owned()]).unwrap();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "secure.example.com");
    let cert = params.signed_by(&key, &ca).unwrap();
    let ca_file = bed.dir.path().join("ingress-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": "secure-tls", "namespace": "default"},
        "stringData": {"tls.crt": cert.pem(), "tls.key": key.serialize_pem()},
    }));

    // No ingressClassName: admission gives it the default class.
    let path = |path: &str, kind: &str, service: Value| json!({"path": path, "pathType": kind, "backend": {"service": service}});
    bed.apply(&json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "site", "namespace": "default"},
        "spec": {
            "tls": [{"hosts": ["secure.example.com"], "secretName": "secure-tls"}],
            "rules": [
                {"host": "web.example.com", "http": {"paths": [
                    path("/", "Prefix", json!({"name": "web", "port": {"number": 80}})),
                    path("/version", "Exact", json!({"name": "api", "port": {"name": "http"}})),
                ]}},
                {"host": "api.example.com", "http": {"paths": [
                    path("/", "ImplementationSpecific", json!({"name": "api", "port": {"number": 8080}})),
                ]}},
                {"host": "secure.example.com", "http": {"paths": [
                    path("/", "Prefix", json!({"name": "web", "port": {"number": 80}})),
                ]}},
            ],
        },
    }));
    let site = bed.get("ingress/site");
    assert_eq!(site["spec"]["ingressClassName"], "orquestra");
    bed.wait("deployment/web", Duration::from_secs(120), |d| {
        d["status"]["readyReplicas"] == 2
    });
    bed.wait("deployment/api", Duration::from_secs(120), |d| {
        d["status"]["readyReplicas"] == 2
    });

    // Status: every node's address.
    let mut addresses: Vec<String> = (0..HOSTS).map(|i| bed.host_ip(i)).collect();
    addresses.sort();
    bed.wait("ingress/site", Duration::from_secs(30), |i| {
        let mut ips: Vec<String> = i["status"]["loadBalancer"]["ingress"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["ip"].as_str().map(str::to_owned))
            .collect();
        ips.sort();
        ips == addresses
    });

    // Every node routes both hosts and the Exact path; both pods of a Deployment answer.
    for i in 0..HOSTS {
        let (_, body) = until(
            "web.example.com",
            &bed,
            || get(&bed, i, "web.example.com", "/"),
            |s, b| s == 200 && b.starts_with("web-"),
        );
        eprintln!("h{i} web.example.com/ -> {body}");
        let (_, body) = until(
            "web.example.com/version",
            &bed,
            || get(&bed, i, "web.example.com", "/version"),
            |s, b| s == 200 && b.starts_with("api-"),
        );
        eprintln!("h{i} web.example.com/version -> {body}");
        until(
            "api.example.com",
            &bed,
            || get(&bed, i, "api.example.com", "/index.html"),
            |s, b| s == 200 && b.starts_with("api-"),
        );
    }
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..8 {
        let (status, body) = get(&bed, 0, "web.example.com", "/");
        assert_eq!(status, 200, "{body}");
        pods.insert(body.trim().to_owned());
    }
    assert_eq!(pods.len(), 2, "round robin over both web pods: {pods:?}");
    // `/version/x` is not the Exact path: the Prefix `/` takes it (httpd has no such file).
    let (status, body) = get(&bed, 1, "web.example.com", "/version/x");
    assert_eq!(status, 404, "{body}");
    assert!(!body.contains("default backend"), "{body}");
    // No rule for the host, no default backend.
    let (status, body) = get(&bed, 1, "other.example.com", "/");
    assert_eq!((status, body.as_str()), (404, "default backend - 404\n"));

    // HTTPS with SNI, the certificate verified against the CA.
    for i in 0..HOSTS {
        let ca = ca_file.to_str().unwrap().to_owned();
        let (_, body) = until(
            "https://secure.example.com",
            &bed,
            || {
                curl(&[
                    "--cacert",
                    &ca,
                    "--resolve",
                    &format!("secure.example.com:443:{}", bed.host_ip(i)),
                    "https://secure.example.com/",
                ])
            },
            |s, b| s == 200 && b.starts_with("web-"),
        );
        eprintln!("h{i} https://secure.example.com/ -> {body}");
    }

    // The bad input: a backend Service that does not exist.
    bed.apply(&json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"rules": [{"host": "broken.example.com", "http": {"paths": [
            path("/shop", "Prefix", json!({"name": "missing", "port": {"number": 80}})),
        ]}}]},
    }));
    let (_, body) = until(
        "broken.example.com",
        &bed,
        || get(&bed, 2, "broken.example.com", "/shop/cart"),
        |s, _| s == 503,
    );
    assert_eq!(
        body,
        "503 Service Unavailable: ingress default/broken, host broken.example.com, path /shop, \
         service missing:80: service default/missing not found\n"
    );
    for i in 0..HOSTS {
        for _ in 0..3 {
            assert_eq!(get(&bed, i, "broken.example.com", "/shop").0, 503);
        }
    }
    let events = |bed: &Bed| -> Vec<Value> {
        bed.get("events")["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == "broken" && e["reason"] == "BackendNotFound")
            .cloned()
            .collect()
    };
    bed.wait("events", Duration::from_secs(30), |_| {
        !events(&bed).is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    let warned = events(&bed);
    assert_eq!(
        warned.len(),
        1,
        "one event, not one per request: {warned:?}"
    );
    assert_eq!(warned[0]["type"], "Warning");
    assert_eq!(
        warned[0]["message"],
        "service default/missing not found (host broken.example.com, path /shop): its requests are answered 503"
    );

    // A port held by another process: the node stays Ready, the other port serves, and the
    // ingress takes the port once it is free.
    bed.agents[2].take();
    let holder = bed
        .nsenter(2, "busybox")
        .args(["httpd", "-f", "-p", "80", "-h"])
        .arg(bed.dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let holder = Proc(holder);
    until(
        "busybox httpd on h2 port 80",
        &bed,
        || get(&bed, 2, "web.example.com", "/"),
        |s, _| s == 404,
    );
    bed.start_agent(2);
    let ca = ca_file.to_str().unwrap().to_owned();
    until(
        "https on h2 while port 80 is held",
        &bed,
        || {
            curl(&[
                "--cacert",
                &ca,
                "--resolve",
                &format!("secure.example.com:443:{}", bed.host_ip(2)),
                "https://secure.example.com/",
            ])
        },
        |s, b| s == 200 && b.starts_with("web-"),
    );
    let log = std::fs::read_to_string(bed.dir.path().join("agent-2.log")).unwrap();
    assert!(
        log.contains("ingress cannot listen for HTTP"),
        "the agent says why port 80 is not served:\n{}",
        bed.logs_tail()
    );
    bed.wait("node/h2", Duration::from_secs(30), |n| {
        n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    assert_ne!(
        get(&bed, 2, "web.example.com", "/").0,
        200,
        "busybox holds port 80"
    );
    drop(holder);
    until(
        "h2 port 80 once freed",
        &bed,
        || get(&bed, 2, "web.example.com", "/"),
        |s, b| s == 200 && b.starts_with("web-"),
    );
}
