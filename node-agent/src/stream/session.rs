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

/// What a stream session opens: a command run in the container, or the container's own
/// stdio.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Opener {
    /// `exec`.
    Exec(ExecSpec),
    /// `attach`: the shim's attach socket, and whether the client sends stdin.
    Attach {
        /// The socket.
        socket: PathBuf,
        /// The client sends stdin.
        stdin: bool,
    },
}

impl Opener {
    /// Opens the session.
    pub async fn open(&self) -> std::io::Result<Session> {
        match self {
            Opener::Exec(spec) => Session::start(spec).await,
            Opener::Attach { socket, stdin } => Session::attach(socket, *stdin).await,
        }
    }
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

/// A helper's exit status as an exit code (128 + the signal if one killed it).
fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt as _;
    match status {
        Ok(status) => status
            .code()
            .or_else(|| status.signal().map(|s| 128 + s))
            .unwrap_or(255),
        Err(_) => 255,
    }
}

/// The file descriptor sent on `stream` (`SCM_RIGHTS`): a terminal's master.
async fn receive_fd(stream: tokio::net::UnixStream) -> std::io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd as _;
    loop {
        stream.readable().await?;
        let received = stream.try_io(tokio::io::Interest::READABLE, || {
            let mut name = [0u8; 64];
            let mut iov = [std::io::IoSliceMut::new(&mut name)];
            let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let message = recvmsg::<()>(
                stream.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .map_err(std::io::Error::from)?;
            for cmsg in message.cmsgs().map_err(std::io::Error::from)? {
                if let ControlMessageOwned::ScmRights(fds) = cmsg
                    && let Some(fd) = fds.first()
                {
                    // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
                    return Ok(Some(unsafe { OwnedFd::from_raw_fd(*fd) }));
                }
            }
            Ok(None)
        });
        match received {
            Ok(Some(fd)) => return Ok(fd),
            Ok(None) => {
                return Err(std::io::Error::other("the console socket sent no terminal"));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Resizes a session's terminal: an exec's pseudo-terminal directly, an attached
/// container's through its shim.
#[derive(Debug)]
pub enum Resizer {
    /// The terminal's master.
    Terminal(OwnedFd),
    /// Frames to the shim's attach socket.
    Shim(tokio::sync::mpsc::UnboundedSender<Vec<u8>>),
}

impl Resizer {
    /// Sets the terminal's size.
    pub fn resize(&self, size: TerminalSize) {
        match self {
            Resizer::Terminal(fd) => {
                let size = libc::winsize {
                    ws_row: size.height,
                    ws_col: size.width,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
                unsafe {
                    libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ as _, &size);
                }
            }
            Resizer::Shim(frames) => {
                let mut frame = vec![crate::shim::ATTACH_RESIZE, 0, 0, 0, 4];
                frame.extend_from_slice(&size.width.to_be_bytes());
                frame.extend_from_slice(&size.height.to_be_bytes());
                let _ = frames.send(frame);
            }
        }
    }
}

/// A running command's streams, taken by whoever relays them.
pub struct Session {
    /// The exec helper; `None` for an attach session.
    child: Option<Child>,
    /// An attach session's relay tasks, and the signal that the container's side ended.
    attached: Option<(
        Vec<tokio::task::JoinHandle<()>>,
        tokio::sync::oneshot::Receiver<()>,
    )>,
    /// Writes to the command's stdin (absent unless asked for).
    pub stdin: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// The command's stdout (its terminal, with a TTY).
    pub stdout: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// The command's stderr (absent with a TTY).
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// The terminal, for resizing.
    terminal: Option<OwnedFd>,
    /// An attach session's frames to the shim (resizes).
    to_shim: Option<tokio::sync::mpsc::UnboundedSender<Vec<u8>>>,
    /// The exit code, if the helper has already exited.
    exited: Option<i32>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("pid", &self.child.as_ref().and_then(Child::id))
            .field("tty", &self.terminal.is_some())
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Starts the helper. Errors are the agent's own (the helper could not be run); the
    /// command's failures (not found, not executable) are its exit code and stderr.
    pub async fn start(spec: &ExecSpec) -> std::io::Result<Session> {
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
            .arg("0")
            .kill_on_drop(false);
        if !spec.tty {
            command
                .arg("--")
                .args(&spec.command)
                .stdin(if spec.stdin {
                    Stdio::piped()
                } else {
                    Stdio::null()
                })
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
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
            return Ok(Session {
                child: Some(child),
                attached: None,
                stdin,
                stdout,
                stderr,
                terminal: None,
                to_shim: None,
                exited: None,
            });
        }
        // A terminal: made by libcontainer in the container's own devpts (so the command's
        // `tty` names a device it can see), its master sent to a socket of ours, as runc's
        // console socket.
        let dir = tempfile::Builder::new().prefix("orq-tty").tempdir()?;
        let path = dir.path().join("console.sock");
        let listener = tokio::net::UnixListener::bind(&path)?;
        command
            .arg("--console-socket")
            .arg(&path)
            // What a terminal program expects, as container runtimes set it.
            .arg("--env")
            .arg("TERM=xterm")
            .arg("--")
            .args(&spec.command)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        // The helper's own messages (a command not found) are shown on the terminal's stream.
        let messages = child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn AsyncRead + Send + Unpin>);
        let (master, exited) = tokio::select! {
            accepted = listener.accept() => (Some(receive_fd(accepted?.0).await?), None),
            status = child.wait() => (None, Some(exit_code(status))),
        };
        let Some(master) = master else {
            return Ok(Session {
                child: Some(child),
                attached: None,
                stdin: None,
                stdout: messages,
                stderr: None,
                terminal: None,
                to_shim: None,
                exited,
            });
        };
        let master = std::fs::File::from(master);
        let reader = tokio::fs::File::from_std(master.try_clone()?);
        let writer = tokio::fs::File::from_std(master.try_clone()?);
        Ok(Session {
            child: Some(child),
            attached: None,
            stdin: Some(Box::new(writer)),
            stdout: Some(Box::new(reader)),
            stderr: messages,
            terminal: Some(OwnedFd::from(master)),
            to_shim: None,
            exited,
        })
    }

    /// A handle that resizes the terminal (none without a TTY).
    pub fn resizer(&self) -> Option<Resizer> {
        if let Some(frames) = &self.to_shim {
            return Some(Resizer::Shim(frames.clone()));
        }
        let fd = self.terminal.as_ref()?.try_clone().ok()?;
        Some(Resizer::Terminal(fd))
    }

    /// Waits for the command; its exit code (128 + the signal if one killed it). An attach
    /// session ends when the container does (or its shim closes the socket): 0.
    pub async fn wait(&mut self) -> i32 {
        if let Some(code) = self.exited {
            return code;
        }
        if let Some(child) = &mut self.child {
            return exit_code(child.wait().await);
        }
        if let Some((_, ended)) = &mut self.attached {
            let _ = ended.await;
        }
        0
    }

    /// Ends the session early. An exec's helper kills its command and exits (reaped in the
    /// background); an attach session just lets go of the container, which runs on.
    pub fn terminate(mut self) {
        if let Some((tasks, _)) = self.attached.take() {
            for task in tasks {
                task.abort();
            }
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::spawn(async move {
            if tokio::time::timeout(std::time::Duration::from_secs(5), child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        });
    }

    /// Attaches to a running container's stdio through its shim's socket
    /// ([`crate::shim::ATTACH_SOCKET`]): its output from now on, and, with `stdin`, input
    /// to its stdin (the end of the client's stdin is passed on).
    pub async fn attach(socket: &std::path::Path, stdin: bool) -> std::io::Result<Session> {
        use crate::shim::{ATTACH_STDERR, ATTACH_STDIN, ATTACH_STDIN_END, ATTACH_STDOUT};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Connected through /proc/self/fd: a deep bundle's path is longer than a socket's.
        let stream = crate::shim::socket_path(socket.parent().unwrap_or(socket), |path| {
            std::os::unix::net::UnixStream::connect(path)
        })?;
        stream.set_nonblocking(true)?;
        let stream = tokio::net::UnixStream::from_std(stream)?;
        let (mut from_shim, mut to_shim) = stream.into_split();
        let (stdout_w, stdout_r) = tokio::io::duplex(64 * 1024);
        let (stderr_w, stderr_r) = tokio::io::duplex(64 * 1024);
        let (ended_tx, ended) = tokio::sync::oneshot::channel();
        let output = tokio::spawn(async move {
            let (mut stdout_w, mut stderr_w) = (stdout_w, stderr_w);
            let mut head = [0u8; 5];
            while from_shim.read_exact(&mut head).await.is_ok() {
                let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
                let mut data = vec![0u8; len];
                if from_shim.read_exact(&mut data).await.is_err() {
                    break;
                }
                // A reader that is gone (the client does not want this stream) is skipped.
                let _ = match head[0] {
                    ATTACH_STDOUT => stdout_w.write_all(&data).await,
                    ATTACH_STDERR => stderr_w.write_all(&data).await,
                    _ => Ok(()),
                };
            }
            let _ = ended_tx.send(());
        });
        // Everything sent to the shim goes through one writer: stdin and resizes.
        let (frames, mut outgoing) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            while let Some(frame) = outgoing.recv().await {
                if to_shim.write_all(&frame).await.is_err() {
                    return;
                }
            }
            // Keep the connection open: closing it would end a `stdinOnce` stdin again.
            std::future::pending::<()>().await;
        });
        let mut tasks = vec![output, writer];
        let stdin_writer = if stdin {
            let (writer, mut reader) = tokio::io::duplex(64 * 1024);
            let frames = frames.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    let (kind, n) = match reader.read(&mut buf).await {
                        Ok(0) | Err(_) => (ATTACH_STDIN_END, 0),
                        Ok(n) => (ATTACH_STDIN, n),
                    };
                    let mut frame = Vec::with_capacity(5 + n);
                    frame.push(kind);
                    frame.extend_from_slice(&(n as u32).to_be_bytes());
                    frame.extend_from_slice(&buf[..n]);
                    if frames.send(frame).is_err() || kind == ATTACH_STDIN_END {
                        break;
                    }
                }
            }));
            Some(Box::new(writer) as Box<dyn AsyncWrite + Send + Unpin>)
        } else {
            None
        };
        Ok(Session {
            child: None,
            attached: Some((tasks, ended)),
            stdin: stdin_writer,
            stdout: Some(Box::new(stdout_r)),
            stderr: Some(Box::new(stderr_r)),
            terminal: None,
            to_shim: Some(frames),
            exited: None,
        })
    }
}
