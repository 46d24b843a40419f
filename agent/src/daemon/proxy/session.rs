//! One proxied connection's log lines: one when it opens, one when it ends with who, which
//! device, how long, bytes each way and refused requests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use proto::SpiffeId;

use super::metrics::ProxyMetrics;
use super::modbus::Access;
use super::relay::Traffic;

/// Numbers sessions across all proxies, so the open and end lines pair up in a log.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An open session; [`Session::end`] logs its end.
#[derive(Debug)]
pub struct Session {
    id: u64,
    device: String,
    mode: &'static str,
    peer: String,
    started: Instant,
    started_at: SystemTime,
    metrics: Arc<ProxyMetrics>,
    ended: bool,
}

impl Session {
    /// Logs the start and counts the session as open.
    pub fn start(
        device: &str,
        mode: &'static str,
        peer: &SpiffeId,
        access: Option<Access>,
        from: SocketAddr,
        metrics: &Arc<ProxyMetrics>,
    ) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        metrics.opened();
        match access {
            Some(access) => {
                tracing::info!(session = id, device, mode, %peer, %from, %access, "session opened")
            }
            None => tracing::info!(session = id, device, mode, %peer, %from, "session opened"),
        }
        Self {
            id,
            device: device.to_owned(),
            mode,
            peer: peer.to_string(),
            started: Instant::now(),
            started_at: SystemTime::now(),
            metrics: Arc::clone(metrics),
            ended: false,
        }
    }

    /// Logs the end: `how` it ended and the `traffic`.
    pub fn end(&mut self, how: &str, traffic: &Traffic) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        let sent = traffic.sent.load(Ordering::Relaxed);
        let received = traffic.received.load(Ordering::Relaxed);
        let refused = traffic.refused.load(Ordering::Relaxed);
        self.metrics.closed(sent, received);
        let started = self
            .started_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        tracing::info!(
            session = self.id,
            device = self.device,
            mode = self.mode,
            peer = self.peer,
            started,
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes_to_device = sent,
            bytes_from_device = received,
            refused_requests = refused,
            "session ended: {how}"
        );
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session task dropped at shutdown still gets its end line.
        if !self.ended {
            self.end("the agent is shutting down", &Traffic::default());
        }
    }
}

/// The metrics label for a failed TLS handshake.
pub fn handshake_refusal(error: &std::io::Error) -> &'static str {
    use rustls::CertificateError;
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return "handshake_failed";
    };
    match tls {
        rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            "not_allowed"
        }
        rustls::Error::InvalidCertificate(CertificateError::Revoked) => "revoked",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::NoCertificatesPresented => "no_certificate",
        _ => "handshake_failed",
    }
}
