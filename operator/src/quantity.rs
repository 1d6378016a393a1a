//! Parsing of Kubernetes quantities ("500m", "4Gi") and durations ("90s", "1h30m", "90d").

use std::time::Duration;

/// A value that is not a quantity or duration this API accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Not a quantity.
    #[error("{0:?} is not a quantity (expected e.g. \"500m\", \"2\", \"4Gi\")")]
    Quantity(String),
    /// Not a duration.
    #[error("{0:?} is not a duration (expected e.g. \"30s\", \"10m\", \"1h30m\", \"90d\")")]
    Duration(String),
}

/// Parses a quantity into thousandths of its unit (milli-units), so "1" and "1000m" compare
/// equal and "1Gi" and "1024Mi" compare equal.
pub fn parse_quantity(value: &str) -> Result<u128, ParseError> {
    let err = || ParseError::Quantity(value.to_string());
    let split = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    let (number, suffix) = value.split_at(split);
    if number.is_empty() {
        return Err(err());
    }
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) if !w.is_empty() && !f.is_empty() => (w, f),
        Some(_) => return Err(err()),
        None => (number, ""),
    };
    // Milli-units per unit of the suffix.
    let scale: u128 = match suffix {
        "m" => 1,
        "" => 1_000,
        "k" => 1_000_000,
        "M" => 1_000_000_000,
        "G" => 1_000_000_000_000,
        "T" => 1_000_000_000_000_000,
        "P" => 1_000_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000_000,
        "Ki" => 1_024_000,
        "Mi" => 1_024 * 1_024_000,
        "Gi" => 1_024 * 1_024 * 1_024_000,
        "Ti" => 1_024 * 1_024 * 1_024 * 1_024_000,
        "Pi" => 1_024 * 1_024 * 1_024 * 1_024 * 1_024_000,
        "Ei" => 1_024 * 1_024 * 1_024 * 1_024 * 1_024 * 1_024_000,
        _ => return Err(err()),
    };
    let whole: u128 = whole.parse().map_err(|_| err())?;
    let mut total = whole.checked_mul(scale).ok_or_else(err)?;
    if !fraction.is_empty() {
        if fraction.len() > 9 {
            return Err(err());
        }
        let digits: u128 = fraction.parse().map_err(|_| err())?;
        let denominator = 10u128.pow(fraction.len() as u32);
        total = total
            .checked_add(digits.checked_mul(scale).ok_or_else(err)? / denominator)
            .ok_or_else(err)?;
    }
    Ok(total)
}

/// Parses a duration made of number+unit pairs; units are ms, s, m, h and d.
pub fn parse_duration(value: &str) -> Result<Duration, ParseError> {
    let err = || ParseError::Duration(value.to_string());
    if value.is_empty() {
        return Err(err());
    }
    let mut total = Duration::ZERO;
    let mut rest = value;
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(err)?;
        if digits == 0 {
            return Err(err());
        }
        let number: u64 = rest[..digits].parse().map_err(|_| err())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.checked_mul(60).ok_or_else(err)?),
            "h" => Duration::from_secs(number.checked_mul(3_600).ok_or_else(err)?),
            "d" => Duration::from_secs(number.checked_mul(86_400).ok_or_else(err)?),
            _ => return Err(err()),
        };
        total = total.checked_add(part).ok_or_else(err)?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_compare_across_suffixes() {
        assert_eq!(parse_quantity("1"), parse_quantity("1000m"));
        assert_eq!(parse_quantity("1Gi"), parse_quantity("1024Mi"));
        assert_eq!(parse_quantity("1.5"), Ok(1_500));
        assert_eq!(parse_quantity("250m"), Ok(250));
        assert_eq!(parse_quantity("2k"), Ok(2_000_000));
        assert!(parse_quantity("1Gi").unwrap() > parse_quantity("1G").unwrap());
    }

    #[test]
    fn bad_quantities_are_errors() {
        for bad in [
            "",
            "Gi",
            "1.Gi",
            ".5",
            "1Zi",
            "-1",
            "1 Gi",
            "1e3",
            "1.0000000001",
        ] {
            assert!(parse_quantity(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn durations_add_up() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5_400)));
        assert_eq!(parse_duration("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    }

    #[test]
    fn bad_durations_are_errors() {
        for bad in ["", "10", "m", "10x", "1.5h", "-1s", "10 m"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }
}
