//! Which CA the agent trusts, and how that trust starts.
//!
//! RFC 7030 §4.1.1: a client without a trust anchor fetches `cacerts` without verifying the
//! server, and must check the CA fingerprint it got out of band before it enrolls. After that
//! every request verifies the server against the pinned root.

use std::path::Path;

use est::client::{ClientIdentity, EstClient};
use est::Label;

use crate::{pem_files, Error};

/// The trust anchor(s) for one EST server.
#[derive(Debug, Clone)]
pub struct CaTrust {
    server: String,
    anchors: Vec<Vec<u8>>,
}

impl CaTrust {
    /// Bootstraps trust: fetches `cacerts` unverified (under `label`, since a CA need not
    /// serve the unlabelled path) and keeps the certificate whose SHA-256 fingerprint is
    /// `fingerprint`. Refuses to go on if none matches: enrolling with an unverified CA would
    /// hand a device identity to whoever answered.
    pub async fn bootstrap(
        server: &str,
        fingerprint: &str,
        label: Option<&Label>,
    ) -> Result<Self, Error> {
        check_fingerprint(fingerprint)?;
        let step = "fetching the CA certificates to check their fingerprint";
        let client = EstClient::bootstrap(server)
            .map_err(Error::est(step))?
            .with_label(label.cloned());
        let certs = client.cacerts().await.map_err(Error::est(step))?;
        let root = est::client::pin_root(server, &certs, fingerprint)
            .map_err(Error::est("checking the CA fingerprint"))?;
        tracing::info!(server, fingerprint = %est::fingerprint(&root), "CA pinned");
        Ok(Self {
            server: server.to_owned(),
            anchors: vec![root],
        })
    }

    /// Trust from a PEM file the agent already holds (`ca.pem` from enrollment).
    pub fn from_file(server: &str, path: &Path) -> Result<Self, Error> {
        let anchors = pem_files::read_certificates(path)?;
        if anchors.is_empty() {
            return Err(Error::Usage(format!(
                "{} holds no CA certificate; pass the ca.pem written at enrollment",
                path.display()
            )));
        }
        Ok(Self {
            server: server.to_owned(),
            anchors,
        })
    }

    /// The server URL.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The trust anchors, DER; the first is the pinned root.
    pub fn anchors(&self) -> &[Vec<u8>] {
        &self.anchors
    }

    /// The pinned root, DER.
    pub fn root(&self) -> &[u8] {
        self.anchors.first().map(Vec::as_slice).unwrap_or_default()
    }

    /// A client that verifies the server against the anchors.
    pub fn client(
        &self,
        label: Option<&Label>,
        identity: Option<&ClientIdentity>,
    ) -> Result<EstClient, Error> {
        Ok(EstClient::new(&self.server, &self.anchors, identity)
            .map_err(Error::est("setting up TLS to the EST server"))?
            .with_label(label.cloned()))
    }
}

/// A fingerprint must be a whole SHA-256: a truncated one would make pinning meaningless.
fn check_fingerprint(fingerprint: &str) -> Result<(), Error> {
    let hex = est::normalize_fingerprint(fingerprint);
    let only_hex = fingerprint
        .chars()
        .all(|c| c.is_ascii_hexdigit() || c == ':' || c == ' ');
    if hex.len() != 64 || !only_hex {
        return Err(Error::Usage(format!(
            "--ca-fingerprint {fingerprint:?} is not a SHA-256 fingerprint: give 64 hex digits (colons allowed), as the PKI operator printed it"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_must_be_a_whole_sha256() {
        let good = "AB:".repeat(31) + "AB";
        assert!(check_fingerprint(&good).is_ok());
        assert!(check_fingerprint(&"ab".repeat(32)).is_ok());
        assert!(check_fingerprint("abcd").expect_err("short").is_usage());
        assert!(check_fingerprint(&("zz".to_owned() + &"ab".repeat(31))).is_err());
    }
}
