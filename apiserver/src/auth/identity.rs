//! Transport and identity: the cluster CA, the API server's serving certificate, the admin
//! token, and the authentication every API request passes.
//!
//! On first start they are generated into `<data dir>/tls/` and `<data dir>/token` (mode
//! 0600) and reused afterwards, so kubeconfigs stay valid across restarts. Requests
//! authenticate with `Authorization: Bearer <token>` — the admin token, or a service account
//! token the server issued ([`crate::token`]); health endpoints and `/version` stay public,
//! as in Kubernetes (`system:public-info-viewer`).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use crate::authorization::User;
use crate::engine::Engine;
use crate::error::ApiError;

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Reading or writing a file failed.
    #[error("I/O error on {path:?}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Generating a key or certificate failed.
    #[error("could not generate {what}")]
    Certificate {
        /// Which one.
        what: &'static str,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
}

/// The API server's identity, as PEM text.
#[derive(Clone)]
pub struct Identity {
    /// The cluster CA certificate (clients trust it).
    pub ca_pem: String,
    /// The serving certificate, signed by the CA.
    pub cert_pem: String,
    /// The serving certificate's private key.
    pub key_pem: String,
    /// The admin bearer token.
    pub token: String,
    /// The token node agents join with (`DATA_DIR/node-token`): it authenticates as
    /// [`User::node_agent`], which RBAC's bootstrap `system:node` role lets do what an agent
    /// does, and the API server presents it to agents' endpoints.
    pub node_token: String,
    /// The front-proxy CA and the client certificate (CN `front-proxy-client`) it signs:
    /// what requests proxied to aggregated API servers present
    /// ([`crate::aggregator::FrontProxy`]).
    pub front_proxy: crate::aggregator::FrontProxy,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").finish_non_exhaustive()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to `path` atomically, readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), IdentityError> {
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

impl Identity {
    /// Loads the identity from `data_dir`, creating what is missing. The serving certificate
    /// is for `localhost`, `127.0.0.1` and every name or address in `sans`; it is re-issued
    /// (by the same CA) when `sans` asks for one it does not cover.
    pub fn load_or_create(data_dir: &Path, sans: &[String]) -> Result<Identity, IdentityError> {
        let dir = data_dir.join("tls");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let cert = |what| move |source| IdentityError::Certificate { what, source };

        let (ca_key_path, ca_path) = (dir.join("ca.key"), dir.join("ca.crt"));
        let (ca_key, ca_pem) = match (
            std::fs::read_to_string(&ca_key_path),
            std::fs::read_to_string(&ca_path),
        ) {
            (Ok(key), Ok(pem)) => (KeyPair::from_pem(&key).map_err(cert("the CA key"))?, pem),
            _ => {
                let key = KeyPair::generate().map_err(cert("the CA key"))?;
                let params = ca_params().map_err(cert("the CA"))?;
                let ca = params.self_signed(&key).map_err(cert("the CA"))?;
                write_private(&ca_key_path, key.serialize_pem().as_bytes())?;
                write_private(&ca_path, ca.pem().as_bytes())?;
                (key, ca.pem())
            }
        };

        // What in-cluster clients dial: the `kubernetes` Service by name or cluster IP.
        let mut names: Vec<String> = vec![
            "localhost".into(),
            "127.0.0.1".into(),
            "kubernetes".into(),
            "kubernetes.default".into(),
            "kubernetes.default.svc".into(),
            "kubernetes.default.svc.cluster.local".into(),
        ];
        for san in sans {
            if !names.contains(san) {
                names.push(san.clone());
            }
        }
        let (key_path, cert_path, names_path) = (
            dir.join("server.key"),
            dir.join("server.crt"),
            dir.join("server.sans"),
        );
        let issued_for = std::fs::read_to_string(&names_path).unwrap_or_default();
        let covered = names.iter().all(|n| issued_for.lines().any(|l| l == n));
        let (cert_pem, key_pem) = match (
            std::fs::read_to_string(&cert_path),
            std::fs::read_to_string(&key_path),
        ) {
            (Ok(pem), Ok(key)) if covered => (pem, key),
            _ => {
                // The CA's subject and key are all signing needs: rebuild its parameters
                // rather than parse its certificate.
                let issuer = Issuer::new(ca_params().map_err(cert("the CA"))?, &ca_key);
                let key = KeyPair::generate().map_err(cert("the serving key"))?;
                let mut params = CertificateParams::new(Vec::<String>::new())
                    .map_err(cert("the serving certificate"))?;
                params
                    .distinguished_name
                    .push(DnType::CommonName, "orquestra-apiserver");
                params.subject_alt_names = names
                    .iter()
                    .map(|n| match n.parse::<std::net::IpAddr>() {
                        Ok(ip) => Ok(SanType::IpAddress(ip)),
                        Err(_) => n.clone().try_into().map(SanType::DnsName),
                    })
                    .collect::<Result<_, _>>()
                    .map_err(cert("the serving certificate's names"))?;
                params.not_after = rcgen::date_time_ymd(2036, 1, 1);
                let serving = params
                    .signed_by(&key, &issuer)
                    .map_err(cert("the serving certificate"))?;
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                write_private(&cert_path, serving.pem().as_bytes())?;
                write_private(&names_path, names.join("\n").as_bytes())?;
                (serving.pem(), key.serialize_pem())
            }
        };

        Ok(Identity {
            ca_pem,
            cert_pem,
            key_pem,
            token: load_or_create_token(&data_dir.join("token"))?,
            node_token: load_or_create_token(&data_dir.join("node-token"))?,
            front_proxy: front_proxy(&dir)?,
        })
    }
}

/// The front-proxy CA (`front-proxy-ca.{crt,key}`) and its client certificate
/// (`front-proxy-client.{crt,key}`, CN `front-proxy-client`), created on first use — a CA
/// of their own, as kube-apiserver's `--requestheader-client-ca-file`, so a client
/// certificate of the cluster CA cannot pass for the proxy.
fn front_proxy(dir: &Path) -> Result<crate::aggregator::FrontProxy, IdentityError> {
    let cert = |what| move |source| IdentityError::Certificate { what, source };
    let paths = [
        dir.join("front-proxy-ca.crt"),
        dir.join("front-proxy-client.crt"),
        dir.join("front-proxy-client.key"),
    ];
    if let [Ok(ca_pem), Ok(cert_pem), Ok(key_pem)] = paths.each_ref().map(std::fs::read_to_string) {
        return Ok(crate::aggregator::FrontProxy {
            ca_pem,
            cert_pem,
            key_pem,
        });
    }
    let ca_key = KeyPair::generate().map_err(cert("the front-proxy CA key"))?;
    let mut ca_params = ca_params().map_err(cert("the front-proxy CA"))?;
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "orquestra-front-proxy-ca");
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(cert("the front-proxy CA"))?;
    let key = KeyPair::generate().map_err(cert("the front-proxy client key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(cert("the front-proxy client certificate"))?;
    params
        .distinguished_name
        .push(DnType::CommonName, crate::aggregator::FRONT_PROXY_CLIENT);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    let issuer = Issuer::new(ca_params, &ca_key);
    let client = params
        .signed_by(&key, &issuer)
        .map_err(cert("the front-proxy client certificate"))?;
    write_private(
        &dir.join("front-proxy-ca.key"),
        ca_key.serialize_pem().as_bytes(),
    )?;
    write_private(&paths[0], ca.pem().as_bytes())?;
    write_private(&paths[2], key.serialize_pem().as_bytes())?;
    write_private(&paths[1], client.pem().as_bytes())?;
    Ok(crate::aggregator::FrontProxy {
        ca_pem: ca.pem(),
        cert_pem: client.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A random bearer token kept in `path` (mode 0600), created on first use.
fn load_or_create_token(path: &Path) -> Result<String, IdentityError> {
    match std::fs::read_to_string(path) {
        Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_owned()),
        _ => {
            let token = format!(
                "{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            );
            write_private(path, token.as_bytes())?;
            Ok(token)
        }
    }
}

/// The cluster CA's parameters (the same every time, so the CA can sign again later).
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "orquestra-ca");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_after = rcgen::date_time_ymd(2036, 1, 1);
    Ok(params)
}

/// Paths anyone may read, as Kubernetes' `system:public-info-viewer` allows.
fn public(path: &str) -> bool {
    matches!(path, "/healthz" | "/livez" | "/readyz" | "/version")
        || path.starts_with("/healthz/")
        || path.starts_with("/readyz/")
        || path.starts_with("/livez/")
}

/// The client certificate the connection presented, DER — put in a request's extensions by
/// the server's TLS layer only once verified against the cluster CA (as kube-apiserver's
/// `--client-ca-file`).
#[derive(Clone, Debug)]
pub struct ClientCertificate(pub Vec<u8>);

impl ClientCertificate {
    /// The user it names, as kube-apiserver's x509 authenticator reads it: the subject's
    /// common name is the user, each organization a group; `None` without a common name or
    /// outside its validity.
    pub fn user(&self) -> Option<crate::authorization::User> {
        let (_, cert) = x509_parser::parse_x509_certificate(&self.0).ok()?;
        if !cert.validity().is_valid() {
            return None;
        }
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| !cn.is_empty())?
            .to_owned();
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_owned))
            .collect();
        groups.push("system:authenticated".to_owned());
        Some(crate::authorization::User {
            name,
            groups,
            extra: Default::default(),
        })
    }
}

/// Who may call the API: the admin token's holder, and the ServiceAccounts holding a token
/// this server issued (valid signature and audience, not expired, its ServiceAccount and
/// bound object still there). What they may do is [`crate::authorization`]'s business.
pub struct Authenticator {
    admin_token: String,
    node_token: Option<String>,
    engine: Engine,
    /// Tokens recently checked against the store, and when: a client's burst of requests
    /// costs one lookup, and a deleted ServiceAccount's token stops working within
    /// [`RECHECK_AFTER`].
    checked: std::sync::Mutex<HashMap<String, Instant>>,
}

/// How long a service account token's objects count as still there after a lookup.
pub const RECHECK_AFTER: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// Accepts `admin_token`, and the service account tokens of `engine`'s issuer.
    pub fn new(admin_token: String, engine: Engine) -> Authenticator {
        Authenticator {
            admin_token,
            node_token: None,
            engine,
            checked: std::sync::Mutex::default(),
        }
    }

    /// Also accepts `token` as the node agents' ([`User::node_agent`]).
    pub fn with_node_token(mut self, token: String) -> Authenticator {
        self.node_token = Some(token);
        self
    }

    /// Whether `presented` authenticates a request.
    pub async fn accepts(&self, presented: &str) -> bool {
        self.user(presented).await.is_some()
    }

    /// Who `presented` authenticates: the admin, a ServiceAccount, or nobody.
    pub async fn user(&self, presented: &str) -> Option<User> {
        if same_secret(presented, &self.admin_token) {
            return Some(User::admin());
        }
        if self
            .node_token
            .as_deref()
            .is_some_and(|t| same_secret(presented, t))
        {
            return Some(User::node_agent());
        }
        if presented.bytes().filter(|b| *b == b'.').count() != 2 {
            return None;
        }
        let issuer = self.engine.token_issuer().ok()?;
        let claims = issuer.verify(presented).ok()?;
        let user = User {
            extra: claims.extra(),
            ..User::service_account(
                &claims.kubernetes.namespace,
                &claims.kubernetes.serviceaccount.name,
            )
        };
        let fresh = {
            let checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
            checked
                .get(presented)
                .is_some_and(|at| at.elapsed() < RECHECK_AFTER)
        };
        if fresh {
            return Some(user);
        }
        match crate::token::still_valid(&self.engine, &claims).await {
            Ok(true) => {
                let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
                if checked.len() > 10_000 {
                    checked.retain(|_, at| at.elapsed() < RECHECK_AFTER);
                }
                checked.insert(presented.to_owned(), Instant::now());
                Some(user)
            }
            Ok(false) => None,
            Err(e) => {
                tracing::warn!(error = %e, "checking a service account token's objects");
                None
            }
        }
    }
}

/// Constant-time comparison: tokens are secrets.
fn same_secret(presented: &str, token: &str) -> bool {
    presented.len() == token.len()
        && presented
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// Middleware: requests other than the public ones need the admin token or a service
/// account token (see [`Authenticator`]).
pub async fn authenticate(
    State(auth): State<std::sync::Arc<Authenticator>>,
    request: Request,
    next: Next,
) -> Response {
    if public(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // As kube-apiserver's union authenticator: a verified client certificate first (its
    // CN the user, its Os the groups), then a bearer token.
    let certified = request
        .extensions()
        .get::<ClientCertificate>()
        .and_then(ClientCertificate::user);
    let user = match (certified, presented) {
        (Some(user), _) => Some(user),
        (None, Some(p)) => auth.user(p).await,
        (None, None) => None,
    };
    match user {
        Some(user) => {
            let mut request = request;
            request.extensions_mut().insert(user);
            next.run(request).await
        }
        None => ApiError::Unauthorized.into_response(),
    }
}
