//! The CA key, wherever it lives: a PKCS#8 file loaded into memory, or an object in a PKCS#11
//! token whose private half never leaves it. Only the issuer holds one.

use std::cell::RefCell;

use protocol_spec::{KeyAlgorithm, KeyPair};
use ring::rand::SecureRandom;

use super::pkcs11::TokenKey;

/// Why a signature with the CA key could not be made.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SignError {
    /// The token does not answer (removed, device error, sessions lost and not reopened): a
    /// client may retry later; nothing was signed.
    #[error("the CA key's token is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a refused mechanism, a malformed signature).
    #[error("signing with the CA key failed: {0}")]
    Failed(String),
}

/// The CA's private key.
#[derive(Debug)]
pub enum CaKey {
    /// A key file (`ca.key.pem`) loaded into memory.
    File(KeyPair),
    /// A key in a PKCS#11 token, used through a pool of sessions.
    Token(TokenKey),
}

impl CaKey {
    /// The key's algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        match self {
            CaKey::File(k) => k.algorithm(),
            CaKey::Token(t) => t.algorithm(),
        }
    }

    /// The raw public key (32 bytes for Ed25519, the uncompressed point for P-256).
    pub fn public_key_raw(&self) -> &[u8] {
        match self {
            CaKey::File(k) => k.public_key_raw(),
            CaKey::Token(t) => t.public_key_raw(),
        }
    }

    /// Signs as X.509 expects: 64 raw bytes for Ed25519, a DER `Ecdsa-Sig-Value` for P-256.
    pub fn sign_x509(&self, msg: &[u8], rng: &dyn SecureRandom) -> Result<Vec<u8>, SignError> {
        match self {
            CaKey::File(k) => k
                .sign_x509(msg, rng)
                .map_err(|e| SignError::Failed(e.to_string())),
            CaKey::Token(t) => t.sign_x509(msg),
        }
    }

    /// An rcgen signer over this key. rcgen's error type cannot say "unavailable", so the
    /// signer keeps the [`SignError`] of a failed signature for [`CaSigner::take_error`].
    pub fn signer<'a>(&'a self, rng: &'a dyn SecureRandom) -> CaSigner<'a> {
        CaSigner {
            key: self,
            rng,
            error: RefCell::new(None),
        }
    }
}

/// Adapts a [`CaKey`] to rcgen's signing trait (for device certificates, the CRL, the CA's own
/// certificate and the HTTPS server certificate alike).
pub struct CaSigner<'a> {
    key: &'a CaKey,
    rng: &'a dyn SecureRandom,
    error: RefCell<Option<SignError>>,
}

impl std::fmt::Debug for CaSigner<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaSigner")
            .field("key", self.key)
            .finish_non_exhaustive()
    }
}

impl CaSigner<'_> {
    /// The error of the last signature that failed, if one did.
    pub fn take_error(&self) -> Option<SignError> {
        self.error.borrow_mut().take()
    }
}

impl rcgen::PublicKeyData for &CaSigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.key.public_key_raw()
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.key.algorithm().rcgen()
    }
}

impl rcgen::SigningKey for &CaSigner<'_> {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key.sign_x509(msg, self.rng).map_err(|e| {
            *self.error.borrow_mut() = Some(e);
            rcgen::Error::RemoteKeyError
        })
    }
}
