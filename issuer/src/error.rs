use std::path::PathBuf;

/// The issuer's one error type. Each variant says what an operator can do about it; EST
/// and admin responses map it to the wire in their own single place.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file is missing, unreadable or invalid (exit 64).
    #[error("configuration: {0}")]
    Config(String),
    /// A key backend failed.
    #[error(transparent)]
    Key(#[from] hsm::Error),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The embedded store failed; issuance stops rather than answer without a record.
    #[error("store: {0}")]
    Store(String),
    /// Building or parsing a certificate failed.
    #[error("certificate: {0}")]
    Certificate(String),
    /// No short-lived signing key can sign now (the issuing key could not certify one); the
    /// request may succeed later.
    #[error("signing key: {0}")]
    SigningKey(String),
    /// The clock is outside the issuing CA's validity: nothing can be issued.
    #[error("{0}")]
    OutsideCaValidity(String),
    /// The state folder's disk is full or read-only: nothing can be recorded, so nothing is
    /// issued; requests are answered 503 and the next one checks again.
    #[error("{0}")]
    StateUnwritable(String),
    /// A certificate about to leave broke its profile; it is withheld.
    #[error("issued certificate failed its profile check: {0}")]
    ProfileCheck(String),
    /// TLS set-up failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// An admin request that can't be done, or an admin socket that can't be reached. The
    /// text is the whole message, said once: the server's refusal travels to the CLI as it
    /// is, so no side adds a prefix.
    #[error("{0}")]
    Admin(String),
    /// `inventory --fail-if-expiring-within` found certificates in the window (exit 1).
    #[error("{0}")]
    Expiring(String),
    /// `audit verify` found a break in the hash chain.
    #[error("audit log tampered: {0}")]
    AuditBroken(String),
    /// A request that EST policy refuses; carries the EST error with its status.
    #[error(transparent)]
    Est(#[from] est::Error),
    /// A registration entry, node or certificate that does not exist.
    #[error("{0}")]
    NotFound(String),
    /// An agent asked for something that is not its own (another node's entry).
    #[error("{0}")]
    Denied(String),
    /// An entry that exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// A node was not attested; the refusal says why.
    #[error("attestation refused: {0}")]
    Attestation(#[from] crate::attestation::Refusal),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    /// Whether the error is a bad configuration or usage (exit status 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Config(_))
    }

    /// The gRPC code that says whose fault it is: the one table the agent API and the admin
    /// socket share (they differ only in how much of the message a caller may read).
    pub(crate) fn grpc_code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            Self::Attestation(_) | Self::Denied(_) => Code::PermissionDenied,
            Self::NotFound(_) => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::Admin(_) => Code::InvalidArgument,
            Self::Est(e) => match e.refusal() {
                est::Refusal::BadRequest => Code::InvalidArgument,
                est::Refusal::Unavailable { .. } => Code::Unavailable,
                est::Refusal::Internal => Code::Internal,
                _ => Code::PermissionDenied,
            },
            Self::Key(e) if e.is_transient() => Code::Unavailable,
            // The store or the state folder can't take a write now: nothing was done, and
            // the same request may succeed later (a full disk resumes by itself).
            Self::Store(_)
            | Self::SigningKey(_)
            | Self::OutsideCaValidity(_)
            | Self::StateUnwritable(_) => Code::Unavailable,
            _ => Code::Internal,
        }
    }
}

impl From<sled::Error> for Error {
    fn from(e: sled::Error) -> Self {
        Self::Store(e.to_string())
    }
}

impl From<rcgen::Error> for Error {
    fn from(e: rcgen::Error) -> Self {
        Self::Certificate(e.to_string())
    }
}
