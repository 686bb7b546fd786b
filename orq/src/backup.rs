//! `orq backup` and `orq restore`: an online snapshot of a server's store and the secrets of
//! its data dir, in one tar archive, and a fresh data dir made from it.
//!
//! The store part is SQLite's online backup of `state.db` (a running server keeps writing;
//! the copy is one consistent snapshot) or an etcd snapshot through etcd's maintenance API.
//! The secrets — the CAs and their keys, the service account signing key, the admin and
//! node tokens — are what make the restored server the same cluster: the kubeconfigs,
//! agents and pods' tokens issued before still work. Not copied: the agent's state
//! (containers are the node's, not the cluster's), the kubeconfigs (written at start), the
//! server's Lease identity (a restored server is a new member).
//!
//! The archive: `orquestra-backup.json` (what it holds and the revision), `store/state.db`
//! or `store/etcd.db`, and `data/…` (the secrets, by their paths in the data dir).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use orquestra_store::Datastore;
use serde::{Deserialize, Serialize};

/// The manifest's name in the archive.
const MANIFEST: &str = "orquestra-backup.json";

/// Flags of `orq backup`.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The archive to write (must not exist).
    output: PathBuf,
    /// The server's data dir (its secrets, and its SQLite store unless `--datastore` names
    /// another).
    #[arg(long, env = "ORQ_DATA_DIR", default_value = "/var/lib/orquestra")]
    data_dir: PathBuf,
    /// The server's store, as `orq server --datastore` (default: `DATA_DIR/state.db`).
    #[arg(long, env = "ORQ_DATASTORE")]
    datastore: Option<String>,
}

/// Flags of `orq restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The archive `orq backup` wrote.
    input: PathBuf,
    /// The new data dir (must not exist, or be empty).
    #[arg(long)]
    data_dir: PathBuf,
    /// For an etcd backup: restore the snapshot into this new etcd data dir too (with
    /// `etcdutl snapshot restore`, or `etcdctl` before etcd 3.5), as a one-member cluster
    /// named `--etcd-name` at `--etcd-peer-url`; start etcd on it, then `orq server
    /// --datastore etcd://…`. Without it, only the data dir is restored.
    #[arg(long, value_name = "DIR")]
    etcd_data_dir: Option<PathBuf>,
    /// The restored etcd member's name.
    #[arg(long, default_value = "default", requires = "etcd_data_dir")]
    etcd_name: String,
    /// The restored etcd member's peer URL.
    #[arg(
        long,
        default_value = "http://localhost:2380",
        requires = "etcd_data_dir"
    )]
    etcd_peer_url: String,
}

/// What an archive holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    /// `sqlite` or `etcd`.
    datastore: String,
    /// The store's revision in the snapshot (at least).
    revision: i64,
    /// When it was taken (RFC 3339).
    created: String,
}

/// The data dir's files that are the cluster's identity, relative to it.
fn secrets(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(data_dir)
        .with_context(|| format!("reading the data dir {}", data_dir.display()))?
    {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let skip = name.starts_with("state.db")
            || name.ends_with(".lock")
            || name.ends_with("kubeconfig.yaml")
            || name == "server-id"
            || name == "agent";
        if skip {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_file() {
            files.push(PathBuf::from(&name));
        } else if kind.is_dir() && name == "tls" {
            for inner in std::fs::read_dir(entry.path())? {
                let inner = inner?;
                if inner.file_type()?.is_file() {
                    files.push(Path::new("tls").join(inner.file_name()));
                }
            }
        }
    }
    files.sort();
    Ok(files)
}

/// `orq backup`.
pub async fn backup(args: BackupArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.output.exists(),
        "{} already exists: a backup never overwrites",
        args.output.display()
    );
    let datastore: Datastore = args
        .datastore
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}", args.data_dir.join("state.db").display()))
        .parse()
        .context("--datastore")?;
    let staging = tempfile::Builder::new()
        .prefix(".orq-backup-")
        .tempdir_in(
            args.output
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        )
        .context("creating a staging dir beside the archive")?;
    let (kind, store_file, revision) = match &datastore {
        Datastore::Sqlite(path) => {
            anyhow::ensure!(path.exists(), "no store at {}", path.display());
            let to = staging.path().join("state.db");
            let revision = {
                let (from, to) = (path.clone(), to.clone());
                tokio::task::spawn_blocking(move || orquestra_store::sqlite::backup(&from, &to))
                    .await?
                    .with_context(|| format!("backing up {}", path.display()))?
            };
            ("sqlite", to, revision)
        }
        Datastore::Etcd(endpoints) => {
            let store = orquestra_store::etcd::EtcdStore::connect(endpoints, Default::default())
                .await
                .context("connecting to etcd")?;
            let to = staging.path().join("etcd.db");
            let revision = store
                .snapshot(&to)
                .await
                .context("taking an etcd snapshot")?;
            ("etcd", to, revision)
        }
    };
    let manifest = Manifest {
        datastore: kind.into(),
        revision,
        created: jiff::Timestamp::now().to_string(),
    };
    let secrets = secrets(&args.data_dir)?;
    anyhow::ensure!(
        secrets.iter().any(|s| s.starts_with("tls")) || secrets.iter().any(|s| s == "token"),
        "{} holds no server secrets (tls/, token): is it an orq server's data dir?",
        args.data_dir.display()
    );
    let partial = staging.path().join("archive.tar");
    {
        let file = std::fs::File::create(&partial)?;
        let mut tar = tar::Builder::new(file);
        let json = serde_json::to_vec_pretty(&manifest)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(json.len() as u64);
        header.set_mode(0o600);
        tar.append_data(&mut header, MANIFEST, json.as_slice())?;
        let name = store_file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("");
        tar.append_path_with_name(&store_file, Path::new("store").join(name))?;
        for secret in &secrets {
            tar.append_path_with_name(args.data_dir.join(secret), Path::new("data").join(secret))
                .with_context(|| format!("archiving {}", secret.display()))?;
        }
        tar.into_inner()?.sync_all()?;
    }
    // Atomic: the archive is complete or absent.
    std::fs::rename(&partial, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    println!(
        "backed up the {kind} store at revision {revision} and {} secrets to {}",
        secrets.len(),
        args.output.display()
    );
    Ok(())
}

/// `orq restore`.
pub async fn restore(args: RestoreArgs) -> anyhow::Result<()> {
    let empty = std::fs::read_dir(&args.data_dir).map_or(true, |mut d| d.next().is_none());
    anyhow::ensure!(
        empty,
        "{} is not empty: restore into a new data dir",
        args.data_dir.display()
    );
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".orq-restore-")
        .tempdir()
        .context("creating a staging dir")?;
    tar::Archive::new(file)
        .unpack(staging.path())
        .with_context(|| format!("{} is not an orq backup archive", args.input.display()))?;
    let manifest: Manifest = serde_json::from_slice(
        &std::fs::read(staging.path().join(MANIFEST))
            .with_context(|| format!("{} has no {MANIFEST}", args.input.display()))?,
    )
    .context("reading the backup's manifest")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(args.data_dir.join("tls"))?;
        std::fs::set_permissions(&args.data_dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let data = staging.path().join("data");
    for secret in secrets_in(&data)? {
        let to = args.data_dir.join(&secret);
        std::fs::copy(data.join(&secret), &to)
            .with_context(|| format!("restoring {}", to.display()))?;
    }
    match manifest.datastore.as_str() {
        "sqlite" => {
            let to = args.data_dir.join("state.db");
            std::fs::copy(staging.path().join("store/state.db"), &to)
                .with_context(|| format!("restoring {}", to.display()))?;
            // Opening it checks that it is a store of this schema, and reads its revision.
            let store = orquestra_store::sqlite::SqliteStore::open(&to, Default::default())
                .context("opening the restored store")?;
            use orquestra_store::Store as _;
            let revision = store.current_revision().await?;
            println!(
                "restored the SQLite store at revision {revision} (backed up at {}) into {}",
                manifest.revision,
                args.data_dir.display()
            );
        }
        "etcd" => {
            let snapshot = args.data_dir.join("etcd-snapshot.db");
            std::fs::copy(staging.path().join("store/etcd.db"), &snapshot)?;
            match &args.etcd_data_dir {
                Some(dir) => {
                    restore_etcd(&snapshot, dir, &args.etcd_name, &args.etcd_peer_url)?;
                    println!(
                        "restored the secrets into {} and the etcd snapshot (revision {}) into {}: start etcd there, then orq server --data-dir {} --datastore etcd://…",
                        args.data_dir.display(),
                        manifest.revision,
                        dir.display(),
                        args.data_dir.display()
                    );
                }
                None => println!(
                    "restored the secrets into {}; the etcd snapshot (revision {}) is {}: restore it with etcdutl snapshot restore (or pass --etcd-data-dir)",
                    args.data_dir.display(),
                    manifest.revision,
                    snapshot.display()
                ),
            }
        }
        other => anyhow::bail!("the backup's store is {other:?}, not sqlite or etcd"),
    }
    Ok(())
}

/// The files under the archive's `data/`, relative to it.
fn secrets_in(data: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    if !data.exists() {
        return Ok(files);
    }
    for entry in std::fs::read_dir(data)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            for inner in std::fs::read_dir(entry.path())? {
                files.push(Path::new(&entry.file_name()).join(inner?.file_name()));
            }
        } else {
            files.push(PathBuf::from(entry.file_name()));
        }
    }
    Ok(files)
}

/// `etcdutl snapshot restore` (etcd ≥ 3.5) or `etcdctl snapshot restore` (3.4) into `dir`.
fn restore_etcd(snapshot: &Path, dir: &Path, name: &str, peer_url: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !dir.exists(),
        "--etcd-data-dir {} exists: etcd restores into a new dir",
        dir.display()
    );
    let tool = ["etcdutl", "etcdctl"]
        .into_iter()
        .find(|tool| {
            std::process::Command::new(tool)
                .arg("version")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok()
        })
        .context("neither etcdutl nor etcdctl is installed (both come with etcd)")?;
    let output = std::process::Command::new(tool)
        .env("ETCDCTL_API", "3")
        .arg("snapshot")
        .arg("restore")
        .arg(snapshot)
        .arg("--data-dir")
        .arg(dir)
        .arg("--name")
        .arg(name)
        .arg("--initial-cluster")
        .arg(format!("{name}={peer_url}"))
        .arg("--initial-advertise-peer-urls")
        .arg(peer_url)
        .output()
        .with_context(|| format!("running {tool}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{tool} snapshot restore failed: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}
