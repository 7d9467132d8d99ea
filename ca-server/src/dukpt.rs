//! AES DUKPT Base Derivation Keys (ANSI X9.24-3-2017): the operator actions the admin API and
//! the offline CLI share. A BDK is sealed under the key-encryption key as soon as it arrives and
//! opened only to derive; when the CA keeps its key in a PKCS#11 token, the BDK is an object in
//! that token instead (generated there, or created there from the operator's key, which is then
//! wiped), and the token encrypts the derivation data. Never shown, logged or exported:
//! operators see its id, its algorithm, its key check value and where it is kept.

use protocol_spec::dukpt::{self, AesKey, Bdk, BdkId, DukptError, KeyType, KeyUsage, Ksn};
use serde::{Deserialize, Serialize};

use crate::issuer::BdkTokenError;
use crate::records::BdkRecord;
use crate::secrets::{BdkUseError, SecretKeys};
use crate::store::{Store, StoreError};

/// A BDK as an operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BdkView {
    /// The BDK id, 8 hex digits.
    pub bdk_id: String,
    /// `aes-128` or `aes-256`.
    pub algorithm: String,
    /// Key check value, hex: AES-CMAC of a zero block, 5 octets (ANSI X9.24-1-2017).
    pub kcv: String,
    /// Added, Unix seconds.
    pub created_at: u64,
    /// Where the key is kept: `sealed` (under the key-encryption key) or `token` (an object in
    /// the CA's PKCS#11 token).
    #[serde(default)]
    pub custody: String,
}

/// The admin API's `POST /dukpt/bdks` body: a key in hex, or `generate` (with an algorithm,
/// `aes-256` by default). Its `Debug` never shows the key.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBdk {
    /// The BDK id, 8 hex digits.
    pub bdk_id: String,
    /// The key, 32 or 64 hex digits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Generate the key from the CA's CSPRNG instead.
    #[serde(default)]
    pub generate: bool,
    /// For `generate`: `aes-128` or `aes-256`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
}

impl std::fmt::Debug for AddBdk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AddBdk")
            .field("bdk_id", &self.bdk_id)
            .field("key", &self.key.as_ref().map(|_| "[redacted]"))
            .field("generate", &self.generate)
            .field("algorithm", &self.algorithm)
            .finish()
    }
}

impl Drop for AddBdk {
    fn drop(&mut self) {
        if let Some(k) = self.key.as_mut() {
            zeroize::Zeroize::zeroize(k);
        }
    }
}

/// The admin API's `POST /dukpt/derive` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeriveRequest {
    /// The transaction's KSN, 24 hex digits.
    pub ksn: String,
    /// The working key's usage (`pin-encryption` by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<String>,
    /// The working key's type (the BDK's by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
}

/// What `derive` answers: the KCV of a transaction's working key, never the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeriveView {
    /// The KSN, 24 hex digits.
    pub ksn: String,
    /// The BDK id (the KSN's first 4 octets).
    pub bdk_id: String,
    /// The transaction counter.
    pub counter: u32,
    /// The working key's usage.
    pub usage: String,
    /// The working key's type.
    pub key_type: String,
    /// Its KCV, hex.
    pub kcv: String,
}

/// Why a DUKPT operator action was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum BdkRefusal {
    /// The key or an identifier is malformed (wrong length, not hex).
    #[error("{0}")]
    Invalid(String),
    /// A BDK with this id is stored already.
    #[error("BDK {0} already exists: a BDK id names one key for ever")]
    Exists(String),
    /// No BDK with this id.
    #[error("no BDK {0} (`ca-server dukpt list` shows the stored ones)")]
    Unknown(String),
    /// The token already holds an object with the label the BDK's would have.
    #[error("{0}")]
    TokenConflict(String),
    /// The PKCS#11 token holding the BDK does not answer, or does not hold its object: nothing
    /// was derived or stored.
    #[error("{0}")]
    Unavailable(String),
    /// The store, the key-encryption key or the token failed (detail for the server log only).
    #[error("{0}")]
    Internal(String),
}

impl From<BdkTokenError> for BdkRefusal {
    fn from(e: BdkTokenError) -> Self {
        match e {
            BdkTokenError::Unavailable(why) | BdkTokenError::Missing(why) => {
                BdkRefusal::Unavailable(why)
            }
            BdkTokenError::Taken(why) => BdkRefusal::TokenConflict(why),
            e => BdkRefusal::Internal(e.to_string()),
        }
    }
}

impl From<BdkUseError> for BdkRefusal {
    fn from(e: BdkUseError) -> Self {
        match e {
            BdkUseError::Unavailable(why) => BdkRefusal::Unavailable(why),
            e => BdkRefusal::Internal(e.to_string()),
        }
    }
}

impl From<DukptError> for BdkRefusal {
    fn from(e: DukptError) -> Self {
        BdkRefusal::Invalid(e.to_string())
    }
}

impl From<StoreError> for BdkRefusal {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BdkExists(id) => BdkRefusal::Exists(id),
            e => BdkRefusal::Internal(e.to_string()),
        }
    }
}

/// The operator's view of a stored BDK.
pub fn bdk_view(r: &BdkRecord) -> BdkView {
    BdkView {
        bdk_id: r.id.clone(),
        algorithm: r.algorithm.clone(),
        kcv: hex::encode_upper(&r.kcv),
        created_at: r.created_at,
        custody: r.custody().to_string(),
    }
}

/// A BDK id from its 8 hex digits.
pub fn parse_bdk_id(s: &str) -> Result<BdkId, BdkRefusal> {
    s.parse::<BdkId>()
        .map_err(|e| BdkRefusal::Invalid(format!("--bdk-id: {e}")))
}

/// The key an [`AddBdk`] asks for: the operator's, or a fresh one of a key type.
#[derive(Debug)]
pub enum NewBdk {
    /// The operator's key (wiped when dropped).
    Given(Bdk),
    /// A new key of this type: from the token when the CA keeps its BDKs there, else from the
    /// CA's CSPRNG.
    Generate(KeyType),
}

/// What an [`AddBdk`] asks for, checked: a key in hex or `generate` (with an algorithm,
/// `aes-256` by default), not both.
pub fn new_bdk(req: &AddBdk) -> Result<NewBdk, BdkRefusal> {
    match (&req.key, req.generate) {
        (Some(_), true) => Err(BdkRefusal::Invalid(
            "give a key or generate, not both".into(),
        )),
        (None, false) => Err(BdkRefusal::Invalid(
            "give a key (--key-file) or --generate".into(),
        )),
        (Some(hex), false) => {
            if req.algorithm.is_some() {
                return Err(BdkRefusal::Invalid(
                    "--algorithm is for --generate: a given key's length says its algorithm".into(),
                ));
            }
            Ok(NewBdk::Given(AesKey::from_hex(hex)?))
        }
        (None, true) => Ok(NewBdk::Generate(match req.algorithm.as_deref() {
            None => KeyType::Aes256,
            Some(a) => KeyType::from_name(a).ok_or_else(|| {
                BdkRefusal::Invalid(format!("algorithm {a:?} is not aes-128 or aes-256"))
            })?,
        })),
    }
}

/// The key of an [`AddBdk`], in the CA's memory: the hex it carries, or a fresh one of its
/// algorithm from the CA's CSPRNG (for a CA that seals its BDKs under the key-encryption key;
/// [`add`] keeps a token CA's BDK out of memory).
pub fn key_of(req: &AddBdk, keys: &SecretKeys) -> Result<Bdk, BdkRefusal> {
    match new_bdk(req)? {
        NewBdk::Given(bdk) => Ok(bdk),
        NewBdk::Generate(key_type) => fresh(keys, key_type),
    }
}

fn fresh(keys: &SecretKeys, key_type: KeyType) -> Result<Bdk, BdkRefusal> {
    let fresh = keys.generate().map_err(BdkRefusal::Internal)?;
    Ok(AesKey::from_bytes(&fresh[..key_type.key_len()])?)
}

/// Adds a BDK (durable on return): [`prepare`], then stored with its audit entry; refuses an
/// id already present, storing nothing (and deleting the token object it made).
pub fn add(
    store: &dyn Store,
    keys: &SecretKeys,
    id: BdkId,
    new: NewBdk,
    at: u64,
    actor: &str,
) -> Result<BdkRecord, BdkRefusal> {
    let record = prepare(store, keys, id, new, at)?;
    if let Err(e) = store.add_bdk(&record, actor) {
        discard(keys, &record);
        return Err(e.into());
    }
    Ok(record)
}

/// [`add`] of a given key.
pub fn add_bdk(
    store: &dyn Store,
    keys: &SecretKeys,
    id: BdkId,
    bdk: &Bdk,
    at: u64,
    actor: &str,
) -> Result<BdkRecord, BdkRefusal> {
    add(store, keys, id, NewBdk::Given(bdk.clone()), at, actor)
}

/// The record of a new BDK, after checking that its id is free (the store checks again in the
/// transaction that adds it): with a PKCS#11 token ([`SecretKeys::bdk_token`]), the key made
/// in the token (generated there, or created from the given key, which is wiped right after)
/// and its KCV computed there; else sealed under the key-encryption key. A record that is then
/// not stored must be [`discard`]ed.
pub fn prepare(
    store: &dyn Store,
    keys: &SecretKeys,
    id: BdkId,
    new: NewBdk,
    at: u64,
) -> Result<BdkRecord, BdkRefusal> {
    if find(store, id)?.is_some() {
        return Err(BdkRefusal::Exists(id.to_string()));
    }
    let Some(token) = keys.bdk_token() else {
        let bdk = match new {
            NewBdk::Given(bdk) => bdk,
            NewBdk::Generate(key_type) => fresh(keys, key_type)?,
        };
        return keys.seal_bdk(id, &bdk, at).map_err(BdkRefusal::Internal);
    };
    let (key_type, (label, kcv)) = match new {
        NewBdk::Given(bdk) => (bdk.key_type(), token.import(id, bdk)?),
        NewBdk::Generate(key_type) => (key_type, token.generate(id, key_type)?),
    };
    Ok(BdkRecord {
        id: id.to_string(),
        algorithm: key_type.name().to_string(),
        ciphertext: Vec::new(),
        nonce: Vec::new(),
        kcv: kcv.to_vec(),
        created_at: at,
        token_object: Some(label),
    })
}

/// Undoes [`prepare`] for a record the store did not take: deletes its token object (a sealed
/// record leaves nothing behind).
pub fn discard(keys: &SecretKeys, record: &BdkRecord) {
    if let (Some(label), Some(token)) = (&record.token_object, keys.bdk_token()) {
        token.destroy_quietly(label);
    }
}

/// The stored record of a BDK id.
pub fn find(store: &dyn Store, id: BdkId) -> Result<Option<BdkRecord>, BdkRefusal> {
    let name = id.to_string();
    Ok(store.bdks()?.into_iter().find(|b| b.id == name))
}

/// The KCV of a transaction's working key, derived on the host side from the stored BDK the
/// KSN names.
pub fn derive(
    store: &dyn Store,
    keys: &SecretKeys,
    req: &DeriveRequest,
) -> Result<DeriveView, BdkRefusal> {
    let ksn = Ksn::from_hex(&req.ksn)?;
    let id = ksn.initial_key_id.bdk_id();
    let record = find(store, id)?.ok_or_else(|| BdkRefusal::Unknown(id.to_string()))?;
    let usage: KeyUsage = match req.usage.as_deref() {
        None => KeyUsage::PinEncryption,
        Some(u) => u.parse().map_err(BdkRefusal::Invalid)?,
    };
    let bdk_type = KeyType::from_name(&record.algorithm).ok_or_else(|| {
        BdkRefusal::Internal(format!(
            "BDK {id}: unknown algorithm {:?}",
            record.algorithm
        ))
    })?;
    let key_type = match req.key_type.as_deref() {
        None => bdk_type,
        Some(t) => KeyType::from_name(t).ok_or_else(|| {
            BdkRefusal::Invalid(format!("key type {t:?} is not aes-128 or aes-256"))
        })?,
    };
    // Refused before the BDK is used (a token call for nothing).
    if !dukpt::counter_usable(ksn.counter) {
        return Err(DukptError::CounterNotUsable(ksn.counter).into());
    }
    if key_type.key_len() > bdk_type.key_len() {
        return Err(DukptError::WorkingKeyTooStrong {
            wanted: key_type,
            from: bdk_type,
        }
        .into());
    }
    let initial = keys.bdk_initial_key(&record, ksn.initial_key_id)?;
    let key = dukpt::working_key(
        &dukpt::transaction_key(&initial, ksn)?,
        ksn,
        usage,
        key_type,
    )?;
    Ok(DeriveView {
        ksn: ksn.to_string(),
        bdk_id: id.to_string(),
        counter: ksn.counter,
        usage: usage.name().to_string(),
        key_type: key_type.name().to_string(),
        kcv: hex::encode_upper(key.kcv()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_add_request_never_shows_its_key() {
        let r = AddBdk {
            bdk_id: "12345678".into(),
            key: Some("FEDCBA9876543210F1F1F1F1F1F1F1F1".into()),
            generate: false,
            algorithm: None,
        };
        let s = format!("{r:?}");
        assert!(!s.contains("FEDCBA"), "{s}");
    }
}
