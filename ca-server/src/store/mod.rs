//! The store: the only shared state of the CA. The trait is what the CA needs, nothing more;
//! [`SledStore`] is the embedded default.

pub mod copy;
pub mod postgres;
mod sled;

pub use postgres::{PgConfig, PgStore};
pub use sled::{SledStore, sled_config};

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
    let config = dir.load_config()?;
    let keys = crate::issuer::load_secret_keys(dir, &config)?;
    open_sealing(dir, s, keys.audit_key())
}

/// [`open`], with the audit key already at hand (the server's, loaded with the other keys
/// derived from the key-encryption key): every audit entry the store writes is sealed with it.
pub fn open_sealing(
    dir: &crate::config::CaDir,
    s: &crate::config::StoreSettings,
    key: crate::audit::AuditKey,
) -> Result<std::sync::Arc<dyn Store>, String> {
    let store = open_unsealed(dir, s)?;
    store.set_audit_key(key);
    Ok(store)
}

fn open_unsealed(
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
    EnrollOutcome, LineChange, NewEnrollment, Refusal, ResetOutcome, SecretOp, SecretOutcome,
};
use crate::records::{
    AuditEntry, BdkRecord, DeviceRecord, LineRecord, OperatorRevocation, PoolEntry, ResetRecord,
    RevokedCert, SecretRecord,
};

/// What the enrollment fast path reads before it spends a signature ([`Store::binding_of`]).
#[derive(Debug, Clone, Default)]
pub struct BindingRead {
    /// The record of the serial.
    pub device: Option<DeviceRecord>,
    /// When there is no record: the serial that holds the key, if any.
    pub key_holder: Option<u64>,
    /// When there is no record: how many times the serial was reset, the generation a new
    /// binding's certificate carries.
    pub resets: u64,
}

/// What a secret fetch reads first ([`Store::fetch_read`]).
#[derive(Debug, Clone, Default)]
pub struct FetchRead {
    /// Every secret version of the device, oldest first.
    pub versions: Vec<SecretRecord>,
    /// The device's record, read after the versions: a reset committed since they were read
    /// shows here.
    pub device: Option<DeviceRecord>,
    /// The pool's first entries.
    pub pool: Vec<PoolEntry>,
}

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
    /// A DUKPT Base Derivation Key with this id is already stored.
    #[error("BDK {0} already exists: a BDK id names one key for ever")]
    BdkExists(String),
    /// The database cannot be reached (or lost its connection mid-write, which it rolled back):
    /// nothing was written; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Two writers met on the same record (a unique violation, a serialization failure or a
    /// deadlock) and this write was rolled back; read again and retry.
    #[error("store conflict: {0}")]
    Conflict(String),
    /// The write was sent, but whether it was made is not known: the connection was lost while
    /// it committed, or the database committed it locally without the synchronous standby's
    /// confirmation (a cancelled wait for replication). Nothing may be reported as done; a
    /// retry reads what was made and gets the same answer.
    #[error("store outcome unknown: {0}")]
    Unknown(String),
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
    /// A revoked operator.
    Operator(OperatorRevocation),
    /// A DUKPT Base Derivation Key, sealed as stored, with its allocation counter.
    Bdk {
        /// The sealed BDK.
        record: BdkRecord,
        /// The next derivation id it gives out.
        next: u64,
    },
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
    /// What the service's fast path reads before it spends a signature: the record of
    /// `serial` and, when there is none, which serial holds the key with this SPKI hash and
    /// how many times the serial was reset. A store whose reads are round trips answers all
    /// in one.
    fn binding_of(&self, serial: u64, key_hash: &[u8; 32]) -> Result<BindingRead, StoreError> {
        match self.device(serial)? {
            Some(rec) => Ok(BindingRead {
                device: Some(rec),
                ..BindingRead::default()
            }),
            None => Ok(BindingRead {
                device: None,
                key_holder: self.serial_for_key(key_hash)?,
                resets: self.resets(serial)?,
            }),
        }
    }
    /// What a secret fetch reads before it decides: the device's secret versions, then its
    /// record (in that order, so that a reset committed after the versions were read shows in
    /// the record the door checks), and the pool's first `pool_spread` entries. A store whose
    /// reads are round trips sends all three in one flight.
    fn fetch_read(&self, serial: u64, pool_spread: usize) -> Result<FetchRead, StoreError> {
        let versions = self.secret_versions(serial)?;
        let device = self.device(serial)?;
        let pool = self.pool(0, pool_spread)?;
        Ok(FetchRead {
            versions,
            device,
            pool,
        })
    }
    /// How many times `serial` was reset (its earlier bindings in the history).
    fn resets(&self, serial: u64) -> Result<u64, StoreError> {
        Ok(self.history(serial)?.len() as u64)
    }
    /// A registered line.
    fn line(&self, id: &str) -> Result<Option<LineRecord>, StoreError>;
    /// All registered lines.
    fn lines(&self) -> Result<Vec<LineRecord>, StoreError>;
    /// Stores a sealed DUKPT Base Derivation Key (refuses an existing id), with its audit
    /// entry; durable on return.
    fn add_bdk(&self, bdk: &BdkRecord, actor: &str) -> Result<(), StoreError>;
    /// Every stored Base Derivation Key (sealed), in id order.
    fn bdks(&self) -> Result<Vec<BdkRecord>, StoreError>;
    /// The next derivation id a BDK gives out (0 for a BDK that gave none); the allocation
    /// that takes it moves it on in its own transaction ([`SecretWrite::DukptNext`]).
    ///
    /// [`SecretWrite::DukptNext`]: crate::ra::rules::SecretWrite::DukptNext
    fn dukpt_next(&self, bdk_id: &str) -> Result<u64, StoreError>;
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
    /// Every certificate the CRL lists (SPEC.md 10.1): the current certificate of each revoked
    /// device, and the certificate of every binding a reset superseded.
    fn revoked(&self) -> Result<Vec<RevokedCert>, StoreError>;
    /// Revokes an operator by name, with an audit entry `operator-revoke` when it is new
    /// (durable at the next sync). Returns the revocation as stored: the first one when the
    /// operator was already revoked.
    fn revoke_operator(
        &self,
        name: &str,
        at: u64,
        actor: &str,
    ) -> Result<OperatorRevocation, StoreError>;
    /// The revocation of the operator `name`, if revoked.
    fn operator_revocation(&self, name: &str) -> Result<Option<OperatorRevocation>, StoreError>;
    /// Every revoked operator, by name.
    fn operator_revocations(&self) -> Result<Vec<OperatorRevocation>, StoreError>;
    /// Enables or disables a line or sets its rate, with an audit entry when it changes;
    /// `None` if unknown.
    fn change_line(
        &self,
        id: &str,
        change: LineChange,
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
    /// Seals every audit entry this store writes from now on with `key` (SPEC.md 11.9); the
    /// first key set stays. Without one, entries are written unsealed.
    fn set_audit_key(&self, key: crate::audit::AuditKey);
    /// The newest audit entry, if any.
    fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError>;
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
    /// Whether other processes may write to this store while this one runs (several CA
    /// nodes on one database): a node then reads the fleet-wide state (revocations, lines)
    /// again every `[store] refresh_ms`.
    fn shared(&self) -> bool {
        false
    }
    /// Says that the serving process `instance` (a random id drawn when it started) of node
    /// `node` is alive, and returns how many instances were seen within the last `window`,
    /// itself included: the nodes that share each line's rate limit. A store only one process
    /// writes answers 1.
    fn heartbeat(
        &self,
        _instance: &str,
        _node: &str,
        _window: std::time::Duration,
    ) -> Result<u32, StoreError> {
        Ok(1)
    }
    /// The number of the next CRL (RFC 5280 5.2.3): greater than every number this store gave
    /// before, to any CA node, and at least `at_least`; durable before it returns.
    fn next_crl_number(&self, at_least: u64) -> Result<u64, StoreError>;
    /// Says that `instance` stops serving, so that the other nodes take up its share at once.
    fn leave(&self, _instance: &str) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Fixtures for the store's and the group commit's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::{
        EnrollOutcome, Index, IndexEntry, NewEnrollment, SecretOp, SecretOutcome, Store,
        StoreError, Write, Written,
    };
    use crate::records::{LineRecord, SecretRecord};

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
            secret_source: Default::default(),
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
            generation: 0,
            line: "line-1".into(),
            token_id: vec![cti; 16],
            at: 1_000 + serial,
        }
    }

    pub(crate) fn enroll_all(
        store: &dyn Store,
        batch: &[NewEnrollment],
    ) -> Result<Vec<EnrollOutcome>, StoreError> {
        let writes: Vec<Write> = batch.iter().cloned().map(Write::Enroll).collect();
        Ok(store
            .apply_writes(&writes)?
            .into_iter()
            .filter_map(|w| match w {
                Written::Enroll(o) => Some(o),
                Written::Secret(_) => None,
            })
            .collect())
    }

    pub(crate) fn kind(o: &EnrollOutcome) -> String {
        match o {
            EnrollOutcome::Created(r) => format!("created {}", r.serial),
            EnrollOutcome::Existing(r) => format!("existing {}", r.serial),
            EnrollOutcome::Refused(r) => r.problem().kind.to_string(),
        }
    }

    /// A batch of enrollments sees its own writes (serial, key, token, quota) and chains its
    /// audit entries.
    /// CRL numbers only grow (RFC 5280 5.2.3), whatever floor the caller gives.
    pub(crate) fn crl_numbers_only_grow(store: &dyn Store) {
        assert_eq!(store.next_crl_number(0).unwrap(), 1);
        assert_eq!(store.next_crl_number(0).unwrap(), 2);
        assert_eq!(
            store.next_crl_number(1_700_000_000).unwrap(),
            1_700_000_000,
            "the floor (the signing time) when it is higher"
        );
        assert_eq!(
            store.next_crl_number(5).unwrap(),
            1_700_000_001,
            "one more than the last when the floor is lower"
        );
    }

    pub(crate) fn batch_sees_its_own_writes(store: &dyn Store) {
        store.add_line(&line(4), "operator:test").unwrap();
        let batch = [
            enrollment(1, 0xa1, 1),
            enrollment(1, 0xa2, 2), // the serial was taken earlier in this batch
            enrollment(2, 0xa1, 3), // the key was bound earlier in this batch
            enrollment(1, 0xa1, 4), // a retry: the stored record
            enrollment(3, 0xa3, 1), // the token was used earlier in this batch
            enrollment(4, 0xa4, 5),
            enrollment(5, 0xa5, 6),
            enrollment(6, 0xa6, 7),
            enrollment(7, 0xa7, 8), // the line's quota of 4 is used up
        ];
        let outcomes: Vec<String> = enroll_all(store, &batch)
            .unwrap()
            .iter()
            .map(kind)
            .collect();
        assert_eq!(
            outcomes,
            [
                "created 1",
                "serial-taken",
                "duplicate-key",
                "existing 1",
                "token-replayed",
                "created 4",
                "created 5",
                "created 6",
                "quota-exhausted"
            ]
        );
        assert_eq!(store.line("line-1").unwrap().unwrap().enrolled, 4);
        // One enrollment after the batch continues the chain the batch left.
        let single = store.apply_enrollment(&enrollment(8, 0xa8, 9)).unwrap();
        assert_eq!(kind(&single), "quota-exhausted");
        store.sync().unwrap();
        let verdict = crate::audit::verify(store.audit_raw(0), None, None, None).unwrap();
        assert_eq!(verdict.first_bad, None);
        assert_eq!(verdict.entries, 5, "line-add and four enrollments");
        let events: Vec<(String, Option<u64>)> = store
            .audit()
            .map(|e| e.map(|e| (e.event, e.serial)))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            events,
            [
                ("line-add".to_string(), None),
                ("enroll".to_string(), Some(1)),
                ("enroll".to_string(), Some(4)),
                ("enroll".to_string(), Some(5)),
                ("enroll".to_string(), Some(6)),
            ]
        );
    }

    /// Enrollments and secrets writes share one batch, in order.
    pub(crate) fn enrollments_and_secrets_share_a_batch(store: &dyn Store) {
        store.add_line(&line(100), "operator:test").unwrap();
        let keys = crate::secrets::SecretKeys::new(&[7u8; 32]).unwrap();
        let secret = keys.generate().unwrap();
        let mut record = keys
            .seal_version(
                1,
                1,
                keys.new_key_id().unwrap(),
                secret.as_ref(),
                "csprng",
                2_000,
            )
            .unwrap();
        record.delivered_at = Some(2_000);
        let e = enrollment(1, 0xc1, 1);
        let binding = e.key_hash;
        let writes = [
            // Before the enrollment in the same batch: no such device yet.
            Write::Secret(SecretOp::Allocate {
                record: record.clone(),
                from_pool: None,
                binding,
            }),
            Write::Enroll(e),
            Write::Secret(SecretOp::Allocate {
                record: record.clone(),
                from_pool: None,
                binding,
            }),
            Write::Secret(SecretOp::Ack {
                serial: 1,
                key_id: record.key_id.clone(),
                version: 1,
                kcv: record.kcv.clone(),
                at: 2_001,
                binding,
                certificate: None,
            }),
            // The same ack again: confirmed already, no second entry.
            Write::Secret(SecretOp::Ack {
                serial: 1,
                key_id: record.key_id.clone(),
                version: 1,
                kcv: record.kcv.clone(),
                at: 2_003,
                binding,
                certificate: None,
            }),
            // A binding the device does not hold.
            Write::Secret(SecretOp::Ack {
                serial: 1,
                key_id: record.key_id.clone(),
                version: 1,
                kcv: record.kcv.clone(),
                at: 2_002,
                binding: [9; 32],
                certificate: None,
            }),
        ];
        let outcomes: Vec<String> = store
            .apply_writes(&writes)
            .unwrap()
            .iter()
            .map(|w| match w {
                Written::Enroll(o) => kind(o),
                Written::Secret(SecretOutcome::Refused(r)) => r.problem().kind.to_string(),
                Written::Secret(SecretOutcome::Done(Some(r))) => {
                    format!("done {} confirmed {:?}", r.version, r.confirmed_at)
                }
                Written::Secret(SecretOutcome::Unchanged(r)) => {
                    format!("unchanged {} confirmed {:?}", r.version, r.confirmed_at)
                }
                Written::Secret(o) => format!("{o:?}"),
            })
            .collect();
        assert_eq!(
            outcomes,
            [
                "unknown-device",
                "created 1",
                "done 1 confirmed None",
                "done 1 confirmed Some(2001)",
                "unchanged 1 confirmed Some(2001)",
                "unknown-device"
            ]
        );
        let versions = store.secret_versions(1).unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].confirmed_at, Some(2_001));
        let events: Vec<String> = store.audit().map(|e| e.unwrap().event).collect();
        assert_eq!(
            events,
            ["line-add", "enroll", "secret-deliver", "secret-ack"]
        );
        let verdict = crate::audit::verify(store.audit_raw(0), None, None, None).unwrap();
        assert_eq!((verdict.entries, verdict.first_bad), (4, None));
    }

    /// An import and an allocation from the pool entry it brought, in one batch: the key goes
    /// to the device once, the pool is empty after, and a second allocation of the same entry
    /// in the batch is refused.
    pub(crate) fn pool_key_imported_and_given_out_in_one_batch(store: &dyn Store) {
        store.add_line(&line(100), "operator:test").unwrap();
        let e = enrollment(1, 0xd1, 1);
        let binding = e.key_hash;
        assert!(matches!(
            store.apply_enrollment(&e).unwrap(),
            EnrollOutcome::Created(_)
        ));
        let keys = crate::secrets::SecretKeys::new(&[7u8; 32]).unwrap();
        let pooled = keys.seal_pool("pool-1".into(), &[42u8; 32], 1_500).unwrap();
        let secret = keys.open_pool(&pooled).unwrap();
        let mut record = keys
            .seal_version(1, 1, "pool-1".into(), secret.as_ref(), "import", 2_000)
            .unwrap();
        record.delivered_at = Some(2_000);
        let allocate = |record: SecretRecord| {
            Write::Secret(SecretOp::Allocate {
                record,
                from_pool: Some("pool-1".into()),
                binding,
            })
        };
        let writes = [
            Write::Secret(SecretOp::Import {
                entries: vec![pooled.clone()],
                at: 1_500,
                actor: "operator:test".into(),
            }),
            allocate(record.clone()),
            allocate(record),
        ];
        let outcomes: Vec<String> = store
            .apply_writes(&writes)
            .unwrap()
            .iter()
            .map(|w| match w {
                Written::Secret(SecretOutcome::Done(Some(r))) => format!("done {}", r.version),
                Written::Secret(SecretOutcome::Done(None)) => "imported".into(),
                Written::Secret(SecretOutcome::Existing(r)) => format!("existing {}", r.version),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(outcomes, ["imported", "done 1", "existing 1"]);
        assert!(store.pool(0, 10).unwrap().is_empty(), "the entry was taken");
        let versions = store.secret_versions(1).unwrap();
        assert_eq!(versions.len(), 1);
        assert_eq!(versions[0].key_id, "pool-1");
        let holders: Vec<IndexEntry> = store
            .index(Index::KeyIds)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(holders.len(), 1);
        assert_eq!(holders[0].holder, Some((1, 1)));
        let verdict = crate::audit::verify(store.audit_raw(0), None, None, None).unwrap();
        assert_eq!(verdict.first_bad, None);
    }

    /// A secret fetch's first read gives what the single reads give: the versions, the
    /// record, and the pool's first entries, in order and at most as many as asked.
    pub(crate) fn fetch_read_gives_what_the_single_reads_give(store: &dyn Store) {
        store.add_line(&line(100), "operator:test").unwrap();
        let keys = crate::secrets::SecretKeys::new(&[7u8; 32]).unwrap();
        let empty = store.fetch_read(1, 4).unwrap();
        assert!(empty.device.is_none() && empty.versions.is_empty() && empty.pool.is_empty());
        let e = enrollment(1, 0xe1, 1);
        let binding = e.key_hash;
        let secret = keys.generate().unwrap();
        let mut record = keys
            .seal_version(1, 1, "v-1".into(), secret.as_ref(), "csprng", 2_000)
            .unwrap();
        record.delivered_at = Some(2_000);
        let pooled: Vec<_> = (0..6)
            .map(|k| {
                keys.seal_pool(format!("pool-{k}"), &[k; 32], 1_500)
                    .unwrap()
            })
            .collect();
        store
            .apply_writes(&[
                Write::Enroll(e),
                Write::Secret(SecretOp::Allocate {
                    record,
                    from_pool: None,
                    binding,
                }),
                Write::Secret(SecretOp::Import {
                    entries: pooled,
                    at: 1_500,
                    actor: "operator:test".into(),
                }),
            ])
            .unwrap();
        let read = store.fetch_read(1, 4).unwrap();
        let device = store.device(1).unwrap().unwrap();
        assert_eq!(
            read.device.as_ref().map(|d| &d.certificate),
            Some(&device.certificate)
        );
        let key_ids = |v: &[SecretRecord]| v.iter().map(|r| r.key_id.clone()).collect::<Vec<_>>();
        assert_eq!(
            key_ids(&read.versions),
            key_ids(&store.secret_versions(1).unwrap())
        );
        assert_eq!(key_ids(&read.versions), ["v-1"]);
        let pool_ids = |p: &[crate::records::PoolEntry]| {
            p.iter().map(|e| e.key_id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(pool_ids(&read.pool), pool_ids(&store.pool(0, 4).unwrap()));
        assert_eq!(
            pool_ids(&read.pool),
            ["pool-0", "pool-1", "pool-2", "pool-3"]
        );
        let other = store.fetch_read(2, 4).unwrap();
        assert!(other.device.is_none() && other.versions.is_empty());
        assert_eq!(other.pool.len(), 4);
    }
}
