//! Retention: compacts a store's history on a schedule, whichever backend it is.
//!
//! The policy keeps at least the last `keep_revisions` revisions **and** everything written
//! in the last `keep_for`; history older than both is compacted away every `interval`. The
//! time bound is tracked by sampling the current revision at each pass, so it needs no
//! timestamps in the store.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::kv::Revision;
use crate::store::Store;

/// What history to keep.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Always keep at least this many of the latest revisions.
    pub keep_revisions: i64,
    /// Always keep every revision written within this long.
    pub keep_for: Duration,
    /// How often to compact.
    pub interval: Duration,
}

impl Default for CompactionPolicy {
    /// Keep 5 minutes, as kube-apiserver over etcd does, and no revision count; compact every
    /// minute, so a continue token or watch resume point expires 5–6 minutes after it was
    /// made however quiet the cluster (the conformance suite waits at most 10 minutes for
    /// the 410; compacting every 5 minutes made that 5–10, and with kine's 1,000 kept
    /// revisions a quiet cluster never expired one). Watchers that lag resume from the API
    /// server's watch cache window, not from the store.
    fn default() -> Self {
        CompactionPolicy {
            keep_revisions: 0,
            keep_for: Duration::from_secs(300),
            interval: Duration::from_secs(60),
        }
    }
}

/// Applies a [`CompactionPolicy`] to a store.
#[derive(Debug)]
pub struct Compactor {
    store: Arc<dyn Store>,
    policy: CompactionPolicy,
    /// `(when, current revision then)`, oldest first.
    samples: VecDeque<(Instant, Revision)>,
    compacted: Revision,
}

impl Compactor {
    /// A compactor for `store`; nothing happens until [`Compactor::run`] or
    /// [`Compactor::run_once`].
    pub fn new(store: Arc<dyn Store>, policy: CompactionPolicy) -> Compactor {
        Compactor {
            store,
            policy,
            samples: VecDeque::new(),
            compacted: 0,
        }
    }

    /// Records that the store stood at `current` at `now` and returns the revision history
    /// may be compacted to, if that is newer than the last compaction.
    pub fn target(&mut self, now: Instant, current: Revision) -> Option<Revision> {
        self.samples.push_back((now, current));
        // The newest sample at least `keep_for` old: everything after it is recent.
        let horizon = now.checked_sub(self.policy.keep_for);
        let mut by_time = None;
        if let Some(horizon) = horizon {
            while let Some(&(when, revision)) = self.samples.front() {
                if when > horizon {
                    break;
                }
                by_time = Some(revision);
                // Keep the newest old-enough sample for the next pass.
                if self
                    .samples
                    .get(1)
                    .is_some_and(|(next, _)| *next <= horizon)
                {
                    self.samples.pop_front();
                } else {
                    break;
                }
            }
        }
        let by_count = current - self.policy.keep_revisions;
        let target = by_time?.min(by_count);
        (target > self.compacted).then_some(target)
    }

    /// One pass: compacts if the policy allows. Returns the revision compacted to.
    pub async fn run_once(&mut self) -> Result<Option<Revision>> {
        let current = self.store.current_revision().await?;
        let Some(target) = self.target(Instant::now(), current) else {
            return Ok(None);
        };
        self.store.compact(target).await?;
        self.compacted = target;
        tracing::info!(revision = target, "compacted store history");
        Ok(Some(target))
    }

    /// Compacts every `interval` until `shutdown` completes. Failures are logged and retried
    /// at the next pass.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut ticks = tokio::time::interval(self.policy.interval);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = ticks.tick() => {
                    if let Err(error) = self.run_once().await {
                        tracing::warn!(%error, "compaction failed");
                    }
                }
                () = &mut shutdown => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{SqliteOptions, SqliteStore};

    fn compactor(keep_revisions: i64, keep_for: Duration) -> (Compactor, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(&dir.path().join("state.db"), SqliteOptions::default()).unwrap();
        let policy = CompactionPolicy {
            keep_revisions,
            keep_for,
            interval: Duration::from_secs(60),
        };
        (Compactor::new(Arc::new(store), policy), dir)
    }

    #[tokio::test]
    async fn keeps_the_time_window() {
        let (mut c, _dir) = compactor(0, Duration::from_secs(300));
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        // Nothing is old enough during the first five minutes.
        assert_eq!(c.target(at(0), 100), None);
        assert_eq!(c.target(at(60), 200), None);
        assert_eq!(c.target(at(299), 300), None);
        // At 5:00 the sample from 0:00 is old enough: compact to what was current then.
        assert_eq!(c.target(at(300), 400), Some(100));
        // At 6:30 the newest sample at least 5 minutes old is the one from 1:00.
        assert_eq!(c.target(at(390), 500), Some(200));
    }

    #[tokio::test]
    async fn keeps_the_revision_window() {
        let (mut c, _dir) = compactor(1000, Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(c.target(t0, 5000), None);
        // Time allows 5000, but only revisions before 9000 - 1000 may go.
        assert_eq!(c.target(t0 + Duration::from_secs(61), 5500), Some(4500));
    }

    #[tokio::test]
    async fn never_goes_backwards() {
        let (mut c, _dir) = compactor(0, Duration::ZERO);
        let t0 = Instant::now();
        assert_eq!(c.target(t0, 10), Some(10));
        c.compacted = 10;
        assert_eq!(c.target(t0, 10), None);
    }
}
