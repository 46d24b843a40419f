//! Base64 bodies (RFC 8951 §3): always base64 of DER whatever `Content-Transfer-Encoding`
//! says; line breaks (LF or CRLF) and surrounding whitespace are allowed.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;

use crate::Error;

/// Decodes a request or response body, ignoring all ASCII whitespace.
pub fn decode(body: &[u8]) -> Result<Vec<u8>, Error> {
    if body.starts_with(b"-----BEGIN") {
        return Err(Error::Base64(
            "got PEM; send base64 of the DER bytes without the -----BEGIN/END----- lines".into(),
        ));
    }
    let compact: Vec<u8> = body
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    if compact.is_empty() {
        return Err(Error::Base64("the body is empty".into()));
    }
    STANDARD
        .decode(&compact)
        .map_err(|e| Error::Base64(e.to_string()))
}

/// Encodes DER for a response: 64 characters a line, each line ending in CRLF as in
/// RFC 2045, which every base64 decoder we know of (openssl, libest, Go) accepts.
pub fn encode(der: &[u8]) -> String {
    let flat = STANDARD.encode(der);
    let mut out = String::with_capacity(flat.len() + flat.len() / 32 + 2);
    for chunk in flat.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk boundary is a char boundary.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_with_and_without_line_breaks() {
        let der: Vec<u8> = (0..=255u8).collect();
        let text = encode(&der);
        assert_eq!(decode(text.as_bytes()).expect("crlf"), der);
        assert_eq!(
            decode(text.replace("\r\n", "\n").as_bytes()).expect("lf"),
            der
        );
        assert_eq!(
            decode(text.replace("\r\n", "").as_bytes()).expect("flat"),
            der
        );
        let padded = format!("  {}\n\n", text.replace("\r\n", ""));
        assert_eq!(decode(padded.as_bytes()).expect("padded"), der);
    }

    #[test]
    fn pem_and_garbage_are_refused_with_a_hint() {
        let err = decode(b"-----BEGIN CERTIFICATE REQUEST-----\nAA==\n").expect_err("pem");
        assert!(err.to_string().contains("PEM"));
        assert!(decode(b"not base64 at all!").is_err());
        assert!(decode(b"   ").is_err());
    }
}
