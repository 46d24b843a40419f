//! The `/.well-known/est` routes (RFC 7030 §3.2.2) over a [`Backend`].
//!
//! The router does the protocol: label and operation dispatch, credentials parsing, media
//! types, the body size limit, base64 and PKCS#10 decoding, response encoding, and the one
//! mapping from [`Error`] to a status code. The backend does authentication, policy and
//! signing. Cheap refusals (unknown label, missing credentials, wrong media type, oversized
//! body) happen before the body is read, and unknown operations never reach the backend.

use std::future::Future;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;

use crate::csr::VerifiedCsr;
use crate::csr_attrs::AttrOrOid;
use crate::{body, certs_only, csr_attrs, media, multipart, Error, Label, Refusal};

/// The client certificate the TLS layer saw, leaf first (DER). The TLS accept loop puts it in
/// the request extensions; the backend decides whether it means anything.
#[derive(Clone, Debug)]
pub struct TlsClientCertificate(pub Arc<Vec<Vec<u8>>>);

impl TlsClientCertificate {
    /// The end-entity certificate.
    pub fn leaf(&self) -> Option<&[u8]> {
        self.0.first().map(Vec::as_slice)
    }
}

/// The client's address as the TCP layer saw it. The accept loop puts it in the request
/// extensions; the backend uses it to lock out sources that guess tokens.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddress(pub std::net::SocketAddr);

/// A secret from the client, redacted in `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// HTTP credentials (RFC 7030 §3.2.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// No Authorization header.
    None,
    /// `Basic`: user is a token id or device name, password the one-time token.
    Basic {
        /// The user name.
        user: String,
        /// The password.
        password: Secret,
    },
    /// `Bearer <token>`.
    Bearer(Secret),
}

/// The enrollment operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `simpleenroll` (§4.2.1).
    SimpleEnroll,
    /// `simplereenroll` (§4.2.2).
    SimpleReenroll,
    /// `serverkeygen` (§4.4).
    ServerKeygen,
}

impl Operation {
    /// The operation's path segment.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SimpleEnroll => "simpleenroll",
            Self::SimpleReenroll => "simplereenroll",
            Self::ServerKeygen => "serverkeygen",
        }
    }
}

/// One enrollment request, decoded and with a verified CSR.
#[derive(Debug)]
pub struct EnrollRequest {
    /// Which operation.
    pub operation: Operation,
    /// The label in the URL, if any.
    pub label: Option<Label>,
    /// What the Authorization header carried.
    pub credentials: Credentials,
    /// The TLS client certificate chain, if one was presented.
    pub client_certificate: Option<TlsClientCertificate>,
    /// Where the request came from, if the server knows.
    pub client_address: Option<std::net::SocketAddr>,
    /// The request.
    pub csr: VerifiedCsr,
}

/// A certificate issued for a server-generated key.
pub struct ServerKeygenResult {
    /// The new private key, PKCS#8 DER.
    pub pkcs8_der: Vec<u8>,
    /// The issued certificate, DER.
    pub certificate: Vec<u8>,
}

impl std::fmt::Debug for ServerKeygenResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeygenResult").finish_non_exhaustive()
    }
}

/// What the issuer supplies: label knowledge, CA certificates, policy and signing.
pub trait Backend: Send + Sync + 'static {
    /// Whether `label` selects a profile (`None`: the default profile).
    fn knows_label(&self, label: Option<&Label>) -> bool;
    /// The CA certificates for `cacerts`, DER.
    fn ca_certificates(&self, label: Option<&Label>) -> Vec<Vec<u8>>;
    /// What `csrattrs` answers; empty means 204.
    fn csr_attributes(&self, label: Option<&Label>) -> Vec<AttrOrOid>;
    /// Whether a client at `address` may ask for a certificate now (a source locked out for
    /// refused requests may not); called before the body is read, so a locked-out source
    /// costs no CSR parsing and no credential lookup.
    fn admit_enrollment_attempt(&self, address: Option<std::net::SocketAddr>) -> Result<(), Error> {
        let _ = address;
        Ok(())
    }
    /// Authenticates, authorizes and issues; returns the certificate DER.
    fn enroll(&self, request: EnrollRequest)
        -> impl Future<Output = Result<Vec<u8>, Error>> + Send;
    /// Generates a key, issues for it, and returns both.
    fn server_keygen(
        &self,
        request: EnrollRequest,
    ) -> impl Future<Output = Result<ServerKeygenResult, Error>> + Send;
}

/// Router limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// Largest request body accepted; a P-256 CSR in base64 is under 1 KiB.
    pub max_body_bytes: usize,
    /// Longest a client may take to send the body once its headers are in (slowloris).
    pub body_timeout: std::time::Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            body_timeout: std::time::Duration::from_secs(10),
        }
    }
}

struct Shared<B> {
    backend: Arc<B>,
    options: ServerOptions,
}

/// The EST routes, to be served over TLS.
pub fn router<B: Backend>(backend: Arc<B>, options: ServerOptions) -> Router {
    let shared = Arc::new(Shared { backend, options });
    Router::new()
        .route(
            "/.well-known/est/{operation}",
            get(get_default::<B>).post(post_default::<B>),
        )
        .route(
            "/.well-known/est/{label}/{operation}",
            get(get_labelled::<B>).post(post_labelled::<B>),
        )
        .with_state(shared)
}

async fn get_default<B: Backend>(
    State(shared): State<Arc<Shared<B>>>,
    Path(operation): Path<String>,
) -> Response {
    respond(handle_get(&shared, None, &operation))
}

async fn get_labelled<B: Backend>(
    State(shared): State<Arc<Shared<B>>>,
    Path((label, operation)): Path<(String, String)>,
) -> Response {
    respond(parse_label(&label).and_then(|l| handle_get(&shared, Some(l), &operation)))
}

async fn post_default<B: Backend>(
    State(shared): State<Arc<Shared<B>>>,
    Path(operation): Path<String>,
    request: Request,
) -> Response {
    respond(handle_post(&shared, None, &operation, request).await)
}

async fn post_labelled<B: Backend>(
    State(shared): State<Arc<Shared<B>>>,
    Path((label, operation)): Path<(String, String)>,
    request: Request,
) -> Response {
    let result = match parse_label(&label) {
        Ok(label) => handle_post(&shared, Some(label), &operation, request).await,
        Err(e) => Err(e),
    };
    respond(result)
}

fn parse_label(text: &str) -> Result<Label, Error> {
    text.parse()
        .map_err(|_| Error::refused(Refusal::NotFound, format!("unknown EST label {text:?}")))
}

const OPERATIONS: &str = "cacerts, csrattrs, simpleenroll, simplereenroll, serverkeygen";

fn unknown_operation(operation: &str) -> Error {
    let shown: String = operation.chars().take(40).collect();
    Error::refused(
        Refusal::NotFound,
        format!("unknown EST operation {shown:?}; this server offers {OPERATIONS}"),
    )
}

fn check_label<B: Backend>(shared: &Shared<B>, label: Option<&Label>) -> Result<(), Error> {
    if shared.backend.knows_label(label) {
        Ok(())
    } else {
        Err(Error::refused(
            Refusal::NotFound,
            format!(
                "unknown EST label {:?}; ask the PKI operator which labels this CA serves",
                label.map(Label::as_str).unwrap_or_default()
            ),
        ))
    }
}

fn handle_get<B: Backend>(
    shared: &Shared<B>,
    label: Option<Label>,
    operation: &str,
) -> Result<Response, Error> {
    check_label(shared, label.as_ref())?;
    match operation {
        "cacerts" => {
            let certs = shared.backend.ca_certificates(label.as_ref());
            let refs: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
            Ok(base64_response(media::PKCS7, &certs_only::encode(&refs)))
        }
        "csrattrs" => {
            let attrs = shared.backend.csr_attributes(label.as_ref());
            if attrs.is_empty() {
                Ok(plain(StatusCode::NO_CONTENT, String::new()))
            } else {
                Ok(base64_response(media::CSRATTRS, &csr_attrs::encode(&attrs)))
            }
        }
        "simpleenroll" | "simplereenroll" | "serverkeygen" => Err(Error::refused(
            Refusal::MethodNotAllowed,
            format!("{operation} takes POST with an application/pkcs10 body"),
        )),
        "fullcmc" => Err(full_cmc()),
        _ => Err(unknown_operation(operation)),
    }
}

fn full_cmc() -> Error {
    Error::refused(
        Refusal::NotImplemented,
        "fullcmc is not offered; use simpleenroll, simplereenroll or serverkeygen",
    )
}

async fn handle_post<B: Backend>(
    shared: &Shared<B>,
    label: Option<Label>,
    operation: &str,
    request: Request,
) -> Result<Response, Error> {
    check_label(shared, label.as_ref())?;
    let operation = match operation {
        "simpleenroll" => Operation::SimpleEnroll,
        "simplereenroll" => Operation::SimpleReenroll,
        "serverkeygen" => Operation::ServerKeygen,
        "fullcmc" => return Err(full_cmc()),
        "cacerts" | "csrattrs" => {
            return Err(Error::refused(
                Refusal::MethodNotAllowed,
                format!("{operation} takes GET"),
            ))
        }
        other => return Err(unknown_operation(other)),
    };
    let (parts, body_stream) = request.into_parts();
    let client_certificate = parts.extensions.get::<TlsClientCertificate>().cloned();
    let client_address = parts.extensions.get::<ClientAddress>().map(|a| a.0);
    let credentials = credentials(&parts.headers)?;
    shared.backend.admit_enrollment_attempt(client_address)?;
    if credentials == Credentials::None && client_certificate.is_none() {
        let message = match operation {
            Operation::SimpleReenroll => {
                "simplereenroll needs the certificate being renewed as the TLS client certificate"
            }
            _ => {
                "authentication required: send the one-time token as HTTP Basic password or \
                  as Authorization: Bearer"
            }
        };
        return Err(Error::refused(Refusal::Unauthorized, message));
    }
    check_content_type(&parts.headers)?;
    let bytes = tokio::time::timeout(
        shared.options.body_timeout,
        read_body(&parts.headers, body_stream, shared.options.max_body_bytes),
    )
    .await
    .map_err(|_| {
        Error::refused(
            Refusal::RequestTimeout,
            format!(
                "the request body did not arrive within {} s",
                shared.options.body_timeout.as_secs()
            ),
        )
    })??;
    let der = body::decode(&bytes)?;
    let csr = VerifiedCsr::from_der(&der)?;
    let enroll = EnrollRequest {
        operation,
        label,
        credentials,
        client_certificate,
        client_address,
        csr,
    };
    match operation {
        Operation::SimpleEnroll | Operation::SimpleReenroll => {
            let cert = shared.backend.enroll(enroll).await?;
            Ok(base64_response(
                media::PKCS7_CERTS_ONLY,
                &certs_only::encode(&[&cert]),
            ))
        }
        Operation::ServerKeygen => {
            let issued = shared.backend.server_keygen(enroll).await?;
            let certs = certs_only::encode(&[&issued.certificate]);
            let body_bytes = multipart::encode(&issued.pkcs8_der, &certs);
            let mut response = Response::new(Body::from(body_bytes));
            set(
                &mut response,
                header::CONTENT_TYPE,
                &multipart::content_type(),
            );
            Ok(response)
        }
    }
}

fn credentials(headers: &HeaderMap) -> Result<Credentials, Error> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Ok(Credentials::None);
    };
    let bad = |why: &str| Error::refused(Refusal::Unauthorized, why);
    let value = value
        .to_str()
        .map_err(|_| bad("the Authorization header is not ASCII"))?;
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = STANDARD
            .decode(rest)
            .map_err(|_| bad("the Basic credentials are not valid base64"))?;
        let text =
            String::from_utf8(decoded).map_err(|_| bad("the Basic credentials are not UTF-8"))?;
        let (user, password) = text
            .split_once(':')
            .ok_or_else(|| bad("the Basic credentials have no ':' between user and token"))?;
        Ok(Credentials::Basic {
            user: user.to_owned(),
            password: Secret(password.to_owned()),
        })
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Ok(Credentials::Bearer(Secret(rest.to_owned())))
    } else {
        Err(bad(
            "unsupported Authorization scheme; send the token with Basic or Bearer",
        ))
    }
}

fn check_content_type(headers: &HeaderMap) -> Result<(), Error> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = value.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(media::PKCS10) {
        Ok(())
    } else {
        let shown: String = value.chars().take(60).collect();
        Err(Error::refused(
            Refusal::UnsupportedMediaType,
            format!(
                "Content-Type is {:?}; send the CSR as application/pkcs10 (base64 of DER)",
                shown
            ),
        ))
    }
}

async fn read_body(headers: &HeaderMap, body_stream: Body, limit: usize) -> Result<Vec<u8>, Error> {
    let too_large = || {
        Error::refused(
            Refusal::PayloadTooLarge,
            format!("request body is larger than {limit} bytes; a CSR is about 1 KiB"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if declared.is_some_and(|len| len > limit as u64) {
        // Refuse on the declared length. A client waiting for 100-continue never sends the
        // body; one that is already sending gets it discarded (never buffered) so it can
        // read our answer instead of a connection reset.
        if !expects_continue {
            discard(body_stream).await;
        }
        return Err(too_large());
    }
    // Chunked bodies have no declared length: stop keeping bytes at the limit.
    let mut body_stream = body_stream;
    let mut bytes = Vec::new();
    while let Some(frame) = body_stream.frame().await {
        let frame = frame.map_err(|e| {
            Error::refused(
                Refusal::BadRequest,
                format!("reading the request body failed: {e}"),
            )
        })?;
        if let Some(data) = frame.data_ref() {
            if bytes.len() + data.len() > limit {
                discard(body_stream).await;
                return Err(too_large());
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(bytes)
}

/// Most a refused upload is read and thrown away before the connection is simply closed.
const DISCARD_BYTES: usize = 32 * 1024 * 1024;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads and drops the rest of a body (bounded in bytes and time), so a client that is still
/// uploading can finish and read the error: closing on it makes its TCP stack discard our
/// answer with a reset.
async fn discard(mut body_stream: Body) {
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body_stream.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > DISCARD_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_TIME, drain).await;
}

fn base64_response(content_type: &str, der: &[u8]) -> Response {
    let mut response = Response::new(Body::from(body::encode(der)));
    set(&mut response, header::CONTENT_TYPE, content_type);
    response
}

fn plain(status: StatusCode, text: String) -> Response {
    let mut response = Response::new(Body::from(text));
    *response.status_mut() = status;
    if status != StatusCode::NO_CONTENT {
        set(
            &mut response,
            header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        );
    }
    response
}

fn set(response: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        response.headers_mut().insert(name, v);
    }
}

fn respond(result: Result<Response, Error>) -> Response {
    match result {
        Ok(mut response) => {
            // RFC 8951: always declare base64 on successful EST bodies.
            if response.status() == StatusCode::OK {
                set(&mut response, CONTENT_TRANSFER_ENCODING, "base64");
            }
            response
        }
        Err(err) => error_response(&err),
    }
}

const CONTENT_TRANSFER_ENCODING: header::HeaderName =
    header::HeaderName::from_static("content-transfer-encoding");

/// The one place an [`Error`] becomes an HTTP response.
pub fn error_response(err: &Error) -> Response {
    let refusal = err.refusal();
    let (status, retry_after) = refusal_status(refusal);
    let message = if refusal == Refusal::Internal {
        tracing::error!(error = %err, "EST request failed");
        "internal error; the issuer's log has the details".to_owned()
    } else {
        tracing::info!(status = status.as_u16(), reason = %err, "EST request refused");
        err.to_string()
    };
    let mut response = plain(status, format!("{message}\n"));
    if let Some(seconds) = retry_after {
        set(&mut response, header::RETRY_AFTER, &seconds.to_string());
    }
    if status == StatusCode::UNAUTHORIZED {
        set(
            &mut response,
            header::WWW_AUTHENTICATE,
            "Basic realm=\"plant-est\"",
        );
    }
    response
}

/// The HTTP status a refusal is answered with, and the `Retry-After` seconds if any. Pure: a
/// backend that records the status (audit, metrics) asks here, so only [`error_response`],
/// called once per answer, logs the refusal.
pub fn refusal_status(refusal: Refusal) -> (StatusCode, Option<u32>) {
    match refusal {
        Refusal::BadRequest => (StatusCode::BAD_REQUEST, None),
        Refusal::Unauthorized => (StatusCode::UNAUTHORIZED, None),
        Refusal::Forbidden => (StatusCode::FORBIDDEN, None),
        Refusal::NotFound => (StatusCode::NOT_FOUND, None),
        Refusal::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, None),
        Refusal::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, None),
        Refusal::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, None),
        Refusal::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, None),
        Refusal::NotImplemented => (StatusCode::NOT_IMPLEMENTED, None),
        Refusal::TooManyRequests { retry_after } => {
            (StatusCode::TOO_MANY_REQUESTS, Some(retry_after))
        }
        Refusal::Unavailable { retry_after } => {
            (StatusCode::SERVICE_UNAVAILABLE, Some(retry_after))
        }
        Refusal::Pending { retry_after } => (StatusCode::ACCEPTED, Some(retry_after)),
        Refusal::Internal => (StatusCode::INTERNAL_SERVER_ERROR, None),
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        error_response(&self)
    }
}
