//! The Docker-link-style environment of Services the kubelet gives every container:
//! `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]`, `<NAME>_PORT` and
//! `<NAME>_PORT_<port>_<PROTO>[_PROTO|_PORT|_ADDR]`, for each Service with a cluster IP in the
//! pod's namespace (unless the pod sets `enableServiceLinks: false`) and always for the
//! `default/kubernetes` Service (what in-cluster clients find the API server by). Read when a
//! container starts, as the kubelet does: Services made later show in the next container.

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

/// The variables for `service` (none without a cluster IP: headless or ExternalName).
pub fn service_env(service: &Service) -> Vec<(String, String)> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let Some(ip) = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None")
    else {
        return Vec::new();
    };
    let ports = spec.ports.clone().unwrap_or_default();
    let Some(first) = ports.first() else {
        return Vec::new();
    };
    let name = service.name_any().to_uppercase().replace('-', "_");
    let protocol = |p: &ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
    let mut env = vec![
        (format!("{name}_SERVICE_HOST"), ip.clone()),
        (format!("{name}_SERVICE_PORT"), first.port.to_string()),
    ];
    for port in &ports {
        if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
            env.push((
                format!(
                    "{name}_SERVICE_PORT_{}",
                    port_name.to_uppercase().replace('-', "_")
                ),
                port.port.to_string(),
            ));
        }
    }
    env.push((
        format!("{name}_PORT"),
        format!("{}://{ip}:{}", protocol(first).to_lowercase(), first.port),
    ));
    for port in &ports {
        let proto = protocol(port);
        let prefix = format!("{name}_PORT_{}_{}", port.port, proto.to_uppercase());
        env.push((
            prefix.clone(),
            format!("{}://{ip}:{}", proto.to_lowercase(), port.port),
        ));
        env.push((format!("{prefix}_PROTO"), proto.to_lowercase()));
        env.push((format!("{prefix}_PORT"), port.port.to_string()));
        env.push((format!("{prefix}_ADDR"), ip.clone()));
    }
    env
}

/// The service environment of `pod`'s containers: `default/kubernetes` first, then its
/// namespace's Services (a namesake in the pod's namespace wins), in name order.
pub async fn pod_env(client: &Client, pod: &Pod) -> Vec<(String, String)> {
    let namespace = pod.namespace().unwrap_or_default();
    let links = pod
        .spec
        .as_ref()
        .and_then(|s| s.enable_service_links)
        .unwrap_or(true);
    let mut services: Vec<Service> = Vec::new();
    let defaults: Api<Service> = Api::namespaced(client.clone(), "default");
    match defaults.get_opt("kubernetes").await {
        Ok(Some(service)) => services.push(service),
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "reading the kubernetes Service"),
    }
    if links {
        let api: Api<Service> = Api::namespaced(client.clone(), &namespace);
        match api.list(&ListParams::default()).await {
            Ok(list) => {
                let mut own = list.items;
                own.sort_by_key(|s| s.name_any());
                services.extend(own);
            }
            Err(e) => {
                tracing::warn!(namespace, error = %e, "listing Services for their environment")
            }
        }
    }
    let mut env: Vec<(String, String)> = Vec::new();
    for service in &services {
        for (k, v) in service_env(service) {
            match env.iter_mut().find(|(name, _)| *name == k) {
                Some(slot) => slot.1 = v,
                None => env.push((k, v)),
            }
        }
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_link_variables() {
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "foo-service"},
            "spec": {"clusterIP": "10.43.0.9", "ports": [
                {"port": 8765, "name": "http"},
                {"port": 53, "protocol": "UDP"},
            ]},
        }))
        .unwrap();
        let env = service_env(&service);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("FOO_SERVICE_SERVICE_HOST"), Some("10.43.0.9"));
        assert_eq!(get("FOO_SERVICE_SERVICE_PORT"), Some("8765"));
        assert_eq!(get("FOO_SERVICE_SERVICE_PORT_HTTP"), Some("8765"));
        assert_eq!(get("FOO_SERVICE_PORT"), Some("tcp://10.43.0.9:8765"));
        assert_eq!(get("FOO_SERVICE_PORT_53_UDP"), Some("udp://10.43.0.9:53"));
        assert_eq!(get("FOO_SERVICE_PORT_53_UDP_PROTO"), Some("udp"));
        assert_eq!(get("FOO_SERVICE_PORT_8765_TCP_ADDR"), Some("10.43.0.9"));
        let headless: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h"}, "spec": {"clusterIP": "None", "ports": [{"port": 1}]},
        }))
        .unwrap();
        assert!(service_env(&headless).is_empty());
    }
}
