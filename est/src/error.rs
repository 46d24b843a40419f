use std::fmt;

/// What the server answers, mapped to an HTTP status in exactly one place
/// (`server::refusal_status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// 400: the request is malformed or asks for something the profile forbids.
    BadRequest,
    /// 401 + `WWW-Authenticate`: credentials missing, unknown, used or expired.
    Unauthorized,
    /// 403: authenticated, but policy says no.
    Forbidden,
    /// 404: unknown label or operation.
    NotFound,
    /// 405: the operation exists but takes the other method.
    MethodNotAllowed,
    /// 408: the request body did not arrive in time.
    RequestTimeout,
    /// 413: the body is larger than any CSR.
    PayloadTooLarge,
    /// 415: the Content-Type is not the one the operation takes.
    UnsupportedMediaType,
    /// 501: an operation this server does not offer (fullcmc).
    NotImplemented,
    /// 429 + `Retry-After` (RFC 6585 §4): this client failed authentication too often and
    /// is locked out for a while.
    TooManyRequests {
        /// Seconds the client should wait.
        retry_after: u32,
    },
    /// 503 + `Retry-After`: overloaded or the key/store is unavailable.
    Unavailable {
        /// Seconds the client should wait.
        retry_after: u32,
    },
    /// 202 + `Retry-After`: waiting for an operator's approval.
    Pending {
        /// Seconds the client should wait.
        retry_after: u32,
    },
    /// 500: a fault on our side; the detail is in the server log, not the response.
    Internal,
}

/// The one error type of the `est` crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A body that should be base64 is not.
    #[error("body is not valid base64: {0}")]
    Base64(String),
    /// A PKCS#10 request that can't be accepted; the text says what to fix.
    #[error("{0}")]
    Csr(String),
    /// A certs-only CMS message that does not parse.
    #[error("not a certs-only CMS message: {0}")]
    CertsOnly(String),
    /// A CsrAttrs structure that does not parse.
    #[error("not a CsrAttrs structure: {0}")]
    CsrAttrs(String),
    /// A serverkeygen multipart body that does not parse.
    #[error("not a serverkeygen multipart body: {0}")]
    Multipart(String),
    /// A label that is not 1–32 characters of a-z, 0-9 and '-'.
    #[error("invalid label {0:?}: use 1-32 characters a-z, 0-9, '-'")]
    Label(String),
    /// The server refuses the request; `message` is safe to show the client.
    #[error("{message}")]
    Refused {
        /// The kind of refusal, which selects the status code.
        refusal: Refusal,
        /// A message that says what to fix.
        message: String,
    },
    /// Client side: the server answered with an error status.
    #[error("EST server answered {status}: {message}")]
    Server {
        /// HTTP status.
        status: u16,
        /// The server's text/plain body.
        message: String,
        /// Seconds from `Retry-After`, if any.
        retry_after: Option<u32>,
    },
    /// Client side: the CA certificates do not match the fingerprint given out of band.
    #[error("no CA certificate from {server} has fingerprint {expected}; got {found}. Do not enroll: check the fingerprint with the plant's PKI operator")]
    Fingerprint {
        /// The server URL.
        server: String,
        /// The fingerprint the engineer gave.
        expected: String,
        /// What the server's certificates hash to.
        found: String,
    },
    /// Client side: connecting, TLS or HTTP failed.
    #[error("{0}")]
    Transport(String),
    /// Client side: the server's port answered, but not with TLS (a plain HTTP port such as
    /// the issuer's CRL port, or another service).
    #[error("{server} did not answer TLS (is it the issuer's EST port? the issuer prints its EST URL at start)")]
    NotTls {
        /// The server URL.
        server: String,
    },
    /// Client side: the server's certificate chains to the trusted CA but is not the
    /// issuer's own: another certificate of the plant (a device's, a server's) answered.
    #[error("{server} presented a certificate of the plant CA that is not the issuer's: {reason}")]
    NotTheIssuer {
        /// The server URL.
        server: String,
        /// What the certificate lacks, and what to check.
        reason: String,
    },
    /// Client side: no connection (nothing listens there), or it was closed before the server
    /// answered.
    #[error("cannot connect to {server}: {reason}")]
    Unreachable {
        /// The server URL.
        server: String,
        /// What happened, e.g. "connection refused".
        reason: String,
    },
}

impl Error {
    /// A refusal with a message for the client.
    pub fn refused(refusal: Refusal, message: impl fmt::Display) -> Self {
        Self::Refused {
            refusal,
            message: message.to_string(),
        }
    }

    /// The refusal this error becomes on the wire: decoding errors are the client's (400).
    pub fn refusal(&self) -> Refusal {
        match self {
            Self::Refused { refusal, .. } => *refusal,
            Self::Base64(_)
            | Self::Csr(_)
            | Self::CertsOnly(_)
            | Self::CsrAttrs(_)
            | Self::Multipart(_) => Refusal::BadRequest,
            Self::Label(_) => Refusal::NotFound,
            _ => Refusal::Internal,
        }
    }
}
