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
use std::sync::Arc;

use super::{Consumed, Issuance, IssuanceStore, Issued, NewRecord, Renewal, Store};
use crate::Error;

pub use durability::Journaled;
pub(in crate::store) use journal::Journal;

use self::audit::Audit;
use self::certificates::Certificates;
use self::entries::Entries;
use self::nodes::Nodes;
use self::tokens::Tokens;

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
    let durability = Journaled::start(db.clone(), dir)?;
    let journal = durability.journal().clone();
    let certificates = Certificates::open(&db, journal.clone())?;
    let tokens = Tokens::open(&db, journal.clone())?;
    let audit = Audit::open(&db, journal.clone())?;
    let entries = Entries::open(&db, journal.clone())?;
    let nodes = Nodes::open(&db, journal.clone())?;
    // Opening may have filled new indexes (written to sled directly, before any journaled
    // write): make them durable before the first request.
    db.flush()?;
    let log_path = dir.join("db");
    std::fs::File::open(&log_path)
        .and_then(|log| log.sync_data())
        .map_err(Error::io(&log_path))?;
    let issuances = Issuances {
        certificates: certificates.clone(),
        tokens: tokens.clone(),
        audit: audit.clone(),
        journal,
    };
    Ok(Store {
        certificates: Arc::new(certificates),
        tokens: Arc::new(tokens),
        audit: Arc::new(audit),
        entries: Arc::new(entries),
        nodes: Arc::new(nodes),
        durability: Arc::new(durability),
        issuances: Arc::new(issuances),
    })
}

/// The tables an issuance writes, sharing one journal so that it is one write.
#[derive(Debug)]
struct Issuances {
    certificates: Certificates,
    tokens: Tokens,
    audit: Audit,
    journal: Journal,
}

impl IssuanceStore for Issuances {
    fn record_issuance(&self, issuance: Issuance<'_>) -> Result<Issued, Error> {
        let store = self;
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::Serial;
    use crate::store::conformance::{self, status_counts};
    use crate::store::{AuditEvent, Status};

    fn fresh() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        (dir, store)
    }

    conformance::suite!(fresh);

    /// Opens what `open` opens once sled has let go of it in this process. sled releases
    /// its file lock when its I/O threads drop the log file, a moment after the last handle
    /// is dropped, so opening again at once may find the lock still held for that moment.
    fn when_unlocked<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> T {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open() {
                Ok(opened) => return opened,
                Err(e)
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("opening again: {e}"),
            }
        }
    }

    fn reopen(dir: &Path) -> Store {
        when_unlocked(|| Store::open(dir))
    }

    #[tokio::test]
    async fn a_store_from_before_the_status_index_is_filled_in_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let serials: Vec<Serial> = (0..40).map(|_| Serial::random()).collect();
        {
            // The layout older issuers wrote: index entries with empty values.
            let db = ::sled::Config::new().path(dir.path()).open().expect("sled");
            let by_serial = db.open_tree("certificates").expect("tree");
            let by_expiry = db.open_tree("certificates_by_expiry").expect("tree");
            for (i, serial) in serials.iter().enumerate() {
                let not_after = 2_000 + i as i64;
                let mut rec = conformance::record(serial, "plc", not_after);
                if i % 4 == 0 {
                    rec.status = Status::Revoked;
                }
                by_serial
                    .insert(serial.0, certificates::encode(&rec).expect("encode"))
                    .expect("insert");
                by_expiry
                    .insert(certificates::expiry_key(not_after, serial), &[][..])
                    .expect("insert");
            }
            db.flush().expect("flush");
        }
        // What Store::open does to the certificate tables.
        let db = when_unlocked(|| ::sled::Config::new().path(dir.path()).open());
        let certificates = certificates::Certificates::open(&db, Journal::scratch()).expect("open");
        let counts = status_counts(&certificates, 2_020);
        assert_eq!(
            counts,
            vec![
                (Status::Valid, 15, 15),
                (Status::Expired, 15, 15),
                (Status::Revoked, 10, 10),
                (Status::Superseded, 0, 0),
            ]
        );
        assert!(certificates.index_has_status(), "migrated on open");
    }

    #[tokio::test]
    async fn audit_records_survive_reopen() {
        let (dir, store) = fresh();
        conformance::audit_records_chain_by_hash(&store).await;
        store.durability.commit().await.expect("commit");
        store.durability.close().await;
        drop(store);
        let store = reopen(dir.path());
        store
            .audit
            .append(
                AuditEvent {
                    kind: "after-reopen".into(),
                    detail: serde_json::Value::Null,
                },
                9,
            )
            .expect("append");
        let records = store.audit.tail(10).expect("tail");
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(store.audit.verify().expect("verify").problem, None);
    }

    #[tokio::test]
    async fn an_issuance_survives_reopen_with_its_chain() {
        let (dir, store) = fresh();
        let first = conformance::an_issuance_is_written_whole_or_not_at_all(&store).await;
        store.durability.close().await;
        drop(store);
        // Reopened (journal applied or checkpointed): the same, and the chain intact.
        let store = reopen(dir.path());
        assert!(store.certificates.get(&first).expect("get").is_some());
        assert_eq!(store.audit.verify().expect("verify").problem, None);
    }
}
