//! `exec` and `attach` over SPDY (`v4.channel.k8s.io` … `channel.k8s.io`), as the kubelet's
//! remotecommand server serves kubectl ≤ 1.29 and client-go's fallback.
//!
//! The client opens one stream per channel, named by its `streamtype` header: `error`,
//! `stdin`, `stdout`, `stderr` (not with a TTY), `resize` (a TTY, from `v3`). Once the
//! expected ones are open the command starts; its output streams end with `FIN` when the
//! command's do, then the error stream says how it exited (from `v4` a `Status`, before
//! that a message only on failure) and the connection closes. A client that goes away
//! ends the command.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::ExecOptions;
use super::session::{Opener, TerminalSize};
use super::spdy::{Connection, SpdyStream};
use super::websocket::exit_message;

/// The protocols served over SPDY, the newest first (the first a client offers wins).
pub const PROTOCOLS: [&str; 4] = [
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// How long a client has to open its streams (the kubelet's stream creation timeout).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);

/// The channel streams of one exec.
#[derive(Default)]
struct Streams {
    error: Option<SpdyStream>,
    stdin: Option<SpdyStream>,
    stdout: Option<SpdyStream>,
    stderr: Option<SpdyStream>,
    resize: Option<SpdyStream>,
}

impl Streams {
    /// Whether every stream `options` needs is open.
    fn complete(&self, options: &ExecOptions, protocol: &str) -> bool {
        let resizes = options.tty && matches!(protocol, "v3.channel.k8s.io" | "v4.channel.k8s.io");
        self.error.is_some()
            && (!options.stdin || self.stdin.is_some())
            && (!options.stdout || self.stdout.is_some())
            && (!options.stderr || options.tty || self.stderr.is_some())
            && (!resizes || self.resize.is_some())
    }
}

/// Waits for the client's streams, runs the command, relays it, and closes.
pub async fn relay(mut conn: Connection, protocol: String, options: ExecOptions, opener: Opener) {
    let mut streams = Streams::default();
    let collected = tokio::time::timeout(STREAM_CREATION_TIMEOUT, async {
        while !streams.complete(&options, &protocol) {
            let Some(stream) = conn.streams.recv().await else {
                return false;
            };
            let slot = match stream.header("streamtype") {
                Some("error") => &mut streams.error,
                Some("stdin") => &mut streams.stdin,
                Some("stdout") => &mut streams.stdout,
                Some("stderr") => &mut streams.stderr,
                Some("resize") => &mut streams.resize,
                _ => {
                    stream.out.reset(super::spdy::REFUSED_STREAM).await;
                    continue;
                }
            };
            *slot = Some(stream);
        }
        true
    })
    .await;
    if collected != Ok(true) {
        tracing::debug!("exec client did not open its streams");
        conn.close().await;
        return;
    }
    let error = streams.error.take().map(|s| s.out);
    let mut session = match opener.open().await {
        Ok(session) => session,
        Err(e) => {
            if let Some(error) = error {
                let message = super::StreamError::Start(e).to_string();
                let _ = error.send(&failure(&protocol, &message)).await;
                error.finish().await;
            }
            conn.close().await;
            return;
        }
    };

    // Output: stdout (and, on a terminal, the helper's messages) to the stdout stream.
    let stdout_out = streams.stdout.take().map(|s| s.out);
    let stderr_out = streams.stderr.take().map(|s| s.out);
    let mut pumps = Vec::new();
    for (source, sink) in [
        (session.stdout.take(), stdout_out.clone()),
        (
            session.stderr.take(),
            if options.tty {
                stdout_out.clone()
            } else {
                stderr_out.clone()
            },
        ),
    ] {
        let (Some(mut source), Some(sink)) = (source, sink) else {
            continue;
        };
        pumps.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match source.read(&mut buf).await {
                    // A terminal's read fails (EIO) once the command is gone: an end too.
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if sink.send(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }
    // Input: the stdin stream until the client ends it, then the command's stdin closes.
    let mut inputs = Vec::new();
    if let (Some(mut stream), Some(mut stdin)) = (streams.stdin.take(), session.stdin.take()) {
        inputs.push(tokio::spawn(async move {
            while let Some(chunk) = stream.incoming.recv().await {
                if stdin.write_all(&chunk).await.is_err() || stdin.flush().await.is_err() {
                    break;
                }
            }
            let _ = stdin.shutdown().await;
        }));
    }
    if let (Some(mut stream), Some(resizer)) = (streams.resize.take(), session.resizer()) {
        inputs.push(tokio::spawn(async move {
            let mut pending = Vec::new();
            while let Some(chunk) = stream.incoming.recv().await {
                pending.extend_from_slice(&chunk);
                let mut sizes =
                    serde_json::Deserializer::from_slice(&pending).into_iter::<TerminalSize>();
                let mut used = 0;
                while let Some(Ok(size)) = sizes.next() {
                    resizer.resize(size);
                    used = sizes.byte_offset();
                }
                pending.drain(..used);
            }
        }));
    }

    let code = tokio::select! {
        code = session.wait() => Some(code),
        () = conn.closed() => None,
    };
    for input in inputs {
        input.abort();
    }
    let Some(code) = code else {
        for pump in pumps {
            pump.abort();
        }
        session.terminate();
        return;
    };
    for pump in pumps {
        let _ = pump.await;
    }
    for out in [stdout_out, stderr_out].into_iter().flatten() {
        out.finish().await;
    }
    if let Some(error) = error {
        if let Some(status) = exit_message(&protocol, &options.command, code) {
            let _ = error.send(&status).await;
        }
        error.finish().await;
    }
    conn.close().await;
}

/// A failure to start, as the error stream of `protocol` says it.
fn failure(protocol: &str, message: &str) -> Vec<u8> {
    if protocol == "v4.channel.k8s.io" {
        let status = serde_json::json!({"metadata": {}, "status": "Failure",
            "message": message, "reason": "InternalError", "code": 500});
        serde_json::to_vec(&status).unwrap_or_default()
    } else {
        message.as_bytes().to_vec()
    }
}
