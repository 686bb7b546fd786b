//! The `default/kubernetes` Service and its Endpoints and EndpointSlice: how pods find the
//! API server (`KUBERNETES_SERVICE_HOST`, `kubernetes.default.svc`), kept by the server
//! itself as kube-apiserver's own controller does; and the default ServiceCIDR `kubernetes`
//! (the range Services' cluster IPs come from, Ready), as its default-service-CIDR
//! controller keeps it.
//!
//! The Service has the first address of the service CIDR (the allocator keeps it free) and
//! port 443 (`https`) → the servers' port; its Endpoints and EndpointSlice list exactly the
//! live API servers, as kube-apiserver's lease endpoint reconciler keeps them: each server
//! renews a Lease of its own in `kube-system` (labelled [`IDENTITY_LABEL`], its advertise
//! address in [`ADDRESS_ANNOTATION`]) every [`INTERVAL`], lists the others' and writes the
//! addresses of those renewed within their duration; an expired Lease (a server that died
//! or was cut off) is deleted by whichever server sees it first. [`KubernetesService::run`]
//! puts the objects back whenever they are missing or different. A server shutting down
//! cleanly deletes its Lease ([`KubernetesService::release`]) so clients stop dialling it at
//! once. Servers on one datastore are expected to listen on the same port (the Service has
//! one target port); one on another port is left out of the endpoints, with a warning.

use std::net::IpAddr;
use std::time::Duration;

use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::request::Target;

/// The Service's (and its Endpoints' and EndpointSlice's) name, in namespace `default`.
pub const NAME: &str = "kubernetes";
/// The namespace.
pub const NAMESPACE: &str = "default";
/// How often the objects are checked.
pub const INTERVAL: Duration = Duration::from_secs(2);
/// The EndpointSlice's `endpointslice.kubernetes.io/managed-by`: not the EndpointSlice
/// controller's (which leaves Services without a selector alone anyway).
pub const MANAGED_BY: &str = "orquestra-apiserver";

/// The label on every API server's endpoint Lease (kube-apiserver's identity Leases' label).
pub const IDENTITY_LABEL: &str = "apiserver.kubernetes.io/identity";
/// The label's value.
pub const IDENTITY_VALUE: &str = "kube-apiserver";
/// The endpoint Lease's annotation holding the server's advertise `address:port`.
pub const ADDRESS_ANNOTATION: &str = "orquestra.dev/advertise-address";
/// Where the endpoint Leases live.
pub const LEASE_NAMESPACE: &str = "kube-system";
/// How long an endpoint Lease stays valid unrenewed: a server silent this long (dead, or
/// partitioned from the datastore) leaves the endpoints (kube-apiserver's master lease TTL
/// is 15 s too).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);

/// Where the API server is reachable from pods.
#[derive(Debug, Clone)]
pub struct KubernetesService {
    /// The server's advertise address (its Endpoints' address).
    pub address: IpAddr,
    /// The port the server listens on (the Service's target port).
    pub port: u16,
    /// This server's identity: its endpoint Lease's holder (unique per server).
    pub identity: String,
}

impl KubernetesService {
    /// Keeps the objects in place until the task is dropped; failures are logged and retried.
    pub async fn run(self, engine: Engine) {
        loop {
            if let Err(e) = self.reconcile(&engine).await {
                tracing::warn!(error = %e, "keeping the kubernetes Service");
            }
            tokio::time::sleep(INTERVAL).await;
        }
    }

    /// The name of this server's endpoint Lease: its advertise address and port, readable in
    /// `kubectl get lease -n kube-system`.
    pub fn lease_name(&self) -> String {
        let address: String = self
            .address
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        format!("apiserver-{address}-{}", self.port)
    }

    /// One pass: renews this server's Lease, drops expired ones, creates what is missing,
    /// corrects what differs.
    pub async fn reconcile(&self, engine: &Engine) -> Result<(), ApiError> {
        let port = json!([{"name": "https", "port": self.port, "protocol": "TCP"}]);
        self.renew(engine).await?;
        let live = self.live_servers(engine).await?;
        // The Service: only its ports are ours to correct (its cluster IP cannot change).
        ensure(
            engine,
            "networking.k8s.io",
            "servicecidrs",
            None,
            json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR",
                "metadata": {"name": NAME},
                "spec": {"cidrs": [engine.service_cidr.to_string()]},
            }),
            &[],
        )
        .await?;
        ready_service_cidr(engine).await?;
        ensure(
            engine,
            "",
            "services",
            Some(NAMESPACE),
            json!({
                "apiVersion": "v1", "kind": "Service",
                "metadata": {"name": NAME, "namespace": NAMESPACE,
                             "labels": {"component": "apiserver", "provider": "kubernetes"}},
                "spec": {"type": "ClusterIP", "clusterIP": engine.service_cidr.first().to_string(),
                         "sessionAffinity": "None",
                         "ports": [{"name": "https", "port": 443, "protocol": "TCP",
                                    "targetPort": self.port}]},
            }),
            &["/spec/ports"],
        )
        .await?;
        ensure(
            engine,
            "",
            "endpoints",
            Some(NAMESPACE),
            json!({
                "apiVersion": "v1", "kind": "Endpoints",
                "metadata": {"name": NAME, "namespace": NAMESPACE,
                             "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
                "subsets": [{"addresses": live.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
                             "ports": port}],
            }),
            &["/subsets", "/metadata/labels"],
        )
        .await?;
        let family = if self.address.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        };
        ensure(
            engine,
            "discovery.k8s.io",
            "endpointslices",
            Some(NAMESPACE),
            json!({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"name": NAME, "namespace": NAMESPACE,
                             "labels": {"kubernetes.io/service-name": NAME,
                                        "endpointslice.kubernetes.io/managed-by": MANAGED_BY}},
                "addressType": family,
                "endpoints": live.iter()
                    .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
                    .collect::<Vec<_>>(),
                "ports": port,
            }),
            &["/addressType", "/endpoints", "/ports", "/metadata/labels"],
        )
        .await
    }
}

impl KubernetesService {
    /// The endpoint Leases' resource.
    fn leases(engine: &Engine, name: Option<String>) -> Result<Target, ApiError> {
        let def = engine
            .registry
            .get("coordination.k8s.io", "v1", "leases")
            .ok_or(ApiError::NoRoute)?;
        Ok(Target {
            def,
            namespace: Some(LEASE_NAMESPACE.into()),
            name,
            subresource: None,
        })
    }

    /// Creates or renews this server's endpoint Lease.
    async fn renew(&self, engine: &Engine) -> Result<(), ApiError> {
        let target = Self::leases(engine, Some(self.lease_name()))?;
        let seconds = LEASE_DURATION.as_secs();
        let spec = json!({
            "holderIdentity": self.identity,
            "leaseDurationSeconds": seconds,
            "renewTime": micro_time(jiff::Timestamp::now()),
        });
        let metadata = json!({
            "name": self.lease_name(), "namespace": LEASE_NAMESPACE,
            "labels": {IDENTITY_LABEL: IDENTITY_VALUE},
            "annotations": {ADDRESS_ANNOTATION: std::net::SocketAddr::new(self.address, self.port).to_string()},
        });
        match engine.get(&target).await {
            Ok(mut lease) => {
                lease["metadata"]["labels"] = metadata["labels"].clone();
                lease["metadata"]["annotations"] = metadata["annotations"].clone();
                lease["spec"] = spec;
                match engine.update(&target, lease, false).await {
                    // Another pass (or a restarted server with the same address) wrote in
                    // between: the next pass renews.
                    Ok(_) | Err(ApiError::Conflict { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(ApiError::NotFound { .. }) => {
                let lease = json!({
                    "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": metadata,
                    "spec": spec,
                });
                match engine
                    .create(&target.def, Some(LEASE_NAMESPACE), lease, false)
                    .await
                {
                    Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// The advertise addresses of the servers whose Leases are live, sorted, this one's
    /// always among them; expired Leases are deleted (preconditioned on the version judged,
    /// so one renewed meanwhile stays).
    async fn live_servers(&self, engine: &Engine) -> Result<Vec<String>, ApiError> {
        let target = Self::leases(engine, None)?;
        let params = crate::request::Params {
            label_selector: Some(format!("{IDENTITY_LABEL}={IDENTITY_VALUE}")),
            ..crate::request::Params::default()
        };
        let list = engine.list(&target, &params).await?;
        let now = jiff::Timestamp::now();
        let mut live = vec![self.address.to_string()];
        for lease in list["items"].as_array().into_iter().flatten() {
            let Some(endpoint) = lease
                .pointer(&format!(
                    "/metadata/annotations/{}",
                    ADDRESS_ANNOTATION.replace('/', "~1")
                ))
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            else {
                continue;
            };
            if lease_expired(lease, now) {
                let name = lease["metadata"]["name"].as_str().unwrap_or_default();
                tracing::info!(lease = name, %endpoint, "an API server's endpoint Lease expired; removing it from the kubernetes endpoints");
                let options = json!({"preconditions": {
                    "resourceVersion": lease["metadata"]["resourceVersion"],
                }});
                let one = Self::leases(engine, Some(name.to_owned()))?;
                match engine
                    .delete(&one, &options, &crate::request::Params::default())
                    .await
                {
                    Ok(_) | Err(ApiError::NotFound { .. }) | Err(ApiError::Conflict { .. }) => {}
                    Err(e) => return Err(e),
                }
                continue;
            }
            if endpoint.port() != self.port {
                tracing::warn!(%endpoint, port = self.port, "an API server listens on another port than this one; it is left out of the kubernetes endpoints (the Service has one target port)");
                continue;
            }
            live.push(endpoint.ip().to_string());
        }
        live.sort();
        live.dedup();
        Ok(live)
    }

    /// Deletes this server's endpoint Lease (a clean shutdown), so the next pass of any
    /// other server drops it from the endpoints without waiting for it to expire.
    pub async fn release(&self, engine: &Engine) {
        let Ok(target) = Self::leases(engine, Some(self.lease_name())) else {
            return;
        };
        match engine
            .delete(&target, &json!({}), &crate::request::Params::default())
            .await
        {
            Ok(_) | Err(ApiError::NotFound { .. }) => {}
            Err(error) => tracing::warn!(%error, "deleting this server's endpoint Lease"),
        }
    }
}

/// A Lease's `renewTime` as a `MicroTime`.
fn micro_time(t: jiff::Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string()
}

/// Whether a Lease was last renewed longer ago than its duration (one without a renewal
/// time is expired).
fn lease_expired(lease: &Value, now: jiff::Timestamp) -> bool {
    let Some(renewed) = lease
        .pointer("/spec/renewTime")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<jiff::Timestamp>().ok())
    else {
        return true;
    };
    let seconds = lease
        .pointer("/spec/leaseDurationSeconds")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    now.duration_since(renewed) > jiff::SignedDuration::from_secs(seconds)
}

/// Marks the default ServiceCIDR Ready, as kube's default-service-CIDR controller does.
async fn ready_service_cidr(engine: &Engine) -> Result<(), ApiError> {
    let Some(def) = engine
        .registry
        .get("networking.k8s.io", "v1", "servicecidrs")
    else {
        return Ok(());
    };
    let target = Target {
        def,
        namespace: None,
        name: Some(NAME.into()),
        subresource: Some("status".into()),
    };
    let mut cidr = engine.get(&target).await?;
    let ready = cidr
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
    if ready {
        return Ok(());
    }
    cidr["status"] = json!({"conditions": [{
        "type": "Ready", "status": "True", "reason": "",
        "message": "Kubernetes default Service CIDR is ready",
        "lastTransitionTime": crate::object::now(),
    }]});
    match engine.update(&target, cidr, false).await {
        Ok(_) | Err(ApiError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `desired` (in `namespace`, or cluster-scoped) if it is missing; otherwise copies
/// the `owned` fields (JSON pointers) into the object when they differ.
async fn ensure(
    engine: &Engine,
    group: &str,
    plural: &str,
    namespace: Option<&str>,
    desired: Value,
    owned: &[&str],
) -> Result<(), ApiError> {
    let def = engine
        .registry
        .get(group, "v1", plural)
        .ok_or(ApiError::NoRoute)?;
    let target = Target {
        def: def.clone(),
        namespace: namespace.map(str::to_owned),
        name: Some(NAME.into()),
        subresource: None,
    };
    let mut current = match engine.get(&target).await {
        Ok(current) => current,
        Err(ApiError::NotFound { .. }) => {
            return match engine.create(&def, namespace, desired.clone(), false).await {
                Ok(_) | Err(ApiError::AlreadyExists { .. }) => Ok(()),
                Err(e) => Err(e),
            };
        }
        Err(e) => return Err(e),
    };
    let mut changed = false;
    for pointer in owned {
        let want = desired.pointer(pointer).cloned().unwrap_or(Value::Null);
        // Labels: ours must be there; others may be added.
        let differs = if *pointer == "/metadata/labels" {
            want.as_object().into_iter().flatten().any(|(k, v)| {
                current
                    .pointer("/metadata/labels")
                    .and_then(|l| l.get(k))
                    .is_none_or(|have| have != v)
            })
        } else {
            current.pointer(pointer) != Some(&want)
        };
        if differs {
            changed = true;
            if *pointer == "/metadata/labels" {
                if !current["metadata"]["labels"].is_object() {
                    current["metadata"]["labels"] = json!({});
                }
                for (k, v) in want.as_object().into_iter().flatten() {
                    current["metadata"]["labels"][k] = v.clone();
                }
            } else if let Some(slot) = current.pointer_mut(pointer) {
                *slot = want;
            } else {
                let field = pointer.trim_start_matches('/');
                if let Some((parent, leaf)) = field.rsplit_once('/') {
                    current[parent][leaf] = want;
                } else {
                    current[field] = want;
                }
            }
        }
    }
    if !changed {
        return Ok(());
    }
    match engine.update(&target, current, false).await {
        // Someone wrote in between: the next pass looks again.
        Ok(_) | Err(ApiError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_lease_expires_after_its_duration() {
        let now: jiff::Timestamp = "2026-12-05T10:00:20Z".parse().unwrap();
        let lease =
            |renewed: &str| json!({"spec": {"renewTime": renewed, "leaseDurationSeconds": 15}});
        assert!(!super::lease_expired(
            &lease("2026-12-05T10:00:10.500000Z"),
            now
        ));
        assert!(super::lease_expired(
            &lease("2026-12-05T10:00:04.000000Z"),
            now
        ));
        assert!(super::lease_expired(&json!({"spec": {}}), now));
        assert_eq!(
            super::micro_time("2026-12-05T10:00:10.5Z".parse().unwrap()),
            "2026-12-05T10:00:10.500000Z"
        );
    }

    #[test]
    fn the_cluster_ip_is_the_first_of_the_range() {
        use crate::service::ServiceCidr;
        use std::net::Ipv4Addr;
        assert_eq!(ServiceCidr::DEFAULT.first(), Ipv4Addr::new(10, 43, 0, 1));
        let cidr: ServiceCidr = "10.96.0.0/12".parse().unwrap();
        assert_eq!(cidr.first(), Ipv4Addr::new(10, 96, 0, 1));
        assert!("10.96.0.1/12".parse::<ServiceCidr>().is_err());
        assert!("10.96.0.0/8".parse::<ServiceCidr>().is_err());
        assert!("fd00::/108".parse::<ServiceCidr>().is_err());
    }
}
