//! Bad input gets a clear error with the right status and loses nothing: each case is a
//! request a confused or hostile client could send, checked for status, a text/plain message
//! that says what to fix, and that nothing was issued or consumed by mistake.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Result};
use plant_tests::{curl, openssl, openssl_csr, CurlAnswer, Issuer};

const PKCS10: &str = "Content-Type: application/pkcs10";

fn post(issuer: &Issuer, path: &str, body_file: &Path, extra: &[&str]) -> Result<CurlAnswer> {
    let body = format!("@{}", body_file.display());
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["--data-binary", &body, path]);
    curl(issuer, &args)
}

fn expect(answer: &CurlAnswer, status: u16, needle: &str) -> Result<()> {
    ensure!(
        answer.status == status,
        "expected {status}, got {}: {}",
        answer.status,
        answer.text()
    );
    ensure!(
        answer.text().contains(needle),
        "message {:?} lacks {needle:?}",
        answer.text()
    );
    ensure!(
        answer
            .header("Content-Type")
            .is_some_and(|t| t.starts_with("text/plain")),
        "errors are text/plain: {}",
        answer.headers
    );
    Ok(())
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}")
}

/// A CSR made by `openssl req` with any key type and options, base64-encoded.
fn custom_csr(dir: &Path, name: &str, req_args: &[&str]) -> Result<PathBuf> {
    let der = dir.join(format!("{name}.der"));
    let b64 = dir.join(format!("{name}.b64"));
    let key = dir.join(format!("{name}.key"));
    let mut args = vec![
        "req",
        "-new",
        "-nodes",
        "-subj",
        "/CN=dev-1",
        "-outform",
        "DER",
    ];
    let (key_s, der_s) = (
        key.to_string_lossy().into_owned(),
        der.to_string_lossy().into_owned(),
    );
    args.extend(["-keyout", &key_s, "-out", &der_s]);
    args.extend(req_args);
    openssl(&args)?;
    plant_tests::base64_file(&der, &b64)?;
    Ok(b64)
}

#[test]
fn csrs_the_profile_forbids_are_refused_and_the_token_survives() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("dev-1"))?;
    let auth = bearer(&token);
    let before = issuer.inventory(&[])?.len();
    let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"];
    // 400 for a CSR this CA never accepts; 403 for a well-formed one asking for a name its
    // token does not grant (a policy refusal, DESIGN §4).
    let cases: Vec<(&str, Vec<&str>, u16, &str)> = vec![
        ("rsa1024", vec!["-newkey", "rsa:1024"], 400, "RSA"),
        (
            "p384",
            vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
            400,
            "P-256",
        ),
        (
            "ca-true",
            [&p256[..], &["-addext", "basicConstraints=critical,CA:TRUE"]].concat(),
            400,
            "CA certificate",
        ),
        (
            "key-cert-sign",
            [&p256[..], &["-addext", "keyUsage=critical,keyCertSign"]].concat(),
            400,
            "CA certificate",
        ),
        (
            "extra-san",
            [&p256[..], &["-addext", "subjectAltName=DNS:evil.example"]].concat(),
            403,
            "asks for subjectAltName dns:evil.example, which this enrollment does not grant",
        ),
    ];
    for (name, args, status, needle) in cases {
        let csr = custom_csr(dir.path(), name, &args)?;
        let answer = post(
            &issuer,
            "/.well-known/est/simpleenroll",
            &csr,
            &["-H", PKCS10, "-H", &auth],
        )?;
        expect(&answer, status, needle).map_err(|e| e.context(name))?;
    }
    // Nothing was issued and the token was not burnt by the refused requests.
    assert_eq!(issuer.inventory(&[])?.len(), before);
    let (_, good) = openssl_csr(dir.path(), "good", "dev-1", &[])?;
    let answer = post(
        &issuer,
        "/.well-known/est/simpleenroll",
        &good,
        &["-H", PKCS10, "-H", &auth],
    )?;
    assert_eq!(answer.status, 200, "{}", answer.text());
    Ok(())
}

#[test]
fn broken_signature_garbage_and_pem_bodies_are_400() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("dev-1"))?;
    let auth = bearer(&token);
    let headers = ["-H", PKCS10, "-H", auth.as_str()];

    let (_, csr) = openssl_csr(dir.path(), "dev-1", "dev-1", &[])?;
    let der_path = dir.path().join("dev-1.csr.der");
    let mut der = std::fs::read(&der_path)?;
    let n = der.len();
    der[n - 5] ^= 0x40;
    let broken_der = dir.path().join("broken.der");
    std::fs::write(&broken_der, &der)?;
    let broken = dir.path().join("broken.b64");
    plant_tests::base64_file(&broken_der, &broken)?;
    let answer = post(&issuer, "/.well-known/est/simpleenroll", &broken, &headers)?;
    ensure!(answer.status == 400, "{}", answer.text());
    ensure!(
        answer.text().contains("does not verify") || answer.text().contains("not a DER"),
        "{}",
        answer.text()
    );

    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "!!! this is not base64 !!!")?;
    expect(
        &post(&issuer, "/.well-known/est/simpleenroll", &garbage, &headers)?,
        400,
        "base64",
    )?;

    let pem = dir.path().join("csr.pem");
    openssl(&[
        "req",
        "-inform",
        "DER",
        "-in",
        &der_path.to_string_lossy(),
        "-out",
        &pem.to_string_lossy(),
    ])?;
    expect(
        &post(&issuer, "/.well-known/est/simpleenroll", &pem, &headers)?,
        400,
        "PEM",
    )?;

    // Base64 of something that is not a CSR.
    let not_csr = dir.path().join("not-csr.b64");
    std::fs::write(&not_csr, "MAMCAQE=\n")?;
    expect(
        &post(&issuer, "/.well-known/est/simpleenroll", &not_csr, &headers)?,
        400,
        "PKCS#10",
    )?;

    // The token is still good for a proper request.
    assert_eq!(
        post(&issuer, "/.well-known/est/simpleenroll", &csr, &headers)?.status,
        200
    );
    Ok(())
}

#[test]
fn oversized_bodies_are_413_whether_declared_or_chunked() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("dev-1"))?;
    let auth = bearer(&token);
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'A'; 10 * 1024 * 1024])?;
    expect(
        &post(
            &issuer,
            "/.well-known/est/simpleenroll",
            &big,
            &["-H", PKCS10, "-H", &auth],
        )?,
        413,
        "larger than",
    )?;
    expect(
        &post(
            &issuer,
            "/.well-known/est/simpleenroll",
            &big,
            &[
                "-H",
                PKCS10,
                "-H",
                &auth,
                "-H",
                "Transfer-Encoding: chunked",
            ],
        )?,
        413,
        "larger than",
    )?;
    // The issuer is still serving.
    assert_eq!(curl(&issuer, &["/.well-known/est/cacerts"])?.status, 200);
    Ok(())
}

#[test]
fn unknown_labels_operations_and_media_types_are_refused_before_any_work() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("dev-1"))?;
    let auth = bearer(&token);
    let (_, csr) = openssl_csr(dir.path(), "dev-1", "dev-1", &[])?;
    expect(
        &post(
            &issuer,
            "/.well-known/est/boiler/simpleenroll",
            &csr,
            &["-H", PKCS10, "-H", &auth],
        )?,
        404,
        "unknown EST label",
    )?;
    expect(
        &curl(&issuer, &["/.well-known/est/nonsense"])?,
        404,
        "unknown EST operation",
    )?;
    expect(
        &post(
            &issuer,
            "/.well-known/est/simpleenroll",
            &csr,
            &["-H", "Content-Type: text/plain", "-H", &auth],
        )?,
        415,
        "application/pkcs10",
    )?;
    expect(
        &post(
            &issuer,
            "/.well-known/est/fullcmc",
            &csr,
            &["-H", PKCS10, "-H", &auth],
        )?,
        501,
        "fullcmc",
    )?;
    // None of that consumed the token.
    assert_eq!(
        post(
            &issuer,
            "/.well-known/est/simpleenroll",
            &csr,
            &["-H", PKCS10, "-H", &auth]
        )?
        .status,
        200
    );
    Ok(())
}

#[test]
fn a_token_works_once_even_when_twenty_clients_race_with_it() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("dev-1"))?;
    let auth = bearer(&token);
    let (_, csr) = openssl_csr(dir.path(), "dev-1", "dev-1", &[])?;
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..20)
            .map(|_| {
                scope.spawn(|| {
                    post(
                        &issuer,
                        "/.well-known/est/simpleenroll",
                        &csr,
                        &["-H", PKCS10, "-H", &auth],
                    )
                    .map(|a| a.status)
                    .unwrap_or(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).collect()
    });
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 401).count(),
        19,
        "{statuses:?}"
    );
    let issued: Vec<_> = issuer
        .inventory(&["--label", "device"])?
        .into_iter()
        .filter(|r| r["subject"] == "dev-1")
        .collect();
    assert_eq!(issued.len(), 1);

    // And once more, alone, with a clear message.
    expect(
        &post(
            &issuer,
            "/.well-known/est/simpleenroll",
            &csr,
            &["-H", PKCS10, "-H", &auth],
        )?,
        401,
        "already used",
    )?;
    Ok(())
}

#[test]
fn expired_unknown_and_misbound_tokens_are_refused() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "plc-7", "plc-7", &[])?;
    let enroll = |label: &str, token: &str| {
        post(
            &issuer,
            &format!("/.well-known/est/{label}/simpleenroll"),
            &csr,
            &["-H", PKCS10, "-H", &bearer(token)],
        )
    };
    let short = issuer.token_with("plc", Some("plc-7"), &["--ttl", "1s"])?;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    expect(&enroll("plc", &short)?, 401, "expired")?;
    expect(
        &enroll("plc", "not-a-token-we-ever-made")?,
        401,
        "unknown token",
    )?;

    let for_device = issuer.token("device", Some("plc-7"))?;
    expect(&enroll("plc", &for_device)?, 403, "for label device")?;
    let for_other = issuer.token("plc", Some("plc-8"))?;
    expect(
        &enroll("plc", &for_other)?,
        403,
        "this token is bound to subject \"plc-8\"; the CSR asks for \"plc-7\"",
    )?;
    // Refusals on policy keep the token: it still works where it belongs.
    assert_eq!(enroll("device", &for_device)?.status, 200);

    // Each refusal is in the audit log: what was asked, the status and why, the token by
    // its public id only.
    let audit = plant_tests::run_ok(issuer.cli().args(["audit", "tail", "--count", "50"]))?;
    let refusals: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("enrollment.refused"))
        .collect();
    ensure!(refusals.len() == 4, "{audit}");
    for needle in [
        "expired",
        "unknown token",
        "for label device",
        "bound to subject",
    ] {
        ensure!(
            refusals.iter().any(|r| r.contains(needle)),
            "no audited refusal says {needle:?}:\n{audit}"
        );
    }
    ensure!(refusals.iter().all(|r| r.contains("plc-7")), "{audit}");
    for secret in [&short, &for_device, &for_other] {
        ensure!(
            !audit.contains(secret.as_str()),
            "a token secret is in the audit log"
        );
    }
    let verified = plant_tests::run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    Ok(())
}

/// Enrolls `subject` with curl and returns (cert PEM, key) paths.
fn enrolled(issuer: &Issuer, dir: &Path, label: &str, subject: &str) -> Result<(PathBuf, PathBuf)> {
    let token = issuer.token(label, Some(subject))?;
    plant_tests::enroll_with_curl(issuer, dir, subject, label, &["-H", &bearer(&token)])
}

fn reenroll(
    issuer: &Issuer,
    dir: &Path,
    cert: &Path,
    key: &Path,
    subject: &str,
) -> Result<CurlAnswer> {
    plant_tests::reenroll_with(issuer, dir, (cert, key), key, subject, "renew")
}

#[test]
fn reenrollment_refuses_changed_subjects_foreign_revoked_and_expired_certificates() -> Result<()> {
    let issuer = Issuer::start_with(|config| {
        let mut text = std::fs::read_to_string(config)?;
        text.push_str(
            "\n[profiles.blink]\nlifetime = \"2s\"\nkey_usage = [\"digitalSignature\"]\nextended_key_usage = [\"clientAuth\"]\n",
        );
        std::fs::write(config, text)?;
        Ok(())
    })?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = enrolled(&issuer, dir.path(), "device", "dev-1")?;

    expect(
        &reenroll(&issuer, dir.path(), &cert, &key, "dev-2")?,
        403,
        "must keep the subject",
    )?;

    // No client certificate at all.
    let (_, csr) = openssl_csr(dir.path(), "anon", "dev-1", &[])?;
    expect(
        &post(
            &issuer,
            "/.well-known/est/simplereenroll",
            &csr,
            &["-H", PKCS10],
        )?,
        401,
        "TLS client certificate",
    )?;

    // A self-signed look-alike with the same subject.
    let fake = dir.path().join("fake.pem");
    openssl(&[
        "req",
        "-x509",
        "-key",
        &key.to_string_lossy(),
        "-subj",
        "/CN=dev-1",
        "-days",
        "1",
        "-out",
        &fake.to_string_lossy(),
    ])?;
    expect(
        &reenroll(&issuer, dir.path(), &fake, &key, "dev-1")?,
        403,
        "not issued by this CA",
    )?;

    // Revoked.
    issuer.revoke(&cert)?;
    expect(
        &reenroll(&issuer, dir.path(), &cert, &key, "dev-1")?,
        403,
        "revoked",
    )?;

    // Expired (a 2-second profile).
    let (short, short_key) = enrolled(&issuer, dir.path(), "blink", "blink-1")?;
    std::thread::sleep(std::time::Duration::from_millis(2500));
    expect(
        &reenroll(&issuer, dir.path(), &short, &short_key, "blink-1")?,
        403,
        "expired",
    )?;
    Ok(())
}
