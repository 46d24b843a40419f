//! CSR attributes (RFC 7030 §4.5.2 as corrected by RFC 8951 §4):
//!
//! ```text
//! CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
//! AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }
//! Attribute { ATTRIBUTE:IOSet } ::= SEQUENCE { type ATTRIBUTE.&id, values SET SIZE(1..MAX) OF ... }
//! ```

use const_oid::ObjectIdentifier;
use der::{Any, Decode, Encode, Tag, Tagged};
use x509_cert::attr::Attribute;

use crate::der_write::{tlv, tlv_vec, OID, SEQUENCE, SET};
use crate::Error;

/// One entry of a CsrAttrs sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttrOrOid {
    /// A bare OID: "include this" (e.g. ecdsa-with-SHA256, challengePassword).
    Oid(ObjectIdentifier),
    /// An attribute type with values: "this type, with one of these values"
    /// (e.g. id-ecPublicKey with secp256r1).
    Attribute {
        /// The attribute type.
        oid: ObjectIdentifier,
        /// Each value's DER.
        values: Vec<Vec<u8>>,
    },
}

/// Encodes a CsrAttrs sequence.
pub fn encode(entries: &[AttrOrOid]) -> Vec<u8> {
    let mut body = Vec::new();
    for entry in entries {
        match entry {
            AttrOrOid::Oid(oid) => tlv(&mut body, OID, oid.as_bytes()),
            AttrOrOid::Attribute { oid, values } => {
                let mut sorted: Vec<&Vec<u8>> = values.iter().collect();
                sorted.sort();
                let set: Vec<u8> = sorted.into_iter().flatten().copied().collect();
                let mut attr = tlv_vec(OID, oid.as_bytes());
                tlv(&mut attr, SET, &set);
                tlv(&mut body, SEQUENCE, &attr);
            }
        }
    }
    tlv_vec(SEQUENCE, &body)
}

/// Decodes a CsrAttrs sequence.
pub fn decode(der: &[u8]) -> Result<Vec<AttrOrOid>, Error> {
    let items: Vec<Any> = Vec::from_der(der).map_err(|e| Error::CsrAttrs(e.to_string()))?;
    items
        .into_iter()
        .map(|item| match item.tag() {
            Tag::ObjectIdentifier => item
                .decode_as::<ObjectIdentifier>()
                .map(AttrOrOid::Oid)
                .map_err(|e| Error::CsrAttrs(e.to_string())),
            Tag::Sequence => {
                let attr: Attribute = item
                    .decode_as()
                    .map_err(|e| Error::CsrAttrs(e.to_string()))?;
                let values = attr
                    .values
                    .iter()
                    .map(|v| v.to_der().map_err(|e| Error::CsrAttrs(e.to_string())))
                    .collect::<Result<_, _>>()?;
                Ok(AttrOrOid::Attribute {
                    oid: attr.oid,
                    values,
                })
            }
            other => Err(Error::CsrAttrs(format!(
                "an entry is a {other}, expected an OID or an Attribute"
            ))),
        })
        .collect()
}

/// What this CA asks of every CSR: a P-256 key, signed with ECDSA/SHA-256, optionally with
/// a challengePassword for PoP linking.
pub fn p256_policy(challenge_password: bool) -> Vec<AttrOrOid> {
    use const_oid::db::rfc5912;
    let mut entries = vec![
        AttrOrOid::Oid(rfc5912::ECDSA_WITH_SHA_256),
        AttrOrOid::Attribute {
            oid: rfc5912::ID_EC_PUBLIC_KEY,
            values: vec![tlv_vec(OID, rfc5912::SECP_256_R_1.as_bytes())],
        },
    ];
    if challenge_password {
        entries.push(AttrOrOid::Oid(ObjectIdentifier::new_unwrap(
            "1.2.840.113549.1.9.7",
        )));
    }
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p256_policy_round_trips() {
        let entries = p256_policy(true);
        assert_eq!(decode(&encode(&entries)).expect("decodes"), entries);
    }

    #[test]
    fn rfc_7030_example_decodes() {
        // RFC 7030 §4.5.2's example, as corrected by RFC 8951 (base64 of DER).
        let der = crate::body::decode(
            b"MEEGCSqGSIb3DQEJBzASBgcqhkjOPQIBMQcGBSuBBAAiMBYGCSqGSIb3DQEJDjEJ\nBgcrBgEBAQEWBggqhkjOPQQDAw==",
        )
        .expect("base64");
        let entries = decode(&der).expect("decodes");
        assert_eq!(entries.len(), 4);
        assert!(matches!(entries[0], AttrOrOid::Oid(_)));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode(&[0x30, 0x03, 0x02, 0x01, 0x01]).is_err());
        assert!(decode(&[0x30, 0x80]).is_err());
        assert!(decode(&[]).is_err());
    }
}
