//! One container as the runtime sees it: its OCI runtime spec (`config.json`), its root
//! filesystem (an overlay of the image's layers with a private upper directory), and the
//! shim that runs it.
//!
//! The agent decides *what* runs (from the pod spec and the image); this module turns that
//! into a bundle and runs it through [`crate::shim`] — never calling libcontainer from the
//! agent's own, multi-threaded process.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::shim::{self, Exited, ShimArgs, Started};

/// The capabilities a container gets unless it asks otherwise: the container runtimes'
/// (Docker's, containerd's) default set, which Kubernetes users expect.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// A bind mount into the container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindMount {
    /// On the host.
    pub source: PathBuf,
    /// In the container.
    pub destination: String,
    /// Mounted read-only.
    pub read_only: bool,
}

/// cgroup limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resources {
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// CPU quota in microseconds per 100 ms period.
    pub cpu_quota: Option<i64>,
    /// Relative CPU weight (cgroup v1 shares).
    pub cpu_shares: Option<u64>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
}

/// Everything that decides how one container runs, resolved from the pod and the image.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerConfig {
    /// The process: executable and arguments.
    pub args: Vec<String>,
    /// `KEY=value`.
    pub env: Vec<String>,
    /// Working directory.
    pub cwd: String,
    /// User and group IDs.
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Supplementary groups.
    pub additional_gids: Vec<u32>,
    /// The pod's hostname.
    pub hostname: String,
    /// The pod's network namespace; `None` shares the host's (`hostNetwork`).
    pub netns: Option<PathBuf>,
    /// Volumes, `/etc/hosts`, `/etc/resolv.conf`.
    pub mounts: Vec<BindMount>,
    /// `linux.cgroupsPath`.
    pub cgroups_path: String,
    /// Limits.
    pub resources: Resources,
    /// Every capability, every device, writable `/sys`.
    pub privileged: bool,
    /// Capabilities added to and dropped from [`DEFAULT_CAPABILITIES`] (`CAP_` optional,
    /// `ALL` understood).
    pub cap_add: Vec<String>,
    /// See `cap_add`.
    pub cap_drop: Vec<String>,
    /// `readOnlyRootFilesystem`.
    pub read_only_rootfs: bool,
    /// The process runs on a terminal (`tty`).
    pub tty: bool,
    /// Join this PID namespace (an ephemeral container's target's) instead of a new one.
    pub pid_namespace: Option<PathBuf>,
    /// The seccomp filter (`linux.seccomp`), if any.
    pub seccomp: Option<Value>,
    /// `allowPrivilegeEscalation: false`: the process cannot gain privileges (setuid).
    pub no_new_privileges: bool,
    /// Namespaced kernel parameters set in the container's namespaces (`linux.sysctl`).
    pub sysctls: std::collections::BTreeMap<String, String>,
    /// The AppArmor profile the process runs under (`process.apparmorProfile`), if any.
    pub apparmor_profile: Option<String>,
    /// Join this IPC namespace (the pod's, shared by its containers) instead of a new one.
    pub ipc_namespace: Option<PathBuf>,
    /// `hostIPC`: the node's IPC namespace.
    pub host_ipc: bool,
}

/// Every capability, in the kernel's numbering (the index is the bit).
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// The capabilities a privileged container (or `add: [ALL]`) gets: every one this process
/// may hand on — its bounding set — as containerd's `WithAllCurrentCapabilities` does. A
/// host (or an outer container) that withholds one, `CAP_SYS_RESOURCE` say, would make
/// the container's start fail asking for it.
fn all_capabilities() -> Vec<String> {
    static CURRENT: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    CURRENT
        .get_or_init(|| {
            let bounding = std::fs::read_to_string("/proc/self/status")
                .ok()
                .and_then(|status| {
                    status.lines().find_map(|l| {
                        u64::from_str_radix(l.strip_prefix("CapBnd:")?.trim(), 16).ok()
                    })
                })
                .unwrap_or(u64::MAX);
            ALL_CAPABILITIES
                .iter()
                .enumerate()
                .filter(|(bit, _)| bounding & (1 << bit) != 0)
                .map(|(_, c)| (*c).to_string())
                .collect()
        })
        .clone()
}

impl ContainerConfig {
    /// The capability set after `privileged`, `cap_add` and `cap_drop`.
    pub fn capabilities(&self) -> Vec<String> {
        let norm = |c: &String| {
            let c = c.to_uppercase();
            if c == "ALL" || c.starts_with("CAP_") {
                c
            } else {
                format!("CAP_{c}")
            }
        };
        let mut caps: Vec<String> = if self.privileged {
            all_capabilities()
        } else {
            DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).collect()
        };
        for add in self.cap_add.iter().map(norm) {
            if add == "ALL" {
                caps = all_capabilities();
            } else if all_capabilities().contains(&add) && !caps.contains(&add) {
                caps.push(add);
            }
        }
        for drop in self.cap_drop.iter().map(norm) {
            if drop == "ALL" {
                caps.clear();
            } else {
                caps.retain(|c| *c != drop);
            }
        }
        caps
    }

    /// The OCI runtime spec (`config.json`) for a bundle whose root filesystem is `rootfs`.
    pub fn oci_spec(&self, rootfs: &Path) -> Value {
        let caps = self.capabilities();
        let pid = match &self.pid_namespace {
            Some(path) => json!({"type": "pid", "path": path}),
            None => json!({"type": "pid"}),
        };
        let mut namespaces = vec![pid, json!({"type": "mount"}), json!({"type": "cgroup"})];
        match (&self.ipc_namespace, self.host_ipc) {
            (_, true) => {}
            (Some(path), false) => namespaces.push(json!({"type": "ipc", "path": path})),
            (None, false) => namespaces.push(json!({"type": "ipc"})),
        }
        // hostNetwork (no netns): the host's network and, as the kubelet does, its hostname.
        if let Some(path) = &self.netns {
            namespaces.push(json!({"type": "network", "path": path}));
            namespaces.push(json!({"type": "uts"}));
        }
        let sys_options = if self.privileged {
            json!(["nosuid", "noexec", "nodev"])
        } else {
            json!(["nosuid", "noexec", "nodev", "ro"])
        };
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                   "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_options}),
            // The container's own cgroup (its limits, its usage), read-only unless privileged,
            // as container runtimes mount it: what in-place resize checks read.
            json!({"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
            "options": if self.privileged {
                json!(["nosuid", "noexec", "nodev", "relatime"])
            } else {
                json!(["nosuid", "noexec", "nodev", "relatime", "ro"])
            }}),
        ];
        for m in &self.mounts {
            let mut options = vec!["rbind", "rprivate"];
            if m.read_only {
                options.push("ro");
            }
            mounts.push(json!({"destination": m.destination, "type": "bind",
                               "source": m.source, "options": options}));
        }
        let mut resources = serde_json::Map::new();
        if let Some(limit) = self.resources.memory_limit {
            resources.insert("memory".into(), json!({"limit": limit}));
        }
        let mut cpu = serde_json::Map::new();
        if let Some(quota) = self.resources.cpu_quota {
            cpu.insert("quota".into(), json!(quota));
            cpu.insert("period".into(), json!(100_000));
        }
        if let Some(shares) = self.resources.cpu_shares {
            cpu.insert("shares".into(), json!(shares));
        }
        if !cpu.is_empty() {
            resources.insert("cpu".into(), Value::Object(cpu));
        }
        if let Some(limit) = self.resources.pids_limit {
            resources.insert("pids".into(), json!({"limit": limit}));
        }
        if self.privileged {
            resources.insert("devices".into(), json!([{"allow": true, "access": "rwm"}]));
        }
        let mut linux = json!({
            "namespaces": namespaces,
            "cgroupsPath": self.cgroups_path,
            "resources": resources,
        });
        if !self.privileged {
            linux["maskedPaths"] = json!([
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/proc/scsi",
                "/sys/firmware"
            ]);
            linux["readonlyPaths"] = json!([
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger"
            ]);
        }
        let mut spec = json!({
            "ociVersion": "1.0.2",
            "root": {"path": rootfs, "readonly": self.read_only_rootfs},
            "mounts": mounts,
            "process": {
                "terminal": self.tty,
                "user": {"uid": self.uid, "gid": self.gid, "additionalGids": self.additional_gids},
                "args": self.args,
                "env": self.env,
                "cwd": if self.cwd.is_empty() { "/" } else { &self.cwd },
                "capabilities": {
                    "bounding": caps, "effective": caps, "permitted": caps,
                },
                // `noNewPrivileges` is left out rather than false: libcontainer loads a
                // seccomp filter while still privileged only when the key is absent.
            },
            "linux": linux,
        });
        if let Some(seccomp) = &self.seccomp {
            spec["linux"]["seccomp"] = seccomp.clone();
        }
        if self.no_new_privileges {
            spec["process"]["noNewPrivileges"] = json!(true);
        }
        if !self.sysctls.is_empty() {
            spec["linux"]["sysctl"] = json!(self.sysctls);
        }
        if let Some(profile) = &self.apparmor_profile {
            spec["process"]["apparmorProfile"] = json!(profile);
        }
        if self.netns.is_some() {
            spec["hostname"] = json!(self.hostname);
        }
        spec
    }
}

/// How a container is doing, read from its bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ContainerState {
    /// The shim has not reported a start (being created, or the start failed).
    Created,
    /// Its init runs.
    Running(Started),
    /// It ran and exited.
    Exited(Started, Exited),
    /// It was started but is neither running nor recorded as exited: its shim died with
    /// it (e.g. the whole host was reset). Reported as an unknown termination.
    Lost(Started),
}

/// Reads a container's state from its bundle directory.
pub fn state(bundle: &Path) -> ContainerState {
    let read = |name: &str| fs::read(bundle.join(name)).ok();
    let Some(started) =
        read(shim::STARTED).and_then(|b| serde_json::from_slice::<Started>(&b).ok())
    else {
        return ContainerState::Created;
    };
    if let Some(exited) = read(shim::EXITED).and_then(|b| serde_json::from_slice::<Exited>(&b).ok())
    {
        return ContainerState::Exited(started, exited);
    }
    if shim::start_ticks(started.pid) == Some(started.start_ticks) {
        return ContainerState::Running(started);
    }
    // The shim writes the record right after reaping; look once more before calling it lost.
    std::thread::sleep(std::time::Duration::from_millis(20));
    match read(shim::EXITED).and_then(|b| serde_json::from_slice::<Exited>(&b).ok()) {
        Some(exited) => ContainerState::Exited(started, exited),
        None => ContainerState::Lost(started),
    }
}

/// Sends `signal` to a running container's init.
pub fn signal(bundle: &Path, signal: nix::sys::signal::Signal) -> io::Result<()> {
    if let ContainerState::Running(started) = state(bundle) {
        match nix::sys::signal::kill(nix::unistd::Pid::from_raw(started.pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Runs containers through the shim.
#[derive(Clone, Debug)]
pub struct Runtime {
    /// The shim's program and the arguments that select shim mode (`orq shim`).
    pub shim: Vec<OsString>,
    /// libcontainer's state root.
    pub state_root: PathBuf,
}

impl Runtime {
    /// Writes `config.json` into `bundle` and starts the container; returns once it runs,
    /// or with the runtime's message (for a pod's `CreateContainerError`/`StartError`).
    pub async fn start(
        &self,
        id: &str,
        bundle: &Path,
        spec: &Value,
        log: &Path,
        stdin: crate::shim::StdinMode,
        tty: bool,
    ) -> Result<Started, String> {
        fs::create_dir_all(bundle).map_err(|e| e.to_string())?;
        fs::create_dir_all(&self.state_root).map_err(|e| e.to_string())?;
        if let Some(dir) = log.parent() {
            fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        }
        fs::write(
            bundle.join("config.json"),
            serde_json::to_vec_pretty(spec).map_err(|e| e.to_string())?,
        )
        .map_err(|e| format!("writing config.json: {e}"))?;
        let args = ShimArgs {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            root: self.state_root.clone(),
            log: log.to_owned(),
            log_max_bytes: 10 << 20,
            stdin,
            tty,
        };
        let (program, prefix) = self
            .shim
            .split_first()
            .ok_or_else(|| "no shim configured".to_owned())?;
        let output = tokio::process::Command::new(program)
            .args(prefix)
            .args(args.to_args())
            .stdin(std::process::Stdio::null())
            .kill_on_drop(false)
            .output()
            .await
            .map_err(|e| format!("running the shim {program:?}: {e}"))?;
        if !output.status.success() {
            let message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
            return Err(if message.is_empty() {
                format!("the shim failed ({})", output.status)
            } else {
                message
            });
        }
        match state(bundle) {
            ContainerState::Running(started)
            | ContainerState::Exited(started, _)
            | ContainerState::Lost(started) => Ok(started),
            ContainerState::Created => Err("the shim reported a start but wrote no record".into()),
        }
    }
}

/// Mounts an overlay of `layers` (bottom first) with a private upper directory at
/// `dir/rootfs`; idempotent.
pub fn mount_rootfs(layers: &[PathBuf], dir: &Path) -> io::Result<PathBuf> {
    let rootfs = dir.join("rootfs");
    let (upper, work) = (dir.join("upper"), dir.join("work"));
    for d in [&rootfs, &upper, &work] {
        fs::create_dir_all(d)?;
    }
    if is_mountpoint(&rootfs) {
        return Ok(rootfs);
    }
    if layers.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an image without layers",
        ));
    }
    let lower: Vec<String> = layers
        .iter()
        .rev()
        .map(|l| l.display().to_string())
        .collect();
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        upper.display(),
        work.display()
    );
    nix::mount::mount(
        Some("overlay"),
        &rootfs,
        Some("overlay"),
        nix::mount::MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(io::Error::from)?;
    Ok(rootfs)
}

/// Unmounts `dir/rootfs` (if mounted) and deletes the container's directory.
pub fn remove_container_dir(dir: &Path) -> io::Result<()> {
    let rootfs = dir.join("rootfs");
    if is_mountpoint(&rootfs) {
        nix::mount::umount2(&rootfs, nix::mount::MntFlags::MNT_DETACH).map_err(io::Error::from)?;
    }
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Whether `path` is a mount point (its device differs from its parent's, or it appears in
/// the mount table).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(mounts) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let target = path.display().to_string();
    mounts
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(target.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_add_drop_privileged() {
        let mut config = ContainerConfig {
            cap_add: vec!["NET_ADMIN".into()],
            cap_drop: vec!["CAP_KILL".into()],
            ..ContainerConfig::default()
        };
        let caps = config.capabilities();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_owned()));
        assert!(!caps.contains(&"CAP_KILL".to_owned()));
        config.cap_drop = vec!["ALL".into()];
        config.cap_add = vec![];
        assert!(config.capabilities().is_empty());
        config.privileged = true;
        config.cap_drop = vec![];
        let all = config.capabilities();
        assert!(all.contains(&"CAP_SYS_ADMIN".to_owned()));
        // Only what this process may grant: nothing outside its bounding set.
        let bounding = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| u64::from_str_radix(l.strip_prefix("CapBnd:")?.trim(), 16).ok())
            .unwrap();
        for cap in &all {
            let bit = ALL_CAPABILITIES.iter().position(|c| c == cap).unwrap();
            assert!(
                bounding & (1 << bit) != 0,
                "{cap} is not in this process's bounding set"
            );
        }
    }

    #[test]
    fn spec_parses_as_an_oci_runtime_spec() {
        let config = ContainerConfig {
            args: vec!["/bin/sh".into(), "-c".into(), "echo hi".into()],
            env: vec!["PATH=/bin".into()],
            hostname: "web".into(),
            netns: Some("/run/netns/x".into()),
            mounts: vec![BindMount {
                source: "/tmp/hosts".into(),
                destination: "/etc/hosts".into(),
                read_only: false,
            }],
            cgroups_path: "/orquestra/pod1/c1".into(),
            resources: Resources {
                memory_limit: Some(64 << 20),
                cpu_quota: Some(50_000),
                cpu_shares: Some(512),
                pids_limit: Some(100),
            },
            ..ContainerConfig::default()
        };
        let spec = config.oci_spec(Path::new("/tmp/rootfs"));
        let parsed: libcontainer::oci_spec::runtime::Spec =
            serde_json::from_value(spec.clone()).unwrap();
        assert_eq!(parsed.hostname().as_deref(), Some("web"));
        let linux = parsed.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/orquestra/pod1/c1"))
        );
        let memory = linux
            .resources()
            .as_ref()
            .unwrap()
            .memory()
            .as_ref()
            .unwrap();
        assert_eq!(memory.limit(), Some(64 << 20));
        // hostNetwork: no network (or UTS) namespace, no hostname.
        let host = ContainerConfig {
            netns: None,
            ..config
        }
        .oci_spec(Path::new("/tmp/rootfs"));
        assert!(!host.to_string().contains("\"network\""));
        assert!(host.get("hostname").is_none());
    }
}
