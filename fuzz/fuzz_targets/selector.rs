//! See [`plant_fuzz::selector`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::selector(data));
