//! Label requirements, shared by label selectors (ReplicaSets) and node selector terms (the
//! scheduler's required node affinity).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether a label's `value` (absent: `None`) satisfies `operator` over `values`: `In`,
/// `NotIn`, `Exists`, `DoesNotExist`, and the node-selector-only `Gt`/`Lt` (integers).
pub fn requirement(operator: &str, value: Option<&String>, values: &[String]) -> bool {
    match operator {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

/// Whether `labels` match `selector` (matchLabels and matchExpressions).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v))
        && selector.match_expressions.iter().flatten().all(|e| {
            requirement(
                &e.operator,
                labels.get(&e.key),
                e.values.as_deref().unwrap_or_default(),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators() {
        let v = "5".to_owned();
        let values = ["3".to_owned()];
        assert!(requirement("Gt", Some(&v), &values));
        assert!(!requirement("Lt", Some(&v), &values));
        assert!(requirement("NotIn", None, &values));
        assert!(!requirement("Bogus", Some(&v), &values));
    }
}
