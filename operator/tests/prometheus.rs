//! A real Prometheus (Debian's `prometheus`) scrapes a manager, and a PromQL query over
//! `controller_runtime_reconcile_total` returns the controller's series; `promtool check
//! metrics` finds nothing to complain about in the exposition.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use orquestra_operator::testing::{TestApi, http_get};
use orquestra_operator::{Manager, Runner};

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// The Prometheus server, killed (by its PID) when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_manager_and_promtool_accepts_the_exposition() {
    let api = TestApi::start().await.unwrap();
    let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
    for name in ["p1", "p2", "p3"] {
        let cm: ConfigMap =
            serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).unwrap();
        cms.create(&PostParams::default(), &cm).await.unwrap();
    }
    let mut manager = Manager::new(api.client());
    let cache = manager.cache::<ConfigMap>(watcher::Config::default());
    let controller = Controller::for_shared_stream(cache.subscribe().unwrap(), cache.store());
    manager.add(
        Runner::new("scraped", controller),
        |_: Arc<ConfigMap>, _: Arc<()>| async { Ok::<_, Never>(Action::await_change()) },
        Arc::new(()),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(manager.run_on(listener, std::future::pending()));

    // promtool on the exposition, once the reconciles have happened.
    let deadline = Instant::now() + Duration::from_secs(10);
    let exposition = loop {
        if let Some((200, body)) = http_get(target, "/metrics").await {
            if body.contains(
                r#"controller_runtime_reconcile_total{controller="scraped",result="success"} 3"#,
            ) {
                break body;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the manager reconciles and serves metrics"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
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
        "promtool check metrics: {complaints}"
    );

    // A real Prometheus scraping it every second.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: manager\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let web = free_addr();
    let _prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed (scripts/install-deps.sh)"),
    );
    let query = "/api/v1/query?query=controller_runtime_reconcile_total%7Bcontroller%3D%22scraped%22%2Cresult%3D%22success%22%7D";
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        if let Some((200, body)) = http_get(web, query).await {
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(series) = answer["data"]["result"]
                .as_array()
                .filter(|r| !r.is_empty())
            {
                break series.clone();
            }
        }
        assert!(Instant::now() < deadline, "Prometheus scrapes the manager");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(result.len(), 1, "{result:?}");
    assert_eq!(result[0]["metric"]["job"], "manager");
    assert_eq!(result[0]["value"][1], "3", "{result:?}");
}
