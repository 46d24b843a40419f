//! See [`plant_fuzz::tpm_evidence`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::tpm_evidence(data));
