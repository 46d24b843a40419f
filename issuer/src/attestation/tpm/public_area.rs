//! TPM2B_PUBLIC from the agent (TPM 2.0 Part 2 §12.2.5): decoded once into the facts the
//! attestor checks, with the object's name computed over the exact bytes received.
//!
//! ```text
//! TPM2B_PUBLIC ::= size UINT16, publicArea TPMT_PUBLIC
//! Name ::= nameAlg UINT16 || H_nameAlg(TPMT_PUBLIC)        (Part 1 §16)
//! ```

use aws_lc_rs::digest;
use tss_esapi::attributes::ObjectAttributes;
use tss_esapi::interface_types::algorithm::HashingAlgorithm;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::structures::{Public, SymmetricDefinitionObject};
use tss_esapi::traits::{Marshall, UnMarshall};

use crate::attestation::Refusal;

/// TPM_ALG_SHA256 (Part 2 §6.3).
const TPM_ALG_SHA256: u16 = 0x000b;

/// A decoded public area and its name.
#[derive(Debug)]
pub(super) struct PublicArea {
    public: Public,
    /// nameAlg || SHA-256(TPMT_PUBLIC), over the bytes as received.
    name: Vec<u8>,
}

impl PublicArea {
    /// Decodes a marshalled TPM2B_PUBLIC. `what` names it in refusals ("EK", "AK"). Only
    /// SHA-256 name algorithms are accepted: the name must be computable here.
    pub(super) fn decode(bytes: &[u8], what: &str) -> Result<Self, Refusal> {
        let malformed = |reason: &str| {
            Refusal::new(
                "malformed",
                format!("the {what} public area is not a TPM2B_PUBLIC: {reason}"),
            )
        };
        let (size, area) = bytes
            .split_first_chunk::<2>()
            .ok_or_else(|| malformed("shorter than its size field"))?;
        if usize::from(u16::from_be_bytes(*size)) != area.len() || area.is_empty() {
            return Err(malformed("its size field does not match its length"));
        }
        let public = Public::unmarshall(area).map_err(|_| malformed("does not decode"))?;
        // The name is a hash of the bytes: they must be exactly the structure decoded, with
        // nothing after it and no second encoding of the same values.
        let canonical = public
            .marshall()
            .map_err(|_| malformed("does not encode again"))?;
        if canonical != area {
            return Err(malformed("trailing or non-canonical bytes"));
        }
        if public.name_hashing_algorithm() != HashingAlgorithm::Sha256 {
            return Err(Refusal::new(
                "malformed",
                format!(
                    "the {what}'s name algorithm is {:?}; only SHA-256 is supported",
                    public.name_hashing_algorithm()
                ),
            ));
        }
        let mut name = TPM_ALG_SHA256.to_be_bytes().to_vec();
        name.extend_from_slice(digest::digest(&digest::SHA256, area).as_ref());
        Ok(Self { public, name })
    }

    /// The object's name: what MakeCredential binds the credential to.
    pub(super) fn name(&self) -> &[u8] {
        &self.name
    }

    pub(super) fn attributes(&self) -> ObjectAttributes {
        self.public.object_attributes()
    }

    /// The modulus and exponent of an RSA key (exponent 0 means 65537, Part 2 §12.2.3.5),
    /// with its symmetric algorithm; `None` for other key types.
    pub(super) fn rsa(&self) -> Option<RsaArea<'_>> {
        match &self.public {
            Public::Rsa {
                parameters, unique, ..
            } => {
                let exponent = match parameters.exponent().value() {
                    0 => 65_537,
                    e => e,
                };
                Some(RsaArea {
                    modulus: unique.value(),
                    exponent,
                    symmetric: parameters.symmetric_definition_object(),
                })
            }
            _ => None,
        }
    }

    /// The point, curve and symmetric algorithm of an ECC key; `None` for other key types.
    pub(super) fn ecc(&self) -> Option<EccArea<'_>> {
        match &self.public {
            Public::Ecc {
                parameters, unique, ..
            } => Some(EccArea {
                x: unique.x().value(),
                y: unique.y().value(),
                p256: parameters.ecc_curve() == EccCurve::NistP256,
                symmetric: parameters.symmetric_definition_object(),
            }),
            _ => None,
        }
    }
}

/// The NIST P-256 parts of a public area.
#[derive(Debug)]
pub(super) struct EccArea<'a> {
    pub(super) x: &'a [u8],
    pub(super) y: &'a [u8],
    pub(super) p256: bool,
    pub(super) symmetric: SymmetricDefinitionObject,
}

/// The RSA parts of a public area.
#[derive(Debug)]
pub(super) struct RsaArea<'a> {
    pub(super) modulus: &'a [u8],
    pub(super) exponent: u32,
    pub(super) symmetric: SymmetricDefinitionObject,
}
