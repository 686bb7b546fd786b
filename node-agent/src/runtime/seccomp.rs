//! Seccomp profiles for containers (`securityContext.seccompProfile`), applied by
//! libcontainer through libseccomp:
//!
//! - `RuntimeDefault`: [`runtime_default`] — every system call allowed except those the
//!   container runtimes' default profiles (Docker's, containerd's) keep from unprivileged
//!   containers: kernel modules, keyrings, mounts and namespaces, tracing other processes,
//!   clocks, reboot, swap, `bpf`, `perf_event_open`, `userfaultfd`, … — each failing with
//!   `EPERM`, so programs that probe for them carry on;
//! - `Localhost`: a profile file (OCI/Docker JSON) under the agent's `seccomp/` directory,
//!   as the kubelet reads them from its own;
//! - `Unconfined`, or none: no filter. Privileged containers get none either, as with
//!   containerd.

use std::path::Path;

use serde_json::{Value, json};

/// The system calls [`runtime_default`] refuses.
pub const REFUSED: &[&str] = &[
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "fsconfig",
    "fsmount",
    "fsopen",
    "fspick",
    "get_kernel_syms",
    "get_mempolicy",
    "init_module",
    "ioperm",
    "iopl",
    "kcmp",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "mbind",
    "mount",
    "mount_setattr",
    "move_mount",
    "move_pages",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "open_tree",
    "perf_event_open",
    "pivot_root",
    "process_vm_readv",
    "process_vm_writev",
    "ptrace",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "set_mempolicy",
    "setns",
    "settimeofday",
    "swapoff",
    "swapon",
    "sysfs",
    "_sysctl",
    "umount2",
    "unshare",
    "uselib",
    "userfaultfd",
    "ustat",
];

/// The `RuntimeDefault` profile, as an OCI `linux.seccomp`.
pub fn runtime_default() -> Value {
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{
            "names": REFUSED,
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": libc::EPERM,
        }],
    })
}

/// A `Localhost` profile: `relative` under `root`, read as an OCI seccomp object (Docker's
/// profile format is one). A path leaving `root`, a missing file or one that is not such an
/// object is an error for the pod's status.
pub fn localhost(root: &Path, relative: &str) -> Result<Value, String> {
    let path = Path::new(relative);
    if path.is_absolute()
        || path
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(format!(
            "localhostProfile {relative:?} must be a relative path below {}",
            root.display()
        ));
    }
    let file = root.join(path);
    let text = std::fs::read(&file)
        .map_err(|e| format!("failed to load seccomp profile {}: {e}", file.display()))?;
    let profile: Value = serde_json::from_slice(&text)
        .map_err(|e| format!("seccomp profile {} is not JSON: {e}", file.display()))?;
    if !profile["defaultAction"].is_string() {
        return Err(format!(
            "seccomp profile {} has no defaultAction",
            file.display()
        ));
    }
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles() {
        let default = runtime_default();
        assert_eq!(default["defaultAction"], "SCMP_ACT_ALLOW");
        let refused = default["syscalls"][0]["names"].as_array().unwrap();
        assert!(refused.iter().any(|n| n == "unshare"));
        assert!(!refused.iter().any(|n| n == "clone" || n == "read"));

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
        std::fs::write(
            dir.path().join("profiles/audit.json"),
            r#"{"defaultAction": "SCMP_ACT_LOG"}"#,
        )
        .unwrap();
        let p = localhost(dir.path(), "profiles/audit.json").unwrap();
        assert_eq!(p["defaultAction"], "SCMP_ACT_LOG");
        assert!(localhost(dir.path(), "../etc/passwd").is_err());
        assert!(localhost(dir.path(), "/etc/passwd").is_err());
        assert!(localhost(dir.path(), "missing.json").is_err());
    }
}
