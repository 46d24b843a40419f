//! The client-to-server bytes of a Workload API connection, which the agent parses (HTTP/2
//! frames, HPACK) to fix up `:authority` before h2 sees them. The first byte chooses where
//! the input is split, so partial frames are exercised too.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(rest);
    let mut rewriter = agent::authority::AuthorityRewriter::new();
    let mut out = Vec::new();
    for chunk in input.chunks(usize::from(split).max(1)) {
        if rewriter.feed(chunk, &mut out).is_err() {
            break;
        }
    }
});
