//! A device key that lives in a TPM (a real swtpm): `agent enroll --key tpm:…` creates it
//! there and records `key.ref` instead of `key.pem`, and `agent reenroll` authenticates the
//! TLS handshake with it.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Result};
use plant_tests::swtpm::Swtpm;
use plant_tests::{bin, openssl, run, run_ok, verify_chain, x509_field, Issuer};

fn agent() -> Command {
    let mut command = Command::new(bin("agent"));
    command.env("TSS2_LOG", "all+NONE");
    command
}

fn public_key(cert: &Path) -> Result<String> {
    openssl(&["x509", "-noout", "-pubkey", "-in", &cert.to_string_lossy()])
}

#[test]
fn tpm_key_enrolls_and_renews_over_mutual_tls_without_leaving_the_tpm() -> Result<()> {
    let tpm = Swtpm::start();
    let issuer = Issuer::start()?;
    let out = tempfile::tempdir()?;
    let device = out.path().join("plc-9");
    let key_ref = format!("tpm:blob=device.tpmkey;tcti={}", tpm.tcti_string());
    let fingerprint = issuer.fingerprint()?;
    let token = issuer.token("plc", Some("plc-9"))?;
    let enroll = |key: &str, extra: &[&str]| {
        let mut command = agent();
        command
            .args(["enroll", "--server", &issuer.url, "--ca-fingerprint"])
            .arg(&fingerprint)
            .args(["--token", &token, "--subject", "plc-9", "--label", "plc"])
            .args(["--key", key])
            .args(extra)
            .arg("--out")
            .arg(&device);
        command
    };

    // A TPM key can't be sealed into a PKCS#12 bundle: refused as a usage error.
    let refused = run(&mut enroll(
        &key_ref,
        &[
            "--server-keygen",
            "--pkcs12",
            "x.p12",
            "--password-file",
            "pw",
        ],
    ))?;
    ensure!(refused.status.code() == Some(64), "{refused:?}");

    run_ok(&mut enroll(&key_ref, &[]))?;
    let cert = device.join("cert.pem");
    verify_chain(&issuer, &cert)?;
    ensure!(device.join("device.tpmkey").exists(), "no TPM blob");
    ensure!(!device.join("key.pem").exists(), "a key.pem was written");
    let written = std::fs::read_to_string(device.join("key.ref"))?;
    ensure!(written.trim() == key_ref, "{written}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(device.join("key.ref"))?
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let first_serial = x509_field(&cert, "-serial")?;
    let first_key = public_key(&cert)?;

    let renew = |extra: &[&str]| {
        let mut command = agent();
        command
            .args([
                "reenroll",
                "--server",
                &issuer.url,
                "--label",
                "plc",
                "--cert",
            ])
            .arg(&cert)
            .arg("--ca")
            .arg(device.join("ca.pem"))
            .args(extra);
        command
    };

    // A TPM key is renewed as it is, never replaced by a software key.
    let rekey = run(&mut renew(&["--rekey"]))?;
    ensure!(rekey.status.code() == Some(64), "{rekey:?}");
    ensure!(String::from_utf8_lossy(&rekey.stderr).contains("--rekey"));

    // key.ref beside the certificate is found by itself; the TPM signs the handshake.
    run_ok(&mut renew(&[]))?;
    verify_chain(&issuer, &cert)?;
    ensure!(x509_field(&cert, "-serial")? != first_serial, "same serial");
    ensure!(public_key(&cert)? == first_key, "renewal changed the key");
    ensure!(!device.join("key.pem").exists(), "renewal wrote a key.pem");

    // Naming the key explicitly works as well.
    let key_ref_file = device.join("key.ref").to_string_lossy().into_owned();
    run_ok(&mut renew(&["--key-ref", &key_ref_file]))?;
    verify_chain(&issuer, &cert)?;

    // A new key in the TPM: made there, the renewal authenticated by the old one, and
    // key.ref names the new one for the next renewal.
    let new_ref = format!("tpm:blob=device-2.tpmkey;tcti={}", tpm.tcti_string());
    run_ok(&mut renew(&["--new-key", &new_ref]))?;
    verify_chain(&issuer, &cert)?;
    ensure!(device.join("device-2.tpmkey").exists(), "no new TPM blob");
    ensure!(
        public_key(&cert)? != first_key,
        "--new-key kept the old key"
    );
    let second_key = public_key(&cert)?;
    let named = std::fs::read_to_string(device.join("key.ref"))?;
    ensure!(named.contains("device-2.tpmkey"), "{named}");
    run_ok(&mut renew(&[]))?;
    ensure!(
        public_key(&cert)? == second_key,
        "the next renewal did not use the new key"
    );

    let mut statuses: Vec<String> = issuer
        .inventory(&[])?
        .iter()
        .filter(|r| r["subject"] == "plc-9")
        .map(|r| r["status"].as_str().unwrap_or_default().to_owned())
        .collect();
    statuses.sort();
    assert_eq!(
        statuses,
        [
            "superseded",
            "superseded",
            "superseded",
            "superseded",
            "valid"
        ]
    );
    Ok(())
}
