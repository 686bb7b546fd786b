//! A pod's volumes on the node: set up before its containers start (a problem here keeps
//! the pod `ContainerCreating` with a `FailedMount` event naming the volume, retried until
//! it goes away), kept up to date while it runs (the files of `configMap`, `secret`,
//! `downwardAPI` and `projected` volumes follow their sources; tokens are renewed before
//! they expire), and bind-mounted into each container ([`mounts`]).
//!
//! Every volume lives at `<pod dir>/volumes/<name>` except `hostPath` and persistent
//! volumes, which are directories of the node elsewhere:
//!
//! | kind | on the node |
//! | --- | --- |
//! | `emptyDir` | a `0777` directory; `medium: Memory` a tmpfs (`sizeLimit` its size) |
//! | `configMap`, `secret`, `downwardAPI`, `projected` | [`atomic`] projections |
//! | `hostPath` | the path, checked or created by its `type` |
//! | `persistentVolumeClaim`, `ephemeral` | the bound PersistentVolume's `hostPath`/`local` path |
//! | `image` | the image's layers, mounted read-only |
//!
//! With `fsGroup`, the kubelet's ownership rule applies to the pod's own volumes: group
//! `fsGroup`, group-readable (and writable for an `emptyDir`), directories set-gid.

pub mod atomic;
pub mod local;
pub mod projection;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    Container, PersistentVolume, PersistentVolumeClaim, Pod, Volume, VolumeMount,
};
use kube::{Api, ResourceExt};

use crate::container::BindMount;
use crate::resolve::ConfigError;
pub use projection::Inputs;

/// How often the projected volumes of a running pod are compared with their sources. The
/// kubelet's is its sync period plus a cache TTL (a minute or more); a few seconds keeps a
/// ConfigMap edit visible quickly at one GET per source.
pub const REFRESH_PERIOD: Duration = Duration::from_secs(5);

/// A volume that could not be set up: which one, and why.
#[derive(Debug, thiserror::Error)]
#[error("MountVolume.SetUp failed for volume \"{volume}\" : {reason}")]
pub struct MountError {
    /// The volume's name.
    pub volume: String,
    /// What went wrong (the source missing, a `hostPath` type check, …).
    pub reason: String,
}

fn mount_err(volume: &Volume, reason: impl std::fmt::Display) -> MountError {
    MountError {
        volume: volume.name.clone(),
        reason: reason.to_string(),
    }
}

/// The volumes of one pod on this node.
#[derive(Debug)]
pub struct PodVolumes {
    /// `<pod dir>/volumes`.
    root: PathBuf,
    /// Volume name → its directory (or file) on the node.
    paths: BTreeMap<String, PathBuf>,
    /// When the projections were last compared with their sources.
    refreshed: Instant,
    /// The earliest instant a projected token must be renewed.
    renew_at: Option<Instant>,
    /// The projected tokens, reused until due.
    tokens: projection::Tokens,
}

impl PodVolumes {
    /// Sets up every volume of `pod` under `pod_dir`. Idempotent: an agent restarted with
    /// the pod running finds its volumes (and tmpfs mounts) in place and keeps them.
    /// `images` are the layer directories of the pod's `image` volumes, pulled by the caller.
    pub async fn set_up(
        inputs: &Inputs<'_>,
        pod: &Pod,
        pod_dir: &Path,
        images: &BTreeMap<String, Vec<PathBuf>>,
    ) -> Result<PodVolumes, MountError> {
        let mut volumes = PodVolumes {
            root: pod_dir.join("volumes"),
            paths: BTreeMap::new(),
            refreshed: Instant::now(),
            renew_at: None,
            tokens: projection::Tokens::new(),
        };
        let fs_group = fs_group(pod);
        for volume in pod_volumes(pod) {
            let dir = volumes.root.join(&volume.name);
            let path = if let Some(empty) = &volume.empty_dir {
                empty_dir(&dir, empty, memory_limit(pod, inputs.node))
                    .map_err(|e| mount_err(volume, e))?;
                if let Some(gid) = fs_group {
                    set_ownership(&dir, gid, false).map_err(|e| mount_err(volume, e))?;
                }
                dir
            } else if let Some(host) = &volume.host_path {
                host_path(&host.path, host.type_.as_deref().unwrap_or(""))
                    .map_err(|e| mount_err(volume, e))?
            } else if volume.persistent_volume_claim.is_some() || volume.ephemeral.is_some() {
                persistent(inputs, pod, volume).await?
            } else if volume.image.is_some() {
                let layers = images.get(&volume.name).ok_or_else(|| {
                    mount_err(volume, "the image of the volume is not pulled yet")
                })?;
                image(&dir, layers).map_err(|e| mount_err(volume, e))?;
                dir
            } else {
                volumes.project(inputs, pod, volume, fs_group).await?;
                dir
            };
            volumes.paths.insert(volume.name.clone(), path);
        }
        Ok(volumes)
    }

    /// Writes one projecting volume (`Err` for a kind this node does not support).
    async fn project(
        &mut self,
        inputs: &Inputs<'_>,
        pod: &Pod,
        volume: &Volume,
        fs_group: Option<u32>,
    ) -> Result<bool, MountError> {
        let owner = token_owner(pod);
        let payload = projection::payload(inputs, pod, volume, owner, &mut self.tokens)
            .await
            .ok_or_else(|| mount_err(volume, unsupported(volume)))?
            .map_err(|e| mount_err(volume, e))?;
        if let Some(at) = payload.renew_at {
            self.renew_at = Some(self.renew_at.map_or(at, |r| r.min(at)));
        }
        let dir = self.root.join(&volume.name);
        let set_perms = |ts: &Path| match fs_group {
            Some(gid) => set_ownership(ts, gid, true),
            None => Ok(()),
        };
        let changed = atomic::write(&dir, &payload.files, Some(&set_perms))
            .map_err(|e| mount_err(volume, e))?;
        if let Some(gid) = fs_group {
            // The volume's own directory too, as the kubelet's ownership walk starts there.
            let _ = std::os::unix::fs::lchown(&dir, None, Some(gid));
            let _ = chmod_add(&dir, 0o2000 | 0o550);
        }
        Ok(changed)
    }

    /// Brings the projecting volumes up to date with their sources, at most every
    /// [`REFRESH_PERIOD`] (at once when a token is due). Returns the volumes that changed;
    /// a source gone missing leaves the files as they were (as the kubelet does) and is
    /// reported.
    pub async fn refresh(
        &mut self,
        inputs: &Inputs<'_>,
        pod: &Pod,
    ) -> (Vec<String>, Vec<MountError>) {
        let now = Instant::now();
        let token_due = self.renew_at.is_some_and(|at| now >= at);
        if !token_due && now < self.refreshed + REFRESH_PERIOD {
            return (Vec::new(), Vec::new());
        }
        self.refreshed = now;
        self.renew_at = None;
        let fs_group = fs_group(pod);
        let (mut changed, mut errors) = (Vec::new(), Vec::new());
        for volume in pod_volumes(pod) {
            let projecting = volume.config_map.is_some()
                || volume.secret.is_some()
                || volume.downward_api.is_some()
                || volume.projected.is_some();
            if !projecting || !self.paths.contains_key(&volume.name) {
                continue;
            }
            match self.project(inputs, pod, volume, fs_group).await {
                Ok(true) => changed.push(volume.name.clone()),
                Ok(false) => {}
                Err(e) => errors.push(e),
            }
        }
        (changed, errors)
    }

    /// The first on-disk `emptyDir` grown past its `sizeLimit`, as the kubelet's eviction
    /// manager words it (`Usage of EmptyDir volume "x" exceeds the limit "1Mi".`). Its
    /// usage is the bytes of its files (a tmpfs one is capped by its size instead).
    pub fn over_limit(&self, pod: &Pod) -> Option<String> {
        for volume in pod_volumes(pod) {
            let Some(empty) = &volume.empty_dir else {
                continue;
            };
            if empty.medium.as_deref() == Some("Memory") {
                continue;
            }
            let Some(limit) = empty.size_limit.as_ref() else {
                continue;
            };
            let Some(bytes) = orquestra_operator::quantity::bytes(&limit.0) else {
                continue;
            };
            let Some(dir) = self.paths.get(&volume.name) else {
                continue;
            };
            if disk_usage(dir) > bytes as u64 {
                return Some(format!(
                    "Usage of EmptyDir volume \"{}\" exceeds the limit \"{}\". ",
                    volume.name, limit.0
                ));
            }
        }
        None
    }

    /// Volume name → path on the node.
    pub fn paths(&self) -> &BTreeMap<String, PathBuf> {
        &self.paths
    }
}

/// The bytes of the files under `dir` (not following links).
fn disk_usage(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) if m.is_file() => m.blocks() * 512,
            _ => 0,
        })
        .sum()
}

fn pod_volumes(pod: &Pod) -> impl Iterator<Item = &Volume> {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
}

fn unsupported(volume: &Volume) -> String {
    format!(
        "unsupported volume type (this node supports emptyDir, hostPath, configMap, secret, downwardAPI, projected, persistentVolumeClaim, ephemeral and image) for volume {:?}",
        volume.name
    )
}

fn fs_group(pod: &Pod) -> Option<u32> {
    pod.spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group)
        .map(|g| g as u32)
}

/// Who owns a projected token (mode `0600`): the user every container runs as, when they
/// agree and the pod sets no `fsGroup` — the kubelet's rule, so a non-root process can read
/// its own token while no other user can.
fn token_owner(pod: &Pod) -> Option<u32> {
    let spec = pod.spec.as_ref()?;
    let psc = spec.security_context.as_ref();
    if psc.and_then(|s| s.fs_group).is_some() {
        return None;
    }
    let pod_user = psc.and_then(|s| s.run_as_user);
    let mut users = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| {
            c.security_context
                .as_ref()
                .and_then(|s| s.run_as_user)
                .or(pod_user)
        });
    let first = users.next()??;
    users.all(|u| u == Some(first)).then_some(first as u32)
}

/// Adds `bits` to the mode of `path`.
fn chmod_add(path: &Path, bits: u32) -> io::Result<()> {
    let mode = fs::symlink_metadata(path)?.permissions().mode();
    fs::set_permissions(path, fs::Permissions::from_mode((mode | bits) & 0o7777))
}

/// The kubelet's `SetVolumeOwnership`: everything under `dir` gets group `gid`, files
/// `g+r` (`g+rw` unless `read_only`), directories also `g+x` and set-gid so new files
/// inherit the group.
fn set_ownership(dir: &Path, gid: u32, read_only: bool) -> io::Result<()> {
    let mask = if read_only { 0o440 } else { 0o660 };
    let meta = fs::symlink_metadata(dir)?;
    std::os::unix::fs::lchown(dir, None, Some(gid))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        chmod_add(dir, mask | 0o2000 | 0o110)?;
        for entry in fs::read_dir(dir)? {
            set_ownership(&entry?.path(), gid, read_only)?;
        }
        Ok(())
    } else {
        chmod_add(dir, mask)
    }
}

/// An `emptyDir`: a world-writable directory (any user the containers run as may write
/// it), on a tmpfs for `medium: Memory`.
/// What a memory-backed `emptyDir` may hold at most (the kubelet's
/// `SizeMemoryBackedVolumes`): the pod's memory limit — the sum of its containers' when
/// every one has one — else the node's allocatable memory.
fn memory_limit(pod: &Pod, node: &crate::downward::Allocatable) -> i64 {
    let containers = pod.spec.iter().flat_map(|s| &s.containers);
    let limits: Option<Vec<i64>> = containers
        .map(|c| {
            c.resources
                .as_ref()
                .and_then(|r| r.limits.as_ref())
                .and_then(|l| l.get("memory"))
                .and_then(|q| orquestra_operator::quantity::bytes(&q.0))
        })
        .collect();
    match limits {
        Some(limits) if !limits.is_empty() => limits.iter().sum(),
        _ => node.memory,
    }
}

/// An `emptyDir`; `pod_memory` caps a memory-backed one whose `sizeLimit` is unset or
/// larger.
fn empty_dir(
    dir: &Path,
    source: &k8s_openapi::api::core::v1::EmptyDirVolumeSource,
    pod_memory: i64,
) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    match source.medium.as_deref().unwrap_or("") {
        "" => {}
        "Memory" => {
            if !crate::container::is_mountpoint(dir) {
                let mut options = String::from("mode=0777");
                let limit = source
                    .size_limit
                    .as_ref()
                    .and_then(|q| orquestra_operator::quantity::bytes(&q.0))
                    .filter(|s| *s > 0);
                let size = match limit {
                    Some(limit) if pod_memory > 0 => limit.min(pod_memory),
                    Some(limit) => limit,
                    None => pod_memory,
                };
                if size > 0 {
                    options.push_str(&format!(",size={size}"));
                }
                nix::mount::mount(
                    Some("tmpfs"),
                    dir,
                    Some("tmpfs"),
                    nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
                    Some(options.as_str()),
                )
                .map_err(io::Error::from)?;
            }
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("emptyDir medium {other:?} is not supported on this node"),
            ));
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o777))
}

/// A `hostPath`, checked (or created) by its `type` as the kubelet's host path checker does.
fn host_path(path: &str, type_: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::FileTypeExt;
    let p = PathBuf::from(path);
    let meta = fs::metadata(&p);
    let check = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(format!(
                "hostPath type check failed: {path} is not a {what}"
            ))
        }
    };
    match type_ {
        "" => {}
        "DirectoryOrCreate" => {
            if meta.is_err() {
                fs::create_dir_all(&p).map_err(|e| format!("creating {path}: {e}"))?;
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
                    .map_err(|e| format!("creating {path}: {e}"))?;
            } else {
                check(meta.as_ref().is_ok_and(|m| m.is_dir()), "directory")?;
            }
        }
        "FileOrCreate" => {
            if meta.is_err() {
                if let Some(parent) = p.parent() {
                    fs::create_dir_all(parent).map_err(|e| format!("creating {path}: {e}"))?;
                }
                fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)
                    .and_then(|_| fs::set_permissions(&p, fs::Permissions::from_mode(0o644)))
                    .map_err(|e| format!("creating {path}: {e}"))?;
            } else {
                check(meta.as_ref().is_ok_and(|m| m.is_file()), "file")?;
            }
        }
        "Directory" => check(meta.as_ref().is_ok_and(|m| m.is_dir()), "directory")?,
        "File" => check(meta.as_ref().is_ok_and(|m| m.is_file()), "file")?,
        "Socket" => check(
            meta.as_ref().is_ok_and(|m| m.file_type().is_socket()),
            "socket file",
        )?,
        "CharDevice" => check(
            meta.as_ref().is_ok_and(|m| m.file_type().is_char_device()),
            "character device",
        )?,
        "BlockDevice" => check(
            meta.as_ref().is_ok_and(|m| m.file_type().is_block_device()),
            "block device",
        )?,
        other => return Err(format!("unknown hostPath type {other:?}")),
    }
    Ok(p)
}

/// The node directory of the PersistentVolume bound to the volume's claim (for `ephemeral`
/// volumes, the claim `<pod>-<volume>`).
async fn persistent(
    inputs: &Inputs<'_>,
    pod: &Pod,
    volume: &Volume,
) -> Result<PathBuf, MountError> {
    let namespace = pod.namespace().unwrap_or_default();
    let claim_name = match &volume.persistent_volume_claim {
        Some(source) => source.claim_name.clone(),
        None => format!("{}-{}", pod.name_any(), volume.name),
    };
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(inputs.client.clone(), &namespace);
    let claim = match claims.get_opt(&claim_name).await {
        Ok(Some(claim)) => claim,
        Ok(None) => {
            return Err(mount_err(
                volume,
                format!("persistentvolumeclaim \"{claim_name}\" not found"),
            ));
        }
        Err(e) => return Err(mount_err(volume, e)),
    };
    if volume.ephemeral.is_some()
        && !claim
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == pod.metadata.uid.as_ref())
    {
        return Err(mount_err(
            volume,
            format!(
                "PVC {namespace}/{claim_name} was not created for pod {namespace}/{} (pod is not owner)",
                pod.name_any()
            ),
        ));
    }
    let bound = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.clone())
        .filter(|v| !v.is_empty())
        .filter(|_| claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound"));
    let Some(pv_name) = bound else {
        return Err(mount_err(
            volume,
            format!("persistentvolumeclaim \"{claim_name}\" is not bound"),
        ));
    };
    let pvs: Api<PersistentVolume> = Api::all(inputs.client.clone());
    let pv = match pvs.get_opt(&pv_name).await {
        Ok(Some(pv)) => pv,
        Ok(None) => {
            return Err(mount_err(
                volume,
                format!("persistentvolume \"{pv_name}\" not found"),
            ));
        }
        Err(e) => return Err(mount_err(volume, e)),
    };
    let spec = pv.spec.unwrap_or_default();
    if let Some(host) = &spec.host_path {
        host_path(
            &host.path,
            host.type_.as_deref().unwrap_or("DirectoryOrCreate"),
        )
        .map_err(|e| mount_err(volume, e))
    } else if let Some(local) = &spec.local {
        // A local volume's directory is the administrator's (or the provisioner's) to create.
        host_path(&local.path, "").map_err(|e| mount_err(volume, e))
    } else {
        Err(mount_err(
            volume,
            format!(
                "persistentvolume \"{pv_name}\" is neither hostPath nor local, which is all this node mounts"
            ),
        ))
    }
}

/// An `image` volume: the image's layers mounted read-only at `dir` (an overlay of them, or
/// the one layer bound).
fn image(dir: &Path, layers: &[PathBuf]) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    if crate::container::is_mountpoint(dir) {
        return Ok(());
    }
    use nix::mount::MsFlags;
    match layers {
        [] => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an image without layers",
        )),
        [one] => {
            nix::mount::mount(
                Some(one.as_path()),
                dir,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )?;
            nix::mount::mount(
                None::<&str>,
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None::<&str>,
            )
            .map_err(io::Error::from)
        }
        many => {
            let lower: Vec<String> = many.iter().rev().map(|l| l.display().to_string()).collect();
            let options = format!("lowerdir={}", lower.join(":"));
            nix::mount::mount(
                Some("overlay"),
                dir,
                Some("overlay"),
                MsFlags::MS_RDONLY,
                Some(options.as_str()),
            )
            .map_err(io::Error::from)
        }
    }
}

/// The container's bind mounts for its `volumeMounts`. `subPath` (or `subPathExpr`,
/// expanded with the container's environment `env`) must stay inside its volume once
/// symbolic links are followed; a missing one is created as a directory.
pub fn mounts(
    container: &Container,
    volumes: &BTreeMap<String, PathBuf>,
    env: &[(String, String)],
) -> Result<Vec<BindMount>, ConfigError> {
    let vars: BTreeMap<String, String> = env.iter().cloned().collect();
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let source = volumes.get(&m.name).ok_or_else(|| {
            ConfigError(format!(
                "volumeMount {:?} refers to a volume the pod does not declare",
                m.name
            ))
        })?;
        let source = match sub_path(m, &vars)? {
            Some(sub) => resolve_sub_path(source, &sub)?,
            None => source.clone(),
        };
        out.push(BindMount {
            source,
            destination: m.mount_path.clone(),
            read_only: m.read_only.unwrap_or(false),
        });
    }
    Ok(out)
}

/// The mount's `subPath`, or its `subPathExpr` expanded; refused when absolute or with a
/// `..` element.
fn sub_path(
    m: &VolumeMount,
    vars: &BTreeMap<String, String>,
) -> Result<Option<String>, ConfigError> {
    let sub = match (&m.sub_path, &m.sub_path_expr) {
        (Some(s), _) if !s.is_empty() => s.clone(),
        (_, Some(expr)) if !expr.is_empty() => crate::resolve::expand(expr, vars),
        _ => return Ok(None),
    };
    if sub.starts_with('/') {
        return Err(ConfigError(format!(
            "failed to prepare subPath for volumeMount {:?} of container: subpath {sub:?} must be a relative path",
            m.name
        )));
    }
    if sub.split('/').any(|p| p == "..") {
        return Err(ConfigError(format!(
            "failed to prepare subPath for volumeMount {:?} of container: subpath {sub:?} must not contain '..'",
            m.name
        )));
    }
    Ok(Some(sub))
}

/// `volume/sub` with every symbolic link resolved, refused if it leads outside `volume`;
/// created as a directory when missing (as the kubelet does).
fn resolve_sub_path(volume: &Path, sub: &str) -> Result<PathBuf, ConfigError> {
    let base = fs::canonicalize(volume)
        .map_err(|e| ConfigError(format!("volume {}: {e}", volume.display())))?;
    let path = base.join(sub);
    if fs::symlink_metadata(&path).is_err() {
        // Create it one component at a time, refusing to follow a link out of the volume.
        let mut current = base.clone();
        for part in Path::new(sub).components() {
            current.push(part);
            if fs::symlink_metadata(&current).is_err() {
                fs::create_dir(&current).map_err(|e| {
                    ConfigError(format!(
                        "subPath {sub:?}: creating {}: {e}",
                        current.display()
                    ))
                })?;
                fs::set_permissions(&current, fs::Permissions::from_mode(0o755)).ok();
            }
            let resolved = fs::canonicalize(&current)
                .map_err(|e| ConfigError(format!("subPath {sub:?}: {e}")))?;
            if !resolved.starts_with(&base) {
                return Err(escapes(sub, volume));
            }
            current = resolved;
        }
    }
    let resolved =
        fs::canonicalize(&path).map_err(|e| ConfigError(format!("subPath {sub:?}: {e}")))?;
    if !resolved.starts_with(&base) {
        return Err(escapes(sub, volume));
    }
    Ok(resolved)
}

fn escapes(sub: &str, volume: &Path) -> ConfigError {
    ConfigError(format!(
        "failed to prepare subPath: subpath {sub:?} not within volume path {:?}",
        volume.display().to_string()
    ))
}

/// Whether `dir`'s device is a tmpfs: what `stat -f` inside the container reports.
pub fn is_tmpfs(dir: &Path) -> bool {
    nix::sys::statfs::statfs(dir)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// The group owning `path` (for tests of `fsGroup`).
pub fn group_of(path: &Path) -> Option<u32> {
    fs::metadata(path).ok().map(|m| m.gid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_paths_stay_inside_their_volume() {
        let tmp = tempfile::tempdir().unwrap();
        let volume = tmp.path().join("vol");
        fs::create_dir_all(volume.join("inside")).unwrap();
        std::os::unix::fs::symlink("/etc", volume.join("out")).unwrap();
        std::os::unix::fs::symlink("inside", volume.join("in")).unwrap();
        assert!(
            resolve_sub_path(&volume, "inside")
                .unwrap()
                .ends_with("inside")
        );
        assert!(resolve_sub_path(&volume, "in").unwrap().ends_with("inside"));
        let made = resolve_sub_path(&volume, "new/deeper").unwrap();
        assert!(made.is_dir());
        let e = resolve_sub_path(&volume, "out").unwrap_err();
        assert!(e.0.contains("not within volume path"), "{e}");
        let e = resolve_sub_path(&volume, "out/passwd-dir").unwrap_err();
        assert!(e.0.contains("not within volume path"), "{e}");
        assert!(!Path::new("/etc/passwd-dir").exists());
    }

    #[test]
    fn sub_path_expressions_expand_and_are_checked() {
        let mount = |expr: &str| VolumeMount {
            name: "v".into(),
            mount_path: "/m".into(),
            sub_path_expr: Some(expr.into()),
            ..VolumeMount::default()
        };
        let vars: BTreeMap<String, String> = [
            ("A".to_owned(), "mypath".to_owned()),
            ("UP".to_owned(), "..".to_owned()),
            ("ABS".to_owned(), "/tmp".to_owned()),
        ]
        .into();
        assert_eq!(
            sub_path(&mount("$(A)/x"), &vars).unwrap().unwrap(),
            "mypath/x"
        );
        assert!(sub_path(&mount("$(UP)"), &vars).is_err());
        assert!(sub_path(&mount("$(ABS)"), &vars).is_err());
        assert!(sub_path(&mount("$(MISSING)/x"), &vars).is_ok());
        let empty: BTreeMap<String, String> = BTreeMap::new();
        // An unset variable expands to nothing only when defined; `$(X)` stays literal.
        assert_eq!(sub_path(&mount("$(X)"), &empty).unwrap().unwrap(), "$(X)");
    }

    #[test]
    fn host_path_types() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        let file = tmp.path().join("f");
        let path = |p: &Path| p.display().to_string();
        host_path(&path(&dir), "DirectoryOrCreate").unwrap();
        assert!(dir.is_dir());
        host_path(&path(&file), "FileOrCreate").unwrap();
        assert!(file.is_file());
        host_path(&path(&dir), "Directory").unwrap();
        host_path(&path(&file), "File").unwrap();
        assert!(host_path(&path(&file), "Directory").is_err());
        assert!(host_path(&path(&dir), "File").is_err());
        assert!(host_path(&path(&dir), "Socket").is_err());
        assert!(host_path(&path(&file), "DirectoryOrCreate").is_err());
        assert!(host_path(&path(&dir), "Bogus").is_err());
    }
}
