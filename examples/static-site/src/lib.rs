//! `StaticSite`: the example controller a newcomer copies (see docs/writing-controllers.md).
//!
//! A StaticSite holds a page; its controller serves it: a ConfigMap with the page, a
//! Deployment of a web server mounting it, and a Service in front — all owned by the
//! StaticSite, written with server-side apply under one field manager. A finalizer removes
//! them when the StaticSite is deleted; the status carries a `Ready` condition and the
//! controller reports what it did as events.
//!
//! What the API server checks before a StaticSite is stored comes two ways: a CEL rule in the
//! CRD's schema (a site that runs needs content: checked by the API server alone), and a
//! validating webhook this crate serves ([`webhooks`]: the web server image must be pinned).

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::{Client, CustomResource, KubeSchema, Resource, ResourceExt};
use orquestra_operator::conditions;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The field manager every write of this controller uses.
pub const MANAGER: &str = "static-site-controller";

/// The finalizer that holds a StaticSite until its children are gone.
pub const FINALIZER: &str = "staticsites.example.orquestra.dev/cleanup";

/// What a StaticSite asks for.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "example.orquestra.dev",
    version = "v1",
    kind = "StaticSite",
    namespaced,
    status = "StaticSiteStatus",
    shortname = "site",
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Replicas","type":"integer","jsonPath":".spec.replicas"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.replicas == 0 || size(self.content) > 0")
    .message("a site with replicas needs content"))]
pub struct StaticSiteSpec {
    /// The page to serve, as HTML.
    pub content: String,
    /// How many web servers.
    #[serde(default = "one")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: i32,
    /// The web server image.
    #[serde(default = "nginx")]
    pub image: String,
}

fn one() -> i32 {
    1
}

fn nginx() -> String {
    "nginx:1.27".into()
}

/// What the controller observed.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StaticSiteStatus {
    /// `Ready`: the Deployment has all its replicas available.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API request failed.
    #[error(transparent)]
    Kube(#[from] kube::Error),
    /// The finalizer machinery failed.
    #[error(transparent)]
    Finalizer(#[from] Box<kube::runtime::finalizer::Error<Error>>),
    /// The object has no namespace (it is namespaced: never happens through the API).
    #[error("StaticSite without a namespace")]
    NoNamespace,
}

/// What every reconcile gets.
#[derive(Clone)]
pub struct Context {
    /// The client.
    pub client: Client,
    /// Publishes events about StaticSites.
    pub recorder: Recorder,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `client`, reporting events as this controller.
    pub fn new(client: Client) -> Context {
        let reporter = Reporter {
            controller: MANAGER.into(),
            instance: None,
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
        }
    }
}

/// Reconciles one StaticSite: level-based, so it may run any number of times.
pub async fn reconcile(site: Arc<StaticSite>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = site.namespace().ok_or(Error::NoNamespace)?;
    let sites: Api<StaticSite> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&sites, FINALIZER, site, |event| async {
        match event {
            Finalizer::Apply(site) => apply(&site, &ctx).await,
            Finalizer::Cleanup(site) => cleanup(&site, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

fn labels(site: &StaticSite) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "static-site".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), site.name_any()),
    ])
}

/// Makes the children match the StaticSite, then records what was observed.
async fn apply(site: &StaticSite, ctx: &Context) -> Result<Action, Error> {
    let ns = site.namespace().ok_or(Error::NoNamespace)?;
    let name = site.name_any();
    let owner = site
        .controller_owner_ref(&())
        .map(|o| vec![o])
        .unwrap_or_default();
    let ssa = PatchParams::apply(MANAGER).force();
    let labels = labels(site);

    let page = json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": format!("{name}-content"), "labels": labels, "ownerReferences": owner},
        "data": {"index.html": site.spec.content},
    });
    Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
        .patch(&format!("{name}-content"), &ssa, &Patch::Apply(page))
        .await?;

    let deployment = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": labels, "ownerReferences": owner},
        "spec": {
            "replicas": site.spec.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "web", "image": site.spec.image,
                        "ports": [{"containerPort": 80, "name": "http"}],
                        "volumeMounts": [{"name": "content", "mountPath": "/usr/share/nginx/html"}],
                    }],
                    "volumes": [{"name": "content", "configMap": {"name": format!("{name}-content")}}],
                }
            }
        }
    });
    let deployment = Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &ssa, &Patch::Apply(deployment))
        .await?;

    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels, "ownerReferences": owner},
        "spec": {"selector": labels, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    });
    Api::<Service>::namespaced(ctx.client.clone(), &ns)
        .patch(&name, &ssa, &Patch::Apply(service))
        .await?;

    // Ready once every replica is available.
    let available = deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .unwrap_or(0);
    let ready = available >= site.spec.replicas;
    let mut conditions = site
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    let (reason, message) = if ready {
        (
            "Available",
            format!("{available} of {} replicas available", site.spec.replicas),
        )
    } else {
        (
            "Progressing",
            format!("{available} of {} replicas available", site.spec.replicas),
        )
    };
    let changed = conditions::set(
        &mut conditions,
        "Ready",
        ready,
        reason,
        message,
        site.metadata.generation,
    );
    if changed {
        let status = json!({
            "apiVersion": "example.orquestra.dev/v1", "kind": "StaticSite",
            "status": {"conditions": conditions},
        });
        Api::<StaticSite>::namespaced(ctx.client.clone(), &ns)
            .patch_status(&name, &ssa, &Patch::Apply(status))
            .await?;
        ctx.recorder
            .publish(
                &Event {
                    type_: EventType::Normal,
                    reason: "Reconciled".into(),
                    note: Some(format!("Ready={ready} ({reason})")),
                    action: "Apply".into(),
                    secondary: None,
                },
                &site.object_ref(&()),
            )
            .await?;
    }
    // Look again in a while: the Deployment's availability changes without a StaticSite
    // event (until the controller also watches its Deployments).
    Ok(Action::requeue(std::time::Duration::from_secs(30)))
}

/// Removes the children, so the StaticSite can go.
async fn cleanup(site: &StaticSite, ctx: &Context) -> Result<Action, Error> {
    let ns = site.namespace().ok_or(Error::NoNamespace)?;
    let name = site.name_any();
    let gone = |result: Result<_, kube::Error>| match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    };
    let dp = DeleteParams::default();
    gone(
        Api::<Service>::namespaced(ctx.client.clone(), &ns)
            .delete(&name, &dp)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .delete(&name, &dp)
            .await
            .map(|_| ()),
    )?;
    gone(
        Api::<ConfigMap>::namespaced(ctx.client.clone(), &ns)
            .delete(&format!("{name}-content"), &dp)
            .await
            .map(|_| ()),
    )?;
    ctx.recorder
        .publish(
            &Event {
                type_: EventType::Normal,
                reason: "Deleted".into(),
                note: Some("removed the ConfigMap, Deployment and Service".into()),
                action: "Cleanup".into(),
                secondary: None,
            },
            &site.object_ref(&()),
        )
        .await?;
    Ok(Action::await_change())
}

/// The CustomResourceDefinition of StaticSite, as `orq crdgen` writes it into `crds/`.
pub fn crd()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use kube::CustomResourceExt;
    StaticSite::crd()
}

/// The admission webhook the controller serves: refuses a StaticSite whose image is not
/// pinned (see [`pinned_image`]). Serve it with [`orquestra_operator::webhook`]; the harness's
/// `TestApi::serve_webhooks` registers it with an in-process API server.
pub fn webhooks() -> orquestra_operator::webhook::WebhookServer {
    use orquestra_operator::webhook::{Operation, WebhookServer};
    WebhookServer::new("example.orquestra.dev")
        .validate(&[Operation::Create, Operation::Update], pinned_image)
}

/// A site's web server must not change under it: its image needs a tag other than `latest`,
/// or a digest. (A rule a CEL expression could say too; here to show a webhook.)
pub fn pinned_image(
    request: &orquestra_operator::webhook::Request<StaticSite>,
) -> orquestra_operator::webhook::Response<StaticSite> {
    use orquestra_operator::webhook::Response;
    let Some(site) = request.object.as_ref() else {
        return Response::allow();
    };
    let image = &site.spec.image;
    let name = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') || name.split_once(':').is_some_and(|(_, tag)| tag != "latest") {
        Response::allow()
    } else {
        Response::deny(format!(
            "spec.image {image:?} is not pinned: name a tag other than latest, or a digest"
        ))
    }
}

/// What [`controller`]'s requests need (see [`orquestra_operator::rbac`]). Server-side
/// apply needs `create` too when it creates the object.
pub const RULES: &[orquestra_operator::rbac::Rule] = {
    use orquestra_operator::rbac::Rule;
    const OWN: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];
    &[
        Rule {
            api_groups: &["example.orquestra.dev"],
            resources: &["staticsites"],
            verbs: &["get", "list", "watch", "patch", "update"],
        },
        Rule {
            api_groups: &["example.orquestra.dev"],
            resources: &["staticsites/status"],
            verbs: &["patch"],
        },
        Rule {
            api_groups: &[""],
            resources: &["configmaps", "services"],
            verbs: OWN,
        },
        Rule {
            api_groups: &["apps"],
            resources: &["deployments"],
            verbs: OWN,
        },
        Rule {
            api_groups: &["events.k8s.io"],
            resources: &["events"],
            verbs: &["create", "patch"],
        },
    ]
};

/// Wires the controller into `manager`: shared caches of StaticSites and of the Deployments
/// they own (a Deployment's change reconciles its StaticSite). `None` if the manager is
/// already running (caches can only be subscribed before).
pub fn controller(manager: &mut orquestra_operator::Manager) -> Option<()> {
    use k8s_openapi::api::apps::v1::Deployment as D;
    use kube::runtime::watcher;
    let sites = manager.cache::<StaticSite>(watcher::Config::default());
    let deployments = manager.cache::<D>(watcher::Config::default());
    let runner =
        orquestra_operator::Runner::for_cache("static-site", &sites)?.owns(&deployments)?;
    let context = Arc::new(Context::new(manager.client()));
    manager.add(runner, reconcile, context);
    Some(())
}
