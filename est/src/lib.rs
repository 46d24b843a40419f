//! EST (RFC 7030, updated by RFC 8951) for Plant PKI.
//!
//! - [`body`], [`csr`], [`certs_only`], [`csr_attrs`], [`multipart`]: wire codecs. Each turns
//!   untrusted bytes into a type once (a [`csr::VerifiedCsr`] has a checked signature), and
//!   never panics on hostile input.
//! - [`server`]: the `/.well-known/est` routes over a small [`server::Backend`] trait; the
//!   issuer supplies authentication, policy and signing.
//! - [`client`]: what a commissioning laptop or agent needs, including the RFC 7030 §4.1.1
//!   bootstrap (fetch `cacerts` untrusted, then pin the root by its fingerprint).
//! - [`tls`]: what every TLS peer verifier in the workspace shares (chain-length limit,
//!   handshake signatures).

pub mod body;
pub mod certs_only;
pub mod client;
pub mod csr;
pub mod csr_attrs;
mod der_write;
mod error;
pub mod label;
pub mod multipart;
pub mod server;
pub mod tls;

pub use error::{Error, Refusal};
pub use label::Label;

/// The media types of RFC 7030 §3.2.4 and RFC 8951.
pub mod media {
    /// A PKCS#10 request body.
    pub const PKCS10: &str = "application/pkcs10";
    /// certs-only CMS, as `cacerts` answers.
    pub const PKCS7: &str = "application/pkcs7-mime";
    /// certs-only CMS, as the enroll operations answer.
    pub const PKCS7_CERTS_ONLY: &str = "application/pkcs7-mime; smime-type=certs-only";
    /// A private key in a serverkeygen response.
    pub const PKCS8: &str = "application/pkcs8";
    /// The `csrattrs` answer.
    pub const CSRATTRS: &str = "application/csrattrs";
}

/// SHA-256 of `der`, lower-case hex: how the CA fingerprint is given out of band.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(der))
}

/// Normalises an operator-typed fingerprint: colons, spaces and case do not matter.
pub fn normalize_fingerprint(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .map(|c| c.to_ascii_lowercase())
        .collect()
}
