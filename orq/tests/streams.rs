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

/// Runs kubectl `bin` inside the host's namespace with `input` on stdin.
fn kubectl(host: &Host, bin: &str, args: &[&str], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = host
        .nsenter(bin)
        .arg("--kubeconfig")
        .arg(host.data_dir().join("kubeconfig.yaml"))
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
    let host = Host::start("exec");
    host.apply(&pod_manifest(
        "sh",
        "Never",
        Some(&["sh", "-c", "echo ready; sleep 3600"]),
        serde_json::json!({}),
    ));
    host.wait_pod("sh", Duration::from_secs(60), |p| phase(p) == "Running");
    let k = |args: &[&str], input: &[u8]| kubectl(&host, KUBECTL_1_33, args, input);

    // A command's output and exit code 0.
    let out = k(
        &["exec", "sh", "--", "sh", "-c", "echo hello; echo oops >&2"],
        b"",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello\n");
    assert!(text(&out.stderr).contains("oops"), "{}", text(&out.stderr));

    // Stdin piped through, to its end (v5's half-close).
    let input: Vec<u8> = (0..200_000).map(|i| b"abcdefgh\n"[i % 9]).collect();
    let out = k(&["exec", "-i", "sh", "--", "wc", "-c"], &input);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "200000");

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
        .nsenter(KUBECTL_1_33)
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
    while streams(&host) != 0.0 {
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
        "{KUBECTL_1_33} --kubeconfig {} exec -it sh -- sh -c 'tty; stty size; exit 3'",
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
