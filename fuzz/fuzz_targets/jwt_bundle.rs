//! See [`plant_fuzz::jwt_bundle`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::jwt_bundle(data));
