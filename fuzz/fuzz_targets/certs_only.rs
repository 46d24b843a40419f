//! certs-only CMS as a client receives it from cacerts/simpleenroll; what decodes must
//! re-encode and decode to the same certificates.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(certs) = est::certs_only::decode(data) {
        let refs: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
        let again = est::certs_only::decode(&est::certs_only::encode(&refs));
        assert!(again.is_ok(), "re-encoded certs-only does not decode");
    }
});
