//! `scripts/bench inventory`: a store with N certificates (default 1,000,000), then the
//! operator's questions timed: "expiring within 30 days" first page of 100, its full count,
//! the whole inventory count, and CRL-sized revocation scans. Prints figures; asserts none.
//!
//!   cargo run --release -p issuer --example inventory_bench -- [N]

use std::time::Instant;

use issuer::serial::Serial;
use issuer::store::{CertificateRecord, InventoryQuery, Status, Store};

const DAY: i64 = 86_400;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let count: i64 = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let store = Store::open(dir.path())?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let started = Instant::now();
    for i in 0..count {
        let serial = Serial::random();
        // Expiries spread evenly over the next two years; 1 in 1,000 revoked.
        let record = CertificateRecord {
            serial,
            subject: format!("dev-{i}"),
            sans: vec![format!("dns:dev-{i}.plant.example")],
            label: ["device", "plc", "server"][(i % 3) as usize].into(),
            owner: format!("token:{:08x}", i),
            issued_at: now,
            not_after: now + (i * 730 * DAY) / count + 60,
            status: Status::Valid,
            renews: None,
            der: Vec::new(),
        };
        store.certificates.record_new(&serial, &record)?;
        if i % 1000 == 0 {
            store.certificates.revoke(&serial, now, 1)?;
        }
        if i % 100_000 == 99_999 {
            store.durability.commit().await?;
            eprintln!(
                "  filled {} certificates ({:.0} s)",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    store.durability.commit().await?;
    let fill = started.elapsed();

    let time = |what: &str,
                budget: &str,
                f: &mut dyn FnMut() -> anyhow::Result<String>|
     -> anyhow::Result<()> {
        // Warm once, then take the best of five: the figure is the query, not a cold page cache.
        f()?;
        let mut best = f64::MAX;
        let mut detail = String::new();
        for _ in 0..5 {
            let t = Instant::now();
            detail = f()?;
            best = best.min(t.elapsed().as_secs_f64() * 1000.0);
        }
        println!("{what:<44} {best:>10.2} ms   {budget:<10} {detail}");
        Ok(())
    };
    println!(
        "\ninventory over {count} certificates (filled in {:.1} s)",
        fill.as_secs_f64()
    );
    println!(
        "{:<44} {:>13}   {:<10} result",
        "query", "best of 5", "budget"
    );
    let thirty_days = InventoryQuery {
        expiring_within_secs: Some(30 * DAY as u64),
        limit: Some(100),
        ..Default::default()
    };
    // A dashboard's first page: rows only, no full count.
    let first_page = InventoryQuery {
        skip_total: true,
        ..thirty_days.clone()
    };
    time(
        "expiring within 30 d: first page of 100",
        "< 10 ms",
        &mut || {
            let page = store.certificates.query(&first_page, now)?;
            Ok(format!(
                "{} rows, more: {}",
                page.certificates.len(),
                page.next.is_some()
            ))
        },
    )?;
    time("expiring within 30 d: full count", "< 1 s", &mut || {
        Ok(format!(
            "{} certificates",
            store
                .certificates
                .query(&thirty_days, now)?
                .total
                .unwrap_or_default()
        ))
    })?;
    time("whole inventory: full count", "", &mut || {
        Ok(format!(
            "{} certificates",
            store
                .certificates
                .query(&InventoryQuery::default(), now)?
                .total
                .unwrap_or_default()
        ))
    })?;
    // What the metrics gauges ask every few seconds (the status comes from the index).
    time("valid, expiring within 30 d: full count", "", &mut || {
        Ok(format!(
            "{} certificates",
            store
                .certificates
                .query(
                    &InventoryQuery {
                        status: Some(Status::Valid),
                        ..thirty_days.clone()
                    },
                    now
                )?
                .total
                .unwrap_or_default()
        ))
    })?;
    time("revoked (CRL input): scan", "", &mut || {
        Ok(format!(
            "{} revocations",
            store.certificates.revocations(now)?.len()
        ))
    })?;
    // The whole CRL as `publish_crl` makes it: scan, build, sign (software P-256 key).
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::CrlSign];
    let ca = rcgen::Issuer::new(ca, rcgen::KeyPair::generate()?);
    time("CRL generation: scan, build and sign", "", &mut || {
        let at = time::OffsetDateTime::from_unix_timestamp(now)?;
        let revocations = store.certificates.revocations(now)?;
        let params = issuer::crl::crl_params(&revocations, 1, at, at + time::Duration::days(7))?;
        let crl = params.signed_by(&ca)?;
        Ok(format!(
            "{} entries, {} bytes",
            revocations.len(),
            crl.der().len()
        ))
    })?;
    Ok(())
}
