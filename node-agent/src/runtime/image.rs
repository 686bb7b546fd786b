//! The image store: pulls images from OCI/Docker registries (registry v2 API, through the
//! `oci-client` crate), verifies every blob, and keeps them content-addressed under the data
//! dir, each layer unpacked once (whiteouts converted to overlayfs's form) so that a
//! container's root filesystem is an overlay mount of its image's layers.
//!
//! Layout under the store's root:
//! - `layers/<hex>/` — a layer's unpacked tree, named by its diff ID (the digest of the
//!   uncompressed tar, checked while unpacking); a layer directory exists only when complete
//!   (unpacked beside it, then renamed);
//! - `images/<hex>.json` — one [`Image`] record per reference, named by the reference's digest;
//! - `tmp/` — downloads in flight.
//!
//! Registries on loopback addresses are spoken to over plain HTTP, as Docker does for
//! 127.0.0.0/8; everything else over HTTPS.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use oci_client::client::{ClientConfig, ClientProtocol};
pub use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What can go wrong with an image.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The reference does not parse (`InvalidImageName` in a pod's status).
    #[error("invalid image reference {reference:?}: {message}")]
    InvalidName {
        /// The reference as given.
        reference: String,
        /// Why it is invalid.
        message: String,
    },
    /// The registry refused or failed, or a blob did not match its digest.
    #[error("pulling {reference}: {message}")]
    Pull {
        /// The reference being pulled.
        reference: String,
        /// The registry's or the verifier's message.
        message: String,
    },
    /// A layer could not be unpacked.
    #[error("unpacking layer {digest}: {source}")]
    Unpack {
        /// The layer's digest.
        digest: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The image is not in the store (and the policy forbids pulling it).
    #[error("image {0} is not present")]
    NotPresent(String),
    /// Reading or writing the store failed.
    #[error("image store: {0}")]
    Io(#[from] io::Error),
}

/// The parts of an image's configuration a container is built from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// `KEY=value` pairs.
    #[serde(default)]
    pub env: Vec<String>,
    /// The entrypoint (Kubernetes' `command` replaces it).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The default arguments (Kubernetes' `args` replaces them).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// The working directory.
    #[serde(default)]
    pub working_dir: String,
    /// `uid[:gid]` or a name.
    #[serde(default)]
    pub user: String,
}

/// An image in the store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Image {
    /// The normalized reference it was pulled as (`registry/repository:tag`).
    pub reference: String,
    /// The manifest's digest: what a pod's `imageID` reports.
    pub digest: String,
    /// The layers' diff IDs, bottom first.
    pub layers: Vec<String>,
    /// The configuration a container starts from.
    pub config: ImageConfig,
    /// Total size of the compressed layers, in bytes.
    pub size: u64,
    /// Never garbage-collected: images loaded with `orq image import` (an air-gapped node's
    /// only copy, as k3s pins its imported airgap images).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pinned: bool,
}

impl Image {
    /// The record of image `reference` from its manifest (digest `digest`) and raw config
    /// blob, checking that the config names one diff ID per layer.
    fn from_manifest(
        reference: &str,
        digest: &str,
        manifest: &oci_client::manifest::OciImageManifest,
        config: &[u8],
    ) -> Result<Image, String> {
        let config: ConfigFile = serde_json::from_slice(config)
            .map_err(|e| format!("config {}: {e}", manifest.config.digest))?;
        let diff_ids = config.rootfs.diff_ids;
        if diff_ids.len() != manifest.layers.len() {
            return Err(format!(
                "manifest {digest} has {} layers, its config {} diff IDs",
                manifest.layers.len(),
                diff_ids.len()
            ));
        }
        let exec = config.config.unwrap_or_default();
        Ok(Image {
            reference: reference.to_owned(),
            digest: digest.to_owned(),
            layers: diff_ids,
            config: ImageConfig {
                env: exec.env.unwrap_or_default(),
                entrypoint: exec.entrypoint.unwrap_or_default(),
                cmd: exec.cmd.unwrap_or_default(),
                working_dir: exec.working_dir.unwrap_or_default(),
                user: exec.user.unwrap_or_default(),
            },
            size: manifest.layers.iter().map(|l| l.size.max(0) as u64).sum(),
            pinned: false,
        })
    }

    /// The `imageID` a container status reports: `repository@digest`.
    pub fn image_id(&self) -> String {
        let repo = self
            .reference
            .rsplit_once('@')
            .map(|(r, _)| r)
            .unwrap_or(&self.reference);
        let repo = match repo.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repo,
        };
        format!("{repo}@{}", self.digest)
    }
}

/// Pull progress, reported as layers arrive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    /// The manifest is resolved: this many layers, this many bytes to fetch at most.
    Resolved {
        /// The manifest's digest.
        digest: String,
        /// Number of layers.
        layers: usize,
        /// Their total compressed size.
        bytes: u64,
    },
    /// One layer is in the store (fetched, verified and unpacked, or already there).
    Layer {
        /// The layer's digest.
        digest: String,
        /// Its compressed size.
        bytes: u64,
        /// Whether it was already present.
        cached: bool,
    },
}

/// The content-addressed image store.
pub struct ImageStore {
    root: PathBuf,
    /// One registry client per registry host: their token caches are per client.
    clients: Mutex<HashMap<String, Arc<Client>>>,
    /// One pull at a time per reference; concurrent pullers wait and then find it present.
    pulls: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The last failed pull of each reference: pullers that waited behind it fail the same
    /// way for a few seconds instead of each trying (and timing out) again in turn.
    failures: Mutex<HashMap<String, (std::time::Instant, String)>>,
    /// Registries (`host[:port]`) spoken to over plain HTTP besides loopback ones.
    insecure: Vec<String>,
    /// Registry → the mirrors (`host[:port]`) asked first, in order: k3s' `registries.yaml`
    /// mirrors, for air-gapped nodes and pull-through caches.
    mirrors: HashMap<String, Vec<String>>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ImageStore {
    /// Opens (creating) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        for dir in ["layers", "images", "tmp"] {
            fs::create_dir_all(root.join(dir))?;
        }
        // Downloads and unpackings cut short by a crash are garbage.
        for entry in fs::read_dir(root.join("tmp"))? {
            let path = entry?.path();
            let _ = fs::remove_dir_all(&path).or_else(|_| fs::remove_file(&path));
        }
        Ok(ImageStore {
            root,
            clients: Mutex::default(),
            pulls: Mutex::default(),
            failures: Mutex::default(),
            insecure: Vec::new(),
            mirrors: HashMap::new(),
        })
    }

    /// Pulls of images from a registry ask its mirrors first, in order, then the registry
    /// itself. Each mirror is `REGISTRY=ENDPOINT` (`registry.k8s.io=http://10.0.0.5:5000`;
    /// an `http://` endpoint is spoken to over plain HTTP). Mirrors are asked anonymously:
    /// the pod's credentials are for the registry it names.
    pub fn with_mirrors(mut self, mirrors: &[String]) -> Result<Self, ImageError> {
        for mirror in mirrors {
            let (registry, endpoint) =
                mirror
                    .split_once('=')
                    .ok_or_else(|| ImageError::InvalidName {
                        reference: mirror.clone(),
                        message: "a mirror is REGISTRY=ENDPOINT".into(),
                    })?;
            let (host, plain) = match endpoint.strip_prefix("http://") {
                Some(host) => (host, true),
                None => (endpoint.strip_prefix("https://").unwrap_or(endpoint), false),
            };
            let host = host.trim_end_matches('/').to_owned();
            if plain {
                self.insecure.push(host.clone());
            }
            self.mirrors
                .entry(registry.to_owned())
                .or_default()
                .push(host);
        }
        Ok(self)
    }

    /// Where `parsed` may be pulled from: its registry's mirrors, then the registry.
    fn sources(&self, parsed: &Reference) -> Vec<Reference> {
        let mirrored = self.mirrors.get(parsed.registry()).into_iter().flatten();
        mirrored
            .map(|host| match parsed.digest() {
                Some(digest) => Reference::with_digest(
                    host.clone(),
                    parsed.repository().to_owned(),
                    digest.to_owned(),
                ),
                None => Reference::with_tag(
                    host.clone(),
                    parsed.repository().to_owned(),
                    parsed.tag().unwrap_or("latest").to_owned(),
                ),
            })
            .chain(std::iter::once(parsed.clone()))
            .collect()
    }

    /// Registries (`host[:port]`) to pull from over plain HTTP, like Docker's
    /// `insecure-registries` (loopback registries always are).
    pub fn with_insecure_registries(mut self, registries: Vec<String>) -> Self {
        self.insecure = registries;
        self
    }

    /// Normalizes a reference as Docker does (`busybox` → `docker.io/library/busybox:latest`).
    pub fn normalize(reference: &str) -> Result<String, ImageError> {
        parse(reference).map(|r| r.whole())
    }

    /// The image stored for `reference`, if any.
    pub fn get(&self, reference: &str) -> Result<Option<Image>, ImageError> {
        let reference = Self::normalize(reference)?;
        match fs::read(self.record_path(&reference)) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Every image in the store.
    pub fn list(&self) -> Result<Vec<Image>, ImageError> {
        let mut images = Vec::new();
        for entry in fs::read_dir(self.root.join("images"))? {
            let bytes = fs::read(entry?.path())?;
            if let Ok(image) = serde_json::from_slice::<Image>(&bytes) {
                images.push(image);
            }
        }
        images.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(images)
    }

    /// Forgets `reference` and deletes the layers no other image uses. Layers of running
    /// containers stay mounted (the overlay holds them) until the containers go.
    pub fn remove(&self, reference: &str) -> Result<bool, ImageError> {
        let reference = Self::normalize(reference)?;
        match fs::remove_file(self.record_path(&reference)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        }
        let used: std::collections::HashSet<String> = self
            .list()?
            .into_iter()
            .flat_map(|i| i.layers.into_iter().map(|l| hex_of(&l).to_owned()))
            .collect();
        for entry in fs::read_dir(self.root.join("layers"))? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !used.contains(&name) {
                fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(true)
    }

    /// Image garbage collection by disk threshold (the kubelet's `imageGCHighThresholdPercent`
    /// / `imageGCLowThresholdPercent`): when the filesystem holding the store is more than
    /// `high` full (0–1), removes images no container uses — least recently pulled first,
    /// never a pinned one — until it is at most `low` full or nothing unused is left.
    /// Returns what it removed.
    pub fn collect_garbage(
        &self,
        in_use: &std::collections::HashSet<String>,
        high: f64,
        low: f64,
    ) -> Result<Vec<String>, ImageError> {
        let usage = || -> Result<f64, ImageError> {
            let stat = nix::sys::statvfs::statvfs(&self.root).map_err(io::Error::from)?;
            let total = stat.blocks() as f64;
            Ok(if total == 0.0 {
                0.0
            } else {
                1.0 - stat.blocks_available() as f64 / total
            })
        };
        if usage()? <= high {
            return Ok(Vec::new());
        }
        let in_use: std::collections::HashSet<String> = in_use
            .iter()
            .filter_map(|r| Self::normalize(r).ok())
            .collect();
        let mut candidates: Vec<(std::time::SystemTime, String)> = Vec::new();
        for image in self.list()? {
            if image.pinned || in_use.contains(&image.reference) {
                continue;
            }
            let modified = fs::metadata(self.record_path(&image.reference))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            candidates.push((modified, image.reference));
        }
        candidates.sort();
        let mut removed = Vec::new();
        for (_, reference) in candidates {
            if usage()? <= low {
                break;
            }
            if self.remove(&reference)? {
                removed.push(reference);
            }
        }
        Ok(removed)
    }

    /// The directories of an image's layers, bottom first.
    pub fn layer_dirs(&self, image: &Image) -> Vec<PathBuf> {
        image
            .layers
            .iter()
            .map(|l| self.root.join("layers").join(hex_of(l)))
            .collect()
    }

    /// Pulls `reference` (unless a concurrent pull just did) and returns it.
    pub async fn pull(
        &self,
        reference: &str,
        auth: &RegistryAuth,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Image, ImageError> {
        let parsed = parse(reference)?;
        let name = parsed.whole();
        let lock = {
            let mut pulls = self.pulls.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(pulls.entry(name.clone()).or_default())
        };
        let _guard = lock.lock().await;
        let failed = |message: String| ImageError::Pull {
            reference: name.clone(),
            message,
        };
        if let Some(message) = self.recent_failure(&name) {
            return Err(failed(message));
        }
        let result = self.pull_locked(parsed, &name, auth, progress).await;
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Err(ImageError::Pull { message, .. }) => {
                failures.insert(name.clone(), (std::time::Instant::now(), message.clone()));
            }
            _ => {
                failures.remove(&name);
            }
        }
        drop(failures);
        result
    }

    /// Why the last pull of `name` failed, if it did in the last few seconds.
    fn recent_failure(&self, name: &str) -> Option<String> {
        const SHARED_FOR: std::time::Duration = std::time::Duration::from_secs(5);
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.retain(|_, (at, _)| at.elapsed() < SHARED_FOR);
        failures.get(name).map(|(_, message)| message.clone())
    }

    /// A pull, with the reference's lock held.
    async fn pull_locked(
        &self,
        parsed: Reference,
        name: &str,
        auth: &RegistryAuth,
        progress: &(dyn Fn(Progress) + Send + Sync),
    ) -> Result<Image, ImageError> {
        let failed = |message: String| ImageError::Pull {
            reference: name.to_owned(),
            message,
        };
        // The first source (a mirror, then the registry) that has the manifest serves the
        // whole pull.
        let mut tried = Vec::new();
        let mut found = None;
        for source in self.sources(&parsed) {
            let mirror = source.registry() != parsed.registry();
            let anonymous = RegistryAuth::Anonymous;
            let client = self.client(source.resolve_registry());
            match client
                .pull_image_manifest(&source, if mirror { &anonymous } else { auth })
                .await
            {
                Ok((manifest, digest)) => {
                    found = Some((source, client, manifest, digest));
                    break;
                }
                Err(e) if mirror => tried.push(format!("mirror {}: {e}", source.registry())),
                Err(e) => tried.push(e.to_string()),
            }
        }
        let Some((parsed, client, manifest, digest)) = found else {
            return Err(failed(tried.join("; ")));
        };
        if let Some(image) = self.get(name)?
            && image.digest == digest
        {
            return Ok(image);
        }
        let bytes = manifest.layers.iter().map(|l| l.size.max(0) as u64).sum();
        progress(Progress::Resolved {
            digest: digest.clone(),
            layers: manifest.layers.len(),
            bytes,
        });
        let mut config = Vec::new();
        client
            .pull_blob(&parsed, &manifest.config, &mut config)
            .await
            .map_err(|e| failed(format!("config {}: {e}", manifest.config.digest)))?;
        let image = Image::from_manifest(name, &digest, &manifest, &config).map_err(failed)?;
        for (layer, diff_id) in manifest.layers.iter().zip(&image.layers) {
            let dir = self.root.join("layers").join(hex_of(diff_id));
            let size = layer.size.max(0) as u64;
            if dir.is_dir() {
                progress(Progress::Layer {
                    digest: layer.digest.clone(),
                    bytes: size,
                    cached: true,
                });
                continue;
            }
            let download = self.root.join("tmp").join(hex_of(&layer.digest));
            let mut file = tokio::fs::File::create(&download).await?;
            let pulled = client.pull_blob(&parsed, layer, &mut file).await;
            drop(file);
            if let Err(e) = pulled {
                let _ = fs::remove_file(&download);
                return Err(failed(format!("layer {}: {e}", layer.digest)));
            }
            let (root, digest, media_type, diff) = (
                self.root.clone(),
                layer.digest.clone(),
                layer.media_type.clone(),
                diff_id.clone(),
            );
            let unpacked = tokio::task::spawn_blocking(move || {
                let result = unpack_layer(&root, &download, &media_type, &diff);
                let _ = fs::remove_file(&download);
                result
            })
            .await
            .map_err(|e| io::Error::other(e.to_string()))?;
            unpacked.map_err(|source| ImageError::Unpack {
                digest: digest.clone(),
                source,
            })?;
            progress(Progress::Layer {
                digest,
                bytes: size,
                cached: false,
            });
        }
        write_atomically(
            &self.record_path(name),
            &serde_json::to_vec_pretty(&image).map_err(io::Error::other)?,
        )?;
        Ok(image)
    }

    /// Imports the images of an OCI image layout — a directory, or a tar archive of one (as
    /// `skopeo copy … oci-archive:` or `umoci` write) — without a registry. Each manifest is
    /// stored under its `io.containerd.image.name` annotation, or `name` plus its
    /// `org.opencontainers.image.ref.name` tag. Every blob's digest is checked.
    pub fn import(&self, path: &Path, name: Option<&str>) -> Result<Vec<Image>, ImageError> {
        let invalid = |message: String| ImageError::Pull {
            reference: path.display().to_string(),
            message,
        };
        let staging;
        let layout = if path.is_dir() {
            path.to_owned()
        } else {
            staging = tempfile::Builder::new()
                .prefix("import-")
                .tempdir_in(self.root.join("tmp"))?;
            let file = fs::File::open(path)?;
            let mut magic = [0u8; 2];
            let n = fs::File::open(path)?.read(&mut magic)?;
            let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
                Box::new(flate2::read::GzDecoder::new(file))
            } else {
                Box::new(file)
            };
            tar::Archive::new(reader).unpack(staging.path())?;
            staging.path().to_owned()
        };
        let blob = |digest: &str| -> Result<PathBuf, ImageError> {
            let (algorithm, hex) = digest
                .split_once(':')
                .ok_or_else(|| invalid(format!("malformed digest {digest:?}")))?;
            if algorithm != "sha256" || hex.contains('/') {
                return Err(invalid(format!("unsupported digest {digest:?}")));
            }
            let path = layout.join("blobs").join(algorithm).join(hex);
            let mut file =
                fs::File::open(&path).map_err(|e| invalid(format!("blob {digest}: {e}")))?;
            let mut hasher = Sha256::new();
            io::copy(&mut file, &mut hasher)?;
            let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
            if actual != digest {
                return Err(invalid(format!("blob {digest} has digest {actual}")));
            }
            Ok(path)
        };
        let index: oci_client::manifest::OciImageIndex = serde_json::from_slice(
            &fs::read(layout.join("index.json"))
                .map_err(|e| invalid(format!("not an OCI image layout (index.json: {e})")))?,
        )
        .map_err(|e| invalid(format!("index.json: {e}")))?;
        let mut imported = Vec::new();
        for entry in &index.manifests {
            let annotations = entry.annotations.clone().unwrap_or_default();
            let reference = match (
                annotations.get("io.containerd.image.name"),
                annotations.get("org.opencontainers.image.ref.name"),
                name,
            ) {
                (Some(full), _, _) => full.clone(),
                (None, Some(tag), Some(name)) => format!("{name}:{tag}"),
                (None, None, Some(name)) => name.to_owned(),
                (None, Some(tag), None) if tag.contains('/') => tag.clone(),
                (None, tag, None) => {
                    return Err(invalid(format!(
                        "the layout names its image only {:?}: give it a repository with --name",
                        tag.map_or("(no name)", String::as_str)
                    )));
                }
            };
            let reference = Self::normalize(&reference)?;
            let mut manifest_digest = entry.digest.clone();
            let mut manifest_bytes = fs::read(blob(&manifest_digest)?)?;
            // An index inside the layout: take this platform's manifest.
            if entry.media_type.contains("index") || entry.media_type.contains("manifest.list") {
                let nested: oci_client::manifest::OciImageIndex =
                    serde_json::from_slice(&manifest_bytes)
                        .map_err(|e| invalid(format!("index {}: {e}", entry.digest)))?;
                let chosen = oci_client::client::current_platform_resolver(&nested.manifests)
                    .ok_or_else(|| {
                        invalid(format!("no manifest for this platform in {}", entry.digest))
                    })?;
                manifest_bytes = fs::read(blob(&chosen)?)?;
                manifest_digest = chosen;
            }
            let manifest: oci_client::manifest::OciImageManifest =
                serde_json::from_slice(&manifest_bytes)
                    .map_err(|e| invalid(format!("manifest {manifest_digest}: {e}")))?;
            let config = fs::read(blob(&manifest.config.digest)?)?;
            let mut image = Image::from_manifest(&reference, &manifest_digest, &manifest, &config)
                .map_err(invalid)?;
            image.pinned = true;
            for (layer, diff_id) in manifest.layers.iter().zip(&image.layers) {
                if self.root.join("layers").join(hex_of(diff_id)).is_dir() {
                    continue;
                }
                let path = blob(&layer.digest)?;
                unpack_layer(&self.root, &path, &layer.media_type, diff_id).map_err(|source| {
                    ImageError::Unpack {
                        digest: layer.digest.clone(),
                        source,
                    }
                })?;
            }
            write_atomically(
                &self.record_path(&reference),
                &serde_json::to_vec_pretty(&image).map_err(io::Error::other)?,
            )?;
            imported.push(image);
        }
        Ok(imported)
    }

    fn client(&self, registry: &str) -> Arc<Client> {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(clients.entry(registry.to_owned()).or_insert_with(|| {
            let protocol = if is_loopback(registry) || self.insecure.iter().any(|r| r == registry) {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            };
            Arc::new(Client::new(ClientConfig {
                protocol,
                connect_timeout: Some(std::time::Duration::from_secs(10)),
                read_timeout: Some(std::time::Duration::from_secs(30)),
                ..ClientConfig::default()
            }))
        }))
    }

    fn record_path(&self, reference: &str) -> PathBuf {
        let hash = hex::encode(Sha256::digest(reference.as_bytes()));
        self.root.join("images").join(format!("{hash}.json"))
    }
}

fn parse(reference: &str) -> Result<Reference, ImageError> {
    reference
        .parse::<Reference>()
        .map_err(|e| ImageError::InvalidName {
            reference: reference.to_owned(),
            message: e.to_string(),
        })
}

/// Whether a registry host (with optional port) is a loopback address.
fn is_loopback(registry: &str) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => registry.split(':').next().unwrap_or(registry),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `sha256:abc…` → `abc…`.
fn hex_of(digest: &str) -> &str {
    digest.split_once(':').map_or(digest, |(_, hex)| hex)
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    config: Option<ExecConfig>,
    rootfs: RootFs,
}

#[derive(Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ExecConfig {
    env: Option<Vec<String>>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    working_dir: Option<String>,
    user: Option<String>,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

/// Unpacks a downloaded layer into `layers/<diff hex>`, checking the uncompressed stream
/// against its diff ID.
fn unpack_layer(root: &Path, blob: &Path, media_type: &str, diff_id: &str) -> io::Result<()> {
    let mut file = fs::File::open(blob)?;
    let mut magic = [0u8; 4];
    let n = file.read(&mut magic)?;
    drop(file);
    let file = io::BufReader::new(fs::File::open(blob)?);
    let reader: Box<dyn Read> = if n >= 2 && magic[..2] == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(file))
    } else if media_type.ends_with("zstd") || (n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd]) {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "zstd-compressed layers are not supported yet",
        ));
    } else {
        Box::new(file)
    };
    let staging = tempfile::Builder::new()
        .prefix("layer-")
        .tempdir_in(root.join("tmp"))?;
    let mut hashing = HashingReader {
        inner: reader,
        hasher: Sha256::new(),
    };
    extract(&mut hashing, staging.path())?;
    io::copy(&mut hashing, &mut io::sink())?;
    let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
    if actual != diff_id {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("uncompressed digest {actual} does not match diff ID {diff_id}"),
        ));
    }
    let target = root.join("layers").join(hex_of(diff_id));
    let staged = staging.keep();
    match fs::rename(&staged, &target) {
        Ok(()) => Ok(()),
        // Another pull of an image sharing this layer finished first.
        Err(_) if target.is_dir() => fs::remove_dir_all(&staged),
        Err(e) => Err(e),
    }
}

/// Extracts a layer tar into `dest`, turning OCI whiteouts into overlayfs ones: `.wh.NAME`
/// becomes a 0/0 character device `NAME`, `.wh..wh..opq` the `trusted.overlay.opaque`
/// attribute on its directory.
pub fn extract(reader: &mut dyn Read, dest: &Path) -> io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let file_name = path.file_name().map(|n| n.as_bytes().to_vec());
        let parent = dest.join(path.parent().unwrap_or(Path::new("")));
        if !parent.starts_with(dest) || path.components().any(|c| c.as_os_str() == "..") {
            continue;
        }
        match file_name.as_deref() {
            Some(b".wh..wh..opq") => {
                fs::create_dir_all(&parent)?;
                set_xattr(&parent, "trusted.overlay.opaque", b"y")?;
            }
            Some(name) if name.starts_with(b".wh.") => {
                fs::create_dir_all(&parent)?;
                let target = parent.join(std::ffi::OsStr::from_bytes(&name[4..]));
                let _ = fs::remove_dir_all(&target).or_else(|_| fs::remove_file(&target));
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .map_err(io::Error::from)?;
            }
            _ => {
                entry.unpack_in(dest)?;
            }
        }
    }
    Ok(())
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(name)?;
    // SAFETY: both strings are NUL-terminated and outlive the call; value's pointer and
    // length describe one live slice.
    let rc = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Writes `bytes` to `path` so that readers see the old content or the new, never a part.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pullers queued behind a failed pull of the same reference fail with its error at
    /// once (a registry that times out would otherwise hold each of them in turn).
    #[tokio::test]
    async fn a_failed_pull_is_shared_with_those_waiting_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        // Nothing listens on port 1: refused.
        let reference = "127.0.0.1:1/nothing:here";
        let first = store
            .pull(reference, &RegistryAuth::Anonymous, &|_| {})
            .await
            .unwrap_err()
            .to_string();
        assert!(store.recent_failure("127.0.0.1:1/nothing:here").is_some());
        let second = store
            .pull(reference, &RegistryAuth::Anonymous, &|_| {})
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(first, second);
    }

    #[test]
    fn loopback_registries() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost:5000"));
        assert!(is_loopback("[::1]:5000"));
        assert!(!is_loopback("docker.io"));
        assert!(!is_loopback("10.0.0.1:5000"));
    }

    #[test]
    fn normalizes_like_docker() {
        assert_eq!(
            ImageStore::normalize("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            ImageStore::normalize("127.0.0.1:5000/web:v1").unwrap(),
            "127.0.0.1:5000/web:v1"
        );
        assert!(matches!(
            ImageStore::normalize("no spaces allowed"),
            Err(ImageError::InvalidName { .. })
        ));
    }

    #[test]
    fn image_id_is_repository_at_digest() {
        let image = Image {
            reference: "127.0.0.1:5000/web:v1".into(),
            digest: "sha256:ab".into(),
            layers: vec![],
            config: ImageConfig::default(),
            size: 0,
            pinned: false,
        };
        assert_eq!(image.image_id(), "127.0.0.1:5000/web@sha256:ab");
    }

    #[test]
    fn garbage_collection_keeps_images_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = ImageStore::open(dir.path()).unwrap();
        for (name, layer, pinned) in [
            ("a.example/x:1", "11", false),
            ("a.example/y:1", "22", false),
            ("a.example/imported:1", "33", true),
        ] {
            fs::create_dir_all(dir.path().join("layers").join(layer)).unwrap();
            let image = Image {
                reference: name.into(),
                digest: format!("sha256:{layer}"),
                layers: vec![format!("sha256:{layer}")],
                config: ImageConfig::default(),
                size: 1,
                pinned,
            };
            write_atomically(
                &store.record_path(name),
                &serde_json::to_vec(&image).unwrap(),
            )
            .unwrap();
        }
        let in_use: std::collections::HashSet<String> = ["a.example/x:1".to_owned()].into();
        // Below the threshold: nothing happens.
        assert!(store.collect_garbage(&in_use, 1.0, 1.0).unwrap().is_empty());
        // Over it (any disk is more than 0 % full): the unused image and its layer go; the
        // pinned (imported) one stays.
        let removed = store.collect_garbage(&in_use, 0.0, 0.0).unwrap();
        assert_eq!(removed, ["a.example/y:1"]);
        assert!(dir.path().join("layers/33").exists());
        assert!(dir.path().join("layers/11").exists());
        assert!(!dir.path().join("layers/22").exists());
        assert_eq!(store.list().unwrap().len(), 2);
    }

    #[test]
    fn whiteouts_become_overlay_whiteouts() {
        let mut tar = tar::Builder::new(Vec::new());
        let mut add = |path: &str, data: &[u8]| {
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            header.set_uid(0);
            header.set_gid(0);
            header.set_mtime(0);
            header.set_cksum();
            tar.append_data(&mut header, path, data).unwrap();
        };
        add("etc/motd", b"hello");
        add("etc/.wh.passwd", b"");
        add("var/.wh..wh..opq", b"");
        let bytes = tar.into_inner().unwrap();
        let dir = tempfile::tempdir().unwrap();
        extract(&mut bytes.as_slice(), dir.path()).unwrap();
        assert_eq!(fs::read(dir.path().join("etc/motd")).unwrap(), b"hello");
        use std::os::unix::fs::FileTypeExt;
        let meta = fs::metadata(dir.path().join("etc/passwd")).unwrap();
        assert!(meta.file_type().is_char_device());
        assert!(dir.path().join("var").is_dir());
    }
}
