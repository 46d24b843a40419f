//! See [`plant_fuzz::est_request_body`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::est_request_body(data));
