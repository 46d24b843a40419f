/// A P-256 public key in both forms certificate code needs.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey {
    spki_der: Vec<u8>,
    point: Vec<u8>,
}

/// DER prefix of a SubjectPublicKeyInfo for id-ecPublicKey / secp256r1 with a 65-byte
/// uncompressed point (RFC 5480 §2): everything before the point's bytes.
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

impl PublicKey {
    /// From an uncompressed SEC1 point (`04 || X || Y`).
    pub fn from_uncompressed_point(point: &[u8]) -> Option<Self> {
        if point.len() != 65 || point[0] != 0x04 {
            return None;
        }
        let mut spki_der = P256_SPKI_PREFIX.to_vec();
        spki_der.extend_from_slice(point);
        Some(Self {
            spki_der,
            point: point.to_vec(),
        })
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The uncompressed EC point, as carried in the SPKI's BIT STRING.
    pub fn point(&self) -> &[u8] {
        &self.point
    }
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey(P-256 {})", hex_prefix(&self.point[1..9]))
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<String>() + "…"
}
