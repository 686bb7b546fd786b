//! CertificateSigningRequests signed and node client requests approved, as
//! kube-controller-manager's `csrsigning` and `csrapproving` controllers do.
//!
//! Signing: an approved (`Approved=True`, not `Failed`) request for the signer
//! `kubernetes.io/kube-apiserver-client` or `kubernetes.io/kube-apiserver-client-kubelet`
//! without a certificate gets one from the cluster CA (`--cluster-signing-cert-file` and
//! `-key-file`): the request's subject and public key, client authentication only, valid from
//! five minutes ago (clock skew) for `spec.expirationSeconds` (at most, and by default, a
//! year). The API server trusts such certificates as kube-apiserver does (`--client-ca-file`):
//! the common name is the user, the organizations the groups. A request the signer may not
//! sign — a kubelet client request whose subject is not `system:node:<name>` in
//! `system:nodes`, usages beyond client auth, an unparsable request — gets `Failed=True`
//! with the reason instead. Other signers are left alone.
//!
//! Approving: a pending kubelet client request made by a node (its requestor in
//! `system:nodes`) for a node identity is approved (`AutoApproved`), as kube's approver
//! approves a kubelet's bootstrap and renewal requests; every other request waits for
//! `kubectl certificate approve`.

use std::sync::Arc;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use orquestra_operator::rbac::{READ, Rule};
use orquestra_operator::{Manager, Runner};
use serde_json::json;

/// What this control loop's requests need (see [`orquestra_operator::rbac`]).
pub const RULES: &[Rule] = &[
    Rule {
        api_groups: &["certificates.k8s.io"],
        resources: &["certificatesigningrequests"],
        verbs: READ,
    },
    Rule {
        api_groups: &["certificates.k8s.io"],
        resources: &[
            "certificatesigningrequests/status",
            "certificatesigningrequests/approval",
        ],
        verbs: &["update", "patch"],
    },
    Rule {
        api_groups: &["certificates.k8s.io"],
        resources: &["signers"],
        verbs: &["sign", "approve"],
    },
];

/// The field manager of the controller's writes.
pub const MANAGER: &str = "csrsigning";
/// Client certificates for any user.
pub const CLIENT_SIGNER: &str = "kubernetes.io/kube-apiserver-client";
/// Client certificates for nodes (`system:node:<name>` in `system:nodes`).
pub const KUBELET_SIGNER: &str = "kubernetes.io/kube-apiserver-client-kubelet";
/// The longest (and default) lifetime of a certificate signed here.
pub const MAX_LIFETIME: std::time::Duration = std::time::Duration::from_secs(365 * 24 * 3600);

/// The CA that signs: its certificate and key, PEM.
#[derive(Clone)]
pub struct SigningCa {
    /// The CA certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

impl std::fmt::Debug for SigningCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningCa").finish_non_exhaustive()
    }
}

/// What can go wrong (retried with backoff).
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    /// Writing the request's approval or status failed.
    #[error("updating certificatesigningrequest {name}: {source}")]
    Write {
        /// The request.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// The signing CA could not be loaded.
    #[error("the cluster signing CA: {0}")]
    Ca(String),
}

struct Controller {
    client: Client,
    ca: SigningCa,
}

/// Adds the signer (and approver) with `ca` to `manager`.
pub fn add(manager: &mut Manager, ca: SigningCa) {
    let requests = manager.cache::<CertificateSigningRequest>(watcher::Config::default());
    let runner = Runner::for_cache(MANAGER, &requests).expect("the cache was just created");
    manager.add(
        runner,
        reconcile,
        Arc::new(Controller {
            client: manager.client(),
            ca,
        }),
    );
}

/// Whether the request has a condition of `kind` that is True.
fn has(csr: &CertificateSigningRequest, kind: &str) -> bool {
    csr.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == kind && c.status == "True"))
}

async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    ctx: Arc<Controller>,
) -> Result<Action, CsrError> {
    let signer = csr.spec.signer_name.as_str();
    if signer != CLIENT_SIGNER && signer != KUBELET_SIGNER {
        return Ok(Action::await_change());
    }
    let signed = csr
        .status
        .as_ref()
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    if signed || has(&csr, "Denied") || has(&csr, "Failed") {
        return Ok(Action::await_change());
    }
    let api: Api<CertificateSigningRequest> = Api::all(ctx.client.clone());
    let name = csr.name_any();
    let write = |source| CsrError::Write {
        name: name.clone(),
        source,
    };
    let params = PatchParams::apply(MANAGER).force();
    if !has(&csr, "Approved") {
        if signer == KUBELET_SIGNER && requested_by_a_node(&csr) {
            let patch = json!({
                "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
                "status": {"conditions": [condition("Approved", "AutoApproved",
                    "Auto approving a node client certificate requested by a node.")]},
            });
            api.patch_approval(&name, &params, &Patch::Apply(&patch))
                .await
                .map_err(write)?;
        }
        return Ok(Action::await_change());
    }
    let status = match sign(&csr, &ctx.ca) {
        Ok(pem) => {
            tracing::info!(request = %name, signer, "signed a certificate");
            json!({"certificate": k8s_openapi::ByteString(pem.into_bytes())})
        }
        Err(why) => {
            tracing::warn!(request = %name, signer, %why, "refusing to sign");
            json!({"conditions": [condition("Failed", "SignerValidationFailure", &why)]})
        }
    };
    let patch = json!({
        "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
        "status": status,
    });
    api.patch_status(&name, &params, &Patch::Apply(&patch))
        .await
        .map_err(write)?;
    Ok(Action::await_change())
}

fn condition(kind: &str, reason: &str, message: &str) -> serde_json::Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    json!({"type": kind, "status": "True", "reason": reason, "message": message,
           "lastUpdateTime": now, "lastTransitionTime": now})
}

/// A kubelet client request its node made: the requestor is in `system:nodes` (the node
/// token, or an earlier certificate of the node).
fn requested_by_a_node(csr: &CertificateSigningRequest) -> bool {
    csr.spec
        .groups
        .iter()
        .flatten()
        .any(|g| g == "system:nodes")
}

/// The certificate for `csr`, PEM; or why it may not be signed.
fn sign(csr: &CertificateSigningRequest, ca: &SigningCa) -> Result<String, String> {
    let pem = String::from_utf8(csr.spec.request.0.clone())
        .map_err(|_| "spec.request is not a PEM certificate request".to_owned())?;
    let mut request = rcgen::CertificateSigningRequestParams::from_pem(&pem)
        .map_err(|e| format!("spec.request: {e}"))?;
    let allowed = ["client auth", "digital signature", "key encipherment"];
    if let Some(bad) = csr
        .spec
        .usages
        .iter()
        .flatten()
        .find(|u| !allowed.contains(&u.as_str()))
    {
        return Err(format!(
            "usage {bad:?} is not allowed for {}",
            csr.spec.signer_name
        ));
    }
    let params = &mut request.params;
    if csr.spec.signer_name == KUBELET_SIGNER {
        let common_name = common_name(params);
        let organizations = organizations(params);
        let node = common_name
            .as_deref()
            .and_then(|cn| cn.strip_prefix("system:node:"))
            .filter(|n| !n.is_empty());
        if node.is_none() || organizations != ["system:nodes"] {
            return Err(format!(
                "a {KUBELET_SIGNER} request must be for CN=system:node:<name>, O=system:nodes (got CN={common_name:?}, O={organizations:?})"
            ));
        }
    }
    // Client authentication only, whatever the request asked: no names, not a CA.
    params.subject_alt_names.clear();
    params.is_ca = rcgen::IsCa::NoCa;
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let lifetime = csr
        .spec
        .expiration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map(std::time::Duration::from_secs)
        .map_or(MAX_LIFETIME, |d| d.min(MAX_LIFETIME));
    let now = time_now();
    params.not_before = now - rcgen_duration(300);
    params.not_after = now + rcgen_duration(lifetime.as_secs());
    let key = rcgen::KeyPair::from_pem(&ca.key_pem).map_err(|e| format!("the CA key: {e}"))?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.cert_pem, key)
        .map_err(|e| format!("the CA certificate: {e}"))?;
    let cert = request
        .signed_by(&issuer)
        .map_err(|e| format!("signing: {e}"))?;
    Ok(cert.pem())
}

fn dn_text(value: &rcgen::DnValue) -> Option<String> {
    match value {
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        rcgen::DnValue::PrintableString(s) => Some(s.as_str().to_owned()),
        rcgen::DnValue::Ia5String(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn common_name(params: &rcgen::CertificateParams) -> Option<String> {
    params
        .distinguished_name
        .get(&rcgen::DnType::CommonName)
        .and_then(dn_text)
}

fn organizations(params: &rcgen::CertificateParams) -> Vec<String> {
    params
        .distinguished_name
        .iter()
        .filter(|(kind, _)| **kind == rcgen::DnType::OrganizationName)
        .filter_map(|(_, v)| dn_text(v))
        .collect()
}

fn time_now() -> time::OffsetDateTime {
    time::OffsetDateTime::now_utc()
}

fn rcgen_duration(seconds: u64) -> time::Duration {
    time::Duration::seconds(i64::try_from(seconds).unwrap_or(i64::MAX / 2))
}
