//! What simpleenroll does with a request body: base64 (any whitespace) then PKCS#10.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(der) = est::body::decode(data) {
        let _ = est::csr::VerifiedCsr::from_der(&der);
    }
});
