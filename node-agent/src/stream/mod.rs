//! Streams into pods, as the kubelet's streaming server serves them: `exec` and
//! `portforward` (and, to come, `attach`) on the agent's endpoint, reached through the API
//! server's `pods/exec` and `pods/portforward` relays.
//!
//! - [`session`]: the command itself, run in the container by the `orq shim-exec` helper,
//!   on pipes or a pseudo-terminal;
//! - [`websocket`]: the WebSocket channel protocol (`v5.channel.k8s.io` and older) that
//!   kubectl ≥ 1.30, client-go and kube-rs speak;
//! - [`spdy`]: SPDY/3.1 connections, and [`remotecommand`]: exec over them, for
//!   kubectl ≤ 1.29 and client-go's fallback;
//! - [`portforward`]: TCP connections into a pod's network namespace, over SPDY (kubectl),
//!   SPDY tunneled in a WebSocket (kubectl ≥ 1.31) or WebSocket channels (kube-rs).

pub mod portforward;
pub mod remotecommand;
pub mod session;
pub mod spdy;
pub mod websocket;

use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{FromRequest as _, Path as UrlPath, RawQuery, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::agent::Context;
use crate::container::ContainerState;
use session::{ExecSpec, Opener};

/// Why a stream could not be opened: the agent's answer (the API server passes it on).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The pod is not on this node.
    #[error("pod \"{pod}\" in namespace \"{namespace}\" is not on this node")]
    NoPod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        pod: String,
    },
    /// No such container, or it never ran.
    #[error("container not found (\"{0}\")")]
    NoContainer(String),
    /// The container is not running.
    #[error("container \"{0}\" is not running")]
    NotRunning(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The helper could not be started.
    #[error("starting the command: {0}")]
    Start(std::io::Error),
}

impl IntoResponse for StreamError {
    fn into_response(self) -> Response {
        let status = match &self {
            StreamError::NoPod { .. } | StreamError::NoContainer(_) => StatusCode::NOT_FOUND,
            StreamError::NotRunning(_) | StreamError::BadRequest(_) => StatusCode::BAD_REQUEST,
            StreamError::Start(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, self.to_string()).into_response()
    }
}

/// What `exec` is asked for: the kubelet's query (`command` repeated; `stdin`, `stdout`,
/// `stderr`, `tty` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// The client sends stdin.
    pub stdin: bool,
    /// The client reads stdout.
    pub stdout: bool,
    /// The client reads stderr.
    pub stderr: bool,
    /// A pseudo-terminal.
    pub tty: bool,
}

impl ExecOptions {
    /// Parses an `exec` query: a command is required.
    pub fn parse(query: &str) -> Result<ExecOptions, StreamError> {
        let options = Self::parse_streams(query)?;
        if options.command.is_empty() {
            return Err(StreamError::BadRequest("you must specify a command".into()));
        }
        Ok(options)
    }

    /// Parses a query's streams (and command, if any): an `attach` query.
    pub fn parse_streams(query: &str) -> Result<ExecOptions, StreamError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query)
            .map_err(|e| StreamError::BadRequest(format!("invalid query: {e}")))?;
        let flag = |name: &str| {
            pairs
                .iter()
                .any(|(k, v)| k == name && matches!(v.as_str(), "1" | "true" | "True"))
        };
        let options = ExecOptions {
            command: pairs
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect(),
            stdin: flag("stdin") || flag("input"),
            stdout: flag("stdout") || flag("output"),
            stderr: flag("stderr") || flag("error"),
            tty: flag("tty"),
        };
        if !options.stdin && !options.stdout && !options.stderr {
            return Err(StreamError::BadRequest(
                "you must specify at least 1 of stdin, stdout, stderr".into(),
            ));
        }
        Ok(options)
    }
}

/// The libcontainer ID of `container`'s running attempt in pod `namespace/pod`.
pub fn running_container(
    ctx: &Context,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<String, StreamError> {
    running_attempt(ctx, namespace, pod, container).map(|(id, _)| id)
}

/// The libcontainer ID and bundle directory of `container`'s running attempt.
pub fn running_attempt(
    ctx: &Context,
    namespace: &str,
    pod: &str,
    container: &str,
) -> Result<(String, std::path::PathBuf), StreamError> {
    let uid = ctx
        .pod_uid(namespace, pod)
        .ok_or_else(|| StreamError::NoPod {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
        })?;
    let dir = ctx.pods_dir().join(&uid).join("containers").join(container);
    let attempt = crate::pod::attempt_numbers(&dir)
        .into_iter()
        .max()
        .ok_or_else(|| StreamError::NoContainer(container.to_owned()))?;
    let bundle = dir.join(attempt.to_string());
    match crate::container::state(&bundle) {
        ContainerState::Running(_) => {
            Ok((crate::pod::container_id(&uid, container, attempt), bundle))
        }
        _ => Err(StreamError::NotRunning(container.to_owned())),
    }
}

/// The protocol a SPDY client and this server share: the first the client offers (in its
/// order) that is served; `channel.k8s.io` when it offers none, as the kubelet does.
pub fn negotiate(headers: &HeaderMap, served: &[&str]) -> Result<String, StreamError> {
    let offered: Vec<String> = headers
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return Ok(served.last().copied().unwrap_or_default().to_owned());
    }
    offered
        .iter()
        .find(|p| served.contains(&p.as_str()))
        .cloned()
        .ok_or_else(|| {
            StreamError::BadRequest(format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, \
                 server supports {served:?}"
            ))
        })
}

/// Whether a request asks to upgrade to SPDY/3.1.
pub fn wants_spdy(headers: &HeaderMap) -> bool {
    headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("spdy/3.1"))
}

/// Answers a SPDY upgrade with `101` (and the negotiated protocol) and runs `serve` on the
/// upgraded connection.
pub fn upgrade_spdy<F, Fut>(mut request: Request, protocol: String, serve: F) -> Response
where
    F: FnOnce(spdy::Connection, String) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let upgrading = hyper::upgrade::on(&mut request);
    let chosen = protocol.clone();
    tokio::spawn(async move {
        match upgrading.await {
            Ok(upgraded) => {
                let conn = spdy::Connection::serve(hyper_util::rt::TokioIo::new(upgraded));
                serve(conn, chosen).await;
            }
            Err(e) => tracing::debug!(error = %e, "the SPDY upgrade failed"),
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header("X-Stream-Protocol-Version", protocol)
        .body(axum::body::Body::empty())
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// `GET|POST /exec/{namespace}/{pod}/{container}?command=…`, upgraded to a stream:
/// WebSocket ([`websocket`]) or SPDY ([`remotecommand`]).
pub async fn exec(
    ctx: Arc<Context>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let options = match ExecOptions::parse(query.as_deref().unwrap_or("")) {
        Ok(options) => options,
        Err(e) => return e.into_response(),
    };
    let spdy = wants_spdy(request.headers());
    let spdy_protocol = if spdy {
        match negotiate(request.headers(), &remotecommand::PROTOCOLS) {
            Ok(p) => Some(p),
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    let container_id = match running_container(&ctx, &namespace, &pod, &container) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    let spec = ExecSpec {
        helper: ctx.shim_exec(),
        state_root: ctx.runtime.state_root.clone(),
        container_id,
        command: options.command.clone(),
        stdin: options.stdin,
        tty: options.tty,
    };
    let open = ctx.metrics.stream_open(request.method().as_str(), "exec");
    serve_stream(request, spdy_protocol, options, Opener::Exec(spec), open).await
}

/// Serves an exec or attach stream over SPDY (when `spdy_protocol` was negotiated) or a
/// WebSocket.
async fn serve_stream(
    request: Request,
    spdy_protocol: Option<String>,
    options: ExecOptions,
    opener: Opener,
    open: crate::metrics::Inflight,
) -> Response {
    if let Some(protocol) = spdy_protocol {
        return upgrade_spdy(request, protocol, move |conn, protocol| async move {
            let _open = open;
            remotecommand::relay(conn, protocol, options, opener).await;
        });
    }
    let asked = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let upgrade = match WebSocketUpgrade::from_request(request, &()).await {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let message = if asked.is_empty() {
                "streams need an upgraded connection (WebSocket or SPDY/3.1)".to_owned()
            } else {
                format!("unsupported upgrade {asked:?}: {rejection}")
            };
            return StreamError::BadRequest(message).into_response();
        }
    };
    upgrade
        .protocols(websocket::PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let _open = open;
            let protocol = socket
                .protocol()
                .and_then(|p| p.to_str().ok())
                .unwrap_or("channel.k8s.io")
                .to_owned();
            // Started once the client is there, so a failed upgrade leaves nothing behind.
            match opener.open().await {
                Ok(mut session) => {
                    if !options.stdout {
                        session.stdout = None;
                    }
                    // With a terminal, "stderr" is the helper's messages, shown as output.
                    if !options.stderr && !options.tty {
                        session.stderr = None;
                    }
                    websocket::relay(socket, protocol, options.command, options.tty, session).await;
                }
                Err(e) => {
                    let message = StreamError::Start(e).to_string();
                    websocket::fail(socket, &protocol, &message).await;
                }
            }
        })
}

/// `GET|POST /attach/{namespace}/{pod}/{container}?stdin=…`: the running container's own
/// stdio, through its shim, over SPDY or a WebSocket.
pub async fn attach(
    ctx: Arc<Context>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let options = match ExecOptions::parse_streams(query.as_deref().unwrap_or("")) {
        Ok(options) => options,
        Err(e) => return e.into_response(),
    };
    let spdy_protocol = if wants_spdy(request.headers()) {
        match negotiate(request.headers(), &remotecommand::PROTOCOLS) {
            Ok(p) => Some(p),
            Err(e) => return e.into_response(),
        }
    } else {
        None
    };
    let bundle = match running_attempt(&ctx, &namespace, &pod, &container) {
        Ok((_, bundle)) => bundle,
        Err(e) => return e.into_response(),
    };
    let opener = Opener::Attach {
        socket: bundle.join(crate::shim::ATTACH_SOCKET),
        stdin: options.stdin,
    };
    let open = ctx.metrics.stream_open(request.method().as_str(), "attach");
    serve_stream(request, spdy_protocol, options, opener, open).await
}

/// `GET|POST /portforward/{namespace}/{pod}`, upgraded to SPDY or a WebSocket.
pub async fn portforward(
    ctx: Arc<Context>,
    UrlPath((namespace, pod)): UrlPath<(String, String)>,
    RawQuery(query): RawQuery,
    request: Request,
) -> Response {
    let Some(uid) = ctx.pod_uid(&namespace, &pod) else {
        return StreamError::NoPod { namespace, pod }.into_response();
    };
    let netns = std::path::Path::new("/run/netns").join(crate::network::Network::netns_name(&uid));
    let target = portforward::Target {
        pod: format!("{namespace}/{pod}"),
        uid,
        // A pod on the host's network has no namespace of its own.
        netns: netns.exists().then_some(netns),
    };
    if wants_spdy(request.headers()) {
        let protocol = match negotiate(request.headers(), &[portforward::SPDY_PROTOCOL]) {
            Ok(p) => p,
            Err(e) => return e.into_response(),
        };
        let open = ctx
            .metrics
            .stream_open(request.method().as_str(), "portforward");
        return upgrade_spdy(request, protocol, move |conn, _| async move {
            let _open = open;
            portforward::serve_spdy(conn, target).await;
        });
    }
    let open = ctx
        .metrics
        .stream_open(request.method().as_str(), "portforward");
    let upgrade = match WebSocketUpgrade::from_request(request, &()).await {
        Ok(upgrade) => upgrade.protocols(portforward::WEBSOCKET_PROTOCOLS),
        Err(rejection) => {
            return StreamError::BadRequest(format!(
                "port-forward needs an upgraded connection (SPDY/3.1 or WebSocket): {rejection}"
            ))
            .into_response();
        }
    };
    // The tunnel carries its ports in SPDY headers; the channel protocol in the query.
    let tunneled = upgrade
        .selected_protocol()
        .is_some_and(|p| p == portforward::TUNNEL_PROTOCOL);
    let ports = if tunneled {
        Vec::new()
    } else {
        match portforward::parse_ports(query.as_deref().unwrap_or("")) {
            Ok(ports) => ports,
            Err(e) => return e.into_response(),
        }
    };
    upgrade.on_upgrade(move |socket| async move {
        let _open = open;
        let protocol = socket
            .protocol()
            .and_then(|p| p.to_str().ok())
            .unwrap_or("")
            .to_owned();
        if protocol == portforward::TUNNEL_PROTOCOL {
            portforward::serve_tunneled(socket, target).await;
        } else {
            let base64 = protocol == "v4.base64.channel.k8s.io";
            portforward::serve_channels(socket, base64, ports, target).await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_queries_parse_as_the_kubelets() {
        let options =
            ExecOptions::parse("command=sh&command=-c&command=echo+hi&stdin=true&stdout=1&tty=1")
                .unwrap();
        assert_eq!(options.command, ["sh", "-c", "echo hi"]);
        assert!(options.stdin && options.stdout && !options.stderr && options.tty);
        assert!(ExecOptions::parse("stdout=1").is_err());
        assert!(ExecOptions::parse("command=ls").is_err());
    }
}
