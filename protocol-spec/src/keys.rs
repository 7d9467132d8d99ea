//! Key pairs for the two algorithms Imprint uses (Ed25519 and ECDSA P-256), on top of ring.
//!
//! The same [`KeyPair`] type serves devices, line stations and CAs. Randomness is passed in
//! (`&dyn SecureRandom`) so that the vector generator can be deterministic; everything else uses
//! [`ring::rand::SystemRandom`].

use ring::rand::SecureRandom;
use ring::signature::{
    self, ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey,
};
use zeroize::Zeroizing;

use crate::spki;

/// A signature algorithm Imprint accepts for device, line and CA keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyAlgorithm {
    /// Ed25519 (RFC 8032), "EdDSA" in COSE (alg -8).
    Ed25519,
    /// ECDSA over P-256 with SHA-256, "ES256" in COSE (alg -7).
    P256,
}

impl KeyAlgorithm {
    /// The name used on command lines and in config files.
    pub fn name(self) -> &'static str {
        match self {
            KeyAlgorithm::Ed25519 => "ed25519",
            KeyAlgorithm::P256 => "p256",
        }
    }

    /// Parses the command-line name (`ed25519` or `p256`).
    pub fn from_name(name: &str) -> Option<Self> {
        match name.to_ascii_lowercase().as_str() {
            "ed25519" => Some(KeyAlgorithm::Ed25519),
            "p256" | "p-256" | "es256" | "ecdsa-p256" => Some(KeyAlgorithm::P256),
            _ => None,
        }
    }

    /// The rcgen signature algorithm used in certificates and CSRs.
    pub fn rcgen(self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            KeyAlgorithm::Ed25519 => &rcgen::PKCS_ED25519,
            KeyAlgorithm::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors from loading or using key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The PKCS#8 document is not a key of a supported algorithm, or is corrupt.
    #[error("not a valid PKCS#8 Ed25519 or P-256 private key")]
    InvalidPrivateKey,
    /// The SubjectPublicKeyInfo is not an Ed25519 or P-256 key.
    #[error("unsupported or malformed public key: {0}")]
    InvalidPublicKey(&'static str),
    /// The random generator failed.
    #[error("the random generator failed")]
    Random,
}

enum Inner {
    Ed25519(Ed25519KeyPair),
    // ASN.1 (DER) signatures for X.509 and PKCS#10; fixed r||s signatures for COSE (RFC 9053 2.1).
    P256 {
        asn1: Box<EcdsaKeyPair>,
        fixed: Box<EcdsaKeyPair>,
    },
}

/// A private key with its public half. The PKCS#8 document is zeroized on drop.
pub struct KeyPair {
    algorithm: KeyAlgorithm,
    pkcs8: Zeroizing<Vec<u8>>,
    inner: Inner,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("algorithm", &self.algorithm)
            .field("public_key", &hex::encode(self.public_key_raw()))
            .finish_non_exhaustive()
    }
}

impl KeyPair {
    /// Generates a fresh key pair. An Ed25519 key is kept as a PKCS#8 v1 document (RFC 8410
    /// section 7, no public key in it), which OpenSSL 3.0 reads (`openssl pkey`) and tokens
    /// import; ring's own v2 document (RFC 5958, with the public key) is refused there as
    /// "unsupported". The key is the one ring's `generate_pkcs8` would make from the same
    /// random bytes.
    pub fn generate(algorithm: KeyAlgorithm, rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        match algorithm {
            KeyAlgorithm::Ed25519 => {
                let mut seed = Zeroizing::new([0u8; ED25519_SEED_LEN]);
                rng.fill(seed.as_mut()).map_err(|_| KeyError::Random)?;
                let doc = ed25519_pkcs8_v1(&seed);
                Self::from_pkcs8(&doc, rng)
            }
            KeyAlgorithm::P256 => {
                let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, rng)
                    .map_err(|_| KeyError::Random)?;
                Self::from_pkcs8(pkcs8.as_ref(), rng)
            }
        }
    }

    /// Loads a PKCS#8 v1 or v2 private key of either algorithm.
    pub fn from_pkcs8(der: &[u8], rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let pkcs8 = Zeroizing::new(der.to_vec());
        if let Ok(kp) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            // Kept (and written) as v1, whichever version came in.
            let pkcs8 = match ed25519_seed_of_v2(der) {
                Some(seed) => ed25519_pkcs8_v1(seed),
                None => pkcs8,
            };
            return Ok(Self {
                algorithm: KeyAlgorithm::Ed25519,
                pkcs8,
                inner: Inner::Ed25519(kp),
            });
        }
        let asn1 = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, rng)
            .map_err(|_| KeyError::InvalidPrivateKey)?;
        let fixed = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, rng)
            .map_err(|_| KeyError::InvalidPrivateKey)?;
        Ok(Self {
            algorithm: KeyAlgorithm::P256,
            pkcs8,
            inner: Inner::P256 {
                asn1: Box::new(asn1),
                fixed: Box::new(fixed),
            },
        })
    }

    /// The private key's own 32 octets: an Ed25519 seed (RFC 8032 section 5.1.5) or a P-256
    /// scalar (big-endian): what a provisioning record keeps (secret; zeroized on drop).
    pub fn private_key_raw(&self) -> Result<Zeroizing<[u8; 32]>, KeyError> {
        let bad = || KeyError::InvalidPrivateKey;
        // PrivateKeyInfo ::= SEQUENCE { version, AlgorithmIdentifier, privateKey OCTET STRING, .. }
        let (info, _) = der_tlv(&self.pkcs8, 0x30).ok_or_else(bad)?;
        let (_, rest) = der_tlv(info, 0x02).ok_or_else(bad)?;
        let (_, rest) = der_tlv(rest, 0x30).ok_or_else(bad)?;
        let (private_key, _) = der_tlv(rest, 0x04).ok_or_else(bad)?;
        let raw = match self.algorithm {
            // CurvePrivateKey ::= OCTET STRING (RFC 8410 section 7).
            KeyAlgorithm::Ed25519 => der_tlv(private_key, 0x04).ok_or_else(bad)?.0,
            // ECPrivateKey ::= SEQUENCE { version 1, privateKey OCTET STRING, .. } (RFC 5915).
            KeyAlgorithm::P256 => {
                let (ec, _) = der_tlv(private_key, 0x30).ok_or_else(bad)?;
                let (_, rest) = der_tlv(ec, 0x02).ok_or_else(bad)?;
                der_tlv(rest, 0x04).ok_or_else(bad)?.0
            }
        };
        let mut out = Zeroizing::new([0u8; 32]);
        if raw.len() != 32 {
            return Err(bad());
        }
        out.copy_from_slice(raw);
        Ok(out)
    }

    /// The key pair of a private key's own 32 octets ([`KeyPair::private_key_raw`]).
    pub fn from_private_key_raw(
        algorithm: KeyAlgorithm,
        raw: &[u8; 32],
        rng: &dyn SecureRandom,
    ) -> Result<Self, KeyError> {
        let key = match algorithm {
            KeyAlgorithm::Ed25519 => Self::from_pkcs8(&ed25519_pkcs8_v1(raw), rng)?,
            KeyAlgorithm::P256 => {
                // ring computes a P-256 public key only inside key generation (its
                // from_private_key_and_public_key wants both halves), and its generator draws
                // the 32 octets of the scalar once and keeps them when they are in range: fed
                // with the scalar itself, it is exactly that computation. The fixed-slice
                // source is one of ring's test helpers, used for nothing else here.
                #[allow(deprecated)]
                let fixed = ring::test::rand::FixedSliceRandom { bytes: raw };
                let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &fixed)
                    .map_err(|_| KeyError::InvalidPrivateKey)?;
                Self::from_pkcs8(doc.as_ref(), rng)?
            }
        };
        // The generator must have kept the octets it was given (a scalar out of range would
        // not be): the key is the record's, or none.
        if *key.private_key_raw()? != *raw {
            return Err(KeyError::InvalidPrivateKey);
        }
        Ok(key)
    }

    /// Loads a `PRIVATE KEY` PEM document.
    pub fn from_pem(text: &str, rng: &dyn SecureRandom) -> Result<Self, KeyError> {
        let doc = pem::parse(text).map_err(|_| KeyError::InvalidPrivateKey)?;
        if doc.tag() != "PRIVATE KEY" {
            return Err(KeyError::InvalidPrivateKey);
        }
        Self::from_pkcs8(doc.contents(), rng)
    }

    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The PKCS#8 document (secret).
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The PKCS#8 document as PEM (secret; zeroized on drop).
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            self.pkcs8.to_vec(),
        )))
    }

    /// The raw public key: 32 bytes for Ed25519, the 65-byte uncompressed point for P-256.
    pub fn public_key_raw(&self) -> &[u8] {
        match &self.inner {
            Inner::Ed25519(k) => k.public_key().as_ref(),
            Inner::P256 { asn1, .. } => asn1.public_key().as_ref(),
        }
    }

    /// The DER SubjectPublicKeyInfo of the public key.
    pub fn spki_der(&self) -> Vec<u8> {
        spki::encode(self.algorithm, self.public_key_raw())
    }

    /// Signs as X.509 and PKCS#10 expect: raw 64 bytes for Ed25519, DER `Ecdsa-Sig-Value` for P-256.
    pub fn sign_x509(&self, msg: &[u8], rng: &dyn SecureRandom) -> Result<Vec<u8>, KeyError> {
        match &self.inner {
            Inner::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
            Inner::P256 { asn1, .. } => asn1
                .sign(rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Random),
        }
    }

    /// Signs as COSE expects (RFC 9053 section 2.1): raw 64 bytes for both algorithms.
    pub fn sign_cose(&self, msg: &[u8], rng: &dyn SecureRandom) -> Result<Vec<u8>, KeyError> {
        match &self.inner {
            Inner::Ed25519(k) => Ok(k.sign(msg).as_ref().to_vec()),
            Inner::P256 { fixed, .. } => fixed
                .sign(rng, msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| KeyError::Random),
        }
    }

    /// An rcgen signer over this key, drawing ECDSA nonces from `rng`.
    pub fn rcgen_signer<'a>(&'a self, rng: &'a dyn SecureRandom) -> RcgenSigner<'a> {
        RcgenSigner { key: self, rng }
    }
}

const ED25519_SEED_LEN: usize = 32;

/// The PKCS#8 v1 `OneAsymmetricKey` of an Ed25519 seed (RFC 8410 section 7): version 0,
/// algorithm id-Ed25519 (1.3.101.112) without parameters, the seed as a `CurvePrivateKey`
/// OCTET STRING inside the privateKey OCTET STRING.
fn ed25519_pkcs8_v1(seed: &[u8; ED25519_SEED_LEN]) -> Zeroizing<Vec<u8>> {
    let mut doc = Zeroizing::new(Vec::with_capacity(48));
    doc.extend_from_slice(&[
        0x30, 0x2e, // SEQUENCE, 46 bytes
        0x02, 0x01, 0x00, // INTEGER 0 (v1)
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, // AlgorithmIdentifier id-Ed25519
        0x04, 0x22, 0x04, 0x20, // OCTET STRING { OCTET STRING (32 bytes) }
    ]);
    doc.extend_from_slice(seed);
    doc
}

/// One DER TLV of tag `tag` at the start of `input` (definite lengths up to 2^16 - 1):
/// (contents, what follows).
fn der_tlv(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&t, rest) = input.split_first()?;
    if t != tag {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81 => (usize::from(*rest.first()?), rest.get(1..)?),
        0x82 => (
            usize::from(*rest.first()?) << 8 | usize::from(*rest.get(1)?),
            rest.get(2..)?,
        ),
        _ => return None,
    };
    Some((rest.get(..len)?, rest.get(len..)?))
}

/// The seed of a PKCS#8 v2 Ed25519 document (RFC 8410 section 7, with the public key), as ring
/// writes it; `None` for anything else.
fn ed25519_seed_of_v2(der: &[u8]) -> Option<&[u8; ED25519_SEED_LEN]> {
    const AFTER_LENGTH: [u8; 14] = [
        0x02, 0x01, 0x01, // INTEGER 1 (v2)
        0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, // id-Ed25519
        0x04, 0x22, 0x04, 0x20, // the seed's OCTET STRINGs
    ];
    match der {
        [0x30, _, rest @ ..] if rest.starts_with(&AFTER_LENGTH) => rest
            .get(AFTER_LENGTH.len()..AFTER_LENGTH.len() + ED25519_SEED_LEN)?
            .try_into()
            .ok(),
        _ => None,
    }
}

/// A public key of a supported algorithm, as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    /// The algorithm.
    pub algorithm: KeyAlgorithm,
    /// Raw public key bytes (see [`KeyPair::public_key_raw`]).
    pub raw: Vec<u8>,
}

impl PublicKey {
    /// Parses a DER SubjectPublicKeyInfo.
    pub fn from_spki_der(der: &[u8]) -> Result<Self, KeyError> {
        spki::decode(der)
    }

    /// Parses a `PUBLIC KEY` PEM document.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let doc = pem::parse(text).map_err(|_| KeyError::InvalidPublicKey("not PEM"))?;
        if doc.tag() != "PUBLIC KEY" {
            return Err(KeyError::InvalidPublicKey("PEM label is not PUBLIC KEY"));
        }
        Self::from_spki_der(doc.contents())
    }

    /// The DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        spki::encode(self.algorithm, &self.raw)
    }

    /// The `PUBLIC KEY` PEM document.
    pub fn to_pem(&self) -> String {
        pem::encode(&pem::Pem::new("PUBLIC KEY", self.spki_der()))
    }

    /// Verifies an X.509-style signature (DER ECDSA for P-256).
    pub fn verify_x509(&self, msg: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::Ed25519 => &signature::ED25519,
            KeyAlgorithm::P256 => &ECDSA_P256_SHA256_ASN1,
        };
        UnparsedPublicKey::new(alg, &self.raw)
            .verify(msg, sig)
            .is_ok()
    }

    /// Verifies a COSE-style signature (fixed-size r||s for ES256).
    pub fn verify_cose(&self, msg: &[u8], sig: &[u8]) -> bool {
        let alg: &dyn signature::VerificationAlgorithm = match self.algorithm {
            KeyAlgorithm::Ed25519 => &signature::ED25519,
            KeyAlgorithm::P256 => &ECDSA_P256_SHA256_FIXED,
        };
        UnparsedPublicKey::new(alg, &self.raw)
            .verify(msg, sig)
            .is_ok()
    }
}

impl From<&KeyPair> for PublicKey {
    fn from(k: &KeyPair) -> Self {
        PublicKey {
            algorithm: k.algorithm(),
            raw: k.public_key_raw().to_vec(),
        }
    }
}

/// Adapts a [`KeyPair`] to rcgen's signing trait.
pub struct RcgenSigner<'a> {
    key: &'a KeyPair,
    rng: &'a dyn SecureRandom,
}

impl std::fmt::Debug for RcgenSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RcgenSigner")
            .field("key", self.key)
            .finish_non_exhaustive()
    }
}

impl rcgen::PublicKeyData for RcgenSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key.algorithm().rcgen()
    }
}

impl rcgen::SigningKey for RcgenSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key
            .sign_x509(msg, self.rng)
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    #[test]
    // ring's fixed generator is marked deprecated (internal); the vector generator uses it too.
    #[allow(deprecated)]
    fn ed25519_keys_are_pkcs8_v1_and_the_key_ring_would_make() {
        let fixed = ring::test::rand::FixedByteRandom { byte: 7 };
        let ring_doc = Ed25519KeyPair::generate_pkcs8(&fixed).unwrap();
        let ring_key = Ed25519KeyPair::from_pkcs8(ring_doc.as_ref()).unwrap();
        let k = KeyPair::generate(KeyAlgorithm::Ed25519, &fixed).unwrap();
        assert_eq!(k.public_key_raw(), ring_key.public_key().as_ref());
        // version INTEGER 0, no public key: 48 bytes.
        assert_eq!(&k.pkcs8_der()[..5], &[0x30, 0x2e, 0x02, 0x01, 0x00]);
        assert_eq!(k.pkcs8_der().len(), 48);
        // ring's v2 documents still load, and are kept (and written) as v1.
        let v2 = KeyPair::from_pkcs8(ring_doc.as_ref(), &fixed).unwrap();
        assert_eq!(v2.public_key_raw(), k.public_key_raw());
        assert_eq!(v2.pkcs8_der(), k.pkcs8_der());
    }

    #[test]
    fn pem_round_trip_and_signatures_verify() {
        let rng = SystemRandom::new();
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
            let k = KeyPair::generate(alg, &rng).unwrap();
            let again = KeyPair::from_pem(&k.to_pem(), &rng).unwrap();
            assert_eq!(again.algorithm(), alg);
            assert_eq!(again.public_key_raw(), k.public_key_raw());
            let pubkey = PublicKey::from_pem(&PublicKey::from(&k).to_pem()).unwrap();
            let x = k.sign_x509(b"msg", &rng).unwrap();
            let c = k.sign_cose(b"msg", &rng).unwrap();
            assert!(pubkey.verify_x509(b"msg", &x));
            assert!(pubkey.verify_cose(b"msg", &c));
            assert!(!pubkey.verify_cose(b"other", &c));
        }
    }
}
