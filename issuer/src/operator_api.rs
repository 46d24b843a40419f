//! The operator API: the admin socket's read-only routes (inventory, status, audit log) over
//! the EST HTTPS listener at `/api/v1/…`, the dashboard at `/ui` and the Prometheus metrics at
//! `/metrics`, for operators on other machines (DESIGN §6).
//!
//! The TLS client certificate is the credential. It must be one this CA issued (byte for
//! byte, as the inventory holds it), still valid, and issued under a profile marked
//! `operator = true`. A device certificate, a superseded or revoked operator certificate, or
//! none at all gets nothing: anything that changes the CA (tokens, revocation) stays on the
//! owner-only admin socket.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use est::server::TlsClientCertificate;

use crate::authority::Authority;
use crate::store::Status;

/// The path prefix the operator API is served under.
pub const PREFIX: &str = "/api";

/// The operator routes, behind the operator-certificate check.
pub fn router(authority: Arc<Authority>) -> Router {
    Router::new()
        .nest(PREFIX, crate::admin::read_only_routes())
        .route("/ui", axum::routing::get(crate::dashboard::page))
        // Always here, CRL listener or not: a scraper holding an operator certificate.
        .route("/metrics", axum::routing::get(crate::metrics::page))
        .layer(axum::middleware::from_fn_with_state(
            authority.clone(),
            require_operator,
        ))
        .with_state(authority)
}

async fn require_operator(
    State(authority): State<Arc<Authority>>,
    request: Request,
    next: Next,
) -> Response {
    let leaf = request
        .extensions()
        .get::<TlsClientCertificate>()
        .and_then(|c| c.leaf().map(<[u8]>::to_vec));
    match authority.operator(leaf.as_deref()) {
        Ok(operator) => {
            tracing::debug!(%operator, path = %request.uri().path(), "operator API request");
            next.run(request).await
        }
        Err((status, message)) => (status, format!("{message}\n")).into_response(),
    }
}

impl Authority {
    /// Who the TLS client certificate `leaf` belongs to, if it may read the operator API.
    fn operator(&self, leaf: Option<&[u8]>) -> Result<String, (StatusCode, String)> {
        let leaf = leaf.ok_or((
            StatusCode::UNAUTHORIZED,
            "the operator API needs an operator client certificate (label operator); \
             enroll one with `agent enroll --label operator`"
                .to_owned(),
        ))?;
        let forbidden = |why: &str| (StatusCode::FORBIDDEN, why.to_owned());
        let (serial, record) = self
            .issued_record(leaf)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?
            .ok_or_else(|| forbidden("this client certificate was not issued by this CA"))?;
        if record.status_at(self.now().unix_timestamp()) != Status::Valid {
            return Err(forbidden(
                "this operator certificate is revoked, expired or superseded",
            ));
        }
        // Revoking any certificate of an operator's lineage (DESIGN §3) takes the access of
        // all of them, whichever one the revoking operator picked.
        let lineage = self
            .store
            .certificates
            .lineage(&serial)
            .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
        if let Some(end) = lineage.ended {
            return Err(forbidden(&format!(
                "certificate {} of this operator certificate's lineage was revoked; enroll a new \
                 operator certificate with a token",
                end.revoked
            )));
        }
        if !self.profiles.get(&record.label).is_some_and(|p| p.operator) {
            return Err(forbidden(&format!(
                "certificates of label {} may not read the operator API; use an operator certificate",
                record.label
            )));
        }
        Ok(format!("{} ({serial})", record.subject))
    }
}
