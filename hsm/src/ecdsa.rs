//! ECDSA signature encodings: hardware returns (r, s) as integers; X.509 and PKCS#10 carry
//! the DER `ECDSA-Sig-Value` (RFC 3279 §2.2.3):
//!
//! ```text
//! Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }
//! ```

use crate::Error;

/// DER `ECDSA-Sig-Value` from big-endian `r` and `s` of at most 32 bytes each (a TPM may
/// drop leading zero bytes).
pub(crate) fn der_from_scalars(r: &[u8], s: &[u8]) -> Result<Vec<u8>, Error> {
    let pad = |v: &[u8]| -> Result<p256::FieldBytes, Error> {
        let v = strip_zeros(v);
        if v.len() > 32 {
            return Err(Error::Sign(format!(
                "signature scalar of {} bytes",
                v.len()
            )));
        }
        let mut out = p256::FieldBytes::default();
        out[32 - v.len()..].copy_from_slice(v);
        Ok(out)
    };
    let signature = p256::ecdsa::Signature::from_scalars(pad(r)?, pad(s)?)
        .map_err(|e| Error::Sign(format!("device returned an invalid signature: {e}")))?;
    Ok(signature.to_der().as_bytes().to_vec())
}

/// DER `ECDSA-Sig-Value` from PKCS#11's fixed-width `r || s` (64 bytes for P-256).
pub(crate) fn der_from_concatenated(rs: &[u8]) -> Result<Vec<u8>, Error> {
    if rs.len() != 64 {
        return Err(Error::Sign(format!(
            "device returned a {}-byte signature, expected 64 (r || s)",
            rs.len()
        )));
    }
    der_from_scalars(&rs[..32], &rs[32..])
}

fn strip_zeros(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| *b != 0).unwrap_or(v.len());
    &v[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_scalars_are_left_padded_and_zero_is_refused() {
        let der = der_from_scalars(&[1], &[0, 0, 2]).expect("encodes");
        assert_eq!(der, [0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x02]);
        assert!(der_from_scalars(&[0], &[1]).is_err());
        assert!(der_from_scalars(&[1; 33], &[1]).is_err());
        assert!(der_from_concatenated(&[1; 63]).is_err());
    }

    #[test]
    fn high_bit_scalars_get_a_sign_byte() {
        // s = 0x80 00 7f…: below the group order, but its top bit needs a 0x00 in DER.
        let mut rs = [0x7f; 64];
        rs[32] = 0x80;
        rs[33] = 0x00;
        let der = der_from_concatenated(&rs).expect("encodes");
        let s_at = 2 + 2 + 32;
        assert_eq!(&der[s_at..s_at + 3], &[0x02, 0x21, 0x00]);
    }
}
