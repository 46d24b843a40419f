//! Placeholder until the issuer-side reporter lands: refused requests are logged only.

use proto::SpiffeId;

/// A Modbus request the proxy refused.
#[derive(Debug, Clone)]
pub struct RefusedRequest {
    /// The legacy device.
    pub device: String,
    /// Who asked.
    pub peer: SpiffeId,
    /// What it asked.
    pub function_code: u8,
    /// Its transaction id.
    pub transaction_id: u16,
    /// Its unit id.
    pub unit_id: u8,
}

/// Reports refused requests to the issuer's audit log.
#[derive(Debug, Clone, Default)]
pub struct ProxyAudit;

impl ProxyAudit {
    /// Starts the reporter.
    pub fn spawn(
        _issuer: tokio::sync::watch::Receiver<Option<crate::issuer_client::IssuerClient>>,
    ) -> Self {
        Self
    }

    /// Queues one refused request.
    pub fn refused(&self, _request: RefusedRequest) {}
}
