//! Per-device secrets at rest: AES-256-GCM under a key derived from the key-encryption key, a
//! keyed-hash index over the plaintexts, and the import format for pre-generated keys.

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::records::{BdkRecord, PoolEntry, SecretRecord};

/// Keys derived from the CA's key-encryption key (`kek.bin`), and, when the CA keeps its key in
/// a PKCS#11 token, that token as the keeper of its DUKPT BDKs.
pub struct SecretKeys {
    seal: LessSafeKey,
    index: hmac::Key,
    audit: crate::audit::AuditKey,
    rng: SystemRandom,
    bdk_token: Option<std::sync::Arc<crate::issuer::BdkToken>>,
}

/// Why an Initial Key could not be derived from a stored BDK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BdkUseError {
    /// The token holding the BDK does not answer, or does not hold the BDK's object (as
    /// signing treats a CA key its token does not show): nothing was derived; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else: a record that fails authentication, a token's refusal, the store.
    #[error("{0}")]
    Failed(String),
}

impl From<crate::issuer::BdkTokenError> for BdkUseError {
    fn from(e: crate::issuer::BdkTokenError) -> Self {
        use crate::issuer::BdkTokenError as E;
        match e {
            E::Unavailable(why) | E::Missing(why) => BdkUseError::Unavailable(why),
            e => BdkUseError::Failed(e.to_string()),
        }
    }
}

impl std::fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKeys([redacted])")
    }
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn derive(kek: &[u8; 32], info: &[u8]) -> Result<Zeroizing<[u8; 32]>, String> {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"imprint-kek-v1").extract(kek);
    let info = [info];
    let okm = prk
        .expand(&info, Len(32))
        .map_err(|_| "HKDF failed".to_string())?;
    let mut out = Zeroizing::new([0u8; 32]);
    okm.fill(out.as_mut())
        .map_err(|_| "HKDF failed".to_string())?;
    Ok(out)
}

/// AAD binding a sealed secret to its device, key id and version.
fn device_aad(serial: u64, key_id: &str, version: u64) -> Vec<u8> {
    let mut a = b"imprint-secret-v1".to_vec();
    a.extend_from_slice(&serial.to_be_bytes());
    a.extend_from_slice(&version.to_be_bytes());
    a.extend_from_slice(key_id.as_bytes());
    a
}

/// AAD binding a sealed BDK to its id and algorithm.
fn bdk_aad(id: &str, algorithm: &str) -> Vec<u8> {
    let mut a = b"imprint-bdk-v1".to_vec();
    a.extend_from_slice(id.as_bytes());
    a.push(0);
    a.extend_from_slice(algorithm.as_bytes());
    a
}

fn pool_aad(key_id: &str) -> Vec<u8> {
    let mut a = b"imprint-pool-v1".to_vec();
    a.extend_from_slice(key_id.as_bytes());
    a
}

impl SecretKeys {
    /// Derives the sealing and index keys from the 32-byte key-encryption key.
    pub fn new(kek: &[u8]) -> Result<Self, String> {
        let kek: [u8; 32] = kek
            .try_into()
            .map_err(|_| format!("the key-encryption key must be 32 bytes, is {}", kek.len()))?;
        let kek = Zeroizing::new(kek);
        let seal = derive(&kek, b"seal")?;
        let index = derive(&kek, b"index")?;
        let audit = derive(&kek, b"audit")?;
        Ok(SecretKeys {
            seal: LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, seal.as_ref()).map_err(|_| "AES key".to_string())?,
            ),
            index: hmac::Key::new(hmac::HMAC_SHA256, index.as_ref()),
            audit: crate::audit::AuditKey::new(&audit),
            rng: SystemRandom::new(),
            bdk_token: None,
        })
    }

    /// These keys, with `token` keeping the DUKPT BDKs added from now on (the CA's PKCS#11
    /// token).
    pub fn with_bdk_token(mut self, token: crate::issuer::BdkToken) -> Self {
        self.bdk_token = Some(std::sync::Arc::new(token));
        self
    }

    /// The token that keeps new DUKPT BDKs, when the CA has one.
    pub fn bdk_token(&self) -> Option<&crate::issuer::BdkToken> {
        self.bdk_token.as_deref()
    }

    /// Loads `kek.bin`.
    pub fn load(path: &std::path::Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: the key-encryption key must be readable by its owner only (mode {:o}; chmod 600)",
                path.display(),
                mode & 0o777
            ));
        }
        let bytes =
            Zeroizing::new(std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?);
        Self::new(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The key that seals audit entries (SPEC.md 11.9): derived from the key-encryption key, so
    /// held wherever it is.
    pub fn audit_key(&self) -> crate::audit::AuditKey {
        self.audit.clone()
    }

    /// 32 fresh bytes from the system CSPRNG.
    pub fn generate(&self) -> Result<Zeroizing<[u8; 32]>, String> {
        let mut s = Zeroizing::new([0u8; 32]);
        self.rng
            .fill(s.as_mut())
            .map_err(|_| "random generator failed".to_string())?;
        Ok(s)
    }

    /// A fresh random key id.
    pub fn new_key_id(&self) -> Result<String, String> {
        let mut b = [0u8; 16];
        self.rng
            .fill(&mut b)
            .map_err(|_| "random generator failed".to_string())?;
        Ok(format!("k{}", hex::encode(b)))
    }

    /// The keyed hash that indexes a plaintext secret.
    pub fn index_tag(&self, secret: &[u8]) -> Vec<u8> {
        hmac::sign(&self.index, secret).as_ref().to_vec()
    }

    fn seal_with(&self, aad: &[u8], secret: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let mut nonce = [0u8; 12];
        self.rng
            .fill(&mut nonce)
            .map_err(|_| "random generator failed".to_string())?;
        // Room for the tag from the start: sealed in place, the plaintext is never left behind
        // by a reallocation.
        let mut buf = Vec::with_capacity(secret.len() + AES_256_GCM.tag_len());
        buf.extend_from_slice(secret);
        self.seal
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| "sealing failed".to_string())?;
        Ok((buf, nonce.to_vec()))
    }

    fn open_bytes(
        &self,
        aad: &[u8],
        ciphertext: &[u8],
        nonce: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, String> {
        let nonce: [u8; 12] = nonce.try_into().map_err(|_| "bad nonce".to_string())?;
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let n = self
            .seal
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .map_err(|_| {
                "a stored secret failed authentication (wrong key or tampered record)".to_string()
            })?
            .len();
        buf.truncate(n);
        Ok(buf)
    }

    /// Seals a DUKPT Base Derivation Key under the key-encryption key.
    pub fn seal_bdk(
        &self,
        id: protocol_spec::dukpt::BdkId,
        bdk: &protocol_spec::dukpt::Bdk,
        at: u64,
    ) -> Result<BdkRecord, String> {
        let algorithm = bdk.key_type().name();
        let (ciphertext, nonce) =
            self.seal_with(&bdk_aad(&id.to_string(), algorithm), bdk.expose())?;
        Ok(BdkRecord {
            id: id.to_string(),
            algorithm: algorithm.to_string(),
            ciphertext,
            nonce,
            kcv: bdk.kcv().to_vec(),
            created_at: at,
            token_object: None,
        })
    }

    /// Opens a sealed Base Derivation Key, and checks it against its algorithm and KCV. A BDK
    /// held in the token is never opened: use [`SecretKeys::bdk_initial_key`].
    pub fn open_bdk(&self, r: &BdkRecord) -> Result<protocol_spec::dukpt::Bdk, String> {
        if let Some(label) = &r.token_object {
            return Err(format!(
                "BDK {} is the PKCS#11 token's object {label:?}: it never leaves the token",
                r.id
            ));
        }
        let plain = self.open_bytes(&bdk_aad(&r.id, &r.algorithm), &r.ciphertext, &r.nonce)?;
        let bdk = protocol_spec::dukpt::AesKey::from_bytes(&plain).map_err(|e| e.to_string())?;
        if bdk.key_type().name() != r.algorithm || bdk.kcv()[..] != r.kcv[..] {
            return Err(format!(
                "BDK {}: the stored key does not match its record",
                r.id
            ));
        }
        Ok(bdk)
    }

    /// The Initial Key of `id` under the stored BDK `r` (ANSI X9.24-3-2017): derived in the
    /// CA's memory from a BDK sealed under the key-encryption key, or with the derivation data
    /// encrypted in the token for a BDK the token holds.
    pub fn bdk_initial_key(
        &self,
        r: &BdkRecord,
        id: protocol_spec::dukpt::InitialKeyId,
    ) -> Result<protocol_spec::dukpt::AesKey, BdkUseError> {
        let Some(label) = &r.token_object else {
            let bdk = self.open_bdk(r).map_err(BdkUseError::Failed)?;
            return Ok(protocol_spec::dukpt::initial_key(&bdk, id));
        };
        let key_type = protocol_spec::dukpt::KeyType::from_name(&r.algorithm).ok_or_else(|| {
            BdkUseError::Failed(format!("BDK {}: unknown algorithm {:?}", r.id, r.algorithm))
        })?;
        let token = self.bdk_token().ok_or_else(|| {
            BdkUseError::Failed(format!(
                "BDK {} is held in a PKCS#11 token, but config.toml names none ([issuer] pkcs11)",
                r.id
            ))
        })?;
        token
            .initial_key(label, key_type, id)
            .map_err(|e| match BdkUseError::from(e) {
                BdkUseError::Unavailable(why) => {
                    BdkUseError::Unavailable(format!("BDK {}: {why}", r.id))
                }
                BdkUseError::Failed(why) => BdkUseError::Failed(format!("BDK {}: {why}", r.id)),
            })
    }

    /// A new version record for a device. The secret's length and KCV follow its source's
    /// algorithm ([`algorithm_of`]).
    pub fn seal_version(
        &self,
        serial: u64,
        version: u64,
        key_id: String,
        secret: &[u8],
        source: &str,
        at: u64,
    ) -> Result<SecretRecord, String> {
        let kcv = algorithm_of(source)
            .kcv(secret)
            .ok_or_else(|| format!("a {source} secret of {} bytes", secret.len()))?;
        let (ciphertext, nonce) = self.seal_with(&device_aad(serial, &key_id, version), secret)?;
        Ok(SecretRecord {
            serial,
            version,
            kcv,
            index_tag: self.index_tag(secret),
            key_id,
            ciphertext,
            nonce,
            source: source.to_string(),
            created_at: at,
            delivered_at: None,
            confirmed_at: None,
            retired_at: None,
        })
    }

    /// Decrypts a device's version.
    pub fn open_version(&self, r: &SecretRecord) -> Result<Zeroizing<Vec<u8>>, String> {
        self.open_bytes(
            &device_aad(r.serial, &r.key_id, r.version),
            &r.ciphertext,
            &r.nonce,
        )
    }

    /// Seals an imported key for the pool.
    pub fn seal_pool(
        &self,
        key_id: String,
        secret: &[u8; 32],
        at: u64,
    ) -> Result<PoolEntry, String> {
        let (ciphertext, nonce) = self.seal_with(&pool_aad(&key_id), secret)?;
        Ok(PoolEntry {
            kcv: protocol_spec::secret::kcv(secret).to_vec(),
            index_tag: self.index_tag(secret),
            key_id,
            ciphertext,
            nonce,
            imported_at: at,
        })
    }

    /// Decrypts a pool entry (32 bytes, in the heap: no copy of it is left on a stack).
    pub fn open_pool(&self, e: &PoolEntry) -> Result<Zeroizing<Vec<u8>>, String> {
        let plain = self.open_bytes(&pool_aad(&e.key_id), &e.ciphertext, &e.nonce)?;
        if plain.len() != 32 {
            return Err("stored secret is not 32 bytes".to_string());
        }
        Ok(plain)
    }
}

/// How much of the stack [`scrub_stack`] overwrites: more than the secret-handling code it
/// follows uses (ring's AES key schedule and HMAC state, the DUKPT derivation), debug builds
/// included.
const SCRUB_BYTES: usize = 32 * 1024;

/// Overwrites the stack below the caller's frame, where the functions it called before left
/// their locals: run right after code that handled a plaintext secret in stack variables of
/// its own (ring keeps an AES key schedule, whose first round keys are the key, and an HMAC
/// block buffer there, and wipes neither), before the task yields. Otherwise those bytes stay
/// on the worker thread's stack and are copied into the heap by whatever runs there next (a
/// value moved into the heap carries its padding and unused space along), where no wipe
/// reaches them. The writes are volatile, so they are not optimised away.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u64; SCRUB_BYTES / 8];
    zeroize::Zeroize::zeroize(&mut area[..]);
    std::hint::black_box(&area);
}

/// The delivery algorithm of a version of `source` (its record's `source`): the DUKPT sources
/// `dukpt-aes-128` and `dukpt-aes-256`, else `aes-256`.
pub fn algorithm_of(source: &str) -> protocol_spec::secret::SecretAlgorithm {
    use protocol_spec::dukpt::KeyType;
    use protocol_spec::secret::SecretAlgorithm;
    match source {
        "dukpt-aes-128" => SecretAlgorithm::Dukpt(KeyType::Aes128),
        "dukpt-aes-256" => SecretAlgorithm::Dukpt(KeyType::Aes256),
        _ => SecretAlgorithm::Aes256,
    }
}

/// A device's AES DUKPT Initial Key under the stored BDK `bdk_id`, at the derivation id the
/// BDK gives out next plus `offset` (the allocations before it in the same batch): the secret,
/// its key id (the Initial Key ID in hex) and its source. The version's transaction takes the
/// derivation id only if it is still the next one ([`crate::ra::rules::dukpt_claim`]).
pub fn dukpt_secret(
    store: &dyn crate::store::Store,
    keys: &SecretKeys,
    bdk_id: protocol_spec::dukpt::BdkId,
    offset: u64,
) -> Result<(Zeroizing<Vec<u8>>, String, String), BdkUseError> {
    let name = bdk_id.to_string();
    let record = store
        .bdks()
        .map_err(|e| BdkUseError::Failed(e.to_string()))?
        .into_iter()
        .find(|b| b.id == name)
        .ok_or_else(|| BdkUseError::Failed(format!("the line's BDK {name} is not stored")))?;
    let next = store
        .dukpt_next(&name)
        .map_err(|e| BdkUseError::Failed(e.to_string()))?
        + offset;
    let derivation_id = u32::try_from(next).map_err(|_| {
        BdkUseError::Failed(format!("BDK {name} has given out every derivation id"))
    })?;
    let id = protocol_spec::dukpt::InitialKeyId::new(bdk_id, derivation_id);
    let ik = keys.bdk_initial_key(&record, id)?;
    Ok((
        Zeroizing::new(ik.expose().to_vec()),
        id.to_string(),
        format!("dukpt-{}", ik.key_type().name()),
    ))
}

/// A key id and its 32 secret bytes, from an import file.
pub type ImportedKey = (String, Zeroizing<[u8; 32]>);

/// Parses an import file: JSON lines `{"key_id": "...", "key": "<64 hex digits>"}`, or CSV
/// lines `key_id,hex` (a header line `key_id,key` is allowed). Blank lines and lines starting
/// with `#` are skipped. Errors name the line.
pub fn parse_import(text: &str) -> Result<Vec<ImportedKey>, String> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let n = i + 1;
        if line.is_empty() || line.starts_with('#') || line.eq_ignore_ascii_case("key_id,key") {
            continue;
        }
        let (id, hexkey) = if line.starts_with('{') {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Line {
                key_id: String,
                key: String,
            }
            let l: Line = serde_json::from_str(line).map_err(|e| format!("line {n}: {e}"))?;
            (l.key_id, Zeroizing::new(l.key))
        } else {
            let (a, b) = line
                .split_once(',')
                .ok_or_else(|| format!("line {n}: expected key_id,key"))?;
            (a.trim().to_string(), Zeroizing::new(b.trim().to_string()))
        };
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(format!(
                "line {n}: key_id must be 1 to 64 printable characters"
            ));
        }
        let bytes = Zeroizing::new(
            hex::decode(hexkey.as_str()).map_err(|_| format!("line {n}: key is not hex"))?,
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| format!("line {n}: key must be 32 bytes (64 hex digits)"))?;
        out.push((id, Zeroizing::new(key)));
    }
    Ok(out)
}

#[cfg(test)]
mod kek_file_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// Hardening finding 12: the key-encryption key's file mode was not checked when loaded.
    #[test]
    fn a_key_encryption_key_others_can_read_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("kek.bin");
        std::fs::write(&path, [7u8; 32]).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SecretKeys::load(&path).unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(SecretKeys::load(&path).is_ok());
    }
}
