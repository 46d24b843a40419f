//! The issuing CA key in a TPM (a real swtpm started here): created inside the TPM by
//! `issuer init --ca-key tpm:…`, it signs certificates that openssl verifies; when the TPM
//! dies, enrollment answers 503 with Retry-After while the issuer stays up, and it recovers by
//! itself when the TPM is back.

use anyhow::{ensure, Result};
use plant_tests::swtpm::Swtpm;
use plant_tests::{certs_from_pkcs7, curl, openssl_csr, verify_chain, Issuer};

#[test]
fn a_tpm_held_ca_key_issues_fails_cleanly_and_recovers_with_the_tpm() -> Result<()> {
    let mut tpm = Swtpm::start();
    let ca_key = format!("tpm:blob=ca/issuing.tpmkey;tcti={}", tpm.tcti_string());
    let issuer = Issuer::start_custom(&["--ca-key", &ca_key], |_| Ok(()))?;
    let dir = tempfile::tempdir()?;
    // The key file is a TPM blob: useless without this TPM, and no PKCS#8 key exists.
    let blob = std::fs::read_to_string(issuer.dir.path().join("ca/issuing.tpmkey"))?;
    ensure!(blob.contains("TSS2 PRIVATE KEY"), "{blob}");
    ensure!(!issuer.dir.path().join("ca/issuing.key").exists());
    let status = plant_tests::run_ok(issuer.cli().arg("status"))?;
    ensure!(status.contains("TPM") || status.contains("tpm"), "{status}");

    let enroll_with = |name: &str, token: &str| -> Result<plant_tests::CurlAnswer> {
        let (_, csr) = openssl_csr(dir.path(), name, name, &[])?;
        let body = format!("@{}", csr.display());
        let auth = format!("Authorization: Bearer {token}");
        curl(
            &issuer,
            &[
                "-H",
                "Content-Type: application/pkcs10",
                "-H",
                &auth,
                "--data-binary",
                &body,
                "/.well-known/est/simpleenroll",
            ],
        )
    };
    let enroll = |name: &str| enroll_with(name, &issuer.token("device", Some(name))?);
    let answer = enroll("tpm-signed-1")?;
    ensure!(answer.status == 200, "{}", answer.text());
    verify_chain(
        &issuer,
        &certs_from_pkcs7(&answer.body, dir.path(), "tpm-signed-1")?,
    )?;

    tpm.kill();
    let kept_token = issuer.token("device", Some("while-tpm-down"))?;
    let answer = enroll_with("while-tpm-down", &kept_token)?;
    ensure!(answer.status == 503, "{} {}", answer.status, answer.text());
    ensure!(answer.header("Retry-After").is_some(), "{}", answer.headers);
    ensure!(answer.text().contains("retry later"), "{}", answer.text());
    // The issuer itself is up and answering.
    ensure!(curl(&issuer, &["/.well-known/est/cacerts"])?.status == 200);

    tpm.restart();
    let mut recovered = None;
    for attempt in 0..20 {
        let answer = enroll(&format!("after-tpm-{attempt}"))?;
        if answer.status == 200 {
            recovered = Some((attempt, answer));
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
    let (attempt, answer) =
        recovered.ok_or_else(|| anyhow::anyhow!("no recovery:\n{}", issuer.log()))?;
    verify_chain(
        &issuer,
        &certs_from_pkcs7(&answer.body, dir.path(), &format!("after-{attempt}"))?,
    )?;
    // The request that met the dead TPM did not spend its token.
    let answer = enroll_with("while-tpm-down", &kept_token)?;
    ensure!(
        answer.status == 200,
        "token lost to the TPM outage: {}",
        answer.text()
    );
    Ok(())
}
