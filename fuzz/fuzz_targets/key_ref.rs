//! See [`plant_fuzz::key_ref`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::key_ref(data));
