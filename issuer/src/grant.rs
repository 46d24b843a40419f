//! A [`Grant`]: what an authenticated request may have, decided before anything is signed.
//! Deny by default: names come from the token (or the certificate being renewed), never
//! from the CSR; the CSR may only repeat them.

use std::net::IpAddr;
use std::path::Path;

use est::csr::{RequestedName, VerifiedCsr};
use est::{Error as EstError, Refusal};

use crate::serial::Serial;
use crate::Error;

/// What one issuance may contain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The profile (label) to build from.
    pub label: String,
    /// The subject commonName.
    pub common_name: String,
    /// dNSName SANs.
    pub dns: Vec<String>,
    /// iPAddress SANs.
    pub ips: Vec<IpAddr>,
    /// The SPIFFE ID, the one URI SAN of an SVID (DESIGN §5). A grant with one is built from
    /// the issuer's SPIFFE profiles (`svid`, `node-svid`), never from an EST label's.
    pub spiffe_id: Option<proto::SpiffeId>,
    /// Lifetime instead of the profile's (an entry's TTL), still capped by the CA's notAfter.
    pub lifetime: Option<std::time::Duration>,
    /// Who asked, for the inventory.
    pub owner: String,
    /// The certificate this renews.
    pub renews: Option<Serial>,
    /// The one-time token (its SHA-256) this grant spends. It is consumed only once the
    /// certificate is signed, so a request refused or failed for any other reason (bad CSR,
    /// TPM down) keeps its token.
    pub token: Option<[u8; 32]>,
}

impl Grant {
    /// The SANs as the inventory writes them.
    pub fn san_strings(&self) -> Vec<String> {
        self.spiffe_id
            .iter()
            .map(|u| format!("uri:{u}"))
            .chain(self.dns.iter().map(|d| format!("dns:{d}")))
            .chain(self.ips.iter().map(|i| format!("ip:{i}")))
            .collect()
    }

    /// Refuses a CSR that asks for more than the grant: a CA certificate or certificate
    /// signing (400, a CSR this CA never accepts), or names the grant does not hold (403).
    pub fn check_request(&self, csr: &VerifiedCsr) -> Result<(), EstError> {
        let requested = csr.requested();
        if requested.ca || requested.cert_sign {
            return Err(EstError::refused(
                Refusal::BadRequest,
                "the CSR asks for a CA certificate (basicConstraints cA:TRUE or keyCertSign); \
                 this CA issues end-entity certificates only",
            ));
        }
        for name in &requested.names {
            let allowed = match name {
                RequestedName::Dns(d) => self.dns.iter().any(|g| g.eq_ignore_ascii_case(d)),
                RequestedName::Ip(ip) => self.ips.contains(ip),
                _ => false,
            };
            // A well-formed CSR asking for a name it may not have is a policy refusal (403,
            // DESIGN §4), not a malformed request: the client should not fix its encoding
            // but its request, or its token.
            if !allowed {
                return Err(EstError::refused(
                    Refusal::Forbidden,
                    format!(
                        "the CSR asks for subjectAltName {}, which this enrollment does not grant \
                         (granted: {}); the certificate's names come from the token (or the \
                         certificate being renewed): leave the name out of the CSR, or ask the \
                         PKI operator for a token that grants it",
                        describe(name),
                        if self.san_strings().is_empty() {
                            "none".to_owned()
                        } else {
                            self.san_strings().join(", ")
                        }
                    ),
                ));
            }
        }
        Ok(())
    }
}

pub(crate) fn describe(name: &RequestedName) -> String {
    match name {
        RequestedName::Dns(d) => format!("dns:{d}"),
        RequestedName::Ip(i) => format!("ip:{i}"),
        RequestedName::Uri(u) => format!("uri:{u}"),
        RequestedName::Email(e) => format!("email:{e}"),
        _ => "of an unsupported kind".into(),
    }
}

/// A subject or device name operators and engineers type: 1–64 of letters, digits, `.-_`.
pub fn valid_subject(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A DNS name a certificate may carry (RFC 1123 labels).
pub fn valid_dns(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The names the issuer's listener certificate carries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerNames {
    /// dNSName SANs.
    pub dns: Vec<String>,
    /// iPAddress SANs.
    pub ips: Vec<IpAddr>,
}

impl ListenerNames {
    /// The names of the certificate `der` (none if it does not parse).
    pub fn of_certificate(der: &[u8]) -> Self {
        use der::Decode;
        use x509_cert::ext::pkix::name::GeneralName;
        use x509_cert::ext::pkix::SubjectAltName;
        let mut names = Self::default();
        let Ok(certificate) = x509_cert::Certificate::from_der(der) else {
            return names;
        };
        let sans = certificate
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .filter(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)
            .filter_map(|e| SubjectAltName::from_der(e.extn_value.as_bytes()).ok())
            .flat_map(|san| san.0);
        for name in sans {
            match name {
                GeneralName::DnsName(dns) => names.dns.push(dns.as_str().to_owned()),
                GeneralName::IpAddress(octets) => match octets.as_bytes().len() {
                    4 => names
                        .ips
                        .extend(<[u8; 4]>::try_from(octets.as_bytes()).map(IpAddr::from)),
                    16 => names
                        .ips
                        .extend(<[u8; 16]>::try_from(octets.as_bytes()).map(IpAddr::from)),
                    _ => {}
                },
                _ => {}
            }
        }
        names
    }

    /// The names of the leaf of the PEM chain at `path`; none if there is no such file yet
    /// (`issuer init` opens the store before it makes the certificate).
    pub fn load(path: &Path) -> Self {
        crate::ca::read_pem_chain(path)
            .ok()
            .and_then(|chain| chain.first().map(|leaf| Self::of_certificate(leaf)))
            .unwrap_or_default()
    }

    /// Whether `dns` is one of the issuer's names (DNS names compare case-insensitively).
    pub fn has_dns(&self, dns: &str) -> bool {
        self.dns.iter().any(|d| d.eq_ignore_ascii_case(dns))
    }

    /// Whether `ip` is one of the issuer's addresses.
    pub fn has_ip(&self, ip: &IpAddr) -> bool {
        self.ips.contains(ip)
    }

    /// Refuses these names in a token or entry: a certificate with them could pose as the
    /// issuer to clients that check names only.
    pub fn refuse(&self, dns: &[String], ips: &[IpAddr]) -> Result<(), Error> {
        let taken = dns
            .iter()
            .find(|d| self.has_dns(d))
            .map(|d| format!("DNS name {d}"))
            .or_else(|| {
                ips.iter()
                    .find(|ip| self.has_ip(ip))
                    .map(|ip| format!("IP address {ip}"))
            });
        match taken {
            Some(name) => Err(Error::Admin(format!(
                "{name} is the issuer's own (its TLS certificate carries it): a certificate \
                 with it could pose as the issuer; grant the device a name of its own"
            ))),
            None => Ok(()),
        }
    }
}
