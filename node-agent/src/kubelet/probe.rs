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
            let code = http_get_action(http, container, target).await?;
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
        } else if let Some(grpc) = &probe.grpc {
            let port =
                u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?;
            grpc_probe(&target.pod_ip, port, grpc.service.clone(), timeout).await
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

/// An `httpGet` action (a probe's or a lifecycle hook's): its host (the pod's address by
/// default), port (a number or a named container port), path and headers; the answer's
/// status code. HTTPS is spoken without verifying the certificate, as the kubelet does.
pub(crate) async fn http_get_action(
    http: &k8s_openapi::api::core::v1::HTTPGetAction,
    container: &Container,
    target: &Target,
) -> Result<u16, String> {
    let host = http
        .host
        .clone()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| target.pod_ip.clone());
    let port = port(&http.port, container)?;
    let path = http.path.clone().unwrap_or_else(|| "/".into());
    let headers: Vec<(String, String)> = http
        .http_headers
        .iter()
        .flatten()
        .map(|h| (h.name.clone(), h.value.clone()))
        .collect();
    if http.scheme.as_deref() == Some("HTTPS") {
        https_get(&host, port, &path, &headers).await
    } else {
        http_get(&host, port, &path, &headers).await
    }
}

/// GET `https://host:port/path` without verifying the server's certificate (the kubelet's
/// `InsecureSkipVerify`: a pod's serving certificate is rarely issued for its IP).
async fn https_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<u16, String> {
    static CLIENT: std::sync::LazyLock<Result<reqwest::Client, String>> =
        std::sync::LazyLock::new(|| {
            reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .user_agent("kube-probe/1.36")
                .redirect(reqwest::redirect::Policy::limited(10))
                .build()
                .map_err(|e| e.to_string())
        });
    let client = CLIENT.as_ref().map_err(Clone::clone)?;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    let url = format!("https://{host}:{port}{path}");
    let mut request = client.get(&url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let response = request
        .send()
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    Ok(response.status().as_u16())
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

/// `grpc.health.v1.HealthCheckRequest`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckRequest {
    #[prost(string, tag = "1")]
    service: String,
}

/// `grpc.health.v1.HealthCheckResponse`.
#[derive(Clone, PartialEq, prost::Message)]
struct HealthCheckResponse {
    #[prost(int32, tag = "1")]
    status: i32,
}

/// The gRPC health checking protocol's `Check` (plaintext, as the kubelet's gRPC probe):
/// `SERVING` passes.
async fn grpc_probe(
    host: &str,
    port: u16,
    service: Option<String>,
    timeout: Duration,
) -> Result<(), String> {
    let address = format!("{host}:{port}");
    let unreachable = |e: &dyn std::fmt::Display| {
        format!(
            "timeout: failed to connect service \"{address}\" within {}s: {e}",
            timeout.as_secs()
        )
    };
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| unreachable(&e))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| unreachable(&e))?;
    let mut client = tonic::client::Grpc::new(channel);
    client.ready().await.map_err(|e| unreachable(&e))?;
    let request = tonic::Request::new(HealthCheckRequest {
        service: service.unwrap_or_default(),
    });
    let path = axum::http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check");
    let codec = tonic_prost::ProstCodec::<HealthCheckRequest, HealthCheckResponse>::default();
    match client.unary(request, path, codec).await {
        Ok(answer) if answer.get_ref().status == 1 => Ok(()),
        Ok(answer) => {
            let status = match answer.get_ref().status {
                0 => "UNKNOWN",
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            };
            Err(format!("service unhealthy (responded with \"{status}\")"))
        }
        Err(status) => Err(format!(
            "rpc error: code = {:?} desc = {}",
            status.code(),
            status.message()
        )),
    }
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

    /// An HTTPS probe reaches a server whose self-signed certificate names neither its
    /// address nor a CA the agent knows, as the kubelet's does; the status code comes back.
    #[tokio::test]
    async fn https_probes_skip_certificate_verification() {
        let cert = rcgen::generate_simple_self_signed(vec!["elsewhere.example".into()]).unwrap();
        let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
            cert.cert.pem().into_bytes(),
            cert.signing_key.serialize_pem().into_bytes(),
        )
        .await
        .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new()
            .route("/readyz", axum::routing::get(|| async { "ok" }))
            .route(
                "/sick",
                axum::routing::get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
            );
        let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
        tokio::spawn(server.serve(app.into_make_service()));
        assert_eq!(https_get("127.0.0.1", port, "/readyz", &[]).await, Ok(200));
        assert_eq!(https_get("127.0.0.1", port, "/sick", &[]).await, Ok(503));
    }

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

    /// A gRPC health server on h2 answering `Check` with `status`.
    async fn health_server(status: u8) -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(socket).await.unwrap();
                    while let Some(Ok((request, mut respond))) = conn.accept().await {
                        assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Check");
                        let response = axum::http::Response::builder()
                            .header("content-type", "application/grpc")
                            .body(())
                            .unwrap();
                        let mut send = respond.send_response(response, false).unwrap();
                        // One message: no compression, 2 bytes: field 1 = status.
                        let message = bytes::Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]);
                        send.send_data(message, false).unwrap();
                        let mut trailers = axum::http::HeaderMap::new();
                        trailers.insert("grpc-status", "0".parse().unwrap());
                        send.send_trailers(trailers).unwrap();
                    }
                });
            }
        });
        port
    }

    #[tokio::test]
    async fn grpc_probes_speak_the_health_protocol() {
        let serving = health_server(1).await;
        let limit = Duration::from_secs(2);
        assert_eq!(grpc_probe("127.0.0.1", serving, None, limit).await, Ok(()));
        let not_serving = health_server(2).await;
        let failed = grpc_probe("127.0.0.1", not_serving, Some("x".into()), limit)
            .await
            .unwrap_err();
        assert!(failed.contains("NOT_SERVING"), "{failed}");
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let failed = grpc_probe("127.0.0.1", port, None, limit)
            .await
            .unwrap_err();
        assert!(failed.contains("failed to connect"), "{failed}");
    }
}
