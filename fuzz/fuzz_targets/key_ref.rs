//! Key references from configuration files and the command line, and EST labels from URLs.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key_ref) = text.parse::<hsm::KeyRef>() {
            let _ = key_ref.to_string();
        }
        let _ = text.parse::<est::Label>();
    }
});
