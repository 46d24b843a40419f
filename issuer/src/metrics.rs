//! Prometheus metrics (text exposition format 0.0.4) at `/metrics` on the plain-HTTP
//! listener: certificates by status and by expiry bucket, issuance count and latency by label,
//! EST answers by status code. Counting is lock-free on the request path; the inventory
//! gauges are recomputed in the background, never on a scrape: after a change, once at
//! least max(5 s, 10 × the last recomputation's duration) has passed, so a small store is
//! current within seconds and a store of millions is not rescanned back to back.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::authority::Authority;
use crate::store::{InventoryQuery, Status};

/// Upper bounds (seconds) of the issuance latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// The expiry windows operators watch.
const EXPIRY_BUCKETS: [(&str, i64); 4] = [("7d", 7), ("30d", 30), ("90d", 90), ("365d", 365)];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

/// The issuer's counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    issued: Mutex<BTreeMap<String, Arc<Histogram>>>,
    est_responses: Mutex<BTreeMap<u16, Arc<AtomicU64>>>,
    refusals: Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
    attestations: Mutex<BTreeMap<(&'static str, &'static str), Arc<AtomicU64>>>,
    connections_shed: Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
    unauthenticated_refusals: Mutex<BTreeMap<&'static str, Arc<AtomicU64>>>,
    token_failures: AtomicU64,
    source_lockouts: AtomicU64,
    inventory: Mutex<InventoryGauges>,
    /// Set when the inventory changed since the gauges were computed.
    inventory_dirty: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Default, Clone)]
struct InventoryGauges {
    by_status: Vec<(&'static str, usize)>,
    expiring: Vec<(&'static str, usize)>,
}

impl Metrics {
    /// Records one issued certificate and how long the pipeline took.
    pub fn issued(&self, label: &str, elapsed: Duration) {
        let histogram = {
            let Ok(mut map) = self.issued.lock() else {
                return;
            };
            map.entry(label.to_owned()).or_default().clone()
        };
        let secs = elapsed.as_secs_f64();
        for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&histogram.buckets) {
            if secs <= *bound {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        histogram.count.fetch_add(1, Ordering::Relaxed);
        histogram
            .sum_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.inventory_changed();
    }

    /// Marks the inventory gauges stale (issuance, revocation).
    pub fn inventory_changed(&self) {
        self.inventory_dirty.store(true, Ordering::Relaxed);
    }

    /// Records one EST answer by status code (refusals included).
    pub fn est_response(&self, status: u16) {
        let counter = {
            let Ok(mut map) = self.est_responses.lock() else {
                return;
            };
            map.entry(status).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one refused enrollment by reason (`unauthorized`, `forbidden`, `busy`, …).
    pub fn refused(&self, reason: &'static str) {
        let counter = {
            let Ok(mut map) = self.refusals.lock() else {
                return;
            };
            map.entry(reason).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one node attestation by method and outcome (`attested` or a refusal reason).
    pub fn attestation(&self, method: &'static str, outcome: &'static str) {
        let counter = {
            let Ok(mut map) = self.attestations.lock() else {
                return;
            };
            map.entry((method, outcome)).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of connections `listener` shed at its connection limit.
    pub fn connections_shed(&self, listener: &'static str) -> Arc<AtomicU64> {
        self.connections_shed
            .lock()
            .map(|mut map| map.entry(listener).or_default().clone())
            .unwrap_or_default()
    }

    /// Records one token secret that matched no token (EST or join token).
    pub fn token_failure(&self) {
        self.token_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one source locked out for too many refusals without a valid credential.
    pub fn source_lockout(&self) {
        self.source_lockouts.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one refusal of a request without a valid credential, by kind (EST
    /// `est_unknown_token`, `est_unknown_certificate`, …; attestation `attestation_<reason>`).
    pub fn unauthenticated_refusal(&self, kind: &'static str) {
        let counter = {
            let Ok(mut map) = self.unauthenticated_refusals.lock() else {
                return;
            };
            map.entry(kind).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let inventory = self.inventory.lock().map(|g| g.clone()).unwrap_or_default();
        out.push_str("# HELP plant_certificates Certificates in the inventory by status.\n# TYPE plant_certificates gauge\n");
        for (status, n) in &inventory.by_status {
            let _ = writeln!(out, "plant_certificates{{status=\"{status}\"}} {n}");
        }
        out.push_str("# HELP plant_certificates_expiring Valid certificates whose notAfter falls within the window.\n# TYPE plant_certificates_expiring gauge\n");
        for (window, n) in &inventory.expiring {
            let _ = writeln!(
                out,
                "plant_certificates_expiring{{within=\"{window}\"}} {n}"
            );
        }
        out.push_str("# HELP plant_issuance_duration_seconds Time from authorization to durable record, per label.\n# TYPE plant_issuance_duration_seconds histogram\n");
        if let Ok(map) = self.issued.lock() {
            for (label, h) in map.iter() {
                for (bound, bucket) in LATENCY_BUCKETS.iter().zip(&h.buckets) {
                    let _ = writeln!(
                        out,
                        "plant_issuance_duration_seconds_bucket{{label=\"{label}\",le=\"{bound}\"}} {}",
                        bucket.load(Ordering::Relaxed)
                    );
                }
                let count = h.count.load(Ordering::Relaxed);
                let _ = writeln!(out, "plant_issuance_duration_seconds_bucket{{label=\"{label}\",le=\"+Inf\"}} {count}");
                let _ = writeln!(
                    out,
                    "plant_issuance_duration_seconds_sum{{label=\"{label}\"}} {}",
                    h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
                );
                let _ = writeln!(
                    out,
                    "plant_issuance_duration_seconds_count{{label=\"{label}\"}} {count}"
                );
            }
        }
        out.push_str("# HELP plant_est_responses_total EST answers by HTTP status (4xx/5xx are refusals).\n# TYPE plant_est_responses_total counter\n");
        if let Ok(map) = self.est_responses.lock() {
            for (status, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "plant_est_responses_total{{code=\"{status}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP plant_enrollment_refusals_total Enrollments refused after they reached policy, by reason.\n# TYPE plant_enrollment_refusals_total counter\n");
        if let Ok(map) = self.refusals.lock() {
            for (reason, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "plant_enrollment_refusals_total{{reason=\"{reason}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP plant_node_attestations_total Agent node attestations by method and outcome.\n# TYPE plant_node_attestations_total counter\n");
        if let Ok(map) = self.attestations.lock() {
            for ((method, outcome), n) in map.iter() {
                let _ = writeln!(
                    out,
                    "plant_node_attestations_total{{method=\"{method}\",outcome=\"{outcome}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out.push_str("# HELP plant_connections_shed_total Connections closed at a listener's connection limit to admit a newer one.\n# TYPE plant_connections_shed_total counter\n");
        if let Ok(map) = self.connections_shed.lock() {
            for (listener, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "plant_connections_shed_total{{listener=\"{listener}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP plant_token_failures_total Token authentications with a secret that matches no token (EST and join tokens).\n# TYPE plant_token_failures_total counter\nplant_token_failures_total {}",
            self.token_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP plant_source_lockouts_total Sources locked out for too many refusals without a valid credential.\n# TYPE plant_source_lockouts_total counter\nplant_source_lockouts_total {}",
            self.source_lockouts.load(Ordering::Relaxed)
        );
        out.push_str("# HELP plant_unauthenticated_refusals_total Requests refused that carried no credential this CA knows, by reason (summarized in the audit log, not recorded one by one).\n# TYPE plant_unauthenticated_refusals_total counter\n");
        if let Ok(map) = self.unauthenticated_refusals.lock() {
            for (kind, n) in map.iter() {
                let _ = writeln!(
                    out,
                    "plant_unauthenticated_refusals_total{{reason=\"{kind}\"}} {}",
                    n.load(Ordering::Relaxed)
                );
            }
        }
        out
    }
}

impl Authority {
    /// Recomputes the inventory gauges.
    pub fn refresh_inventory_metrics(&self) {
        let now = self.now().unix_timestamp();
        let count = |query: InventoryQuery| {
            self.store
                .certificates
                .query(
                    &InventoryQuery {
                        limit: Some(1),
                        ..query
                    },
                    now,
                )
                .map(|p| p.total.unwrap_or_default())
                .unwrap_or(0)
        };
        let by_status = [
            ("valid", Status::Valid),
            ("expired", Status::Expired),
            ("revoked", Status::Revoked),
            ("superseded", Status::Superseded),
        ]
        .into_iter()
        .map(|(name, status)| {
            (
                name,
                count(InventoryQuery {
                    status: Some(status),
                    ..Default::default()
                }),
            )
        })
        .collect();
        let expiring = EXPIRY_BUCKETS
            .iter()
            .map(|(name, days)| {
                (
                    *name,
                    count(InventoryQuery {
                        expiring_within_secs: Some((*days * 86_400) as u64),
                        status: Some(Status::Valid),
                        ..Default::default()
                    }),
                )
            })
            .collect();
        if let Ok(mut gauges) = self.metrics.inventory.lock() {
            *gauges = InventoryGauges {
                by_status,
                expiring,
            };
        }
    }

    /// Keeps the inventory gauges fresh for the process's life.
    pub async fn keep_metrics_fresh(self: Arc<Self>) {
        loop {
            let authority = self.clone();
            let started = std::time::Instant::now();
            let _ =
                tokio::task::spawn_blocking(move || authority.refresh_inventory_metrics()).await;
            let pause = (started.elapsed() * 10).max(Duration::from_secs(5));
            tokio::time::sleep(pause).await;
            // Expiry moves the buckets even without changes: recompute at least hourly.
            let mut waited = pause;
            while !self.metrics.inventory_dirty.swap(false, Ordering::Relaxed)
                && waited < Duration::from_secs(3600)
            {
                tokio::time::sleep(Duration::from_secs(1)).await;
                waited += Duration::from_secs(1);
            }
        }
    }
}

impl crate::issuance::IssuanceObserver for Metrics {
    fn issued(&self, label: &str, elapsed: Duration) {
        Metrics::issued(self, label, elapsed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_text_is_prometheus_shaped() {
        let m = Metrics::default();
        m.issued("plc", Duration::from_micros(700));
        m.issued("plc", Duration::from_millis(30));
        m.est_response(200);
        m.est_response(401);
        m.est_response(401);
        let text = m.render();
        assert!(
            text.contains("plant_issuance_duration_seconds_bucket{label=\"plc\",le=\"0.001\"} 1")
        );
        assert!(
            text.contains("plant_issuance_duration_seconds_bucket{label=\"plc\",le=\"0.05\"} 2")
        );
        assert!(text.contains("plant_issuance_duration_seconds_count{label=\"plc\"} 2"));
        assert!(text.contains("plant_est_responses_total{code=\"401\"} 2"));
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line.rsplit(' ').next().unwrap_or_default();
            assert!(value.parse::<f64>().is_ok(), "{line}");
        }
    }
}
