//! The WebSocket channel protocol of `exec` and `attach` (`v5.channel.k8s.io` … `channel.k8s.io`),
//! as the kubelet serves it and kubectl ≥ 1.30, client-go and kube-rs speak it.
//!
//! Every binary message is one channel's data, its first byte the channel: 0 stdin, 1 stdout,
//! 2 stderr, 3 the error channel, 4 terminal resizes (JSON `{"Width":…,"Height":…}`).
//! `v5` adds a half-close: `[255, channel]` ends the client's stdin. When the command has
//! exited and its output is sent, the error channel says how: from `v4` on a `Status` (its
//! exit code in `details.causes` when not zero), before that a plain message.

use axum::extract::ws::{Message, WebSocket};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use super::session::{Session, TerminalSize};

/// The protocols served, the newest first (the first a client also offers wins).
pub const PROTOCOLS: [&str; 5] = [
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// `v5`'s half-close: `[CLOSE, channel]`.
const CLOSE: u8 = 255;

/// How the command ended, as the error channel of `protocol` says it.
pub fn exit_message(protocol: &str, command: &[String], code: i32) -> Option<Vec<u8>> {
    let structured = matches!(protocol, "v4.channel.k8s.io" | "v5.channel.k8s.io");
    let status = if code == 0 {
        if !structured {
            return None;
        }
        serde_json::json!({"metadata": {}, "status": "Success"})
    } else {
        let message = format!(
            "command terminated with non-zero exit code: error executing command {command:?}, \
             exit code {code}"
        );
        if !structured {
            return Some(message.into_bytes());
        }
        serde_json::json!({
            "metadata": {}, "status": "Failure", "message": message,
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
        })
    };
    serde_json::to_vec(&status).ok()
}

/// Relays `session` over `socket` until the command has exited and its output is sent, or
/// the client goes away (then the command is ended). With a `tty` there is one output
/// stream: what the session has as stderr goes out as stdout.
pub async fn relay(
    socket: WebSocket,
    protocol: String,
    command: Vec<String>,
    tty: bool,
    mut session: Session,
) {
    let (mut sink, mut incoming) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
    // The first frame, on the lowest channel the client reads, says the streams are ready.
    let first = if session.stdout.is_some() {
        STDOUT
    } else if session.stderr.is_some() {
        STDERR
    } else {
        ERROR
    };
    let writer = tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if sink.send(Message::Binary(frame.into())).await.is_err() {
                return None;
            }
        }
        Some(sink)
    });
    let _ = out_tx.send(vec![first]).await;

    let mut pumps = Vec::new();
    for (channel, stream) in [
        (STDOUT, session.stdout.take()),
        // A terminal has one output stream.
        (if tty { STDOUT } else { STDERR }, session.stderr.take()),
    ] {
        let Some(mut stream) = stream else { continue };
        let tx = out_tx.clone();
        pumps.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                // A terminal's read fails (EIO) once the command is gone: an end too.
                match stream.read(&mut buf[1..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        buf[0] = channel;
                        if tx.send(buf[..=n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }));
    }

    let mut stdin = session.stdin.take();
    let resizer = session.resizer();
    let v5 = protocol == "v5.channel.k8s.io";
    // The client's messages; it is gone when this ends before the command does.
    let reader = async move {
        while let Some(Ok(message)) = incoming.next().await {
            let data = match message {
                Message::Binary(data) => data.to_vec(),
                Message::Text(text) => text.as_bytes().to_vec(),
                Message::Close(_) => return,
                _ => continue,
            };
            match data.split_first() {
                Some((&STDIN, rest)) => {
                    if let Some(input) = stdin.as_mut()
                        && (input.write_all(rest).await.is_err() || input.flush().await.is_err())
                    {
                        stdin = None;
                    }
                }
                Some((&RESIZE, rest)) => {
                    if let (Some(resizer), Ok(size)) =
                        (&resizer, serde_json::from_slice::<TerminalSize>(rest))
                    {
                        resizer.resize(size);
                    }
                }
                Some((&CLOSE, [STDIN])) if v5 => {
                    if let Some(mut input) = stdin.take() {
                        let _ = input.shutdown().await;
                    }
                }
                _ => {}
            }
        }
    };
    let code = tokio::select! {
        code = session.wait() => Some(code),
        () = reader => None,
    };
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
    if let Some(status) = exit_message(&protocol, &command, code) {
        let mut frame = vec![ERROR];
        frame.extend(status);
        let _ = out_tx.send(frame).await;
    }
    drop(out_tx);
    if let Ok(Some(mut sink)) = writer.await {
        let _ = sink.send(normal_close()).await;
    }
}

/// A close with status 1000: clients (gorilla's) take a close without a status for an error.
fn normal_close() -> Message {
    Message::Close(Some(axum::extract::ws::CloseFrame {
        code: axum::extract::ws::close_code::NORMAL,
        reason: "".into(),
    }))
}

/// Says on the error channel why the stream cannot be served, and closes.
pub async fn fail(mut socket: WebSocket, protocol: &str, message: &str) {
    let mut frame = vec![ERROR];
    if matches!(protocol, "v4.channel.k8s.io" | "v5.channel.k8s.io") {
        let status = serde_json::json!({"metadata": {}, "status": "Failure",
            "message": message, "reason": "InternalError", "code": 500});
        frame.extend(serde_json::to_vec(&status).unwrap_or_default());
    } else {
        frame.extend_from_slice(message.as_bytes());
    }
    let _ = socket.send(Message::Binary(frame.into())).await;
    let _ = socket.send(normal_close()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_channel_says_how_the_command_ended_per_version() {
        let command = vec!["sh".to_owned(), "-c".to_owned(), "exit 7".to_owned()];
        let failed: serde_json::Value =
            serde_json::from_slice(&exit_message("v5.channel.k8s.io", &command, 7).unwrap())
                .unwrap();
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0]["message"], "7");
        let ok: serde_json::Value =
            serde_json::from_slice(&exit_message("v4.channel.k8s.io", &command, 0).unwrap())
                .unwrap();
        assert_eq!(ok["status"], "Success");
        assert!(exit_message("channel.k8s.io", &command, 0).is_none());
        let text = exit_message("v2.channel.k8s.io", &command, 7).unwrap();
        assert!(String::from_utf8(text).unwrap().contains("exit code 7"));
    }
}
