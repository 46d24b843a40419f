//! A serverkeygen response: the first line is taken as the Content-Type header value, the
//! rest as the body.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    let content_type = String::from_utf8_lossy(&data[..split]);
    let body = data.get(split + 1..).unwrap_or_default();
    let _ = est::multipart::decode(&content_type, body);
});
