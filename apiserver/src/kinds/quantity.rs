//! Kubernetes resource quantities (`500m`, `128Mi`, `1.5`, `2e3`), exactly: the admission
//! checks and quota arithmetic add, subtract and compare them as kube-apiserver does, to the
//! nano unit, without floating-point rounding.

use std::fmt;

/// A quantity as a whole number of nano-units (`1` = 1e-9 of the unit: `500m` is 500,000,000).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quantity(i128);

const NANO: i128 = 1_000_000_000;

impl Quantity {
    /// Zero.
    pub const ZERO: Quantity = Quantity(0);

    /// Parses `text`; `None` if it is not a quantity.
    pub fn parse(text: &str) -> Option<Quantity> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '.' | '+' | '-')))
            .unwrap_or(text.len());
        let (number, suffix) = text.split_at(split);
        let (negative, digits) = match number.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, number.strip_prefix('+').unwrap_or(number)),
        };
        let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty() && fraction.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        // The number as an integer over 10^scale.
        let mut value: i128 = 0;
        for b in whole.bytes().chain(fraction.bytes()) {
            value = value.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        let scale = fraction.len() as i32;
        let (base, exponent): (i128, i32) = match suffix {
            "" => (1, 0),
            "n" => (1, -9),
            "u" => (1, -6),
            "m" => (1, -3),
            "k" => (1, 3),
            "M" => (1, 6),
            "G" => (1, 9),
            "T" => (1, 12),
            "P" => (1, 15),
            "E" => (1, 18),
            "Ki" => (1 << 10, 0),
            "Mi" => (1 << 20, 0),
            "Gi" => (1 << 30, 0),
            "Ti" => (1 << 40, 0),
            "Pi" => (1 << 50, 0),
            "Ei" => (1 << 60, 0),
            s if s.starts_with(['e', 'E']) => (1, s[1..].parse().ok()?),
            _ => return None,
        };
        // nanos = value × base × 10^(exponent + 9 − scale), rounded up as Kubernetes rounds
        // what is finer than its precision.
        let power = exponent + 9 - scale;
        let mut nanos = value.checked_mul(base)?;
        if power >= 0 {
            nanos = nanos.checked_mul(10i128.checked_pow(power as u32)?)?;
        } else {
            let divisor = 10i128.checked_pow((-power) as u32)?;
            nanos = (nanos + divisor - 1) / divisor;
        }
        Some(Quantity(if negative { -nanos } else { nanos }))
    }

    /// The value in thousandths (`500m` → 500), rounded up.
    pub fn milli(self) -> i128 {
        (self.0 + 999_999).div_euclid(1_000_000)
    }

    /// Whether it is zero.
    pub fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// The value as a float.
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / NANO as f64
    }

    /// `self / other` as a float (a limit-to-request ratio).
    pub fn ratio(self, other: Quantity) -> f64 {
        self.0 as f64 / other.0 as f64
    }
}

impl Quantity {
    /// Printed as a quantity written like `template` would be: with a binary suffix when the
    /// template has one (`252Mi` + `4Mi` → `256Mi`, as Kubernetes keeps a sum in its first
    /// operand's format), else canonically.
    pub fn to_string_like(self, template: &str) -> String {
        let whole = self.0 / NANO;
        if template.trim_end().ends_with('i') && self.0 % NANO == 0 && whole != 0 {
            for (suffix, unit) in [
                ("Ei", 1i128 << 60),
                ("Pi", 1 << 50),
                ("Ti", 1 << 40),
                ("Gi", 1 << 30),
                ("Mi", 1 << 20),
                ("Ki", 1 << 10),
            ] {
                if whole % unit == 0 {
                    return format!("{}{suffix}", whole / unit);
                }
            }
        }
        self.to_string()
    }
}

impl std::ops::Add for Quantity {
    type Output = Quantity;

    fn add(self, other: Quantity) -> Quantity {
        Quantity(self.0.saturating_add(other.0))
    }
}

impl std::ops::AddAssign for Quantity {
    fn add_assign(&mut self, other: Quantity) {
        *self = *self + other;
    }
}

impl std::ops::Sub for Quantity {
    type Output = Quantity;

    fn sub(self, other: Quantity) -> Quantity {
        Quantity(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for Quantity {
    /// Canonical, as Kubernetes prints a decimal quantity: a whole number when it is one,
    /// else in `m`, `u` or `n`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        if v % NANO == 0 {
            write!(f, "{}", v / NANO)
        } else if v % 1_000_000 == 0 {
            write!(f, "{}m", v / 1_000_000)
        } else if v % 1_000 == 0 {
            write!(f, "{}u", v / 1_000)
        } else {
            write!(f, "{v}n")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(s: &str) -> Quantity {
        Quantity::parse(s).unwrap()
    }

    #[test]
    fn parses_every_suffix_exactly() {
        assert_eq!(q("500m"), Quantity(500_000_000));
        assert_eq!(q("1.5"), q("1500m"));
        assert_eq!(q("0.5Gi"), q("512Mi"));
        assert_eq!(q("2e3"), q("2k"));
        assert_eq!(q("252Mi").0, 252 * (1 << 20) * NANO);
        assert_eq!(q("1n"), Quantity(1));
        assert_eq!(q("-1"), Quantity(-NANO));
        assert_eq!(q(".5"), q("500m"));
        for bad in ["", "abc", "1Xi", "1.2.3", "m", "--1"] {
            assert!(Quantity::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn sums_compare_and_print_canonically() {
        let sum = q("500m") + q("600m");
        assert!(sum > q("1"));
        assert_eq!(sum.to_string(), "1100m");
        assert_eq!((q("252Mi") + q("4Mi")).to_string_like("252Mi"), "256Mi");
        assert_eq!((q("252Mi") + q("4Mi")).to_string(), "268435456");
        assert_eq!((q("1") + q("1")).to_string(), "2");
        assert_eq!(q("1024").to_string_like("5"), "1024");
        assert_eq!((q("30Gi") - q("30Gi")).to_string(), "0");
        assert_eq!(q("1500m").milli(), 1500);
        assert!((q("2").ratio(q("500m")) - 4.0).abs() < 1e-9);
    }
}
