//! The generic resource engine: CRUD and list for any resource over the versioned store.
//!
//! Objects are stored as JSON without `metadata.resourceVersion`; the store's `mod_revision`
//! *is* the resourceVersion and is set on the way out. That makes a no-op write detectable
//! as "same bytes" (and kept from the store: same resourceVersion, no event).

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use orquestra_store::{KeyValue, ListOptions, Store};
use serde_json::{Value, json};

use crate::admission::webhook;
use crate::cache::WatchCache;
use crate::error::ApiError;
use crate::object::{
    check_type, conform, drop_empty_metadata, meta_str, metadata_mut, now, random_suffix, spec_of,
    strip_nulls_of, validate_meta,
};
use crate::registry::{Registry, ResourceDef};
use crate::request::{Params, Target};
use crate::selector::{FieldSelector, LabelSelector};

/// The namespaces that exist from the first start.
pub const BOOT_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public", "kube-node-lease"];

/// The engine: a store and the resources it serves.
#[derive(Debug, Clone)]
pub struct Engine {
    pub(crate) store: Arc<dyn Store>,
    /// The resources served.
    pub registry: Arc<Registry>,
    /// The in-memory mirror LISTs are served from.
    cache: WatchCache,
    /// How long the HTTP layer lets a non-watch request run.
    pub request_timeout: std::time::Duration,
    /// The range Services' cluster IPs come from.
    pub service_cidr: crate::service::ServiceCidr,
    /// The `tolerationSeconds` of the `not-ready` and `unreachable` NoExecute tolerations
    /// every new pod gets unless it has its own (kube-apiserver's DefaultTolerationSeconds
    /// admission: how long a pod stays on a lost node before it is evicted).
    pub default_toleration_seconds: i64,
    /// The bearer token presented to node agents when proxying to them (`pods/log`).
    pub kubelet_token: Arc<std::sync::OnceLock<String>>,
    node_client: Arc<std::sync::OnceLock<reqwest::Client>>,
    /// Signs and checks service account tokens (set once; an in-memory key by default).
    token_issuer: Arc<std::sync::OnceLock<crate::token::TokenIssuer>>,
    /// Namespaces this engine marked for deletion, until they are gone or made again: a
    /// create right after the delete is refused even before the watch cache shows it.
    terminating: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Who the bearer tokens belong to (TokenReview), once the server authenticates.
    authenticator: Arc<std::sync::OnceLock<Arc<crate::identity::Authenticator>>>,
    /// Whether requests are authorized by RBAC (reviews answer by it), once set.
    rbac: Arc<std::sync::atomic::AtomicBool>,
    /// Admission webhooks' clients and metrics.
    webhooks: Arc<crate::admission::webhook::Webhooks>,
    /// The nodes' and pods' latest resource use (`metrics.k8s.io`).
    resource_metrics: Arc<crate::resource_metrics::ResourceMetrics>,
    /// The client identity requests to aggregated API servers carry, once set.
    front_proxy: Arc<std::sync::OnceLock<crate::aggregator::FrontProxy>>,
}

/// Turns a stored key-value into the object clients see.
pub(crate) fn decode(kv: &KeyValue) -> Result<Value, ApiError> {
    let mut object: Value = serde_json::from_slice(&kv.value).map_err(|e| {
        ApiError::Storage(orquestra_store::Error::InvalidArgument {
            message: format!("stored object {:?} is not JSON: {e}", kv.key),
        })
    })?;
    set_resource_version(&mut object, kv.mod_revision);
    Ok(object)
}

pub(crate) fn set_resource_version(object: &mut Value, revision: i64) {
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.insert(
            "resourceVersion".into(),
            Value::String(revision.to_string()),
        );
    }
}

/// The bytes to store: the object without its resourceVersion.
fn encode(object: &Value) -> Result<Bytes, ApiError> {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    serde_json::to_vec(&copy)
        .map(Bytes::from)
        .map_err(|e| ApiError::BadRequest(format!("cannot encode object: {e}")))
}

/// A list continue token: the snapshot revision and the last key returned. A revision of 0
/// continues at the latest revision (the inconsistent token a compacted snapshot's 410
/// offers).
#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: i64,
    start: String,
}

impl Continue {
    fn parse(token: &str) -> Result<Continue, ApiError> {
        base64::engine::general_purpose::STANDARD
            .decode(token)
            .ok()
            .and_then(|b| serde_json::from_slice::<Continue>(&b).ok())
            .ok_or_else(|| ApiError::BadRequest(format!("invalid continue token {token:?}")))
    }

    fn encode(&self) -> String {
        base64::engine::general_purpose::STANDARD
            .encode(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// A list answered from the watch cache: its metadata and the objects as cached.
#[derive(Debug)]
pub struct CachedList {
    /// The list's `ListMeta`.
    pub metadata: Value,
    /// The objects, as stored (so as served: see [`Engine::list_cached_as_stored`]).
    pub items: Vec<crate::cache::Entry>,
}

impl Engine {
    /// An engine over `store` serving `registry`.
    /// Starts its watch cache, so it must be called inside a Tokio runtime.
    pub fn new(store: Arc<dyn Store>, registry: Arc<Registry>) -> Engine {
        let cache = WatchCache::start(Arc::clone(&store));
        Engine {
            store,
            registry,
            cache,
            request_timeout: crate::DEFAULT_REQUEST_TIMEOUT,
            service_cidr: crate::service::ServiceCidr::DEFAULT,
            default_toleration_seconds: crate::admission::DEFAULT_TOLERATION_SECONDS,
            kubelet_token: Arc::default(),
            node_client: Arc::default(),
            token_issuer: Arc::default(),
            terminating: Arc::default(),
            authenticator: Arc::default(),
            rbac: Arc::default(),
            webhooks: Arc::default(),
            resource_metrics: Arc::default(),
            front_proxy: Arc::default(),
        }
    }

    /// Runs the mutating admission policies, then the mutating webhooks, on `object`; what
    /// they change gets the kind's defaults again (kube-apiserver decodes a patched object, defaulting it), and may not
    /// move it to another name or namespace.
    async fn mutate_by_webhooks(
        &self,
        attributes: &webhook::Attributes<'_>,
        object: &mut Value,
    ) -> Result<(), ApiError> {
        let before = object.clone();
        crate::admission::policy::mutating::mutate(self, attributes, object).await?;
        webhook::mutate(self, attributes, object).await?;
        if *object == before {
            return Ok(());
        }
        for field in ["name", "namespace"] {
            if object["metadata"][field] != before["metadata"][field] {
                return Err(ApiError::BadRequest(format!(
                    "mutating admission changed metadata.{field} of {:?}",
                    attributes.name
                )));
            }
        }
        crate::admission::on_write(attributes.def, object);
        Ok(())
    }

    /// Sets the front-proxy client identity requests to aggregated API servers carry (once:
    /// false after).
    pub fn set_front_proxy(&self, front_proxy: crate::aggregator::FrontProxy) -> bool {
        self.front_proxy.set(front_proxy).is_ok()
    }

    /// The front-proxy client identity, if set.
    pub fn front_proxy(&self) -> Option<&crate::aggregator::FrontProxy> {
        self.front_proxy.get()
    }

    /// The nodes' and pods' latest resource use, as [`crate::resource_metrics::scrape`]
    /// leaves it.
    pub fn resource_metrics(&self) -> &crate::resource_metrics::ResourceMetrics {
        &self.resource_metrics
    }

    /// Admission webhooks' clients and metrics (register these with the server's metrics).
    pub fn webhooks(&self) -> &crate::admission::webhook::Webhooks {
        &self.webhooks
    }

    /// Records how the server authenticates and authorizes, for the reviews: `authenticator`
    /// (if requests are authenticated) tells whose a token is, and `rbac` says whether access
    /// is decided by RBAC (else everything is allowed).
    pub fn set_access(
        &self,
        authenticator: Option<Arc<crate::identity::Authenticator>>,
        rbac: bool,
    ) {
        if let Some(authenticator) = authenticator {
            let _ = self.authenticator.set(authenticator);
        }
        self.rbac.store(rbac, std::sync::atomic::Ordering::Relaxed);
    }

    /// `object` (stored in its kind's storage version) as a client of `def`'s version sees
    /// it ([`crate::convert`]).
    pub(crate) async fn to_client(
        &self,
        def: &ResourceDef,
        object: &mut Value,
    ) -> Result<(), ApiError> {
        self.to_client_all(def, std::slice::from_mut(object)).await
    }

    /// [`Engine::to_client`] for many objects: a CRD's conversion webhook gets them all in one
    /// review.
    pub(crate) async fn to_client_all(
        &self,
        def: &ResourceDef,
        objects: &mut [Value],
    ) -> Result<(), ApiError> {
        if let Some(hook) = &def.conversion {
            // Boxed: finding the webhook's Service reads through the engine again.
            let api_version = def.api_version();
            Box::pin(crate::convert::webhook::convert(
                self,
                def,
                hook,
                &api_version,
                objects,
            ))
            .await?;
        }
        for object in objects {
            crate::convert::for_client(def, object);
        }
        Ok(())
    }

    /// `object` (in `def`'s version) as it is stored: in its kind's storage version.
    pub(crate) async fn to_storage(
        &self,
        def: &ResourceDef,
        object: &mut Value,
    ) -> Result<(), ApiError> {
        if def.storage {
            return Ok(());
        }
        let storage = match crate::convert::stored_in(&def.group, &def.plural) {
            Some((group, version)) => self.registry.get(group, version, &def.plural),
            None => self.registry.storage_version(&def.group, &def.plural),
        };
        if let Some(storage) = storage {
            let api_version = storage.api_version();
            if let Some(hook) = &def.conversion {
                let objects = std::slice::from_mut(object);
                Box::pin(crate::convert::webhook::convert(
                    self,
                    def,
                    hook,
                    &api_version,
                    objects,
                ))
                .await?;
            }
            crate::convert::convert(&def.group, &def.kind, object, &api_version);
        }
        Ok(())
    }

    /// The authenticator, if the server authenticates requests.
    pub fn authenticator(&self) -> Option<&crate::identity::Authenticator> {
        self.authenticator.get().map(Arc::as_ref)
    }

    /// Whether access is decided by RBAC.
    pub fn authorizes_by_rbac(&self) -> bool {
        self.rbac.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The client for node agents and proxied pods and services: certificates are not
    /// verified (agents' are self-signed; kube-apiserver's proxy transport skips the check
    /// too), redirects are not followed.
    pub(crate) fn node_client(&self) -> Result<reqwest::Client, ApiError> {
        if let Some(client) = self.node_client.get() {
            return Ok(client.clone());
        }
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(true)
            .connect_timeout(std::time::Duration::from_secs(5))
            // Proxied answers go back as they are: a redirect is the client's to follow.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| ApiError::Internal(format!("building the node agent client: {e}")))?;
        Ok(self.node_client.get_or_init(|| client).clone())
    }

    /// Signs service account tokens with `issuer` (its key from the data dir) instead of a
    /// key made up in memory. Only before the first token is issued or checked: false after.
    pub fn set_token_issuer(&self, issuer: crate::token::TokenIssuer) -> bool {
        self.token_issuer.set(issuer).is_ok()
    }

    /// The service account token issuer; one with an in-memory key unless
    /// [`Engine::set_token_issuer`] was called first.
    pub fn token_issuer(&self) -> Result<&crate::token::TokenIssuer, ApiError> {
        if self.token_issuer.get().is_none() {
            let generated = crate::token::TokenIssuer::generate()
                .map_err(|e| ApiError::Internal(format!("{e}")))?;
            let _ = self.token_issuer.set(generated);
        }
        self.token_issuer
            .get()
            .ok_or_else(|| ApiError::Internal("no service account token issuer".into()))
    }

    /// The watch cache LISTs are served from.
    pub fn cache(&self) -> &WatchCache {
        &self.cache
    }

    /// Creates the namespaces every cluster has, if they are missing.
    pub async fn ensure_boot_namespaces(&self) -> Result<(), ApiError> {
        let def = self
            .registry
            .get("", "v1", "namespaces")
            .ok_or(ApiError::NoRoute)?;
        for name in BOOT_NAMESPACES {
            let object =
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
            match self.create(&def, None, object, false).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads one object.
    pub async fn get(&self, target: &Target) -> Result<Value, ApiError> {
        let (key, name) = self.named(target)?;
        let mut object = decode(&self.stored(&target.def, &key, &name).await?)?;
        self.to_client(&target.def, &mut object).await?;
        Ok(object)
    }

    /// The stored key-value of an object, or NotFound.
    async fn stored(&self, def: &ResourceDef, key: &str, name: &str) -> Result<KeyValue, ApiError> {
        self.store
            .get(key, None)
            .await?
            .1
            .ok_or_else(|| ApiError::not_found(def, name))
    }

    fn named(&self, target: &Target) -> Result<(String, String), ApiError> {
        let name = target.name.clone().ok_or(ApiError::MethodNotAllowed)?;
        let key = target.key().ok_or(ApiError::MethodNotAllowed)?;
        Ok((key, name))
    }

    /// Fails with NotFound unless namespace `ns` exists, and with Forbidden while it is being
    /// deleted (kube-apiserver's NamespaceLifecycle admission): the namespace controller
    /// could otherwise never empty it. `name` (or the generateName prefix) is for the message.
    async fn require_namespace(
        &self,
        def: &ResourceDef,
        name: &str,
        ns: &str,
    ) -> Result<(), ApiError> {
        let Some(namespaces) = self.registry.get("", "v1", "namespaces") else {
            return Ok(());
        };
        let key = namespaces.key(None, ns);
        // Namespaces are long-lived: the cache answers yes; a no is checked with the store
        // (the namespace may have been created a moment ago). A deletion the cache has not
        // seen yet may let a create through, as in Kubernetes: the namespace controller
        // deletes until nothing is left.
        let marked_here = self
            .terminating
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(ns);
        let terminating = match self.cache.get(&key) {
            // Creates are hot: decode the namespace only when its JSON may be marked.
            Some(entry) => {
                contains(&entry.json, b"\"deletionTimestamp\"")
                    && entry
                        .decode()
                        .is_some_and(|ns| ns.pointer("/metadata/deletionTimestamp").is_some())
            }
            None => match self.store.get(&key, None).await?.1 {
                Some(kv) => decode(&kv)?
                    .pointer("/metadata/deletionTimestamp")
                    .is_some(),
                None => return Err(ApiError::not_found(&namespaces, ns)),
            },
        };
        if terminating || marked_here {
            return Err(ApiError::namespace_terminating(def, name, ns));
        }
        Ok(())
    }

    /// Creates an object in the collection `def` (in namespace `ns`). A name made from
    /// `generateName` that is taken is made again, up to 8 times (as kube-apiserver does).
    pub async fn create(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let generated = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.create_once(def, ns, object.clone(), dry_run).await {
                Err(ApiError::AlreadyExists { .. }) if generated && attempts < 8 => continue,
                other => return other,
            }
        }
    }

    async fn create_once(
        &self,
        def: &ResourceDef,
        ns: Option<&str>,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(def, &mut object)?;
        strip_nulls_of(def, &mut object);
        if is_csr(def) {
            stamp_requester(&mut object);
        }
        if let Some(ns) = ns.filter(|_| def.namespaced) {
            // Before the name is generated, as kube-apiserver's admission does: a refusal
            // names the object by its generateName prefix then.
            let shown = ["name", "generateName"]
                .iter()
                .find_map(|field| meta_str(&object, field).filter(|n| !n.is_empty()))
                .unwrap_or("Unknown")
                .to_owned();
            self.require_namespace(def, &shown, ns).await?;
        }
        let meta = metadata_mut(&mut object)?;
        if meta
            .get("name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{}", random_suffix());
                    meta.insert("name".into(), Value::String(name));
                }
                _ => {
                    return Err(ApiError::invalid(
                        def,
                        "",
                        "metadata.name",
                        "FieldValueRequired",
                        "Required value: name or generateName is required".into(),
                    ));
                }
            }
        }
        if def.namespaced {
            let ns = ns.ok_or_else(|| {
                ApiError::BadRequest(format!("{} must be created in a namespace", def.plural))
            })?;
            match meta.get("namespace").and_then(Value::as_str) {
                Some(given) if !given.is_empty() && given != ns => {
                    return Err(ApiError::BadRequest(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                _ => {
                    meta.insert("namespace".into(), Value::String(ns.to_owned()));
                }
            }
        } else {
            meta.remove("namespace");
        }
        for server_owned in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            meta.remove(server_owned);
        }
        meta.insert(
            "uid".into(),
            Value::String(uuid::Uuid::new_v4().to_string()),
        );
        meta.insert("creationTimestamp".into(), Value::String(now()));
        meta.insert("generation".into(), json!(1));
        drop_empty_metadata(&mut object);
        crate::admission::default_on_create(def, &mut object);
        if def.group.is_empty() && def.kind == "Pod" {
            crate::admission::default_tolerations(&mut object, self.default_toleration_seconds);
        }
        crate::admission::runtime_class::admit(self, def, &mut object).await?;
        crate::admission::storage_class::admit(self, def, &mut object).await?;
        crate::admission::ingress_class::admit(self, def, &mut object).await?;
        crate::admission::priority::admit(self, def, &mut object).await?;
        crate::admission::service_account::admit(self, def, &mut object).await?;
        if let Some(ns) = ns.filter(|_| def.namespaced) {
            crate::quota::apply_limits(self, def, ns, &mut object).await?;
        }
        let name = meta_str(&object, "name").unwrap_or_default().to_owned();
        let attributes = webhook::Attributes {
            def,
            namespace: ns.filter(|_| def.namespaced),
            name: &name,
            subresource: None,
            operation: webhook::Operation::Create,
            old_object: None,
            dry_run,
        };
        self.mutate_by_webhooks(&attributes, &mut object).await?;
        validate_meta(def, &object)?;
        conform(def, &mut object, None)?;
        if crate::crd::is_crd(def) {
            crate::crd::admit(def, &mut object, None)?;
        }
        crate::admission::validate_request(self, &attributes, Some(&object)).await?;
        if let Some(ns) = ns.filter(|_| def.namespaced) {
            crate::quota::admit_create(self, def, ns, &object, dry_run).await?;
        }
        let key = def.key(ns, &name);
        if is_namespace(def) && !dry_run {
            // A namespace made again under an old name starts Active.
            self.terminating
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&name);
        }
        if crate::service::is_service(def) && !dry_run {
            crate::service::admit_create(self, &mut object).await?;
        }
        self.to_storage(def, &mut object).await?;
        let bytes = encode(&object)?;
        self.to_client(def, &mut object).await?;
        if dry_run {
            return match self.store.get(&key, None).await?.1 {
                Some(_) => Err(ApiError::already_exists(def, &name)),
                None => Ok(object),
            };
        }
        match self.store.create(&key, bytes).await {
            Ok(kv) => {
                set_resource_version(&mut object, kv.mod_revision);
                if crate::crd::is_crd(def) {
                    crate::crd::register(self, &object, false);
                }
                Ok(object)
            }
            Err(error) => {
                if crate::service::is_service(def) {
                    crate::service::release(self, &object).await;
                }
                match error {
                    orquestra_store::Error::AlreadyExists { .. } => {
                        Err(ApiError::already_exists(def, &name))
                    }
                    e => Err(e.into()),
                }
            }
        }
    }

    /// Replaces an object (PUT), or its status (`/status`). Without a resourceVersion in the
    /// body the update is unconditional; with one, a stale one is a Conflict.
    pub async fn update(
        &self,
        target: &Target,
        mut body: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let def = &target.def;
        let (key, name) = self.named(target)?;
        check_type(def, &mut body)?;
        strip_nulls_of(def, &mut body);
        if meta_str(&body, "name").is_some_and(|n| n != name) {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({}) does not match the name on the URL ({name})",
                meta_str(&body, "name").unwrap_or_default()
            )));
        }
        let expected: Option<i64> = match meta_str(&body, "resourceVersion") {
            None | Some("") => None,
            Some(rv) => Some(
                rv.parse()
                    .map_err(|_| ApiError::BadRequest(format!("invalid resourceVersion {rv:?}")))?,
            ),
        };
        let part = Part::of(def, target.subresource.as_deref());
        loop {
            let current = self.stored(def, &key, &name).await?;
            if expected.is_some_and(|rv| rv != current.mod_revision) {
                return Err(ApiError::stale(def, &name));
            }
            let mut old = decode(&current)?;
            self.to_client(def, &mut old).await?;
            let mut new = merge_update(def, &old, &body, part)?;
            crate::admission::on_write(def, &mut new);
            let attributes = webhook::Attributes {
                def,
                namespace: target.namespace.as_deref().filter(|_| def.namespaced),
                name: &name,
                subresource: target.subresource.as_deref(),
                operation: webhook::Operation::Update,
                old_object: Some(&old),
                dry_run,
            };
            self.mutate_by_webhooks(&attributes, &mut new).await?;
            if def.group.is_empty() && def.kind == "Pod" && matches!(part, Part::Main) {
                crate::admission::check_pod_update(&old, &new).map_err(|cause| {
                    ApiError::Invalid {
                        kind: def.kind.clone(),
                        name: name.clone(),
                        group: def.group.clone(),
                        causes: vec![cause],
                    }
                })?;
            }
            if crate::service::is_service(def) {
                crate::service::keep_allocations(&old, &mut new);
                crate::service::check_immutable(&old, &new)?;
            }
            let causes = crate::admission::check_immutable_data(def, &old, &new);
            if !causes.is_empty() {
                return Err(ApiError::Invalid {
                    kind: def.kind.clone(),
                    name: name.clone(),
                    group: def.group.clone(),
                    causes,
                });
            }
            validate_meta(def, &new)?;
            conform(def, &mut new, Some(&old))?;
            if crate::crd::is_crd(def) && matches!(part, Part::Main) {
                crate::crd::admit(def, &mut new, Some(&old))?;
            }
            crate::admission::validate_request(self, &attributes, Some(&new)).await?;
            if let Some(ns) = target.namespace.as_deref().filter(|_| def.namespaced) {
                crate::quota::admit_update(self, def, ns, &old, &new, dry_run).await?;
            }
            // A Service that changes type or ports: what it newly needs is allocated last,
            // so a refusal above leaves nothing taken.
            let reallocation = if crate::service::is_service(def) && matches!(part, Part::Main) {
                Some(crate::service::admit_update(self, &old, &mut new, dry_run).await?)
            } else {
                None
            };
            let written = self.write(def, &key, &name, &current, new, dry_run).await;
            if let Some(reallocation) = reallocation {
                match &written {
                    Ok(object) => reallocation.done(self, object).await,
                    Err(_) => reallocation.undo(self, &old).await,
                }
            }
            match written {
                Err(ApiError::Conflict { .. }) if expected.is_none() => continue,
                other => return other,
            }
        }
    }

    /// Writes `new` over `current`: nothing if unchanged, a delete if a finalized object has
    /// lost its last finalizer, else a compare-and-swap.
    pub(crate) async fn write(
        &self,
        def: &ResourceDef,
        key: &str,
        name: &str,
        current: &KeyValue,
        mut new: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        // `new` is in `def`'s version; the store holds the storage version.
        self.to_storage(def, &mut new).await?;
        let bytes = encode(&new)?;
        self.to_client(def, &mut new).await?;
        if bytes == current.value {
            let mut unchanged = decode(current)?;
            self.to_client(def, &mut unchanged).await?;
            return Ok(unchanged);
        }
        if dry_run {
            set_resource_version(&mut new, current.mod_revision);
            return Ok(new);
        }
        // Marked for deletion with no finalizers left: gone — unless a grace period runs (a
        // pod its node agent is stopping; the agent's delete with grace 0 removes it). A
        // namespace also waits for its `spec.finalizers` (the namespace controller's).
        let finalized = new.pointer("/metadata/deletionTimestamp").is_some()
            && new
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            && !(is_namespace(def) && has_spec_finalizers(&new))
            && new
                .pointer("/metadata/deletionGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                == 0;
        let result = if finalized {
            self.store
                .delete(key, Some(current.mod_revision))
                .await
                .map(|(revision, _)| revision)
        } else {
            self.store
                .update(key, bytes, current.mod_revision)
                .await
                .map(|kv| kv.mod_revision)
        };
        match result {
            Ok(revision) => {
                set_resource_version(&mut new, revision);
                if crate::crd::is_crd(def) {
                    crate::crd::register(self, &new, finalized);
                    if finalized {
                        crate::crd::delete_objects(self, &new).await?;
                    }
                }
                if finalized && crate::service::is_service(def) {
                    crate::service::release(self, &new).await;
                }
                Ok(new)
            }
            Err(orquestra_store::Error::Conflict { .. }) => Err(ApiError::stale(def, name)),
            Err(orquestra_store::Error::NotFound { .. }) => Err(ApiError::not_found(def, name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes every object of a collection the selectors match, each as [`Engine::delete`]
    /// would (graceful deletion and finalizers included), and returns them as a list — what
    /// kube-apiserver's DELETE on a collection does. An object deleted meanwhile is skipped.
    pub async fn delete_collection(
        &self,
        target: &Target,
        options: &Value,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let list = self.list(target, params).await?;
        let mut deleted = Vec::new();
        for item in list["items"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let one = Target {
                def: Arc::clone(&target.def),
                namespace: meta_str(item, "namespace").map(str::to_owned),
                name: meta_str(item, "name").map(str::to_owned),
                subresource: None,
            };
            match self.delete(&one, options, params).await {
                Ok(object) => deleted.push(object),
                Err(ApiError::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(json!({
            "kind": format!("{}List", target.def.kind),
            "apiVersion": target.def.api_version(),
            "metadata": {"resourceVersion": list["metadata"]["resourceVersion"]},
            "items": deleted,
        }))
    }

    /// Deletes an object: at once, or — while it has finalizers — by marking it with a
    /// deletionTimestamp. Returns the object as it was deleted or marked.
    pub async fn delete(
        &self,
        target: &Target,
        options: &Value,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let def = &target.def;
        let (key, name) = self.named(target)?;
        let dry_run = params.dry_run()?;
        let mut admitted = false;
        loop {
            let current = self.stored(def, &key, &name).await?;
            let mut object = decode(&current)?;
            if let Err(error) = self.to_client(def, &mut object).await {
                // A conversion webhook that is gone must not make its objects undeletable:
                // the delete goes on with the object relabelled, as stored.
                tracing::warn!(%error, "deleting {name} unconverted");
                crate::convert::for_client(def, &mut object);
            }
            if !admitted {
                // Admission sees the object as it is when the delete is asked for.
                let attributes = webhook::Attributes {
                    def,
                    namespace: target.namespace.as_deref().filter(|_| def.namespaced),
                    name: &name,
                    subresource: None,
                    operation: webhook::Operation::Delete,
                    old_object: Some(&object),
                    dry_run,
                };
                webhook::mutate(self, &attributes, &mut Value::Null).await?;
                crate::admission::validate_request(self, &attributes, None).await?;
                admitted = true;
            }
            if let Some(pre) = options.get("preconditions") {
                if let Some(uid) = pre.get("uid").and_then(Value::as_str) {
                    if meta_str(&object, "uid") != Some(uid) {
                        return Err(ApiError::Conflict {
                            resource: def.plural.clone(),
                            name: name.clone(),
                            group: def.group.clone(),
                            message: format!(
                                "Precondition failed: UID in precondition: {uid}, UID in object meta: {}",
                                meta_str(&object, "uid").unwrap_or_default()
                            ),
                        });
                    }
                }
                if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str) {
                    if rv != current.mod_revision.to_string() {
                        return Err(ApiError::stale(def, &name));
                    }
                }
            }
            let has_finalizers = object
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_some_and(|f| !f.is_empty());
            // No policy means Background (the owner goes now, the garbage collector deletes
            // its dependents); the deprecated `orphanDependents: true` means Orphan.
            let policy = params
                .propagation_policy
                .clone()
                .or_else(|| {
                    options
                        .get("propagationPolicy")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .or_else(|| {
                    (options.get("orphanDependents") == Some(&json!(true)))
                        .then(|| "Orphan".to_owned())
                });
            let grace = pod_grace_period(def, &object, options, params)?;
            // A namespace with `spec.finalizers` turns Terminating; the namespace controller
            // empties it, then finalizes it.
            let terminating = is_namespace(def) && has_spec_finalizers(&object);
            if has_finalizers
                || matches!(policy.as_deref(), Some("Foreground" | "Orphan"))
                || grace > 0
                || terminating
            {
                // Graceful: mark it; whoever owns the finalizers — or, for a pod, the node
                // agent once its containers are stopped — completes the deletion.
                let meta = metadata_mut(&mut object)?;
                let shorter = meta
                    .get("deletionGracePeriodSeconds")
                    .and_then(Value::as_i64)
                    .is_some_and(|g| grace < g);
                if !meta.contains_key("deletionTimestamp") {
                    // Marked for deletion the first time: a new generation, as kube-apiserver
                    // gives one (controllers act differently on an object being deleted).
                    if let Some(generation) = meta
                        .get("generation")
                        .and_then(Value::as_i64)
                        .filter(|g| *g > 0)
                    {
                        meta.insert("generation".into(), json!(generation + 1));
                    }
                }
                if !meta.contains_key("deletionTimestamp") || shorter {
                    let at = jiff::Timestamp::now() + jiff::SignedDuration::from_secs(grace);
                    meta.insert(
                        "deletionTimestamp".into(),
                        Value::String(at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()),
                    );
                    meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
                }
                // The garbage collector's finalizer for the policy.
                let finalizer = match policy.as_deref() {
                    Some("Foreground") => Some("foregroundDeletion"),
                    Some("Orphan") => Some("orphan"),
                    _ => None,
                };
                if let Some(finalizer) = finalizer {
                    let finalizers = meta
                        .entry("finalizers")
                        .or_insert_with(|| json!([]))
                        .as_array_mut()
                        .ok_or_else(|| ApiError::BadRequest("finalizers must be a list".into()))?;
                    if !finalizers.iter().any(|f| f == finalizer) {
                        finalizers.push(json!(finalizer));
                    }
                }
                if terminating {
                    object["status"]["phase"] = json!("Terminating");
                }
                match self
                    .write(def, &key, &name, &current, object, dry_run)
                    .await
                {
                    Err(ApiError::Conflict { .. }) => continue,
                    Ok(marked) => {
                        if terminating && !dry_run {
                            self.terminating
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(name.clone());
                        }
                        return Ok(marked);
                    }
                    other => return other,
                }
            }
            match self
                .remove(def, &key, &name, &current, object, dry_run)
                .await?
            {
                Some(deleted) => return Ok(deleted),
                None => continue,
            }
        }
    }

    /// Removes the object from the store (unless `dry_run`); `None` when it changed since
    /// `current` was read (the caller re-reads and decides again).
    async fn remove(
        &self,
        def: &ResourceDef,
        key: &str,
        name: &str,
        current: &KeyValue,
        mut object: Value,
        dry_run: bool,
    ) -> Result<Option<Value>, ApiError> {
        if dry_run {
            return Ok(Some(object));
        }
        match self.store.delete(key, Some(current.mod_revision)).await {
            Ok((revision, _)) => {
                set_resource_version(&mut object, revision);
                if crate::crd::is_crd(def) {
                    crate::crd::register(self, &object, true);
                    crate::crd::delete_objects(self, &object).await?;
                }
                if crate::service::is_service(def) {
                    crate::service::release(self, &object).await;
                }
                Ok(Some(object))
            }
            Err(orquestra_store::Error::Conflict { .. }) => Ok(None),
            Err(orquestra_store::Error::NotFound { .. }) => Err(ApiError::not_found(def, name)),
            Err(e) => Err(e.into()),
        }
    }

    /// Lists a collection, filtered by selectors, one page at a time.
    pub async fn list(&self, target: &Target, params: &Params) -> Result<Value, ApiError> {
        if let Some(list) = self.list_cached(target, params).await? {
            let mut items = Vec::with_capacity(list.items.len());
            for item in &list.items {
                let object = serde_json::from_slice::<Value>(&item.json)
                    .map_err(|e| ApiError::Internal(format!("cached object is not JSON: {e}")))?;
                items.push(object);
            }
            self.to_client_all(&target.def, &mut items).await?;
            return Ok(json!({
                "kind": format!("{}List", target.def.kind),
                "apiVersion": target.def.api_version(),
                "metadata": list.metadata,
                "items": items,
            }));
        }
        self.list_from_store(target, params).await
    }

    /// A LIST as the JSON bytes of its response: from the watch cache without decoding a
    /// single object when it can, else from the store.
    pub async fn list_json(&self, target: &Target, params: &Params) -> Result<Vec<u8>, ApiError> {
        if !target.def.reads_as_stored() {
            // Every object converted or defaulted: no bytes to pass through.
            let list = self.list(target, params).await?;
            return serde_json::to_vec(&list).map_err(|e| ApiError::Internal(e.to_string()));
        }
        let Some(list) = self.list_cached(target, params).await? else {
            let list = self.list_from_store(target, params).await?;
            return serde_json::to_vec(&list).map_err(|e| ApiError::Internal(e.to_string()));
        };
        let size: usize = list.items.iter().map(|i| i.json.len() + 1).sum();
        let mut out = Vec::with_capacity(size + 256);
        out.extend_from_slice(b"{\"kind\":");
        serde_json::to_writer(&mut out, &format!("{}List", target.def.kind))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        out.extend_from_slice(b",\"apiVersion\":");
        serde_json::to_writer(&mut out, &target.def.api_version())
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        out.extend_from_slice(b",\"metadata\":");
        serde_json::to_writer(&mut out, &list.metadata)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        out.extend_from_slice(b",\"items\":[");
        for (i, item) in list.items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&item.json);
        }
        out.extend_from_slice(b"]}");
        Ok(out)
    }

    /// A LIST from the watch cache whose objects are served exactly as stored (no
    /// conversion or defaulting on read), for encoders that write lists from the cached
    /// objects; `None` when the kind or the request needs the general path.
    pub async fn list_cached_as_stored(
        &self,
        target: &Target,
        params: &Params,
    ) -> Result<Option<CachedList>, ApiError> {
        if !target.def.reads_as_stored() {
            return Ok(None);
        }
        self.list_cached(target, params).await
    }

    /// Answers a LIST from the watch cache, or `None` when only the store can: an exact
    /// revision, a continue token of a snapshot the cache has moved past, or a cache that
    /// does not catch up in time.
    async fn list_cached(
        &self,
        target: &Target,
        params: &Params,
    ) -> Result<Option<CachedList>, ApiError> {
        let labels = LabelSelector::parse(params.label_selector.as_deref().unwrap_or(""))?;
        let fields = FieldSelector::for_resource(
            params.field_selector.as_deref().unwrap_or(""),
            &target.def,
        )?;
        if selects_after_conversion(&target.def, &fields) {
            return Ok(None);
        }
        let limit = params.limit()?;
        let (at_least, start_after, pinned) = match params.continue_token.as_deref() {
            Some(token) if !token.is_empty() => {
                let token = Continue::parse(token)?;
                // Later pages come from the same snapshot: the cache serves them only while
                // nothing has changed since.
                if self.cache.revision() != token.rv {
                    return Ok(None);
                }
                (token.rv, Some(token.start), Some(token.rv))
            }
            _ => {
                if params.resource_version_match.as_deref() == Some("Exact") {
                    return Ok(None);
                }
                match params.resource_version()? {
                    Some(rv) => (rv, None, None),
                    // `0` means any: whatever the cache has.
                    None if params.resource_version.as_deref() == Some("0") => (0, None, None),
                    // Unset means the latest: what the store has now.
                    None => (self.cache.latest().await?, None, None),
                }
            }
        };
        let keep = |entry: &crate::cache::Entry| {
            (labels.is_empty() || entry.labels_match(&labels))
                && (fields.is_empty() || entry.decode().is_some_and(|o| fields.matches(&o)))
        };
        let Some(snapshot) = self
            .cache
            .list(
                &target.prefix(),
                at_least,
                start_after.as_deref(),
                limit,
                keep,
                // kube-apiserver counts what is left only when nothing is filtered out.
                labels.is_empty() && fields.is_empty(),
            )
            .await
        else {
            return Ok(None);
        };
        if pinned.is_some_and(|rv| rv != snapshot.revision) {
            return Ok(None);
        }
        let mut metadata = json!({"resourceVersion": snapshot.revision.to_string()});
        if let (true, Some(last)) = (snapshot.more, snapshot.last_key) {
            metadata["continue"] = json!(
                Continue {
                    rv: snapshot.revision,
                    start: last,
                }
                .encode()
            );
            if let Some(remaining) = snapshot.remaining {
                metadata["remainingItemCount"] = json!(remaining);
            }
        }
        Ok(Some(CachedList {
            metadata,
            items: snapshot.entries,
        }))
    }

    /// How many keys under `prefix` follow `after` at `revision`.
    async fn count_after(&self, prefix: &str, revision: i64, after: &str) -> Result<u64, ApiError> {
        let mut count = 0;
        let mut start_after = Some(after.to_owned());
        loop {
            let page = self
                .store
                .list(
                    prefix,
                    &ListOptions {
                        revision: Some(revision),
                        limit: Some(1000),
                        start_after: start_after.clone(),
                    },
                )
                .await?;
            count += page.kvs.len() as u64;
            match (page.more, page.kvs.last()) {
                (true, Some(last)) => start_after = Some(last.key.clone()),
                _ => return Ok(count),
            }
        }
    }

    async fn list_from_store(&self, target: &Target, params: &Params) -> Result<Value, ApiError> {
        let def = &target.def;
        let labels = LabelSelector::parse(params.label_selector.as_deref().unwrap_or(""))?;
        let fields = FieldSelector::for_resource(
            params.field_selector.as_deref().unwrap_or(""),
            &target.def,
        )?;
        let limit = params.limit()?;
        let prefix = target.prefix();
        let mut pinned = false;
        let (mut revision, mut start_after) = match params.continue_token.as_deref() {
            Some(token) if !token.is_empty() => {
                let raw = Continue::parse(token)?;
                pinned = raw.rv != 0;
                (Some(raw.rv).filter(|rv| *rv != 0), Some(raw.start))
            }
            _ => {
                let exact = params.resource_version_match.as_deref() == Some("Exact");
                (params.resource_version()?.filter(|_| exact), None)
            }
        };
        let mut items = Vec::new();
        let mut next = None;
        'pages: loop {
            let page = match self
                .store
                .list(
                    &prefix,
                    &ListOptions {
                        revision,
                        limit: limit.map(|l| l.max(64)),
                        start_after: start_after.clone(),
                    },
                )
                .await
            {
                Ok(page) => page,
                // A snapshot compacted away: offer to continue from the same key at the
                // latest revision instead.
                Err(orquestra_store::Error::Compacted { .. }) if pinned && items.is_empty() => {
                    return Err(ApiError::ExpiredContinue {
                        continue_token: Continue {
                            rv: 0,
                            start: start_after.clone().unwrap_or_default(),
                        }
                        .encode(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            revision = Some(page.revision);
            for kv in &page.kvs {
                if limit.is_some_and(|l| items.len() >= l) {
                    next = start_after.clone();
                    break 'pages;
                }
                start_after = Some(kv.key.clone());
                // Selectors name fields of the stored form (as the watch cache's do), but
                // for a kind converted by webhook, whose versions differ in shape: its field
                // selectors name the requested version's fields.
                let mut object = decode(kv)?;
                if !labels.matches(&object) {
                    continue;
                }
                if selects_after_conversion(def, &fields) {
                    self.to_client(def, &mut object).await?;
                }
                if fields.matches(&object) {
                    items.push(object);
                }
            }
            if !page.more {
                break;
            }
            if limit.is_some_and(|l| items.len() >= l) {
                next = start_after.clone();
                break;
            }
        }
        self.to_client_all(def, &mut items).await?;
        let revision = revision.unwrap_or_default();
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if let Some(start) = next {
            // As kube-apiserver (which asks etcd for the count): how many follow, when no
            // selector filters them.
            if labels.is_empty() && fields.is_empty() {
                let remaining = self.count_after(&prefix, revision, &start).await?;
                metadata["remainingItemCount"] = json!(remaining);
            }
            metadata["continue"] = json!(
                Continue {
                    rv: revision,
                    start
                }
                .encode()
            );
        }
        Ok(json!({
            "kind": format!("{}List", def.kind),
            "apiVersion": def.api_version(),
            "metadata": metadata,
            "items": items,
        }))
    }
}

/// Whether `fields` must be matched against objects converted to `def`'s version first: a
/// kind converted by webhook selects by its requested version's fields, which the stored
/// form may name otherwise (kube-apiserver filters custom resources after conversion).
pub(crate) fn selects_after_conversion(def: &ResourceDef, fields: &FieldSelector) -> bool {
    def.conversion.is_some() && !fields.is_empty()
}

/// Whether `needle` occurs in `haystack`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Sets `to.status` to `from.status`, or removes it when `from` has none.
fn copy_status(to: &mut Value, from: &Value) {
    match from.get("status") {
        Some(status) => to["status"] = status.clone(),
        None => {
            if let Some(map) = to.as_object_mut() {
                map.remove("status");
            }
        }
    }
}

/// Whether a write to `/status` also takes the labels, annotations, finalizers and owner
/// references it carries, as kube-apiserver's status strategies do for most built-in kinds
/// (they reset only the spec). Custom resources and the kinds whose strategies reset the
/// metadata too take nothing but the status.
fn status_keeps_metadata(def: &ResourceDef) -> bool {
    const RESET: &[(&str, &str)] = &[
        ("flowcontrol.apiserver.k8s.io", "flowschemas"),
        (
            "flowcontrol.apiserver.k8s.io",
            "prioritylevelconfigurations",
        ),
        (
            "admissionregistration.k8s.io",
            "validatingadmissionpolicies",
        ),
        ("admissionregistration.k8s.io", "mutatingadmissionpolicies"),
        ("storage.k8s.io", "volumeattachments"),
        ("networking.k8s.io", "servicecidrs"),
        ("resource.k8s.io", "resourceclaims"),
        ("resource.k8s.io", "devicetaintrules"),
        ("internal.apiserver.k8s.io", "storageversions"),
        ("scheduling.k8s.io", "podgroups"),
    ];
    matches!(def.openapi, crate::registry::SchemaSource::Builtin(_))
        && !RESET
            .iter()
            .any(|(group, plural)| def.group == *group && def.plural == *plural)
}

/// Takes the mutable metadata (labels, annotations, finalizers, owner references) of `from`
/// into `to`: present ones replace, absent ones are removed.
fn copy_mutable_metadata(to: &mut Value, from: &Value) {
    let Some(meta) = to.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
        match from.pointer(&format!("/metadata/{field}")) {
            Some(value) if !value.is_null() => {
                meta.insert(field.into(), value.clone());
            }
            _ => {
                meta.remove(field);
            }
        }
    }
}

/// What part of an object a PUT writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    /// The main resource: everything but `status` (when the kind has a status subresource).
    Main,
    /// `/status`: only `status`.
    Status,
    /// `namespaces/<name>/finalize`: only `spec.finalizers`.
    Finalize,
    /// `pods/<name>/ephemeralcontainers`: only `spec.ephemeralContainers`.
    EphemeralContainers,
    /// `pods/<name>/resize`: only the containers' CPU and memory `resources`.
    Resize,
    /// `certificatesigningrequests/<name>/approval`: only `status.conditions` (where
    /// `Approved` and `Denied` live) and the mutable metadata.
    Approval,
}

impl Part {
    fn of(def: &ResourceDef, subresource: Option<&str>) -> Part {
        match subresource {
            Some("status") => Part::Status,
            Some("finalize") if is_namespace(def) => Part::Finalize,
            Some("ephemeralcontainers") if is_pod(def) => Part::EphemeralContainers,
            Some("resize") if is_pod(def) => Part::Resize,
            Some("approval") if is_csr(def) => Part::Approval,
            _ => Part::Main,
        }
    }
}

/// Whether `def` is the CertificateSigningRequest resource.
/// A CertificateSigningRequest's requestor, as kube-apiserver records it on create
/// (whatever the client wrote): `spec.username`, `groups` and `extra` of the caller, which
/// approvers and signers trust.
fn stamp_requester(object: &mut Value) {
    let Some(user) = crate::admission::webhook::requester() else {
        return;
    };
    if !object["spec"].is_object() {
        return;
    }
    object["spec"]["username"] = json!(user.name);
    object["spec"]["groups"] = json!(user.groups);
    if user.extra.is_empty() {
        if let Some(spec) = object["spec"].as_object_mut() {
            spec.remove("extra");
            spec.remove("uid");
        }
    } else {
        object["spec"]["extra"] = json!(user.extra);
    }
}

pub(crate) fn is_csr(def: &ResourceDef) -> bool {
    def.group == "certificates.k8s.io" && def.plural == "certificatesigningrequests"
}

/// Whether `def` is the Pod resource.
pub(crate) fn is_pod(def: &ResourceDef) -> bool {
    def.group.is_empty() && def.plural == "pods"
}

/// A pod's ephemeral containers may be added, never changed or removed, and their names
/// are unique among all of the pod's containers (kube's `ValidateEphemeralContainers`).
fn merge_ephemeral_containers(old: &Value, body: &Value) -> Result<Value, ApiError> {
    let invalid = |message: String| ApiError::Invalid {
        kind: "Pod".into(),
        name: old["metadata"]["name"].as_str().unwrap_or("").to_owned(),
        group: String::new(),
        causes: vec![crate::error::Cause {
            reason: "FieldValueInvalid".into(),
            message,
            field: "spec.ephemeralContainers".into(),
        }],
    };
    let before = old
        .pointer("/spec/ephemeralContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let after = body
        .pointer("/spec/ephemeralContainers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for existing in &before {
        let name = existing["name"].as_str().unwrap_or("");
        match after.iter().find(|c| c["name"] == existing["name"]) {
            None => {
                return Err(invalid(format!(
                    "existing ephemeral containers \"{name}\" may not be removed"
                )));
            }
            Some(now) if essence(now) != essence(existing) => {
                return Err(invalid(format!(
                    "existing ephemeral containers \"{name}\" may not be changed"
                )));
            }
            Some(_) => {}
        }
    }
    let mut names: Vec<&str> = ["/spec/containers", "/spec/initContainers"]
        .iter()
        .filter_map(|p| old.pointer(p).and_then(Value::as_array))
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    for c in &after {
        let name = c["name"].as_str().unwrap_or("");
        if name.is_empty() || c["image"].as_str().unwrap_or("").is_empty() {
            return Err(invalid(
                "an ephemeral container needs a name and an image".into(),
            ));
        }
        if names.contains(&name) {
            return Err(invalid(format!("Duplicate value: \"{name}\"")));
        }
        names.push(name);
    }
    let mut new = old.clone();
    new["spec"]["ephemeralContainers"] = Value::Array(after);
    Ok(new)
}

/// What of an ephemeral container may not change, with empty values dropped: a client's
/// round trip adds defaults and empty structs (`resources: {}`) that change nothing.
fn essence(container: &Value) -> Value {
    fn prune(v: &Value) -> Option<Value> {
        match v {
            Value::Null => None,
            Value::Object(o) => {
                let kept: serde_json::Map<String, Value> = o
                    .iter()
                    .filter_map(|(k, v)| prune(v).map(|v| (k.clone(), v)))
                    .collect();
                (!kept.is_empty()).then_some(Value::Object(kept))
            }
            Value::Array(a) if a.is_empty() => None,
            Value::Array(a) => Some(Value::Array(a.iter().filter_map(prune).collect())),
            Value::Bool(false) => None,
            other => Some(other.clone()),
        }
    }
    let fields = [
        "name",
        "image",
        "command",
        "args",
        "env",
        "envFrom",
        "workingDir",
        "volumeMounts",
        "stdin",
        "stdinOnce",
        "tty",
        "targetContainerName",
        "securityContext",
    ];
    let picked: serde_json::Map<String, Value> = fields
        .iter()
        .filter_map(|f| prune(container.get(*f)?).map(|v| ((*f).to_owned(), v)))
        .collect();
    Value::Object(picked)
}

/// Sets `object[parent][field]` to `value` (creating `parent`), or removes the field when
/// there is no value (leaving `parent` as it is).
fn put_or_remove(object: &mut Value, parent: &str, field: &str, value: Option<&Value>) {
    match value {
        Some(value) => {
            if !object[parent].is_object() {
                object[parent] = json!({});
            }
            object[parent][field] = value.clone();
        }
        None => {
            if let Some(map) = object.get_mut(parent).and_then(Value::as_object_mut) {
                map.remove(field);
            }
        }
    }
}

/// Whether `def` is the Namespace resource.
pub(crate) fn is_namespace(def: &ResourceDef) -> bool {
    def.group.is_empty() && def.plural == "namespaces"
}

/// Whether a namespace still has `spec.finalizers` (the namespace controller's `kubernetes`).
fn has_spec_finalizers(namespace: &Value) -> bool {
    namespace
        .pointer("/spec/finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty())
}

/// The object a PUT stores: the client's object with server-owned metadata kept from the
/// current one, `status` kept unless this is the status subresource (which changes only
/// `status`), and `generation` bumped when anything outside metadata and status changed.
/// A namespace's `spec.finalizers` change only through `finalize` (as in kube-apiserver),
/// so that a client's PUT cannot drop the namespace controller's finalizer.
fn merge_update(
    def: &ResourceDef,
    old: &Value,
    body: &Value,
    part: Part,
) -> Result<Value, ApiError> {
    // The status subresource takes only `status` from the body; the main resource keeps
    // the stored status when the kind has a status subresource.
    let mut new = match part {
        Part::Status => {
            let mut new = old.clone();
            copy_status(&mut new, body);
            if status_keeps_metadata(def) {
                copy_mutable_metadata(&mut new, body);
            }
            new
        }
        Part::Finalize => {
            let mut new = old.clone();
            let finalizers = body
                .pointer("/spec/finalizers")
                .filter(|f| f.as_array().is_some_and(|f| !f.is_empty()));
            if !new["spec"].is_object() {
                new["spec"] = json!({});
            }
            put_or_remove(&mut new, "spec", "finalizers", finalizers);
            new
        }
        Part::EphemeralContainers => merge_ephemeral_containers(old, body)?,
        Part::Resize => crate::admission::resize::merge(old, body)?,
        Part::Approval => {
            let mut new = old.clone();
            copy_mutable_metadata(&mut new, body);
            put_or_remove(
                &mut new,
                "status",
                "conditions",
                body.pointer("/status/conditions"),
            );
            new
        }
        Part::Main => {
            let mut new = body.clone();
            if def.status {
                copy_status(&mut new, old);
            }
            if is_namespace(def) {
                put_or_remove(
                    &mut new,
                    "spec",
                    "finalizers",
                    old.pointer("/spec/finalizers"),
                );
            }
            new
        }
    };
    let old_meta = old.get("metadata").cloned().unwrap_or_default();
    let meta = metadata_mut(&mut new)?;
    for owned in [
        "uid",
        "creationTimestamp",
        "namespace",
        "name",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
    ] {
        match old_meta.get(owned) {
            Some(v) => {
                meta.insert(owned.into(), v.clone());
            }
            None => {
                meta.remove(owned);
            }
        }
    }
    meta.remove("resourceVersion");
    let generation = old_meta
        .get("generation")
        .and_then(Value::as_i64)
        .unwrap_or(1);
    // A built-in kind without a spec (Event, ConfigMap, Secret, …) has no generations in
    // kube-apiserver: its strategy never bumps one.
    let builtin = matches!(def.openapi, crate::registry::SchemaSource::Builtin(_));
    let has_spec = !builtin
        || def
            .schema
            .as_ref()
            .is_some_and(|s| s.declares_object("spec"));
    let changed = has_spec && spec_of(old) != spec_of(&new);
    let meta = metadata_mut(&mut new)?;
    meta.insert(
        "generation".into(),
        json!(if changed { generation + 1 } else { generation }),
    );
    drop_empty_metadata(&mut new);
    Ok(new)
}

/// How long a pod's deletion waits for its node agent (kube-apiserver's pod strategy): the
/// request's `gracePeriodSeconds`, else the pod's `terminationGracePeriodSeconds` (30), and 0
/// for pods no node runs (unscheduled or finished). Other kinds: 0.
fn pod_grace_period(
    def: &ResourceDef,
    object: &Value,
    options: &Value,
    params: &Params,
) -> Result<i64, ApiError> {
    if !(def.group.is_empty() && def.kind == "Pod") {
        return Ok(0);
    }
    let requested = match &params.grace_period_seconds {
        Some(text) => Some(text.parse::<i64>().map_err(|_| {
            ApiError::BadRequest(format!("gracePeriodSeconds: {text:?} is not an integer"))
        })?),
        None => options.get("gracePeriodSeconds").and_then(Value::as_i64),
    };
    let scheduled = object
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty());
    let phase = object.pointer("/status/phase").and_then(Value::as_str);
    if !scheduled || matches!(phase, Some("Succeeded" | "Failed")) {
        return Ok(0);
    }
    Ok(requested
        .unwrap_or_else(|| {
            object
                .pointer("/spec/terminationGracePeriodSeconds")
                .and_then(Value::as_i64)
                .unwrap_or(30)
        })
        .max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ephemeral_containers_are_added_never_changed_or_removed() {
        let old = json!({"metadata": {"name": "p"}, "spec": {
            "containers": [{"name": "main", "image": "i"}],
            "ephemeralContainers": [{"name": "dbg", "image": "busybox", "command": ["sh"]}],
        }});
        // A client's round trip adds empty structs and false flags: not a change.
        let body = json!({"spec": {"ephemeralContainers": [
            {"name": "dbg", "image": "busybox", "command": ["sh"], "resources": {},
             "stdin": false, "terminationMessagePolicy": "File"},
            {"name": "dbg2", "image": "busybox"},
        ]}});
        let new = merge_ephemeral_containers(&old, &body).unwrap();
        assert_eq!(
            new["spec"]["ephemeralContainers"].as_array().unwrap().len(),
            2
        );
        assert_eq!(new["spec"]["containers"], old["spec"]["containers"]);

        let changed = json!({"spec": {"ephemeralContainers": [
            {"name": "dbg", "image": "alpine", "command": ["sh"]},
        ]}});
        let e = merge_ephemeral_containers(&old, &changed).unwrap_err();
        assert!(e.to_string().contains("may not be changed"), "{e}");
        let removed = json!({"spec": {"ephemeralContainers": []}});
        let e = merge_ephemeral_containers(&old, &removed).unwrap_err();
        assert!(e.to_string().contains("may not be removed"), "{e}");
        let clash = json!({"spec": {"ephemeralContainers": [
            {"name": "dbg", "image": "busybox", "command": ["sh"]},
            {"name": "main", "image": "busybox"},
        ]}});
        let e = merge_ephemeral_containers(&old, &clash).unwrap_err();
        assert!(e.to_string().contains("Duplicate value"), "{e}");
    }
}
