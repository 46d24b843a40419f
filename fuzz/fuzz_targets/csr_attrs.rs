//! See [`plant_fuzz::csr_attrs`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::csr_attrs(data));
