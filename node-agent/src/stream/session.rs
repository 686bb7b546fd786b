//! One command running inside a container for a client: the `orq shim-exec` helper (which
//! joins the container through libcontainer's tenant builder, as the exec probes do) with its
//! stdio on pipes, or on a pseudo-terminal when the client asked for a TTY.
//!
//! The helper is the tenant process's parent and waits for it; its exit code is the
//! command's. Ending a session early (the client went away) sends the helper `SIGTERM`, on
//! which it kills the command and exits, so nothing is left running in the container.

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::process::Child;

/// What a session runs and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecSpec {
    /// The helper command: the shim's program with `shim-exec`.
    pub helper: Vec<OsString>,
    /// libcontainer's state root.
    pub state_root: PathBuf,
    /// The container's ID.
    pub container_id: String,
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Whether the client sends stdin.
    pub stdin: bool,
    /// A pseudo-terminal (stdout and stderr are one stream, as on a terminal).
    pub tty: bool,
}

/// The terminal size a client asks for (the resize channel's JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
pub struct TerminalSize {
    /// Columns.
    #[serde(rename = "Width")]
    pub width: u16,
    /// Rows.
    #[serde(rename = "Height")]
    pub height: u16,
}

/// Resizes a session's terminal.
#[derive(Debug)]
pub struct Resizer(OwnedFd);

impl Resizer {
    /// Sets the terminal's size.
    pub fn resize(&self, size: TerminalSize) {
        let size = libc::winsize {
            ws_row: size.height,
            ws_col: size.width,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        unsafe {
            libc::ioctl(self.0.as_raw_fd(), libc::TIOCSWINSZ as _, &size);
        }
    }
}

/// A running command's streams, taken by whoever relays them.
pub struct Session {
    child: Child,
    /// Writes to the command's stdin (absent unless asked for).
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// The command's stdout (its terminal, with a TTY).
    pub stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// The command's stderr (absent with a TTY).
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// The terminal, for resizing.
    terminal: Option<OwnedFd>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("pid", &self.child.id())
            .field("tty", &self.terminal.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts the helper. Errors are the agent's own (the helper could not be run); the
    /// command's failures (not found, not executable) are its exit code and stderr.
    pub fn start(spec: &ExecSpec) -> std::io::Result<Session> {
        let (program, prefix) = spec
            .helper
            .split_first()
            .ok_or_else(|| std::io::Error::other("no exec helper configured"))?;
        let mut command = tokio::process::Command::new(program);
        command
            .args(prefix)
            .arg("--root")
            .arg(&spec.state_root)
            .arg("--id")
            .arg(&spec.container_id)
            .arg("--timeout-ms")
            .arg("0");
        if spec.tty {
            // What a terminal program expects, as container runtimes set it.
            command.arg("--env").arg("TERM=xterm");
        }
        command.arg("--").args(&spec.command);
        if spec.tty {
            let pty = nix::pty::openpty(None, None).map_err(std::io::Error::from)?;
            let slave = std::fs::File::from(pty.slave);
            command
                .stdin(slave.try_clone()?)
                .stdout(slave.try_clone()?)
                .stderr(slave);
            // SAFETY: only async-signal-safe calls (setsid, ioctl) between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    nix::unistd::setsid().map_err(std::io::Error::from)?;
                    // The terminal on stdin becomes the session's controlling terminal, so
                    // the shell gets job control and ^C reaches its foreground group.
                    if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = command.kill_on_drop(false).spawn()?;
            let master = std::fs::File::from(pty.master);
            let reader = tokio::fs::File::from_std(master.try_clone()?);
            let writer = tokio::fs::File::from_std(master.try_clone()?);
            return Ok(Session {
                child,
                stdin: Some(Box::new(writer)),
                stdout: Some(Box::new(reader)),
                stderr: None,
                terminal: Some(OwnedFd::from(master)),
            });
        }
        command
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let mut child = command.spawn()?;
        let stdin = child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncWrite + Send + Unpin>);
        let stdout = child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>);
        let stderr = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>);
        Ok(Session {
            child,
            stdin,
            stdout,
            stderr,
            terminal: None,
        })
    }

    /// A handle that resizes the terminal (none without a TTY).
    pub fn resizer(&self) -> Option<Resizer> {
        let fd = self.terminal.as_ref()?.try_clone().ok()?;
        Some(Resizer(fd))
    }

    /// Waits for the command; its exit code (128 + the signal if one killed it).
    pub async fn wait(&mut self) -> i32 {
        use std::os::unix::process::ExitStatusExt as _;
        match self.child.wait().await {
            Ok(status) => status
                .code()
                .or_else(|| status.signal().map(|s| 128 + s))
                .unwrap_or(255),
            Err(_) => 255,
        }
    }

    /// Ends the command early: the helper kills it and exits. Reaped in the background.
    pub fn terminate(mut self) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::spawn(async move {
            if tokio::time::timeout(std::time::Duration::from_secs(5), self.child.wait())
                .await
                .is_err()
            {
                let _ = self.child.kill().await;
            }
        });
    }
}
