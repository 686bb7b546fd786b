//! The three-host network test bed (root): network namespaces the test creates, each with
//! its own address on a test bridge, run one `orq agent` each; the control plane (`orq server
//! --no-agent`) and a registry listen on the bridge's address in the machine's namespace.
//! Only the bed's own addresses (10.NET.0.0/24, NET picked per test, and the pods' ranges
//! inside the hosts) are ever used. Shared by the multi-node and network tests.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::busybox::{build_image, run_ok, run_with_input};

/// How many hosts a bed has.
pub const HOSTS: usize = 3;

/// A child process killed (by PID) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The test bed: the bridge, the hosts' namespaces, and everything running in them.
pub struct Bed {
    pub dir: tempfile::TempDir,
    pub tag: String,
    /// The bed's network is 10.NET.0.0/24: each test binary running a bed at the same
    /// time as another picks its own.
    pub net: u8,
    pub server: Option<Proc>,
    pub registry: Option<Proc>,
    pub agents: Vec<Option<Proc>>,
    pub registry_addr: String,
    /// Extra arguments for `orq server` and for every `orq agent`.
    pub server_args: Vec<String>,
    pub agent_args: Vec<String>,
}

impl Bed {
    /// The bridge's address in the machine's namespace (the server and registry listen on it).
    pub fn gateway(&self) -> String {
        format!("10.{}.0.1", self.net)
    }

    /// Host `i`'s address; hosts start at .11.
    pub fn host_ip(&self, i: usize) -> String {
        format!("10.{}.0.{}", self.net, 11 + i)
    }

    pub fn bridge(&self) -> String {
        format!("orqtb{}", self.tag)
    }

    pub fn netns(&self, i: usize) -> String {
        format!("orqh{}-{i}", self.tag)
    }

    pub fn veth(&self, i: usize) -> String {
        format!("orqv{}-{i}", self.tag)
    }

    pub fn nsenter(&self, i: usize, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.netns(i)))
            .arg(program);
        cmd
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("server/kubeconfig.yaml")
    }

    /// A bed on 10.`net`.0.0/24, its server and agents running.
    pub fn start(net: u8) -> Bed {
        Bed::start_with(net, &[], &[])
    }

    /// [`Bed::start`] with extra arguments for the server and the agents.
    pub fn start_with(net: u8, server_args: &[&str], agent_args: &[&str]) -> Bed {
        let tag = format!("{}", std::process::id() % 100_000);
        let mut bed = Bed {
            dir: tempfile::tempdir().unwrap(),
            tag,
            net,
            server: None,
            registry: None,
            agents: Vec::new(),
            registry_addr: format!("10.{net}.0.1:5000"),
            server_args: server_args.iter().map(|s| (*s).to_owned()).collect(),
            agent_args: agent_args.iter().map(|s| (*s).to_owned()).collect(),
        };
        let hosts: Vec<(String, String, String)> = (0..HOSTS)
            .map(|i| (bed.netns(i), bed.veth(i), bed.host_ip(i)))
            .collect();
        wire_hosts(&bed.bridge(), &bed.gateway(), &hosts);
        bed.start_registry();
        bed.start_server();
        for i in 0..HOSTS {
            bed.start_agent(i);
        }
        bed
    }

    pub fn start_registry(&mut self) {
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

    pub fn start_server(&mut self) {
        let port = std::net::TcpListener::bind(format!("{}:0", self.gateway()))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = self.log("server.log");
        let child = Command::new(env!("CARGO_BIN_EXE_orq"))
            // A short grace period, so a host cut off turns Unknown within the test.
            .args(["server", "--no-agent", "--node-monitor-grace-period", "25s"])
            .arg("--listen")
            .arg(format!("{}:{port}", self.gateway()))
            .args(&self.server_args)
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

    pub fn log(&self, name: &str) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(name))
            .unwrap()
    }

    pub fn agent_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("agent-{i}"))
    }

    pub fn start_agent(&mut self, i: usize) {
        let log = self.log(&format!("agent-{i}.log"));
        let child = self
            .nsenter(i, env!("CARGO_BIN_EXE_orq"))
            .args([
                "agent",
                "--node-name",
                &format!("h{i}"),
                "--node-ip",
                &self.host_ip(i),
            ])
            // Agents join as nodes: the node token's kubeconfig.
            .arg("--kubeconfig")
            .arg(self.dir.path().join("server/node-kubeconfig.yaml"))
            .arg("--agent-data-dir")
            .arg(self.agent_dir(i))
            .args(["--agent-listen", &format!("{}:10250", self.host_ip(i))])
            .args(["--insecure-registry", &self.registry_addr])
            .args(&self.agent_args)
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

    pub fn kubectl_try(&self, args: &[&str]) -> Option<String> {
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

    pub fn kubectl(&self, args: &[&str]) -> String {
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

    pub fn apply(&self, manifest: &Value) {
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

    pub fn get(&self, what: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", what, "-o", "json"])).unwrap()
    }

    pub fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
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

    pub fn logs_tail(&self) -> String {
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
    pub fn cut_off(&self, i: usize) {
        run_ok(Command::new("ip").args(["link", "set", &self.veth(i), "down"]));
    }

    /// Every host's routes and rules, for failure messages.
    pub fn diagnose(&self) -> String {
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
    pub fn ruleset(&self, i: usize) -> String {
        let out = self
            .nsenter(i, "nft")
            .args(["list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The web pods by name, with their IP and node, that are Running.
    pub fn web_pods(&self) -> HashMap<String, (String, String, bool)> {
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

/// Creates the bridge `bridge` with address `gateway`/24 in the machine's namespace and, for
/// each `(namespace, veth, address)`, a network namespace whose `eth0` (at `address`/24) is
/// the peer of `veth` on the bridge. The caller deletes them.
pub fn wire_hosts(bridge: &str, gateway: &str, hosts: &[(String, String, String)]) {
    run_ok(Command::new("ip").args(["link", "add", bridge, "type", "bridge"]));
    run_ok(Command::new("ip").args(["addr", "add", &format!("{gateway}/24"), "dev", bridge]));
    run_ok(Command::new("ip").args(["link", "set", bridge, "up"]));
    for (ns, veth, address) in hosts {
        run_ok(Command::new("ip").args(["netns", "add", ns]));
        run_ok(Command::new("ip").args([
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]));
        run_ok(Command::new("ip").args(["link", "set", veth, "master", bridge, "up"]));
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", "lo", "up"]));
        run_ok(Command::new("ip").args([
            "-n",
            ns,
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            "eth0",
        ]));
        run_ok(Command::new("ip").args(["-n", ns, "link", "set", "eth0", "up"]));
    }
}

/// A plain HTTP/1.0 GET to `addr` (host:port); the body, or `None` on any failure.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().ok()?;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.trim().to_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Counts which pod answered each of `n` requests to `addr`; stops early (with what it
/// has) after 5 failures, so a broken path fails the test quickly.
pub fn spread(addr: &str, n: usize) -> HashMap<String, usize> {
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

pub fn web_deployment(registry: &str) -> Value {
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
