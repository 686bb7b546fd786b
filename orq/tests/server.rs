//! `orq server` as a user runs it: a real process on a free loopback port, probed over HTTP,
//! stopped with SIGTERM.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orquestra_store::testing::EtcdProcess;

/// A running `orq server`, killed by PID if the test ends early.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(data_dir: &std::path::Path, extra: &[&str]) -> Server {
        let addr: SocketAddr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_orq"))
            .arg("server")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Server { child, addr }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split(' ').nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n")?.1.to_owned();
        Some((status, body))
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some((200, _)) = self.get("/readyz") {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("orq server not ready within 30s");
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "orq server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn serves_health_and_metrics_on_the_embedded_store_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    server.wait_ready();
    assert_eq!(server.get("/healthz").unwrap(), (200, "ok".to_owned()));
    let (status, metrics) = server.get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(metrics.contains("orquestra_store_revision 0"), "{metrics}");
    assert!(
        metrics.contains("orquestra_store_db_size_bytes"),
        "{metrics}"
    );
    assert!(
        dir.path().join("state.db").exists(),
        "default datastore is DATA_DIR/state.db"
    );
    assert!(server.terminate().success());
}

#[test]
fn a_locked_data_dir_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let first = Server::start(dir.path(), &[]);
    first.wait_ready();
    let output = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args(["server", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("locked by another process"), "{stderr}");
    assert!(first.terminate().success());
}

#[test]
fn runs_on_etcd() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let etcd = runtime.block_on(EtcdProcess::start()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--datastore", &etcd.datastore_url()]);
    server.wait_ready();
    let (_, metrics) = server.get("/metrics").unwrap();
    assert!(metrics.contains("orquestra_store_revision 1"), "{metrics}");
    assert!(!dir.path().join("state.db").exists());
    assert!(server.terminate().success());
}

#[test]
fn a_bad_datastore_url_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_orq"))
        .args([
            "server",
            "--listen",
            "127.0.0.1:0",
            "--datastore",
            "mysql://x",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unknown scheme"), "{stderr}");
}
