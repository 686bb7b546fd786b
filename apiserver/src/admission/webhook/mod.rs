//! Admission webhooks (`admissionregistration.k8s.io/v1`), as kube-apiserver's
//! MutatingAdmissionWebhook and ValidatingAdmissionWebhook plugins call them: every write
//! that a webhook's rules, namespace selector and object selector match is sent to it as an
//! `admission.k8s.io/v1` AdmissionReview after the built-in admission steps and before
//! storage — mutating webhooks first, one at a time in configuration-name order (a JSONPatch
//! answer changes the object, and `reinvocationPolicy: IfNeeded` webhooks run once more when
//! a later one changed it), then the built-in validation, then the validating webhooks, all
//! at once.
//!
//! A webhook that cannot be called or answers nonsense fails the request under `failurePolicy:
//! Fail` (500, naming the webhook and the failure) and is skipped under `Ignore`; one that
//! denies fails it with the Status it answered, prefixed `admission webhook "…" denied the
//! request`. Writes to webhook configurations and admission policies never go through
//! webhooks, so a broken webhook cannot lock its own fix out.
//!
//! Who made the request (the review's `userInfo`) and the warnings webhooks answer with
//! travel with the request as a task-local [`Context`] the HTTP layer sets ([`scoped`]).

pub(crate) mod call;
pub(crate) mod rules;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::authorization::User;
use crate::engine::Engine;
use crate::error::ApiError;
use crate::registry::ResourceDef;
use crate::request::{Params, Target};

pub use call::Webhooks;

/// The admission registration group.
const GROUP: &str = "admissionregistration.k8s.io";

/// What an operation is, as AdmissionReview names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// A create (POST, or an apply that creates).
    Create,
    /// An update (PUT, PATCH, apply), of the object or a subresource.
    Update,
    /// A delete.
    Delete,
    /// A connect (`pods/exec`, `attach`, `portforward`, proxies).
    Connect,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }

    /// The `options` object kube sends with the review for this operation.
    fn options(self, dry_run: bool) -> Value {
        let kind = match self {
            Operation::Create => "CreateOptions",
            Operation::Update => "UpdateOptions",
            Operation::Delete => "DeleteOptions",
            Operation::Connect => return Value::Null,
        };
        let mut options = json!({"apiVersion": "meta.k8s.io/v1", "kind": kind});
        if dry_run {
            options["dryRun"] = json!(["All"]);
        }
        options
    }
}

/// The attributes of one admission request: what is being done to which object.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The resource written.
    pub def: &'a ResourceDef,
    /// Its namespace, for namespaced resources.
    pub namespace: Option<&'a str>,
    /// The object's name.
    pub name: &'a str,
    /// `status`, `scale`, `attach`, … .
    pub subresource: Option<&'a str>,
    /// The operation.
    pub operation: Operation,
    /// The object as it was, for updates and deletes.
    pub old_object: Option<&'a Value>,
    /// Whether the request is a dry run (webhooks with side effects refuse it).
    pub dry_run: bool,
}

impl Attributes<'_> {
    /// Whether this request is exempt from webhooks: writes to webhook configurations and
    /// admission policies themselves (kube's `IsExemptAdmissionConfigurationResource`).
    pub(crate) fn exempt(&self) -> bool {
        self.def.group == GROUP
            && matches!(
                self.def.kind.as_str(),
                "ValidatingWebhookConfiguration"
                    | "MutatingWebhookConfiguration"
                    | "ValidatingAdmissionPolicy"
                    | "ValidatingAdmissionPolicyBinding"
                    | "MutatingAdmissionPolicy"
                    | "MutatingAdmissionPolicyBinding"
            )
    }
}

/// What travels with a request through admission: who sent it, and the warnings webhooks
/// answer with (the HTTP layer returns them as `Warning` headers).
#[derive(Debug, Default)]
pub struct Context {
    user: Option<User>,
    warnings: Mutex<Vec<String>>,
}

tokio::task_local! {
    static CONTEXT: Arc<Context>;
}

/// Runs `future` (one API request) with `user` as the requester webhooks are told of;
/// returns its output and the warnings webhooks gave.
pub async fn scoped<F: Future>(user: Option<User>, future: F) -> (F::Output, Vec<String>) {
    let context = Arc::new(Context {
        user,
        warnings: Mutex::default(),
    });
    let output = CONTEXT.scope(Arc::clone(&context), future).await;
    let warnings = std::mem::take(&mut *context.warnings.lock().unwrap_or_else(|e| e.into_inner()));
    (output, warnings)
}

/// The requester as AdmissionReview's `userInfo`: the authenticated caller, or — for the
/// server's own writes and a server that does not authenticate — `system:apiserver`.
pub(crate) fn user_info() -> Value {
    let user = CONTEXT.try_with(|c| c.user.clone()).ok().flatten();
    match user {
        Some(user) => json!({"username": user.name, "groups": user.groups}),
        None => json!({"username": "system:apiserver", "groups": ["system:masters"]}),
    }
}

/// The authenticated caller of the request being served, if any.
pub(crate) fn requester() -> Option<User> {
    CONTEXT.try_with(|c| c.user.clone()).ok().flatten()
}

pub(crate) fn warn(warnings: impl IntoIterator<Item = String>) {
    let _ = CONTEXT.try_with(|c| {
        c.warnings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(warnings);
    });
}

/// One webhook of a configuration, with kube's defaults filled in.
#[derive(Debug, Clone)]
struct Hook {
    /// The webhook's name (`deny.example.com`).
    name: String,
    /// `validating` or `admit` (mutating), as the metrics label it.
    kind: &'static str,
    /// Its `rules`.
    rules: Vec<Value>,
    namespace_selector: Value,
    object_selector: Value,
    /// `failurePolicy: Ignore` (kube's default is Fail).
    ignore_failures: bool,
    /// `sideEffects` is `None` or `NoneOnDryRun`: it may be called for a dry run.
    dry_run_safe: bool,
    timeout: Duration,
    client_config: Value,
    /// `admissionReviewVersions` lists v1 (the only version this server speaks).
    speaks_v1: bool,
    /// `reinvocationPolicy: IfNeeded` (mutating webhooks).
    reinvoke: bool,
    /// `matchConditions`: (name, CEL expression), all of which must hold.
    match_conditions: Vec<(String, String)>,
}

impl Hook {
    fn parse(hook: &Value, kind: &'static str) -> Hook {
        let timeout = hook["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30);
        Hook {
            name: hook["name"].as_str().unwrap_or_default().to_owned(),
            kind,
            rules: hook["rules"].as_array().cloned().unwrap_or_default(),
            namespace_selector: hook["namespaceSelector"].clone(),
            object_selector: hook["objectSelector"].clone(),
            ignore_failures: hook["failurePolicy"] == "Ignore",
            dry_run_safe: matches!(hook["sideEffects"].as_str(), Some("None" | "NoneOnDryRun")),
            timeout: Duration::from_secs(timeout),
            client_config: hook["clientConfig"].clone(),
            speaks_v1: hook["admissionReviewVersions"]
                .as_array()
                .is_none_or(|versions| versions.iter().any(|v| v == "v1")),
            reinvoke: hook["reinvocationPolicy"] == "IfNeeded",
            match_conditions: hook["matchConditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    let text = |k: &str| c[k].as_str().unwrap_or_default().to_owned();
                    (text("name"), text("expression"))
                })
                .collect(),
        }
    }
}

/// The webhooks of every configuration of `plural` (`validatingwebhookconfigurations`,
/// `mutatingwebhookconfigurations`), in configuration-name order, then their own.
async fn hooks(engine: &Engine, plural: &str) -> Result<Vec<Hook>, ApiError> {
    let Some(def) = engine.registry.get(GROUP, "v1", plural) else {
        return Ok(Vec::new());
    };
    let target = Target {
        def,
        namespace: None,
        name: None,
        subresource: None,
    };
    let list = engine.list(&target, &Params::default()).await?;
    let mut configurations = list["items"].as_array().cloned().unwrap_or_default();
    configurations.sort_by(|a, b| {
        let name = |c: &Value| {
            c["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        name(a).cmp(&name(b))
    });
    Ok(configurations
        .iter()
        .flat_map(|c| c["webhooks"].as_array().cloned().unwrap_or_default())
        .map(|hook| {
            let kind = if plural.starts_with("validating") {
                "validating"
            } else {
                "admit"
            };
            Hook::parse(&hook, kind)
        })
        .collect())
}

/// Runs the mutating webhooks that match on `object` (the new object; for a delete, the
/// webhooks are called but what they answer does not change anything).
pub async fn mutate(
    engine: &Engine,
    attributes: &Attributes<'_>,
    object: &mut Value,
) -> Result<(), ApiError> {
    if attributes.exempt() {
        return Ok(());
    }
    let hooks = hooks(engine, "mutatingwebhookconfigurations").await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let mut called = Vec::new();
    let mut changed_by: Option<usize> = None;
    for (index, hook) in hooks.iter().enumerate() {
        if !rules::matches(engine, hook, attributes, Some(object)).await? {
            continue;
        }
        called.push(index);
        if call_mutating(engine, hook, attributes, object).await? {
            changed_by = Some(index);
        }
    }
    // Reinvocation: a webhook that asked for it runs once more if a later one changed the
    // object after it ran.
    if let Some(last_change) = changed_by {
        for index in called {
            let hook = &hooks[index];
            if hook.reinvoke && index < last_change {
                call_mutating(engine, hook, attributes, object).await?;
            }
        }
    }
    Ok(())
}

/// Calls one mutating webhook; whether it changed the object.
async fn call_mutating(
    engine: &Engine,
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: &mut Value,
) -> Result<bool, ApiError> {
    let sent = (attributes.operation != Operation::Delete).then_some(&*object);
    let Some(answer) = call::review(engine, hook, attributes, sent).await? else {
        return Ok(false);
    };
    let Some(patch) = answer.patch else {
        return Ok(false);
    };
    if attributes.operation == Operation::Delete {
        return Ok(false);
    }
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).map_err(|e| {
        ApiError::Internal(format!(
            "Internal error occurred: failed calling webhook {:?}: the JSONPatch it answered \
             does not apply: {e}",
            hook.name
        ))
    })?;
    let changed = patched != *object;
    *object = patched;
    Ok(changed)
}

/// Runs the validating webhooks that match, all at once; the first refusal (in webhook
/// order) fails the request.
pub async fn validate(
    engine: &Engine,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<(), ApiError> {
    if attributes.exempt() {
        return Ok(());
    }
    let hooks = hooks(engine, "validatingwebhookconfigurations").await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let mut matching = Vec::new();
    for hook in &hooks {
        if rules::matches(engine, hook, attributes, object).await? {
            matching.push(hook);
        }
    }
    let answers = futures::future::join_all(
        matching
            .iter()
            .map(|hook| call::review(engine, hook, attributes, object)),
    )
    .await;
    answers.into_iter().try_for_each(|answer| answer.map(drop))
}
