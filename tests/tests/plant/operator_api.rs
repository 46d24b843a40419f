//! The read-only operator API over HTTPS, as a remote operator uses it with curl: an operator
//! client certificate reads the inventory, status and audit log; a device certificate, a
//! revoked operator certificate, or none, reads nothing; nothing that changes the CA is there.

use anyhow::{ensure, Result};
use plant_tests::{curl, enroll_with_token, Issuer};

#[test]
fn operator_certificates_read_the_inventory_and_nothing_else_does() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let enroll =
        |subject: &str, label: &str| enroll_with_token(&issuer, dir.path(), subject, label);
    let (operator, operator_key) = enroll("alice-ops", "operator")?;
    let (device, device_key) = enroll("gw-3", "device")?;
    let api = |path: &str, cert: Option<(&std::path::Path, &std::path::Path)>| {
        let url = format!("{}/api/v1/{path}", issuer.url);
        let (c, k) = cert
            .map(|(c, k)| {
                (
                    c.to_string_lossy().into_owned(),
                    k.to_string_lossy().into_owned(),
                )
            })
            .unwrap_or_default();
        let mut args = vec![url.as_str()];
        if cert.is_some() {
            args.extend(["--cert", c.as_str(), "--key", k.as_str()]);
        }
        curl(&issuer, &args)
    };
    let as_operator = Some((operator.as_path(), operator_key.as_path()));

    let answer = api("inventory?label=device", as_operator)?;
    ensure!(answer.status == 200, "{} {}", answer.status, answer.text());
    let page: serde_json::Value = serde_json::from_slice(&answer.body)?;
    let subjects: Vec<&str> = page["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["subject"].as_str())
        .collect();
    ensure!(subjects == ["gw-3"], "{}", answer.text());
    let status: serde_json::Value = serde_json::from_slice(&api("status", as_operator)?.body)?;
    ensure!(status["trust_domain"] == "plant.example", "{status}");
    let audit = api("audit?count=5", as_operator)?;
    ensure!(audit.status == 200 && audit.text().contains("certificate.issued"));

    // A device certificate is not an operator's; no certificate is nobody.
    let refused = api("inventory", Some((device.as_path(), device_key.as_path())))?;
    ensure!(
        refused.status == 403,
        "{} {}",
        refused.status,
        refused.text()
    );
    ensure!(
        refused.text().contains("label device"),
        "{}",
        refused.text()
    );
    let anonymous = api("inventory", None)?;
    ensure!(
        anonymous.status == 401,
        "{} {}",
        anonymous.status,
        anonymous.text()
    );
    ensure!(anonymous.text().contains("operator client certificate"));

    // The Prometheus metrics are here for an operator, whether or not a CRL listener is.
    let metrics_url = format!("{}/metrics", issuer.url);
    let (c, k) = (operator.to_string_lossy(), operator_key.to_string_lossy());
    let metrics = curl(&issuer, &[&metrics_url, "--cert", &c, "--key", &k])?;
    ensure!(
        metrics.status == 200
            && metrics
                .text()
                .contains("# TYPE plant_est_responses_total counter"),
        "{} {}",
        metrics.status,
        metrics.text()
    );
    ensure!(curl(&issuer, &[&metrics_url])?.status == 401);

    // Nothing that changes the CA is served here.
    let url = format!("{}/api/v1/tokens", issuer.url);
    let (c, k) = (operator.to_string_lossy(), operator_key.to_string_lossy());
    let create = curl(
        &issuer,
        &[
            "-X",
            "POST",
            "--cert",
            &c,
            "--key",
            &k,
            "-H",
            "Content-Type: application/json",
            "--data",
            "{}",
            &url,
        ],
    )?;
    ensure!(
        [404, 405].contains(&create.status),
        "{} {}",
        create.status,
        create.text()
    );

    // A revoked operator certificate reads nothing any more.
    issuer.revoke(&operator)?;
    let revoked = api("inventory", as_operator)?;
    ensure!(
        revoked.status == 403 && revoked.text().contains("revoked"),
        "{}",
        revoked.text()
    );
    Ok(())
}
