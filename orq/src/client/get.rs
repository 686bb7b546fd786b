//! `orq get`: lists or reads objects of one kind — as the server-side Table kubectl prints,
//! as YAML or JSON, or as `kind/name` lines — and optionally keeps watching.

use std::io::Write as _;

use anyhow::{Context as _, bail};
use clap::{Args, ValueEnum};
use futures::{StreamExt as _, TryStreamExt as _};
use kube::api::{GetParams, ListParams, WatchEvent, WatchParams};
use kube::core::DynamicObject;
use serde_json::{Value, json};

use super::table::{Layout, render};
use super::{ConnectArgs, NamespaceArgs, Resource, Session};

/// What `Accept` kubectl sends for `get`: a Table, else plain JSON.
const ACCEPT_TABLE: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

/// `-o`: how objects are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The server's table with every column (the default shows the priority-0 ones).
    Wide,
    /// The full objects as YAML.
    Yaml,
    /// The full objects as JSON.
    Json,
    /// `kind/name` per object.
    Name,
}

/// `orq get` flags.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// The resource type: plural, singular or short name or kind (`pods`, `pod`, `po`,
    /// `Pod`), optionally with its group (`deployments.apps`); or `TYPE/NAME`.
    #[arg(value_name = "KIND")]
    kind: String,
    /// Only these objects (default: all of them); `TYPE/NAME` forms when KIND is one too.
    #[arg(value_name = "NAME")]
    names: Vec<String>,
    #[command(flatten)]
    namespace: NamespaceArgs,
    /// List the objects of every namespace (adds a NAMESPACE column).
    #[arg(short = 'A', long, conflicts_with = "namespace")]
    all_namespaces: bool,
    /// Output format: the table (default), wide, yaml, json or name.
    #[arg(short, long, value_enum, value_name = "FORMAT")]
    output: Option<Output>,
    /// Only objects whose labels match this selector (`app=web`, `tier in (a,b)`, `!x`).
    #[arg(short = 'l', long, value_name = "SELECTOR")]
    selector: Option<String>,
    /// Only objects whose fields match this selector (`status.phase=Running`).
    #[arg(long, value_name = "SELECTOR")]
    field_selector: Option<String>,
    /// After listing, watch for changes and print each changed object until interrupted.
    #[arg(short, long)]
    watch: bool,
    #[command(flatten)]
    connect: ConnectArgs,
}

/// Groups `KIND NAME…` or `TYPE/NAME…` arguments by type.
fn targets(kind: &str, names: &[String]) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    if !kind.contains('/') {
        return Ok(vec![(kind.to_owned(), names.to_vec())]);
    }
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for arg in std::iter::once(kind).chain(names.iter().map(String::as_str)) {
        let Some((kind, name)) = arg.split_once('/') else {
            bail!(
                "there is no need to specify a resource type as a separate argument when passing arguments in resource/name form: {arg:?}"
            );
        };
        match out.iter_mut().find(|(k, _)| k == kind) {
            Some((_, names)) => names.push(name.to_owned()),
            None => out.push((kind.to_owned(), vec![name.to_owned()])),
        }
    }
    Ok(out)
}

/// A kube-built request asking for a Table.
fn as_table(mut request: http::Request<Vec<u8>>) -> http::Request<Vec<u8>> {
    request.headers_mut().insert(
        http::header::ACCEPT,
        http::HeaderValue::from_static(ACCEPT_TABLE),
    );
    request
}

/// A list object as kubectl prints several objects.
fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}})
}

/// An object with its `apiVersion` and `kind` (list items come without them).
fn typed(resource: &Resource, object: DynamicObject) -> anyhow::Result<Value> {
    let mut value = serde_json::to_value(object)?;
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), json!(resource.api.api_version));
        map.insert("kind".into(), json!(resource.api.kind));
    }
    Ok(value)
}

fn print_value(value: &Value, output: Output) -> anyhow::Result<()> {
    let text = match output {
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
        _ => serde_yaml::to_string(value)?,
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// Runs `orq get`.
pub async fn run(args: GetArgs) -> anyhow::Result<()> {
    let session = args.connect.connect().await?;
    let resources = session.resources().await?;
    let namespace = session.namespace(&args.namespace);
    let namespace = (!args.all_namespaces).then_some(namespace);
    let targets = targets(&args.kind, &args.names)?;
    if args.watch {
        let [(kind, names)] = targets.as_slice() else {
            bail!("watch is only supported on a single resource type");
        };
        if names.len() > 1 {
            bail!("watch is only supported on a single object (or on all of a type)");
        }
        let resource = resources.resolve(kind)?;
        return watch(
            &session,
            &resource,
            namespace.as_deref(),
            names.first(),
            &args,
        )
        .await;
    }
    let mut printed_any = false;
    let mut values = Vec::new();
    for (kind, names) in &targets {
        let resource = resources.resolve(kind)?;
        match args.output {
            None | Some(Output::Wide) => {
                let table = table(&session, &resource, namespace.as_deref(), names, &args).await?;
                let wide = args.output == Some(Output::Wide);
                let all = args.all_namespaces && resource.namespaced;
                if let Some(text) = render(&table, wide, all) {
                    if printed_any {
                        println!();
                    }
                    print!("{text}");
                    printed_any = true;
                }
            }
            Some(output) => {
                let api = resource.api(&session.client, namespace.as_deref());
                let objects = if names.is_empty() {
                    let lp = list_params(&args);
                    api.list(&lp).await.map_err(|e| session.error(e))?.items
                } else {
                    let mut objects = Vec::new();
                    for name in names {
                        objects.push(api.get(name).await.map_err(|e| session.error(e))?);
                    }
                    objects
                };
                for object in objects {
                    if output == Output::Name {
                        println!(
                            "{}/{}",
                            resource.type_name(),
                            object.metadata.name.as_deref().unwrap_or_default()
                        );
                        printed_any = true;
                    } else {
                        values.push(typed(&resource, object)?);
                    }
                }
            }
        }
    }
    match args.output {
        Some(Output::Yaml | Output::Json) => {
            let single = targets.iter().all(|(_, names)| !names.is_empty()) && values.len() == 1;
            let value = if single {
                values.remove(0)
            } else {
                list(values)
            };
            print_value(&value, args.output.unwrap_or(Output::Yaml))?;
        }
        _ if !printed_any => match namespace {
            Some(ns)
                if targets
                    .iter()
                    .any(|(k, _)| resources.resolve(k).is_ok_and(|r| r.namespaced)) =>
            {
                eprintln!("No resources found in {ns} namespace.");
            }
            _ => eprintln!("No resources found"),
        },
        _ => {}
    }
    Ok(())
}

fn list_params(args: &GetArgs) -> ListParams {
    let mut lp = ListParams::default();
    if let Some(selector) = &args.selector {
        lp = lp.labels(selector);
    }
    if let Some(selector) = &args.field_selector {
        lp = lp.fields(selector);
    }
    lp
}

/// The server's Table of the named objects (all of them, selected, when `names` is empty).
async fn table(
    session: &Session,
    resource: &Resource,
    namespace: Option<&str>,
    names: &[String],
    args: &GetArgs,
) -> anyhow::Result<Value> {
    let request = kube::core::Request::new(resource.url_path(namespace));
    if names.is_empty() {
        let lp = list_params(args);
        let request = request.list(&lp).context("building the list request")?;
        return session
            .client
            .request::<Value>(as_table(request))
            .await
            .map_err(|e| session.error(e));
    }
    let mut combined: Option<Value> = None;
    for name in names {
        let request = request
            .get(name, &GetParams::default())
            .context("building the get request")?;
        let table: Value = session
            .client
            .request(as_table(request))
            .await
            .map_err(|e| session.error(e))?;
        match &mut combined {
            None => combined = Some(table),
            Some(all) => {
                let rows = table["rows"].as_array().cloned().unwrap_or_default();
                if let Some(all_rows) = all["rows"].as_array_mut() {
                    all_rows.extend(rows);
                }
            }
        }
    }
    Ok(combined.unwrap_or_else(|| json!({"rows": []})))
}

/// `get -w`: prints what is there, then every change, until interrupted.
async fn watch(
    session: &Session,
    resource: &Resource,
    namespace: Option<&str>,
    name: Option<&String>,
    args: &GetArgs,
) -> anyhow::Result<()> {
    let mut lp = list_params(args);
    let mut wp = WatchParams::default();
    if let Some(selector) = &args.selector {
        wp = wp.labels(selector);
    }
    let fields = match (name, &args.field_selector) {
        (Some(name), Some(f)) => Some(format!("metadata.name={name},{f}")),
        (Some(name), None) => Some(format!("metadata.name={name}")),
        (None, f) => f.clone(),
    };
    if let Some(fields) = &fields {
        wp = wp.fields(fields);
        lp = lp.fields(fields);
    }
    match args.output {
        None | Some(Output::Wide) => {
            let wide = args.output == Some(Output::Wide);
            let all = args.all_namespaces && resource.namespaced;
            let request = kube::core::Request::new(resource.url_path(namespace));
            let table: Value = session
                .client
                .request(as_table(request.list(&lp)?))
                .await
                .map_err(|e| session.error(e))?;
            let mut layout = Layout::new(&table, wide, all);
            let rows = layout.rows(&table);
            layout.fit(&rows);
            let mut header_printed = false;
            let mut stdout = std::io::stdout();
            if !rows.is_empty() {
                writeln!(stdout, "{}", layout.header())?;
                header_printed = true;
            }
            for row in &rows {
                writeln!(stdout, "{}", layout.line(row))?;
            }
            stdout.flush()?;
            let mut version = table["metadata"]["resourceVersion"]
                .as_str()
                .unwrap_or("0")
                .to_owned();
            loop {
                let request = as_table(request.watch(&wp, &version)?);
                let events = session
                    .client
                    .request_events::<Value>(request)
                    .await
                    .map_err(|e| session.error(e))?;
                let mut events = std::pin::pin!(events);
                while let Some(event) = events.next().await {
                    let table = match event.map_err(|e| session.error(e))? {
                        WatchEvent::Added(t) | WatchEvent::Modified(t) | WatchEvent::Deleted(t) => {
                            t
                        }
                        WatchEvent::Bookmark(b) => {
                            version = b.metadata.resource_version;
                            continue;
                        }
                        WatchEvent::Error(e) => bail!("the watch failed: {}", e.message),
                    };
                    if let Some(v) = table["rows"][0]
                        .pointer("/object/metadata/resourceVersion")
                        .and_then(Value::as_str)
                    {
                        version = v.to_owned();
                    }
                    if !header_printed {
                        layout = Layout::new(&table, wide, all);
                    }
                    let rows = layout.rows(&table);
                    layout.fit(&rows);
                    if !header_printed {
                        writeln!(stdout, "{}", layout.header())?;
                        header_printed = true;
                    }
                    for row in &rows {
                        writeln!(stdout, "{}", layout.line(row))?;
                    }
                    stdout.flush()?;
                }
                // The server ended the watch (its timeout): resume where it stopped.
            }
        }
        Some(output) => {
            let api = resource.api(&session.client, namespace);
            let listed = api.list(&lp).await.map_err(|e| session.error(e))?;
            for object in listed.items {
                emit(resource, object, output)?;
            }
            let mut version = listed.metadata.resource_version.unwrap_or_default();
            loop {
                let events = api
                    .watch(&wp, &version)
                    .await
                    .map_err(|e| session.error(e))?;
                let mut events = std::pin::pin!(events);
                while let Some(event) = events.try_next().await.map_err(|e| session.error(e))? {
                    let object = match event {
                        WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => {
                            o
                        }
                        WatchEvent::Bookmark(b) => {
                            version = b.metadata.resource_version;
                            continue;
                        }
                        WatchEvent::Error(e) => bail!("the watch failed: {}", e.message),
                    };
                    if let Some(v) = &object.metadata.resource_version {
                        version = v.clone();
                    }
                    emit(resource, object, output)?;
                }
            }
        }
    }
}

/// One object of a watch in a non-table format.
fn emit(resource: &Resource, object: DynamicObject, output: Output) -> anyhow::Result<()> {
    match output {
        Output::Name => {
            println!(
                "{}/{}",
                resource.type_name(),
                object.metadata.name.as_deref().unwrap_or_default()
            );
            Ok(())
        }
        Output::Yaml => {
            println!("---");
            print_value(&typed(resource, object)?, output)
        }
        _ => print_value(&typed(resource, object)?, output),
    }
}
