//! Controller framework benchmark (issue 4): reconciles per second for a trivial reconciler
//! over 10,000 objects read through the manager's shared cache, and the memory each cached
//! object costs.
//!
//! `cargo bench -p orquestra-operator --bench reconcile`
//!
//! The API server runs in-process (the test harness) with 10,000 ConfigMaps created first.
//! Reconciles/s is measured from the manager's start (initial list included) until every
//! object has been reconciled once, then for a second round triggered by touching every
//! object. Memory per cached object is the growth of live heap bytes (a counting allocator)
//! while the manager's cache fills, divided by the number of objects.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::{Controller, watcher};
use orquestra_operator::testing::TestApi;
use orquestra_operator::{Manager, Runner};

/// Live heap bytes.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: same layout, passed through.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: ptr came from System.alloc with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        // SAFETY: as for realloc on System.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const OBJECTS: usize = 10_000;

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let api = TestApi::start().await.expect("API server");
        let cms: Api<ConfigMap> = Api::namespaced(api.client(), "default");
        let created = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..32 {
            let cms = cms.clone();
            tasks.push(tokio::spawn(async move {
                for i in (worker..OBJECTS).step_by(32) {
                    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
                        "metadata": {"name": format!("cm-{i:05}"), "labels": {"bench": "yes"}},
                        "data": {"key": "value", "other": "x".repeat(200)},
                    }))
                    .expect("configmap");
                    cms.create(&PostParams::default(), &cm).await.expect("create");
                }
            }));
        }
        for task in tasks {
            task.await.expect("creator");
        }
        eprintln!("created {OBJECTS} ConfigMaps in {:?}", created.elapsed());

        let reconciled = Arc::new(AtomicUsize::new(0));
        let mut manager = Manager::new(api.client());
        let heap_before = LIVE.load(Ordering::Relaxed);
        let cache = manager.cache::<ConfigMap>(watcher::Config::default());
        let controller =
            Controller::for_shared_stream(cache.subscribe().expect("subscribe"), cache.store());
        manager.add(
            Runner::new("bench", controller),
            |_: Arc<ConfigMap>, n: Arc<AtomicUsize>| async move {
                n.fetch_add(1, Ordering::Relaxed);
                Ok::<_, Never>(Action::await_change())
            },
            Arc::clone(&reconciled),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("listener");
        let started = Instant::now();
        tokio::spawn(manager.run_on(listener, std::future::pending()));
        while reconciled.load(Ordering::Relaxed) < OBJECTS {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let first_round = started.elapsed();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cached = cache.store().state().len();
        let heap_after = LIVE.load(Ordering::Relaxed);
        let per_object = (heap_after - heap_before) as f64 / cached as f64;

        // Second round: every object touched (a label patch), each reconciled again.
        let touch_started = Instant::now();
        let mut tasks = Vec::new();
        for worker in 0..32 {
            let cms = cms.clone();
            tasks.push(tokio::spawn(async move {
                for i in (worker..OBJECTS).step_by(32) {
                    let patch = serde_json::json!({"metadata": {"labels": {"round": "2"}}});
                    cms.patch(&format!("cm-{i:05}"), &PatchParams::default(), &Patch::Merge(patch))
                        .await
                        .expect("patch");
                }
            }));
        }
        for task in tasks {
            task.await.expect("toucher");
        }
        while reconciled.load(Ordering::Relaxed) < 2 * OBJECTS {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let second_round = touch_started.elapsed();

        println!("| measurement | result |");
        println!("| --- | ---: |");
        println!(
            "| first round: start, list and reconcile {OBJECTS} objects, reconciles/s | {:.0} ({:.2} s) |",
            OBJECTS as f64 / first_round.as_secs_f64(),
            first_round.as_secs_f64()
        );
        println!(
            "| second round: {OBJECTS} patches (32 clients) and their reconciles, reconciles/s | {:.0} ({:.2} s) |",
            OBJECTS as f64 / second_round.as_secs_f64(),
            second_round.as_secs_f64()
        );
        println!("| objects in the shared cache | {cached} |");
        println!("| heap per cached object (ConfigMap, ~250 B of data), bytes | {per_object:.0} |");
    });
}
