//! `issuer init`: a new plant CA in a folder, ready to `serve`.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::authority::Authority;
use crate::clock::SystemClock;
use crate::config::Config;
use crate::grant::valid_dns;
use crate::profile::{self, Profile};
use crate::Error;

/// What to create.
#[derive(Debug, Clone)]
pub struct InitOptions {
    /// The folder (created if missing; must not hold an issuer.toml yet).
    pub dir: PathBuf,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Organization name in CA subjects.
    pub organization: String,
    /// EST listen address.
    pub listen: SocketAddr,
    /// CRL (plain HTTP) listen address.
    pub crl_listen: SocketAddr,
    /// Agent API (gRPC over TLS) listen address.
    pub agent_api_listen: SocketAddr,
    /// Where the issuing CA key is created (relative paths: inside the CA folder).
    pub ca_key: String,
    /// DNS names for the EST server certificate.
    pub dns: Vec<String>,
    /// IP addresses for the EST server certificate.
    pub ips: Vec<IpAddr>,
}

/// What was created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The configuration file.
    pub config: PathBuf,
    /// Root fingerprint (SHA-256 hex) to give engineers out of band.
    pub root_fingerprint: String,
}

/// Creates the CA hierarchy, the EST server certificate and `issuer.toml`.
pub async fn run(options: &InitOptions) -> Result<InitReport, Error> {
    let dir = &options.dir;
    let config_path = dir.join("issuer.toml");
    if config_path.exists() {
        return Err(Error::Config(format!(
            "{} exists already; init never overwrites a CA",
            config_path.display()
        )));
    }
    if let Some(bad) = options.dns.iter().find(|d| !valid_dns(d)) {
        return Err(Error::Config(format!(
            "--dns {bad:?} is not a valid DNS name"
        )));
    }
    for sub in ["", "ca", "tls", "state"] {
        let path = dir.join(sub);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(Error::io(&path))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(&path))?;
    }
    let hierarchy = crate::ca::create_hierarchy(
        &options.organization,
        &options.trust_domain,
        &hsm::KeyRef::soft(dir.join("ca/root.key")),
        &options
            .ca_key
            .parse::<hsm::KeyRef>()
            .map_err(|e| Error::Config(format!("--ca-key: {e}")))?
            .with_base_dir(dir),
    )?;
    write(&dir.join("ca/root.crt"), &hierarchy.root_pem)?;
    write(&dir.join("ca/issuing.crt"), &hierarchy.issuing_pem)?;
    write(&config_path, &template(options))?;

    // The EST server's own certificate goes through the normal pipeline, so it is in the
    // inventory and its expiry is watched like any other. It carries the issuer's SPIFFE ID,
    // which clients pin (see `tls::issue_listener_certificate`).
    let config = Config::load(&config_path)?;
    let authority = Authority::open(&config, Arc::new(SystemClock))?;
    let tls_key = hsm::SoftKey::create(&dir.join("tls/server.key"))?;
    let der = crate::tls::issue_listener_certificate(
        &authority,
        hsm::Signer::public_key(&tls_key).point(),
        &crate::grant::ListenerNames {
            dns: options.dns.clone(),
            ips: options.ips.clone(),
        },
        None,
    )
    .await?;
    let chain = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &der)
        .map_err(|e| Error::Certificate(format!("encoding the certificate: {e}")))?
        + &hierarchy.issuing_pem;
    write(&dir.join("tls/server.crt"), &chain)?;
    Ok(InitReport {
        config: config_path,
        root_fingerprint: authority.status().root_fingerprint,
    })
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(Error::io(path))
}

pub(crate) fn template(options: &InitOptions) -> String {
    let mut out = format!(
        r#"# Plant PKI issuer configuration, written by `issuer init`.
# Relative paths are relative to this file's folder.

# SPIFFE trust domain of this plant.
trust_domain = "{trust_domain}"

# Store, admin socket (state/admin.sock, owner-only) and runtime files.
state_dir = "state"

# EST label used when the URL has none (/.well-known/est/simpleenroll).
default_profile = "device"

[ca]
root_certificate = "ca/root.crt"
issuing_certificate = "ca/issuing.crt"
# Key reference: soft:path=FILE (PKCS#8, mode 0600), tpm:blob=FILE;tcti=… or
# tpm:handle=0x81…;tcti=… (TPM 2.0), pkcs11:token=…;object=…;pin-file=… (HSM).
# The root key (ca/root.key) is only needed to create a new issuing CA: move it offline.
issuing_key = "{ca_key}"
# A TPM signs one request at a time: at most key_queue signatures wait for it, each at most
# key_deadline; more, or longer, are answered 503 with Retry-After. (TPM keys only.)
key_queue = 32
key_deadline = "5s"

{signing_key}
[est]
# Port 0 picks a free port; the URL is written to state/est.url.
listen = "{listen}"
tls_certificate = "tls/server.crt"
tls_key = "tls/server.key"
# Largest request body; a P-256 CSR is under 1 KiB.
max_body_bytes = 65536
# Connections held at once (also the CRL listener's limit). At the limit a new connection
# sheds the one that has waited longest, in its TLS handshake or idle between requests, so
# slow or idle clients cannot keep a device out; connections busy with a request are never
# shed (a new one waits for them). The issuer raises its open-file limit to the hard limit.
max_connections = 4096
# Longest a client may take for the TLS handshake; for a request's headers (this also closes
# keep-alive connections idle that long); and for a request body once its headers are in.
handshake_timeout = "10s"
header_timeout = "10s"
body_timeout = "10s"
# Largest request line + headers; larger is answered 431.
max_header_bytes = 16384

[crl]
# Plain-HTTP listener for the CRL. Certificates carry http://<listen>/crl/issuing.crl as their
# CRL distribution point unless `url` is set; use a fixed port (and `url` with the name
# devices reach) in production, since certificates keep the URL they were issued with.
listen = "{crl_listen}"
# url = "http://pki.plant.example:8080/crl/issuing.crl"
# Each CRL's validity; it is re-issued at half of it and on every revocation.
validity = "7d"

[agent_api]
# gRPC over TLS for agents: node attestation (join_token, x509pop, tpm), entry sync, SVID
# minting. Same server certificate as EST. Port 0 picks a free port; the URL is written to
# state/agent_api.url.
listen = "{agent_api_listen}"
# Node SVID lifetime, and the defaults for entries that set no TTL (SPIRE's: 1h and 5m).
node_svid_ttl = "1h"
x509_svid_ttl = "1h"
jwt_svid_ttl = "5m"
# Connections held at once; at the limit the one that has waited longest, in its TLS
# handshake or with no RPC in progress, is shed (its agent reconnects on its next call).
max_connections = 4096
handshake_timeout = "10s"

[tokens]
# Lifetime of `issuer token create` tokens without --ttl, and the longest allowed.
default_ttl = "24h"
max_ttl = "30d"

[tokens.lockout]
# A source address (IPv6: its /64) refused max_failures times within `window` for want of a
# credential this CA made (an unknown token, no token, a client certificate not ours, a
# refused attestation; used or expired tokens and our own revoked certificates do not count)
# is refused for `lockout`: 429 with Retry-After (gRPC: RESOURCE_EXHAUSTED), before its
# request is read; a success does not end it early. Each lockout is one source.locked_out
# audit record. Such refusals are not audited one by one: each source's first in every
# summary_interval is, and the rest make one refusals.summarized record. At most
# max_sources addresses are tracked; the oldest is forgotten to make room.
max_failures = 10
window = "1m"
lockout = "5m"
max_sources = 65536
summary_interval = "1m"

[issuance]
# notBefore of every certificate is set this far before the issuer's clock, so devices whose
# clocks lag the issuer's (or an issuer running ahead) by up to this much accept it at once.
backdate = "5m"
# Free space kept on the state folder's disk. Below it (or on a read-only filesystem) requests
# that would write are answered 503 and nothing is recorded; issuance resumes by itself.
min_free_mb = 64

[store]
# The embedded store's page cache (MiB): the issuer's memory grows by up to this much as
# certificates are issued and the inventory is read, then stays there.
cache_mb = 32

# Profiles: each name is an EST label (/.well-known/est/<label>/...).
# key_usage: digitalSignature, keyAgreement. extended_key_usage: serverAuth, clientAuth.
# san: which subjectAltName kinds tokens may grant (dns, ip).
# server_keygen: offer /serverkeygen (the CA makes the key; for devices that can't).
# operator: its certificates may read the operator API (https://<est listen>/api/v1/…).
# sign_with: "signing-key" (default) or "issuing-key" (the TPM/HSM key signs itself).
"#,
        trust_domain = options.trust_domain,
        listen = options.listen,
        crl_listen = options.crl_listen,
        agent_api_listen = options.agent_api_listen,
        ca_key = options.ca_key.replace('\\', "\\\\").replace('"', "\\\""),
        signing_key = signing_key_section(&options.ca_key),
    );
    for (name, profile) in profile::defaults() {
        let _ = write!(out, "\n{}", profile_toml(name, &profile));
    }
    out
}

/// `[ca.signing_key]`: on for a hardware issuing key (a TPM signs only 14–24 certificates a
/// second), shown commented out for a software one, which signs at software speed already.
fn signing_key_section(ca_key: &str) -> String {
    let hardware = !ca_key.trim_start().starts_with("soft:");
    let on = if hardware { "" } else { "# " };
    format!(
        r#"# A short-lived in-memory key, certified by the issuing key, signs certificates at software
# speed; it is rotated every `lifetime`, the next one published in cacerts `overlap` before
# it takes over. Without this table the issuing key signs every certificate itself. A
# profile can keep signing with the issuing key: sign_with = "issuing-key".
{on}[ca.signing_key]
{on}lifetime = "24h"
{on}overlap = "1h"
"#
    )
}

fn profile_toml(name: &str, p: &Profile) -> String {
    let list = |items: Vec<String>| {
        items
            .iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let json_names = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let operator = if p.operator { "operator = true\n" } else { "" };
    format!(
        "[profiles.{name}]\ndescription = {:?}\nlifetime = \"{}\"\nkey_usage = [{}]\nextended_key_usage = [{}]\nsan = [{}]\nserver_keygen = {}\n{operator}",
        p.description,
        proto::duration::format(p.lifetime),
        list(json_names(serde_json::to_value(&p.key_usage).unwrap_or_default())),
        list(json_names(serde_json::to_value(&p.extended_key_usage).unwrap_or_default())),
        list(json_names(serde_json::to_value(&p.san).unwrap_or_default())),
        p.server_keygen,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> InitOptions {
        InitOptions {
            dir: PathBuf::from("/nonexistent"),
            trust_domain: "plant.example".into(),
            organization: "Plant".into(),
            listen: "127.0.0.1:0".parse().expect("addr"),
            crl_listen: "127.0.0.1:0".parse().expect("addr"),
            agent_api_listen: "127.0.0.1:0".parse().expect("addr"),
            ca_key: "soft:path=ca/issuing.key".into(),
            dns: vec![],
            ips: vec![],
        }
    }

    #[test]
    fn template_parses_back_to_the_default_profiles() {
        let options = options();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("issuer.toml");
        std::fs::write(&path, template(&options)).expect("write");
        let config = Config::load(&path).expect("parses");
        assert_eq!(config.store.cache_mb, crate::store::DEFAULT_CACHE_MB);
        for (name, profile) in profile::defaults() {
            let loaded = &config.profiles[name];
            assert_eq!(loaded.lifetime, profile.lifetime, "{name}");
            assert_eq!(
                loaded.extended_key_usage, profile.extended_key_usage,
                "{name}"
            );
            assert_eq!(loaded.server_keygen, profile.server_keygen, "{name}");
            assert_eq!(loaded.operator, profile.operator, "{name}");
        }
    }

    #[test]
    fn a_store_cache_of_nothing_is_refused_with_the_setting_named() {
        let text = template(&options()).replace("cache_mb = 32", "cache_mb = 0");
        let err = Config::parse(Path::new("/etc/plant/issuer.toml"), &text)
            .expect_err("cache_mb = 0")
            .to_string();
        assert!(err.contains("[store] cache_mb = 0"), "{err}");
    }
}
