//! The Job controller (`job`), as kube-controller-manager's: runs a Job's pods to
//! `completions` successes, `parallelism` at a time, `NonIndexed` or `Indexed` (each index
//! `0..completions` succeeding once, its pods numbered by the `job-completion-index`
//! annotation, label, `JOB_COMPLETION_INDEX` and hostname `<job>-<index>`).
//!
//! **Tracking with finalizers.** Every pod is created with the
//! `batch.kubernetes.io/job-tracking` finalizer, so it cannot vanish before it is counted. A
//! finished pod is first recorded in `status.uncountedTerminatedPods` (or, `Indexed`, in
//! `completedIndexes`/`failedIndexes`), then loses its finalizer, then moves into the
//! `succeeded`/`failed` counters — each step written before the next, so a crash or a lost
//! write can neither lose a pod nor count it twice. Pods this controller deletes itself
//! (excess parallelism, suspension, a finished Job) lose the finalizer first: they are not
//! failures.
//!
//! **Failures.** A failed pod is judged by the `podFailurePolicy` rules in order (exit codes
//! of terminated containers, pod conditions such as `DisruptionTarget`): `FailJob` fails the
//! Job at once, `FailIndex` fails its index, `Ignore` does not count, `Count` (and no match)
//! counts against `backoffLimit` — or, with `backoffLimitPerIndex`, against its index's
//! budget, recorded on each new pod as `job-index-failure-count`. A replacement waits out an
//! exponential back-off (10 s doubling to 6 min) after the last failure, read from the pods
//! themselves so a restart of the controller keeps it. `activeDeadlineSeconds` counts from
//! `status.startTime`.
//!
//! **Finishing** is two-step, as since Kubernetes 1.31: the interim `SuccessCriteriaMet` or
//! `FailureTarget` condition first, then the remaining pods are deleted, and once none is
//! left running the terminal `Complete` (with `completionTime`) or `Failed` condition with
//! the same reason. `successPolicy` rules can declare an `Indexed` Job done early.
//!
//! Matching orphans are adopted and owned pods whose labels stop matching are released;
//! `suspend` deletes the active pods and clears `startTime` (so the deadline restarts on
//! resume). A second loop strips the finalizer from pods whose Job is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::{Job, JobCondition, JobSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::{Value, json};

use crate::events::{EventType, publish};
use crate::labels::matches;
use crate::objects::{controller_ref, ready};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["batch"],
        resources: &["jobs"],
        verbs: READ,
    },
    Rule {
        api_groups: &["batch"],
        resources: &["jobs/status"],
        verbs: &["patch", "update"],
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create", "patch"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "job-controller";
/// The finalizer that keeps a pod until its Job has counted it.
pub const TRACKING_FINALIZER: &str = "batch.kubernetes.io/job-tracking";
/// The annotation (and label) with an `Indexed` Job pod's index.
pub const COMPLETION_INDEX: &str = "batch.kubernetes.io/job-completion-index";
/// The annotation with how many pods of this index failed before this one.
pub const INDEX_FAILURE_COUNT: &str = "batch.kubernetes.io/job-index-failure-count";

/// The back-off before a failed pod is replaced: 10 s, doubling per failure, at most 6 min.
const BACKOFF_BASE: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(360);

/// What can go wrong reconciling one Job (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A pod could not be created, changed or deleted, or the status written.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        source: kube::Error,
    },
    /// The pod template does not make a pod.
    #[error("building a pod from the template of {job}: {source}")]
    Template {
        /// The Job.
        job: String,
        /// Why.
        source: serde_json::Error,
    },
}

/// Creations and deletions made but not yet seen in the cache, per Job UID.
#[derive(Debug, Default)]
struct Expectations {
    creating: Vec<String>,
    deleting: Vec<String>,
    since: Option<Instant>,
}

/// What the reconcilers share.
pub struct Context {
    client: Client,
    pods: Store<Pod>,
    jobs: Store<Job>,
    expectations: Mutex<HashMap<String, Expectations>>,
    /// The resourceVersion of each Job's last status write: a cache older than it must not
    /// be acted on (it would not show pods already counted).
    written: Mutex<HashMap<String, u64>>,
    /// Per Job, the pods whose finalizer this controller removed but whose cached copy may
    /// still show it: not to be counted again.
    released: Mutex<HashMap<String, BTreeSet<String>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobContext").finish_non_exhaustive()
    }
}

/// Adds the Job controller to `manager`.
pub fn add(manager: &mut Manager) {
    let jobs = manager.cache::<Job>(watcher::Config::default());
    let pods = manager.cache::<Pod>(watcher::Config::default());
    let context = Arc::new(Context {
        client: manager.client(),
        pods: pods.store(),
        jobs: jobs.store(),
        expectations: Mutex::default(),
        written: Mutex::default(),
        released: Mutex::default(),
    });
    let candidates = jobs.store();
    let runner = Runner::for_cache("job", &jobs)
        .and_then(|r| r.owns(&pods))
        .and_then(|r| {
            r.watches_deleted(&pods, |pod: Arc<Pod>| {
                let owner = controller_ref(pod.as_ref()).filter(|o| o.kind == "Job")?;
                Some(ObjectRef::new(&owner.name).within(&pod.namespace()?))
            })
        })
        .and_then(|r| {
            // An orphan wakes the Jobs whose selector matches it, to adopt it.
            r.watches(&pods, move |pod: Arc<Pod>| {
                if controller_ref(pod.as_ref()).is_some() {
                    return Vec::new();
                }
                let labels = pod.metadata.labels.clone().unwrap_or_default();
                candidates
                    .state()
                    .into_iter()
                    .filter(|job| {
                        job.namespace() == pod.namespace()
                            && job
                                .spec
                                .as_ref()
                                .and_then(|s| s.selector.as_ref())
                                .is_some_and(|s| matches(s, &labels))
                    })
                    .map(|job| ObjectRef::from_obj(job.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, context.clone());
    // Pods still holding the tracking finalizer after their Job is gone.
    let strays = Runner::for_cache("job-orphan-pods", &pods)
        .expect("the cache was just created, before run");
    manager.add(strays, release_stray, context);
}

/// The pod's phase.
fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

fn terminal(pod: &Pod) -> bool {
    matches!(phase(pod), "Succeeded" | "Failed")
}

/// Running or about to: not finished, not being deleted.
fn active(pod: &Pod) -> bool {
    !terminal(pod) && pod.metadata.deletion_timestamp.is_none()
}

fn terminating(pod: &Pod) -> bool {
    !terminal(pod) && pod.metadata.deletion_timestamp.is_some()
}

fn tracked(pod: &Pod) -> bool {
    pod.finalizers().iter().any(|f| f == TRACKING_FINALIZER)
}

/// The completion index of an `Indexed` Job's pod.
fn index_of(pod: &Pod) -> Option<i32> {
    pod.annotations()
        .get(COMPLETION_INDEX)
        .or_else(|| pod.labels().get(COMPLETION_INDEX))
        .and_then(|v| v.parse().ok())
        .filter(|i| *i >= 0)
}

/// Whether a pod counts as failed (kube's `isPodFailed`): its phase says so, or — unless
/// the Job only replaces failed pods — it is being deleted before succeeding.
fn counts_failed(pod: &Pod, spec: &JobSpec) -> bool {
    if phase(pod) == "Failed" {
        return true;
    }
    if spec.pod_failure_policy.is_some() || spec.pod_replacement_policy.as_deref() == Some("Failed")
    {
        return false;
    }
    pod.metadata.deletion_timestamp.is_some() && phase(pod) != "Succeeded"
}

/// When the pod finished: its containers' latest finish, else its deletion, else never.
fn finished_at(pod: &Pod) -> Option<Timestamp> {
    let status = pod.status.as_ref();
    status
        .and_then(|s| s.container_statuses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|c| c.state.as_ref()?.terminated.as_ref()?.finished_at.as_ref())
        .map(|t| t.0)
        .max()
        .or_else(|| pod.metadata.deletion_timestamp.as_ref().map(|t| t.0))
}

/// What a pod failure policy makes of a failed pod.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    FailJob(String),
    FailIndex,
    Ignore,
    Count,
}

/// The first `podFailurePolicy` rule that matches the pod, as kube's `matchPodFailurePolicy`.
fn judge(spec: &JobSpec, pod: &Pod) -> Verdict {
    let Some(policy) = &spec.pod_failure_policy else {
        return Verdict::Count;
    };
    let who = format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    let status = pod.status.clone().unwrap_or_default();
    for (i, rule) in policy.rules.iter().enumerate() {
        let matched = if let Some(req) = &rule.on_exit_codes {
            status
                .init_container_statuses
                .iter()
                .flatten()
                .chain(status.container_statuses.iter().flatten())
                .filter(|c| req.container_name.as_ref().is_none_or(|n| *n == c.name))
                .find_map(|c| {
                    let code = c.state.as_ref()?.terminated.as_ref()?.exit_code;
                    let listed = req.values.contains(&code);
                    let hit = code != 0
                        && match req.operator.as_str() {
                            "In" => listed,
                            "NotIn" => !listed,
                            _ => false,
                        };
                    hit.then(|| {
                        format!(
                            "Container {} for pod {who} failed with exit code {code} matching {} rule at index {i}",
                            c.name, rule.action
                        )
                    })
                })
        } else {
            rule.on_pod_conditions.iter().flatten().find_map(|pattern| {
                let want = pattern.status.as_deref().unwrap_or("True");
                status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == pattern.type_ && c.status == want)
                    .then(|| {
                        format!(
                            "Pod {who} has condition {} matching {} rule at index {i}",
                            pattern.type_, rule.action
                        )
                    })
            })
        };
        if let Some(message) = matched {
            return match rule.action.as_str() {
                "FailJob" => Verdict::FailJob(message),
                "FailIndex" => Verdict::FailIndex,
                "Ignore" => Verdict::Ignore,
                _ => Verdict::Count,
            };
        }
    }
    Verdict::Count
}

/// Parses an index set as the API writes it: `"1,3-5,7"`.
pub fn parse_indexes(text: &str) -> BTreeSet<i32> {
    let mut set = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<i32>(), b.parse::<i32>()) {
                    set.extend(a..=b);
                }
            }
            None => {
                if let Ok(i) = part.parse() {
                    set.insert(i);
                }
            }
        }
    }
    set
}

/// Formats an index set with ranges: `{1,3,4,5,7}` → `"1,3-5,7"`.
pub fn format_indexes(set: &BTreeSet<i32>) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut run: Option<(i32, i32)> = None;
    for &i in set {
        run = match run {
            Some((a, b)) if i == b + 1 => Some((a, i)),
            Some((a, b)) => {
                parts.push(if a == b {
                    a.to_string()
                } else {
                    format!("{a}-{b}")
                });
                Some((i, i))
            }
            None => Some((i, i)),
        };
    }
    if let Some((a, b)) = run {
        parts.push(if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        });
    }
    parts.join(",")
}

fn backoff(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    BACKOFF_BASE
        .saturating_mul(1 << (failures - 1).min(16))
        .min(BACKOFF_MAX)
}

/// A condition as the Job API writes it.
fn condition(type_: &str, status: &str, reason: &str, message: &str, now: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastProbeTime": now, "lastTransitionTime": now})
}

fn true_condition<'a>(conditions: &'a [JobCondition], type_: &str) -> Option<&'a JobCondition> {
    conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == "True")
}

/// The finished condition (`Complete` or `Failed`) if the Job has one.
pub fn finished(job: &Job) -> Option<&JobCondition> {
    let conditions = job.status.as_ref()?.conditions.as_deref()?;
    true_condition(conditions, "Complete").or_else(|| true_condition(conditions, "Failed"))
}

impl Context {
    fn remember(&self, uid: &str, creating: Vec<String>, deleting: Vec<String>) {
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let e = expectations.entry(uid.to_owned()).or_default();
        e.creating.extend(creating);
        e.deleting.extend(deleting);
        e.since = Some(Instant::now());
    }

    /// Whether the cached Job is older than this controller's last status write.
    fn behind(&self, uid: &str, job: &Job) -> bool {
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let cached = job.resource_version().and_then(|rv| rv.parse::<u64>().ok());
        matches!((written.get(uid), cached), (Some(w), Some(c)) if c < *w)
    }

    /// Drops what was remembered about a Job that is done with.
    fn forget(&self, uid: &str) {
        self.written
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        self.expectations
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
        self.released
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(uid);
    }

    /// The pods of the Job released earlier that the cache still shows tracked.
    fn releasing(&self, uid: &str, owned: &[Arc<Pod>]) -> BTreeSet<String> {
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        let set = released.entry(uid.to_owned()).or_default();
        set.retain(|pod| {
            owned
                .iter()
                .any(|p| p.uid().as_deref() == Some(pod.as_str()) && tracked(p))
        });
        set.clone()
    }

    fn released(&self, uid: &str, pod: String) {
        let mut released = self.released.lock().unwrap_or_else(|e| e.into_inner());
        released.entry(uid.to_owned()).or_default().insert(pod);
    }

    fn wrote(&self, uid: &str, job: &Job) {
        if let Some(rv) = job.resource_version().and_then(|rv| rv.parse::<u64>().ok()) {
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            written.insert(uid.to_owned(), rv);
        }
    }

    /// Whether earlier creations and deletions have all reached the cache.
    fn settled(&self, uid: &str, owned: &[Arc<Pod>]) -> bool {
        let mut expectations = self.expectations.lock().unwrap_or_else(|e| e.into_inner());
        let e = expectations.entry(uid.to_owned()).or_default();
        let names: std::collections::HashSet<String> = owned.iter().map(|p| p.name_any()).collect();
        let gone_or_deleting = |n: &String| {
            owned
                .iter()
                .find(|p| p.name_any() == *n)
                .is_none_or(|p| p.metadata.deletion_timestamp.is_some())
        };
        e.creating.retain(|n| !names.contains(n));
        e.deleting.retain(|n| !gone_or_deleting(n));
        let stale = e
            .since
            .is_some_and(|s| s.elapsed() > Duration::from_secs(60));
        if (!e.creating.is_empty() || !e.deleting.is_empty()) && !stale {
            return false;
        }
        *e = Expectations::default();
        true
    }
}

/// Removes the tracking finalizer from a pod (that very pod: a uid precondition).
async fn strip(api: &Api<Pod>, pod: &Pod) -> Result<(), kube::Error> {
    if !tracked(pod) {
        return Ok(());
    }
    let rest: Vec<&String> = pod
        .finalizers()
        .iter()
        .filter(|f| *f != TRACKING_FINALIZER)
        .collect();
    let patch = json!({"metadata": {"uid": pod.uid(), "finalizers": rest}});
    match api
        .patch(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Deletes pods this controller no longer wants, their finalizer removed first so they
/// are not counted as failures.
async fn delete_pods(api: &Api<Pod>, pods: &[Arc<Pod>]) -> Result<Vec<String>, JobError> {
    let mut deleted = Vec::new();
    for pod in pods {
        let name = pod.name_any();
        strip(api, pod).await.map_err(|source| JobError::Api {
            action: format!("removing the tracking finalizer of pod {name}"),
            source,
        })?;
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => deleted.push(name),
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(source) => {
                return Err(JobError::Api {
                    action: format!("deleting pod {name}"),
                    source,
                });
            }
        }
    }
    Ok(deleted)
}

/// Lower is deleted first: unscheduled, then not running, then not ready; newest first.
fn value(pod: &Pod) -> (u8, u8, u8, std::cmp::Reverse<Option<Timestamp>>) {
    let scheduled = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some();
    (
        u8::from(scheduled),
        u8::from(phase(pod) == "Running"),
        u8::from(ready(pod)),
        std::cmp::Reverse(pod.metadata.creation_timestamp.as_ref().map(|t| t.0)),
    )
}

/// A pod for the Job from its template (and, `Indexed`, for `index`).
fn pod_for(job: &Job, index: Option<i32>, failures: Option<u32>) -> Result<Pod, JobError> {
    let spec = job.spec.clone().unwrap_or_default();
    let template = spec.template;
    let name = job.name_any();
    let mut metadata = super::pod_metadata(template.metadata.as_ref());
    let mut pod_spec =
        serde_json::to_value(template.spec.unwrap_or_default()).unwrap_or_else(|_| json!({}));
    let owner = job.controller_owner_ref(&()).map(|o| vec![o]);
    metadata["generateName"] = json!(match index {
        Some(i) => format!("{name}-{i}-"),
        None => format!("{name}-"),
    });
    metadata["namespace"] = json!(job.namespace());
    metadata["ownerReferences"] = json!(owner);
    let mut finalizers = metadata["finalizers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    finalizers.push(json!(TRACKING_FINALIZER));
    metadata["finalizers"] = json!(finalizers);
    if let Some(i) = index {
        metadata["annotations"][COMPLETION_INDEX] = json!(i.to_string());
        metadata["labels"][COMPLETION_INDEX] = json!(i.to_string());
        if let Some(n) = failures {
            metadata["annotations"][INDEX_FAILURE_COUNT] = json!(n.to_string());
        }
        if pod_spec["hostname"].as_str().is_none_or(str::is_empty) {
            pod_spec["hostname"] = json!(format!("{name}-{i}"));
        }
        let env = json!({"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": {
            "fieldPath": format!("metadata.annotations['{COMPLETION_INDEX}']")}}});
        for list in ["initContainers", "containers"] {
            for c in pod_spec[list].as_array_mut().into_iter().flatten() {
                let vars = c["env"].as_array_mut();
                match vars {
                    Some(vars) => {
                        if !vars.iter().any(|v| v["name"] == "JOB_COMPLETION_INDEX") {
                            vars.push(env.clone());
                        }
                    }
                    None => c["env"] = json!([env.clone()]),
                }
            }
        }
    }
    serde_json::from_value(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}),
    )
    .map_err(|source| JobError::Template {
        job: name.clone(),
        source,
    })
}

/// Whether a `successPolicy` rule is met by the completed indexes; the first one's index.
fn success_rule(spec: &JobSpec, completed: &BTreeSet<i32>) -> Option<usize> {
    let rules = &spec.success_policy.as_ref()?.rules;
    rules.iter().position(|rule| {
        let (within, needed) = match &rule.succeeded_indexes {
            Some(text) => {
                let want = parse_indexes(text);
                let done = want.intersection(completed).count();
                let needed = rule
                    .succeeded_count
                    .map_or(want.len(), |n| n.max(0) as usize);
                (done, needed)
            }
            None => (
                completed.len(),
                rule.succeeded_count.unwrap_or(0).max(0) as usize,
            ),
        };
        needed > 0 && within >= needed
    })
}

async fn reconcile(job: Arc<Job>, ctx: Arc<Context>) -> Result<Action, JobError> {
    let namespace = job.namespace().unwrap_or_default();
    let uid = job.uid().unwrap_or_default();
    let name = job.name_any();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let spec = job.spec.clone().unwrap_or_default();
    let selector = spec.selector.clone().unwrap_or_default();
    let in_namespace: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    let mine = |p: &Pod| controller_ref(p).is_some_and(|o| o.uid == uid);
    let owned: Vec<Arc<Pod>> = in_namespace.iter().filter(|p| mine(p)).cloned().collect();

    // A Job being deleted, or finished, keeps nothing from going.
    if job.meta().deletion_timestamp.is_some() || finished(&job).is_some() {
        ctx.forget(&uid);
        for pod in owned.iter().filter(|p| tracked(p)) {
            strip(&api, pod).await.map_err(|source| JobError::Api {
                action: format!("removing the tracking finalizer of pod {}", pod.name_any()),
                source,
            })?;
        }
        return Ok(Action::await_change());
    }

    // Adopt matching orphans; release owned pods whose labels stopped matching.
    let labels = |p: &Pod| p.metadata.labels.clone().unwrap_or_default();
    for orphan in in_namespace.iter().filter(|p| {
        active(p) && controller_ref(p.as_ref()).is_none() && matches(&selector, &labels(p))
    }) {
        let mut owner = job.controller_owner_ref(&());
        if let Some(o) = owner.as_mut() {
            o.block_owner_deletion = Some(true);
        }
        let patch = json!({"metadata": {"uid": orphan.uid(), "ownerReferences": [owner]}});
        let _ = api
            .patch(
                &orphan.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
    }
    let (owned, released): (Vec<Arc<Pod>>, Vec<Arc<Pod>>) = owned
        .into_iter()
        .partition(|p| matches(&selector, &labels(p)));
    for pod in &released {
        let others: Vec<_> = pod
            .owner_references()
            .iter()
            .filter(|o| o.uid != uid)
            .cloned()
            .collect();
        let rest: Vec<&String> = pod
            .finalizers()
            .iter()
            .filter(|f| *f != TRACKING_FINALIZER)
            .collect();
        let patch =
            json!({"metadata": {"uid": pod.uid(), "ownerReferences": others, "finalizers": rest}});
        let _ = api
            .patch(
                &pod.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await;
    }
    if !ctx.settled(&uid, &owned) || ctx.behind(&uid, &job) {
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    let status = job.status.clone().unwrap_or_default();
    let conditions = status.conditions.clone().unwrap_or_default();
    let indexed = spec.completion_mode.as_deref() == Some("Indexed");
    let completions = spec.completions;
    let in_range = |ix: i32| completions.is_none_or(|c| ix < c);
    let per_index = spec.backoff_limit_per_index;
    let mut completed = parse_indexes(status.completed_indexes.as_deref().unwrap_or(""));
    let mut failed_indexes = parse_indexes(status.failed_indexes.as_deref().unwrap_or(""));
    let uncounted = status.uncounted_terminated_pods.clone().unwrap_or_default();
    let mut uncounted_succeeded = uncounted.succeeded.unwrap_or_default();
    let mut uncounted_failed = uncounted.failed.unwrap_or_default();
    let mut succeeded = status.succeeded.unwrap_or(0);
    let mut failed = status.failed.unwrap_or(0);
    let now = Timestamp::now();
    let stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();

    // The interim condition already reached, or reached now by a pod failure policy.
    let mut target: Option<(&str, String, String)> = ["FailureTarget", "SuccessCriteriaMet"]
        .iter()
        .find_map(|t| {
            true_condition(&conditions, t).map(|c| {
                (
                    *t,
                    c.reason.clone().unwrap_or_default(),
                    c.message.clone().unwrap_or_default(),
                )
            })
        });

    // 1. Finished pods not yet recorded: recorded, then released, then counted.
    let mut release: Vec<Arc<Pod>> = Vec::new();
    let before = (
        uncounted_succeeded.len(),
        uncounted_failed.len(),
        completed.clone(),
        failed_indexes.clone(),
    );
    let mut sorted = owned.clone();
    sorted.sort_by_key(|p| finished_at(p));
    let releasing = ctx.releasing(&uid, &owned);
    for pod in sorted
        .iter()
        .filter(|p| tracked(p) && !p.uid().is_some_and(|u| releasing.contains(&u)))
    {
        let pod_uid = pod.uid().unwrap_or_default();
        let index = index_of(pod);
        if phase(pod) == "Succeeded" && !uncounted_failed.contains(&pod_uid) {
            if indexed {
                if let Some(ix) = index.filter(|ix| in_range(*ix)) {
                    completed.insert(ix);
                }
            } else if !uncounted_succeeded.contains(&pod_uid) {
                uncounted_succeeded.push(pod_uid);
            }
            release.push(pod.clone());
        } else if counts_failed(pod, &spec) {
            let valid = !indexed || index.is_some_and(in_range);
            if !uncounted_failed.contains(&pod_uid) && valid {
                match judge(&spec, pod) {
                    Verdict::Ignore => {}
                    Verdict::FailJob(message) => {
                        uncounted_failed.push(pod_uid);
                        if target.is_none() {
                            target = Some(("FailureTarget", "PodFailurePolicy".into(), message));
                        }
                    }
                    Verdict::FailIndex => {
                        uncounted_failed.push(pod_uid);
                        failed_indexes.extend(index);
                    }
                    Verdict::Count => {
                        uncounted_failed.push(pod_uid);
                        if let (Some(limit), Some(ix)) = (per_index, index) {
                            let before: i32 = pod
                                .annotations()
                                .get(INDEX_FAILURE_COUNT)
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0);
                            if before + 1 > limit {
                                failed_indexes.insert(ix);
                            }
                        }
                    }
                }
            }
            release.push(pod.clone());
        }
    }
    // Indexes that failed are not also completed.
    for ix in &failed_indexes {
        completed.remove(ix);
    }
    let status_patch = |succeeded: i32,
                        failed: i32,
                        us: &[String],
                        uf: &[String],
                        completed: &BTreeSet<i32>,
                        failed_ix: &BTreeSet<i32>| {
        let mut s = json!({
            "succeeded": succeeded, "failed": failed,
            "uncountedTerminatedPods": {"succeeded": us, "failed": uf},
        });
        if indexed {
            s["completedIndexes"] = json!(format_indexes(completed));
            s["succeeded"] = json!(completed.len() as i32);
        }
        if per_index.is_some() {
            s["failedIndexes"] = json!(format_indexes(failed_ix));
        }
        s
    };
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let write_status = |patch: Value| {
        let jobs = jobs.clone();
        let name = name.clone();
        let ctx = ctx.clone();
        let uid = uid.clone();
        async move {
            let written = jobs
                .patch_status(
                    &name,
                    &PatchParams {
                        field_manager: Some(MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(json!({"status": patch})),
                )
                .await
                .map_err(|source| JobError::Api {
                    action: format!("updating the status of job {name}"),
                    source,
                })?;
            ctx.wrote(&uid, &written);
            Ok::<(), JobError>(())
        }
    };
    if before
        != (
            uncounted_succeeded.len(),
            uncounted_failed.len(),
            completed.clone(),
            failed_indexes.clone(),
        )
    {
        write_status(status_patch(
            succeeded,
            failed,
            &uncounted_succeeded,
            &uncounted_failed,
            &completed,
            &failed_indexes,
        ))
        .await?;
    }
    let mut released_now = BTreeSet::new();
    // Released all at once; the ones whose patch failed stay recorded and are retried.
    let stripped = futures::future::join_all(release.iter().map(|pod| strip(&api, pod))).await;
    let mut strip_failure = None;
    for (pod, result) in release.iter().zip(stripped) {
        match result {
            Ok(()) => {
                let pod_uid = pod.uid().unwrap_or_default();
                ctx.released(&uid, pod_uid.clone());
                released_now.insert(pod_uid);
            }
            Err(source) => {
                strip_failure = Some(JobError::Api {
                    action: format!("removing the tracking finalizer of pod {}", pod.name_any()),
                    source,
                })
            }
        }
    }
    if let Some(error) = strip_failure {
        return Err(error);
    }
    // Recorded pods that hold no finalizer any more are counted.
    let still_tracked = |u: &String| {
        !released_now.contains(u)
            && !releasing.contains(u)
            && owned
                .iter()
                .any(|p| p.uid().as_ref() == Some(u) && tracked(p))
    };
    let (keep_s, done_s): (Vec<String>, Vec<String>) =
        uncounted_succeeded.into_iter().partition(still_tracked);
    let (keep_f, done_f): (Vec<String>, Vec<String>) =
        uncounted_failed.into_iter().partition(still_tracked);
    succeeded += done_s.len() as i32;
    failed += done_f.len() as i32;
    let (uncounted_succeeded, uncounted_failed) = (keep_s, keep_f);
    let succeeded_total = if indexed {
        completed.len() as i32
    } else {
        succeeded + uncounted_succeeded.len() as i32
    };
    let failed_total = failed + uncounted_failed.len() as i32;

    // 2. The pods as they stand.
    let live: Vec<Arc<Pod>> = owned.iter().filter(|p| active(p)).cloned().collect();
    let terminating_count = owned.iter().filter(|p| terminating(p)).count() as i32;
    let suspended = spec.suspend == Some(true);
    let mut start_time = status.start_time.as_ref().map(|t| t.0);
    let mut requeue: Option<Duration> = None;

    // 3. Has the Job reached its end?
    if target.is_none() {
        let deadline = spec
            .active_deadline_seconds
            .zip(start_time)
            .map(|(s, start)| start + jiff::SignedDuration::from_secs(s));
        if failed_total > spec.backoff_limit.unwrap_or(6) {
            target = Some((
                "FailureTarget",
                "BackoffLimitExceeded".into(),
                "Job has reached the specified backoff limit".into(),
            ));
        } else if spec
            .max_failed_indexes
            .is_some_and(|m| failed_indexes.len() as i32 > m)
        {
            target = Some((
                "FailureTarget",
                "MaxFailedIndexesExceeded".into(),
                "Job has exceeded the specified maximal number of failed indexes".into(),
            ));
        } else if !suspended && deadline.is_some_and(|d| now >= d) {
            target = Some((
                "FailureTarget",
                "DeadlineExceeded".into(),
                "Job was active longer than specified deadline".into(),
            ));
        } else if let Some(rule) = indexed.then(|| success_rule(&spec, &completed)).flatten() {
            target = Some((
                "SuccessCriteriaMet",
                "SuccessPolicy".into(),
                format!("Matched rules at index {rule}"),
            ));
        } else {
            let all_done = match completions {
                Some(c) if indexed => (completed.len() + failed_indexes.len()) as i32 >= c,
                Some(c) => succeeded_total >= c,
                None => succeeded_total > 0 && live.is_empty(),
            };
            if all_done && indexed && !failed_indexes.is_empty() {
                target = Some((
                    "FailureTarget",
                    "FailedIndexes".into(),
                    "Job has failed indexes".into(),
                ));
            } else if all_done {
                target = Some((
                    "SuccessCriteriaMet",
                    "CompletionsReached".into(),
                    "Reached expected number of succeeded pods".into(),
                ));
            }
        }
        if let Some(d) = deadline.filter(|d| *d > now)
            && let Ok(left) = Duration::try_from(d.duration_since(now))
        {
            requeue = Some(left);
        }
    }

    let mut new_conditions: Vec<Value> = conditions
        .iter()
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    let set_condition =
        |list: &mut Vec<Value>, type_: &str, status: &str, reason: &str, message: &str| match list
            .iter_mut()
            .find(|c| c["type"] == type_)
        {
            Some(c) if c["status"] == status => {}
            Some(c) => *c = condition(type_, status, reason, message, &stamp),
            None => list.push(condition(type_, status, reason, message, &stamp)),
        };
    let mut completion_time = status.completion_time.as_ref().map(|t| t.0.to_string());
    let mut active_now = live.clone();
    if let Some((type_, reason, message)) = &target {
        set_condition(&mut new_conditions, type_, "True", reason, message);
        // Nothing more runs; the terminal condition once nothing is left running.
        let deleted = delete_pods(&api, &live).await?;
        ctx.remember(&uid, Vec::new(), deleted);
        active_now.clear();
        let running_left = !live.is_empty() || terminating_count > 0;
        if !running_left && uncounted_succeeded.is_empty() && uncounted_failed.is_empty() {
            let final_type = if *type_ == "FailureTarget" {
                "Failed"
            } else {
                "Complete"
            };
            set_condition(&mut new_conditions, final_type, "True", reason, message);
            if final_type == "Complete" {
                completion_time = Some(stamp.clone());
            }
            let event_type = if final_type == "Failed" {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let event_reason = if final_type == "Failed" {
                reason.as_str()
            } else {
                "Completed"
            };
            let event_message = if final_type == "Failed" {
                message.as_str()
            } else {
                "Job completed"
            };
            publish(
                &ctx.client,
                MANAGER,
                job.as_ref(),
                event_type,
                event_reason,
                event_message,
            )
            .await;
        } else {
            requeue = Some(Duration::from_secs(1));
        }
    } else if suspended {
        let deleted = delete_pods(&api, &live).await?;
        ctx.remember(&uid, Vec::new(), deleted);
        active_now.clear();
        if true_condition(&conditions, "Suspended").is_none() {
            set_condition(
                &mut new_conditions,
                "Suspended",
                "True",
                "JobSuspended",
                "Job suspended",
            );
            publish(
                &ctx.client,
                MANAGER,
                job.as_ref(),
                EventType::Normal,
                "Suspended",
                "Job suspended",
            )
            .await;
        }
        start_time = None;
    } else {
        if true_condition(&conditions, "Suspended").is_some() {
            set_condition(
                &mut new_conditions,
                "Suspended",
                "False",
                "JobResumed",
                "Job resumed",
            );
            publish(
                &ctx.client,
                MANAGER,
                job.as_ref(),
                EventType::Normal,
                "Resumed",
                "Job resumed",
            )
            .await;
        }
        if start_time.is_none() {
            start_time = Some(now);
        }
        // 4. Make the active pods what they should be.
        let replace_only_failed = spec.pod_replacement_policy.as_deref() == Some("Failed");
        let occupying: Vec<Arc<Pod>> = owned
            .iter()
            .filter(|p| active(p) || (replace_only_failed && terminating(p)))
            .cloned()
            .collect();
        let parallelism = spec.parallelism.unwrap_or(1).max(0) as usize;
        // Failures since the last success, and when the last one was: the back-off.
        let counted_failures = |pods: &mut dyn Iterator<Item = &Arc<Pod>>| {
            let mut last_success: Option<Timestamp> = None;
            let mut failures: Vec<Timestamp> = Vec::new();
            for p in pods {
                if phase(p) == "Succeeded" {
                    last_success = last_success.max(finished_at(p));
                } else if counts_failed(p, &spec) && judge(&spec, p) != Verdict::Ignore {
                    failures.extend(finished_at(p));
                }
            }
            failures.retain(|f| last_success.is_none_or(|s| *f > s));
            (failures.len() as u32, failures.into_iter().max())
        };
        let wait_for = |count: u32, last: Option<Timestamp>| -> Option<Duration> {
            let last = last?;
            let ready_at = last + jiff::SignedDuration::try_from(backoff(count)).ok()?;
            (ready_at > now)
                .then(|| Duration::try_from(ready_at.duration_since(now)).ok())
                .flatten()
        };
        let mut create: Vec<(Option<i32>, Option<u32>)> = Vec::new();
        let mut doomed: Vec<Arc<Pod>> = Vec::new();
        if indexed {
            let total = completions.unwrap_or(0).max(0);
            let mut by_index: BTreeMap<i32, Vec<Arc<Pod>>> = BTreeMap::new();
            for p in &occupying {
                match index_of(p).filter(|ix| *ix < total) {
                    Some(ix) if !completed.contains(&ix) && !failed_indexes.contains(&ix) => {
                        by_index.entry(ix).or_default().push(p.clone())
                    }
                    _ => {
                        if active(p) {
                            doomed.push(p.clone());
                        }
                    }
                }
            }
            for pods in by_index.values_mut() {
                // One pod per index: the best one stays.
                pods.sort_by_key(|p| std::cmp::Reverse(value(p)));
                doomed.extend(pods.drain(1..).filter(|p| active(p)));
            }
            let mut running = by_index.len();
            if running > parallelism {
                let mut extra: Vec<Arc<Pod>> = by_index
                    .values()
                    .flatten()
                    .filter(|p| active(p))
                    .cloned()
                    .collect();
                extra.sort_by_key(|p| value(p));
                doomed.extend(extra.into_iter().take(running - parallelism));
                running = parallelism;
            }
            let job_backoff = (per_index.is_none())
                .then(|| counted_failures(&mut owned.iter()))
                .and_then(|(n, last)| wait_for(n, last));
            for ix in 0..total {
                if running >= parallelism {
                    break;
                }
                if completed.contains(&ix)
                    || failed_indexes.contains(&ix)
                    || by_index.contains_key(&ix)
                {
                    continue;
                }
                let of_index: Vec<&Arc<Pod>> =
                    owned.iter().filter(|p| index_of(p) == Some(ix)).collect();
                let failures = per_index.map(|_| {
                    of_index
                        .iter()
                        .filter(|p| counts_failed(p, &spec) && judge(&spec, p) != Verdict::Ignore)
                        .map(|p| {
                            p.annotations()
                                .get(INDEX_FAILURE_COUNT)
                                .and_then(|v| v.parse::<u32>().ok())
                                .unwrap_or(0)
                                + 1
                        })
                        .max()
                        .unwrap_or(0)
                });
                let wait = match failures {
                    Some(n) => {
                        let last = of_index
                            .iter()
                            .filter_map(|p| finished_at(p))
                            .filter(|_| n > 0)
                            .max();
                        wait_for(n, last)
                    }
                    None => job_backoff,
                };
                if let Some(w) = wait {
                    requeue = Some(requeue.map_or(w, |r| r.min(w)));
                    continue;
                }
                create.push((Some(ix), failures));
                running += 1;
            }
        } else {
            let want = match completions {
                Some(c) => parallelism.min((c - succeeded_total).max(0) as usize),
                None if succeeded_total > 0 => occupying.len().min(parallelism),
                None => parallelism,
            };
            if occupying.len() > want {
                let mut extra: Vec<Arc<Pod>> =
                    occupying.iter().filter(|p| active(p)).cloned().collect();
                extra.sort_by_key(|p| value(p));
                doomed.extend(extra.into_iter().take(occupying.len() - want));
            } else if occupying.len() < want {
                let (n, last) = counted_failures(&mut owned.iter());
                match wait_for(n, last) {
                    Some(w) => requeue = Some(requeue.map_or(w, |r| r.min(w))),
                    None => create.extend((0..want - occupying.len()).map(|_| (None, None))),
                }
            }
        }
        if !doomed.is_empty() {
            let deleted = delete_pods(&api, &doomed).await?;
            active_now.retain(|p| !deleted.contains(&p.name_any()));
            ctx.remember(&uid, Vec::new(), deleted);
        }
        if !create.is_empty() {
            let pods: Vec<Pod> = create
                .iter()
                .map(|(ix, failures)| pod_for(&job, *ix, *failures))
                .collect::<Result<_, _>>()?;
            let params = PostParams::default();
            let results =
                futures::future::join_all(pods.iter().map(|p| api.create(&params, p))).await;
            let mut created = Vec::new();
            let mut failure = None;
            for result in results {
                match result {
                    Ok(p) => created.push(p.name_any()),
                    Err(e) => failure = Some(e),
                }
            }
            if !created.is_empty() {
                publish(
                    &ctx.client,
                    MANAGER,
                    job.as_ref(),
                    EventType::Normal,
                    "SuccessfulCreate",
                    &format!("Created pod: {}", created.join(", ")),
                )
                .await;
            }
            ctx.remember(&uid, created, Vec::new());
            if let Some(source) = failure {
                publish(
                    &ctx.client,
                    MANAGER,
                    job.as_ref(),
                    EventType::Warning,
                    "FailedCreate",
                    &format!("Error creating: {source}"),
                )
                .await;
                return Err(JobError::Api {
                    action: format!("creating pods for job {name}"),
                    source,
                });
            }
        }
    }

    // 5. Status from what is now known.
    let ready_count = active_now.iter().filter(|p| ready(p)).count() as i32;
    let mut desired = status_patch(
        succeeded,
        failed,
        &uncounted_succeeded,
        &uncounted_failed,
        &completed,
        &failed_indexes,
    );
    desired["active"] = json!(active_now.len() as i32);
    desired["ready"] = json!(ready_count);
    desired["terminating"] = json!(terminating_count);
    desired["conditions"] = json!(new_conditions);
    desired["startTime"] = json!(start_time.map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()));
    desired["completionTime"] = json!(completion_time);
    let current = serde_json::to_value(&status).unwrap_or_default();
    let changed = desired.as_object().into_iter().flatten().any(|(k, v)| {
        let have = current.get(k).cloned().unwrap_or(Value::Null);
        match (k.as_str(), v) {
            ("active" | "ready" | "terminating" | "succeeded" | "failed", Value::Number(n)) => {
                have.as_i64().unwrap_or(0) != n.as_i64().unwrap_or(0)
            }
            ("uncountedTerminatedPods", _) => {
                let list = |v: &Value, k: &str| v[k].as_array().cloned().unwrap_or_default();
                list(&have, "succeeded") != list(v, "succeeded")
                    || list(&have, "failed") != list(v, "failed")
            }
            ("startTime" | "completionTime", v) => {
                have.as_str().and_then(|s| s.parse::<Timestamp>().ok())
                    != v.as_str().and_then(|s| s.parse::<Timestamp>().ok())
            }
            _ => have != *v,
        }
    });
    if changed {
        write_status(desired).await?;
    }
    Ok(requeue.map_or_else(Action::await_change, Action::requeue))
}

/// A pod holding the tracking finalizer whose Job is gone (or is not its Job any more):
/// nobody will count it, so it is let go.
async fn release_stray(pod: Arc<Pod>, ctx: Arc<Context>) -> Result<Action, JobError> {
    if !tracked(&pod) {
        return Ok(Action::await_change());
    }
    let namespace = pod.namespace().unwrap_or_default();
    let owner = controller_ref(pod.as_ref()).filter(|o| o.kind == "Job");
    let job_exists = owner.is_some_and(|o| {
        ctx.jobs
            .get(&ObjectRef::new(&o.name).within(&namespace))
            .is_some_and(|j| j.uid().as_deref() == Some(o.uid.as_str()))
    });
    if job_exists {
        return Ok(Action::await_change());
    }
    // The cache may be young: make sure the Job is really gone before letting go.
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(o) = owner {
        match jobs.get_opt(&o.name).await {
            Ok(Some(j)) if j.uid().as_deref() == Some(o.uid.as_str()) => {
                return Ok(Action::requeue(Duration::from_secs(5)));
            }
            Ok(_) => {}
            Err(source) => {
                return Err(JobError::Api {
                    action: format!("reading job {}", o.name),
                    source,
                });
            }
        }
    }
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    strip(&api, &pod).await.map_err(|source| JobError::Api {
        action: format!("removing the tracking finalizer of pod {}", pod.name_any()),
        source,
    })?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_sets_round_trip() {
        let set = parse_indexes("1,3-5,7");
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), [1, 3, 4, 5, 7]);
        assert_eq!(format_indexes(&set), "1,3-5,7");
        assert_eq!(format_indexes(&BTreeSet::new()), "");
        assert_eq!(format_indexes(&parse_indexes("0")), "0");
    }

    #[test]
    fn backoff_doubles_to_six_minutes() {
        assert_eq!(backoff(0), Duration::ZERO);
        assert_eq!(backoff(1), Duration::from_secs(10));
        assert_eq!(backoff(3), Duration::from_secs(40));
        assert_eq!(backoff(12), Duration::from_secs(360));
    }

    #[test]
    fn failure_policy_rules_match_in_order() {
        let spec: JobSpec = serde_json::from_value(json!({
            "template": {},
            "podFailurePolicy": {"rules": [
                {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
                {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [42]}},
                {"action": "Count", "onExitCodes": {"operator": "NotIn", "values": [42]}},
            ]}
        }))
        .unwrap();
        let pod = |code: i32, disrupted: bool| -> Pod {
            serde_json::from_value(json!({
                "metadata": {"name": "p", "namespace": "ns"},
                "status": {"phase": "Failed",
                    "conditions": if disrupted { json!([{"type": "DisruptionTarget", "status": "True"}]) } else { json!([]) },
                    "containerStatuses": [{"name": "c", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                        "state": {"terminated": {"exitCode": code}}}]}
            }))
            .unwrap()
        };
        assert_eq!(judge(&spec, &pod(42, true)), Verdict::Ignore);
        assert_eq!(
            judge(&spec, &pod(42, false)),
            Verdict::FailJob(
                "Container c for pod ns/p failed with exit code 42 matching FailJob rule at index 1".into()
            )
        );
        assert_eq!(judge(&spec, &pod(1, false)), Verdict::Count);
    }

    #[test]
    fn success_policy_rules() {
        let spec: JobSpec = serde_json::from_value(json!({
            "template": {},
            "successPolicy": {"rules": [{"succeededIndexes": "0-2", "succeededCount": 2}, {"succeededCount": 3}]}
        }))
        .unwrap();
        assert_eq!(success_rule(&spec, &parse_indexes("0")), None);
        assert_eq!(success_rule(&spec, &parse_indexes("0,2")), Some(0));
        assert_eq!(success_rule(&spec, &parse_indexes("4,5,6")), Some(1));
    }
}
