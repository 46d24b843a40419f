//! certs-only CMS (RFC 5652 §5, RFC 7030 §4.1.3): a SignedData with no signers and no content,
//! carrying certificates.

use cms::content_info::ContentInfo;
use cms::signed_data::{CertificateSet, SignedData};
use der::{Decode, Encode};

use crate::der_write::{tlv, tlv_vec, CONTEXT_0_CONSTRUCTED, INTEGER, OID, SEQUENCE, SET};
use crate::Error;

/// id-signedData, 1.2.840.113549.1.7.2, DER content octets.
const ID_SIGNED_DATA: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
/// id-data, 1.2.840.113549.1.7.1.
const ID_DATA: [u8; 9] = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];

/// Wraps DER certificates in a certs-only ContentInfo.
///
/// ```text
/// ContentInfo ::= SEQUENCE { contentType id-signedData, content [0] EXPLICIT SignedData }
/// SignedData ::= SEQUENCE { version 1, digestAlgorithms SET {}, encapContentInfo { id-data },
///                           certificates [0] IMPLICIT SET OF Certificate, signerInfos SET {} }
/// ```
pub fn encode(certificates: &[&[u8]]) -> Vec<u8> {
    // DER orders SET OF elements by their encodings.
    let mut sorted: Vec<&[u8]> = certificates.to_vec();
    sorted.sort();
    let set_body: Vec<u8> = sorted.concat();

    let mut signed = Vec::with_capacity(set_body.len() + 64);
    tlv(&mut signed, INTEGER, &[1]);
    tlv(&mut signed, SET, &[]);
    tlv(&mut signed, SEQUENCE, &tlv_vec(OID, &ID_DATA));
    tlv(&mut signed, CONTEXT_0_CONSTRUCTED, &set_body);
    tlv(&mut signed, SET, &[]);

    let mut info = tlv_vec(OID, &ID_SIGNED_DATA);
    tlv(
        &mut info,
        CONTEXT_0_CONSTRUCTED,
        &tlv_vec(SEQUENCE, &signed),
    );
    tlv_vec(SEQUENCE, &info)
}

/// Extracts the DER certificates of a certs-only message, in the order they appear.
pub fn decode(der: &[u8]) -> Result<Vec<Vec<u8>>, Error> {
    let info = ContentInfo::from_der(der).map_err(|e| Error::CertsOnly(e.to_string()))?;
    if info.content_type != const_oid::db::rfc5911::ID_SIGNED_DATA {
        return Err(Error::CertsOnly(format!(
            "content type is {}, expected id-signedData",
            info.content_type
        )));
    }
    let signed: SignedData = info
        .content
        .decode_as()
        .map_err(|e| Error::CertsOnly(e.to_string()))?;
    let set: CertificateSet = signed
        .certificates
        .ok_or_else(|| Error::CertsOnly("it carries no certificates".into()))?;
    set.0
        .iter()
        .map(|choice| match choice {
            cms::cert::CertificateChoices::Certificate(cert) => {
                cert.to_der().map_err(|e| Error::CertsOnly(e.to_string()))
            }
            _ => Err(Error::CertsOnly(
                "it carries a certificate type other than X.509".into(),
            )),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(name: &str) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().expect("key");
        rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .der()
            .to_vec()
    }

    #[test]
    fn round_trips_through_the_cms_parser() {
        let a = cert("a.plant");
        let b = cert("b.plant");
        let der = encode(&[&a, &b]);
        let mut got = decode(&der).expect("decodes");
        got.sort();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn truncated_or_foreign_messages_are_errors_not_panics() {
        let a = cert("a.plant");
        let der = encode(&[&a]);
        for cut in [0, 1, 5, der.len() / 2, der.len() - 1] {
            assert!(decode(&der[..cut]).is_err(), "cut at {cut}");
        }
        assert!(decode(&a).is_err());
    }
}
