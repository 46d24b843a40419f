//! The serverkeygen response (RFC 7030 §4.4.2, RFC 8951 §3): `multipart/mixed` with the
//! private key (`application/pkcs8`) and the certificate (certs-only), each part base64.

use crate::{body, media, Error};

/// The boundary we send. Base64 never contains '-' runs with letters like this, so it cannot
/// collide with a part's content.
pub const BOUNDARY: &str = "plantpki-est-part-boundary";

/// The Content-Type header of a serverkeygen response.
pub fn content_type() -> String {
    format!("multipart/mixed; boundary={BOUNDARY}")
}

/// Builds the body from the PKCS#8 DER key and the certs-only DER.
pub fn encode(pkcs8_der: &[u8], certs_only_der: &[u8]) -> Vec<u8> {
    let mut out = String::new();
    for (media_type, der) in [
        (media::PKCS8, pkcs8_der),
        (media::PKCS7_CERTS_ONLY, certs_only_der),
    ] {
        out.push_str(&format!(
            "--{BOUNDARY}\r\nContent-Type: {media_type}\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ));
        out.push_str(&body::encode(der));
    }
    out.push_str(&format!("--{BOUNDARY}--\r\n"));
    out.into_bytes()
}

/// The two parts of a serverkeygen response, decoded.
#[derive(Clone)]
pub struct ServerKeygenParts {
    /// The private key, PKCS#8 DER.
    pub pkcs8_der: Vec<u8>,
    /// The certs-only message, DER.
    pub certs_only_der: Vec<u8>,
}

impl std::fmt::Debug for ServerKeygenParts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerKeygenParts")
            .field("pkcs8_der", &"<redacted>")
            .field("certs_only_der", &self.certs_only_der.len())
            .finish()
    }
}

/// Parses a serverkeygen response given its Content-Type header value and body.
pub fn decode(content_type: &str, body_bytes: &[u8]) -> Result<ServerKeygenParts, Error> {
    let boundary = content_type
        .split(';')
        .map(str::trim)
        .find_map(|p| p.strip_prefix("boundary="))
        .map(|b| b.trim_matches('"'))
        .filter(|b| !b.is_empty())
        .ok_or_else(|| Error::Multipart("Content-Type has no boundary parameter".into()))?;
    let text = std::str::from_utf8(body_bytes)
        .map_err(|_| Error::Multipart("body is not ASCII text".into()))?;
    let delimiter = format!("--{boundary}");
    let mut key = None;
    let mut certs = None;
    for part in text.split(delimiter.as_str()).skip(1) {
        if part.starts_with("--") {
            break;
        }
        let part = part.trim_start_matches(['\r', '\n']);
        let (headers, content) = part
            .split_once("\r\n\r\n")
            .or_else(|| part.split_once("\n\n"))
            .ok_or_else(|| Error::Multipart("a part has no blank line after its headers".into()))?;
        let part_type = headers
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.trim().to_ascii_lowercase())
            .ok_or_else(|| Error::Multipart("a part has no Content-Type".into()))?;
        let der = body::decode(content.as_bytes())?;
        if part_type.starts_with(media::PKCS8) {
            key = Some(der);
        } else if part_type.starts_with(media::PKCS7) {
            certs = Some(der);
        }
    }
    Ok(ServerKeygenParts {
        pkcs8_der: key.ok_or_else(|| Error::Multipart("no application/pkcs8 part".into()))?,
        certs_only_der: certs
            .ok_or_else(|| Error::Multipart("no application/pkcs7-mime part".into()))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let body = encode(b"key-bytes", b"cert-bytes");
        let parts = decode(&content_type(), &body).expect("decodes");
        assert_eq!(parts.pkcs8_der, b"key-bytes");
        assert_eq!(parts.certs_only_der, b"cert-bytes");
        assert!(!format!("{parts:?}").contains("key-bytes"));
    }

    #[test]
    fn every_part_declares_base64() {
        let body = String::from_utf8(encode(b"k", b"c")).expect("ascii");
        assert_eq!(body.matches("Content-Transfer-Encoding: base64").count(), 2);
    }

    #[test]
    fn missing_parts_and_boundaries_are_errors() {
        assert!(decode("multipart/mixed", b"").is_err());
        assert!(decode(&content_type(), b"garbage").is_err());
        let only_key = format!(
            "--{BOUNDARY}\r\nContent-Type: application/pkcs8\r\n\r\nAAAA\r\n--{BOUNDARY}--\r\n"
        );
        assert!(decode(&content_type(), only_key.as_bytes()).is_err());
    }
}
