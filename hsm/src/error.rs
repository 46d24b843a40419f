use std::path::PathBuf;

/// Everything that can go wrong reaching or using a key.
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
    /// The backend named by the key reference is not built into this binary yet.
    #[error("the {0} key backend is not available in this build")]
    BackendUnavailable(&'static str),
    /// A key already exists where a new one was to be created.
    #[error("refusing to overwrite the existing key at {0}")]
    KeyExists(PathBuf),
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
    /// The signing operation itself failed.
    #[error("signing failed: {0}")]
    Sign(String),
}
