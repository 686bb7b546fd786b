//! Container probes — liveness, readiness and startup; exec, httpGet and tcpSocket — with
//! the kubelet's timing: `initialDelaySeconds` after the container starts, every
//! `periodSeconds`, each try bounded by `timeoutSeconds`, and a result flips only after
//! `successThreshold`/`failureThreshold` consecutive tries agree.
//!
//! Exec probes run inside the container through the shim (`orq shim-exec`, libcontainer's
//! tenant containers — the same single-threaded rule as creating containers).

use std::ffi::OsString;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Restarts the container when it fails.
    Liveness,
    /// Decides the container's (and pod's) Ready.
    Readiness,
    /// Holds the other two back until it succeeds once.
    Startup,
}

impl Kind {
    /// As the kubelet's events name it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
            Kind::Startup => "Startup",
        }
    }

    /// The container's probe of this kind.
    pub fn of(self, c: &Container) -> Option<&Probe> {
        match self {
            Kind::Liveness => c.liveness_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
            Kind::Startup => c.startup_probe.as_ref(),
        }
    }
}

/// One probe's running state for one container attempt.
#[derive(Clone, Debug)]
pub struct Tracker {
    /// The current verdict.
    pub passing: bool,
    successes: i32,
    failures: i32,
    /// When the next try is due.
    pub due: Instant,
    /// The last failure's message, for events.
    pub message: String,
}

impl Tracker {
    /// A tracker for a container that started at `started`: the first try after the initial
    /// delay; readiness starts failing, liveness and startup passing (they have not failed).
    pub fn new(kind: Kind, probe: &Probe, started: Instant) -> Self {
        Tracker {
            passing: kind != Kind::Readiness && kind != Kind::Startup,
            successes: 0,
            failures: 0,
            due: started + secs(probe.initial_delay_seconds, 0),
            message: String::new(),
        }
    }

    /// Records one try's outcome; returns whether the verdict changed.
    pub fn record(&mut self, probe: &Probe, outcome: Result<(), String>, now: Instant) -> bool {
        self.due = now + secs(probe.period_seconds, 10);
        let before = self.passing;
        match outcome {
            Ok(()) => {
                self.failures = 0;
                self.successes += 1;
                if self.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                    self.passing = true;
                }
            }
            Err(message) => {
                self.successes = 0;
                self.failures += 1;
                self.message = message;
                if self.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                    self.passing = false;
                }
            }
        }
        before != self.passing
    }
}

fn secs(value: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(value.map_or(default, |v| v.max(0) as u64))
}

/// Where and how to run a probe.
#[derive(Clone, Debug)]
pub struct Target {
    /// The pod's address (the node's for `hostNetwork`).
    pub pod_ip: String,
    /// The shim command for exec probes (program, then arguments selecting exec mode).
    pub shim_exec: Vec<OsString>,
    /// libcontainer's state root.
    pub state_root: std::path::PathBuf,
    /// The container's runtime ID.
    pub container_id: String,
}

/// Runs one try of `probe`; `Err` carries the failure, as the kubelet words it.
pub async fn run(probe: &Probe, container: &Container, target: &Target) -> Result<(), String> {
    let timeout = secs(probe.timeout_seconds, 1).max(Duration::from_secs(1));
    let attempt = async {
        if let Some(exec) = &probe.exec {
            exec_probe(exec.command.clone().unwrap_or_default(), target, timeout).await
        } else if let Some(http) = &probe.http_get {
            let host = http.host.clone().unwrap_or_else(|| target.pod_ip.clone());
            let port = port(&http.port, container)?;
            let path = http.path.clone().unwrap_or_else(|| "/".into());
            let headers: Vec<(String, String)> = http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect();
            if http.scheme.as_deref() == Some("HTTPS") {
                return Err("HTTPS probes are not supported yet".into());
            }
            let code = http_get(&host, port, &path, &headers).await?;
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        } else if let Some(tcp) = &probe.tcp_socket {
            let host = tcp.host.clone().unwrap_or_else(|| target.pod_ip.clone());
            let port = port(&tcp.port, container)?;
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map(|_| ())
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))
        } else if probe.grpc.is_some() {
            Err("gRPC probes are not supported yet".into())
        } else {
            Err("the probe has no handler".into())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}s", timeout.as_secs())),
    }
}

/// A port number, or a named `containerPort`.
pub(crate) fn port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| format!("invalid port {n}")),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("the container has no port named {name:?}")),
    }
}

/// GET `http://host:port/path`: the answer's status code.
pub(crate) async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String> {
    let url = format!("http://{host}:{port}{path}");
    let mut stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("Get \"{url}\": dial tcp: {e}"))?;
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut head = vec![0u8; 1024];
    let mut read = 0;
    while read < head.len() {
        let n = stream
            .read(&mut head[read..])
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
        if n == 0 || head[..read + n].windows(2).any(|w| w == b"\r\n") {
            read += n;
            break;
        }
        read += n;
    }
    let line = String::from_utf8_lossy(&head[..read]);
    let code: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("Get \"{url}\": malformed HTTP response"))?;
    Ok(code)
}

/// Runs `command` in the container through the shim; exit 0 passes.
pub(crate) async fn exec_probe(
    command: Vec<String>,
    target: &Target,
    timeout: Duration,
) -> Result<(), String> {
    let Some((program, prefix)) = target.shim_exec.split_first() else {
        return Err("no shim configured".into());
    };
    if command.is_empty() {
        return Err("the exec probe has no command".into());
    }
    let output = tokio::process::Command::new(program)
        .args(prefix)
        .arg("--root")
        .arg(&target.state_root)
        .arg("--id")
        .arg(&target.container_id)
        .arg("--timeout-ms")
        .arg(timeout.as_millis().to_string())
        .arg("--")
        .args(&command)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("running the exec probe: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        let mut message = String::from_utf8_lossy(&output.stdout).into_owned();
        message.push_str(&String::from_utf8_lossy(&output.stderr));
        Err(format!(
            "command {:?} exited with {}: {}",
            command.join(" "),
            output.status.code().unwrap_or(-1),
            message.trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(json: serde_json::Value) -> Probe {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn thresholds_flip_the_verdict() {
        let p = probe(
            serde_json::json!({"failureThreshold": 2, "successThreshold": 2, "periodSeconds": 1}),
        );
        let now = Instant::now();
        let mut t = Tracker::new(Kind::Readiness, &p, now);
        assert!(!t.passing);
        assert!(!t.record(&p, Ok(()), now));
        assert!(t.record(&p, Ok(()), now), "two successes make it ready");
        assert!(!t.record(&p, Err("x".into()), now));
        assert!(
            t.record(&p, Err("x".into()), now),
            "two failures make it unready"
        );
        assert_eq!(t.due, now + Duration::from_secs(1));
        let live = Tracker::new(Kind::Liveness, &p, now);
        assert!(live.passing);
    }

    #[test]
    fn named_ports() {
        let c: Container = serde_json::from_value(serde_json::json!({
            "name": "c", "ports": [{"name": "http", "containerPort": 8080}]
        }))
        .unwrap();
        assert_eq!(port(&IntOrString::String("http".into()), &c), Ok(8080));
        assert!(port(&IntOrString::String("nope".into()), &c).is_err());
        assert_eq!(port(&IntOrString::Int(80), &c), Ok(80));
    }

    #[tokio::test]
    async fn http_and_tcp_probes_against_a_local_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            for code in [200, 500] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes())
                    .await;
            }
        });
        assert_eq!(http_get("127.0.0.1", port, "/", &[]).await, Ok(200));
        assert_eq!(http_get("127.0.0.1", port, "/", &[]).await, Ok(500));
        let refused = http_get("127.0.0.1", port, "/", &[]).await.unwrap_err();
        assert!(refused.contains("dial tcp"), "{refused}");
    }
}
