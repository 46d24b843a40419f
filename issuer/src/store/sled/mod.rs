//! The embedded backend: sled in the state folder, one tree per table, every write through
//! the issuance journal ([`journal`]) so that one fsync commits many requests.

pub(in crate::store) mod audit;
pub(in crate::store) mod certificates;
pub(in crate::store) mod durability;
pub(in crate::store) mod entries;
pub(in crate::store) mod journal;
pub(in crate::store) mod nodes;
pub(in crate::store) mod tokens;

use std::path::Path;

use super::Store;
use crate::serial::Serial;
use crate::Error;

pub use audit::{AuditEvent, AuditLog, AuditRecord, Verification};
pub use certificates::{
    CertificateRecord, CertificateStore, InventoryPage, InventoryQuery, Lineage, LineageEnd,
    NewRecord, Renewal, Revocation, Status,
};
pub use durability::Durability;
pub use entries::{EntryRecord, EntryStore};
pub(in crate::store) use journal::Journal;
pub use nodes::{AttestedWith, NodeRecord, NodeStore, Recorded};
pub use tokens::{
    hash as tokens_hash, Consumed, TokenKind, TokenRecord, TokenRevocation, TokenState, TokenStore,
};

/// Opens (or creates) the sled store under `dir`; see [`Store::open_with_cache`].
pub(in crate::store) fn open(dir: &Path, cache_mb: u64) -> Result<Store, Error> {
    std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
    let db = sled::Config::new()
        .path(dir)
        // Checkpoints flush sled (journal.rs); its own periodic flush would only add I/O.
        .flush_every_ms(None)
        .cache_capacity(cache_mb.saturating_mul(1024 * 1024))
        .open()
        .map_err(|e| {
            Error::Store(format!(
                "cannot open the store in {}: {e} (is another issuer running on it?)",
                dir.display()
            ))
        })?;
    let durability = Durability::start(db.clone(), dir)?;
    let journal = durability.journal().clone();
    let certificates = CertificateStore::open(&db, journal.clone())?;
    let tokens = TokenStore::open(&db, journal.clone())?;
    let audit = AuditLog::open(&db, journal.clone())?;
    let entries = EntryStore::open(&db, journal.clone())?;
    let nodes = NodeStore::open(&db, journal.clone())?;
    // Opening may have filled new indexes (written to sled directly, before any journaled
    // write): make them durable before the first request.
    db.flush()?;
    let log_path = dir.join("db");
    std::fs::File::open(&log_path)
        .and_then(|log| log.sync_data())
        .map_err(Error::io(&log_path))?;
    Ok(Store {
        certificates,
        tokens,
        audit,
        entries,
        nodes,
        durability,
        journal,
    })
}

/// One issuance, as [`Store::record_issuance`] writes it.
#[derive(Debug)]
pub struct Issuance<'a> {
    /// The new certificate's serial.
    pub serial: &'a Serial,
    /// Its record.
    pub record: &'a CertificateRecord,
    /// The certificate it renews (superseded by it), if a renewal.
    pub renews: Option<&'a Serial>,
    /// The token it spends (SHA-256 of the secret), if enrolled by token.
    pub token: Option<&'a [u8; 32]>,
    /// Whether it must be its subject's only valid certificate under its label.
    pub unique_subject: bool,
    /// Its audit record, and when (unix milliseconds).
    pub audit: (AuditEvent, i64),
    /// The token's "now" (unix seconds): expired tokens are refused.
    pub now: i64,
}

/// What [`Store::record_issuance`] did.
#[derive(Debug)]
pub enum Issued {
    /// All written.
    Recorded,
    /// The serial was taken; nothing written (sign again with a new one).
    SerialTaken,
    /// The token can't be used (used, revoked, expired or unknown); nothing written.
    TokenRefused(Consumed),
    /// The subject is held by this valid certificate (serial); nothing written.
    SubjectHeld(String),
    /// The renewed certificate is no longer current; nothing written.
    PredecessorNotCurrent(Renewal),
}

pub(in crate::store) fn record_issuance(
    store: &Store,
    issuance: Issuance<'_>,
) -> Result<Issued, Error> {
    let mut write = store.journal.begin()?;
    // Every check first, then every write: a refusal writes nothing.
    let token = match issuance.token {
        Some(digest) => match store.tokens.spendable(digest, issuance.now)? {
            Consumed::Ok(record) => Some((digest, record)),
            refused => return Ok(Issued::TokenRefused(refused)),
        },
        None => None,
    };
    let recorded = match issuance.renews {
        None => match store.certificates.record_new_in(
            &mut write,
            issuance.serial,
            issuance.record,
            issuance.unique_subject,
        )? {
            NewRecord::Recorded => Issued::Recorded,
            NewRecord::SerialTaken => Issued::SerialTaken,
            NewRecord::SubjectHeld(serial) => Issued::SubjectHeld(serial),
        },
        Some(old) => match store.certificates.record_renewal_in(
            &mut write,
            issuance.serial,
            issuance.record,
            old,
        )? {
            Renewal::Recorded => Issued::Recorded,
            Renewal::SerialTaken => Issued::SerialTaken,
            refused => Issued::PredecessorNotCurrent(refused),
        },
    };
    if !matches!(recorded, Issued::Recorded) {
        return Ok(recorded);
    }
    if let Some((digest, record)) = token {
        store
            .tokens
            .spend_in(&mut write, digest, &record, issuance.now)?;
    }
    let (event, at_ms) = issuance.audit;
    store.audit.append_in(&mut write, event, at_ms)?;
    Ok(Issued::Recorded)
}
