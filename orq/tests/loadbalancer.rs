//! LoadBalancer Services end to end (root), on the three-host test bed (`common/bed.rs`,
//! 10.214.0.0/24): the control plane runs ServiceLB with a one-address pool
//! (10.214.0.200). A Deployment behind a LoadBalancer Service gets the address, one host
//! announces it and it answers HTTP from the machine's namespace (on the bed's bridge, so
//! ARP finds the host); a second LoadBalancer Service stays pending with an
//! `AllocationFailed` event naming the pool until the first is deleted, then gets the
//! address and answers (without node ports: `allocateLoadBalancerNodePorts: false`). The server restarted without a pool (k3s' default) gives the
//! Service the hosts' own addresses instead, and the pool address leaves its host.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[path = "common/bed.rs"]
mod bed;
#[path = "common/busybox.rs"]
mod busybox;

use bed::{Bed, HOSTS, http_get, is_root, spread, web_deployment};

const POOL_ADDRESS: &str = "10.214.0.200";

fn load_balancer(name: &str, port: u16, node_ports: bool) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "LoadBalancer", "selector": {"app": "web"},
                 "allocateLoadBalancerNodePorts": node_ports,
                 "ports": [{"port": port, "targetPort": "http"}]},
    })
}

fn ingress(svc: &Value) -> Vec<String> {
    svc["status"]["loadBalancer"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|i| i["ipMode"] == "VIP")
        .filter_map(|i| i["ip"].as_str().map(str::to_owned))
        .collect()
}

/// The hosts holding `address` on an interface, with the label it carries.
fn holders(bed: &Bed, address: &str) -> Vec<(usize, String)> {
    (0..HOSTS)
        .filter_map(|i| {
            let out = bed
                .nsenter(i, "ip")
                .args(["-o", "-4", "addr", "show"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .find(|l| l.contains(&format!(" {address}/32 ")))
                .map(|l| {
                    let label = l.split('\\').next().unwrap().split_whitespace().last();
                    (i, label.unwrap_or_default().to_owned())
                })
        })
        .collect()
}

/// Restarts `orq server` where it listened (the agents' kubeconfig names it), without
/// `--service-lb-pool`.
fn restart_server_without_pool(bed: &mut Bed) {
    let kubeconfig = std::fs::read_to_string(bed.kubeconfig()).unwrap();
    let listen = kubeconfig
        .lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .unwrap()
        .trim()
        .to_owned();
    bed.server.take();
    let log = bed.log("server.log");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_orq"))
        .args(["server", "--no-agent", "--node-monitor-grace-period", "25s"])
        .args(["--listen", &listen])
        .arg("--data-dir")
        .arg(bed.dir.path().join("server"))
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    bed.server = Some(bed::Proc(child));
    let deadline = Instant::now() + Duration::from_secs(30);
    while bed
        .kubectl_try(&["get", "namespace", "default", "-o", "name"])
        .is_none()
    {
        assert!(Instant::now() < deadline, "orq server did not come back");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `addr` answers HTTP.
fn answers(bed: &Bed, addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "/").is_none() {
        assert!(
            Instant::now() < deadline,
            "{addr} never answered\n{}",
            bed.diagnose()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn load_balancers_get_a_pool_address_then_the_nodes_addresses() {
    if !is_root() {
        eprintln!("skipped: needs root for network namespaces and nftables");
        return;
    }
    let range = format!("{POOL_ADDRESS}-{POOL_ADDRESS}");
    let mut bed = Bed::start_with(214, &["--service-lb-pool", &range], &[]);
    bed.wait("nodes", Duration::from_secs(60), |v| {
        let items = v["items"].as_array().unwrap();
        items.len() == HOSTS
            && items.iter().all(|n| {
                n["status"]["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    bed.apply(&web_deployment(&bed.registry_addr));
    bed.apply(&load_balancer("web", 80, true));
    bed.wait("deployment/web", Duration::from_secs(120), |d| {
        d["status"]["readyReplicas"] == 3
    });

    // The pool's address, announced by the node the annotation names.
    let svc = bed.wait("service/web", Duration::from_secs(30), |s| {
        ingress(s) == [POOL_ADDRESS]
            && s["metadata"]["annotations"]["orquestra.dev/load-balancer-node"].is_string()
    });
    let node = svc["metadata"]["annotations"]["orquestra.dev/load-balancer-node"]
        .as_str()
        .unwrap()
        .to_owned();
    let addr = format!("{POOL_ADDRESS}:80");
    answers(&bed, &addr);
    let on: Vec<(usize, String)> = holders(&bed, POOL_ADDRESS);
    assert_eq!(
        on,
        [(
            node.trim_start_matches('h').parse::<usize>().unwrap(),
            "eth0:lb".to_owned()
        )],
        "announced by {node} only"
    );
    // Through the announcing node to every pod (externalTrafficPolicy: Cluster).
    let seen = spread(&addr, 60);
    eprintln!("{addr}: {seen:?}");
    assert!(
        !seen.contains_key("<failed>") && seen.len() == 3,
        "{seen:?}\n{}",
        bed.diagnose()
    );

    // The pool is exhausted: the second Service waits, and says why.
    // Without node ports: the load balancer address needs none.
    bed.apply(&load_balancer("web2", 8080, false));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let events = bed.get("events");
        let said = events["items"].as_array().unwrap().iter().any(|e| {
            e["involvedObject"]["name"] == "web2"
                && e["reason"] == "AllocationFailed"
                && e["type"] == "Warning"
                && e["message"].as_str().unwrap_or_default().contains(&range)
        });
        if said {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no AllocationFailed event for web2: {events}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let web2 = bed.get("service/web2");
    assert!(ingress(&web2).is_empty(), "web2 pending");
    assert!(web2["spec"]["ports"][0]["nodePort"].is_null(), "{web2}");

    // The first goes: the second gets the address and answers on its port.
    bed.kubectl(&["delete", "service", "web"]);
    bed.wait("service/web2", Duration::from_secs(30), |s| {
        ingress(s) == [POOL_ADDRESS]
    });
    answers(&bed, &format!("{POOL_ADDRESS}:8080"));
    // Port 80 no longer reaches the pods (the node may serve it itself: the ingress
    // controller's proxy listens there).
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(&addr, "/").is_some_and(|body| body.starts_with("web-"))
        || holders(&bed, POOL_ADDRESS).len() != 1
    {
        assert!(
            Instant::now() < deadline,
            "port 80 still reaches the pods or the address is on {:?}",
            holders(&bed, POOL_ADDRESS)
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Without a pool (k3s' default), the Service gets the nodes' addresses and answers on
    // each; the pool address leaves its host.
    restart_server_without_pool(&mut bed);
    let hosts: Vec<String> = (0..HOSTS).map(|i| bed.host_ip(i)).collect();
    bed.wait("service/web2", Duration::from_secs(60), |s| {
        ingress(s) == hosts
    });
    for host in &hosts {
        answers(&bed, &format!("{host}:8080"));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !holders(&bed, POOL_ADDRESS).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the pool address stays on {:?}",
            holders(&bed, POOL_ADDRESS)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
