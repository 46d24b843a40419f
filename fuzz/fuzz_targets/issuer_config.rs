//! See [`plant_fuzz::issuer_config`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::issuer_config(data));
