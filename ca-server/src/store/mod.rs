//! The store: the only shared state of the CA. The trait is what the CA needs, nothing more;
//! [`SledStore`] is the embedded default.

pub mod copy;
pub mod postgres;
mod sled_store;

pub use postgres::{PgConfig, PgStore};
pub use sled_store::{SledStore, sled_config};

/// The environment variable that holds the database password (before `[store] password_file`).
pub const PASSWORD_ENV: &str = "IMPRINT_STORE_PASSWORD";

/// The PostgreSQL settings of a CA folder's `[store]`, password read; `None` for the sled
/// store.
pub fn pg_config(
    dir: &crate::config::CaDir,
    s: &crate::config::StoreSettings,
) -> Result<Option<PgConfig>, String> {
    let Some(url) = &s.url else {
        return Ok(None);
    };
    let under = |p: &std::path::PathBuf| dir.root().join(p);
    let password = match std::env::var(PASSWORD_ENV) {
        Ok(p) if !p.is_empty() => Some(zeroize::Zeroizing::new(p)),
        _ => match &s.password_file {
            None => None,
            Some(f) => Some(read_password(&under(f))?),
        },
    };
    Ok(Some(PgConfig {
        url: url.clone(),
        password,
        ca_file: s.ca_file.as_ref().map(under),
        schema: s.schema.clone().unwrap_or_else(|| "imprint".into()),
    }))
}

/// A password file: its first line, which only its owner may read.
fn read_password(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: a password file must be readable by its owner only (chmod 600)",
            path.display()
        ));
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    Ok(zeroize::Zeroizing::new(
        text.lines().next().unwrap_or("").to_string(),
    ))
}

/// Opens the store a CA folder's configuration names: PostgreSQL when `[store] url` is set
/// (its schema must be the one this build knows), else the sled store in the folder.
pub fn open(
    dir: &crate::config::CaDir,
    s: &crate::config::StoreSettings,
) -> Result<std::sync::Arc<dyn Store>, String> {
    match pg_config(dir, s)? {
        None => Ok(std::sync::Arc::new(
            SledStore::open(&dir.store()).map_err(|e| e.to_string())?,
        )),
        Some(c) => match PgStore::open(&c) {
            Ok(store) => Ok(std::sync::Arc::new(store)),
            Err(StoreError::Unavailable(why)) => Err(format!(
                "cannot reach the database at {}: {why}",
                postgres::redact(&c.url)
            )),
            Err(e) => Err(e.to_string()),
        },
    }
}

/// Total size of the files under `dir` (a store folder's bytes on disk, as the simulator's
/// report and the store_size example give them).
pub fn dir_size(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

pub use crate::ra::rules::{
    EnrollOutcome, NewEnrollment, Refusal, ResetOutcome, SecretOp, SecretOutcome,
};
use crate::records::{AuditEntry, DeviceRecord, LineRecord, PoolEntry, ResetRecord, SecretRecord};

/// One stored record: (table, key, value).
pub type RawRecord = (String, Vec<u8>, Vec<u8>);
/// One audit entry as stored: (key, value), undecoded, for verification.
pub type RawAudit = (Vec<u8>, Vec<u8>);

/// A store failure (I/O, corruption, an unreachable database). Never shown to clients beyond
/// `internal`, or `unavailable` for [`StoreError::Unavailable`].
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The underlying database failed.
    #[error("store: {0}")]
    Backend(String),
    /// A record did not decode.
    #[error("store: corrupt record in {tree}: {reason}")]
    Corrupt {
        /// Which tree.
        tree: &'static str,
        /// Why.
        reason: String,
    },
    /// The store is held by another process.
    #[error(
        "the store at {0} is in use by another process (a running ca-server?); stop it, or use the admin API"
    )]
    Locked(String),
    /// A line with this id is already registered.
    #[error("line {0:?} already exists")]
    LineExists(String),
    /// The database cannot be reached (or lost its connection mid-write, which it rolled back):
    /// nothing was written; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Two writers met on the same record (a unique violation, a serialization failure or a
    /// deadlock) and this write was rolled back; read again and retry.
    #[error("store conflict: {0}")]
    Conflict(String),
    /// The database's schema is missing, older or newer than this build's; the message says
    /// what to run.
    #[error("{0}")]
    Schema(String),
}

/// One record of a store, as `ca-server store copy` moves it ([`SledStore::export`],
/// [`PgStore::import`]).
#[derive(Debug, Clone)]
pub enum Exported {
    /// A line.
    Line(LineRecord),
    /// A device's current binding.
    Device(DeviceRecord),
    /// A key bound to a serial (for ever, reset or not).
    Key {
        /// SHA-256 of the SPKI.
        hash: [u8; 32],
        /// Its serial.
        serial: u64,
    },
    /// A token id consumed by a line's enrollment.
    Token {
        /// Line.
        line: String,
        /// Token id.
        token_id: Vec<u8>,
        /// The serial that consumed it.
        serial: u64,
    },
    /// A secret version.
    Version(SecretRecord),
    /// An imported key not yet given out.
    Pool(PoolEntry),
    /// An earlier binding of a reset serial, with the reset's audit sequence number.
    Reset {
        /// Audit sequence number of the reset.
        seq: u64,
        /// The binding as it was.
        record: ResetRecord,
    },
    /// An audit entry, exactly as recorded.
    Audit(AuditEntry),
}

/// One of the store's indexes: each binds a value to the one record that holds it. The
/// verification pass reads them back ([`Store::index`]) and checks them against the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// SHA-256 of a public key (SPKI) -> serial.
    Keys,
    /// A line's token id ([`token_index_key`]) -> the serial that consumed it.
    Tokens,
    /// A secret's keyed-hash index tag -> (serial, version).
    SecretTags,
    /// A secret's key id -> (serial, version).
    KeyIds,
}

impl Index {
    /// Every index.
    pub const ALL: [Index; 4] = [Index::Keys, Index::Tokens, Index::SecretTags, Index::KeyIds];

    /// Its name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Index::Keys => "key",
            Index::Tokens => "token",
            Index::SecretTags => "secret tag",
            Index::KeyIds => "key id",
        }
    }
}

/// One entry of an [`Index`]: the value indexed and what holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The value (a key hash, a [`token_index_key`], an index tag, a key id's bytes).
    pub key: Vec<u8>,
    /// (serial, secret version; 0 for the key and token indexes), or `None` for an imported
    /// key still in the pool (no device's yet).
    pub holder: Option<(u64, u64)>,
}

/// The value the token index keys a token use by: the line id, a zero byte, the token id.
pub fn token_index_key(line: &str, cti: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(line.len() + 1 + cti.len());
    k.extend_from_slice(line.as_bytes());
    k.push(0);
    k.extend_from_slice(cti);
    k
}

/// A write the group commit batches ([`Store::apply_writes`]).
#[derive(Debug, Clone)]
pub enum Write {
    /// An enrollment.
    Enroll(NewEnrollment),
    /// A secrets write.
    Secret(SecretOp),
}

/// The outcome of a [`Write`].
#[derive(Debug, Clone)]
pub enum Written {
    /// Of an enrollment.
    Enroll(EnrollOutcome),
    /// Of a secrets write.
    Secret(SecretOutcome),
}

/// Storage for the CA. Writes are atomic; [`Store::apply_enrollment`] is not durable until the
/// next [`Store::sync`] returns, which lets many enrollments share one flush.
pub trait Store: Send + Sync + 'static {
    /// The device record for `serial`.
    fn device(&self, serial: u64) -> Result<Option<DeviceRecord>, StoreError>;
    /// Which serial holds the key with this SPKI hash.
    fn serial_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError>;
    /// A registered line.
    fn line(&self, id: &str) -> Result<Option<LineRecord>, StoreError>;
    /// All registered lines.
    fn lines(&self) -> Result<Vec<LineRecord>, StoreError>;
    /// Registers a line (refuses an existing id), with its audit entry; durable on return.
    fn add_line(&self, line: &LineRecord, actor: &str) -> Result<(), StoreError>;
    /// Applies one enrollment atomically: checks the stateful rules (SPEC.md 3.3, 12 to 17) and
    /// writes device, key index, token use, line count and audit entry, or nothing.
    fn apply_enrollment(&self, e: &NewEnrollment) -> Result<EnrollOutcome, StoreError> {
        match self.apply_writes(&[Write::Enroll(e.clone())])?.pop() {
            Some(Written::Enroll(o)) => Ok(o),
            _ => Err(StoreError::Backend("no outcome for the enrollment".into())),
        }
    }
    /// Applies several writes, in order, as one atomic write: each outcome is what
    /// [`Store::apply_enrollment`] or [`Store::apply_secret`] would have given at its turn (a
    /// later write sees the earlier ones). An error applies none of them. The group commit
    /// applies a batch's writes this way, because each sled transaction costs two log-buffer
    /// writes.
    fn apply_writes(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError>;
    /// Makes everything applied so far durable (flush and fdatasync).
    fn sync(&self) -> Result<(), StoreError>;
    /// Every secret version of a device, oldest first.
    fn secret_versions(&self, serial: u64) -> Result<Vec<SecretRecord>, StoreError>;
    /// Up to `n` pool entries, starting at the `skip`-th.
    fn pool(&self, skip: usize, n: usize) -> Result<Vec<PoolEntry>, StoreError>;
    /// Applies one secrets write atomically (durable at the next [`Store::sync`]).
    fn apply_secret(&self, op: &SecretOp) -> Result<SecretOutcome, StoreError> {
        match self.apply_writes(&[Write::Secret(op.clone())])?.pop() {
            Some(Written::Secret(o)) => Ok(o),
            _ => Err(StoreError::Backend(
                "no outcome for the secrets write".into(),
            )),
        }
    }
    /// Sets a device's status (revoke), with an audit entry when it changes. Returns the
    /// record as it is now, `None` if there is no such device. Durable at the next sync.
    fn set_status(
        &self,
        serial: u64,
        status: crate::records::DeviceStatus,
        at: u64,
        actor: &str,
    ) -> Result<Option<DeviceRecord>, StoreError>;
    /// Frees a serial for re-enrollment: the record moves to the device's history, its secret
    /// versions are retired, its line's count goes down by one; the key stays bound to the
    /// serial. A revoked device is not reset (its certificate serial stays on the CRL).
    fn reset_device(&self, serial: u64, at: u64, actor: &str) -> Result<ResetOutcome, StoreError>;
    /// Earlier bindings of a serial (resets), oldest first.
    fn history(&self, serial: u64) -> Result<Vec<ResetRecord>, StoreError>;
    /// Revoked devices: (serial, revocation time), in serial order.
    fn revoked(&self) -> Result<Vec<(u64, u64)>, StoreError>;
    /// Enables or disables a line, with an audit entry when it changes; `None` if unknown.
    fn set_line_active(
        &self,
        id: &str,
        active: bool,
        at: u64,
        actor: &str,
    ) -> Result<Option<LineRecord>, StoreError>;
    /// Appends an audit entry for an event with no other write (an operator's lookup).
    fn record_event(
        &self,
        event: &str,
        serial: Option<u64>,
        actor: &str,
        detail: String,
        at: u64,
    ) -> Result<(), StoreError>;
    /// Audit entries after sequence number `after`, as stored (undecoded), in order.
    fn audit_raw(&self, after: u64) -> Box<dyn Iterator<Item = Result<RawAudit, StoreError>> + '_>;
    /// Every device record, in serial order.
    fn devices(&self) -> Box<dyn Iterator<Item = Result<DeviceRecord, StoreError>> + '_>;
    /// Every secret version of every device, by serial then version.
    fn secrets(&self) -> Box<dyn Iterator<Item = Result<SecretRecord, StoreError>> + '_>;
    /// Every entry of one index, read as iterated.
    fn index(&self, index: Index) -> Box<dyn Iterator<Item = Result<IndexEntry, StoreError>> + '_>;
    /// Every audit entry, in order.
    fn audit(&self) -> Box<dyn Iterator<Item = Result<AuditEntry, StoreError>> + '_>;
    /// Every record of every table as (table, key, value), in a stable order: for consistency
    /// checks and for proving that a refused request changed nothing.
    fn raw_records(&self) -> Result<Vec<RawRecord>, StoreError>;
    /// Bytes the store occupies on disk.
    fn size_on_disk(&self) -> Result<u64, StoreError>;
}

/// Fixtures for the store's and the group commit's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    use super::NewEnrollment;
    use crate::records::LineRecord;

    /// Line `line-1` for serials 1-100, active, with `quota`.
    pub(crate) fn line(quota: u64) -> LineRecord {
        LineRecord {
            id: "line-1".into(),
            public_key: vec![1; 44],
            first_serial: 1,
            last_serial: 100,
            quota,
            rate: 0,
            enrolled: 0,
            active: true,
            created_at: 1,
        }
    }

    /// An enrollment of `serial` on `line-1` with a key made of byte `key` and a token id made of
    /// byte `cti`.
    pub(crate) fn enrollment(serial: u64, key: u8, cti: u8) -> NewEnrollment {
        let spki = vec![key; 44];
        NewEnrollment {
            serial,
            key_hash: protocol_spec::spki::sha256(&spki),
            spki,
            certificate: vec![serial as u8; 300],
            line: "line-1".into(),
            token_id: vec![cti; 16],
            at: 1_000 + serial,
        }
    }
}
