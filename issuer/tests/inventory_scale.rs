//! The inventory over 30,000 certificates with known expiries: every query gives exactly the
//! expected rows, and paging through them (30 pages and more) never skips or repeats one.
//! Correctness needs many pages, not a million rows: the 1,000,000-certificate figures come
//! from `scripts/bench inventory`, in release, where they can be measured.

use std::collections::HashSet;

use issuer::serial::Serial;
use issuer::store::{CertificateRecord, InventoryQuery, Status, Store};

const COUNT: i64 = 30_000;
const NOW: i64 = 1_900_000_000;
const DAY: i64 = 86_400;

/// Which certificate indices a query must return.
type Expected = Box<dyn Fn(i64) -> bool>;

fn label(i: i64) -> &'static str {
    ["device", "plc", "server"][(i % 3) as usize]
}

/// Certificate i expires i*123 seconds after NOW - 10 days: some expired, the rest spread
/// over ~33 days, so the 30-day window cuts through them.
fn not_after(i: i64) -> i64 {
    NOW - 10 * DAY + i * 123
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_over_30k_certificates_are_exact_and_paging_is_gapless() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    for i in 0..COUNT {
        let serial = Serial::random();
        let record = CertificateRecord {
            serial,
            subject: format!("dev-{i}"),
            sans: vec![],
            label: label(i).into(),
            owner: format!("token:{:08x}", i % 97),
            issued_at: NOW - 20 * DAY,
            not_after: not_after(i),
            status: if i % 1000 == 0 {
                Status::Revoked
            } else {
                Status::Valid
            },
            renews: None,
            der: Vec::new(),
        };
        assert!(store
            .certificates
            .record_new(&serial, &record)
            .expect("record"));
    }
    store.durability.commit().await.expect("commit");

    let within_30d = |i: i64| not_after(i) > NOW && not_after(i) <= NOW + 30 * DAY;
    let cases: Vec<(InventoryQuery, Expected)> = vec![
        (InventoryQuery::default(), Box::new(|_| true)),
        (
            InventoryQuery {
                expiring_within_secs: Some(30 * DAY as u64),
                ..Default::default()
            },
            Box::new(within_30d),
        ),
        (
            InventoryQuery {
                expiring_within_secs: Some(30 * DAY as u64),
                label: Some("plc".into()),
                ..Default::default()
            },
            Box::new(move |i| within_30d(i) && label(i) == "plc"),
        ),
        (
            InventoryQuery {
                status: Some(Status::Expired),
                ..Default::default()
            },
            Box::new(|i| i % 1000 != 0 && not_after(i) <= NOW),
        ),
        (
            InventoryQuery {
                status: Some(Status::Revoked),
                ..Default::default()
            },
            Box::new(|i| i % 1000 == 0),
        ),
        (
            InventoryQuery {
                owner: Some("token:00000005".into()),
                ..Default::default()
            },
            Box::new(|i| i % 97 == 5),
        ),
    ];
    for (query, expected) in cases {
        let want: HashSet<String> = (0..COUNT)
            .filter(|i| expected(*i))
            .map(|i| format!("dev-{i}"))
            .collect();
        let mut got = HashSet::new();
        let mut paged = InventoryQuery {
            limit: Some(997),
            ..query.clone()
        };
        let mut last = i64::MIN;
        let mut pages = 0;
        loop {
            let page = store.certificates.query(&paged, NOW).expect("query");
            assert_eq!(page.total, Some(want.len()), "{query:?}");
            for row in &page.certificates {
                assert!(
                    got.insert(row.subject.clone()),
                    "{query:?}: {} repeated",
                    row.subject
                );
                assert!(row.not_after >= last, "rows out of expiry order");
                last = row.not_after;
            }
            pages += 1;
            match page.next {
                Some(next) => paged.after = Some(next),
                None => break,
            }
        }
        assert_eq!(got, want, "{query:?} after {pages} pages");

        // Pages without counting (a dashboard's) give the same rows in the same order.
        let mut uncounted = InventoryQuery {
            limit: Some(997),
            skip_total: true,
            ..query.clone()
        };
        let mut again = HashSet::new();
        loop {
            let page = store.certificates.query(&uncounted, NOW).expect("query");
            assert_eq!(page.total, None);
            for row in &page.certificates {
                assert!(
                    again.insert(row.subject.clone()),
                    "repeated without counting"
                );
            }
            match page.next {
                Some(next) => uncounted.after = Some(next),
                None => break,
            }
        }
        assert_eq!(again, want, "{query:?} without counting");
    }
}
