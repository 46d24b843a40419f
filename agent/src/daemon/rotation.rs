//! When to renew a credential and how long to wait after a failure: pure functions of their
//! inputs, so the schedule is table-tested and the daemon only supplies the clock and the
//! random jitter (DESIGN §5 "Rotation and outages": half life ± 10 % jitter, as SPIRE).

use std::time::{Duration, SystemTime};

/// How far the rotation point may move from half life, as a fraction of the whole lifetime:
/// rotation falls between 40 % and 60 % of the lifetime, so a fleet issued at the same
/// moment does not come back at the same moment.
const ROTATION_JITTER: f64 = 0.10;

/// The first retry waits this long…
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// …doubling per attempt up to this.
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A retry waits between 80 % and 120 % of its nominal delay.
const BACKOFF_JITTER: f64 = 0.20;

/// When a credential valid from `not_before` to `not_after` should be replaced:
/// `not_before + lifetime × (½ + 10 % × jitter)`. `jitter` is a random number in `[-1, 1]`
/// (values outside are clamped). A credential with no lifetime is replaced at once
/// (`not_before`).
pub fn rotation_time(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let Ok(lifetime) = not_after.duration_since(not_before) else {
        return not_before;
    };
    not_before + scale(lifetime, 0.5 + ROTATION_JITTER * clamp_unit(jitter))
}

/// Where a credential's lifetime starts for scheduling: its notBefore, or when the agent
/// received it if that is later. The issuer back-dates notBefore (`[issuance] backdate`, 5 min
/// by default) for drifting PLC clocks (DESIGN §3), so for a 20 s SVID half life counted from
/// notBefore would lie before the SVID even arrived and the agent would re-mint it without
/// pause.
pub fn lifetime_start(not_before: SystemTime, received_at: SystemTime) -> SystemTime {
    not_before.max(received_at)
}

/// Whether something valid until `not_after` may still be handed out at `now`. At the very
/// second it expires it may not: a client would receive a dead credential.
pub fn is_valid(not_after: SystemTime, now: SystemTime) -> bool {
    now < not_after
}

/// A credential the issuer has just made but that this machine's clock already calls
/// expired: the local clock is ahead of the issuer's by more than the credential's whole
/// lifetime (a clock jump, an RTC reset). Fetching another would only fetch another dead
/// one, so callers back off instead of looping, and say how far off the clock is.
pub fn arrived_expired(not_after: SystemTime, received_at: SystemTime) -> Option<Duration> {
    received_at.duration_since(not_after).ok()
}

/// What an operator reads when [`arrived_expired`] says so: the measured lower bound of the
/// skew and what to fix.
pub fn clock_ahead_message(what: &str, behind_by: Duration) -> String {
    format!(
        "the issuer just issued a {what} that this machine's clock already calls expired: the \
         clock here is at least {} s ahead of the issuer's; fix this machine's time source \
         (NTP/PTP). Retrying with backoff until the clocks agree",
        behind_by.as_secs().max(1)
    )
}

/// How long to wait before retry number `attempt` (0 = the first retry) after a failure:
/// exponential from 0.5 s, capped at 30 s, ± 20 % by `jitter` in `[-1, 1]`.
pub fn retry_delay(attempt: u32, jitter: f64) -> Duration {
    let nominal = BACKOFF_BASE
        .checked_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_CAP)
        .min(BACKOFF_CAP);
    scale(nominal, 1.0 + BACKOFF_JITTER * clamp_unit(jitter))
}

/// `duration × factor`, with the factor rounded to a thousandth so schedules are exact
/// (floating point would put a rotation a nanosecond off).
fn scale(duration: Duration, factor: f64) -> Duration {
    // factor is within [0.4, 1.2] here, so the cast cannot overflow or go negative.
    let permille = (factor * 1000.0).round().max(0.0) as u128;
    let nanos = duration.as_nanos().saturating_mul(permille) / 1000;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A random number in `[-1, 1]` for the functions above.
pub fn jitter() -> f64 {
    use rand::Rng;
    rand::thread_rng().gen_range(-1.0..=1.0)
}

fn clamp_unit(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(-1.0, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn rotation_falls_at_half_life_plus_or_minus_ten_percent() {
        // (not_before, not_after, jitter) → rotation, in seconds since the epoch.
        let table = [
            (1000, 4600, 0.0, 2800),  // 1 h X509-SVID: at 30 min
            (1000, 4600, 1.0, 3160),  // latest: 60 % of the lifetime
            (1000, 4600, -1.0, 2440), // earliest: 40 %
            (1000, 4600, 0.5, 2980),
            (1000, 4600, 7.0, 3160),  // out of range: clamped
            (1000, 4600, -7.0, 2440), // out of range: clamped
            (1000, 1300, 0.0, 1150),  // 5 min JWT-SVID: at 2.5 min
            (1000, 1020, 0.0, 1010),  // 20 s test TTL
            (1000, 1000, 0.0, 1000),  // no lifetime: now
            (1000, 900, 0.0, 1000),   // inverted: now
        ];
        for (not_before, not_after, jitter, expected) in table {
            assert_eq!(
                rotation_time(at(not_before), at(not_after), jitter),
                at(expected),
                "{not_before}..{not_after} jitter {jitter}"
            );
        }
        let nan = rotation_time(at(0), at(100), f64::NAN);
        assert_eq!(nan, at(50));
    }

    #[test]
    fn a_back_dated_certificate_rotates_at_half_of_what_is_left() {
        // Issued at 1000 with notBefore back-dated to 940 and a 20 s TTL.
        let start = lifetime_start(at(940), at(1000));
        assert_eq!(start, at(1000));
        assert_eq!(rotation_time(start, at(1020), 0.0), at(1010));
        // Without the correction it would be due 20 s before it arrived.
        assert_eq!(rotation_time(at(940), at(1020), 0.0), at(980));
        // A notBefore in the future (clock skew the other way) is kept.
        assert_eq!(lifetime_start(at(1005), at(1000)), at(1005));
    }

    #[test]
    fn rotation_always_comes_before_expiry() {
        for step in 0..=20 {
            let jitter = -1.0 + f64::from(step) / 10.0;
            let rotate = rotation_time(at(0), at(3600), jitter);
            assert!(rotate < at(3600) && rotate > at(0), "{jitter}");
        }
    }

    #[test]
    fn a_credential_already_expired_on_arrival_measures_the_clock_skew() {
        assert_eq!(arrived_expired(at(1060), at(1000)), None);
        assert_eq!(
            arrived_expired(at(1060), at(8260)),
            Some(Duration::from_secs(7200))
        );
        assert!(
            clock_ahead_message("node SVID", Duration::from_secs(7200)).contains("7200 s ahead")
        );
    }

    #[test]
    fn an_expired_credential_is_never_valid() {
        assert!(is_valid(at(10), at(9)));
        assert!(!is_valid(at(10), at(10)));
        assert!(!is_valid(at(10), at(11)));
    }

    #[test]
    fn retries_back_off_exponentially_to_a_cap_with_jitter() {
        let table = [
            (0, 0.0, 500),
            (1, 0.0, 1000),
            (2, 0.0, 2000),
            (5, 0.0, 16_000),
            (6, 0.0, 30_000),
            (60, 0.0, 30_000),
            (u32::MAX, 0.0, 30_000),
            (0, 1.0, 600),
            (0, -1.0, 400),
            (6, 1.0, 36_000),
        ];
        for (attempt, jitter, millis) in table {
            assert_eq!(
                retry_delay(attempt, jitter),
                Duration::from_millis(millis),
                "attempt {attempt} jitter {jitter}"
            );
        }
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..1000 {
            let j = jitter();
            assert!((-1.0..=1.0).contains(&j), "{j}");
        }
    }
}
