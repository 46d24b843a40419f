//! How the issuer treats a request that carries no credential this CA knows: admitted or
//! locked out by its source ([`crate::lockout`]), counted in the metrics, and audited once
//! per source and interval with the rest summarized.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lockout::{source_text, Failure, Locked, Source, Summary, SUMMARY_SWEEP};

impl crate::authority::Authority {
    /// Whether a client at `address` may be heard now (unknown addresses may).
    pub(crate) fn source_admitted(&self, address: Option<IpAddr>) -> Result<(), Locked> {
        match address {
            Some(address) => self.lockouts.check(Source::of(address), Instant::now()),
            None => Ok(()),
        }
    }

    /// Counts a token secret that matched no token (EST or join token) in the metrics; the
    /// refusal itself is counted toward the lockout by [`Self::refused_unauthenticated`].
    pub(crate) fn token_failed(&self, _address: Option<IpAddr>) {
        self.metrics.token_failure();
    }

    /// One refusal of a request that carried no credential this CA knows: counted (metrics
    /// by `kind`, the source's lockout), and audited as `audit_kind` with `detail` only if
    /// it is the source's first this interval, else left to the source's summary. Strings
    /// in `detail` must be [`truncated`] already.
    pub(crate) fn refused_unauthenticated(
        &self,
        address: Option<IpAddr>,
        kind: &'static str,
        audit_kind: &str,
        detail: serde_json::Value,
    ) {
        self.metrics.unauthenticated_refusal(kind);
        let source = address.map(Source::of);
        let now = Instant::now();
        if let Some(source) = source {
            if let Failure::LockedOut { failures } = self.lockouts.failed(source, now) {
                self.locked_out(source, failures, kind);
            }
        }
        let noted = self
            .lockouts
            .summaries
            .note(source, kind, now, self.now_ms());
        if let Some(summary) = noted.summary {
            self.write_summary(&summary);
        }
        if noted.first {
            let mut detail = detail;
            detail["source"] = source_text(source).into();
            self.audit_unless_unwritable(audit_kind, detail);
        }
    }

    fn locked_out(&self, source: Source, failures: u32, kind: &'static str) {
        self.metrics.source_lockout();
        let policy = self.lockouts.policy;
        tracing::warn!(
            %source,
            failures,
            last = kind,
            lockout_secs = policy.lockout.as_secs(),
            "too many refused requests without a valid credential: source locked out"
        );
        self.audit_unless_unwritable(
            "source.locked_out",
            serde_json::json!({
                "source": source.to_string(),
                "failures": failures,
                "last_refusal": kind,
                "window_secs": policy.window.as_secs(),
                "lockout_secs": policy.lockout.as_secs(),
            }),
        );
    }

    fn write_summary(&self, summary: &Summary) {
        let total: u64 = summary.counts.values().sum();
        tracing::info!(
            source = %source_text(summary.source),
            total,
            "refusals without a valid credential summarized"
        );
        self.audit_unless_unwritable(
            "refusals.summarized",
            serde_json::json!({
                "source": source_text(summary.source),
                "since": proto::rfc3339_unix(summary.since_ms / 1000),
                "refusals": total,
                "by_kind": summary.counts,
            }),
        );
    }

    /// Appends an audit record without waiting for it to reach the disk, unless the state
    /// folder can't take writes now (recording would be the very write the disk can't take).
    pub(crate) fn audit_unless_unwritable(&self, kind: &str, detail: serde_json::Value) {
        if let Err(why) = self.state_volume.probe() {
            tracing::warn!(
                ?why,
                kind,
                "not audited while the state folder is unwritable"
            );
            return;
        }
        if let Err(e) = self.audit(kind, detail) {
            tracing::error!(error = %e, kind, "could not write an audit record");
        }
    }

    fn now_ms(&self) -> i64 {
        crate::store::audit_ms(self.now())
    }

    /// Writes the summaries of sources whose interval is over, every few seconds, with one
    /// commit per sweep that wrote anything: the disk sees at most one flush per sweep for
    /// them, however many sources are refused.
    pub async fn keep_refusal_summaries_written(self: Arc<Self>) {
        let every = SUMMARY_SWEEP
            .min(self.lockouts.policy.summary_interval / 2)
            .max(Duration::from_millis(500));
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let due = self.lockouts.summaries.due(Instant::now());
            if due.is_empty() {
                continue;
            }
            for summary in &due {
                self.write_summary(summary);
            }
            if let Err(e) = self.store.durability.commit().await {
                tracing::error!(error = %e, "committing refusal summaries failed");
            }
        }
    }
}
