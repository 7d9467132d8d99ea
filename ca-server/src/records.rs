//! What the CA stores, as plain serde types (CBOR on disk).

use serde::{Deserialize, Serialize};

/// A device's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceStatus {
    /// Enrolled and in good standing.
    Active,
    /// Revoked by an operator: refused everywhere, listed in the CRL.
    Revoked,
}

/// One enrolled device: serial -> key -> certificate (-> secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device serial (also the certificate serial).
    pub serial: u64,
    /// DER SubjectPublicKeyInfo of the device key.
    #[serde(with = "serde_bytes")]
    pub spki: Vec<u8>,
    /// The certificate as issued, DER.
    #[serde(with = "serde_bytes")]
    pub certificate: Vec<u8>,
    /// The line that vouched for it.
    pub line: String,
    /// The token id (cti) its enrollment consumed.
    #[serde(with = "serde_bytes")]
    pub token_id: Vec<u8>,
    /// Enrollment time, Unix seconds.
    pub enrolled_at: u64,
    /// Lifecycle state.
    pub status: DeviceStatus,
    /// When it was revoked, Unix seconds.
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// A registered production line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRecord {
    /// Line id (the token's `iss`).
    pub id: String,
    /// DER SubjectPublicKeyInfo of the line station key.
    #[serde(with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// First serial the line may vouch for.
    pub first_serial: u64,
    /// Last serial (inclusive).
    pub last_serial: u64,
    /// How many devices the line may enroll in all.
    pub quota: u64,
    /// How many it has enrolled.
    pub enrolled: u64,
    /// Disabled lines vouch for nothing.
    pub active: bool,
    /// Registration time, Unix seconds.
    pub created_at: u64,
}

/// Which enrollment consumed a token id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// Serial enrolled.
    pub serial: u64,
    /// SHA-256 of the SPKI enrolled.
    #[serde(with = "serde_bytes")]
    pub key_hash: Vec<u8>,
}

/// One entry of the append-only, hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    pub seq: u64,
    /// Unix seconds.
    pub at: u64,
    /// What happened: `enroll`, `line-add`, ...
    pub event: String,
    /// The device concerned, if any.
    #[serde(default)]
    pub serial: Option<u64>,
    /// Who or what caused it (line id, operator name).
    pub actor: String,
    /// Event-specific facts, as text (never a secret).
    pub detail: String,
    /// Hash of the previous entry (zeros for the first).
    #[serde(with = "serde_bytes")]
    pub prev_hash: Vec<u8>,
}

impl AuditEntry {
    /// SHA-256 over the entry's CBOR encoding: what the next entry's `prev_hash` holds.
    pub fn hash(&self) -> [u8; 32] {
        let bytes = to_cbor(self);
        let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// CBOR encoding of a record (writing to a Vec cannot fail for these types).
pub fn to_cbor<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = Vec::new();
    if ciborium::into_writer(v, &mut out).is_err() {
        out.clear();
    }
    out
}

/// Decodes a record.
pub fn from_cbor<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    ciborium::from_reader(bytes).map_err(|e| e.to_string())
}

/// One version of a device's symmetric secret, encrypted at rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// The device.
    pub serial: u64,
    /// Version, from 1.
    pub version: u64,
    /// Stable key identifier.
    pub key_id: String,
    /// AES-256-GCM ciphertext and tag of the 32-byte secret (AAD: serial, key id, version).
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The GCM nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Key check value (first 3 bytes of AES-256(secret, 0^128)).
    #[serde(with = "serde_bytes")]
    pub kcv: Vec<u8>,
    /// Keyed hash of the plaintext (the uniqueness index entry).
    #[serde(with = "serde_bytes")]
    pub index_tag: Vec<u8>,
    /// `csprng` or `import`.
    pub source: String,
    /// Unix seconds.
    pub created_at: u64,
    /// First delivery, Unix seconds.
    #[serde(default)]
    pub delivered_at: Option<u64>,
    /// Acknowledgement, Unix seconds.
    #[serde(default)]
    pub confirmed_at: Option<u64>,
}

/// An imported secret waiting for its device, encrypted at rest (AAD: "pool", key id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    /// Identifier from the batch.
    pub key_id: String,
    /// AES-256-GCM ciphertext and tag.
    #[serde(with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The GCM nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Key check value.
    #[serde(with = "serde_bytes")]
    pub kcv: Vec<u8>,
    /// Keyed hash of the plaintext.
    #[serde(with = "serde_bytes")]
    pub index_tag: Vec<u8>,
    /// Unix seconds of the import.
    pub imported_at: u64,
}
