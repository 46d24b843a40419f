//! TPM key blobs on disk: the `TSS2 PRIVATE KEY` PEM format of
//! draft-bottomley-tpm2-keys (§3.1), which OpenSSL's tpm2 provider and the tpm2-tss engine
//! also read. The private area inside is encrypted by the parent storage key, so the file is
//! useless away from the TPM that made it.

use der::asn1::{Any, ObjectIdentifier, OctetString};
use der::pem::LineEnding;
use der::{Decode, Encode, Sequence};

/// `id-loadablekey` (draft-bottomley-tpm2-keys §3.1): a key to be TPM2_Load'ed under its
/// parent, as opposed to an importable or sealed one.
const LOADABLE_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.23.133.10.1.3");

/// The PEM label.
const PEM_LABEL: &str = "TSS2 PRIVATE KEY";

/// `TPM_RH_OWNER`: the parent is the owner hierarchy's storage primary, re-derived from its
/// template on every load.
pub const OWNER_PARENT: u32 = 0x4000_0001;

/// ```text
/// TPMKey ::= SEQUENCE {
///     type        OBJECT IDENTIFIER,
///     emptyAuth   [0] EXPLICIT BOOLEAN OPTIONAL,
///     policy      [1] EXPLICIT SEQUENCE OF TPMPolicy OPTIONAL,
///     secret      [2] EXPLICIT OCTET STRING OPTIONAL,
///     authPolicy  [3] EXPLICIT SEQUENCE OF TPMAuthPolicy OPTIONAL,
///     description [4] EXPLICIT UTF8String OPTIONAL,
///     rsaParent   [5] EXPLICIT BOOLEAN OPTIONAL,
///     parent      INTEGER,
///     pubkey      OCTET STRING,   -- TPM2B_PUBLIC
///     privkey     OCTET STRING    -- TPM2B_PRIVATE
/// }
/// ```
#[derive(Sequence)]
struct TpmKeyAsn1 {
    key_type: ObjectIdentifier,
    #[asn1(context_specific = "0", optional = "true")]
    empty_auth: Option<bool>,
    #[asn1(context_specific = "1", optional = "true")]
    policy: Option<Any>,
    #[asn1(context_specific = "2", optional = "true")]
    secret: Option<Any>,
    #[asn1(context_specific = "3", optional = "true")]
    auth_policy: Option<Any>,
    #[asn1(context_specific = "4", optional = "true")]
    description: Option<Any>,
    #[asn1(context_specific = "5", optional = "true")]
    rsa_parent: Option<bool>,
    parent: u32,
    pubkey: OctetString,
    privkey: OctetString,
}

/// A loadable TPM key: its public area and its parent-encrypted private area, both in TPM
/// wire form (TPMT_PUBLIC and the TPM2B_PRIVATE buffer's bytes, without size prefixes).
#[derive(Clone, PartialEq, Eq)]
pub struct KeyBlob {
    /// The marshalled TPMT_PUBLIC.
    pub public: Vec<u8>,
    /// The TPM2B_PRIVATE contents (encrypted and integrity-protected by the parent).
    pub private: Vec<u8>,
}

impl std::fmt::Debug for KeyBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyBlob")
            .field("public_len", &self.public.len())
            .field("private_len", &self.private.len())
            .finish()
    }
}

impl KeyBlob {
    /// Encodes as `TSS2 PRIVATE KEY` PEM with parent `TPM_RH_OWNER` and empty auth.
    pub fn to_pem(&self) -> Result<String, String> {
        let asn1 = TpmKeyAsn1 {
            key_type: LOADABLE_KEY,
            empty_auth: Some(true),
            policy: None,
            secret: None,
            auth_policy: None,
            description: None,
            rsa_parent: None,
            parent: OWNER_PARENT,
            pubkey: OctetString::new(with_size(&self.public)?).map_err(|e| e.to_string())?,
            privkey: OctetString::new(with_size(&self.private)?).map_err(|e| e.to_string())?,
        };
        let der = asn1.to_der().map_err(|e| e.to_string())?;
        der::pem::encode_string(PEM_LABEL, LineEnding::LF, &der).map_err(|e| e.to_string())
    }

    /// Decodes a `TSS2 PRIVATE KEY` PEM. Refuses what this backend cannot load: other key
    /// types, policies, secrets, parents other than the owner storage primary. Never panics
    /// on hostile input.
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let (label, der) =
            der::pem::decode_vec(pem.as_bytes()).map_err(|e| format!("not PEM: {e}"))?;
        if label != PEM_LABEL {
            return Err(format!("PEM label is {label:?}, expected {PEM_LABEL:?}"));
        }
        let asn1 =
            TpmKeyAsn1::from_der(&der).map_err(|e| format!("not a TPMKey structure: {e}"))?;
        if asn1.key_type != LOADABLE_KEY {
            return Err(format!(
                "key type {} is not a loadable key (2.23.133.10.1.3)",
                asn1.key_type
            ));
        }
        if asn1.policy.is_some() || asn1.secret.is_some() || asn1.auth_policy.is_some() {
            return Err("keys with policies or secrets are not supported".into());
        }
        if asn1.empty_auth == Some(false) {
            return Err("keys with an authorization value are not supported".into());
        }
        if asn1.parent != OWNER_PARENT || asn1.rsa_parent == Some(true) {
            return Err(format!(
                "parent {:#010x} is not the owner hierarchy's ECC storage primary (0x40000001)",
                asn1.parent
            ));
        }
        Ok(Self {
            public: without_size(asn1.pubkey.as_bytes(), "pubkey")?,
            private: without_size(asn1.privkey.as_bytes(), "privkey")?,
        })
    }
}

/// Prefixes the 16-bit big-endian size of a TPM2B.
fn with_size(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let len = u16::try_from(bytes.len()).map_err(|_| "TPM2B longer than 65535 bytes".to_owned())?;
    let mut out = len.to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    Ok(out)
}

/// Strips and checks the 16-bit size of a TPM2B.
fn without_size(bytes: &[u8], what: &str) -> Result<Vec<u8>, String> {
    match bytes {
        [hi, lo, rest @ ..]
            if usize::from(u16::from_be_bytes([*hi, *lo])) == rest.len() && !rest.is_empty() =>
        {
            Ok(rest.to_vec())
        }
        _ => Err(format!("{what} is not a well-formed TPM2B")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_round_trips_through_pem() {
        let blob = KeyBlob {
            public: vec![0x00, 0x23, 1, 2, 3],
            private: vec![9; 126],
        };
        let pem = blob.to_pem().expect("encodes");
        assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----\n"));
        assert_eq!(KeyBlob::from_pem(&pem).expect("decodes"), blob);
    }

    #[test]
    fn hostile_or_foreign_blobs_are_refused_without_panicking() {
        let good = KeyBlob {
            public: vec![1; 10],
            private: vec![2; 10],
        }
        .to_pem()
        .expect("encodes");
        let (_, der) = der::pem::decode_vec(good.as_bytes()).expect("pem");
        // Every truncation of the DER fails cleanly.
        for len in 0..der.len() {
            let pem = der::pem::encode_string(PEM_LABEL, LineEnding::LF, &der[..len]).expect("pem");
            assert!(KeyBlob::from_pem(&pem).is_err(), "truncated at {len}");
        }
        // A different parent is refused.
        let mut asn1 = TpmKeyAsn1::from_der(&der).expect("decodes");
        asn1.parent = 0x8100_0001;
        let pem = der::pem::encode_string(PEM_LABEL, LineEnding::LF, &asn1.to_der().expect("der"))
            .expect("pem");
        assert!(KeyBlob::from_pem(&pem)
            .expect_err("parent")
            .contains("parent"));
        // A PKCS#8 key is not a TPM key.
        assert!(KeyBlob::from_pem(
            "-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n"
        )
        .expect_err("label")
        .contains("label"));
        assert!(KeyBlob::from_pem("garbage").is_err());
    }
}
