//! The busybox-static test image, built with umoci, and running commands that must succeed:
//! shared by the container tests and the
//! pods benchmark (which includes this file by path).

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `cmd` with `input` on its stdin, panicking with its output unless it succeeds.
pub fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `cmd`, panicking with its output unless it succeeds.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An OCI image of busybox-static: `/bin/<applet>` links, `/www/index.html`, and a default
/// command serving `/www` on port 8080.
pub fn build_image(layout: &Path) {
    let work = layout.parent().unwrap().join("image-build");
    run_ok(
        Command::new("umoci")
            .arg("init")
            .arg("--layout")
            .arg(layout),
    );
    run_ok(
        Command::new("umoci")
            .args(["new", "--image"])
            .arg(format!("{}:busybox", layout.display())),
    );
    run_ok(
        Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:busybox", layout.display()))
            .arg(&work),
    );
    let rootfs = work.join("rootfs");
    for dir in ["bin", "www", "tmp", "etc"] {
        std::fs::create_dir_all(rootfs.join(dir)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "httpd", "echo", "sleep", "cat", "dd", "head", "env", "hostname", "id", "ls", "true",
        "false", "touch", "test", "nc", "wget", "seq", "mkdir", "chmod", "printf", "rm",
        "nslookup", "tail", "wc", "tar", "ps", "stty", "tty", "md5sum", "kill", "unshare", "grep",
        "stat", "readlink", "ln", "df", "cut", "tr",
    ] {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(rootfs.join("www/index.html"), "hello from orquestra\n").unwrap();
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    run_ok(
        Command::new("umoci")
            .args(["repack", "--image"])
            .arg(format!("{}:busybox", layout.display()))
            .arg(&work),
    );
    run_ok(
        Command::new("umoci")
            .args(["config", "--image"])
            .arg(format!("{}:busybox", layout.display()))
            .args([
                "--config.env=PATH=/bin",
                "--config.cmd=httpd",
                "--config.cmd=-f",
                "--config.cmd=-p",
                "--config.cmd=8080",
                "--config.cmd=-h",
                "--config.cmd=/www",
            ]),
    );
}
