//! See [`plant_fuzz::ek_cert`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::ek_cert(data));
