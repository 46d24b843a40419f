//! Certificate profiles: what a certificate issued under a label looks like. Certificates are
//! built from the profile, never from what a CSR asks for (DESIGN §3).

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Key usages a leaf may carry. keyCertSign and cRLSign are absent on purpose: no profile can
/// make a CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyUsage {
    /// digitalSignature: TLS with ECDHE, signing.
    DigitalSignature,
    /// keyAgreement: static ECDH.
    KeyAgreement,
}

/// Extended key usages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExtendedKeyUsage {
    /// TLS server.
    ServerAuth,
    /// TLS client.
    ClientAuth,
}

/// subjectAltName kinds a profile allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SanKind {
    /// dNSName.
    Dns,
    /// iPAddress.
    Ip,
}

/// One profile (`[profiles.<label>]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// What the profile is for, shown to operators.
    #[serde(default)]
    pub description: String,
    /// Certificate lifetime (capped at the issuing CA's own notAfter).
    #[serde(with = "proto::duration::serde_text")]
    pub lifetime: Duration,
    /// keyUsage bits (always marked critical).
    pub key_usage: Vec<KeyUsage>,
    /// extendedKeyUsage purposes.
    pub extended_key_usage: Vec<ExtendedKeyUsage>,
    /// Which subjectAltName kinds tokens for this profile may grant.
    #[serde(default)]
    pub san: Vec<SanKind>,
    /// Whether `serverkeygen` is offered (for devices that can't make their own key).
    #[serde(default)]
    pub server_keygen: bool,
    /// Which key signs: the short-lived signing key (default) or the issuing key itself.
    #[serde(default)]
    pub sign_with: crate::ca::SignWith,
    /// Whether certificates of this profile may read the operator API (`/api/v1/…` on the
    /// EST listener) as TLS client certificates.
    #[serde(default)]
    pub operator: bool,
    /// How long after notAfter a certificate of this profile may still renew itself
    /// (`simplereenroll`); default none: an expired certificate enrolls again with a token.
    #[serde(
        with = "proto::duration::serde_text",
        default,
        skip_serializing_if = "Duration::is_zero"
    )]
    pub renewal_grace: Duration,
    /// Whether several valid certificates may carry the same subject under this label (a
    /// load generator, a pool of identical sensors). Default no: a subject names one device
    /// at a time (x509pop node identity rests on it), and a second enrollment for a subject
    /// that still has a valid certificate is refused until that one is revoked or expires.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub shared_subjects: bool,
}

impl Profile {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.lifetime < Duration::from_secs(1) {
            return Err("lifetime must be at least 1s".into());
        }
        if self.key_usage.is_empty() {
            return Err("key_usage must name at least one usage".into());
        }
        if self.renewal_grace > self.lifetime {
            return Err(format!(
                "renewal_grace ({}) is longer than the lifetime ({}): an expired certificate \
                 that renews must have expired recently; lower renewal_grace",
                proto::duration::format(self.renewal_grace),
                proto::duration::format(self.lifetime)
            ));
        }
        Ok(())
    }

    /// Whether names of `kind` may appear in certificates of this profile.
    pub fn allows(&self, kind: SanKind) -> bool {
        self.san.contains(&kind)
    }

    pub(crate) fn rcgen_key_usages(&self) -> Vec<rcgen::KeyUsagePurpose> {
        self.key_usage
            .iter()
            .map(|k| match k {
                KeyUsage::DigitalSignature => rcgen::KeyUsagePurpose::DigitalSignature,
                KeyUsage::KeyAgreement => rcgen::KeyUsagePurpose::KeyAgreement,
            })
            .collect()
    }

    pub(crate) fn rcgen_extended_key_usages(&self) -> Vec<rcgen::ExtendedKeyUsagePurpose> {
        self.extended_key_usage
            .iter()
            .map(|k| match k {
                ExtendedKeyUsage::ServerAuth => rcgen::ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsage::ClientAuth => rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            })
            .collect()
    }
}

/// The profiles `issuer init` writes: a general device, a PLC (long-lived, serverkeygen for
/// controllers that can't make keys), and a TLS server.
pub fn defaults() -> Vec<(&'static str, Profile)> {
    use ExtendedKeyUsage::*;
    vec![
        (
            "device",
            Profile {
                description: "field devices and gateways: TLS client and server".into(),
                lifetime: Duration::from_secs(365 * 86_400),
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ClientAuth, ServerAuth],
                san: vec![SanKind::Dns, SanKind::Ip],
                server_keygen: false,
                sign_with: Default::default(),
                operator: false,
                renewal_grace: Duration::ZERO,
                shared_subjects: false,
            },
        ),
        (
            "plc",
            Profile {
                description: "PLCs: long-lived, server-generated keys allowed".into(),
                lifetime: Duration::from_secs(2 * 365 * 86_400),
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ServerAuth, ClientAuth],
                san: vec![SanKind::Dns, SanKind::Ip],
                server_keygen: true,
                sign_with: Default::default(),
                operator: false,
                renewal_grace: Duration::ZERO,
                shared_subjects: false,
            },
        ),
        (
            "operator",
            Profile {
                description: "PKI operators: the read-only HTTPS operator API".into(),
                lifetime: Duration::from_secs(90 * 86_400),
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ClientAuth],
                san: vec![],
                server_keygen: false,
                sign_with: Default::default(),
                operator: true,
                renewal_grace: Duration::ZERO,
                shared_subjects: false,
            },
        ),
        (
            "server",
            Profile {
                description: "TLS servers (historians, HMIs, web consoles)".into(),
                lifetime: Duration::from_secs(90 * 86_400),
                key_usage: vec![KeyUsage::DigitalSignature],
                extended_key_usage: vec![ServerAuth],
                san: vec![SanKind::Dns, SanKind::Ip],
                server_keygen: false,
                sign_with: Default::default(),
                operator: false,
                renewal_grace: Duration::ZERO,
                shared_subjects: false,
            },
        ),
    ]
}

/// The profile of workload X509-SVIDs (label `svid`).
pub const SVID: &str = "svid";
/// The profile of agents' node SVIDs (label `node-svid`).
pub const NODE_SVID: &str = "node-svid";
/// The profile of the issuer's own TLS server certificate (label `issuer-server`): its
/// names plus the issuer's SPIFFE ID, which clients pin (`est::tls::issuer_verifier`).
pub const ISSUER_SERVER: &str = "issuer-server";
/// How long the issuer's own TLS certificate is valid; `issuer serve` renews it at start
/// when it has less than a third of this left.
pub const ISSUER_SERVER_LIFETIME: Duration = Duration::from_secs(90 * 86_400);

/// The profiles of certificates with a SPIFFE ID, reachable only from the issuer's own code,
/// never from an EST label: the issuer's TLS certificate, and the SVID profiles (DESIGN §5): CA=false, keyUsage digitalSignature (critical), EKU
/// serverAuth + clientAuth, one URI SAN (the SPIFFE ID) and, for workloads, DNS names.
/// `x509_svid_ttl` and `node_svid_ttl` come from `[agent_api]`.
pub fn spiffe(
    x509_svid_ttl: Duration,
    node_svid_ttl: Duration,
) -> std::collections::BTreeMap<String, Profile> {
    let profile = |description: &str, lifetime, san| Profile {
        description: description.into(),
        lifetime,
        key_usage: vec![KeyUsage::DigitalSignature],
        extended_key_usage: vec![ExtendedKeyUsage::ServerAuth, ExtendedKeyUsage::ClientAuth],
        san,
        server_keygen: false,
        sign_with: Default::default(),
        operator: false,
        renewal_grace: Duration::ZERO,
        shared_subjects: false,
    };
    [
        (
            SVID.to_owned(),
            profile("workload X509-SVIDs", x509_svid_ttl, vec![SanKind::Dns]),
        ),
        (
            NODE_SVID.to_owned(),
            profile("agent node SVIDs", node_svid_ttl, vec![]),
        ),
        (
            ISSUER_SERVER.to_owned(),
            Profile {
                extended_key_usage: vec![ExtendedKeyUsage::ServerAuth],
                ..profile(
                    "the issuer's own TLS server certificate",
                    ISSUER_SERVER_LIFETIME,
                    vec![SanKind::Dns, SanKind::Ip],
                )
            },
        ),
    ]
    .into_iter()
    .collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    /// The smallest configuration that loads, with `est` and `profile` lines added.
    fn config(est: &str, profile: &str) -> Result<Config, crate::Error> {
        let text = format!(
            "trust_domain = \"plant.test\"\nstate_dir = \"state\"\ndefault_profile = \"device\"\n\
             [ca]\nroot_certificate = \"ca/root.crt\"\nissuing_certificate = \"ca/issuing.crt\"\n\
             issuing_key = \"soft:path=ca/issuing.key\"\n\
             [est]\nlisten = \"127.0.0.1:0\"\ntls_certificate = \"tls/server.crt\"\n\
             tls_key = \"tls/server.key\"\n{est}\n\
             [profiles.device]\nlifetime = \"30d\"\nkey_usage = [\"digitalSignature\"]\n\
             extended_key_usage = [\"clientAuth\"]\n{profile}\n"
        );
        Config::parse(Path::new("/etc/plant/issuer.toml"), &text)
    }

    #[test]
    fn renewal_grace_and_retry_window_default_to_none_and_five_minutes() {
        let loaded = config("", "").expect("loads");
        assert!(loaded.profiles["device"].renewal_grace.is_zero());
        assert_eq!(loaded.est.renewal_retry_window.as_secs(), 300);
        let loaded =
            config("renewal_retry_window = \"0s\"", "renewal_grace = \"7d\"").expect("loads");
        assert_eq!(
            loaded.profiles["device"].renewal_grace.as_secs(),
            7 * 86_400
        );
        assert!(loaded.est.renewal_retry_window.is_zero());
    }

    #[test]
    fn a_grace_longer_than_the_lifetime_or_a_day_long_retry_window_is_refused() {
        let err = config("", "renewal_grace = \"31d\"")
            .expect_err("grace > lifetime")
            .to_string();
        assert!(
            err.contains("[profiles.device]") && err.contains("renewal_grace"),
            "{err}"
        );
        let err = config("renewal_retry_window = \"2d\"", "")
            .expect_err("window > 24h")
            .to_string();
        assert!(err.contains("est.renewal_retry_window"), "{err}");
    }
}
