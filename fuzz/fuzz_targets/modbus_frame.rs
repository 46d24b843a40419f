//! See [`plant_fuzz::modbus_frame`].
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| plant_fuzz::modbus_frame(data));
