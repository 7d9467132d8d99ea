//! The store: the only shared state of the CA. The trait is what the CA needs, nothing more;
//! [`SledStore`] is the embedded default.

mod sled_store;

pub use sled_store::{SledStore, sled_config};

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

use protocol_spec::Problem;

use crate::records::{AuditEntry, DeviceRecord, LineRecord, PoolEntry, ResetRecord, SecretRecord};

/// One stored record: (table, key, value).
pub type RawRecord = (String, Vec<u8>, Vec<u8>);
/// One audit entry as stored: (key, value), undecoded, for verification.
pub type RawAudit = (Vec<u8>, Vec<u8>);

/// A store failure (I/O, corruption). Never shown to clients beyond `internal`.
#[derive(Debug, thiserror::Error)]
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
    /// Asked to change something that does not exist, or refused by a rule.
    #[error("{0}")]
    Refused(String),
}

/// A certificate ready to be bound: everything the enrollment transaction writes.
#[derive(Debug, Clone)]
pub struct NewEnrollment {
    /// Device serial.
    pub serial: u64,
    /// DER SPKI.
    pub spki: Vec<u8>,
    /// SHA-256 of `spki`.
    pub key_hash: [u8; 32],
    /// The issued certificate.
    pub certificate: Vec<u8>,
    /// Line id.
    pub line: String,
    /// Token id consumed.
    pub token_id: Vec<u8>,
    /// Unix seconds.
    pub at: u64,
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

/// What applying an enrollment did.
#[derive(Debug, Clone)]
pub enum EnrollOutcome {
    /// A new binding was recorded.
    Created(DeviceRecord),
    /// (serial, key) was already bound: the stored record, unchanged.
    Existing(DeviceRecord),
    /// A rule refused it; nothing was written.
    Refused(Problem),
}

/// What a reset did.
#[derive(Debug, Clone)]
pub enum ResetOutcome {
    /// Reset: the record as it was.
    Reset(DeviceRecord),
    /// No device with that serial.
    Missing,
    /// The device is revoked: nothing changed.
    Revoked,
}

/// A write to the secrets tables.
#[derive(Debug, Clone)]
pub enum SecretOp {
    /// Give a device with no secret its version 1 (generated, or `from_pool`), delivered now.
    Allocate {
        /// The sealed new version (1, or the next after a reset's retired versions).
        record: SecretRecord,
        /// The pool entry it came from, removed in the same transaction.
        from_pool: Option<String>,
        /// SHA-256 of the SPKI the device authenticated with: the record must still hold it.
        binding: [u8; 32],
    },
    /// Add version n+1 (pending) to a device whose newest version is n.
    Rotate {
        /// The sealed new version.
        record: SecretRecord,
        /// Who asked.
        actor: String,
    },
    /// Mark a version delivered (first delivery only).
    Delivered {
        /// Device.
        serial: u64,
        /// Version.
        version: u64,
        /// Unix seconds.
        at: u64,
        /// SHA-256 of the SPKI the device authenticated with.
        binding: [u8; 32],
    },
    /// The device confirms what it stored.
    Ack {
        /// Device.
        serial: u64,
        /// Key id acknowledged.
        key_id: String,
        /// Version acknowledged.
        version: u64,
        /// KCV the device computed.
        kcv: Vec<u8>,
        /// Unix seconds.
        at: u64,
        /// SHA-256 of the SPKI the device authenticated with.
        binding: [u8; 32],
    },
    /// Add a batch of pre-generated keys to the pool: all of it or nothing.
    Import {
        /// Sealed entries.
        entries: Vec<PoolEntry>,
        /// Unix seconds.
        at: u64,
        /// Who imported.
        actor: String,
    },
}

/// What a secrets write did.
#[derive(Debug, Clone)]
pub enum SecretOutcome {
    /// Written; the affected record.
    Done(Option<SecretRecord>),
    /// Already so (a second delivery or acknowledgement); nothing written.
    Unchanged(SecretRecord),
    /// The device already had a version (Allocate); its newest, unchanged.
    Existing(SecretRecord),
    /// The state moved under the caller (a pool entry taken, a version added): read again.
    Conflict,
    /// Refused by a rule; nothing written.
    Refused(Problem),
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
    fn apply_enrollment(&self, e: &NewEnrollment) -> Result<EnrollOutcome, StoreError>;
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
    fn apply_secret(&self, op: &SecretOp) -> Result<SecretOutcome, StoreError>;
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
