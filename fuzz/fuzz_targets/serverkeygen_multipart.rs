//! See [`plant_fuzz::serverkeygen_multipart`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::serverkeygen_multipart(data));
