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

use axum::extract::{Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use est::server::TlsClientCertificate;
use serde::{Deserialize, Serialize};

use crate::authority::{Authority, StatusReport};
use crate::store::{
    AuditRecord, CertificateRecord, InventoryPage, InventoryQuery, Status, Verification,
};
use crate::Error;

/// The path prefix the operator API is served under.
pub const PREFIX: &str = "/api";

/// The operator routes, behind the operator-certificate check.
pub fn router(authority: Arc<Authority>) -> Router {
    Router::new()
        .nest(PREFIX, read_only_routes())
        .merge(crate::dashboard::router(authority.clone()))
        // Always here, CRL listener or not: a scraper holding an operator certificate.
        .route(
            "/metrics",
            axum::routing::get(|State(authority): State<Arc<Authority>>| async move {
                crate::metrics::page(&authority.metrics)
            }),
        )
        .layer(axum::middleware::from_fn_with_state(
            authority.clone(),
            require_operator,
        ))
        .with_state(authority)
}

/// The routes that only read: inventory, status and the audit log.
fn read_only_routes() -> Router<Arc<Authority>> {
    Router::new()
        .route("/v1/inventory", get(inventory))
        .route("/v1/status", get(status))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
}

/// An error as an HTTP answer: the status says whose fault, the text says what to do.
struct ApiError(Error);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            Error::Admin(_) | Error::Config(_) => StatusCode::BAD_REQUEST,
            Error::Store(_) | Error::StateUnwritable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, format!("{}\n", self.0)).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

async fn inventory(
    State(authority): State<Arc<Authority>>,
    Query(query): Query<InventoryQuery>,
) -> Result<Json<InventoryRows>, ApiError> {
    Ok(Json(InventoryRows::from(authority.inventory(&query)?)))
}

/// One certificate as operators read it in JSON (`GET /api/v1/inventory`, `issuer inventory
/// --format json`, `issuer revoke`): serials as hex, DER as base64 and left out when empty.
/// Scripts parse it; its shape stays as it is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CertificateRow {
    /// Serial, hex.
    pub serial: String,
    /// Subject commonName.
    pub subject: String,
    /// subjectAltNames as `dns:…` / `ip:…` / `uri:…`.
    pub sans: Vec<String>,
    /// The label (profile) it was issued under.
    pub label: String,
    /// Who asked: `token:<id>`, `renewal:<serial>`, …
    pub owner: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Lifecycle state.
    pub status: Status,
    /// The serial this certificate renewed, hex, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renews: Option<String>,
    /// The certificate, base64 DER (absent from inventory rows).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub der: String,
}

impl From<&CertificateRecord> for CertificateRow {
    fn from(r: &CertificateRecord) -> Self {
        use base64::Engine;
        Self {
            serial: r.serial.to_string(),
            subject: r.subject.clone(),
            sans: r.sans.clone(),
            label: r.label.clone(),
            owner: r.owner.clone(),
            issued_at: r.issued_at,
            not_after: r.not_after,
            status: r.status,
            renews: r.renews.map(|s| s.to_string()),
            der: if r.der.is_empty() {
                String::new()
            } else {
                base64::engine::general_purpose::STANDARD.encode(&r.der)
            },
        }
    }
}

/// One page of the inventory as `GET /api/v1/inventory` answers it.
#[derive(Debug, Clone, Serialize)]
pub struct InventoryRows {
    /// Rows ordered by notAfter, then serial.
    pub certificates: Vec<CertificateRow>,
    /// Cursor for the next page, if there are more rows.
    pub next: Option<String>,
    /// How many rows match in all (`null` when the query asked to skip counting).
    pub total: Option<usize>,
}

impl From<InventoryPage> for InventoryRows {
    fn from(page: InventoryPage) -> Self {
        Self {
            certificates: page.certificates.iter().map(CertificateRow::from).collect(),
            next: page.next,
            total: page.total,
        }
    }
}

async fn status(State(authority): State<Arc<Authority>>) -> Json<StatusReport> {
    Json(authority.status())
}

#[derive(Deserialize)]
struct AuditQuery {
    /// How many records (default 20, at most [`crate::admin::MAX_AUDIT_PAGE`]).
    count: Option<usize>,
    /// Only records numbered below this: the `seq` of the oldest record of the previous
    /// page, to walk the log back.
    before: Option<u64>,
}

async fn audit(
    State(authority): State<Arc<Authority>>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    let count = query.count.unwrap_or(crate::admin::DEFAULT_AUDIT_PAGE);
    Ok(Json(crate::admin::read_audit(
        &authority,
        query.before,
        count,
    )?))
}

async fn audit_verify(
    State(authority): State<Arc<Authority>>,
) -> Result<Json<Verification>, ApiError> {
    Ok(Json(authority.store.audit.verify()?))
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
