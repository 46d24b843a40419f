//! The commissioning engineer's journey with `agent`, against a real issuer, and the
//! operator's view of it with `issuer inventory`.

use std::process::Command;

use anyhow::{ensure, Result};
use plant_tests::{bin, openssl, run, run_ok, verify_chain, x509_field, Issuer};

fn agent() -> Command {
    Command::new(bin("agent"))
}

#[test]
fn engineer_enrolls_a_device_and_the_operator_sees_it_in_the_inventory() -> Result<()> {
    let issuer = Issuer::start()?;
    let out = tempfile::tempdir()?;
    let fingerprint = issuer.fingerprint()?;
    let token = issuer.token("plc", Some("plc-7"))?;

    // A fingerprint that is well-formed but not the CA's: refused before the token is sent.
    let wrong = "ab".repeat(32);
    let refused = run(agent()
        .args([
            "enroll",
            "--server",
            &issuer.url,
            "--ca-fingerprint",
            &wrong,
            "--token",
            &token,
            "--subject",
            "plc-7",
            "--label",
            "plc",
            "--out",
        ])
        .arg(out.path().join("wrong")))?;
    ensure!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    ensure!(message.contains("fingerprint"), "{message}");
    ensure!(!out.path().join("wrong/key.pem").exists());

    let device = out.path().join("plc-7");
    run_ok(
        agent()
            .args([
                "enroll",
                "--server",
                &issuer.url,
                "--ca-fingerprint",
                &fingerprint,
                "--token",
                &token,
                "--subject",
                "plc-7",
                "--label",
                "plc",
                "--out",
            ])
            .arg(&device),
    )?;
    let cert = device.join("cert.pem");
    verify_chain(&issuer, &cert)?;
    openssl(&[
        "verify",
        "-CAfile",
        &device.join("ca.pem").to_string_lossy(),
        "-untrusted",
        &device.join("chain.pem").to_string_lossy(),
        &cert.to_string_lossy(),
    ])?;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(device.join("key.pem"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let serial = plant_tests::serial_hex(&cert)?;
    let rows = issuer.inventory(&["--expiring-within", "800d", "--label", "plc"])?;
    let row = rows
        .iter()
        .find(|r| r["subject"] == "plc-7")
        .ok_or_else(|| anyhow::anyhow!("plc-7 not in {rows:?}"))?;
    assert!(row["serial"]
        .as_str()
        .is_some_and(|s| s.ends_with(serial.trim_start_matches('0'))));
    assert_eq!(row["status"], "valid");
    // A plc certificate lives two years: not expiring within 30 days, and not a device.
    assert!(issuer
        .inventory(&["--expiring-within", "30d", "--label", "plc"])?
        .is_empty());
    assert!(issuer
        .inventory(&["--label", "device"])?
        .iter()
        .all(|r| r["subject"] != "plc-7"));

    let csv = run_ok(
        issuer
            .cli()
            .args(["inventory", "--format", "csv", "--label", "plc"]),
    )?;
    ensure!(
        csv.starts_with("serial,subject,sans,label,owner,not_after,status\n"),
        "{csv}"
    );
    ensure!(csv.contains(",plc-7,"), "{csv}");
    let table = run_ok(issuer.cli().args(["inventory"]))?;
    ensure!(
        table.starts_with("SERIAL") && table.contains("plc-7"),
        "{table}"
    );

    // Filters by owner and subject text, and the monitoring exit code.
    let owner = row["owner"].as_str().unwrap_or_default().to_owned();
    assert_eq!(issuer.inventory(&["--owner", &owner])?.len(), 1);
    assert_eq!(issuer.inventory(&["--subject", "PLC-"])?.len(), 1);
    assert!(issuer.inventory(&["--subject", "boiler"])?.is_empty());
    run_ok(
        issuer
            .cli()
            .args(["inventory", "--fail-if-expiring-within", "30d"]),
    )?;
    let alarm = run(issuer.cli().args([
        "inventory",
        "--fail-if-expiring-within",
        "800d",
        "--label",
        "plc",
    ]))?;
    ensure!(alarm.status.code() == Some(1), "{alarm:?}");
    ensure!(String::from_utf8_lossy(&alarm.stderr).contains("1 certificate(s) expire within 800d"));

    // The audit trail has the token and the issuance, and its chain verifies.
    let tail = run_ok(issuer.cli().args(["audit", "tail", "-n", "50"]))?;
    ensure!(
        tail.contains("token.created") && tail.contains("certificate.issued"),
        "{tail}"
    );
    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    Ok(())
}

#[test]
fn a_cabinet_enrolls_from_csv_and_a_bad_row_does_not_stop_the_rest() -> Result<()> {
    let issuer = Issuer::start()?;
    let out = tempfile::tempdir()?;
    let mut csv = String::from("subject,token,label\n");
    for i in 1..=4 {
        let subject = format!("cab1-io-{i}");
        let token = issuer.token("device", Some(&subject))?;
        csv.push_str(&format!("{subject},{token},device\n"));
    }
    csv.push_str("cab1-io-5,this-token-does-not-exist,device\n");
    let subject = "cab1-plc";
    let token = issuer.token("plc", Some(subject))?;
    csv.push_str(&format!("{subject},{token},plc\n"));
    let file = out.path().join("cabinet.csv");
    std::fs::write(&file, csv)?;

    let result = run(agent()
        .args(["enroll", "--batch"])
        .arg(&file)
        .args([
            "--server",
            &issuer.url,
            "--ca-fingerprint",
            &issuer.fingerprint()?,
            "--out",
        ])
        .arg(out.path().join("cabinet")))?;
    ensure!(
        !result.status.success(),
        "one row failed, so the batch exits non-zero"
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    ensure!(
        text.contains("5 enrolled") && text.contains("1 failed"),
        "{text}"
    );
    ensure!(text.contains("cab1-io-5"), "{text}");
    for i in 1..=4 {
        verify_chain(
            &issuer,
            &out.path().join(format!("cabinet/cab1-io-{i}/cert.pem")),
        )?;
    }
    verify_chain(&issuer, &out.path().join("cabinet/cab1-plc/cert.pem"))?;
    assert!(!out.path().join("cabinet/cab1-io-5/cert.pem").exists());
    let report = std::fs::read_to_string(out.path().join("cabinet/enrollment-report.csv"))?;
    assert_eq!(report.lines().count(), 7, "{report}");
    assert_eq!(
        issuer
            .inventory(&[])?
            .iter()
            .filter(|r| r["subject"]
                .as_str()
                .is_some_and(|s| s.starts_with("cab1-")))
            .count(),
        5
    );
    Ok(())
}

#[test]
fn a_plc_gets_a_server_generated_key_as_pkcs12_and_renews_over_reenroll() -> Result<()> {
    let issuer = Issuer::start()?;
    let out = tempfile::tempdir()?;
    let password = out.path().join("password");
    std::fs::write(&password, "commissioning-2026\n")?;
    let bundle = out.path().join("plc-9.p12");
    let token = issuer.token("plc", Some("plc-9"))?;
    run_ok(
        agent()
            .args([
                "enroll",
                "--server",
                &issuer.url,
                "--ca-fingerprint",
                &issuer.fingerprint()?,
                "--token",
                &token,
                "--subject",
                "plc-9",
                "--label",
                "plc",
                "--server-keygen",
                "--pkcs12",
            ])
            .arg(&bundle)
            .arg("--password-file")
            .arg(&password),
    )?;
    // OpenSSL 3 reads it without the legacy provider: key and certificate inside.
    let pass = format!("file:{}", password.display());
    let certs = openssl(&[
        "pkcs12",
        "-in",
        &bundle.to_string_lossy(),
        "-passin",
        &pass,
        "-nokeys",
    ])?;
    ensure!(
        certs.contains("CN=plc-9") || certs.contains("CN = plc-9"),
        "{certs}"
    );
    let key = openssl(&[
        "pkcs12",
        "-in",
        &bundle.to_string_lossy(),
        "-passin",
        &pass,
        "-nocerts",
        "-nodes",
    ])?;
    ensure!(key.contains("PRIVATE KEY"), "the bundle holds the key");
    let wrong = run(Command::new("openssl").args([
        "pkcs12",
        "-in",
        &bundle.to_string_lossy(),
        "-passin",
        "pass:wrong",
        "-nokeys",
    ]))?;
    ensure!(!wrong.status.success(), "a wrong password does not open it");

    // Renewal with the current certificate as TLS client certificate.
    let device = out.path().join("hmi-1");
    let token = issuer.token("device", Some("hmi-1"))?;
    run_ok(
        agent()
            .args([
                "enroll",
                "--server",
                &issuer.url,
                "--ca-fingerprint",
                &issuer.fingerprint()?,
                "--token",
                &token,
                "--subject",
                "hmi-1",
                "--out",
            ])
            .arg(&device),
    )?;
    let first = x509_field(&device.join("cert.pem"), "-serial")?;
    run_ok(
        agent()
            .args(["reenroll", "--server", &issuer.url, "--rekey", "--cert"])
            .arg(device.join("cert.pem"))
            .arg("--key")
            .arg(device.join("key.pem"))
            .arg("--ca")
            .arg(device.join("ca.pem")),
    )?;
    let second = x509_field(&device.join("cert.pem"), "-serial")?;
    assert_ne!(first, second);
    verify_chain(&issuer, &device.join("cert.pem"))?;
    let statuses: Vec<String> = issuer
        .inventory(&[])?
        .iter()
        .filter(|r| r["subject"] == "hmi-1")
        .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut sorted = statuses.clone();
    sorted.sort();
    assert_eq!(sorted, ["superseded", "valid"], "{statuses:?}");
    Ok(())
}
