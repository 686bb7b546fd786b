//! Services across nodes, end to end (root): three "hosts" — network namespaces the test
//! creates, each with its own address on a test bridge — run one `orq agent` each; the
//! control plane (`orq server --no-agent`) and a registry listen on the bridge's address in
//! the machine's namespace. Only the test's own addresses (10.213.0.0/24 and the pods'
//! ranges inside the hosts) are ever used.
//!
//! It shows the service proxy (NodePort from outside, ClusterIP from a pod on another
//! node, readiness and scale-down taking endpoints out at once, a Service without
//! endpoints refusing connections, deleted Services leaving no rules on any node), the pod
//! network across nodes (a pod reaching a pod on another node by IP), cluster DNS, a host
//! cut off the network turning Unknown, and an agent's cleanup leaving nothing behind.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use busybox::{build_image, run_ok, run_with_input};

#[path = "common/busybox.rs"]
mod busybox;

/// The test network: the bridge's address in the machine's namespace, hosts from .11.
const GATEWAY: &str = "10.213.0.1";
const HOSTS: usize = 3;

fn host_ip(i: usize) -> String {
    format!("10.213.0.{}", 11 + i)
}

/// A child process killed (by PID) on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test bed: the bridge, the hosts' namespaces, and everything running in them.
struct Bed {
    dir: tempfile::TempDir,
    tag: String,
    server: Option<Proc>,
    registry: Option<Proc>,
    agents: Vec<Option<Proc>>,
    registry_addr: String,
}

impl Bed {
    fn bridge(&self) -> String {
        format!("orqtb{}", self.tag)
    }

    fn netns(&self, i: usize) -> String {
        format!("orqh{}-{i}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("orqv{}-{i}", self.tag)
    }

    fn nsenter(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns(i)))
            .arg(program);
        cmd
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("server/kubeconfig.yaml")
    }

    fn start() -> Bed {
        let tag = format!("{}", std::process::id() % 100_000);
        let mut bed = Bed {
            dir: tempfile::tempdir().unwrap(),
            tag,
            server: None,
            registry: None,
            agents: Vec::new(),
            registry_addr: format!("{GATEWAY}:5000"),
        };
        let bridge = bed.bridge();
        run_ok(Command::new("ip").args(["link", "add", &bridge, "type", "bridge"]));
        run_ok(Command::new("ip").args(["addr", "add", &format!("{GATEWAY}/24"), "dev", &bridge]));
        run_ok(Command::new("ip").args(["link", "set", &bridge, "up"]));
        for i in 0..HOSTS {
            let (ns, veth) = (bed.netns(i), bed.veth(i));
            run_ok(Command::new("ip").args(["netns", "add", &ns]));
            run_ok(Command::new("ip").args([
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ]));
            run_ok(Command::new("ip").args(["link", "set", &veth, "master", &bridge, "up"]));
            run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
            run_ok(Command::new("ip").args([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/24", host_ip(i)),
                "dev",
                "eth0",
            ]));
            run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "eth0", "up"]));
        }
        bed.start_registry();
        bed.start_server();
        for i in 0..HOSTS {
            bed.start_agent(i);
        }
        bed
    }

    fn start_registry(&mut self) {
        let layout = self.dir.path().join("oci");
        build_image(&layout);
        let config = self.dir.path().join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {}\nlog:\n  level: error\n",
                self.dir.path().join("registry").display(),
                self.registry_addr,
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.registry = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while http_get(&self.registry_addr, "/v2/").is_none() {
            assert!(Instant::now() < deadline, "registry did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        run_ok(
            Command::new("skopeo")
                .args(["copy", "--quiet", "--dest-tls-verify=false"])
                .arg(format!("oci:{}:busybox", layout.display()))
                .arg(format!("docker://{}/busybox:v1", self.registry_addr)),
        );
    }

    fn start_server(&mut self) {
        let port = std::net::TcpListener::bind(format!("{GATEWAY}:0"))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = self.log("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_orq"))
            // A short grace period, so a host cut off turns Unknown within the test.
            .args(["server", "--no-agent", "--node-monitor-grace-period", "25s"])
            .arg("--listen")
            .arg(format!("{GATEWAY}:{port}"))
            .arg("--data-dir")
            .arg(self.dir.path().join("server"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.kubeconfig().exists()
            || self
                .kubectl_try(&["get", "namespace", "default", "-o", "name"])
                .is_none()
        {
            assert!(Instant::now() < deadline, "orq server did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .unwrap()
    }

    fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    fn start_agent(&mut self, i: usize) {
        let log = self.log(&format!("agent-{i}.log"));
        let child = self
            .nsenter(i, env!("CARGO_BIN_EXE_orq"))
            .args([
                "agent",
                "--node-name",
                &format!("h{i}"),
                "--node-ip",
                &host_ip(i),
            ])
            // Agents join as nodes: the node token's kubeconfig.
            .arg("--kubeconfig")
            .arg(self.dir.path().join("server/node-kubeconfig.yaml"))
            .arg("--agent-data-dir")
            .arg(self.agent_dir(i))
            .args(["--agent-listen", &format!("{}:10250", host_ip(i))])
            .args(["--insecure-registry", &self.registry_addr])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        if self.agents.len() <= i {
            self.agents.resize_with(i + 1, || None);
        }
        self.agents[i] = Some(Proc(child));
    }

    fn kubectl_try(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn apply(&self, manifest: &Value) {
        let mut cmd = Command::new("kubectl");
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["apply", "-f", "-"]);
        let out = run_with_input(&mut cmd, manifest.to_string().as_bytes());
        assert!(
            out.status.success(),
            "kubectl apply: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn get(&self, what: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", what, "-o", "json"])).unwrap()
    }

    fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(out) = self.kubectl_try(&["get", what, "-o", "json"])
                && let Ok(v) = serde_json::from_str::<Value>(&out)
                && done(&v)
            {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what} not as expected after {timeout:?}: {}\n{}",
                self.kubectl_try(&["get", what, "-o", "yaml"])
                    .unwrap_or_default(),
                self.logs_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs_tail(&self) -> String {
        let mut out = String::new();
        for name in ["server.log", "agent-0.log", "agent-1.log", "agent-2.log"] {
            let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {name}\n"));
            for line in &lines[lines.len().saturating_sub(15)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }

    /// Cuts host `i` off the network (its link to the bridge goes down): node loss.
    fn cut_off(&self, i: usize) {
        run_ok(Command::new("ip").args(["link", "set", &self.veth(i), "down"]));
    }

    /// Every host's routes and rules, for failure messages.
    fn diagnose(&self) -> String {
        let mut out = String::new();
        for i in 0..HOSTS {
            let routes = self
                .nsenter(i, "ip")
                .args(["-4", "route"])
                .output()
                .unwrap();
            out.push_str(&format!(
                "=== h{i} routes\n{}=== h{i} rules\n{}",
                String::from_utf8_lossy(&routes.stdout),
                self.ruleset(i)
            ));
        }
        out + &self.logs_tail()
    }

    /// The proxy's table on host `i`.
    fn ruleset(&self, i: usize) -> String {
        let out = self
            .nsenter(i, "nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The web pods by name, with their IP and node, that are Running.
    fn web_pods(&self) -> HashMap<String, (String, String, bool)> {
        let list = self.get("pods");
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["metadata"]["labels"]["app"] == "web")
            .map(|p| {
                let ready = p["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                (
                    p["metadata"]["name"].as_str().unwrap().to_owned(),
                    (
                        p["status"]["podIP"].as_str().unwrap_or_default().to_owned(),
                        p["spec"]["nodeName"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        ready && p["metadata"]["deletionTimestamp"].is_null(),
                    ),
                )
            })
            .collect()
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for agent in &mut self.agents {
            agent.take();
        }
        for i in 0..HOSTS {
            let _ = self
                .nsenter(i, env!("CARGO_BIN_EXE_orq"))
                .args(["agent", "--cleanup", "--agent-data-dir"])
                .arg(self.agent_dir(i))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        self.server.take();
        self.registry.take();
        for i in 0..HOSTS {
            let _ = Command::new("ip")
                .args(["link", "del", &self.veth(i)])
                .status();
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns(i)])
                .status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge()])
            .status();
    }
}

/// A plain HTTP/1.0 GET to `addr` (host:port); the body, or `None` on any failure.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.trim().to_owned())
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Counts which pod answered each of `n` requests to `addr`; stops early (with what it
/// has) after 5 failures, so a broken path fails the test quickly.
fn spread(addr: &str, n: usize) -> HashMap<String, usize> {
    let mut seen = HashMap::new();
    for _ in 0..n {
        let body = http_get(addr, "/").unwrap_or_else(|| "<failed>".into());
        *seen.entry(body).or_default() += 1;
        if seen.get("<failed>").is_some_and(|f| *f >= 5) {
            break;
        }
    }
    seen
}

fn web_deployment(registry: &str) -> Value {
    // Serves its pod's name; /ready is the readiness probe, and /cgi-bin/unready removes
    // it, so the test can make one pod fail its readiness.
    let script = "mkdir -p /www/cgi-bin && hostname > /www/index.html && touch /www/ready && \
        printf '#!/bin/sh\\nrm -f /www/ready\\necho Content-Type: text/plain\\necho\\necho unready\\n' \
        > /www/cgi-bin/unready && chmod +x /www/cgi-bin/unready && exec httpd -f -p 8080 -h /www";
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "web", "image": format!("{registry}/busybox:v1"),
                        "command": ["sh", "-c", script],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080},
                                           "periodSeconds": 1, "failureThreshold": 1},
                    }],
                },
            },
        },
    })
}

#[test]
fn services_across_three_nodes() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables");
        return;
    }
    let mut bed = Bed::start();
    let nodes = bed.wait("nodes", Duration::from_secs(60), |v| {
        let items = v["items"].as_array().unwrap();
        items.len() == HOSTS
            && items.iter().all(|n| {
                !n["spec"]["podCIDR"].is_null()
                    && n["status"]["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    eprintln!(
        "nodes Ready: {:?}",
        nodes["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| (n["metadata"]["name"].clone(), n["spec"]["podCIDR"].clone()))
            .collect::<Vec<_>>()
    );

    bed.apply(&web_deployment(&bed.registry_addr));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"port": 80, "targetPort": "http"}]},
    }));
    bed.wait("deployment/web", Duration::from_secs(120), |d| {
        d["status"]["readyReplicas"] == 3
    });
    let pods = bed.web_pods();
    let mut on: Vec<&str> = pods.values().map(|(_, node, _)| node.as_str()).collect();
    on.sort();
    assert_eq!(on, ["h0", "h1", "h2"], "one replica per node: {pods:?}");
    let service = bed.get("service/web");
    let node_port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
    let cluster_ip = service["spec"]["clusterIP"].as_str().unwrap().to_owned();

    // 300 requests from outside to one node's NodePort reach every pod.
    let node_addr = format!("{}:{node_port}", host_ip(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_get(&node_addr, "/").is_none() {
        assert!(
            Instant::now() < deadline,
            "NodePort never answered\n{}",
            bed.ruleset(0)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = spread(&node_addr, 300);
    eprintln!("NodePort {node_addr}: {seen:?}");
    for name in pods.keys() {
        let count = seen.get(name).copied().unwrap_or(0);
        assert!(
            count >= 45,
            "{name} got {count} of 300: {seen:?}\n{}",
            bed.diagnose()
        );
    }
    // On the node itself the node port answers on 127.0.0.1 too, reaching pods on this node
    // and on the others (as kube-proxy's iptables mode does): users try localhost first.
    let local = bed
        .nsenter(0, "curl")
        .arg("-sS")
        .args(["--max-time", "2", "--retry", "3", "--retry-all-errors"])
        .args(["-H", "Connection: close"])
        .args(["-w", "\n"])
        .args((0..12).map(|_| format!("http://127.0.0.1:{node_port}/")))
        .output()
        .unwrap();
    let answered: std::collections::BTreeSet<String> = String::from_utf8_lossy(&local.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect();
    assert!(
        local.status.success()
            && answered.iter().all(|a| pods.contains_key(a))
            && answered.len() >= 2,
        "curl 127.0.0.1:{node_port} on h0: {answered:?} {}\n{}",
        String::from_utf8_lossy(&local.stderr),
        bed.ruleset(0)
    );

    // From a pod on another node: the ClusterIP (300 requests), a pod by IP on another
    // node, and the Service by its DNS name.
    let (remote_name, (remote_ip, _, _)) = pods
        .iter()
        .find(|(_, (_, node, _))| node == "h0")
        .map(|(n, v)| (n.clone(), v.clone()))
        .unwrap();
    // busybox's nc as the HTTP client (its static wget cannot run without NSS files).
    let script = format!(
        "get() {{ printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 $1 $2 | tail -n 1; }}; \
         for i in $(seq 300); do get {cluster_ip} 80 || echo failed; done; \
         echo POD-TO-POD $(get {remote_ip} 8080); \
         echo DNS $(get web.default.svc.cluster.local 80); \
         echo SEARCH $(get web 80); echo END"
    );
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "client", "namespace": "default"},
        "spec": {"nodeName": "h1", "restartPolicy": "Never",
                 "containers": [{"name": "client",
                                 "image": format!("{}/busybox:v1", bed.registry_addr),
                                 "command": ["sh", "-c", script]}]},
    }));
    bed.wait("pod/client", Duration::from_secs(120), |p| {
        p["status"]["phase"] == "Succeeded" || p["status"]["phase"] == "Failed"
    });
    let log = bed.kubectl(&["logs", "client"]);
    let mut through_cluster_ip: HashMap<&str, usize> = HashMap::new();
    for line in log.lines().take(300) {
        *through_cluster_ip.entry(line.trim()).or_default() += 1;
    }
    eprintln!("ClusterIP {cluster_ip} from h1: {through_cluster_ip:?}");
    for name in pods.keys() {
        let count = through_cluster_ip.get(name.as_str()).copied().unwrap_or(0);
        assert!(
            count >= 45,
            "{name} got {count} of 300 through the ClusterIP: {log}"
        );
    }
    assert!(
        log.contains(&format!("POD-TO-POD {remote_name}")),
        "pod on h1 reaching {remote_ip} on h0: {log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("DNS web-")),
        "web.default.svc.cluster.local from a pod: {log}"
    );
    assert!(
        log.lines().any(|l| l.starts_with("SEARCH web-")),
        "`web` through the pod's search path: {log}"
    );

    // A pod failing its readiness gets no traffic.
    let (unready_name, (unready_ip, _, _)) = pods
        .iter()
        .find(|(_, (_, node, _))| node == "h2")
        .map(|(n, v)| (n.clone(), v.clone()))
        .unwrap();
    let out = bed
        .nsenter(0, "curl")
        .args([
            "-s",
            "-m",
            "2",
            &format!("http://{unready_ip}:8080/cgi-bin/unready"),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("unready"));
    bed.wait(
        &format!("pod/{unready_name}"),
        Duration::from_secs(20),
        |p| {
            p["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "False")
        },
    );
    // The slice change reaches the proxies a moment after the pod's status.
    std::thread::sleep(Duration::from_secs(1));
    let seen = spread(&node_addr, 100);
    assert!(
        !seen.contains_key(&unready_name),
        "{unready_name} is not ready but got traffic: {seen:?}"
    );
    assert_eq!(seen.values().sum::<usize>(), 100, "{seen:?}");

    // Scaled to one replica: removed pods get no traffic a second later.
    bed.kubectl(&["scale", "deployment", "web", "--replicas=1"]);
    let scaled = Instant::now();
    let mut answers = Vec::new();
    while scaled.elapsed() < Duration::from_secs(4) {
        if let Some(body) = http_get(&node_addr, "/") {
            answers.push((scaled.elapsed(), body));
        }
    }
    let remaining: Vec<String> = bed
        .web_pods()
        .into_iter()
        .filter(|(_, (_, _, live))| *live)
        .map(|(name, _)| name)
        .collect();
    let late: Vec<&(Duration, String)> = answers
        .iter()
        .filter(|(at, body)| *at > Duration::from_secs(1) && !remaining.contains(body))
        .collect();
    assert!(
        late.is_empty(),
        "removed pods answered more than 1 s after the scale-down: {late:?} (remaining {remaining:?})"
    );
    assert!(
        answers.iter().any(|(at, _)| *at > Duration::from_secs(1)),
        "the remaining pod answers"
    );

    // A Service selecting nothing, and one whose named targetPort no pod defines, refuse
    // connections at once.
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "nothing", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "none"}, "ports": [{"port": 80}]},
    }));
    bed.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "misnamed", "namespace": "default"},
        "spec": {"type": "NodePort", "selector": {"app": "web"},
                 "ports": [{"port": 80, "targetPort": "nope"}]},
    }));
    let mut refusing_ports = Vec::new();
    for name in ["nothing", "misnamed"] {
        let service = bed.get(&format!("service/{name}"));
        let port = service["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        refusing_ports.push(port);
        let addr: SocketAddr = format!("{}:{port}", host_ip(1)).parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let begun = Instant::now();
            let result = TcpStream::connect_timeout(&addr, Duration::from_secs(3));
            let took = begun.elapsed();
            if let Err(e) = &result
                && e.kind() == std::io::ErrorKind::ConnectionRefused
            {
                assert!(
                    took < Duration::from_millis(500),
                    "{name}: refused only after {took:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} at {addr}: {result:?} after {took:?}\n{}",
                bed.ruleset(1)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Deleting the Services removes their rules from every node.
    bed.kubectl(&["delete", "service", "web", "nothing", "misnamed"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    for i in 0..HOSTS {
        loop {
            let rules = bed.ruleset(i);
            let stale = rules.contains(&cluster_ip)
                || rules.contains(&format!(". {node_port} :"))
                || refusing_ports
                    .iter()
                    .any(|p| rules.contains(&format!(". {p} :")))
                // The server's own `kubernetes` Service keeps its chains.
                || ["web", "nothing", "misnamed"]
                    .iter()
                    .any(|svc| rules.contains(&format!("-default/{svc}/")));
            if !stale {
                assert!(rules.contains("table ip orquestra-proxy"), "{rules}");
                break;
            }
            assert!(Instant::now() < deadline, "h{i} kept rules:\n{rules}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // The agents joined with the node token, under RBAC: the bootstrap system:node role let
    // them do all of the above without one refusal.
    let metrics = bed.kubectl(&["get", "--raw", "/metrics"]);
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("apiserver_request_total{") && l.contains(r#"code="403""#)),
        "{metrics}"
    );

    // A host cut off the network: its node stops renewing its lease and turns Unknown.
    bed.cut_off(2);
    bed.wait("node/h2", Duration::from_secs(60), |n| {
        n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "Unknown")
    });

    // Told to clean up, an agent leaves nothing of its own behind.
    bed.agents[0].take();
    run_ok(
        bed.nsenter(0, env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--cleanup", "--agent-data-dir"])
            .arg(bed.agent_dir(0)),
    );
    let rules = bed.ruleset(0);
    assert!(rules.trim().is_empty(), "left after cleanup:\n{rules}");
    let routes = bed.nsenter(0, "ip").args(["-4", "route"]).output().unwrap();
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        !routes.contains("proto 211") && !routes.contains("orq0"),
        "left after cleanup:\n{routes}"
    );
}
