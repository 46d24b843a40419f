//! See [`plant_fuzz::certs_only`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::certs_only(data));
