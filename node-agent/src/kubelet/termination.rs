//! A container's termination message (`state.terminated.message`): what it wrote to its
//! `terminationMessagePath` (a file the agent bind-mounts there, default
//! `/dev/termination-log`, writable by any user), or — with `terminationMessagePolicy:
//! FallbackToLogsOnError`, when that file is empty and the container failed — the tail of
//! its log, limited as the kubelet limits both.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Container;

use crate::logs::{self, LogOptions};

/// The default `terminationMessagePath`.
pub const DEFAULT_PATH: &str = "/dev/termination-log";
/// At most this much of the file is reported (the kubelet's 4 KiB).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// A log fallback is at most this many lines…
pub const FALLBACK_LINES: i64 = 80;
/// …and this many bytes (the last ones).
pub const FALLBACK_BYTES: usize = 2048;

/// The file in a container attempt's directory that is mounted at its message path.
pub fn host_file(attempt_dir: &Path) -> PathBuf {
    attempt_dir.join("termination-log")
}

/// Where `container` writes its message (`None`: nowhere, an empty path).
pub fn path_in_container(container: &Container) -> Option<String> {
    match container.termination_message_path.as_deref() {
        None => Some(DEFAULT_PATH.to_owned()),
        Some("") => None,
        Some(path) => Some(path.to_owned()),
    }
}

/// Creates the attempt's empty message file, writable by whatever user the container runs
/// as.
pub fn create(attempt_dir: &Path) -> io::Result<PathBuf> {
    let file = host_file(attempt_dir);
    fs::write(&file, b"")?;
    fs::set_permissions(&file, fs::Permissions::from_mode(0o666))?;
    Ok(file)
}

/// The message of an attempt that exited with `exit_code`, `log` being its log file.
pub fn message(container: &Container, attempt_dir: &Path, log: &Path, exit_code: i32) -> String {
    let mut bytes = fs::read(host_file(attempt_dir)).unwrap_or_default();
    bytes.truncate(MAX_MESSAGE_BYTES);
    let written = String::from_utf8_lossy(&bytes).into_owned();
    let fallback = container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
    if !written.is_empty() || !fallback || exit_code == 0 {
        return written;
    }
    let (lines, _) = logs::read(
        log,
        &LogOptions {
            tail_lines: Some(FALLBACK_LINES),
            ..LogOptions::default()
        },
    );
    let text = lines
        .iter()
        .map(|l| l.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let mut start = text.len().saturating_sub(FALLBACK_BYTES);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_log_fallback_on_failure_only() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("0.log");
        fs::write(
            &log,
            "2026-12-03T11:00:00.000000000Z stdout F first\n2026-12-03T11:00:00.100000000Z stdout F DONE\n",
        )
        .unwrap();
        let mut c = Container {
            name: "c".into(),
            ..Container::default()
        };
        create(dir.path()).unwrap();
        assert_eq!(message(&c, dir.path(), &log, 1), "");
        c.termination_message_policy = Some("FallbackToLogsOnError".into());
        assert_eq!(message(&c, dir.path(), &log, 1), "first\nDONE");
        assert_eq!(
            message(&c, dir.path(), &log, 0),
            "",
            "success keeps the file's (empty)"
        );
        fs::write(host_file(dir.path()), "OK").unwrap();
        assert_eq!(message(&c, dir.path(), &log, 1), "OK");
        fs::write(host_file(dir.path()), vec![b'x'; 10_000]).unwrap();
        assert_eq!(message(&c, dir.path(), &log, 0).len(), MAX_MESSAGE_BYTES);
        assert_eq!(path_in_container(&c).as_deref(), Some(DEFAULT_PATH));
    }
}
