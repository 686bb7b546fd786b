//! Streams into real containers (root): `kubectl exec` through the API server's `pods/exec`
//! relay to the node agent, which runs the command in the container with libcontainer —
//! over WebSocket (kubectl 1.33), with stdin piped, under a real pseudo-terminal, with the
//! command's exit code returned, and the bad cases answered clearly with nothing left running.

#![allow(clippy::unwrap_used)]

use std::process::{Output, Stdio};
use std::time::Duration;

use host::{Host, phase, pod_manifest};

#[path = "common/busybox.rs"]
mod busybox;
#[path = "common/host.rs"]
mod host;

/// kubectl 1.33: exec and attach over WebSocket (`v5.channel.k8s.io`).
const KUBECTL_1_33: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.33";
/// kubectl 1.27: exec and attach over SPDY/3.1 (`v4.channel.k8s.io`).
const KUBECTL_1_27: &str = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27";

/// Runs kubectl `bin` inside the host's namespace with `input` on stdin.
fn kubectl(host: &Host, bin: &str, args: &[&str], input: &[u8]) -> Output {
    let kubeconfig = host.data_dir().join("kubeconfig.yaml");
    let mut full = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
    full.extend_from_slice(args);
    kubectl_like(host, bin, &full, input)
}

/// Runs `bin args` inside the host's namespace with `input` on stdin.
fn kubectl_like(host: &Host, bin: &str, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = host
        .nsenter(bin)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    // kubectl may stop reading early (an error): its output says why.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    out
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The exec helpers still running for this host's containers.
fn helpers_left(host: &Host) -> Vec<String> {
    let root = host.data_dir();
    let root = root.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| text(&c).replace('\0', " "))
        .filter(|c| c.contains("shim-exec") && c.contains(root.as_ref()))
        .collect()
}

#[test]
fn kubectl_exec_over_websocket() {
    exec_scenarios("exec", KUBECTL_1_33);
}

#[test]
fn kubectl_exec_over_spdy() {
    exec_scenarios("spdyexec", KUBECTL_1_27);
}

/// kubectl `bin`'s exec: output, stdin, exit codes, a terminal, the bad cases, and a client
/// that goes away.
fn exec_scenarios(tag: &str, bin: &str) {
    let host = Host::start(tag);
    host.apply(&pod_manifest(
        "sh",
        "Never",
        Some(&["sh", "-c", "echo ready; sleep 3600"]),
        serde_json::json!({}),
    ));
    host.wait_pod("sh", Duration::from_secs(60), |p| phase(p) == "Running");
    let k = |args: &[&str], input: &[u8]| kubectl(&host, bin, args, input);

    // A command's output and exit code 0.
    let out = k(
        &["exec", "sh", "--", "sh", "-c", "echo hello; echo oops >&2"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    assert!(text(&out.stderr).contains("oops"), "{}", text(&out.stderr));

    // Stdin piped through, to its end (WebSocket v5's half-close, or SPDY's FIN).
    let input: Vec<u8> = (0..200_000).map(|i| b"abcdefgh\n"[i % 9]).collect();
    let out = k(&["exec", "-i", "sh", "--", "wc", "-c"], &input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "200000");

    // `kubectl cp` (tar through exec) both ways: a file in, a directory out, intact.
    let local = host.dir.path().join(format!("cp-{tag}"));
    std::fs::create_dir_all(local.join("tree/sub")).unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(local.join("blob"), &blob).unwrap();
    std::fs::write(local.join("tree/sub/note"), "a note\n").unwrap();
    let kubeconfig = host.data_dir().join("kubeconfig.yaml");
    let cp = |from: &str, to: &str| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", host.netns.path()))
            .arg(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["cp", from, to])
            .current_dir(&local)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cp {from} {to}: {}",
            text(&out.stderr)
        );
    };
    cp("blob", "sh:/tmp/blob");
    cp("tree", "sh:/tmp/tree");
    let out = k(
        &[
            "exec",
            "sh",
            "--",
            "md5sum",
            "/tmp/blob",
            "/tmp/tree/sub/note",
        ],
        b"",
    );
    assert!(
        text(&out.stdout).contains("/tmp/tree/sub/note"),
        "{}",
        text(&out.stdout)
    );
    cp("sh:/tmp/blob", "blob.back");
    cp("sh:/tmp/tree", "tree.back");
    assert_eq!(std::fs::read(local.join("blob.back")).unwrap(), blob);
    assert_eq!(
        std::fs::read_to_string(local.join("tree.back/sub/note")).unwrap(),
        "a note\n"
    );

    // The command's exit code is kubectl's.
    let out = k(&["exec", "sh", "--", "sh", "-c", "exit 7"], b"");
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));

    // Inside the container: its filesystem and its environment.
    let out = k(&["exec", "sh", "--", "cat", "/proc/1/cmdline"], b"");
    assert!(text(&out.stdout).contains("sleep"), "{}", text(&out.stdout));

    // Bad input: a command that does not exist, a container that does not, a pod that is
    // not running.
    let out = k(&["exec", "sh", "--", "no-such-command"], b"");
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    let out = k(&["exec", "sh", "--", "/etc/passwd"], b"");
    assert_eq!(
        out.status.code(),
        Some(126),
        "not executable: {}",
        text(&out.stderr)
    );
    let out = k(&["exec", "sh", "-c", "nope", "--", "true"], b"");
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("container nope is not valid for pod sh"),
        "{}",
        text(&out.stderr)
    );
    host.apply(&pod_manifest(
        "done",
        "Never",
        Some(&["true"]),
        serde_json::json!({}),
    ));
    host.wait_pod("done", Duration::from_secs(60), |p| phase(p) == "Succeeded");
    let out = k(&["exec", "done", "--", "true"], b"");
    assert!(
        text(&out.stderr).contains("cannot exec into a container in a completed pod"),
        "{}",
        text(&out.stderr)
    );

    // A client that goes away mid-stream: its command is ended, its helper gone.
    let mut child = host
        .nsenter(bin)
        .arg("--kubeconfig")
        .arg(host.data_dir().join("kubeconfig.yaml"))
        .args(["exec", "sh", "--", "sleep", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while helpers_left(&host).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the exec never started"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // The open stream counts as a long-running request until it ends.
    let streams = |host: &Host| -> f64 {
        host.kubectl(&["get", "--raw", "/metrics"])
            .lines()
            .filter(|l| {
                l.starts_with("apiserver_longrunning_requests{")
                    && l.contains("subresource=\"exec\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(streams(&host), 1.0);
    // … and on the agent, read through the node's proxy subresource.
    let agent_streams = |host: &Host| -> f64 {
        host.kubectl(&["get", "--raw", "/api/v1/nodes/n1/proxy/metrics"])
            .lines()
            .filter(|l| {
                l.starts_with("kubelet_http_inflight_requests{") && l.contains("path=\"exec\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(agent_streams(&host), 1.0);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !helpers_left(&host).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "helpers left behind: {:?}",
            helpers_left(&host)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while streams(&host) != 0.0 || agent_streams(&host) != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "still counted: {:?}",
            streams(&host)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = k(&["exec", "sh", "--", "ps"], b"");
    assert!(
        !text(&out.stdout).contains("sleep 300"),
        "the command outlived its client:\n{}",
        text(&out.stdout)
    );

    // A real terminal: `script` gives kubectl one; the shell inside has its own.
    let script = format!(
        "{bin} --kubeconfig {} exec -it sh -- sh -c 'tty; stty size; exit 3'",
        host.data_dir().join("kubeconfig.yaml").display()
    );
    let out = host
        .nsenter("script")
        .args(["-qefc", &script, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = text(&out.stdout);
    assert!(
        shown.contains("/dev/pts/"),
        "{shown}\n{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(3), "{shown}");
}

/// Runs `f` on a Tokio runtime whose threads all live in the host's network namespace
/// (where its server listens).
fn in_host<T: Send>(host: &Host, f: impl AsyncFnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let netns = std::sync::Arc::new(std::fs::File::open(host.netns.path()).unwrap());
    let enter = move || {
        // SAFETY: setns on the calling thread only; the descriptor is valid.
        assert_eq!(
            unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(enter.clone())
        .enable_all()
        .build()
        .unwrap();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                enter();
                runtime.block_on(f())
            })
            .join()
            .unwrap()
    })
}

/// kube-rs' `Api::exec` (its `ws` feature: WebSocket, `v5.channel.k8s.io`): output, stdin,
/// and a non-zero exit code in the status.
#[test]
fn kube_rs_exec() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, AttachParams};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let host = Host::start("kubeexec");
    host.apply(&pod_manifest(
        "sh",
        "Never",
        Some(&["sleep", "3600"]),
        serde_json::json!({}),
    ));
    host.wait_pod("sh", Duration::from_secs(60), |p| phase(p) == "Running");
    let kubeconfig = host.data_dir().join("kubeconfig.yaml");
    in_host(&host, async move || {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let pods: Api<Pod> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
        let limit = Duration::from_secs(20);

        let mut attached = pods
            .exec(
                "sh",
                ["sh", "-c", "echo out; echo err >&2; exit 7"],
                &AttachParams::default().stderr(true),
            )
            .await
            .unwrap();
        let (mut stdout, mut stderr) = (attached.stdout().unwrap(), attached.stderr().unwrap());
        let status = attached.take_status().unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        let read = async {
            stdout.read_to_string(&mut out).await.unwrap();
            stderr.read_to_string(&mut err).await.unwrap();
            status.await.unwrap()
        };
        let status = tokio::time::timeout(limit, read)
            .await
            .expect("exec timed out");
        assert_eq!((out.as_str(), err.as_str()), ("out\n", "err\n"));
        assert_eq!(status.reason.as_deref(), Some("NonZeroExitCode"));
        let causes = status.details.unwrap().causes.unwrap();
        assert_eq!(causes[0].message.as_deref(), Some("7"));

        let mut attached = pods
            .exec(
                "sh",
                ["cat"],
                &AttachParams::default().stdin(true).stderr(false),
            )
            .await
            .unwrap();
        let mut stdin = attached.stdin().unwrap();
        let mut stdout = attached.stdout().unwrap();
        let status = attached.take_status().unwrap();
        let mut out = String::new();
        let run = async {
            stdin.write_all(b"through stdin\n").await.unwrap();
            // The end of stdin (a dropped half of kube's pipe does not end it).
            stdin.shutdown().await.unwrap();
            stdout.read_to_string(&mut out).await.unwrap();
            status.await.unwrap()
        };
        let status = tokio::time::timeout(limit, run)
            .await
            .expect("exec with stdin timed out");
        assert_eq!(out, "through stdin\n");
        assert_eq!(status.status.as_deref(), Some("Success"));
    });
}

/// `curl` inside the host's namespace: `(status code, body)`; extra arguments first.
fn curl(host: &Host, args: &[&str], url: &str) -> (u16, String) {
    let out = host
        .nsenter("curl")
        .args(["-s", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .arg(url)
        .output()
        .unwrap();
    let out = text(&out.stdout);
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `kubectl proxy` reaching a pod (its default port and a named one, HTML links rewritten,
/// a redirect to the trailing slash, a POST with its body and query), a service (by
/// port number and through its endpoints), and the node's agent; the bad cases are
/// `Status` errors.
#[test]
fn kubectl_proxy_reaches_pods_services_and_nodes() {
    let host = Host::start("proxy");
    let mut pod = pod_manifest(
        "web",
        "Never",
        Some(&[
            "sh",
            "-c",
            "mkdir -p /tmp/w/cgi-bin && exec httpd -f -p 8080 -h /tmp/w",
        ]),
        serde_json::json!({"ports": [{"containerPort": 8080, "name": "http"}]}),
    );
    pod["metadata"]["labels"] = serde_json::json!({"app": "web"});
    host.apply(&pod);
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }));
    host.apply(&serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "nobody"},
        "spec": {"selector": {"app": "nobody"}, "ports": [{"port": 80}]},
    }));
    host.wait_pod("web", Duration::from_secs(60), |p| phase(p) == "Running");
    let k = |args: &[&str], input: &[u8]| kubectl(&host, KUBECTL_1_33, args, input);
    let page = "<html><body><a href=\"/rewriteme\">test</a> \
                <a href=\"https://example.com/x\">away</a></body></html>";
    let script = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
                  echo \"$REQUEST_METHOD $QUERY_STRING\"\nhead -c \"$CONTENT_LENGTH\"\n";
    for (path, content, mode) in [
        ("/tmp/w/index.html", page, "644"),
        ("/tmp/w/plain.txt", "plain\n", "644"),
        ("/tmp/w/cgi-bin/echo", script, "755"),
    ] {
        let out = k(
            &[
                "exec",
                "-i",
                "web",
                "--",
                "sh",
                "-c",
                &format!("cat > {path} && chmod {mode} {path}"),
            ],
            content.as_bytes(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    let proxy = host::Proc(
        host.nsenter(KUBECTL_1_33)
            .arg("--kubeconfig")
            .arg(host.data_dir().join("kubeconfig.yaml"))
            .args(["proxy", "--port=8001"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    host.wait_http("http://127.0.0.1:8001/api");
    let base = "http://127.0.0.1:8001/api/v1";
    let pod_proxy = "/api/v1/namespaces/default/pods/web/proxy";

    // The pod, on its first declared port: the page's own links go through the proxy.
    let (code, body) = curl(
        &host,
        &[],
        &format!("{base}/namespaces/default/pods/web/proxy/"),
    );
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains(&format!("<a href=\"{pod_proxy}/rewriteme\">test</a>"))
            && body.contains("<a href=\"https://example.com/x\">away</a>"),
        "{body}"
    );
    // `…/proxy` without the slash redirects to it, the query kept.
    let (code, body) = curl(
        &host,
        &["-o", "/dev/null", "-w", "%{redirect_url}\n%{http_code}"],
        &format!("{base}/namespaces/default/pods/web/proxy?a=b"),
    );
    assert_eq!(code, 301, "{body}");
    assert!(body.ends_with(&format!("{pod_proxy}/?a=b")), "{body}");
    // A named port, the scheme spelled out; a POST's method, query and body arrive.
    let (code, body) = curl(
        &host,
        &[],
        &format!("{base}/namespaces/default/pods/http:web:8080/proxy/plain.txt"),
    );
    assert_eq!((code, body.as_str()), (200, "plain\n"));
    let (code, body) = curl(
        &host,
        &["-X", "POST", "--data-binary", "posted body"],
        &format!("{base}/namespaces/default/pods/web/proxy/cgi-bin/echo?x=1"),
    );
    assert_eq!((code, body.as_str()), (200, "POST x=1\nposted body"));

    // The service, by its only port and by its number, through its endpoints.
    for id in ["web", "web:80"] {
        let (code, body) = curl(
            &host,
            &[],
            &format!("{base}/namespaces/default/services/{id}/proxy/plain.txt"),
        );
        assert_eq!((code, body.as_str()), (200, "plain\n"), "{id}");
    }
    // The node: its agent's own endpoint.
    let (code, body) = curl(&host, &[], &format!("{base}/nodes/n1/proxy/healthz"));
    assert_eq!((code, body.as_str()), (200, "ok"));

    // Bad input: nothing listens, no endpoints, no such port, no such pod.
    let status = |url: &str| {
        let (code, body) = curl(&host, &[], url);
        let status: serde_json::Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{url}: not a Status ({e}): {body}"));
        assert_eq!(status["kind"], "Status", "{body}");
        (code, status["message"].as_str().unwrap_or("").to_owned())
    };
    let (code, message) = status(&format!("{base}/namespaces/default/pods/web:9999/proxy/"));
    assert_eq!(code, 503, "{message}");
    assert!(
        message.contains("error trying to reach service"),
        "{message}"
    );
    let (code, message) = status(&format!("{base}/namespaces/default/services/nobody/proxy/"));
    assert_eq!(code, 503, "{message}");
    assert!(message.contains("no endpoints available"), "{message}");
    let (code, message) = status(&format!("{base}/namespaces/default/services/web:81/proxy/"));
    assert_eq!(code, 503, "{message}");
    assert!(message.contains("no service port 81"), "{message}");
    let (code, _) = status(&format!("{base}/namespaces/default/pods/nope/proxy/"));
    assert_eq!(code, 404);
    let (code, message) = status(&format!("{base}/namespaces/default/pods/ftp:web:21/proxy/"));
    assert_eq!(code, 400, "{message}");

    // Upgrades pass through a proxy too: the conformance "remote command execution over
    // websockets" exchange (`channel.k8s.io`, output on channel 1), through a `kubectl
    // proxy` that lets exec through.
    let exec_proxy = host::Proc(
        host.nsenter(KUBECTL_1_33)
            .arg("--kubeconfig")
            .arg(host.data_dir().join("kubeconfig.yaml"))
            .args(["proxy", "--port=8002", "--reject-paths=^/nothing$"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    host.wait_http("http://127.0.0.1:8002/api");
    let output = in_host(&host, async || {
        use futures::StreamExt as _;
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};
        let url = "ws://127.0.0.1:8002/api/v1/namespaces/default/pods/web/exec?\
                   command=echo&command=remote+execution+test&stdout=1&stderr=1&container=main";
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "channel.k8s.io".parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut stdout = Vec::new();
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Binary(data) if data.first() == Some(&1) => {
                    stdout.extend_from_slice(&data[1..])
                }
                Message::Close(_) => break,
                _ => {}
            }
        }
        String::from_utf8(stdout).unwrap()
    });
    assert_eq!(output, "remote execution test\n");
    // `pods/log` as a WebSocket (`binary.k8s.io`), as the conformance logs spec reads it.
    host.apply(&pod_manifest(
        "talker",
        "Never",
        Some(&["sh", "-c", "echo container is alive; sleep 3600"]),
        serde_json::json!({}),
    ));
    host.wait_pod("talker", Duration::from_secs(60), |p| phase(p) == "Running");
    let logged = in_host(&host, async || {
        use futures::StreamExt as _;
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};
        let url = "ws://127.0.0.1:8002/api/v1/namespaces/default/pods/talker/log?container=main";
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "binary.k8s.io".parse().unwrap());
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut log = Vec::new();
        while let Some(Ok(message)) = socket.next().await {
            match message {
                Message::Binary(data) => log.extend_from_slice(&data),
                Message::Close(_) => break,
                _ => {}
            }
        }
        String::from_utf8(log).unwrap()
    });
    assert_eq!(logged, "container is alive\n");
    drop(exec_proxy);

    drop(proxy);
}

/// A pod serving `/tmp/w` over HTTP on port 8080, with a CGI script at `/cgi-bin/md5` that
/// answers the MD5 of what is posted to it, and a 64 MiB file `/big`.
fn start_web_pod(host: &Host, bin: &str) {
    let mut pod = pod_manifest(
        "web",
        "Never",
        Some(&[
            "sh",
            "-c",
            "mkdir -p /tmp/w/cgi-bin && dd if=/dev/urandom of=/tmp/w/big bs=1048576 count=64 \
             2>/dev/null && exec httpd -f -p 8080 -h /tmp/w",
        ]),
        serde_json::json!({"ports": [{"containerPort": 8080, "name": "http"}]}),
    );
    pod["metadata"]["labels"] = serde_json::json!({"app": "web"});
    host.apply(&pod);
    host.wait_pod("web", Duration::from_secs(60), |p| phase(p) == "Running");
    let script = "#!/bin/sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\n\
                  head -c \"$CONTENT_LENGTH\" | md5sum\n";
    let out = kubectl(
        host,
        bin,
        &[
            "exec",
            "-i",
            "web",
            "--",
            "sh",
            "-c",
            "cat > /tmp/w/cgi-bin/md5 && chmod 755 /tmp/w/cgi-bin/md5 && echo plain > \
             /tmp/w/plain.txt",
        ],
        script.as_bytes(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The big file is written before httpd starts: wait for it to serve.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = kubectl(host, bin, &["exec", "web", "--", "ls", "/tmp/w/big"], b"");
        if out.status.success() && host.pod("web")["status"]["podIP"].is_string() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no /big");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The established TCP connections inside pod `name`'s network namespace.
fn pod_connections(host: &Host, name: &str) -> Vec<String> {
    let uid = host.pod(name)["metadata"]["uid"]
        .as_str()
        .unwrap()
        .to_owned();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/orq-{uid}"))
        .args(["ss", "-Htn", "state", "established"])
        .output()
        .unwrap();
    text(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn kubectl_port_forward_over_websocket_tunnel() {
    port_forward_scenarios("pfws", KUBECTL_1_33);
}

#[test]
fn kubectl_port_forward_over_spdy() {
    port_forward_scenarios("pfspdy", KUBECTL_1_27);
}

/// kubectl `bin`'s port-forward: two concurrent connections, 64 MiB each way intact, a
/// port nothing listens on, and nothing left open once kubectl is gone.
fn port_forward_scenarios(tag: &str, bin: &str) {
    let host = Host::start(tag);
    start_web_pod(&host, bin);
    let expected = text(
        &kubectl(
            &host,
            bin,
            &["exec", "web", "--", "md5sum", "/tmp/w/big"],
            b"",
        )
        .stdout,
    );
    let expected = expected.split_whitespace().next().unwrap().to_owned();

    let forward = host::Proc(
        host.nsenter(bin)
            .arg("--kubeconfig")
            .arg(host.data_dir().join("kubeconfig.yaml"))
            .args(["port-forward", "pod/web", "18080:8080", "18081:9999"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    host.wait_http("http://127.0.0.1:18080/plain.txt");

    // Two connections at once: a 64 MiB download and a 64 MiB upload, both intact.
    let download = {
        let netns = host.netns.path();
        std::thread::spawn(move || {
            let out = std::process::Command::new("nsenter")
                .arg(format!("--net={netns}"))
                .args([
                    "sh",
                    "-c",
                    "curl -sf --max-time 120 http://127.0.0.1:18080/big | md5sum",
                ])
                .output()
                .unwrap();
            text(&out.stdout)
        })
    };
    let payload = host.dir.path().join("payload");
    let data: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&payload, &data).unwrap();
    let uploaded_md5 = {
        use std::io::Write;
        let mut md5 = std::process::Command::new("md5sum")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        md5.stdin.take().unwrap().write_all(&data).unwrap();
        text(&md5.wait_with_output().unwrap().stdout)
    };
    let (code, body) = curl(
        &host,
        &[
            "--max-time",
            "120",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", payload.display()),
        ],
        "http://127.0.0.1:18080/cgi-bin/md5",
    );
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        body.split_whitespace().next(),
        uploaded_md5.split_whitespace().next(),
        "the upload arrived changed"
    );
    let downloaded = download.join().unwrap();
    assert_eq!(
        downloaded.split_whitespace().next(),
        Some(expected.as_str()),
        "the download arrived changed"
    );

    // A port nothing listens on: the connection fails, kubectl says why.
    let (code, _) = curl(&host, &[], "http://127.0.0.1:18081/");
    assert_ne!(code, 200);

    // kubectl gone: nothing stays open in the pod.
    let mut forward = forward;
    forward.0.kill().unwrap();
    let status = forward.0.wait().unwrap();
    let mut stderr = String::new();
    use std::io::Read as _;
    forward
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success());
    assert!(
        stderr.contains("error forwarding port 9999 to pod"),
        "{stderr}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let open = pod_connections(&host, "web");
        if open.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "connections left open in the pod: {open:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// kube-rs' `Api::portforward` (WebSocket channels): a request and its answer through the
/// forwarded port; a port nothing listens on reports the error.
#[test]
fn kube_rs_port_forward() {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::Api;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let host = Host::start("kubepf");
    start_web_pod(&host, KUBECTL_1_33);
    let kubeconfig = host.data_dir().join("kubeconfig.yaml");
    in_host(&host, async move || {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .unwrap();
        let pods: Api<Pod> = Api::default_namespaced(kube::Client::try_from(config).unwrap());
        let limit = Duration::from_secs(20);

        let mut forwarder = pods.portforward("web", &[8080, 9999]).await.unwrap();
        let mut stream = forwarder.take_stream(8080).unwrap();
        let refused = forwarder.take_error(9999).unwrap();
        let exchange = async {
            stream
                .write_all(b"GET /plain.txt HTTP/1.0\r\nHost: web\r\n\r\n")
                .await
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let answer = tokio::time::timeout(limit, exchange)
            .await
            .expect("port-forward timed out");
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(answer.ends_with("plain\n"), "{answer}");
        let error = tokio::time::timeout(limit, refused)
            .await
            .expect("no error for the closed port");
        assert!(
            error.is_some_and(|e| e.contains("error forwarding port 9999")),
            "the closed port's error"
        );
        drop(stream);
        forwarder.abort();
    });
}

/// Lifecycle hooks on the exec path: `postStart` runs in the container before anything
/// else reaches it, `preStop` (exec or sleep) holds up deletion for as long as it runs, and
/// a failing `postStart` kills the container, which restarts.
#[test]
fn lifecycle_hooks_run_in_the_container() {
    let host = Host::start("hooks");
    let trapping = [
        "sh",
        "-c",
        "trap 'exit 0' TERM; while true; do sleep 0.2; done",
    ];
    let with_hooks = |name: &str, lifecycle: serde_json::Value| {
        let mut pod = pod_manifest(
            name,
            "Always",
            Some(&trapping),
            serde_json::json!({"lifecycle": lifecycle}),
        );
        pod["spec"]["terminationGracePeriodSeconds"] = serde_json::json!(30);
        pod
    };
    host.apply(&with_hooks(
        "exechook",
        serde_json::json!({
            "postStart": {"exec": {"command": ["sh", "-c", "echo started > /tmp/poststart"]}},
            "preStop": {"exec": {"command": ["sh", "-c", "sleep 3"]}},
        }),
    ));
    host.apply(&with_hooks(
        "sleephook",
        serde_json::json!({"preStop": {"sleep": {"seconds": 2}}}),
    ));
    host.apply(&with_hooks("nohook", serde_json::json!({})));
    host.apply(&with_hooks(
        "badhook",
        serde_json::json!({"postStart": {"exec": {"command": ["false"]}}}),
    ));
    for name in ["exechook", "sleephook", "nohook"] {
        host.wait_pod(name, Duration::from_secs(60), |p| phase(p) == "Running");
    }
    let k = |args: &[&str]| kubectl(&host, KUBECTL_1_33, args, b"");
    let out = k(&["exec", "exechook", "--", "cat", "/tmp/poststart"]);
    assert_eq!(text(&out.stdout), "started\n", "{}", text(&out.stderr));

    // Deleting waits for the preStop hook, then the container stops on SIGTERM at once.
    let deletion = |name: &str| {
        let started = std::time::Instant::now();
        let out = k(&["delete", "pod", name, "--wait=true", "--timeout=60s"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        started.elapsed()
    };
    let took = deletion("nohook");
    assert!(took < Duration::from_secs(3), "no hook: {took:?}");
    let took = deletion("exechook");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(15),
        "exec preStop: {took:?}"
    );
    let took = deletion("sleephook");
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(15),
        "sleep preStop: {took:?}"
    );

    // A postStart that fails: the container is killed and started again.
    let pod = host.wait_pod("badhook", Duration::from_secs(60), |p| {
        p["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .is_some_and(|n| n >= 1)
    });
    assert!(pod["status"]["containerStatuses"][0]["restartCount"].as_i64() >= Some(1));
    let events = host.kubectl(&[
        "get",
        "events",
        "--field-selector",
        "reason=FailedPostStartHook",
        "-o",
        "name",
    ]);
    assert!(!events.trim().is_empty(), "no FailedPostStartHook event");
}

/// `kubectl attach -i` to containers' own stdio through their shims: with `stdinOnce` the
/// end of the client's input closes the container's stdin (kubectl 1.33, WebSocket); without
/// it the container reads what it is sent and its output comes back (kubectl 1.27, SPDY).
#[test]
fn kubectl_attach_to_a_containers_stdio() {
    let host = Host::start("attach");
    let with_stdin = |name: &str, once: bool, script: &str| {
        pod_manifest(
            name,
            "Never",
            Some(&["sh", "-c", script]),
            serde_json::json!({"stdin": true, "stdinOnce": once}),
        )
    };
    host.apply(&with_stdin("once", true, "cat; echo stdin closed"));
    // A container name long enough to put its shim's socket path past 108 bytes.
    let long = "a-container-name-long-enough-to-push-its-socket-path-past-108b";
    let mut open = with_stdin("open", false, "read line; echo got $line; echo bye >&2");
    open["spec"]["containers"][0]["name"] = serde_json::json!(long);
    host.apply(&open);
    for name in ["once", "open"] {
        host.wait_pod(name, Duration::from_secs(60), |p| phase(p) == "Running");
    }

    let out = kubectl(
        &host,
        KUBECTL_1_33,
        &["attach", "-i", "once"],
        b"abcd1234\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "abcd1234\nstdin closed\n",
        "{}",
        text(&out.stderr)
    );
    host.wait_pod("once", Duration::from_secs(30), |p| phase(p) == "Succeeded");

    let out = kubectl(&host, KUBECTL_1_27, &["attach", "-i", "open"], b"x\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "got x\n", "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("bye"), "{}", text(&out.stderr));

    // Bad input: a finished container, one that does not exist.
    let out = kubectl(&host, KUBECTL_1_33, &["attach", "once"], b"");
    assert!(!out.status.success());
    let out = kubectl(&host, KUBECTL_1_33, &["attach", "open", "-c", "nope"], b"");
    assert!(!out.status.success());
}

/// `kubectl debug -i` adds an ephemeral container to a running pod (through
/// `pods/ephemeralcontainers`), the agent starts it in the pod, and kubectl attaches to it;
/// ephemeral containers cannot be removed afterwards.
#[test]
fn kubectl_debug_with_an_ephemeral_container() {
    let host = Host::start("debug");
    host.apply(&pod_manifest(
        "target",
        "Never",
        Some(&["sleep", "3600"]),
        serde_json::json!({}),
    ));
    host.wait_pod("target", Duration::from_secs(60), |p| phase(p) == "Running");
    let out = kubectl(
        &host,
        KUBECTL_1_33,
        &[
            "debug",
            "target",
            "-i",
            "--image",
            host::IMAGE,
            "--container",
            "dbg",
            "--",
            "sh",
            "-c",
            "read x; echo got $x; hostname",
        ],
        b"ping\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("got ping\ntarget\n"),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let pod = host.wait_pod("target", Duration::from_secs(30), |p| {
        p["status"]["ephemeralContainerStatuses"][0]["state"]["terminated"].is_object()
    });
    assert_eq!(
        pod["status"]["ephemeralContainerStatuses"][0]["name"],
        "dbg"
    );
    assert_eq!(phase(&pod), "Running", "the pod runs on");

    // `--target`: the ephemeral container sees the target container's processes.
    let out = kubectl(
        &host,
        KUBECTL_1_33,
        &[
            "debug",
            "target",
            "-i",
            "--image",
            host::IMAGE,
            "--container",
            "peek",
            "--target",
            "main",
            "--",
            "sh",
            "-c",
            "read x; ps",
        ],
        b"go\n",
    );
    assert!(
        text(&out.stdout).contains("sleep 3600"),
        "{}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // `debug -it`: the ephemeral container runs on a terminal the client attaches to
    // (`script` gives kubectl one, fed what is "typed").
    let script = format!(
        "{KUBECTL_1_33} --kubeconfig {} debug -it target --image {} --container tty -- \
         sh -c 'read x; tty; echo got $x'",
        host.data_dir().join("kubeconfig.yaml").display(),
        host::IMAGE
    );
    let out = kubectl_like(
        &host,
        "script",
        &["-qefc", &script, "/dev/null"],
        b"hello\n",
    );
    let shown = text(&out.stdout);
    assert!(
        shown.contains("/dev/pts/") && shown.contains("got hello"),
        "{shown}\n{}",
        text(&out.stderr)
    );

    // Ephemeral containers stay: removing one is refused.
    let out = kubectl(
        &host,
        KUBECTL_1_33,
        &[
            "patch",
            "pod",
            "target",
            "--subresource=ephemeralcontainers",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/ephemeralContainers/0"}]"#,
        ],
        b"",
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("may not be removed"),
        "{}",
        text(&out.stderr)
    );
}

/// Sidecars (init containers with `restartPolicy: Always`): the main container starts once
/// the sidecar's startup probe passes, the sidecar runs beside it (restarted if it exits),
/// and when the main container is done the sidecar is stopped and the pod succeeds.
#[test]
fn sidecar_containers_run_beside_the_main_ones() {
    let host = Host::start("sidecar");
    let mut pod = pod_manifest(
        "withsidecar",
        "Never",
        Some(&[
            "sh",
            "-c",
            "sleep 3; wget -qO- http://127.0.0.1:8080/ && exit 0; exit 1",
        ]),
        serde_json::json!({}),
    );
    pod["spec"]["initContainers"] = serde_json::json!([{
        "name": "side",
        "image": host::IMAGE,
        "restartPolicy": "Always",
        "command": ["sh", "-c", "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait"],
        "startupProbe": {"httpGet": {"port": 8080, "path": "/"}, "periodSeconds": 1},
    }]);
    host.apply(&pod);
    let running = host.wait_pod("withsidecar", Duration::from_secs(60), |p| {
        phase(p) == "Running"
    });
    let side = &running["status"]["initContainerStatuses"][0];
    assert_eq!(side["name"], "side");
    assert!(side["state"]["running"].is_object(), "{side}");
    assert_eq!(side["started"], true, "{side}");
    // The main container reached the sidecar, finished, and the sidecar was stopped.
    let done = host.wait_pod("withsidecar", Duration::from_secs(60), |p| {
        phase(p) == "Succeeded"
    });
    assert_eq!(
        done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"], 0,
        "{:#}",
        done["status"]
    );
    assert!(
        done["status"]["initContainerStatuses"][0]["state"]["terminated"].is_object(),
        "{:#}",
        done["status"]
    );
}

/// `orq exec`, `orq cp` and `orq port-forward`: the same streams for hosts without kubectl.
#[test]
fn orq_exec_cp_and_port_forward() {
    let host = Host::start("orqstreams");
    host.apply(&pod_manifest("web", "Never", None, serde_json::json!({})));
    host.wait_pod("web", Duration::from_secs(60), |p| phase(p) == "Running");
    let kubeconfig = host.data_dir().join("kubeconfig.yaml");
    let orq = |args: &[&str], input: &[u8]| {
        let mut full = vec![args[0], "--kubeconfig", kubeconfig.to_str().unwrap()];
        full.extend_from_slice(&args[1..]);
        kubectl_like(&host, env!("CARGO_BIN_EXE_orq"), &full, input)
    };

    let out = orq(
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo hi; echo err >&2; exit 5",
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(text(&out.stderr).contains("err"), "{}", text(&out.stderr));
    let out = orq(&["exec", "-i", "web", "--", "wc", "-c"], &[b'x'; 100_000]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "100000");

    let local = host.dir.path().join("orq-cp");
    std::fs::create_dir_all(local.join("d")).unwrap();
    std::fs::write(local.join("d/f"), "copied\n").unwrap();
    let d = local.join("d");
    let back = local.join("back");
    let out = orq(&["cp", d.to_str().unwrap(), "web:/tmp/d"], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = orq(&["exec", "web", "--", "cat", "/tmp/d/f"], b"");
    assert_eq!(text(&out.stdout), "copied\n", "{}", text(&out.stderr));
    let out = orq(&["cp", "web:/tmp/d", back.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(back.join("f")).unwrap(), "copied\n");

    let _forward = host::Proc(
        host.nsenter(env!("CARGO_BIN_EXE_orq"))
            .args(["port-forward", "--kubeconfig", kubeconfig.to_str().unwrap()])
            .args(["web", "18090:8080"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    host.wait_http("http://127.0.0.1:18090/index.html");
    assert_eq!(
        host.curl("http://127.0.0.1:18090/index.html").as_deref(),
        Some("hello from orquestra\n")
    );

    // Bad input: no such pod, a command that is not there.
    let out = orq(&["exec", "nope", "--", "true"], b"");
    assert!(!out.status.success());
    let out = orq(&["exec", "web", "--", "no-such-command"], b"");
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
}
