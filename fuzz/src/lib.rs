//! The bodies of the cargo-fuzz targets: one `pub fn <target>(data: &[u8])` per decoder of
//! untrusted bytes, each feeding the bytes to the code that meets them in production and
//! checking what it decodes. A body may only panic on a bug.
//!
//! Two builds use this file: the fuzz binaries in `fuzz_targets/` (libFuzzer, cargo-fuzz),
//! and the workspace test `tests/tests/fuzz_regressions.rs`, which includes it as a module
//! and replays every file under `fuzz/seeds/<target>/` and `fuzz/regressions/<target>/`
//! without libFuzzer. So this file names no crate of its own (no `crate::`) and uses only
//! crates that both `fuzz/Cargo.toml` and `tests/Cargo.toml` have.

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use issuer::attestation::tpm::TpmAttestor;
use issuer::attestation::{NodeAttestor, Step};
use proto::agent::{
    challenge_response, evidence, ChallengeResponse, Evidence, RegistrationEntry,
    TpmChallengeResponse, TpmEvidence,
};

/// A target body: the input, and a panic for a bug.
pub type Body = fn(&[u8]);

/// Every target by name, as in `fuzz/Cargo.toml` and the folders of `fuzz/seeds/`.
pub const TARGETS: &[(&str, Body)] = &[
    ("agent_config", agent_config),
    ("certs_only", certs_only),
    ("crl", crl),
    ("csr_attrs", csr_attrs),
    ("ek_cert", ek_cert),
    ("est_request_body", est_request_body),
    ("h2_authority", h2_authority),
    ("issuer_config", issuer_config),
    ("jwt_bundle", jwt_bundle),
    ("jwt_svid", jwt_svid),
    ("key_ref", key_ref),
    ("modbus_frame", modbus_frame),
    ("pkcs10", pkcs10),
    ("selector", selector),
    ("serverkeygen_multipart", serverkeygen_multipart),
    ("spiffe_id", spiffe_id),
    ("tpm_evidence", tpm_evidence),
    ("tpm_key_blob", tpm_key_blob),
];

/// What simpleenroll does with a request body: base64 (any whitespace) then PKCS#10.
pub fn est_request_body(data: &[u8]) {
    if let Ok(der) = est::body::decode(data) {
        let _ = est::csr::VerifiedCsr::from_der(&der);
    }
}

/// PKCS#10 DER straight into the verifier (signature, key type, extension requests).
pub fn pkcs10(data: &[u8]) {
    if let Ok(csr) = est::csr::VerifiedCsr::from_der(data) {
        // Whatever parses must describe itself without panicking.
        let _ = format!("{csr:?}");
        let _ = csr.common_name();
        let _ = csr.requested();
    }
}

/// certs-only CMS as a client receives it from cacerts/simpleenroll: what decodes must
/// re-encode and decode again, and the agent reads each certificate (subject, serial,
/// notAfter) and builds the chain from the first, as enrollment does with an answer.
pub fn certs_only(data: &[u8]) {
    let Ok(certs) = est::certs_only::decode(data) else {
        return;
    };
    let refs: Vec<&[u8]> = certs.iter().map(Vec::as_slice).collect();
    let again = est::certs_only::decode(&est::certs_only::encode(&refs));
    assert!(again.is_ok(), "re-encoded certs-only does not decode");
    let facts: Vec<_> = certs
        .iter()
        .filter_map(|der| agent::certificate::CertificateFacts::from_der("fuzz", der).ok())
        .collect();
    for fact in &facts {
        let _ = (fact.subject(), fact.serial_hex(), fact.not_after());
        let _ = fact.spki_der();
    }
    if let Some(leaf) = facts.first() {
        let _ = agent::certificate::issuing_chain(leaf, &certs[1..], &[]);
    }
}

/// CsrAttrs (RFC 8951 §4) as a client receives it; decode → encode → decode is stable.
pub fn csr_attrs(data: &[u8]) {
    if let Ok(entries) = est::csr_attrs::decode(data) {
        let again = est::csr_attrs::decode(&est::csr_attrs::encode(&entries));
        assert_eq!(again.ok(), Some(entries));
    }
}

/// A serverkeygen response: the first line is taken as the Content-Type header value, the
/// rest as the body.
pub fn serverkeygen_multipart(data: &[u8]) {
    let (content_type, body) = first_line(data);
    let _ = est::multipart::decode(&String::from_utf8_lossy(content_type), body);
}

/// Key references from configuration files and the command line, and EST labels from URLs.
pub fn key_ref(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(key_ref) = text.parse::<hsm::KeyRef>() {
            let _ = key_ref.to_string();
        }
        let _ = text.parse::<est::Label>();
    }
}

/// TPM key blob files (`TSS2 PRIVATE KEY` PEM) read from disk: as text, and the bytes as
/// the DER inside a well-formed PEM, so the ASN.1 layer is reached directly.
pub fn tpm_key_blob(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(blob) = hsm::tpm::KeyBlob::from_pem(text) {
            let _ = blob.to_pem();
        }
    }
    if let Ok(pem) = der::pem::encode_string("TSS2 PRIVATE KEY", der::pem::LineEnding::LF, data) {
        if let Ok(blob) = hsm::tpm::KeyBlob::from_pem(&pem) {
            let _ = blob.to_pem();
        }
    }
}

/// SPIFFE IDs and trust domains: from registration entries, agent configuration,
/// certificates' URI SANs and Workload API requests (FetchJWTSVID's spiffe_id).
pub fn spiffe_id(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = proto::SpiffeId::new(text) {
        // A parsed ID prints back exactly and its parts stay within it.
        assert_eq!(id.to_string(), text);
        let _ = id.trust_domain();
        assert!(id.is_under(&id));
        assert!(text.ends_with(id.path()));
    }
    let _ = proto::TrustDomain::new(text);
}

/// Selectors, alone and as the agent takes a registration entry from the issuer: the first
/// line is the entry's SPIFFE ID, each further line a selector. A parsed selector prints
/// back exactly, and an accepted entry matches a workload showing its own selectors.
pub fn selector(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(selector) = proto::Selector::new(text) {
        assert_eq!(selector.to_string(), text);
        assert_eq!(
            format!("{}:{}", selector.kind(), selector.value()),
            text,
            "kind and value split the text"
        );
        if let Some(name) = selector.legacy_device_name() {
            assert_eq!(proto::Selector::legacy_device(name), selector);
        }
    }
    let mut lines = text.split('\n');
    let spiffe_id = lines.next().unwrap_or_default().to_owned();
    let wire = RegistrationEntry {
        id: "fuzz".into(),
        spiffe_id,
        selectors: lines.map(str::to_owned).collect(),
        ..Default::default()
    };
    if let Ok(entry) = agent::daemon::entry::Entry::from_wire(wire) {
        assert!(
            entry.matches(&entry.selectors),
            "an entry refuses its own selectors"
        );
        assert!(
            !entry.matches(&[]),
            "an entry matches a workload with no selectors"
        );
    }
}

/// The client-to-server bytes of a Workload API connection, which the agent parses (HTTP/2
/// frames, HPACK) to fix up `:authority` before h2 sees them. The first byte chooses where
/// the input is split, so partial frames are exercised too.
pub fn h2_authority(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(rest);
    let mut rewriter = agent::daemon::h2_authority::AuthorityRewriter::new();
    let mut out = Vec::new();
    for chunk in input.chunks(usize::from(split).max(1)) {
        if rewriter.feed(chunk, &mut out).is_err() {
            break;
        }
    }
}

/// Modbus/TCP bytes from a peer (or a PLC), which the inbound proxy frames to check function
/// codes. Two passes: the framer over the whole input, checking what it reports, and the
/// real relay between in-memory streams with an echoing PLC, the input cut where its first
/// byte says so that frames arrive in pieces. Neither may panic or hang.
pub fn modbus_frame(data: &[u8]) {
    use agent::daemon::proxy::modbus::{self, Access};
    use agent::daemon::proxy::relay::{self, Traffic};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut offset = 0;
    while let Ok(Some(frame)) = modbus::frame(&rest[offset..]) {
        assert!((8..=modbus::MAX_FRAME).contains(&frame.len));
        assert!(offset + frame.len <= rest.len());
        // The per-function-code length check reads only inside the frame, never panics.
        let _ = modbus::check_request(&frame, &rest[offset..offset + frame.len]);
        let answer = modbus::exception(&frame, modbus::ILLEGAL_FUNCTION);
        assert_eq!(
            modbus::frame(&answer),
            Ok(Some(modbus::Frame {
                len: 9,
                function: frame.function | 0x80,
                ..frame
            }))
        );
        offset += frame.len;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let (peer, proxy_side) = tokio::io::duplex(1024);
        let (plc_side, mut plc) = tokio::io::duplex(1024);
        let traffic = Traffic::default();
        let access = if split & 1 == 0 {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let relay = relay::modbus(proxy_side, plc_side, access, &traffic, &|_, _| {});
        let echo = async move {
            let mut buffer = [0; 512];
            while let Ok(n) = plc.read(&mut buffer).await {
                if n == 0 || plc.write_all(&buffer[..n]).await.is_err() {
                    break;
                }
            }
        };
        // Reading while writing, as a TCP client must: a peer that never reads its
        // answers would stall any relay, as it would stall the PLC itself.
        let (mut answers, mut requests) = tokio::io::split(peer);
        let client = async move {
            let write = async {
                for chunk in rest.chunks(usize::from(split).max(1)) {
                    if requests.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                let _ = requests.shutdown().await;
            };
            let mut sink = Vec::new();
            let _ = tokio::join!(write, answers.read_to_end(&mut sink));
        };
        let outcome = tokio::time::timeout(Duration::from_secs(10), async {
            tokio::join!(relay, echo, client)
        })
        .await;
        assert!(outcome.is_ok(), "the Modbus relay hung on its input");
    });
}

/// A P-256 CA (`openssl req -x509`, basicConstraints CA:TRUE) standing for a TPM
/// manufacturer, and its key (PKCS#8), which [`ek_cert`] signs EK certificates with. Test
/// material only: the key is public.
const EK_CA: &[u8] = include_bytes!("../fixtures/ek_ca.der");
const EK_CA_KEY: &[u8] = include_bytes!("../fixtures/ek_ca_key.der");

fn tpm_attestor() -> &'static TpmAttestor {
    static ATTESTOR: OnceLock<TpmAttestor> = OnceLock::new();
    ATTESTOR.get_or_init(|| TpmAttestor::new(vec![EK_CA.to_vec()]).expect("the fuzz CA is a CA"))
}

/// TPM attestation evidence as the issuer receives it from an agent: an EK certificate and
/// two marshalled TPM2B_PUBLIC areas, decoded and judged by `TpmAttestor::begin`, whose
/// every refusal must be a `Refusal`, never a panic. Input: a 16-bit length and the EK
/// certificate, a 16-bit length and the EK public area, then the AK public area.
pub fn tpm_evidence(data: &[u8]) {
    let mut data = data;
    let ek_certificate = take(&mut data).to_vec();
    let ek_public = take(&mut data).to_vec();
    attest_tpm(ek_certificate, ek_public, data.to_vec());
}

/// EK certificates and TPM public areas as the attestor checks them once the manufacturer's
/// signature holds: the input's first field is a TBSCertificate, which this body signs with
/// the fixture CA's key, so the fuzzer reaches the EK key and attribute checks and
/// MakeCredential with any certificate content. Input as [`tpm_evidence`], with the
/// TBSCertificate in place of the certificate.
pub fn ek_cert(data: &[u8]) {
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::DecodePrivateKey;

    static KEY: OnceLock<p256::ecdsa::SigningKey> = OnceLock::new();
    let key = KEY.get_or_init(|| {
        p256::ecdsa::SigningKey::from_pkcs8_der(EK_CA_KEY).expect("the fuzz CA key")
    });
    let mut data = data;
    let tbs = take(&mut data);
    let ek_public = take(&mut data).to_vec();
    let signature: p256::ecdsa::Signature = key.sign(tbs);
    // Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }
    // (RFC 5280 §4.1), with ecdsa-with-SHA256 (RFC 5758 §3.2).
    const ECDSA_WITH_SHA256: &[u8] = &[
        0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
    ];
    let mut bit_string = vec![0];
    bit_string.extend_from_slice(signature.to_der().as_bytes());
    let mut content = tbs.to_vec();
    content.extend_from_slice(ECDSA_WITH_SHA256);
    content.extend(der_tlv(0x03, &bit_string));
    attest_tpm(der_tlv(0x30, &content), ek_public, data.to_vec());
}

fn attest_tpm(ek_certificate: Vec<u8>, ek_public: Vec<u8>, ak_public: Vec<u8>) {
    let evidence = Evidence {
        csr: Vec::new(),
        method: Some(evidence::Method::Tpm(TpmEvidence {
            ek_certificate,
            ek_public,
            ak_public,
        })),
    };
    if let Ok(Step::Challenge { pending, .. }) = tpm_attestor().begin(&evidence) {
        let answer = ChallengeResponse {
            method: Some(challenge_response::Method::Tpm(TpmChallengeResponse {
                secret: vec![0; 32],
            })),
        };
        assert!(
            pending.verify(&answer).is_err(),
            "a guessed secret was accepted"
        );
    }
}

/// A DER tag, definite length (X.690 §8.1.3) and content.
fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let length = content.len().to_be_bytes();
    let significant = &length[length.iter().position(|b| *b != 0).unwrap_or(length.len())..];
    match significant {
        [short] if *short < 0x80 => out.push(*short),
        [] => out.push(0),
        long => {
            out.push(0x80 | long.len() as u8);
            out.extend_from_slice(long);
        }
    }
    out.extend_from_slice(content);
    out
}

/// The next field of an input: a 16-bit big-endian length and that many bytes (fewer at
/// the end of the input).
fn take<'a>(data: &mut &'a [u8]) -> &'a [u8] {
    let Some((size, rest)) = data.split_first_chunk::<2>() else {
        return std::mem::take(data);
    };
    let size = usize::from(u16::from_be_bytes(*size)).min(rest.len());
    let (field, rest) = rest.split_at(size);
    *data = rest;
    field
}

/// The bytes up to the first newline, and those after it.
fn first_line(data: &[u8]) -> (&[u8], &[u8]) {
    let split = data.iter().position(|b| *b == b'\n').unwrap_or(data.len());
    (&data[..split], data.get(split + 1..).unwrap_or_default())
}

/// The trust domain, audience and clock of the JWT-SVID targets.
const JWT_TRUST_DOMAIN: &str = "plant.example";
const JWT_AUDIENCE: &str = "scada";
const JWT_NOW: Duration = Duration::from_secs(1_000_000);

/// A fixed P-256 JWT signing key (kid `k1`), as the issuer's JWKS would publish it.
fn jwt_signer() -> &'static (p256::ecdsa::SigningKey, Vec<u8>) {
    static SIGNER: OnceLock<(p256::ecdsa::SigningKey, Vec<u8>)> = OnceLock::new();
    SIGNER.get_or_init(|| {
        let key = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).expect("a P-256 scalar");
        let point = key.verifying_key().to_encoded_point(false);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "jwt-svid",
            "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
            "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
        }]});
        (key, serde_json::to_vec(&jwks).expect("JSON"))
    })
}

/// Runs exactly what ValidateJWTSVID runs on a token, with the claims turned into the
/// response's `google.protobuf.Struct`; an accepted token names a SPIFFE ID of the trust
/// domain.
fn validate_jwt(keys: &agent::daemon::jwt::JwtKeys, token: &str) {
    let trust_domain = proto::TrustDomain::new(JWT_TRUST_DOMAIN).expect("trust domain");
    let now = SystemTime::UNIX_EPOCH + JWT_NOW;
    if let Ok((spiffe_id, claims)) = keys.validate(token, JWT_AUDIENCE, &trust_domain, now) {
        assert_eq!(spiffe_id.trust_domain(), trust_domain);
        let _ = agent::daemon::jwt::claims_struct(claims);
    }
}

/// JWT-SVIDs given to the Workload API's ValidateJWTSVID, checked against a bundle with one
/// fixed key. The first byte chooses the form: even, the rest is the token as a workload
/// sends it; odd, the rest is a header JSON, a newline and a payload JSON, which this body
/// encodes and signs with the bundle's key, so the claims checks after the signature are
/// fuzzed too.
pub fn jwt_svid(data: &[u8]) {
    use p256::ecdsa::signature::Signer;

    static KEYS: OnceLock<agent::daemon::jwt::JwtKeys> = OnceLock::new();
    let (key, jwks) = jwt_signer();
    let keys =
        KEYS.get_or_init(|| agent::daemon::jwt::JwtKeys::from_jwks(jwks).expect("fixed JWKS"));
    let Some((&form, rest)) = data.split_first() else {
        return;
    };
    if form & 1 == 0 {
        if let Ok(token) = std::str::from_utf8(rest) {
            validate_jwt(keys, token);
        }
        return;
    }
    let (header, payload) = first_line(rest);
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(payload)
    );
    let signature: p256::ecdsa::Signature = key.sign(signed.as_bytes());
    let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    validate_jwt(keys, &token);
}

/// The JWKS document the agent receives from the issuer with each sync (the JWT bundle):
/// decoded into keys, then used on a token signed by the fixed key.
pub fn jwt_bundle(data: &[u8]) {
    use p256::ecdsa::signature::Signer;

    let Ok(keys) = agent::daemon::jwt::JwtKeys::from_jwks(data) else {
        return;
    };
    let (key, _) = jwt_signer();
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256","kid":"k1"}"#);
    let payload = URL_SAFE_NO_PAD
        .encode(br#"{"sub":"spiffe://plant.example/historian","aud":"scada","exp":1000300}"#);
    let signed = format!("{header}.{payload}");
    let signature: p256::ecdsa::Signature = key.sign(signed.as_bytes());
    validate_jwt(
        &keys,
        &format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes())),
    );
}

/// CRLs the agent receives from the issuer and turns into the set of revoked serials its
/// PLC proxy refuses; then the input asked about as a certificate, which counts as revoked
/// when it does not parse.
pub fn crl(data: &[u8]) {
    let revoked = agent::daemon::proxy::identity::Revoked::from_crls(&[data.to_vec()]);
    let _ = revoked.len();
    if agent::certificate::CertificateFacts::from_der("fuzz", data).is_err() {
        assert!(
            revoked.contains(data),
            "an unreadable certificate was let in"
        );
    }
}

/// `issuer.toml`: parsed and validated as at start, then the values the issuer derives from
/// it before it opens any file.
pub fn issuer_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = issuer::config::Config::parse(Path::new("/plant-fuzz/issuer.toml"), text)
    else {
        return;
    };
    assert!(
        config.trust_domain().is_ok(),
        "validated, yet no trust domain"
    );
    assert!(
        config.issuing_key().is_ok(),
        "validated, yet no issuing key"
    );
    let _ = (
        config.signing_keys(),
        config.key_options(),
        config.state_dir(),
    );
    let _ = config.admin_socket();
}

/// `agent.toml` with its `[[proxy.*]]` tables, parsed and validated as at start. The first
/// line is the value of `SPIFFE_ENDPOINT_SOCKET` (empty for unset), the rest the file. The
/// file's folder does not exist, so relative paths in it name nothing.
pub fn agent_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (socket_env, file) = text.split_once('\n').unwrap_or(("", text));
    let socket_env = (!socket_env.is_empty()).then_some(socket_env);
    let path = Path::new("/plant-fuzz-nonexistent/agent.toml");
    if let Ok(config) = agent::daemon::config::AgentConfig::parse(path, file, socket_env) {
        let _ = config.attestation.method();
        // Debug shows the configuration without its join token.
        let _ = format!("{config:?}");
    }
}
