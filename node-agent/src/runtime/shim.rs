//! The container shim: one single-threaded helper process per container (`orq shim …`).
//!
//! libcontainer is not safe inside a multi-threaded process (it clones with raw `clone3` and
//! changes the working directory and the caller's dumpable flag and OOM score), so the agent
//! never calls it for creating a container: it runs this shim, which
//!
//! 1. forks; the parent waits only until the container has started (or failed to), prints
//!    `ok <pid>` or the error, and exits — so the agent learns the outcome synchronously and
//!    reaps its direct child at once;
//! 2. the child starts a new session (it outlives the agent, its restarts and SIGKILLs),
//!    creates and starts the container with libcontainer, its stdout and stderr on pipes;
//! 3. copies both streams into the container's log in the CRI format, rotating it by size;
//! 4. reaps the container's init (it is the shim's child), tells an OOM kill from the
//!    container's cgroup, writes the exit record next to the bundle, and deletes the
//!    container's runtime state and cgroup.
//!
//! Everything the agent needs to re-adopt the container lives in the bundle directory:
//! [`STARTED`] once it runs, [`EXITED`] once it is gone.

use std::ffi::OsString;
use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid};
use serde::{Deserialize, Serialize};

/// The file in the bundle that says the container started: a [`Started`].
pub const STARTED: &str = "started.json";
/// The file in the bundle that says the container is gone: an [`Exited`].
pub const EXITED: &str = "exited.json";
/// The shim's own diagnostics.
pub const SHIM_LOG: &str = "shim.log";

/// Written once the container's init runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Started {
    /// The init process (in the agent's PID namespace).
    pub pid: i32,
    /// Its start time in clock ticks since boot (`/proc/PID/stat` field 22): a PID alone
    /// could have been reused by the time someone reads this.
    pub start_ticks: u64,
    /// RFC 3339.
    pub started_at: String,
}

/// Written once the container's init has exited and been reaped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exited {
    /// The exit code, or 128 + the signal that killed it (as Kubernetes reports).
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Whether the kernel's OOM killer killed it (the cgroup counted an OOM kill).
    pub oom_killed: bool,
    /// RFC 3339.
    pub finished_at: String,
}

/// What the shim is told.
#[derive(Clone, Debug)]
pub struct ShimArgs {
    /// The container's ID (libcontainer's state lives in `root/<id>`).
    pub id: String,
    /// The bundle: `config.json` and where [`STARTED`]/[`EXITED`] go.
    pub bundle: PathBuf,
    /// libcontainer's state root.
    pub root: PathBuf,
    /// The container's log file (CRI format).
    pub log: PathBuf,
    /// Rotate the log when it grows past this many bytes.
    pub log_max_bytes: u64,
    /// The container's stdin (its `stdin`/`stdinOnce`).
    pub stdin: StdinMode,
    /// The container's process runs on a terminal (its `tty`): one output stream, resizable.
    pub tty: bool,
}

/// A container's stdin, as its spec asks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StdinMode {
    /// `/dev/null` (`stdin: false`).
    #[default]
    Null,
    /// A pipe attachers write to, open for the container's life (`stdin: true`).
    Open,
    /// A pipe closed when the first attach session ends (`stdinOnce: true`).
    Once,
}

impl StdinMode {
    fn as_str(self) -> &'static str {
        match self {
            StdinMode::Null => "null",
            StdinMode::Open => "open",
            StdinMode::Once => "once",
        }
    }
}

impl ShimArgs {
    /// The command-line form, after the shim's subcommand.
    pub fn to_args(&self) -> Vec<OsString> {
        vec![
            "--id".into(),
            self.id.clone().into(),
            "--bundle".into(),
            self.bundle.clone().into(),
            "--root".into(),
            self.root.clone().into(),
            "--log".into(),
            self.log.clone().into(),
            "--log-max-bytes".into(),
            self.log_max_bytes.to_string().into(),
            "--stdin".into(),
            self.stdin.as_str().into(),
            "--tty".into(),
            self.tty.to_string().into(),
        ]
    }

    /// Parses [`ShimArgs::to_args`]'s output.
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Self, String> {
        let mut args = args.into_iter();
        let (mut id, mut bundle, mut root, mut log, mut max) = (None, None, None, None, None);
        let mut stdin = StdinMode::Null;
        let mut tty = false;
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .ok_or_else(|| format!("{flag:?} needs a value"))?;
            match flag.to_str() {
                Some("--id") => id = value.into_string().ok(),
                Some("--bundle") => bundle = Some(PathBuf::from(value)),
                Some("--root") => root = Some(PathBuf::from(value)),
                Some("--log") => log = Some(PathBuf::from(value)),
                Some("--log-max-bytes") => {
                    max = value.to_str().and_then(|v| v.parse().ok());
                }
                Some("--tty") => tty = value.to_str() == Some("true"),
                Some("--stdin") => {
                    stdin = match value.to_str() {
                        Some("null") => StdinMode::Null,
                        Some("open") => StdinMode::Open,
                        Some("once") => StdinMode::Once,
                        _ => return Err(format!("--stdin {value:?}: null, open or once")),
                    }
                }
                _ => return Err(format!("unknown flag {flag:?}")),
            }
        }
        Ok(ShimArgs {
            id: id.ok_or("--id is required")?,
            bundle: bundle.ok_or("--bundle is required")?,
            root: root.ok_or("--root is required")?,
            log: log.ok_or("--log is required")?,
            log_max_bytes: max.unwrap_or(10 << 20),
            stdin,
            tty,
        })
    }
}

/// Runs the shim; returns the exit code of the process that called it. Must be called
/// before any thread exists in this process.
pub fn main(args: ShimArgs) -> i32 {
    let (report_r, report_w) = match nix::unistd::pipe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("shim: pipe: {e}");
            return 1;
        }
    };
    // SAFETY: the process is single-threaded here (the caller's contract), so the child
    // may run arbitrary code after the fork.
    match unsafe { nix::unistd::fork() } {
        Err(e) => {
            eprintln!("shim: fork: {e}");
            1
        }
        Ok(ForkResult::Parent { .. }) => {
            drop(report_w);
            let mut report = String::new();
            let _ = fs::File::from(report_r).read_to_string(&mut report);
            match report.strip_prefix("ok ") {
                Some(pid) => {
                    println!("{}", pid.trim());
                    0
                }
                None if report.is_empty() => {
                    eprintln!(
                        "the shim exited before the container started (see {})",
                        args.bundle.join(SHIM_LOG).display()
                    );
                    1
                }
                None => {
                    eprintln!("{}", report.strip_prefix("err ").unwrap_or(&report));
                    1
                }
            }
        }
        Ok(ForkResult::Child) => {
            drop(report_r);
            let code = match child(&args, report_w) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("shim: {e}");
                    1
                }
            };
            // Skip the parent's atexit handlers and buffered state: this is a fork.
            // SAFETY: _exit is always safe to call.
            unsafe { libc::_exit(code) }
        }
    }
}

/// The long-lived half: start, report, copy logs, reap, record.
fn child(args: &ShimArgs, report: OwnedFd) -> io::Result<()> {
    nix::unistd::setsid().map_err(io::Error::from)?;
    // Detach from the agent's stdio: its pipes go away when it does.
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.bundle.join(SHIM_LOG))?;
    let null = fs::File::open("/dev/null")?;
    nix::unistd::dup2(null.as_raw_fd(), 0).map_err(io::Error::from)?;
    nix::unistd::dup2(log.as_raw_fd(), 1).map_err(io::Error::from)?;
    nix::unistd::dup2(log.as_raw_fd(), 2).map_err(io::Error::from)?;
    // SIGTERM for the container goes to its init, never to the shim; ignore stray ones.
    // SAFETY: installing SIG_IGN has no handler code to be unsafe about.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGHUP,
            nix::sys::signal::SigHandler::SigIgn,
        );
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::SigHandler::SigIgn,
        );
        // An attacher or a container that goes away is an error on the write, not a death.
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigIgn,
        );
    }
    let mut report = fs::File::from(report);
    let (out_r, out_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    let (err_r, err_w) = nix::unistd::pipe().map_err(io::Error::from)?;
    let (container_stdin, stdin_writer) = match args.stdin {
        StdinMode::Null => (OwnedFd::from(null), None),
        StdinMode::Open | StdinMode::Once => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
            (r, Some(w))
        }
    };
    // A terminal: libcontainer makes it in the container and sends its master to a console
    // socket of ours (a short path: a socket's is at most 108 bytes).
    let console = if args.tty {
        let path = std::env::temp_dir().join(format!("orq-console-{}.sock", std::process::id()));
        let _ = fs::remove_file(&path);
        Some((std::os::unix::net::UnixListener::bind(&path)?, path))
    } else {
        None
    };
    let console_path = console.as_ref().map(|(_, p)| p.clone());
    let started = start(args, container_stdin, out_w, err_w, console_path.as_deref());
    let master = match (&console, &started) {
        (Some((listener, path)), Ok(_)) => {
            let master = receive_master(listener);
            let _ = fs::remove_file(path);
            match master {
                Ok(master) => Some(master),
                Err(e) => {
                    let _ = write!(report, "err the container's terminal: {e}");
                    return Err(e);
                }
            }
        }
        (Some((_, path)), Err(_)) => {
            let _ = fs::remove_file(path);
            None
        }
        _ => None,
    };
    // With a terminal, what attachers type goes to its master; the container's stdin is it.
    let stdin_writer = match &master {
        Some(master) if args.stdin != StdinMode::Null => Some(master.try_clone()?),
        Some(_) => None,
        None => stdin_writer,
    };
    let mut attach = Attach::bind(&args.bundle, stdin_writer, args.stdin == StdinMode::Once);
    attach.terminal = master.as_ref().map(|m| m.try_clone()).transpose()?;
    let started = match started {
        Ok(started) => started,
        Err(message) => {
            let _ = write!(report, "err {message}");
            return Err(io::Error::other(message));
        }
    };
    crate::image::write_atomically(
        &args.bundle.join(STARTED),
        &serde_json::to_vec(&started).map_err(io::Error::other)?,
    )?;
    let _ = write!(report, "ok {}", started.pid);
    drop(report);

    let mut writer = LogWriter::open(&args.log, args.log_max_bytes)?;
    let pid = Pid::from_raw(started.pid);
    // On a terminal the container's output is one stream, read from the master.
    let outputs = match master {
        Some(master) => vec![(master, 0)],
        None => vec![(out_r, 0), (err_r, 1)],
    };
    let status = copy_until_exit(pid, outputs, &mut writer, &mut attach)?;
    attach.finish();
    let oom_killed = oom_kills(&args.bundle) > 0;
    let (exit_code, signal) = match status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        _ => (255, None),
    };
    let exited = Exited {
        exit_code,
        signal,
        oom_killed,
        finished_at: now_rfc3339(),
    };
    crate::image::write_atomically(
        &args.bundle.join(EXITED),
        &serde_json::to_vec(&exited).map_err(io::Error::other)?,
    )?;
    // The runtime state and the cgroup go; the bundle (and so the record) stays for the
    // agent, which removes it with the container.
    match libcontainer::container::Container::load(args.root.join(&args.id)) {
        Ok(mut container) => {
            if let Err(e) = container.delete(true) {
                eprintln!("shim: deleting container {}: {e}", args.id);
            }
        }
        Err(e) => eprintln!("shim: loading container {}: {e}", args.id),
    }
    Ok(())
}

/// Creates and starts the container; the error is a message for the pod's status.
fn start(
    args: &ShimArgs,
    stdin: OwnedFd,
    out: OwnedFd,
    err: OwnedFd,
    console_socket: Option<&Path>,
) -> Result<Started, String> {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;
    let mut container = ContainerBuilder::new(args.id.clone(), SyscallType::Linux)
        .with_root_path(&args.root)
        .map_err(|e| e.to_string())?
        .with_stdin(stdin)
        .with_stdout(out)
        .with_stderr(err)
        .with_console_socket(console_socket)
        .validate_id()
        .map_err(|e| e.to_string())?
        .as_init(&args.bundle)
        .with_systemd(false)
        .with_detach(true)
        .build()
        .map_err(|e| e.to_string())?;
    let result = container.start().map_err(|e| e.to_string());
    let pid = container.pid().map(|p| p.as_raw());
    match (result, pid) {
        (Ok(()), Some(pid)) => Ok(Started {
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            started_at: now_rfc3339(),
        }),
        (result, _) => {
            let _ = container.delete(true);
            Err(result
                .err()
                .unwrap_or_else(|| "the container has no PID".into()))
        }
    }
}

/// Copies the container's stdout and stderr into the log until its init exits (and the
/// pipes drain), then returns how it exited.
fn copy_until_exit(
    pid: Pid,
    outputs: Vec<(OwnedFd, usize)>,
    log: &mut LogWriter,
    attach: &mut Attach,
) -> io::Result<WaitStatus> {
    for (fd, _) in &outputs {
        set_nonblocking(fd)?;
    }
    let pipes: Vec<&OwnedFd> = outputs.iter().map(|(fd, _)| fd).collect();
    let streams: Vec<usize> = outputs.iter().map(|(_, s)| *s).collect();
    let mut open = vec![true; pipes.len()];
    let mut status = None;
    let mut drain_deadline = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if status.is_none() {
            match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => {}
                Ok(s @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                    status = Some(s);
                    // Anything the container's processes wrote is in the pipes now; only a
                    // leaked writer could keep them open, so do not wait on it for long.
                    drain_deadline = Some(Instant::now() + Duration::from_secs(2));
                }
                Ok(_) => {}
                Err(nix::errno::Errno::ECHILD) => {
                    status = Some(WaitStatus::Exited(pid, 255));
                    drain_deadline = Some(Instant::now());
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !open.iter().any(|o| *o) || drain_deadline.is_some_and(|d| Instant::now() >= d) {
            if let Some(status) = status {
                log.flush_partial()?;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        let mut fds: Vec<PollFd> = pipes
            .iter()
            .zip(open.iter().copied())
            .filter(|(_, o)| *o)
            .map(|(fd, _)| PollFd::new(fd.as_fd(), PollFlags::POLLIN))
            .chain(
                attach
                    .readable()
                    .into_iter()
                    .map(|fd| PollFd::new(fd, PollFlags::POLLIN)),
            )
            .collect();
        let _ = poll(&mut fds, PollTimeout::from(100u8));
        drop(fds);
        attach.service();
        for (i, fd) in pipes.iter().enumerate() {
            if !open[i] {
                continue;
            }
            loop {
                match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                    Ok(0) => {
                        open[i] = false;
                        break;
                    }
                    Ok(n) => {
                        log.write(streams[i], &buf[..n])?;
                        attach.broadcast(streams[i] as u8 + 1, &buf[..n]);
                    }
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(nix::errno::Errno::EINTR) => continue,
                    // A terminal's master reads EIO once the container's side is gone.
                    Err(nix::errno::Errno::EIO) => {
                        open[i] = false;
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
    }
}

/// The socket in the bundle through which the agent attaches to the container's stdio.
pub const ATTACH_SOCKET: &str = "attach.sock";

/// Frames on the attach socket: a kind byte, a big-endian `u32` length, the data. The shim
/// sends [`ATTACH_STDOUT`] and [`ATTACH_STDERR`] output as the container writes it (what
/// was written before an attacher came is in the log); an attacher sends
/// [`ATTACH_STDIN`] data and [`ATTACH_STDIN_END`].
pub const ATTACH_STDOUT: u8 = 1;
/// See [`ATTACH_STDOUT`].
pub const ATTACH_STDERR: u8 = 2;
/// See [`ATTACH_STDOUT`].
pub const ATTACH_STDIN: u8 = 0;
/// See [`ATTACH_STDOUT`].
pub const ATTACH_STDIN_END: u8 = 3;
/// A terminal's new size: width and height, big-endian `u16`s.
pub const ATTACH_RESIZE: u8 = 4;
/// An attacher that falls this far behind the container's output is dropped.
const ATTACH_BACKLOG: usize = 4 << 20;

/// One attached client of the shim.
struct Attacher {
    stream: std::os::unix::net::UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    sent_stdin: bool,
    gone: bool,
}

/// The container's stdio as attachers reach it: output fanned out to every attacher, their
/// input into the container's stdin (a pipe the shim holds open, so attachers come and go
/// without the container seeing an end — unless `stdinOnce`, when the first attach session
/// to end closes it). All non-blocking, serviced from the shim's one poll loop.
struct Attach {
    /// `None` when the socket could not be made (the container runs, unattachable).
    listener: Option<std::os::unix::net::UnixListener>,
    attachers: Vec<Attacher>,
    stdin: Option<fs::File>,
    once: bool,
    pending: Vec<u8>,
    close_stdin: bool,
    /// The container's terminal, resized by [`ATTACH_RESIZE`] frames.
    terminal: Option<OwnedFd>,
}

impl Attach {
    fn bind(bundle: &Path, stdin: Option<OwnedFd>, once: bool) -> Attach {
        let listener = match socket_path(bundle, |path| {
            let _ = fs::remove_file(path);
            std::os::unix::net::UnixListener::bind(path)
        })
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        {
            Ok(listener) => Some(listener),
            Err(e) => {
                eprintln!("shim: the attach socket: {e}; the container cannot be attached to");
                None
            }
        };
        if let Some(fd) = &stdin
            && let Err(e) = set_nonblocking(fd)
        {
            eprintln!("shim: the stdin pipe: {e}");
        }
        Attach {
            listener,
            attachers: Vec::new(),
            stdin: stdin.map(fs::File::from),
            once,
            pending: Vec::new(),
            close_stdin: false,
            terminal: None,
        }
    }

    /// What to poll for input: the listener and the attachers.
    fn readable(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.listener
            .iter()
            .map(|l| l.as_fd())
            .chain(self.attachers.iter().map(|a| a.stream.as_fd()))
            .collect()
    }

    /// Accepts, reads attachers' frames, feeds stdin, flushes output; drops the gone.
    fn service(&mut self) {
        while let Some(Ok((stream, _))) = self.listener.as_ref().map(|l| l.accept()) {
            if stream.set_nonblocking(true).is_ok() {
                self.attachers.push(Attacher {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    sent_stdin: false,
                    gone: false,
                });
            }
        }
        let mut buf = [0u8; 16 * 1024];
        for a in &mut self.attachers {
            loop {
                match a.stream.read(&mut buf) {
                    Ok(0) => {
                        a.gone = true;
                        break;
                    }
                    Ok(n) => a.input.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        a.gone = true;
                        break;
                    }
                }
                // Stop reading while the container does not keep up with its stdin.
                if self.pending.len() > ATTACH_BACKLOG {
                    break;
                }
            }
            while a.input.len() >= 5 {
                let len =
                    u32::from_be_bytes([a.input[1], a.input[2], a.input[3], a.input[4]]) as usize;
                if a.input.len() < 5 + len {
                    break;
                }
                let kind = a.input[0];
                if kind == ATTACH_STDIN && self.stdin.is_some() {
                    self.pending.extend_from_slice(&a.input[5..5 + len]);
                }
                if matches!(kind, ATTACH_STDIN | ATTACH_STDIN_END) {
                    a.sent_stdin = true;
                }
                if kind == ATTACH_STDIN_END && self.once {
                    self.close_stdin = true;
                }
                if kind == ATTACH_RESIZE
                    && len == 4
                    && let Some(terminal) = &self.terminal
                {
                    let size = libc::winsize {
                        ws_col: u16::from_be_bytes([a.input[5], a.input[6]]),
                        ws_row: u16::from_be_bytes([a.input[7], a.input[8]]),
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
                    unsafe {
                        libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ as _, &size);
                    }
                }
                a.input.drain(..5 + len);
            }
            if a.gone && a.sent_stdin && self.once {
                self.close_stdin = true;
            }
            flush(a);
        }
        self.attachers.retain(|a| !a.gone);
        if let Some(stdin) = &mut self.stdin {
            while !self.pending.is_empty() {
                match stdin.write(&self.pending) {
                    Ok(n) => {
                        self.pending.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // The container closed its stdin.
                    Err(_) => {
                        self.pending.clear();
                        self.close_stdin = true;
                    }
                }
            }
        }
        if self.close_stdin && self.pending.is_empty() {
            self.stdin = None;
        }
    }

    /// Queues output of `kind` for every attacher.
    fn broadcast(&mut self, kind: u8, data: &[u8]) {
        for a in &mut self.attachers {
            if a.output.len() > ATTACH_BACKLOG {
                a.gone = true;
                continue;
            }
            a.output.push(kind);
            a.output
                .extend_from_slice(&(data.len() as u32).to_be_bytes());
            a.output.extend_from_slice(data);
            flush(a);
        }
    }

    /// The container is gone: what is queued goes out (briefly), then the attachers are
    /// closed, which ends their sessions.
    fn finish(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while self
            .attachers
            .iter()
            .any(|a| !a.output.is_empty() && !a.gone)
            && Instant::now() < deadline
        {
            for a in &mut self.attachers {
                flush(a);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.attachers.clear();
    }
}

/// The terminal master libcontainer sends on the console socket (`SCM_RIGHTS`), waiting at
/// most 10 s for it.
fn receive_master(listener: &std::os::unix::net::UnixListener) -> io::Result<OwnedFd> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    use std::os::fd::FromRawFd as _;
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut buf = [0u8; 256];
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let message = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg
            && let Some(fd) = fds.first()
        {
            // SAFETY: the kernel just gave us this descriptor; nothing else owns it.
            return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
        }
    }
    Err(io::Error::other("the console socket sent no terminal"))
}

/// Runs `f` on the path of `bundle`'s attach socket, named through `/proc/self/fd` so that
/// a deep bundle directory does not exceed a socket path's 108 bytes.
pub fn socket_path<T>(bundle: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    let dir = fs::File::open(bundle)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}/{ATTACH_SOCKET}", dir.as_raw_fd()));
    let result = f(&short);
    drop(dir);
    result
}

/// Writes what an attacher can take now.
fn flush(a: &mut Attacher) {
    while !a.output.is_empty() && !a.gone {
        match a.stream.write(&a.output) {
            Ok(n) => {
                a.output.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(_) => a.gone = true,
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

/// How many times the OOM killer struck in the container's memory cgroup (v1 or v2).
fn oom_kills(bundle: &Path) -> u64 {
    let Some(path) = cgroups_path(bundle) else {
        return 0;
    };
    let rel = path.trim_start_matches('/');
    let candidates = [
        (
            format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"),
            "oom_kill ",
        ),
        (format!("/sys/fs/cgroup/{rel}/memory.events"), "oom_kill "),
    ];
    for (file, key) in candidates {
        if let Ok(text) = fs::read_to_string(&file) {
            return text
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0);
        }
    }
    0
}

/// The `linux.cgroupsPath` of a bundle's `config.json`.
pub fn cgroups_path(bundle: &Path) -> Option<String> {
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).ok()?).ok()?;
    config
        .pointer("/linux/cgroupsPath")
        .and_then(|p| p.as_str())
        .map(str::to_owned)
}

/// A process's start time in clock ticks since boot, from `/proc/PID/stat`.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

/// Now, as RFC 3339 with nanoseconds (what CRI logs and Kubernetes timestamps take).
pub fn now_rfc3339() -> String {
    let now = jiff::Timestamp::now();
    format!(
        "{}.{:09}Z",
        now.strftime("%Y-%m-%dT%H:%M:%S"),
        now.subsec_nanosecond()
    )
}

/// Writes container output in the CRI log format (`<time> <stream> <F|P> <text>`), one
/// record per line; a line longer than the buffer goes out in `P`(artial) pieces.
struct LogWriter {
    path: PathBuf,
    file: fs::File,
    size: u64,
    max: u64,
    partial: [Vec<u8>; 2],
}

const STREAMS: [&str; 2] = ["stdout", "stderr"];
const MAX_LINE: usize = 16 * 1024;

impl LogWriter {
    fn open(path: &Path, max: u64) -> io::Result<Self> {
        let file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(LogWriter {
            path: path.to_owned(),
            file,
            size,
            max,
            partial: [Vec::new(), Vec::new()],
        })
    }

    fn write(&mut self, stream: usize, mut data: &[u8]) -> io::Result<()> {
        while let Some(nl) = data.iter().position(|b| *b == b'\n') {
            let mut line = std::mem::take(&mut self.partial[stream]);
            line.extend_from_slice(&data[..nl]);
            self.record(stream, 'F', &line)?;
            data = &data[nl + 1..];
        }
        self.partial[stream].extend_from_slice(data);
        while self.partial[stream].len() >= MAX_LINE {
            let rest = self.partial[stream].split_off(MAX_LINE);
            let piece = std::mem::replace(&mut self.partial[stream], rest);
            self.record(stream, 'P', &piece)?;
        }
        Ok(())
    }

    fn flush_partial(&mut self) -> io::Result<()> {
        for stream in 0..2 {
            if !self.partial[stream].is_empty() {
                let line = std::mem::take(&mut self.partial[stream]);
                self.record(stream, 'F', &line)?;
            }
        }
        self.file.sync_data()
    }

    fn record(&mut self, stream: usize, tag: char, text: &[u8]) -> io::Result<()> {
        let mut record = format!("{} {} {tag} ", now_rfc3339(), STREAMS[stream]).into_bytes();
        record.extend_from_slice(text);
        record.push(b'\n');
        if self.size > 0 && self.size + record.len() as u64 > self.max {
            self.rotate()?;
        }
        self.file.write_all(&record)?;
        self.size += record.len() as u64;
        Ok(())
    }

    /// Keeps one rotated file (`<log>.1`), as the kubelet's default keeps a few.
    fn rotate(&mut self) -> io::Result<()> {
        let mut rotated = self.path.clone().into_os_string();
        rotated.push(".1");
        fs::rename(&self.path, &rotated)?;
        self.file = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

/// The process of container `id`'s spec with `args`, `env` added and a terminal: a file
/// for libcontainer's tenant builder, removed when dropped.
fn exec_process(
    root: &Path,
    id: &str,
    args: &[String],
    env: &[(String, String)],
    terminal: bool,
) -> Result<tempfile::NamedTempFile, String> {
    let container = libcontainer::container::Container::load(root.join(id))
        .map_err(|e| format!("loading container {id}: {e}"))?;
    let spec: serde_json::Value = fs::read(container.bundle().join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| format!("reading the spec of container {id}"))?;
    let mut process = spec["process"].clone();
    process["args"] = serde_json::json!(args);
    process["terminal"] = serde_json::json!(terminal);
    let mut vars: Vec<serde_json::Value> = process["env"].as_array().cloned().unwrap_or_default();
    vars.extend(
        env.iter()
            .map(|(k, v)| serde_json::json!(format!("{k}={v}"))),
    );
    process["env"] = serde_json::json!(vars);
    let mut file = tempfile::NamedTempFile::new_in(root).map_err(|e| e.to_string())?;
    file.write_all(&serde_json::to_vec(&process).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    Ok(file)
}

/// Set by `SIGTERM`/`SIGHUP`/`SIGINT` to `orq shim-exec`: the agent ends the command.
static EXEC_ENDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn end_exec(_: libc::c_int) {
    EXEC_ENDED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Runs `args` inside running container `id` (libcontainer's tenant container: the
/// container's namespaces, cgroup, user and environment, plus `env`) and returns its exit
/// code — what `orq shim-exec` exits with. The command inherits this process's stdio. It is
/// killed after `timeout` (none if zero) or when this process is told to end (`SIGTERM`,
/// `SIGHUP`, `SIGINT`: the client went away), so nothing outlives the helper. A command that
/// cannot be run exits 127 if it was not found and 126 otherwise, as shells and runc report.
/// Must be called before any thread exists in this process.
pub fn exec(
    root: &Path,
    id: &str,
    args: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
    console_socket: Option<&Path>,
) -> i32 {
    use libcontainer::container::builder::ContainerBuilder;
    use libcontainer::syscall::syscall::SyscallType;
    use nix::sys::signal::{SigHandler, Signal, signal};
    for sig in [Signal::SIGTERM, Signal::SIGHUP, Signal::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        let _ = unsafe { signal(sig, SigHandler::Handler(end_exec)) };
    }
    let program = args.first().cloned().unwrap_or_default();
    // The command is the container's own process (user and groups, capabilities, cwd,
    // rlimits, no-new-privileges) with `args` and the extra `env`: libcontainer's tenant
    // defaults would run it as root with the default capabilities. With a terminal, a
    // pseudo-terminal is made in the container's devpts, whose master goes to the socket.
    let process = match exec_process(root, id, &args, &env, console_socket.is_some()) {
        Ok(path) => path,
        Err(e) => {
            eprintln!("exec {program:?} failed: {e}");
            return 126;
        }
    };
    let built = ContainerBuilder::new(id.to_owned(), SyscallType::Linux)
        .with_root_path(root)
        .and_then(|b| b.validate_id())
        .map(|b| b.with_console_socket(console_socket))
        .and_then(|b| {
            b.as_tenant()
                .with_container_args(args)
                .with_env(env.into_iter().collect())
                .with_process(Some(process.path()))
                // libcontainer takes a console socket only when detached; the command is
                // still this process's child, waited for below.
                .with_detach(console_socket.is_some())
                .build()
        });
    drop(process);
    let pid = match built {
        Ok(pid) => pid,
        Err(e) => {
            let message = e.to_string();
            eprintln!("exec {program:?} failed: {message}");
            let not_found = message.contains("not found")
                || message.contains("No such file")
                || message.contains("ENOENT");
            return if not_found { 127 } else { 126 };
        }
    };
    let deadline = (!timeout.is_zero()).then(|| Instant::now() + timeout);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                eprintln!("waiting for the exec'd process: {e}");
                return 126;
            }
        }
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        if timed_out || EXEC_ENDED.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            if timed_out {
                eprintln!("timed out after {}ms", timeout.as_millis());
                return 124;
            }
            return 128 + Signal::SIGKILL as i32;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_round_trip() {
        let args = ShimArgs {
            id: "abc".into(),
            bundle: "/b".into(),
            root: "/r".into(),
            log: "/l".into(),
            log_max_bytes: 5,
            stdin: StdinMode::Once,
            tty: true,
        };
        let parsed = ShimArgs::parse(args.to_args()).unwrap();
        assert_eq!(parsed.id, "abc");
        assert_eq!(parsed.log_max_bytes, 5);
        assert_eq!(parsed.stdin, StdinMode::Once);
        assert!(parsed.tty);
        assert!(ShimArgs::parse(vec!["--bogus".into(), "x".into()]).is_err());
    }

    #[test]
    fn cri_log_lines_partials_and_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = LogWriter::open(&path, 200).unwrap();
        log.write(0, b"hello\nwor").unwrap();
        log.write(1, b"oops\n").unwrap();
        log.write(0, b"ld\n").unwrap();
        let text = fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with(" stdout F hello"), "{}", lines[0]);
        assert!(lines[1].ends_with(" stderr F oops"));
        assert!(lines[2].ends_with(" stdout F world"));
        log.write(0, &[b'x'; MAX_LINE + 10]).unwrap();
        log.flush_partial().unwrap();
        // The long line rotated the small log; the current file holds its tail.
        assert!(dir.path().join("0.log.1").exists());
        let text = fs::read_to_string(&path).unwrap();
        assert!(text.contains(" stdout F xxxxxxxxxx\n"), "{text}");
    }

    #[test]
    fn own_start_ticks() {
        assert!(start_ticks(std::process::id() as i32).is_some());
    }
}
