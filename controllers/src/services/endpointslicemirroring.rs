//! The EndpointSlice mirroring controller (`endpointslicemirroring`): for every Service
//! without a selector, mirrors the `Endpoints` its user wrote (of the same name) into
//! `discovery.k8s.io/v1` EndpointSlices, as kube-controller-manager's endpointslicemirroring
//! controller does — so whatever reads slices (the node agents' service proxy and DNS) sees
//! hand-written endpoints too.
//!
//! The subsets are first repacked (kube's `RepackSubsets`: an address listed under several
//! subsets is one address, not ready if any subset says so; ports listing the same addresses
//! share a subset); then each subset's addresses (`ready: true`) and `notReadyAddresses`
//! (`ready: false`), at most [`MAX_ADDRESSES`] of them, go into one slice per address family
//! and port set, with their hostname, node and target. Addresses that are not IPs are
//! skipped; both are reported as Warning events on the Endpoints. Slices carry the
//! Endpoints' labels and annotations (less the two kube drops) plus
//! `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by:
//! endpointslicemirroring-controller.k8s.io`, and are owned by the Endpoints (as kube's).
//!
//! Not mirrored — and their mirrored slices deleted: Endpoints labelled
//! `endpointslice.kubernetes.io/skip-mirror: "true"` (the endpoint controller's own),
//! leader-election locks, Endpoints without a Service or whose Service has a selector.
//! Slices whose Endpoints is gone are deleted by the `endpointslicemirroring-cleanup` runner.
//!
//! A slice's name is not generated but derived from its Endpoints, family and ports
//! (`<endpoints>-<hash>`): a create from a cache that has not seen the previous create yet
//! fails with AlreadyExists (and is retried) instead of making a second slice, which spares
//! the expectations the endpointslice controller keeps. Updates are at the cached
//! `resourceVersion`, deletes under a uid precondition, so stale caches never win either.

use orquestra_operator::rbac::{READ, Rule};
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, Endpoints, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::{Manager, Runner};

use crate::events::{self, EventType};
use crate::services::endpoints::{SKIP_MIRROR, selector};
use crate::services::endpointslice::{MANAGED_BY, SERVICE_NAME, TRIGGER_TIME};

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["services", "endpoints"],
        verbs: READ,
    },
    Rule {
        api_groups: &["discovery.k8s.io"],
        resources: &["endpointslices"],
        verbs: &["get", "list", "watch", "create", "update", "delete"],
    },
    Rule {
        api_groups: &[""],
        resources: &["events"],
        verbs: &["create"],
    },
];

/// This controller's value of [`MANAGED_BY`] (kube's).
pub const CONTROLLER: &str = "endpointslicemirroring-controller.k8s.io";

/// The most addresses mirrored from one (repacked) subset, and so the most endpoints of a
/// slice (kube's `--mirroring-max-endpoints-per-subset` default).
pub const MAX_ADDRESSES: usize = 1000;

/// The annotation marking an Endpoints used as a leader-election lock: never mirrored.
const LEADER: &str = "control-plane.alpha.kubernetes.io/leader";

/// kubectl's record of the last applied object: not copied to the slices (as kube's).
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The component named in this controller's events (kube's).
const COMPONENT: &str = "endpoint-slice-mirroring-controller";

/// What can go wrong mirroring one Endpoints (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum MirroringError {
    /// A slice could not be written or deleted, or a Service or Endpoints looked up.
    #[error("{action}: {source}")]
    Api {
        /// What was being done, naming the object.
        action: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// What the reconcilers share.
pub struct Controller {
    client: Client,
    endpoints: Store<Endpoints>,
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    /// The Endpoints (`namespace/name`) last warned about, with the resourceVersion warned
    /// at: one event per version, not one per reconcile.
    warned: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointSliceMirroringController")
            .finish_non_exhaustive()
    }
}

/// Whether this controller manages `slice`.
fn mirrored(slice: &EndpointSlice) -> bool {
    slice.labels().get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
}

/// The Endpoints a mirrored slice was made from (named by its service-name label).
fn endpoints_of(slice: &EndpointSlice) -> Option<ObjectRef<Endpoints>> {
    let name = slice.labels().get(SERVICE_NAME)?;
    Some(ObjectRef::new(name).within(&slice.namespace().unwrap_or_default()))
}

/// Whether `ep` is to be mirrored at all (kube's `shouldMirror`): not the endpoint
/// controller's own (`skip-mirror`), not a leader-election lock.
fn should_mirror(ep: &Endpoints) -> bool {
    ep.labels().get(SKIP_MIRROR).map(String::as_str) != Some("true")
        && !ep.annotations().contains_key(LEADER)
}

/// Adds the mirroring controller to `manager`: one runner keeping each Endpoints' slices,
/// one deleting the mirrored slices whose Endpoints is gone.
pub fn add(manager: &mut Manager) {
    let endpoints = manager.cache::<Endpoints>(watcher::Config::default());
    let services = manager.cache::<Service>(watcher::Config::default());
    let slices = manager.cache::<EndpointSlice>(watcher::Config::default());
    let context = Arc::new(Controller {
        client: manager.client(),
        endpoints: endpoints.store(),
        services: services.store(),
        slices: slices.store(),
        warned: Mutex::default(),
    });
    let same_name = |svc: Arc<Service>| {
        Some(
            ObjectRef::<Endpoints>::new(&svc.name_any())
                .within(&svc.namespace().unwrap_or_default()),
        )
    };
    let runner = Runner::for_cache("endpointslicemirroring", &endpoints)
        // A Service appearing, going, or gaining or losing its selector.
        .and_then(|r| r.watches(&services, same_name))
        .and_then(|r| r.watches_deleted(&services, same_name))
        // Someone else's edit or deletion of a mirrored slice is undone.
        .and_then(|r| r.owns(&slices))
        .and_then(|r| {
            r.watches_deleted(&slices, |slice: Arc<EndpointSlice>| {
                mirrored(&slice).then(|| endpoints_of(&slice)).flatten()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(runner, reconcile, Arc::clone(&context));
    let all_slices = slices.store();
    let cleanup = Runner::for_cache("endpointslicemirroring-cleanup", &slices)
        .and_then(|r| {
            r.watches_deleted(&endpoints, move |ep: Arc<Endpoints>| {
                let gone = ObjectRef::from_obj(ep.as_ref());
                all_slices
                    .state()
                    .into_iter()
                    .filter(|s| mirrored(s) && endpoints_of(s).as_ref() == Some(&gone))
                    .map(|s| ObjectRef::from_obj(s.as_ref()))
                    .collect::<Vec<_>>()
            })
        })
        .expect("the caches were just created, before run");
    manager.add(cleanup, cleanup_reconcile, context);
}

/// A port as both APIs have it, in an order to group and sort by: (name, port, protocol,
/// appProtocol), the protocol defaulted to TCP.
type PortKey = (String, i32, String, Option<String>);

/// The address family of a slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn address_type(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    fn of(address_type: &str) -> Option<Family> {
        match address_type {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }
}

/// What tells one slice of an Endpoints from another: its family and (sorted) ports.
type SliceKey = (Family, Vec<PortKey>);

/// What tells one endpoint of a slice from another (kube's endpoint hash: addresses,
/// hostname, target namespace and name); also the order endpoints are written in.
type EndpointKey = (Vec<String>, String, String, String);

fn endpoint_key(e: &Endpoint) -> EndpointKey {
    let target = e.target_ref.as_ref();
    let mut addresses = e.addresses.clone();
    addresses.sort();
    (
        addresses,
        e.hostname.clone().unwrap_or_default(),
        target.and_then(|t| t.namespace.clone()).unwrap_or_default(),
        target.and_then(|t| t.name.clone()).unwrap_or_default(),
    )
}

fn core_port(p: &k8s_openapi::api::core::v1::EndpointPort) -> PortKey {
    (
        p.name.clone().unwrap_or_default(),
        p.port,
        p.protocol
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "TCP".into()),
        p.app_protocol.clone(),
    )
}

fn slice_port(p: &EndpointPort) -> PortKey {
    (
        p.name.clone().unwrap_or_default(),
        p.port.unwrap_or_default(),
        p.protocol
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "TCP".into()),
        p.app_protocol.clone(),
    )
}

/// The key of an existing slice; `None` for a family this controller never writes (FQDN).
fn slice_key(slice: &EndpointSlice) -> Option<SliceKey> {
    let mut ports: Vec<PortKey> = slice.ports.iter().flatten().map(slice_port).collect();
    ports.sort();
    Some((Family::of(&slice.address_type)?, ports))
}

/// One subset after repacking: its ports and its ready and not-ready addresses, each
/// ordered by IP and target uid.
#[derive(Debug, Default, PartialEq)]
struct Repacked {
    ports: Vec<PortKey>,
    ready: Vec<EndpointAddress>,
    not_ready: Vec<EndpointAddress>,
}

/// kube's `RepackSubsets`: addresses are told apart by IP and target uid (the first listing
/// of one is kept); an address is ready under a port only if every subset listing it with
/// that port says so; ports with the same addresses (and readiness) make one subset.
/// Subsets without ports keep their addresses, under no port.
fn repack(subsets: &[EndpointSubset]) -> Vec<Repacked> {
    type AddressId = (String, String);
    let mut addresses: BTreeMap<AddressId, &EndpointAddress> = BTreeMap::new();
    // Port (`None`: a subset without ports) → address → ready.
    let mut by_port: BTreeMap<Option<PortKey>, BTreeMap<AddressId, bool>> = BTreeMap::new();
    for subset in subsets {
        let ports: Vec<Option<PortKey>> = match subset.ports.as_deref() {
            Some(ports) if !ports.is_empty() => ports.iter().map(|p| Some(core_port(p))).collect(),
            _ => vec![None],
        };
        for port in &ports {
            by_port.entry(port.clone()).or_default();
        }
        let listed = subset.addresses.iter().flatten().map(|a| (a, true));
        let not_ready = subset
            .not_ready_addresses
            .iter()
            .flatten()
            .map(|a| (a, false));
        for (address, ready) in listed.chain(not_ready) {
            let uid = address.target_ref.as_ref().and_then(|t| t.uid.clone());
            let id = (address.ip.clone(), uid.unwrap_or_default());
            addresses.entry(id.clone()).or_insert(address);
            for port in &ports {
                let seen = by_port.entry(port.clone()).or_default();
                let was = seen.entry(id.clone()).or_insert(ready);
                *was = *was && ready;
            }
        }
    }
    // The same addresses and readiness → one subset with all their ports.
    let mut groups: BTreeMap<Vec<(AddressId, bool)>, Vec<PortKey>> = BTreeMap::new();
    for (port, listed) in by_port {
        let ports = groups.entry(listed.into_iter().collect()).or_default();
        // kube leaves out ports it cannot serve (its sentinel for "no port" is -1).
        if let Some(port) = port.filter(|p| p.1 > 0) {
            ports.push(port);
        }
    }
    groups
        .into_iter()
        .map(|(listed, mut ports)| {
            ports.sort();
            let mut subset = Repacked {
                ports,
                ..Repacked::default()
            };
            for (id, ready) in listed {
                if let Some(address) = addresses.get(&id) {
                    let list = if ready {
                        &mut subset.ready
                    } else {
                        &mut subset.not_ready
                    };
                    list.push((*address).clone());
                }
            }
            subset
        })
        .collect()
}

/// An IP as kube's `ParseIPSloppy` reads it: IPv4 octets may have leading zeros (decimal
/// still), and an IPv4-mapped IPv6 address is IPv4.
fn parse_ip(text: &str) -> Option<(Family, IpAddr)> {
    let ip = text.parse::<IpAddr>().ok().or_else(|| {
        let octets: Vec<u8> = text
            .split('.')
            .map(|o| {
                (!o.is_empty() && o.len() <= 3 && o.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| o.parse::<u8>().ok())
                    .flatten()
            })
            .collect::<Option<_>>()?;
        let [a, b, c, d] = octets.as_slice() else {
            return None;
        };
        Some(IpAddr::V4(Ipv4Addr::new(*a, *b, *c, *d)))
    })?;
    Some(match ip {
        IpAddr::V4(v4) => (Family::V4, IpAddr::V4(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (Family::V4, IpAddr::V4(v4)),
            None => (Family::V6, IpAddr::V6(v6)),
        },
    })
}

/// One address as an endpoint, with its family; `None` when it is not an IP.
fn endpoint(address: &EndpointAddress, ready: bool) -> Option<(Family, Endpoint)> {
    let (family, ip) = parse_ip(&address.ip)?;
    let endpoint = Endpoint {
        addresses: vec![ip.to_string()],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            ..EndpointConditions::default()
        }),
        hostname: address.hostname.clone().filter(|h| !h.is_empty()),
        node_name: address.node_name.clone(),
        target_ref: address.target_ref.clone(),
        ..Endpoint::default()
    };
    Some((family, endpoint))
}

/// What one Endpoints asks to be mirrored.
#[derive(Debug, Default)]
struct Mirror {
    /// The endpoints of each slice, in their order.
    slices: BTreeMap<SliceKey, BTreeMap<EndpointKey, Endpoint>>,
    /// Addresses left out for not being IPs.
    invalid: usize,
    /// Addresses left out in all, the invalid ones and those past [`MAX_ADDRESSES`].
    skipped: usize,
}

fn mirror(ep: &Endpoints) -> Mirror {
    let mut out = Mirror::default();
    for subset in repack(ep.subsets.as_deref().unwrap_or_default()) {
        let total = subset.ready.len() + subset.not_ready.len();
        let mut added = 0;
        let ready = subset.ready.iter().map(|a| (a, true));
        for (address, ready) in ready.chain(subset.not_ready.iter().map(|a| (a, false))) {
            if added >= MAX_ADDRESSES {
                break;
            }
            match endpoint(address, ready) {
                Some((family, e)) => {
                    out.slices
                        .entry((family, subset.ports.clone()))
                        .or_default()
                        .insert(endpoint_key(&e), e);
                    added += 1;
                }
                None => out.invalid += 1,
            }
        }
        out.skipped += total - added;
    }
    out
}

/// The name of the slice of `endpoints` with `key`: the Endpoints' name and a hash of the
/// family and ports (FNV-1a, in the alphabet kube's generated names use).
fn slice_name(endpoints: &str, key: &SliceKey) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let text = format!("{key:?}");
    for b in text.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let base = ALPHABET.len() as u64;
    let suffix: String = (0..10)
        .map(|i| {
            let digit = hash / base.pow(i) % base;
            char::from(ALPHABET[usize::try_from(digit).unwrap_or_default()])
        })
        .collect();
    // A name is at most 253 characters; a cut prefix must still end in a letter or digit.
    let room = 253 - suffix.len() - 1;
    let prefix = endpoints
        .get(..room.min(endpoints.len()))
        .unwrap_or(endpoints)
        .trim_end_matches(['.', '-']);
    format!("{prefix}-{suffix}")
}

/// The labels of the slices of `ep`: its own, plus kube's.
fn labels(ep: &Endpoints) -> BTreeMap<String, String> {
    let mut labels = ep.labels().clone();
    labels.insert(SERVICE_NAME.into(), ep.name_any());
    labels.insert(MANAGED_BY.into(), CONTROLLER.into());
    labels
}

/// The annotations of the slices of `ep`: its own but the change time and kubectl's record.
fn annotations(ep: &Endpoints) -> BTreeMap<String, String> {
    let mut annotations = ep.annotations().clone();
    annotations.remove(TRIGGER_TIME);
    annotations.remove(LAST_APPLIED);
    annotations
}

/// A slice as it should be, from the existing one when there is one.
fn desired_slice(
    existing: Option<&EndpointSlice>,
    ep: &Endpoints,
    name: String,
    key: &SliceKey,
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let mut slice = existing.cloned().unwrap_or_else(|| EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: ep.namespace(),
            ..ObjectMeta::default()
        },
        address_type: key.0.address_type().into(),
        endpoints: None,
        ports: None,
    });
    slice.metadata.labels = Some(labels(ep));
    slice.metadata.annotations = Some(annotations(ep));
    slice.metadata.owner_references = Some(vec![OwnerReference {
        api_version: "v1".into(),
        kind: "Endpoints".into(),
        name: ep.name_any(),
        uid: ep.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }]);
    slice.metadata.managed_fields = None;
    slice.endpoints = Some(endpoints);
    slice.ports = Some(
        key.1
            .iter()
            .map(|(name, port, protocol, app)| EndpointPort {
                name: Some(name.clone()),
                port: Some(*port),
                protocol: Some(protocol.clone()),
                app_protocol: app.clone(),
            })
            .collect(),
    );
    slice
}

/// Whether `existing` already says what `wanted` does (endpoints compared in their order,
/// ports as keys, so the server's own spelling of defaults never looks like a change).
fn same(existing: &EndpointSlice, wanted: &EndpointSlice) -> bool {
    let mut endpoints = existing.endpoints.clone().unwrap_or_default();
    endpoints.sort_by_key(endpoint_key);
    let empty = BTreeMap::new();
    endpoints.as_slice() == wanted.endpoints.as_deref().unwrap_or_default()
        && slice_key(existing) == slice_key(wanted)
        && existing.labels() == wanted.labels()
        && existing.metadata.annotations.as_ref().unwrap_or(&empty)
            == wanted.metadata.annotations.as_ref().unwrap_or(&empty)
        && existing.owner_references() == wanted.owner_references()
}

async fn reconcile(ep: Arc<Endpoints>, ctx: Arc<Controller>) -> Result<Action, MirroringError> {
    if ep.metadata.deletion_timestamp.is_some() {
        // Its slices go with it (the cleanup runner, or the garbage collector).
        return Ok(Action::await_change());
    }
    let name = ep.name_any();
    let namespace = ep.namespace().unwrap_or_default();
    let this = ObjectRef::from_obj(ep.as_ref());
    let existing: Vec<Arc<EndpointSlice>> = ctx
        .slices
        .state()
        .into_iter()
        .filter(|s| mirrored(s) && endpoints_of(s).as_ref() == Some(&this))
        .collect();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let service = ctx.services.get(&ObjectRef::new(&name).within(&namespace));
    if !should_mirror(&ep) || service.as_ref().is_some_and(|s| selector(s).is_some()) {
        return delete(&api, &existing).await;
    }
    if service.is_none() {
        if existing.is_empty() {
            return Ok(Action::await_change());
        }
        // A Service the cache has not seen yet must not cost its slices: ask the server.
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
        let live = services
            .get_opt(&name)
            .await
            .map_err(|source| MirroringError::Api {
                action: format!("looking up service {namespace}/{name}"),
                source,
            })?;
        if live.is_none_or(|s| selector(&s).is_some()) {
            return delete(&api, &existing).await;
        }
        return Ok(Action::await_change());
    }
    let mirror = mirror(&ep);
    ctx.warn(&ep, &mirror).await;
    let mut by_key: BTreeMap<SliceKey, Vec<Arc<EndpointSlice>>> = BTreeMap::new();
    let mut stale = Vec::new();
    for slice in existing {
        match slice_key(&slice) {
            Some(key) => by_key.entry(key).or_default().push(slice),
            None => stale.push(slice),
        }
    }
    let mut failure = None;
    for (key, endpoints) in mirror.slices {
        let slice_name = slice_name(&name, &key);
        let mut candidates = by_key.remove(&key).unwrap_or_default();
        // One slice per key: the one of the derived name if there is one.
        candidates.sort_by_key(|s| (s.name_any() != slice_name, s.name_any()));
        let mut candidates = candidates.into_iter();
        let current = candidates.next();
        stale.extend(candidates);
        let endpoints: Vec<Endpoint> = endpoints.into_values().collect();
        let wanted = desired_slice(current.as_deref(), &ep, slice_name, &key, endpoints);
        let result = match current {
            Some(current) if same(&current, &wanted) => continue,
            Some(current) => api
                .replace(&current.name_any(), &PostParams::default(), &wanted)
                .await
                .map_err(|source| MirroringError::Api {
                    action: format!("updating endpoint slice {namespace}/{}", current.name_any()),
                    source,
                }),
            None => api
                .create(&PostParams::default(), &wanted)
                .await
                .map_err(|source| MirroringError::Api {
                    action: format!("creating endpoint slice {namespace}/{}", wanted.name_any()),
                    source,
                }),
        };
        if let Err(error) = result {
            failure.get_or_insert(error);
        }
    }
    // Slices of ports or families no longer listed go, after their successors were written.
    stale.extend(by_key.into_values().flatten());
    let deleted = delete(&api, &stale).await;
    match failure {
        Some(error) => Err(error),
        None => deleted,
    }
}

/// Deletes `slices` (those still there, and only those: a uid precondition each).
async fn delete(
    api: &Api<EndpointSlice>,
    slices: &[Arc<EndpointSlice>],
) -> Result<Action, MirroringError> {
    for slice in slices {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: slice.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&slice.name_any(), &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(source) => {
                return Err(MirroringError::Api {
                    action: format!(
                        "deleting endpoint slice {}/{}",
                        slice.namespace().unwrap_or_default(),
                        slice.name_any()
                    ),
                    source,
                });
            }
        }
    }
    Ok(Action::await_change())
}

impl Controller {
    /// Reports the addresses `mirror` left out as Warning events on `ep` (kube's
    /// `InvalidIPAddress`, `TooManyAddressesToMirror`), once per version of it.
    async fn warn(&self, ep: &Endpoints, mirror: &Mirror) {
        let key = format!("{}/{}", ep.namespace().unwrap_or_default(), ep.name_any());
        let version = ep.resource_version().unwrap_or_default();
        {
            let mut warned = self.warned.lock().unwrap_or_else(|e| e.into_inner());
            if mirror.skipped == 0 {
                warned.remove(&key);
                return;
            }
            if warned.get(&key) == Some(&version) {
                return;
            }
            // Forget the Endpoints that are gone, so the record stays as small as the cluster.
            warned.retain(|k, _| {
                let (ns, name) = k.split_once('/').unwrap_or_default();
                self.endpoints
                    .get(&ObjectRef::new(name).within(ns))
                    .is_some()
            });
            warned.insert(key, version);
        }
        if mirror.invalid > 0 {
            let message = format!(
                "Skipped {} invalid IP addresses when mirroring to EndpointSlices",
                mirror.invalid
            );
            events::publish(
                &self.client,
                COMPONENT,
                ep,
                EventType::Warning,
                "InvalidIPAddress",
                &message,
            )
            .await;
        }
        if mirror.skipped > mirror.invalid {
            let message = format!(
                "A max of {MAX_ADDRESSES} addresses can be mirrored to EndpointSlices per \
                 Endpoints subset. {} addresses were skipped",
                mirror.skipped - mirror.invalid
            );
            events::publish(
                &self.client,
                COMPONENT,
                ep,
                EventType::Warning,
                "TooManyAddressesToMirror",
                &message,
            )
            .await;
        }
    }
}

/// Deletes a mirrored slice whose Endpoints is gone, as checked with the API server, not
/// only the cache (which may not have seen a new Endpoints yet). While the Endpoints
/// exists, its slices are the main runner's to keep or delete.
async fn cleanup_reconcile(
    slice: Arc<EndpointSlice>,
    ctx: Arc<Controller>,
) -> Result<Action, MirroringError> {
    if !mirrored(&slice) || slice.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = slice.namespace().unwrap_or_default();
    let api: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(ep) = endpoints_of(&slice) else {
        // Mirrored but naming no Endpoints: nothing could ever keep it.
        return delete(&api, &[slice]).await;
    };
    if ctx.endpoints.get(&ep).is_some() {
        return Ok(Action::await_change());
    }
    let endpoints: Api<Endpoints> = Api::namespaced(ctx.client.clone(), &namespace);
    let live = endpoints
        .get_opt(&ep.name)
        .await
        .map_err(|source| MirroringError::Api {
            action: format!("looking up endpoints {namespace}/{}", ep.name),
            source,
        })?;
    if live.is_some() {
        return Ok(Action::await_change());
    }
    delete(&api, &[slice]).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoints(subsets: serde_json::Value) -> Endpoints {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "ns", "uid": "u1",
                         "labels": {"team": "a"},
                         "annotations": {"note": "x", TRIGGER_TIME: "t", LAST_APPLIED: "{}"}},
            "subsets": subsets,
        }))
        .unwrap()
    }

    fn port(name: &str, port: i32) -> PortKey {
        (name.into(), port, "TCP".into(), None)
    }

    #[test]
    fn repacking_merges_ports_and_addresses() {
        // The same address under two ports: one subset with both ports.
        let subsets = repack(
            &endpoints(json!([
                {"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "a", "port": 8090}]},
                {"addresses": [{"ip": "10.0.0.1"}], "ports": [{"name": "b", "port": 9090}]},
            ]))
            .subsets
            .unwrap(),
        );
        assert_eq!(subsets.len(), 1, "{subsets:?}");
        assert_eq!(subsets[0].ports, vec![port("a", 8090), port("b", 9090)]);
        assert_eq!(subsets[0].ready.len(), 1);
        // Ready in one subset and not in another (same port): not ready.
        let subsets = repack(
            &endpoints(json!([
                {"addresses": [{"ip": "10.0.0.2"}, {"ip": "10.0.0.1"}], "ports": [{"port": 80}]},
                {"notReadyAddresses": [{"ip": "10.0.0.1"}], "ports": [{"port": 80, "protocol": "TCP"}]},
            ]))
            .subsets
            .unwrap(),
        );
        assert_eq!(subsets.len(), 1, "{subsets:?}");
        let ips = |l: &[EndpointAddress]| l.iter().map(|a| a.ip.clone()).collect::<Vec<_>>();
        assert_eq!(ips(&subsets[0].ready), vec!["10.0.0.2"]);
        assert_eq!(ips(&subsets[0].not_ready), vec!["10.0.0.1"]);
    }

    #[test]
    fn mirrors_by_family_and_ports_skipping_what_is_no_ip() {
        let ep = endpoints(json!([
            {"addresses": [
                {"ip": "10.0.0.1", "hostname": "h", "nodeName": "n1",
                 "targetRef": {"kind": "Pod", "name": "p", "uid": "pu"}},
                {"ip": "2001:DB8::1"}, {"ip": "::ffff:10.0.0.9"}, {"ip": "010.000.000.003"},
                {"ip": "not-an-ip"}],
             "notReadyAddresses": [{"ip": "10.0.0.2"}],
             "ports": [{"name": "web", "port": 80}]},
        ]));
        let m = mirror(&ep);
        assert_eq!((m.invalid, m.skipped), (1, 1));
        let v4: Vec<&Endpoint> = m.slices[&(Family::V4, vec![port("web", 80)])]
            .values()
            .collect();
        let addresses: Vec<&str> = v4.iter().map(|e| e.addresses[0].as_str()).collect();
        assert_eq!(
            addresses,
            vec!["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.9"]
        );
        let first = v4[0];
        assert_eq!(first.hostname.as_deref(), Some("h"));
        assert_eq!(first.node_name.as_deref(), Some("n1"));
        assert_eq!(
            first.target_ref.as_ref().unwrap().name.as_deref(),
            Some("p")
        );
        assert_eq!(first.conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(v4[1].conditions.as_ref().unwrap().ready, Some(false));
        let v6 = &m.slices[&(Family::V6, vec![port("web", 80)])];
        assert_eq!(v6.values().next().unwrap().addresses, vec!["2001:db8::1"]);
    }

    #[test]
    fn at_most_a_thousand_addresses_per_subset() {
        let many: Vec<serde_json::Value> = (0..1200)
            .map(|i| json!({"ip": format!("10.0.{}.{}", i / 250, i % 250)}))
            .collect();
        let m = mirror(&endpoints(
            json!([{"addresses": many, "ports": [{"port": 80}]}]),
        ));
        assert_eq!((m.invalid, m.skipped), (0, 200));
        assert_eq!(m.slices.values().next().unwrap().len(), MAX_ADDRESSES);
    }

    #[test]
    fn slices_carry_the_endpoints_metadata_under_stable_names() {
        let ep = endpoints(json!([]));
        let key = (Family::V4, vec![port("web", 80)]);
        let name = slice_name("web", &key);
        assert_eq!(name, slice_name("web", &key));
        assert_ne!(name, slice_name("web", &(Family::V6, key.1.clone())));
        assert!(name.starts_with("web-") && name.len() == 14, "{name}");
        let long = slice_name(&format!("{}.x", "a".repeat(241)), &key);
        assert!(long.len() <= 253 && !long.contains(".-"), "{long}");
        let slice = desired_slice(None, &ep, name, &key, Vec::new());
        let labels = slice.labels();
        assert_eq!(labels[SERVICE_NAME], "web");
        assert_eq!(labels[MANAGED_BY], CONTROLLER);
        assert_eq!(labels["team"], "a");
        let annotations = slice.annotations();
        assert_eq!(annotations.keys().collect::<Vec<_>>(), vec!["note"]);
        let owner = &slice.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("Endpoints", "u1")
        );
        assert!(same(&slice, &slice));
        let mut defaulted = slice.clone();
        defaulted.ports.as_mut().unwrap()[0].protocol = None;
        assert!(
            same(&defaulted, &slice),
            "a defaulted protocol is no change"
        );
    }

    #[test]
    fn skipped_endpoints() {
        let mut ep = endpoints(json!([]));
        assert!(should_mirror(&ep));
        ep.metadata
            .labels
            .get_or_insert_default()
            .insert(SKIP_MIRROR.into(), "true".into());
        assert!(!should_mirror(&ep));
        let mut lock = endpoints(json!([]));
        lock.metadata
            .annotations
            .get_or_insert_default()
            .insert(LEADER.into(), "{}".into());
        assert!(!should_mirror(&lock));
    }
}
