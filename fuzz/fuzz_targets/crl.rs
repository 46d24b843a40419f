//! See [`plant_fuzz::crl`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::crl(data));
