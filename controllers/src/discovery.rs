//! API discovery for the controllers that act on every kind (garbage collection, namespace
//! deletion).

use kube::{Client, Discovery};

/// Every served group and resource: from aggregated discovery (two requests, one consistent
/// snapshot, so a CRD deleted meanwhile cannot fail it half-way), or group by group from a
/// server without it (Kubernetes before 1.26).
pub async fn discover(client: &Client) -> Result<Discovery, kube::Error> {
    match Discovery::new(client.clone()).run_aggregated().await {
        Ok(discovery) => Ok(discovery),
        Err(error) => {
            tracing::debug!(%error, "aggregated discovery failed; discovering group by group");
            Discovery::new(client.clone()).run().await
        }
    }
}
