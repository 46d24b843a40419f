//! The issuer's embedded store (sled in the state folder), one small table per aggregate:
//! certificates (with an expiry index), tokens, and the audit log. Writes are made durable by
//! [`Durability::commit`] before a response leaves.

mod audit;
mod certificates;
mod durability;
mod tokens;

pub use audit::{AuditEvent, AuditLog, AuditRecord};
pub use certificates::{
    CertificateRecord, CertificateStore, InventoryPage, InventoryQuery, Status,
};
pub use durability::Durability;
pub use tokens::{hash as tokens_hash, Consumed, TokenRecord, TokenStore};

use std::path::Path;

use crate::Error;

/// The opened store.
#[derive(Debug, Clone)]
pub struct Store {
    /// Issued certificates and the expiry index.
    pub certificates: CertificateStore,
    /// Enrollment tokens (hashes only).
    pub tokens: TokenStore,
    /// The hash-chained audit log.
    pub audit: AuditLog,
    /// The group-commit barrier.
    pub durability: Durability,
}

impl Store {
    /// Opens (or creates) the store under `dir`. Must run inside a tokio runtime.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let db = sled::Config::new()
            .path(dir)
            // sled's own periodic flush would race our barrier for no gain.
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                Error::Store(format!(
                    "cannot open the store in {}: {e} (is another issuer running on it?)",
                    dir.display()
                ))
            })?;
        let certificates = CertificateStore::open(&db)?;
        let tokens = TokenStore::open(&db)?;
        let audit = AuditLog::open(&db)?;
        let durability = Durability::start(db, dir)?;
        Ok(Self {
            certificates,
            tokens,
            audit,
            durability,
        })
    }
}
