//! See [`plant_fuzz::agent_config`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::agent_config(data));
