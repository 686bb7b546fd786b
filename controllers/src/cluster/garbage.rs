//! The garbage collector, as kube-controller-manager's: deletes objects whose owners are
//! gone, and carries out the Foreground and Orphan propagation policies the API server
//! records as the `foregroundDeletion` and `orphan` finalizers.
//!
//! It works for every kind, custom resources included: discovery finds every resource that
//! can be listed, watched and deleted (again every 30 s, and at once when a
//! CustomResourceDefinition changes), and a metadata-only watch per resource feeds the
//! *owner graph*: one node per object, keyed by uid, plus an index from owner uid to the
//! uids of its dependents. The graph lives in a kube-runtime reflector store, so the
//! framework's [`Runner`] drives the reconciles — metrics, per-object backoff, dedupe and
//! shutdown are the framework's, as for every other controller.
//!
//! Events decide what to look at (an object with owners that appeared or changed, an
//! object that went — its dependents and its owners); the reconcile of a node is
//! level-based:
//! - marked for deletion with `orphan`: remove its ownerReferences from every dependent,
//!   then the finalizer;
//! - marked with `foregroundDeletion`: delete its dependents (Foreground, so the chain
//!   cascades), and remove the finalizer once no dependent that blocks it
//!   (`blockOwnerDeletion: true`) is left; a dependent already waiting for its own
//!   dependents stops blocking, which breaks cycles of references as
//!   kube-controller-manager does;
//! - otherwise, with ownerReferences: when every owner is absent — not in the graph, and
//!   confirmed by a live GET, since the graph may lag behind a new owner; an owner with
//!   another uid is absent — delete it (Background, preconditioned on its uid and
//!   resourceVersion, as read live); when some owners are absent and others not, remove the
//!   dangling references.
//!
//! It must not: touch objects without ownerReferences or finalizers of its own; act on the
//! graph alone when deleting (a live read decides).
//!
//! With leader election the graph is built on every replica but reconciled only on the
//! leader: on a standby the bounded work queue fills and then holds the watches back (they
//! resume, or relist, once this replica leads) — memory stays bounded either way.

use orquestra_operator::rbac::Rule;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, PartialObjectMeta, Patch, PatchParams, Preconditions,
    PropagationPolicy,
};
use kube::discovery::{Scope, verbs};
use kube::runtime::controller::Action;
use kube::runtime::reflector::store::Writer;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use orquestra_operator::manager::Shutdown;
use orquestra_operator::{Manager, Runner};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    // Owner references may point from and to any kind, custom ones included.
    Rule {
        api_groups: &["*"],
        resources: &["*"],
        verbs: &["get", "list", "watch", "patch", "update", "delete"],
    },
];

/// The finalizer the API server adds for `propagationPolicy: Foreground`.
pub const FOREGROUND: &str = "foregroundDeletion";
/// The finalizer the API server adds for `propagationPolicy: Orphan`.
pub const ORPHAN: &str = "orphan";
/// How often discovery runs again to find new resources.
pub const REDISCOVER: Duration = Duration::from_secs(30);
/// Resources the collector does not watch (as kube-controller-manager's defaults): events
/// are many, short-lived and never owners.
const IGNORED: &[(&str, &str)] = &[("", "events"), ("events.k8s.io", "events")];
/// How long an owner waiting for its dependents in the foreground looks again without an
/// event (a safety net; the dependents' deletions wake it).
const FOREGROUND_RECHECK: Duration = Duration::from_secs(60);

/// What can go wrong collecting one object (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum GarbageError {
    /// An owner reference names a kind discovery does not know (yet).
    #[error("owner {api_version}/{kind} of {object}: kind not served")]
    UnknownKind {
        /// The owner's apiVersion.
        api_version: String,
        /// The owner's kind.
        kind: String,
        /// The dependent, `resource namespace/name`.
        object: String,
    },
    /// A request failed.
    #[error("{action}: {source}")]
    Api {
        /// What was being done.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// One object of the owner graph. Stored in a reflector store under its uid (as the name
/// of `key`) so the framework's controller machinery can queue and reconcile it.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct GraphNode {
    /// `name` is the object's uid: the store key.
    key: ObjectMeta,
    /// The object's metadata as last watched.
    object: ObjectMeta,
    /// Its resource.
    resource: ApiResource,
    /// Whether the resource is namespaced.
    namespaced: bool,
}

impl Resource for GraphNode {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "GraphNode".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "gc.orquestra.dev".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "graphnodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.key
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.key
    }
}

impl GraphNode {
    fn uid(&self) -> &str {
        self.key.name.as_deref().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.object.name.as_deref().unwrap_or_default()
    }

    fn owners(&self) -> &[OwnerReference] {
        self.object.owner_references.as_deref().unwrap_or_default()
    }

    fn finalizers(&self) -> &[String] {
        self.object.finalizers.as_deref().unwrap_or_default()
    }

    fn deleting(&self) -> bool {
        self.object.deletion_timestamp.is_some()
    }

    fn describe(&self) -> String {
        match &self.object.namespace {
            Some(ns) => format!("{} {ns}/{}", self.resource.plural, self.name()),
            None => format!("{} {}", self.resource.plural, self.name()),
        }
    }
}

/// The graph's writable side and its indexes, changed only under one lock.
struct Graph {
    writer: Writer<GraphNode>,
    /// Owner uid → the uids of the objects that name it as an owner (whether or not the
    /// owner itself is in the graph).
    dependents: HashMap<String, HashSet<String>>,
    /// Resource → the uids of its objects in the graph (to notice objects a relist no
    /// longer shows, and to drop a resource that is no longer served).
    members: HashMap<ApiResource, HashSet<String>>,
}

/// The collector's shared state: the graph, the kinds served, and the work queue's input.
struct Collector {
    client: Client,
    nodes: Store<GraphNode>,
    graph: Mutex<Graph>,
    /// `(group, kind)` → its resource and whether it is namespaced.
    kinds: RwLock<HashMap<(String, String), (ApiResource, bool)>>,
    queue: mpsc::Sender<Arc<GraphNode>>,
    rediscover: Notify,
}

impl std::fmt::Debug for Collector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GarbageCollector").finish_non_exhaustive()
    }
}

/// Adds the garbage collector to `manager`: the graph builder as a source (on every
/// replica) and the reconciler (on the leader).
pub fn add(manager: &mut Manager) {
    let mut writer = Writer::<GraphNode>::default();
    // The store starts empty and ready; the graph changes by single Apply/Delete events
    // (the resource watches' relists are translated, see `Collector::observe`).
    writer.apply_watcher_event(&watcher::Event::Init);
    writer.apply_watcher_event(&watcher::Event::InitDone);
    let nodes = writer.as_reader();
    let (queue, triggers) = mpsc::channel::<Arc<GraphNode>>(1024);
    let collector = Arc::new(Collector {
        client: manager.client(),
        nodes: nodes.clone(),
        graph: Mutex::new(Graph {
            writer,
            dependents: HashMap::new(),
            members: HashMap::new(),
        }),
        kinds: RwLock::default(),
        queue,
        rediscover: Notify::new(),
    });
    let triggers = futures::stream::unfold(triggers, |mut rx| async move {
        rx.recv().await.map(|node| (node, rx))
    });
    let controller = Controller::for_shared_stream(triggers, nodes);
    let runner = Runner::new("garbagecollector", controller).concurrency(8);
    let source = Arc::clone(&collector);
    manager.add_source(move |shutdown| build_graph(source, shutdown).boxed());
    manager.add(runner, reconcile, collector);
}

/// Keeps one metadata watch per collectable resource, rediscovering every [`REDISCOVER`]
/// and whenever a CustomResourceDefinition changes, until shutdown.
async fn build_graph(collector: Arc<Collector>, shutdown: Shutdown) {
    let mut watches: HashMap<ApiResource, tokio::task::JoinHandle<()>> = HashMap::new();
    let crd_watch = {
        let collector = Arc::clone(&collector);
        let crds: Api<CustomResourceDefinition> = Api::all(collector.client.clone());
        tokio::spawn(async move {
            watcher(crds, watcher::Config::default())
                .default_backoff()
                .for_each(|_| {
                    collector.rediscover.notify_one();
                    futures::future::ready(())
                })
                .await;
        })
    };
    loop {
        match discover(&collector.client).await {
            Ok(found) => {
                let served: HashSet<ApiResource> = found.iter().map(|(r, _)| r.clone()).collect();
                if let Ok(mut kinds) = collector.kinds.write() {
                    *kinds = found
                        .iter()
                        .map(|(r, namespaced)| {
                            ((r.group.clone(), r.kind.clone()), (r.clone(), *namespaced))
                        })
                        .collect();
                }
                for (resource, namespaced) in found {
                    if watches.contains_key(&resource) {
                        continue;
                    }
                    let task = tokio::spawn(watch_resource(
                        Arc::clone(&collector),
                        resource.clone(),
                        namespaced,
                    ));
                    watches.insert(resource, task);
                }
                let gone: Vec<ApiResource> = watches
                    .keys()
                    .filter(|r| !served.contains(*r))
                    .cloned()
                    .collect();
                for resource in gone {
                    if let Some(task) = watches.remove(&resource) {
                        task.abort();
                    }
                    let wake = collector.forget(&resource);
                    collector.enqueue(wake).await;
                }
            }
            Err(error) => {
                // Often a group that went away between listing the groups and reading it (a
                // CRD being deleted): look again soon, not after the full period.
                tracing::warn!(%error, "garbage collector: discovery failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    () = shutdown.clone() => break,
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(REDISCOVER) => {}
            () = collector.rediscover.notified() => {}
            () = shutdown.clone() => break,
        }
    }
    crd_watch.abort();
    watches.values().for_each(tokio::task::JoinHandle::abort);
}

/// Every resource that can be listed, watched and deleted, in its preferred version, with
/// whether it is namespaced.
async fn discover(client: &Client) -> Result<Vec<(ApiResource, bool)>, kube::Error> {
    let discovery = crate::discovery::discover(client).await?;
    Ok(discovery
        .groups()
        .flat_map(|group| group.recommended_resources())
        .filter(|(resource, caps)| {
            [verbs::LIST, verbs::WATCH, verbs::DELETE]
                .iter()
                .all(|verb| caps.supports_operation(verb))
                && !IGNORED.contains(&(resource.group.as_str(), resource.plural.as_str()))
        })
        .map(|(resource, caps)| (resource, caps.scope == Scope::Namespaced))
        .collect())
}

/// Feeds the graph from one resource's metadata watch until aborted.
async fn watch_resource(collector: Arc<Collector>, resource: ApiResource, namespaced: bool) {
    // Metadata only: the graph needs nothing else, and whole objects would cost memory.
    let api: Api<PartialObjectMeta<DynamicObject>> =
        Api::all_with(collector.client.clone(), &resource);
    let mut relisted: Option<HashSet<String>> = None;
    let mut events = std::pin::pin!(watcher(api, watcher::Config::default()).default_backoff());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::debug!(resource = %resource.plural, %error, "garbage collector: watch failing; retrying");
                continue;
            }
        };
        let wake = collector.observe(&resource, namespaced, event, &mut relisted);
        collector.enqueue(wake).await;
    }
}

impl Collector {
    /// Queues nodes for a reconcile (the controller dedupes what is already queued).
    async fn enqueue(&self, nodes: Vec<Arc<GraphNode>>) {
        for node in nodes {
            if self.queue.send(node).await.is_err() {
                return;
            }
        }
    }

    fn node(&self, uid: &str) -> Option<Arc<GraphNode>> {
        self.nodes.get(&ObjectRef::new(uid))
    }

    fn dependents_of(&self, uid: &str) -> Vec<Arc<GraphNode>> {
        let uids: Vec<String> = self
            .graph
            .lock()
            .map(|g| {
                g.dependents
                    .get(uid)
                    .map(|d| d.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default();
        uids.iter().filter_map(|d| self.node(d)).collect()
    }

    /// Applies one watch event to the graph; returns the nodes to look at because of it.
    /// A relist (`Init` … `InitDone`) becomes single changes: objects it no longer shows
    /// were deleted while the watch was down.
    fn observe(
        &self,
        resource: &ApiResource,
        namespaced: bool,
        event: watcher::Event<PartialObjectMeta<DynamicObject>>,
        relisted: &mut Option<HashSet<String>>,
    ) -> Vec<Arc<GraphNode>> {
        let Ok(mut graph) = self.graph.lock() else {
            return Vec::new();
        };
        match event {
            watcher::Event::Init => {
                *relisted = Some(HashSet::new());
                Vec::new()
            }
            watcher::Event::InitApply(object) => {
                if let (Some(seen), Some(uid)) = (relisted.as_mut(), object.metadata.uid.clone()) {
                    seen.insert(uid);
                }
                self.upsert(&mut graph, resource, namespaced, object.metadata)
            }
            watcher::Event::Apply(object) => {
                self.upsert(&mut graph, resource, namespaced, object.metadata)
            }
            watcher::Event::Delete(object) => match object.metadata.uid {
                Some(uid) => self.remove(&mut graph, resource, &uid),
                None => Vec::new(),
            },
            watcher::Event::InitDone => {
                let seen = relisted.take().unwrap_or_default();
                let missing: Vec<String> = graph
                    .members
                    .get(resource)
                    .map(|m| m.difference(&seen).cloned().collect())
                    .unwrap_or_default();
                missing
                    .iter()
                    .flat_map(|uid| self.remove(&mut graph, resource, uid))
                    .collect()
            }
        }
    }

    fn upsert(
        &self,
        graph: &mut Graph,
        resource: &ApiResource,
        namespaced: bool,
        object: ObjectMeta,
    ) -> Vec<Arc<GraphNode>> {
        let Some(uid) = object.uid.clone() else {
            return Vec::new();
        };
        let old = self.node(&uid);
        // Only what the collector decides on: labels, annotations and managedFields would
        // multiply the graph's memory for nothing.
        let object = ObjectMeta {
            name: object.name,
            namespace: object.namespace,
            uid: object.uid,
            resource_version: object.resource_version,
            owner_references: object.owner_references,
            finalizers: object.finalizers,
            deletion_timestamp: object.deletion_timestamp,
            ..ObjectMeta::default()
        };
        let node = GraphNode {
            key: ObjectMeta {
                name: Some(uid.clone()),
                ..ObjectMeta::default()
            },
            object,
            resource: resource.clone(),
            namespaced,
        };
        let owners: HashSet<&str> = node.owners().iter().map(|o| o.uid.as_str()).collect();
        let old_owners: HashSet<String> = old
            .as_ref()
            .map(|o| o.owners().iter().map(|r| r.uid.clone()).collect())
            .unwrap_or_default();
        for owner in &owners {
            graph
                .dependents
                .entry((*owner).to_owned())
                .or_default()
                .insert(uid.clone());
        }
        let mut wake = Vec::new();
        for dropped in old_owners.iter().filter(|o| !owners.contains(o.as_str())) {
            unlink_index(graph, dropped, &uid);
            // An owner deleting in the foreground may have waited for this one.
            wake.extend(self.node(dropped));
        }
        graph
            .members
            .entry(resource.clone())
            .or_default()
            .insert(uid.clone());
        let changed = old.as_ref().is_none_or(|o| {
            o.owners() != node.owners()
                || o.deleting() != node.deleting()
                || o.finalizers() != node.finalizers()
        });
        let ours = node.deleting()
            && node
                .finalizers()
                .iter()
                .any(|f| f == FOREGROUND || f == ORPHAN);
        let node = Arc::new(node);
        graph
            .writer
            .apply_watcher_event(&watcher::Event::Apply(node.as_ref().clone()));
        if changed && (ours || !node.owners().is_empty()) {
            wake.push(node);
        }
        wake
    }

    fn remove(&self, graph: &mut Graph, resource: &ApiResource, uid: &str) -> Vec<Arc<GraphNode>> {
        let Some(node) = self.node(uid) else {
            return Vec::new();
        };
        graph
            .writer
            .apply_watcher_event(&watcher::Event::Delete(node.as_ref().clone()));
        if let Some(members) = graph.members.get_mut(resource) {
            members.remove(uid);
        }
        // Its owners may be waiting for it (Foreground); its dependents may dangle now.
        let mut wake: Vec<Arc<GraphNode>> = Vec::new();
        for owner in node.owners() {
            unlink_index(graph, &owner.uid, uid);
            wake.extend(self.node(&owner.uid));
        }
        if let Some(dependents) = graph.dependents.get(uid) {
            wake.extend(dependents.iter().filter_map(|d| self.node(d)));
        }
        wake
    }

    /// Drops every node of a resource no longer served (its CRD deleted).
    fn forget(&self, resource: &ApiResource) -> Vec<Arc<GraphNode>> {
        let Ok(mut graph) = self.graph.lock() else {
            return Vec::new();
        };
        let uids: Vec<String> = graph
            .members
            .remove(resource)
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        uids.iter()
            .flat_map(|uid| self.remove(&mut graph, resource, uid))
            .collect()
    }

    fn api(&self, resource: &ApiResource, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, resource),
            None => Api::all_with(self.client.clone(), resource),
        }
    }

    fn api_of(&self, node: &GraphNode) -> Api<DynamicObject> {
        self.api(
            &node.resource,
            node.object.namespace.as_deref().filter(|_| node.namespaced),
        )
    }

    /// The resource an owner reference names (by group and kind: any version will do).
    fn resolve(&self, reference: &OwnerReference) -> Option<(ApiResource, bool)> {
        let group = match reference.api_version.split_once('/') {
            Some((group, _)) => group,
            None => "",
        };
        self.kinds
            .read()
            .ok()?
            .get(&(group.to_owned(), reference.kind.clone()))
            .cloned()
    }

    /// Whether `owner` of `dependent` exists: from the graph when it is there, else by a
    /// live GET (the graph may not have seen a new owner yet).
    async fn owner_state(
        &self,
        dependent: &GraphNode,
        namespace: Option<&str>,
        owner: &OwnerReference,
    ) -> Result<OwnerState, GarbageError> {
        if let Some(node) = self.node(&owner.uid) {
            return Ok(OwnerState::of(&node.object));
        }
        let Some((resource, namespaced)) = self.resolve(owner) else {
            // Perhaps a kind just added: look again soon.
            self.rediscover.notify_one();
            return Err(GarbageError::UnknownKind {
                api_version: owner.api_version.clone(),
                kind: owner.kind.clone(),
                object: dependent.describe(),
            });
        };
        let namespace = match (namespaced, namespace) {
            (false, _) => None,
            (true, Some(ns)) => Some(ns),
            // A cluster-scoped object cannot have a namespaced owner: the reference cannot
            // be resolved, and such an object is never collected (as in Kubernetes).
            (true, None) => return Ok(OwnerState::Solid),
        };
        let found = self
            .api(&resource, namespace)
            .get_metadata_opt(&owner.name)
            .await
            .map_err(|source| GarbageError::Api {
                action: format!("reading owner {} {}", owner.kind, owner.name),
                source,
            })?;
        Ok(match found {
            Some(o) if o.metadata.uid.as_deref() == Some(owner.uid.as_str()) => {
                OwnerState::of(&o.metadata)
            }
            _ => OwnerState::Absent,
        })
    }

    /// Deletes `node` with `policy`, preconditioned on its uid (and resourceVersion, when
    /// given): a successor with the same name is never hit.
    async fn delete(
        &self,
        node: &GraphNode,
        policy: PropagationPolicy,
        resource_version: Option<String>,
    ) -> Result<(), GarbageError> {
        let params = DeleteParams {
            propagation_policy: Some(policy),
            preconditions: Some(Preconditions {
                uid: Some(node.uid().to_owned()),
                resource_version,
            }),
            ..DeleteParams::default()
        };
        tracing::debug!(object = %node.describe(), "garbage collector: deleting");
        match self.api_of(node).delete(node.name(), &params).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(GarbageError::Api {
                action: format!("deleting {}", node.describe()),
                source,
            }),
        }
    }

    /// Merge-patches `node`'s metadata, preconditioned on the resourceVersion the graph has
    /// (a stale one is a Conflict, retried once the graph has caught up).
    async fn patch_meta(
        &self,
        node: &GraphNode,
        field: &str,
        value: serde_json::Value,
    ) -> Result<(), GarbageError> {
        let patch = json!({"metadata": {
            field: value,
            "resourceVersion": node.object.resource_version,
        }});
        match self
            .api_of(node)
            .patch(node.name(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
            Err(source) => Err(GarbageError::Api {
                action: format!("updating the {field} of {}", node.describe()),
                source,
            }),
        }
    }

    /// Makes `node`'s reference to owner `uid` non-blocking (`blockOwnerDeletion: false`).
    async fn unblock(&self, node: &GraphNode, uid: &str) -> Result<(), GarbageError> {
        let owners: Vec<OwnerReference> = node
            .owners()
            .iter()
            .cloned()
            .map(|mut o| {
                if o.uid == uid {
                    o.block_owner_deletion = Some(false);
                }
                o
            })
            .collect();
        self.patch_meta(node, "ownerReferences", json!(owners))
            .await
    }

    /// Removes the references to the owners `uids` from `node`.
    async fn unlink(&self, node: &GraphNode, uids: &[&str]) -> Result<(), GarbageError> {
        let kept: Vec<&OwnerReference> = node
            .owners()
            .iter()
            .filter(|o| !uids.contains(&o.uid.as_str()))
            .collect();
        let value = if kept.is_empty() {
            serde_json::Value::Null
        } else {
            json!(kept)
        };
        self.patch_meta(node, "ownerReferences", value).await
    }

    async fn remove_finalizer(
        &self,
        node: &GraphNode,
        finalizer: &str,
    ) -> Result<(), GarbageError> {
        let kept: Vec<&String> = node
            .finalizers()
            .iter()
            .filter(|f| *f != finalizer)
            .collect();
        let value = if kept.is_empty() {
            serde_json::Value::Null
        } else {
            json!(kept)
        };
        self.patch_meta(node, "finalizers", value).await
    }
}

fn unlink_index(graph: &mut Graph, owner: &str, dependent: &str) {
    if let Some(set) = graph.dependents.get_mut(owner) {
        set.remove(dependent);
        if set.is_empty() {
            graph.dependents.remove(owner);
        }
    }
}

/// What an owner reference points at, as the collector classifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OwnerState {
    /// It exists and is not being deleted in the foreground.
    Solid,
    /// It is being deleted in the foreground: it deletes its dependents itself.
    Waiting,
    /// It does not exist (or another object with its name does).
    Absent,
}

impl OwnerState {
    fn of(owner: &ObjectMeta) -> OwnerState {
        let foreground = owner.deletion_timestamp.is_some()
            && owner.finalizers.iter().flatten().any(|f| f == FOREGROUND);
        if foreground {
            OwnerState::Waiting
        } else {
            OwnerState::Solid
        }
    }
}

async fn reconcile(node: Arc<GraphNode>, gc: Arc<Collector>) -> Result<Action, GarbageError> {
    if node.deleting() {
        if node.finalizers().iter().any(|f| f == ORPHAN) {
            return orphan_dependents(&node, &gc).await;
        }
        if node.finalizers().iter().any(|f| f == FOREGROUND) {
            return delete_dependents(&node, &gc).await;
        }
        // Being deleted already: nothing to collect.
        return Ok(Action::await_change());
    }
    if node.owners().is_empty() {
        return Ok(Action::await_change());
    }
    collect_if_dangling(&node, &gc).await
}

/// Orphan: every dependent loses its reference to `owner`, then the finalizer goes.
async fn orphan_dependents(owner: &GraphNode, gc: &Collector) -> Result<Action, GarbageError> {
    for dependent in gc.dependents_of(owner.uid()) {
        gc.unlink(&dependent, &[owner.uid()]).await?;
    }
    gc.remove_finalizer(owner, ORPHAN).await?;
    Ok(Action::await_change())
}

/// Foreground: delete the dependents (in the foreground too, so the chain cascades; a
/// dependent with another live owner only loses its reference), and let `owner` go once no
/// blocking dependent is left.
async fn delete_dependents(owner: &GraphNode, gc: &Collector) -> Result<Action, GarbageError> {
    let mut blocked = false;
    for dependent in gc.dependents_of(owner.uid()) {
        let blocks = dependent
            .owners()
            .iter()
            .any(|o| o.uid == owner.uid() && o.block_owner_deletion == Some(true));
        if dependent.deleting() {
            // A dependent itself waiting for its own dependents in the foreground may be
            // waiting, around a cycle of references, for this owner: its reference stops
            // blocking (kube's cycle breaking), so the cycle unwinds.
            if blocks && dependent.finalizers().iter().any(|f| f == FOREGROUND) {
                gc.unblock(&dependent, owner.uid()).await?;
                continue;
            }
            blocked |= blocks;
            continue;
        }
        let kept_by_another = dependent.owners().iter().any(|o| {
            o.uid != owner.uid()
                && gc
                    .node(&o.uid)
                    .is_some_and(|n| OwnerState::of(&n.object) == OwnerState::Solid)
        });
        if kept_by_another {
            gc.unlink(&dependent, &[owner.uid()]).await?;
        } else {
            // Preconditioned on the version the graph judged: a dependent given another
            // owner a moment ago (not yet in the graph) is a Conflict, retried once the
            // graph has caught up, rather than deleted.
            gc.delete(
                &dependent,
                PropagationPolicy::Foreground,
                dependent.object.resource_version.clone(),
            )
            .await?;
            blocked |= blocks;
        }
    }
    if blocked {
        // The dependents' deletions (or unlinks) wake the owner again.
        return Ok(Action::requeue(FOREGROUND_RECHECK));
    }
    gc.remove_finalizer(owner, FOREGROUND).await?;
    Ok(Action::await_change())
}

/// Deletes `node` when all its owners are gone; removes the dangling references when only
/// some are.
async fn collect_if_dangling(node: &GraphNode, gc: &Collector) -> Result<Action, GarbageError> {
    // Cheap first pass over the graph: nothing to do while every owner is there.
    if node.owners().iter().all(|o| gc.node(&o.uid).is_some()) {
        return Ok(Action::await_change());
    }
    // Decide on the object as it is now, not as the graph last saw it: its references may
    // have changed (an orphaning that the graph has not seen yet).
    let live = gc
        .api_of(node)
        .get_metadata_opt(node.name())
        .await
        .map_err(|source| GarbageError::Api {
            action: format!("reading {}", node.describe()),
            source,
        })?;
    let Some(live) = live.filter(|l| l.metadata.uid.as_deref() == Some(node.uid())) else {
        return Ok(Action::await_change());
    };
    if live.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let owners = live.metadata.owner_references.clone().unwrap_or_default();
    let namespace = node.object.namespace.as_deref().filter(|_| node.namespaced);
    let mut absent = Vec::new();
    let mut present = false;
    for owner in &owners {
        match gc.owner_state(node, namespace, owner).await? {
            OwnerState::Absent => absent.push(owner.uid.as_str()),
            OwnerState::Solid | OwnerState::Waiting => present = true,
        }
    }
    if absent.is_empty() {
        return Ok(Action::await_change());
    }
    if !present {
        gc.delete(
            node,
            PropagationPolicy::Background,
            live.metadata.resource_version.clone(),
        )
        .await?;
        return Ok(Action::await_change());
    }
    let current = GraphNode {
        object: live.metadata,
        ..node.clone()
    };
    gc.unlink(&current, &absent).await?;
    Ok(Action::await_change())
}
