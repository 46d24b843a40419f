//! The issuer's embedded store (sled in the state folder), one small table per aggregate:
//! certificates (with an expiry index), tokens, registration entries, attested nodes and the
//! audit log. Writes are made durable by
//! [`Durability::commit`] before a response leaves.

mod sled;

pub use self::sled::{
    tokens_hash, AttestedWith, AuditEvent, AuditLog, AuditRecord, CertificateRecord,
    CertificateStore, Consumed, Durability, EntryRecord, EntryStore, InventoryPage, InventoryQuery,
    Issuance, Issued, Lineage, LineageEnd, NewRecord, NodeRecord, NodeStore, Recorded, Renewal,
    Revocation, Status, TokenKind, TokenRecord, TokenRevocation, TokenState, TokenStore,
    Verification,
};

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
    /// Registration entries, indexed by parent node.
    pub entries: EntryStore,
    /// Attested nodes.
    pub nodes: NodeStore,
    /// The group-commit barrier.
    pub durability: Durability,
    journal: self::sled::Journal,
}

/// The page cache (MiB) when the configuration names none (`[store] cache_mb`).
pub const DEFAULT_CACHE_MB: u64 = 32;

impl Store {
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
        self::sled::record_issuance(self, issuance)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::Serial;

    fn record(serial: &Serial, label: &str, not_after: i64) -> CertificateRecord {
        CertificateRecord {
            serial: serial.to_string(),
            subject: format!("dev-{not_after}"),
            sans: vec![],
            label: label.into(),
            owner: "test".into(),
            issued_at: 0,
            not_after,
            status: Status::Valid,
            renews: None,
            der: String::new(),
        }
    }

    fn filled_store(count: i64) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for i in 0..count {
            let serial = Serial::random();
            let label = if i % 3 == 0 { "plc" } else { "device" };
            // One certificate a day from day 1, several on the same second to test ties.
            let rec = record(&serial, label, 1_000_000 + (i / 2) * 86_400);
            assert!(store
                .certificates
                .record_new(&serial, &rec)
                .expect("record"));
        }
        (dir, store)
    }

    #[tokio::test]
    async fn a_serial_is_recorded_once_and_never_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let serial = Serial::random();
        assert!(store
            .certificates
            .record_new(&serial, &record(&serial, "plc", 5))
            .expect("first"));
        let other = record(&serial, "device", 9);
        assert!(!store
            .certificates
            .record_new(&serial, &other)
            .expect("second"));
        let kept = store
            .certificates
            .get(&serial)
            .expect("get")
            .expect("present");
        assert_eq!(kept.label, "plc");
        let page = store
            .certificates
            .query(&InventoryQuery::default(), 0)
            .expect("query");
        assert_eq!(page.total, Some(1), "no second index entry");
    }

    #[tokio::test]
    async fn expiring_within_counts_exactly_the_window() {
        let (_dir, store) = filled_store(200);
        let now = 1_000_000 - 1;
        // not_after values in (now, now + 10 days]: days 0..=9 → 20 certificates.
        let page = store
            .certificates
            .query(
                &InventoryQuery {
                    expiring_within_secs: Some(10 * 86_400),
                    ..Default::default()
                },
                now,
            )
            .expect("query");
        assert_eq!(page.total, Some(20));
        assert!(page
            .certificates
            .iter()
            .all(|r| r.not_after > now && r.not_after <= now + 10 * 86_400));
    }

    /// For each status: how many certificates the status filter finds (answered from the
    /// expiry index), and how many of all rows read that way from their records.
    fn status_counts(store: &Store, now: i64) -> Vec<(Status, usize, usize)> {
        let all = store
            .certificates
            .query(
                &InventoryQuery {
                    limit: Some(10_000),
                    ..Default::default()
                },
                now,
            )
            .expect("all rows");
        [
            Status::Valid,
            Status::Expired,
            Status::Revoked,
            Status::Superseded,
        ]
        .into_iter()
        .map(|status| {
            let filtered = store
                .certificates
                .query(
                    &InventoryQuery {
                        status: Some(status),
                        limit: Some(1),
                        ..Default::default()
                    },
                    now,
                )
                .expect("by status");
            let read = all
                .certificates
                .iter()
                .filter(|r| r.status == status)
                .count();
            (status, filtered.total.expect("counted"), read)
        })
        .collect()
    }

    #[tokio::test]
    async fn status_counts_from_the_index_follow_revocations_and_renewals() {
        let (_dir, store) = filled_store(120);
        let now = 1_000_000 + 30 * 86_400;
        let rows = store
            .certificates
            .query(
                &InventoryQuery {
                    limit: Some(10_000),
                    ..Default::default()
                },
                0,
            )
            .expect("rows");
        let serials: Vec<Serial> = rows
            .certificates
            .iter()
            .map(|r| Serial::parse(&r.serial).expect("serial"))
            .collect();
        // Revoke and supersede some already expired and some still valid.
        for serial in serials.iter().step_by(7) {
            store.certificates.revoke(serial, 5, 1).expect("revoke");
        }
        for serial in serials.iter().skip(3).step_by(11) {
            assert!(store
                .certificates
                .set_status(serial, Status::Superseded)
                .expect("supersede"));
        }
        let counts = status_counts(&store, now);
        for (status, filtered, read) in &counts {
            assert_eq!(filtered, read, "{status:?}: {counts:?}");
        }
        assert!(counts.iter().all(|(_, n, _)| *n > 0), "{counts:?}");
        assert_eq!(counts.iter().map(|(_, n, _)| n).sum::<usize>(), 120);
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
                let mut rec = record(serial, "plc", not_after);
                if i % 4 == 0 {
                    rec.status = Status::Revoked;
                }
                by_serial
                    .insert(serial.0, serde_json::to_vec(&rec).expect("json"))
                    .expect("insert");
                by_expiry
                    .insert(
                        super::sled::certificates::expiry_key(not_after, serial),
                        &[][..],
                    )
                    .expect("insert");
            }
            db.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("open");
        let counts = status_counts(&store, 2_020);
        assert_eq!(
            counts,
            vec![
                (Status::Valid, 15, 15),
                (Status::Expired, 15, 15),
                (Status::Revoked, 10, 10),
                (Status::Superseded, 0, 0),
            ]
        );
        assert!(store.certificates.index_has_status(), "migrated on open");
    }

    #[tokio::test]
    async fn paging_never_skips_or_repeats_a_row() {
        let (_dir, store) = filled_store(257);
        for label in [None, Some("plc".to_owned())] {
            let mut seen = std::collections::HashSet::new();
            let mut query = InventoryQuery {
                label: label.clone(),
                limit: Some(10),
                ..Default::default()
            };
            let mut last_not_after = i64::MIN;
            let total = loop {
                let page = store.certificates.query(&query, 0).expect("page");
                for row in &page.certificates {
                    assert!(seen.insert(row.serial.clone()), "repeated {}", row.serial);
                    assert!(row.not_after >= last_not_after, "out of order");
                    last_not_after = row.not_after;
                }
                match page.next {
                    Some(next) => query.after = Some(next),
                    None => break page.total.expect("counted"),
                }
            };
            let expected = if label.is_some() { 86 } else { 257 };
            assert_eq!(seen.len(), expected, "{label:?}");
            assert_eq!(total, expected);
        }
    }

    #[tokio::test]
    async fn audit_records_chain_by_hash_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            for i in 0..3 {
                store
                    .audit
                    .append(
                        AuditEvent {
                            kind: "test".into(),
                            detail: serde_json::json!({ "i": i }),
                        },
                        i,
                    )
                    .expect("append");
            }
            store.durability.commit().await.expect("commit");
            store.durability.close().await;
        }
        let store = Store::open(dir.path()).expect("reopen");
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
            [1, 2, 3, 4]
        );
        for pair in records.windows(2) {
            assert_eq!(pair[1].prev, pair[0].hash);
        }
    }

    #[tokio::test]
    async fn a_token_is_consumed_once_under_concurrency() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let secret = "s3cret";
        store
            .tokens
            .insert(&TokenRecord {
                id: "abcd".into(),
                kind: TokenKind::Enrollment,
                hash: hex::encode(tokens_hash(secret)),
                label: "device".into(),
                subject: None,
                dns: vec![],
                ips: vec![],
                created_at: 0,
                expires_at: 100,
                used_at: None,
                revoked_at: None,
            })
            .expect("insert");
        let winners: usize = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..16)
                .map(|_| {
                    scope.spawn(|| matches!(store.tokens.consume(secret, 10), Ok(Consumed::Ok(_))))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| usize::from(h.join().unwrap_or(false)))
                .sum()
        });
        assert_eq!(winners, 1);
        assert!(matches!(
            store.tokens.consume(secret, 10),
            Ok(Consumed::AlreadyUsed(_))
        ));
        assert!(matches!(
            store.tokens.consume(secret, 500),
            Ok(Consumed::AlreadyUsed(_))
        ));
        assert!(matches!(
            store.tokens.consume("other", 10),
            Ok(Consumed::Unknown)
        ));
    }

    fn entry(id: &str, parent: &str, selectors: &[&str]) -> EntryRecord {
        EntryRecord {
            id: id.into(),
            spiffe_id: "spiffe://plant.test/historian".into(),
            parent_id: parent.into(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            x509_svid_ttl_secs: 0,
            jwt_svid_ttl_secs: 0,
            dns_names: vec![],
            hint: String::new(),
            revision: 1,
            created_at: 0,
        }
    }

    #[tokio::test]
    async fn entries_list_by_parent_refuse_duplicates_and_delete_with_their_indexes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let a = "spiffe://plant.test/agent/join_token/a";
        // A parent that is a prefix of another must not see the other's entries.
        let ab = "spiffe://plant.test/agent/join_token/ab";
        assert_eq!(
            store
                .entries
                .insert(&entry("1", a, &["unix:uid:1"]))
                .expect("1"),
            None
        );
        assert_eq!(
            store
                .entries
                .insert(&entry("2", ab, &["unix:uid:1"]))
                .expect("2"),
            None
        );
        assert_eq!(
            store
                .entries
                .insert(&entry("3", a, &["unix:uid:1"]))
                .expect("3"),
            Some("1".to_owned()),
            "same SPIFFE ID, parent and selectors"
        );
        assert_eq!(
            store
                .entries
                .insert(&entry("4", a, &["unix:uid:2"]))
                .expect("4"),
            None
        );
        let ids = |parent| {
            store
                .entries
                .list(parent)
                .expect("list")
                .into_iter()
                .map(|e| e.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(ids(Some(a)), ["1", "4"]);
        assert_eq!(ids(Some(ab)), ["2"]);
        assert_eq!(ids(None), ["1", "2", "4"]);
        assert_eq!(
            store.entries.delete("1").expect("delete").map(|e| e.id),
            Some("1".into())
        );
        assert_eq!(store.entries.delete("1").expect("again"), None);
        assert_eq!(ids(Some(a)), ["4"]);
        // The identity index went with it: the same entry may be created again.
        assert_eq!(
            store
                .entries
                .insert(&entry("5", a, &["unix:uid:1"]))
                .expect("5"),
            None
        );
    }

    #[tokio::test]
    async fn nodes_are_replaced_on_reattestation_and_updated_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let id = "spiffe://plant.test/agent/x509pop/gw-1";
        let node = NodeRecord {
            spiffe_id: id.into(),
            method: "x509pop".into(),
            attested_at: 1,
            svid_serial: "01".into(),
            svid_not_after: 100,
            evicted: false,
            can_reattest: true,
            attested_with: None,
            released: false,
            banned: false,
        };
        store.nodes.put(&node).expect("put");
        let before = store
            .nodes
            .update(id, |n| n.evicted = true)
            .expect("update")
            .expect("known");
        assert!(!before.evicted);
        assert!(store.nodes.get(id).expect("get").expect("known").evicted);
        assert_eq!(
            store
                .nodes
                .update("spiffe://plant.test/agent/x/y", |_| {})
                .expect("u"),
            None
        );
        store
            .nodes
            .put(&NodeRecord {
                svid_serial: "02".into(),
                ..node
            })
            .expect("reattest");
        let now = store.nodes.get(id).expect("get").expect("known");
        assert!(!now.evicted);
        assert_eq!(now.svid_serial, "02");
        assert_eq!(store.nodes.list().expect("list").len(), 1);
    }

    #[tokio::test]
    async fn an_issuance_is_written_whole_or_not_at_all() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let secret = "one-time";
        store
            .tokens
            .insert(&TokenRecord {
                id: "abcd".into(),
                kind: TokenKind::Enrollment,
                hash: hex::encode(tokens_hash(secret)),
                label: "device".into(),
                subject: None,
                dns: vec![],
                ips: vec![],
                created_at: 0,
                expires_at: 100,
                used_at: None,
                revoked_at: None,
            })
            .expect("insert");
        let digest = tokens_hash(secret);
        let issue = |serial: &Serial| {
            let rec = record(serial, "device", 1_000);
            store.record_issuance(Issuance {
                serial,
                record: &rec,
                renews: None,
                token: Some(&digest),
                unique_subject: false,
                audit: (
                    AuditEvent {
                        kind: "certificate.issued".into(),
                        detail: serde_json::json!({ "serial": serial.to_string() }),
                    },
                    5,
                ),
                now: 10,
            })
        };
        let first = Serial::random();
        assert!(matches!(issue(&first).expect("first"), Issued::Recorded));
        let second = Serial::random();
        assert!(matches!(
            issue(&second).expect("second"),
            Issued::TokenRefused(Consumed::AlreadyUsed(_))
        ));
        store.durability.commit().await.expect("commit");
        assert!(store.certificates.get(&first).expect("get").is_some());
        assert!(
            store.certificates.get(&second).expect("get").is_none(),
            "a refused issuance left its certificate"
        );
        let audit = store.audit.tail(10).expect("tail");
        assert_eq!(audit.len(), 1, "a refused issuance left an audit record");
        assert!(store
            .tokens
            .find(secret)
            .expect("find")
            .is_some_and(|t| t.used_at == Some(10)));
        store.durability.close().await;
        drop(store);
        // Reopened (journal applied or checkpointed): the same, and the chain intact.
        let store = Store::open(dir.path()).expect("reopen");
        assert!(store.certificates.get(&first).expect("get").is_some());
        assert_eq!(store.audit.verify().expect("verify").problem, None);
    }
}
