//! A client-side load balancer for agents and `orq operator` that know several API servers,
//! as k3s' agent load balancer: a TCP proxy on a loopback port that the client dials, which
//! forwards each connection to the first server that accepts it — the one that worked
//! last, then the others in order. TLS passes through untouched (the servers' certificates
//! name `127.0.0.1`, and joined servers share one CA), so the client still verifies the
//! server it reaches.
//!
//! When a server dies, its connections break; the client's watches re-dial (landing on a
//! live server) and resume from their last resourceVersion, so there is no relist storm.
//! The list of servers is the `--server` flags plus, refreshed every [`LEARN_INTERVAL`], the
//! addresses of the `kubernetes` Endpoints (the live API servers, from their endpoint
//! Leases): a server added to the cluster later is found without reconfiguring agents.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

/// How long one server gets to accept a connection before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the servers are learned from the `kubernetes` Endpoints.
pub const LEARN_INTERVAL: Duration = Duration::from_secs(15);

/// The balancer: where clients dial, and the servers it forwards to.
#[derive(Debug, Clone)]
pub struct Balancer {
    local: SocketAddr,
    state: Arc<State>,
}

#[derive(Debug)]
struct State {
    /// The configured servers (always kept), then learned ones.
    seeds: Vec<SocketAddr>,
    servers: RwLock<Vec<SocketAddr>>,
    /// The index of the server that accepted the last connection.
    preferred: AtomicUsize,
}

impl Balancer {
    /// Listens on a free loopback port and forwards to `servers` (at least one) until the
    /// process exits.
    pub async fn start(servers: Vec<SocketAddr>) -> std::io::Result<Balancer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let local = listener.local_addr()?;
        let state = Arc::new(State {
            seeds: servers.clone(),
            servers: RwLock::new(servers),
            preferred: AtomicUsize::new(0),
        });
        tokio::spawn(serve(listener, Arc::clone(&state)));
        Ok(Balancer { local, state })
    }

    /// The address clients dial.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// The servers it forwards to now.
    pub fn servers(&self) -> Vec<SocketAddr> {
        self.state
            .servers
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Replaces the learned servers with `learned` (the configured ones stay first).
    pub fn learn(&self, learned: &[SocketAddr]) {
        let mut servers = self.state.seeds.clone();
        for server in learned {
            if !servers.contains(server) {
                servers.push(*server);
            }
        }
        if let Ok(mut current) = self.state.servers.write() {
            if *current != servers {
                tracing::info!(?servers, "API servers");
                // Keep preferring the same server if it is still there.
                let preferred = current.get(self.state.preferred.load(Ordering::Relaxed));
                let index = preferred
                    .and_then(|p| servers.iter().position(|s| s == p))
                    .unwrap_or(0);
                self.state.preferred.store(index, Ordering::Relaxed);
                *current = servers;
            }
        }
    }

    /// Learns the servers from the `kubernetes` Endpoints through `client` (which dials
    /// this balancer) every [`LEARN_INTERVAL`], until the task is dropped.
    pub async fn learn_from_endpoints(self, client: kube::Client) {
        use k8s_openapi::api::core::v1::Endpoints;
        let endpoints: kube::Api<Endpoints> = kube::Api::namespaced(client, "default");
        loop {
            match endpoints.get_opt("kubernetes").await {
                Ok(Some(e)) => {
                    let learned: Vec<SocketAddr> = e
                        .subsets
                        .into_iter()
                        .flatten()
                        .flat_map(|subset| {
                            let port = subset
                                .ports
                                .iter()
                                .flatten()
                                .find(|p| p.name.as_deref() == Some("https"))
                                .map(|p| p.port);
                            subset.addresses.into_iter().flatten().filter_map(move |a| {
                                let port = u16::try_from(port?).ok()?;
                                Some(SocketAddr::new(a.ip.parse().ok()?, port))
                            })
                        })
                        .collect();
                    // An empty list is a transient state, not a reason to forget servers.
                    if !learned.is_empty() {
                        self.learn(&learned);
                    }
                }
                Ok(None) => {}
                Err(error) => tracing::debug!(%error, "reading the kubernetes Endpoints"),
            }
            tokio::time::sleep(LEARN_INTERVAL).await;
        }
    }
}

/// A client from `config` for `servers` (URLs of one cluster's API servers): `config` as it
/// is for one server; for several, dialling them through a [`Balancer`] that also learns them
/// from the `kubernetes` Endpoints.
pub async fn client(
    mut config: kube::Config,
    servers: &[String],
) -> anyhow::Result<(kube::Client, Option<Balancer>)> {
    use anyhow::Context;
    if servers.len() < 2 {
        if let Some(server) = servers.first() {
            config.cluster_url = server
                .parse()
                .with_context(|| format!("--server {server:?}"))?;
        }
        let client = kube::Client::try_from(config).context("building the API client")?;
        return Ok((client, None));
    }
    let mut addresses = Vec::new();
    for server in servers {
        let uri: http::Uri = server
            .parse()
            .with_context(|| format!("--server {server:?}"))?;
        let host = uri.host().unwrap_or_default().trim_matches(['[', ']']);
        let port = uri.port_u16().unwrap_or(443);
        let resolved = tokio::net::lookup_host((host, port))
            .await
            .with_context(|| format!("resolving --server {server}"))?;
        addresses.extend(resolved.filter(SocketAddr::is_ipv4).take(1));
    }
    let balancer = Balancer::start(addresses)
        .await
        .context("starting the API server load balancer")?;
    let scheme = if servers[0].starts_with("http://") {
        "http"
    } else {
        "https"
    };
    // Every `orq server`'s certificate names 127.0.0.1, where the balancer listens.
    config.cluster_url = format!("{scheme}://{}", balancer.local())
        .parse()
        .context("the load balancer's URL")?;
    tracing::info!(servers = ?balancer.servers(), local = %balancer.local(), "several API servers: dialling them through a local load balancer");
    let client = kube::Client::try_from(config).context("building the API client")?;
    tokio::spawn(balancer.clone().learn_from_endpoints(client.clone()));
    Ok((client, Some(balancer)))
}

async fn serve(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let Some(mut server) = connect(&state).await else {
                return;
            };
            let mut client = client;
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

/// A connection to the preferred server, else to the first other one that accepts.
async fn connect(state: &State) -> Option<TcpStream> {
    let servers = state.servers.read().map(|s| s.clone()).unwrap_or_default();
    let preferred = state.preferred.load(Ordering::Relaxed);
    for offset in 0..servers.len() {
        let index = (preferred + offset) % servers.len();
        let server = servers[index];
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(server)).await {
            Ok(Ok(stream)) => {
                if index != preferred {
                    tracing::warn!(%server, "API server failover: connecting here now");
                    state.preferred.store(index, Ordering::Relaxed);
                }
                return Some(stream);
            }
            Ok(Err(error)) => tracing::debug!(%server, %error, "API server refused"),
            Err(_) => tracing::debug!(%server, "API server did not answer"),
        }
    }
    tracing::warn!(?servers, "no API server accepts connections");
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers each connection with its name.
    async fn named(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let _ = stream.write_all(name.as_bytes()).await;
            }
        });
        (addr, task)
    }

    async fn ask(balancer: &Balancer) -> String {
        let mut stream = TcpStream::connect(balancer.local()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn connections_fail_over_to_a_live_server_and_stay_there() {
        let (a, a_task) = named("a").await;
        let (b, _b_task) = named("b").await;
        let balancer = Balancer::start(vec![a, b]).await.unwrap();
        assert_eq!(ask(&balancer).await, "a");
        a_task.abort();
        let _ = a_task.await;
        assert_eq!(ask(&balancer).await, "b");
        // b is preferred now, even once a is back.
        let listener = TcpListener::bind(a).await.unwrap();
        drop(listener);
        assert_eq!(ask(&balancer).await, "b");
    }

    #[tokio::test]
    async fn learned_servers_follow_the_configured_ones() {
        let (a, _a) = named("a").await;
        let (c, _c) = named("c").await;
        let balancer = Balancer::start(vec![a]).await.unwrap();
        balancer.learn(&[c, a]);
        assert_eq!(balancer.servers(), vec![a, c]);
        balancer.learn(&[]);
        assert_eq!(balancer.servers(), vec![a]);
    }
}
