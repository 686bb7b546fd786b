//! Datastore URLs: how a deployment names its backend.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::etcd::{EtcdOptions, EtcdStore};
use crate::sqlite::{SqliteOptions, SqliteStore};
use crate::store::Store;

/// A parsed datastore URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datastore {
    /// `sqlite:///abs/path/state.db` (or `sqlite://relative/path.db`): the embedded store.
    Sqlite(PathBuf),
    /// `etcd://host:port[,host:port…]`: an etcd cluster, reached over plain HTTP/2.
    Etcd(Vec<String>),
}

impl std::str::FromStr for Datastore {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        let invalid = |why: &str| Error::InvalidArgument {
            message: format!(
                "datastore URL {url:?}: {why} (expected sqlite:///path/to/state.db or etcd://host:port[,host:port…])"
            ),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| invalid("missing scheme"))?;
        match scheme {
            "sqlite" => {
                if rest.is_empty() {
                    return Err(invalid("missing file path"));
                }
                Ok(Datastore::Sqlite(PathBuf::from(rest)))
            }
            "etcd" | "http" => {
                let endpoints: Vec<String> = rest
                    .trim_end_matches('/')
                    .split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_owned)
                    .collect();
                if endpoints.is_empty() {
                    return Err(invalid("no endpoints"));
                }
                for endpoint in &endpoints {
                    let (host, port) = endpoint
                        .rsplit_once(':')
                        .ok_or_else(|| invalid("every endpoint needs host:port"))?;
                    if host.is_empty() || port.parse::<u16>().is_err() {
                        return Err(invalid("every endpoint needs host:port"));
                    }
                }
                Ok(Datastore::Etcd(endpoints))
            }
            other => Err(invalid(&format!("unknown scheme {other:?}"))),
        }
    }
}

impl fmt::Display for Datastore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Datastore::Sqlite(path) => write!(f, "sqlite://{}", path.display()),
            Datastore::Etcd(endpoints) => write!(f, "etcd://{}", endpoints.join(",")),
        }
    }
}

/// Opens the store a datastore URL names, with default options.
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    Ok(match url.parse()? {
        Datastore::Sqlite(path) => Arc::new(SqliteStore::open(&path, SqliteOptions::default())?),
        Datastore::Etcd(endpoints) => {
            Arc::new(EtcdStore::connect(&endpoints, EtcdOptions::default()).await?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes() {
        assert_eq!(
            "sqlite:///var/lib/orquestra/state.db"
                .parse::<Datastore>()
                .unwrap(),
            Datastore::Sqlite("/var/lib/orquestra/state.db".into())
        );
        assert_eq!(
            "etcd://127.0.0.1:2379,127.0.0.1:22379"
                .parse::<Datastore>()
                .unwrap(),
            Datastore::Etcd(vec!["127.0.0.1:2379".into(), "127.0.0.1:22379".into()])
        );
    }

    #[test]
    fn rejects_malformed_urls() {
        for bad in [
            "",
            "state.db",
            "mysql://x",
            "sqlite://",
            "etcd://",
            "etcd://host",
            "etcd://h:99999",
        ] {
            let err = bad.parse::<Datastore>().unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{bad}: {err}");
        }
    }
}
