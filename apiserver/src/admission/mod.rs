//! What a write must satisfy before it is stored, kept in small named steps so the engine
//! stays generic: the defaults and semantic checks that k8s-openapi's schemas cannot carry
//! (here), the structural schemas themselves ([`schema`]: pruning, defaulting, validation),
//! RuntimeClasses' overhead and scheduling ([`runtime_class`]), in-place pod resizes
//! ([`resize`]), claims' default StorageClass ([`storage_class`]), Ingresses' default
//! IngressClass ([`ingress_class`]), Jobs and CronJobs ([`batch`]), LimitRanges and
//! ResourceQuotas ([`quota`]); and what users add — admission policies in CEL ([`policy`],
//! on the [`cel`] environment) and admission webhooks ([`webhook`]).

pub mod batch;
pub mod cel;
pub mod ingress_class;
pub mod policy;
pub mod priority;
pub mod quota;
pub mod resize;
pub mod runtime_class;
pub mod schema;
pub mod service_account;
pub mod statefulset;
pub mod storage_class;
pub mod webhook;

use std::collections::BTreeSet;

use serde_json::{Value, json};

use crate::error::Cause;
use crate::object::dns1123_problem;
use crate::registry::ResourceDef;

/// Defaults applied to a new object before validation.
pub fn default_on_create(def: &ResourceDef, object: &mut Value) {
    // A kind whose status has its own subresource starts without one, whatever the client
    // sent (kube-apiserver's PrepareForCreate): the status is its controllers' to write.
    // Nodes keep theirs (the kubelet registers with it).
    if def.status
        && !(def.group.is_empty() && def.kind == "Node")
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Namespace") => namespace_defaults(object),
        ("", "Pod") => {
            let qos = qos_class(&object["spec"]);
            object["status"] = json!({"phase": "Pending", "qosClass": qos});
        }
        // Claims and volumes start Pending; the binder moves them on.
        ("", "PersistentVolumeClaim" | "PersistentVolume") => {
            object["status"] = json!({"phase": "Pending"});
        }
        _ => {}
    }
    on_write(def, object);
}

/// A pod's quality-of-service class, set once at creation (kube-apiserver's
/// `PrepareForCreate`; it never changes, not even on an in-place resize): `BestEffort` when
/// no container (init ones included) requests or limits CPU or memory, `Guaranteed` when
/// every container limits both and requests exactly its limits (unset requests default to
/// the limits), else `Burstable`.
pub fn qos_class(spec: &Value) -> &'static str {
    use crate::kinds::quantity::Quantity;
    let containers = ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec.get(*k).and_then(Value::as_array))
        .flatten();
    let (mut any, mut guaranteed) = (false, true);
    for c in containers {
        let get = |kind: &str, name: &str| {
            c.pointer(&format!("/resources/{kind}/{name}"))
                .and_then(|q| match q {
                    Value::String(s) => Quantity::parse(s),
                    Value::Number(n) => Quantity::parse(&n.to_string()),
                    _ => None,
                })
                .filter(|q| !q.is_zero())
        };
        for name in ["cpu", "memory"] {
            let (limit, request) = (get("limits", name), get("requests", name));
            any |= limit.is_some() || request.is_some();
            match (limit, request) {
                (Some(l), Some(r)) if l.milli() != r.milli() => guaranteed = false,
                (Some(_), _) => {}
                (None, _) => guaranteed = false,
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// The ServiceAccount admission plugin's default: a new pod naming no service account runs
/// as `default`; the deprecated `serviceAccount` alias mirrors `serviceAccountName`.
fn service_account_defaults(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let named = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let name = named(spec.get("serviceAccountName"))
        .or_else(|| named(spec.get("serviceAccount")))
        .unwrap_or_else(|| "default".to_owned());
    spec.insert("serviceAccountName".into(), json!(name));
    spec.insert("serviceAccount".into(), json!(name));
}

/// The default `tolerationSeconds` for the `not-ready` and `unreachable` taints.
pub const DEFAULT_TOLERATION_SECONDS: i64 = 300;

/// DefaultTolerationSeconds: a new pod tolerates `node.kubernetes.io/not-ready` and
/// `node.kubernetes.io/unreachable` (NoExecute) for `seconds`, unless it already tolerates
/// them — so the pods of a lost node are evicted after a while, not at once.
pub fn default_tolerations(object: &mut Value, seconds: i64) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    let tolerations = spec.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = tolerations.as_array_mut() else {
        return;
    };
    for key in [
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
    ] {
        // A toleration with no key and `Exists` tolerates every taint; one for the key with
        // no effect tolerates every effect.
        let tolerated = list.iter().any(|t| {
            let effect = t.get("effect").and_then(Value::as_str).unwrap_or("");
            let any_key = t
                .get("key")
                .and_then(Value::as_str)
                .unwrap_or("")
                .is_empty()
                && t.get("operator").and_then(Value::as_str) == Some("Exists");
            let this_key = t.get("key").and_then(Value::as_str) == Some(key);
            (any_key || this_key) && (effect.is_empty() || effect == "NoExecute")
        });
        if !tolerated {
            list.push(json!({
                "key": key, "operator": "Exists", "effect": "NoExecute",
                "tolerationSeconds": seconds,
            }));
        }
    }
}

/// Steps for every write (create and update). Defaulting is idempotent, so an update that
/// leaves a defaulted field out does not read as a change.
pub fn on_write(def: &ResourceDef, object: &mut Value) {
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Secret") => secret_string_data(object),
        ("", "Namespace") => namespace_name_label(object),
        ("", "Pod") => {
            if let Some(spec) = object.get_mut("spec") {
                pod_spec_defaults(spec);
                requests_from_limits(spec);
            }
            service_account_defaults(object);
        }
        ("apps", "Deployment") => {
            deployment_defaults(object);
            template_defaults(object);
        }
        ("apps", "ReplicaSet") => {
            if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
                spec.entry("replicas").or_insert(json!(1));
            }
            template_defaults(object);
        }
        ("apps", "DaemonSet") => {
            daemonset_defaults(object);
            template_defaults(object);
        }
        ("apps", "StatefulSet") => statefulset::defaults(object),
        ("batch", "Job") => batch::job_defaults(object),
        ("batch", "CronJob") => batch::cronjob_defaults(object),
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => {
            binding_defaults(object)
        }
        ("", "LimitRange") => crate::quota::limits::default_items(object),
        ("", "ReplicationController") => {
            replication_controller_defaults(object);
            template_defaults(object);
        }
        _ => {}
    }
}

/// RBAC's defaults: a binding's `roleRef.apiGroup` and its User and Group subjects'
/// `apiGroup` are `rbac.authorization.k8s.io` when left empty (client-go sends `""`).
fn binding_defaults(object: &mut Value) {
    const GROUP: &str = "rbac.authorization.k8s.io";
    let empty = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").is_empty();
    if let Some(role_ref) = object.get_mut("roleRef").and_then(Value::as_object_mut)
        && empty(role_ref.get("apiGroup"))
    {
        role_ref.insert("apiGroup".into(), json!(GROUP));
    }
    for subject in object
        .get_mut("subjects")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter_map(Value::as_object_mut)
    {
        let kind = subject.get("kind").and_then(Value::as_str).unwrap_or("");
        if matches!(kind, "User" | "Group") && empty(subject.get("apiGroup")) {
            subject.insert("apiGroup".into(), json!(GROUP));
        }
    }
}

/// The semantic checks of a kind, after its schema has been applied: every problem found.
pub fn validate(def: &ResourceDef, object: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Pod") => validate_pod_spec(&object["spec"], "spec", &mut causes),
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet" | "StatefulSet") => {
            validate_workload(object, &mut causes);
        }
        ("", "ConfigMap" | "Secret") => validate_config_keys(object, &mut causes),
        ("batch", "Job") => batch::validate_job(object, &mut causes),
        ("batch", "CronJob") => batch::validate_cronjob(object, &mut causes),
        ("", "Event") => validate_event(object, false, &mut causes),
        ("events.k8s.io", "Event") => validate_event(object, true, &mut causes),
        ("admissionregistration.k8s.io", _) => causes.extend(policy::problems(def, object)),
        _ => {}
    }
    causes
}

/// The validating phase of admission for one request, in kube-apiserver's order: CEL
/// admission policies, then validating webhooks.
pub async fn validate_request(
    engine: &crate::engine::Engine,
    attributes: &webhook::Attributes<'_>,
    object: Option<&Value>,
) -> Result<(), crate::error::ApiError> {
    policy::validating::validate(engine, attributes, object).await?;
    webhook::validate(engine, attributes, object).await
}

/// An Event, as kube's event validation checks it. An event with an `eventTime` (a "new"
/// event, as every `events.k8s.io` one is) says who reported it and what happened, within
/// length limits; an old one's namespace agrees with its object's. Through `events.k8s.io`
/// the time, a `Normal`/`Warning` type and a well-formed series are required as well.
fn validate_event(object: &Value, events_api: bool, causes: &mut Vec<Cause>) {
    let name = |core: &'static str, events: &'static str| if events_api { events } else { core };
    let text = |field: &str| object[field].as_str().unwrap_or_default();
    let namespace = object["metadata"]["namespace"].as_str().unwrap_or_default();
    let involved = name("involvedObject", "regarding");
    let involved_namespace = object[involved]["namespace"].as_str().unwrap_or_default();
    let mismatch = || {
        cause(
            "FieldValueInvalid",
            format!("{involved}.namespace"),
            format!("Invalid value: {involved_namespace:?}: does not match event.namespace"),
        )
    };
    let required = |field: &str| cause("FieldValueRequired", field.into(), "Required value".into());
    let too_long = |field: &str, limit: usize| {
        cause(
            "FieldValueInvalid",
            field.into(),
            format!("Invalid value: \"\": can have at most {limit} characters"),
        )
    };
    let timed = object["eventTime"].as_str().is_some_and(|t| !t.is_empty());
    if !timed {
        if events_api {
            causes.push(required("eventTime"));
        } else if (involved_namespace.is_empty() && !matches!(namespace, "" | "default"))
            || (!involved_namespace.is_empty() && involved_namespace != namespace)
        {
            causes.push(mismatch());
        }
    } else {
        if involved_namespace.is_empty() && !matches!(namespace, "default" | "kube-system") {
            causes.push(mismatch());
        }
        let controller = name("reportingComponent", "reportingController");
        for (field, limit) in [
            (controller, 316),
            ("reportingInstance", 128),
            ("action", 128),
            ("reason", 128),
        ] {
            match text(field).len() {
                0 => causes.push(required(field)),
                n if n > limit => causes.push(too_long(field, limit)),
                _ => {}
            }
        }
        if text(name("message", "note")).len() > 1024 {
            causes.push(too_long(name("message", "note"), 1024));
        }
    }
    if events_api {
        let type_ = text("type");
        if type_ != "Normal" && type_ != "Warning" {
            causes.push(cause(
                "FieldValueInvalid",
                "type".into(),
                format!("Invalid value: \"\": has invalid value: {type_}"),
            ));
        }
        if let Some(series) = object.get("series").filter(|s| s.is_object()) {
            if series["count"].as_i64().unwrap_or(0) < 2 {
                causes.push(cause(
                    "FieldValueInvalid",
                    "series.count".into(),
                    "Invalid value: \"\": should be at least 2".into(),
                ));
            }
            if series["lastObservedTime"]
                .as_str()
                .is_none_or(str::is_empty)
            {
                causes.push(required("series.lastObservedTime"));
            }
        }
    }
}

/// A ConfigMap's or Secret's keys must be valid config keys (kube's `IsConfigMapKey`).
fn validate_config_keys(object: &Value, causes: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        for key in object[field]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, _)| k)
        {
            let valid = !key.is_empty()
                && key.len() <= 253
                && key != "."
                && key != ".."
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                causes.push(cause(
                    "FieldValueInvalid",
                    format!("{field}[{key}]"),
                    format!(
                        "Invalid value: {key:?}: a valid config key must consist of alphanumeric \
                         characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or \
                         'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
                    ),
                ));
            }
        }
    }
}

/// What an update may not change: a ConfigMap or Secret marked `immutable` keeps its data
/// (and a Secret its type), and stays immutable — kube's `field is immutable when
/// \`immutable\` is set`; a Job keeps its selector, completion mode and, once started, its
/// template ([`batch::validate_job_update`]); a StatefulSet its spec but for the rolling
/// fields ([`statefulset::validate_update`]); the other apps workloads their selector, as
/// the pods they own were chosen by it.
pub fn check_immutable_data(def: &ResourceDef, old: &Value, new: &Value) -> Vec<Cause> {
    let mut causes = Vec::new();
    match (def.group.as_str(), def.kind.as_str()) {
        ("batch", "Job") => return batch::validate_job_update(old, new),
        ("apps", "StatefulSet") => return statefulset::validate_update(old, new),
        ("apps", "Deployment" | "ReplicaSet" | "DaemonSet") => {
            if old["spec"]["selector"] != new["spec"]["selector"] {
                causes.push(cause(
                    "FieldValueInvalid",
                    "spec.selector".into(),
                    format!(
                        "Invalid value: {}: field is immutable",
                        new["spec"]["selector"]
                    ),
                ));
            }
            return causes;
        }
        _ => {}
    }
    if (def.group.as_str(), def.kind.as_str()) == ("scheduling.k8s.io", "PriorityClass") {
        return priority::validate_class_update(old, new);
    }
    let secret = match (def.group.as_str(), def.kind.as_str()) {
        ("", "ConfigMap") => false,
        ("", "Secret") => true,
        _ => return causes,
    };
    if old["immutable"] != true {
        return causes;
    }
    let forbidden = |field: &str| {
        cause(
            "FieldValueForbidden",
            field.to_owned(),
            "Forbidden: field is immutable when `immutable` is set".into(),
        )
    };
    if new["immutable"] != true {
        causes.push(forbidden("immutable"));
    }
    let fields: &[&str] = if secret {
        &["data", "type"]
    } else {
        &["data", "binaryData"]
    };
    for field in fields {
        if old[*field] != new[*field] {
            causes.push(forbidden(field));
        }
    }
    causes
}

fn cause(reason: &str, field: String, message: String) -> Cause {
    Cause {
        reason: reason.into(),
        message,
        field,
    }
}

/// A Pod's (or template's) spec: containers present, named uniquely as DNS labels, with an
/// image, ports in range; the enumerated policies.
fn validate_pod_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let containers = spec["containers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if containers.is_empty() {
        causes.push(cause(
            "FieldValueRequired",
            format!("{path}.containers"),
            "Required value".into(),
        ));
    }
    let mut names = BTreeSet::new();
    let init = spec["initContainers"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (list, items) in [("containers", containers), ("initContainers", init)] {
        for (i, container) in items.iter().enumerate() {
            let at = format!("{path}.{list}[{i}]");
            let name = container["name"].as_str().unwrap_or_default();
            if let Some(problem) = dns1123_problem(name, true) {
                causes.push(cause(
                    "FieldValueInvalid",
                    format!("{at}.name"),
                    format!("Invalid value: {name:?}: {problem}"),
                ));
            } else if !names.insert(name.to_owned()) {
                causes.push(cause(
                    "FieldValueDuplicate",
                    format!("{at}.name"),
                    format!("Duplicate value: {name:?}"),
                ));
            }
            if container["image"].as_str().is_none_or(str::is_empty) {
                causes.push(cause(
                    "FieldValueRequired",
                    format!("{at}.image"),
                    "Required value".into(),
                ));
            }
            let ports = container["ports"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            for (j, port) in ports.iter().enumerate() {
                let number = port["containerPort"].as_i64().unwrap_or_default();
                if !(1..=65535).contains(&number) {
                    causes.push(cause(
                        "FieldValueInvalid",
                        format!("{at}.ports[{j}].containerPort"),
                        format!("Invalid value: {number}: must be between 1 and 65535, inclusive"),
                    ));
                }
                one_of(
                    &port["protocol"],
                    &["TCP", "UDP", "SCTP"],
                    &format!("{at}.ports[{j}].protocol"),
                    causes,
                );
            }
            one_of(
                &container["imagePullPolicy"],
                &["Always", "IfNotPresent", "Never"],
                &format!("{at}.imagePullPolicy"),
                causes,
            );
        }
    }
    one_of(
        &spec["restartPolicy"],
        &["Always", "OnFailure", "Never"],
        &format!("{path}.restartPolicy"),
        causes,
    );
    one_of(
        &spec["dnsPolicy"],
        &["ClusterFirst", "ClusterFirstWithHostNet", "Default", "None"],
        &format!("{path}.dnsPolicy"),
        causes,
    );
    validate_sysctls(spec, path, causes);
}

/// A pod's sysctls: each name a sysctl name (dot- or slash-separated segments of lower-case
/// alphanumerics, `-` and `_`, at most 253 characters), no name twice, and no namespaced
/// sysctl of a namespace the pod shares with the host — kube's `validateSysctls`. Whether
/// the node allows a sysctl is the node's call, not the API's.
fn validate_sysctls(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    const PATTERN: &str = "^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$";
    let segment_ok = |segment: &str| {
        let bytes = segment.as_bytes();
        let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        bytes.first().is_some_and(inner)
            && bytes.last().is_some_and(inner)
            && bytes.iter().all(|b| inner(b) || matches!(b, b'-' | b'_'))
    };
    let sysctls = &spec["securityContext"]["sysctls"];
    let mut seen = BTreeSet::new();
    for (i, sysctl) in sysctls.as_array().into_iter().flatten().enumerate() {
        let at = format!("{path}.securityContext.sysctls[{i}].name");
        let name = sysctl["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            causes.push(cause("FieldValueRequired", at, "Required value".into()));
            continue;
        }
        if name.len() > 253 || !name.split(['.', '/']).all(segment_ok) {
            causes.push(cause(
                "FieldValueInvalid",
                at.clone(),
                format!(
                    "Invalid value: {name:?}: must have at most 253 characters and match \
                     regex {PATTERN}"
                ),
            ));
        } else if !seen.insert(name) {
            causes.push(cause(
                "FieldValueDuplicate",
                at.clone(),
                format!("Duplicate value: {name:?}"),
            ));
        }
        let dotted = name.replace('/', ".");
        let ipc = dotted.starts_with("kernel.shm")
            || dotted.starts_with("kernel.msg")
            || dotted == "kernel.sem"
            || dotted.starts_with("fs.mqueue.");
        let shared = if dotted.starts_with("net.") && spec["hostNetwork"] == true {
            Some("hostNetwork")
        } else if ipc && spec["hostIPC"] == true {
            Some("hostIPC")
        } else {
            None
        };
        if let Some(host) = shared {
            causes.push(cause(
                "FieldValueInvalid",
                at,
                format!("Invalid value: {name:?}: may not be specified when '{host}' is true"),
            ));
        }
    }
}

fn one_of(value: &Value, allowed: &[&str], field: &str, causes: &mut Vec<Cause>) {
    if let Some(text) = value.as_str() {
        if !allowed.contains(&text) {
            let supported: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
            causes.push(cause(
                "FieldValueNotSupported",
                field.to_owned(),
                format!(
                    "Unsupported value: {text:?}: supported values: {}",
                    supported.join(", ")
                ),
            ));
        }
    }
}

/// Whether a label selector (`matchLabels`, `matchExpressions`) selects `labels`.
pub(crate) fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let match_labels = selector["matchLabels"].as_object();
    let expressions = selector["matchExpressions"].as_array();
    match_labels
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && expressions.into_iter().flatten().all(|e| {
            let key = e["key"].as_str().unwrap_or_default();
            let value = labels.get(key).and_then(Value::as_str);
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            match e["operator"].as_str() {
                Some("In") => value.is_some_and(|v| values.contains(&v)),
                Some("NotIn") => !value.is_some_and(|v| values.contains(&v)),
                Some("Exists") => value.is_some(),
                Some("DoesNotExist") => value.is_none(),
                _ => false,
            }
        })
}

/// A workload: a non-empty selector that selects its own template, and a valid template.
fn validate_workload(object: &Value, causes: &mut Vec<Cause>) {
    let spec = &object["spec"];
    let selector = &spec["selector"];
    let match_labels = selector["matchLabels"].as_object();
    let expressions = selector["matchExpressions"].as_array();
    if match_labels.is_none_or(|m| m.is_empty()) && expressions.is_none_or(|e| e.is_empty()) {
        causes.push(cause(
            "FieldValueRequired",
            "spec.selector".into(),
            "Required value".into(),
        ));
    } else {
        let labels = &spec["template"]["metadata"]["labels"];
        let matches = selector_matches(selector, labels);
        if !matches {
            causes.push(cause(
                "FieldValueInvalid",
                "spec.template.metadata.labels".into(),
                format!(
                    "Invalid value: {}: `selector` does not match template `labels`",
                    labels
                ),
            ));
        }
    }
    if spec["replicas"].as_i64().is_some_and(|r| r < 0) {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.replicas".into(),
            format!(
                "Invalid value: {}: must be greater than or equal to 0",
                spec["replicas"]
            ),
        ));
    }
    validate_pod_spec(&spec["template"]["spec"], "spec.template.spec", causes);
}

/// The PodSpec defaults kube-apiserver fills in (pods and workload templates alike).
fn pod_spec_defaults(spec: &mut Value) {
    let Some(map) = spec.as_object_mut() else {
        return;
    };
    map.entry("restartPolicy").or_insert(json!("Always"));
    map.entry("terminationGracePeriodSeconds")
        .or_insert(json!(30));
    map.entry("dnsPolicy").or_insert(json!("ClusterFirst"));
    map.entry("schedulerName")
        .or_insert(json!("default-scheduler"));
    map.entry("securityContext").or_insert(json!({}));
    for list in ["containers", "initContainers"] {
        let Some(containers) = map.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for container in containers.iter_mut().filter_map(Value::as_object_mut) {
            container
                .entry("terminationMessagePath")
                .or_insert(json!("/dev/termination-log"));
            container
                .entry("terminationMessagePolicy")
                .or_insert(json!("File"));
            container.entry("resources").or_insert(json!({}));
            if !container.contains_key("imagePullPolicy") {
                let image = container.get("image").and_then(Value::as_str).unwrap_or("");
                // `:latest`, or no tag (and no digest), means Always, as upstream.
                let last = image.rsplit('/').next().unwrap_or(image);
                let latest = !image.contains('@')
                    && last.split_once(':').is_none_or(|(_, tag)| tag == "latest");
                container.insert(
                    "imagePullPolicy".into(),
                    json!(if latest { "Always" } else { "IfNotPresent" }),
                );
            }
            if let Some(ports) = container.get_mut("ports").and_then(Value::as_array_mut) {
                for port in ports.iter_mut().filter_map(Value::as_object_mut) {
                    port.entry("protocol").or_insert(json!("TCP"));
                }
            }
        }
    }
}

/// A ReplicationController's replicas default to 1, and an empty selector or labels to the
/// template's labels (SetDefaults_ReplicationController).
fn replication_controller_defaults(object: &mut Value) {
    let template_labels = object
        .pointer("/spec/template/metadata/labels")
        .cloned()
        .filter(|l| l.as_object().is_some_and(|m| !m.is_empty()));
    if let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) {
        spec.entry("replicas").or_insert(json!(1));
        let empty = |v: Option<&Value>| v.and_then(Value::as_object).is_none_or(|m| m.is_empty());
        if let Some(labels) = &template_labels
            && empty(spec.get("selector"))
        {
            spec.insert("selector".into(), labels.clone());
        }
    }
    if let Some(labels) = template_labels {
        let empty = object
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .is_none_or(|m| m.is_empty());
        if empty && let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("labels".into(), labels);
        }
    }
}

/// A pod's container that states a limit but no request for a resource requests its limit
/// (SetDefaults_Pod; templates are left as written).
fn requests_from_limits(spec: &mut Value) {
    for list in ["containers", "initContainers"] {
        for container in spec
            .get_mut(list)
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let Some(limits) = container
                .pointer("/resources/limits")
                .and_then(Value::as_object)
                .cloned()
            else {
                continue;
            };
            let requests = container["resources"]
                .as_object_mut()
                .map(|r| r.entry("requests").or_insert_with(|| json!({})));
            if let Some(requests) = requests.and_then(Value::as_object_mut) {
                for (resource, limit) in limits {
                    requests.entry(resource).or_insert(limit);
                }
            }
        }
    }
}

/// What an update may change in a pod's spec, as kube-apiserver's validation allows: the
/// containers' images, `activeDeadlineSeconds`, added tolerations, removed scheduling gates,
/// `terminationGracePeriodSeconds`, and a node name set once (the binding). Anything else is
/// the 422 kube-apiserver answers.
pub fn check_pod_update(old: &Value, new: &Value) -> Result<(), Cause> {
    let (Some(old_spec), Some(new_spec)) = (old.get("spec"), new.get("spec")) else {
        return Ok(());
    };
    let mut allowed = old_spec.clone();
    for list in ["containers", "initContainers"] {
        let images: Vec<Value> = new_spec[list]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| c["image"].clone())
            .collect();
        if let Some(containers) = allowed.get_mut(list).and_then(Value::as_array_mut)
            && containers.len() == images.len()
        {
            for (container, image) in containers.iter_mut().zip(images) {
                container["image"] = image;
            }
        }
    }
    for field in [
        "activeDeadlineSeconds",
        "tolerations",
        "schedulingGates",
        "terminationGracePeriodSeconds",
        "ephemeralContainers",
    ] {
        match new_spec.get(field) {
            Some(value) => allowed[field] = value.clone(),
            None => {
                if let Some(map) = allowed.as_object_mut() {
                    map.remove(field);
                }
            }
        }
    }
    let unset = |v: &Value| v["nodeName"].as_str().is_none_or(str::is_empty);
    if unset(old_spec) && !unset(new_spec) {
        allowed["nodeName"] = new_spec["nodeName"].clone();
    }
    if allowed == *new_spec {
        return Ok(());
    }
    Err(cause(
        "FieldValueForbidden",
        "spec".into(),
        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,         `spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only          additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be          set to 1 if it was previously negative)"
            .into(),
    ))
}

/// Defaults of a workload's pod template.
fn template_defaults(object: &mut Value) {
    if let Some(spec) = object.pointer_mut("/spec/template/spec") {
        pod_spec_defaults(spec);
    }
}

/// A DaemonSet rolls one node at a time by default.
fn daemonset_defaults(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("revisionHistoryLimit").or_insert(json!(10));
    rolling_update_defaults(
        spec,
        "updateStrategy",
        json!({"maxUnavailable": 1, "maxSurge": 0}),
    );
}

/// `stringData` is write-only convenience: merged into `data` (base64) and dropped.
fn secret_string_data(object: &mut Value) {
    use base64::Engine as _;
    let Some(string_data) = object.as_object_mut().and_then(|o| o.remove("stringData")) else {
        return;
    };
    let Some(entries) = string_data.as_object() else {
        return;
    };
    if !object["data"].is_object() {
        object["data"] = json!({});
    }
    for (key, value) in entries {
        let text = value.as_str().unwrap_or_default();
        object["data"][key] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

/// A namespace is `Active` and carries the `kubernetes` finalizer (the namespace
/// controller empties it before it goes).
/// Every namespace carries `kubernetes.io/metadata.name: <its name>` (kube-apiserver sets
/// it on every write), so selectors — a webhook's or policy's `namespaceSelector`, a
/// NetworkPolicy's — can pick a namespace by name.
fn namespace_name_label(object: &mut Value) {
    let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str) else {
        return;
    };
    let name = name.to_owned();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        let labels = meta.entry("labels").or_insert_with(|| json!({}));
        if let Some(labels) = labels.as_object_mut() {
            labels.insert("kubernetes.io/metadata.name".into(), Value::String(name));
        } else {
            *labels = json!({"kubernetes.io/metadata.name": name});
        }
    }
}

fn namespace_defaults(object: &mut Value) {
    if object.pointer("/spec/finalizers").is_none() {
        object["spec"] = json!({"finalizers": ["kubernetes"]});
    }
    object["status"] = json!({"phase": "Active"});
}

/// What Helm and `kubectl rollout` dereference without checking: replicas, the rolling
/// update strategy, revision history and progress deadline.
fn deployment_defaults(object: &mut Value) {
    let Some(spec) = object.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    spec.entry("replicas").or_insert(json!(1));
    spec.entry("revisionHistoryLimit").or_insert(json!(10));
    spec.entry("progressDeadlineSeconds").or_insert(json!(600));
    rolling_update_defaults(
        spec,
        "strategy",
        json!({"maxUnavailable": "25%", "maxSurge": "25%"}),
    );
}

/// A strategy field (`strategy`, `updateStrategy`) defaults to `RollingUpdate`, whose
/// parameters default to `rolling`.
fn rolling_update_defaults(spec: &mut serde_json::Map<String, Value>, field: &str, rolling: Value) {
    let strategy = spec.entry(field).or_insert_with(|| json!({}));
    if let Some(strategy) = strategy.as_object_mut() {
        let kind = strategy
            .entry("type")
            .or_insert(json!("RollingUpdate"))
            .clone();
        if kind == "RollingUpdate" {
            strategy.entry("rollingUpdate").or_insert(rolling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quality_of_service_classes() {
        let res = |r: Value| json!({"containers": [{"name": "c", "resources": r}]});
        assert_eq!(
            qos_class(&json!({"containers": [{"name": "c"}]})),
            "BestEffort"
        );
        let both = json!({"cpu": "100m", "memory": "100Mi"});
        assert_eq!(
            qos_class(&res(json!({"limits": both, "requests": both}))),
            "Guaranteed"
        );
        // Requests written differently but equal are still equal.
        assert_eq!(
            qos_class(&res(json!({"limits": {"cpu": "1", "memory": "1Gi"},
                                  "requests": {"cpu": "1000m", "memory": "1024Mi"}}))),
            "Guaranteed"
        );
        assert_eq!(
            qos_class(&res(json!({"requests": {"cpu": "1"}}))),
            "Burstable"
        );
        assert_eq!(
            qos_class(&res(
                json!({"limits": {"cpu": "1"}, "requests": {"cpu": "1"}})
            )),
            "Burstable"
        );
        // An init container counts too.
        let mut spec = res(json!({"limits": both, "requests": both}));
        spec["initContainers"] = json!([{"name": "i", "resources": {"requests": {"cpu": "1"}}}]);
        assert_eq!(qos_class(&spec), "Burstable");
    }

    #[test]
    fn pods_tolerate_lost_nodes_for_a_while() {
        let mut pod = json!({"spec": {"containers": []}});
        default_tolerations(&mut pod, 300);
        let tolerations = pod["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(tolerations.len(), 2);
        assert!(tolerations.iter().all(|t| t["tolerationSeconds"] == 300
            && t["effect"] == "NoExecute"
            && t["operator"] == "Exists"));

        // Its own toleration for a key wins; a tolerate-everything toleration covers both.
        let mut own = json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 5}]}});
        default_tolerations(&mut own, 300);
        let tolerations = own["spec"]["tolerations"].as_array().unwrap();
        assert_eq!(tolerations.len(), 2);
        assert_eq!(tolerations[0]["tolerationSeconds"], 5);
        assert_eq!(tolerations[1]["key"], "node.kubernetes.io/not-ready");
        let mut all = json!({"spec": {"tolerations": [{"operator": "Exists"}]}});
        default_tolerations(&mut all, 300);
        assert_eq!(all["spec"]["tolerations"].as_array().unwrap().len(), 1);
    }

    /// The conformance spec "should reject invalid sysctls": two malformed names named, the
    /// well-formed ones (unsafe or not: the node decides) not.
    #[test]
    fn malformed_sysctl_names_are_invalid() {
        let sysctls = |names: &[&str], extra: Value| {
            let mut spec = json!({"containers": [{"name": "c", "image": "i"}],
                "securityContext": {"sysctls": names.iter()
                    .map(|n| json!({"name": n, "value": "1"})).collect::<Vec<_>>()}});
            if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), extra) {
                spec.extend(extra);
            }
            let mut causes = Vec::new();
            validate_pod_spec(&spec, "spec", &mut causes);
            causes
                .into_iter()
                .map(|c| format!("{}: {}", c.field, c.message))
                .collect::<Vec<_>>()
        };
        let causes = sysctls(
            &["foo-", "kernel.shmmax", "safe-and-unsafe", "bar.."],
            json!({}),
        );
        assert_eq!(causes.len(), 2, "{causes:?}");
        assert!(
            causes[0].starts_with("spec.securityContext.sysctls[0].name: Invalid value: \"foo-\"")
        );
        assert!(
            causes[1].starts_with("spec.securityContext.sysctls[3].name: Invalid value: \"bar..\"")
        );
        assert!(
            sysctls(
                &["kernel/shm_rmid_forced", "net.ipv4.ip_forward"],
                json!({})
            )
            .is_empty()
        );
        let dup = sysctls(&["kernel.msgmax", "kernel.msgmax", ""], json!({}));
        assert!(dup[0].contains("Duplicate value") && dup[1].ends_with("Required value"));
        let host = sysctls(&["net.core.somaxconn"], json!({"hostNetwork": true}));
        assert!(host[0].ends_with("may not be specified when 'hostNetwork' is true"));
    }

    /// Events as kube validates them: an `events.k8s.io` event names its time, reporter and
    /// action; an old core event's namespace agrees with its object's.
    #[test]
    fn events_are_validated_per_api() {
        let fields = |object: Value, events_api: bool| {
            let mut causes = Vec::new();
            validate_event(&object, events_api, &mut causes);
            causes.into_iter().map(|c| c.field).collect::<Vec<_>>()
        };
        let good = json!({"metadata": {"namespace": "ns"}, "regarding": {"namespace": "ns"},
            "eventTime": "2017-09-19T13:49:16.000000Z", "note": "n", "action": "Do",
            "reason": "Test", "type": "Normal", "reportingController": "ctl",
            "reportingInstance": "node"});
        assert!(fields(good.clone(), true).is_empty());
        let mut bad = good.clone();
        bad["type"] = json!("Odd");
        bad["action"] = json!("");
        bad["series"] = json!({"count": 1});
        assert_eq!(
            fields(bad, true),
            ["action", "type", "series.count", "series.lastObservedTime"]
        );
        let untimed = json!({"metadata": {"namespace": "ns"}, "type": "Normal"});
        assert_eq!(fields(untimed.clone(), true), ["eventTime"]);
        // A core event without a time: only the namespaces are checked.
        assert_eq!(fields(untimed, false), ["involvedObject.namespace"]);
        let old = json!({"metadata": {"namespace": "ns"}, "involvedObject": {"namespace": "ns"},
            "reason": "Pulled", "message": "m"});
        assert!(fields(old, false).is_empty());
    }
}
