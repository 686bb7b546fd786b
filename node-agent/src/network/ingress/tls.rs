//! TLS for the hosts Ingresses list under `spec.tls`: a rustls certificate resolver choosing
//! by SNI among the `kubernetes.io/tls` Secrets they name.
//!
//! The table is rebuilt when an Ingress, IngressClass or Secret changes and swapped in whole;
//! parsed keys are kept by Secret `resourceVersion`, so an unrelated change parses nothing
//! again. A host listed by several Ingresses takes the oldest one's Secret (as routes do).
//! A client naming no known host — or no host — gets a self-signed certificate made at
//! start (ingress-nginx's "Fake Certificate"), so the handshake completes and the request
//! is routed (to a host-less rule or a 404).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::ResourceExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::routes::{by_age, lookup_host, served};

/// A Secret that cannot serve TLS.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// `tls.crt` or `tls.key` is missing.
    #[error("secret {secret} has no {key}")]
    Missing {
        /// `namespace/name`.
        secret: String,
        /// The missing key.
        key: &'static str,
    },
    /// The PEM does not parse.
    #[error("secret {secret}: {key}: {source}")]
    Pem {
        /// `namespace/name`.
        secret: String,
        /// The key holding it.
        key: &'static str,
        /// The parser's error.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// The key is of an unsupported type, or does not match the certificate.
    #[error("secret {secret}: {source}")]
    Key {
        /// `namespace/name`.
        secret: String,
        /// rustls' error.
        #[source]
        source: rustls::Error,
    },
    /// The fallback certificate could not be made.
    #[error("making the default certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// The certificate and key of a `kubernetes.io/tls` Secret, checked to match.
pub fn certified_key(secret: &Secret) -> Result<CertifiedKey, CertError> {
    let name = format!(
        "{}/{}",
        secret.namespace().unwrap_or_default(),
        secret.name_any()
    );
    let data = |key: &'static str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|b| b.0.as_slice())
            .ok_or_else(|| CertError::Missing {
                secret: name.clone(),
                key,
            })
    };
    let pem = |key: &'static str| {
        let name = name.clone();
        move |source| CertError::Pem {
            secret: name,
            key,
            source,
        }
    };
    let chain = CertificateDer::pem_slice_iter(data("tls.crt")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem("tls.crt"))?;
    if chain.is_empty() {
        return Err(CertError::Pem {
            secret: name,
            key: "tls.crt",
            source: rustls::pki_types::pem::Error::NoItemsFound,
        });
    }
    let key = PrivateKeyDer::from_pem_slice(data("tls.key")?).map_err(pem("tls.key"))?;
    CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider()).map_err(
        |source| CertError::Key {
            secret: name,
            source,
        },
    )
}

/// The certificates by host: exact names, and wildcards (`*.example.com`) by their domain.
#[derive(Debug, Default)]
pub struct CertTable {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertTable {
    /// The certificate for `host` (lower case), if an Ingress gives it one.
    pub fn get(&self, host: &str) -> Option<&Arc<CertifiedKey>> {
        lookup_host(&self.exact, &self.wildcard, host)
    }

    /// How many hosts have a certificate.
    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len()
    }

    /// Whether no host has one.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Parsed Secrets by `(namespace, name)`, with the `resourceVersion` they were parsed at.
pub type ParsedSecrets =
    HashMap<(String, String), (Option<String>, Result<Arc<CertifiedKey>, Arc<CertError>>)>;

/// The certificates of the served `ingresses`' `spec.tls` hosts, from `secrets`; `parsed`
/// carries parses over from the last build. Returns the table and what could not be used
/// (a missing or broken Secret), each naming the Ingress.
pub fn build(
    ingresses: &[Arc<Ingress>],
    classes: &[Arc<IngressClass>],
    secrets: &[Arc<Secret>],
    parsed: &mut ParsedSecrets,
) -> (CertTable, Vec<String>) {
    let by_name: HashMap<(String, String), &Arc<Secret>> = secrets
        .iter()
        .map(|s| ((s.namespace().unwrap_or_default(), s.name_any()), s))
        .collect();
    parsed.retain(|key, (version, _)| {
        by_name.get(key).map(|s| &s.metadata.resource_version) == Some(&*version)
    });
    let mut table = CertTable::default();
    let mut problems = Vec::new();
    for ingress in by_age(ingresses) {
        if !served(ingress, classes) {
            continue;
        }
        let namespace = ingress.namespace().unwrap_or_default();
        for tls in ingress.spec.iter().flat_map(|s| s.tls.iter().flatten()) {
            let Some(secret_name) = tls.secret_name.clone().filter(|n| !n.is_empty()) else {
                continue;
            };
            let key = (namespace.clone(), secret_name.clone());
            let Some(secret) = by_name.get(&key) else {
                problems.push(format!(
                    "ingress {namespace}/{}: TLS secret {namespace}/{secret_name} not found",
                    ingress.name_any()
                ));
                continue;
            };
            let (_, cert) = parsed.entry(key).or_insert_with(|| {
                (
                    secret.metadata.resource_version.clone(),
                    certified_key(secret).map(Arc::new).map_err(Arc::new),
                )
            });
            let cert = match cert {
                Ok(cert) => Arc::clone(cert),
                Err(e) => {
                    problems.push(format!("ingress {namespace}/{}: {e}", ingress.name_any()));
                    continue;
                }
            };
            for host in tls.hosts.iter().flatten() {
                let host = host.to_ascii_lowercase();
                let (map, host) = match host.strip_prefix("*.") {
                    Some(domain) => (&mut table.wildcard, domain.to_owned()),
                    None => (&mut table.exact, host),
                };
                map.entry(host).or_insert_with(|| Arc::clone(&cert));
            }
        }
    }
    (table, problems)
}

/// The resolver rustls asks for each handshake: SNI to certificate, else the fallback.
#[derive(Debug)]
pub struct CertResolver {
    table: RwLock<Arc<CertTable>>,
    fallback: Arc<CertifiedKey>,
}

impl CertResolver {
    /// A resolver with no host certificates yet and a fresh self-signed fallback.
    pub fn new() -> Result<CertResolver, CertError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            "Orquestra Ingress Controller Fake Certificate",
        );
        let cert = params.self_signed(&key)?;
        let der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| CertError::Key {
            secret: "(default certificate)".into(),
            source: rustls::Error::General(e.into()),
        })?;
        let fallback = CertifiedKey::from_der(
            vec![cert.der().clone()],
            der,
            &rustls::crypto::ring::default_provider(),
        )
        .map_err(|source| CertError::Key {
            secret: "(default certificate)".into(),
            source,
        })?;
        Ok(CertResolver {
            table: RwLock::new(Arc::new(CertTable::default())),
            fallback: Arc::new(fallback),
        })
    }

    /// Swaps in a new table.
    pub fn set(&self, table: CertTable) {
        *self.table.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(table);
    }

    /// The certificate a client asking for `server_name` gets.
    pub fn certificate(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let table = Arc::clone(&self.table.read().unwrap_or_else(|e| e.into_inner()));
        server_name
            .map(|n| n.to_ascii_lowercase())
            .and_then(|n| table.get(n.trim_end_matches('.')).cloned())
            .unwrap_or_else(|| Arc::clone(&self.fallback))
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.certificate(hello.server_name()))
    }
}

/// The rustls server configuration: certificates from `resolver`, HTTP/2 and HTTP/1.1 by
/// ALPN.
pub fn server_config(resolver: Arc<CertResolver>) -> Result<rustls::ServerConfig, rustls::Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;
    use serde_json::json;

    fn tls_secret(name: &str, hosts: &[&str], version: &str) -> Arc<Secret> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
                .unwrap()
                .self_signed(&key)
                .unwrap();
        let mut secret: Secret = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": version},
            "type": "kubernetes.io/tls",
        }))
        .unwrap();
        secret.data = Some(
            [
                ("tls.crt".to_owned(), ByteString(cert.pem().into_bytes())),
                (
                    "tls.key".to_owned(),
                    ByteString(key.serialize_pem().into_bytes()),
                ),
            ]
            .into(),
        );
        Arc::new(secret)
    }

    fn ingress(name: &str, tls: serde_json::Value) -> Arc<Ingress> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "default",
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"ingressClassName": "orquestra", "tls": tls},
            }))
            .unwrap(),
        )
    }

    #[test]
    fn hosts_get_their_secrets_certificate_and_others_the_fallback() {
        let secure = tls_secret("secure", &["secure.example.com"], "1");
        let wild = tls_secret("wild", &["*.apps.example.com"], "1");
        let ingresses = [ingress(
            "web",
            json!([{"hosts": ["Secure.example.com"], "secretName": "secure"},
                   {"hosts": ["*.apps.example.com"], "secretName": "wild"},
                   {"hosts": ["lost.example.com"], "secretName": "missing"}]),
        )];
        let mut parsed = ParsedSecrets::new();
        let (table, problems) = build(&ingresses, &[], &[secure, wild], &mut parsed);
        assert_eq!(
            problems,
            ["ingress default/web: TLS secret default/missing not found"]
        );
        assert_eq!(table.len(), 2);
        let resolver = CertResolver::new().unwrap();
        resolver.set(table);
        let secure_cert = resolver.certificate(Some("secure.example.com"));
        let app_cert = resolver.certificate(Some("x.apps.example.com"));
        let fallback = resolver.certificate(None);
        assert!(!Arc::ptr_eq(&secure_cert, &fallback));
        assert!(!Arc::ptr_eq(&app_cert, &fallback));
        assert!(!Arc::ptr_eq(&secure_cert, &app_cert));
        assert!(Arc::ptr_eq(
            &resolver.certificate(Some("lost.example.com")),
            &fallback
        ));
        assert!(Arc::ptr_eq(
            &resolver.certificate(Some("a.b.apps.example.com")),
            &fallback
        ));
    }

    #[test]
    fn broken_secrets_are_named_and_parses_are_kept_by_version() {
        let good = tls_secret("good", &["a.example.com"], "1");
        let mut broken = (*tls_secret("broken", &["b.example.com"], "1")).clone();
        if let Some(data) = broken.data.as_mut() {
            data.insert("tls.key".into(), ByteString(b"not a key".to_vec()));
        }
        let ingresses = [ingress(
            "web",
            json!([{"hosts": ["a.example.com"], "secretName": "good"},
                   {"hosts": ["b.example.com"], "secretName": "broken"}]),
        )];
        let mut parsed = ParsedSecrets::new();
        let secrets = [Arc::clone(&good), Arc::new(broken)];
        let (table, problems) = build(&ingresses, &[], &secrets, &mut parsed);
        assert_eq!(table.len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("default/broken"), "{problems:?}");
        let first = Arc::clone(table.get("a.example.com").unwrap());
        let (again, _) = build(&ingresses, &[], &secrets, &mut parsed);
        assert!(
            Arc::ptr_eq(&first, again.get("a.example.com").unwrap()),
            "not parsed again"
        );
        let renewed = tls_secret("good", &["a.example.com"], "2");
        let (renewed, _) = build(&ingresses, &[], &[renewed], &mut parsed);
        assert!(!Arc::ptr_eq(&first, renewed.get("a.example.com").unwrap()));
    }
}
