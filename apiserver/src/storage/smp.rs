//! Strategic merge patch, as kubectl (`apply`, `patch`) and Helm (`upgrade`) send it for the
//! built-in kinds.
//!
//! Like a JSON merge patch, except that lists tagged `merge` in the upstream types are merged:
//! lists of objects by their merge key (`containers` by `name`), lists of scalars as sets
//! (`finalizers`). Directives: `$patch: replace|delete|merge` (on a map or a list element),
//! `$retainKeys`, `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`. The table of
//! strategies is generated from the upstream struct tags (`smp_keys.json`,
//! `scripts/gen-smp-keys.py`).

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// One list field's patch strategy.
#[derive(Clone, Debug, Deserialize)]
struct Strategy {
    strategy: String,
    key: Option<String>,
}

/// `"<group>/<Kind>"` → field path → strategy.
type Table = HashMap<String, HashMap<String, Strategy>>;

static TABLE: LazyLock<Table> =
    LazyLock::new(|| serde_json::from_str(include_str!("smp_keys.json")).unwrap_or_default());

/// The strategies of one kind, if it is a built-in kind strategic merge applies to.
pub fn strategies(group: &str, kind: &str) -> Option<Schema> {
    TABLE
        .get(&format!("{group}/{kind}"))
        .map(|fields| Schema { fields })
}

/// The patch strategies of one kind.
#[derive(Clone, Copy, Debug)]
pub struct Schema {
    fields: &'static HashMap<String, Strategy>,
}

impl Schema {
    fn at(&self, path: &str) -> Option<&'static Strategy> {
        self.fields.get(path)
    }

    /// The strategy and merge key of the list at `path` (`spec.containers[].env`), if the
    /// table has one.
    pub fn list(&self, path: &str) -> Option<(&'static str, Option<&'static str>)> {
        self.at(path)
            .map(|s| (s.strategy.as_str(), s.key.as_deref()))
    }

    /// Every field with a strategy: its path (`spec.containers[].env`, `[]` for list items),
    /// the strategy (`merge`, `retainKeys`, `merge,retainKeys`) and the merge key, if any.
    pub fn entries(
        &self,
    ) -> impl Iterator<Item = (&'static str, &'static str, Option<&'static str>)> {
        self.fields
            .iter()
            .map(|(path, s)| (path.as_str(), s.strategy.as_str(), s.key.as_deref()))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn bad(message: String) -> ApiError {
    ApiError::BadRequest(format!("invalid strategic merge patch: {message}"))
}

/// Applies a strategic merge patch to `original`.
pub fn apply(schema: Schema, original: &Value, patch: &Value) -> Result<Value, ApiError> {
    match (original, patch) {
        (Value::Object(o), Value::Object(p)) => {
            Ok(merge_map(schema, "", o, p)?.map_or(Value::Null, Value::Object))
        }
        (_, Value::Object(p)) => {
            Ok(merge_map(schema, "", &Map::new(), p)?.map_or(Value::Null, Value::Object))
        }
        _ => Err(bad("the patch must be a JSON object".into())),
    }
}

/// Merges a patch map into an original map at `path`. `None` means "delete this map"
/// (`$patch: delete`).
fn merge_map(
    schema: Schema,
    path: &str,
    original: &Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<Option<Map<String, Value>>, ApiError> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("delete") => return Ok(None),
        Some("replace") => {
            let mut replaced = patch.clone();
            replaced.remove("$patch");
            return Ok(Some(strip_directives(replaced)));
        }
        Some("merge") | None => {}
        Some(other) => return Err(bad(format!("unknown $patch value {other:?} at {path:?}"))),
    }
    let mut result = original.clone();
    for (key, value) in patch {
        if key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = result.get_mut(field) {
                items.retain(|item| !remove.contains(item));
            }
            continue;
        }
        if key.starts_with("$setElementOrder/") {
            continue; // applied after the lists are merged
        }
        let child = join(path, key);
        match value {
            Value::Null => {
                result.remove(key);
            }
            Value::Object(p) => {
                let merged = match result.get(key) {
                    Some(Value::Object(o)) => merge_map(schema, &child, o, p)?,
                    _ => merge_map(schema, &child, &Map::new(), p)?,
                };
                match merged {
                    Some(m) => {
                        result.insert(key.clone(), Value::Object(m));
                    }
                    None => {
                        result.remove(key);
                    }
                }
            }
            Value::Array(p) => {
                let merged = match (schema.at(&child), result.get(key)) {
                    (Some(s), Some(Value::Array(o)))
                        if s.strategy.split(',').any(|x| x == "merge") =>
                    {
                        merge_list(schema, &child, s, o, p)?
                    }
                    _ => replace_list(p),
                };
                result.insert(key.clone(), Value::Array(merged));
            }
            scalar => {
                result.insert(key.clone(), scalar.clone());
            }
        }
    }
    for (key, order) in patch {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            let key_name = schema.at(&join(path, field)).and_then(|s| s.key.clone());
            if let (Some(Value::Array(items)), Some(order)) =
                (result.get_mut(field), order.as_array())
            {
                reorder(items, order, key_name.as_deref());
            }
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        let keep: Vec<&str> = keep.iter().filter_map(Value::as_str).collect();
        result.retain(|k, _| keep.contains(&k.as_str()));
    }
    Ok(Some(result))
}

/// A list the patch replaces: its elements without directives (and without deleted ones).
fn replace_list(patch: &[Value]) -> Vec<Value> {
    patch
        .iter()
        .filter(|item| item.get("$patch").and_then(Value::as_str) != Some("delete"))
        .map(|item| match item {
            Value::Object(m) => Value::Object(strip_directives(m.clone())),
            other => other.clone(),
        })
        .collect()
}

/// Merges a `merge`-tagged list: objects by merge key, scalars as a set.
fn merge_list(
    schema: Schema,
    path: &str,
    strategy: &Strategy,
    original: &[Value],
    patch: &[Value],
) -> Result<Vec<Value>, ApiError> {
    if patch
        .iter()
        .any(|item| item.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        let rest: Vec<Value> = patch
            .iter()
            .filter(|item| item.get("$patch").is_none())
            .cloned()
            .collect();
        return Ok(replace_list(&rest));
    }
    let Some(key) = strategy.key.as_deref() else {
        // A set of scalars, ordered as kube orders it (below).
        let mut from_patch: Vec<Value> = Vec::new();
        for item in patch {
            if !from_patch.contains(item) {
                from_patch.push(item.clone());
            }
        }
        let server_only: Vec<Value> = original
            .iter()
            .filter(|o| !patch.contains(o))
            .cloned()
            .collect();
        return Ok(merge_sorted(server_only, from_patch, original, |v| {
            v.clone()
        }));
    };
    let element = format!("{path}[]");
    // The patch's elements, merged into their originals, in the patch's order; then the
    // originals the patch does not name woven in (kube's normalizeElementOrder).
    let mut from_patch: Vec<Value> = Vec::new();
    let mut named = vec![false; original.len()];
    for item in patch {
        let Value::Object(p) = item else {
            return Err(bad(format!("the elements of {path:?} must be objects")));
        };
        let id = p
            .get(key)
            .ok_or_else(|| bad(format!("an element of {path:?} has no merge key {key:?}")))?;
        let position = original.iter().position(|o| o.get(key) == Some(id));
        if let Some(i) = position {
            named[i] = true;
        }
        if p.get("$patch").and_then(Value::as_str) == Some("delete") {
            continue;
        }
        let base = match position.map(|i| &original[i]) {
            Some(Value::Object(o)) => o.clone(),
            _ => Map::new(),
        };
        if let Some(m) = merge_map(schema, &element, &base, p)? {
            match from_patch.iter().position(|o| o.get(key) == Some(id)) {
                Some(j) => from_patch[j] = Value::Object(m),
                None => from_patch.push(Value::Object(m)),
            }
        }
    }
    let server_only: Vec<Value> = original
        .iter()
        .zip(&named)
        .filter(|(_, named)| !**named)
        .map(|(o, _)| o.clone())
        .collect();
    Ok(merge_sorted(server_only, from_patch, original, |v| {
        v.get(key).cloned().unwrap_or(Value::Null)
    }))
}

/// kube's `mergeSortedSlice`: the original-only elements (`left`) woven into the patch's
/// (`right`): a left element goes before a right one only when both are in the original
/// and it came first there — so new elements lead, and untouched ones keep their places
/// around the ones the patch changed.
fn merge_sorted(
    left: Vec<Value>,
    right: Vec<Value>,
    original: &[Value],
    identity: impl Fn(&Value) -> Value,
) -> Vec<Value> {
    let index = |v: &Value| {
        let id = identity(v);
        original.iter().position(|o| identity(o) == id)
    };
    let mut out = Vec::with_capacity(left.len() + right.len());
    let (mut left, mut right) = (left.into_iter().peekable(), right.into_iter().peekable());
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (Some(l), Some(r)) => matches!((index(l), index(r)), (Some(li), Some(ri)) if li < ri),
        };
        let next = if take_left { left.next() } else { right.next() };
        out.extend(next);
    }
    out
}

/// Orders `items` as `order` lists them (by merge key, or by value for scalars); items the
/// order does not mention keep their relative order after the ones it does.
fn reorder(items: &mut [Value], order: &[Value], key: Option<&str>) {
    let identity = |v: &Value| -> Value {
        match key {
            Some(k) => v.get(k).cloned().unwrap_or(Value::Null),
            None => v.clone(),
        }
    };
    let rank = |v: &Value| {
        let id = identity(v);
        order
            .iter()
            .position(|o| identity(o) == id)
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(|v| rank(v));
}

/// Removes `$…` directives from a map, recursively.
fn strip_directives(mut map: Map<String, Value>) -> Map<String, Value> {
    map.retain(|k, _| !k.starts_with('$'));
    for value in map.values_mut() {
        match value {
            Value::Object(m) => *m = strip_directives(std::mem::take(m)),
            Value::Array(items) => {
                for item in items.iter_mut() {
                    if let Value::Object(m) = item {
                        *m = strip_directives(std::mem::take(m));
                    }
                }
            }
            _ => {}
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod() -> Schema {
        strategies("", "Pod").unwrap()
    }

    #[test]
    fn containers_merge_by_name_and_env_by_name() {
        let original = json!({"spec": {"containers": [
            {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
            {"name": "b", "image": "b:1"}
        ]}});
        let patch = json!({"spec": {"containers": [
            {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}]}
        ]}});
        let merged = apply(pod(), &original, &patch).unwrap();
        assert_eq!(
            merged,
            json!({"spec": {"containers": [
                {"name": "a", "image": "a:2", "env": [{"name": "Y", "value": "2"}, {"name": "X", "value": "1"}]},
                {"name": "b", "image": "b:1"}
            ]}})
        );
        // A new element leads; untouched ones keep their places around changed ones (kube's
        // mergeSortedSlice) — a StatefulSet patched with a container of a new name has it
        // first.
        let original =
            json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}});
        let patch = json!({"spec": {"containers": [{"name": "b", "image": "x"}, {"name": "new"}]}});
        assert_eq!(
            apply(pod(), &original, &patch).unwrap(),
            json!({"spec": {"containers": [{"name": "a"}, {"name": "b", "image": "x"}, {"name": "new"}, {"name": "c"}]}})
        );
        let patch = json!({"spec": {"containers": [{"name": "new"}]}});
        assert_eq!(
            apply(pod(), &original, &patch).unwrap(),
            json!({"spec": {"containers": [{"name": "new"}, {"name": "a"}, {"name": "b"}, {"name": "c"}]}})
        );
    }

    #[test]
    fn directives() {
        let original = json!({
            "metadata": {"finalizers": ["a", "b"], "labels": {"x": "1", "y": "2"}},
            "spec": {"containers": [{"name": "a"}, {"name": "b"}], "tolerations": [{"key": "k"}]}
        });
        let patch = json!({
            "metadata": {"$deleteFromPrimitiveList/finalizers": ["a"], "finalizers": ["c"], "labels": {"x": null}},
            "spec": {
                "containers": [{"name": "a", "$patch": "delete"}, {"name": "c"}],
                "$setElementOrder/containers": [{"name": "c"}, {"name": "b"}],
                "tolerations": [{"key": "other"}]
            }
        });
        let merged = apply(pod(), &original, &patch).unwrap();
        assert_eq!(
            merged,
            json!({
                "metadata": {"finalizers": ["c", "b"], "labels": {"y": "2"}},
                "spec": {"containers": [{"name": "c"}, {"name": "b"}], "tolerations": [{"key": "other"}]}
            })
        );
    }

    #[test]
    fn retain_keys_and_replace() {
        let deploy = strategies("apps", "Deployment").unwrap();
        let original = json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}});
        let patch = json!({"spec": {"strategy": {"type": "Recreate", "$retainKeys": ["type"]}}});
        assert_eq!(
            apply(deploy, &original, &patch).unwrap(),
            json!({"spec": {"strategy": {"type": "Recreate"}}})
        );
        let patch = json!({"spec": {"$patch": "replace", "replicas": 2}});
        assert_eq!(
            apply(deploy, &original, &patch).unwrap(),
            json!({"spec": {"replicas": 2}})
        );
    }

    #[test]
    fn the_table_is_current() {
        // The generator reads apiserver/upstream/strategic-merge-keys.json.
        crate::assert_generated_current("gen-smp-keys.py", "apiserver/src/storage/smp_keys.json");
    }
}
