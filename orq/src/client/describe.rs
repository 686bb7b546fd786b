//! `orq describe`: a readable summary of one object — metadata, labels, annotations, for
//! Pods their containers and states, the rest of the object as indented fields, its status
//! conditions — and the Events (core `v1` Events, which the API server stores) whose
//! `involvedObject` is it.

use std::fmt::Write as _;

use anyhow::bail;
use clap::Args;
use k8s_openapi::api::core::v1::Event;
use kube::api::ListParams;
use serde_json::Value;

use super::{ConnectArgs, NamespaceArgs};

/// `orq describe` flags.
#[derive(Debug, Args)]
pub struct DescribeArgs {
    /// The resource type (as for `get`), or `TYPE/NAME`.
    #[arg(value_name = "KIND")]
    kind: String,
    /// The object(s) to describe.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    #[command(flatten)]
    namespace: NamespaceArgs,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Top-level fields are aligned to this width, as kubectl's are.
const WIDTH: usize = 14;

fn field(out: &mut String, indent: usize, key: &str, value: &str) {
    let label = format!("{key}:");
    let width = WIDTH.saturating_sub(indent).max(label.len() + 1);
    let _ = writeln!(out, "{:indent$}{label:width$}{value}", "");
}

fn text(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "<none>".into(),
        Some(Value::String(s)) if s.is_empty() => "<none>".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// `a=b` lines for a label or annotation map, the first on the field's line.
fn map_field(out: &mut String, key: &str, map: Option<&Value>) {
    let pairs: Vec<String> = map
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", text(Some(v))))
                .collect()
        })
        .unwrap_or_default();
    match pairs.split_first() {
        None => field(out, 0, key, "<none>"),
        Some((first, rest)) => {
            field(out, 0, key, first);
            for pair in rest {
                let _ = writeln!(out, "{:WIDTH$}{pair}", "");
            }
        }
    }
}

/// `camelCase` as kubectl's describe shows it: `Camel Case`.
fn title(key: &str) -> String {
    let mut out = String::new();
    let mut previous_upper = true;
    for c in key.chars() {
        if out.is_empty() {
            out.extend(c.to_uppercase());
        } else {
            if c.is_uppercase() && !previous_upper {
                out.push(' ');
            }
            out.push(c);
        }
        previous_upper = c.is_uppercase();
    }
    out
}

/// Maps whose keys are data, not field names: shown as they are, not title-cased.
const RAW_KEYS: &[&str] = &[
    "data",
    "binaryData",
    "stringData",
    "labels",
    "annotations",
    "matchLabels",
    "nodeSelector",
    "selector",
];

/// Any JSON as indented `Key:  value` lines (kubectl's generic describer); keys are
/// title-cased unless `raw` (the keys of a data map).
fn nested(out: &mut String, indent: usize, value: &Value, raw: bool) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let shown = if raw { key.clone() } else { title(key) };
                let raw_inside = RAW_KEYS.contains(&key.as_str());
                match v {
                    Value::Object(m) if !m.is_empty() => {
                        let _ = writeln!(out, "{:indent$}{shown}:", "");
                        nested(out, indent + 2, v, raw_inside);
                    }
                    Value::Array(items) if items.iter().any(Value::is_object) => {
                        let _ = writeln!(out, "{:indent$}{shown}:", "");
                        for item in items {
                            nested(out, indent + 2, item, false);
                            let _ = writeln!(out);
                        }
                    }
                    Value::Array(items) => {
                        let joined: Vec<String> = items.iter().map(|i| text(Some(i))).collect();
                        let _ = writeln!(out, "{:indent$}{shown}:  {}", "", joined.join(", "));
                    }
                    other => {
                        let _ = writeln!(out, "{:indent$}{shown}:  {}", "", text(Some(other)));
                    }
                }
            }
        }
        other => {
            let _ = writeln!(out, "{:indent$}{}", "", text(Some(other)));
        }
    }
}

/// Rows as columns padded to their widest cell (the first row is the header).
fn columns(out: &mut String, indent: usize, rows: &[Vec<String>]) {
    let mut widths = Vec::new();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if widths.len() <= i {
                widths.push(0);
            }
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = format!("{:indent$}", "");
        for (i, cell) in row.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < row.len() {
                line.extend(std::iter::repeat_n(
                    ' ',
                    widths[i] - cell.chars().count() + 2,
                ));
            }
        }
        let _ = writeln!(out, "{line}");
    }
}

fn conditions(out: &mut String, object: &Value) {
    let Some(conditions) = object
        .pointer("/status/conditions")
        .and_then(Value::as_array)
    else {
        return;
    };
    let _ = writeln!(out, "Conditions:");
    let mut rows: Vec<Vec<String>> = vec![vec![
        "Type".into(),
        "Status".into(),
        "Reason".into(),
        "Message".into(),
    ]];
    rows.push(rows[0].iter().map(|h| "-".repeat(h.len())).collect());
    for c in conditions {
        rows.push(
            ["type", "status", "reason", "message"]
                .iter()
                .map(|k| c.get(*k).and_then(Value::as_str).unwrap_or("").to_owned())
                .collect(),
        );
    }
    columns(out, 2, &rows);
}

fn container_state(out: &mut String, state: Option<&Value>) {
    let Some((name, details)) = state
        .and_then(Value::as_object)
        .and_then(|m| m.iter().next())
    else {
        field(out, 4, "State", "<unknown>");
        return;
    };
    field(out, 4, "State", &title(name));
    if let Some(details) = details.as_object() {
        for (k, v) in details {
            field(out, 6, &title(k), &text(Some(v)));
        }
    }
}

fn pod(out: &mut String, object: &Value) {
    field(out, 0, "Node", &text(object.pointer("/spec/nodeName")));
    field(out, 0, "Status", &text(object.pointer("/status/phase")));
    field(out, 0, "IP", &text(object.pointer("/status/podIP")));
    let statuses = object
        .pointer("/status/containerStatuses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let _ = writeln!(out, "Containers:");
    for container in object
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
    {
        let name = text(container.get("name"));
        let _ = writeln!(out, "  {name}:");
        field(out, 4, "Image", &text(container.get("image")));
        let ports: Vec<String> = container
            .get("ports")
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        format!(
                            "{}/{}",
                            text(p.get("containerPort")),
                            p.get("protocol").and_then(Value::as_str).unwrap_or("TCP")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        field(
            out,
            4,
            "Port",
            &if ports.is_empty() {
                "<none>".into()
            } else {
                ports.join(", ")
            },
        );
        for key in ["command", "args"] {
            if let Some(items) = container.get(key).and_then(Value::as_array) {
                let items: Vec<String> = items.iter().map(|i| text(Some(i))).collect();
                field(out, 4, &title(key), &items.join(" "));
            }
        }
        let status = statuses
            .iter()
            .find(|s| s.get("name") == container.get("name"));
        match status {
            Some(status) => {
                container_state(out, status.get("state"));
                field(out, 4, "Ready", &title(&text(status.get("ready"))));
                field(out, 4, "Restart Count", &text(status.get("restartCount")));
            }
            None => field(out, 4, "State", "<not started>"),
        }
        if let Some(env) = container.get("env").and_then(Value::as_array) {
            let _ = writeln!(out, "    Environment:");
            for e in env {
                let _ = writeln!(
                    out,
                    "      {}:  {}",
                    text(e.get("name")),
                    text(e.get("value"))
                );
            }
        }
    }
}

/// Runs `orq describe`.
pub async fn run(args: DescribeArgs) -> anyhow::Result<()> {
    let (kind, names) = match args.kind.split_once('/') {
        Some((kind, name)) => {
            let mut names = vec![name.to_owned()];
            names.extend(args.names.iter().cloned());
            (kind.to_owned(), names)
        }
        None => (args.kind.clone(), args.names.clone()),
    };
    if names.is_empty() {
        bail!("name the object to describe: orq describe {kind} NAME");
    }
    let session = args.connect.connect().await?;
    let resource = session.resources().await?.resolve(&kind)?;
    let namespace = session.namespace(&args.namespace);
    let api = resource.api(&session.client, Some(&namespace));
    for (i, name) in names.iter().enumerate() {
        let object = api.get(name).await.map_err(|e| session.error(e))?;
        let mut value = serde_json::to_value(&object)?;
        let mut out = String::new();
        field(&mut out, 0, "Name", name);
        if resource.namespaced {
            field(&mut out, 0, "Namespace", &namespace);
        }
        field(&mut out, 0, "Kind", &resource.api.kind);
        map_field(&mut out, "Labels", value.pointer("/metadata/labels"));
        let mut annotations = value.pointer("/metadata/annotations").cloned();
        if let Some(map) = annotations.as_mut().and_then(Value::as_object_mut) {
            map.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        map_field(&mut out, "Annotations", annotations.as_ref());
        field(
            &mut out,
            0,
            "Created",
            &text(value.pointer("/metadata/creationTimestamp")),
        );
        if let Some(deleted) = value.pointer("/metadata/deletionTimestamp") {
            field(
                &mut out,
                0,
                "Deleting",
                &format!("since {}", text(Some(deleted))),
            );
        }
        if let Some(owners) = value
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
        {
            let owners: Vec<String> = owners
                .iter()
                .map(|o| format!("{}/{}", text(o.get("kind")), text(o.get("name"))))
                .collect();
            field(&mut out, 0, "Controlled By", &owners.join(", "));
        }
        if resource.api.kind == "Pod" && resource.api.group.is_empty() {
            pod(&mut out, &value);
        } else if let Some(map) = value.as_object_mut() {
            // Everything but what is shown above, kubectl's generic way.
            for key in ["apiVersion", "kind", "metadata"] {
                map.remove(key);
            }
            if let Some(status) = map.get_mut("status").and_then(Value::as_object_mut) {
                status.remove("conditions");
                if status.is_empty() {
                    map.remove("status");
                }
            }
            nested(&mut out, 0, &Value::Object(map.clone()), false);
        }
        conditions(&mut out, &serde_json::to_value(&object)?);
        let uid = object.metadata.uid.clone().unwrap_or_default();
        let events: kube::Api<Event> = if resource.namespaced {
            kube::Api::namespaced(session.client.clone(), &namespace)
        } else {
            kube::Api::all(session.client.clone())
        };
        let lp = ListParams::default().fields(&format!("involvedObject.uid={uid}"));
        match events.list(&lp).await {
            Ok(list) if !list.items.is_empty() => {
                let _ = writeln!(out, "Events:");
                let mut rows = vec![
                    vec![
                        "Type".into(),
                        "Reason".into(),
                        "Age".into(),
                        "From".into(),
                        "Message".into(),
                    ],
                    vec![
                        "----".into(),
                        "------".into(),
                        "---".into(),
                        "----".into(),
                        "-------".into(),
                    ],
                ];
                let mut items = list.items;
                items.sort_by_key(|e| e.last_timestamp.clone().map(|t| t.0));
                for e in items {
                    let e = serde_json::to_value(e)?;
                    let when = e
                        .get("lastTimestamp")
                        .or_else(|| e.get("eventTime"))
                        .or_else(|| e.pointer("/metadata/creationTimestamp"));
                    let age = orquestra_apiserver::table::age(when);
                    rows.push(vec![
                        text(e.get("type")),
                        text(e.get("reason")),
                        text(Some(&age)),
                        text(
                            e.pointer("/source/component")
                                .or_else(|| e.get("reportingComponent")),
                        ),
                        text(e.get("message")).trim().to_owned(),
                    ]);
                }
                columns(&mut out, 2, &rows);
            }
            Ok(_) => {
                let _ = writeln!(out, "Events:       <none>");
            }
            // Events are a nicety: a user who may not list them still gets the rest.
            Err(_) => {}
        }
        if i > 0 {
            println!();
        }
        print!("{out}");
    }
    Ok(())
}
