//! What of the agent's own machinery works right now.
//!
//! The parts that program the node (its pod network, cluster DNS, the service proxy, the
//! routes to other nodes' pods) can fail for reasons outside the agent — a port another
//! process holds, a missing kernel module — and fix themselves when the reason goes. Each
//! part reports here when it fails and when it works again, and keeps retrying with
//! [`Backoff`]; the [`Heartbeat`](crate::node::Heartbeat) turns the current problems into
//! the Node's conditions (`Ready=False`, `NetworkUnavailable=True`, with the cause in the
//! message) at once, and the log says each change once, in plain words, rather than every
//! retry.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

/// A part of the agent that can fail on its own and recover.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    /// The node's bridge, its address and the pods' masquerading.
    NodeNetwork,
    /// The cluster DNS server on the bridge's address.
    ClusterDns,
    /// The service proxy's nftables rules.
    ServiceProxy,
    /// The routes to other nodes' pod CIDRs.
    Routes,
    /// The network policies' nftables rules (and bridge netfilter, which they need).
    NetworkPolicy,
}

impl fmt::Display for Part {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Part::NodeNetwork => "node network",
            Part::ClusterDns => "cluster DNS",
            Part::ServiceProxy => "service proxy",
            Part::Routes => "routes to other nodes' pods",
            Part::NetworkPolicy => "network policy enforcement",
        })
    }
}

/// The parts failing now, each with its latest error.
pub type Problems = BTreeMap<Part, String>;

/// Where the parts report; cheap to clone, shared by the agent's tasks and its heartbeat.
#[derive(Clone, Debug)]
pub struct Health {
    problems: Arc<watch::Sender<Problems>>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            problems: Arc::new(watch::channel(Problems::new()).0),
        }
    }
}

impl Health {
    /// All parts healthy.
    pub fn new() -> Health {
        Health::default()
    }

    /// `part` failed with `error` (it will be retried). Logged when the part was healthy or
    /// the error is new.
    pub fn failed(&self, part: Part, error: &dyn fmt::Display) {
        let message = error.to_string();
        self.problems.send_if_modified(|problems| {
            if problems.get(&part) == Some(&message) {
                return false;
            }
            tracing::error!(%part, error = %message, "the node is not ready: {part}: {message} (retrying until it works)");
            problems.insert(part, message.clone());
            true
        });
    }

    /// `part` works (again). Logged when it had failed.
    pub fn recovered(&self, part: Part) {
        self.problems.send_if_modified(|problems| {
            let was = problems.remove(&part).is_some();
            if was {
                tracing::info!(%part, "{part} works again");
            }
            was
        });
    }

    /// The problems now.
    pub fn problems(&self) -> Problems {
        self.problems.borrow().clone()
    }

    /// A receiver that sees every change of the problems.
    pub fn subscribe(&self) -> watch::Receiver<Problems> {
        self.problems.subscribe()
    }
}

/// Retry delays that double from `first` up to `max`, reset on success.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays `first`, `2 × first`, … up to `max`.
    pub fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// After a success: start again from `first`.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

impl Default for Backoff {
    /// 1 s doubling to 10 s: quick to notice a freed port, cheap while it stays taken.
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(10))
    }
}

/// Runs `attempt` until it succeeds, reporting each failure and the recovery as `part`.
pub async fn retry<T, E: fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    health: &Health,
    part: Part,
    mut attempt: impl FnMut() -> F,
) -> T {
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Ok(value) => {
                health.recovered(part);
                return value;
            }
            Err(error) => {
                health.failed(part, &error);
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_change_once_per_news() {
        let health = Health::new();
        let mut rx = health.subscribe();
        health.failed(Part::ClusterDns, &"10.244.0.1:53 in use by another process");
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        // The same error again (the next retry) is no news.
        health.failed(Part::ClusterDns, &"10.244.0.1:53 in use by another process");
        assert!(!rx.has_changed().unwrap());
        health.failed(Part::Routes, &"ip route: permission denied");
        assert_eq!(health.problems().len(), 2);
        health.recovered(Part::ClusterDns);
        health.recovered(Part::Routes);
        assert!(health.problems().is_empty());
        rx.mark_unchanged();
        health.recovered(Part::Routes);
        assert!(!rx.has_changed().unwrap());
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let delays: Vec<u64> = (0..5).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_reports_until_it_works() {
        let health = Health::new();
        let mut left = 3;
        let mut rx = health.subscribe();
        let value = retry(&health, Part::NodeNetwork, || {
            left -= 1;
            let result = if left > 0 { Err("bridge busy") } else { Ok(7) };
            async move { result }
        })
        .await;
        assert_eq!(value, 7);
        assert!(health.problems().is_empty());
        assert!(rx.has_changed().unwrap(), "the failure was reported");
        rx.mark_unchanged();
    }
}
