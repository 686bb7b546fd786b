//! The README's quick start, run as written (root): its server block (`scripts/run.sh`) in
//! the background, then its client block, both with bash inside a network namespace this
//! test creates, so the server's node agent puts its bridge, NAT, service proxy and pods
//! there and never on the machine's own network.
//!
//! What the environment changes, and nothing else: `ORQ_BINARY` (run.sh runs this test
//! build instead of building a release), `orq` on `PATH` is the same build, and
//! `ORQ_DATA_DIR`/`ORQ_AGENT_DATA_DIR` put the state in a temporary directory (the README's
//! commands read `${ORQ_DATA_DIR:-/var/lib/orquestra}`).

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The ```sh block after `<!-- quick-start:NAME -->` in the README.
fn block(readme: &str, name: &str) -> String {
    let marker = format!("<!-- quick-start:{name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README has no {marker}"))
        .1;
    let body = after
        .split_once("```sh\n")
        .unwrap_or_else(|| panic!("no ```sh block after {marker}"))
        .1;
    body.split_once("\n```")
        .unwrap_or_else(|| panic!("unterminated block after {marker}"))
        .0
        .to_owned()
}

/// The namespace, the server's process group and its state: removed whatever happens.
struct Bed {
    netns: String,
    server: Option<Child>,
    data: PathBuf,
}

impl Bed {
    fn stop_server(&mut self) {
        if let Some(mut server) = self.server.take() {
            // SAFETY: signalling the process group our own child leads (by its PID).
            unsafe { libc::kill(-(server.id() as i32), libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while server.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: as above; a server that ignored SIGTERM.
            unsafe { libc::kill(-(server.id() as i32), libc::SIGKILL) };
            let _ = server.wait();
        }
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.stop_server();
        // The agent's containers, pod namespaces and network (inside the test namespace).
        let _ = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .arg(env!("CARGO_BIN_EXE_orq"))
            .args(["agent", "--cleanup", "--agent-data-dir"])
            .arg(self.data.join("agent"))
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
    }
}

fn bash(netns: &str, script: &str, env: &[(&str, String)], repo: &Path) -> Command {
    // nsenter, not `ip netns exec`: that one remounts /sys, hiding the cgroup hierarchy
    // the agent's containers need.
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net=/run/netns/{netns}"))
        .args(["bash", "-euxo", "pipefail", "-c", script])
        .current_dir(repo)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    command
}

#[test]
fn the_readme_quick_start_works_as_written() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let (server_block, client_block) = (block(&readme, "server"), block(&readme, "client"));

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_orq"), bin.join("orq")).unwrap();
    let data = dir.path().join("data");
    let env = [
        ("ORQ_BINARY", env!("CARGO_BIN_EXE_orq").to_owned()),
        ("ORQ_DATA_DIR", data.display().to_string()),
        (
            "ORQ_AGENT_DATA_DIR",
            data.join("agent").display().to_string(),
        ),
        (
            "PATH",
            format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
        ),
    ];

    let netns = format!("orqqs{}", std::process::id());
    let status = Command::new("ip")
        .args(["netns", "add", &netns])
        .status()
        .unwrap();
    assert!(status.success(), "creating network namespace {netns}");
    let mut bed = Bed {
        netns: netns.clone(),
        server: None,
        data: data.clone(),
    };
    let lo = Command::new("ip")
        .args(["-n", &netns, "link", "set", "lo", "up"])
        .status()
        .unwrap();
    assert!(lo.success());

    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    bed.server = Some(
        bash(&netns, &server_block, &env, repo)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    // The client block starts by waiting for the node; give the server its kubeconfig first.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !data.join("kubeconfig.yaml").exists() {
        let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
        assert!(
            Instant::now() < deadline,
            "the server wrote no kubeconfig:\n{server_log}"
        );
        if let Some(status) = bed.server.as_mut().unwrap().try_wait().unwrap() {
            panic!("the server block exited ({status}):\n{server_log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let out = bash(&netns, &client_block, &env, repo).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let server_log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    if !out.status.success() {
        let pods = bash(
            &netns,
            "kubectl --kubeconfig \"$ORQ_DATA_DIR/kubeconfig.yaml\" get pods,events -o yaml",
            &env,
            repo,
        )
        .output()
        .unwrap();
        panic!(
            "the quick start failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- server\n{server_log}\n--- pods and events\n{}",
            out.status,
            String::from_utf8_lossy(&pods.stdout)
        );
    }
    // What a newcomer sees: the pod's log, the page through the NodePort, the metrics.
    assert!(stdout.contains("hello from a pod"), "{stdout}");
    // Through the NodePort on the host's address and on 127.0.0.1.
    assert_eq!(
        stdout.matches("hello from orquestra").count(),
        2,
        "{stdout}"
    );
    let running = stdout
        .lines()
        .find_map(|l| l.strip_prefix("kubelet_running_pods "))
        .and_then(|v| v.trim().parse::<f64>().ok());
    // Counted at scrape time: the rollout is done, so all four run.
    assert_eq!(
        running,
        Some(4.0),
        "kubelet_running_pods for hello and 3 web pods:\n{stdout}"
    );
    assert!(
        stdout.contains(r#"apiserver_storage_objects{resource="pods"} 4"#),
        "{stdout}"
    );
    bed.stop_server();
}
