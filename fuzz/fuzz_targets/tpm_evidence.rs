//! TPM attestation evidence as the issuer receives it from an agent: an EK certificate and
//! two marshalled TPM2B_PUBLIC areas, decoded and judged by `TpmAttestor::begin`, whose
//! every refusal must be a `Refusal`, never a panic. Input: a 16-bit length and the EK
//! certificate, a 16-bit length and the EK public area, then the AK public area.
#![no_main]
use std::sync::OnceLock;

use issuer::attestation::tpm::TpmAttestor;
use issuer::attestation::{NodeAttestor, Step};
use proto::agent::{challenge_response, evidence, ChallengeResponse, Evidence, TpmChallengeResponse, TpmEvidence};

/// A P-256 CA (`openssl req -x509`, basicConstraints CA:TRUE) standing for a manufacturer.
const CA: &[u8] = include_bytes!("tpm_evidence_ca.der");

fn attestor() -> &'static TpmAttestor {
    static ATTESTOR: OnceLock<TpmAttestor> = OnceLock::new();
    ATTESTOR.get_or_init(|| TpmAttestor::new(vec![CA.to_vec()]).expect("the fuzz CA is a CA"))
}

fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((size, rest)) = data.split_first_chunk::<2>() else {
        return std::mem::take(data);
    };
    let size = usize::from(u16::from_be_bytes(*size)).min(rest.len());
    let (field, rest) = rest.split_at(size);
    *data = rest;
    field
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut data = data;
    let ek_certificate = take(&mut data).to_vec();
    let ek_public = take(&mut data).to_vec();
    let ak_public = data.to_vec();
    let evidence = Evidence {
        csr: Vec::new(),
        method: Some(evidence::Method::Tpm(TpmEvidence {
            ek_certificate,
            ek_public,
            ak_public,
        })),
    };
    if let Ok(Step::Challenge { pending, .. }) = attestor().begin(&evidence) {
        let answer = ChallengeResponse {
            method: Some(challenge_response::Method::Tpm(TpmChallengeResponse {
                secret: vec![0; 32],
            })),
        };
        assert!(pending.verify(&answer).is_err(), "a guessed secret was accepted");
    }
});
