//! Observability out of the box: a real Prometheus (Debian's `prometheus`) scrapes an
//! `orq server` (the API server, its /metrics over HTTPS with the admin token), an
//! `orq operator` process running the control loops, and the node agent's own HTTPS
//! endpoint, with the scrape configuration docs/observability.md gives; PromQL returns
//! series for `apiserver_request_total`, `controller_runtime_reconcile_total` and
//! `kubelet_running_pods`. `promtool check metrics` finds nothing to complain about in any
//! of the three expositions.
//!
//! The server runs no control loops of its own (`--controllers=`: the operator process runs
//! them) and no service proxy (it is in the machine's own network namespace); the operator
//! leaves the scheduler out, so no pod is ever placed on this machine.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::Server;

/// A child process killed (by its PID) when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// GETs `url` with curl (`extra` for TLS and auth); the body if it answered 200.
fn curl(url: &str, extra: &[&str]) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "5"])
        .args(extra)
        .arg(url)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `promtool check metrics` on an exposition: no errors, no lint complaints.
fn promtool(job: &str, exposition: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (scripts/install-deps.sh)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let checked = promtool.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(
        checked.status.success() && complaints.trim().is_empty(),
        "promtool check metrics on the {job} exposition: {complaints}"
    );
}

/// Waits until `check` gives something, or fails naming `what`.
fn until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn prometheus_scrapes_api_server_operator_and_node_agent() {
    let dir = tempfile::tempdir().unwrap();
    let agent = free_addr();
    let server = Server::start(
        dir.path(),
        &["--controllers=", "--agent-listen", &agent.to_string()],
    );
    server.wait_ready();
    let ca = dir.path().join("tls/ca.crt");
    let token_file = dir.path().join("token");
    let token = std::fs::read_to_string(&token_file).unwrap();
    let bearer = format!("Authorization: Bearer {}", token.trim());
    // The node agent's endpoint takes the token agents join with.
    let node_token_file = dir.path().join("node-token");
    let node_token = std::fs::read_to_string(&node_token_file).unwrap();
    let node_bearer = format!("Authorization: Bearer {}", node_token.trim());

    let operator_addr = free_addr();
    let _operator = Proc(
        Command::new(env!("CARGO_BIN_EXE_orq"))
            .arg("operator")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(["--listen", &operator_addr.to_string()])
            .arg("--controllers=*,-scheduler")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The three expositions, once each has what the queries below look for.
    let apiserver = until("the API server's metrics", Duration::from_secs(30), || {
        curl(
            &format!("https://{}/metrics", server.addr),
            &["--cacert", ca.to_str().unwrap(), "-H", &bearer],
        )
        .filter(|m| m.contains("apiserver_request_total{"))
    });
    let operator = until("the operator's reconciles", Duration::from_secs(60), || {
        curl(&format!("http://{operator_addr}/metrics"), &[])
            .filter(|m| m.contains("controller_runtime_reconcile_total{"))
    });
    let node_agent = until("the node agent's metrics", Duration::from_secs(30), || {
        curl(
            &format!("https://{agent}/metrics"),
            &["--insecure", "-H", &node_bearer],
        )
        .filter(|m| m.contains("kubelet_running_pods"))
    });
    promtool("API server", &apiserver);
    promtool("operator", &operator);
    promtool("node agent", &node_agent);

    // Prometheus with docs/observability.md's scrape configuration (addresses filled in).
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: apiserver
    scheme: https
    tls_config:
      ca_file: {ca}
    authorization:
      credentials_file: {token}
    static_configs:
      - targets: ['{api}']
  - job_name: operator
    static_configs:
      - targets: ['{operator_addr}']
  - job_name: node-agent
    scheme: https
    tls_config:
      insecure_skip_verify: true
    authorization:
      credentials_file: {node_token}
    static_configs:
      - targets: ['{agent}']
"#,
            ca = ca.display(),
            token = token_file.display(),
            node_token = node_token_file.display(),
            api = server.addr,
        ),
    )
    .unwrap();
    let web = free_addr();
    let _prometheus = Proc(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("prometheus").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/install-deps.sh)"),
    );
    let query = |promql: &str| -> Vec<serde_json::Value> {
        let body = curl(
            &format!("http://{web}/api/v1/query"),
            &["-G", "--data-urlencode", &format!("query={promql}")],
        )
        .unwrap_or_default();
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    for (job, metric) in [
        ("apiserver", "apiserver_request_total"),
        ("operator", "controller_runtime_reconcile_total"),
        ("node-agent", "kubelet_running_pods"),
    ] {
        let series = until(
            &format!("Prometheus has {metric} from {job}"),
            Duration::from_secs(60),
            || Some(query(&format!("{metric}{{job=\"{job}\"}}"))).filter(|s| !s.is_empty()),
        );
        assert_eq!(series[0]["metric"]["job"], job, "{series:?}");
    }
    // Every target is up, and the API server's series carry upstream's labels.
    let up = query("up == 1");
    assert_eq!(up.len(), 3, "all three targets up: {up:?}");
    let reads = query(r#"apiserver_request_total{job="apiserver",verb="LIST",group="apps"}"#);
    assert!(
        reads
            .iter()
            .any(|s| s["metric"]["resource"] == "deployments"),
        "the operator's LIST of deployments is counted: {reads:?}"
    );
    assert!(
        !query(r#"apiserver_storage_objects{job="apiserver",resource="namespaces"}"#).is_empty()
    );
    assert!(
        !query(r#"apiserver_longrunning_requests{job="apiserver",verb="WATCH"} > 0"#).is_empty()
    );
}
