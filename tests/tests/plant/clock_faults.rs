//! Clock faults (issue 7): issuer and agent run under libfaketime (Debian's `faketime`), so their
//! clocks really are shifted while curl, openssl and the test keep the machine's.
//! - an issuer minutes ahead of or behind its clients still issues certificates the clients
//!   accept at once (notBefore is back-dated by `[issuance] backdate`, 5 minutes);
//! - an issuer whose clock is outside the issuing CA's validity refuses to issue, says why,
//!   and spends nothing (the token still works once the clock is right);
//! - an agent whose wall clock jumps hours ahead says so and backs off instead of
//!   re-attesting and re-minting in a loop, and recovers once the clock is right.

use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use plant_tests::{
    enroll_bearer, enroll_with_curl, enroll_with_token, libfaketime, openssl_csr, own_uid,
    verify_chain, Agent, Issuer,
};

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The inventory's issued_at (unix seconds, the issuer's clock) of `subject`'s certificate.
fn issued_at(issuer: &Issuer, subject: &str) -> Result<i64> {
    let rows = issuer.inventory(&["--subject", subject])?;
    let row = rows.first().context("no inventory row")?;
    row["issued_at"].as_i64().context("issued_at")
}

#[test]
fn an_issuer_minutes_ahead_or_behind_its_clients_issues_certificates_they_accept() -> Result<()> {
    let mut issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    for (offset, seconds) in [("+4m", 240i64), ("-4m", -240)] {
        issuer.serve_shifted(offset)?;
        let subject = format!("skew{}", if seconds > 0 { "ahead" } else { "behind" });
        let token = issuer.token("device", Some(&subject))?;
        let auth = format!("Authorization: Bearer {token}");
        let (cert, _key) =
            enroll_with_curl(&issuer, dir.path(), &subject, "device", &["-H", &auth])?;
        // The issuer's clock really was shifted: it recorded its own time.
        let skew = issued_at(&issuer, &subject)? - unix_now();
        ensure!(
            (skew - seconds).abs() < 60,
            "issuer {offset}: recorded issued_at {skew} s from the test's clock"
        );
        // openssl checks validity against this machine's (unshifted) clock.
        verify_chain(&issuer, &cert)
            .with_context(|| format!("a client accepting a certificate from an issuer {offset}"))?;
    }
    Ok(())
}

#[test]
fn an_issuer_clock_outside_the_ca_validity_refuses_to_issue_and_spends_nothing() -> Result<()> {
    let mut issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("wrongclock"))?;
    let auth = format!("Authorization: Bearer {token}");
    let (_key, csr) = openssl_csr(dir.path(), "wrongclock", "wrongclock", &[])?;
    let enroll = |issuer: &Issuer| enroll_bearer(issuer, &csr, "device", &token);
    // Far past the issuing CA's notAfter, and before its notBefore (a dead RTC battery).
    for (offset, says) in [
        ("+60y", "after the issuing CA expired"),
        ("-3y", "before the issuing CA's validity starts"),
    ] {
        issuer.serve_shifted(offset)?;
        let answer = enroll(&issuer)?;
        ensure!(
            answer.status == 503,
            "issuer {offset}: {} {}",
            answer.status,
            answer.text()
        );
        ensure!(
            answer.text().contains(says) && answer.text().contains("clock"),
            "issuer {offset}: the refusal should say what is wrong: {}",
            answer.text()
        );
        ensure!(answer.header("Retry-After").is_some(), "no Retry-After");
    }
    // The clock set right: the same token enrolls, so the refusals spent nothing.
    issuer.serve_with_env(&[])?;
    let (cert, _key) =
        enroll_with_curl(&issuer, dir.path(), "wrongclock", "device", &["-H", &auth])?;
    verify_chain(&issuer, &cert)?;
    Ok(())
}

/// Certificates in the inventory whose SPIFFE ID starts with `prefix`.
fn issued_under(issuer: &Issuer, prefix: &str) -> Result<usize> {
    Ok(issuer.inventory(&["--spiffe-prefix", prefix])?.len())
}

#[test]
fn an_agent_whose_clock_jumps_hours_ahead_backs_off_instead_of_looping_and_recovers() -> Result<()>
{
    const WORKLOAD: &str = "spiffe://plant.example/clock/historian";
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    // x509pop: the node can attest again by itself, so a lapsed node SVID would send a naive
    // agent straight back to the issuer.
    let (cert, key) = enroll_with_token(&issuer, dir.path(), "gateway-clock", "device")?;
    let attestation = format!(
        "method = \"x509pop\"\ncertificate = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let mut agent = Agent::start_with_config(&issuer, &attestation, &[], "")?;
    let node = agent.node_id()?;
    issuer.create_entry(
        WORKLOAD,
        &node,
        &[&format!("unix:uid:{}", own_uid()?)],
        &["--ttl", "30s"],
    )?;
    agent.wait_for_svid(WORKLOAD)?;

    // The same agent under libfaketime, its offset read from a file it re-reads every second;
    // CLOCK_MONOTONIC stays real, as it does when a wall clock jumps.
    let offset_file = dir.path().join("faketime");
    std::fs::write(&offset_file, "+0\n")?;
    let preload = libfaketime()?;
    let offset_path = offset_file.to_string_lossy().into_owned();
    agent.restart_with_env(&[
        ("LD_PRELOAD", preload.as_str()),
        ("FAKETIME_TIMESTAMP_FILE", offset_path.as_str()),
        ("FAKETIME_CACHE_DURATION", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ])?;
    agent.wait_for_svid(WORKLOAD)?;

    let nodes_before = issued_under(&issuer, &node)?;
    let workload_before = issued_under(&issuer, WORKLOAD)?;
    // Two hours ahead: the 1 h node SVID and every 30 s SVID the issuer makes look expired
    // on arrival.
    std::fs::write(&offset_file, "+2h\n")?;
    std::thread::sleep(std::time::Duration::from_secs(8));
    let node_svids = issued_under(&issuer, &node)? - nodes_before;
    let workload_svids = issued_under(&issuer, WORKLOAD)? - workload_before;
    ensure!(
        agent.log().contains("ahead of the issuer's"),
        "the agent should say its clock is ahead:\n{}",
        agent.log()
    );
    // Backoff from 0.5 s doubling allows about five attempts in 8 s; a loop makes hundreds.
    ensure!(
        (1..=8).contains(&node_svids),
        "{node_svids} node SVIDs issued in 8 s of clock skew"
    );
    ensure!(
        workload_svids <= 8,
        "{workload_svids} workload SVIDs issued in 8 s of clock skew"
    );

    // The clock set right again: the agent serves a valid SVID by itself.
    std::fs::write(&offset_file, "+0\n")?;
    agent.wait_for_svid(WORKLOAD)?;
    eprintln!(
        "clock jump +2h for 8 s: {node_svids} node SVIDs and {workload_svids} workload SVIDs \
         fetched, then recovered"
    );
    Ok(())
}
