//! Watch: newline-delimited JSON events, flushed one by one, as client-go and kube-rs read
//! them.
//!
//! Without a resourceVersion (or with `0`) the watch starts with an `ADDED` for every
//! existing object, then follows changes; with `resourceVersion=N` it sends every change
//! after N. A start older than the store keeps is reported *in the stream* as an `ERROR`
//! event carrying a 410 `Expired` Status (kube-rs only relists on that). Label and field
//! selectors apply to the object before and after each change, so an object that stops
//! matching is reported `DELETED` and one that starts matching `ADDED`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use orquestra_store::{EventKind, ListOptions, WatchEvent};
use serde_json::{Value, json};

use crate::cache::{CacheWatch, Entry, Notice};
use crate::engine::{Engine, decode, set_resource_version};
use crate::error::ApiError;
use crate::request::{Params, Representation, Target, flag};
use crate::selector::{FieldSelector, LabelSelector};

/// How long a watch without `timeoutSeconds` stays open.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// Starts a watch and returns its body stream.
pub async fn watch(
    engine: &Engine,
    target: &Target,
    params: &Params,
    form: Representation,
) -> Result<BoxStream<'static, Result<Bytes, Infallible>>, ApiError> {
    let def = target.def.clone();
    let labels = LabelSelector::parse(params.label_selector.as_deref().unwrap_or(""))?;
    let fields = FieldSelector::for_resource(params.field_selector.as_deref().unwrap_or(""), &def)?;
    let bookmarks = flag(&params.allow_watch_bookmarks);
    let initial_events = flag(&params.send_initial_events);
    let timeout = match params.timeout_seconds.as_deref() {
        Some(s) if !s.is_empty() => Duration::from_secs(
            s.parse()
                .map_err(|_| ApiError::BadRequest(format!("invalid timeoutSeconds {s:?}")))?,
        ),
        _ => DEFAULT_TIMEOUT,
    };
    let prefix = target.prefix();
    let after = match params.resource_version()? {
        Some(rv) if !initial_events => Some(rv),
        _ => None,
    };
    // The cache serves events from stored JSON; a kind converted by webhook needs each
    // object converted on the way out, which the general path does.
    let cached = match def.conversion {
        None => engine.cache().watch(&prefix, after).await,
        Some(_) => None,
    };
    if let Some(cached) = cached {
        let from_cache = CachedWatch {
            def: def.clone(),
            prefix,
            labels,
            fields,
            form,
            include_object: params.include_object.clone(),
            bookmarks,
        };
        return Ok(from_cache.stream(cached, initial_events, timeout));
    }
    // A kind converted by webhook selects by the requested version's fields: its objects are
    // converted before the field selector looks at them.
    let convert_first = crate::engine::selects_after_conversion(&def, &fields);
    let (late_labels, late_fields) = (labels.clone(), fields.clone());
    let matches_late = std::sync::Arc::new(move |object: &Value| {
        late_labels.matches(object) && late_fields.matches(object)
    });
    let matches = move |object: &Value| labels.matches(object) && fields.matches(object);
    // `kubectl get -w` asks for every event's object as a one-row Table.
    let table_def = def.clone();
    let include_object = params.include_object.clone();
    let render = move |object: &Value| -> Value {
        match form {
            Representation::Full => return object.clone(),
            Representation::Metadata => return crate::object::partial_metadata(object),
            Representation::Table => {}
        }
        let columns = Some(table_def.printer_columns.as_slice()).filter(|c| !c.is_empty());
        let metadata = json!({"resourceVersion": object.pointer("/metadata/resourceVersion").cloned().unwrap_or_default()});
        crate::table::table(
            &table_def,
            columns,
            std::slice::from_ref(object),
            metadata,
            include_object.as_deref(),
        )
    };
    let line = std::sync::Arc::new(move |kind: &str, object: &Value| -> Bytes {
        if kind == "ADDED" || kind == "MODIFIED" || kind == "DELETED" {
            line(kind, &render(object))
        } else {
            line(kind, object)
        }
    });

    // The starting point, and the objects to announce first.
    let mut initial = Vec::new();
    let start = match params.resource_version()? {
        Some(rv) if !initial_events => rv,
        _ => {
            let mut options = ListOptions::default();
            loop {
                let page = engine.store.list(&prefix, &options).await?;
                let mut objects = Vec::new();
                for kv in &page.kvs {
                    // Selectors name fields of the stored form (as the watch cache's do).
                    let object = decode(kv)?;
                    if convert_first || matches(&object) {
                        objects.push(object);
                    }
                }
                engine.to_client_all(&def, &mut objects).await?;
                if convert_first {
                    objects.retain(&matches);
                }
                initial.extend(objects.iter().map(|object| line("ADDED", object)));
                match page.next(None) {
                    Some(next) => options = next,
                    None => break page.revision,
                }
            }
        }
    };
    if initial_events {
        let mut bookmark = json!({
            "kind": def.kind, "apiVersion": def.api_version(),
            "metadata": {"resourceVersion": start.to_string(),
                         "annotations": {"k8s.io/initial-events-end": "true"}}
        });
        set_resource_version(&mut bookmark, start);
        initial.push(line("BOOKMARK", &bookmark));
    }
    let changes = engine.store.watch(&prefix, start).await?;
    let kind = def.kind.clone();
    let api_version = def.api_version();
    // Selectors name fields of the stored form; the client sees its own version, converted
    // as each event goes out (a conversion webhook is called then).
    let engine = engine.clone();
    let events = changes.filter_map(move |item| {
        let pending = match item {
            Ok(WatchEvent::Change(event)) if convert_first => Some(Pending::Unmatched {
                old: event.prev.as_ref().and_then(|kv| decode(kv).ok()),
                new: decode(&event.kv)
                    .ok()
                    .filter(|_| !matches!(event.kind, EventKind::Delete)),
                revision: event.kv.mod_revision,
            }),
            Ok(WatchEvent::Change(event)) => {
                let new = decode(&event.kv).ok();
                let old = event.prev.as_ref().and_then(|kv| decode(kv).ok());
                let was = old.as_ref().is_some_and(&matches);
                match event.kind {
                    EventKind::Delete => old.filter(|_| was).map(|mut o| {
                        set_resource_version(&mut o, event.kv.mod_revision);
                        Pending::Object("DELETED", o)
                    }),
                    EventKind::Create | EventKind::Update => new.and_then(|new| {
                        let kind = match (was, matches(&new)) {
                            (true, true) => "MODIFIED",
                            (false, true) => "ADDED",
                            (true, false) => "DELETED",
                            (false, false) => return None,
                        };
                        Some(Pending::Object(kind, new))
                    }),
                }
            }
            Ok(WatchEvent::Progress(revision)) => bookmarks.then(|| {
                Pending::Line(line(
                    "BOOKMARK",
                    &json!({"kind": kind, "apiVersion": api_version,
                                "metadata": {"resourceVersion": revision.to_string()}}),
                ))
            }),
            Err(error) => Some(Pending::Line(line(
                "ERROR",
                &ApiError::from(error).status(),
            ))),
        };
        let (engine, def, line) = (engine.clone(), def.clone(), line.clone());
        let late_matches = matches_late.clone();
        async move {
            match pending? {
                Pending::Line(bytes) => Some(bytes),
                Pending::Unmatched { old, new, revision } => {
                    let converted = |object: Option<Value>| async {
                        let mut object = object?;
                        Some(engine.to_client(&def, &mut object).await.map(|()| object))
                    };
                    let (old, new) = match (converted(old).await, converted(new).await) {
                        (Some(Err(error)), _) | (_, Some(Err(error))) => {
                            return Some(line("ERROR", &error.status()));
                        }
                        (old, new) => (old.and_then(Result::ok), new.and_then(Result::ok)),
                    };
                    let was = old.as_ref().is_some_and(|o| late_matches(o));
                    match (new, was) {
                        (None, true) => old.map(|mut o| {
                            set_resource_version(&mut o, revision);
                            line("DELETED", &o)
                        }),
                        (None, false) => None,
                        (Some(new), was) => match (was, late_matches(&new)) {
                            (true, true) => Some(line("MODIFIED", &new)),
                            (false, true) => Some(line("ADDED", &new)),
                            (true, false) => Some(line("DELETED", &new)),
                            (false, false) => None,
                        },
                    }
                }
                Pending::Object(kind, mut object) => {
                    Some(match engine.to_client(&def, &mut object).await {
                        Ok(()) => line(kind, &object),
                        Err(error) => line("ERROR", &error.status()),
                    })
                }
            }
        }
    });
    // The store's stream ends after an error, so an ERROR event is the last one.
    let body = futures::stream::iter(initial)
        .chain(events)
        .take_until(tokio::time::sleep(timeout))
        .map(Ok);
    Ok(body.boxed())
}

/// One event of the general path before its object is converted for the client.
enum Pending {
    /// An object event: its type and the object as stored.
    Object(&'static str, Value),
    /// A change of a kind whose selectors look at converted objects: the object before and
    /// after (none after a delete), matched once converted.
    Unmatched {
        old: Option<Value>,
        new: Option<Value>,
        revision: i64,
    },
    /// A line ready to send (a bookmark, an error).
    Line(Bytes),
}

/// A watch served by the watch cache: every watcher shares the cached JSON of each object,
/// so an event costs a prefix check, a selector check and a copy into the line.
struct CachedWatch {
    def: std::sync::Arc<crate::registry::ResourceDef>,
    prefix: String,
    labels: LabelSelector,
    fields: FieldSelector,
    form: Representation,
    include_object: Option<String>,
    bookmarks: bool,
}

impl CachedWatch {
    fn stream(
        self,
        cached: CacheWatch,
        initial_events: bool,
        timeout: Duration,
    ) -> BoxStream<'static, Result<Bytes, Infallible>> {
        let mut first = Vec::new();
        for entry in &cached.initial {
            if self.matches(entry) {
                first.push(self.event("ADDED", entry, None));
            }
        }
        if initial_events {
            let bookmark = json!({
                "kind": self.def.kind, "apiVersion": self.def.api_version(),
                "metadata": {"resourceVersion": cached.revision.to_string(),
                             "annotations": {"k8s.io/initial-events-end": "true"}}
            });
            first.push(line("BOOKMARK", &bookmark));
        }
        for change in &cached.replay {
            first.extend(self.change(change));
        }
        let this = std::sync::Arc::new(self);
        let live = futures::stream::unfold(cached.live, |mut live| async move {
            // A watcher that falls too far behind is ended; it resumes from what it saw.
            let notice = live.recv().await.ok()?;
            Some((notice, live))
        })
        .filter_map(move |notice| {
            let this = std::sync::Arc::clone(&this);
            async move {
                match notice {
                    Notice::Change(change) => this.change(&change),
                    Notice::Progress(revision) => this.bookmarks.then(|| {
                        line(
                            "BOOKMARK",
                            &json!({"kind": this.def.kind, "apiVersion": this.def.api_version(),
                                    "metadata": {"resourceVersion": revision.to_string()}}),
                        )
                    }),
                }
            }
        });
        futures::stream::iter(first)
            .chain(live)
            .take_until(tokio::time::sleep(timeout))
            .map(Ok)
            .boxed()
    }

    fn matches(&self, entry: &Entry) -> bool {
        (self.labels.is_empty() || entry.labels_match(&self.labels))
            && (self.fields.is_empty() || entry.decode().is_some_and(|o| self.fields.matches(&o)))
    }

    /// The event line of one change, if this watcher sees it.
    fn change(&self, change: &crate::cache::Change) -> Option<Bytes> {
        if !change.key.starts_with(&self.prefix) {
            return None;
        }
        let was = change.prev.as_ref().is_some_and(|p| self.matches(p));
        match &change.new {
            None => change
                .prev
                .as_ref()
                .filter(|_| was)
                .map(|prev| self.event("DELETED", prev, Some(change.revision))),
            Some(new) => match (was, self.matches(new)) {
                (true, true) => Some(self.event("MODIFIED", new, None)),
                (false, true) => Some(self.event("ADDED", new, None)),
                (true, false) => Some(self.event("DELETED", new, None)),
                (false, false) => None,
            },
        }
    }

    /// `{"type":…,"object":…}` from the cached JSON, re-encoded only for a deletion's
    /// resourceVersion or a Table.
    fn event(&self, kind: &str, entry: &Entry, revision: Option<i64>) -> Bytes {
        if self.form == Representation::Full && revision.is_none() && self.def.reads_as_stored() {
            let mut out = Vec::with_capacity(entry.json.len() + 32);
            out.extend_from_slice(b"{\"type\":\"");
            out.extend_from_slice(kind.as_bytes());
            out.extend_from_slice(b"\",\"object\":");
            out.extend_from_slice(&entry.json);
            out.extend_from_slice(b"}\n");
            return Bytes::from(out);
        }
        let mut object = entry.decode().unwrap_or_default();
        crate::convert::for_client(&self.def, &mut object);
        if let Some(revision) = revision {
            set_resource_version(&mut object, revision);
        }
        if self.form == Representation::Metadata {
            object = crate::object::partial_metadata(&object);
        } else if self.form == Representation::Table {
            let columns = Some(self.def.printer_columns.as_slice()).filter(|c| !c.is_empty());
            let metadata = json!({"resourceVersion": object.pointer("/metadata/resourceVersion").cloned().unwrap_or_default()});
            object = crate::table::table(
                &self.def,
                columns,
                std::slice::from_ref(&object),
                metadata,
                self.include_object.as_deref(),
            );
        }
        line(kind, &object)
    }
}
