//! Services: defaults, and the cluster IPs and node ports they are given.
//!
//! Each allocated IP and port is a key of its own in the store (`/registry/orquestra/…`),
//! taken with create-if-absent — so two API servers on one etcd can never hand out the same
//! one — and released when the Service goes.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;

/// The range Services' cluster IPs come from (kube-apiserver's `--service-cluster-ip-range`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCidr {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub bits: u8,
}

impl ServiceCidr {
    /// k3s' default, 10.43.0.0/16.
    pub const DEFAULT: ServiceCidr = ServiceCidr {
        network: Ipv4Addr::new(10, 43, 0, 0),
        bits: 16,
    };

    /// The first address: the `kubernetes` Service's cluster IP.
    pub fn first(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// How many addresses the range spans (network and broadcast included).
    fn size(&self) -> u32 {
        1u32 << (32 - u32::from(self.bits))
    }
}

impl std::fmt::Display for ServiceCidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.bits)
    }
}

impl std::str::FromStr for ServiceCidr {
    type Err = String;

    /// An IPv4 network with a prefix of /12 to /28, given by its network address.
    fn from_str(text: &str) -> Result<ServiceCidr, String> {
        let (address, bits) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a CIDR like 10.43.0.0/16"))?;
        let network: Ipv4Addr = address
            .parse()
            .map_err(|_| format!("{text:?}: {address:?} is not an IPv4 address"))?;
        let bits: u8 = bits
            .parse()
            .ok()
            .filter(|b| (12..=28).contains(b))
            .ok_or_else(|| format!("{text:?}: the prefix length must be 12 to 28"))?;
        let cidr = ServiceCidr { network, bits };
        if u32::from(network) & (cidr.size() - 1) != 0 {
            return Err(format!(
                "{text:?}: {network} is not the network address of a /{bits}"
            ));
        }
        Ok(cidr)
    }
}
/// The node port range.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

const IP_PREFIX: &str = "/registry/orquestra/serviceips/";
const PORT_PREFIX: &str = "/registry/orquestra/nodeports/";

/// Whether `def` is the core Service resource.
pub fn is_service(def: &ResourceDef) -> bool {
    def.group.is_empty() && def.kind == "Service"
}

fn owner(object: &Value) -> bytes::Bytes {
    let meta = &object["metadata"];
    bytes::Bytes::from(format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    ))
}

fn invalid(object: &Value, field: &str, message: String) -> ApiError {
    ApiError::Invalid {
        kind: "Service".into(),
        name: object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .into(),
        group: String::new(),
        causes: vec![crate::error::Cause {
            reason: "FieldValueInvalid".into(),
            message,
            field: field.into(),
        }],
    }
}

/// Takes `key` for `object`; false if it is taken.
async fn take(engine: &Engine, key: &str, object: &Value) -> Result<bool, ApiError> {
    match engine.store.create(key, owner(object)).await {
        Ok(_) => Ok(true),
        Err(orquestra_store::Error::AlreadyExists { .. }) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Picks a free value: random tries first, then a scan, so a nearly full range still works.
async fn allocate<T: std::fmt::Display + Copy>(
    engine: &Engine,
    object: &Value,
    prefix: &str,
    candidates: &[T],
) -> Result<Option<T>, ApiError> {
    if candidates.is_empty() {
        return Ok(None);
    }
    let random = uuid::Uuid::new_v4().as_u128();
    for i in 0..16u128 {
        let candidate =
            candidates[((random >> (i * 7)) as usize).wrapping_add(i as usize) % candidates.len()];
        if take(engine, &format!("{prefix}{candidate}"), object).await? {
            return Ok(Some(candidate));
        }
    }
    for candidate in candidates {
        if take(engine, &format!("{prefix}{candidate}"), object).await? {
            return Ok(Some(*candidate));
        }
    }
    Ok(None)
}

/// The defaults kube-apiserver gives every Service written: type ClusterIP,
/// `sessionAffinity: None`, TCP ports whose target is the port. Returns the type.
fn defaults(object: &mut Value) -> String {
    if !object["spec"].is_object() {
        object["spec"] = json!({});
    }
    let kind = object["spec"]["type"]
        .as_str()
        .unwrap_or("ClusterIP")
        .to_owned();
    object["spec"]["type"] = json!(kind);
    if object["spec"]["sessionAffinity"].is_null() {
        object["spec"]["sessionAffinity"] = json!("None");
    }
    if let Some(ports) = object["spec"]["ports"].as_array_mut() {
        for port in ports {
            if port["protocol"].is_null() {
                port["protocol"] = json!("TCP");
            }
            if port["targetPort"].is_null() {
                port["targetPort"] = port["port"].clone();
            }
        }
    }
    kind
}

/// Defaults a new Service and allocates its cluster IP and node ports.
pub async fn admit_create(engine: &Engine, object: &mut Value) -> Result<(), ApiError> {
    let kind = defaults(object);
    if kind == "ExternalName" {
        return Ok(());
    }
    allocate_cluster_ip(engine, object).await?;
    if kind == "NodePort" || kind == "LoadBalancer" {
        if let Err(error) = allocate_node_ports(engine, object, &[]).await {
            release(engine, object).await;
            return Err(error);
        }
    }
    Ok(())
}

/// Gives `object` the cluster IP it asks for (`spec.clusterIP`), `None` (headless), or a free
/// one, with `clusterIPs` and the IP family fields to match.
async fn allocate_cluster_ip(engine: &Engine, object: &mut Value) -> Result<(), ApiError> {
    let cidr = engine.service_cidr;
    let (network, bits) = (cidr.network, cidr.bits);
    let base = u32::from(network);
    let size = cidr.size();
    match object["spec"]["clusterIP"].as_str() {
        Some("None") => {}
        Some(ip) if !ip.is_empty() => {
            let parsed: Ipv4Addr = ip.parse().map_err(|_| {
                invalid(
                    object,
                    "spec.clusterIP",
                    format!("Invalid value: {ip:?}: must be a valid IP address"),
                )
            })?;
            let offset = u32::from(parsed).wrapping_sub(base);
            if offset == 0 || offset >= size - 1 {
                return Err(invalid(
                    object,
                    "spec.clusterIP",
                    format!(
                        "Invalid value: {ip:?}: provided IP is not in the valid range. The range of valid IPs is {network}/{bits}"
                    ),
                ));
            }
            if !take(engine, &format!("{IP_PREFIX}{parsed}"), object).await? {
                return Err(invalid(
                    object,
                    "spec.clusterIP",
                    format!("Invalid value: {ip:?}: provided IP is already allocated"),
                ));
            }
        }
        _ => {
            // .0 is the network and .1 is kept for the `kubernetes` Service.
            let candidates: Vec<Ipv4Addr> =
                (2..size - 1).map(|i| Ipv4Addr::from(base + i)).collect();
            let ip = allocate(engine, object, IP_PREFIX, &candidates)
                .await?
                .ok_or_else(|| {
                    invalid(
                        object,
                        "spec.clusterIP",
                        "Internal error: no free cluster IP".into(),
                    )
                })?;
            object["spec"]["clusterIP"] = json!(ip.to_string());
        }
    }
    let cluster_ip = object["spec"]["clusterIP"].clone();
    object["spec"]["clusterIPs"] = json!([cluster_ip]);
    if cluster_ip != "None" {
        object["spec"]["ipFamilies"] = json!(["IPv4"]);
        object["spec"]["ipFamilyPolicy"] = json!("SingleStack");
    }
    Ok(())
}

/// Gives every port of a NodePort or LoadBalancer Service a node port: the one it names
/// (taken unless `held` says the Service holds it already) or a free one — none for a
/// LoadBalancer with `allocateLoadBalancerNodePorts: false`, whose load balancer reaches the
/// Service without them.
async fn allocate_node_ports(
    engine: &Engine,
    object: &mut Value,
    held: &[u64],
) -> Result<(), ApiError> {
    let count = object["spec"]["ports"].as_array().map_or(0, Vec::len);
    let automatic = !(object["spec"]["type"] == "LoadBalancer"
        && object["spec"]["allocateLoadBalancerNodePorts"] == false);
    for i in 0..count {
        // 0 is how an unset node port arrives in protobuf.
        match object["spec"]["ports"][i]["nodePort"]
            .as_u64()
            .filter(|p| *p != 0)
        {
            Some(port) if held.contains(&port) => {}
            Some(port) => {
                if port > u64::from(u16::MAX) || !NODE_PORTS.contains(&(port as u16)) {
                    return Err(invalid(
                        object,
                        &format!("spec.ports[{i}].nodePort"),
                        format!(
                            "Invalid value: {port}: provided port is not in the valid range. The range of valid ports is 30000-32767"
                        ),
                    ));
                }
                if !take(engine, &format!("{PORT_PREFIX}{port}"), object).await? {
                    return Err(invalid(
                        object,
                        &format!("spec.ports[{i}].nodePort"),
                        format!("Invalid value: {port}: provided port is already allocated"),
                    ));
                }
            }
            None if !automatic => {}
            None => {
                let candidates: Vec<u16> = NODE_PORTS.collect();
                let port = allocate(engine, object, PORT_PREFIX, &candidates)
                    .await?
                    .ok_or_else(|| {
                        invalid(
                            object,
                            "spec.ports",
                            "Internal error: no free node port".into(),
                        )
                    })?;
                object["spec"]["ports"][i]["nodePort"] = json!(port);
            }
        }
    }
    Ok(())
}

/// The allocation keys a Service holds: its cluster IP and node ports.
fn allocations(object: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(ip) = object
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .filter(|ip| *ip != "None" && !ip.is_empty())
    {
        keys.push(format!("{IP_PREFIX}{ip}"));
    }
    for port in object["spec"]["ports"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        if let Some(p) = port["nodePort"].as_u64().filter(|p| *p != 0) {
            keys.push(format!("{PORT_PREFIX}{p}"));
        }
    }
    keys
}

/// What an update changed in a Service's allocations: the keys it newly took (to give back
/// if the write fails) and those the old version held that the new one does not (to free
/// once the write succeeds).
#[derive(Debug, Default)]
pub struct Reallocation {
    taken: Vec<String>,
    dropped: Vec<String>,
}

impl Reallocation {
    /// The write failed: gives back what the update took.
    pub async fn undo(self, engine: &Engine, object: &Value) {
        free(engine, object, self.taken).await;
    }

    /// The write succeeded: frees what the old version held and the new one does not.
    pub async fn done(self, engine: &Engine, object: &Value) {
        free(engine, object, self.dropped).await;
    }
}

/// Allocates what an updated Service newly needs, as kube-apiserver does when a Service
/// changes type or ports: a cluster IP when it stops being ExternalName, node ports for the
/// ports of a NodePort or LoadBalancer Service; a Service that becomes ExternalName drops its
/// cluster IPs, and one that becomes ClusterIP its node ports.
pub async fn admit_update(
    engine: &Engine,
    old: &Value,
    new: &mut Value,
    dry_run: bool,
) -> Result<Reallocation, ApiError> {
    let kind = defaults(new);
    if kind == "ExternalName" {
        if let Some(spec) = new["spec"].as_object_mut() {
            for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
                spec.remove(field);
            }
        }
    }
    if !matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
        for port in new["spec"]["ports"].as_array_mut().into_iter().flatten() {
            if let Some(port) = port.as_object_mut() {
                port.remove("nodePort");
            }
        }
    }
    let before = allocations(old);
    if dry_run {
        return Ok(Reallocation::default());
    }
    if kind != "ExternalName" && new["spec"]["clusterIP"].as_str().is_none_or(str::is_empty) {
        allocate_cluster_ip(engine, new).await?;
    }
    if matches!(kind.as_str(), "NodePort" | "LoadBalancer") {
        let held: Vec<u64> = old["spec"]["ports"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p["nodePort"].as_u64())
            .collect();
        if let Err(error) = allocate_node_ports(engine, new, &held).await {
            let taken: Vec<String> = allocations(new)
                .into_iter()
                .filter(|k| !before.contains(k))
                .collect();
            free(engine, new, taken).await;
            return Err(error);
        }
    }
    let after = allocations(new);
    Ok(Reallocation {
        taken: after
            .iter()
            .filter(|k| !before.contains(k))
            .cloned()
            .collect(),
        dropped: before.into_iter().filter(|k| !after.contains(k)).collect(),
    })
}

/// Keeps what an update may not change (or may leave out): the cluster IPs and node ports —
/// unless the Service becomes ExternalName, which has none.
pub fn keep_allocations(old: &Value, new: &mut Value) {
    if new["spec"]["type"] == "ExternalName" {
        return;
    }
    for field in ["clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy"] {
        if new["spec"][field].is_null() || new["spec"][field] == "" {
            if let Some(v) = old.pointer(&format!("/spec/{field}")) {
                new["spec"][field] = v.clone();
            }
        }
    }
    if let (Some(old_ports), Some(new_ports)) = (
        old["spec"]["ports"].as_array(),
        new["spec"]["ports"].as_array_mut(),
    ) {
        for port in new_ports {
            if port["nodePort"].is_null() {
                if let Some(same) = old_ports
                    .iter()
                    .find(|p| p["port"] == port["port"] && p["protocol"] == port["protocol"])
                {
                    if !same["nodePort"].is_null() {
                        port["nodePort"] = same["nodePort"].clone();
                    }
                }
            }
        }
    }
}

/// A Service's cluster IP cannot change once allocated (kube-apiserver: "field is
/// immutable"); only switching to or from ExternalName may drop it.
pub fn check_immutable(old: &Value, new: &Value) -> Result<(), ApiError> {
    let (before, after) = (&old["spec"]["clusterIP"], &new["spec"]["clusterIP"]);
    let external = new["spec"]["type"] == "ExternalName" || old["spec"]["type"] == "ExternalName";
    if !external && before.is_string() && before != after {
        return Err(invalid(
            new,
            "spec.clusterIPs[0]",
            format!("Invalid value: {after}: may not change once set"),
        ));
    }
    Ok(())
}

/// Frees a Service's cluster IP and node ports (best effort: a leftover key only wastes one
/// address).
pub async fn release(engine: &Engine, object: &Value) {
    free(engine, object, allocations(object)).await;
}

/// Frees `keys` that `object` holds.
async fn free(engine: &Engine, object: &Value, keys: Vec<String>) {
    let me = owner(object);
    for key in keys {
        // Only what this Service holds: never another Service's allocation.
        if let Ok((_, Some(kv))) = engine.store.get(&key, None).await {
            if kv.value == me {
                let _ = engine.store.delete(&key, Some(kv.mod_revision)).await;
            }
        }
    }
}
