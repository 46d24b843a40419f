//! TPM2_MakeCredential in software (TPM 2.0 Part 1 §24 "Credential Protection", Part 3
//! §12.6, Part 1 Annex B.10.4 for RSA and Annex C.6.4 for ECC secret sharing), so the
//! issuer needs no TPM:
//!
//! ```text
//! RSA EK:
//! seed            random, |nameAlg| bytes
//! encryptedSecret RSA-OAEP(EK, seed, hash = nameAlg, label = "IDENTITY\0")
//! ECC EK (one-pass Diffie-Hellman, C(1, 1, ECC CDH)):
//! (d, Q)          a fresh P-256 key pair
//! Z               x coordinate of d·EK
//! seed            KDFe(nameAlg, Z, "IDENTITY\0", Q.x, EK.x, |nameAlg| bits)
//! encryptedSecret TPMS_ECC_POINT(Q) = TPM2B(Q.x) || TPM2B(Q.y)
//! then, for both:
//! symKey          KDFa(nameAlg, seed, "STORAGE", name, "", 128)     AES-128, CFB, IV 0
//! encIdentity     AES-CFB(symKey, TPM2B_DIGEST(credential))
//! HMACkey         KDFa(nameAlg, seed, "INTEGRITY", "", "", 256)
//! outerHMAC       HMAC(HMACkey, encIdentity || name)
//! credentialBlob  TPM2B_ID_OBJECT(TPM2B_DIGEST(outerHMAC) || encIdentity)
//! ```
//!
//! Only the TPM holding the EK's private key recovers the seed, and it checks the HMAC over
//! the name of the object it is asked to activate, so the credential opens only with that
//! key loaded in that TPM.

use aws_lc_rs::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, ECDH_P256};
use aws_lc_rs::cipher::{EncryptingKey, EncryptionContext, UnboundCipherKey, AES_128};
use aws_lc_rs::digest;
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::rsa::{OaepPublicEncryptingKey, PublicEncryptingKey, OAEP_SHA256_MGF1SHA256};
use zeroize::Zeroizing;

use super::endorsement::{EndorsementCertificate, EndorsementKey};

/// A credential sealed for one EK and one object name.
#[derive(Debug)]
pub(super) struct SealedCredential {
    /// TPM2B_ID_OBJECT, marshalled with its size.
    pub(super) credential_blob: Vec<u8>,
    /// TPM2B_ENCRYPTED_SECRET, marshalled with its size.
    pub(super) encrypted_secret: Vec<u8>,
}

/// Why a credential could not be made: a key aws-lc-rs refuses, or a failed primitive.
#[derive(Debug)]
pub(super) struct SealError(pub(super) &'static str);

/// Seals `credential` (at most 32 bytes) for the TPM whose EK the certificate `ek` names
/// (RSA or P-256; its nameAlg SHA-256, its symmetric AES-128-CFB), to be activated with the
/// object named `name`.
pub(super) fn make_credential(
    ek: &EndorsementCertificate,
    name: &[u8],
    credential: &[u8],
) -> Result<SealedCredential, SealError> {
    if credential.len() > 32 {
        return Err(SealError("a credential is at most one SHA-256 digest long"));
    }
    let (seed, encrypted) = match &ek.key {
        EndorsementKey::Rsa { .. } => rsa_seed(&ek.spki)?,
        EndorsementKey::EccP256 { point } => ecc_seed(point)?,
    };

    let sym_key = Zeroizing::new(kdfa(seed.as_ref(), b"STORAGE", name, &[], 16));
    let mut enc_identity = Vec::with_capacity(credential.len() + 2);
    enc_identity.extend_from_slice(&(credential.len() as u16).to_be_bytes());
    enc_identity.extend_from_slice(credential);
    let cipher = UnboundCipherKey::new(&AES_128, &sym_key)
        .and_then(EncryptingKey::cfb128)
        .map_err(|_| SealError("AES key set-up failed"))?;
    cipher
        .less_safe_encrypt(
            &mut enc_identity,
            EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
        )
        .map_err(|_| SealError("AES-CFB encryption failed"))?;

    let hmac_key = Zeroizing::new(kdfa(seed.as_ref(), b"INTEGRITY", &[], &[], 32));
    let mut integrity = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    integrity.update(&enc_identity);
    integrity.update(name);
    let outer_hmac = integrity.sign();

    let mut id_object = Vec::with_capacity(2 + 32 + enc_identity.len());
    id_object.extend_from_slice(&(outer_hmac.as_ref().len() as u16).to_be_bytes());
    id_object.extend_from_slice(outer_hmac.as_ref());
    id_object.extend_from_slice(&enc_identity);
    Ok(SealedCredential {
        credential_blob: sized(&id_object),
        encrypted_secret: sized(&encrypted),
    })
}

/// A random seed and the seed encrypted to the RSA EK whose SubjectPublicKeyInfo is `spki`.
fn rsa_seed(spki: &[u8]) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), SealError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(seed.as_mut())
        .map_err(|_| SealError("no randomness"))?;
    let ek = PublicEncryptingKey::from_der(spki)
        .ok()
        .and_then(|key| OaepPublicEncryptingKey::new(key).ok())
        .ok_or(SealError("the EK is not a usable RSA key"))?;
    let mut encrypted = vec![0u8; ek.ciphertext_size()];
    let encrypted_len = ek
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            seed.as_ref(),
            &mut encrypted,
            Some(b"IDENTITY\0"),
        )
        .map_err(|_| SealError("RSA-OAEP encryption failed"))?
        .len();
    encrypted.truncate(encrypted_len);
    Ok((seed, encrypted))
}

/// A seed agreed with the P-256 EK at `point` (uncompressed) through a fresh key pair, and
/// that key pair's public point as a TPMS_ECC_POINT: the TPM redoes the agreement with the
/// EK's private key.
fn ecc_seed(point: &[u8]) -> Result<(Zeroizing<[u8; 32]>, Vec<u8>), SealError> {
    let random = SystemRandom::new();
    let ephemeral = EphemeralPrivateKey::generate(&ECDH_P256, &random)
        .map_err(|_| SealError("no ephemeral P-256 key"))?;
    let public = ephemeral
        .compute_public_key()
        .map_err(|_| SealError("no ephemeral P-256 public key"))?;
    let public = public.as_ref();
    if public.len() != 65 || point.len() != 65 {
        return Err(SealError("a P-256 point is 65 bytes uncompressed"));
    }
    let (ephemeral_x, ephemeral_y) = public[1..].split_at(32);
    let ek_x = &point[1..33];
    let seed = agreement::agree_ephemeral(
        ephemeral,
        UnparsedPublicKey::new(&ECDH_P256, point),
        SealError("the EK is not a point on P-256"),
        |z| {
            let mut seed = Zeroizing::new([0u8; 32]);
            seed.copy_from_slice(&kdfe(z, b"IDENTITY\0", ephemeral_x, ek_x, 32));
            Ok(seed)
        },
    )?;
    let mut encrypted = sized(ephemeral_x);
    encrypted.extend_from_slice(&sized(ephemeral_y));
    Ok((seed, encrypted))
}

/// KDFe with SHA-256 (TPM 2.0 Part 1 §11.4.10.3, SP 800-56A concatenation):
/// `H([i]32 || Z || use || party_u || party_v)` for i = 1, 2, …, truncated to `bytes`;
/// `use` carries its terminating NUL.
fn kdfe(z: &[u8], use_: &[u8], party_u: &[u8], party_v: &[u8], bytes: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(bytes + 32));
    let mut counter = 1u32;
    while out.len() < bytes {
        let mut block = digest::Context::new(&digest::SHA256);
        block.update(&counter.to_be_bytes());
        block.update(z);
        block.update(use_);
        block.update(party_u);
        block.update(party_v);
        out.extend_from_slice(block.finish().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// KDFa with HMAC-SHA256 (TPM 2.0 Part 1 §11.4.10.2, SP 800-108 counter mode):
/// `HMAC(key, [i]32 || label || 0x00 || context_u || context_v || [bits]32)` for i = 1, 2, …,
/// truncated to `bytes`.
fn kdfa(key: &[u8], label: &[u8], context_u: &[u8], context_v: &[u8], bytes: usize) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let bits = (bytes as u32).saturating_mul(8);
    let mut out = Vec::with_capacity(bytes + 32);
    let mut counter = 1u32;
    while out.len() < bytes {
        let mut block = hmac::Context::with_key(&key);
        block.update(&counter.to_be_bytes());
        block.update(label);
        block.update(&[0]);
        block.update(context_u);
        block.update(context_v);
        block.update(&bits.to_be_bytes());
        out.extend_from_slice(block.sign().as_ref());
        counter += 1;
    }
    out.truncate(bytes);
    out
}

/// A TPM2B: big-endian 16-bit size, then the bytes. Callers pass at most a few hundred.
fn sized(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_counts_blocks_and_truncates() {
        // Independent recomputation of the first block from the formula.
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"seed");
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"STORAGE\0name");
        input.extend_from_slice(&128u32.to_be_bytes());
        let expected = hmac::sign(&key, &input);
        assert_eq!(
            kdfa(b"seed", b"STORAGE", b"name", &[], 16),
            expected.as_ref()[..16]
        );
        // A second block with counter 2; every block carries the total length in bits.
        let long = kdfa(b"seed", b"INTEGRITY", &[], &[], 40);
        let mut input = 2u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"INTEGRITY\0");
        input.extend_from_slice(&320u32.to_be_bytes());
        assert_eq!(long.len(), 40);
        assert_eq!(long[32..], hmac::sign(&key, &input).as_ref()[..8]);
    }

    #[test]
    fn credentials_longer_than_a_digest_are_refused() {
        let key = rcgen::KeyPair::generate().expect("P-256 key");
        let certificate = rcgen::CertificateParams::default()
            .self_signed(&key)
            .expect("certificate");
        let ek = EndorsementCertificate::decode(certificate.der()).expect("a P-256 EK");
        assert!(make_credential(&ek, b"name", &[0u8; 33]).is_err());
        assert!(make_credential(&ek, b"name", &[0u8; 32]).is_ok());
    }

    #[test]
    fn kdfe_hashes_counter_secret_use_and_both_parties() {
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"zzIDENTITY\0uv");
        let expected = digest::digest(&digest::SHA256, &input);
        assert_eq!(
            kdfe(b"zz", b"IDENTITY\0", b"u", b"v", 32).as_slice(),
            expected.as_ref()
        );
        let mut input = 2u32.to_be_bytes().to_vec();
        input.extend_from_slice(b"zzIDENTITY\0uv");
        assert_eq!(
            kdfe(b"zz", b"IDENTITY\0", b"u", b"v", 40)[32..],
            digest::digest(&digest::SHA256, &input).as_ref()[..8]
        );
    }
}
