//! Revocation as a relying party sees it: the CRL named in the certificate, fetched over plain
//! HTTP with curl, verified and applied by openssl; and the revoked certificate can't renew.

use anyhow::{ensure, Result};
use plant_tests::{curl, openssl, run, Issuer};

#[test]
fn a_revoked_certificate_is_on_the_signed_crl_and_openssl_refuses_it() -> Result<()> {
    revoked_certificate_is_refused(Issuer::start()?)
}

/// The same with leaves signed by a short-lived signing key: the CRL is signed by the issuing
/// key, and openssl finds it by the shared issuer name and the CRL's key identifier.
#[test]
fn a_revoked_certificate_signed_by_a_short_lived_key_is_refused_by_the_issuing_crl() -> Result<()> {
    revoked_certificate_is_refused(Issuer::start_with(plant_tests::enable_short_lived_keys)?)
}

fn revoked_certificate_is_refused(issuer: Issuer) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let crl_url = issuer.crl_url()?;

    let mut certs = Vec::new();
    for subject in ["gw-1", "gw-2"] {
        let token = issuer.token("device", Some(subject))?;
        let auth = format!("Authorization: Bearer {token}");
        certs.push(plant_tests::enroll_with_curl(
            &issuer,
            dir.path(),
            subject,
            "device",
            &["-H", &auth],
        )?);
    }
    let (revoked, revoked_key) = &certs[0];
    let (kept, _) = &certs[1];
    // The certificate names where its CRL is.
    let cdp = openssl(&[
        "x509",
        "-in",
        &revoked.to_string_lossy(),
        "-noout",
        "-ext",
        "crlDistributionPoints",
    ])?;
    ensure!(
        cdp.contains(&crl_url),
        "CRL distribution point {cdp:?} lacks {crl_url}"
    );

    let serial = issuer.revoke(revoked)?;
    // Revoking twice says so.
    let again = run(issuer.cli().args(["revoke", &serial]))?;
    ensure!(
        !again.status.success()
            && String::from_utf8_lossy(&again.stderr).contains("already revoked")
    );

    // Fetch the CRL from the URL in the certificate, as a relying party would.
    let crl_der = dir.path().join("issuing.crl");
    let fetched = run(std::process::Command::new("curl")
        .args(["-sS", "-f", "-o"])
        .arg(&crl_der)
        .arg(&crl_url))?;
    ensure!(
        fetched.status.success(),
        "{}",
        String::from_utf8_lossy(&fetched.stderr)
    );
    let crl_pem = dir.path().join("issuing.crl.pem");
    openssl(&[
        "crl",
        "-inform",
        "DER",
        "-in",
        &crl_der.to_string_lossy(),
        "-out",
        &crl_pem.to_string_lossy(),
    ])?;
    let checked = run(std::process::Command::new("openssl").args([
        "crl",
        "-in",
        &crl_pem.to_string_lossy(),
        "-CAfile",
        &issuer.issuing_pem().to_string_lossy(),
        "-noout",
        "-text",
    ]))?;
    let text = String::from_utf8_lossy(&checked.stdout).to_string()
        + &String::from_utf8_lossy(&checked.stderr);
    ensure!(text.contains("verify OK"), "CRL signature: {text}");
    ensure!(
        text.to_ascii_lowercase()
            .contains(&serial.to_ascii_lowercase()),
        "serial {serial} not in {text}"
    );
    ensure!(text.contains("Key Compromise"), "{text}");

    let cacerts = curl(&issuer, &["/.well-known/est/cacerts"])?;
    let cacerts = plant_tests::certs_from_pkcs7(&cacerts.body, dir.path(), "cacerts")?;
    let verify = |cert: &std::path::Path| {
        run(std::process::Command::new("openssl").args([
            "verify",
            "-crl_check",
            "-CAfile",
            &issuer.root_pem().to_string_lossy(),
            "-untrusted",
            &cacerts.to_string_lossy(),
            "-CRLfile",
            &crl_pem.to_string_lossy(),
            &cert.to_string_lossy(),
        ]))
    };
    let refused = verify(revoked)?;
    ensure!(
        !refused.status.success(),
        "openssl accepted a revoked certificate"
    );
    ensure!(
        String::from_utf8_lossy(&refused.stdout).contains("revoked")
            || String::from_utf8_lossy(&refused.stderr).contains("revoked")
    );
    ensure!(
        verify(kept)?.status.success(),
        "the other certificate still verifies"
    );

    // And the revoked certificate can't renew itself.
    let der = dir.path().join("renew.der");
    openssl(&[
        "req",
        "-new",
        "-key",
        &revoked_key.to_string_lossy(),
        "-subj",
        "/CN=gw-1",
        "-outform",
        "DER",
        "-out",
        &der.to_string_lossy(),
    ])?;
    let b64 = dir.path().join("renew.b64");
    plant_tests::base64_file(&der, &b64)?;
    let body = format!("@{}", b64.display());
    let answer = curl(
        &issuer,
        &[
            "--cert",
            &revoked.to_string_lossy(),
            "--key",
            &revoked_key.to_string_lossy(),
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            &body,
            "/.well-known/est/simplereenroll",
        ],
    )?;
    ensure!(
        answer.status == 403 && answer.text().contains("revoked"),
        "{} {}",
        answer.status,
        answer.text()
    );
    assert_eq!(issuer.inventory(&["--status", "revoked"])?.len(), 1);

    // Prometheus sees the issuances and the refusal, next to the CRL.
    let metrics_url = crl_url.replace("/crl/issuing.crl", "/metrics");
    let metrics =
        plant_tests::run_ok(std::process::Command::new("curl").args(["-sS", "-f", &metrics_url]))?;
    ensure!(
        metrics.contains("plant_issuance_duration_seconds_count{label=\"device\"} 2"),
        "{metrics}"
    );
    // Two enrollments and one cacerts.
    ensure!(
        metrics.contains("plant_est_responses_total{code=\"200\"} 3"),
        "{metrics}"
    );
    ensure!(
        metrics.contains("plant_est_responses_total{code=\"403\"} 1"),
        "{metrics}"
    );
    ensure!(
        metrics.contains("plant_enrollment_refusals_total{reason=\"forbidden\"} 1"),
        "{metrics}"
    );
    ensure!(
        metrics.contains("# TYPE plant_certificates_expiring gauge"),
        "{metrics}"
    );
    Ok(())
}
