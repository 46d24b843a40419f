//! The issuer's store, one small table per aggregate: certificates (with an expiry index),
//! tokens, registration entries, attested nodes and the audit log.
//!
//! Each aggregate is a trait here ([`CertificateStore`], [`TokenStore`], [`NodeStore`],
//! [`EntryStore`], [`AuditLog`], and [`IssuanceStore`] for the one write that spans them),
//! beside [`Durability`], the barrier every write passes before its response leaves;
//! [`Store`] holds one `Arc<dyn …>` of each, so a backend is one more module. The embedded
//! backend is sled in the state folder (`sled/`), made durable by its journal
//! ([`Journaled`]). Every backend runs the same cases (`conformance`). Domain types live
//! beside their trait, one file per aggregate; how a backend encodes them is its own
//! business.

mod audit;
mod certificates;
#[cfg(test)]
mod conformance;
mod entries;
mod nodes;
mod sled;
mod tokens;

pub use self::audit::{chain_hash, AuditEvent, AuditLog, AuditRecord, Verification};
pub use self::certificates::{
    CertificateRecord, CertificateStore, InventoryPage, InventoryQuery, Lineage, LineageEnd,
    NewRecord, Renewal, Revocation, Status,
};
pub use self::entries::{EntryRecord, EntryStore};
pub use self::nodes::{AttestedWith, NodeRecord, NodeStore, Recorded};
pub use self::sled::Journaled;
pub use self::tokens::{
    hash as tokens_hash, Consumed, TokenKind, TokenRecord, TokenRevocation, TokenState, TokenStore,
};

use std::fmt::Debug;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use crate::serial::Serial;
use crate::state_volume::StateVolume;
use crate::Error;

/// The future a store trait's async method returns (the traits are used as `dyn`).
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Durable before the answer (DESIGN §3): a request's writes are on disk, or committed in
/// the database, before its response leaves, and a backend that can no longer promise
/// that says so.
pub trait Durability: Debug + Send + Sync {
    /// Waits until every write this task made before calling is durable (many requests
    /// share one commit). Fails once the store is broken: nothing is claimed durable after
    /// a failed write.
    fn commit(&self) -> StoreFuture<'_, Result<(), Error>>;
    /// Resolves once the store is broken for good, with the error; the issuer then stops,
    /// to restart on what is durable.
    fn broken(&self) -> StoreFuture<'_, String>;
    /// Makes everything durable one last time and stops background work (shutdown).
    fn close(&self) -> StoreFuture<'_, ()>;
    /// Holds background writes while `volume`, the state folder's disk, takes none.
    fn watch_volume(&self, volume: StateVolume);
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

/// What spans aggregates: one issuance is one atomic write.
pub trait IssuanceStore: Debug + Send + Sync {
    /// See [`Store::record_issuance`].
    fn record_issuance(&self, issuance: Issuance<'_>) -> Result<Issued, Error>;
}

/// The opened store: one handle per aggregate, whichever backend holds them.
#[derive(Debug, Clone)]
pub struct Store {
    /// Issued certificates and the expiry index.
    pub certificates: Arc<dyn CertificateStore>,
    /// Enrollment tokens (hashes only).
    pub tokens: Arc<dyn TokenStore>,
    /// The hash-chained audit log.
    pub audit: Arc<dyn AuditLog>,
    /// Registration entries, indexed by parent node.
    pub entries: Arc<dyn EntryStore>,
    /// Attested nodes.
    pub nodes: Arc<dyn NodeStore>,
    /// The barrier every write passes before its response leaves.
    pub durability: Arc<dyn Durability>,
    issuances: Arc<dyn IssuanceStore>,
}

/// The page cache (MiB) when the configuration names none (`[store] cache_mb`).
pub const DEFAULT_CACHE_MB: u64 = 32;

impl Store {
    /// Appends an audit record of `kind` dated `at` (kept to the millisecond).
    pub fn audit_event(
        &self,
        kind: &str,
        detail: serde_json::Value,
        at: time::OffsetDateTime,
    ) -> Result<u64, Error> {
        let at_ms = audit_ms(at);
        self.audit.append(
            AuditEvent {
                kind: kind.to_owned(),
                detail,
            },
            at_ms,
        )
    }

    /// Opens (or creates) the store under `dir` with the default cache. Must run inside a
    /// tokio runtime.
    pub fn open(dir: &Path) -> Result<Self, Error> {
        Self::open_with_cache(dir, DEFAULT_CACHE_MB)
    }

    /// Opens (or creates) the store under `dir` with a page cache of `cache_mb` MiB,
    /// applying what its journal holds beyond sled's last checkpoint. Must run inside a
    /// tokio runtime.
    pub fn open_with_cache(dir: &Path, cache_mb: u64) -> Result<Self, Error> {
        self::sled::open(dir, cache_mb)
    }

    /// Records one issuance in one write: the certificate (superseding what it renews), the
    /// token it spends and its audit record, all or nothing. Nothing is written unless the
    /// token is still usable, the serial unused, and the subject or predecessor free.
    pub fn record_issuance(&self, issuance: Issuance<'_>) -> Result<Issued, Error> {
        self.issuances.record_issuance(issuance)
    }
}

/// An instant as audit records carry it: Unix milliseconds.
pub fn audit_ms(at: time::OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}
