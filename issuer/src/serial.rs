use std::fmt;

/// A certificate serial: 128 random bits with the top bit clear (a positive DER INTEGER of
/// at most 16 bytes) and never starting with a zero byte, so every serial has full length.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(pub [u8; 16]);

impl Serial {
    /// A fresh random serial (RFC 5280 §4.1.2.2; CA/B BR ask for ≥ 64 random bits).
    pub fn random() -> Self {
        let mut bytes: [u8; 16] = rand::random();
        bytes[0] = (bytes[0] & 0x7f).max(1);
        Self(bytes)
    }

    /// From the big-endian bytes of a certificate's serial INTEGER.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let trimmed: &[u8] = {
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            &bytes[skip..]
        };
        if trimmed.len() > 16 {
            return None;
        }
        let mut out = [0u8; 16];
        out[16 - trimmed.len()..].copy_from_slice(trimmed);
        Some(Self(out))
    }

    /// From hex as operators type it (colons allowed).
    pub fn parse(text: &str) -> Option<Self> {
        let clean: String = text.chars().filter(|c| *c != ':').collect();
        Self::from_bytes(&hex::decode(clean).ok()?)
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_serials_are_positive_full_length_and_distinct() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let s = Serial::random();
            assert!(s.0[0] >= 1 && s.0[0] < 0x80);
            assert!(seen.insert(s));
        }
    }

    #[test]
    fn parses_what_it_prints() {
        let s = Serial::random();
        assert_eq!(Serial::parse(&s.to_string()), Some(s));
        assert_eq!(Serial::from_bytes(&[0, 0, 1]), Serial::parse("01"));
        assert_eq!(Serial::parse("zz"), None);
    }
}
