//! PKCS#10 DER straight into the verifier (signature, key type, extension requests).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(csr) = est::csr::VerifiedCsr::from_der(data) {
        // Whatever parses must describe itself without panicking.
        let _ = format!("{csr:?}");
        let _ = csr.common_name();
        let _ = csr.requested();
    }
});
