//! The operator's command line against a running issuer: the monitoring alarm, admin errors,
//! where the configuration is looked for, the issuer's own log, and listing and revoking tokens.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use plant_tests::{
    certs_from_pkcs7, curl, enroll_with_curl, enroll_with_token, run, run_ok, Issuer,
};

/// Renews `cert` with `simplereenroll` (same key and subject), as a device would; returns the
/// new certificate's PEM.
fn renew(issuer: &Issuer, dir: &Path, cert: &Path, key: &Path, subject: &str) -> Result<PathBuf> {
    let name = format!("{subject}-renew");
    let answer = plant_tests::reenroll_with(issuer, dir, (cert, key), key, subject, &name)?;
    ensure!(
        answer.status == 200,
        "renew: {} {}",
        answer.status,
        answer.text()
    );
    certs_from_pkcs7(&answer.body, dir, &format!("{subject}-renewed"))
}

/// `issuer inventory --fail-if-expiring-within 400d --label device`: its exit code and
/// stderr (the label leaves out the issuer's own EST server certificate).
fn alarm(issuer: &Issuer) -> Result<(Option<i32>, String)> {
    let out = run(issuer.cli().args([
        "inventory",
        "--fail-if-expiring-within",
        "400d",
        "--label",
        "device",
    ]))?;
    Ok((
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// Device certificates live a year, so each one is in a 400-day window.
#[test]
fn the_expiry_alarm_counts_only_valid_certificates() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;

    // A renewed device: the first certificate is superseded, the renewal is valid.
    let (first, key) = enroll_with_token(&issuer, dir.path(), "hmi-3", "device")?;
    let renewed = renew(&issuer, dir.path(), &first, &key, "hmi-3")?;
    let statuses: Vec<String> = issuer
        .inventory(&["--label", "device"])?
        .iter()
        .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    ensure!(
        statuses.len() == 2 && statuses.contains(&"superseded".to_owned()),
        "{statuses:?}"
    );
    let (code, stderr) = alarm(&issuer)?;
    ensure!(code == Some(1), "{code:?} {stderr}");
    ensure!(
        stderr.contains("1 certificate(s) expire within 400d"),
        "the superseded certificate was counted: {stderr}"
    );

    // Revoke the renewal and another device's certificate: nothing valid is left to expire.
    issuer.revoke(&renewed)?;
    let (other, _) = enroll_with_token(&issuer, dir.path(), "gw-2", "device")?;
    issuer.revoke(&other)?;
    let (code, stderr) = alarm(&issuer)?;
    ensure!(
        code == Some(0),
        "superseded or revoked certificates raised the alarm ({code:?}): {stderr}"
    );

    // A valid certificate in the window raises it again.
    enroll_with_token(&issuer, dir.path(), "plc-9", "device")?;
    let (code, stderr) = alarm(&issuer)?;
    ensure!(code == Some(1), "{code:?} {stderr}");
    ensure!(
        stderr.contains("1 certificate(s) expire within 400d"),
        "{stderr}"
    );

    // Asking the alarm about another status is a usage error, not a silent empty answer.
    let out = run(issuer.cli().args([
        "inventory",
        "--fail-if-expiring-within",
        "30d",
        "--status",
        "revoked",
    ]))?;
    ensure!(out.status.code() == Some(64), "{out:?}");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("counts only valid certificates"),
        "{out:?}"
    );
    Ok(())
}

/// A refused enrollment is one line in the issuer's log, and a log captured to a file has no
/// terminal colour codes.
#[test]
fn a_refused_enrollment_is_logged_once_in_plain_text() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = plant_tests::openssl_csr(dir.path(), "plc-7", "plc-7", &[])?;
    let body = format!("@{}", csr.display());
    let answer = curl(
        &issuer,
        &[
            "-H",
            "Content-Type: application/pkcs10",
            "-H",
            "Authorization: Bearer not-a-token-we-ever-made",
            "--data-binary",
            &body,
            "/.well-known/est/simpleenroll",
        ],
    )?;
    ensure!(answer.status == 401, "{} {}", answer.status, answer.text());
    // The line is written while the answer is built, so it is in the file by now.
    let log = issuer.log();
    let refusals = log.lines().filter(|l| l.contains("unknown token")).count();
    ensure!(
        refusals == 1,
        "the refusal is logged {refusals} times:\n{log}"
    );
    ensure!(
        !log.contains('\u{1b}'),
        "the log file has ANSI escape codes:\n{log:?}"
    );
    Ok(())
}

/// An admin command's failure is said once, without a doubled prefix, and says what to do.
#[test]
fn admin_errors_read_once_and_say_what_to_do() -> Result<()> {
    let mut issuer = Issuer::start()?;
    let out = run(issuer
        .cli()
        .args(["revoke", "0123456789abcdef0123456789abcdef"]))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "{out:?}");
    ensure!(
        stderr.trim_end()
            == "issuer: this issuer has no certificate with serial \
                0123456789abcdef0123456789abcdef; check it \
                against `issuer inventory` (a certificate from another CA must be revoked there)",
        "{stderr}"
    );

    // With no issuer running, the message names the socket and what to check.
    issuer.kill()?;
    let out = run(issuer.cli().args(["inventory"]))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!out.status.success(), "{out:?}");
    ensure!(
        stderr.starts_with("issuer: cannot reach the issuer's admin socket ")
            && stderr.contains("is `issuer serve` running with this configuration?")
            && !stderr.contains("admin: admin:"),
        "{stderr}"
    );
    Ok(())
}

/// The admin socket speaks gRPC only: the JSON routes it once served (`GET /v1/status`,
/// `POST /v1/tokens`) answer gRPC's UNIMPLEMENTED and no JSON, while the CLI, over gRPC, is
/// answered.
#[test]
fn the_admin_socket_answers_no_json() -> Result<()> {
    let issuer = Issuer::start()?;
    let socket = issuer.dir.path().join("state/admin.sock");
    for (method, path) in [("GET", "/v1/status"), ("POST", "/v1/tokens")] {
        let answer = run_ok(std::process::Command::new("curl").args([
            "-s",
            "-i",
            "-X",
            method,
            "-H",
            "content-type: application/json",
            "--data-binary",
            "{}",
            "--unix-socket",
            &socket.to_string_lossy(),
            &format!("http://issuer-admin{path}"),
        ]))?;
        ensure!(
            answer.to_ascii_lowercase().contains("grpc-status: 12") && !answer.contains('{'),
            "{method} {path} on the admin socket:\n{answer}"
        );
    }
    let status = run_ok(issuer.cli().arg("status"))?;
    ensure!(status.starts_with("trust domain "), "{status}");
    Ok(())
}

/// Without `--config`, the issuer says where it looked and how to point at an existing
/// configuration before it suggests making a new CA.
#[test]
fn a_missing_configuration_names_the_path_and_suggests_config_first() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for command in [&["serve"][..], &["inventory"], &["token", "create"]] {
        let out = run(std::process::Command::new(plant_tests::bin("issuer"))
            .current_dir(dir.path())
            .env_remove("PLANT_ISSUER_CONFIG")
            .args(command))?;
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(out.status.code() == Some(64), "{command:?}: {out:?}");
        let looked = dir.path().join("issuer.toml");
        ensure!(
            stderr.contains(&format!("no issuer configuration at {}", looked.display())),
            "{command:?}: {stderr}"
        );
        let (Some(config), Some(init)) =
            (stderr.find("--config <path>"), stderr.find("issuer init"))
        else {
            anyhow::bail!("{command:?}: {stderr}");
        };
        ensure!(
            config < init,
            "{command:?}: `issuer init` comes first: {stderr}"
        );
    }
    Ok(())
}

/// `issuer token list --format json` as values.
fn token_list(issuer: &Issuer) -> Result<Vec<serde_json::Value>> {
    Ok(serde_json::from_str(&run_ok(
        issuer.cli().args(["token", "list", "--format", "json"]),
    )?)?)
}

/// The listed token bound to `subject`.
fn listed<'a>(rows: &'a [serde_json::Value], subject: &str) -> Result<&'a serde_json::Value> {
    rows.iter()
        .find(|r| r["subject"] == subject)
        .with_context(|| format!("no token for {subject} in {rows:?}"))
}

#[test]
fn tokens_are_listed_without_secrets_and_a_revoked_one_no_longer_enrolls() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let kept = issuer.token("device", Some("dev-1"))?;
    let revoked = issuer.token("device", Some("dev-2"))?;

    // Both listed, in both formats, with what they grant and no secret.
    let rows = token_list(&issuer)?;
    ensure!(rows.len() == 2, "{rows:?}");
    for subject in ["dev-1", "dev-2"] {
        let row = listed(&rows, subject)?;
        ensure!(
            row["kind"] == "enrollment" && row["label"] == "device" && row["state"] == "unused",
            "{row}"
        );
        ensure!(row["expires_at"].as_i64().is_some(), "{row}");
    }
    let json = serde_json::to_string(&rows)?;
    let table = run_ok(issuer.cli().args(["token", "list"]))?;
    ensure!(
        table.starts_with("ID") && table.contains("dev-1") && table.contains("unused"),
        "{table}"
    );
    for secret in [&kept, &revoked] {
        ensure!(
            !json.contains(secret.as_str()) && !table.contains(secret.as_str()),
            "a token secret is listed"
        );
    }

    // Revoke one by its id: enrolling with it is refused, and it says why.
    let id = listed(&rows, "dev-2")?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    let said = run_ok(issuer.cli().args(["token", "revoke", &id]))?;
    ensure!(said.contains(&format!("revoked token {id}")), "{said}");
    let (_, csr) = plant_tests::openssl_csr(dir.path(), "dev-2", "dev-2", &[])?;
    let body = format!("@{}", csr.display());
    let auth = format!("Authorization: Bearer {revoked}");
    let answer = curl(
        &issuer,
        &[
            "-H",
            "Content-Type: application/pkcs10",
            "-H",
            &auth,
            "--data-binary",
            &body,
            "/.well-known/est/device/simpleenroll",
        ],
    )?;
    ensure!(answer.status == 401, "{} {}", answer.status, answer.text());
    ensure!(
        answer.text().contains("revoked by the PKI operator"),
        "{}",
        answer.text()
    );
    // The other still enrolls.
    let auth = format!("Authorization: Bearer {kept}");
    enroll_with_curl(&issuer, dir.path(), "dev-1", "device", &["-H", &auth])?;
    let rows = token_list(&issuer)?;
    ensure!(listed(&rows, "dev-2")?["state"] == "revoked", "{rows:?}");
    ensure!(listed(&rows, "dev-1")?["state"] == "spent", "{rows:?}");

    // Clear errors and a non-zero exit for what can't be revoked.
    let kept_id = listed(&rows, "dev-1")?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    for (id, needle) in [
        (
            "0badc0de",
            "no token with id \"0badc0de\"; `issuer token list` shows the ids",
        ),
        (id.as_str(), "is already revoked"),
        (
            kept_id.as_str(),
            "revoke the certificate it enrolled instead",
        ),
    ] {
        let out = run(issuer.cli().args(["token", "revoke", id]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(out.status.code() == Some(1), "{id}: {out:?}");
        ensure!(stderr.contains(needle), "{id}: {stderr}");
    }

    // The revocation is audited, by the token's public id.
    let audit = run_ok(issuer.cli().args(["audit", "tail", "-n", "50"]))?;
    ensure!(
        audit
            .lines()
            .any(|l| l.contains("token.revoked") && l.contains(&id)),
        "{audit}"
    );
    Ok(())
}

#[test]
fn output_into_a_pipe_closed_early_ends_quietly() -> Result<()> {
    use std::io::BufRead as _;
    use std::process::Stdio;

    let issuer = Issuer::start()?;
    run_ok(issuer.cli().args([
        "token", "create", "--label", "device", "--count", "1500", "--ttl", "1h",
    ]))?;
    // `issuer token list | head -n 1`: the listing (about 150 KB) outgrows the pipe's buffer,
    // so the issuer is still writing when the reader goes.
    let mut child = issuer
        .cli()
        .args(["token", "list"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut first)?;
    ensure!(first.starts_with("ID"), "first line {first:?}");
    let out = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success() && stderr.is_empty(),
        "{}: {stderr}",
        out.status
    );
    Ok(())
}
