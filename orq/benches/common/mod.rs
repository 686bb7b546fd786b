//! Shared by the benchmarks: a process's RSS, a client from a kubeconfig, child processes
//! killed when dropped, percentiles, entering a network namespace, and a local registry
//! holding the busybox test image. Not every benchmark uses every piece.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kube::Client;

#[path = "../../tests/common/busybox.rs"]
pub mod busybox;

/// A child process, killed (by its PID) and reaped when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `p` quantile (0..=1) of `samples`, nearest rank; sorts them.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[i]
}

/// Moves this process into network namespace `/run/netns/NAME` and brings its loopback up.
/// Call it before any thread exists: every later thread and child inherits it.
pub fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    // SAFETY: setns on an open namespace file descriptor; the process has one thread here.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
    busybox::run_ok(Command::new("ip").args(["link", "set", "lo", "up"]));
}

/// A registry on 127.0.0.1:5000 (storage under `dir`) holding the busybox test image as
/// `image`; it stops when the returned process is dropped.
pub fn busybox_registry(dir: &Path, image: &str) -> Proc {
    busybox::build_image(&dir.join("oci"));
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:5000\nlog:\n  level: error\n",
            dir.join("registry").display()
        ),
    )
    .unwrap();
    let registry = Proc(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(500));
    busybox::run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:busybox", dir.join("oci").display()))
            .arg(format!("docker://{image}")),
    );
    registry
}

/// The resident set size of process `pid`, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A kube client from a kubeconfig file.
pub async fn client(kubeconfig: &std::path::Path) -> Client {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(config, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}
