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
    #[serde(rename = "s")]
    pub serial: u64,
    /// DER SubjectPublicKeyInfo of the device key.
    #[serde(rename = "k", with = "serde_bytes")]
    pub spki: Vec<u8>,
    /// The certificate as issued, DER.
    #[serde(rename = "c", with = "serde_bytes")]
    pub certificate: Vec<u8>,
    /// The line that vouched for it.
    #[serde(rename = "l")]
    pub line: String,
    /// The token id (cti) its enrollment consumed.
    #[serde(rename = "t", with = "serde_bytes")]
    pub token_id: Vec<u8>,
    /// Enrollment time, Unix seconds.
    #[serde(rename = "e")]
    pub enrolled_at: u64,
    /// Lifecycle state.
    #[serde(rename = "st")]
    pub status: DeviceStatus,
    /// When it was revoked, Unix seconds.
    #[serde(rename = "r", default)]
    pub revoked_at: Option<u64>,
}

/// A registered production line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineRecord {
    /// Line id (the token's `iss`).
    #[serde(rename = "id")]
    pub id: String,
    /// DER SubjectPublicKeyInfo of the line station key.
    #[serde(rename = "k", with = "serde_bytes")]
    pub public_key: Vec<u8>,
    /// First serial the line may vouch for.
    #[serde(rename = "f")]
    pub first_serial: u64,
    /// Last serial (inclusive).
    #[serde(rename = "z")]
    pub last_serial: u64,
    /// How many devices the line may enroll in all.
    #[serde(rename = "q")]
    pub quota: u64,
    /// Enrollments per second the line may make (0: no limit); bursts up to one second's
    /// worth. A stolen line key enrolls at most this fast until the line is disabled.
    #[serde(rename = "r", default, skip_serializing_if = "is_zero")]
    pub rate: u32,
    /// How many it has enrolled.
    #[serde(rename = "n")]
    pub enrolled: u64,
    /// Disabled lines vouch for nothing.
    #[serde(rename = "a")]
    pub active: bool,
    /// Registration time, Unix seconds.
    #[serde(rename = "c")]
    pub created_at: u64,
    /// Where its devices' secrets come from (`random` when absent: records written before
    /// lines had a source encode as they did).
    #[serde(
        rename = "ss",
        default,
        skip_serializing_if = "SecretSource::is_random"
    )]
    pub secret_source: SecretSource,
}

/// Where a line's devices get their secrets (`ca-server line add --secret-source`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum SecretSource {
    /// `random`: 32 octets from the CA's CSPRNG, or an imported key while the pool holds any
    /// (what every line did before lines had a source).
    #[default]
    Random,
    /// `pool`: imported keys only; a device finds none while the pool is empty.
    Pool,
    /// `dukpt:BDKID`: the device's AES DUKPT Initial Key (ANSI X9.24-3-2017) under that BDK and
    /// a derivation id of its own.
    Dukpt(protocol_spec::dukpt::BdkId),
}

impl SecretSource {
    /// Whether it is the default.
    pub fn is_random(&self) -> bool {
        *self == SecretSource::Random
    }
}

impl std::fmt::Display for SecretSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Random => f.write_str("random"),
            SecretSource::Pool => f.write_str("pool"),
            SecretSource::Dukpt(id) => write!(f, "dukpt:{id}"),
        }
    }
}

impl std::str::FromStr for SecretSource {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "random" => Ok(SecretSource::Random),
            "pool" => Ok(SecretSource::Pool),
            _ => match s.strip_prefix("dukpt:") {
                Some(id) => id
                    .parse()
                    .map(SecretSource::Dukpt)
                    .map_err(|e| format!("secret source {s:?}: {e}")),
                None => Err(format!(
                    "secret source {s:?} is not random, pool or dukpt:BDKID"
                )),
            },
        }
    }
}

impl TryFrom<String> for SecretSource {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<SecretSource> for String {
    fn from(s: SecretSource) -> String {
        s.to_string()
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// Which enrollment consumed a token id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenUse {
    /// Serial enrolled.
    #[serde(rename = "s")]
    pub serial: u64,
}

/// One entry of the append-only, hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Position in the log, from 1.
    #[serde(rename = "n")]
    pub seq: u64,
    /// Unix seconds.
    #[serde(rename = "t")]
    pub at: u64,
    /// What happened: `enroll`, `line-add`, ...
    #[serde(rename = "e")]
    pub event: String,
    /// The device concerned, if any.
    #[serde(rename = "s", default)]
    pub serial: Option<u64>,
    /// Who or what caused it (line id, operator name).
    #[serde(rename = "a")]
    pub actor: String,
    /// Event-specific facts, as text (never a secret).
    #[serde(rename = "d")]
    pub detail: String,
    /// Hash of the previous entry (zeros for the first).
    #[serde(rename = "p", with = "serde_bytes")]
    pub prev_hash: Vec<u8>,
    /// The CA node that wrote it (`serve --node-id`; the host name by default), when known:
    /// entries written before nodes were named have none, and their encoding is unchanged.
    #[serde(rename = "o", default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// This entry's own hash ([`AuditEntry::compute_hash`]), so that a changed entry is named
    /// by itself, not only by its successor.
    #[serde(rename = "h", with = "serde_bytes", default)]
    pub hash: Vec<u8>,
    /// HMAC-SHA256 of `hash` under the audit key ([`crate::audit::AuditKey::mac`]), so that
    /// whoever can write the store but has no key cannot rewrite the chain unseen; absent in
    /// entries written before the key existed, whose encoding is unchanged.
    #[serde(
        rename = "m",
        with = "serde_bytes",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mac: Option<Vec<u8>>,
}

impl AuditEntry {
    /// SHA-256 over the entry's CBOR encoding with `hash` empty and no `mac`: what `hash` and
    /// the next entry's `prev_hash` hold.
    pub fn compute_hash(&self) -> [u8; 32] {
        let unsealed = AuditEntry {
            hash: Vec::new(),
            mac: None,
            ..self.clone()
        };
        let bytes = to_cbor(&unsealed);
        let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }

    /// The entry with its own hash filled in, and its MAC when there is a `key`.
    pub fn sealed(mut self, key: Option<&crate::audit::AuditKey>) -> Self {
        let hash = self.compute_hash();
        self.hash = hash.to_vec();
        self.mac = key.map(|k| k.mac(&hash));
        self
    }
}

/// A device record that an operator reset: the binding it held, kept for the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetRecord {
    /// The record as it was.
    #[serde(rename = "d")]
    pub device: DeviceRecord,
    /// When it was reset, Unix seconds.
    #[serde(rename = "t")]
    pub reset_at: u64,
    /// Who reset it.
    #[serde(rename = "a")]
    pub actor: String,
}

/// A revoked operator: refused at the admin door from the next request on (names are issued
/// once, so the name stands for the one certificate issued under it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorRevocation {
    /// Operator name.
    #[serde(rename = "n")]
    pub name: String,
    /// When, Unix seconds.
    #[serde(rename = "t")]
    pub revoked_at: u64,
    /// Who revoked it.
    #[serde(rename = "a")]
    pub actor: String,
}

/// A certificate the CRL lists (SPEC.md 10.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevokedCert {
    /// The device serial.
    pub serial: u64,
    /// The reset generation its certificate serial carries.
    pub generation: u32,
    /// Revocation (or reset) time, Unix seconds.
    pub at: u64,
    /// A reset superseded it (CRL reason superseded); else the device is revoked.
    pub superseded: bool,
}

impl RevokedCert {
    /// The current certificate of a revoked device.
    pub fn revoked(rec: &DeviceRecord, at: u64) -> Self {
        RevokedCert {
            serial: rec.serial,
            generation: generation_of(&rec.certificate),
            at,
            superseded: false,
        }
    }

    /// The certificate of a binding a reset superseded.
    pub fn superseded(r: &ResetRecord) -> Self {
        RevokedCert {
            serial: r.device.serial,
            generation: generation_of(&r.device.certificate),
            at: r.reset_at,
            superseded: true,
        }
    }

    /// (device serial, generation): the certificate serial.
    pub fn key(&self) -> (u64, u32) {
        (self.serial, self.generation)
    }
}

/// The reset generation a stored certificate's serial carries (SPEC.md 5). A certificate
/// whose serial does not parse is taken as generation 0, the serial alone: every certificate
/// issued before generations existed.
pub fn generation_of(certificate: &[u8]) -> u32 {
    protocol_spec::profile::cert_serial(certificate).map_or(0, |c| c.generation)
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
    #[serde(rename = "s")]
    pub serial: u64,
    /// Version, from 1.
    #[serde(rename = "v")]
    pub version: u64,
    /// Stable key identifier.
    #[serde(rename = "i")]
    pub key_id: String,
    /// AES-256-GCM ciphertext and tag of the 32-byte secret (AAD: serial, key id, version).
    #[serde(rename = "x", with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The GCM nonce.
    #[serde(rename = "o", with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Key check value (first 3 bytes of AES-256(secret, 0^128)).
    #[serde(rename = "c", with = "serde_bytes")]
    pub kcv: Vec<u8>,
    /// Keyed hash of the plaintext (the uniqueness index entry).
    #[serde(rename = "h", with = "serde_bytes")]
    pub index_tag: Vec<u8>,
    /// `csprng`, `import`, or `dukpt-aes-128` / `dukpt-aes-256` (an AES DUKPT Initial Key; its
    /// key id is then the Initial Key ID in hex).
    #[serde(rename = "src")]
    pub source: String,
    /// Unix seconds.
    #[serde(rename = "t0")]
    pub created_at: u64,
    /// First delivery, Unix seconds.
    #[serde(rename = "t1", default)]
    pub delivered_at: Option<u64>,
    /// Acknowledgement, Unix seconds.
    #[serde(rename = "t2", default)]
    pub confirmed_at: Option<u64>,
    /// When the device's serial was reset: the version belongs to the earlier binding and is
    /// never delivered again. Unix seconds.
    #[serde(rename = "t3", default, skip_serializing_if = "Option::is_none")]
    pub retired_at: Option<u64>,
}

/// An imported secret waiting for its device, encrypted at rest (AAD: "pool", key id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    /// Identifier from the batch.
    #[serde(rename = "i")]
    pub key_id: String,
    /// AES-256-GCM ciphertext and tag.
    #[serde(rename = "x", with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The GCM nonce.
    #[serde(rename = "o", with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Key check value.
    #[serde(rename = "c", with = "serde_bytes")]
    pub kcv: Vec<u8>,
    /// Keyed hash of the plaintext.
    #[serde(rename = "h", with = "serde_bytes")]
    pub index_tag: Vec<u8>,
    /// Unix seconds of the import.
    #[serde(rename = "t")]
    pub imported_at: u64,
}

/// An AES DUKPT Base Derivation Key (ANSI X9.24-3-2017): sealed at rest under the
/// key-encryption key (AES-256-GCM, AAD `"imprint-bdk-v1" || BDK id || algorithm`), or, when
/// the CA keeps its key in a PKCS#11 token, an object in that token ([`BdkRecord::token_object`])
/// and no key bytes here at all. Never shown, logged or exported in the clear: operators see
/// its id, algorithm and KCV.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BdkRecord {
    /// The BDK id: 8 hex digits, upper case (the first 4 octets of every Initial Key ID).
    #[serde(rename = "i")]
    pub id: String,
    /// `aes-128` or `aes-256`.
    #[serde(rename = "a")]
    pub algorithm: String,
    /// AES-256-GCM ciphertext and tag of the key; empty for a key held in the token.
    #[serde(rename = "x", with = "serde_bytes")]
    pub ciphertext: Vec<u8>,
    /// The GCM nonce; empty for a key held in the token.
    #[serde(rename = "o", with = "serde_bytes")]
    pub nonce: Vec<u8>,
    /// Key check value: AES-CMAC of a zero block, 5 octets (ANSI X9.24-1-2017).
    #[serde(rename = "c", with = "serde_bytes")]
    pub kcv: Vec<u8>,
    /// Unix seconds of its addition.
    #[serde(rename = "t")]
    pub created_at: u64,
    /// The label of the key's object in the CA's PKCS#11 token, when the token holds it
    /// (sensitive, not extractable); `None`: sealed under the key-encryption key.
    #[serde(rename = "k", default, skip_serializing_if = "Option::is_none")]
    pub token_object: Option<String>,
}

impl BdkRecord {
    /// Where the key is: `sealed` (under the key-encryption key) or `token`.
    pub fn custody(&self) -> &'static str {
        if self.token_object.is_some() {
            "token"
        } else {
            "sealed"
        }
    }
}
