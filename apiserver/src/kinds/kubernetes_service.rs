//! The `default/kubernetes` Service and its Endpoints and EndpointSlice: how pods find the
//! API server (`KUBERNETES_SERVICE_HOST`, `kubernetes.default.svc`), kept by the server
//! itself as kube-apiserver's own controller does; and the default ServiceCIDR `kubernetes`
//! (the range Services' cluster IPs come from, Ready), as its default-service-CIDR
//! controller keeps it.
//!
//! The Service has the first address of the service CIDR (the allocator keeps it free) and
//! port 443 (`https`) → the server's port; its Endpoints and EndpointSlice point at the
//! server's advertise address. [`KubernetesService::run`] puts them back whenever they are
//! missing or different, every [`INTERVAL`]. With several servers on one datastore, each
//! writes its own address (the last one wins): there is no lease per server yet.

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

/// Where the API server is reachable from pods.
#[derive(Debug, Clone, Copy)]
pub struct KubernetesService {
    /// The server's advertise address (its Endpoints' address).
    pub address: IpAddr,
    /// The port the server listens on (the Service's target port).
    pub port: u16,
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

    /// One pass: creates what is missing, corrects what differs.
    pub async fn reconcile(&self, engine: &Engine) -> Result<(), ApiError> {
        let port = json!([{"name": "https", "port": self.port, "protocol": "TCP"}]);
        let ip = self.address.to_string();
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
                "subsets": [{"addresses": [{"ip": ip}], "ports": port}],
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
                "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
                "ports": port,
            }),
            &["/addressType", "/endpoints", "/ports", "/metadata/labels"],
        )
        .await
    }
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
