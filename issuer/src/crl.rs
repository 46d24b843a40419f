//! The CRL (RFC 5280 §5): signed by the issuing CA, re-issued on every revocation and at half
//! its validity, served over plain HTTP at the URL certificates carry as their CRL
//! distribution point. Plain HTTP on purpose: a relying party must be able to fetch the
//! CRL without already trusting a TLS server that the CRL might revoke.

use std::sync::{Arc, OnceLock, RwLock};

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use rcgen::{CertificateRevocationListParams, RevokedCertParams, SerialNumber};

use crate::metrics::Metrics;
use crate::serial::Serial;
use crate::Error;

/// The path the CRL is served at.
pub const PATH: &str = "/crl/issuing.crl";

/// The published CRL and where it is served.
#[derive(Debug, Default)]
pub struct Crl {
    /// Shared with the issuance pipeline, which puts it in certificates.
    url: Arc<OnceLock<String>>,
    current: RwLock<Option<Published>>,
}

#[derive(Debug, Clone)]
struct Published {
    der: bytes::Bytes,
    this_update: i64,
    next_update: i64,
}

impl Crl {
    /// The distribution point URL, once the listener is bound.
    pub fn url(&self) -> Option<&str> {
        self.url.get().map(String::as_str)
    }

    /// The URL's cell, for the issuance pipeline to read once it is set.
    pub fn distribution_point(&self) -> Arc<OnceLock<String>> {
        self.url.clone()
    }

    /// Sets the distribution point URL (once, at start).
    pub fn set_url(&self, url: String) {
        let _ = self.url.set(url);
    }

    /// The current CRL, DER.
    pub fn current(&self) -> Option<bytes::Bytes> {
        self.current
            .read()
            .ok()
            .and_then(|c| c.as_ref().map(|p| p.der.clone()))
    }

    /// Makes `der` (valid from `this_update` to `next_update`, unix seconds) the CRL served.
    pub fn publish(&self, der: Vec<u8>, this_update: i64, next_update: i64) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(Published {
                der: bytes::Bytes::from(der),
                this_update,
                next_update,
            });
        }
    }

    /// Whether half the current CRL's validity has passed (or none is published).
    pub fn due(&self, now: i64) -> bool {
        match self.current.read().ok().and_then(|c| c.clone()) {
            Some(p) => now >= p.this_update + (p.next_update - p.this_update) / 2,
            None => true,
        }
    }
}

/// The CRL for `revocations`: number `number`, valid from `this_update` to `next_update`.
pub fn crl_params(
    revocations: &[crate::store::Revocation],
    number: u64,
    this_update: time::OffsetDateTime,
    next_update: time::OffsetDateTime,
) -> Result<CertificateRevocationListParams, Error> {
    let mut revoked_certs = Vec::with_capacity(revocations.len());
    for r in revocations {
        let serial = Serial::parse(&r.serial)
            .ok_or_else(|| Error::Store(format!("revocation serial {:?}", r.serial)))?;
        revoked_certs.push(RevokedCertParams {
            serial_number: SerialNumber::from_slice(&serial.0),
            revocation_time: time::OffsetDateTime::from_unix_timestamp(r.revoked_at)
                .map_err(|e| Error::Store(e.to_string()))?,
            reason_code: reason(r.reason_code),
            invalidity_date: None,
        });
    }
    Ok(CertificateRevocationListParams {
        this_update,
        next_update,
        crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    })
}

fn reason(code: u8) -> Option<rcgen::RevocationReason> {
    use rcgen::RevocationReason::*;
    Some(match code {
        1 => KeyCompromise,
        3 => AffiliationChanged,
        4 => Superseded,
        5 => CessationOfOperation,
        _ => return None,
    })
}

/// The plain-HTTP routes: `GET /crl/issuing.crl` and `GET /metrics` (unauthenticated, for a
/// scraper on the plant network; the HTTPS listener serves `/metrics` to operators too).
pub fn router(crl: Arc<Crl>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            PATH,
            get(move || {
                let crl = crl.clone();
                async move { serve_crl(&crl) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { crate::metrics::page(&metrics) }
            }),
        )
}

fn serve_crl(crl: &Crl) -> Response {
    match crl.current() {
        Some(der) => (
            [
                (header::CONTENT_TYPE, "application/pkix-crl"),
                (header::CACHE_CONTROL, "max-age=300"),
            ],
            der,
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the CRL has not been published yet; retry shortly\n",
        )
            .into_response(),
    }
}
