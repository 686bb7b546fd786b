//! `orq image`: the node's image store without a registry or a running agent — import an
//! OCI layout or archive, list, remove, and pull with a progress display.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use orquestra_node_agent::image::{ImageStore, Progress, RegistryAuth};

/// Flags of `orq image`.
#[derive(Debug, Args)]
pub struct ImageArgs {
    #[command(subcommand)]
    command: ImageCommand,
    /// The agent's data dir, whose `images/` is the store (`orq server`'s local agent uses
    /// DATA_DIR/agent).
    #[arg(
        long = "agent-data-dir",
        env = "ORQ_AGENT_DATA_DIR",
        default_value = "/var/lib/orquestra/agent",
        global = true
    )]
    data_dir: PathBuf,
    /// A registry (`host[:port]`) to pull from over plain HTTP (repeatable).
    #[arg(long = "insecure-registry", value_name = "HOST[:PORT]", global = true)]
    insecure_registries: Vec<String>,
    /// A registry mirror, `REGISTRY=ENDPOINT` (repeatable), asked before the registry.
    #[arg(
        long = "registry-mirror",
        value_name = "REGISTRY=ENDPOINT",
        global = true
    )]
    registry_mirrors: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// Import the images of an OCI image layout (a directory, or a tar/tar.gz of one).
    Import {
        /// The layout or archive.
        path: PathBuf,
        /// The repository to file images under when the layout names them only by tag
        /// (e.g. `example.com/web` with tag `v1` → `example.com/web:v1`).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the images in the store.
    Ls,
    /// Remove an image (and the layers no other image uses).
    Rm {
        /// The image reference.
        reference: String,
    },
    /// Pull an image from its registry (loopback registries over plain HTTP).
    Pull {
        /// The image reference.
        reference: String,
        /// Registry user (with `--password`).
        #[arg(long, requires = "password")]
        username: Option<String>,
        /// Registry password.
        #[arg(long, env = "ORQ_REGISTRY_PASSWORD", requires = "username")]
        password: Option<String>,
    },
}

/// Runs an `orq image` command.
pub async fn run(args: ImageArgs) -> anyhow::Result<()> {
    let root = args.data_dir.join("images");
    let store = ImageStore::open(&root)
        .with_context(|| format!("opening the image store {}", root.display()))?
        .with_insecure_registries(args.insecure_registries)
        .with_mirrors(&args.registry_mirrors)?;
    match args.command {
        ImageCommand::Import { path, name } => {
            let images = store
                .import(&path, name.as_deref())
                .with_context(|| format!("importing {}", path.display()))?;
            for image in images {
                println!("imported {} ({})", image.reference, image.digest);
            }
        }
        ImageCommand::Ls => {
            let images = store.list()?;
            println!("{:<60} {:<20} {:>10}", "REFERENCE", "DIGEST", "SIZE");
            for image in images {
                let digest = image.digest.trim_start_matches("sha256:");
                println!(
                    "{:<60} {:<20} {:>10}",
                    image.reference,
                    format!("sha256:{}", &digest[..digest.len().min(12)]),
                    human(image.size)
                );
            }
        }
        ImageCommand::Rm { reference } => {
            if !store.remove(&reference)? {
                anyhow::bail!("image {reference} is not in the store (see `orq image ls`)");
            }
            println!("removed {reference}");
        }
        ImageCommand::Pull {
            reference,
            username,
            password,
        } => {
            let auth = match (username, password) {
                (Some(u), Some(p)) => RegistryAuth::Basic(u, p),
                _ => RegistryAuth::Anonymous,
            };
            let bar = ProgressBar::default();
            let image = store
                .pull(&reference, &auth, &|p| bar.update(p))
                .await
                .with_context(|| format!("pulling {reference}"))?;
            bar.finish();
            println!("pulled {} ({})", image.reference, image.digest);
        }
    }
    Ok(())
}

/// A one-line progress display on stderr (redrawn in place on a terminal, a line per
/// layer otherwise).
#[derive(Debug, Default)]
struct ProgressBar {
    state: std::sync::Mutex<(usize, usize, u64, u64)>,
}

impl ProgressBar {
    fn update(&self, progress: Progress) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match progress {
            Progress::Resolved { layers, bytes, .. } => *state = (0, layers, 0, bytes),
            Progress::Layer { bytes, .. } => {
                state.0 += 1;
                state.2 += bytes;
            }
        }
        let (done, total, got, size) = *state;
        let width = 30;
        let filled = (done * width)
            .checked_div(total)
            .unwrap_or(width)
            .min(width);
        let line = format!(
            "[{}{}] {done}/{total} layers, {} / {}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            human(got),
            human(size)
        );
        let mut err = std::io::stderr();
        if err.is_terminal() {
            let _ = write!(err, "\r{line}");
        } else {
            let _ = writeln!(err, "{line}");
        }
        let _ = err.flush();
    }

    fn finish(&self) {
        if std::io::stderr().is_terminal() {
            eprintln!();
        }
    }
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", units[unit])
}
