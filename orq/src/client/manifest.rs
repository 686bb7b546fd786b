//! Reading manifests for `apply -f` and `delete -f`: files, directories and stdin, each a
//! stream of YAML documents or JSON objects, `kind: List` expanded. A malformed document is
//! an error naming the file and the line.

use std::path::{Path, PathBuf};

use serde::Deserialize as _;
use serde_json::Value;

/// One object from a manifest, with where it came from.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The file (`-` for stdin).
    pub file: String,
    /// The line its document starts on (1-based).
    pub line: usize,
    /// The object.
    pub object: Value,
}

impl Manifest {
    /// `FILE:LINE`, for messages.
    pub fn origin(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }
}

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file or directory could not be read.
    #[error("reading {file}: {source}")]
    Read {
        file: String,
        #[source]
        source: std::io::Error,
    },
    /// A document is not valid YAML or JSON.
    #[error("{file}:{line}: invalid manifest: {message}")]
    Syntax {
        file: String,
        line: usize,
        message: String,
    },
    /// A document parsed but is not an object with `apiVersion`, `kind` and a name.
    #[error("{file}:{line}: invalid manifest: {message}")]
    Shape {
        file: String,
        line: usize,
        message: String,
    },
    /// A directory held no manifests.
    #[error("no objects passed to {verb}: {file} holds no manifests")]
    Empty { file: String, verb: &'static str },
}

/// The manifest files a `-f` names: the file itself, stdin for `-`, or a directory's
/// `.yaml`, `.yml` and `.json` files in name order (and its subdirectories' when
/// `recursive`).
fn files(path: &Path, recursive: bool) -> Result<Vec<PathBuf>, ManifestError> {
    if path == Path::new("-") || !path.is_dir() {
        return Ok(vec![path.to_owned()]);
    }
    let read_error = |source| ManifestError::Read {
        file: path.display().to_string(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(read_error)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read_error)?;
    entries.sort();
    let mut out = Vec::new();
    for entry in entries {
        if entry.is_dir() {
            if recursive {
                out.extend(files(&entry, true)?);
            }
        } else if entry
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "yaml" | "yml" | "json"))
        {
            out.push(entry);
        }
    }
    Ok(out)
}

/// Reads every object the `-f` arguments name, in order.
pub fn read(
    paths: &[PathBuf],
    recursive: bool,
    verb: &'static str,
) -> Result<Vec<Manifest>, ManifestError> {
    let mut out = Vec::new();
    for path in paths {
        let files = files(path, recursive)?;
        if files.is_empty() {
            return Err(ManifestError::Empty {
                file: path.display().to_string(),
                verb,
            });
        }
        for file in files {
            let name = file.display().to_string();
            let text = if file == Path::new("-") {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|source| ManifestError::Read {
                file: name.clone(),
                source,
            })?;
            out.extend(parse(&name, &text)?);
        }
    }
    Ok(out)
}

/// The line each YAML document starts on: after a `---` marker, or at its first content.
fn document_lines(text: &str) -> Vec<usize> {
    let mut starts = Vec::new();
    let mut in_document = false;
    for (i, line) in text.lines().enumerate() {
        let marker = |m: &str| line == m || line.starts_with(&format!("{m} "));
        if marker("---") {
            // A bare marker: the document's content starts on the next line.
            starts.push(if line == "---" { i + 2 } else { i + 1 });
            in_document = true;
        } else if marker("...") {
            in_document = false;
        } else if !in_document {
            let trimmed = line.trim();
            if !trimmed.is_empty() && !trimmed.starts_with('#') && !trimmed.starts_with('%') {
                starts.push(i + 1);
                in_document = true;
            }
        }
    }
    starts
}

/// Parses one file's text: JSON (one or more objects) or YAML documents. Empty documents
/// are skipped; `kind: List` objects are expanded into their items.
pub fn parse(file: &str, text: &str) -> Result<Vec<Manifest>, ManifestError> {
    let mut documents: Vec<(usize, Value)> = Vec::new();
    if text.trim_start().starts_with('{') {
        let mut stream = serde_json::Deserializer::from_str(text).into_iter::<Value>();
        loop {
            let offset = stream.byte_offset();
            let line = 1
                + text[..offset].matches('\n').count()
                + text[offset..]
                    .chars()
                    .take_while(|c| c.is_whitespace())
                    .filter(|c| *c == '\n')
                    .count();
            match stream.next() {
                None => break,
                Some(Ok(value)) => documents.push((line, value)),
                Some(Err(e)) => {
                    return Err(ManifestError::Syntax {
                        file: file.to_owned(),
                        line: e.line(),
                        message: e.to_string(),
                    });
                }
            }
        }
    } else {
        let starts = document_lines(text);
        for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let line = starts.get(i).copied().unwrap_or(1);
            match Value::deserialize(document) {
                Ok(value) => documents.push((line, value)),
                Err(e) => {
                    // serde_yaml's locations count from the start of the file.
                    let line = e.location().map_or(line, |l| l.line());
                    return Err(ManifestError::Syntax {
                        file: file.to_owned(),
                        line,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    let mut out = Vec::new();
    for (line, value) in documents {
        expand(file, line, value, &mut out)?;
    }
    Ok(out)
}

fn expand(
    file: &str,
    line: usize,
    value: Value,
    out: &mut Vec<Manifest>,
) -> Result<(), ManifestError> {
    let shape = |message: String| ManifestError::Shape {
        file: file.to_owned(),
        line,
        message,
    };
    match &value {
        Value::Null => return Ok(()),
        Value::Object(_) => {}
        other => return Err(shape(format!("expected an object, found {other}"))),
    }
    let kind = value["kind"].as_str().unwrap_or_default();
    if kind.is_empty() {
        return Err(shape("the object has no `kind`".into()));
    }
    if value["apiVersion"].as_str().unwrap_or_default().is_empty() {
        return Err(shape(format!("the {kind} has no `apiVersion`")));
    }
    if kind == "List" || (kind.ends_with("List") && value["items"].is_array()) {
        for item in value["items"].as_array().cloned().unwrap_or_default() {
            expand(file, line, item, out)?;
        }
        return Ok(());
    }
    if value
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .is_empty()
    {
        return Err(shape(format!("the {kind} has no `metadata.name`")));
    }
    out.push(Manifest {
        file: file.to_owned(),
        line,
        object: value,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const CM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n";

    #[test]
    fn documents_with_their_lines() {
        let text = format!(
            "# leading comment\n{CM}---\n---\n{}",
            CM.replace("name: a", "name: b")
        );
        let parsed = parse("f.yaml", &text).unwrap();
        let got: Vec<_> = parsed
            .iter()
            .map(|m| (m.object["metadata"]["name"].as_str().unwrap(), m.line))
            .collect();
        assert_eq!(got, [("a", 2), ("b", 7)]);
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- {}\n",
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}})
        );
        assert_eq!(parse("l.yaml", &list).unwrap().len(), 1);
        let json = "{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"metadata\":{\"name\":\"j\"}}\n\n{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"name\":\"k\"}}";
        let parsed = parse("j.json", json).unwrap();
        assert_eq!(parsed.iter().map(|m| m.line).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn errors_name_file_and_line() {
        // A syntax error in the second document, on the file's line 9.
        let text =
            format!("{CM}---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n labels: x\n");
        let error = parse("bad.yaml", &text).unwrap_err().to_string();
        assert!(error.starts_with("bad.yaml:9: invalid manifest"), "{error}");
        // A document that is not an object.
        let error = parse("s.yaml", &format!("{CM}---\njust a string\n"))
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with("s.yaml:5: invalid manifest: expected an object"),
            "{error}"
        );
        let error = parse("k.yaml", "apiVersion: v1\nmetadata: {name: a}\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            error,
            "k.yaml:1: invalid manifest: the object has no `kind`"
        );
        let error = parse("j.json", "{\"kind\": \n\n}").unwrap_err().to_string();
        assert!(error.starts_with("j.json:3: invalid manifest"), "{error}");
    }
}
