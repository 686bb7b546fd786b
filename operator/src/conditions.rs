//! Status conditions as Kubernetes API conventions describe them: one entry per `type`, with
//! `status`, `reason`, `message`, `observedGeneration` and a `lastTransitionTime` that moves
//! only when the status does.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Sets the condition `type_` in `conditions`: added if missing, otherwise updated in place,
/// keeping `lastTransitionTime` unless the status changed. Returns whether anything changed
/// (so a reconciler can skip a status write that would change nothing).
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> bool {
    let status = if status { "True" } else { "False" }.to_owned();
    let message = message.into();
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(existing) => {
            let changed = existing.status != status
                || existing.reason != reason
                || existing.message != message
                || existing.observed_generation != observed_generation;
            if existing.status != status {
                existing.last_transition_time = Time(Timestamp::now());
            }
            existing.status = status;
            existing.reason = reason.to_owned();
            existing.message = message;
            existing.observed_generation = observed_generation;
            changed
        }
        None => {
            conditions.push(Condition {
                type_: type_.to_owned(),
                status,
                reason: reason.to_owned(),
                message,
                observed_generation,
                last_transition_time: Time(Timestamp::now()),
            });
            true
        }
    }
}

/// Whether the condition `type_` is `True`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_with_the_status() {
        let mut conditions = Vec::new();
        assert!(set(
            &mut conditions,
            "Ready",
            false,
            "Progressing",
            "starting",
            Some(1)
        ));
        let first = conditions[0].last_transition_time.clone();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(!set(
            &mut conditions,
            "Ready",
            false,
            "Progressing",
            "starting",
            Some(1)
        ));
        assert!(set(
            &mut conditions,
            "Ready",
            false,
            "Progressing",
            "still starting",
            Some(2)
        ));
        assert_eq!(conditions[0].last_transition_time, first);
        assert!(set(
            &mut conditions,
            "Ready",
            true,
            "Available",
            "",
            Some(2)
        ));
        assert_ne!(conditions[0].last_transition_time, first);
        assert!(is_true(&conditions, "Ready"));
        assert_eq!(conditions.len(), 1);
    }
}
