//! `issuer status` and `issuer fingerprint`: what the CA is and where its keys live.

use super::ConfigArg;
use crate::signing_key::Phase;
use crate::Error;

pub(super) async fn run(arg: &ConfigArg) -> Result<(), Error> {
    let report = arg.admin().await?.status().await?;
    say!("trust domain        {}", report.trust_domain);
    say!("root fingerprint    {}", report.root_fingerprint);
    say!("root key            {}", report.root_key);
    say!("issuing key         {}", report.issuing_key);
    if let Some((waiting, capacity)) = report.issuing_key_queue {
        say!("  queue             {waiting} waiting (at most {capacity})");
    }
    say!("issuing CA expires  {}", report.issuing_ca_not_after);
    if report.signing_keys.is_empty() {
        say!("signing key         the issuing key signs every certificate");
    }
    for key in &report.signing_keys {
        let phase = match key.phase {
            Phase::Next => "next",
            Phase::Signing => "signing",
            Phase::Retired => "retired",
        };
        say!(
            "signing key         {phase:<8} in memory, serial {}, signs {} to {}, certificate valid to {}",
            key.serial, key.signs_from, key.signs_until, key.not_after
        );
    }
    if !report.signing_keys.is_empty() && !report.issuing_key_labels.is_empty() {
        say!(
            "issuing key signs   {} (sign_with = \"issuing-key\")",
            report.issuing_key_labels.join(", ")
        );
    }
    say!("labels              {}", report.labels.join(", "));
    say!("certificates        {}", report.certificates);
    if let Some(url) = &report.crl_url {
        say!("CRL                 {url}");
    }
    Ok(())
}

/// Reads the root certificate from disk: works with the issuer stopped.
pub(super) fn fingerprint(arg: &ConfigArg) -> Result<(), Error> {
    let config = arg.load()?;
    let root = crate::ca::read_pem_certificate(&config.resolve(&config.ca.root_certificate))?;
    say!("{}", est::fingerprint(&root));
    Ok(())
}
