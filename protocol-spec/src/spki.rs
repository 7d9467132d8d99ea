//! DER SubjectPublicKeyInfo (RFC 5280 section 4.1.2.7) for the two key types Imprint accepts.
//!
//! Both encodings are a fixed prefix followed by the raw key (RFC 8410 section 4 for Ed25519,
//! RFC 5480 section 2 for P-256 with the uncompressed point), so encoding is a concatenation and
//! decoding accepts exactly those bytes: a key in any other form is not one of ours.

use crate::keys::{KeyAlgorithm, KeyError, PublicKey};

/// `SEQUENCE { SEQUENCE { id-Ed25519 }, BIT STRING (0 unused bits) }`, 32-byte key follows.
const ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// `SEQUENCE { SEQUENCE { id-ecPublicKey, prime256v1 }, BIT STRING }`, 65-byte point follows.
const P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// Encodes a raw public key as DER SubjectPublicKeyInfo.
pub fn encode(algorithm: KeyAlgorithm, raw: &[u8]) -> Vec<u8> {
    let prefix: &[u8] = match algorithm {
        KeyAlgorithm::Ed25519 => &ED25519_PREFIX,
        KeyAlgorithm::P256 => &P256_PREFIX,
    };
    let mut out = Vec::with_capacity(prefix.len() + raw.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(raw);
    out
}

/// Decodes a DER SubjectPublicKeyInfo holding an Ed25519 key or an uncompressed P-256 point.
pub fn decode(der: &[u8]) -> Result<PublicKey, KeyError> {
    if let Some(raw) = der.strip_prefix(&ED25519_PREFIX[..]) {
        if raw.len() == 32 {
            return Ok(PublicKey {
                algorithm: KeyAlgorithm::Ed25519,
                raw: raw.to_vec(),
            });
        }
        return Err(KeyError::InvalidPublicKey("Ed25519 key is not 32 bytes"));
    }
    if let Some(raw) = der.strip_prefix(&P256_PREFIX[..]) {
        if raw.len() == 65 && raw[0] == 0x04 {
            return Ok(PublicKey {
                algorithm: KeyAlgorithm::P256,
                raw: raw.to_vec(),
            });
        }
        return Err(KeyError::InvalidPublicKey(
            "P-256 key is not an uncompressed 65-byte point",
        ));
    }
    Err(KeyError::InvalidPublicKey(
        "only Ed25519 and P-256 (prime256v1) keys are accepted",
    ))
}

/// SHA-256 of a DER SubjectPublicKeyInfo: the token's key confirmation and the store's key index.
pub fn sha256(spki_der: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, spki_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}
