//! `portforward`, as the kubelet serves it: TCP connections to a pod's ports, made inside
//! the pod's network namespace to its loopback (what `localhost:PORT` is in the pod).
//!
//! Three framings reach it:
//! - SPDY (`portforward.k8s.io`), kubectl's: the client opens a pair of streams per
//!   connection (`streamtype` `error` and `data`, the same `requestid`, the `port`); the
//!   data stream carries the bytes, the error stream a message if the connection fails;
//! - the same SPDY tunneled in a WebSocket (`SPDY/3.1+portforward.k8s.io`, kubectl ≥ 1.31):
//!   every binary message carries the next bytes of the SPDY connection;
//! - the WebSocket channel protocol (`v4.channel.k8s.io`, kube-rs'): one connection per port
//!   in the query (`ports=` or `port=`), port `i` on channels `2i` (data) and `2i+1` (error),
//!   each channel's first message the port, little-endian.
//!
//! A connection ends as the kubelet's runtimes end it: when the pod's side closes, the
//! client's data stream ends; when the client ends its half, the pod's socket is shut down
//! for writing.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::StreamError;
use super::spdy::{Connection, SpdyStream};

/// The SPDY protocol served.
pub const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// SPDY tunneled in a WebSocket.
pub const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// The WebSocket protocols served, the preferred first.
pub const WEBSOCKET_PROTOCOLS: [&str; 3] = [
    TUNNEL_PROTOCOL,
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
];

/// How long a client has to open both streams of a connection.
const PAIR_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to the pod's port may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a pod's ports are reached.
#[derive(Clone, Debug)]
pub struct Target {
    /// The pod's `namespace/name`, for messages.
    pub pod: String,
    /// Its UID, for messages.
    pub uid: String,
    /// Its network namespace; `None` for a pod on the host's network.
    pub netns: Option<PathBuf>,
}

impl Target {
    /// Connects to `port` on the pod's loopback (IPv4, then IPv6), inside its network
    /// namespace: from a thread of its own that enters the namespace, as a socket keeps the
    /// namespace it was made in.
    pub async fn connect(&self, port: u16) -> io::Result<TcpStream> {
        let netns = self.netns.clone();
        let (tx, rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("orq-portforward".into())
            .spawn(move || {
                let _ = tx.send(connect_from_thread(netns, port));
            })?;
        let stream = rx
            .await
            .map_err(|_| io::Error::other("the connecting thread died"))??;
        stream.set_nonblocking(true)?;
        TcpStream::from_std(stream)
    }

    /// The kubelet's message for a connection that failed.
    fn failure(&self, port: u16, error: &io::Error) -> String {
        format!(
            "error forwarding port {port} to pod {}, uid {}: {error}",
            self.pod, self.uid
        )
    }
}

fn connect_from_thread(netns: Option<PathBuf>, port: u16) -> io::Result<std::net::TcpStream> {
    use std::os::fd::AsFd as _;
    if let Some(path) = &netns {
        let file = std::fs::File::open(path)?;
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)?;
    }
    let v4 = SocketAddr::from(([127, 0, 0, 1], port));
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, port));
    match std::net::TcpStream::connect_timeout(&v4, CONNECT_TIMEOUT) {
        Ok(stream) => Ok(stream),
        Err(e4) => std::net::TcpStream::connect_timeout(&v6, CONNECT_TIMEOUT).map_err(|e6| {
            io::Error::new(
                e4.kind(),
                format!(
                    "failed to connect to localhost:{port} inside the pod's network namespace, \
                     IPv4: {e4}, IPv6: {e6}"
                ),
            )
        }),
    }
}

/// The ports a WebSocket client asks for (`ports=` as the API server takes them, `port=` as
/// the kubelet does; each may be a comma-separated list).
pub fn parse_ports(query: &str) -> Result<Vec<u16>, StreamError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
        .map_err(|e| StreamError::BadRequest(format!("invalid query: {e}")))?;
    let mut ports = Vec::new();
    for (_, value) in pairs.iter().filter(|(k, _)| k == "ports" || k == "port") {
        for p in value.split(',') {
            match p.trim().parse::<u16>() {
                Ok(port) if port > 0 => ports.push(port),
                _ => {
                    return Err(StreamError::BadRequest(format!(
                        "unable to parse {value:?} as a port: ports are 1 to 65535"
                    )));
                }
            }
        }
    }
    if ports.is_empty() {
        return Err(StreamError::BadRequest(
            "query parameter \"port\" is required".into(),
        ));
    }
    Ok(ports)
}

/// Serves SPDY port-forwarding: pairs the client's streams by `requestid` and forwards each
/// complete pair, until the client goes away.
pub async fn serve_spdy(mut conn: Connection, target: Target) {
    let mut pending: HashMap<String, (Option<SpdyStream>, Option<SpdyStream>)> = HashMap::new();
    let (expired_tx, mut expired) = mpsc::channel::<String>(16);
    loop {
        let stream = tokio::select! {
            stream = conn.streams.recv() => stream,
            Some(id) = expired.recv() => {
                // A pair the client never completed.
                if let Some((error, data)) = pending.remove(&id) {
                    for s in [error, data].into_iter().flatten() {
                        s.out.reset(super::spdy::REFUSED_STREAM).await;
                    }
                }
                continue;
            }
        };
        let Some(stream) = stream else { break };
        let kind = stream.header("streamtype").unwrap_or("").to_owned();
        // Old clients send no request ID: the kubelet's best effort pairs stream N (error)
        // with N + 2 (data).
        let id = stream
            .header("requestid")
            .map(str::to_owned)
            .unwrap_or_else(|| match kind.as_str() {
                "data" => stream.id.saturating_sub(2).to_string(),
                _ => stream.id.to_string(),
            });
        let entry = pending.entry(id.clone()).or_insert_with(|| {
            let expired = expired_tx.clone();
            let id = id.clone();
            tokio::spawn(async move {
                tokio::time::sleep(PAIR_TIMEOUT).await;
                let _ = expired.send(id).await;
            });
            (None, None)
        });
        match kind.as_str() {
            "error" if entry.0.is_none() => entry.0 = Some(stream),
            "data" if entry.1.is_none() => entry.1 = Some(stream),
            _ => {
                stream.out.reset(super::spdy::REFUSED_STREAM).await;
                continue;
            }
        }
        if matches!(pending.get(&id), Some((Some(_), Some(_))))
            && let Some((Some(error), Some(data))) = pending.remove(&id)
        {
            tokio::spawn(forward_pair(error, data, target.clone()));
        }
    }
    conn.close().await;
}

/// One SPDY connection: connect to the data stream's port, then copy both ways.
async fn forward_pair(error: SpdyStream, data: SpdyStream, target: Target) {
    let port = data
        .header("port")
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p > 0);
    let Some(port) = port else {
        let message = format!(
            "invalid port {:?} in the data stream's headers",
            data.header("port").unwrap_or("")
        );
        let _ = error.out.send(message.as_bytes()).await;
        error.out.finish().await;
        data.out.reset(super::spdy::REFUSED_STREAM).await;
        return;
    };
    let socket = match target.connect(port).await {
        Ok(socket) => socket,
        Err(e) => {
            let _ = error.out.send(target.failure(port, &e).as_bytes()).await;
            // The kubelet resets both: the client may open a new pair.
            error.out.reset(super::spdy::INTERNAL_ERROR).await;
            data.out.reset(super::spdy::INTERNAL_ERROR).await;
            return;
        }
    };
    let (mut from_pod, to_pod) = socket.into_split();
    let SpdyStream {
        incoming,
        out: data_out,
        ..
    } = data;
    let upload = upload(incoming, to_pod);
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match from_pod.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if data_out.send(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    data_out.finish().await;
    error.out.finish().await;
    // The client's half ends when it ends it (or the connection goes).
    let _ = upload.await;
}

/// Copies the client's half of a connection into the pod's socket until the client ends
/// it, then shuts the socket down for writing (as the kubelet's runtimes do).
fn upload(
    mut incoming: mpsc::Receiver<Bytes>,
    mut to_pod: tokio::net::tcp::OwnedWriteHalf,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(chunk) = incoming.recv().await {
            if to_pod.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_pod.shutdown().await;
    })
}

/// Runs SPDY tunneled in `socket`'s binary messages.
pub async fn serve_tunneled(socket: WebSocket, target: Target) {
    let (ours, theirs) = tokio::io::duplex(256 * 1024);
    let (mut sink, mut incoming) = socket.split();
    let (mut read, mut write) = tokio::io::split(theirs);
    // WebSocket → SPDY bytes.
    let inbound = tokio::spawn(async move {
        while let Some(Ok(message)) = incoming.next().await {
            let data = match message {
                Message::Binary(data) => data,
                Message::Close(_) => break,
                _ => continue,
            };
            if write.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = write.shutdown().await;
    });
    // SPDY bytes → WebSocket.
    let outbound = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let message = Message::Binary(Bytes::copy_from_slice(&buf[..n]));
                    if sink.send(message).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    serve_spdy(Connection::serve(ours), target).await;
    let _ = outbound.await;
    inbound.abort();
}

/// Serves the WebSocket channel protocol: one connection per port.
pub async fn serve_channels(socket: WebSocket, base64: bool, ports: Vec<u16>, target: Target) {
    let (mut sink, mut incoming) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<(u8, Vec<u8>)>(64);
    let writer = tokio::spawn(async move {
        while let Some((channel, data)) = out_rx.recv().await {
            let message = if base64 {
                use base64::Engine as _;
                let text = format!(
                    "{}{}",
                    char::from(b'0' + channel),
                    base64::engine::general_purpose::STANDARD.encode(&data)
                );
                Message::Text(text.into())
            } else {
                let mut frame = Vec::with_capacity(data.len() + 1);
                frame.push(channel);
                frame.extend(data);
                Message::Binary(frame.into())
            };
            if sink.send(message).await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    let mut uploads = Vec::new();
    let mut forwards = Vec::new();
    for (i, port) in ports.iter().copied().enumerate() {
        let (data, error) = ((2 * i) as u8, (2 * i + 1) as u8);
        let (up_tx, up_rx) = mpsc::channel::<Bytes>(16);
        uploads.push(up_tx);
        let out = out_tx.clone();
        let target = target.clone();
        forwards.push(tokio::spawn(async move {
            let _ = out.send((data, port.to_le_bytes().to_vec())).await;
            let _ = out.send((error, port.to_le_bytes().to_vec())).await;
            let socket = match target.connect(port).await {
                Ok(socket) => socket,
                Err(e) => {
                    let _ = out
                        .send((error, target.failure(port, &e).into_bytes()))
                        .await;
                    return;
                }
            };
            let (mut from_pod, to_pod) = socket.into_split();
            let upload = upload(up_rx, to_pod);
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match from_pod.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if out.send((data, buf[..n].to_vec())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            upload.abort();
        }));
    }
    drop(out_tx);
    // The client's data, by channel, until it goes away.
    let reader = async {
        while let Some(Ok(message)) = incoming.next().await {
            let frame = match message {
                Message::Binary(data) => data.to_vec(),
                Message::Text(text) if base64 => {
                    use base64::Engine as _;
                    let mut bytes = text.as_bytes().iter().copied();
                    let Some(channel) = bytes.next() else {
                        continue;
                    };
                    let rest: Vec<u8> = bytes.collect();
                    let Ok(mut data) = base64::engine::general_purpose::STANDARD.decode(rest)
                    else {
                        continue;
                    };
                    data.insert(0, channel.wrapping_sub(b'0'));
                    data
                }
                Message::Close(_) => break,
                _ => continue,
            };
            let Some((&channel, data)) = frame.split_first() else {
                continue;
            };
            if channel % 2 == 0
                && let Some(upload) = uploads.get(usize::from(channel / 2))
                && !data.is_empty()
            {
                let _ = upload.send(Bytes::copy_from_slice(data)).await;
            }
        }
    };
    let aborts: Vec<_> = forwards.iter().map(|f| f.abort_handle()).collect();
    tokio::select! {
        () = reader => {
            for abort in aborts {
                abort.abort();
            }
        }
        _ = futures::future::join_all(forwards) => {}
    }
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_as_the_api_server_and_the_kubelet_send_them() {
        assert_eq!(parse_ports("ports=80,1234").unwrap(), [80, 1234]);
        assert_eq!(parse_ports("port=80&port=443").unwrap(), [80, 443]);
        assert!(parse_ports("").is_err());
        assert!(parse_ports("ports=0").is_err());
        assert!(parse_ports("ports=70000").is_err());
        assert!(parse_ports("ports=http").is_err());
    }

    #[tokio::test]
    async fn connects_to_the_loopback() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target {
            pod: "ns/p".into(),
            uid: "u".into(),
            netns: None,
        };
        let (connected, accepted) = tokio::join!(target.connect(port), listener.accept());
        let (mut ours, (mut theirs, _)) = (connected.unwrap(), accepted.unwrap());
        ours.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        theirs.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
        drop(listener);
        let refused = target.connect(port).await.unwrap_err().to_string();
        assert!(
            refused.contains("IPv4") && refused.contains("refused"),
            "{refused}"
        );
    }
}
