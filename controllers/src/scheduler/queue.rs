//! Which pending pod goes when (kube-scheduler's scheduling queue, on the controller
//! framework's work queue): gated pods (`spec.schedulingGates`) wait, marked
//! `PodScheduled=False/SchedulingGated`, until their gates are removed; a pod defers to
//! pending pods of higher priority not yet tried (briefly: a pod never starves behind one
//! stuck elsewhere); a pod that fits nowhere is marked `PodScheduled=False/Unschedulable`.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// How long a pod defers to higher-priority pending pods at most.
pub const DEFER_AT_MOST: Duration = Duration::from_secs(2);

/// The reason a gated pod is not scheduled.
pub const GATED: &str = "SchedulingGated";

/// Whether `pod` has scheduling gates.
pub fn gated(pod: &Pod) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.scheduling_gates.as_ref())
        .is_some_and(|g| !g.is_empty())
}

/// Whether a pending pod of priority `priority` (first deferred `since`, if before) should
/// let the higher-priority ones in `pending` (highest first) go first: those not `settled`
/// (tried and found unschedulable, or already placed).
pub fn defer(
    pending: &[(i32, String)],
    priority: i32,
    since: Option<Instant>,
    settled: impl Fn(&str) -> bool,
) -> bool {
    if since.is_some_and(|s| s.elapsed() >= DEFER_AT_MOST) {
        return false;
    }
    pending
        .iter()
        .take_while(|(p, _)| *p > priority)
        .any(|(_, uid)| !settled(uid))
}

/// Sets the pod's `PodScheduled` condition to False with `reason` and `message`, unless it
/// says so already.
pub async fn mark_unscheduled(
    client: &Client,
    pod: &Pod,
    reason: &str,
    message: &str,
) -> Result<(), kube::Error> {
    let current = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"));
    if current.is_some_and(|c| {
        c.status == "False"
            && c.reason.as_deref() == Some(reason)
            && c.message.as_deref() == Some(message)
    }) {
        return Ok(());
    }
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let patch = json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": reason, "message": message,
        "lastTransitionTime": jiff::Timestamp::now().to_string(), "lastProbeTime": null,
    }]}});
    match api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn higher_priority_goes_first_for_a_while() {
        let pending = vec![(100, "high".to_owned()), (0, "low".to_owned())];
        assert!(defer(&pending, 0, None, |_| false));
        assert!(!defer(&pending, 0, None, |uid| uid == "high"));
        assert!(!defer(&pending, 100, None, |_| false));
        let long_ago = Instant::now().checked_sub(DEFER_AT_MOST);
        assert!(!defer(&pending, 0, long_ago, |_| false));
    }
}
