use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::Error;

/// Where a key lives, parsed once from strings such as `soft:path=/var/lib/plant/ca.key`,
/// `tpm:handle=0x81010001` or `pkcs11:token=plant;object=issuing-ca`.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyRef {
    /// A PKCS#8 file on disk, mode 0600 (development and small sites).
    Soft {
        /// The PKCS#8 PEM file.
        path: PathBuf,
    },
    /// A key in a TPM 2.0 (persistent handle or key blob); the backend arrives with the
    /// hardware-keys issue.
    Tpm {
        /// The parameters after `tpm:` as given.
        params: String,
    },
    /// A key in a PKCS#11 token.
    Pkcs11 {
        /// The parameters after `pkcs11:` as given.
        params: String,
    },
}

impl KeyRef {
    /// A software key at `path`.
    pub fn soft(path: impl Into<PathBuf>) -> Self {
        Self::Soft { path: path.into() }
    }

    /// The backend's name, for messages.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Soft { .. } => "soft",
            Self::Tpm { .. } => "tpm",
            Self::Pkcs11 { .. } => "pkcs11",
        }
    }
}

impl FromStr for KeyRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidKeyRef {
            reference: s.to_owned(),
            reason,
        };
        let (scheme, params) = s
            .split_once(':')
            .ok_or_else(|| invalid("expected BACKEND:PARAMS, e.g. soft:path=ca.key"))?;
        match scheme {
            "soft" => {
                let path = params
                    .split(';')
                    .find_map(|kv| kv.strip_prefix("path="))
                    .filter(|p| !p.is_empty())
                    .ok_or_else(|| invalid("a soft key needs path=FILE"))?;
                Ok(Self::Soft { path: path.into() })
            }
            "tpm" => Ok(Self::Tpm {
                params: params.to_owned(),
            }),
            "pkcs11" => Ok(Self::Pkcs11 {
                params: params.to_owned(),
            }),
            _ => Err(invalid("unknown backend; use soft, tpm or pkcs11")),
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Soft { path } => write!(f, "soft:path={}", path.display()),
            Self::Tpm { params } => write!(f, "tpm:{params}"),
            Self::Pkcs11 { params } => write!(f, "pkcs11:{params}"),
        }
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // A PKCS#11 reference may one day carry a pin-source; Display never includes secrets.
        write!(f, "KeyRef({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_key_ref_round_trips() {
        let k: KeyRef = "soft:path=/tmp/ca.key".parse().expect("parses");
        assert_eq!(k, KeyRef::soft("/tmp/ca.key"));
        assert_eq!(k.to_string(), "soft:path=/tmp/ca.key");
    }

    #[test]
    fn malformed_key_refs_are_refused_with_a_reason() {
        for bad in ["", "soft", "soft:", "soft:path=", "vault:x"] {
            let err = bad.parse::<KeyRef>().expect_err(bad);
            assert!(matches!(err, Error::InvalidKeyRef { .. }), "{bad}: {err}");
        }
    }
}
