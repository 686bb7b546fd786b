//! Service account tokens: the signing key, the TokenRequest subresource
//! (`POST serviceaccounts/<name>/token`) and the check of the tokens it issued.
//!
//! Tokens are JWTs signed with an ECDSA P-256 key (ES256, which kube-apiserver's
//! `--service-account-signing-key-file` accepts too) generated on first start into
//! `<data dir>/tls/service-account.key` (mode 0600) and reused afterwards, so tokens stay
//! valid across restarts. Their claims are Kubernetes' (`iss`, `sub`
//! `system:serviceaccount:NS:NAME`, `aud`, `exp`, `iat`, `nbf`, `jti` and the
//! `kubernetes.io` claim naming the namespace, the ServiceAccount and the object the token
//! is bound to), so anything that reads them — `/openid/v1/jwks` consumers included — finds
//! what it expects. This module knows nothing of HTTP authentication: [`crate::identity`]
//! asks it whether a presented token is one of ours.

use std::path::Path;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rcgen::{KeyPair, PublicKeyData};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::engine::Engine;
use crate::error::ApiError;
use crate::identity::{IdentityError, write_private};
use crate::request::Target;

/// The issuer (and the API audience) of the tokens, as kube-apiserver's and k3s' default.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// How long a token lives when the request does not say (kube-apiserver's default).
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;
/// The shortest lifetime a TokenRequest may ask for (kube-apiserver's validation).
pub const MIN_EXPIRATION_SECONDS: i64 = 600;
/// The longest lifetime a TokenRequest may ask for (kube-apiserver's validation: 2³²).
pub const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
/// The signing key's file under the data dir.
pub const KEY_FILE: &str = "tls/service-account.key";

/// Why the signing key could not be loaded or a token not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Reading or writing the key file failed.
    #[error(transparent)]
    Io(#[from] IdentityError),
    /// Generating or parsing the key failed.
    #[error("the service account signing key")]
    Key(#[source] rcgen::Error),
    /// Signing failed.
    #[error("signing a service account token")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

/// A name and UID in the `kubernetes.io` claim.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectClaim {
    /// The object's name.
    pub name: String,
    /// The object's UID.
    pub uid: String,
}

/// The `kubernetes.io` claim: whose token it is and what it is bound to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesClaim {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// The ServiceAccount.
    pub serviceaccount: ObjectClaim,
    /// The pod the token is bound to (it stops working when the pod goes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<ObjectClaim>,
    /// The Secret the token is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<ObjectClaim>,
    /// The node the bound pod runs on (kube-apiserver adds it for pod-bound tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<ObjectClaim>,
}

/// A service account token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The issuer ([`ISSUER`]).
    pub iss: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub sub: String,
    /// Who the token is for.
    pub aud: Vec<String>,
    /// Expiry (seconds since the epoch).
    pub exp: i64,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// A unique ID.
    #[serde(default)]
    pub jti: String,
    /// Kubernetes' own claim.
    #[serde(rename = "kubernetes.io")]
    pub kubernetes: KubernetesClaim,
}

impl Claims {
    /// Claims for ServiceAccount `namespace/name` (UID `uid`), for `audiences`, valid from
    /// `now` (seconds since the epoch) for `seconds`.
    pub fn new(
        namespace: &str,
        name: &str,
        uid: &str,
        audiences: Vec<String>,
        now: i64,
        seconds: i64,
    ) -> Claims {
        Claims {
            iss: ISSUER.into(),
            sub: format!("system:serviceaccount:{namespace}:{name}"),
            aud: audiences,
            exp: now + seconds,
            iat: now,
            nbf: now,
            jti: uuid::Uuid::new_v4().to_string(),
            kubernetes: KubernetesClaim {
                namespace: namespace.into(),
                serviceaccount: ObjectClaim {
                    name: name.into(),
                    uid: uid.into(),
                },
                pod: None,
                secret: None,
                node: None,
            },
        }
    }
}

/// Signs and checks service account tokens.
#[derive(Clone)]
pub struct TokenIssuer {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The public key as an uncompressed point (`04 ‖ x ‖ y`), for the JWKS.
    point: Vec<u8>,
    key_id: String,
    audiences: Vec<String>,
    /// The longest lifetime a token is issued with (kube-apiserver's
    /// `--service-account-max-token-expiration`): longer requests are shortened to it.
    max_expiration: Option<i64>,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch.
pub fn unix_now() -> i64 {
    jiff::Timestamp::now().as_second()
}

impl TokenIssuer {
    /// An issuer with a fresh key kept only in memory (tokens die with the process): for
    /// servers without a data dir, such as in-process test servers.
    pub fn generate() -> Result<TokenIssuer, TokenError> {
        TokenIssuer::from_key(&KeyPair::generate().map_err(TokenError::Key)?)
    }

    /// The issuer whose key is `<data_dir>/tls/service-account.key`, created (mode 0600) if
    /// missing.
    pub fn load_or_create(data_dir: &Path) -> Result<TokenIssuer, TokenError> {
        let path = data_dir.join(KEY_FILE);
        if let Ok(pem) = std::fs::read_to_string(&path) {
            return TokenIssuer::from_key(&KeyPair::from_pem(&pem).map_err(TokenError::Key)?);
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| IdentityError::Io {
                path: dir.to_owned(),
                source,
            })?;
        }
        let key = KeyPair::generate().map_err(TokenError::Key)?;
        write_private(&path, key.serialize_pem().as_bytes())?;
        TokenIssuer::from_key(&key)
    }

    fn from_key(key: &KeyPair) -> Result<TokenIssuer, TokenError> {
        let point = key.public_key_raw().to_vec();
        // kube-apiserver's key ID: the URL-safe base64 of the SHA-256 of the public key's DER.
        let digest = ring::digest::digest(&ring::digest::SHA256, &key.subject_public_key_info());
        Ok(TokenIssuer {
            encoding: EncodingKey::from_ec_der(&key.serialize_der()),
            decoding: DecodingKey::from_ec_der(&point),
            point,
            key_id: b64url(digest.as_ref()),
            audiences: vec![ISSUER.to_owned()],
            max_expiration: None,
        })
    }

    /// Issues tokens for at most `seconds`, however long a TokenRequest asks for (the
    /// response says the lifetime given, so clients renew in time).
    pub fn with_max_expiration(mut self, seconds: i64) -> TokenIssuer {
        self.max_expiration = Some(seconds.max(1));
        self
    }

    /// The audiences the API server accepts (kube-apiserver's `--api-audiences`).
    pub fn audiences(&self) -> &[String] {
        &self.audiences
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        jsonwebtoken::encode(&header, claims, &self.encoding).map_err(TokenError::Sign)
    }

    /// The claims of `token` if this issuer signed it, it is in its validity window (a minute
    /// of clock skew allowed, as jsonwebtoken's default) and meant for the API server.
    pub fn verify(&self, token: &str) -> Result<Claims, jsonwebtoken::errors::Error> {
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&self.audiences);
        validation.set_issuer(&[ISSUER]);
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &validation).map(|d| d.claims)
    }

    /// `/openid/v1/jwks`: the public key as a JSON Web Key Set.
    pub fn jwks(&self) -> Value {
        let (x, y) = self.point[1..].split_at(32);
        json!({"keys": [{
            "use": "sig", "kty": "EC", "crv": "P-256", "alg": "ES256",
            "kid": self.key_id, "x": b64url(x), "y": b64url(y),
        }]})
    }

    /// `/.well-known/openid-configuration`, as kube-apiserver serves it.
    pub fn openid_configuration(&self) -> Value {
        json!({
            "issuer": ISSUER,
            "jwks_uri": format!("{ISSUER}/openid/v1/jwks"),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }
}

/// Whether `target` is `serviceaccounts/<name>/token`.
pub fn is_token_request(target: &Target) -> bool {
    target.def.group.is_empty()
        && target.def.kind == "ServiceAccount"
        && target.subresource.as_deref() == Some("token")
        && target.name.is_some()
}

fn invalid(name: &str, field: &str, message: String) -> ApiError {
    ApiError::Invalid {
        kind: "TokenRequest".into(),
        name: name.into(),
        group: "authentication.k8s.io".into(),
        causes: vec![crate::error::Cause {
            reason: "FieldValueInvalid".into(),
            message,
            field: field.into(),
        }],
    }
}

/// `POST serviceaccounts/<name>/token`: a token for the ServiceAccount (404 if it does not
/// exist), optionally bound to a Pod or Secret of its namespace (404 if that does not exist,
/// 409 if its UID is not the one named). Returns the TokenRequest with its status.
pub async fn request(
    engine: &Engine,
    issuer: &TokenIssuer,
    target: &Target,
    body: &Value,
) -> Result<Value, ApiError> {
    let name = target.name.clone().unwrap_or_default();
    let namespace = target.namespace.clone().unwrap_or_default();
    let main = Target {
        subresource: None,
        ..target.clone()
    };
    let account = engine.get(&main).await?;
    let spec = &body["spec"];
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => issuer.audiences().to_vec(),
    };
    let seconds = spec["expirationSeconds"]
        .as_i64()
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    if seconds < MIN_EXPIRATION_SECONDS {
        return Err(invalid(
            &name,
            "spec.expirationSeconds",
            format!("Invalid value: {seconds}: may not specify a duration less than 10 minutes"),
        ));
    }
    if seconds > MAX_EXPIRATION_SECONDS {
        return Err(invalid(
            &name,
            "spec.expirationSeconds",
            format!(
                "Invalid value: {seconds}: may not specify a duration larger than 2^32 seconds"
            ),
        ));
    }
    let seconds = issuer
        .max_expiration
        .map_or(seconds, |max| seconds.min(max));
    let uid = account
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut claims = Claims::new(&namespace, &name, uid, audiences, unix_now(), seconds);
    let bound = &spec["boundObjectRef"];
    if bound.is_object() {
        let kind = bound["kind"].as_str().unwrap_or_default();
        let plural = match kind {
            "Pod" => "pods",
            "Secret" => "secrets",
            _ => {
                return Err(invalid(
                    &name,
                    "spec.boundObjectRef.kind",
                    format!("Unsupported value: {kind:?}: supported values: \"Pod\", \"Secret\""),
                ));
            }
        };
        let def = engine
            .registry
            .get("", "v1", plural)
            .ok_or(ApiError::NoRoute)?;
        let object_name = bound["name"].as_str().unwrap_or_default().to_owned();
        let object = engine
            .get(&Target {
                def,
                namespace: Some(namespace.clone()),
                name: Some(object_name.clone()),
                subresource: None,
            })
            .await?;
        let actual = object
            .pointer("/metadata/uid")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if let Some(wanted) = bound["uid"].as_str().filter(|u| !u.is_empty()) {
            if wanted != actual {
                return Err(ApiError::Conflict {
                    resource: plural.into(),
                    name: object_name,
                    group: String::new(),
                    message: format!(
                        "the UID in the bound object reference ({wanted}) does not match the UID in record. The object might have been deleted and then recreated"
                    ),
                });
            }
        }
        let reference = ObjectClaim {
            name: object_name,
            uid: actual,
        };
        if kind == "Pod" {
            claims.kubernetes.pod = Some(reference);
            claims.kubernetes.node = node_of(engine, &object).await;
        } else {
            claims.kubernetes.secret = Some(reference);
        }
    }
    let token = issuer
        .sign(&claims)
        .map_err(|e| ApiError::Internal(format!("{e}: {:?}", std::error::Error::source(&e))))?;
    let expires = jiff::Timestamp::from_second(claims.exp)
        .map(|t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_default();
    let mut spec_out = json!({"audiences": claims.aud, "expirationSeconds": seconds});
    if bound.is_object() {
        spec_out["boundObjectRef"] = bound.clone();
    }
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
        "spec": spec_out,
        "status": {"token": token, "expirationTimestamp": expires},
    }))
}

/// The node `pod` is bound to, with its UID, if it is bound and the Node exists.
async fn node_of(engine: &Engine, pod: &Value) -> Option<ObjectClaim> {
    let name = pod.pointer("/spec/nodeName").and_then(Value::as_str)?;
    let def = engine.registry.get("", "v1", "nodes")?;
    let node = engine
        .get(&Target {
            def,
            namespace: None,
            name: Some(name.to_owned()),
            subresource: None,
        })
        .await
        .ok()?;
    Some(ObjectClaim {
        name: name.to_owned(),
        uid: node.pointer("/metadata/uid")?.as_str()?.to_owned(),
    })
}

impl Claims {
    /// The UserInfo `extra` a service account token gives its user, as kube-apiserver's:
    /// the credential's ID and the pod and node it is bound to.
    pub fn extra(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        const PREFIX: &str = "authentication.kubernetes.io/";
        let mut extra = std::collections::BTreeMap::new();
        if !self.jti.is_empty() {
            extra.insert(
                format!("{PREFIX}credential-id"),
                vec![format!("JTI={}", self.jti)],
            );
        }
        for (what, object) in [
            ("pod", &self.kubernetes.pod),
            ("node", &self.kubernetes.node),
        ] {
            if let Some(object) = object {
                extra.insert(format!("{PREFIX}{what}-name"), vec![object.name.clone()]);
                extra.insert(format!("{PREFIX}{what}-uid"), vec![object.uid.clone()]);
            }
        }
        extra
    }
}

/// Whether the objects a verified token names still exist as they were when it was issued:
/// the ServiceAccount (same UID) and the pod or Secret it is bound to.
pub async fn still_valid(engine: &Engine, claims: &Claims) -> Result<bool, ApiError> {
    let k = &claims.kubernetes;
    let mut wanted = vec![("serviceaccounts", &k.serviceaccount)];
    if let Some(pod) = &k.pod {
        wanted.push(("pods", pod));
    }
    if let Some(secret) = &k.secret {
        wanted.push(("secrets", secret));
    }
    for (plural, object) in wanted {
        let Some(def) = engine.registry.get("", "v1", plural) else {
            return Ok(false);
        };
        let target = Target {
            def,
            namespace: Some(k.namespace.clone()),
            name: Some(object.name.clone()),
            subresource: None,
        };
        match engine.get(&target).await {
            Ok(found) => {
                if found.pointer("/metadata/uid").and_then(Value::as_str)
                    != Some(object.uid.as_str())
                {
                    return Ok(false);
                }
            }
            Err(ApiError::NotFound { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_tokens_verify_and_others_do_not() {
        let issuer = TokenIssuer::generate().unwrap();
        let now = unix_now();
        let claims = Claims::new("ns", "sa", "u1", vec![ISSUER.into()], now, 600);
        let token = issuer.sign(&claims).unwrap();
        assert_eq!(issuer.verify(&token).unwrap(), claims);
        assert_eq!(claims.sub, "system:serviceaccount:ns:sa");

        let other = TokenIssuer::generate().unwrap();
        assert!(other.verify(&token).is_err(), "another key's token");
        let expired = Claims::new("ns", "sa", "u1", vec![ISSUER.into()], now - 7200, 600);
        assert!(issuer.verify(&issuer.sign(&expired).unwrap()).is_err());
        let elsewhere = Claims::new("ns", "sa", "u1", vec!["vault".into()], now, 600);
        assert!(issuer.verify(&issuer.sign(&elsewhere).unwrap()).is_err());
        let jwks = issuer.jwks();
        assert_eq!(jwks["keys"][0]["kty"], "EC");
    }

    #[test]
    fn the_key_is_kept_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let first = TokenIssuer::load_or_create(dir.path()).unwrap();
        let second = TokenIssuer::load_or_create(dir.path()).unwrap();
        let claims = Claims::new("ns", "sa", "u1", vec![ISSUER.into()], unix_now(), 600);
        assert!(second.verify(&first.sign(&claims).unwrap()).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
