//! TPM key blob files (`TSS2 PRIVATE KEY` PEM) read from disk: as text, and the fuzzer's
//! bytes as the DER inside a well-formed PEM, so the ASN.1 layer is reached directly.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(blob) = hsm::tpm::KeyBlob::from_pem(text) {
            let _ = blob.to_pem();
        }
    }
    if let Ok(pem) = der::pem::encode_string("TSS2 PRIVATE KEY", der::pem::LineEnding::LF, data) {
        if let Ok(blob) = hsm::tpm::KeyBlob::from_pem(&pem) {
            let _ = blob.to_pem();
        }
    }
});
