//! Streams into containers, as the kubelet's streaming server serves them: `exec` (and, to
//! come, `attach` and `portforward`) on the agent's endpoint, reached through the API
//! server's `pods/exec` relay.
//!
//! - [`session`]: the command itself, run in the container by the `orq shim-exec` helper,
//!   on pipes or a pseudo-terminal;
//! - [`websocket`]: the WebSocket channel protocol (`v5.channel.k8s.io` and older) that
//!   kubectl ≥ 1.30, client-go and kube-rs speak.

pub mod session;
pub mod websocket;

use std::sync::Arc;

use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path as UrlPath, RawQuery};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::agent::Context;
use crate::container::ContainerState;
use session::{ExecSpec, Session};

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
    /// Parses the query.
    pub fn parse(query: &str) -> Result<ExecOptions, StreamError> {
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
        if options.command.is_empty() {
            return Err(StreamError::BadRequest("you must specify a command".into()));
        }
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
    match crate::container::state(&dir.join(attempt.to_string())) {
        ContainerState::Running(_) => Ok(crate::pod::container_id(&uid, container, attempt)),
        _ => Err(StreamError::NotRunning(container.to_owned())),
    }
}

/// `GET|POST /exec/{namespace}/{pod}/{container}?command=…`, upgraded to a stream.
pub async fn exec(
    ctx: Arc<Context>,
    UrlPath((namespace, pod, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let options = match ExecOptions::parse(query.as_deref().unwrap_or("")) {
        Ok(options) => options,
        Err(e) => return e.into_response(),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => {
            let asked = headers
                .get(header::UPGRADE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let message = if asked.is_empty() {
                "exec needs an upgraded connection (WebSocket)".to_owned()
            } else {
                format!("unsupported upgrade {asked:?}: {rejection}")
            };
            return StreamError::BadRequest(message).into_response();
        }
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
    upgrade
        .protocols(websocket::PROTOCOLS)
        .on_upgrade(move |socket| async move {
            let protocol = socket
                .protocol()
                .and_then(|p| p.to_str().ok())
                .unwrap_or("channel.k8s.io")
                .to_owned();
            // Started once the client is there, so a failed upgrade leaves nothing behind.
            match Session::start(&spec).await {
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
