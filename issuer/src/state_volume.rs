//! The filesystem under the state folder, checked before anything is written for a request.
//!
//! The store (sled) stops for good after its first failed write: it keeps the error and
//! refuses every later operation until the process reopens it. So the issuer must not let
//! sled meet a full or read-only disk in the first place. Before a request writes (a
//! certificate, a spent token, a node), [`StateVolume::check`] asks the kernel (`statvfs`)
//! whether the state folder's filesystem is writable and keeps `min_free` bytes free; if
//! not, the request is refused with 503 and a message saying what to fix, nothing is
//! written, and the next request checks again, so issuance resumes by itself once space is
//! back or the filesystem is writable again.

use std::path::{Path, PathBuf};

use rustix::fs::StatVfsMountFlags;

use crate::Error;

/// The state folder's filesystem and the free space issuance keeps in reserve.
#[derive(Debug, Clone)]
pub struct StateVolume {
    dir: PathBuf,
    min_free_bytes: u64,
}

/// Why the state folder can't take writes now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unwritable {
    /// The filesystem is mounted read-only.
    ReadOnly,
    /// Less than the reserve is free.
    Full {
        /// Bytes an unprivileged writer may still use.
        free: u64,
        /// The configured reserve.
        reserve: u64,
    },
    /// `statvfs` itself failed (the folder is gone, or the disk is unreachable).
    Unknown(String),
}

impl StateVolume {
    /// `dir` is the state folder; `min_free_bytes` the reserve kept free for the store's own
    /// segments and the audit log.
    pub fn new(dir: &Path, min_free_bytes: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            min_free_bytes,
        }
    }

    /// What `statvfs` says about the folder now.
    pub fn probe(&self) -> Result<(), Unwritable> {
        let stat =
            rustix::fs::statvfs(&self.dir).map_err(|e| Unwritable::Unknown(e.to_string()))?;
        if stat.f_flag.contains(StatVfsMountFlags::RDONLY) {
            return Err(Unwritable::ReadOnly);
        }
        let free = stat.f_bavail.saturating_mul(stat.f_frsize);
        if free < self.min_free_bytes {
            return Err(Unwritable::Full {
                free,
                reserve: self.min_free_bytes,
            });
        }
        Ok(())
    }

    /// [`StateVolume::probe`] as the issuer's error: a 503 the client may retry, with the
    /// operator's fix in the text.
    pub fn check(&self) -> Result<(), Error> {
        self.probe().map_err(|why| {
            let dir = self.dir.display();
            Error::StateUnwritable(match why {
                Unwritable::ReadOnly => format!(
                    "the issuer's state folder {dir} is on a read-only filesystem; \
                     nothing can be recorded, so nothing is issued until it is writable again"
                ),
                Unwritable::Full { free, reserve } => format!(
                    "the disk holding the issuer's state folder {dir} is full ({} free, \
                     {} kept in reserve); issuance resumes by itself once space is freed",
                    mebibytes(free),
                    mebibytes(reserve)
                ),
                Unwritable::Unknown(e) => {
                    format!("the issuer's state folder {dir} cannot be checked: {e}")
                }
            })
        })
    }
}

fn mebibytes(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_folder_with_room_is_writable() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(StateVolume::new(dir.path(), 1).probe(), Ok(()));
    }

    #[test]
    fn a_reserve_larger_than_the_disk_reads_as_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume = StateVolume::new(dir.path(), u64::MAX);
        assert!(matches!(volume.probe(), Err(Unwritable::Full { .. })));
        let message = volume.check().expect_err("full").to_string();
        assert!(message.contains("is full"), "{message}");
        assert!(message.contains("resumes by itself"), "{message}");
    }

    #[test]
    fn a_missing_folder_is_reported_not_assumed_writable() {
        let volume = StateVolume::new(Path::new("/nonexistent/plant-state"), 1);
        assert!(matches!(volume.probe(), Err(Unwritable::Unknown(_))));
    }
}
