//! CsrAttrs (RFC 8951 §4) as a client receives it; decode → encode → decode is stable.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = est::csr_attrs::decode(data) {
        let again = est::csr_attrs::decode(&est::csr_attrs::encode(&entries));
        assert_eq!(again.ok(), Some(entries));
    }
});
