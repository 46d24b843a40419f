//! The embedded backend: sled in the state folder, one tree per table, every write through
//! the issuance journal ([`journal`]) so that one fsync commits many requests.

pub(in crate::store) mod audit;
pub(in crate::store) mod certificates;
pub(in crate::store) mod durability;
pub(in crate::store) mod entries;
pub(in crate::store) mod nodes;
pub(in crate::store) mod tokens;

pub use audit::{AuditEvent, AuditLog, AuditRecord, Verification};
pub use certificates::{
    CertificateRecord, CertificateStore, InventoryPage, InventoryQuery, Lineage, LineageEnd,
    NewRecord, Renewal, Revocation, Status,
};
pub use durability::Durability;
pub use entries::{EntryRecord, EntryStore};
pub use nodes::{AttestedWith, NodeRecord, NodeStore, Recorded};
pub use tokens::{
    hash as tokens_hash, Consumed, TokenKind, TokenRecord, TokenRevocation, TokenState, TokenStore,
};
