//! Store benchmark: the SQLite backend beside a real single-node etcd and the disk's fsync
//! limit, measured in one run on the same disk, reported as ratios.
//!
//! ```sh
//! cargo bench -p orquestra-store --bench store -- [--dir DIR] [--sequential N]
//!     [--writers W] [--concurrent N] [--value-bytes B]
//! ```
//!
//! What it measures:
//! - **fsync limit**: a loop of small writes each followed by `fdatasync`, appending to a file
//!   and overwriting one block; the faster of the two is the anchor.
//! - **sequential durable writes/s**: one writer, each `create` awaited before the next;
//!   once with nobody watching, once with one watcher on the written prefix.
//! - **concurrent writes/s**: `W` writers (64) creating keys as fast as acknowledged.
//! - **watch delivery latency**: one watcher on the written prefix during the watched runs; for each
//!   write, the time from the writer seeing its acknowledgement to the watcher receiving the
//!   event (0 when the watcher was first).

#![allow(clippy::unwrap_used)] // a benchmark fails loudly

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use hdrhistogram::Histogram;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};
use orquestra_store::testing::EtcdProcess;
use orquestra_store::{Revision, Store, WatchEvent};

struct Config {
    dir: PathBuf,
    sequential: usize,
    writers: usize,
    concurrent: usize,
    value_bytes: usize,
}

fn config() -> Config {
    let mut c = Config {
        dir: std::env::temp_dir(),
        sequential: 1000,
        writers: 64,
        concurrent: 20_000,
        value_bytes: 1024,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = || args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--dir" => c.dir = value().into(),
            "--sequential" => c.sequential = value().parse().unwrap(),
            "--writers" => c.writers = value().parse().unwrap(),
            "--concurrent" => c.concurrent = value().parse().unwrap(),
            "--value-bytes" => c.value_bytes = value().parse().unwrap(),
            // `cargo bench` passes `--bench`; ignore it and anything else unknown.
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    c
}

/// Rate and latency of one measured run.
#[derive(Clone, Debug)]
struct Run {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap()
}

/// Small durable writes with `fdatasync`, appending (`append = true`) or overwriting one block.
fn fsync_limit(dir: &Path, n: usize, append: bool) -> Run {
    let samples = orquestra_store::testing::fsync_samples(dir, n, append).unwrap();
    let mut h = histogram();
    for sample in &samples {
        h.record(sample.as_micros() as u64).unwrap();
    }
    let total: Duration = samples.iter().sum();
    Run {
        per_second: n as f64 / total.as_secs_f64(),
        p50_ms: ms(&h, 0.5),
        p99_ms: ms(&h, 0.99),
    }
}

/// Records when each revision was acknowledged to its writer.
type Acks = Arc<Mutex<HashMap<Revision, Instant>>>;

/// Starts a watcher on `prefix` that records when each revision arrived; returns once the
/// watch is established. The handle yields the arrival times after `expect` events.
async fn start_watcher(
    store: &Arc<dyn Store>,
    prefix: &str,
    expect: usize,
) -> tokio::task::JoinHandle<HashMap<Revision, Instant>> {
    let after = store.current_revision().await.unwrap();
    let mut watch = store.watch(prefix, after).await.unwrap();
    tokio::spawn(async move {
        let mut seen = HashMap::with_capacity(expect);
        while seen.len() < expect {
            match tokio::time::timeout(Duration::from_secs(60), watch.next()).await {
                Ok(Some(Ok(WatchEvent::Change(event)))) => {
                    seen.insert(event.revision(), Instant::now());
                }
                Ok(Some(Ok(WatchEvent::Progress(_)))) => {}
                other => panic!("watch failed: {other:?}"),
            }
        }
        seen
    })
}

fn watch_latency(acks: &Acks, seen: &HashMap<Revision, Instant>) -> Run {
    let acks = acks.lock().unwrap();
    let mut h = histogram();
    for (revision, acked) in acks.iter() {
        let arrived = seen[revision];
        let micros = arrived.saturating_duration_since(*acked).as_micros() as u64;
        h.record(micros.max(1)).unwrap();
    }
    Run {
        per_second: 0.0,
        p50_ms: ms(&h, 0.5),
        p99_ms: ms(&h, 0.99),
    }
}

/// `writers` tasks create `total` keys under `prefix` between them, with one watcher on the
/// prefix or none. Returns the write rate and latency, and the watch delivery latency.
async fn load(
    store: &Arc<dyn Store>,
    prefix: &str,
    writers: usize,
    total: usize,
    value: Bytes,
    watched: bool,
) -> (Run, Option<Run>) {
    let watcher = if watched {
        Some(start_watcher(store, prefix, total).await)
    } else {
        None
    };
    let acks: Acks = Arc::new(Mutex::new(HashMap::with_capacity(total)));
    let latencies = Arc::new(Mutex::new(histogram()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let store = Arc::clone(store);
            let (acks, latencies, value) =
                (Arc::clone(&acks), Arc::clone(&latencies), value.clone());
            let prefix = prefix.to_owned();
            let count = total / writers + usize::from(w < total % writers);
            tokio::spawn(async move {
                let mut local = histogram();
                for i in 0..count {
                    let t = Instant::now();
                    let kv = store
                        .create(&format!("{prefix}{w}/{i}"), value.clone())
                        .await
                        .unwrap();
                    let acked = Instant::now();
                    local.record((acked - t).as_micros() as u64).unwrap();
                    acks.lock().unwrap().insert(kv.mod_revision, acked);
                }
                latencies.lock().unwrap().add(&local).unwrap();
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let elapsed = started.elapsed();
    let watch = match watcher {
        Some(watcher) => Some(watch_latency(&acks, &watcher.await.unwrap())),
        None => None,
    };
    let h = latencies.lock().unwrap();
    let writes = Run {
        per_second: total as f64 / elapsed.as_secs_f64(),
        p50_ms: ms(&h, 0.5),
        p99_ms: ms(&h, 0.99),
    };
    (writes, watch)
}

struct Backend {
    sequential: Run,
    sequential_watched: Run,
    sequential_watch: Run,
    concurrent: Run,
    concurrent_watch: Run,
}

async fn measure(store: Arc<dyn Store>, c: &Config) -> Backend {
    let value = Bytes::from(vec![b'v'; c.value_bytes]);
    // Warm up connections and caches, and bring the logs to their steady size: SQLite's WAL
    // grows to its checkpoint size once (appending, which makes each fdatasync write the
    // inode too) and is reused from then on; etcd preallocates its WAL segments up front.
    load(&store, "/warmup/", 8, 6000, value.clone(), false).await;
    let (sequential, _) = load(&store, "/seq/", 1, c.sequential, value.clone(), false).await;
    let (sequential_watched, sequential_watch) =
        load(&store, "/seqw/", 1, c.sequential, value.clone(), true).await;
    let (concurrent, concurrent_watch) =
        load(&store, "/conc/", c.writers, c.concurrent, value, true).await;
    Backend {
        sequential,
        sequential_watched,
        sequential_watch: sequential_watch.unwrap(),
        concurrent,
        concurrent_watch: concurrent_watch.unwrap(),
    }
}

fn main() {
    let c = config();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let etcd_version = std::process::Command::new("etcd")
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_owned())
            .unwrap_or_default();
        println!("# orquestra-store benchmark");
        println!(
            "dir {} | value {} B | sequential {} writes | concurrent {} writes by {} writers | {}",
            c.dir.display(),
            c.value_bytes,
            c.sequential,
            c.concurrent,
            c.writers,
            etcd_version
        );

        let append = fsync_limit(&c.dir, 500, true);
        let overwrite = fsync_limit(&c.dir, 500, false);
        let limit = if append.per_second > overwrite.per_second { &append } else { &overwrite };

        let sqlite_dir = tempfile::tempdir_in(&c.dir).unwrap();
        let sqlite = Arc::new(
            SqliteStore::open(&sqlite_dir.path().join("state.db"), SqliteOptions::default())
                .unwrap(),
        );
        let before = sqlite.stats();
        let sqlite_result = measure(sqlite.clone() as Arc<dyn Store>, &c).await;
        let after = sqlite.stats();
        drop(sqlite);

        // etcd keeps its data in a temporary directory on the same disk ($TMPDIR = --dir).
        // SAFETY: single-threaded at this point apart from the runtime's idle workers, which
        // do not read the environment.
        unsafe { std::env::set_var("TMPDIR", &c.dir) };
        let etcd = EtcdProcess::start().await.unwrap();
        let etcd_store: Arc<dyn Store> = Arc::new(etcd.store().await.unwrap());
        let etcd_result = measure(etcd_store, &c).await;
        drop(etcd);

        let s = &sqlite_result;
        let e = &etcd_result;
        println!();
        println!("| measurement | SQLite backend | etcd | anchor | ratio |");
        println!("| --- | ---: | ---: | ---: | --- |");
        println!(
            "| fsync limit (512 B write + fdatasync), ops/s | | | {:.0} (append {:.0}, overwrite {:.0}; p50 {:.2} ms, p99 {:.2} ms) | |",
            limit.per_second, append.per_second, overwrite.per_second, limit.p50_ms, limit.p99_ms
        );
        println!(
            "| sequential durable writes/s (1 writer) | {:.0} | {:.0} | fsync limit {:.0} | SQLite = {:.2} × fsync limit; etcd = {:.2} × fsync limit |",
            s.sequential.per_second,
            e.sequential.per_second,
            limit.per_second,
            s.sequential.per_second / limit.per_second,
            e.sequential.per_second / limit.per_second
        );
        println!(
            "| sequential write latency p50 / p99, ms | {:.2} / {:.2} | {:.2} / {:.2} | fsync p50 {:.2} | |",
            s.sequential.p50_ms,
            s.sequential.p99_ms,
            e.sequential.p50_ms,
            e.sequential.p99_ms,
            limit.p50_ms
        );
        println!(
            "| sequential durable writes/s, one watcher on the prefix | {:.0} | {:.0} | fsync limit {:.0} | SQLite = {:.2} × fsync limit; etcd = {:.2} × fsync limit |",
            s.sequential_watched.per_second,
            e.sequential_watched.per_second,
            limit.per_second,
            s.sequential_watched.per_second / limit.per_second,
            e.sequential_watched.per_second / limit.per_second
        );
        println!(
            "| concurrent writes/s ({} writers) | {:.0} | {:.0} | etcd {:.0} | SQLite = {:.2} × etcd |",
            c.writers,
            s.concurrent.per_second,
            e.concurrent.per_second,
            e.concurrent.per_second,
            s.concurrent.per_second / e.concurrent.per_second
        );
        println!(
            "| concurrent write latency p50 / p99, ms | {:.2} / {:.2} | {:.2} / {:.2} | | |",
            s.concurrent.p50_ms, s.concurrent.p99_ms, e.concurrent.p50_ms, e.concurrent.p99_ms
        );
        println!(
            "| watch delivery p50 / p99, ms (sequential load) | {:.3} / {:.3} | {:.3} / {:.3} | | |",
            s.sequential_watch.p50_ms,
            s.sequential_watch.p99_ms,
            e.sequential_watch.p50_ms,
            e.sequential_watch.p99_ms
        );
        println!(
            "| watch delivery p50 / p99, ms ({} writers) | {:.3} / {:.3} | {:.3} / {:.3} | | |",
            c.writers,
            s.concurrent_watch.p50_ms,
            s.concurrent_watch.p99_ms,
            e.concurrent_watch.p50_ms,
            e.concurrent_watch.p99_ms
        );
        let commits = after.commits - before.commits;
        let writes = after.writes - before.writes;
        println!(
            "| SQLite writes per commit (group commit), whole run | {:.1} | | | |",
            writes as f64 / commits.max(1) as f64
        );
        println!();
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        let seq_ratio = s.sequential.per_second / limit.per_second;
        let conc_ratio = s.concurrent.per_second / e.concurrent.per_second;
        let watch_p99 = s.sequential_watch.p99_ms.max(s.concurrent_watch.p99_ms);
        println!("targets:");
        println!(
            "- sequential >= 0.90 x fsync limit: {seq_ratio:.2} -> {}",
            verdict(seq_ratio >= 0.9)
        );
        println!(
            "- concurrent >= 3 x etcd concurrent: {conc_ratio:.2} -> {}",
            verdict(conc_ratio >= 3.0)
        );
        println!(
            "- watch delivery p99 <= 5 ms: {watch_p99:.3} ms -> {}",
            verdict(watch_p99 <= 5.0)
        );
    });
}
