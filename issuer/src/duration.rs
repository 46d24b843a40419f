//! Durations as operators type them: `90s`, `15m`, `8h`, `30d`, `1y` (365 days).

use std::time::Duration;

/// Longest duration accepted: 1000 years. Certificate lifetimes and token TTLs are added to
/// the current time, which `time` cannot carry past the year 9999 (it panics), nor
/// `i64` seconds past 292 billion years.
pub const MAX: Duration = Duration::from_secs(1000 * 365 * 86_400);

/// Parses `<number><unit>` with unit s, m, h, d or y, at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write e.g. 90s, 15m, 8h, 30d or 1y"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "y" => 365 * 86_400,
        _ => {
            return Err(format!(
                "{text:?}: unknown unit {unit:?}; use s, m, h, d or y"
            ))
        }
    };
    n.checked_mul(seconds)
        .map(Duration::from_secs)
        .filter(|duration| *duration <= MAX)
        .ok_or_else(|| format!("{text:?} is too long; the longest is 1000y"))
}

/// The shortest exact rendering, for config files and messages.
pub fn format(duration: Duration) -> String {
    let s = duration.as_secs();
    for (unit, size) in [("y", 365 * 86_400), ("d", 86_400), ("h", 3600), ("m", 60)] {
        if s >= size && s.is_multiple_of(size) {
            return format!("{}{unit}", s / size);
        }
    }
    format!("{s}s")
}

/// serde support for `Duration` fields written as text.
pub mod serde_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes a duration as text.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format(*d))
    }

    /// Reads a duration from text.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_unit() {
        for (text, secs) in [
            ("90s", 90),
            ("15m", 900),
            ("8h", 28_800),
            ("30d", 2_592_000),
            ("1y", 31_536_000),
            ("1000y", 31_536_000_000),
        ] {
            assert_eq!(parse(text), Ok(Duration::from_secs(secs)), "{text}");
            assert_eq!(
                parse(&format(Duration::from_secs(secs))),
                Ok(Duration::from_secs(secs))
            );
        }
    }

    #[test]
    fn refuses_missing_or_unknown_units_and_overflow() {
        for bad in [
            "",
            "30",
            "d",
            "3w",
            "-1d",
            "99999999999999999999y",
            "1.5h",
            "1001y",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
