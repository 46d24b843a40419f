//! Renewal follows a lineage (DESIGN §3), attacked against a real `issuer serve` with curl and
//! openssl: only the current, unexpired, unrevoked certificate of a lineage renews; a lost
//! answer is repeated (the same certificate, within a window), never reissued; revoking any
//! certificate of a lineage ends it; SVIDs never renew over EST.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use plant_tests::{
    agent_api_channel, certs_from_pkcs7, curl, enroll_with_token, serial_hex, CurlAnswer, Issuer,
};

/// `simplereenroll` of `cert` with its own key, as a device renews.
fn reenroll(
    issuer: &Issuer,
    dir: &Path,
    (cert, key): (&Path, &Path),
    subject: &str,
    name: &str,
) -> Result<CurlAnswer> {
    plant_tests::reenroll_with(issuer, dir, (cert, key), key, subject, name)
}

/// A renewal that must succeed; the new certificate's PEM.
fn renewed(answer: &CurlAnswer, dir: &Path, name: &str) -> Result<PathBuf> {
    ensure!(
        answer.status == 200,
        "renewal {name}: {} {}",
        answer.status,
        answer.text()
    );
    certs_from_pkcs7(&answer.body, dir, name)
}

/// A renewal that must be refused with 403 and a message containing `needle`.
fn refused(answer: &CurlAnswer, needle: &str, what: &str) -> Result<()> {
    ensure!(
        answer.status == 403 && answer.text().contains(needle),
        "{what}: expected 403 saying {needle:?}, got {} {}",
        answer.status,
        answer.text()
    );
    Ok(())
}

/// How many inventory rows have subject `subject`.
fn certificates_of(issuer: &Issuer, subject: &str) -> Result<usize> {
    Ok(issuer
        .inventory(&[])?
        .iter()
        .filter(|r| r["subject"] == subject)
        .count())
}

/// A renews to B; B is revoked for keyCompromise. The superseded A must not renew again
/// (before: a fresh one-year certificate, as often as asked), nor the revoked B.
#[test]
fn a_superseded_certificate_cannot_renew_after_its_successor_is_revoked() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (a, key) = enroll_with_token(&issuer, dir.path(), "gw-7", "device")?;
    let b = renewed(
        &reenroll(&issuer, dir.path(), (&a, &key), "gw-7", "a-to-b")?,
        dir.path(),
        "b",
    )?;
    issuer.revoke(&b)?;

    let again = reenroll(&issuer, dir.path(), (&a, &key), "gw-7", "a-again")?;
    refused(
        &again,
        "lineage",
        "renewing A after its successor B was revoked",
    )?;
    refused(
        &reenroll(&issuer, dir.path(), (&b, &key), "gw-7", "b-again")?,
        "revoked",
        "renewing the revoked B",
    )?;
    ensure!(
        certificates_of(&issuer, "gw-7")? == 2,
        "a certificate was issued to an ended lineage: {:?}",
        issuer.inventory(&[])?
    );
    Ok(())
}

/// A device that lost the answer to its renewal asks again with the superseded certificate:
/// within the window it gets the same successor back, never a new one; not for another key;
/// and once the window has passed (the issuer's clock 10 minutes on), nothing.
#[test]
fn a_lost_renewal_answer_is_repeated_within_the_window_and_never_reissued() -> Result<()> {
    let mut issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (a, key) = enroll_with_token(&issuer, dir.path(), "hmi-4", "device")?;
    let b = renewed(
        &reenroll(&issuer, dir.path(), (&a, &key), "hmi-4", "a-to-b")?,
        dir.path(),
        "b",
    )?;
    let retried = renewed(
        &reenroll(&issuer, dir.path(), (&a, &key), "hmi-4", "a-retry")?,
        dir.path(),
        "b-again",
    )?;
    ensure!(
        serial_hex(&retried)? == serial_hex(&b)?,
        "the retry got a new certificate {} instead of the successor {}",
        serial_hex(&retried)?,
        serial_hex(&b)?
    );
    ensure!(certificates_of(&issuer, "hmi-4")? == 2, "a retry issued");

    // A retry for another key would hand the device a certificate it has no key for.
    let (other_key, _) = plant_tests::openssl_csr(dir.path(), "other", "hmi-4", &[])?;
    refused(
        &plant_tests::reenroll_with(
            &issuer,
            dir.path(),
            (&a, &key),
            &other_key,
            "hmi-4",
            "a-other-key",
        )?,
        "same key",
        "a retry with another key",
    )?;

    // The default window is 5 minutes.
    issuer.serve_shifted("+10m")?;
    refused(
        &reenroll(&issuer, dir.path(), (&a, &key), "hmi-4", "a-late")?,
        "renews no",
        "a superseded certificate after the retry window",
    )?;
    ensure!(
        certificates_of(&issuer, "hmi-4")? == 2,
        "a late retry issued"
    );
    // The current certificate still renews.
    renewed(
        &reenroll(&issuer, dir.path(), (&b, &key), "hmi-4", "b-to-c")?,
        dir.path(),
        "c",
    )?;
    Ok(())
}

/// An issuer with an extra 10-day profile `name` (with `extra` lines).
fn issuer_with_ten_day_profile(name: &str, extra: &str) -> Result<Issuer> {
    Issuer::start_with(|config| {
        let mut text = std::fs::read_to_string(config)?;
        text.push_str(&format!(
            "\n[profiles.{name}]\nlifetime = \"10d\"\nkey_usage = [\"digitalSignature\"]\n\
             extended_key_usage = [\"clientAuth\"]\n{extra}"
        ));
        std::fs::write(config, text)?;
        Ok(())
    })
}

/// A 10-day certificate renewed, then the issuer's clock 12 days on: the superseded, expired
/// certificate does not renew (before: it did, into a fresh certificate), nor does the
/// expired current one.
#[test]
fn an_expired_superseded_certificate_does_not_renew() -> Result<()> {
    let mut issuer = issuer_with_ten_day_profile("brief", "")?;
    let dir = tempfile::tempdir()?;
    let (a, key) = enroll_with_token(&issuer, dir.path(), "dev-a", "brief")?;
    let b = renewed(
        &reenroll(&issuer, dir.path(), (&a, &key), "dev-a", "a-to-b")?,
        dir.path(),
        "b",
    )?;
    issuer.serve_shifted("+12d")?;
    refused(
        &reenroll(&issuer, dir.path(), (&a, &key), "dev-a", "a-expired")?,
        "renews no",
        "an expired superseded certificate",
    )?;
    refused(
        &reenroll(&issuer, dir.path(), (&b, &key), "dev-a", "b-expired")?,
        "expired",
        "an expired certificate of a profile without renewal_grace",
    )?;
    ensure!(
        certificates_of(&issuer, "dev-a")? == 2,
        "an expired certificate renewed"
    );
    Ok(())
}

/// A profile with `renewal_grace = "5d"`: 2 days after expiry its certificate renews, 6 days
/// after, it does not.
#[test]
fn an_expired_certificate_renews_only_within_its_profiles_grace() -> Result<()> {
    let mut issuer = issuer_with_ten_day_profile("lenient", "renewal_grace = \"5d\"\n")?;
    let dir = tempfile::tempdir()?;
    let (g, g_key) = enroll_with_token(&issuer, dir.path(), "dev-g", "lenient")?;
    let (h, h_key) = enroll_with_token(&issuer, dir.path(), "dev-h", "lenient")?;
    issuer.serve_shifted("+12d")?;
    renewed(
        &reenroll(&issuer, dir.path(), (&g, &g_key), "dev-g", "g-grace")?,
        dir.path(),
        "g2",
    )?;
    issuer.serve_shifted("+16d")?;
    refused(
        &reenroll(&issuer, dir.path(), (&h, &h_key), "dev-h", "h-late")?,
        "renews up to 5d after expiry",
        "an expired certificate past its grace",
    )?;
    Ok(())
}

/// The operator API over curl with `cert`/`key`: the answer to `GET /api/v1/inventory`.
fn operator_api(issuer: &Issuer, cert: &Path, key: &Path) -> Result<CurlAnswer> {
    let url = format!("{}/api/v1/inventory", issuer.url);
    curl(
        issuer,
        &[
            url.as_str(),
            "--cert",
            &cert.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
        ],
    )
}

/// An operator whose current certificate was revoked renews an older one of theirs: before,
/// that gave a fresh operator certificate and the operator API back. And revoking an
/// operator's older certificate takes the access of the newer one too: the lineage ended.
#[test]
fn a_revoked_operator_cannot_regain_the_operator_api_by_renewing_an_older_certificate() -> Result<()>
{
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (old, key) = enroll_with_token(&issuer, dir.path(), "eve-ops", "operator")?;
    let current = renewed(
        &reenroll(&issuer, dir.path(), (&old, &key), "eve-ops", "eve-renew")?,
        dir.path(),
        "eve-current",
    )?;
    let answer = operator_api(&issuer, &current, &key)?;
    ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
    issuer.revoke(&current)?;

    let regain = reenroll(&issuer, dir.path(), (&old, &key), "eve-ops", "eve-regain")?;
    if regain.status == 200 {
        let fresh = certs_from_pkcs7(&regain.body, dir.path(), "eve-fresh")?;
        let access = operator_api(&issuer, &fresh, &key)?;
        anyhow::bail!(
            "the revoked operator renewed the older certificate and reads the operator API \
             with it: {} {}",
            access.status,
            access.text()
        );
    }
    refused(
        &regain,
        "lineage",
        "the revoked operator renewing an older certificate",
    )?;
    for (cert, what) in [(&old, "the superseded"), (&current, "the revoked")] {
        let answer = operator_api(&issuer, cert, &key)?;
        ensure!(
            answer.status == 403,
            "{what} operator certificate: {} {}",
            answer.status,
            answer.text()
        );
    }

    // Another operator: the older certificate is revoked, the newer one loses access too.
    let (first, first_key) = enroll_with_token(&issuer, dir.path(), "bob-ops", "operator")?;
    let second = renewed(
        &reenroll(
            &issuer,
            dir.path(),
            (&first, &first_key),
            "bob-ops",
            "bob-renew",
        )?,
        dir.path(),
        "bob-second",
    )?;
    issuer.revoke(&first)?;
    let answer = operator_api(&issuer, &second, &first_key)?;
    ensure!(
        answer.status == 403 && answer.text().contains("lineage"),
        "the operator's newer certificate after the older one was revoked: {} {}",
        answer.status,
        answer.text()
    );
    refused(
        &reenroll(
            &issuer,
            dir.path(),
            (&second, &first_key),
            "bob-ops",
            "bob-again",
        )?,
        "lineage",
        "renewing the newer certificate of an ended lineage",
    )?;
    Ok(())
}

/// A workload X509-SVID, minted over the agent API, presented to `simplereenroll` with a CSR
/// that keeps its subject: before, it reached issuance and the issuer answered 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_svid_presented_to_simplereenroll_is_refused_403() -> Result<()> {
    use proto::agent::agent_client::AgentClient;
    use proto::agent::{
        attest_request, attest_response, evidence, AttestRequest, Evidence, JoinTokenEvidence,
        MintX509SvidsRequest, X509SvidRequest,
    };
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let key_and_csr = || -> Result<(rcgen::KeyPair, Vec<u8>)> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .der()
            .to_vec();
        Ok((key, csr))
    };

    // A node attests with a join token and mints a workload SVID for its entry.
    let (node_key, csr) = key_and_csr()?;
    let evidence = AttestRequest {
        step: Some(attest_request::Step::Evidence(Evidence {
            csr,
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence {
                token: issuer.join_token()?,
            })),
        })),
    };
    let mut client = AgentClient::new(agent_api_channel(&issuer, None).await?);
    let node_svid = match client
        .attest(tokio_stream::iter([evidence]))
        .await?
        .into_inner()
        .message()
        .await?
        .and_then(|r| r.step)
    {
        Some(attest_response::Step::NodeSvid(svid)) => svid,
        other => anyhow::bail!("no node SVID: {other:?}"),
    };
    let entry = issuer.create_entry(
        "spiffe://plant.example/historian",
        &node_svid.spiffe_id,
        &["unix:uid:1000"],
        &[],
    )?;
    let mut node = AgentClient::new(
        agent_api_channel(
            &issuer,
            Some((node_svid.chain.clone(), node_key.serialize_der())),
        )
        .await?,
    );
    let (workload_key, csr) = key_and_csr()?;
    let minted = node
        .mint_x509_svids(MintX509SvidsRequest {
            requests: vec![X509SvidRequest {
                entry_id: entry,
                csr,
            }],
        })
        .await?
        .into_inner();
    let svid = minted.svids.first().context("no SVID minted")?;
    let cert = dir.path().join("historian.pem");
    plant_tests::write_pem(&cert, &svid.chain)?;
    let key = dir.path().join("historian.key");
    std::fs::write(&key, workload_key.serialize_pem())?;
    let subject = plant_tests::x509_field(&cert, "-subject")?;
    ensure!(subject.contains("historian"), "{subject}");

    let answer = reenroll(&issuer, dir.path(), (&cert, &key), "historian", "svid")?;
    refused(&answer, "SVID", "a workload SVID at simplereenroll")?;
    ensure!(
        !issuer.log().contains("issuance failed"),
        "the SVID reached issuance:\n{}",
        issuer.log()
    );
    Ok(())
}
