//! Token-guessing lockout: token authentications (EST Basic/Bearer, join tokens at Attest)
//! with a secret that matches no token are counted per source address. A used or expired
//! token is real, not a guess (a device retrying after a lost answer presents one), and is
//! not counted. A source with too many in one window is refused (HTTP 429 + Retry-After,
//! gRPC RESOURCE_EXHAUSTED) before its token is even looked up, until the lockout ends. A
//! success does not lift a lockout early: a guesser that stumbles on a real token must not
//! reset its own counter.
//!
//! Guessing a token is hopeless anyway (256 random bits, looked up by SHA-256 and compared
//! in constant time, see `store::tokens`); the lockout keeps a guesser from loading the
//! store and from filling the audit log. Each lockout writes one `token.guessing` audit
//! record (source, failures) — not one record per attempt — and the attempts refused during
//! it are counted in the metrics only.
//!
//! Memory is bounded: at most `max_sources` addresses are tracked and the oldest entry is
//! evicted to make room. IPv6 sources are counted per /64, the block one host is typically
//! given, so a host cannot rotate through its own addresses to escape.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// `[tokens]` settings of the lockout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockoutPolicy {
    /// Failed token authentications from one source within `window` that lock it out.
    pub max_failures: u32,
    /// The window failures are counted in, from a source's first failure.
    #[serde(with = "crate::duration::serde_text")]
    pub window: Duration,
    /// How long a locked-out source is refused.
    #[serde(with = "crate::duration::serde_text")]
    pub lockout: Duration,
    /// Most sources tracked at once; the oldest is forgotten to make room.
    pub max_sources: usize,
}

impl Default for LockoutPolicy {
    fn default() -> Self {
        Self {
            max_failures: 10,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
            max_sources: 65_536,
        }
    }
}

impl LockoutPolicy {
    /// Checked at config load.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_failures == 0 {
            return Err("tokens.lockout.max_failures must be at least 1".into());
        }
        if self.window.is_zero() || self.lockout.is_zero() {
            return Err("tokens.lockout.window and .lockout must be longer than 0s".into());
        }
        if self.max_sources == 0 {
            return Err("tokens.lockout.max_sources must be at least 1".into());
        }
        Ok(())
    }
}

/// Where attempts come from: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Source(IpAddr);

impl Source {
    /// The source of a peer address (IPv4-mapped IPv6 counts as IPv4).
    pub fn of(address: IpAddr) -> Self {
        match address {
            IpAddr::V4(v4) => Self(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(v4) => write!(f, "{v4}"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
        }
    }
}

/// A source is locked out; tell it when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Locked {
    /// Whole seconds until the lockout ends (at least 1).
    pub retry_after: u32,
}

/// What a failure did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted; the source is not locked.
    Counted,
    /// This failure locked the source out: audit it once.
    LockedOut {
        /// Failures counted in the window.
        failures: u32,
    },
}

#[derive(Debug)]
struct Entry {
    window_start: Instant,
    failures: u32,
    locked_until: Option<Instant>,
}

#[derive(Debug, Default)]
struct Sources {
    entries: HashMap<Source, Entry>,
    /// Insertion order, for eviction; each entry appears exactly once.
    order: VecDeque<Source>,
}

/// The lockout table.
#[derive(Debug)]
pub struct Lockouts {
    policy: LockoutPolicy,
    sources: Mutex<Sources>,
}

impl Lockouts {
    /// An empty table under `policy`.
    pub fn new(policy: LockoutPolicy) -> Self {
        Self {
            policy,
            sources: Mutex::new(Sources::default()),
        }
    }

    /// Whether `source` may try a token now.
    pub fn check(&self, source: Source, now: Instant) -> Result<(), Locked> {
        let Ok(sources) = self.sources.lock() else {
            return Ok(());
        };
        match sources.entries.get(&source).and_then(|e| e.locked_until) {
            Some(until) if until > now => Err(Locked {
                retry_after: seconds_until(now, until),
            }),
            _ => Ok(()),
        }
    }

    /// Counts one failed token authentication from `source`.
    pub fn failed(&self, source: Source, now: Instant) -> Failure {
        let Ok(mut sources) = self.sources.lock() else {
            return Failure::Counted;
        };
        let policy = self.policy;
        if !sources.entries.contains_key(&source) {
            while sources.entries.len() >= policy.max_sources {
                let Some(oldest) = sources.order.pop_front() else {
                    break;
                };
                sources.entries.remove(&oldest);
            }
            sources.order.push_back(source);
        }
        let entry = sources.entries.entry(source).or_insert(Entry {
            window_start: now,
            failures: 0,
            locked_until: None,
        });
        if entry.locked_until.is_some_and(|until| until > now) {
            // Already locked: attempts that get this far raced the check.
            return Failure::Counted;
        }
        if now.saturating_duration_since(entry.window_start) >= policy.window
            || entry.locked_until.is_some()
        {
            *entry = Entry {
                window_start: now,
                failures: 0,
                locked_until: None,
            };
        }
        entry.failures += 1;
        if entry.failures >= policy.max_failures {
            entry.locked_until = Some(now + policy.lockout);
            Failure::LockedOut {
                failures: entry.failures,
            }
        } else {
            Failure::Counted
        }
    }

    /// Sources tracked now.
    pub fn tracked(&self) -> usize {
        self.sources.lock().map(|s| s.entries.len()).unwrap_or(0)
    }
}

impl crate::authority::Authority {
    /// Whether a client at `address` may present a token now (unknown addresses may).
    pub(crate) fn token_attempt_allowed(&self, address: Option<IpAddr>) -> Result<(), Locked> {
        match address {
            Some(address) => self.lockouts.check(Source::of(address), Instant::now()),
            None => Ok(()),
        }
    }

    /// Counts a failed token authentication from `address`; the failure that locks a source
    /// out writes its one `token.guessing` audit record.
    pub(crate) fn token_failed(&self, address: Option<IpAddr>) {
        self.metrics.token_failure();
        let Some(address) = address else {
            return;
        };
        let source = Source::of(address);
        if let Failure::LockedOut { failures } = self.lockouts.failed(source, Instant::now()) {
            self.metrics.token_lockout();
            let policy = self.lockouts.policy;
            tracing::warn!(
                %source,
                failures,
                lockout_secs = policy.lockout.as_secs(),
                "too many failed token authentications: source locked out"
            );
            let recorded = self.audit(
                "token.guessing",
                serde_json::json!({
                    "source": source.to_string(),
                    "failures": failures,
                    "window_secs": policy.window.as_secs(),
                    "lockout_secs": policy.lockout.as_secs(),
                }),
            );
            if let Err(e) = recorded {
                tracing::error!(error = %e, "could not record a token-guessing lockout in the audit log");
            }
        }
    }
}

fn seconds_until(now: Instant, until: Instant) -> u32 {
    let left = until.saturating_duration_since(now);
    let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
    u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_failures: u32, max_sources: usize) -> LockoutPolicy {
        LockoutPolicy {
            max_failures,
            window: Duration::from_secs(60),
            lockout: Duration::from_secs(300),
            max_sources,
        }
    }

    fn ip(text: &str) -> Source {
        Source::of(text.parse().expect("ip"))
    }

    #[test]
    fn locks_a_source_at_the_threshold_and_only_that_source() {
        let lockouts = Lockouts::new(policy(3, 10));
        let t0 = Instant::now();
        let guesser = ip("192.0.2.1");
        assert_eq!(lockouts.failed(guesser, t0), Failure::Counted);
        assert_eq!(lockouts.failed(guesser, t0), Failure::Counted);
        assert!(lockouts.check(guesser, t0).is_ok());
        assert_eq!(
            lockouts.failed(guesser, t0),
            Failure::LockedOut { failures: 3 }
        );
        assert_eq!(
            lockouts.check(guesser, t0 + Duration::from_millis(500)),
            Err(Locked { retry_after: 300 })
        );
        assert!(lockouts.check(ip("192.0.2.2"), t0).is_ok());
        // Lockout over: the source starts a fresh window.
        let later = t0 + Duration::from_secs(301);
        assert!(lockouts.check(guesser, later).is_ok());
        assert_eq!(lockouts.failed(guesser, later), Failure::Counted);
    }

    #[test]
    fn failures_spread_beyond_the_window_do_not_lock() {
        let lockouts = Lockouts::new(policy(3, 10));
        let t0 = Instant::now();
        let source = ip("192.0.2.1");
        for minute in 0..10u64 {
            let now = t0 + Duration::from_secs(61 * minute);
            assert_eq!(lockouts.failed(source, now), Failure::Counted);
            assert_eq!(lockouts.failed(source, now), Failure::Counted);
        }
        assert!(lockouts
            .check(source, t0 + Duration::from_secs(700))
            .is_ok());
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest_source() {
        let lockouts = Lockouts::new(policy(2, 100));
        let t0 = Instant::now();
        for n in 0..10_000u32 {
            lockouts.failed(Source::of(IpAddr::from(n.to_be_bytes())), t0);
        }
        assert_eq!(lockouts.tracked(), 100);
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8::1"), ip("2001:db8::ffff:1234"));
        assert_ne!(ip("2001:db8::1"), ip("2001:db8:0:1::1"));
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_eq!(ip("2001:db8::1").to_string(), "2001:db8::/64");
    }
}
