//! Refusals of requests that carry no credential this CA knows, per source address: the
//! lockout, and the audit summaries that keep them from flooding the audit log.
//!
//! "Unauthenticated" means the request named nothing this CA made: an EST token secret
//! that matches no token, no token at all, a TLS client certificate this CA did not issue
//! (a self-signed one, say), or an agent whose node attestation was refused. A used or
//! expired token, or a revoked certificate of ours, is real (a device retrying after a lost
//! answer presents one): its refusal is audited on its own and not counted here.
//!
//! Lockout: a source with `max_failures` unauthenticated refusals in one window is refused
//! (HTTP 429 + Retry-After, gRPC RESOURCE_EXHAUSTED) before its request is even read, on
//! every enrollment and attestation path, until the lockout ends. A success does not lift a
//! lockout early: a guesser that stumbles on a real token must not reset its own counter.
//! Each lockout writes one `source.locked_out` audit record.
//!
//! Summaries: of a source's unauthenticated refusals, the first in each
//! `summary_interval` (default 1 min) is audited on its own (so an operator sees what was asked and why it
//! was refused); the rest are counted by kind and written as one `refusals.summarized`
//! record ("N refusals of kind K from source S since …") once the interval is over. So a
//! source costs at most two audit records a minute however fast it asks, and none of them
//! waits for a flush of its own: they go to disk with the next group commit, or with the
//! one commit the summary sweep makes. Attacker text in them is cut to [`MAX_TEXT`]
//! characters ([`truncated`]).
//!
//! Guessing a token is hopeless anyway (256 random bits, looked up by SHA-256 and compared
//! in constant time, see `store::tokens`); the lockout keeps a guesser from loading the
//! store and the summaries keep it from filling the disk.
//!
//! Memory is bounded: at most `max_sources` addresses are tracked (in each table) and the
//! oldest entry is evicted to make room. IPv6 sources are counted per /64, the block one
//! host is typically given, so a host cannot rotate through its own addresses to escape.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::LockoutPolicy;

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
    pub(crate) policy: LockoutPolicy,
    sources: Mutex<Sources>,
    pub(crate) summaries: Summaries,
}

impl Lockouts {
    /// An empty table under `policy`.
    pub fn new(policy: LockoutPolicy) -> Self {
        Self {
            policy,
            sources: Mutex::new(Sources::default()),
            summaries: Summaries::new(policy.max_sources, policy.summary_interval),
        }
    }

    /// Whether `source` may be heard now.
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

    /// Counts one unauthenticated refusal of `source`.
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

pub(crate) fn source_text(source: Option<Source>) -> String {
    source.map_or_else(|| "unknown".to_owned(), |s| s.to_string())
}

/// Longest attacker-supplied text (a CSR subject, a refusal message quoting it) an audit
/// record keeps, in characters.
pub const MAX_TEXT: usize = 128;

/// `text` cut to [`MAX_TEXT`] characters, with an ellipsis and the full length when cut.
pub fn truncated(text: &str) -> String {
    let length = text.chars().count();
    if length <= MAX_TEXT {
        return text.to_owned();
    }
    let head: String = text.chars().take(MAX_TEXT).collect();
    format!("{head}… ({length} characters)")
}

/// How often summaries that are due are written when no new refusal brings them out, at
/// most (a shorter summary interval sweeps more often).
pub(crate) const SUMMARY_SWEEP: Duration = Duration::from_secs(10);

/// A source's refusals since its last audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Where they came from (`None`: a client whose address was unknown).
    pub source: Option<Source>,
    /// Unix milliseconds of the first refusal counted.
    pub since_ms: i64,
    /// Refusals by kind.
    pub counts: BTreeMap<&'static str, u64>,
}

/// What noting one refusal calls for.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Noted {
    /// The source's first refusal this interval: audit it on its own.
    pub first: bool,
    /// The source's previous interval is over: write its summary.
    pub summary: Option<Summary>,
}

#[derive(Debug)]
struct Pending {
    /// When the source's current interval started (its last record).
    interval_start: Instant,
    since_ms: i64,
    counts: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Default)]
struct SummaryTable {
    entries: HashMap<Option<Source>, Pending>,
    order: VecDeque<Option<Source>>,
}

/// Per-source counts of unauthenticated refusals not yet in the audit log.
#[derive(Debug)]
pub(crate) struct Summaries {
    max_sources: usize,
    interval: Duration,
    table: Mutex<SummaryTable>,
}

impl Summaries {
    fn new(max_sources: usize, interval: Duration) -> Self {
        Self {
            max_sources,
            interval,
            table: Mutex::new(SummaryTable::default()),
        }
    }

    /// Notes one refusal of `kind` from `source` at `now` (`now_ms` for the record).
    pub(crate) fn note(
        &self,
        source: Option<Source>,
        kind: &'static str,
        now: Instant,
        now_ms: i64,
    ) -> Noted {
        let Ok(mut table) = self.table.lock() else {
            return Noted::default();
        };
        if let Some(pending) = table.entries.get_mut(&source) {
            if now.saturating_duration_since(pending.interval_start) < self.interval {
                if pending.counts.is_empty() {
                    pending.since_ms = now_ms;
                }
                *pending.counts.entry(kind).or_default() += 1;
                return Noted::default();
            }
            // The interval is over: this refusal opens a new one and is audited itself.
            let summary = take_summary(source, pending);
            pending.interval_start = now;
            return Noted {
                first: true,
                summary,
            };
        }
        while table.entries.len() >= self.max_sources {
            let Some(oldest) = table.order.pop_front() else {
                break;
            };
            if let Some(evicted) = table.entries.remove(&oldest) {
                let dropped: u64 = evicted.counts.values().sum();
                if dropped > 0 {
                    tracing::warn!(
                        source = %source_text(oldest),
                        dropped,
                        "refusal summary dropped: too many sources tracked"
                    );
                }
            }
        }
        table.order.push_back(source);
        table.entries.insert(
            source,
            Pending {
                interval_start: now,
                since_ms: now_ms,
                counts: BTreeMap::new(),
            },
        );
        Noted {
            first: true,
            summary: None,
        }
    }

    /// The summaries of sources whose interval is over; sources quiet for a whole interval
    /// since are forgotten.
    pub(crate) fn due(&self, now: Instant) -> Vec<Summary> {
        let Ok(mut table) = self.table.lock() else {
            return Vec::new();
        };
        let mut due = Vec::new();
        let mut quiet = Vec::new();
        for (source, pending) in table.entries.iter_mut() {
            if now.saturating_duration_since(pending.interval_start) < self.interval {
                continue;
            }
            match take_summary(*source, pending) {
                Some(summary) => {
                    due.push(summary);
                    pending.interval_start = now;
                }
                None => quiet.push(*source),
            }
        }
        if !quiet.is_empty() {
            let SummaryTable { entries, order } = &mut *table;
            for source in &quiet {
                entries.remove(source);
            }
            order.retain(|s| entries.contains_key(s));
        }
        due
    }
}

fn take_summary(source: Option<Source>, pending: &mut Pending) -> Option<Summary> {
    if pending.counts.is_empty() {
        return None;
    }
    Some(Summary {
        source,
        since_ms: pending.since_ms,
        counts: std::mem::take(&mut pending.counts),
    })
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
            summary_interval: Duration::from_secs(60),
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
    fn a_source_gets_one_record_then_one_summary_per_interval() {
        let summaries = Summaries::new(10, Duration::from_secs(60));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let source = Some(ip("192.0.2.1"));
        assert_eq!(
            summaries.note(source, "a", t0, 0),
            Noted {
                first: true,
                summary: None
            }
        );
        for _ in 0..1000 {
            assert_eq!(summaries.note(source, "a", at(1), 1000), Noted::default());
        }
        assert_eq!(summaries.note(source, "b", at(2), 2000), Noted::default());
        assert!(summaries.due(at(30)).is_empty());
        let due = summaries.due(at(61));
        assert_eq!(
            due,
            vec![Summary {
                source,
                since_ms: 1000,
                counts: [("a", 1000), ("b", 1)].into_iter().collect(),
            }]
        );
        // A refusal after the interval opens the next one and is audited itself.
        let noted = summaries.note(source, "a", at(200), 200_000);
        assert!(noted.first && noted.summary.is_none());
        // Quiet for a whole interval: forgotten.
        assert!(summaries.due(at(400)).is_empty());
        assert!(summaries.due(at(400)).is_empty());
        assert_eq!(
            summaries.table.lock().map(|t| t.entries.len()).ok(),
            Some(0)
        );
    }

    #[test]
    fn summaries_track_at_most_max_sources() {
        let summaries = Summaries::new(100, Duration::from_secs(60));
        let t0 = Instant::now();
        for n in 0..10_000u32 {
            summaries.note(Some(Source::of(IpAddr::from(n.to_be_bytes()))), "a", t0, 0);
        }
        assert_eq!(
            summaries.table.lock().map(|t| t.entries.len()).ok(),
            Some(100)
        );
    }

    #[test]
    fn long_text_is_cut_with_its_length() {
        assert_eq!(truncated("short"), "short");
        let long = "é".repeat(5000);
        let cut = truncated(&long);
        assert!(cut.starts_with(&"é".repeat(MAX_TEXT)));
        assert!(cut.ends_with("… (5000 characters)"), "{cut}");
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        assert_eq!(ip("2001:db8::1"), ip("2001:db8::ffff:1234"));
        assert_ne!(ip("2001:db8::1"), ip("2001:db8:0:1::1"));
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_eq!(ip("2001:db8::1").to_string(), "2001:db8::/64");
    }
}
