//! The device's state: one JSON file, written atomically (temp file, fsync, rename, fsync of the
//! folder) with mode 0600. It stands in for a device's write-once memory: the private key is
//! generated once and never leaves it.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use protocol_spec::messages::{b64, unb64};
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::SecureRandom;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::AgentError;

const FORMAT: u32 = 1;

/// What a device knows about itself.
#[derive(Debug)]
pub struct DeviceState {
    /// Its serial.
    pub serial: DeviceSerial,
    /// Its key pair (private half zeroized on drop).
    pub key: KeyPair,
    /// The pinned CA certificate (DER), once enrolled.
    pub ca_certificate: Option<Vec<u8>>,
    /// Its certificate (DER), once enrolled.
    pub certificate: Option<Vec<u8>>,
    /// When it enrolled, Unix seconds.
    pub enrolled_at: Option<u64>,
    /// Its symmetric secrets, oldest version first.
    pub secrets: Vec<StoredSecret>,
}

/// A secret the device received (zeroized on drop, never printed).
#[derive(Clone)]
pub struct StoredSecret {
    /// Key id.
    pub key_id: String,
    /// Version.
    pub version: u64,
    /// Algorithm name.
    pub algorithm: String,
    /// The secret bytes (32; 16 for an AES-128 DUKPT Initial Key).
    pub secret: Zeroizing<Vec<u8>>,
    /// Key check value (3 octets; 5 for a DUKPT Initial Key).
    pub kcv: Vec<u8>,
    /// For a DUKPT Initial Key: its Initial Key ID (BDK id, derivation id).
    pub initial_key_id: Option<[u8; 8]>,
    /// Whether the CA confirmed the acknowledgement.
    pub acknowledged: bool,
}

impl std::fmt::Debug for StoredSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredSecret")
            .field("key_id", &self.key_id)
            .field("version", &self.version)
            .field("kcv", &hex::encode(&self.kcv))
            .field("initial_key_id", &self.initial_key_id.map(hex::encode))
            .field("acknowledged", &self.acknowledged)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretFile {
    key_id: String,
    version: u64,
    algorithm: String,
    secret: String,
    kcv: String,
    /// Hex, for a DUKPT Initial Key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initial_key_id: Option<String>,
    acknowledged: bool,
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    format: u32,
    serial: String,
    algorithm: String,
    /// PKCS#8, base64url.
    private_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    enrolled_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<SecretFile>,
}

impl Drop for StateFile {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.private_key);
    }
}

impl DeviceState {
    /// A new device: generates its key pair.
    pub fn generate(
        serial: DeviceSerial,
        algorithm: KeyAlgorithm,
        rng: &dyn SecureRandom,
    ) -> Result<Self, AgentError> {
        let key = KeyPair::generate(algorithm, rng)
            .map_err(|e| AgentError::Invalid(format!("key generation: {e}")))?;
        Ok(DeviceState {
            serial,
            key,
            ca_certificate: None,
            certificate: None,
            enrolled_at: None,
            secrets: Vec::new(),
        })
    }

    /// The device's public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey::from(&self.key)
    }

    /// SHA-256 of the device's SubjectPublicKeyInfo (what a factory token confirms).
    pub fn key_hash(&self) -> [u8; 32] {
        protocol_spec::spki::sha256(&self.key.spki_der())
    }

    /// Reads a state file.
    pub fn load(path: &Path, rng: &dyn SecureRandom) -> Result<Self, AgentError> {
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| AgentError::io(path, e))?);
        let bad = |why: String| AgentError::Invalid(format!("{}: {why}", path.display()));
        let f: StateFile = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if f.format != FORMAT {
            return Err(bad(format!("state format {} is not {FORMAT}", f.format)));
        }
        let serial: DeviceSerial = f
            .serial
            .parse()
            .map_err(|e: &str| bad(format!("serial: {e}")))?;
        let pkcs8 =
            Zeroizing::new(unb64(&f.private_key, "private_key").map_err(|p| bad(p.detail))?);
        let key = KeyPair::from_pkcs8(&pkcs8, rng).map_err(|e| bad(format!("private_key: {e}")))?;
        if key.algorithm().name() != f.algorithm {
            return Err(bad(format!(
                "algorithm {} does not match the key",
                f.algorithm
            )));
        }
        let opt = |v: &Option<String>, name: &str| -> Result<Option<Vec<u8>>, AgentError> {
            v.as_deref()
                .map(|s| unb64(s, name).map_err(|p| bad(p.detail)))
                .transpose()
        };
        let mut secrets = Vec::new();
        for s in &f.secrets {
            let secret = Zeroizing::new(unb64(&s.secret, "secret").map_err(|p| bad(p.detail))?);
            let alg = protocol_spec::secret::SecretAlgorithm::from_name(&s.algorithm)
                .ok_or_else(|| bad(format!("secret {}: unknown algorithm", s.key_id)))?;
            let kcv = hex::decode(&s.kcv)
                .ok()
                .filter(|k| alg.kcv(&secret).as_ref() == Some(k))
                .ok_or_else(|| {
                    bad(format!(
                        "secret {}: kcv is not the key check value of its {} secret",
                        s.key_id,
                        alg.name()
                    ))
                })?;
            let initial_key_id = s
                .initial_key_id
                .as_deref()
                .map(|h| {
                    let mut id = [0u8; 8];
                    hex::decode_to_slice(h, &mut id)
                        .map(|_| id)
                        .map_err(|_| bad(format!("secret {}: initial_key_id", s.key_id)))
                })
                .transpose()?;
            if initial_key_id.is_some() != alg.has_initial_key_id() {
                return Err(bad(format!(
                    "secret {}: an initial_key_id goes with a DUKPT algorithm",
                    s.key_id
                )));
            }
            secrets.push(StoredSecret {
                key_id: s.key_id.clone(),
                version: s.version,
                algorithm: s.algorithm.clone(),
                secret,
                kcv,
                initial_key_id,
                acknowledged: s.acknowledged,
            });
        }
        Ok(DeviceState {
            serial,
            key,
            ca_certificate: opt(&f.ca_certificate, "ca_certificate")?,
            certificate: opt(&f.certificate, "certificate")?,
            enrolled_at: f.enrolled_at,
            secrets,
        })
    }

    /// The newest AES DUKPT Initial Key the device holds, with its Initial Key ID.
    pub fn dukpt_initial_key(
        &self,
    ) -> Result<
        (
            protocol_spec::dukpt::AesKey,
            protocol_spec::dukpt::InitialKeyId,
        ),
        AgentError,
    > {
        let s = self
            .secrets
            .iter()
            .rev()
            .find(|s| s.initial_key_id.is_some())
            .ok_or_else(|| {
                AgentError::Invalid(
                    "the device holds no DUKPT Initial Key (its line's secrets are not DUKPT, \
                     or `device-agent secret` has not fetched one yet)"
                        .into(),
                )
            })?;
        let id =
            protocol_spec::dukpt::InitialKeyId::from_bytes(s.initial_key_id.unwrap_or_default());
        let key = protocol_spec::dukpt::AesKey::from_bytes(&s.secret)
            .map_err(|e| AgentError::Invalid(format!("secret {}: {e}", s.key_id)))?;
        Ok((key, id))
    }

    /// The device side of AES DUKPT (ANSI X9.24-3-2017) at transaction `counter`: the KSN and
    /// the KCV of the transaction's working key of `usage` and `key_type` (the Initial Key's
    /// type when `None`), derived through the standard's intermediate derivation key register
    /// as the device would hold it at that counter. Never the key.
    pub fn dukpt_transaction(
        &self,
        counter: u32,
        usage: protocol_spec::dukpt::KeyUsage,
        key_type: Option<protocol_spec::dukpt::KeyType>,
    ) -> Result<
        (
            protocol_spec::dukpt::Ksn,
            [u8; protocol_spec::dukpt::KCV_LEN],
        ),
        AgentError,
    > {
        let (ik, id) = self.dukpt_initial_key()?;
        let invalid = |e: protocol_spec::dukpt::DukptError| AgentError::Invalid(e.to_string());
        let mut device =
            protocol_spec::dukpt::DukptDevice::resume(&ik, id, counter).map_err(invalid)?;
        let t = device.next_transaction().map_err(invalid)?;
        let key = t
            .working_key(usage, key_type.unwrap_or(ik.key_type()))
            .map_err(invalid)?;
        Ok((t.ksn, key.kcv()))
    }

    /// Writes the state atomically with mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), AgentError> {
        let f = StateFile {
            format: FORMAT,
            serial: self.serial.to_string(),
            algorithm: self.key.algorithm().name().to_string(),
            private_key: b64(self.key.pkcs8_der()),
            ca_certificate: self.ca_certificate.as_deref().map(b64),
            certificate: self.certificate.as_deref().map(b64),
            enrolled_at: self.enrolled_at,
            secrets: self
                .secrets
                .iter()
                .map(|s| SecretFile {
                    key_id: s.key_id.clone(),
                    version: s.version,
                    algorithm: s.algorithm.clone(),
                    secret: b64(s.secret.as_ref()),
                    kcv: hex::encode(&s.kcv),
                    initial_key_id: s.initial_key_id.map(hex::encode),
                    acknowledged: s.acknowledged,
                })
                .collect(),
        };
        let mut text = Zeroizing::new(
            serde_json::to_vec_pretty(&f).map_err(|e| AgentError::Invalid(e.to_string()))?,
        );
        text.push(b'\n');
        write_atomically(path, &text, 0o600)
    }

    /// Writes a new state file, refusing to replace an existing one: a device's key is made
    /// once.
    pub fn create(&self, path: &Path) -> Result<(), AgentError> {
        if path.exists() {
            return Err(AgentError::Invalid(format!(
                "{} already exists; a device generates its key once (remove the file to start over)",
                path.display()
            )));
        }
        self.save(path)
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename over
/// `path`, fsync of the folder.
pub fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AgentError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| AgentError::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| AgentError::io(path, e))
}
