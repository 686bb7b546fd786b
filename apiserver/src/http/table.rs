//! Server-side tables: what `kubectl get` prints. kubectl asks for
//! `application/json;as=Table;v=v1;g=meta.k8s.io` and prints the columns the server chose —
//! the familiar ones per kind, the `additionalPrinterColumns` of custom resources, or NAME and
//! AGE. Columns with a priority above 0 show only with `-o wide`.

use serde_json::{Value, json};

use crate::registry::ResourceDef;

/// One column: header, type, priority, and how to fill it from an object.
#[derive(Clone, Copy)]
struct Column {
    name: &'static str,
    kind: &'static str,
    priority: u8,
    cell: fn(&Value) -> Value,
}

fn s(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn or_none(text: String) -> Value {
    Value::String(if text.is_empty() {
        "<none>".into()
    } else {
        text
    })
}

/// `kubectl`'s short human durations: 45s, 5m, 3h, 2d.
pub fn age(timestamp: Option<&Value>) -> Value {
    let Some(Ok(then)) = timestamp
        .and_then(Value::as_str)
        .map(str::parse::<jiff::Timestamp>)
    else {
        return json!("<unknown>");
    };
    let secs = (jiff::Timestamp::now().as_second() - then.as_second()).max(0);
    let text = match secs {
        0..=119 => format!("{secs}s"),
        120..=599 => format!("{}m{}s", secs / 60, secs % 60),
        600..=10799 => format!("{}m", secs / 60),
        10800..=172799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    };
    json!(text)
}

fn name(o: &Value) -> Value {
    json!(s(o.pointer("/metadata/name")))
}

fn created(o: &Value) -> Value {
    age(o.pointer("/metadata/creationTimestamp"))
}

fn count(v: Option<&Value>) -> usize {
    match v {
        Some(Value::Object(m)) => m.len(),
        Some(Value::Array(a)) => a.len(),
        _ => 0,
    }
}

fn int(v: Option<&Value>) -> i64 {
    v.and_then(Value::as_i64).unwrap_or(0)
}

fn join_containers(o: &Value, pointer: &str, field: &str) -> Value {
    let items: Vec<String> = o
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(|cs| cs.iter().map(|c| s(c.get(field))).collect())
        .unwrap_or_default();
    json!(items.join(","))
}

fn selector(o: &Value) -> Value {
    let labels = o
        .pointer("/spec/selector/matchLabels")
        .or_else(|| o.pointer("/spec/selector"))
        .and_then(Value::as_object);
    let text: Vec<String> = labels
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| format!("{k}={v}")))
                .collect()
        })
        .unwrap_or_default();
    or_none(text.join(","))
}

/// `kubectl get pods` STATUS: the reason, the waiting/terminated reason of a container, or
/// the phase; `Terminating` once deleted.
fn pod_status(o: &Value) -> Value {
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        return json!("Terminating");
    }
    let mut status = s(o.pointer("/status/reason"));
    if status.is_empty() {
        status = s(o.pointer("/status/phase"));
    }
    if let Some(statuses) = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
    {
        for c in statuses {
            let reason = s(c.pointer("/state/waiting/reason"))
                .or_else_empty(|| s(c.pointer("/state/terminated/reason")));
            if !reason.is_empty() {
                status = reason;
            }
        }
    }
    or_none(if status.is_empty() {
        "Pending".into()
    } else {
        status
    })
}

trait OrElseEmpty {
    fn or_else_empty(self, f: impl FnOnce() -> String) -> String;
}

impl OrElseEmpty for String {
    fn or_else_empty(self, f: impl FnOnce() -> String) -> String {
        if self.is_empty() { f() } else { self }
    }
}

fn pod_ready(o: &Value) -> Value {
    let total = count(o.pointer("/spec/containers"));
    let ready = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter(|c| c["ready"].as_bool() == Some(true))
                .count()
        })
        .unwrap_or(0);
    json!(format!("{ready}/{total}"))
}

fn pod_restarts(o: &Value) -> Value {
    let restarts: i64 = o
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .map(|cs| cs.iter().map(|c| int(c.get("restartCount"))).sum())
        .unwrap_or(0);
    json!(restarts)
}

fn node_status(o: &Value) -> Value {
    let ready = o
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .map(|c| c["status"] == "True");
    let mut status = match ready {
        Some(true) => "Ready".to_owned(),
        Some(false) => "NotReady".to_owned(),
        None => "Unknown".to_owned(),
    };
    if o.pointer("/spec/unschedulable").and_then(Value::as_bool) == Some(true) {
        status.push_str(",SchedulingDisabled");
    }
    json!(status)
}

fn node_roles(o: &Value) -> Value {
    let roles: Vec<String> = o
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|labels| {
            labels
                .keys()
                .filter_map(|k| {
                    k.strip_prefix("node-role.kubernetes.io/")
                        .map(str::to_owned)
                })
                .collect()
        })
        .unwrap_or_default();
    or_none(roles.join(","))
}

fn node_address(o: &Value, kind: &str) -> Value {
    let address = o
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().find(|x| x["type"] == kind))
        .map(|x| s(x.get("address")))
        .unwrap_or_default();
    or_none(address)
}

fn service_ports(o: &Value) -> Value {
    let ports: Vec<String> = o
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .map(|ps| {
            ps.iter()
                .map(|p| {
                    let protocol = s(p.get("protocol")).or_else_empty(|| "TCP".into());
                    match p.get("nodePort") {
                        Some(node) => format!("{}:{}/{protocol}", s(p.get("port")), s(Some(node))),
                        None => format!("{}/{protocol}", s(p.get("port"))),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    or_none(ports.join(","))
}

/// The `-o wide` columns every workload kind shares.
fn workload_wide() -> [Column; 3] {
    [
        Column {
            name: "Containers",
            kind: "string",
            priority: 1,
            cell: |o| join_containers(o, "/spec/template/spec/containers", "name"),
        },
        Column {
            name: "Images",
            kind: "string",
            priority: 1,
            cell: |o| join_containers(o, "/spec/template/spec/containers", "image"),
        },
        Column {
            name: "Selector",
            kind: "string",
            priority: 1,
            cell: selector,
        },
    ]
}

fn columns(def: &ResourceDef) -> Vec<Column> {
    let wide = workload_wide();
    macro_rules! col {
        ($name:expr, $kind:expr, $priority:expr, $cell:expr) => {
            Column {
                name: $name,
                kind: $kind,
                priority: $priority,
                cell: $cell,
            }
        };
    }
    let name_col = col!("Name", "string", 0, name);
    let age_col = col!("Age", "string", 0, created);
    match (def.group.as_str(), def.kind.as_str()) {
        ("", "Namespace") => vec![
            name_col,
            col!("Status", "string", 0, |o| json!(s(
                o.pointer("/status/phase")
            ))),
            age_col,
        ],
        ("", "Pod") => vec![
            name_col,
            col!("Ready", "string", 0, pod_ready),
            col!("Status", "string", 0, pod_status),
            col!("Restarts", "string", 0, pod_restarts),
            age_col,
            col!("IP", "string", 1, |o| or_none(
                s(o.pointer("/status/podIP"))
            )),
            col!("Node", "string", 1, |o| or_none(s(
                o.pointer("/spec/nodeName")
            ))),
            col!("Nominated Node", "string", 1, |o| or_none(s(
                o.pointer("/status/nominatedNodeName")
            ))),
            col!("Readiness Gates", "string", 1, |_| json!("<none>")),
        ],
        ("", "Node") => vec![
            name_col,
            col!("Status", "string", 0, node_status),
            col!("Roles", "string", 0, node_roles),
            age_col,
            col!("Version", "string", 0, |o| json!(s(
                o.pointer("/status/nodeInfo/kubeletVersion")
            ))),
            col!("Internal-IP", "string", 1, |o| node_address(
                o,
                "InternalIP"
            )),
            col!("External-IP", "string", 1, |o| node_address(
                o,
                "ExternalIP"
            )),
            col!("OS-Image", "string", 1, |o| json!(s(
                o.pointer("/status/nodeInfo/osImage")
            ))),
            col!("Kernel-Version", "string", 1, |o| json!(s(
                o.pointer("/status/nodeInfo/kernelVersion")
            ))),
            col!("Container-Runtime", "string", 1, |o| json!(s(
                o.pointer("/status/nodeInfo/containerRuntimeVersion")
            ))),
        ],
        ("", "Service") => vec![
            name_col,
            col!("Type", "string", 0, |o| json!(
                s(o.pointer("/spec/type")).or_else_empty(|| "ClusterIP".into())
            )),
            col!("Cluster-IP", "string", 0, |o| or_none(s(
                o.pointer("/spec/clusterIP")
            ))),
            col!("External-IP", "string", 0, |o| {
                let ips: Vec<String> = o
                    .pointer("/spec/externalIPs")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|v| s(Some(v))).collect())
                    .unwrap_or_default();
                or_none(ips.join(","))
            }),
            col!("Port(s)", "string", 0, service_ports),
            age_col,
            col!("Selector", "string", 1, selector),
        ],
        ("", "ConfigMap") => vec![
            name_col,
            col!("Data", "integer", 0, |o| json!(
                count(o.get("data")) + count(o.get("binaryData"))
            )),
            age_col,
        ],
        ("", "Secret") => vec![
            name_col,
            col!("Type", "string", 0, |o| json!(
                s(o.get("type")).or_else_empty(|| "Opaque".into())
            )),
            col!("Data", "integer", 0, |o| json!(count(o.get("data")))),
            age_col,
        ],
        ("", "ServiceAccount") => vec![
            name_col,
            col!("Secrets", "integer", 0, |o| json!(count(o.get("secrets")))),
            age_col,
        ],
        ("", "Event") => vec![
            col!("Last Seen", "string", 0, |o| age(o
                .get("lastTimestamp")
                .filter(|v| !v.is_null())
                .or_else(|| o.get("eventTime"))
                .or_else(|| o.pointer("/metadata/creationTimestamp")))),
            col!("Type", "string", 0, |o| json!(s(o.get("type")))),
            col!("Reason", "string", 0, |o| json!(s(o.get("reason")))),
            col!("Object", "string", 0, |o| json!(format!(
                "{}/{}",
                s(o.pointer("/involvedObject/kind")).to_ascii_lowercase(),
                s(o.pointer("/involvedObject/name"))
            ))),
            col!("Message", "string", 0, |o| json!(s(o.get("message")))),
        ],
        ("apps", "Deployment") => vec![
            name_col,
            col!("Ready", "string", 0, |o| json!(format!(
                "{}/{}",
                int(o.pointer("/status/readyReplicas")),
                int(o.pointer("/spec/replicas"))
            ))),
            col!("Up-to-date", "integer", 0, |o| json!(int(
                o.pointer("/status/updatedReplicas")
            ))),
            col!("Available", "integer", 0, |o| json!(int(
                o.pointer("/status/availableReplicas")
            ))),
            age_col,
            wide[0],
            wide[1],
            wide[2],
        ],
        ("apps", "ReplicaSet") => vec![
            name_col,
            col!("Desired", "integer", 0, |o| json!(int(
                o.pointer("/spec/replicas")
            ))),
            col!("Current", "integer", 0, |o| json!(int(
                o.pointer("/status/replicas")
            ))),
            col!("Ready", "integer", 0, |o| json!(int(
                o.pointer("/status/readyReplicas")
            ))),
            age_col,
            wide[0],
            wide[1],
            wide[2],
        ],
        ("apps", "DaemonSet") => vec![
            name_col,
            col!("Desired", "integer", 0, |o| json!(int(
                o.pointer("/status/desiredNumberScheduled")
            ))),
            col!("Current", "integer", 0, |o| json!(int(
                o.pointer("/status/currentNumberScheduled")
            ))),
            col!("Ready", "integer", 0, |o| json!(int(
                o.pointer("/status/numberReady")
            ))),
            col!("Up-to-date", "integer", 0, |o| json!(int(
                o.pointer("/status/updatedNumberScheduled")
            ))),
            col!("Available", "integer", 0, |o| json!(int(
                o.pointer("/status/numberAvailable")
            ))),
            col!("Node Selector", "string", 0, |o| {
                let m: Vec<String> = o
                    .pointer("/spec/template/spec/nodeSelector")
                    .and_then(Value::as_object)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", s(Some(v))))
                            .collect()
                    })
                    .unwrap_or_default();
                or_none(m.join(","))
            }),
            age_col,
            wide[0],
            wide[1],
            wide[2],
        ],
        ("coordination.k8s.io", "Lease") => vec![
            name_col,
            col!("Holder", "string", 0, |o| json!(s(
                o.pointer("/spec/holderIdentity")
            ))),
            age_col,
        ],
        _ => vec![name_col, age_col],
    }
}

/// Evaluates the JSONPath subset printer columns use: `.a.b`, `.a[0]`, `.a[*].b`,
/// `.a[?(@.type=="Ready")].status`.
pub fn json_path(object: &Value, path: &str) -> Vec<Value> {
    let path = path
        .trim()
        .trim_start_matches('{')
        .trim_end_matches('}')
        .trim_start_matches('$');
    let mut current = vec![object.clone()];
    let mut rest = path;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix('.') {
            let end = after.find(['.', '[']).unwrap_or(after.len());
            let field = &after[..end];
            current = current
                .iter()
                .filter_map(|v| v.get(field).cloned())
                .collect();
            rest = &after[end..];
        } else if let Some(after) = rest.strip_prefix('[') {
            let Some(end) = after.find(']') else {
                return Vec::new();
            };
            let selector = &after[..end];
            rest = &after[end + 1..];
            current = current
                .iter()
                .flat_map(|v| {
                    let items = v.as_array().cloned().unwrap_or_default();
                    if selector == "*" {
                        items
                    } else if let Ok(i) = selector.parse::<usize>() {
                        items.get(i).cloned().into_iter().collect()
                    } else if let Some(filter) = selector
                        .strip_prefix("?(@.")
                        .and_then(|f| f.strip_suffix(')'))
                    {
                        let (field, want) = filter.split_once("==").unwrap_or((filter, ""));
                        let want = want.trim().trim_matches(|c| c == '"' || c == '\'');
                        items
                            .into_iter()
                            .filter(|item| {
                                s(item.pointer(&format!("/{}", field.trim().replace('.', "/"))))
                                    == want
                            })
                            .collect()
                    } else {
                        Vec::new()
                    }
                })
                .collect();
        } else {
            return Vec::new();
        }
    }
    current
}

/// Computes a row's cells from an object.
type Cells = Box<dyn Fn(&Value) -> Vec<Value> + Send + Sync>;

/// The column definitions and cell function for `def`, custom resources' printer columns
/// included (`crd_columns`: the version's `additionalPrinterColumns`).
fn definitions(def: &ResourceDef, crd_columns: Option<&[Value]>) -> (Vec<Value>, Cells) {
    if let Some(extra) = crd_columns.filter(|c| !c.is_empty()) {
        let extra: Vec<Value> = extra.to_vec();
        let mut defs = vec![
            json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
        ];
        for c in &extra {
            defs.push(json!({
                "name": s(c.get("name")), "type": s(c.get("type")), "format": s(c.get("format")),
                "description": s(c.get("description")), "priority": int(c.get("priority")),
            }));
        }
        let cells = move |o: &Value| {
            let mut row = vec![name(o)];
            for c in &extra {
                let values = json_path(o, &s(c.get("jsonPath")));
                let cell = match (c["type"].as_str(), values.first()) {
                    (Some("date"), Some(v)) => age(Some(v)),
                    (_, Some(Value::String(s))) => json!(s),
                    (_, Some(v)) => v.clone(),
                    (_, None) => Value::Null,
                };
                row.push(cell);
            }
            row
        };
        return (defs, Box::new(cells));
    }
    let cols = columns(def);
    let defs = cols
        .iter()
        .map(|c| {
            let format = if c.name == "Name" { "name" } else { "" };
            json!({"name": c.name, "type": c.kind, "format": format, "description": "", "priority": c.priority})
        })
        .collect();
    let cells: Vec<fn(&Value) -> Value> = cols.iter().map(|c| c.cell).collect();
    (
        defs,
        Box::new(move |o: &Value| cells.iter().map(|f| f(o)).collect()),
    )
}

/// The object in a row: its metadata only (kubectl's default), or all of it.
fn row_object(object: &Value, include_object: Option<&str>) -> Value {
    match include_object {
        Some("Object") => object.clone(),
        Some("None") => Value::Null,
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": object.get("metadata").cloned().unwrap_or_default(),
        }),
    }
}

/// A Table of `objects`, with the list metadata.
pub fn table(
    def: &ResourceDef,
    crd_columns: Option<&[Value]>,
    objects: &[Value],
    metadata: Value,
    include_object: Option<&str>,
) -> Value {
    let (column_definitions, cells) = definitions(def, crd_columns);
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| json!({"cells": cells(o), "object": row_object(o, include_object)}))
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": metadata,
        "columnDefinitions": column_definitions,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_paths() {
        let o = json!({"status": {"conditions": [{"type": "A", "status": "False"}, {"type": "Ready", "status": "True"}]},
                       "spec": {"items": [{"n": 1}, {"n": 2}]}});
        assert_eq!(
            json_path(&o, ".status.conditions[?(@.type==\"Ready\")].status"),
            vec![json!("True")]
        );
        assert_eq!(json_path(&o, ".spec.items[1].n"), vec![json!(2)]);
        assert_eq!(json_path(&o, ".spec.items[*].n"), vec![json!(1), json!(2)]);
        assert!(json_path(&o, ".missing.x").is_empty());
    }
}
