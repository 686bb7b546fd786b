//! The load balancer addresses this node announces. ServiceLB (the `servicelb` controller)
//! names one node per pool address in the Service's [`ANNOUNCE_NODE`] annotation; that
//! node puts the address, as a /32, on the interface holding its own address, so it answers
//! ARP for it on the node's link (the service proxy DNATs the address on every node), and
//! sends a gratuitous ARP so neighbours that knew another node for it learn at once.
//!
//! The addresses carry the label `<interface>`[`LABEL_SUFFIX`]: the agent finds its own
//! again after a restart, removes those no longer announced, and `orq agent --cleanup`
//! removes them all; it never touches another address. (An interface whose name leaves no
//! room for the label within 15 bytes gets unlabelled addresses, which only the agent that
//! added them removes.) Node-address load balancers need nothing here: the node already has
//! its address.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use kube::ResourceExt;

use crate::network::{NetworkError, ip};

/// The annotation naming the node that announces a Service's pool address (the
/// controller's `servicelb::ANNOUNCE_NODE`).
pub const ANNOUNCE_NODE: &str = "orquestra.dev/load-balancer-node";

/// What the labels of announced addresses end with, after the interface's name.
pub const LABEL_SUFFIX: &str = ":lb";

/// The longest label the kernel keeps (`IFNAMSIZ` less the terminating NUL).
const MAX_LABEL: usize = 15;

/// The load balancer addresses Services ask `node` to announce.
pub fn wanted(services: &[Arc<Service>], node: &str) -> BTreeSet<Ipv4Addr> {
    services
        .iter()
        .filter(|s| {
            s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
                && s.annotations().get(ANNOUNCE_NODE).map(String::as_str) == Some(node)
        })
        .filter_map(|s| s.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref())
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_deref()?.parse().ok())
        .collect()
}

/// The address of node `name` (its first IPv4 `InternalIP`), from `nodes`.
pub fn node_ip(nodes: &[Arc<Node>], name: &str) -> Option<Ipv4Addr> {
    nodes
        .iter()
        .find(|n| n.name_any() == name)?
        .status
        .as_ref()?
        .addresses
        .iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

/// One IPv4 address of an interface, as `ip -o -4 addr show` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Address {
    dev: String,
    ip: Ipv4Addr,
    prefix: u8,
    label: String,
}

impl Address {
    fn ours(&self) -> bool {
        self.prefix == 32 && self.label.ends_with(LABEL_SUFFIX)
    }
}

/// Parses `ip -o -4 addr show`: `2: eth0    inet 10.0.0.5/32 scope global eth0:lb\ …`
/// (the label is the last word before the backslash).
fn parse(output: &str) -> Vec<Address> {
    output
        .lines()
        .filter_map(|line| {
            let line = line.split('\\').next()?;
            let words: Vec<&str> = line.split_whitespace().collect();
            let dev = words.get(1)?.split('@').next()?.to_owned();
            let at = words.iter().position(|w| *w == "inet")?;
            let (ip, prefix) = words.get(at + 1)?.split_once('/')?;
            Some(Address {
                dev,
                ip: ip.parse().ok()?,
                prefix: prefix.parse().ok()?,
                label: (*words.last()?).to_owned(),
            })
        })
        .collect()
}

/// The addresses this node announces, kept in line with what the Services ask.
#[derive(Debug, Default)]
pub struct Announcer {
    /// Addresses added without a label (the interface's name is too long for one).
    unlabelled: BTreeSet<(String, Ipv4Addr)>,
}

impl Announcer {
    /// Adds the `wanted` addresses to the interface holding `node_ip` and removes the ones
    /// this agent added that are no longer wanted. Without a `node_ip` on an interface,
    /// nothing can be announced (logged) but stale addresses still go.
    pub async fn sync(
        &mut self,
        node_ip: Option<Ipv4Addr>,
        wanted: &BTreeSet<Ipv4Addr>,
    ) -> Result<(), NetworkError> {
        let present = parse(&ip(&["-o", "-4", "addr", "show"]).await?);
        let dev = node_ip
            .and_then(|n| present.iter().find(|a| a.ip == n))
            .map(|a| a.dev.clone());
        for a in &present {
            let unlabelled = self.unlabelled.contains(&(a.dev.clone(), a.ip));
            let stale = !wanted.contains(&a.ip) || dev.as_deref() != Some(a.dev.as_str());
            if (a.ours() || unlabelled) && stale {
                tracing::info!(address = %a.ip, dev = %a.dev, "no longer announcing");
                ip(&["addr", "del", &format!("{}/32", a.ip), "dev", &a.dev]).await?;
                self.unlabelled.remove(&(a.dev.clone(), a.ip));
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let Some(dev) = dev else {
            tracing::warn!(
                node_ip = ?node_ip,
                "cannot announce load balancer addresses: no interface holds the node's address"
            );
            return Ok(());
        };
        for address in wanted {
            if present.iter().any(|a| a.ip == *address && a.dev == dev) {
                continue;
            }
            let cidr = format!("{address}/32");
            let label = format!("{dev}{LABEL_SUFFIX}");
            if label.len() <= MAX_LABEL {
                ip(&["addr", "add", &cidr, "dev", &dev, "label", &label]).await?;
            } else {
                ip(&["addr", "add", &cidr, "dev", &dev]).await?;
                self.unlabelled.insert((dev.clone(), *address));
            }
            tracing::info!(%address, %dev, "announcing a load balancer address");
            if let Err(error) = gratuitous_arp(&dev, *address).await {
                tracing::debug!(%error, %address, "gratuitous ARP not sent");
            }
        }
        Ok(())
    }
}

/// Removes every announced address of this network namespace (`orq agent --cleanup`).
pub async fn cleanup() -> Result<(), NetworkError> {
    for a in parse(&ip(&["-o", "-4", "addr", "show"]).await?) {
        if a.ours() {
            ip(&["addr", "del", &format!("{}/32", a.ip), "dev", &a.dev]).await?;
        }
    }
    Ok(())
}

/// Broadcasts a gratuitous ARP request for `address` on `dev` (sender and target both
/// `address`), as an address that moved between nodes must be: the link's neighbours
/// update their caches instead of sending to the old node until their entries expire.
async fn gratuitous_arp(dev: &str, address: Ipv4Addr) -> std::io::Result<()> {
    let link = ip(&["-o", "link", "show", "dev", dev])
        .await
        .map_err(std::io::Error::other)?;
    let mac = link
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .and_then(parse_mac)
        .ok_or_else(|| std::io::Error::other(format!("{dev} has no Ethernet address")))?;
    send_arp(dev, &arp_packet(mac, address))
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// An ARP request (RFC 826) announcing that `mac` has `address`.
fn arp_packet(mac: [u8; 6], address: Ipv4Addr) -> [u8; 28] {
    let mut p = [0u8; 28];
    p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    p[4] = 6;
    p[5] = 4;
    p[6..8].copy_from_slice(&1u16.to_be_bytes()); // request
    p[8..14].copy_from_slice(&mac);
    p[14..18].copy_from_slice(&address.octets());
    // Target hardware address unknown (zero), target protocol address the same address.
    p[24..28].copy_from_slice(&address.octets());
    p
}

/// Sends `packet` as an ARP frame to the Ethernet broadcast address on `dev`.
fn send_arp(dev: &str, packet: &[u8]) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let name = std::ffi::CString::new(dev).map_err(std::io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    let protocol = (libc::ETH_P_ARP as u16).to_be();
    // SAFETY: plain socket(2); the descriptor is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            i32::from(protocol),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = protocol;
    to.sll_ifindex = i32::try_from(index).map_err(std::io::Error::other)?;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: `packet` and `to` outlive the call, and the lengths passed are theirs.
    let sent = unsafe {
        libc::sendto(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            packet.as_ptr().cast(),
            packet.len(),
            0,
            std::ptr::from_ref(&to).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_the_addresses_and_labels() {
        let out = "1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever preferred_lft forever\n\
                   2: eth0@if7    inet 10.214.0.11/24 brd 10.214.0.255 scope global eth0\\       valid_lft forever\n\
                   2: eth0@if7    inet 10.214.0.200/32 scope global eth0:lb\\       valid_lft forever\n";
        let addresses = parse(out);
        assert_eq!(addresses.len(), 3);
        assert_eq!(addresses[1].dev, "eth0");
        assert_eq!(addresses[1].ip, Ipv4Addr::new(10, 214, 0, 11));
        assert!(!addresses[1].ours());
        assert!(addresses[2].ours() && addresses[2].prefix == 32);
    }

    #[test]
    fn announces_only_what_names_this_node() {
        let svc = |node: &str, kind: &str, mode: &str| -> Arc<Service> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": "s", "annotations": {ANNOUNCE_NODE: node}},
                    "spec": {"type": kind},
                    "status": {"loadBalancer": {"ingress": [{"ip": "10.214.0.200", "ipMode": mode}]}},
                }))
                .unwrap(),
            )
        };
        let mine = wanted(&[svc("h0", "LoadBalancer", "VIP")], "h0");
        assert_eq!(
            mine.into_iter().collect::<Vec<_>>(),
            [Ipv4Addr::new(10, 214, 0, 200)]
        );
        assert!(wanted(&[svc("h1", "LoadBalancer", "VIP")], "h0").is_empty());
        assert!(wanted(&[svc("h0", "ClusterIP", "VIP")], "h0").is_empty());
        assert!(wanted(&[svc("h0", "LoadBalancer", "Proxy")], "h0").is_empty());
    }

    #[test]
    fn arp_announcement() {
        let p = arp_packet([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 214, 0, 200));
        assert_eq!(&p[..8], &[0, 1, 8, 0, 6, 4, 0, 1]);
        assert_eq!(&p[14..18], &p[24..28]);
        assert_eq!(parse_mac("02:00:00:00:00:01"), Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(parse_mac("02:00"), None);
    }
}
