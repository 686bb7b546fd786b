//! Pod events as core/v1 `Event`s — what `kubectl describe pod` and `kubectl get events`
//! read — from the agent as `kubelet` on its node, with the kubelet's aggregation: a
//! repeated event (same pod, reason and message) bumps `count` and `lastTimestamp` instead
//! of adding another object.

use std::collections::HashMap;
use std::sync::Mutex;

use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

/// `Normal` or `Warning`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// Something expected happened.
    Normal,
    /// Something went wrong.
    Warning,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An event's identity for aggregation: pod UID, reason, message.
type EventKey = (String, String, String);

/// Publishes pods' events.
pub struct Events {
    client: Client,
    node: String,
    /// What was published → (event name, count).
    seen: Mutex<HashMap<EventKey, (String, i32)>>,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Events {
    /// Events from the agent of `node`.
    pub fn new(client: Client, node: impl Into<String>) -> Self {
        Events {
            client,
            node: node.into(),
            seen: Mutex::default(),
        }
    }

    /// Records `reason`/`message` about `pod`; failures are logged, never returned (an
    /// event is not worth failing a sync over).
    pub async fn publish(&self, pod: &Pod, type_: EventType, reason: &str, message: &str) {
        let namespace = pod.namespace().unwrap_or_default();
        let uid = pod.uid().unwrap_or_default();
        let message: String = message.chars().take(1024).collect();
        let key = (uid.clone(), reason.to_owned(), message.clone());
        let now = crate::shim::now_rfc3339();
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let repeat = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some((name, count)) = repeat {
            let patch = json!({"count": count + 1, "lastTimestamp": now});
            if api
                .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .is_ok()
            {
                self.remember(key, name, count + 1);
                return;
            }
        }
        let reference = pod.object_ref(&());
        let name = format!(
            "{}.{:x}",
            pod.name_any(),
            jiff::Timestamp::now().as_nanosecond()
        );
        let event: Event = match serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": reference,
            "reason": reason,
            "message": message,
            "type": type_.as_str(),
            "source": {"component": "kubelet", "host": self.node},
            "reportingComponent": "kubelet",
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        })) {
            Ok(event) => event,
            Err(e) => {
                tracing::debug!(error = %e, "building an event");
                return;
            }
        };
        match api.create(&PostParams::default(), &event).await {
            Ok(_) => self.remember(key, name, 1),
            Err(e) => tracing::debug!(error = %e, "publishing an event failed"),
        }
    }

    fn remember(&self, key: EventKey, name: String, count: i32) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() > 10_000 {
            seen.clear();
        }
        seen.insert(key, (name, count));
    }

    /// Forgets the events of a pod that is gone.
    pub fn forget(&self, uid: &str) {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(u, _, _), _| u != uid);
    }
}
