//! Servers joining a cluster through its datastore, as k3s bootstraps its servers: the
//! cluster's secrets — its CAs and their keys, the service account signing key, the admin
//! and node tokens — are kept in the store itself (key [`KEY`]), encrypted with the
//! cluster's server token, so a second `orq server` started with `--datastore` on the same
//! etcd and `--token` takes them before it creates anything: one CA, so agents and clients
//! trust every server, and one signing key, so a pod's token works on all of them.
//!
//! The first server on a datastore generates the token (when `--token` gives none), writes
//! it to `DATA_DIR/server-token` and stores the encrypted bundle. The bundle is AES-256-GCM
//! under a key derived from the token with PBKDF2-HMAC-SHA256 (ring): the datastore alone
//! does not give the cluster away. Each server's serving certificate stays its own (issued
//! by the shared CA for its own addresses).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine as _;
use orquestra_store::Store;
use ring::aead;
use serde::{Deserialize, Serialize};

/// The store key of the bundle (outside `/registry/`, where the API's objects are).
pub const KEY: &str = "/orquestra/bootstrap";
/// Where a server keeps the cluster's server token.
pub const TOKEN_FILE: &str = "server-token";
/// PBKDF2 rounds (the token is random; this only slows guessing a weak chosen one).
const ROUNDS: u32 = 10_000;

/// The data dir's files that every server of a cluster shares.
const SHARED: &[&str] = &[
    "tls/ca.crt",
    "tls/ca.key",
    "tls/front-proxy-ca.crt",
    "tls/front-proxy-ca.key",
    "tls/front-proxy-client.crt",
    "tls/front-proxy-client.key",
    orquestra_apiserver::token::KEY_FILE,
    "token",
    "node-token",
];

/// The stored form: salt, nonce and sealed JSON of the files, base64.
#[derive(Serialize, Deserialize)]
struct Sealed {
    salt: String,
    nonce: String,
    sealed: String,
}

/// What `--token` (or `DATA_DIR/server-token`) gives this server.
pub fn token(data_dir: &Path, flag: Option<&str>) -> Option<String> {
    flag.map(str::to_owned)
        .or_else(|| std::fs::read_to_string(data_dir.join(TOKEN_FILE)).ok())
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
}

/// Before the server loads its identity: joins the cluster whose bundle the store holds, or
/// — on a datastore without one — makes the cluster's secrets and stores them. Two first
/// servers racing: the one whose bundle lands first wins, the other drops what it made and
/// joins it (it needs the same token then).
pub async fn bootstrap(
    store: &dyn Store,
    data_dir: &Path,
    token: Option<String>,
) -> anyhow::Result<()> {
    if join(store, data_dir, token.as_deref()).await? {
        return Ok(());
    }
    // The shared secrets, made now (the serving certificate is re-issued for this server's
    // names when the server loads its identity).
    orquestra_apiserver::identity::Identity::load_or_create(data_dir, &[])
        .context("creating the cluster's CA and tokens")?;
    orquestra_apiserver::token::TokenIssuer::load_or_create(data_dir)
        .context("creating the service account signing key")?;
    let generated = token.is_none();
    let token = match token {
        Some(token) => token,
        None => random_hex(32)?,
    };
    let mut files = BTreeMap::new();
    for path in SHARED {
        if let Ok(contents) = std::fs::read(data_dir.join(path)) {
            files.insert(PathBuf::from(path), contents);
        }
    }
    match store.create(KEY, seal(&files, &token)?.into()).await {
        Ok(_) => {
            orquestra_apiserver::identity::write_private(
                &data_dir.join(TOKEN_FILE),
                token.as_bytes(),
            )?;
            if generated {
                tracing::info!(file = %data_dir.join(TOKEN_FILE).display(), "generated the cluster's server token (other servers join with --token)");
            }
            Ok(())
        }
        Err(orquestra_store::Error::AlreadyExists { .. }) => {
            // Another first server was quicker: what this one made was never used.
            for path in
                SHARED
                    .iter()
                    .chain(&["tls/server.crt", "tls/server.key", "tls/server.sans"])
            {
                let _ = std::fs::remove_file(data_dir.join(path));
            }
            anyhow::ensure!(
                !generated,
                "another server bootstrapped this datastore at the same time: start this one with --token (that server's DATA_DIR/server-token)"
            );
            anyhow::ensure!(
                join(store, data_dir, Some(&token)).await?,
                "the datastore's bootstrap data vanished while joining"
            );
            Ok(())
        }
        Err(e) => Err(e).context("storing the bootstrap data"),
    }
}

/// If the store holds a cluster's bundle, writes its files into `data_dir` (with `token`,
/// which must open it); returns whether it did. A data dir holding another cluster's CA is
/// refused.
async fn join(store: &dyn Store, data_dir: &Path, token: Option<&str>) -> anyhow::Result<bool> {
    let (_, Some(kv)) = store
        .get(KEY, None)
        .await
        .context("reading the bootstrap data")?
    else {
        return Ok(false);
    };
    let token = token.context(
        "this datastore already holds a cluster: join it with --token (the first server's \
         DATA_DIR/server-token)",
    )?;
    let files = open(&kv.value, token)?;
    for (path, contents) in &files {
        let local = data_dir.join(path);
        match std::fs::read(&local) {
            Ok(existing) if existing == *contents => {}
            Ok(_) if path.ends_with("ca.crt") => anyhow::bail!(
                "{} is another cluster's CA than the datastore's: a data dir belongs to one cluster",
                local.display()
            ),
            _ => {
                if let Some(dir) = local.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                orquestra_apiserver::identity::write_private(&local, contents)
                    .with_context(|| format!("writing {}", local.display()))?;
            }
        }
    }
    orquestra_apiserver::identity::write_private(&data_dir.join(TOKEN_FILE), token.as_bytes())?;
    tracing::info!(
        files = files.len(),
        "joined the cluster in the datastore: its CAs, keys and tokens"
    );
    Ok(true)
}

fn key(token: &str, salt: &[u8]) -> anyhow::Result<aead::LessSafeKey> {
    let mut key = [0u8; 32];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(ROUNDS).context("rounds")?,
        salt,
        token.as_bytes(),
        &mut key,
    );
    let key = aead::UnboundKey::new(&aead::AES_256_GCM, &key)
        .map_err(|_| anyhow::anyhow!("deriving the bootstrap key"))?;
    Ok(aead::LessSafeKey::new(key))
}

fn random(n: usize) -> anyhow::Result<Vec<u8>> {
    use ring::rand::SecureRandom;
    let mut bytes = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness from the OS"))?;
    Ok(bytes)
}

fn random_hex(n: usize) -> anyhow::Result<String> {
    Ok(random(n)?.iter().map(|b| format!("{b:02x}")).collect())
}

fn seal(files: &BTreeMap<PathBuf, Vec<u8>>, token: &str) -> anyhow::Result<Vec<u8>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let plain: BTreeMap<String, String> = files
        .iter()
        .map(|(p, c)| (p.display().to_string(), b64.encode(c)))
        .collect();
    let mut data = serde_json::to_vec(&plain)?;
    let salt = random(16)?;
    let nonce = random(aead::NONCE_LEN)?;
    let nonce_array: [u8; aead::NONCE_LEN] = nonce.as_slice().try_into()?;
    key(token, &salt)?
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key(nonce_array),
            aead::Aad::from(KEY.as_bytes()),
            &mut data,
        )
        .map_err(|_| anyhow::anyhow!("sealing the bootstrap data"))?;
    Ok(serde_json::to_vec(&Sealed {
        salt: b64.encode(salt),
        nonce: b64.encode(nonce),
        sealed: b64.encode(data),
    })?)
}

fn open(stored: &[u8], token: &str) -> anyhow::Result<BTreeMap<PathBuf, Vec<u8>>> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let sealed: Sealed =
        serde_json::from_slice(stored).context("the bootstrap data is not ours")?;
    let salt = b64.decode(&sealed.salt)?;
    let nonce: [u8; aead::NONCE_LEN] = b64
        .decode(&sealed.nonce)?
        .as_slice()
        .try_into()
        .context("the bootstrap data's nonce")?;
    let mut data = b64.decode(&sealed.sealed)?;
    let plain = key(token, &salt)?
        .open_in_place(
            aead::Nonce::assume_unique_for_key(nonce),
            aead::Aad::from(KEY.as_bytes()),
            &mut data,
        )
        .map_err(|_| {
            anyhow::anyhow!(
                "--token does not open this cluster's bootstrap data: pass the first server's DATA_DIR/server-token"
            )
        })?;
    let files: BTreeMap<String, String> = serde_json::from_slice(plain)?;
    files
        .into_iter()
        .map(|(path, contents)| {
            // Only the files this module seals, never a path out of the data dir.
            anyhow::ensure!(
                SHARED.contains(&path.as_str()),
                "unexpected file {path:?} in the bootstrap data"
            );
            Ok((PathBuf::from(path), b64.decode(contents)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_files_open_with_the_token_only() {
        let mut files = BTreeMap::new();
        files.insert(PathBuf::from("tls/ca.crt"), b"CA".to_vec());
        files.insert(PathBuf::from("token"), b"admin".to_vec());
        let sealed = seal(&files, "secret").unwrap();
        assert_eq!(open(&sealed, "secret").unwrap(), files);
        let wrong = open(&sealed, "guess").unwrap_err().to_string();
        assert!(wrong.contains("does not open"), "{wrong}");
        assert!(!String::from_utf8_lossy(&sealed).contains("admin"));
    }
}
