//! Per-device symmetric secrets: the key check value both sides compute.

use ring::aead::quic::{AES_256, HeaderProtectionKey};

/// Key check value of a 256-bit AES key: the first 3 bytes of AES-256(key, 0^128), the
/// conventional KCV of payment and HSM practice. ring exposes a single AES block encryption
/// only through QUIC header protection (RFC 9001 section 5.4.3: mask = AES-ECB(hp_key, sample)),
/// which is exactly that block operation.
pub fn kcv(secret: &[u8; 32]) -> [u8; 3] {
    let mut out = [0u8; 3];
    if let Ok(mask) =
        HeaderProtectionKey::new(&AES_256, secret).and_then(|key| key.new_mask(&[0u8; 16]))
    {
        out.copy_from_slice(&mask[..3]);
    }
    out
}

/// What a secret delivery's `algorithm` names (SPEC.md section 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretAlgorithm {
    /// `aes-256`: 32 random octets, the 3-octet AES-ECB KCV of [`kcv`].
    Aes256,
    /// `aes-128-dukpt` or `aes-256-dukpt`: an AES DUKPT Initial Key (ANSI X9.24-3-2017) of
    /// that type, with its Initial Key ID and the 5-octet AES-CMAC KCV of
    /// [`crate::dukpt::kcv`].
    Dukpt(crate::dukpt::KeyType),
}

impl SecretAlgorithm {
    /// The algorithm a delivery names; `None` for one this build does not know.
    pub fn from_name(name: &str) -> Option<SecretAlgorithm> {
        match name {
            "aes-256" => Some(SecretAlgorithm::Aes256),
            "aes-128-dukpt" => Some(SecretAlgorithm::Dukpt(crate::dukpt::KeyType::Aes128)),
            "aes-256-dukpt" => Some(SecretAlgorithm::Dukpt(crate::dukpt::KeyType::Aes256)),
            _ => None,
        }
    }

    /// Its name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            SecretAlgorithm::Aes256 => "aes-256",
            SecretAlgorithm::Dukpt(t) => t.dukpt_algorithm(),
        }
    }

    /// The secret's length in octets.
    pub fn secret_len(self) -> usize {
        match self {
            SecretAlgorithm::Aes256 => 32,
            SecretAlgorithm::Dukpt(t) => t.key_len(),
        }
    }

    /// Whether a delivery of it carries an Initial Key ID.
    pub fn has_initial_key_id(self) -> bool {
        matches!(self, SecretAlgorithm::Dukpt(_))
    }

    /// The key check value of `secret` under this algorithm; `None` when the length is wrong.
    pub fn kcv(self, secret: &[u8]) -> Option<Vec<u8>> {
        if secret.len() != self.secret_len() {
            return None;
        }
        match self {
            SecretAlgorithm::Aes256 => {
                let arr: &[u8; 32] = secret.try_into().ok()?;
                Some(kcv(arr).to_vec())
            }
            SecretAlgorithm::Dukpt(_) => Some(
                crate::dukpt::AesKey::from_bytes(secret)
                    .ok()?
                    .kcv()
                    .to_vec(),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kcv_matches_the_fips_197_known_answer() {
        // FIPS 197 appendix C.3 key with an all-zero block would need openssl; instead check
        // against AES-256(0^256, 0^128) = dc95c078a2408989ad48a21492842087 (NIST AESAVS
        // GFSbox/KeySbox zero-key vector).
        assert_eq!(kcv(&[0u8; 32]), [0xdc, 0x95, 0xc0]);
        assert_ne!(kcv(&[1u8; 32]), kcv(&[0u8; 32]));
    }
}
