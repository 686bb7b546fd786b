//! In-process watchers. Each watch is a task that first replays history from the database,
//! then follows the writer's broadcast of committed batches. It subscribes before reading
//! history, so no change falls between the two; changes seen twice are skipped by revision.
//! A watcher that falls behind the broadcast buffer goes back to the database, so a slow
//! consumer costs memory nowhere but in its own bounded channel.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Shared, read, read_with, writer::Committed};
use crate::error::{Error, Result};
use crate::kv::{Revision, WatchEvent};
use crate::store::WatchStream;

/// Changes read from the database per query while catching up.
const HISTORY_CHUNK: usize = 1000;
/// Items buffered between a watcher task and its consumer.
const STREAM_BUFFER: usize = 256;

/// Starts a watcher of changes under `prefix` after revision `after`.
pub(super) fn start(shared: Arc<Shared>, prefix: String, after: Revision) -> Result<WatchStream> {
    let events = shared
        .events
        .lock()
        .ok()
        .and_then(|sender| sender.as_ref().map(|s| s.subscribe()))
        .ok_or(Error::Closed)?;
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let watcher = Watcher {
        shared,
        prefix,
        sent: after,
        last_sent_at: Instant::now(),
        out: tx,
    };
    tokio::spawn(watcher.run(events));
    Ok(Box::pin(ReceiverStream::new(rx)))
}

struct Watcher {
    shared: Arc<Shared>,
    prefix: String,
    /// Everything up to this revision has been delivered (or did not match).
    sent: Revision,
    last_sent_at: Instant,
    out: mpsc::Sender<Result<WatchEvent>>,
}

/// Why a watcher stops.
enum Stop {
    /// The consumer dropped the stream.
    Gone,
    /// The watch cannot go on; tell the consumer.
    Failed(Error),
}

impl Watcher {
    async fn run(mut self, mut events: tokio::sync::broadcast::Receiver<Arc<Committed>>) {
        let stop: Result<(), Stop> = async {
            self.catch_up().await?;
            loop {
                let committed = tokio::select! {
                    received = events.recv() => received,
                    () = self.out.closed() => return Err(Stop::Gone),
                };
                match committed {
                    Ok(committed) => self.deliver(&committed).await?,
                    Err(RecvError::Lagged(_)) => self.catch_up().await?,
                    Err(RecvError::Closed) => return Err(Stop::Failed(Error::Closed)),
                }
            }
        }
        .await;
        if let Err(Stop::Failed(error)) = stop {
            let _ = self.out.send(Err(error)).await;
        }
    }

    /// Replays from the database every change after `sent` that has been committed so far.
    async fn catch_up(&mut self) -> Result<(), Stop> {
        loop {
            let (prefix, after) = (self.prefix.clone(), self.sent);
            let changes = read_with(Arc::clone(&self.shared), move |conn, path| {
                read::history(conn, path, &prefix, after, HISTORY_CHUNK)
            })
            .await
            .map_err(Stop::Failed)?;
            let done = changes.len() < HISTORY_CHUNK;
            for event in changes {
                self.send(WatchEvent::Change(event)).await?;
            }
            if done {
                return Ok(());
            }
        }
    }

    /// Passes on the matching changes of one committed batch.
    async fn deliver(&mut self, committed: &Committed) -> Result<(), Stop> {
        if committed.revision <= self.sent {
            return Ok(());
        }
        let mut matched = false;
        for event in &committed.events {
            if event.revision() > self.sent && event.kv.key.starts_with(&self.prefix) {
                matched = true;
                self.send(WatchEvent::Change(event.clone())).await?;
            }
        }
        if !matched && self.last_sent_at.elapsed() >= self.shared.options.progress_interval {
            self.send(WatchEvent::Progress(committed.revision)).await?;
        }
        self.sent = committed.revision;
        Ok(())
    }

    async fn send(&mut self, item: WatchEvent) -> Result<(), Stop> {
        self.sent = item.revision();
        self.last_sent_at = Instant::now();
        self.out.send(Ok(item)).await.map_err(|_| Stop::Gone)
    }
}
