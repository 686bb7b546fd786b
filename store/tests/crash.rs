//! Durability under `kill -9`: a child process writes as fast as it can from many tasks and
//! prints every revision the store acknowledged; the parent SIGKILLs it mid-load, reopens the
//! database and checks that every acknowledged write is there. Three rounds on one file, so
//! recovery of a crashed WAL is exercised too.

#![allow(clippy::unwrap_used)] // tests state their expectations with unwrap

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use orquestra_store::Store;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};

/// Set in the child's environment to the database path.
const CHILD_ENV: &str = "ORQ_STORE_CRASH_CHILD";
const WRITERS: usize = 16;

/// The child: never run directly (ignored), only through `acknowledged_writes_survive_sigkill`.
#[test]
#[ignore = "child process of acknowledged_writes_survive_sigkill"]
fn crash_child() {
    let path = std::env::var(CHILD_ENV).expect("run only as the crash test's child");
    let round = std::env::var("ORQ_STORE_CRASH_ROUND").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SqliteStore::open(path.as_ref(), SqliteOptions::default()).unwrap());
        println!("ready");
        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = Arc::clone(&store);
                let round = round.clone();
                tokio::spawn(async move {
                    for n in 0.. {
                        let key = format!("/crash/{round}/{w}/{n}");
                        let value = Bytes::from(format!("{key}:{}", "x".repeat(300)));
                        let kv = store.create(&key, value).await.unwrap();
                        // One line per acknowledged write; println! holds the stdout lock
                        // for the whole line.
                        println!("ack {key} {}", kv.mod_revision);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let mut acknowledged: Vec<(String, i64)> = Vec::new();

    for round in 0..3 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .env("ORQ_STORE_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (lines_tx, lines) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });

        // Let it write for a while, then kill it in the middle of the load.
        let started = Instant::now();
        let mut acks_this_round = 0;
        let mut parse = |line: String, acks: &mut usize| {
            if let Some(rest) = line.strip_prefix("ack ") {
                let (key, revision) = rest.rsplit_once(' ').expect("ack KEY REV");
                acknowledged.push((key.to_owned(), revision.parse().unwrap()));
                *acks += 1;
            }
        };
        while acks_this_round < 1500 && started.elapsed() < Duration::from_secs(20) {
            if let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
                parse(line, &mut acks_this_round);
            }
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the writer must still be running when killed"
        );
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        assert!(!status.success());
        // Lines already written to the pipe were acknowledged before the kill.
        reader.join().unwrap();
        while let Ok(line) = lines.try_recv() {
            parse(line, &mut acks_this_round);
        }
        assert!(
            acks_this_round >= 1500,
            "round {round}: only {acks_this_round} acks"
        );
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = SqliteStore::open(&path, SqliteOptions::default()).unwrap();
        let current = store.current_revision().await.unwrap();
        let mut revisions = std::collections::HashSet::new();
        for (key, revision) in &acknowledged {
            let (_, kv) = store.get(key, None).await.unwrap();
            let kv = kv.unwrap_or_else(|| panic!("acknowledged {key} at {revision} is lost"));
            assert_eq!(kv.mod_revision, *revision, "{key}");
            assert!(kv.value.starts_with(format!("{key}:").as_bytes()));
            assert!(*revision <= current);
            assert!(revisions.insert(*revision), "revision {revision} acknowledged twice");
        }
        eprintln!(
            "{} acknowledged writes over 3 SIGKILLed rounds all present (store at revision {current})",
            acknowledged.len()
        );
    });
}
