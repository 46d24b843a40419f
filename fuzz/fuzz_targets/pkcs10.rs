//! See [`plant_fuzz::pkcs10`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::pkcs10(data));
