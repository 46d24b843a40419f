//! SPIFFE IDs and trust domains (SPIFFE-ID.md §2), parsed once from untrusted text.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted (SPIFFE-ID.md §2.3: "2048 bytes").
const MAX_ID_LENGTH: usize = 2048;
/// Longest trust domain name (SPIFFE-ID.md §2.1: "255 characters").
const MAX_TRUST_DOMAIN_LENGTH: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why text is not a SPIFFE ID or trust domain; each says what to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// It does not start with `spiffe://`.
    #[error("a SPIFFE ID starts with spiffe:// (lower case)")]
    Scheme,
    /// The trust domain is empty.
    #[error("the trust domain is empty")]
    EmptyTrustDomain,
    /// The trust domain has a character outside `a-z 0-9 . - _`.
    #[error("the trust domain may only contain lower-case letters, digits, '.', '-' and '_' (found {0:?})")]
    TrustDomainCharacter(char),
    /// The trust domain is longer than 255 characters.
    #[error("the trust domain is longer than 255 characters")]
    TrustDomainTooLong,
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("the path has an empty segment (a double or trailing '/')")]
    EmptySegment,
    /// A path segment is `.` or `..`.
    #[error("the path may not contain '.' or '..' segments")]
    DotSegment,
    /// A path character outside `a-z A-Z 0-9 . - _`.
    #[error("the path may only contain letters, digits, '.', '-', '_' and '/' (found {0:?})")]
    PathCharacter(char),
    /// The whole ID is longer than 2048 bytes.
    #[error("a SPIFFE ID is at most 2048 bytes")]
    TooLong,
}

/// A trust domain name, e.g. `plant.example`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`plant.example`) or its ID form
    /// (`spiffe://plant.example`).
    pub fn new(text: &str) -> Result<Self, SpiffeIdError> {
        let name = text.strip_prefix(SCHEME).unwrap_or(text);
        check_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The name, e.g. `plant.example`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// `spiffe://<name>`: the key of this domain in Workload API bundle maps.
    pub fn id_string(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }

    /// The SPIFFE ID `spiffe://<name><path>`; `path` starts with `/`.
    pub fn id(&self, path: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(&format!("{SCHEME}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID, e.g. `spiffe://plant.example/agent/tpm/3f2a…`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    text: String,
    /// Where the path starts in `text` (== text.len() when there is none).
    path_start: usize,
}

impl SpiffeId {
    /// Parses and checks `text` against SPIFFE-ID.md §2.
    pub fn new(text: &str) -> Result<Self, SpiffeIdError> {
        if text.len() > MAX_ID_LENGTH {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = text.strip_prefix(SCHEME).ok_or(SpiffeIdError::Scheme)?;
        let (domain, path) = match rest.find('/') {
            Some(slash) => rest.split_at(slash),
            None => (rest, ""),
        };
        check_trust_domain(domain)?;
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                check_segment(segment)?;
            }
        }
        Ok(Self {
            text: text.to_owned(),
            path_start: SCHEME.len() + domain.len(),
        })
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.text[SCHEME.len()..self.path_start].to_owned())
    }

    /// The path, `""` or starting with `/`.
    pub fn path(&self) -> &str {
        &self.text[self.path_start..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether this ID is `prefix` itself or lies under it (segment-wise: `/a/b` is under
    /// `/a`, `/ab` is not).
    pub fn is_under(&self, prefix: &SpiffeId) -> bool {
        self.text == prefix.text
            || (self.text.starts_with(&prefix.text)
                && self.text.as_bytes().get(prefix.text.len()) == Some(&b'/'))
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// Checks one path segment, e.g. an agent's id from its attestation, before it goes into a
/// SPIFFE ID.
pub(crate) fn check_segment(segment: &str) -> Result<(), SpiffeIdError> {
    match segment {
        "" => return Err(SpiffeIdError::EmptySegment),
        "." | ".." => return Err(SpiffeIdError::DotSegment),
        _ => {}
    }
    match segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(SpiffeIdError::PathCharacter(c)),
        None => Ok(()),
    }
}

fn check_trust_domain(name: &str) -> Result<(), SpiffeIdError> {
    if name.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if name.len() > MAX_TRUST_DOMAIN_LENGTH {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        Some(c) => Err(SpiffeIdError::TrustDomainCharacter(c)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ids_from_the_specification() {
        for text in [
            "spiffe://plant.example",
            "spiffe://plant.example/agent/tpm/abc123",
            "spiffe://a-b_c.d/x.y/Z-9_",
        ] {
            let id = SpiffeId::new(text).expect(text);
            assert_eq!(id.to_string(), text);
        }
        let id = SpiffeId::new("spiffe://plant.example/cell/7").expect("valid");
        assert_eq!(id.trust_domain().as_str(), "plant.example");
        assert_eq!(id.path(), "/cell/7");
    }

    #[test]
    fn refuses_what_the_specification_forbids_with_the_reason() {
        let cases = [
            ("http://plant.example/x", SpiffeIdError::Scheme),
            ("SPIFFE://plant.example/x", SpiffeIdError::Scheme),
            ("spiffe:///x", SpiffeIdError::EmptyTrustDomain),
            (
                "spiffe://Plant.example/x",
                SpiffeIdError::TrustDomainCharacter('P'),
            ),
            (
                "spiffe://plant.example:443/x",
                SpiffeIdError::TrustDomainCharacter(':'),
            ),
            (
                "spiffe://user@plant.example",
                SpiffeIdError::TrustDomainCharacter('@'),
            ),
            ("spiffe://plant.example/", SpiffeIdError::EmptySegment),
            ("spiffe://plant.example/a//b", SpiffeIdError::EmptySegment),
            ("spiffe://plant.example/a/../b", SpiffeIdError::DotSegment),
            (
                "spiffe://plant.example/a?b",
                SpiffeIdError::PathCharacter('?'),
            ),
            (
                "spiffe://plant.example/a#b",
                SpiffeIdError::PathCharacter('#'),
            ),
            (
                "spiffe://plant.example/a%20b",
                SpiffeIdError::PathCharacter('%'),
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(SpiffeId::new(text), Err(expected), "{text}");
        }
        let long = format!("spiffe://plant.example/{}", "a".repeat(2040));
        assert_eq!(SpiffeId::new(&long), Err(SpiffeIdError::TooLong));
        let domain = "a".repeat(256);
        assert_eq!(
            TrustDomain::new(&domain),
            Err(SpiffeIdError::TrustDomainTooLong)
        );
    }

    #[test]
    fn prefixes_match_whole_segments_only() {
        let id = |s: &str| SpiffeId::new(s).expect(s);
        let prefix = id("spiffe://td/cell/7");
        assert!(id("spiffe://td/cell/7").is_under(&prefix));
        assert!(id("spiffe://td/cell/7/hmi").is_under(&prefix));
        assert!(!id("spiffe://td/cell/70").is_under(&prefix));
        assert!(!id("spiffe://other/cell/7").is_under(&prefix));
    }

    #[test]
    fn trust_domains_take_both_forms() {
        let td = TrustDomain::new("spiffe://plant.example").expect("id form");
        assert_eq!(td, TrustDomain::new("plant.example").expect("bare"));
        assert_eq!(td.id_string(), "spiffe://plant.example");
        assert_eq!(
            td.id("/agent/join_token/x").expect("valid").as_str(),
            "spiffe://plant.example/agent/join_token/x"
        );
    }
}
