//! Kubernetes resource quantities (`128Mi`, `500m`, `1.5`, `2e3`) as plain numbers: bytes for
//! memory, millicores for CPU — what cgroups and the scheduler's arithmetic take.

/// Parses a quantity into a value scaled by `scale` (1 for bytes, 1000 for millicores),
/// rounded up as Kubernetes rounds.
pub fn parse(quantity: &str, scale: f64) -> Option<i64> {
    let q = quantity.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse().ok()?),
        _ => return None,
    };
    let value = (number * multiplier * scale).ceil();
    (value.is_finite() && value >= 0.0 && value < i64::MAX as f64).then_some(value as i64)
}

/// Bytes.
pub fn bytes(quantity: &str) -> Option<i64> {
    parse(quantity, 1.0)
}

/// Millicores.
pub fn millicores(quantity: &str) -> Option<i64> {
    parse(quantity, 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(bytes("128Mi"), Some(128 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
        assert_eq!(bytes("1e3"), Some(1000));
        assert_eq!(millicores("500m"), Some(500));
        assert_eq!(millicores("1.5"), Some(1500));
        assert_eq!(millicores("2"), Some(2000));
        assert_eq!(bytes("12Xi"), None);
        assert_eq!(bytes("-1"), None);
    }
}
