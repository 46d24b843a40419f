//! SPIFFE IDs, trust domains and selectors: from registration entries, agent configuration,
//! certificates' URI SANs and Workload API requests (FetchJWTSVID's spiffe_id).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(id) = proto::SpiffeId::new(text) {
            // A parsed ID prints back exactly and its parts stay within it.
            assert_eq!(id.to_string(), text);
            let _ = id.trust_domain();
            let _ = id.is_under(&id);
            assert!(text.ends_with(id.path()));
        }
        let _ = proto::TrustDomain::new(text);
        if let Ok(selector) = proto::Selector::new(text) {
            assert_eq!(selector.to_string(), text);
        }
    }
});
