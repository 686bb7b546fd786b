//! Lifecycle hooks: `postStart` right after a container starts, `preStop` before it is
//! told to stop — `exec` (through the shim, as exec probes), `httpGet` and `sleep`, as the
//! kubelet runs them.
//!
//! A `postStart` that fails kills the container (it restarts as its policy says); a
//! `preStop` that fails is reported and the stop goes on. Either is bounded: `preStop` by
//! what is left of the termination grace period, `postStart` by [`POST_START_LIMIT`].

use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, LifecycleHandler};

use crate::probe::{self, Target};

/// The longest a `postStart` hook may hold up the pod's other work.
pub const POST_START_LIMIT: Duration = Duration::from_secs(120);

/// Which hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// After the container starts.
    PostStart,
    /// Before the container is stopped.
    PreStop,
}

impl Hook {
    /// The container's handler for this hook, if it has one.
    pub fn of(self, c: &Container) -> Option<&LifecycleHandler> {
        let lifecycle = c.lifecycle.as_ref()?;
        match self {
            Hook::PostStart => lifecycle.post_start.as_ref(),
            Hook::PreStop => lifecycle.pre_stop.as_ref(),
        }
    }

    /// The event reason of a failure (`FailedPostStartHook`, `FailedPreStopHook`).
    pub fn failed_reason(self) -> &'static str {
        match self {
            Hook::PostStart => "FailedPostStartHook",
            Hook::PreStop => "FailedPreStopHook",
        }
    }
}

/// Runs `handler` for `container` within `limit`; `Err` says why it failed.
pub async fn run(
    handler: &LifecycleHandler,
    container: &Container,
    target: &Target,
    limit: Duration,
) -> Result<(), String> {
    let attempt = async {
        if let Some(exec) = &handler.exec {
            let command = exec.command.clone().unwrap_or_default();
            probe::exec_probe(command, target, limit).await
        } else if let Some(http) = &handler.http_get {
            // Any answer will do: the kubelet only fails a hook it could not deliver.
            probe::http_get_action(http, container, target)
                .await
                .map(|_| ())
        } else if let Some(sleep) = &handler.sleep {
            let seconds = u64::try_from(sleep.seconds).unwrap_or(0);
            tokio::time::sleep(Duration::from_secs(seconds)).await;
            Ok(())
        } else if handler.tcp_socket.is_some() {
            Err("tcpSocket is not supported as a lifecycle handler".into())
        } else {
            Err("the lifecycle hook has no handler".into())
        }
    };
    match tokio::time::timeout(limit, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}s", limit.as_secs())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(json: serde_json::Value) -> Container {
        serde_json::from_value(json).unwrap()
    }

    fn target() -> Target {
        Target {
            pod_ip: "127.0.0.1".into(),
            shim_exec: Vec::new(),
            state_root: "/nonexistent".into(),
            container_id: "c".into(),
        }
    }

    #[tokio::test]
    async fn sleep_http_and_bounds() {
        let c = container(serde_json::json!({
            "name": "c",
            "lifecycle": {"preStop": {"sleep": {"seconds": 1}}, "postStart": {"sleep": {"seconds": 5}}},
        }));
        let started = std::time::Instant::now();
        let pre_stop = Hook::PreStop.of(&c).unwrap();
        run(pre_stop, &c, &target(), Duration::from_secs(3))
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_secs(1));
        // Bounded by what is left of the grace period.
        let post_start = Hook::PostStart.of(&c).unwrap();
        let failed = run(post_start, &c, &target(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(failed.contains("timed out"), "{failed}");

        // httpGet: any answer succeeds; nothing listening fails.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 500 X\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let c = container(serde_json::json!({
            "name": "c",
            "lifecycle": {"postStart": {"httpGet": {"port": port, "path": "/hook"}}},
        }));
        let handler = Hook::PostStart.of(&c).unwrap();
        run(handler, &c, &target(), Duration::from_secs(3))
            .await
            .unwrap();
        assert!(
            run(handler, &c, &target(), Duration::from_secs(3))
                .await
                .is_err()
        );
        assert!(Hook::PreStop.of(&c).is_none());
    }
}
