//! Pod networking on one node: a bridge holding the pod CIDR's gateway address, one network
//! namespace per pod (loopback up) joined to the bridge by a veth pair, an address from the
//! CIDR, a default route through the gateway, and outbound masquerading — the model of the
//! CNI `bridge` + `host-local` plugins, programmed with `ip` and `nft`.
//!
//! Address allocations are files under the data dir (`<ip>` holding the pod's UID, created
//! exclusively), so they survive agent restarts and two pods never share an address. Pod
//! namespaces are named `orq-<pod uid>` under `/run/netns`, so they are found again after a
//! restart and cleaned up with their pod.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

/// What went wrong programming the network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A command (`ip`, `nft`) failed.
    #[error("{command}: {message}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr.
        message: String,
    },
    /// The pod CIDR is malformed.
    #[error("invalid pod CIDR {0:?} (want an IPv4 a.b.c.d/n with n between 8 and 30)")]
    InvalidCidr(String),
    /// Every address of the CIDR is in use.
    #[error("no free address left in {0}")]
    Exhausted(String),
    /// Reading or writing allocation files failed.
    #[error("pod network state: {0}")]
    Io(#[from] io::Error),
}

/// An IPv4 CIDR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    /// The network address.
    pub network: Ipv4Addr,
    /// The prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `a.b.c.d/n`.
    pub fn parse(s: &str) -> Result<Cidr, NetworkError> {
        let invalid = || NetworkError::InvalidCidr(s.to_owned());
        let (addr, prefix) = s.split_once('/').ok_or_else(invalid)?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| invalid())?;
        let prefix: u8 = prefix.parse().map_err(|_| invalid())?;
        if !(8..=30).contains(&prefix) {
            return Err(invalid());
        }
        let mask = u32::MAX << (32 - prefix);
        Ok(Cidr {
            network: Ipv4Addr::from(u32::from(addr) & mask),
            prefix,
        })
    }

    /// The first usable address: the gateway on the bridge.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses for pods: everything after the gateway, before the broadcast address.
    fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.network) + (1u32 << (32 - self.prefix)) - 2;
        (first..=last).map(Ipv4Addr::from)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

/// A pod's network, once set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodNetwork {
    /// The namespace's path, for the containers' OCI spec.
    pub netns: PathBuf,
    /// The pod's address.
    pub ip: Ipv4Addr,
}

/// The node's pod network.
#[derive(Clone, Debug)]
pub struct Network {
    /// The bridge's name.
    pub bridge: String,
    /// The pod CIDR.
    pub cidr: Cidr,
    /// Where allocations are recorded.
    pub state_dir: PathBuf,
}

/// The routing protocol number tagging the routes to other nodes' pods (any number the
/// kernel and other daemons leave alone; 211 is unassigned).
pub const ROUTE_PROTOCOL: u8 = 211;

/// The directory `ip netns` keeps named namespaces in.
const NETNS_DIR: &str = "/run/netns";

impl Network {
    /// A network over `cidr` with bridge `bridge`, recording allocations in `state_dir`.
    pub fn new(bridge: &str, cidr: Cidr, state_dir: impl Into<PathBuf>) -> Self {
        Network {
            bridge: bridge.to_owned(),
            cidr,
            state_dir: state_dir.into(),
        }
    }

    /// Sets up the node side, idempotently: the bridge with the gateway address, IPv4
    /// forwarding, and masquerading of traffic leaving the pod CIDR.
    pub async fn ensure_node(&self) -> Result<(), NetworkError> {
        fs::create_dir_all(&self.state_dir)?;
        if !link_exists(&self.bridge).await {
            ip(&["link", "add", &self.bridge, "type", "bridge"]).await?;
        }
        let gateway = format!("{}/{}", self.cidr.gateway(), self.cidr.prefix);
        let addrs = ip(&["-o", "-4", "addr", "show", "dev", &self.bridge]).await?;
        if !addrs.contains(&format!(" {gateway} ")) {
            ip(&["addr", "add", &gateway, "dev", &self.bridge]).await?;
        }
        ip(&["link", "set", &self.bridge, "up"]).await?;
        fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        let table = self.nat_table();
        // Replaced whole, atomically. Traffic from pods leaving the pod network is
        // masqueraded; traffic to another node's pods (`pod-cidrs`, kept by
        // `sync_routes`) keeps its source address.
        let rules = format!(
            "add table ip {table}\ndelete table ip {table}\ntable ip {table} {{\n  \
             set pod-cidrs {{ type ipv4_addr; flags interval; auto-merge; elements = {{ {cidr} }}; }}\n  \
             chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    \
             ip saddr {cidr} ip daddr != @pod-cidrs masquerade\n  }}\n}}\n",
            cidr = self.cidr,
        );
        nft(&rules).await
    }

    /// Routes every other node's pod CIDR through that node's address (host-gateway
    /// style: no encapsulation, so the nodes must share a link), removes the routes of
    /// nodes that are gone, and tells the masquerading rule which destinations are pods.
    /// Routes are tagged with [`ROUTE_PROTOCOL`], so ours are found again after a restart.
    pub async fn sync_routes(
        &self,
        cidrs: &std::collections::BTreeSet<String>,
        peers: &[(Cidr, Ipv4Addr)],
    ) -> Result<(), NetworkError> {
        let proto = ROUTE_PROTOCOL.to_string();
        let current = ip(&["-4", "route", "show", "proto", &proto]).await?;
        let wanted: std::collections::BTreeMap<String, String> = peers
            .iter()
            .filter(|(cidr, _)| *cidr != self.cidr)
            .map(|(cidr, via)| (cidr.to_string(), via.to_string()))
            .collect();
        for line in current.lines() {
            let mut words = line.split_whitespace();
            let (Some(dest), Some("via"), Some(via)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if wanted.get(dest).map(String::as_str) != Some(via) {
                tracing::info!(pods = dest, via, "removing the route to a node's pods");
                ip(&["route", "del", dest, "proto", &proto]).await?;
            }
        }
        for (dest, via) in &wanted {
            if !current
                .lines()
                .any(|l| l.starts_with(&format!("{dest} via {via} ")))
            {
                tracing::info!(pods = dest, via, "routing to a node's pods");
                ip(&["route", "replace", dest, "via", via, "proto", &proto]).await?;
            }
        }
        let table = self.nat_table();
        let mut elements: Vec<String> = cidrs.iter().cloned().collect();
        elements.push(self.cidr.to_string());
        nft(&format!(
            "flush set ip {table} pod-cidrs\nadd element ip {table} pod-cidrs {{ {} }}\n",
            elements.join(", ")
        ))
        .await
    }

    /// Removes the node side: the NAT table and the bridge.
    pub async fn remove_node(&self) -> Result<(), NetworkError> {
        let _ = nft(&format!("delete table ip {}\n", self.nat_table())).await;
        let _ = ip(&["route", "flush", "proto", &ROUTE_PROTOCOL.to_string()]).await;
        if link_exists(&self.bridge).await {
            ip(&["link", "del", &self.bridge]).await?;
        }
        Ok(())
    }

    fn nat_table(&self) -> String {
        format!("orquestra_{}", self.bridge.replace('-', "_"))
    }

    /// The namespace name of a pod.
    pub fn netns_name(uid: &str) -> String {
        format!("orq-{uid}")
    }

    /// Sets up a pod's namespace, veth and address; idempotent (an agent restarted half way
    /// through finishes the job, one restarted after it finds everything in place).
    pub async fn setup_pod(&self, uid: &str) -> Result<PodNetwork, NetworkError> {
        let ip_addr = self.allocate(uid)?;
        let name = Self::netns_name(uid);
        let netns = Path::new(NETNS_DIR).join(&name);
        if !netns.exists() {
            ip(&["netns", "add", &name]).await?;
        }
        let host_veth = veth_name(uid);
        let inside = ip(&["-n", &name, "-o", "-4", "addr", "show", "dev", "eth0"])
            .await
            .unwrap_or_default();
        let cidr = format!("{ip_addr}/{}", self.cidr.prefix);
        if !inside.contains(&format!(" {cidr} ")) {
            if link_exists(&host_veth).await {
                ip(&["link", "del", &host_veth]).await?;
            }
            ip(&[
                "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0", "netns", &name,
            ])
            .await?;
            ip(&["link", "set", &host_veth, "master", &self.bridge, "up"]).await?;
            ip(&["-n", &name, "link", "set", "lo", "up"]).await?;
            ip(&["-n", &name, "addr", "add", &cidr, "dev", "eth0"]).await?;
            ip(&["-n", &name, "link", "set", "eth0", "up"]).await?;
            ip(&[
                "-n",
                &name,
                "route",
                "replace",
                "default",
                "via",
                &self.cidr.gateway().to_string(),
            ])
            .await?;
        }
        Ok(PodNetwork { netns, ip: ip_addr })
    }

    /// Removes a pod's namespace (its veth goes with it) and releases its address.
    pub async fn teardown_pod(&self, uid: &str) -> Result<(), NetworkError> {
        let name = Self::netns_name(uid);
        if Path::new(NETNS_DIR).join(&name).exists() {
            ip(&["netns", "del", &name]).await?;
        }
        let host_veth = veth_name(uid);
        if link_exists(&host_veth).await {
            let _ = ip(&["link", "del", &host_veth]).await;
        }
        self.release(uid)
    }

    /// The UIDs of pods holding an address.
    pub fn allocated(&self) -> Result<Vec<(Ipv4Addr, String)>, NetworkError> {
        let mut out = Vec::new();
        match fs::read_dir(&self.state_dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = entry?;
                    if let Ok(addr) = entry.file_name().to_string_lossy().parse::<Ipv4Addr>() {
                        let uid = fs::read_to_string(entry.path()).unwrap_or_default();
                        out.push((addr, uid.trim().to_owned()));
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        Ok(out)
    }

    /// The address held by `uid`, or a new one: the first free one after the address last
    /// handed out, wrapping around (CNI host-local's order). A freed address is taken again
    /// only once the others have had their turn, so neighbours' ARP caches still holding the
    /// last pod's MAC for it (seconds, on the node and in other pods) have long expired.
    fn allocate(&self, uid: &str) -> Result<Ipv4Addr, NetworkError> {
        fs::create_dir_all(&self.state_dir)?;
        if let Some((addr, _)) = self.allocated()?.into_iter().find(|(_, u)| u == uid) {
            return Ok(addr);
        }
        let last_file = self.state_dir.join(LAST_RESERVED);
        let last = fs::read_to_string(&last_file)
            .ok()
            .and_then(|text| text.trim().parse::<Ipv4Addr>().ok());
        let hosts: Vec<Ipv4Addr> = self.cidr.hosts().collect();

        let start = last
            .and_then(|last| hosts.iter().position(|h| *h == last))
            .map_or(0, |i| i + 1);
        let (before, after) = hosts.split_at(start.min(hosts.len()));
        for &addr in after.iter().chain(before) {
            let path = self.state_dir.join(addr.to_string());
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    use std::io::Write;
                    file.write_all(uid.as_bytes())?;
                    file.sync_all()?;
                    // Only the order depends on it: a lost write just restarts the scan.
                    let _ = fs::write(&last_file, addr.to_string());
                    return Ok(addr);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(NetworkError::Exhausted(self.cidr.to_string()))
    }

    fn release(&self, uid: &str) -> Result<(), NetworkError> {
        for (addr, owner) in self.allocated()? {
            if owner == uid {
                fs::remove_file(self.state_dir.join(addr.to_string()))?;
            }
        }
        Ok(())
    }
}

/// The file in the state directory naming the address handed out last.
const LAST_RESERVED: &str = "last_reserved_ip";

/// The host-side veth of a pod: `veth` + 8 hex digits of its UID's hash (names are limited
/// to 15 bytes).
fn veth_name(uid: &str) -> String {
    use sha2::Digest;
    let hash = sha2::Sha256::digest(uid.as_bytes());
    format!("veth{}", hex::encode(&hash[..4]))
}

/// Whether a link exists in this network namespace (`/sys/class/net` would show the one
/// sysfs was mounted in, not necessarily ours).
async fn link_exists(name: &str) -> bool {
    ip(&["link", "show", "dev", name]).await.is_ok()
}

pub(crate) async fn ip(args: &[&str]) -> Result<String, NetworkError> {
    run(
        Command::new("ip").args(args),
        &format!("ip {}", args.join(" ")),
        None,
    )
    .await
}

pub(crate) async fn nft(rules: &str) -> Result<(), NetworkError> {
    run(
        Command::new("nft").args(["-f", "-"]),
        "nft -f -",
        Some(rules),
    )
    .await
    .map(|_| ())
}

async fn run(cmd: &mut Command, line: &str, stdin: Option<&str>) -> Result<String, NetworkError> {
    use tokio::io::AsyncWriteExt;
    let failed = |message: String| NetworkError::Command {
        command: line.to_owned(),
        message,
    };
    cmd.stdin(if stdin.is_some() {
        std::process::Stdio::piped()
    } else {
        std::process::Stdio::null()
    })
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| failed(e.to_string()))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|e| failed(e.to_string()))?;
    }
    let output = child
        .wait_with_output()
        .await
        .map_err(|e| failed(e.to_string()))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.88.3.7/24").unwrap();
        assert_eq!(c.to_string(), "10.88.3.0/24");
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 88, 3, 1));
        assert_eq!(c.hosts().count(), 253);
        assert!(Cidr::parse("10.0.0.0/31").is_err());
        assert!(Cidr::parse("nonsense").is_err());
    }

    #[test]
    fn allocation_is_exclusive_and_sticky() {
        let dir = tempfile::tempdir().unwrap();
        let net = Network::new("orqtest0", Cidr::parse("10.1.0.0/29").unwrap(), dir.path());
        let a = net.allocate("a").unwrap();
        let b = net.allocate("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(net.allocate("a").unwrap(), a);
        for uid in ["c", "d", "e"] {
            net.allocate(uid).unwrap();
        }
        assert!(matches!(net.allocate("g"), Err(NetworkError::Exhausted(_))));
        net.release("b").unwrap();
        assert_eq!(net.allocate("g").unwrap(), b);
    }

    #[test]
    fn a_freed_address_waits_for_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let net = Network::new("orqtest0", Cidr::parse("10.1.0.0/29").unwrap(), dir.path());
        let a = net.allocate("a").unwrap();
        net.release("a").unwrap();
        let b = net.allocate("b").unwrap();
        assert_ne!(
            a, b,
            "the address just freed is not handed out again at once"
        );
        assert_eq!(b, Ipv4Addr::new(10, 1, 0, 3));
        // Around the end of the range and back to the start.
        for uid in ["c", "d", "e"] {
            net.allocate(uid).unwrap();
        }
        assert_eq!(net.allocate("f").unwrap(), a);
    }

    #[test]
    fn veth_names_fit() {
        assert!(veth_name("6c1e4a42-1111-2222-3333-444455556666").len() <= 15);
    }
}
