//! See [`plant_fuzz::h2_authority`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::h2_authority(data));
