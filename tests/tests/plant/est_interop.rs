//! EST interoperability with clients nobody here wrote: curl for HTTP, the openssl CLI for
//! keys, CSRs, PKCS#7 and chain verification, pkilint for RFC 5280 conformance.

use anyhow::{ensure, Context, Result};
use plant_tests::{
    certs_from_pkcs7, curl, enroll_with_curl, openssl, openssl_csr, verify_chain, x509_field,
    Issuer,
};

const PKCS10: &str = "Content-Type: application/pkcs10";

#[test]
fn cacerts_and_csrattrs_read_with_curl_and_openssl() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let answer = curl(&issuer, &["/.well-known/est/cacerts"])?;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("Content-Type").as_deref(),
        Some("application/pkcs7-mime")
    );
    assert!(
        answer.header("Content-Length").is_some(),
        "{}",
        answer.headers
    );
    let pem = certs_from_pkcs7(&answer.body, dir.path(), "cacerts")?;
    let text = std::fs::read_to_string(&pem)?;
    assert_eq!(text.matches("BEGIN CERTIFICATE").count(), 2);
    assert!(text.contains("Plant Root CA") && text.contains("Plant Issuing CA 1"));

    let answer = curl(&issuer, &["/.well-known/est/plc/csrattrs"])?;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("Content-Type").as_deref(),
        Some("application/csrattrs")
    );
    let der = plant_tests::der_from_base64(&answer.body, dir.path(), "attrs.der")?;
    let parsed = openssl(&["asn1parse", "-inform", "DER", "-in", &der.to_string_lossy()])?;
    assert!(
        parsed.contains("prime256v1") && parsed.contains("ecdsa-with-SHA256"),
        "{parsed}"
    );
    Ok(())
}

#[test]
fn simpleenroll_with_basic_and_bearer_tokens_yields_verifiable_certificates() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;

    let token = issuer.token("plc", Some("plc-7"))?;
    let basic = format!("plc-7:{token}");
    let (cert, _) = enroll_with_curl(&issuer, dir.path(), "plc-7", "plc", &["-u", &basic])?;
    verify_chain(&issuer, &cert)?;
    assert!(x509_field(&cert, "-subject")?.contains("CN = plc-7"));

    let token = issuer.token("device", Some("gw-1"))?;
    let bearer = format!("Authorization: Bearer {token}");
    let (cert, _) = enroll_with_curl(&issuer, dir.path(), "gw-1", "device", &["-H", &bearer])?;
    verify_chain(&issuer, &cert)?;

    let inventory = issuer.inventory(&[])?;
    for subject in ["plc-7", "gw-1"] {
        assert!(
            inventory
                .iter()
                .any(|r| r["subject"] == subject && r["status"] == "valid"),
            "{subject} missing from {inventory:?}"
        );
    }
    Ok(())
}

#[test]
fn unauthenticated_enroll_gets_a_basic_challenge_spelled_as_libest_expects() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "x", "x", &[])?;
    let body = format!("@{}", csr.display());
    let answer = curl(
        &issuer,
        &[
            "-H",
            PKCS10,
            "--data-binary",
            &body,
            "/.well-known/est/simpleenroll",
        ],
    )?;
    assert_eq!(answer.status, 401);
    // Exact spelling: libest compares header names case-sensitively.
    assert!(
        answer
            .headers
            .contains("\r\nWWW-Authenticate: Basic realm="),
        "{}",
        answer.headers
    );
    assert!(answer.headers.contains("\r\nContent-Type: text/plain"));
    assert!(answer.headers.contains("\r\nContent-Length: "));
    assert!(!answer
        .headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked"));
    // curl's --anyauth sends credentials only after the challenge, as some clients do.
    let token = issuer.token("device", Some("x"))?;
    let user = format!("x:{token}");
    let answer = curl(
        &issuer,
        &[
            "--anyauth",
            "-u",
            &user,
            "-H",
            PKCS10,
            "--data-binary",
            &body,
            "/.well-known/est/simpleenroll",
        ],
    )?;
    assert_eq!(answer.status, 200, "{}", answer.text());
    Ok(())
}

#[test]
fn chunked_bodies_and_crlf_base64_are_accepted() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "dev-crlf", "dev-crlf", &[])?;
    let crlf = dir.path().join("crlf.b64");
    let text = std::fs::read_to_string(&csr)?;
    std::fs::write(&crlf, text.replace('\n', "\r\n") + "\r\n")?;
    let token = issuer.token("device", Some("dev-crlf"))?;
    let bearer = format!("Authorization: Bearer {token}");
    let body = format!("@{}", crlf.display());
    let answer = curl(
        &issuer,
        &[
            "-H",
            PKCS10,
            "-H",
            &bearer,
            "-H",
            "Transfer-Encoding: chunked",
            "--data-binary",
            &body,
            "/.well-known/est/simpleenroll",
        ],
    )?;
    assert_eq!(answer.status, 200, "{}", answer.text());
    Ok(())
}

#[test]
fn simplereenroll_with_the_current_certificate_renews_and_supersedes_it() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("hmi-3"))?;
    let basic = format!("hmi-3:{token}");
    let (cert, _) = enroll_with_curl(&issuer, dir.path(), "hmi-3", "device", &["-u", &basic])?;
    let key = dir.path().join("hmi-3.key");
    let old_serial = x509_field(&cert, "-serial")?;

    // Same key and subject (RFC 7030 §4.2.2); the token granted no SANs.
    let csr_der = dir.path().join("renew.der");
    openssl(&[
        "req",
        "-new",
        "-key",
        &key.to_string_lossy(),
        "-subj",
        "/CN=hmi-3",
        "-outform",
        "DER",
        "-out",
        &csr_der.to_string_lossy(),
    ])?;
    let csr_b64 = dir.path().join("renew.b64");
    plant_tests::base64_file(&csr_der, &csr_b64)?;
    let body = format!("@{}", csr_b64.display());
    let answer = curl(
        &issuer,
        &[
            "--cert",
            &cert.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
            "-H",
            PKCS10,
            "--data-binary",
            &body,
            "/.well-known/est/simplereenroll",
        ],
    )?;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let renewed = certs_from_pkcs7(&answer.body, dir.path(), "renewed")?;
    verify_chain(&issuer, &renewed)?;
    assert_ne!(x509_field(&renewed, "-serial")?, old_serial);
    assert!(x509_field(&renewed, "-subject")?.contains("CN = hmi-3"));

    let inventory = issuer.inventory(&[])?;
    let old_hex = old_serial
        .trim_start_matches("serial=")
        .to_ascii_lowercase();
    let old = inventory
        .iter()
        .find(|r| {
            r["serial"]
                .as_str()
                .is_some_and(|s| s.ends_with(&old_hex) || old_hex.ends_with(s))
        })
        .context("old certificate in inventory")?;
    assert_eq!(old["status"], "superseded");
    Ok(())
}

#[test]
fn serverkeygen_returns_a_key_and_certificate_openssl_can_read() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "plc-9", "plc-9", &[])?;
    let token = issuer.token("plc", Some("plc-9"))?;
    let user = format!("plc-9:{token}");
    let body = format!("@{}", csr.display());
    let answer = curl(
        &issuer,
        &[
            "-u",
            &user,
            "-H",
            PKCS10,
            "--data-binary",
            &body,
            "/.well-known/est/plc/serverkeygen",
        ],
    )?;
    assert_eq!(answer.status, 200, "{}", answer.text());
    let content_type = answer.header("Content-Type").context("content type")?;
    let boundary = content_type
        .split("boundary=")
        .nth(1)
        .context("boundary")?
        .trim_matches('"')
        .to_owned();
    // Split the multipart by hand (not with our own decoder) and hand each part to openssl.
    let text = answer.text();
    let parts: Vec<&str> = text
        .split(&format!("--{boundary}"))
        .filter(|p| p.contains("Content-Type"))
        .collect();
    assert_eq!(parts.len(), 2, "{text}");
    let mut key_pem = None;
    let mut cert_pem = None;
    for part in &parts {
        let (headers, content) = part.split_once("\r\n\r\n").context("part headers")?;
        assert!(
            headers.contains("Content-Transfer-Encoding: base64"),
            "{headers}"
        );
        if headers.contains("application/pkcs8") {
            let der =
                plant_tests::der_from_base64(content.trim().as_bytes(), dir.path(), "key.der")?;
            let pem = dir.path().join("key.pem");
            openssl(&[
                "pkey",
                "-inform",
                "DER",
                "-in",
                &der.to_string_lossy(),
                "-out",
                &pem.to_string_lossy(),
            ])?;
            key_pem = Some(pem);
        } else {
            cert_pem = Some(certs_from_pkcs7(
                content.trim().as_bytes(),
                dir.path(),
                "skg",
            )?);
        }
    }
    let (key_pem, cert_pem) = (key_pem.context("key part")?, cert_pem.context("cert part")?);
    verify_chain(&issuer, &cert_pem)?;
    let key_pub = openssl(&["pkey", "-in", &key_pem.to_string_lossy(), "-pubout"])?;
    let cert_pub = openssl(&[
        "x509",
        "-in",
        &cert_pem.to_string_lossy(),
        "-noout",
        "-pubkey",
    ])?;
    assert_eq!(key_pub, cert_pub, "the key part matches the certificate");

    // Labels without server_keygen refuse it.
    let token = issuer.token("device", Some("dev-5"))?;
    let user = format!("dev-5:{token}");
    let answer = curl(
        &issuer,
        &[
            "-u",
            &user,
            "-H",
            PKCS10,
            "--data-binary",
            &body,
            "/.well-known/est/device/serverkeygen",
        ],
    )?;
    assert_eq!(answer.status, 403, "{}", answer.text());
    Ok(())
}

#[test]
fn issued_certificates_of_every_profile_pass_pkilint() -> Result<()> {
    // pkilint wants dotted DNS names (its validator rejects single labels like
    // `localhost`), so this issuer's listener certificate uses one. Leaves are signed by a
    // short-lived signing key, whose own certificate is linted too.
    let issuer = Issuer::start_custom(
        &["--dns", "est.plant.example", "--ip", "127.0.0.1"],
        plant_tests::enable_short_lived_keys,
    )?;
    let dir = tempfile::tempdir()?;
    let mut certs = Vec::new();
    for (label, names) in [
        ("device", vec![]),
        ("plc", vec!["--ip", "10.20.30.40"]),
        ("server", vec!["--dns", "historian.plant.example"]),
        ("operator", vec![]),
    ] {
        let subject = format!("{label}-lint");
        let token = issuer.token_with(label, Some(&subject), &names)?;
        let user = format!("{subject}:{token}");
        let mut extra = vec![];
        if let Some(dns) = names
            .iter()
            .position(|n| *n == "--dns")
            .map(|i| names[i + 1])
        {
            extra.push(format!("subjectAltName=DNS:{dns}"));
        }
        let (_, csr) = openssl_csr(
            dir.path(),
            &subject,
            &subject,
            &extra
                .iter()
                .flat_map(|e| ["-addext", e.as_str()])
                .collect::<Vec<_>>(),
        )?;
        let body = format!("@{}", csr.display());
        let path = format!("/.well-known/est/{label}/simpleenroll");
        let answer = curl(
            &issuer,
            &["-u", &user, "-H", PKCS10, "--data-binary", &body, &path],
        )?;
        ensure!(answer.status == 200, "{label}: {}", answer.text());
        let cert = certs_from_pkcs7(&answer.body, dir.path(), &subject)?;
        plant_tests::verify_chain(&issuer, &cert)?;
        certs.push(cert);
    }
    certs.push(issuer.dir.path().join("tls/server.crt"));
    // cacerts: the short-lived signing key's certificate first, then issuing CA and root.
    let cacerts = curl(&issuer, &["/.well-known/est/cacerts"])?;
    let cacerts = certs_from_pkcs7(&cacerts.body, dir.path(), "cacerts")?;
    ensure!(
        std::fs::read_to_string(&cacerts)?
            .matches("BEGIN CERTIFICATE")
            .count()
            == 3,
        "cacerts should hold signing key, issuing CA and root"
    );
    certs.push(cacerts);
    certs.push(issuer.issuing_pem());
    for (i, cert) in certs.iter().enumerate() {
        // pkilint takes one bare certificate: strip openssl's text and the chain.
        let leaf = dir.path().join(format!("leaf-{i}.pem"));
        openssl(&[
            "x509",
            "-in",
            &cert.to_string_lossy(),
            "-out",
            &leaf.to_string_lossy(),
        ])?;
        let findings: Vec<String> = plant_tests::pkilint_findings(&leaf)?
            .into_iter()
            // The listener's certificate carries the issuer's SPIFFE ID; pkilint calls every
            // spiffe:// URI invalid (see agent_api.rs), the issuer checks them itself.
            .filter(|f| {
                !(f["code"] == "pkix.invalid_uri_syntax"
                    && f["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("\"spiffe://")))
            })
            .map(|f| format!("{} {}", f["severity"], f["code"]))
            .collect();
        let errors: Vec<&String> = findings
            .iter()
            .filter(|f| f.contains("ERROR") || f.contains("FATAL"))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:?}", cert.display());
        assert!(
            findings.is_empty(),
            "{}: warnings {findings:?}",
            cert.display()
        );
    }
    Ok(())
}
