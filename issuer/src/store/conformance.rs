//! The behaviours every store backend shows, as test cases over a freshly opened, empty
//! [`Store`]. A backend runs all of them with one line in its tests:
//! `crate::store::conformance::suite!(fresh)`, where `fresh()` returns `(guard, Store)` and
//! the guard (a temporary folder, a scratch database) lives as long as the case.

use super::*;
use crate::serial::Serial;

/// One `#[tokio::test]` per conformance case, each on its own store from `$fresh`.
macro_rules! suite {
    (@cases $fresh:path; $($case:ident,)*) => {
        $(
            #[tokio::test]
            async fn $case() {
                let (_guard, store) = $fresh();
                $crate::store::conformance::$case(&store).await;
            }
        )*
    };
    ($fresh:path) => {
        $crate::store::conformance::suite!(@cases $fresh;
            a_serial_is_recorded_once_and_never_overwritten,
            expiring_within_counts_exactly_the_window,
            status_counts_from_the_index_follow_revocations_and_renewals,
            paging_never_skips_or_repeats_a_row,
            audit_records_chain_by_hash,
            a_token_is_consumed_once_under_concurrency,
            revoking_an_id_touches_only_unused_tokens_with_exactly_that_id,
            entries_list_by_parent_refuse_duplicates_and_delete_with_their_indexes,
            nodes_are_replaced_on_reattestation_and_updated_atomically,
            a_ban_holds_by_node_and_by_credential_until_lifted,
            an_issuance_is_written_whole_or_not_at_all,
            a_renewal_after_a_revocation_writes_nothing_and_the_revocation_stands,
            a_certificate_renews_once_and_its_renewal_joins_its_lineage,
            revoking_any_member_ends_the_whole_lineage,
            a_revocation_racing_a_renewal_is_never_overwritten,
        );
    };
}
pub(crate) use suite;

pub(crate) fn record(serial: &Serial, label: &str, not_after: i64) -> CertificateRecord {
    CertificateRecord {
        serial: *serial,
        subject: format!("dev-{not_after}"),
        sans: vec![],
        label: label.into(),
        owner: "test".into(),
        issued_at: 0,
        not_after,
        status: Status::Valid,
        renews: None,
        der: Vec::new(),
    }
}

/// Fills `store` with `count` certificates: one a day from day 1 (several on the same
/// second, to test ties), every third labelled `plc`.
fn fill(store: &Store, count: i64) {
    for i in 0..count {
        let serial = Serial::random();
        let label = if i % 3 == 0 { "plc" } else { "device" };
        let rec = record(&serial, label, 1_000_000 + (i / 2) * 86_400);
        assert!(store
            .certificates
            .record_new(&serial, &rec)
            .expect("record"));
    }
}

pub(crate) async fn a_serial_is_recorded_once_and_never_overwritten(store: &Store) {
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

pub(crate) async fn expiring_within_counts_exactly_the_window(store: &Store) {
    fill(store, 200);
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

/// For each status: how many certificates the status filter finds, and how many of all
/// rows read that way from their records.
pub(crate) fn status_counts(
    certificates: &dyn CertificateStore,
    now: i64,
) -> Vec<(Status, usize, usize)> {
    let all = certificates
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
        let filtered = certificates
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

pub(crate) async fn status_counts_from_the_index_follow_revocations_and_renewals(store: &Store) {
    fill(store, 120);
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
    let serials: Vec<Serial> = rows.certificates.iter().map(|r| r.serial).collect();
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
    let counts = status_counts(store.certificates.as_ref(), now);
    for (status, filtered, read) in &counts {
        assert_eq!(filtered, read, "{status:?}: {counts:?}");
    }
    assert!(counts.iter().all(|(_, n, _)| *n > 0), "{counts:?}");
    assert_eq!(counts.iter().map(|(_, n, _)| n).sum::<usize>(), 120);
}

pub(crate) async fn paging_never_skips_or_repeats_a_row(store: &Store) {
    fill(store, 257);
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
                assert!(seen.insert(row.serial), "repeated {}", row.serial);
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

pub(crate) async fn audit_records_chain_by_hash(store: &Store) {
    for i in 0..4 {
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
    let records = store.audit.tail(10).expect("tail");
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for pair in records.windows(2) {
        assert_eq!(pair[1].prev, pair[0].hash);
    }
    assert_eq!(
        store.audit.page(Some(3), 10).expect("page").len(),
        2,
        "records below 3"
    );
    let verified = store.audit.verify().expect("verify");
    assert_eq!((verified.records, verified.problem), (4, None));
}

pub(super) fn token(secret: &str) -> TokenRecord {
    TokenRecord {
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
    }
}

pub(crate) async fn a_token_is_consumed_once_under_concurrency(store: &Store) {
    let secret = "s3cret";
    store.tokens.insert(&token(secret)).expect("insert");
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

fn token_with(hash: &str, id_len: usize, kind: TokenKind) -> TokenRecord {
    TokenRecord {
        id: hash[..id_len].to_owned(),
        kind,
        hash: hash.to_owned(),
        ..token("")
    }
}

pub(crate) async fn revoking_an_id_touches_only_unused_tokens_with_exactly_that_id(store: &Store) {
    let tokens = &store.tokens;
    // An enrollment token and a join token whose longer id starts with the same 8 digits.
    let enrollment = token_with(
        &format!("3fa9c2d1{}", "00".repeat(28)),
        8,
        TokenKind::Enrollment,
    );
    let join = token_with(&format!("3fa9c2d1{}", "11".repeat(28)), 32, TokenKind::Join);
    tokens.insert(&enrollment).expect("insert");
    tokens.insert(&join).expect("insert");
    assert_eq!(tokens.list().expect("list").len(), 2);

    let revoked = tokens.revoke("3fa9c2d1", 7).expect("revoke");
    assert!(
        matches!(revoked.as_slice(), [TokenRevocation::Revoked(r)] if r.id == "3fa9c2d1" && r.revoked_at == Some(7)),
        "{revoked:?}"
    );
    assert!(matches!(
        tokens.revoke("3fa9c2d1", 8).expect("again").as_slice(),
        [TokenRevocation::AlreadyRevoked(_)]
    ));
    let digest: [u8; 32] = hex::decode(&enrollment.hash)
        .expect("hex")
        .try_into()
        .expect("32 bytes");
    assert!(matches!(
        tokens.consume_hash(&digest, 9).expect("consume"),
        Consumed::Revoked(_)
    ));
    assert_eq!(
        tokens
            .list()
            .expect("list")
            .iter()
            .map(|t| t.state(9))
            .collect::<Vec<_>>(),
        vec![TokenState::Revoked, TokenState::Unused],
        "the join token sharing the prefix is untouched"
    );
    assert!(tokens.revoke("not-hex", 9).expect("revoke").is_empty());
    assert!(tokens.revoke("0badc0de", 9).expect("revoke").is_empty());
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

pub(crate) async fn entries_list_by_parent_refuse_duplicates_and_delete_with_their_indexes(
    store: &Store,
) {
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

pub(super) fn node(id: &str, attested_with: Option<AttestedWith>) -> NodeRecord {
    NodeRecord {
        spiffe_id: id.into(),
        method: "x509pop".into(),
        attested_at: 1,
        svid_serial: "01".into(),
        svid_not_after: 100,
        evicted: false,
        can_reattest: true,
        attested_with,
        released: false,
        banned: false,
    }
}

pub(crate) async fn nodes_are_replaced_on_reattestation_and_updated_atomically(store: &Store) {
    let id = "spiffe://plant.test/agent/x509pop/gw-1";
    let node = node(id, None);
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

fn bound_node(id: &str, lineage: &str) -> NodeRecord {
    node(
        id,
        Some(AttestedWith {
            lineage: lineage.into(),
            certificate_serial: Some("0a".into()),
            key_sha256: Some(format!("key-of-{lineage}")),
        }),
    )
}

pub(crate) async fn a_ban_holds_by_node_and_by_credential_until_lifted(store: &Store) {
    let nodes = &store.nodes;
    let id = "spiffe://plant.test/agent/x509pop/gw-1";
    let first = bound_node(id, "certificate:01");
    assert_eq!(
        nodes.record_attestation(None, &first).expect("record"),
        Recorded::Done
    );
    // A stale read loses: nothing is overwritten.
    assert_eq!(
        nodes.record_attestation(None, &first).expect("record"),
        Recorded::Changed
    );
    let before = nodes.ban(id, false).expect("ban").expect("known");
    assert!(!before.banned);
    let banned = nodes.get(id).expect("get").expect("known");
    assert!(banned.banned && banned.evicted && !banned.released);
    // The same node again, even read after the ban: refused.
    assert_eq!(
        nodes.record_attestation(Some(&banned), &first).expect("r"),
        Recorded::Banned(id.into())
    );
    // Another node id with the banned device's lineage: refused, naming the banned node.
    let other = bound_node("spiffe://plant.test/agent/x509pop/gw-2", "certificate:01");
    assert_eq!(
        nodes.record_attestation(None, &other).expect("r"),
        Recorded::Banned(id.into())
    );
    let with = first.attested_with.clone().expect("with");
    assert_eq!(
        nodes.banned_credential(&with).expect("b"),
        Some(id.to_owned())
    );
    nodes.unban(id).expect("unban").expect("known");
    assert_eq!(nodes.banned_credential(&with).expect("b"), None);
    let unbanned = nodes.get(id).expect("get").expect("known");
    assert!(!unbanned.banned && unbanned.evicted);
    assert_eq!(
        nodes
            .record_attestation(Some(&unbanned), &first)
            .expect("r"),
        Recorded::Done
    );
}

/// An issuance spending the one-time token `secret` (stored first by
/// [`an_issuance_is_written_whole_or_not_at_all`]).
fn issue(store: &Store, serial: &Serial, digest: &[u8; 32]) -> Issued {
    let rec = record(serial, "device", 1_000);
    store
        .record_issuance(Issuance {
            serial,
            record: &rec,
            renews: None,
            token: Some(digest),
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
        .expect("issuance")
}

/// Leaves one recorded issuance (its serial returned) and one refused, for backends to
/// check what survives a reopen.
pub(crate) async fn an_issuance_is_written_whole_or_not_at_all(store: &Store) -> Serial {
    let secret = "one-time";
    store.tokens.insert(&token(secret)).expect("insert");
    let digest = tokens_hash(secret);
    let first = Serial::random();
    assert!(matches!(issue(store, &first, &digest), Issued::Recorded));
    let second = Serial::random();
    assert!(matches!(
        issue(store, &second, &digest),
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
    first
}

fn lineage_record(serial: &Serial) -> CertificateRecord {
    CertificateRecord {
        subject: "gw-1".into(),
        ..record(serial, "device", 1_000)
    }
}

fn first(store: &Store) -> Serial {
    let serial = Serial::random();
    assert!(store
        .certificates
        .record_new(&serial, &lineage_record(&serial))
        .expect("record"));
    serial
}

fn renew(store: &Store, old: &Serial) -> (Serial, Renewal) {
    let serial = Serial::random();
    let renewal = store
        .certificates
        .record_renewal(&serial, &lineage_record(&serial), old)
        .expect("renewal");
    (serial, renewal)
}

fn status(store: &Store, serial: &Serial) -> Option<Status> {
    store
        .certificates
        .get(serial)
        .expect("get")
        .map(|r| r.status)
}

pub(crate) async fn a_renewal_after_a_revocation_writes_nothing_and_the_revocation_stands(
    store: &Store,
) {
    let a = first(store);
    store.certificates.revoke(&a, 5, 1).expect("revoke");
    let (b, renewal) = renew(store, &a);
    assert!(
        matches!(
            renewal,
            Renewal::PredecessorNotCurrent {
                status: Some(Status::Revoked),
                ended: Some(_)
            }
        ),
        "{renewal:?}"
    );
    assert_eq!(status(store, &b), None, "no successor record");
    assert_eq!(status(store, &a), Some(Status::Revoked));
    assert_eq!(
        store.certificates.lineage(&a).expect("lineage").successor,
        None
    );
    assert_eq!(
        store
            .certificates
            .query(&InventoryQuery::default(), 0)
            .expect("q")
            .total,
        Some(1)
    );
}

pub(crate) async fn a_certificate_renews_once_and_its_renewal_joins_its_lineage(store: &Store) {
    let a = first(store);
    let legacy = store.certificates.lineage(&a).expect("lineage");
    assert_eq!(
        (legacy.root, legacy.successor, legacy.ended),
        (a, None, None)
    );
    let (b, renewal) = renew(store, &a);
    assert_eq!(renewal, Renewal::Recorded);
    assert_eq!(status(store, &a), Some(Status::Superseded));
    assert_eq!(
        store.certificates.lineage(&a).expect("a").successor,
        Some(b)
    );
    assert_eq!(store.certificates.lineage(&b).expect("b").root, a);
    // A second renewal of A (a concurrent request that lost) writes nothing.
    let (c, renewal) = renew(store, &a);
    assert!(
        matches!(
            renewal,
            Renewal::PredecessorNotCurrent {
                status: Some(Status::Superseded),
                ended: None
            }
        ),
        "{renewal:?}"
    );
    assert_eq!(status(store, &c), None);
    assert_eq!(
        store.certificates.lineage(&a).expect("a").successor,
        Some(b)
    );
}

pub(crate) async fn revoking_any_member_ends_the_whole_lineage(store: &Store) {
    let a = first(store);
    let (b, _) = renew(store, &a);
    let (c, renewal) = renew(store, &b);
    assert_eq!(renewal, Renewal::Recorded);
    assert_eq!(
        store.certificates.lineage(&c).expect("c").root,
        a,
        "the root is the first"
    );
    // The oldest, long superseded, is revoked: the current one renews no more.
    store.certificates.revoke(&a, 7, 4).expect("revoke");
    let end = store
        .certificates
        .lineage(&c)
        .expect("c")
        .ended
        .expect("ended");
    assert_eq!((end.revoked, end.at), (a.to_string(), 7));
    let (d, renewal) = renew(store, &c);
    assert!(
        matches!(
            renewal,
            Renewal::PredecessorNotCurrent {
                status: Some(Status::Valid),
                ended: Some(_)
            }
        ),
        "{renewal:?}"
    );
    assert_eq!(status(store, &d), None);
    assert_eq!(status(store, &c), Some(Status::Valid), "not superseded");
    // Another lineage is untouched.
    let other = first(store);
    assert_eq!(renew(store, &other).1, Renewal::Recorded);
}

pub(crate) async fn a_revocation_racing_a_renewal_is_never_overwritten(store: &Store) {
    let certificates = &store.certificates;
    for _ in 0..200 {
        let a = first(store);
        let successor = Serial::random();
        std::thread::scope(|scope| {
            let revoking = scope.spawn(|| certificates.revoke(&a, 9, 1).expect("revoke"));
            let renewing = scope.spawn(|| {
                certificates
                    .record_renewal(&successor, &lineage_record(&successor), &a)
                    .expect("renewal")
            });
            revoking.join().expect("revoking thread");
            renewing.join().expect("renewing thread");
        });
        assert_eq!(status(store, &a), Some(Status::Revoked));
        assert!(certificates
            .revocations(0)
            .expect("crl")
            .iter()
            .any(|r| r.serial == a.to_string()));
        // Whichever came first, the lineage ended: a successor that won the race renews
        // no more.
        assert!(certificates.lineage(&a).expect("lineage").ended.is_some());
        if status(store, &successor).is_some() {
            assert!(certificates
                .lineage(&successor)
                .expect("lineage")
                .ended
                .is_some());
        }
    }
}
