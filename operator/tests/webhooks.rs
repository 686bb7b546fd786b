//! The framework's conversion handlers through the real API server (the test harness): a
//! custom resource in two Rust types of different shape, `v1` stored, converted by typed
//! functions the framework serves; written as either, read as both.

#![allow(clippy::unwrap_used)]

use kube::api::{Api, PostParams};
use kube::{CustomResource, CustomResourceExt};
use orquestra_operator::testing::TestApi;
use orquestra_operator::webhook::{WebhookServer, conversion};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod v1 {
    use super::*;

    /// v1: one `host:port` string.
    #[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
    #[kube(
        group = "example.orquestra.dev",
        version = "v1",
        kind = "Backend",
        namespaced
    )]
    #[serde(rename_all = "camelCase")]
    pub struct BackendSpec {
        pub host_port: String,
    }
}

mod v2 {
    use super::*;

    /// v2: host and port apart.
    #[derive(CustomResource, Deserialize, Serialize, Clone, Debug, JsonSchema)]
    #[kube(
        group = "example.orquestra.dev",
        version = "v2",
        kind = "Backend",
        namespaced
    )]
    pub struct BackendSpec {
        pub host: String,
        pub port: u16,
    }
}

fn up(old: v1::Backend) -> v2::Backend {
    let (host, port) = old.spec.host_port.split_once(':').unwrap_or(("", "0"));
    let mut new = v2::Backend::new(
        "",
        v2::BackendSpec {
            host: host.into(),
            port: port.parse().unwrap_or(0),
        },
    );
    new.metadata = old.metadata;
    new
}

fn down(new: v2::Backend) -> v1::Backend {
    let mut old = v1::Backend::new(
        "",
        v1::BackendSpec {
            host_port: format!("{}:{}", new.spec.host, new.spec.port),
        },
    );
    old.metadata = new.metadata;
    old
}

#[tokio::test]
async fn typed_conversion_handlers_serve_a_crd_in_two_versions() {
    let api = TestApi::start().await.unwrap();
    let webhooks =
        WebhookServer::new("example.orquestra.dev").convert::<v1::Backend, v2::Backend>(up, down);
    let served = api.serve_webhooks("backends", webhooks).await.unwrap();

    // One CRD serving both, v1 stored, converted by the handlers.
    let mut crd = v1::Backend::crd();
    let mut second = v2::Backend::crd().spec.versions.remove(0);
    second.storage = false;
    crd.spec.versions.push(second);
    crd.spec.conversion = Some(conversion::<v1::Backend>(&served.client));
    api.apply_crd(crd).await.unwrap();

    let old: Api<v1::Backend> = Api::namespaced(api.client(), "default");
    let new: Api<v2::Backend> = Api::namespaced(api.client(), "default");
    let pp = PostParams::default();
    old.create(
        &pp,
        &v1::Backend::new(
            "db",
            v1::BackendSpec {
                host_port: "db.internal:5432".into(),
            },
        ),
    )
    .await
    .unwrap();
    let read = new.get("db").await.unwrap();
    assert_eq!(
        (read.spec.host.as_str(), read.spec.port),
        ("db.internal", 5432)
    );

    new.create(
        &pp,
        &v2::Backend::new(
            "cache",
            v2::BackendSpec {
                host: "cache".into(),
                port: 6379,
            },
        ),
    )
    .await
    .unwrap();
    let read = old.get("cache").await.unwrap();
    assert_eq!(read.spec.host_port, "cache:6379");
    let listed = new.list(&Default::default()).await.unwrap();
    let mut ports: Vec<u16> = listed.items.iter().map(|b| b.spec.port).collect();
    ports.sort();
    assert_eq!(ports, [5432, 6379]);
}
