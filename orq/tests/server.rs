//! `orq server` as a user runs it: a real process on a free loopback port, probed over HTTP,
//! stopped with SIGTERM.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

mod common;

use std::process::Command;

use common::Server;

use orquestra_store::testing::EtcdProcess;

#[test]
fn serves_health_and_metrics_on_the_embedded_store_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_ready();
    assert!(!server.insecure(), "HTTPS by default");
    assert_eq!(
        server.get_as("/healthz", false).unwrap(),
        (200, "ok".to_owned())
    );
    let (status, metrics) = server.get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("orquestra_store_revision"), "{metrics}");
    assert!(
        metrics.contains("orquestra_store_db_size_bytes"),
        "{metrics}"
    );
    // A request no control loop makes (they list and watch every kind): counted once.
    let (status, _) = server
        .get("/api/v1/namespaces/default/configmaps/not-there")
        .unwrap();
    assert_eq!(status, 404);
    let (_, metrics) = server.get("/metrics").unwrap();
    assert!(
        metrics
            .contains(r#"apiserver_request_total{code="404",component="apiserver",dry_run="",group="",resource="configmaps",scope="resource",subresource="",verb="GET",version="v1"} 1"#),
        "{metrics}"
    );
    // The control loops' watches are open; the four boot namespaces are stored.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("apiserver_longrunning_requests{")
                && l.contains(r#"verb="WATCH""#)
                && !l.ends_with(" 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"apiserver_current_inflight_requests{request_kind="mutating"}"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"apiserver_storage_objects{resource="namespaces"} 4"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("apiserver_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        dir.path().join("state.db").exists(),
        "default datastore is DATA_DIR/state.db"
    );
    assert!(server.terminate().success());
}

#[test]
fn api_requests_need_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--tls-san", "orq.example"]);
    server.wait_ready();
    let (status, body) = server.get_as("/api/v1/namespaces", false).unwrap();
    assert_eq!(status, 401);
    let status_object: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status_object["reason"], "Unauthorized");
    let (status, _) = server.get_as("/version", false).unwrap();
    assert_eq!(status, 200, "/version is public");
    let (status, body) = server.get("/api/v1/namespaces").unwrap();
    assert_eq!(status, 200, "{body}");
    let sans = std::fs::read_to_string(dir.path().join("tls/server.sans")).unwrap();
    assert!(sans.lines().any(|l| l == "orq.example"), "{sans}");
    let key_mode = std::fs::metadata(dir.path().join("tls/ca.key")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
        0o600
    );
    // A restart keeps the CA and the token, so kubeconfigs stay valid.
    let token = server.token().unwrap();
    let ca = std::fs::read(dir.path().join("tls/ca.crt")).unwrap();
    assert!(server.terminate().success());
    let again = Server::start(dir.path(), &[]);
    again.wait_ready();
    assert_eq!(again.token().unwrap(), token);
    assert_eq!(std::fs::read(dir.path().join("tls/ca.crt")).unwrap(), ca);
    assert!(again.terminate().success());
}

#[test]
fn insecure_mode_is_plain_http_without_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--insecure-http"]);
    server.wait_ready();
    assert!(server.insecure());
    let (status, _) = server.get_as("/api/v1/namespaces", false).unwrap();
    assert_eq!(status, 200);
    assert!(server.terminate().success());
}

/// Runs `orq server ARGS`, expects it to fail, and returns what it said.
fn server_fails(args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_orq"))
        .arg("server")
        .args(args)
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_locked_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    first.wait_ready();
    let stderr = server_fails(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert!(
        stderr.contains(&format!(
            "is in use by another orq server (PID {})",
            first.child.id()
        )),
        "{stderr}"
    );
    assert!(first.terminate().success());
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stderr = server_fails(&[
        "--no-agent".as_ref(),
        "--listen".as_ref(),
        addr.to_string().as_ref(),
        "--data-dir".as_ref(),
        dir.path().as_os_str(),
    ]);
    assert!(
        stderr.contains(&format!(
            "cannot listen on {addr}: the port is in use by another process"
        )),
        "{stderr}"
    );
}

#[test]
fn a_config_file_sets_flags_and_the_command_line_wins() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        "service-cidr: 10.96.0.0/12\ntls-san: [orq.example, orq2.example]\nno-agent: true\n\
         listen: 127.0.0.1:1\nrequest-timeout: 30s\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    // Server::start passes --listen: the command line's wins over the file's.
    let server = Server::start(&data, &["--config", config.to_str().unwrap()]);
    server.wait_ready();
    let service = wait_json(
        &server,
        "/api/v1/namespaces/default/services/kubernetes",
        |_| true,
    );
    assert_eq!(service["spec"]["clusterIP"], "10.96.0.1");
    let sans = std::fs::read_to_string(data.join("tls/server.sans")).unwrap();
    for name in ["orq.example", "orq2.example", "10.96.0.1"] {
        assert!(sans.lines().any(|l| l == name), "{name} in {sans}");
    }
    // no-agent: no node registered.
    let (_, nodes) = server.get("/api/v1/nodes").unwrap();
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    assert_eq!(nodes["items"], serde_json::json!([]));
    assert!(server.terminate().success());

    // An unknown setting names the file and the key.
    std::fs::write(&config, "datadir: /srv\n").unwrap();
    let stderr = server_fails(&["--config".as_ref(), config.as_os_str()]);
    assert!(
        stderr.contains(&format!(
            "{}: unknown setting `datadir` (not a flag of `orq server`",
            config.display()
        )),
        "{stderr}"
    );
}

#[test]
fn runs_on_etcd() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(EtcdProcess::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--datastore", &etcd.datastore_url()]);
    server.wait_ready();
    let (status, body) = server.get("/api/v1/namespaces/kube-system").unwrap();
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = server.get("/metrics").unwrap();
    assert!(metrics.contains("orquestra_store_revision"), "{metrics}");
    assert!(!dir.path().join("state.db").exists());
    assert!(server.terminate().success());
}

#[test]
fn a_bad_datastore_url_is_a_clear_error() {
    let stderr = server_fails(&[
        "--listen".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--datastore".as_ref(),
        "mysql://x".as_ref(),
    ]);
    assert!(stderr.contains("unknown scheme"), "{stderr}");
}

#[test]
fn acknowledged_objects_survive_sigkill_and_watches_resume() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_ready();
    let manifests: String = (0..40)
        .map(|i| format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: cm-{i:02}}}\ndata: {{i: \"{i}\"}}\n---\n"))
        .collect();
    let kubectl = |server: &Server, args: &[&str], stdin: Option<&str>| -> String {
        use std::io::Write;
        let mut child = Command::new("kubectl")
            .env("KUBECONFIG", server.kubeconfig())
            .env("HOME", dir.path())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.unwrap_or("").as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "kubectl {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let created = kubectl(&server, &["create", "-f", "-"], Some(&manifests));
    assert_eq!(created.matches(" created").count(), 40, "{created}");
    let list = kubectl(
        &server,
        &["get", "--raw", "/api/v1/namespaces/default/configmaps"],
        None,
    );
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let revision = list["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(revision.parse::<i64>().unwrap() > 0);

    // kill -9, then start again on the same data dir.
    let mut killed = server;
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    drop(killed);
    let server = Server::start(dir.path(), &[]);
    server.wait_ready();
    let names = kubectl(&server, &["get", "cm", "-o", "name"], None);
    for i in 0..40 {
        assert!(
            names.contains(&format!("configmap/cm-{i:02}")),
            "cm-{i:02} lost: {names}"
        );
    }
    assert_eq!(
        kubectl(
            &server,
            &["get", "cm", "cm-07", "-o", "jsonpath={.data.i}"],
            None
        ),
        "7"
    );

    // A watch from the last revision before the crash resumes with what came after.
    kubectl(&server, &["create", "configmap", "after-restart"], None);
    let (status, body) = server
        .get(&format!(
            "/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={revision}&timeoutSeconds=1"
        ))
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("\"type\":\"ADDED\"") && body.contains("after-restart"),
        "{body}"
    );
    assert!(
        !body.contains("cm-07"),
        "nothing from before the resume point {revision}: {}",
        &body[..body.len().min(300)]
    );
    assert!(server.terminate().success());
}

/// Polls `path` until `done` holds for its JSON (with status 200); panics after 15 s.
fn wait_json(
    server: &Server,
    path: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        if let Some((200, body)) = server.get(path) {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap();
            if done(&value) {
                return value;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{path} did not get there"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn pods_find_the_api_server_through_the_kubernetes_service() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--advertise-address", "192.0.2.10"]);
    server.wait_ready();
    let port = server.addr.port();
    let service_path = "/api/v1/namespaces/default/services/kubernetes";
    let slice_path = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes";
    let service = wait_json(&server, service_path, |_| true);
    assert_eq!(service["spec"]["clusterIP"], "10.43.0.1");
    assert_eq!(
        service["spec"]["ports"],
        serde_json::json!([{"name": "https", "port": 443, "protocol": "TCP", "targetPort": port}])
    );
    let slice = wait_json(&server, slice_path, |_| true);
    assert_eq!(
        slice["metadata"]["labels"]["kubernetes.io/service-name"],
        "kubernetes"
    );
    assert_eq!(slice["addressType"], "IPv4");
    assert_eq!(
        slice["endpoints"][0]["addresses"],
        serde_json::json!(["192.0.2.10"])
    );
    assert_eq!(slice["ports"][0]["port"], port);
    let endpoints = wait_json(
        &server,
        "/api/v1/namespaces/default/endpoints/kubernetes",
        |_| true,
    );
    assert_eq!(endpoints["subsets"][0]["addresses"][0]["ip"], "192.0.2.10");
    // The default ServiceCIDR, Ready, names the range cluster IPs come from.
    let cidr = wait_json(
        &server,
        "/apis/networking.k8s.io/v1/servicecidrs/kubernetes",
        |c| c["status"]["conditions"][0]["status"] == "True",
    );
    assert_eq!(cidr["spec"]["cidrs"], serde_json::json!(["10.43.0.0/16"]));
    assert_eq!(cidr["status"]["conditions"][0]["type"], "Ready");
    // The serving certificate covers every name in-cluster clients dial.
    let sans = std::fs::read_to_string(dir.path().join("tls/server.sans")).unwrap();
    for name in [
        "10.43.0.1",
        "192.0.2.10",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        assert!(sans.lines().any(|l| l == name), "{name} missing: {sans}");
    }

    // Deleted, they come back.
    let kubectl = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let uid = |v: &serde_json::Value| v["metadata"]["uid"].as_str().unwrap().to_owned();
    kubectl(&["delete", "service", "kubernetes"]);
    kubectl(&["delete", "endpointslice", "kubernetes"]);
    let again = wait_json(&server, service_path, |s| uid(s) != uid(&service));
    assert_eq!(again["spec"]["clusterIP"], "10.43.0.1");
    wait_json(&server, slice_path, |s| uid(s) != uid(&slice));

    // The default ServiceAccount, and a token for it that authenticates (kubectl create
    // token is the TokenRequest API).
    wait_json(
        &server,
        "/api/v1/namespaces/default/serviceaccounts/default",
        |_| true,
    );
    let token = kubectl(&["create", "token", "default"]);
    let list_pods = |namespace: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--cacert"])
            .arg(dir.path().join("tls/ca.crt"))
            .arg("-H")
            .arg(format!("Authorization: Bearer {}", token.trim()))
            .arg(format!(
                "https://{}/api/v1/namespaces/{namespace}/pods",
                server.addr
            ))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    // Authenticated, but RBAC grants a ServiceAccount nothing until a binding does.
    let (code, body) = list_pods("default");
    assert_eq!(code, "403", "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["reason"], "Forbidden");
    assert_eq!(
        status["message"],
        "pods is forbidden: User \"system:serviceaccount:default:default\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
    );
    kubectl(&[
        "create",
        "role",
        "pod-reader",
        "--verb=get,list",
        "--resource=pods",
    ]);
    kubectl(&[
        "create",
        "rolebinding",
        "pod-reader",
        "--role=pod-reader",
        "--serviceaccount=default:default",
    ]);
    let (code, body) = list_pods("default");
    assert_eq!(code, "200", "{body}");
    // The role is for this namespace only.
    let (code, _) = list_pods("kube-system");
    assert_eq!(code, "403");
    // The bootstrap cluster-admin role, bound cluster-wide, allows everything.
    kubectl(&[
        "create",
        "clusterrolebinding",
        "default-admin",
        "--clusterrole=cluster-admin",
        "--serviceaccount=default:default",
    ]);
    let (code, body) = list_pods("default");
    assert_eq!(code, "200", "{body}");
    assert!(server.terminate().success());
}
