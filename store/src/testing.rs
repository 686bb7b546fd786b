//! Test support (feature `testing`): a real etcd on loopback for this crate's conformance
//! suite and benchmarks, and for other crates' tests against the etcd backend.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::etcd::{EtcdOptions, EtcdStore};

/// An `etcd` process started on free loopback ports with a temporary data directory. Killed
/// (by PID) and removed when dropped.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Child,
    client_url: String,
    endpoint: String,
    dir: tempfile::TempDir,
}

/// Why an etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    /// The `etcd` binary is missing or could not be spawned (`apt-get install etcd-server`).
    #[error("could not start {binary:?} (is etcd-server installed?)")]
    Spawn {
        /// The binary tried.
        binary: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Creating the data directory or picking ports failed.
    #[error("could not prepare etcd's data directory or ports")]
    Setup(#[source] std::io::Error),
    /// etcd started but did not answer in time.
    #[error("etcd did not become ready within {0:?}; its log: {1}")]
    NotReady(Duration, String),
}

impl EtcdProcess {
    /// Starts `etcd` (from `$ETCD_BIN` or `PATH`) and waits until it serves requests. Its
    /// ports are picked free, but another process may take one before etcd binds it: an etcd
    /// that exits for an address in use is started again on new ports (three tries).
    pub async fn start() -> Result<EtcdProcess, EtcdStartError> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once().await {
                Err(EtcdStartError::NotReady(_, log))
                    if tries < 3 && log.contains("address already in use") =>
                {
                    continue;
                }
                other => return other,
            }
        }
    }

    async fn start_once() -> Result<EtcdProcess, EtcdStartError> {
        let binary = PathBuf::from(std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into()));
        let dir = tempfile::Builder::new()
            .prefix("orquestra-etcd-")
            .tempdir()
            .map_err(EtcdStartError::Setup)?;
        let client_port = free_port().map_err(EtcdStartError::Setup)?;
        let peer_port = free_port().map_err(EtcdStartError::Setup)?;
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log =
            std::fs::File::create(dir.path().join("etcd.log")).map_err(EtcdStartError::Setup)?;
        let log_err = log.try_clone().map_err(EtcdStartError::Setup)?;
        let mut command = Command::new(&binary);
        command
            .arg("--name=orquestra-test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=orquestra-test={peer_url}"))
            // Values up to the store's limit must fit in one request.
            .arg("--max-request-bytes=2097152")
            .arg("--experimental-watch-progress-notify-interval=1s")
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl is async-signal-safe; the closure touches no memory of the parent.
        unsafe {
            use std::os::unix::process::CommandExt;
            // Die with the test process even if it is killed before `Drop` runs.
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|source| EtcdStartError::Spawn {
            binary: binary.clone(),
            source,
        })?;
        let mut etcd = EtcdProcess {
            child,
            endpoint: format!("127.0.0.1:{client_port}"),
            client_url,
            dir,
        };
        etcd.wait_ready(Duration::from_secs(20)).await?;
        Ok(etcd)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<(), EtcdStartError> {
        let deadline = Instant::now() + timeout;
        let options = EtcdOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
        };
        // An etcd that exited will not become ready: say so at once, with its log.
        while Instant::now() < deadline && !matches!(self.child.try_wait(), Ok(Some(_))) {
            if EtcdStore::connect(std::slice::from_ref(&self.endpoint), options.clone())
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default();
        Err(EtcdStartError::NotReady(timeout, log))
    }

    /// `host:port` of the client endpoint.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `http://host:port` of the client endpoint.
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The datastore URL that selects this etcd.
    pub fn datastore_url(&self) -> String {
        format!("etcd://{}", self.endpoint)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects an [`EtcdStore`] to it.
    pub async fn store(&self) -> crate::Result<EtcdStore> {
        EtcdStore::connect(std::slice::from_ref(&self.endpoint), EtcdOptions::default()).await
    }

    /// The process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Times `n` small durable writes (512 bytes, then `fdatasync`) to a scratch file in `dir`,
/// appending or overwriting one block: the disk's fsync limit, the anchor of the benchmarks.
pub fn fsync_samples(dir: &Path, n: usize, append: bool) -> std::io::Result<Vec<Duration>> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let path = dir.join(format!("fsync-probe-{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)?;
    let block = [0x42u8; 512];
    if !append {
        file.write_all(&[0u8; 4096])?;
        file.sync_all()?;
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        if append {
            file.write_all(&block)?;
        } else {
            file.write_all_at(&block, 0)?;
        }
        file.sync_data()?;
        samples.push(started.elapsed());
    }
    std::fs::remove_file(&path)?;
    Ok(samples)
}
