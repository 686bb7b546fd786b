//! Shared by `orq`'s end-to-end tests: a real `orq server` process on a free loopback port.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `orq server`, killed by PID if the test ends early.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
}

impl Server {
    pub fn start(data_dir: &Path, extra: &[&str]) -> Server {
        let addr: SocketAddr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        Server::start_at(data_dir, addr, extra)
    }

    /// Starts on a given address (a restart where the last one listened).
    pub fn start_at(data_dir: &Path, addr: SocketAddr, extra: &[&str]) -> Server {
        let child = Command::new(env!("CARGO_BIN_EXE_orq"))
            .arg("server")
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--listen")
            .arg(addr.to_string())
            // These servers run in the machine's own network namespace: their local agent
            // must not program it (tests run pods only in namespaces of their own).
            .arg("--disable-kube-proxy")
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Server {
            child,
            addr,
            data_dir: data_dir.to_owned(),
        }
    }

    /// Whether the server was started with `--insecure-http`.
    pub fn insecure(&self) -> bool {
        !self.data_dir.join("tls").join("ca.crt").exists()
    }

    /// The admin token (TLS mode).
    pub fn token(&self) -> Option<String> {
        std::fs::read_to_string(self.data_dir.join("token")).ok()
    }

    /// GETs `path` with curl: over HTTPS with the server's CA and the admin token, or plain
    /// HTTP in insecure mode. Returns the status and body.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        self.get_as(path, true)
    }

    /// Like [`Server::get`], with or without the admin token.
    pub fn get_as(&self, path: &str, authenticated: bool) -> Option<(u16, String)> {
        let mut curl = Command::new("curl");
        curl.args(["-s", "--max-time", "10", "-w", "\n%{http_code}"]);
        let url = if self.insecure() {
            format!("http://{}{path}", self.addr)
        } else {
            curl.arg("--cacert")
                .arg(self.data_dir.join("tls").join("ca.crt"));
            if authenticated {
                curl.arg("-H")
                    .arg(format!("Authorization: Bearer {}", self.token()?));
            }
            format!("https://{}{path}", self.addr)
        };
        let out = curl.arg(url).output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_owned()))
    }

    pub fn wait_ready(&self) {
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
    pub fn terminate(mut self) -> std::process::ExitStatus {
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

impl Server {
    /// The admin kubeconfig the server wrote.
    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir.join("kubeconfig.yaml")
    }
}
