//! Node identity against real `issuer serve` and `agent run` processes: an x509pop node is
//! bound to the certificate lineage it first attested with, so another enrollment's
//! certificate with the same commonName can't take it over; operator certificates never
//! attest; revoking the device certificate evicts its node; a ban keeps a node (join token,
//! x509pop, TPM) out across re-attestation until it is lifted.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use plant_tests::swtpm::Swtpm;
use plant_tests::{
    enroll_with_curl, enroll_with_token, own_uid, run, run_ok, serial_hex, Agent, Issuer,
};

const HISTORIAN: &str = "spiffe://plant.example/historian";
const OPCUA: &str = "spiffe://plant.example/opcua";
const GW1: &str = "spiffe://plant.example/agent/x509pop/gw-1";

/// The agent's `[attestation]` body for a device certificate and its key.
fn x509pop(cert: &Path, key: &Path) -> String {
    format!(
        "method = \"x509pop\"\ncertificate = \"{}\"\nkey = \"{}\"\n",
        cert.display(),
        key.display()
    )
}

/// An agent that must not attest: the error it stopped with (it exits when its first
/// attestation is refused), or a failure naming the node it attested as.
fn refused_agent(issuer: &Issuer, attestation: &str) -> Result<String> {
    match Agent::start(issuer, attestation, &[]) {
        Err(e) => Ok(format!("{e:#}")),
        Ok(mut agent) => match agent.node_id() {
            Err(e) => Ok(format!("{e:#}")),
            Ok(node) => anyhow::bail!("the agent attested as {node}:\n{}", agent.log()),
        },
    }
}

/// `issuer agent list` as JSON: the row of `spiffe_id`.
fn agent_row(issuer: &Issuer, spiffe_id: &str) -> Result<serde_json::Value> {
    let out = run_ok(issuer.cli().args(["agent", "list", "--format", "json"]))?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    rows.into_iter()
        .find(|r| r["spiffe_id"] == spiffe_id)
        .with_context(|| format!("{spiffe_id} is not in `issuer agent list`:\n{out}"))
}

/// The audit log's last records, as text.
fn audit(issuer: &Issuer) -> Result<String> {
    run_ok(issuer.cli().args(["audit", "tail", "--count", "500"]))
}

/// Valid node SVIDs of `node` in the inventory.
fn valid_node_svids(issuer: &Issuer, node: &str) -> Result<usize> {
    Ok(issuer
        .inventory(&["--spiffe-prefix", node, "--status", "valid"])?
        .len())
}

/// A device certificate and key, enrolled in its own folder.
fn enrolled(
    issuer: &Issuer,
    dir: &Path,
    subject: &str,
    label: &str,
    bound: bool,
) -> Result<(PathBuf, PathBuf)> {
    if bound {
        return enroll_with_token(issuer, dir, subject, label);
    }
    let token = issuer.token(label, None)?;
    let auth = format!("Authorization: Bearer {token}");
    enroll_with_curl(issuer, dir, subject, label, &["-H", &auth])
}

#[test]
fn a_second_valid_certificate_for_a_subject_is_refused_in_its_label_until_the_first_is_revoked(
) -> Result<()> {
    let issuer = Issuer::start()?;
    let real_dir = tempfile::tempdir()?;
    let (cert, _) = enrolled(&issuer, real_dir.path(), "gw-1", "device", true)?;

    // An unbound token of the same label names itself gw-1: refused, and the token is kept.
    let token = issuer.token("device", None)?;
    let auth = format!("Authorization: Bearer {token}");
    let attacker_dir = tempfile::tempdir()?;
    let refused = enroll_with_curl(
        &issuer,
        attacker_dir.path(),
        "gw-1",
        "device",
        &["-H", &auth],
    )
    .err()
    .context("a second valid certificate for gw-1 was issued in label device")?;
    let text = format!("{refused:#}");
    ensure!(
        text.contains("403") && text.contains("already holds subject CN=gw-1"),
        "{text}"
    );
    ensure!(
        text.contains(&serial_hex(&cert)?.to_lowercase())
            || text.contains(&serial_hex(&cert)?.to_uppercase()),
        "the refusal does not name the certificate holding gw-1: {text}"
    );
    // A shared subject elsewhere is not this rule: another name with the same token works.
    enroll_with_curl(
        &issuer,
        attacker_dir.path(),
        "gw-2",
        "device",
        &["-H", &auth],
    )?;

    // Once the operator revokes the first certificate, gw-1 can be enrolled again.
    issuer.revoke(&cert)?;
    let again = tempfile::tempdir()?;
    enrolled(&issuer, again.path(), "gw-1", "device", true)?;
    Ok(())
}

#[test]
fn a_certificate_of_another_enrollment_with_the_same_name_cannot_take_a_node_over() -> Result<()> {
    let issuer = Issuer::start()?;
    let uid = format!("unix:uid:{}", own_uid()?);
    // The real gateway, commissioned with a token bound to its name.
    let real_dir = tempfile::tempdir()?;
    let (cert, key) = enrolled(&issuer, real_dir.path(), "gw-1", "device", true)?;
    let mut gateway = Agent::start(&issuer, &x509pop(&cert, &key), &[])?;
    assert_eq!(gateway.node_id()?, GW1);
    issuer.create_entry(HISTORIAN, GW1, &[&uid], &["--ttl", "1m"])?;
    gateway.wait_for_svid(HISTORIAN)?;

    // The attacker holds an unbound token of another label and names itself gw-1.
    let attacker_dir = tempfile::tempdir()?;
    let (forged, forged_key) = enrolled(&issuer, attacker_dir.path(), "gw-1", "plc", false)?;
    let refused = refused_agent(&issuer, &x509pop(&forged, &forged_key))?;
    ensure!(
        refused.contains("is bound to the device certificate") && refused.contains(GW1),
        "{refused}"
    );
    let audit = audit(&issuer)?;
    ensure!(audit.contains("node_conflict"), "{audit}");

    // The real gateway keeps its node and gets new SVIDs.
    let row = agent_row(&issuer, GW1)?;
    assert_eq!(row["evicted"], false, "{row}");
    assert_eq!(
        row["certificate_serial"].as_str(),
        Some(serial_hex(&cert)?.as_str()),
        "{row}"
    );
    issuer.create_entry(OPCUA, GW1, &[&uid], &["--ttl", "1m"])?;
    gateway.wait_for_svid(OPCUA)?;

    // Once the operator evicts the node (a re-commissioned device), the new certificate may
    // attest as it: eviction releases the binding.
    gateway.stop()?;
    run_ok(issuer.cli().args(["agent", "evict", GW1]))?;
    let mut replacement = Agent::start(&issuer, &x509pop(&forged, &forged_key), &[])?;
    assert_eq!(replacement.node_id()?, GW1);
    Ok(())
}

#[test]
fn an_operator_certificate_does_not_attest_and_cannot_be_configured_to() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = enrolled(&issuer, dir.path(), "ops-1", "operator", true)?;
    let refused = refused_agent(&issuer, &x509pop(&cert, &key))?;
    ensure!(
        refused.contains("certificates of label operator can't attest nodes"),
        "{refused}"
    );

    // An issuer configured to take operator certificates for x509pop does not start.
    let text = std::fs::read_to_string(issuer.config())?;
    let edited = text.replacen(
        "[agent_api]\n",
        "[agent_api]\nx509pop_labels = [\"device\", \"operator\"]\n",
        1,
    );
    ensure!(edited != text, "no [agent_api] table in issuer.toml");
    let config = issuer.dir.path().join("operator-x509pop.toml");
    std::fs::write(&config, edited)?;
    let out = run(Command::new(plant_tests::bin("issuer"))
        .args(["agent", "list", "--config"])
        .arg(&config))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "the config was accepted");
    ensure!(
        stderr.contains("x509pop_labels: operator is an operator profile"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn revoking_the_device_certificate_evicts_its_node_and_ends_its_node_svid_renewal() -> Result<()> {
    // 20 s node SVIDs: renewed every ~10 s while the node is in good standing.
    let issuer = Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?;
        std::fs::write(
            toml,
            text.replacen("node_svid_ttl = \"1h\"", "node_svid_ttl = \"20s\"", 1),
        )?;
        Ok(())
    })?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = enrolled(&issuer, dir.path(), "gw-1", "device", true)?;
    let mut gateway = Agent::start(&issuer, &x509pop(&cert, &key), &[])?;
    assert_eq!(gateway.node_id()?, GW1);
    ensure!(valid_node_svids(&issuer, GW1)? >= 1);

    issuer.revoke(&cert)?;
    // Evicted at once, by the revocation itself.
    let row = agent_row(&issuer, GW1)?;
    assert_eq!(row["evicted"], true, "{row}");
    ensure!(audit(&issuer)?.contains("device_certificate_revoked"));
    // The agent's next sync is refused, its re-attestation too (the certificate is
    // revoked), and its node SVID is never renewed again.
    wait_long(&gateway, "refused after the revocation", |(_, error)| {
        error.as_deref().is_some_and(|e| e.contains("revoked"))
    })?;
    assert_eq!(valid_node_svids(&issuer, GW1)?, 0);
    let row = agent_row(&issuer, GW1)?;
    assert_eq!(row["evicted"], true, "{row}");
    Ok(())
}

#[test]
fn a_banned_node_stays_out_across_reattestation_until_unbanned() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = enrolled(&issuer, dir.path(), "gw-1", "device", true)?;
    let gateway = {
        let mut agent = Agent::start(&issuer, &x509pop(&cert, &key), &[])?;
        assert_eq!(agent.node_id()?, GW1);
        agent
    };
    let (first, _) = gateway.node_status()?;

    // Evicted alone, an x509pop agent is back within seconds by attesting again; banned, it
    // stays out however often it retries.
    run_ok(issuer.cli().args(["agent", "evict", "--ban", GW1]))?;
    wait_long(&gateway, "refused as banned", |(_, error)| {
        error.as_deref().is_some_and(|e| e.contains("banned"))
    })?;
    let row = agent_row(&issuer, GW1)?;
    assert_eq!(
        (&row["banned"], &row["evicted"]),
        (&true.into(), &true.into()),
        "{row}"
    );
    assert_eq!(valid_node_svids(&issuer, GW1)?, 0);
    let table = run_ok(issuer.cli().args(["agent", "list"]))?;
    ensure!(table.contains("banned"), "{table}");
    let audit = audit(&issuer)?;
    ensure!(audit.contains("agent.banned"), "{audit}");

    // A join-token node stays out too.
    let mut joined = Agent::start_with_join_token(&issuer, &issuer.join_token()?)?;
    let join_node = joined.node_id()?;
    run_ok(issuer.cli().args(["agent", "ban", &join_node]))?;
    joined.wait_status("join-token node refused", |(_, error)| error.is_some())?;
    assert_eq!(agent_row(&issuer, &join_node)?["banned"], true);
    assert_eq!(valid_node_svids(&issuer, &join_node)?, 0);

    // Unbanned, the x509pop agent comes back by itself.
    run_ok(issuer.cli().args(["agent", "unban", GW1]))?;
    wait_long(
        &gateway,
        "attested again after the unban",
        |(expires, error)| expires.is_some() && *expires != first && error.is_none(),
    )?;
    let row = agent_row(&issuer, GW1)?;
    assert_eq!(
        (&row["banned"], &row["evicted"]),
        (&false.into(), &false.into()),
        "{row}"
    );
    ensure!(audit_contains(&issuer, "agent.unbanned")?);
    Ok(())
}

/// Polls the agent's status.json until `check` holds, for up to 2 minutes: an agent refused
/// for a while retries with a backoff of up to 36 s.
fn wait_long(
    agent: &Agent,
    what: &str,
    check: impl Fn(&(Option<String>, Option<String>)) -> bool,
) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if agent.node_status().is_ok_and(|s| check(&s)) {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{what}: not seen in status.json within 2 minutes:\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

fn audit_contains(issuer: &Issuer, kind: &str) -> Result<bool> {
    Ok(audit(issuer)?.contains(kind))
}

#[test]
fn a_banned_tpm_stays_out_by_its_ek_until_unbanned() -> Result<()> {
    let tpm = Swtpm::start_manufactured();
    let ek_ca = tpm.ek_ca_certificate();
    let issuer = Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?;
        let table = format!("\n[attestation.tpm]\nek_ca = [\"{}\"]\n", ek_ca.display());
        std::fs::write(toml, text + &table)?;
        Ok(())
    })?;
    let attestation = format!("method = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti_string());
    let mut agent = Agent::start(&issuer, &attestation, &[])?;
    let node = agent.node_id()?;
    let (first, _) = agent.node_status()?;

    run_ok(issuer.cli().args(["agent", "ban", &node]))?;
    wait_long(&agent, "refused as banned", |(_, error)| {
        error.as_deref().is_some_and(|e| e.contains("banned"))
    })?;
    assert_eq!(agent_row(&issuer, &node)?["banned"], true);
    assert_eq!(valid_node_svids(&issuer, &node)?, 0);

    run_ok(issuer.cli().args(["agent", "unban", &node]))?;
    wait_long(
        &agent,
        "attested again after the unban",
        |(expires, error)| expires.is_some() && *expires != first && error.is_none(),
    )?;
    assert_eq!(agent_row(&issuer, &node)?["banned"], false);
    Ok(())
}
