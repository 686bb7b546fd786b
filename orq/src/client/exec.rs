//! `orq exec`, `orq port-forward` and `orq cp`: into a pod through the API server's
//! `pods/exec` and `pods/portforward` (kube-rs over WebSocket), for hosts without kubectl.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use clap::Args;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{AttachParams, AttachedProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{ConnectArgs, NamespaceArgs};

/// `orq exec` flags.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The Pod: `NAME` or `pod/NAME`.
    #[arg(value_name = "POD")]
    pod: String,
    /// The container (default: the Pod's only one).
    #[arg(short, long, value_name = "NAME")]
    container: Option<String>,
    /// Pass this process's stdin to the command.
    #[arg(short = 'i', long)]
    stdin: bool,
    /// Run the command on a terminal (stdin must be one).
    #[arg(short = 't', long)]
    tty: bool,
    /// The command and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
    #[command(flatten)]
    namespace: NamespaceArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn pod_name(arg: &str) -> anyhow::Result<&str> {
    match arg.split_once('/') {
        Some(("pod" | "pods" | "po", name)) => Ok(name),
        Some((kind, _)) => bail!("this works on Pods, not a {kind}: pass a Pod name"),
        None => Ok(arg),
    }
}

/// The exit code in an exec's final `Status` (0 on success).
fn exit_code(status: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Status>) -> i32 {
    let Some(status) = status else { return 0 };
    if status.status.as_deref() == Some("Success") {
        return 0;
    }
    status
        .details
        .and_then(|d| d.causes)
        .into_iter()
        .flatten()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))
        .and_then(|c| c.message?.parse().ok())
        .unwrap_or(1)
}

/// Runs `orq exec`; returns the command's exit code.
pub async fn run(args: ExecArgs) -> anyhow::Result<i32> {
    let name = pod_name(&args.pod)?;
    let session = args.connect.connect().await?;
    let namespace = session.namespace(&args.namespace);
    let api: kube::Api<Pod> = kube::Api::namespaced(session.client.clone(), &namespace);
    let mut params = AttachParams::default()
        .stdin(args.stdin)
        .stderr(!args.tty)
        .tty(args.tty);
    if let Some(c) = &args.container {
        params = params.container(c.as_str());
    }
    let terminal = if args.tty {
        Some(RawTerminal::enter().context("-t needs stdin to be a terminal")?)
    } else {
        None
    };
    let mut attached = api
        .exec(name, args.command.clone(), &params)
        .await
        .map_err(|e| session.error(e))?;
    if let (Some(terminal), Some(mut sizes)) = (&terminal, attached.terminal_size()) {
        if let Some(size) = terminal.size() {
            let _ = futures::SinkExt::send(&mut sizes, size).await;
        }
    }
    let code = relay(&mut attached, args.stdin).await?;
    drop(terminal);
    Ok(code)
}

/// Copies this process's stdio to and from `attached` until the command ends.
async fn relay(attached: &mut AttachedProcess, stdin: bool) -> anyhow::Result<i32> {
    let status = attached.take_status();
    let mut tasks = Vec::new();
    if let (true, Some(mut remote)) = (stdin, attached.stdin()) {
        tasks.push(tokio::spawn(async move {
            let mut local = tokio::io::stdin();
            let _ = tokio::io::copy(&mut local, &mut remote).await;
            let _ = remote.shutdown().await;
        }));
    }
    let mut outputs = Vec::new();
    if let Some(mut remote) = attached.stdout() {
        outputs.push(tokio::spawn(async move {
            let mut local = tokio::io::stdout();
            let _ = tokio::io::copy(&mut remote, &mut local).await;
            let _ = local.flush().await;
        }));
    }
    if let Some(mut remote) = attached.stderr() {
        outputs.push(tokio::spawn(async move {
            let mut local = tokio::io::stderr();
            let _ = tokio::io::copy(&mut remote, &mut local).await;
            let _ = local.flush().await;
        }));
    }
    for output in outputs {
        let _ = output.await;
    }
    for task in tasks {
        task.abort();
    }
    let status = match status {
        Some(status) => status.await,
        None => None,
    };
    Ok(exit_code(status))
}

/// This process's terminal in raw mode, restored when dropped.
struct RawTerminal(nix::sys::termios::Termios);

impl RawTerminal {
    fn enter() -> anyhow::Result<RawTerminal> {
        use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(&stdin, SetArg::TCSANOW, &raw)?;
        Ok(RawTerminal(saved))
    }

    fn size(&self) -> Option<kube::api::TerminalSize> {
        let mut size = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into a valid pointer.
        let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) };
        (rc == 0 && size.ws_col > 0).then_some(kube::api::TerminalSize {
            width: size.ws_col,
            height: size.ws_row,
        })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use nix::sys::termios::{SetArg, tcsetattr};
        let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.0);
    }
}

/// `orq port-forward` flags.
#[derive(Debug, Args)]
pub struct PortForwardArgs {
    /// The Pod: `NAME` or `pod/NAME`.
    #[arg(value_name = "POD")]
    pod: String,
    /// `LOCAL:REMOTE` (or `PORT` for the same on both sides); several may be given.
    #[arg(required = true, value_name = "PORTS")]
    ports: Vec<String>,
    /// The local address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    address: String,
    #[command(flatten)]
    namespace: NamespaceArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

fn parse_mapping(mapping: &str) -> anyhow::Result<(u16, u16)> {
    let port = |p: &str| -> anyhow::Result<u16> {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| anyhow!("invalid port {p:?} in {mapping:?}: ports are 1 to 65535"))
    };
    match mapping.split_once(':') {
        Some((local, remote)) => Ok((port(local)?, port(remote)?)),
        None => Ok((port(mapping)?, port(mapping)?)),
    }
}

/// Runs `orq port-forward` until interrupted: every local connection is a new port-forward
/// stream to the pod.
pub async fn port_forward(args: PortForwardArgs) -> anyhow::Result<()> {
    let name = pod_name(&args.pod)?.to_owned();
    let mappings = args
        .ports
        .iter()
        .map(|m| parse_mapping(m))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let session = args.connect.connect().await?;
    let namespace = session.namespace(&args.namespace);
    let api: kube::Api<Pod> = kube::Api::namespaced(session.client.clone(), &namespace);
    let pod = api.get(&name).await.map_err(|e| session.error(e))?;
    let phase = pod.status.and_then(|s| s.phase).unwrap_or_default();
    if phase != "Running" {
        bail!("pod {name} is not running (it is {phase}): nothing to forward to");
    }
    let mut listeners = Vec::new();
    for (local, remote) in mappings {
        let listener = tokio::net::TcpListener::bind((args.address.as_str(), local))
            .await
            .with_context(|| format!("listening on {}:{local}", args.address))?;
        println!("Forwarding from {}:{local} -> {remote}", args.address);
        let (api, name) = (api.clone(), name.clone());
        listeners.push(tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let (api, name) = (api.clone(), name.clone());
                tokio::spawn(async move {
                    let mut forwarder = match api.portforward(&name, &[remote]).await {
                        Ok(f) => f,
                        Err(e) => {
                            eprintln!("error forwarding {local} -> {remote}: {e}");
                            return;
                        }
                    };
                    let Some(mut stream) = forwarder.take_stream(remote) else {
                        return;
                    };
                    let failed = forwarder.take_error(remote);
                    let copied = tokio::io::copy_bidirectional(&mut socket, &mut stream).await;
                    if let Some(failed) = failed
                        && let Ok(Some(message)) =
                            tokio::time::timeout(std::time::Duration::from_millis(100), failed)
                                .await
                    {
                        eprintln!("error forwarding {local} -> {remote}: {message}");
                    } else if let Err(e) = copied {
                        eprintln!("error forwarding {local} -> {remote}: {e}");
                    }
                    drop(stream);
                    let _ = forwarder.join().await;
                });
            }
        }));
    }
    tokio::signal::ctrl_c().await?;
    for listener in listeners {
        listener.abort();
    }
    Ok(())
}

/// `orq cp` flags.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// What to copy: a local path, or `POD:PATH`.
    #[arg(value_name = "SRC")]
    src: String,
    /// Where to: `POD:PATH`, or a local path.
    #[arg(value_name = "DEST")]
    dest: String,
    /// The container (default: the Pod's only one).
    #[arg(short, long, value_name = "NAME")]
    container: Option<String>,
    #[command(flatten)]
    namespace: NamespaceArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// `POD:PATH` split, or `None` for a local path (which may hold a colon after a slash).
fn remote(spec: &str) -> Option<(&str, &str)> {
    let (pod, path) = spec.split_once(':')?;
    (!pod.is_empty() && !pod.contains('/') && !path.is_empty()).then_some((pod, path))
}

/// Splits a path into its parent directory (`.` for none) and its last component.
fn parent_and_name(path: &str) -> (String, String) {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", name)) => ("/".into(), name.into()),
        Some((parent, name)) => (parent.into(), name.into()),
        None => (".".into(), trimmed.into()),
    }
}

/// Runs `orq cp`: `tar` through exec, as `kubectl cp` does (the image needs `tar`).
pub async fn cp(args: CpArgs) -> anyhow::Result<()> {
    let session = args.connect.connect().await?;
    let namespace = session.namespace(&args.namespace);
    let api: kube::Api<Pod> = kube::Api::namespaced(session.client.clone(), &namespace);
    let mut params = AttachParams::default().stderr(true);
    if let Some(c) = &args.container {
        params = params.container(c.as_str());
    }
    match (remote(&args.src), remote(&args.dest)) {
        (None, Some((pod, path))) => {
            // Upload: one archive whose top entry is the destination's name, unpacked in
            // the destination's directory.
            let (dir, name) = parent_and_name(path);
            let archive = archive(Path::new(&args.src), &name)?;
            let command = vec![
                "tar".to_owned(),
                "-xmf".into(),
                "-".into(),
                "-C".into(),
                dir,
            ];
            let mut attached = api
                .exec(pod, command, &params.stdin(true))
                .await
                .map_err(|e| session.error(e))?;
            let mut stdin = attached.stdin().context("no stdin")?;
            let mut stderr = attached.stderr().context("no stderr")?;
            let status = attached.take_status();
            stdin.write_all(&archive).await?;
            stdin.shutdown().await?;
            let mut errors = String::new();
            stderr.read_to_string(&mut errors).await?;
            let code = exit_code(match status {
                Some(s) => s.await,
                None => None,
            });
            if code != 0 {
                bail!("tar in the pod failed ({code}): {}", errors.trim());
            }
            Ok(())
        }
        (Some((pod, path)), None) => {
            let (dir, name) = parent_and_name(path);
            let command = vec![
                "tar".to_owned(),
                "-cf".into(),
                "-".into(),
                "-C".into(),
                dir,
                name.clone(),
            ];
            let mut attached = api
                .exec(pod, command, &params)
                .await
                .map_err(|e| session.error(e))?;
            let mut stdout = attached.stdout().context("no stdout")?;
            let mut stderr = attached.stderr().context("no stderr")?;
            let status = attached.take_status();
            let (mut bytes, mut errors) = (Vec::new(), String::new());
            let (read, _) = tokio::join!(
                stdout.read_to_end(&mut bytes),
                stderr.read_to_string(&mut errors)
            );
            read?;
            let code = exit_code(match status {
                Some(s) => s.await,
                None => None,
            });
            if code != 0 {
                bail!("tar in the pod failed ({code}): {}", errors.trim());
            }
            unpack(&bytes, &name, Path::new(&args.dest))
        }
        (Some(_), Some(_)) => bail!("copy between two pods by way of this host"),
        (None, None) => bail!("one of SRC and DEST must be POD:PATH"),
    }
}

/// A tar of `src` (a file or a directory, recursively) under the top name `name`.
fn archive(src: &Path, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    let meta = std::fs::metadata(src).with_context(|| format!("reading {}", src.display()))?;
    if meta.is_dir() {
        builder.append_dir_all(name, src)?;
    } else {
        builder.append_path_with_name(src, name)?;
    }
    Ok(builder.into_inner()?)
}

/// Unpacks an archive whose top entry is `name` into `dest` (renamed to it); entries that
/// would land outside `dest` are refused.
fn unpack(bytes: &[u8], name: &str, dest: &Path) -> anyhow::Result<()> {
    let mut archive = tar::Archive::new(bytes);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let Ok(rest) = path.strip_prefix(name) else {
            continue;
        };
        if rest
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            bail!("refusing the archive entry {}", path.display());
        }
        let target: PathBuf = if rest.as_os_str().is_empty() {
            dest.to_owned()
        } else {
            dest.join(rest)
        };
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        entry.unpack(&target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths_ports_and_archives() {
        assert_eq!(remote("web:/tmp/x"), Some(("web", "/tmp/x")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/tmp/x"), None);
        assert_eq!(parent_and_name("/tmp/x/"), ("/tmp".into(), "x".into()));
        assert_eq!(parent_and_name("x"), (".".into(), "x".into()));
        assert_eq!(parse_mapping("8080:80").unwrap(), (8080, 80));
        assert_eq!(parse_mapping("80").unwrap(), (80, 80));
        assert!(parse_mapping("0:80").is_err());

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("src/sub")).unwrap();
        std::fs::write(dir.path().join("src/sub/f"), "hi").unwrap();
        let bytes = archive(&dir.path().join("src"), "renamed").unwrap();
        unpack(&bytes, "renamed", &dir.path().join("out")).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("out/sub/f")).unwrap(),
            "hi"
        );
    }
}
