//! One test "host" for the real-container tests: a network namespace with a registry
//! serving the busybox test image and an `orq server` with its node agent, driven by the
//! real kubectl. Shared by the container tests (included by path).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::busybox::{build_image, run_ok, run_with_input};

/// The test image, as pushed to the registry in each test host.
pub const IMAGE: &str = "127.0.0.1:5000/busybox:v1";

/// A network namespace, deleted on drop.
pub struct Netns(pub String);

impl Netns {
    pub fn create(tag: &str) -> Netns {
        let name = format!("orqtest-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        run_ok(Command::new("ip").args(["-n", &name, "link", "set", "lo", "up"]));
        Netns(name)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A child process killed (by PID) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One "host": a namespace with a registry serving the test image and an `orq server`.
pub struct Host {
    pub server: Option<Proc>,
    pub registry: Option<Proc>,
    pub netns: Netns,
    pub dir: tempfile::TempDir,
    /// The server's `--listen`.
    pub listen: &'static str,
}

impl Host {
    pub fn start(tag: &str) -> Host {
        Host::start_listening(tag, "127.0.0.1:6443", |_| {})
    }

    /// A host whose server listens on `listen`, after `prepare` has set up its namespace.
    pub fn start_listening(tag: &str, listen: &'static str, prepare: impl FnOnce(&Netns)) -> Host {
        Host::start_with(tag, listen, prepare, &[])
    }

    /// [`Host::start_listening`], the server started with `server_args` too.
    pub fn start_with(
        tag: &str,
        listen: &'static str,
        prepare: impl FnOnce(&Netns),
        server_args: &[&str],
    ) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let netns = Netns::create(tag);
        prepare(&netns);
        let mut host = Host {
            server: None,
            registry: None,
            netns,
            dir,
            listen,
        };
        build_image(&host.dir.path().join("oci"));
        host.start_registry();
        host.nsenter("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!(
                "oci:{}:busybox",
                host.dir.path().join("oci").display()
            ))
            .arg(format!("docker://{IMAGE}"))
            .output()
            .map(|o| {
                assert!(
                    o.status.success(),
                    "skopeo: {}",
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap();
        host.start_server_with(server_args);
        host
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn nsenter(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns.path())).arg(program);
        cmd
    }

    pub fn start_registry(&mut self) {
        let config = self.dir.path().join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 0.0.0.0:5000\nlog:\n  level: error\n",
                self.dir.path().join("registry").display()
            ),
        )
        .unwrap();
        let child = self
            .nsenter("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.registry = Some(Proc(child));
        self.wait_http("http://127.0.0.1:5000/v2/");
    }

    pub fn start_server(&mut self) {
        self.start_server_with(&[]);
    }

    pub fn start_server_with(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let child = self
            .nsenter(env!("CARGO_BIN_EXE_orq"))
            .args(["server", "--listen", self.listen, "--node-name", "n1"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.server = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.data_dir().join("kubeconfig.yaml").exists()
            || !self
                .kubectl_try(&["get", "node", "n1", "-o", "name"])
                .is_some_and(|o| o.contains("n1"))
        {
            assert!(Instant::now() < deadline, "orq server did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs the server (and so its node agent).
    pub fn kill_server(&mut self) {
        if let Some(mut p) = self.server.take() {
            p.0.kill().unwrap();
            p.0.wait().unwrap();
        }
    }

    pub fn wait_http(&self, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.curl(url).is_none() {
            assert!(Instant::now() < deadline, "{url} did not answer");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GETs `url` from inside the host namespace.
    pub fn curl(&self, url: &str) -> Option<String> {
        let out = self
            .nsenter("curl")
            .args(["-sf", "--max-time", "3", url])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kubectl_try(&self, args: &[&str]) -> Option<String> {
        let out = self
            .nsenter("kubectl")
            .arg("--kubeconfig")
            .arg(self.data_dir().join("kubeconfig.yaml"))
            .args(args)
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        let run = || {
            self.nsenter("kubectl")
                .arg("--kubeconfig")
                .arg(self.data_dir().join("kubeconfig.yaml"))
                .args(args)
                .output()
                .unwrap()
        };
        let mut out = run();
        // kubectl 1.32 (this machine's) starts reading an exec's WebSocket before it has set
        // up its streams, so output arriving in that window is dropped ("Unknown stream id 1,
        // discarding message") and the exec fails; newer client-go (the conformance build's)
        // waits for its streams first. Under load the window is hit now and then: an exec
        // that lost its streams that way runs once more.
        if args.first() == Some(&"exec")
            && !out.status.success()
            && String::from_utf8_lossy(&out.stderr).contains("Unknown stream id")
        {
            out = run();
        }
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn apply(&self, manifest: &Value) {
        let mut kubectl = self.nsenter("kubectl");
        kubectl
            .arg("--kubeconfig")
            .arg(self.data_dir().join("kubeconfig.yaml"))
            .args(["apply", "-f", "-"]);
        run_with_input(&mut kubectl, manifest.to_string().as_bytes());
    }

    /// `kubectl apply` of `manifest`, or what kubectl said when it failed.
    pub fn apply_try(&self, manifest: &Value) -> Result<(), String> {
        use std::io::Write;
        let mut child = self
            .nsenter("kubectl")
            .arg("--kubeconfig")
            .arg(self.data_dir().join("kubeconfig.yaml"))
            .args(["apply", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(manifest.to_string().as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn pod(&self, name: &str) -> Value {
        serde_json::from_str(&self.kubectl(&["get", "pod", name, "-o", "json"])).unwrap()
    }

    /// Polls the pod until `done` holds; panics with the last status after `timeout`.
    pub fn wait_pod(&self, name: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let pod = self.pod(name);
            if done(&pod) {
                return pod;
            }
            assert!(
                Instant::now() < deadline,
                "pod {name} did not get there in {timeout:?}: {:#}\nserver log:\n{}",
                pod["status"],
                self.server_log_tail()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn server_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.kill_server();
        // Containers outlive their agent by design: stop them, and remove the pods' mounts,
        // namespaces and the node network, with the agent's own cleanup.
        let _ = self
            .nsenter(env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--cleanup", "--agent-data-dir"])
            .arg(self.data_dir().join("agent"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.registry.take();
    }
}

pub fn pod_manifest(name: &str, policy: &str, command: Option<&[&str]>, extra: Value) -> Value {
    let mut container = serde_json::json!({"name": "main", "image": IMAGE});
    if let Some(command) = command {
        container["command"] = serde_json::json!(command);
    }
    if let Some(obj) = extra.as_object() {
        for (k, v) in obj {
            container[k] = v.clone();
        }
    }
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"nodeName": "n1", "restartPolicy": policy, "terminationGracePeriodSeconds": 5,
                 "containers": [container]},
    })
}

pub fn phase(pod: &Value) -> &str {
    pod["status"]["phase"].as_str().unwrap_or("")
}

pub fn state(pod: &Value) -> &Value {
    &pod["status"]["containerStatuses"][0]["state"]
}
