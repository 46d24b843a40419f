//! JWT-SVID checks for the Workload API's `ValidateJWTSVID` (JWT-SVID.md §3, §4): ES256
//! signatures verified against the trust domain's JWKS (RFC 7517), `aud` holding the
//! audience, `exp` in the future, `sub` a SPIFFE ID of the trust domain.

use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use proto::{SpiffeId, TrustDomain};
use serde::Deserialize;

/// Longest token accepted; real JWT-SVIDs are well under 2 KiB.
const MAX_TOKEN: usize = 16 * 1024;

/// Why a token is not a valid JWT-SVID; the text goes back to the workload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    /// Not three base64url parts of JSON.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// `alg` is not ES256.
    #[error("unsupported algorithm {0:?}; JWT-SVIDs here are ES256")]
    Algorithm(String),
    /// No key in the bundle has the token's `kid`.
    #[error("no key with id {0:?} in the trust bundle")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    Signature,
    /// The token has expired (or has no `exp`).
    #[error("token has expired")]
    Expired,
    /// The audience is not in `aud`.
    #[error("audience {0:?} is not in the token's aud")]
    Audience(String),
    /// `sub` is not a SPIFFE ID of the trust domain.
    #[error("subject is not a SPIFFE ID of this trust domain: {0}")]
    Subject(String),
}

#[derive(Debug, Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    crv: Option<String>,
    kid: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// The verification keys of a JWKS document, by key id.
#[derive(Debug, Clone, Default)]
pub struct JwtKeys {
    keys: BTreeMap<String, p256::ecdsa::VerifyingKey>,
}

impl JwtKeys {
    /// The P-256 keys of a JWKS document; other key types are skipped.
    pub fn from_jwks(document: &[u8]) -> Result<Self, JwtError> {
        if document.is_empty() {
            return Ok(Self::default());
        }
        let jwks: Jwks = serde_json::from_slice(document)
            .map_err(|e| JwtError::Malformed(format!("trust bundle JWKS: {e}")))?;
        let mut keys = BTreeMap::new();
        for jwk in jwks.keys {
            let (Some(kid), Some(x), Some(y)) = (jwk.kid, jwk.x, jwk.y) else {
                continue;
            };
            if jwk.kty != "EC" || jwk.crv.as_deref() != Some("P-256") {
                continue;
            }
            let (Ok(x), Ok(y)) = (URL_SAFE_NO_PAD.decode(x), URL_SAFE_NO_PAD.decode(y)) else {
                continue;
            };
            if x.len() != 32 || y.len() != 32 {
                continue;
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if let Ok(key) = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point) {
                keys.insert(kid, key);
            }
        }
        Ok(Self { keys })
    }

    /// Checks `token` for `audience` at `now`; returns the subject and all claims.
    pub fn validate(
        &self,
        token: &str,
        audience: &str,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<(SpiffeId, serde_json::Map<String, serde_json::Value>), JwtError> {
        if token.len() > MAX_TOKEN {
            return Err(JwtError::Malformed("token too long".into()));
        }
        let mut parts = token.split('.');
        let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed(
                "a JWT has three dot-separated parts".into(),
            ));
        };
        let decode = |part: &str, what: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|e| JwtError::Malformed(format!("{what}: {e}")))
        };
        let header: Header = serde_json::from_slice(&decode(header_b64, "header")?)
            .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
        if header.alg != "ES256" {
            return Err(JwtError::Algorithm(header.alg));
        }
        let kid = header.kid.unwrap_or_default();
        let key = self
            .keys
            .get(&kid)
            .ok_or_else(|| JwtError::UnknownKey(kid.clone()))?;
        // JWS ES256 signatures are r || s, 32 bytes each (RFC 7518 §3.4), not DER.
        let signature = p256::ecdsa::Signature::from_slice(&decode(signature_b64, "signature")?)
            .map_err(|_| JwtError::Signature)?;
        let signed = &token[..header_b64.len() + 1 + payload_b64.len()];
        key.verify(signed.as_bytes(), &signature)
            .map_err(|_| JwtError::Signature)?;
        let claims: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&decode(payload_b64, "payload")?)
                .map_err(|e| JwtError::Malformed(format!("payload: {e}")))?;
        let expires = claims
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .ok_or(JwtError::Expired)?;
        let now_seconds = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        if expires <= now_seconds {
            return Err(JwtError::Expired);
        }
        let audience_ok = match claims.get("aud") {
            Some(serde_json::Value::String(aud)) => aud == audience,
            Some(serde_json::Value::Array(auds)) => {
                auds.iter().any(|a| a.as_str() == Some(audience))
            }
            _ => false,
        };
        if !audience_ok {
            return Err(JwtError::Audience(audience.to_owned()));
        }
        let subject = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .ok_or_else(|| JwtError::Subject("no sub".into()))?;
        let spiffe_id = SpiffeId::new(subject).map_err(|e| JwtError::Subject(e.to_string()))?;
        if &spiffe_id.trust_domain() != trust_domain {
            return Err(JwtError::Subject(spiffe_id.to_string()));
        }
        Ok((spiffe_id, claims))
    }
}

/// JSON claims as a `google.protobuf.Struct` (ValidateJWTSVIDResponse.claims).
pub fn claims_struct(claims: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .into_iter()
            .map(|(name, value)| (name, protobuf_value(value)))
            .collect(),
    }
}

fn protobuf_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(protobuf_value).collect(),
        }),
        serde_json::Value::Object(map) => Kind::StructValue(claims_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Signer;
    use std::time::Duration;

    struct Issuer {
        key: p256::ecdsa::SigningKey,
        jwks: Vec<u8>,
    }

    fn issuer() -> Issuer {
        let key = p256::ecdsa::SigningKey::random(&mut rand::rngs::OsRng);
        let point = key.verifying_key().to_encoded_point(false);
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "kid": "k1", "use": "jwt-svid",
            "x": URL_SAFE_NO_PAD.encode(point.x().expect("x")),
            "y": URL_SAFE_NO_PAD.encode(point.y().expect("y")),
        }]});
        Issuer {
            key,
            jwks: serde_json::to_vec(&jwks).expect("json"),
        }
    }

    fn token(issuer: &Issuer, kid: &str, claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&serde_json::json!({"alg": "ES256", "kid": kid, "typ": "JWT"}))
                .expect("json"),
        );
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("json"));
        let signed = format!("{header}.{payload}");
        let signature: p256::ecdsa::Signature = issuer.key.sign(signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    #[test]
    fn a_good_token_gives_its_subject_and_claims() {
        let issuer = issuer();
        let keys = JwtKeys::from_jwks(&issuer.jwks).expect("jwks");
        let td = TrustDomain::new("plant.example").expect("td");
        let jwt = token(
            &issuer,
            "k1",
            serde_json::json!({"sub": "spiffe://plant.example/historian", "aud": ["scada"], "exp": 1_000_300}),
        );
        let (id, claims) = keys.validate(&jwt, "scada", &td, now()).expect("valid");
        assert_eq!(id.as_str(), "spiffe://plant.example/historian");
        let claims = claims_struct(claims);
        assert!(claims.fields.contains_key("aud"));
    }

    #[test]
    fn each_flaw_is_refused_with_its_reason() {
        let issuer = issuer();
        let stranger = self::issuer();
        let keys = JwtKeys::from_jwks(&issuer.jwks).expect("jwks");
        let td = TrustDomain::new("plant.example").expect("td");
        let good = serde_json::json!({"sub": "spiffe://plant.example/h", "aud": "scada", "exp": 1_000_300});
        let cases = [
            (
                token(
                    &issuer,
                    "k1",
                    serde_json::json!({"sub": "spiffe://plant.example/h", "aud": "scada", "exp": 999_999}),
                ),
                JwtError::Expired,
            ),
            (
                token(
                    &issuer,
                    "k1",
                    serde_json::json!({"sub": "spiffe://plant.example/h", "aud": "other", "exp": 1_000_300}),
                ),
                JwtError::Audience("scada".into()),
            ),
            (
                token(&issuer, "k2", good.clone()),
                JwtError::UnknownKey("k2".into()),
            ),
            (token(&stranger, "k1", good.clone()), JwtError::Signature),
            (
                token(
                    &issuer,
                    "k1",
                    serde_json::json!({"sub": "spiffe://elsewhere/h", "aud": "scada", "exp": 1_000_300}),
                ),
                JwtError::Subject("spiffe://elsewhere/h".into()),
            ),
        ];
        for (jwt, expected) in cases {
            assert_eq!(
                keys.validate(&jwt, "scada", &td, now()).map(|_| ()),
                Err(expected)
            );
        }
        assert!(matches!(
            keys.validate("a.b", "scada", &td, now()),
            Err(JwtError::Malformed(_))
        ));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(br#"{"sub":"spiffe://plant.example/h"}"#)
        );
        assert_eq!(
            keys.validate(&none, "scada", &td, now()).map(|_| ()),
            Err(JwtError::Algorithm("none".into()))
        );
    }
}
