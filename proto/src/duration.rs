//! Durations as operators type them, in both binaries' config files and flags:
//! `500ms`, `90s`, `15m`, `8h`, `30d`, `1y` (365 days).
//!
//! One grammar for the issuer and the agent, so a value that works in one file works in the
//! other. The grammar is deliberately smaller than `humantime`'s: one whole number and one
//! unit, and a year of exactly 365 days (humantime's is 365.25), so `lifetime = "1y"` keeps
//! meaning the same certificate lifetime. Ranges tighter than [`MAX`] (a positive interval,
//! at most a year for a timer) are each caller's to check.

use std::time::Duration;

/// Longest duration accepted: 1000 years. Certificate lifetimes and token TTLs are added to
/// the current time, which `time` cannot carry past the year 9999 (it panics), nor
/// `i64` seconds past 292 billion years.
pub const MAX: Duration = Duration::from_secs(1000 * 365 * 86_400);

/// The units, longest first, with their length in milliseconds.
const UNITS: [(&str, u64); 6] = [
    ("y", 365 * 86_400_000),
    ("d", 86_400_000),
    ("h", 3_600_000),
    ("m", 60_000),
    ("s", 1000),
    ("ms", 1),
];

/// Parses `<whole number><unit>` with unit ms, s, m, h, d or y, at most [`MAX`].
pub fn parse(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("{text:?} has no unit; write e.g. 500ms, 90s, 15m, 8h, 30d or 1y")
    })?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let millis = UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, millis)| *millis)
        .ok_or_else(|| format!("{text:?}: unknown unit {unit:?}; use ms, s, m, h, d or y"))?;
    n.checked_mul(millis)
        .map(Duration::from_millis)
        .filter(|duration| *duration <= MAX)
        .ok_or_else(|| format!("{text:?} is too long; the longest is 1000y"))
}

/// The shortest exact rendering, for config files and messages (below a millisecond is
/// dropped: nothing here is that fine).
pub fn format(duration: Duration) -> String {
    let ms = duration.as_millis();
    for (unit, size) in UNITS {
        let size = u128::from(size);
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    "0s".to_owned()
}

/// serde support for `Duration` fields written as text:
/// `#[serde(with = "proto::duration::serde_text")]`.
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
    fn parses_each_unit_and_formats_it_back() {
        for (text, millis) in [
            ("500ms", 500),
            ("90s", 90_000),
            ("15m", 900_000),
            ("8h", 28_800_000),
            ("30d", 2_592_000_000),
            ("1y", 31_536_000_000),
            ("1000y", 31_536_000_000_000),
        ] {
            let duration = Duration::from_millis(millis);
            assert_eq!(parse(text), Ok(duration), "{text}");
            assert_eq!(format(duration), text);
        }
        assert_eq!(parse(" 0s "), Ok(Duration::ZERO));
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_secs(120)), "2m");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn refuses_missing_or_unknown_units_and_overflow() {
        for bad in [
            "",
            "30",
            "d",
            "3w",
            "-1d",
            "5 s",
            "99999999999999999999y",
            "18446744073709551615s",
            "1.5h",
            "1001y",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
