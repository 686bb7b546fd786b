//! The service proxy's nftables transactions applied by the real `nft`, in a network
//! namespace of the test's own (root): the first sync builds the table, later ones change
//! only what changed, a removed Service leaves nothing behind, and a reject answers a
//! Service without endpoints.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use orquestra_node_agent::network::Cidr;
use orquestra_node_agent::proxy::{self, ProxyConfig};
use serde_json::json;

struct Netns(String);

impl Netns {
    fn new() -> Netns {
        let name = format!("orqproxy-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .unwrap()
                .success()
        );
        Netns(name)
    }

    fn nft(&self, input: &str) -> Result<String, String> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.0))
            .args(["nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn ruleset(&self) -> String {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.0))
            .args(["nft", "list", "ruleset"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn service(name: &str, ip: &str, affinity: bool) -> Arc<Service> {
    let mut spec = json!({"type": "NodePort", "clusterIP": ip,
        "ports": [{"name": "http", "port": 80, "nodePort": 30000 + ip.split('.').next_back().unwrap().parse::<u16>().unwrap()},
                  {"name": "dns", "port": 53, "protocol": "UDP"}]});
    if affinity {
        spec["sessionAffinity"] = json!("ClientIP");
    }
    Arc::new(
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "default"}, "spec": spec}),
        )
        .unwrap(),
    )
}

fn slice(service: &str, ips: &[&str]) -> Arc<EndpointSlice> {
    let endpoints: Vec<_> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "nodeName": "a", "conditions": {"ready": true}}))
        .collect();
    Arc::new(
        serde_json::from_value(
            json!({"metadata": {"name": format!("{service}-x"), "namespace": "default",
            "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints,
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "dns", "port": 5353, "protocol": "UDP"}]}),
        )
        .unwrap(),
    )
}

#[test]
fn transactions_apply_and_clean_up() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces");
        return;
    }
    let ns = Netns::new();
    let config = ProxyConfig {
        node_name: "a".into(),
        pod_cidr: Cidr::parse("10.244.1.0/24").unwrap(),
    };
    let cidrs: BTreeSet<String> = ["10.244.2.0/24".to_owned()].into();
    let one = proxy::desired(
        &[
            service("web", "10.43.0.10", true),
            service("empty", "10.43.0.11", false),
        ],
        &[slice("web", &["10.244.1.5", "10.244.2.6"])],
        &cidrs,
        &config,
    );
    ns.nft(&proxy::transaction(None, &one)).unwrap();
    let listed = ns.ruleset();
    assert!(listed.contains("dnat to 10.244.2.6:8080"), "{listed}");
    assert!(listed.contains("dnat to 10.244.1.5:5353"), "{listed}");
    assert!(
        listed.contains("10.43.0.10 . tcp . 80 : goto service-"),
        "{listed}"
    );
    assert!(
        listed.contains("10.43.0.11 . tcp . 80 : goto reject-chain"),
        "{listed}"
    );
    assert!(
        listed.contains("tcp . 30011 : goto reject-chain"),
        "{listed}"
    );
    assert!(listed.contains("update @affinity-"), "{listed}");
    // Applying the first sync again (an agent restart) replaces the table in one go.
    ns.nft(&proxy::transaction(None, &one)).unwrap();

    // An endpoint goes, another comes, the empty Service gets one: a delta, no rebuild.
    let two = proxy::desired(
        &[
            service("web", "10.43.0.10", true),
            service("empty", "10.43.0.11", false),
        ],
        &[
            slice("web", &["10.244.1.5", "10.244.3.7"]),
            slice("empty", &["10.244.1.9"]),
        ],
        &cidrs,
        &config,
    );
    let delta = proxy::transaction(Some(&one), &two);
    assert!(!delta.contains("delete table"), "{delta}");
    ns.nft(&delta).unwrap();
    let listed = ns.ruleset();
    assert!(!listed.contains("10.244.2.6"), "{listed}");
    assert!(listed.contains("dnat to 10.244.3.7:8080"), "{listed}");
    assert!(
        listed.contains("10.43.0.11 . tcp . 80 : goto service-"),
        "{listed}"
    );
    assert!(
        !listed.contains("10.43.0.11 . tcp . 80 : goto reject"),
        "{listed}"
    );

    // Every Service gone: only the skeleton is left.
    let none = proxy::desired(&[], &[], &cidrs, &config);
    ns.nft(&proxy::transaction(Some(&two), &none)).unwrap();
    let listed = ns.ruleset();
    for leftover in [
        "chain service-",
        "chain endpoint-",
        "chain external-",
        "set affinity-",
        "10.43.0.",
    ] {
        assert!(!listed.contains(leftover), "{leftover} left in {listed}");
    }
}
