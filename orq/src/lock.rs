//! Exclusive locks that say who holds them: a server's data dir, and the network of the
//! host (more exactly, of the network namespace) that a node agent programs.
//!
//! Each is an advisory `flock` on a file holding the owner's PID and data dir: the lock
//! belongs to the open file, so it lasts while the process holds it and the kernel drops it
//! when the process dies, even on SIGKILL — a stale file never blocks anyone.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// A lock this process holds until it drops the value (or exits).
#[derive(Debug)]
pub struct Held {
    _file: File,
}

/// Who holds a lock that was refused: what its file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder's PID.
    pub pid: String,
    /// The holder's data dir.
    pub data_dir: String,
}

/// Takes the lock at `path` for this process, recording `data_dir`; `Ok(Err(holder))` when
/// another process has it.
pub fn exclusive(path: &Path, data_dir: &Path) -> anyhow::Result<Result<Held, Holder>> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        file.set_len(0)?;
        writeln!(file, "{}\n{}", std::process::id(), data_dir.display())?;
        return Ok(Ok(Held { _file: file }));
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(err).with_context(|| format!("locking {}", path.display()));
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines = text.lines().map(str::trim);
    Ok(Err(Holder {
        pid: lines.next().unwrap_or("unknown").to_owned(),
        data_dir: lines.next().unwrap_or("unknown").to_owned(),
    }))
}

/// The data dir's lock: a second server on the same data dir is refused, naming the first.
pub fn data_dir(dir: &Path) -> anyhow::Result<Held> {
    exclusive(&dir.join("orq-server.lock"), dir)?.map_err(|holder| {
        anyhow::anyhow!(
            "data dir {} is in use by another orq server (PID {}): stop it, or pass another --data-dir",
            dir.display(),
            holder.pid
        )
    })
}

/// Where the node network lock of this process's network namespace lives: one per
/// namespace, since the bridge, the nftables tables and port 53 are per namespace.
fn node_network_path() -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let netns = std::fs::metadata("/proc/self/ns/net")
        .context("reading this process's network namespace")?
        .ino();
    Ok(PathBuf::from(format!(
        "/run/orquestra/node-network-{netns}.lock"
    )))
}

/// The node network's lock, for an agent that programs the network of this host (its
/// namespace): two would fight over the bridge, the proxy's nftables table and port 53.
/// `alternatives` says what else the refused one could do.
pub fn node_network(data_dir: &Path, alternatives: &str) -> anyhow::Result<Held> {
    exclusive(&node_network_path()?, data_dir)?.map_err(|holder| {
        anyhow::anyhow!(
            "another orq node agent (PID {}, data dir {}) already programs this host's network \
             (the pod bridge, the service proxy's nftables table and cluster DNS on port 53): \
             stop it, or {alternatives}",
            holder.pid,
            holder.data_dir
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_lock_names_its_holder_and_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let held = exclusive(&path, Path::new("/srv/one")).unwrap().unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        let refused = exclusive(&path, Path::new("/srv/two"))
            .unwrap()
            .unwrap_err();
        assert_eq!(
            refused,
            Holder {
                pid: std::process::id().to_string(),
                data_dir: "/srv/one".into()
            }
        );
        drop(held);
        assert!(exclusive(&path, Path::new("/srv/two")).unwrap().is_ok());
    }
}
