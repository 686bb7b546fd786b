//! Client commands: kubectl's everyday verbs (`get`, `apply`, `delete`, `run`, `logs`,
//! `describe`, `exec`, `port-forward`, `cp`, `cluster-info`, `version`) for hosts without
//! kubectl.
//!
//! This module owns finding and loading the kubeconfig, resolving what the user typed as a
//! KIND through the server's discovery documents, and turning client errors into messages
//! that say what to do next. It is thin over kube-rs on purpose: every request goes through
//! a [`kube::Client`]; the one thing kube-rs has no helper for — asking for a server-side
//! Table — is a kube-built request with another `Accept` header.

pub mod apply;
pub mod delete;
pub mod describe;
pub mod exec;
pub mod get;
pub mod info;
pub mod logs;
mod manifest;
mod resources;
pub mod run;
mod table;

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};
use clap::Args;
use kube::config::{KubeConfigOptions, Kubeconfig};

pub use resources::{Resource, Resources};

/// Where the client finds its cluster; flattened into every client command.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// The kubeconfig file to use. Without it: $KUBECONFIG, then ~/.kube/config, then the
    /// admin kubeconfig a local `orq server` wrote ($ORQ_DATA_DIR/kubeconfig.yaml, by default
    /// /var/lib/orquestra/kubeconfig.yaml).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current-context).
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,
}

/// The namespace flags shared by the namespaced commands.
#[derive(Debug, Clone, Args)]
pub struct NamespaceArgs {
    /// The namespace (default: the kubeconfig context's, else `default`).
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
}

/// A loaded kubeconfig and the client built from it.
#[derive(Clone)]
pub struct Session {
    /// The API client.
    pub client: kube::Client,
    /// The API server's URL (for messages).
    pub url: String,
    /// The context's namespace, `default` if it names none.
    pub default_namespace: String,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("url", &self.url).finish()
    }
}

/// The admin kubeconfig `orq server` writes into its data dir.
fn server_kubeconfig() -> PathBuf {
    let data_dir = std::env::var_os("ORQ_DATA_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/orquestra"));
    data_dir.join("kubeconfig.yaml")
}

/// Finds the kubeconfig: `--kubeconfig`, then `$KUBECONFIG` (a list of files, merged as
/// kubectl does), then `~/.kube/config`, then the local server's admin kubeconfig.
fn find_kubeconfig(flag: Option<&PathBuf>) -> anyhow::Result<Kubeconfig> {
    if let Some(path) = flag {
        return Kubeconfig::read_from(path)
            .with_context(|| format!("reading the kubeconfig {}", path.display()));
    }
    if let Some(config) = Kubeconfig::from_env().context("reading the kubeconfig in $KUBECONFIG")? {
        return Ok(config);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".kube").join("config"));
    let server = server_kubeconfig();
    for path in home.iter().chain([&server]) {
        if path.exists() {
            return Kubeconfig::read_from(path)
                .with_context(|| format!("reading the kubeconfig {}", path.display()));
        }
    }
    Err(anyhow!(
        "no kubeconfig found (looked at $KUBECONFIG, ~/.kube/config and {}): start a server \
         with `orq server` or pass --kubeconfig",
        server.display()
    ))
}

impl ConnectArgs {
    /// Loads the kubeconfig and builds a client. Nothing is sent to the server yet.
    pub async fn connect(&self) -> anyhow::Result<Session> {
        let kubeconfig = find_kubeconfig(self.kubeconfig.as_ref())?;
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .context("loading the kubeconfig")?;
        let url = config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let default_namespace = config.default_namespace.clone();
        let client = kube::Client::try_from(config).context("building the API client")?;
        Ok(Session {
            client,
            url,
            default_namespace,
        })
    }
}

impl Session {
    /// The namespace a command works in: the flag, else the context's.
    pub fn namespace(&self, flag: &NamespaceArgs) -> String {
        flag.namespace
            .clone()
            .unwrap_or_else(|| self.default_namespace.clone())
    }

    /// Turns a client error into a message: the server's own for API errors, the URL and
    /// the cause (with what to check) when the server could not be reached.
    pub fn error(&self, error: kube::Error) -> anyhow::Error {
        match error {
            kube::Error::Api(status) => anyhow!("{}", api_message(&status)),
            kube::Error::HyperError(_) | kube::Error::Service(_) => {
                let cause = anyhow::Error::from(error);
                anyhow!(
                    "cannot reach the API server at {}: {:#} (is `orq server` running, and is \
                     this the right kubeconfig?)",
                    self.url,
                    cause
                )
            }
            other => anyhow::Error::from(other).context(format!("talking to {}", self.url)),
        }
    }

    /// The server's resource types (discovery).
    pub async fn resources(&self) -> anyhow::Result<Resources> {
        Resources::discover(&self.client)
            .await
            .map_err(|e| self.error(e))
    }
}

/// The message of an API error, kubectl's way: `Error from server (NotFound): …`.
fn api_message(status: &kube::core::Status) -> String {
    let reason = if status.reason.is_empty() {
        format!("{}", status.code)
    } else {
        status.reason.clone()
    };
    format!("Error from server ({reason}): {}", status.message)
}

/// Whether an error is the server's 404.
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(status) if status.code == 404)
}

/// A Go duration flag (`30s`, `2m`); `0` allowed.
pub fn duration(text: &str) -> Result<std::time::Duration, String> {
    if text == "0" {
        return Ok(std::time::Duration::ZERO);
    }
    orquestra_apiserver::request::go_duration(text)
        .ok_or_else(|| format!("{text:?} is not a duration like 30s or 1m30s"))
}
