//! The admin API: JSON over HTTP on the owner-only Unix socket in the state folder. Its
//! read-only routes are also served over HTTPS to operators with client certificates
//! ([`crate::operator_api`]).
//!
//! `POST /v1/tokens`, `POST /v1/revocations`, `GET /v1/inventory`, `GET /v1/status`,
//! `GET /v1/audit?count=&before=` (newest first pages of at most 1000 records),
//! `GET /v1/audit/verify`.

use std::path::Path;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::authority::{Authority, CreatedToken, RevokeRequest, StatusReport, TokenRequest};
use crate::store::{AuditRecord, CertificateRecord, InventoryPage, InventoryQuery, Verification};
use crate::Error;

/// The admin routes: JSON over HTTP/1, and the `plant.admin.v1` gRPC services (HTTP/2).
pub fn router(authority: Arc<Authority>) -> Router {
    read_only_routes()
        .route("/v1/tokens", post(create_tokens))
        .route("/v1/revocations", post(revoke))
        .with_state(authority.clone())
        .merge(crate::admin_grpc::router(authority))
}

/// The routes that only read: inventory, status and the audit log.
pub(crate) fn read_only_routes() -> Router<Arc<Authority>> {
    Router::new()
        .route("/v1/inventory", get(inventory))
        .route("/v1/status", get(status))
        .route("/v1/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
}

struct AdminError(Error);

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            Error::Admin(_) | Error::Config(_) => StatusCode::BAD_REQUEST,
            Error::Store(_) | Error::StateUnwritable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (status, format!("{}\n", self.0)).into_response()
    }
}

impl From<Error> for AdminError {
    fn from(e: Error) -> Self {
        Self(e)
    }
}

async fn create_tokens(
    State(authority): State<Arc<Authority>>,
    Json(request): Json<TokenRequest>,
) -> Result<Json<Vec<CreatedToken>>, AdminError> {
    Ok(Json(authority.create_tokens(&request).await?))
}

async fn inventory(
    State(authority): State<Arc<Authority>>,
    Query(query): Query<InventoryQuery>,
) -> Result<Json<InventoryPage>, AdminError> {
    Ok(Json(authority.inventory(&query)?))
}

async fn revoke(
    State(authority): State<Arc<Authority>>,
    Json(request): Json<RevokeRequest>,
) -> Result<Json<CertificateRecord>, AdminError> {
    let record = authority.revoke(&request).await?;
    // A node that attested with this device certificate goes with it.
    authority
        .evict_nodes_attested_with(&record)
        .await
        .map_err(|e| {
            Error::Admin(format!(
                "certificate {} is revoked, but evicting the nodes that attested with it \
                 failed: {e}; evict them with `issuer agent evict` (`issuer agent list` shows \
                 them)",
                record.serial
            ))
        })?;
    Ok(Json(record))
}

async fn status(State(authority): State<Arc<Authority>>) -> Json<StatusReport> {
    Json(authority.status())
}

/// Most audit records one `GET /v1/audit` answers; more is refused (400), not cut short, so
/// a script never mistakes a partial answer for the whole log.
pub const MAX_AUDIT_PAGE: usize = 1000;

#[derive(Deserialize)]
struct AuditQuery {
    /// How many records (default 20, at most [`MAX_AUDIT_PAGE`]).
    count: Option<usize>,
    /// Only records numbered below this: the `seq` of the oldest record of the previous
    /// page, to walk the log back.
    before: Option<u64>,
}

async fn audit(
    State(authority): State<Arc<Authority>>,
    Query(query): Query<AuditQuery>,
) -> Result<Json<Vec<AuditRecord>>, AdminError> {
    let count = query.count.unwrap_or(20);
    if count == 0 || count > MAX_AUDIT_PAGE {
        return Err(AdminError(Error::Admin(format!(
            "count={count}: ask for 1 to {MAX_AUDIT_PAGE} records a page; for more, page back \
             with before=<seq of the oldest record you got>"
        ))));
    }
    Ok(Json(authority.store.audit.page(query.before, count)?))
}

async fn audit_verify(
    State(authority): State<Arc<Authority>>,
) -> Result<Json<Verification>, AdminError> {
    Ok(Json(authority.store.audit.verify()?))
}

/// A client for the admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    socket: std::path::PathBuf,
}

impl AdminClient {
    /// A client for the socket at `path`.
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
        }
    }

    /// `GET path_and_query`.
    pub async fn get<T: DeserializeOwned>(&self, path_and_query: &str) -> Result<T, Error> {
        self.send(http::Method::GET, path_and_query, None).await
    }

    /// `POST path` with a JSON body.
    pub async fn post<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        let bytes = serde_json::to_vec(body)
            .map_err(|e| Error::Admin(format!("cannot encode the admin request: {e}")))?;
        self.send(http::Method::POST, path, Some(bytes)).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, Error> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                Error::Admin(format!(
                    "cannot reach the issuer's admin socket {}: {e}; is `issuer serve` running with this configuration?",
                    self.socket.display()
                ))
            })?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.no_answer(&e))?;
        tokio::spawn(connection);
        let mut request = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, "issuer-admin");
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.unwrap_or_default(),
            )))
            .map_err(|e| Error::Admin(format!("cannot build the admin request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.no_answer(&e))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.no_answer(&e))?
            .to_bytes();
        if !status.is_success() {
            return Err(Error::Admin(
                String::from_utf8_lossy(&bytes).trim().to_owned(),
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            Error::Admin(format!(
                "the issuer's admin socket {} answered something this command does not \
                 understand ({e}); is the running issuer the same version as this `issuer`?",
                self.socket.display()
            ))
        })
    }

    /// The socket took the connection but no answer came back whole.
    fn no_answer(&self, e: &dyn std::fmt::Display) -> Error {
        Error::Admin(format!(
            "the issuer's admin socket {} did not answer ({e}); check the issuer's log, and \
             that `issuer serve` is still running",
            self.socket.display()
        ))
    }
}
