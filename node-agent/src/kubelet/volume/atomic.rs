//! Atomic projection of a set of files into a directory, as the kubelet's `AtomicWriter`
//! does it, so a process in the pod never sees half an update:
//!
//! ```text
//! <dir>/..2026_12_03_11_00_00.8Xk2Qa/   the files, written in full first
//! <dir>/..data -> ..2026_12_03_11_00_00.8Xk2Qa   swapped by one rename(2)
//! <dir>/<key>  -> ..data/<key>          the visible names (first path component)
//! ```
//!
//! A new payload goes into a new timestamped directory; a `..data_tmp` symlink to it is
//! renamed over `..data`; then visible links are added for new names, links for names that
//! went away removed, and the old directory deleted. Programs that watch `..data` (inotify)
//! see one change. A payload equal to what is there writes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

/// The symlink naming the current data directory.
pub const DATA_DIR: &str = "..data";
const NEW_DATA_DIR: &str = "..data_tmp";

/// One file to project: its contents, mode and (for tokens) owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileProjection {
    /// The contents.
    pub data: Vec<u8>,
    /// Its permission bits.
    pub mode: u32,
    /// Its owner, when it must be readable by a non-root user with a `0600` mode (projected
    /// service account tokens with `runAsUser`).
    pub owner: Option<u32>,
}

/// A path in a payload that is not a plain relative path.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// A key or item path the volume cannot hold.
    #[error("invalid path {path:?}: {reason}")]
    InvalidPath {
        /// The path as given.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The file system refused.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Checks a payload path as the kubelet does: relative, no `..` element, not starting with
/// `..` (reserved for the writer), names at most 255 bytes.
pub fn validate_path(path: &str) -> Result<(), WriteError> {
    let invalid = |reason| {
        Err(WriteError::InvalidPath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.is_empty() {
        return invalid("must not be empty");
    }
    if path.starts_with('/') {
        return invalid("must be a relative path");
    }
    if path.len() > 4096 {
        return invalid("must be at most 4096 characters");
    }
    let items: Vec<&str> = path.split('/').collect();
    if items.contains(&"..") {
        return invalid("must not contain '..'");
    }
    if items.iter().any(|i| i.len() > 255) {
        return invalid("file names must be at most 255 characters");
    }
    if items[0].starts_with("..") && items[0].len() > 2 {
        return invalid("must not start with '..'");
    }
    Ok(())
}

/// `a/./b//c` → `a/b/c`.
fn clean(path: &str) -> String {
    Path::new(path)
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Runs on a new data directory before it becomes visible.
pub type SetPerms<'a> = &'a dyn Fn(&Path) -> io::Result<()>;

/// Projects `payload` (relative path → file) into `dir`, which is created if missing.
/// Returns whether anything changed on disk. `set_perms` runs on the new data directory
/// before it becomes visible (the volume's fsGroup ownership).
pub fn write(
    dir: &Path,
    payload: &BTreeMap<String, FileProjection>,
    set_perms: Option<SetPerms<'_>>,
) -> Result<bool, WriteError> {
    let mut clean_payload = BTreeMap::new();
    for (path, file) in payload {
        validate_path(path)?;
        clean_payload.insert(clean(path), file);
    }
    fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    let data_link = dir.join(DATA_DIR);
    let old = fs::read_link(&data_link).ok();
    let (changed, stale) = match &old {
        Some(old) => {
            let old_dir = dir.join(old);
            let stale = stale_paths(&clean_payload, &old_dir);
            let differs = clean_payload.iter().any(|(path, file)| {
                fs::read(old_dir.join(path)).map_or(true, |on_disk| on_disk != file.data)
            });
            (differs || !stale.is_empty(), stale)
        }
        None => (true, BTreeSet::new()),
    };
    if changed {
        let ts_dir = new_timestamp_dir(dir)?;
        let result = write_payload(&ts_dir, &clean_payload).and_then(|()| {
            if let Some(set_perms) = set_perms {
                set_perms(&ts_dir).map_err(io_err("setting ownership of", &ts_dir))?;
            }
            let tmp = dir.join(NEW_DATA_DIR);
            let _ = fs::remove_file(&tmp);
            let name = ts_dir.file_name().unwrap_or_default();
            symlink(name, &tmp).map_err(io_err("linking", &tmp))?;
            fs::rename(&tmp, &data_link).map_err(|e| {
                let _ = fs::remove_file(&tmp);
                WriteError::Io {
                    what: "renaming the data link",
                    path: data_link.clone(),
                    source: e,
                }
            })
        });
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&ts_dir);
            return Err(e);
        }
    }
    // The visible names: a link per first path component.
    for (path, file) in &clean_payload {
        let first = path.split('/').next().unwrap_or(path);
        let visible = dir.join(first);
        if fs::symlink_metadata(&visible).is_err() {
            symlink(Path::new(DATA_DIR).join(first), &visible)
                .map_err(io_err("linking", &visible))?;
            if let Some(owner) = file.owner {
                let _ = std::os::unix::fs::lchown(&visible, Some(owner), None);
            }
        }
    }
    for path in stale.iter().filter(|p| !p.contains('/')) {
        let visible = dir.join(path);
        fs::remove_file(&visible).map_err(io_err("removing", &visible))?;
    }
    if changed && let Some(old) = old {
        let old_dir = dir.join(old);
        fs::remove_dir_all(&old_dir).map_err(io_err("removing", &old_dir))?;
    }
    Ok(changed)
}

/// The paths under `old_dir` (files and directories) that the new payload no longer has.
fn stale_paths(payload: &BTreeMap<String, &FileProjection>, old_dir: &Path) -> BTreeSet<String> {
    let mut existing = BTreeSet::new();
    walk(old_dir, "", &mut existing);
    let mut wanted = BTreeSet::new();
    for path in payload.keys() {
        let mut prefix = String::new();
        for part in path.split('/') {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            wanted.insert(prefix.clone());
        }
    }
    existing.difference(&wanted).cloned().collect()
}

fn walk(dir: &Path, prefix: &str, out: &mut BTreeSet<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            walk(&entry.path(), &relative, out);
        }
        out.insert(relative);
    }
}

fn new_timestamp_dir(dir: &Path) -> Result<PathBuf, WriteError> {
    let prefix = jiff::Timestamp::now()
        .strftime("..%Y_%m_%d_%H_%M_%S.")
        .to_string();
    let ts = tempfile::Builder::new()
        .prefix(&prefix)
        .rand_bytes(9)
        .tempdir_in(dir)
        .map_err(io_err("creating a data directory in", dir))?
        .keep();
    fs::set_permissions(&ts, fs::Permissions::from_mode(0o755))
        .map_err(io_err("setting the mode of", &ts))?;
    Ok(ts)
}

fn write_payload(
    dir: &Path,
    payload: &BTreeMap<String, &FileProjection>,
) -> Result<(), WriteError> {
    for (path, file) in payload {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        fs::write(&full, &file.data).map_err(io_err("writing", &full))?;
        fs::set_permissions(&full, fs::Permissions::from_mode(file.mode & 0o7777))
            .map_err(io_err("setting the mode of", &full))?;
        if let Some(owner) = file.owner {
            std::os::unix::fs::lchown(&full, Some(owner), None)
                .map_err(io_err("setting the owner of", &full))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(data: &str, mode: u32) -> FileProjection {
        FileProjection {
            data: data.as_bytes().to_vec(),
            mode,
            owner: None,
        }
    }

    #[test]
    fn writes_swaps_and_prunes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("vol");
        let mut payload = BTreeMap::new();
        payload.insert("a".to_owned(), file("1", 0o644));
        payload.insert("sub/b".to_owned(), file("2", 0o400));
        assert!(write(&dir, &payload, None).unwrap());
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "1");
        assert_eq!(fs::read_to_string(dir.join("sub/b")).unwrap(), "2");
        assert_eq!(fs::read_link(dir.join("a")).unwrap(), Path::new("..data/a"));
        let mode = fs::metadata(dir.join("sub/b"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o400);
        let first = fs::read_link(dir.join(DATA_DIR)).unwrap();

        // The same payload writes nothing.
        assert!(!write(&dir, &payload, None).unwrap());
        assert_eq!(fs::read_link(dir.join(DATA_DIR)).unwrap(), first);

        // A change swaps the data directory; a dropped key loses its link.
        payload.insert("a".to_owned(), file("changed", 0o644));
        payload.remove("sub/b");
        assert!(write(&dir, &payload, None).unwrap());
        assert_eq!(fs::read_to_string(dir.join("a")).unwrap(), "changed");
        assert!(fs::symlink_metadata(dir.join("sub")).is_err());
        assert!(
            !dir.join(&first).exists(),
            "the old data directory is removed"
        );
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}"); // a, ..data, the timestamped directory
    }

    #[test]
    fn refuses_paths_outside_the_volume() {
        for bad in ["", "/abs", "../x", "a/../../x", "..hidden", "..", "..."] {
            let e = validate_path(bad).unwrap_err();
            assert!(matches!(e, WriteError::InvalidPath { .. }), "{bad}: {e}");
        }
        for good in ["a", "a/b", "a..b", ".x"] {
            validate_path(good).unwrap();
        }
    }
}
