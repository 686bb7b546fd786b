//! What an in-cluster client (kube-rs `Client::try_default()`, client-go's
//! `rest.InClusterConfig()`) looks for in a pod: the service account directory
//! `/var/run/secrets/kubernetes.io/serviceaccount` (`token`, `ca.crt`, `namespace`). (The
//! `KUBERNETES_SERVICE_HOST`/`_PORT` environment is [`crate::links`]'.)
//!
//! The token comes from the TokenRequest API, bound to the pod (it stops working once the pod
//! is gone), for the API server's audience, for [`EXPIRATION_SECONDS`]; the pod worker asks
//! for a new one at 80 % of its lifetime ([`Projected::due`]). Files are replaced by rename,
//! so a client never reads half a token; the directory is bind-mounted read-only into every
//! container. Only the API is touched here — the bind mount itself is the pod worker's.
//!
//! Pods admitted by Orquestra's API server (or kube-apiserver) carry the directory as a
//! projected `kube-api-access-…` volume instead, which the volume code keeps; this is the
//! fallback for pods without one ([`mounted_by_volume`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

/// Where containers see the files.
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// How long the tokens the agent asks for live (the kubelet's 1 h).
pub const EXPIRATION_SECONDS: i64 = 3600;

/// A pod's service account files on the node, and when they need a new token.
#[derive(Clone, Debug)]
pub struct Projected {
    /// The directory holding `token`, `ca.crt` and `namespace`.
    pub dir: PathBuf,
    /// When to ask for the next token.
    pub due: Instant,
}

/// The service account a pod runs as (`default` when it names none).
pub fn account_name(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .clone()
                .filter(|n| !n.is_empty())
                .or_else(|| s.service_account.clone().filter(|n| !n.is_empty()))
        })
        .unwrap_or_else(|| "default".into())
}

/// Whether the pod's containers mount the directory from a volume of their own — the
/// projected `kube-api-access-…` volume the API server's admission adds — so the agent
/// writes no directory of its own (it still does for pods admitted without one).
pub fn mounted_by_volume(pod: &Pod) -> bool {
    pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.volume_mounts.iter().flatten())
            .any(|m| m.mount_path == MOUNT_PATH)
    })
}

/// Whether the pod gets a token: its `automountServiceAccountToken`, else its
/// ServiceAccount's, else yes. A missing ServiceAccount is an error (the pod waits for it,
/// as it waits for a missing Secret).
pub async fn automount(client: &Client, pod: &Pod) -> Result<bool, String> {
    if let Some(set) = pod
        .spec
        .as_ref()
        .and_then(|s| s.automount_service_account_token)
    {
        return Ok(set);
    }
    let name = account_name(pod);
    let accounts: Api<ServiceAccount> =
        Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    match accounts.get_opt(&name).await {
        Ok(Some(account)) => Ok(account.automount_service_account_token.unwrap_or(true)),
        Ok(None) => Err(format!("serviceaccount \"{name}\" not found")),
        Err(e) => Err(format!("reading serviceaccount \"{name}\": {e}")),
    }
}

/// Writes `contents` to `dir/name` through a temporary file and a rename.
fn replace(dir: &Path, name: &str, contents: &[u8]) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = dir.join(format!(".{name}.tmp"));
    let io = |e: std::io::Error| format!("writing {}: {e}", dir.join(name).display());
    fs::write(&tmp, contents).map_err(io)?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(io)?;
    fs::rename(&tmp, dir.join(name)).map_err(io)
}

/// Asks the TokenRequest API for a token of the pod's service account, bound to the pod,
/// for `audience` (the API server's when `None`), for `expiration_seconds`; returns it and
/// the lifetime the server gave (which may be shorter).
pub async fn request_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: i64,
) -> Result<(String, u64), String> {
    let name = account_name(pod);
    let accounts: Api<ServiceAccount> =
        Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: audience.map(|a| vec![a.to_owned()]),
            expiration_seconds: Some(expiration_seconds),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        }),
        ..TokenRequest::default()
    };
    let issued = accounts
        .create_token_request(&name, &PostParams::default(), &request)
        .await
        .map_err(|e| format!("requesting a token for serviceaccount \"{name}\": {e}"))?;
    let token = issued
        .status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("the token request for serviceaccount \"{name}\" got no token"))?;
    let lifetime = issued
        .spec
        .and_then(|s| s.expiration_seconds)
        .unwrap_or(expiration_seconds)
        .max(1) as u64;
    Ok((token, lifetime))
}

/// Asks for a token for the pod's service account, bound to the pod, and writes it with the
/// cluster CA (`ca`, PEM) and the namespace into `dir`.
pub async fn project(
    client: &Client,
    pod: &Pod,
    dir: &Path,
    ca: Option<&str>,
) -> Result<Projected, String> {
    let namespace = pod.namespace().unwrap_or_default();
    let asked = Instant::now();
    // None: the API server's own audience.
    let (token, lifetime) = request_token(client, pod, None, EXPIRATION_SECONDS).await?;
    fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    replace(dir, "token", token.as_bytes())?;
    replace(dir, "namespace", namespace.as_bytes())?;
    if let Some(ca) = ca {
        replace(dir, "ca.crt", ca.as_bytes())?;
    }
    Ok(Projected {
        dir: dir.to_owned(),
        due: asked + Duration::from_secs(lifetime * 8 / 10),
    })
}
