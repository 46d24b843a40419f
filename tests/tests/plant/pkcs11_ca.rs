//! The issuing CA key in a PKCS#11 HSM: SoftHSM2, with a token store of this test's own.
//! `issuer init --ca-key pkcs11:…` generates the key inside the token; certificates signed
//! through short-lived keys and directly by the HSM key verify with openssl; a wrong PIN
//! stops `issuer serve` with a message that names the token and the PIN.

use std::path::Path;

use anyhow::{ensure, Result};
use plant_tests::{
    authority_key_id, certs_from_pkcs7, enroll_bearer, openssl_csr, subject_key_id, verify_chain,
    Issuer,
};

const MODULE: &str = hsm::DEFAULT_PKCS11_MODULE;

/// A SoftHSM2 token `plant-ca` (PIN in `dir/pin`, a wrong one in `dir/wrong-pin`); the
/// answer is its SoftHSM2 configuration file, for the `issuer` children's `SOFTHSM2_CONF`.
fn softhsm(dir: &Path) -> Result<String> {
    let conf = plant_tests::softhsm_token(dir, "plant-ca", "4711")?;
    std::fs::write(dir.join("pin"), "4711\n")?;
    std::fs::write(dir.join("wrong-pin"), "1111\n")?;
    Ok(conf.to_string_lossy().into_owned())
}

#[test]
fn an_hsm_held_ca_key_issues_directly_and_through_short_lived_keys_and_a_wrong_pin_is_named(
) -> Result<()> {
    let hsm_dir = tempfile::tempdir()?;
    let conf = softhsm(hsm_dir.path())?;
    let key_ref = |pin: &str| {
        format!(
            "pkcs11:module={MODULE};token=plant-ca;object=issuing-ca;pin-file={}",
            hsm_dir.path().join(pin).display()
        )
    };
    let env = [("SOFTHSM2_CONF", conf.as_str())];
    let mut issuer = Issuer::start_custom_env(&env, &["--ca-key", &key_ref("pin")], |toml| {
        let text = std::fs::read_to_string(toml)?;
        ensure!(
            text.contains("\n[ca.signing_key]\n"),
            "init did not turn on short-lived keys for an HSM key"
        );
        plant_tests::add_direct_profile(toml)
    })?;
    // No key file: the key exists only in the token.
    ensure!(!issuer.dir.path().join("ca/issuing.key").exists());
    let status = plant_tests::run_ok(issuer.cli().arg("status"))?;
    ensure!(
        status.contains("plant-ca") && status.contains("signing key         signing"),
        "{status}"
    );

    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "dev", "hsm-device", &[])?;
    let issuing_ski = subject_key_id(&issuer.issuing_pem())?;
    for (label, by_hsm_key) in [("device", false), ("direct", true)] {
        let answer = enroll_bearer(&issuer, &csr, label, &issuer.token(label, None)?)?;
        ensure!(answer.status == 200, "{label}: {}", answer.text());
        let cert = certs_from_pkcs7(&answer.body, dir.path(), label)?;
        verify_chain(&issuer, &cert)?;
        ensure!(
            (authority_key_id(&cert)? == issuing_ski) == by_hsm_key,
            "{label}: signed by the wrong key"
        );
    }

    // A wrong PIN: serve refuses to start and says which token and what to fix.
    issuer.kill()?;
    let config = std::fs::read_to_string(issuer.config())?;
    std::fs::write(
        issuer.config(),
        config.replace(&key_ref("pin"), &key_ref("wrong-pin")),
    )?;
    let refused = issuer.serve().expect_err("serve started with a wrong PIN");
    let message = refused.to_string();
    ensure!(
        message.contains("plant-ca") && message.to_lowercase().contains("pin"),
        "{message}"
    );
    ensure!(
        !message.contains("1111"),
        "the PIN is in the message: {message}"
    );
    Ok(())
}
