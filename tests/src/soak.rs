//! Long runs (issue 7): an issuer, two agents, many workloads with short-lived X509-SVIDs and
//! PLC proxy traffic for a given time; afterwards memory and open file counts must be flat,
//! every rotation must have come on schedule, and no SVID may ever have been served expired.
//!
//! ```text
//!   workload 0, 2, 4, … (uid 20000+i) ─▶ agent-1 ◀── inbound press-7 ◀══mTLS══╗
//!   workload 1, 3, 5, … (uid 20000+i) ─▶ agent-2 ── outbound hmi-1 ══════════╝
//!                                           ▲                   │
//!                       modbus_poll.py ─tcp─┘        modbus_plc.py ◀─tcp─ agent-1
//! ```
//!
//! Each workload is its own process ([`workload`], `soak workload`) under its own uid, so the
//! agent attests it by the kernel's word (`unix:uid:<uid>`) as it would a real one. It keeps
//! one FetchX509SVID stream open and prints a line for every message: which SVID (serial,
//! notBefore, notAfter), when it arrived and whether it was still valid then. It also prints
//! when its stream stays silent past the expiry of the SVID it holds. [`run`] reads those
//! lines, samples the memory and descriptors of the issuer and both agents, and judges the
//! whole run in a [`Report`] against the thresholds below.

use std::collections::HashSet;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};

use crate::{Agent, Issuer};

/// The lowest uid a workload runs as; workload `i` is `UID_BASE + i`, a uid no account has.
pub const UID_BASE: u32 = 20_000;

/// The agent rotates at half life ± 10 % of the lifetime (agent/src/rotation.rs), counted from
/// when the agent received the SVID; so the next SVID is due between 40 % and 60 %.
const EARLIEST_ROTATION: f64 = 0.4;
const LATEST_ROTATION: f64 = 0.6;

/// How late past the latest point of the schedule a new SVID may reach its workload: minting
/// and delivery take time, and a certificate's notAfter has whole seconds, so the issue time
/// derived from it may be up to 1 s early. The larger of 2 s and a tenth of the TTL (3 s for
/// 30 s SVIDs, which then still have more than a third of their life left).
fn lateness_slack(ttl: Duration) -> Duration {
    (ttl / 10).max(Duration::from_secs(2))
}

/// A rotation may not come before the earliest point of the schedule; this allows for the
/// millisecond rounding of the timestamps only.
const EARLY_TOLERANCE: Duration = Duration::from_millis(100);

/// Resident memory after warm-up may grow by at most this fraction…
const RSS_GROWTH_FRACTION: f64 = 0.10;
/// …or this many KiB, whichever is more (allocator arenas settle in steps of a few MB).
const RSS_GROWTH_FLOOR_KIB: u64 = 4 * 1024;
/// Open descriptors at the end may exceed the count after warm-up by at most this much
/// (connections in flight: a proxy session being replaced, an issuer call).
const FD_SLACK: u64 = 8;
/// Baseline and end figures are medians of this many samples, so one sample taken during a
/// burst of minting does not decide the verdict.
const WINDOW: usize = 3;

/// The issuer's store cache (MiB) a soak runs with. The cache legitimately grows with what
/// is written until it reaches its size (`[store] cache_mb`, 32 MiB by default); at a soak's
/// pace that takes longer than a short run, and growth from filling it would look like a
/// leak. A small cache is full before the warm-up ends, so growth after it is not the cache.
pub const ISSUER_CACHE_MB: u64 = 2;

/// What to run and for how long.
#[derive(Debug, Clone)]
pub struct Plan {
    /// How long the workloads run (after everything is set up).
    pub duration: Duration,
    /// Workload processes, split evenly over the two agents.
    pub workloads: usize,
    /// X509-SVID TTL of every workload and proxy identity.
    pub ttl: Duration,
    /// Memory and descriptors are judged from this point of the run on.
    pub warmup: Duration,
    /// How often memory and descriptors are sampled.
    pub sample_every: Duration,
    /// A progress line on stdout this often; None: quiet.
    pub progress_every: Option<Duration>,
    /// The `soak` binary, whose `workload` subcommand is a workload.
    pub workload_exe: PathBuf,
    /// The Python with pymodbus.
    pub python: PathBuf,
    /// Seconds between two reads of the proxy poller.
    pub poll_interval: f64,
    /// Where to copy the issuer's, the agents' and the workloads' logs at the end (the run's
    /// own folders are temporary); None: nowhere.
    pub keep_logs: Option<PathBuf>,
    /// The issuer's `[store] cache_mb` for the run.
    pub issuer_cache_mb: u64,
}

impl Plan {
    /// The warm-up for a run of `duration` with `ttl`: two full lifetimes (every workload has
    /// rotated at least twice, allocator and connection pools have settled), but never more
    /// than half the run.
    pub fn default_warmup(duration: Duration, ttl: Duration) -> Duration {
        (ttl * 2).max(duration / 5).min(duration / 2)
    }
}

// ---------------------------------------------------------------------------------------------
// The workload side.

/// A workload: keeps a FetchX509SVID stream open on `socket` and prints one line per event on
/// stdout until stdin closes (its orchestrator went away):
///
/// - `svid valid|expired SPIFFE_ID SERIAL NOT_BEFORE NOT_AFTER RECEIVED_MS` for every message
///   (times in Unix seconds, receipt in Unix milliseconds); `expired` when the SVID's notAfter
///   had passed when it arrived;
/// - `quiet NOT_AFTER NOW_MS` when the SVID it holds expired and no new one came;
/// - `error NOW_MS MESSAGE` when the stream failed; it connects again a second later.
pub async fn workload(socket: &Path) -> Result<()> {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    loop {
        let outcome = watch_svids(socket).await;
        let why = match outcome {
            Ok(()) => "the stream ended".to_owned(),
            Err(e) => format!("{e:#}").replace('\n', " "),
        };
        println!("error {} {why}", unix_millis(SystemTime::now()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn watch_svids(socket: &Path) -> Result<()> {
    let mut client = crate::workload_client(socket).await?;
    let mut stream = client
        .fetch_x509svid(crate::x509_request(true))
        .await?
        .into_inner();
    let mut expires: Option<SystemTime> = None;
    loop {
        let deadline = expires;
        let silence = async move {
            match deadline {
                Some(at) => {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left).await;
                }
                None => std::future::pending().await,
            }
        };
        let message = tokio::select! {
            message = stream.message() => message?,
            () = silence => {
                let at = expires.take().map_or(0, unix_seconds);
                println!("quiet {at} {}", unix_millis(SystemTime::now()));
                continue;
            }
        };
        let Some(message) = message else {
            return Ok(());
        };
        let received = SystemTime::now();
        let svid = message
            .svids
            .first()
            .context("a message without an X509-SVID")?;
        let leaf = Leaf::first_of(&svid.x509_svid)?;
        let state = if received < leaf.not_after {
            "valid"
        } else {
            "expired"
        };
        println!(
            "svid {state} {} {} {} {} {}",
            svid.spiffe_id,
            leaf.serial,
            unix_seconds(leaf.not_before),
            unix_seconds(leaf.not_after),
            unix_millis(received)
        );
        expires = Some(leaf.not_after);
    }
}

/// What a workload notes of its leaf certificate.
struct Leaf {
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
}

impl Leaf {
    /// The first certificate of concatenated DER (`x509_svid` is the chain, leaf first).
    fn first_of(chain: &[u8]) -> Result<Self> {
        use der::{Decode, SliceReader};
        let mut reader = SliceReader::new(chain)?;
        let cert = x509_cert::Certificate::decode(&mut reader).context("the X509-SVID leaf")?;
        let tbs = &cert.tbs_certificate;
        Ok(Self {
            serial: hex::encode(tbs.serial_number.as_bytes()),
            not_before: tbs.validity.not_before.to_system_time(),
            not_after: tbs.validity.not_after.to_system_time(),
        })
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn unix_millis(at: SystemTime) -> u64 {
    u64::try_from(
        at.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------------------------
// What the orchestrator records.

/// One message a workload received.
#[derive(Debug, Clone, PartialEq)]
struct Receipt {
    serial: String,
    not_before: u64,
    not_after: u64,
    received_ms: u64,
    expired: bool,
}

/// Everything one workload reported.
#[derive(Debug, Default)]
struct WorkloadLog {
    /// Messages in the order they came.
    receipts: Vec<Receipt>,
    /// Times the stream stayed silent past expiry.
    quiet: u64,
    /// Stream failures, and the last one's text.
    errors: u64,
    last_error: Option<String>,
    /// Messages naming another SPIFFE ID than the workload's entry.
    wrong_id: u64,
    /// Lines that made no sense.
    garbled: u64,
}

impl WorkloadLog {
    fn record(&mut self, line: &str, spiffe_id: &str) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["svid", state, id, serial, not_before, not_after, received] => {
                let parsed = (not_before.parse(), not_after.parse(), received.parse());
                let (Ok(not_before), Ok(not_after), Ok(received_ms)) = parsed else {
                    self.garbled += 1;
                    return;
                };
                if *id != spiffe_id {
                    self.wrong_id += 1;
                }
                self.receipts.push(Receipt {
                    serial: (*serial).to_owned(),
                    not_before,
                    not_after,
                    received_ms,
                    expired: *state != "valid",
                });
            }
            ["quiet", ..] => self.quiet += 1,
            ["error", _, ..] => {
                self.errors += 1;
                self.last_error = Some(words[2..].join(" "));
            }
            _ => self.garbled += 1,
        }
    }
}

/// How one workload's SVIDs followed the schedule.
#[derive(Debug, Default, Clone, PartialEq)]
struct Schedule {
    /// Distinct SVIDs received.
    svids: usize,
    /// Messages received (a message repeats the SVID when only the bundle or CRL changed).
    messages: usize,
    /// New SVIDs after the first.
    rotations: usize,
    /// Messages whose SVID had expired when they arrived.
    expired: usize,
    /// The latest arrival of a new SVID relative to the latest point of the schedule
    /// (negative: before it), in ms.
    worst_lateness_ms: Option<i64>,
    /// The least time the previous SVID still had when its successor arrived, in ms.
    least_left_ms: Option<i64>,
    /// When rotations came, as the least and greatest fraction of the life the previous SVID
    /// had left when it arrived (the agent's schedule: 0.4 to 0.6 of that). Receipt to
    /// receipt, so free of the whole-second notAfter; the first SVID of a stream is left out
    /// (the agent held it before the workload connected).
    interval_fraction: Option<(f64, f64)>,
    /// What broke the schedule.
    problems: Vec<String>,
}

/// Judges a workload's receipts: every new SVID must arrive inside
/// `[issued + 40 % TTL, issued + 60 % TTL + slack]` of the one before (issued = notAfter −
/// TTL) and before that one's notAfter; the run's end must come before the last SVID was due
/// for rotation (+ slack), or a rotation was missed.
fn judge(receipts: &[Receipt], ttl: Duration, end_ms: u64) -> Schedule {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
    let slack_ms = i64::try_from(lateness_slack(ttl).as_millis()).unwrap_or(i64::MAX);
    let early_ms = i64::try_from(EARLY_TOLERANCE.as_millis()).unwrap_or(0);
    let window = |r: &Receipt| {
        let issued = i64::try_from(r.not_after * 1000).unwrap_or(i64::MAX) - ttl_ms;
        (
            issued + (ttl_ms as f64 * EARLIEST_ROTATION) as i64,
            issued + (ttl_ms as f64 * LATEST_ROTATION) as i64,
        )
    };
    let mut schedule = Schedule {
        messages: receipts.len(),
        ..Schedule::default()
    };
    let mut seen = HashSet::new();
    let mut current: Option<&Receipt> = None;
    for receipt in receipts {
        if receipt.expired {
            schedule.expired += 1;
            schedule
                .problems
                .push(format!("SVID {} served expired", receipt.serial));
        }
        if current.is_some_and(|c| c.serial == receipt.serial) {
            continue;
        }
        if !seen.insert(receipt.serial.clone()) {
            schedule.problems.push(format!(
                "SVID {} served again after its successor",
                receipt.serial
            ));
            continue;
        }
        schedule.svids += 1;
        let received = i64::try_from(receipt.received_ms).unwrap_or(i64::MAX);
        if i64::try_from(receipt.not_before * 1000).unwrap_or(i64::MAX) > received {
            schedule.problems.push(format!(
                "SVID {} served before its notBefore",
                receipt.serial
            ));
        }
        if let Some(previous) = current {
            let previous_received = i64::try_from(previous.received_ms).unwrap_or(0);
            let life =
                i64::try_from(previous.not_after * 1000).unwrap_or(i64::MAX) - previous_received;
            if schedule.rotations > 0 && life > 0 {
                let fraction = (received - previous_received) as f64 / life as f64;
                schedule.interval_fraction = Some(
                    schedule
                        .interval_fraction
                        .map_or((fraction, fraction), |(lo, hi)| {
                            (lo.min(fraction), hi.max(fraction))
                        }),
                );
            }
            schedule.rotations += 1;
            let (earliest, latest) = window(previous);
            let lateness = received - latest;
            schedule.worst_lateness_ms = Some(
                schedule
                    .worst_lateness_ms
                    .map_or(lateness, |w| w.max(lateness)),
            );
            let left = i64::try_from(previous.not_after * 1000).unwrap_or(i64::MAX) - received;
            schedule.least_left_ms = Some(schedule.least_left_ms.map_or(left, |l| l.min(left)));
            if left <= 0 {
                schedule.problems.push(format!(
                    "SVID {} came {} ms after its predecessor expired",
                    receipt.serial, -left
                ));
            } else if lateness > slack_ms {
                schedule.problems.push(format!(
                    "SVID {} came {lateness} ms after the latest rotation point (slack {slack_ms} ms), at Unix time {:.3}",
                    receipt.serial,
                    received as f64 / 1000.0
                ));
            }
            if received + early_ms < earliest {
                schedule.problems.push(format!(
                    "SVID {} came {} ms before the earliest rotation point",
                    receipt.serial,
                    earliest - received
                ));
            }
        }
        current = Some(receipt);
    }
    match current {
        None => schedule.problems.push("no SVID at all".to_owned()),
        Some(last) => {
            let (_, latest) = window(last);
            let end = i64::try_from(end_ms).unwrap_or(i64::MAX);
            if end > latest + slack_ms {
                schedule.problems.push(format!(
                    "no rotation of SVID {} by the end, {} ms past its latest rotation point",
                    last.serial,
                    end - latest
                ));
            }
        }
    }
    schedule
}

// ---------------------------------------------------------------------------------------------
// Processes: the PLC, the poller, the workloads, and /proc samples.

/// A child killed when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// modbus_plc.py on a free port; returns it and the port.
fn start_plc(python: &Path) -> Result<(Owned, u16)> {
    let (child, port) = crate::spawn_modbus_plc(python, 0)?;
    Ok((Owned(child), port))
}

/// The poller's totals (its last JSON line).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProxyTotals {
    /// Reads answered with the PLC's values.
    pub ok: u64,
    /// Reads that failed (exception, wrong values, timeout, lost or refused connection).
    pub failed: u64,
    /// Connections made (each a new TLS handshake between the agents).
    pub sessions: u64,
    /// The last failure's text.
    pub last_error: Option<String>,
}

impl ProxyTotals {
    fn from_json(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        Some(Self {
            ok: v["ok"].as_u64()?,
            failed: v["failed"].as_u64()?,
            sessions: v["sessions"].as_u64()?,
            last_error: v["last_error"].as_str().map(str::to_owned),
        })
    }
}

/// Memory and descriptors of one process at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Sample {
    rss_kib: u64,
    fds: u64,
}

impl Sample {
    /// VmRSS from /proc/<pid>/status and the entries of /proc/<pid>/fd.
    fn of(pid: u32) -> Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("process {pid} is gone"))?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .context("no VmRSS")?;
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
        Ok(Self { rss_kib, fds })
    }
}

/// How a process's memory and descriptors went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessFigures {
    /// issuer, agent-1, agent-2.
    pub name: String,
    /// At the first sample (all workloads connected).
    pub rss_start_kib: u64,
    /// Median of the first samples after warm-up.
    pub rss_baseline_kib: u64,
    /// Median of the last samples.
    pub rss_end_kib: u64,
    /// The highest sample.
    pub rss_max_kib: u64,
    pub fds_start: u64,
    pub fds_baseline: u64,
    pub fds_end: u64,
    pub fds_max: u64,
    /// Samples taken.
    pub samples: usize,
}

impl ProcessFigures {
    fn from_samples(name: &str, samples: &[(Duration, Sample)], warmup: Duration) -> Option<Self> {
        let first = samples.first()?.1;
        let after: Vec<Sample> = samples
            .iter()
            .filter(|(at, _)| *at >= warmup)
            .map(|(_, s)| *s)
            .collect();
        let after = if after.is_empty() {
            vec![samples.last()?.1]
        } else {
            after
        };
        let head = &after[..after.len().min(WINDOW)];
        let tail = &after[after.len().saturating_sub(WINDOW)..];
        let median = |window: &[Sample], field: fn(&Sample) -> u64| {
            let mut values: Vec<u64> = window.iter().map(field).collect();
            values.sort_unstable();
            values[values.len() / 2]
        };
        Some(Self {
            name: name.to_owned(),
            rss_start_kib: first.rss_kib,
            rss_baseline_kib: median(head, |s| s.rss_kib),
            rss_end_kib: median(tail, |s| s.rss_kib),
            rss_max_kib: samples.iter().map(|(_, s)| s.rss_kib).max()?,
            fds_start: first.fds,
            fds_baseline: median(head, |s| s.fds),
            fds_end: median(tail, |s| s.fds),
            fds_max: samples.iter().map(|(_, s)| s.fds).max()?,
            samples: samples.len(),
        })
    }

    /// The allowed resident memory at the end.
    fn rss_limit_kib(&self) -> u64 {
        let fraction = (self.rss_baseline_kib as f64 * RSS_GROWTH_FRACTION) as u64;
        self.rss_baseline_kib + fraction.max(RSS_GROWTH_FLOOR_KIB)
    }

    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.rss_end_kib > self.rss_limit_kib() {
            problems.push(format!(
                "{}: resident memory grew from {} to {} KiB after warm-up (limit {} KiB)",
                self.name,
                self.rss_baseline_kib,
                self.rss_end_kib,
                self.rss_limit_kib()
            ));
        }
        if self.fds_end > self.fds_baseline + FD_SLACK {
            problems.push(format!(
                "{}: open descriptors grew from {} to {} after warm-up (slack {FD_SLACK})",
                self.name, self.fds_baseline, self.fds_end
            ));
        }
        problems
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

/// The outcome of a run: every figure, and what failed.
#[derive(Debug, Clone)]
pub struct Report {
    /// How long the workloads ran.
    pub duration: Duration,
    /// Set-up time (issuer, agents, entries, first SVIDs, workloads connected).
    pub setup: Duration,
    pub workloads: usize,
    pub ttl: Duration,
    pub warmup: Duration,
    /// Distinct SVIDs received over all workloads, and messages.
    pub svids: usize,
    pub messages: usize,
    /// Rotations per workload: least, mean, most; and what the schedule implies (duration ÷
    /// half the TTL).
    pub rotations_min: usize,
    pub rotations_mean: f64,
    pub rotations_max: usize,
    pub rotations_expected: f64,
    /// The latest arrival of a new SVID relative to the schedule's latest point (ms; negative:
    /// always inside the window), and the slack allowed.
    pub worst_lateness_ms: Option<i64>,
    pub slack: Duration,
    /// The least life an SVID still had when its successor arrived (ms).
    pub least_left_ms: Option<i64>,
    /// When rotations came, as fractions of the life the previous SVID had left when it
    /// arrived: least and greatest (the agent's schedule: 0.4 to 0.6).
    pub interval_fraction: Option<(f64, f64)>,
    /// SVIDs served expired (must be 0), silent streams past expiry, stream failures.
    pub expired: usize,
    pub quiet: u64,
    pub stream_errors: u64,
    pub proxy: ProxyTotals,
    pub processes: Vec<ProcessFigures>,
    /// Why the run failed; empty: PASS.
    pub failures: Vec<String>,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "soak report")?;
        writeln!(
            f,
            "  duration        {:.0} s of load after {:.0} s of set-up; warm-up {:.0} s",
            self.duration.as_secs_f64(),
            self.setup.as_secs_f64(),
            self.warmup.as_secs_f64()
        )?;
        writeln!(
            f,
            "  workloads       {} processes (uid {UID_BASE}+), {} per agent, X509-SVID TTL {} s",
            self.workloads,
            self.workloads.div_ceil(2),
            self.ttl.as_secs()
        )?;
        writeln!(
            f,
            "  SVIDs           {} received ({} messages)",
            self.svids, self.messages
        )?;
        writeln!(
            f,
            "  rotations       per workload min {} / mean {:.1} / max {} (schedule: ~{:.1})",
            self.rotations_min, self.rotations_mean, self.rotations_max, self.rotations_expected
        )?;
        let ms = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} ms"));
        writeln!(
            f,
            "  lateness        worst {} vs. the latest point of the schedule (60 % of the TTL; slack {} ms)",
            ms(self.worst_lateness_ms),
            self.slack.as_millis()
        )?;
        writeln!(
            f,
            "  overlap         least life left in an SVID when its successor came: {}",
            ms(self.least_left_ms)
        )?;
        if let Some((lo, hi)) = self.interval_fraction {
            writeln!(
                f,
                "  schedule        rotations came at {:.1} %..{:.1} % of the life the previous SVID had left on arrival (agent: 40 %..60 %)",
                lo * 100.0,
                hi * 100.0
            )?;
        }
        writeln!(
            f,
            "  expired served  {} (must be 0); silent past expiry {}; stream failures {}",
            self.expired, self.quiet, self.stream_errors
        )?;
        writeln!(
            f,
            "  PLC proxy       {} reads ok, {} failed, {} sessions{}",
            self.proxy.ok,
            self.proxy.failed,
            self.proxy.sessions,
            self.proxy
                .last_error
                .as_deref()
                .map_or_else(String::new, |e| format!(" (last failure: {e})"))
        )?;
        writeln!(
            f,
            "  {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} | fds {:>5} {:>5} {:>5} {:>5}",
            "process",
            "rss start",
            "after w-u",
            "end",
            "max",
            "limit",
            "start",
            "w-u",
            "end",
            "max"
        )?;
        for p in &self.processes {
            writeln!(
                f,
                "  {:<9} {:>10} {:>10} {:>10} {:>10} {:>10} |     {:>5} {:>5} {:>5} {:>5}",
                p.name,
                mib(p.rss_start_kib),
                mib(p.rss_baseline_kib),
                mib(p.rss_end_kib),
                mib(p.rss_max_kib),
                mib(p.rss_limit_kib()),
                p.fds_start,
                p.fds_baseline,
                p.fds_end,
                p.fds_max
            )?;
        }
        writeln!(
            f,
            "  thresholds      0 expired, 0 silent, 0 stream failures, 0 proxy failures; every \
             rotation in [40 %, 60 % of TTL + {} ms]; RSS end <= after-warm-up + max(10 %, 4 MiB); \
             fds end <= after-warm-up + {FD_SLACK}",
            self.slack.as_millis()
        )?;
        if self.failures.is_empty() {
            write!(f, "PASS")
        } else {
            writeln!(f, "FAIL")?;
            for failure in &self.failures {
                writeln!(f, "  - {failure}")?;
            }
            Ok(())
        }
    }
}

const PRESS: &str = "spiffe://plant.example/plc/press-7";
const HMI: &str = "spiffe://plant.example/scada/hmi-1";

fn workload_id(i: usize) -> String {
    format!("spiffe://plant.example/soak/workload-{i}")
}

fn join_token_agent(issuer: &Issuer, extra: &str) -> Result<Agent> {
    let token = issuer.join_token()?;
    Agent::start_with_config(
        issuer,
        crate::JOIN_TOKEN_ATTESTATION,
        &[("join.token", &token)],
        extra,
    )
}

/// Entries through the issuer's admin socket (one `issuer entry create` process each would
/// take a minute for 200).
fn create_entries(issuer: &Issuer, entries: Vec<proto::admin::CreateEntryRequest>) -> Result<()> {
    let socket = issuer.dir.path().join("state/admin.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let channel = crate::unix_channel(&socket)
            .await
            .context("connecting to the issuer's admin socket")?;
        let mut client = proto::admin::entries_client::EntriesClient::new(channel);
        for entry in entries {
            let id = entry.spiffe_id.clone();
            client
                .create(entry)
                .await
                .with_context(|| format!("creating the entry for {id}"))?;
        }
        Ok(())
    })
}

/// Waits until `agent`'s status.json shows at least `count` entries holding an X509-SVID.
fn wait_for_svids(agent: &Agent, count: usize, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let held = std::fs::read_to_string(agent.dir.path().join("state/status.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .map_or(0, |s| {
                s["entries"]
                    .as_array()
                    .map_or(0, |e| e.iter().filter(|e| e["svid"].is_object()).count())
            });
        if held >= count {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the agent holds {held} of {count} SVIDs after {} s:\n{}",
            within.as_secs(),
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_for_log(agent: &Agent, needle: &str, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    while !agent.log().contains(needle) {
        ensure!(
            Instant::now() < deadline,
            "{needle:?} not in the agent log within {} s:\n{}",
            within.as_secs(),
            tail(&agent.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The last lines of a log, for error messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Runs the whole soak; `Err` only when it could not be set up or a part died.
pub fn run(plan: &Plan) -> Result<Report> {
    ensure!(plan.workloads >= 2, "at least 2 workloads (one per agent)");
    ensure!(
        plan.ttl >= Duration::from_secs(4),
        "a TTL under 4 s leaves no room for the schedule's slack"
    );
    let ttl_secs = u32::try_from(plan.ttl.as_secs())?;
    let began = Instant::now();
    let say = |text: &str| {
        if plan.progress_every.is_some() {
            println!("[soak] {:>5.1} s  {text}", began.elapsed().as_secs_f64());
        }
    };

    let issuer = Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?;
        ensure!(
            text.lines().any(|l| l.starts_with("cache_mb = ")),
            "issuer.toml has no [store] cache_mb line"
        );
        let edited: Vec<String> = text
            .lines()
            .map(|line| {
                if line.starts_with("cache_mb = ") {
                    format!("cache_mb = {}", plan.issuer_cache_mb)
                } else {
                    line.to_owned()
                }
            })
            .collect();
        Ok(std::fs::write(toml, edited.join("\n") + "\n")?)
    })?;
    let (plc, plc_port) = start_plc(&plan.python)?;
    let mut agent_1 = join_token_agent(
        &issuer,
        &format!(
            "\n[[proxy.inbound]]\ndevice = \"press-7\"\nspiffe_id = \"{PRESS}\"\n\
             listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:{plc_port}\"\nprotocol = \"modbus\"\n\
             connect_timeout = \"2s\"\nallow = [ {{ spiffe_id = \"{HMI}\", access = \"read-only\" }} ]\n"
        ),
    )?;
    let node_1 = agent_1.node_id()?;
    let press = agent_1.proxy_address("press-7")?;
    let mut agent_2 = join_token_agent(
        &issuer,
        &format!(
            "\n[[proxy.outbound]]\ndevice = \"hmi-1\"\nspiffe_id = \"{HMI}\"\nlisten = \"127.0.0.1:0\"\n\
             gateway = \"{press}\"\nserver_spiffe_id = \"{PRESS}\"\n"
        ),
    )?;
    let node_2 = agent_2.node_id()?;
    let hmi = agent_2.proxy_address("hmi-1")?;
    say(&format!(
        "issuer, PLC, agent-1 ({node_1}) and agent-2 ({node_2}) up"
    ));

    let entry =
        |spiffe_id: String, parent: &str, selector: String| proto::admin::CreateEntryRequest {
            spiffe_id,
            parent_id: parent.to_owned(),
            selectors: vec![selector],
            x509_svid_ttl_seconds: ttl_secs,
            ..Default::default()
        };
    let mut entries = vec![
        entry(
            PRESS.to_owned(),
            &node_1,
            "legacy:device:press-7".to_owned(),
        ),
        entry(HMI.to_owned(), &node_2, "legacy:device:hmi-1".to_owned()),
    ];
    for i in 0..plan.workloads {
        let parent = if i % 2 == 0 { &node_1 } else { &node_2 };
        let uid = UID_BASE + u32::try_from(i)?;
        entries.push(entry(workload_id(i), parent, format!("unix:uid:{uid}")));
    }
    create_entries(&issuer, entries)?;
    let setup_limit = Duration::from_secs(120);
    wait_for_svids(&agent_1, plan.workloads.div_ceil(2) + 1, setup_limit)?;
    wait_for_svids(&agent_2, plan.workloads / 2 + 1, setup_limit)?;
    wait_for_log(&agent_1, "proxy identity ready", setup_limit)?;
    wait_for_log(&agent_2, "proxy identity ready", setup_limit)?;
    say(&format!(
        "{} entries synced, first SVIDs minted",
        plan.workloads + 2
    ));

    // The workloads, each under its own uid, their lines read by one thread each.
    let logs: Arc<Vec<Mutex<WorkloadLog>>> =
        Arc::new((0..plan.workloads).map(|_| Mutex::default()).collect());
    let svids_seen = Arc::new(AtomicU64::new(0));
    let stderr = std::fs::File::create(issuer.dir.path().join("workloads.log"))?;
    let mut workloads = Vec::with_capacity(plan.workloads);
    let mut readers = Vec::with_capacity(plan.workloads);
    for i in 0..plan.workloads {
        let socket = if i % 2 == 0 {
            &agent_1.socket
        } else {
            &agent_2.socket
        };
        let uid = UID_BASE + u32::try_from(i)?;
        let mut child = Command::new(&plan.workload_exe)
            .arg("workload")
            .arg("--socket")
            .arg(socket)
            .current_dir("/")
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr.try_clone()?)
            .spawn()
            .with_context(|| format!("starting workload {i} as uid {uid}"))?;
        let stdout = child.stdout.take().context("workload stdout")?;
        workloads.push(Owned(child));
        let (logs, seen, id) = (Arc::clone(&logs), Arc::clone(&svids_seen), workload_id(i));
        readers.push(std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.starts_with("svid ") {
                    seen.fetch_add(1, Ordering::Relaxed);
                }
                if let Ok(mut log) = logs[i].lock() {
                    log.record(&line, &id);
                }
            }
        }));
    }
    // Every workload holds its first SVID before the clock starts.
    let deadline = Instant::now() + setup_limit;
    while logs
        .iter()
        .any(|l| l.lock().map_or(true, |l| l.receipts.is_empty()))
    {
        if let Some((i, status)) = workloads
            .iter_mut()
            .enumerate()
            .find_map(|(i, w)| Some((i, w.0.try_wait().ok().flatten()?)))
        {
            bail!("workload {i} exited with {status}");
        }
        ensure!(
            Instant::now() < deadline,
            "not every workload got an SVID within {} s",
            setup_limit.as_secs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // PLC traffic through agent-2's outbound proxy and agent-1's inbound proxy.
    let mut poller = Command::new(&plan.python)
        .arg(script("modbus_poll.py"))
        .arg(hmi.to_string())
        .args(["--interval", &plan.poll_interval.to_string()])
        .args(["--session", "5", "--timeout", "10"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting modbus_poll.py")?;
    let poll_out = poller.stdout.take().context("poller stdout")?;
    let poller = Owned(poller);
    let proxy = Arc::new(Mutex::new(ProxyTotals::default()));
    let poll_reader = {
        let proxy = Arc::clone(&proxy);
        std::thread::spawn(move || {
            for line in BufReader::new(poll_out).lines() {
                let Ok(line) = line else { break };
                if let (Some(totals), Ok(mut last)) = (ProxyTotals::from_json(&line), proxy.lock())
                {
                    *last = totals;
                }
            }
        })
    };
    let setup = began.elapsed();
    say(&format!(
        "{} workloads hold their first SVID; load runs for {} s",
        plan.workloads,
        plan.duration.as_secs()
    ));

    // The load: sample, report progress, watch that every part stays alive.
    let processes = [
        ("issuer", issuer.pid().context("the issuer is not running")?),
        ("agent-1", agent_1.pid().context("agent-1 is not running")?),
        ("agent-2", agent_2.pid().context("agent-2 is not running")?),
    ];
    let start = Instant::now();
    let mut samples: Vec<Vec<(Duration, Sample)>> = vec![Vec::new(); processes.len()];
    let mut next_sample = start;
    let mut next_progress = plan.progress_every.map(|every| start + every);
    let end = start + plan.duration;
    let mut died = None;
    while Instant::now() < end {
        let now = Instant::now();
        if now >= next_sample {
            for (k, (name, pid)) in processes.iter().enumerate() {
                let sample = Sample::of(*pid).with_context(|| format!("sampling {name}"))?;
                samples[k].push((now - start, sample));
            }
            next_sample += plan.sample_every;
        }
        if let Some(at) = next_progress.filter(|at| now >= *at) {
            let rss: Vec<String> = processes
                .iter()
                .zip(&samples)
                .filter_map(|((name, _), s)| {
                    s.last().map(|(_, s)| format!("{name} {}", mib(s.rss_kib)))
                })
                .collect();
            let totals = proxy.lock().map(|p| p.clone()).unwrap_or_default();
            println!(
                "[soak] {:>4} s / {} s  SVIDs {}  proxy ok {} failed {}  RSS {}",
                (now - start).as_secs(),
                plan.duration.as_secs(),
                svids_seen.load(Ordering::Relaxed),
                totals.ok,
                totals.failed,
                rss.join(", ")
            );
            next_progress = plan.progress_every.map(|every| at + every);
        }
        if let Some((i, status)) = workloads
            .iter_mut()
            .enumerate()
            .find_map(|(i, w)| Some((i, w.0.try_wait().ok().flatten()?)))
        {
            died = Some(format!("workload {i} exited with {status}"));
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let end_ms = unix_millis(SystemTime::now());
    let duration = start.elapsed();
    // One last sample at the very end.
    for (k, (name, pid)) in processes.iter().enumerate() {
        let sample = Sample::of(*pid).with_context(|| format!("sampling {name}"))?;
        samples[k].push((duration, sample));
    }

    // Stop the poller first (it prints its totals on SIGTERM), then the workloads.
    crate::run_ok(Command::new("kill").args(["-TERM", &poller.0.id().to_string()]))?;
    let _ = poll_reader.join();
    drop(poller);
    drop(workloads);
    for reader in readers {
        let _ = reader.join();
    }
    drop(plc);

    let mut report = Report {
        duration,
        setup,
        workloads: plan.workloads,
        ttl: plan.ttl,
        warmup: plan.warmup,
        svids: 0,
        messages: 0,
        rotations_min: usize::MAX,
        rotations_mean: 0.0,
        rotations_max: 0,
        rotations_expected: duration.as_secs_f64() / (plan.ttl.as_secs_f64() / 2.0),
        worst_lateness_ms: None,
        slack: lateness_slack(plan.ttl),
        least_left_ms: None,
        interval_fraction: None,
        expired: 0,
        quiet: 0,
        stream_errors: 0,
        proxy: proxy.lock().map(|p| p.clone()).unwrap_or_default(),
        processes: Vec::new(),
        failures: Vec::new(),
    };
    if let Some(died) = died {
        report.failures.push(died);
    }
    let mut rotations_total = 0;
    for (i, log) in logs.iter().enumerate() {
        let log = log
            .lock()
            .map_err(|_| anyhow::anyhow!("workload {i}'s log is poisoned"))?;
        let schedule = judge(&log.receipts, plan.ttl, end_ms);
        report.svids += schedule.svids;
        report.messages += schedule.messages;
        report.rotations_min = report.rotations_min.min(schedule.rotations);
        report.rotations_max = report.rotations_max.max(schedule.rotations);
        rotations_total += schedule.rotations;
        report.expired += schedule.expired;
        report.worst_lateness_ms = report.worst_lateness_ms.max(schedule.worst_lateness_ms);
        report.least_left_ms = match (report.least_left_ms, schedule.least_left_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        report.interval_fraction = match (report.interval_fraction, schedule.interval_fraction) {
            (Some((a, b)), Some((c, d))) => Some((a.min(c), b.max(d))),
            (a, b) => a.or(b),
        };
        report.quiet += log.quiet;
        report.stream_errors += log.errors;
        let mut problems = schedule.problems;
        if log.quiet > 0 {
            problems.push(format!("stream silent past expiry {} times", log.quiet));
        }
        if log.errors > 0 {
            problems.push(format!(
                "{} stream failures, the last: {}",
                log.errors,
                log.last_error.as_deref().unwrap_or("?")
            ));
        }
        if log.wrong_id > 0 {
            problems.push(format!("{} SVIDs for another SPIFFE ID", log.wrong_id));
        }
        if log.garbled > 0 {
            problems.push(format!("{} lines not understood", log.garbled));
        }
        // A few examples per workload are enough to see what happened.
        for problem in problems.into_iter().take(3) {
            report.failures.push(format!("workload {i}: {problem}"));
        }
    }
    report.rotations_mean = rotations_total as f64 / plan.workloads as f64;
    let p = &report.proxy;
    if p.failed > 0 {
        report.failures.push(format!(
            "PLC proxy: {} of {} reads failed (last: {})",
            p.failed,
            p.ok + p.failed,
            p.last_error.as_deref().unwrap_or("?")
        ));
    }
    if p.ok == 0 || p.sessions < 2 {
        report.failures.push(format!(
            "PLC proxy: too little traffic ({} reads, {} sessions)",
            p.ok, p.sessions
        ));
    }
    for ((name, _), samples) in processes.iter().zip(&samples) {
        if let Some(figures) = ProcessFigures::from_samples(name, samples, plan.warmup) {
            report.failures.extend(figures.problems());
            report.processes.push(figures);
        }
    }
    for (name, log) in [
        ("issuer", issuer.log()),
        ("agent-1", agent_1.log()),
        ("agent-2", agent_2.log()),
    ] {
        let panics = log.matches("panicked").count();
        if panics > 0 {
            report
                .failures
                .push(format!("{name}: {panics} panics in its log"));
        }
    }
    if let Some(dir) = &plan.keep_logs {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("issuer.log"), issuer.log())?;
        std::fs::write(dir.join("agent-1.log"), agent_1.log())?;
        std::fs::write(dir.join("agent-2.log"), agent_2.log())?;
        std::fs::copy(
            issuer.dir.path().join("workloads.log"),
            dir.join("workloads.log"),
        )?;
    }
    for (name, agent) in [("agent-1", &mut agent_1), ("agent-2", &mut agent_2)] {
        if !agent.stop()? {
            report
                .failures
                .push(format!("{name} did not exit cleanly on SIGTERM"));
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    /// An SVID issued at `issued` s (notAfter = issued + 30), received at `received` s.
    fn receipt(serial: &str, issued: u64, received: f64) -> Receipt {
        Receipt {
            serial: serial.to_owned(),
            not_before: issued - 60,
            not_after: issued + 30,
            received_ms: (received * 1000.0) as u64,
            expired: received >= (issued + 30) as f64,
        }
    }

    #[test]
    fn rotations_inside_the_window_pass() {
        let receipts = [
            receipt("a", 1000, 1000.1),
            receipt("a", 1000, 1005.0), // the same SVID again (a CRL update)
            receipt("b", 1015, 1015.2),
            receipt("c", 1028, 1028.1),
        ];
        let s = judge(&receipts, TTL, 1_040_000);
        assert_eq!(s.problems, Vec::<String>::new());
        assert_eq!((s.svids, s.messages, s.rotations), (3, 4, 2));
        // b came at 1015.2, the latest point was 1000 + 18.
        assert_eq!(s.worst_lateness_ms, Some(-2800));
        assert_eq!(s.least_left_ms, Some(14_800));
        // b to c: 12.9 s of the 29.8 s b had left; a to b is left out (a was held before
        // the stream opened).
        let (lo, hi) = s.interval_fraction.expect("one interval");
        assert!((lo - 12.9 / 29.8).abs() < 1e-3 && lo == hi, "{lo} {hi}");
    }

    #[test]
    fn a_late_an_early_and_an_expired_rotation_fail() {
        let late = judge(
            &[receipt("a", 1000, 1000.0), receipt("b", 1022, 1022.0)],
            TTL,
            1_030_000,
        );
        assert_eq!(late.problems.len(), 1, "{:?}", late.problems);
        assert!(late.problems[0].contains("after the latest rotation point"));

        let early = judge(
            &[receipt("a", 1000, 1000.0), receipt("b", 1010, 1010.0)],
            TTL,
            1_020_000,
        );
        assert!(
            early.problems[0].contains("before the earliest"),
            "{:?}",
            early.problems
        );

        let gap = judge(
            &[receipt("a", 1000, 1000.0), receipt("b", 1031, 1031.0)],
            TTL,
            1_040_000,
        );
        assert!(
            gap.problems[0].contains("after its predecessor expired"),
            "{:?}",
            gap.problems
        );

        let expired = judge(&[receipt("a", 1000, 1030.5)], TTL, 1_031_000);
        assert_eq!(expired.expired, 1);
        assert!(expired.problems[0].contains("served expired"));
    }

    #[test]
    fn a_missing_last_rotation_and_a_replayed_svid_fail() {
        let missed = judge(&[receipt("a", 1000, 1000.0)], TTL, 1_025_000);
        assert!(
            missed.problems[0].contains("no rotation"),
            "{:?}",
            missed.problems
        );
        let fine = judge(&[receipt("a", 1000, 1000.0)], TTL, 1_020_000);
        assert!(fine.problems.is_empty(), "{:?}", fine.problems);

        let replayed = judge(
            &[
                receipt("a", 1000, 1000.0),
                receipt("b", 1015, 1015.0),
                receipt("a", 1000, 1016.0),
            ],
            TTL,
            1_020_000,
        );
        assert!(
            replayed.problems[0].contains("served again"),
            "{:?}",
            replayed.problems
        );
        assert!(judge(&[], TTL, 0).problems[0].contains("no SVID"));
    }

    #[test]
    fn workload_lines_are_recorded() {
        let mut log = WorkloadLog::default();
        let id = "spiffe://plant.example/soak/workload-0";
        log.record(&format!("svid valid {id} ab12 940 1030 1000123"), id);
        log.record(
            "svid expired spiffe://plant.example/other cd 940 1030 1031000",
            id,
        );
        log.record("quiet 1030 1030001", id);
        log.record("error 1030002 transport error: broken pipe", id);
        log.record("nonsense", id);
        assert_eq!(log.receipts.len(), 2);
        assert_eq!(log.receipts[0].serial, "ab12");
        assert_eq!(log.receipts[0].received_ms, 1_000_123);
        assert!(!log.receipts[0].expired && log.receipts[1].expired);
        assert_eq!(
            (log.wrong_id, log.quiet, log.errors, log.garbled),
            (1, 1, 1, 1)
        );
        assert_eq!(
            log.last_error.as_deref(),
            Some("transport error: broken pipe")
        );
    }

    #[test]
    fn memory_and_descriptor_growth_is_judged_after_warm_up() {
        let at = |s: u64, rss_kib: u64, fds: u64| (Duration::from_secs(s), Sample { rss_kib, fds });
        // Start-up growth before warm-up is not held against it.
        let flat = [
            at(0, 5_000, 20),
            at(10, 20_000, 30),
            at(20, 21_000, 31),
            at(30, 21_500, 30),
            at(40, 21_000, 31),
            at(50, 22_000, 32),
            at(60, 21_800, 31),
        ];
        let figures = ProcessFigures::from_samples("agent-1", &flat, Duration::from_secs(20))
            .expect("figures");
        assert_eq!(
            (
                figures.rss_baseline_kib,
                figures.rss_end_kib,
                figures.rss_max_kib
            ),
            (21_000, 21_800, 22_000)
        );
        assert_eq!(figures.problems(), Vec::<String>::new());

        let leaking = [
            at(20, 20_000, 30),
            at(30, 20_000, 30),
            at(40, 20_000, 30),
            at(50, 30_000, 60),
            at(60, 31_000, 70),
            at(70, 32_000, 80),
        ];
        let figures = ProcessFigures::from_samples("agent-2", &leaking, Duration::from_secs(20))
            .expect("figures");
        let problems = figures.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    #[test]
    fn poller_lines_are_parsed() {
        let totals =
            ProxyTotals::from_json(r#"{"ok": 5, "failed": 1, "sessions": 2, "last_error": "x"}"#);
        assert_eq!(
            totals,
            Some(ProxyTotals {
                ok: 5,
                failed: 1,
                sessions: 2,
                last_error: Some("x".to_owned())
            })
        );
        assert_eq!(ProxyTotals::from_json("garbage"), None);
    }
}
