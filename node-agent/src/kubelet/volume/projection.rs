//! The payloads of the volumes whose files come from the API — `configMap`, `secret`,
//! `downwardAPI` and `projected` (those three plus `serviceAccountToken` and
//! `clusterTrustBundle`) — built as the kubelet builds them, for [`atomic::write`]: keys or
//! `items` (key → path, mode), `defaultMode`, `optional`.
//!
//! [`atomic::write`]: super::atomic::write

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{DownwardAPIVolumeFile, KeyToPath, Pod, Volume};
use kube::api::{Api, DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};

use super::atomic::FileProjection;
use crate::downward::{self, Addresses, Allocatable};
use crate::resolve::{ConfigError, Sources};

/// The files' mode when the volume sets none (`0644`).
pub const DEFAULT_MODE: i32 = 0o644;

fn err(message: impl Into<String>) -> ConfigError {
    ConfigError(message.into())
}

/// What building a payload reads: the API (ConfigMaps, Secrets, tokens) and the pod's
/// addresses and node for the downward API.
pub struct Inputs<'a> {
    /// The agent's client.
    pub client: &'a Client,
    /// The pod's and node's addresses.
    pub addresses: &'a Addresses,
    /// The node's allocatable (limits left unset).
    pub node: &'a Allocatable,
}

impl std::fmt::Debug for Inputs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inputs")
            .field("addresses", self.addresses)
            .field("node", self.node)
            .finish_non_exhaustive()
    }
}

/// The projected tokens a pod holds, by `<volume>/<path>`: the token and when to renew it.
/// Until then a refresh writes the same token again (a TokenRequest per refresh would both
/// load the API server and churn the file).
pub type Tokens = BTreeMap<String, (String, Instant)>;

/// A payload and, for projected tokens, when the next one is due.
#[derive(Debug, Default)]
pub struct Payload {
    /// Path → file.
    pub files: BTreeMap<String, FileProjection>,
    /// The earliest instant a token in it should be renewed.
    pub renew_at: Option<Instant>,
}

/// The payload of `volume` (one of the projecting kinds; `None` for any other kind).
/// `token_owner` is who may read a projected token with mode `0600` (the pods' single
/// `runAsUser`, as the kubelet decides).
pub async fn payload(
    inputs: &Inputs<'_>,
    pod: &Pod,
    volume: &Volume,
    token_owner: Option<u32>,
    tokens: &mut Tokens,
) -> Option<Result<Payload, ConfigError>> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut out = Payload::default();
    let result = if let Some(cm) = &volume.config_map {
        let mode = cm.default_mode.unwrap_or(DEFAULT_MODE);
        config_map(
            inputs.client,
            &namespace,
            &cm.name,
            cm.optional,
            cm.items.as_deref(),
            mode,
            &mut out.files,
        )
        .await
    } else if let Some(secret) = &volume.secret {
        let mode = secret.default_mode.unwrap_or(DEFAULT_MODE);
        let name = secret.secret_name.clone().unwrap_or_default();
        secret_files(
            inputs.client,
            &namespace,
            &name,
            secret.optional,
            secret.items.as_deref(),
            mode,
            &mut out.files,
        )
        .await
    } else if let Some(api) = &volume.downward_api {
        let mode = api.default_mode.unwrap_or(DEFAULT_MODE);
        downward_files(
            inputs,
            pod,
            api.items.as_deref().unwrap_or_default(),
            mode,
            &mut out.files,
        )
    } else if let Some(projected) = &volume.projected {
        let mode = projected.default_mode.unwrap_or(DEFAULT_MODE);
        projected_files(
            inputs,
            pod,
            &volume.name,
            projected.sources.as_deref().unwrap_or_default(),
            mode,
            token_owner,
            tokens,
            &mut out,
        )
        .await
    } else {
        return None;
    };
    Some(result.map(|()| out))
}

#[allow(clippy::too_many_arguments)]
async fn projected_files(
    inputs: &Inputs<'_>,
    pod: &Pod,
    volume: &str,
    sources: &[k8s_openapi::api::core::v1::VolumeProjection],
    mode: i32,
    token_owner: Option<u32>,
    tokens: &mut Tokens,
    out: &mut Payload,
) -> Result<(), ConfigError> {
    let namespace = pod.namespace().unwrap_or_default();
    for source in sources {
        if let Some(cm) = &source.config_map {
            config_map(
                inputs.client,
                &namespace,
                &cm.name,
                cm.optional,
                cm.items.as_deref(),
                mode,
                &mut out.files,
            )
            .await?;
        } else if let Some(secret) = &source.secret {
            secret_files(
                inputs.client,
                &namespace,
                &secret.name,
                secret.optional,
                secret.items.as_deref(),
                mode,
                &mut out.files,
            )
            .await?;
        } else if let Some(api) = &source.downward_api {
            downward_files(
                inputs,
                pod,
                api.items.as_deref().unwrap_or_default(),
                mode,
                &mut out.files,
            )?;
        } else if let Some(token) = &source.service_account_token {
            let key = format!("{volume}/{}", token.path);
            let (jwt, renew_at) = match tokens.get(&key) {
                Some((jwt, at)) if Instant::now() < *at => (jwt.clone(), *at),
                _ => {
                    let fresh = service_account_token(
                        inputs.client,
                        pod,
                        token.audience.as_deref().filter(|a| !a.is_empty()),
                        token.expiration_seconds.unwrap_or(3600),
                    )
                    .await?;
                    tokens.insert(key, fresh.clone());
                    fresh
                }
            };
            out.renew_at = Some(out.renew_at.map_or(renew_at, |r| r.min(renew_at)));
            let (mode, owner) = match token_owner {
                Some(uid) => (0o600, Some(uid)),
                None => (mode, None),
            };
            out.files.insert(
                token.path.clone(),
                FileProjection {
                    data: jwt.into_bytes(),
                    mode: mode as u32,
                    owner,
                },
            );
        } else if let Some(bundle) = &source.cluster_trust_bundle {
            let pem = cluster_trust_bundle(inputs.client, bundle).await?;
            if let Some(pem) = pem {
                out.files.insert(
                    bundle.path.clone(),
                    FileProjection {
                        data: pem.into_bytes(),
                        mode: mode as u32,
                        owner: None,
                    },
                );
            }
        } else if source.pod_certificate.is_some() {
            return Err(err(
                "podCertificate projections are not supported: Orquestra does not serve PodCertificateRequests",
            ));
        }
    }
    Ok(())
}

/// Adds `data` (all keys, or `items`) to `files`. A key `items` names that `data` lacks
/// is an error unless the source is optional.
fn add_items(
    what: &str,
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    optional: bool,
    files: &mut BTreeMap<String, FileProjection>,
) -> Result<(), ConfigError> {
    match items {
        None => {
            for (key, value) in data {
                files.insert(
                    key.clone(),
                    FileProjection {
                        data: value.clone(),
                        mode: mode as u32,
                        owner: None,
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                let Some(value) = data.get(&item.key) else {
                    if optional {
                        continue;
                    }
                    return Err(err(format!(
                        "{what} references non-existent config key: {}",
                        item.key
                    )));
                };
                files.insert(
                    item.path.clone(),
                    FileProjection {
                        data: value.clone(),
                        mode: item.mode.unwrap_or(mode) as u32,
                        owner: None,
                    },
                );
            }
        }
    }
    Ok(())
}

/// Adds the ConfigMap `name`'s keys (or `items`) to `files`.
async fn config_map(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    files: &mut BTreeMap<String, FileProjection>,
) -> Result<(), ConfigError> {
    let optional = optional.unwrap_or(false);
    let data = Sources::new(client.clone(), namespace)
        .config_map(name, optional)
        .await?;
    add_items("configMap", &data, items, mode, optional, files)
}

/// Adds the Secret `name`'s keys (or `items`) to `files`.
async fn secret_files(
    client: &Client,
    namespace: &str,
    name: &str,
    optional: Option<bool>,
    items: Option<&[KeyToPath]>,
    mode: i32,
    files: &mut BTreeMap<String, FileProjection>,
) -> Result<(), ConfigError> {
    let optional = optional.unwrap_or(false);
    let data = Sources::new(client.clone(), namespace)
        .secret(name, optional)
        .await?;
    add_items("secret", &data, items, mode, optional, files)
}

fn downward_files(
    inputs: &Inputs<'_>,
    pod: &Pod,
    items: &[DownwardAPIVolumeFile],
    mode: i32,
    files: &mut BTreeMap<String, FileProjection>,
) -> Result<(), ConfigError> {
    for item in items {
        let value = if let Some(field) = &item.field_ref {
            downward::field_ref(pod, &field.field_path, inputs.addresses)?
        } else if let Some(resource) = &item.resource_field_ref {
            let name = resource.container_name.as_deref().unwrap_or_default();
            let container = downward::container(pod, name).ok_or_else(|| {
                err(format!(
                    "downwardAPI item {:?}: no container named {name:?}",
                    item.path
                ))
            })?;
            downward::resource_field(
                container,
                &resource.resource,
                resource.divisor.as_ref().map(|d| d.0.as_str()),
                inputs.node,
            )?
        } else {
            return Err(err(format!(
                "downwardAPI item {:?}: neither fieldRef nor resourceFieldRef",
                item.path
            )));
        };
        files.insert(
            item.path.clone(),
            FileProjection {
                data: value.into_bytes(),
                mode: item.mode.unwrap_or(mode) as u32,
                owner: None,
            },
        );
    }
    Ok(())
}

/// A token for the pod's service account with `audience` (the API server's when `None`),
/// bound to the pod, and when to renew it: at 80 % of its lifetime or after a day, as the
/// kubelet's token manager does.
pub async fn service_account_token(
    client: &Client,
    pod: &Pod,
    audience: Option<&str>,
    expiration_seconds: i64,
) -> Result<(String, Instant), ConfigError> {
    let asked = Instant::now();
    let (token, lifetime) =
        crate::serviceaccount::request_token(client, pod, audience, expiration_seconds)
            .await
            .map_err(err)?;
    let renew = Duration::from_secs((lifetime * 8 / 10).min(24 * 3600));
    Ok((token, asked + renew))
}

/// The PEM bundle a `clusterTrustBundle` projection names: one bundle by `name`, or every
/// bundle of `signerName` matching `labelSelector`, concatenated. `None` when optional and
/// absent.
async fn cluster_trust_bundle(
    client: &Client,
    projection: &k8s_openapi::api::core::v1::ClusterTrustBundleProjection,
) -> Result<Option<String>, ConfigError> {
    let optional = projection.optional.unwrap_or(false);
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "certificates.k8s.io",
        "v1beta1",
        "ClusterTrustBundle",
    ));
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
    let pem_of = |o: &DynamicObject| {
        o.data
            .pointer("/spec/trustBundle")
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let bundles = if let Some(name) = &projection.name {
        match api.get_opt(name).await {
            Ok(Some(o)) => pem_of(&o).into_iter().collect::<Vec<_>>(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(err(format!("reading clustertrustbundle \"{name}\": {e}"))),
        }
    } else {
        let signer = projection.signer_name.clone().unwrap_or_default();
        let mut params = ListParams::default().fields(&format!("spec.signerName={signer}"));
        if let Some(selector) = &projection.label_selector {
            let selector = kube::core::Selector::try_from(selector.clone())
                .map_err(|e| err(format!("clusterTrustBundle labelSelector: {e}")))?
                .to_string();
            if !selector.is_empty() {
                params = params.labels(&selector);
            }
        }
        match api.list(&params).await {
            Ok(list) => list.items.iter().filter_map(pem_of).collect(),
            Err(e) => return Err(err(format!("listing clustertrustbundles of {signer}: {e}"))),
        }
    };
    if bundles.is_empty() {
        return if optional {
            Ok(None)
        } else {
            Err(err(
                "no ClusterTrustBundle matches the clusterTrustBundle projection",
            ))
        };
    }
    Ok(Some(bundles.concat()))
}
