//! JWT-SVIDs (SPIFFE JWT-SVID spec): ES256 tokens signed by a software P-256 key kept in the
//! state folder (mode 0600, made on first start), published as a JWKS in the SPIFFE bundle
//! format. The key id is its RFC 7638 thumbprint, so it is stable across restarts and
//! derivable by anyone holding the public key.

use std::path::Path;
use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hsm::Signer;
use sha2::Digest;

use crate::Error;

/// The issuer's JWT-SVID signing key.
#[derive(Debug, Clone)]
pub struct JwtKey {
    key: Arc<hsm::SoftKey>,
    kid: String,
    x: String,
    y: String,
}

impl JwtKey {
    /// Opens `path`, creating the key on first use.
    pub fn open_or_create(path: &Path) -> Result<Self, Error> {
        let key = if path.exists() {
            hsm::SoftKey::open(path)?
        } else {
            hsm::SoftKey::create(path)?
        };
        let point = key.public_key().point();
        let (x, y) = match point {
            [0x04, rest @ ..] if rest.len() == 64 => {
                (B64.encode(&rest[..32]), B64.encode(&rest[32..]))
            }
            _ => {
                return Err(Error::Config(format!(
                    "{}: not an uncompressed P-256 key",
                    path.display()
                )))
            }
        };
        // RFC 7638 §3.2: the required members in lexicographic order, no whitespace.
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let kid = B64.encode(sha2::Sha256::digest(canonical.as_bytes()));
        Ok(Self {
            key: Arc::new(key),
            kid,
            x,
            y,
        })
    }

    /// The key id (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS document agents publish to workloads (SPIFFE Trust Domain and Bundle §4:
    /// `"use": "jwt-svid"`).
    pub fn jwks(&self) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "keys": [{
                "kty": "EC", "crv": "P-256", "x": self.x, "y": self.y,
                "kid": self.kid, "use": "jwt-svid",
            }]
        }))
        .unwrap_or_default()
    }

    /// A signed JWT-SVID for `subject` and `audience`, issued at `iat`, expiring at `exp`
    /// (unix seconds). One audience is written as a string, several as an array (RFC 7519
    /// §4.1.3 allows both; SPIFFE libraries read both).
    pub fn mint(
        &self,
        subject: &str,
        audience: &[String],
        iat: i64,
        exp: i64,
    ) -> Result<String, Error> {
        let header = serde_json::json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        let aud = match audience {
            [one] => serde_json::Value::from(one.as_str()),
            many => serde_json::Value::from(many.to_vec()),
        };
        let claims = serde_json::json!({ "sub": subject, "aud": aud, "iat": iat, "exp": exp });
        let encode = |v: &serde_json::Value| {
            serde_json::to_vec(v)
                .map(|b| B64.encode(b))
                .map_err(|e| Error::Certificate(e.to_string()))
        };
        let signing_input = format!("{}.{}", encode(&header)?, encode(&claims)?);
        let der = self.key.sign(signing_input.as_bytes())?;
        // JWS ES256 (RFC 7518 §3.4) carries R || S, 32 bytes each, not DER.
        let signature = p256::ecdsa::Signature::from_der(&der)
            .map_err(|e| Error::Certificate(format!("JWT signature: {e}")))?;
        Ok(format!(
            "{signing_input}.{}",
            B64.encode(signature.to_bytes())
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_token_verifies_with_the_published_key_and_the_kid_is_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jwt.key");
        let key = JwtKey::open_or_create(&path).expect("create");
        let again = JwtKey::open_or_create(&path).expect("reopen");
        assert_eq!(key.kid(), again.kid());

        let token = key
            .mint("spiffe://plant.test/w", &["db".into()], 100, 400)
            .expect("mint");
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[0]).expect("b64")).expect("json");
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["kid"], key.kid());
        let claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).expect("b64")).expect("json");
        assert_eq!(claims["aud"], "db");
        assert_eq!(claims["exp"], 400);

        let jwks: serde_json::Value = serde_json::from_slice(&key.jwks()).expect("jwks");
        let jwk = &jwks["keys"][0];
        let mut point = vec![4u8];
        for c in ["x", "y"] {
            point.extend(B64.decode(jwk[c].as_str().expect("str")).expect("b64"));
        }
        aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            &point,
        )
        .verify(
            format!("{}.{}", parts[0], parts[1]).as_bytes(),
            &B64.decode(parts[2]).expect("b64"),
        )
        .expect("verifies");
    }
}
