//! Key files on disk (software keys, TPM key blobs): created owner-only and never over an
//! existing file, so no command can silently replace a CA's key.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::Error;

/// Creates `path` for writing with mode 0600; an existing file is `KeyExists`.
pub(crate) fn create(path: &Path) -> Result<File, Error> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::KeyExists(path.to_owned())
            } else {
                Error::Io {
                    path: path.to_owned(),
                    source: e,
                }
            }
        })
}
