//! The provisioning record (SPEC.md section 13): everything a device must keep after enrolling,
//! in about a hundred bytes of write-once memory. With the CA certificate it was built with,
//! a device rebuilds from it its key pair and its certificate, byte for byte (the profile of
//! section 5 is deterministic except for the CA's signature, which the record keeps).
//!
//! ```text
//! offset     size  field
//! 0          1     header: bits 7-6 = 01 (format 1); bit 5 = device key (0 Ed25519, 1 P-256);
//!                  bits 4-2 = serial octets - 1; bits 1-0 = generation octets (0, 1, 2, 4)
//! 1          S     device serial, big-endian, no leading zero octet (S = 1..8)
//! 1+S        G     reset generation, big-endian, no leading zero octet (G = 0 for generation 0)
//! 1+S+G      2     the first 2 octets of the CA's subjectKeyIdentifier
//! 3+S+G      32    private key: Ed25519 seed, or P-256 scalar (big-endian)
//! 35+S+G     64    the CA's signature: Ed25519 R||S, or ECDSA r||s (32 octets each)
//! total      99+S+G
//! ```

use ring::rand::SecureRandom;
use zeroize::Zeroizing;

use crate::keys::{KeyAlgorithm, KeyPair};
use crate::profile::{CertProfile, ProfileError, cert_serial, signature_value};
use crate::{CertSerial, DeviceSerial};

/// The record's format number (header bits 7-6).
pub const FORMAT: u8 = 1;
/// Octets of the CA key id the record keeps.
pub const CA_KEY_HINT_LEN: usize = 2;
/// A record's size without its serial and generation octets.
pub const FIXED_LEN: usize = 1 + CA_KEY_HINT_LEN + 32 + 64;

/// Why a record cannot be made, read or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// The bytes are not a record of this format.
    #[error("provisioning record: {0}")]
    Malformed(String),
    /// The record names another CA than the certificate given.
    #[error(
        "the record's CA key id starts {record}, the CA certificate's is {ca}: not the CA it was enrolled with"
    )]
    WrongCa {
        /// The record's octets, hex.
        record: String,
        /// The CA's key id, hex.
        ca: String,
    },
    /// The private key does not load.
    #[error("provisioning record: the private key: {0}")]
    Key(#[from] crate::keys::KeyError),
    /// The certificate does not rebuild (signature, serial, key or CA wrong).
    #[error("provisioning record: {0}")]
    Certificate(#[from] ProfileError),
}

/// What a device keeps: see the module's table.
pub struct ProvisioningRecord {
    /// Device serial.
    pub serial: DeviceSerial,
    /// Reset generation of the binding (SPEC.md section 5).
    pub generation: u32,
    /// Device key algorithm.
    pub key_algorithm: KeyAlgorithm,
    /// The first octets of the CA's subjectKeyIdentifier.
    pub ca_key_hint: [u8; CA_KEY_HINT_LEN],
    /// The private key's own octets (secret; zeroized on drop).
    pub private_key: Zeroizing<[u8; 32]>,
    /// The CA's signature, fixed-size (Ed25519, or ECDSA r||s).
    pub signature: [u8; 64],
}

impl std::fmt::Debug for ProvisioningRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisioningRecord")
            .field("serial", &self.serial)
            .field("generation", &self.generation)
            .field("key_algorithm", &self.key_algorithm)
            .field("ca_key_hint", &hex::encode(self.ca_key_hint))
            .finish_non_exhaustive()
    }
}

impl ProvisioningRecord {
    /// The record of an enrolled device: its key, its certificate, and the CA certificate it
    /// was issued under. Checks that the record rebuilds this very certificate.
    pub fn of(
        key: &KeyPair,
        certificate: &[u8],
        ca: &CertProfile,
        rng: &dyn SecureRandom,
    ) -> Result<Self, RecordError> {
        let cert_serial = cert_serial(certificate)?;
        let signature = match ca.ca_public_key().algorithm {
            KeyAlgorithm::Ed25519 => signature_value(certificate)?,
            KeyAlgorithm::P256 => ecdsa_der_to_fixed(&signature_value(certificate)?)
                .ok_or_else(|| malformed("the certificate's ECDSA signature is not DER"))?,
        };
        let record = ProvisioningRecord {
            serial: cert_serial.device,
            generation: cert_serial.generation,
            key_algorithm: key.algorithm(),
            ca_key_hint: hint_of(ca)?,
            private_key: key.private_key_raw()?,
            signature: signature
                .as_slice()
                .try_into()
                .map_err(|_| malformed("the CA signature is not 64 octets"))?,
        };
        let (_, rebuilt) = record.rebuild(ca, rng)?;
        if rebuilt != certificate {
            return Err(malformed(
                "the certificate does not rebuild from the record (not this profile's)",
            ));
        }
        Ok(record)
    }

    /// The record's bytes (secret: they hold the private key).
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let serial_octets = self.serial.get().to_be_bytes();
        let serial = minimal(&serial_octets);
        let generation = match self.generation {
            0 => Vec::new(),
            g => {
                let octets = g.to_be_bytes();
                let m = minimal(&octets);
                // 3 octets are written as 4: the header's code has no 3.
                let mut padded = vec![0u8; if m.len() == 3 { 1 } else { 0 }];
                padded.extend_from_slice(m);
                padded
            }
        };
        let g_code: u8 = match generation.len() {
            0 => 0,
            1 => 1,
            2 => 2,
            _ => 3,
        };
        let alg_bit: u8 = match self.key_algorithm {
            KeyAlgorithm::Ed25519 => 0,
            KeyAlgorithm::P256 => 1,
        };
        // serial.len() is 1..=8: a DeviceSerial is not zero.
        let s_code = (serial.len().saturating_sub(1) as u8) & 0x07;
        let mut out = Zeroizing::new(Vec::with_capacity(FIXED_LEN + 12));
        out.push(FORMAT << 6 | alg_bit << 5 | s_code << 2 | g_code);
        out.extend_from_slice(serial);
        out.extend_from_slice(&generation);
        out.extend_from_slice(&self.ca_key_hint);
        out.extend_from_slice(self.private_key.as_ref());
        out.extend_from_slice(&self.signature);
        out
    }

    /// Reads a record: exactly one, every field in its shortest form.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let (&header, rest) = bytes.split_first().ok_or_else(|| malformed("empty"))?;
        if header >> 6 != FORMAT {
            return Err(malformed(format!("format {} is not {FORMAT}", header >> 6)));
        }
        let key_algorithm = if header & 0x20 == 0 {
            KeyAlgorithm::Ed25519
        } else {
            KeyAlgorithm::P256
        };
        let s_len = usize::from((header >> 2) & 0x07) + 1;
        let g_len = [0usize, 1, 2, 4][usize::from(header & 0x03)];
        let want = FIXED_LEN + s_len + g_len;
        if bytes.len() != want {
            return Err(malformed(format!(
                "{} octets, the header announces {want}",
                bytes.len()
            )));
        }
        let (serial, rest) = rest.split_at(s_len);
        let (generation, rest) = rest.split_at(g_len);
        let (hint, rest) = rest.split_at(CA_KEY_HINT_LEN);
        let (private_key, signature) = rest.split_at(32);
        if serial.first() == Some(&0) {
            return Err(malformed("the serial has a leading zero octet"));
        }
        let serial = DeviceSerial::new(be(serial)).ok_or_else(|| malformed("serial 0"))?;
        let generation_value = be(generation);
        let shortest = generation_value == 0
            || minimal(&generation_value.to_be_bytes()).len() == g_len
            || (g_len == 4 && minimal(&generation_value.to_be_bytes()).len() == 3);
        if (g_len > 0 && generation_value == 0) || !shortest {
            return Err(malformed("the generation is not in its shortest form"));
        }
        let generation =
            u32::try_from(generation_value).map_err(|_| malformed("generation over 4294967295"))?;
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(private_key);
        let mut sig = [0u8; 64];
        sig.copy_from_slice(signature);
        let mut ca_key_hint = [0u8; CA_KEY_HINT_LEN];
        ca_key_hint.copy_from_slice(hint);
        Ok(ProvisioningRecord {
            serial,
            generation,
            key_algorithm,
            ca_key_hint,
            private_key: key,
            signature: sig,
        })
    }

    /// Rebuilds the device's key pair and certificate under the CA certificate `ca` (the one
    /// the device was built with): the certificate of section 5 for the record's serial,
    /// generation and key, with the record's signature, which must verify under the CA key.
    pub fn rebuild(
        &self,
        ca: &CertProfile,
        rng: &dyn SecureRandom,
    ) -> Result<(KeyPair, Vec<u8>), RecordError> {
        let hint = hint_of(ca)?;
        if hint != self.ca_key_hint {
            return Err(RecordError::WrongCa {
                record: hex::encode(self.ca_key_hint),
                ca: hex::encode(ca.ca_key_id()),
            });
        }
        let key = KeyPair::from_private_key_raw(self.key_algorithm, &self.private_key, rng)?;
        let signature = match ca.ca_public_key().algorithm {
            KeyAlgorithm::Ed25519 => self.signature.to_vec(),
            KeyAlgorithm::P256 => ecdsa_fixed_to_der(&self.signature),
        };
        let certificate = ca.expand(
            CertSerial::new(self.serial, self.generation),
            &key.spki_der(),
            ca.ca_key_id(),
            &signature,
        )?;
        Ok((key, certificate))
    }
}

fn malformed(why: impl Into<String>) -> RecordError {
    RecordError::Malformed(why.into())
}

fn hint_of(ca: &CertProfile) -> Result<[u8; CA_KEY_HINT_LEN], RecordError> {
    ca.ca_key_id()
        .get(..CA_KEY_HINT_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or_else(|| malformed("the CA key id is shorter than 2 octets"))
}

/// `bytes` without its leading zero octets.
fn minimal(bytes: &[u8]) -> &[u8] {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    &bytes[zeros..]
}

/// A big-endian number of at most 8 octets.
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |a, b| a << 8 | u64::from(*b))
}

/// An X.509 ECDSA signature (DER `Ecdsa-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER }`,
/// RFC 3279 section 2.2.3) as r||s, 32 octets each.
pub fn ecdsa_der_to_fixed(der: &[u8]) -> Option<Vec<u8>> {
    let (seq, rest) = tlv(der, 0x30)?;
    if !rest.is_empty() {
        return None;
    }
    let (r, rest) = tlv(seq, 0x02)?;
    let (s, rest) = tlv(rest, 0x02)?;
    if !rest.is_empty() {
        return None;
    }
    let mut out = vec![0u8; 64];
    for (i, v) in [r, s].into_iter().enumerate() {
        let v = minimal(v);
        if v.len() > 32 {
            return None;
        }
        out[i * 32 + 32 - v.len()..(i + 1) * 32].copy_from_slice(v);
    }
    Some(out)
}

/// r||s as the DER `Ecdsa-Sig-Value` an X.509 certificate carries: each INTEGER in its
/// shortest form (DER), positive (a leading 00 where the top bit is set).
pub fn ecdsa_fixed_to_der(fixed: &[u8; 64]) -> Vec<u8> {
    let mut body = Vec::with_capacity(70);
    for half in fixed.chunks(32) {
        let v = minimal(half);
        let v = if v.is_empty() { &[0u8][..] } else { v };
        let pad = v[0] & 0x80 != 0;
        body.push(0x02);
        body.push((v.len() + usize::from(pad)) as u8);
        if pad {
            body.push(0);
        }
        body.extend_from_slice(v);
    }
    let mut out = vec![0x30, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// One short-form DER TLV of tag `tag`: (contents, what follows).
fn tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    let (&len, rest) = rest.split_first()?;
    if t != tag || len >= 0x80 {
        return None;
    }
    let len = usize::from(len);
    Some((rest.get(..len)?, rest.get(len..)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::new_ca_certificate;
    use ring::rand::SystemRandom;

    #[test]
    fn a_record_rebuilds_key_and_certificate_for_every_key_combination_within_its_size() {
        let rng = SystemRandom::new();
        for ca_alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
            let ca_key = KeyPair::generate(ca_alg, &rng).unwrap();
            let ca_der = new_ca_certificate("Test CA", &ca_key, 1_700_000_000, &rng).unwrap();
            let ca = CertProfile::from_ca_der(&ca_der).unwrap();
            for dev_alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
                // (serial, generation, record size): 99 + serial octets + generation octets.
                for (serial, generation, size) in [
                    (0xFFFF_FFFF_u64, 0u32, 103),
                    (4_000_000_000, 200, 104),
                    (1, 0, 100),
                    (u64::MAX, u32::MAX, 111),
                    (0x0100_0000, 0x0001_0000, 107),
                ] {
                    let dev = KeyPair::generate(dev_alg, &rng).unwrap();
                    let cs = CertSerial::new(DeviceSerial::new(serial).unwrap(), generation);
                    let issued = ca.issue(cs, &dev.spki_der(), &ca_key, &rng).unwrap();
                    let record = ProvisioningRecord::of(&dev, &issued.der, &ca, &rng).unwrap();
                    let bytes = record.encode();
                    assert_eq!(bytes.len(), size, "{ca_alg}/{dev_alg} {cs}");
                    let back = ProvisioningRecord::decode(&bytes).unwrap();
                    assert_eq!(*back.encode(), *bytes);
                    let (key, cert) = back.rebuild(&ca, &rng).unwrap();
                    assert_eq!(cert, issued.der, "{ca_alg}/{dev_alg} {cs}");
                    assert_eq!(key.pkcs8_der(), dev.pkcs8_der());
                }
            }
        }
    }

    #[test]
    fn a_record_that_is_not_exactly_one_is_refused() {
        let rng = SystemRandom::new();
        let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let ca_der = new_ca_certificate("Test CA", &ca_key, 1_700_000_000, &rng).unwrap();
        let ca = CertProfile::from_ca_der(&ca_der).unwrap();
        let dev = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let cs = CertSerial::new(DeviceSerial::new(42).unwrap(), 0);
        let issued = ca.issue(cs, &dev.spki_der(), &ca_key, &rng).unwrap();
        let good = ProvisioningRecord::of(&dev, &issued.der, &ca, &rng)
            .unwrap()
            .encode();
        let decode = |b: &[u8]| ProvisioningRecord::decode(b).map(|_| ());
        assert!(decode(&good[..good.len() - 1]).is_err(), "short");
        assert!(decode(&[&good[..], &[0]].concat()).is_err(), "trailing");
        let mut v2 = good.to_vec();
        v2[0] = v2[0] & 0x3F | 0x80;
        assert!(decode(&v2).is_err(), "format 2");
        // Serial 42 written on two octets (00 2A).
        let mut long = vec![good[0] | 1 << 2, 0];
        long.extend_from_slice(&good[1..]);
        assert!(decode(&long).is_err(), "leading zero");
        // Another CA: refused by name before any signature check.
        let other_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let other = CertProfile::from_ca_der(
            &new_ca_certificate("Other", &other_key, 1_700_000_000, &rng).unwrap(),
        )
        .unwrap();
        let record = ProvisioningRecord::decode(&good).unwrap();
        if other.ca_key_id()[..2] != ca.ca_key_id()[..2] {
            assert!(matches!(
                record.rebuild(&other, &rng),
                Err(RecordError::WrongCa { .. })
            ));
        }
        // A flipped signature bit does not rebuild.
        let mut bad = good.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(
            ProvisioningRecord::decode(&bad).unwrap().rebuild(&ca, &rng),
            Err(RecordError::Certificate(ProfileError::SignatureInvalid))
        ));
    }

    #[test]
    fn ecdsa_signatures_convert_both_ways() {
        let mut fixed = [0u8; 64];
        fixed[0] = 0x80; // r with its top bit set: DER needs a leading 00
        fixed[63] = 1; // s = 1: one octet
        let der = ecdsa_fixed_to_der(&fixed);
        assert_eq!(der[..5], [0x30, 0x26, 0x02, 0x21, 0x00]);
        assert_eq!(ecdsa_der_to_fixed(&der).unwrap(), fixed.to_vec());
    }
}
