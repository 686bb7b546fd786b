//! Label and field selectors, as `kubectl -l` and `--field-selector` send them.

use serde_json::Value;

use crate::error::ApiError;

/// One requirement of a label selector.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed label selector: every requirement must hold. Empty matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

impl LabelSelector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
    pub fn parse(s: &str) -> Result<LabelSelector, ApiError> {
        let bad =
            |part: &str| ApiError::BadRequest(format!("unable to parse requirement: {part:?}"));
        let mut requirements = Vec::new();
        for part in split_top_level(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let set = |rest: &str| -> Option<Vec<String>> {
                let inner = rest.trim().strip_prefix('(')?.strip_suffix(')')?;
                Some(inner.split(',').map(|v| v.trim().to_owned()).collect())
            };
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::DoesNotExist(key.trim().to_owned())
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(key.trim().to_owned(), set(rest).ok_or_else(|| bad(part))?)
            } else if let Some((key, rest)) = part.split_once(" in ") {
                Requirement::In(key.trim().to_owned(), set(rest).ok_or_else(|| bad(part))?)
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = part.split_once("==") {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if part.contains(['(', ')', ' ', '<', '>']) {
                return Err(bad(part));
            } else {
                Requirement::Exists(part.to_owned())
            };
            requirements.push(requirement);
        }
        Ok(LabelSelector(requirements))
    }

    /// Selects everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object's `metadata.labels` satisfy the selector.
    pub fn matches(&self, object: &Value) -> bool {
        let labels = object.pointer("/metadata/labels");
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => !label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// A parsed field selector: `path=value` and `path!=value` terms over the object's JSON
/// (`metadata.name`, `metadata.namespace`, `spec.nodeName`, `status.phase`,
/// `involvedObject.name`, …). A field that is absent compares as its type's zero value
/// (`""`, `"false"`, `"0"`), as kube-apiserver's field sets hold Go values: `spec.unschedulable=false`
/// matches a node that never set it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<Term>);

/// One `path=value` or `path!=value`, with what an absent field reads as.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Term {
    path: String,
    equal: bool,
    value: String,
    zero: &'static str,
}

impl FieldSelector {
    /// Parses a selector for objects of `def`, whose schema gives absent fields their zero
    /// values.
    pub fn for_resource(
        s: &str,
        def: &crate::registry::ResourceDef,
    ) -> Result<FieldSelector, ApiError> {
        let mut selector = FieldSelector::parse(s)?;
        match &def.selectable_fields {
            // A custom resource's absent selectable field reads as "", whatever its type.
            Some(selectable) => {
                for term in &selector.0 {
                    let known = term.path == "metadata.name"
                        || (def.namespaced && term.path == "metadata.namespace")
                        || selectable.contains(&term.path);
                    if !known {
                        return Err(ApiError::BadRequest(format!(
                            "field label not supported: {}",
                            term.path
                        )));
                    }
                }
            }
            None => {
                let labels = builtin_field_labels(&def.group, &def.kind);
                for term in &mut selector.0 {
                    let label = term.path.as_str();
                    if label == "metadata.name" || label == "metadata.namespace" {
                        continue;
                    }
                    let Some((_, path)) = labels.iter().find(|(l, _)| *l == label) else {
                        return Err(ApiError::BadRequest(if labels.is_empty() {
                            format!(
                                "{label:?} is not a known field selector: only \
                                 \"metadata.name\", \"metadata.namespace\""
                            )
                        } else {
                            format!("field label not supported: {label}")
                        }));
                    };
                    term.path = (*path).to_owned();
                }
                if let Some(schema) = &def.schema {
                    for term in &mut selector.0 {
                        let first = term.path.split('|').next().unwrap_or_default();
                        term.zero = schema.zero_value(first);
                    }
                }
            }
        }
        Ok(selector)
    }

    /// Parses `metadata.name=x,spec.nodeName!=` (absent fields read as `""`).
    pub fn parse(s: &str) -> Result<FieldSelector, ApiError> {
        let mut terms = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (path, equal, value) = if let Some((p, v)) = part.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = part.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = part.split_once('=') {
                (p, true, v)
            } else {
                return Err(ApiError::BadRequest(format!(
                    "invalid field selector: {part:?} (expected field=value or field!=value)"
                )));
            };
            terms.push(Term {
                path: path.trim().to_owned(),
                equal,
                value: value.trim().to_owned(),
                zero: "",
            });
        }
        Ok(FieldSelector(terms))
    }

    /// The value of `metadata.name=…`, if the selector pins one name.
    pub fn name(&self) -> Option<&str> {
        self.0
            .iter()
            .find(|t| t.equal && t.path == "metadata.name")
            .map(|t| t.value.as_str())
    }

    /// Selects everything.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an object satisfies every term.
    pub fn matches(&self, object: &Value) -> bool {
        self.0.iter().all(|term| {
            // `a|b`: the first of the fields that is set and not empty.
            let actual = term
                .path
                .split('|')
                .find_map(
                    |path| match object.pointer(&format!("/{}", path.replace('.', "/"))) {
                        Some(Value::String(s)) if s.is_empty() => None,
                        Some(Value::String(s)) => Some(s.clone()),
                        Some(Value::Null) | None => None,
                        Some(other) => Some(other.to_string()),
                    },
                )
                .unwrap_or_else(|| term.zero.to_owned());
            (actual == term.value) == term.equal
        })
    }
}

/// The field labels kube-apiserver accepts for a built-in kind besides `metadata.name` and
/// `metadata.namespace` (its field label conversion functions), each with the JSON path it
/// reads. Kinds without any accept only those two, as kube's default conversion does.
fn builtin_field_labels(group: &str, kind: &str) -> &'static [(&'static str, &'static str)] {
    match (group, kind) {
        ("", "Pod") => &[
            ("spec.nodeName", "spec.nodeName"),
            ("spec.restartPolicy", "spec.restartPolicy"),
            ("spec.schedulerName", "spec.schedulerName"),
            ("spec.serviceAccountName", "spec.serviceAccountName"),
            ("spec.hostNetwork", "spec.hostNetwork"),
            ("status.phase", "status.phase"),
            ("status.podIP", "status.podIP"),
            ("status.podIPs", "status.podIP"),
            ("status.nominatedNodeName", "status.nominatedNodeName"),
            // Old v1 clients' name for spec.nodeName.
            ("spec.host", "spec.nodeName"),
        ],
        ("", "Node") => &[("spec.unschedulable", "spec.unschedulable")],
        ("", "ReplicationController") => &[("status.replicas", "status.replicas")],
        ("", "Event") => &[
            ("involvedObject.kind", "involvedObject.kind"),
            ("involvedObject.namespace", "involvedObject.namespace"),
            ("involvedObject.name", "involvedObject.name"),
            ("involvedObject.uid", "involvedObject.uid"),
            ("involvedObject.apiVersion", "involvedObject.apiVersion"),
            (
                "involvedObject.resourceVersion",
                "involvedObject.resourceVersion",
            ),
            ("involvedObject.fieldPath", "involvedObject.fieldPath"),
            ("reason", "reason"),
            ("reportingComponent", "reportingComponent"),
            // An event's source is its reporting component when it names none (one
            // written through events.k8s.io).
            ("source", "source.component|reportingComponent"),
            ("type", "type"),
        ],
        // Stored as core v1 Events: the labels name the core fields.
        ("events.k8s.io", "Event") => &[
            ("regarding.kind", "involvedObject.kind"),
            ("regarding.namespace", "involvedObject.namespace"),
            ("regarding.name", "involvedObject.name"),
            ("regarding.uid", "involvedObject.uid"),
            ("regarding.apiVersion", "involvedObject.apiVersion"),
            (
                "regarding.resourceVersion",
                "involvedObject.resourceVersion",
            ),
            ("regarding.fieldPath", "involvedObject.fieldPath"),
            ("reason", "reason"),
            ("reportingController", "reportingComponent"),
            ("type", "type"),
        ],
        ("", "Namespace") => &[("status.phase", "status.phase")],
        ("", "Secret") => &[("type", "type")],
        ("", "Service") => &[
            ("spec.clusterIP", "spec.clusterIP"),
            ("spec.type", "spec.type"),
        ],
        ("batch", "Job") => &[("status.successful", "status.succeeded")],
        ("certificates.k8s.io", "CertificateSigningRequest") => {
            &[("spec.signerName", "spec.signerName")]
        }
        ("resource.k8s.io", "ResourceSlice") => &[
            ("spec.nodeName", "spec.nodeName"),
            ("spec.driver", "spec.driver"),
        ],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn label_selectors_equality_and_sets() {
        let obj = json!({"metadata": {"labels": {"app": "web", "tier": "front"}}});
        let m = |s: &str| LabelSelector::parse(s).unwrap().matches(&obj);
        assert!(m(""));
        assert!(m("app=web"));
        assert!(m("app==web,tier"));
        assert!(!m("app!=web"));
        assert!(m("app in (web, api)"));
        assert!(!m("app notin (web)"));
        assert!(m("!missing"));
        assert!(!m("missing"));
        assert!(m("tier in (front),app"));
        assert!(LabelSelector::parse("app in web").is_err());
    }

    #[test]
    fn field_selectors() {
        let obj = json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": {"nodeName": "n1"}});
        let m = |s: &str| FieldSelector::parse(s).unwrap().matches(&obj);
        assert!(m("metadata.name=p"));
        assert!(m("metadata.name=p,spec.nodeName=n1"));
        assert!(!m("spec.nodeName!=n1"));
        assert!(m("status.phase="));
        assert_eq!(
            FieldSelector::parse("metadata.name=p").unwrap().name(),
            Some("p")
        );
        assert!(FieldSelector::parse("nonsense").is_err());
    }

    #[test]
    fn absent_fields_are_their_zero_value() {
        let nodes = crate::registry::Registry::new(crate::registry::builtin_resources())
            .get("", "v1", "nodes")
            .unwrap();
        let node = json!({"metadata": {"name": "n1"}, "spec": {}});
        let m = |s: &str| {
            FieldSelector::for_resource(s, &nodes)
                .unwrap()
                .matches(&node)
        };
        assert!(m("spec.unschedulable=false"));
        assert!(!m("spec.unschedulable=true"));
        assert!(m("spec.unschedulable!=true,metadata.name=n1"));
    }

    /// Built-in kinds accept the field labels kube-apiserver does, with its aliases, and
    /// refuse any other with its message.
    #[test]
    fn built_in_kinds_refuse_unknown_field_labels() {
        let registry = crate::registry::Registry::new(crate::registry::builtin_resources());
        let def = |group: &str, plural: &str| registry.get(group, "v1", plural).unwrap();
        let error = |def: &crate::registry::ResourceDef, s: &str| {
            FieldSelector::for_resource(s, def).unwrap_err().to_string()
        };
        let nodes = def("", "nodes");
        assert!(error(&nodes, "spec.podCIDR=").contains("field label not supported: spec.podCIDR"));
        let config_maps = def("", "configmaps");
        assert!(
            error(&config_maps, "data.key=x")
                .contains(r#""data.key" is not a known field selector: only "metadata.name", "metadata.namespace""#)
        );
        assert!(FieldSelector::for_resource("metadata.namespace=a", &config_maps).is_ok());
        let pods = def("", "pods");
        let pod = json!({"spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let m = |s: &str| FieldSelector::for_resource(s, &pods).unwrap().matches(&pod);
        assert!(m(
            "spec.host=n1,status.phase=Running,spec.hostNetwork=false"
        ));
        let events = def("", "events");
        let event = json!({"source": {"component": "kubelet"}, "involvedObject": {"uid": "u"}});
        let e = |s: &str| {
            FieldSelector::for_resource(s, &events)
                .unwrap()
                .matches(&event)
        };
        assert!(e("source=kubelet,involvedObject.uid=u"));
        // Written through events.k8s.io: no source, a reporting controller; both APIs'
        // labels select the stored (core) form.
        let stored = json!({"reportingComponent": "ctl", "involvedObject": {"kind": "Pod"}});
        let core = |s: &str| {
            FieldSelector::for_resource(s, &events)
                .unwrap()
                .matches(&stored)
        };
        assert!(core(
            "source=ctl,reportingComponent=ctl,involvedObject.kind=Pod"
        ));
        let events_v1 = def("events.k8s.io", "events");
        let v1 = |s: &str| {
            FieldSelector::for_resource(s, &events_v1)
                .unwrap()
                .matches(&stored)
        };
        assert!(v1("reportingController=ctl,regarding.kind=Pod"));
        assert!(!v1("reportingController=other"));
        assert!(error(&events_v1, "note=x").contains("field label not supported: note"));
        let jobs = def("batch", "jobs");
        let job = json!({"status": {"succeeded": 2}});
        assert!(
            FieldSelector::for_resource("status.successful=2", &jobs)
                .unwrap()
                .matches(&job)
        );
        assert!(
            FieldSelector::for_resource("status.successful=0", &jobs)
                .unwrap()
                .matches(&json!({"status": {}}))
        );
    }
}
