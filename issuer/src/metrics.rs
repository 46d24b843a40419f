//! Prometheus metrics (text exposition format 0.0.4, encoded by `prometheus-client`) at
//! `/metrics`: certificates by status and by expiry bucket, issuance count and latency by label,
//! EST answers by status code. Counting takes no lock but a label family's read lock; the inventory
//! gauges are recomputed in the background, never on a scrape: after a change, once at
//! least max(5 s, 10 × the last recomputation's duration) has passed, so a small store is
//! current within seconds and a store of millions is not rescanned back to back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::clock::Clock;
use crate::store::{CertificateStore, InventoryQuery, Status, Store};

/// Upper bounds (seconds) of the issuance latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// The expiry windows operators watch.
const EXPIRY_BUCKETS: [(&str, i64); 4] = [("7d", 7), ("30d", 30), ("90d", 90), ("365d", 365)];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WithinLabel {
    within: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProfileLabel {
    label: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabel {
    code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestationLabels {
    method: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabel {
    listener: &'static str,
}

/// The issuer's counters and gauges, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    certificates: Family<StatusLabel, Gauge>,
    expiring: Family<WithinLabel, Gauge>,
    issued: Family<ProfileLabel, Histogram, fn() -> Histogram>,
    est_responses: Family<CodeLabel, Counter>,
    refusals: Family<ReasonLabel, Counter>,
    attestations: Family<AttestationLabels, Counter>,
    connections_shed: Family<ListenerLabel, Counter>,
    token_failures: Counter,
    source_lockouts: Counter,
    unauthenticated_refusals: Family<ReasonLabel, Counter>,
    /// Set when the inventory changed since the gauges were computed.
    inventory_dirty: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            certificates: Family::default(),
            expiring: Family::default(),
            issued: Family::new_with_constructor(latency_histogram),
            est_responses: Family::default(),
            refusals: Family::default(),
            attestations: Family::default(),
            connections_shed: Family::default(),
            token_failures: Counter::default(),
            source_lockouts: Counter::default(),
            unauthenticated_refusals: Family::default(),
            inventory_dirty: AtomicBool::new(false),
        };
        // Names without `_total`: prometheus-client adds it to counters, and a period to help.
        let registry = &mut metrics.registry;
        registry.register(
            "plant_certificates",
            "Certificates in the inventory by status",
            metrics.certificates.clone(),
        );
        registry.register(
            "plant_certificates_expiring",
            "Valid certificates whose notAfter falls within the window",
            metrics.expiring.clone(),
        );
        registry.register(
            "plant_issuance_duration_seconds",
            "Time from authorization to durable record, per label",
            metrics.issued.clone(),
        );
        registry.register(
            "plant_est_responses",
            "EST answers by HTTP status (4xx/5xx are refusals)",
            metrics.est_responses.clone(),
        );
        registry.register(
            "plant_enrollment_refusals",
            "Enrollments refused after they reached policy, by reason",
            metrics.refusals.clone(),
        );
        registry.register(
            "plant_node_attestations",
            "Agent node attestations by method and outcome",
            metrics.attestations.clone(),
        );
        registry.register(
            "plant_connections_shed",
            "Connections closed at a listener's connection limit to admit a newer one",
            metrics.connections_shed.clone(),
        );
        registry.register(
            "plant_token_failures",
            "Token authentications with a secret that matches no token (EST and join tokens)",
            metrics.token_failures.clone(),
        );
        registry.register(
            "plant_source_lockouts",
            "Sources locked out for too many refusals without a valid credential",
            metrics.source_lockouts.clone(),
        );
        registry.register(
            "plant_unauthenticated_refusals",
            "Requests refused that carried no credential this CA knows, by reason (summarized in the audit log, not recorded one by one)",
            metrics.unauthenticated_refusals.clone(),
        );
        metrics
    }
}

impl Metrics {
    /// Records one issued certificate and how long the pipeline took.
    pub fn issued(&self, label: &str, elapsed: Duration) {
        self.issued
            .get_or_create(&ProfileLabel {
                label: label.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
        self.inventory_changed();
    }

    /// Marks the inventory gauges stale (issuance, revocation).
    pub fn inventory_changed(&self) {
        self.inventory_dirty.store(true, Ordering::Relaxed);
    }

    /// Records one EST answer by status code (refusals included).
    pub fn est_response(&self, status: u16) {
        self.est_responses
            .get_or_create(&CodeLabel { code: status })
            .inc();
    }

    /// Records one refused enrollment by reason (`unauthorized`, `forbidden`, `busy`, …).
    pub fn refused(&self, reason: &'static str) {
        self.refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records one node attestation by method and outcome (`attested` or a refusal reason).
    pub fn attestation(&self, method: &'static str, outcome: &'static str) {
        self.attestations
            .get_or_create(&AttestationLabels { method, outcome })
            .inc();
    }

    /// The counter of connections `listener` shed at its connection limit.
    pub fn connections_shed(&self, listener: &'static str) -> Counter {
        self.connections_shed
            .get_or_create_owned(&ListenerLabel { listener })
    }

    /// Records one token secret that matched no token (EST or join token).
    pub fn token_failure(&self) {
        self.token_failures.inc();
    }

    /// Records one source locked out for too many refusals without a valid credential.
    pub fn source_lockout(&self) {
        self.source_lockouts.inc();
    }

    /// Records one refusal of a request without a valid credential, by kind (EST
    /// `est_unknown_token`, `est_unknown_certificate`, …; attestation `attestation_<reason>`).
    pub fn unauthenticated_refusal(&self, kind: &'static str) {
        self.unauthenticated_refusals
            .get_or_create(&ReasonLabel { reason: kind })
            .inc();
    }

    /// The exposition text (Prometheus text format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// `GET /metrics`: the exposition of `metrics`, on the CRL listener (when configured) and,
/// behind the operator-certificate check, on the EST HTTPS listener.
pub fn page(metrics: &Metrics) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        metrics.render(),
    )
        .into_response()
}

impl Metrics {
    /// Recomputes the inventory gauges from `certificates` as of `now` (unix seconds).
    pub fn refresh_inventory(&self, certificates: &dyn CertificateStore, now: i64) {
        let count = |query: InventoryQuery| {
            certificates
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
        let by_status: Vec<_> = [
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
        let expiring: Vec<_> = EXPIRY_BUCKETS
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
        for (status, n) in by_status {
            self.certificates
                .get_or_create(&StatusLabel { status })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        for (within, n) in expiring {
            self.expiring
                .get_or_create(&WithinLabel { within })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Keeps the inventory gauges fresh for the process's life, from `store` as `clock`
    /// tells the time.
    pub async fn keep_fresh(self: Arc<Self>, store: Store, clock: Arc<dyn Clock>) {
        loop {
            let (metrics, certificates, now) = (
                self.clone(),
                store.certificates.clone(),
                clock.now().unix_timestamp(),
            );
            let started = std::time::Instant::now();
            let _ = tokio::task::spawn_blocking(move || {
                metrics.refresh_inventory(certificates.as_ref(), now)
            })
            .await;
            let pause = (started.elapsed() * 10).max(Duration::from_secs(5));
            tokio::time::sleep(pause).await;
            // Expiry moves the buckets even without changes: recompute at least hourly.
            let mut waited = pause;
            while !self.inventory_dirty.swap(false, Ordering::Relaxed)
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
