use std::path::PathBuf;

/// Everything that can go wrong reaching or using a key.
///
/// Messages name the device or token and say what to do; they never carry key material or
/// PINs. [`Error::is_transient`] tells callers which errors are worth a retry (the issuer
/// answers those with 503 + Retry-After).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The key reference string does not parse.
    #[error("invalid key reference {reference:?}: {reason}")]
    InvalidKeyRef {
        /// The string as given.
        reference: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The key reference (or the configuration) needs a backend this binary was built
    /// without: its cargo feature was off.
    #[error("this build has no {backend} support: rebuild with --features {feature}")]
    NotBuiltIn {
        /// The backend, e.g. `TPM`.
        backend: &'static str,
        /// The cargo feature that builds it, e.g. `tpm`.
        feature: &'static str,
    },
    /// A key already exists where a new one was to be created.
    #[error("refusing to overwrite the existing key at {0}")]
    KeyExists(PathBuf),
    /// A TPM persistent handle or a PKCS#11 label is already taken by another object.
    #[error("refusing to create a key: {0} already holds an object")]
    KeyPresent(String),
    /// No key lives where the key reference points.
    #[error("no key at {0}; create it first (e.g. `issuer init`)")]
    KeyNotFound(String),
    /// Reading or writing a key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The key file is readable by others than its owner.
    #[error("key file {0} is readable by group or others; run `chmod 600` on it")]
    InsecurePermissions(PathBuf),
    /// The key file exists but does not hold a P-256 PKCS#8 key.
    #[error("key file {path} does not hold a P-256 PKCS#8 private key: {reason}")]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },
    /// The file is not a TPM key blob (`TSS2 PRIVATE KEY` PEM) this backend can load.
    #[error("TPM key blob {path} is unusable: {reason}")]
    BadKeyBlob {
        /// The blob file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The signing operation itself failed.
    #[error("signing failed: {0}")]
    Sign(String),
    /// The device's request queue is full: too many signatures are waiting already.
    #[error("{device} is busy ({queued} requests waiting); retry later")]
    Busy {
        /// The device, e.g. `TPM at device:/dev/tpmrm0`.
        device: String,
        /// How many requests were waiting.
        queued: usize,
    },
    /// The device cannot be reached, did not answer in time, or lost its connection.
    #[error("{device} {reason}")]
    Unavailable {
        /// The device, e.g. `TPM at swtpm:host=127.0.0.1,port=2321`.
        device: String,
        /// What happened, e.g. `did not answer within 5 s`.
        reason: String,
    },
    /// The TPM answered, but refused an operation.
    #[error("{device} refused to {action}: {reason}")]
    Tpm {
        /// The device, e.g. `TPM at device:/dev/tpmrm0`.
        device: String,
        /// What was asked, e.g. `load key blob /var/lib/plant/issuing.tpmkey`.
        action: String,
        /// The TPM's answer, with advice where there is any.
        reason: String,
    },
    /// The key reference names a PKCS#11 token but no PIN source is set.
    #[error(
        "no PIN for PKCS#11 token '{token}': add pin-file=PATH to the key reference \
         or set PLANT_PKCS11_PIN"
    )]
    PinMissing {
        /// The token label.
        token: String,
    },
    /// Logging in to a PKCS#11 token failed.
    #[error("PKCS#11 login to token '{token}' failed: {reason}")]
    Login {
        /// The token label.
        token: String,
        /// Why, e.g. `wrong PIN` or `PIN locked`.
        reason: String,
    },
    /// A PKCS#11 module, token or operation failed.
    #[error("PKCS#11 {context}: {reason}")]
    Pkcs11 {
        /// Module and token, e.g. `token 'plant' in /usr/lib/softhsm/libsofthsm2.so`.
        context: String,
        /// What failed and why.
        reason: String,
    },
}

impl Error {
    /// The error for a build without TPM support, for any caller that needs a TPM (a key
    /// reference, node attestation).
    pub const NO_TPM: Self = Self::NotBuiltIn {
        backend: "TPM",
        feature: "tpm",
    };

    /// The error for a build without PKCS#11 support.
    pub const NO_PKCS11: Self = Self::NotBuiltIn {
        backend: "PKCS#11",
        feature: "pkcs11",
    };

    /// The error for a key reference whose backend this build lacks.
    #[cfg(not(all(feature = "tpm", feature = "pkcs11")))]
    pub(crate) fn not_built_in(key_ref: &crate::KeyRef) -> Self {
        match key_ref {
            crate::KeyRef::Pkcs11(_) => Self::NO_PKCS11,
            _ => Self::NO_TPM,
        }
    }

    /// Whether retrying later may succeed: the device was busy or unreachable, not wrong.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Busy { .. } | Self::Unavailable { .. })
    }
}
