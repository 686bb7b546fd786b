//! Field management: who set which field (`metadata.managedFields`), as server-side apply
//! needs it.
//!
//! A field set is kept as the set of its leaf paths, each a list of structured-merge-diff
//! path elements: `f:<field>`, `k:<merge key JSON>` for an item of a keyed list,
//! `v:<value JSON>` for an item of a set list, and `.` for a keyed item itself. Lists the
//! strategic-merge table does not know are atomic: the list field is the leaf. On the wire
//! the sets are `fieldsV1` trees, as kube-apiserver writes them.
//!
//! What is tracked: apply operations (a manager's applied configuration — conflicts with other
//! managers unless `force`, and fields the manager stops applying are removed), and update
//! operations (POST, PUT and non-apply PATCH move the fields they change to their manager).
//! The status is not tracked, and lists of custom resources are atomic.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::error::{ApiError, Cause};
use crate::registry::ResourceDef;

/// One leaf path.
type Path = Vec<String>;

/// A set of leaf paths.
pub type FieldSet = BTreeSet<Path>;

/// How the items of a list are identified.
enum ListKind {
    Atomic,
    Set,
    Map(&'static str),
}

/// The list strategies of one kind.
struct Lists(Option<crate::smp::Schema>);

impl Lists {
    fn of(def: &ResourceDef) -> Lists {
        Lists(crate::smp::strategies(&def.group, &def.kind))
    }

    /// `path` in the strategic-merge table's notation (`spec.containers[].ports`).
    fn kind(&self, path: &str) -> ListKind {
        match self.0.as_ref().and_then(|s| s.list(path)) {
            Some((strategy, Some(key))) if strategy.contains("merge") => ListKind::Map(key),
            Some((strategy, None)) if strategy.contains("merge") => ListKind::Set,
            _ => ListKind::Atomic,
        }
    }
}

/// The fields an object (or an applied configuration) sets. `apiVersion`, `kind`, the
/// identifying and server-owned metadata and the status are left out.
pub fn fields_of(def: &ResourceDef, object: &Value) -> FieldSet {
    let lists = Lists::of(def);
    let mut set = FieldSet::new();
    let Some(map) = object.as_object() else {
        return set;
    };
    for (key, value) in map {
        match key.as_str() {
            "apiVersion" | "kind" | "status" => {}
            "metadata" => {
                for field in ["labels", "annotations", "finalizers", "ownerReferences"] {
                    if let Some(value) = value.get(field) {
                        let path = vec!["f:metadata".to_owned(), format!("f:{field}")];
                        collect(&lists, &format!("metadata.{field}"), value, path, &mut set);
                    }
                }
            }
            _ => collect(&lists, key, value, vec![format!("f:{key}")], &mut set),
        }
    }
    set
}

fn collect(lists: &Lists, dotted: &str, value: &Value, path: Path, set: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                let mut child_path = path.clone();
                child_path.push(format!("f:{key}"));
                collect(lists, &format!("{dotted}.{key}"), child, child_path, set);
            }
        }
        Value::Array(items) if !items.is_empty() => match lists.kind(dotted) {
            ListKind::Atomic => {
                set.insert(path);
            }
            ListKind::Set => {
                for item in items {
                    let mut item_path = path.clone();
                    item_path.push(format!("v:{item}"));
                    set.insert(item_path);
                }
            }
            ListKind::Map(key) => {
                for item in items {
                    let mut item_path = path.clone();
                    item_path.push(format!("k:{}", json!({ key: item.get(key) })));
                    let mut itself = item_path.clone();
                    itself.push(".".into());
                    set.insert(itself);
                    if let Some(fields) = item.as_object() {
                        for (field, child) in fields {
                            let mut child_path = item_path.clone();
                            child_path.push(format!("f:{field}"));
                            collect(
                                lists,
                                &format!("{dotted}[].{field}"),
                                child,
                                child_path,
                                set,
                            );
                        }
                    }
                }
            }
        },
        _ => {
            set.insert(path);
        }
    }
}

/// The value a leaf path points at, if the object has it.
fn value_at<'v>(object: &'v Value, path: &[String]) -> Option<&'v Value> {
    let mut node = object;
    for element in path {
        node = if let Some(field) = element.strip_prefix("f:") {
            node.get(field)?
        } else if let Some(key) = element.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).ok()?;
            node.as_array()?
                .iter()
                .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))?
        } else if let Some(value) = element.strip_prefix("v:") {
            let value: Value = serde_json::from_str(value).ok()?;
            node.as_array()?.iter().find(|item| **item == value)?
        } else {
            node
        };
    }
    Some(node)
}

/// Whether two objects disagree at a leaf path. A keyed item itself (`.`) is only a marker
/// of existence: its fields are compared leaf by leaf.
fn differs(a: &Value, b: &Value, path: &[String]) -> bool {
    if path.last().is_some_and(|last| last == ".") {
        value_at(a, path).is_some() != value_at(b, path).is_some()
    } else {
        value_at(a, path) != value_at(b, path)
    }
}

/// Removes what a leaf path points at.
fn remove_at(object: &mut Value, path: &[String]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    // `.` names a keyed item itself: remove the item from its list.
    let (last, parents) = if last == "." {
        match parents.split_last() {
            Some(split) => split,
            None => return,
        }
    } else {
        (last, parents)
    };
    let mut node = object;
    for element in parents {
        let next = if let Some(field) = element.strip_prefix("f:") {
            node.get_mut(field)
        } else if let Some(key) = element.strip_prefix("k:") {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
                return;
            };
            node.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| key.iter().all(|(k, v)| item.get(k) == Some(v)))
            })
        } else {
            None
        };
        match next {
            Some(next) => node = next,
            None => return,
        }
    }
    if let Some(field) = last.strip_prefix("f:") {
        if let Some(map) = node.as_object_mut() {
            map.remove(field);
        }
    } else if let Some(key) = last.strip_prefix("k:") {
        if let (Ok(key), Some(items)) = (
            serde_json::from_str::<Map<String, Value>>(key),
            node.as_array_mut(),
        ) {
            items.retain(|item| !key.iter().all(|(k, v)| item.get(k) == Some(v)));
        }
    } else if let Some(value) = last.strip_prefix("v:") {
        if let (Ok(value), Some(items)) =
            (serde_json::from_str::<Value>(value), node.as_array_mut())
        {
            items.retain(|item| *item != value);
        }
    }
}

/// A `fieldsV1` tree from a set.
fn to_tree(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for element in path {
            node = match node
                .entry(element.clone())
                .or_insert_with(|| Value::Object(Map::new()))
            {
                Value::Object(map) => map,
                _ => break,
            };
        }
    }
    Value::Object(root)
}

/// A set from a `fieldsV1` tree.
fn from_tree(tree: &Value) -> FieldSet {
    fn walk(node: &Map<String, Value>, path: &mut Path, set: &mut FieldSet) {
        for (element, child) in node {
            path.push(element.clone());
            match child.as_object() {
                Some(children) if !children.is_empty() => walk(children, path, set),
                _ => {
                    set.insert(path.clone());
                }
            }
            path.pop();
        }
    }
    let mut set = FieldSet::new();
    if let Some(map) = tree.as_object() {
        walk(map, &mut Vec::new(), &mut set);
    }
    set
}

/// One `managedFields` entry.
#[derive(Clone, Debug)]
struct Entry {
    manager: String,
    operation: String,
    api_version: String,
    time: Value,
    subresource: Option<String>,
    fields: FieldSet,
}

impl Entry {
    fn is_apply_by(&self, manager: &str) -> bool {
        self.manager == manager && self.operation == "Apply" && self.subresource.is_none()
    }

    fn is_update_by(&self, manager: &str) -> bool {
        self.manager == manager && self.operation == "Update" && self.subresource.is_none()
    }

    fn to_json(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": to_tree(&self.fields),
        });
        if let Some(subresource) = &self.subresource {
            entry["subresource"] = json!(subresource);
        }
        entry
    }
}

fn entries(object: &Value) -> Vec<Entry> {
    object
        .pointer("/metadata/managedFields")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            Some(Entry {
                manager: e.get("manager")?.as_str()?.to_owned(),
                operation: e.get("operation")?.as_str()?.to_owned(),
                api_version: e
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned(),
                time: e.get("time").cloned().unwrap_or(Value::Null),
                subresource: e
                    .get("subresource")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                fields: from_tree(e.get("fieldsV1").unwrap_or(&Value::Null)),
            })
        })
        .collect()
}

fn store_entries(object: &mut Value, entries: &[Entry]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(Entry::to_json)
        .collect();
    if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            meta.remove("managedFields");
        } else {
            meta.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// The object without its managedFields: what "did anything change" compares.
fn without_managed(object: &Value) -> Value {
    let mut copy = object.clone();
    if let Some(meta) = copy.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
        meta.remove("resourceVersion");
    }
    copy
}

/// Records an update operation (POST, PUT, non-apply PATCH) by `manager`: the fields it
/// changed from `old` (None for a create) become its own, other managers lose them, and
/// fields it removed are owned by nobody. `new` carries the result. Nothing is recorded when
/// nothing changed, so a no-op write stays a no-op.
pub fn record_update(def: &ResourceDef, old: Option<&Value>, new: &mut Value, manager: &str) {
    if old.is_some_and(|old| without_managed(old) == without_managed(new)) {
        if let (Some(old_fields), Some(meta)) = (
            old.and_then(|o| o.pointer("/metadata/managedFields"))
                .cloned(),
            new.get_mut("metadata").and_then(Value::as_object_mut),
        ) {
            meta.insert("managedFields".into(), old_fields);
        }
        return;
    }
    // The client may send managedFields (kubectl edit/replace echo them); else the stored ones.
    let mut all = if new.pointer("/metadata/managedFields").is_some() {
        entries(new)
    } else {
        old.map(entries).unwrap_or_default()
    };
    let now_set = fields_of(def, new);
    let old_set = old.map(|o| fields_of(def, o)).unwrap_or_default();
    let changed: FieldSet = now_set
        .iter()
        .filter(|path| old.is_none_or(|old| differs(old, new, path)) || !old_set.contains(*path))
        .cloned()
        .collect();
    let gone: FieldSet = old_set.difference(&now_set).cloned().collect();
    for entry in &mut all {
        entry
            .fields
            .retain(|p| !changed.contains(p) && !gone.contains(p));
    }
    if !changed.is_empty() {
        match all.iter_mut().find(|e| e.is_update_by(manager)) {
            Some(entry) => {
                entry.fields.extend(changed);
                entry.time = json!(crate::object::now());
                entry.api_version = def.api_version();
            }
            None => all.push(Entry {
                manager: manager.to_owned(),
                operation: "Update".into(),
                api_version: def.api_version(),
                time: json!(crate::object::now()),
                subresource: None,
                fields: changed,
            }),
        }
    }
    store_entries(new, &all);
}

/// Server-side apply's bookkeeping for `manager` applying `applied` to `live`, whose merge
/// is `merged`: refuses conflicts with other managers (409, unless `force`, which takes the
/// fields over), removes from `merged` the fields this manager applied before and no longer
/// does (unless someone else also owns them), and records the applied set.
pub fn apply(
    def: &ResourceDef,
    live: Option<&Value>,
    applied: &Value,
    merged: &mut Value,
    manager: &str,
    force: bool,
) -> Result<(), ApiError> {
    let mut all = live.map(entries).unwrap_or_default();
    let applying = fields_of(def, applied);
    if let Some(live) = live {
        let mut conflicts: Vec<Cause> = Vec::new();
        for entry in all.iter().filter(|e| !e.is_apply_by(manager)) {
            for path in applying.intersection(&entry.fields) {
                if differs(live, applied, path) {
                    conflicts.push(Cause {
                        reason: "FieldManagerConflict".into(),
                        message: format!(
                            "conflict with \"{}\"{}",
                            entry.manager,
                            if entry.operation == "Update" {
                                format!(" using {}", entry.api_version)
                            } else {
                                String::new()
                            }
                        ),
                        field: readable(path),
                    });
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let list: Vec<String> = conflicts
                .iter()
                .map(|c| format!("- {}: {}", c.message, c.field))
                .collect();
            return Err(ApiError::FieldConflict {
                resource: def.plural.clone(),
                name: crate::object::meta_str(live, "name")
                    .unwrap_or_default()
                    .to_owned(),
                group: def.group.clone(),
                message: format!(
                    "Apply failed with {} conflict{}: {}",
                    conflicts.len(),
                    if conflicts.len() == 1 { "" } else { "s" },
                    list.join("\n")
                ),
                causes: conflicts,
            });
        }
        // Forced (or agreeing): the fields are this manager's alone now... unless they agree,
        // in which case both keep them, as upstream shares ownership of equal values.
        for entry in all.iter_mut().filter(|e| !e.is_apply_by(manager)) {
            entry
                .fields
                .retain(|path| !applying.contains(path) || !differs(live, applied, path));
        }
        let before = all
            .iter()
            .find(|e| e.is_apply_by(manager))
            .map(|e| e.fields.clone())
            .unwrap_or_default();
        for path in before.difference(&applying) {
            let owned_elsewhere = all
                .iter()
                .any(|e| !e.is_apply_by(manager) && e.fields.contains(path));
            if !owned_elsewhere {
                remove_at(merged, path);
            }
        }
        if without_managed(live) == without_managed(merged)
            && all
                .iter()
                .find(|e| e.is_apply_by(manager))
                .is_some_and(|e| e.fields == applying)
        {
            // Nothing changed: keep managedFields (and so the resourceVersion) as they are.
            if let (Some(fields), Some(meta)) = (
                live.pointer("/metadata/managedFields").cloned(),
                merged.get_mut("metadata").and_then(Value::as_object_mut),
            ) {
                meta.insert("managedFields".into(), fields);
            }
            return Ok(());
        }
    }
    let now = json!(crate::object::now());
    match all.iter_mut().find(|e| e.is_apply_by(manager)) {
        Some(entry) => {
            entry.fields = applying;
            entry.time = now;
            entry.api_version = def.api_version();
        }
        None => all.push(Entry {
            manager: manager.to_owned(),
            operation: "Apply".into(),
            api_version: def.api_version(),
            time: now,
            subresource: None,
            fields: applying,
        }),
    }
    store_entries(merged, &all);
    Ok(())
}

/// A leaf path as kubectl prints a conflicting field: `.spec.replicas`,
/// `.spec.containers[name="web"].image`.
fn readable(path: &[String]) -> String {
    let mut out = String::new();
    for element in path {
        if let Some(field) = element.strip_prefix("f:") {
            out.push('.');
            out.push_str(field);
        } else if let Some(key) = element.strip_prefix("k:") {
            let key: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
            let inner: Vec<String> = key.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", inner.join(",")));
        } else if let Some(value) = element.strip_prefix("v:") {
            out.push_str(&format!("[{value}]"));
        }
    }
    out
}

/// The manager of an update: `?fieldManager=`, else the client's name from its User-Agent
/// (`kubectl/v1.33.0 (linux/amd64) …` → `kubectl`), as kube-apiserver does.
pub fn manager_of(field_manager: Option<&str>, user_agent: Option<&str>) -> String {
    if let Some(manager) = field_manager.filter(|m| !m.is_empty()) {
        return manager.to_owned();
    }
    user_agent
        .and_then(|ua| ua.split('/').next())
        .filter(|name| !name.is_empty())
        .unwrap_or("unknown")
        .chars()
        .take(128)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployments() -> ResourceDef {
        crate::registry::builtin_resources()
            .into_iter()
            .find(|d| d.kind == "Deployment")
            .expect("built in")
    }

    #[test]
    fn field_sets_follow_merge_keys_and_round_trip_as_fields_v1() {
        let def = deployments();
        let object = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [
                {"name": "web", "image": "nginx", "args": ["-x"]}
            ]}}},
            "status": {"replicas": 2},
        });
        let set = fields_of(&def, &object);
        let tree = to_tree(&set);
        assert_eq!(tree["f:metadata"]["f:labels"]["f:app"], json!({}));
        assert_eq!(tree["f:metadata"]["f:finalizers"]["v:\"a\""], json!({}));
        let container =
            &tree["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"];
        assert_eq!(container["."], json!({}));
        assert_eq!(container["f:args"], json!({}), "args is an atomic list");
        assert!(tree.get("f:status").is_none());
        assert_eq!(from_tree(&tree), set);
        let image: Path = [
            "f:spec",
            "f:template",
            "f:spec",
            "f:containers",
            "k:{\"name\":\"web\"}",
            "f:image",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(value_at(&object, &image), Some(&json!("nginx")));
        assert_eq!(
            readable(&image),
            ".spec.template.spec.containers[name=\"web\"].image"
        );
    }

    #[test]
    fn manager_names() {
        assert_eq!(manager_of(Some("helm"), Some("kubectl/v1.33")), "helm");
        assert_eq!(
            manager_of(None, Some("kubectl/v1.33.0 (linux/amd64)")),
            "kubectl"
        );
        assert_eq!(manager_of(None, None), "unknown");
    }
}
