//! Times as people read them in status output, logs, messages and the dashboard: RFC 3339
//! in UTC, whole seconds (`2030-01-01T00:00:00Z`), through `time`'s well-known format.
//!
//! Whole seconds because certificates, tokens and the store carry no finer time; one home so
//! the issuer and the agent print the same instant the same way.

use time::{format_description::well_known::Rfc3339, OffsetDateTime, UtcOffset};

/// `at` (an `OffsetDateTime`, or a `SystemTime` such as a file time) as
/// `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(at: impl Into<OffsetDateTime>) -> String {
    let at = at.into().to_offset(UtcOffset::UTC);
    let at = at.replace_nanosecond(0).unwrap_or(at);
    // Rfc3339 refuses only years outside 0000..=9999, which no certificate can hold:
    // the number of seconds is still an honest answer.
    at.format(&Rfc3339)
        .unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Unix seconds (how the store and the admin API carry times) as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_unix(seconds: i64) -> String {
    OffsetDateTime::from_unix_timestamp(seconds)
        .map(rfc3339)
        .unwrap_or_else(|_| seconds.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    #[test]
    fn whole_seconds_in_utc_with_a_z() {
        assert_eq!(rfc3339_unix(1_893_456_000), "2030-01-01T00:00:00Z");
        assert_eq!(rfc3339_unix(0), "1970-01-01T00:00:00Z");
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_893_456_000_750);
        assert_eq!(rfc3339(at), "2030-01-01T00:00:00Z");
        let east = OffsetDateTime::from_unix_timestamp(1_893_456_000)
            .expect("in range")
            .to_offset(UtcOffset::from_hms(2, 0, 0).expect("offset"));
        assert_eq!(rfc3339(east), "2030-01-01T00:00:00Z");
    }

    #[test]
    fn out_of_range_falls_back_to_the_seconds() {
        assert_eq!(rfc3339_unix(i64::MAX), i64::MAX.to_string());
        let year_10000 = 253_402_300_800;
        assert_eq!(rfc3339_unix(year_10000), year_10000.to_string());
    }
}
