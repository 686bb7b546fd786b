//! Printing a server-side `meta.k8s.io/v1` Table as kubectl does: upper-case headers,
//! columns padded to their widest cell with three spaces between them, priority-0 columns
//! only unless wide, a NAMESPACE column first when listing across namespaces.

use serde_json::Value;

/// Which of a Table's columns are shown, and their widths so far (a watch keeps them).
#[derive(Debug, Clone)]
pub struct Layout {
    /// Indexes of the shown columns in the Table's `columnDefinitions`.
    columns: Vec<usize>,
    headers: Vec<String>,
    widths: Vec<usize>,
    with_namespace: bool,
}

const GAP: usize = 3;

fn cell_text(cell: &Value) -> String {
    match cell {
        Value::String(s) => s.clone(),
        Value::Null => "<none>".to_owned(),
        other => other.to_string(),
    }
}

impl Layout {
    /// The columns of `table` to show: priority 0 ones, all of them when `wide`.
    pub fn new(table: &Value, wide: bool, with_namespace: bool) -> Layout {
        let definitions = table["columnDefinitions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut columns = Vec::new();
        let mut headers = Vec::new();
        if with_namespace {
            headers.push("NAMESPACE".to_owned());
        }
        for (i, definition) in definitions.iter().enumerate() {
            if wide || definition["priority"].as_i64().unwrap_or(0) == 0 {
                columns.push(i);
                headers.push(
                    definition["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_uppercase(),
                );
            }
        }
        let widths = headers.iter().map(String::len).collect();
        Layout {
            columns,
            headers,
            widths,
            with_namespace,
        }
    }

    /// The cells of each of `table`'s rows, in shown order.
    pub fn rows(&self, table: &Value) -> Vec<Vec<String>> {
        let rows = table["rows"].as_array().cloned().unwrap_or_default();
        rows.iter()
            .map(|row| {
                let cells = row["cells"].as_array().cloned().unwrap_or_default();
                let mut out = Vec::new();
                if self.with_namespace {
                    out.push(
                        row.pointer("/object/metadata/namespace")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    );
                }
                for &i in &self.columns {
                    out.push(cells.get(i).map(cell_text).unwrap_or_default());
                }
                out
            })
            .collect()
    }

    /// Widens the columns to fit `rows`.
    pub fn fit(&mut self, rows: &[Vec<String>]) {
        for row in rows {
            for (width, cell) in self.widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }

    /// One printed line; the last column is not padded.
    pub fn line(&self, cells: &[String]) -> String {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            line.push_str(cell);
            if i + 1 < cells.len() {
                let width = self.widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count()) + GAP;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        line
    }

    /// The header line.
    pub fn header(&self) -> String {
        self.line(&self.headers)
    }
}

/// The whole table as text: a header and a line per row, or `None` when it has no rows.
pub fn render(table: &Value, wide: bool, with_namespace: bool) -> Option<String> {
    let mut layout = Layout::new(table, wide, with_namespace);
    let rows = layout.rows(table);
    if rows.is_empty() {
        return None;
    }
    layout.fit(&rows);
    let mut out = layout.header();
    out.push('\n');
    for row in &rows {
        out.push_str(&layout.line(row));
        out.push('\n');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> Value {
        json!({
            "kind": "Table",
            "columnDefinitions": [
                {"name": "Name", "priority": 0},
                {"name": "Ready", "priority": 0},
                {"name": "Node", "priority": 1},
            ],
            "rows": [
                {"cells": ["web-1", "1/1", "n1"], "object": {"metadata": {"namespace": "default"}}},
                {"cells": ["a", "0/1", null], "object": {"metadata": {"namespace": "kube-system"}}},
            ]
        })
    }

    #[test]
    fn aligned_like_kubectl() {
        assert_eq!(
            render(&table(), false, false).as_deref(),
            Some("NAME    READY\nweb-1   1/1\na       0/1\n")
        );
        assert_eq!(
            render(&table(), true, true).as_deref(),
            Some(
                "NAMESPACE     NAME    READY   NODE\n\
                 default       web-1   1/1     n1\n\
                 kube-system   a       0/1     <none>\n"
            )
        );
        assert_eq!(
            render(&json!({"columnDefinitions": [], "rows": []}), false, false),
            None
        );
    }
}
