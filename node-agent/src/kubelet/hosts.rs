//! A pod's names, as the kubelet gives them: its hostname (`spec.hostname`, else its name,
//! at most 63 characters), its domain (`<subdomain>.<namespace>.svc.<cluster domain>` when
//! it has a `subdomain`), the kernel's hostname (the fully qualified one with
//! `setHostnameAsFQDN`), and the `/etc/hosts` it gets — localhost, its own address under its
//! names, and its `hostAliases`. A `hostNetwork` pod keeps the node's names and gets the
//! node's `/etc/hosts` plus its aliases.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

/// The pod's hostname and, with a subdomain, its domain.
pub fn names(pod: &Pod, cluster_domain: &str) -> (String, Option<String>) {
    let spec = pod.spec.as_ref();
    let mut hostname = spec
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.name_any());
    if hostname.len() > 63 {
        hostname.truncate(63);
        hostname = hostname.trim_end_matches(['-', '.']).to_owned();
    }
    let domain = spec
        .and_then(|s| s.subdomain.clone())
        .filter(|s| !s.is_empty())
        .map(|sub| {
            format!(
                "{sub}.{}.svc.{cluster_domain}",
                pod.namespace().unwrap_or_default()
            )
        });
    (hostname, domain)
}

/// What the pod's kernel hostname is set to (the FQDN with `setHostnameAsFQDN`).
pub fn kernel_hostname(pod: &Pod, cluster_domain: &str) -> String {
    let (hostname, domain) = names(pod, cluster_domain);
    let fqdn = pod
        .spec
        .as_ref()
        .and_then(|s| s.set_hostname_as_fqdn)
        .unwrap_or(false);
    match domain {
        Some(domain) if fqdn => format!("{hostname}.{domain}"),
        _ => hostname,
    }
}

/// The pod's `/etc/hosts`: the kubelet's managed file for a pod with its own network
/// (`ips` its addresses), or `host_file` (the node's) for a `hostNetwork` pod; then its
/// `hostAliases`.
pub fn hosts_file(
    pod: &Pod,
    ips: &[String],
    cluster_domain: &str,
    host_file: Option<&str>,
) -> String {
    let mut out = String::new();
    match host_file {
        Some(host) => {
            out.push_str(host);
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
        }
        None => {
            out.push_str("# Kubernetes-managed hosts file.\n");
            out.push_str("127.0.0.1\tlocalhost\n");
            out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
            out.push_str("fe00::0\tip6-localnet\n");
            out.push_str("fe00::0\tip6-mcastprefix\n");
            out.push_str("fe00::1\tip6-allnodes\n");
            out.push_str("fe00::2\tip6-allrouters\n");
            let (hostname, domain) = names(pod, cluster_domain);
            for ip in ips {
                match &domain {
                    Some(domain) => {
                        out.push_str(&format!("{ip}\t{hostname}.{domain}\t{hostname}\n"))
                    }
                    None => out.push_str(&format!("{ip}\t{hostname}\n")),
                }
            }
        }
    }
    let aliases = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_aliases.clone())
        .unwrap_or_default();
    if !aliases.is_empty() {
        out.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            out.push_str(&format!(
                "{}\t{}\n",
                alias.ip,
                alias.hostnames.unwrap_or_default().join("\t")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web-0", "namespace": "shop"}, "spec": spec,
        }))
        .unwrap()
    }

    #[test]
    fn hosts_names_and_aliases() {
        let plain = pod(serde_json::json!({"containers": [],
            "hostAliases": [{"ip": "123.45.67.89", "hostnames": ["foo", "bar"]}]}));
        let hosts = hosts_file(&plain, &["10.244.0.5".into()], "cluster.local", None);
        assert!(hosts.contains("10.244.0.5\tweb-0\n"), "{hosts}");
        assert!(hosts.contains("# Entries added by HostAliases.\n123.45.67.89\tfoo\tbar\n"));
        let sub = pod(serde_json::json!({"containers": [], "hostname": "db",
            "subdomain": "peers", "setHostnameAsFQDN": true}));
        let hosts = hosts_file(&sub, &["10.244.0.6".into()], "cluster.local", None);
        assert!(
            hosts.contains("10.244.0.6\tdb.peers.shop.svc.cluster.local\tdb\n"),
            "{hosts}"
        );
        assert_eq!(
            kernel_hostname(&sub, "cluster.local"),
            "db.peers.shop.svc.cluster.local"
        );
        let host = hosts_file(&plain, &[], "cluster.local", Some("127.0.0.1 node"));
        assert!(host.starts_with("127.0.0.1 node\n\n# Entries added by HostAliases."));
    }
}
