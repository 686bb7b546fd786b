//! Service account tokens and RBAC against the real server, in-process, over HTTPS with the
//! authentication and authorization `orq server` uses: a TokenRequest's token authenticates a kube-rs client
//! configured as an in-cluster one is (the cluster CA and the bearer token); tokens signed by
//! another key, expired, or bound to a pod that is gone do not; a ServiceAccount that does
//! not exist gets no token. Under RBAC a ServiceAccount may do what its bindings allow and
//! no more; the node token does what an agent does; the bootstrap roles come back at start.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use base64::Engine as _;
use k8s_openapi::api::authentication::v1::{
    BoundObjectReference, TokenRequest, TokenRequestSpec, TokenReview,
};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use orquestra_apiserver::ApiServer;
use orquestra_apiserver::authorization::{Authorizer, authorize};
use orquestra_apiserver::identity::{Authenticator, Identity, authenticate};
use orquestra_apiserver::token::{Claims, ISSUER, TokenIssuer, unix_now};
use orquestra_store::Store;
use orquestra_store::sqlite::{SqliteOptions, SqliteStore};
use serde_json::{Value, json};

/// The server over HTTPS with authentication, its admin client, and what a client needs.
struct Secure {
    server: ApiServer,
    admin: Client,
    url: String,
    ca_pem: String,
    node_token: String,
    store: Arc<dyn Store>,
    _dir: tempfile::TempDir,
}

async fn secure() -> Secure {
    secure_with(false).await
}

/// [`secure`], with RBAC enforced when `rbac` (as `orq server` does by default) and the node
/// token (`Secure::node_token`) accepted.
async fn secure_with(rbac: bool) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("state.db"), SqliteOptions::default()).unwrap(),
    );
    let server = ApiServer::new(Arc::clone(&store)).await.unwrap();
    let identity = Identity::load_or_create(dir.path(), &[]).unwrap();
    assert!(
        server
            .engine()
            .set_token_issuer(TokenIssuer::load_or_create(dir.path()).unwrap())
    );
    let auth = Arc::new(
        Authenticator::new(identity.token.clone(), server.engine().clone())
            .with_node_token(identity.node_token.clone()),
    );
    // The reviews (TokenReview) answer with the same authenticator, as in `orq server`.
    server.engine().set_access(Some(Arc::clone(&auth)), rbac);
    let mut app = server.router();
    if rbac {
        let authorizer = Arc::new(Authorizer::new(server.engine().clone()));
        app = app.layer(axum::middleware::from_fn_with_state(authorizer, authorize));
    }
    let app = app.layer(axum::middleware::from_fn_with_state(auth, authenticate));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        identity.cert_pem.clone().into_bytes(),
        identity.key_pem.clone().into_bytes(),
    )
    .await
    .unwrap();
    let serving = axum_server::from_tcp_rustls(listener, tls).unwrap();
    tokio::spawn(serving.serve(app.into_make_service()));
    let url = format!("https://{addr}");
    let admin = client(&url, &identity.ca_pem, &identity.token).await;
    Secure {
        server,
        admin,
        url,
        ca_pem: identity.ca_pem,
        node_token: identity.node_token,
        store,
        _dir: dir,
    }
}

/// A client that trusts `ca_pem` and presents `token`, as an in-cluster config is.
async fn client(url: &str, ca_pem: &str, token: &str) -> Client {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    let kubeconfig = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: c
  cluster:
    server: {url}
    certificate-authority-data: {ca}
users:
- name: u
  user:
    token: {token}
contexts:
- name: c
  context: {{cluster: c, user: u, namespace: default}}
current-context: c
"
    );
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn api_code(result: Result<impl std::fmt::Debug, kube::Error>) -> (u16, String) {
    match result {
        Err(kube::Error::Api(status)) => (status.code, status.reason.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

async fn create_account(admin: &Client, name: &str) -> ServiceAccount {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
    let account: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap()
}

fn token_request(seconds: Option<i64>, bound: Option<&Pod>) -> TokenRequest {
    TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            expiration_seconds: seconds,
            bound_object_ref: bound.map(|pod| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.name_any()),
                uid: pod.uid(),
            }),
        }),
        ..TokenRequest::default()
    }
}

#[tokio::test]
async fn a_token_request_authenticates_an_in_cluster_client() {
    let cluster = secure().await;
    let account = create_account(&cluster.admin, "robot").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.admin.clone(), "default");
    let issued = accounts
        .create_token_request("robot", &PostParams::default(), &token_request(None, None))
        .await
        .unwrap();
    let spec = issued.spec.unwrap();
    assert_eq!(spec.expiration_seconds, Some(3600));
    assert_eq!(spec.audiences, Some(vec![ISSUER.to_owned()]));
    let status = issued.status.unwrap();
    assert!(status.expiration_timestamp.unwrap().0 > jiff::Timestamp::now());
    let token = status.token.unwrap();
    let claims = claims_of(&token);
    assert_eq!(claims["sub"], "system:serviceaccount:default:robot");
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["aud"], json!([ISSUER]));
    assert_eq!(claims["kubernetes.io"]["namespace"], "default");
    assert_eq!(
        claims["kubernetes.io"]["serviceaccount"]["uid"],
        json!(account.uid())
    );
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );

    // The token is all an in-cluster client has: it reads, writes and watches.
    let robot = client(&cluster.url, &cluster.ca_pem, &token).await;
    let configmaps: Api<ConfigMap> = Api::namespaced(robot.clone(), "default");
    let cm: ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "from-robot"}, "data": {"a": "b"}}))
            .unwrap();
    configmaps
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    assert_eq!(
        configmaps
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    robot.apiserver_version().await.unwrap();

    // The OIDC discovery documents, for consumers of the tokens.
    let jwks: Value = robot
        .request(
            http::Request::get("/openid/v1/jwks")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap();
    let header = token.split('.').next().unwrap();
    let header: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(header["kid"], kid);
    assert_eq!(header["alg"], "ES256");

    // Once the ServiceAccount is gone, so is the token's access.
    accounts
        .delete("robot", &DeleteParams::default())
        .await
        .unwrap();
    tokio::time::sleep(orquestra_apiserver::identity::RECHECK_AFTER).await;
    let (code, _) = api_code(configmaps.list(&Default::default()).await);
    assert_eq!(code, 401);
}

#[tokio::test]
async fn forged_expired_and_unbound_tokens_are_refused() {
    let cluster = secure().await;
    let account = create_account(&cluster.admin, "robot").await;
    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), "default");
    let list = |token: String| {
        let (url, ca) = (cluster.url.clone(), cluster.ca_pem.clone());
        async move {
            let client = client(&url, &ca, &token).await;
            Api::<ConfigMap>::namespaced(client, "default")
                .list(&Default::default())
                .await
                .map(|l| l.items.len())
        }
    };

    // Another key's token, with every claim right: 401.
    let now = unix_now();
    let uid = account.uid().unwrap();
    let claims = Claims::new("default", "robot", &uid, vec![ISSUER.into()], now, 600);
    let forged = TokenIssuer::generate().unwrap().sign(&claims).unwrap();
    assert_eq!(api_code(list(forged).await), (401, "Unauthorized".into()));
    // The server's own key, but expired an hour ago: 401.
    let issuer = cluster.server.engine().token_issuer().unwrap();
    let expired = Claims::new(
        "default",
        "robot",
        &uid,
        vec![ISSUER.into()],
        now - 7200,
        3600,
    );
    assert_eq!(api_code(list(issuer.sign(&expired).unwrap()).await).0, 401);
    // For another audience: 401.
    let elsewhere = Claims::new("default", "robot", &uid, vec!["vault".into()], now, 600);
    assert_eq!(
        api_code(list(issuer.sign(&elsewhere).unwrap()).await).0,
        401
    );
    // The same claims, valid: accepted.
    assert_eq!(list(issuer.sign(&claims).unwrap()).await.unwrap(), 0);
    // Not a JWT at all: 401.
    assert_eq!(api_code(list("not-a-token".into()).await).0, 401);

    // A token bound to a pod works while the pod exists.
    let nodes: Api<Node> = Api::all(cluster.admin.clone());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap();
    let node = nodes.create(&PostParams::default(), &node).await.unwrap();
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
    }))
    .unwrap();
    let pod = pods.create(&PostParams::default(), &pod).await.unwrap();
    assert_eq!(
        pod.spec.as_ref().unwrap().service_account_name.as_deref(),
        Some("default"),
        "admission names the default service account"
    );
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.admin.clone(), "default");
    let bound = accounts
        .create_token_request(
            "robot",
            &PostParams::default(),
            &token_request(Some(600), Some(&pod)),
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap();
    let claims = claims_of(&bound);
    assert_eq!(claims["kubernetes.io"]["pod"]["name"], "p");
    assert_eq!(claims["kubernetes.io"]["node"]["name"], "n1");
    // A TokenReview names the credential, the pod and its node, as kube-apiserver's does.
    let review: TokenReview =
        serde_json::from_value(json!({"spec": {"token": bound.clone()}})).unwrap();
    let review = Api::<TokenReview>::all(cluster.admin.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap();
    let user = review.status.unwrap().user.unwrap();
    let extra = user.extra.unwrap();
    let one = |key: &str| extra[&format!("authentication.kubernetes.io/{key}")].clone();
    assert_eq!(
        one("credential-id"),
        vec![format!("JTI={}", claims["jti"].as_str().unwrap())]
    );
    assert_eq!(one("pod-name"), vec!["p".to_owned()]);
    assert_eq!(one("pod-uid"), vec![pod.uid().unwrap()]);
    assert_eq!(one("node-name"), vec!["n1".to_owned()]);
    assert_eq!(one("node-uid"), vec![node.uid().unwrap()]);
    pods.delete("p", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    wait_deleted(&pods, "p").await;
    // (The review above checked the pod; that check holds for RECHECK_AFTER.)
    tokio::time::sleep(orquestra_apiserver::identity::RECHECK_AFTER).await;
    assert_eq!(api_code(list(bound).await).0, 401);

    // No ServiceAccount, no token: 404 NotFound.
    let (code, reason) = api_code(
        accounts
            .create_token_request("ghost", &PostParams::default(), &token_request(None, None))
            .await,
    );
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    // Too short a lifetime: 422.
    let (code, _) = api_code(
        accounts
            .create_token_request(
                "robot",
                &PostParams::default(),
                &token_request(Some(60), None),
            )
            .await,
    );
    assert_eq!(code, 422);
    // Bound to a pod that is not there: 404.
    let (code, _) = api_code(
        accounts
            .create_token_request(
                "robot",
                &PostParams::default(),
                &token_request(None, Some(&pod)),
            )
            .await,
    );
    assert_eq!(code, 404);
}

/// Waits until pod `name` is gone (a graceful delete of an unscheduled pod is immediate, but
/// be sure).
async fn wait_deleted(pods: &Api<Pod>, name: &str) {
    for _ in 0..100 {
        if pods.get_opt(name).await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("pod {name} was not deleted");
}

/// What a ServiceAccount's client may do under RBAC: discovery only, until a binding grants
/// more, and then only that, where it was granted.
#[tokio::test]
async fn rbac_grants_service_accounts_what_their_bindings_allow() {
    use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, Role, RoleBinding};
    let cluster = secure_with(true).await;
    create_account(&cluster.admin, "robot").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.admin.clone(), "default");
    let token = accounts
        .create_token_request("robot", &PostParams::default(), &token_request(None, None))
        .await
        .unwrap()
        .status
        .unwrap()
        .token
        .unwrap();
    let robot = client(&cluster.url, &cluster.ca_pem, &token).await;
    robot.list_core_api_resources("v1").await.unwrap();
    // Every service account may read the issuer's OIDC documents (the bootstrap
    // `system:service-account-issuer-discovery` binding).
    let discovery: Value = robot
        .request(
            http::Request::get("/.well-known/openid-configuration")
                .body(Vec::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(discovery["issuer"], ISSUER);
    let here: Api<ConfigMap> = Api::namespaced(robot.clone(), "default");
    let there: Api<ConfigMap> = Api::namespaced(robot.clone(), "kube-system");
    let (code, reason) = api_code(here.list(&Default::default()).await);
    assert_eq!((code, reason.as_str()), (403, "Forbidden"));
    match here.list(&Default::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(
            status.message,
            "configmaps is forbidden: User \"system:serviceaccount:default:robot\" cannot list \
             resource \"configmaps\" in API group \"\" in the namespace \"default\""
        ),
        other => panic!("{other:?}"),
    }

    let roles: Api<Role> = Api::namespaced(cluster.admin.clone(), "default");
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "cm-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    let bindings: Api<RoleBinding> = Api::namespaced(cluster.admin.clone(), "default");
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "cm-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": "default"}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    here.list(&Default::default()).await.unwrap();
    // Only the verbs, and only the namespace, the binding grants.
    let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "x"}})).unwrap();
    assert_eq!(
        api_code(here.create(&PostParams::default(), &cm).await).0,
        403
    );
    assert_eq!(api_code(there.list(&Default::default()).await).0, 403);

    // A group binding to the bootstrap cluster-admin: everything, everywhere.
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(cluster.admin.clone());
    cluster_bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "robots-admin"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
                "subjects": [{"kind": "Group", "name": "system:serviceaccounts:default"}],
            }))
            .unwrap(),
        )
        .await
        .unwrap();
    there.list(&Default::default()).await.unwrap();
    here.create(&PostParams::default(), &cm).await.unwrap();
}

/// The node token authenticates as a node agent: what an agent does, nothing more.
#[tokio::test]
async fn the_node_token_does_what_an_agent_does() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Node, Secret};
    let cluster = secure_with(true).await;
    let node = client(&cluster.url, &cluster.ca_pem, &cluster.node_token).await;
    let nodes: Api<Node> = Api::all(node.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).unwrap(),
        )
        .await
        .unwrap();
    let pods: Api<Pod> = Api::all(node.clone());
    pods.list(&Default::default()).await.unwrap();
    let secrets: Api<Secret> = Api::namespaced(node.clone(), "default");
    assert_eq!(
        api_code(secrets.get("any").await).0,
        404,
        "may get a Secret"
    );
    // Listing Secrets is the built-in ingress' (its TLS certificates); ConfigMaps it may
    // only get, for its pods' volumes.
    secrets.list(&Default::default()).await.unwrap();
    let config_maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(node.clone(), "default");
    assert_eq!(api_code(config_maps.list(&Default::default()).await).0, 403);
    let deployments: Api<Deployment> = Api::all(node);
    assert_eq!(api_code(deployments.list(&Default::default()).await).0, 403);
}

/// The bootstrap roles are put back at start when changed, unless marked not to be.
#[tokio::test]
async fn bootstrap_roles_are_reconciled_at_start() {
    use k8s_openapi::api::rbac::v1::ClusterRole;
    let cluster = secure_with(true).await;
    let roles: Api<ClusterRole> = Api::all(cluster.admin.clone());
    let original = roles.get("system:node").await.unwrap().rules;
    assert!(original.as_ref().is_some_and(|r| !r.is_empty()));
    let mut role = roles.get("system:node").await.unwrap();
    role.rules = Some(Vec::new());
    roles
        .replace("system:node", &PostParams::default(), &role)
        .await
        .unwrap();
    ApiServer::new(Arc::clone(&cluster.store)).await.unwrap();
    assert_eq!(roles.get("system:node").await.unwrap().rules, original);

    let mut role = roles.get("system:node").await.unwrap();
    role.rules = Some(Vec::new());
    role.metadata.annotations = Some(
        [(
            "rbac.authorization.kubernetes.io/autoupdate".to_owned(),
            "false".to_owned(),
        )]
        .into(),
    );
    roles
        .replace("system:node", &PostParams::default(), &role)
        .await
        .unwrap();
    ApiServer::new(Arc::clone(&cluster.store)).await.unwrap();
    assert_eq!(
        roles.get("system:node").await.unwrap().rules,
        Some(Vec::new())
    );
}

/// The ServiceAccount admission plugin's token volume: a pod gets the projected
/// `kube-api-access-…` volume mounted where in-cluster clients look, unless it or its
/// ServiceAccount opts out — what the conformance spec on opting out of automount checks.
#[tokio::test]
async fn pods_get_the_token_volume_unless_they_opt_out() {
    let cluster = secure().await;
    let accounts: Api<ServiceAccount> = Api::namespaced(cluster.admin.clone(), "default");
    let quiet: ServiceAccount = serde_json::from_value(json!({
        "metadata": {"name": "quiet"}, "automountServiceAccountToken": false}))
    .unwrap();
    accounts
        .create(&PostParams::default(), &quiet)
        .await
        .unwrap();
    create_account(&cluster.admin, "robot").await;
    let pods: Api<Pod> = Api::namespaced(cluster.admin.clone(), "default");
    let create = |name: &str, account: &str, automount: Option<bool>| {
        let pods = pods.clone();
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"serviceAccountName": account, "automountServiceAccountToken": automount,
                "initContainers": [{"name": "init", "image": "busybox"}],
                "containers": [{"name": "c", "image": "busybox"}]},
        }))
        .unwrap();
        async move { pods.create(&PostParams::default(), &pod).await.unwrap() }
    };
    let mounts = |pod: &Pod| -> Vec<bool> {
        let spec = pod.spec.as_ref().unwrap();
        spec.init_containers
            .iter()
            .flatten()
            .chain(&spec.containers)
            .map(|c| {
                c.volume_mounts.iter().flatten().any(|m| {
                    m.mount_path == "/var/run/secrets/kubernetes.io/serviceaccount"
                        && m.read_only == Some(true)
                        && m.name.starts_with("kube-api-access-")
                })
            })
            .collect()
    };

    let mounted = create("mounted", "robot", None).await;
    assert_eq!(mounts(&mounted), vec![true, true]);
    let volumes = mounted.spec.unwrap().volumes.unwrap();
    let sources = volumes[0]
        .projected
        .as_ref()
        .unwrap()
        .sources
        .as_ref()
        .unwrap();
    let token = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(token.expiration_seconds, Some(3607));
    assert_eq!(
        sources[1].config_map.as_ref().unwrap().name,
        "kube-root-ca.crt"
    );
    assert!(sources[2].downward_api.is_some());

    assert_eq!(
        mounts(&create("opted-out", "robot", Some(false)).await),
        vec![false, false]
    );
    assert_eq!(
        mounts(&create("quiet-account", "quiet", None).await),
        vec![false, false]
    );
    assert_eq!(
        mounts(&create("opted-in", "quiet", Some(true)).await),
        vec![true, true],
        "the pod's own setting wins over its account's"
    );
}
