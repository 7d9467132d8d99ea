//! The embedded store on sled: one tree per entity, one multi-tree transaction per enrollment.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::{RawAudit, RawRecord, Store, StoreError, Write, Written};
use crate::audit::AuditKey;
use crate::ra::rules::{
    self, AuditEvent, EnrollOutcome, EnrollView, Holder, NewEnrollment, ResetOutcome, SecretOp,
    SecretOutcome, SecretView, SecretWrite,
};
use crate::records::{
    AuditEntry, BdkRecord, DeviceRecord, DeviceStatus, LineRecord, OperatorRevocation, PoolEntry,
    ResetRecord, RevokedCert, SecretRecord, TokenUse, from_cbor, generation_of, to_cbor,
};

mod raw;

const DEVICES: &str = "devices";
const KEYS: &str = "keys";
const TOKENS: &str = "tokens";
const LINES: &str = "lines";
const AUDIT: &str = "audit";
const SECRETS: &str = "secrets";
const SECRET_HEAD: &str = "secret_head";
/// Acknowledgements: (serial, version) -> Unix seconds, 8 octets. An ack is a small entry of its
/// own instead of a rewrite of the sealed version, whose old copy would stay in the log as garbage.
const SECRET_ACKS: &str = "secret_acks";
const SECRET_INDEX: &str = "secret_index";
const KEY_IDS: &str = "key_ids";
const POOL: &str = "secret_pool";
const REVOKED: &str = "revoked";
const HISTORY: &str = "history";
/// Revoked operators: name -> [`OperatorRevocation`].
const OPERATORS: &str = "operators";
/// DUKPT Base Derivation Keys, sealed: BDK id -> [`BdkRecord`].
const BDKS: &str = "dukpt_bdks";
/// Each BDK's allocation counter: BDK id -> the next derivation id, 8 octets big-endian
/// (absent: 0). Moved on in the transaction of the version that takes an id.
const DUKPT_NEXT: &str = "dukpt_next";
const POOL_MARK: &[u8] = b"pool";

/// sled-backed [`Store`].
/// Key of the last CRL number, in sled's default tree.
const CRL_NUMBER: &[u8] = b"crl_number";

/// The sled store.
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    devices: sled::Tree,
    keys: sled::Tree,
    tokens: sled::Tree,
    lines: sled::Tree,
    audit: sled::Tree,
    secrets: sled::Tree,
    secret_head: sled::Tree,
    secret_acks: sled::Tree,
    secret_index: sled::Tree,
    key_ids: sled::Tree,
    pool: sled::Tree,
    revoked: sled::Tree,
    history: sled::Tree,
    operators: sled::Tree,
    bdks: sled::Tree,
    dukpt_next: sled::Tree,
    /// sled's data file, opened again so that `sync` can fdatasync it: sled's own flush uses
    /// sync_file_range on Linux, which neither flushes the drive cache nor orders metadata.
    data_file: File,
    /// (last seq, last hash) of the audit chain; held while a write computes the next entry.
    audit_head: Mutex<(u64, [u8; 32])>,
    /// The key that seals each audit entry written ([`Store::set_audit_key`]); none: entries
    /// are written unsealed (a store opened without its CA folder, as unit tests do).
    audit_key: std::sync::OnceLock<AuditKey>,
}

impl std::fmt::Debug for SledStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SledStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn corrupt(tree: &'static str) -> impl Fn(String) -> StoreError {
    move |reason| StoreError::Corrupt { tree, reason }
}

/// The token index key: line id, a zero byte, then the cti (token ids are unique per line).
use super::token_index_key as token_key;

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

/// The trees an enrollment writes, inside a transaction: devices, keys, tokens, lines, audit.
type EnrollTrees<'a> = (
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
);

/// The trees a secrets write uses, inside a transaction: devices, secrets, secret_head,
/// secret_acks, secret_index, key_ids, pool, audit.
type SecretTrees<'a> = (
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
    &'a TransactionalTree,
);

fn abort<T>(e: StoreError) -> TxResult<T> {
    Err(ConflictableTransactionError::Abort(e))
}

fn tx_get<T: for<'de> serde::Deserialize<'de>>(
    tree: &TransactionalTree,
    key: &[u8],
    name: &'static str,
) -> TxResult<Option<T>> {
    match tree.get(key)? {
        None => Ok(None),
        Some(v) => match from_cbor(&v) {
            Ok(r) => Ok(Some(r)),
            Err(e) => abort(StoreError::Corrupt {
                tree: name,
                reason: e,
            }),
        },
    }
}

fn flatten<T>(r: Result<T, TransactionError<StoreError>>) -> Result<T, StoreError> {
    match r {
        Ok(v) => Ok(v),
        Err(TransactionError::Abort(e)) => Err(e),
        Err(TransactionError::Storage(e)) => Err(backend(e)),
    }
}

/// Segment size (and I/O buffer size) of a new store. sled cleans a segment once at most half of
/// it is live; larger segments left much less garbage per device (with compression, 100,000
/// devices: 512 KiB, sled's default, 3.6 kB per device; 2 MiB 2.6 kB; 8 MiB 2.0 kB), but with
/// compression the store also opens more slowly (2,000 devices: 0.07 s, 0.12 s, 0.78 s; 4 MiB
/// 0.34 s), which a restart after a crash waits for. Figures: BENCHMARKS.md, "Store size".
const SEGMENT_SIZE: usize = 4 * 1024 * 1024;

/// zstd level of a new store's pages (sled's `compression` feature).
const COMPRESSION_LEVEL: i32 = 3;

/// Page cache size: the most of the CA's memory that the store itself takes. 32 MiB: with a
/// million devices the CA peaked at 457 MiB (64 MiB: 515-529 MiB, over the 512 MiB budget) and
/// ran no slower (BENCHMARKS.md, the million).
const CACHE_CAPACITY: u64 = 32 * 1024 * 1024;

/// The sled configuration of the store in `path`. A new store gets compressed pages in
/// [`SEGMENT_SIZE`] segments; an existing one keeps the segment size and compression it was
/// created with (sled refuses to open a store with others; its `conf` file records them).
pub fn sled_config(path: &Path) -> sled::Config {
    let (segment_size, compression) = persisted_parameters(path).unwrap_or((SEGMENT_SIZE, true));
    sled::Config::new()
        .path(path)
        .cache_capacity(CACHE_CAPACITY)
        .mode(sled::Mode::LowSpace)
        .segment_size(segment_size)
        .use_compression(compression)
        .compression_factor(COMPRESSION_LEVEL)
}

/// (segment size, compression) from an existing store's `conf` file: lines `name: value`,
/// then a binary checksum.
fn persisted_parameters(path: &Path) -> Option<(usize, bool)> {
    let bytes = std::fs::read(path.join("conf")).ok()?;
    let text = String::from_utf8_lossy(&bytes);
    let field = |name: &str| {
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    Some((
        field("segment_size")?.parse().ok()?,
        field("use_compression")?.parse().ok()?,
    ))
}

impl SledStore {
    /// Adds a record under `key` of `tree` (named `name`) with the audit entry `rule` gives,
    /// in one transaction; `rule` sees the record already there, if any, and refuses it.
    /// Durable on return.
    fn add_new<R>(
        &self,
        tree: &sled::Tree,
        name: &'static str,
        key: &[u8],
        record: &R,
        rule: impl Fn(Option<&R>) -> Result<AuditEvent, StoreError>,
    ) -> Result<(), StoreError>
    where
        R: serde::Serialize + for<'de> serde::Deserialize<'de>,
    {
        let mut head = self.head()?;
        let chain = *head;
        let r = (tree, &self.audit).transaction(|(tree, audit)| {
            let existing = tx_get::<R>(tree, key, name)?;
            let event = match rule(existing.as_ref()) {
                Ok(ev) => ev,
                Err(e) => return abort(e),
            };
            let entry = event.entry_after(&chain, self.audit_key.get());
            tree.insert(key, to_cbor(record))?;
            audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
            Ok(entry)
        });
        let entry = flatten(r)?;
        *head = (entry.seq, sealed_hash(&entry));
        drop(head);
        self.sync()
    }

    /// Opens (or creates) the store in `path`. sled allows one process per store; a lock still
    /// held by a store this process just dropped (sled releases it from a background thread)
    /// is waited for briefly, another process's lock is reported as [`StoreError::Locked`].
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        let db = loop {
            match Self::open_db(path) {
                Err(StoreError::Locked(_)) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other?,
            }
        };
        let tree = |n: &str| db.open_tree(n).map_err(backend);
        let audit = tree(AUDIT)?;
        let head = match audit.last().map_err(backend)? {
            None => (0, [0u8; 32]),
            Some((k, v)) => match from_cbor::<AuditEntry>(&v) {
                Ok(e) => (e.seq, e.compute_hash()),
                Err(e) => {
                    // A damaged newest entry must not keep the store (and `audit verify`) from
                    // opening; the chain stays broken at that entry, and verification names it.
                    tracing::error!(error = %e, "the newest audit entry does not decode; run `ca-server audit verify`");
                    let seq = u64_of(&k).unwrap_or(0);
                    let mut h = [0u8; 32];
                    h.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &v).as_ref());
                    (seq, h)
                }
            },
        };
        let data_file = File::open(path.join("db")).map_err(backend)?;
        // The directory entries of sled's files must survive a crash too.
        File::open(path)
            .and_then(|d| d.sync_all())
            .map_err(backend)?;
        Ok(SledStore {
            path: path.to_path_buf(),
            devices: tree(DEVICES)?,
            keys: tree(KEYS)?,
            tokens: tree(TOKENS)?,
            lines: tree(LINES)?,
            secrets: tree(SECRETS)?,
            secret_head: tree(SECRET_HEAD)?,
            secret_acks: tree(SECRET_ACKS)?,
            secret_index: tree(SECRET_INDEX)?,
            key_ids: tree(KEY_IDS)?,
            pool: tree(POOL)?,
            revoked: tree(REVOKED)?,
            history: tree(HISTORY)?,
            operators: tree(OPERATORS)?,
            bdks: tree(BDKS)?,
            dukpt_next: tree(DUKPT_NEXT)?,
            audit,
            db,
            data_file,
            audit_head: Mutex::new(head),
            audit_key: std::sync::OnceLock::new(),
        })
    }

    fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
        sled_config(path).open().map_err(|e| match e {
            sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
                StoreError::Locked(path.display().to_string())
            }
            other => backend(other),
        })
    }

    fn head(&self) -> Result<std::sync::MutexGuard<'_, (u64, [u8; 32])>, StoreError> {
        self.audit_head
            .lock()
            .map_err(|_| StoreError::Backend("audit head lock poisoned".into()))
    }

    /// One enrollment inside a transaction: reads the records it touches, asks the rule
    /// ([`rules::enroll`]) and applies its writes, with the audit entry chained after `chain`.
    fn enroll_in(
        (devices, keys, tokens, lines, audit): EnrollTrees<'_>,
        e: &NewEnrollment,
        resets: u64,
        chain: &(u64, [u8; 32]),
        key: Option<&AuditKey>,
    ) -> TxResult<(EnrollOutcome, Option<AuditEntry>)> {
        let serial_key = e.serial.to_be_bytes();
        let tkey = token_key(&e.line, &e.token_id);
        let key_holder = match keys.get(e.key_hash)? {
            None => None,
            Some(v) => match u64_of(&v) {
                Some(s) => Some(s),
                None => return abort(corrupt(KEYS)("key index value is not 8 bytes".into())),
            },
        };
        let view = EnrollView {
            device: tx_get(devices, &serial_key, DEVICES)?,
            key_holder,
            token_use: tx_get(tokens, &tkey, TOKENS)?,
            line: tx_get(lines, e.line.as_bytes(), LINES)?,
            resets,
        };
        let (outcome, writes) = rules::enroll(&view, e);
        let Some(w) = writes else {
            return Ok((outcome, None));
        };
        let entry = w.event.entry_after(chain, key);
        devices.insert(&serial_key, to_cbor(&w.device))?;
        keys.insert(&e.key_hash, &serial_key)?;
        tokens.insert(tkey.as_slice(), to_cbor(&w.token_use))?;
        lines.insert(e.line.as_bytes(), to_cbor(&w.line))?;
        audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
        Ok((outcome, Some(entry)))
    }

    /// One secrets write inside a transaction: reads the records it touches, asks the rule
    /// ([`rules::secret`]) and applies its writes, with the audit entry (when it changed
    /// something) chained after `chain`.
    fn secret_in(
        (devices, secrets, heads, acks, index, key_ids, pool, audit, dukpt_next): SecretTrees<'_>,
        op: &SecretOp,
        chain: &(u64, [u8; 32]),
        key: Option<&AuditKey>,
    ) -> TxResult<(SecretOutcome, Option<AuditEntry>)> {
        let holder = |v: Option<sled::IVec>| {
            v.map(|v| {
                if v.as_ref() == POOL_MARK {
                    Holder::Pool
                } else {
                    Holder::Version {
                        serial: v.get(..8).and_then(u64_of).unwrap_or(0),
                        version: v.get(8..).and_then(u64_of).unwrap_or(0),
                    }
                }
            })
        };
        let mut view = SecretView::default();
        if let Some(serial) = op.serial() {
            view.device = tx_get(devices, &serial.to_be_bytes(), DEVICES)?;
            if op.new_version().is_some() {
                view.head = match heads.get(serial.to_be_bytes())? {
                    None => 0,
                    Some(v) => match u64_of(&v) {
                        Some(h) => h,
                        None => return abort(corrupt(SECRET_HEAD)("head is not 8 bytes".into())),
                    },
                };
                if view.head > 0 {
                    view.newest = tx_get(secrets, &ver_key(serial, view.head), SECRETS)?;
                }
            }
            if let Some(version) = op.names_version() {
                let key = ver_key(serial, version);
                view.named = match tx_get::<SecretRecord>(secrets, &key, SECRETS)? {
                    // Stores written before acks had their own tree hold the time in the record.
                    Some(mut rec) if rec.confirmed_at.is_none() => {
                        if let Some(at) = acks.get(key.as_slice())? {
                            let Some(at) = u64_of(&at) else {
                                return abort(corrupt(SECRET_ACKS)(
                                    "ack time is not 8 bytes".into(),
                                ));
                            };
                            rec.confirmed_at = Some(at);
                        }
                        Some(rec)
                    }
                    other => other,
                };
            }
        }
        if let Some(rec) = op.new_version() {
            view.tag_holder = holder(index.get(&rec.index_tag)?);
            view.key_id_holder = holder(key_ids.get(rec.key_id.as_bytes())?);
            if let Some((bdk_id, _)) = rules::dukpt_claim(rec) {
                view.dukpt_next = match dukpt_next.get(bdk_id.as_bytes())? {
                    None => Some(0),
                    Some(v) => match u64_of(&v) {
                        Some(n) => Some(n),
                        None => return abort(corrupt(DUKPT_NEXT)("not 8 bytes".into())),
                    },
                };
            }
        }
        match op {
            SecretOp::Allocate {
                from_pool: Some(id),
                ..
            } => view.pool_entry_present = pool.get(id.as_bytes())?.is_some(),
            SecretOp::Import { entries, .. } => {
                for e in entries {
                    view.import_known.push((
                        key_ids.get(e.key_id.as_bytes())?.is_some(),
                        index.get(&e.index_tag)?.is_some(),
                    ));
                }
            }
            _ => {}
        }
        let (outcome, writes, event) = rules::secret(&view, op);
        for w in writes {
            match w {
                SecretWrite::NewVersion(rec) => {
                    let key = ver_key(rec.serial, rec.version);
                    index.insert(rec.index_tag.as_slice(), key.as_slice())?;
                    key_ids.insert(rec.key_id.as_bytes(), key.as_slice())?;
                    secrets.insert(key.as_slice(), to_cbor(&rec))?;
                    heads.insert(&rec.serial.to_be_bytes(), &rec.version.to_be_bytes())?;
                }
                SecretWrite::TakeFromPool(id) => {
                    pool.remove(id.as_bytes())?;
                }
                SecretWrite::UpdateVersion(rec) => {
                    secrets.insert(ver_key(rec.serial, rec.version), to_cbor(&rec))?;
                }
                SecretWrite::Ack {
                    serial,
                    version,
                    at,
                } => {
                    acks.insert(ver_key(serial, version), &at.to_be_bytes())?;
                }
                SecretWrite::DukptNext { bdk_id, taken } => {
                    let next = taken.saturating_add(1);
                    dukpt_next.insert(bdk_id.as_bytes(), &next.to_be_bytes())?;
                }
                SecretWrite::PoolEntry(e) => {
                    index.insert(e.index_tag.as_slice(), POOL_MARK)?;
                    key_ids.insert(e.key_id.as_bytes(), POOL_MARK)?;
                    pool.insert(e.key_id.as_bytes(), to_cbor(&e))?;
                }
            }
        }
        let entry = event.map(|ev| ev.entry_after(chain, key));
        if let Some(entry) = &entry {
            audit.insert(&entry.seq.to_be_bytes(), to_cbor(entry))?;
        }
        Ok((outcome, entry))
    }
}

/// The key of a secret version: serial, then version, big-endian.
fn ver_key(serial: u64, version: u64) -> Vec<u8> {
    let mut k = serial.to_be_bytes().to_vec();
    k.extend_from_slice(&version.to_be_bytes());
    k
}

/// The hash a sealed entry carries.
fn sealed_hash(e: &AuditEntry) -> [u8; 32] {
    <[u8; 32]>::try_from(e.hash.as_slice()).unwrap_or_else(|_| e.compute_hash())
}

fn u64_of(v: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(v).ok().map(u64::from_be_bytes)
}

impl SledStore {
    /// Overwrites a device record with bytes that do not decode (tests of damaged stores).
    #[cfg(test)]
    pub(crate) fn damage_device_record_for_test(&self, serial: u64) {
        let _ = self.devices.insert(serial.to_be_bytes(), &b"not cbor"[..]);
    }
}

impl SledStore {
    /// Every record, for a copy into another store (`ca-server store copy`), in an order that
    /// a store with foreign keys can take: lines, devices, key index, token uses, secret
    /// versions (acknowledgement times merged), pool, history, audit, revoked operators.
    /// Returns how many entries the secret index holds (one per version and pool entry in a
    /// sound store).
    pub fn export(
        &self,
        sink: &mut dyn FnMut(super::Exported) -> Result<(), StoreError>,
    ) -> Result<u64, StoreError> {
        use super::Exported;
        for b in self.bdks()? {
            let next = self.dukpt_next(&b.id)?;
            sink(Exported::Bdk { record: b, next })?;
        }
        for r in self.lines.iter() {
            let (_, v) = r.map_err(backend)?;
            sink(Exported::Line(from_cbor(&v).map_err(corrupt(LINES))?))?;
        }
        for d in self.devices() {
            sink(Exported::Device(d?))?;
        }
        for r in self.keys.iter() {
            let (k, v) = r.map_err(backend)?;
            let hash = <[u8; 32]>::try_from(k.as_ref())
                .map_err(|_| corrupt(KEYS)("key hash is not 32 bytes".into()))?;
            let serial = u64_of(&v).ok_or_else(|| corrupt(KEYS)("serial is not 8 bytes".into()))?;
            sink(Exported::Key { hash, serial })?;
        }
        for r in self.tokens.iter() {
            let (k, v) = r.map_err(backend)?;
            let zero = k
                .iter()
                .position(|b| *b == 0)
                .ok_or_else(|| corrupt(TOKENS)("token key has no separator".into()))?;
            let line = String::from_utf8(k[..zero].to_vec())
                .map_err(|_| corrupt(TOKENS)("line id is not UTF-8".into()))?;
            let used: TokenUse = from_cbor(&v).map_err(corrupt(TOKENS))?;
            sink(Exported::Token {
                line,
                token_id: k[zero + 1..].to_vec(),
                serial: used.serial,
            })?;
        }
        for r in self.secrets.iter() {
            let (k, v) = r.map_err(backend)?;
            let mut rec: SecretRecord = from_cbor(&v).map_err(corrupt(SECRETS))?;
            if rec.confirmed_at.is_none()
                && let Some(at) = self.secret_acks.get(&k).map_err(backend)?
            {
                rec.confirmed_at = Some(
                    u64_of(&at)
                        .ok_or_else(|| corrupt(SECRET_ACKS)("ack time is not 8 bytes".into()))?,
                );
            }
            sink(Exported::Version(rec))?;
        }
        for r in self.pool.iter() {
            let (_, v) = r.map_err(backend)?;
            sink(Exported::Pool(from_cbor(&v).map_err(corrupt(POOL))?))?;
        }
        for r in self.history.iter() {
            let (k, v) = r.map_err(backend)?;
            let seq = k
                .get(8..16)
                .and_then(u64_of)
                .ok_or_else(|| corrupt(HISTORY)("key is not serial and sequence".into()))?;
            sink(Exported::Reset {
                seq,
                record: from_cbor(&v).map_err(corrupt(HISTORY))?,
            })?;
        }
        for e in self.audit() {
            sink(Exported::Audit(e?))?;
        }
        for r in self.operator_revocations()? {
            sink(Exported::Operator(r))?;
        }
        Ok(self.secret_index.len() as u64)
    }

    /// The serials with a reset history.
    pub fn export_history_serials(&self) -> Result<Vec<u64>, StoreError> {
        let mut out = Vec::new();
        for r in self.history.iter() {
            let (k, _) = r.map_err(backend)?;
            if let Some(s) = k.get(..8).and_then(u64_of) {
                out.push(s);
            }
        }
        out.dedup();
        Ok(out)
    }
}

impl SledStore {
    /// A stored secret version with its acknowledgement time.
    fn secret_of(
        &self,
        r: sled::Result<(sled::IVec, sled::IVec)>,
    ) -> Result<SecretRecord, StoreError> {
        let (k, v) = r.map_err(backend)?;
        let mut rec: SecretRecord = from_cbor(&v).map_err(corrupt(SECRETS))?;
        if rec.confirmed_at.is_none()
            && let Some(at) = self.secret_acks.get(&k).map_err(backend)?
        {
            rec.confirmed_at = Some(
                u64_of(&at)
                    .ok_or_else(|| corrupt(SECRET_ACKS)("ack time is not 8 bytes".into()))?,
            );
        }
        Ok(rec)
    }
}

impl SledStore {
    /// How many times `serial` was reset: its entries in the history.
    fn reset_count(&self, serial: u64) -> Result<u64, StoreError> {
        let mut n = 0;
        for r in self.history.scan_prefix(serial.to_be_bytes()) {
            r.map_err(backend)?;
            n += 1;
        }
        Ok(n)
    }

    /// Every earlier binding of every reset serial, in serial order.
    fn all_history(&self) -> Result<Vec<ResetRecord>, StoreError> {
        self.history
            .iter()
            .map(|r| {
                let (_, v) = r.map_err(backend)?;
                from_cbor(&v).map_err(corrupt(HISTORY))
            })
            .collect()
    }
}

impl Store for SledStore {
    fn device(&self, serial: u64) -> Result<Option<DeviceRecord>, StoreError> {
        match self.devices.get(serial.to_be_bytes()).map_err(backend)? {
            None => Ok(None),
            Some(v) => from_cbor(&v).map(Some).map_err(corrupt(DEVICES)),
        }
    }

    fn serial_for_key(&self, key_hash: &[u8; 32]) -> Result<Option<u64>, StoreError> {
        match self.keys.get(key_hash).map_err(backend)? {
            None => Ok(None),
            Some(v) => <[u8; 8]>::try_from(v.as_ref())
                .map(|b| Some(u64::from_be_bytes(b)))
                .map_err(|_| corrupt(KEYS)("key index value is not 8 bytes".into())),
        }
    }

    fn line(&self, id: &str) -> Result<Option<LineRecord>, StoreError> {
        match self.lines.get(id.as_bytes()).map_err(backend)? {
            None => Ok(None),
            Some(v) => from_cbor(&v).map(Some).map_err(corrupt(LINES)),
        }
    }

    fn lines(&self) -> Result<Vec<LineRecord>, StoreError> {
        self.lines
            .iter()
            .map(|r| {
                let (_, v) = r.map_err(backend)?;
                from_cbor(&v).map_err(corrupt(LINES))
            })
            .collect()
    }

    fn add_line(&self, line: &LineRecord, actor: &str) -> Result<(), StoreError> {
        self.add_new(&self.lines, LINES, line.id.as_bytes(), line, |existing| {
            rules::add_line(existing, line, actor).map_err(StoreError::LineExists)
        })
    }

    fn add_bdk(&self, bdk: &BdkRecord, actor: &str) -> Result<(), StoreError> {
        self.add_new(&self.bdks, BDKS, bdk.id.as_bytes(), bdk, |existing| {
            rules::add_bdk(existing, bdk, actor).map_err(StoreError::BdkExists)
        })
    }

    fn bdks(&self) -> Result<Vec<BdkRecord>, StoreError> {
        self.bdks
            .iter()
            .map(|r| {
                let (_, v) = r.map_err(backend)?;
                from_cbor(&v).map_err(corrupt(BDKS))
            })
            .collect()
    }

    fn dukpt_next(&self, bdk_id: &str) -> Result<u64, StoreError> {
        match self.dukpt_next.get(bdk_id.as_bytes()).map_err(backend)? {
            None => Ok(0),
            Some(v) => u64_of(&v).ok_or_else(|| corrupt(DUKPT_NEXT)("not 8 bytes".into())),
        }
    }

    fn apply_writes(&self, writes: &[Write]) -> Result<Vec<Written>, StoreError> {
        let mut head = self.head()?;
        let start = *head;
        // Each enrolling serial's reset count, read outside the transaction (sled's
        // transactions cannot scan): every writer of the history (reset_device) holds the
        // audit head, as this batch does until it is applied, so the counts cannot change.
        let mut resets = std::collections::HashMap::new();
        for w in writes {
            if let Write::Enroll(e) = w
                && !resets.contains_key(&e.serial)
            {
                resets.insert(e.serial, self.reset_count(e.serial)?);
            }
        }
        let trees = (
            &self.devices,
            &self.keys,
            &self.tokens,
            &self.lines,
            &self.audit,
            &self.secrets,
            &self.secret_head,
            &self.secret_acks,
            &self.secret_index,
            &self.key_ids,
            &self.pool,
            &self.dukpt_next,
        );
        let r = trees.transaction(
            |(
                devices,
                keys,
                tokens,
                lines,
                audit,
                secrets,
                heads,
                acks,
                index,
                key_ids,
                pool,
                dukpt_next,
            )| {
                // sled may run this closure again after a conflict: start from the head as it
                // was, chaining each write's entry to the one before it.
                let mut chain = start;
                let mut outcomes = Vec::with_capacity(writes.len());
                for w in writes {
                    let entry = match w {
                        Write::Enroll(e) => {
                            let trees = (devices, keys, tokens, lines, audit);
                            let n = resets.get(&e.serial).copied().unwrap_or(0);
                            let (outcome, entry) =
                                Self::enroll_in(trees, e, n, &chain, self.audit_key.get())?;
                            outcomes.push(Written::Enroll(outcome));
                            entry
                        }
                        Write::Secret(op) => {
                            let trees = (
                                devices, secrets, heads, acks, index, key_ids, pool, audit,
                                dukpt_next,
                            );
                            let (outcome, entry) =
                                Self::secret_in(trees, op, &chain, self.audit_key.get())?;
                            outcomes.push(Written::Secret(outcome));
                            entry
                        }
                    };
                    if let Some(entry) = entry {
                        chain = (entry.seq, sealed_hash(&entry));
                    }
                }
                Ok((outcomes, chain))
            },
        );
        let (outcomes, chain) = flatten(r)?;
        *head = chain;
        Ok(outcomes)
    }

    fn secret_versions(&self, serial: u64) -> Result<Vec<SecretRecord>, StoreError> {
        self.secrets
            .scan_prefix(serial.to_be_bytes())
            .map(|r| self.secret_of(r))
            .collect()
    }

    fn secrets(&self) -> Box<dyn Iterator<Item = Result<SecretRecord, StoreError>> + '_> {
        Box::new(self.secrets.iter().map(|r| self.secret_of(r)))
    }

    fn index(
        &self,
        index: super::Index,
    ) -> Box<dyn Iterator<Item = Result<super::IndexEntry, StoreError>> + '_> {
        use super::{Index, IndexEntry};
        let (tree, name) = match index {
            Index::Keys => (&self.keys, KEYS),
            Index::Tokens => (&self.tokens, TOKENS),
            Index::SecretTags => (&self.secret_index, SECRET_INDEX),
            Index::KeyIds => (&self.key_ids, KEY_IDS),
        };
        Box::new(tree.iter().map(move |r| {
            let (k, v) = r.map_err(backend)?;
            let holder = match index {
                Index::Keys => Some((
                    u64_of(&v).ok_or_else(|| corrupt(name)("serial is not 8 bytes".into()))?,
                    0,
                )),
                Index::Tokens => {
                    let t: TokenUse = from_cbor(&v).map_err(corrupt(name))?;
                    Some((t.serial, 0))
                }
                Index::SecretTags | Index::KeyIds if v.as_ref() == POOL_MARK => None,
                Index::SecretTags | Index::KeyIds => {
                    let (s, ver) = v
                        .split_at_checked(8)
                        .ok_or_else(|| corrupt(name)("version key is not 16 bytes".into()))?;
                    match (u64_of(s), u64_of(ver)) {
                        (Some(s), Some(ver)) => Some((s, ver)),
                        _ => return Err(corrupt(name)("version key is not 16 bytes".into())),
                    }
                }
            };
            Ok(IndexEntry {
                key: k.to_vec(),
                holder,
            })
        }))
    }

    fn pool(&self, skip: usize, n: usize) -> Result<Vec<PoolEntry>, StoreError> {
        self.pool
            .iter()
            .skip(skip)
            .take(n)
            .map(|r| {
                let (_, v) = r.map_err(backend)?;
                from_cbor(&v).map_err(corrupt(POOL))
            })
            .collect()
    }

    fn set_status(
        &self,
        serial: u64,
        status: DeviceStatus,
        at: u64,
        actor: &str,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        let mut head = self.head()?;
        let chain = *head;
        let r =
            (&self.devices, &self.revoked, &self.audit).transaction(|(devices, revoked, audit)| {
                let key = serial.to_be_bytes();
                let rec = tx_get::<DeviceRecord>(devices, &key, DEVICES)?;
                let Some((rec, event)) = rules::set_status(rec.as_ref(), status, at, actor) else {
                    return Ok((None, None));
                };
                let Some(event) = event else {
                    return Ok((Some(rec), None));
                };
                let entry = event.entry_after(&chain, self.audit_key.get());
                devices.insert(&key, to_cbor(&rec))?;
                match status {
                    DeviceStatus::Revoked => revoked.insert(&key, &at.to_be_bytes())?,
                    DeviceStatus::Active => revoked.remove(&key)?,
                };
                audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
                Ok((Some(rec), Some(entry)))
            });
        let (rec, entry) = flatten(r)?;
        if let Some(entry) = entry {
            *head = (entry.seq, sealed_hash(&entry));
        }
        Ok(rec)
    }

    fn reset_device(&self, serial: u64, at: u64, actor: &str) -> Result<ResetOutcome, StoreError> {
        let mut head = self.head()?;
        let chain = *head;
        let trees = (
            &self.devices,
            &self.lines,
            &self.history,
            &self.secrets,
            &self.audit,
        );
        let r = trees.transaction(|(devices, lines, history, secrets, audit)| {
            let key = serial.to_be_bytes();
            let rec = tx_get::<DeviceRecord>(devices, &key, DEVICES)?;
            let line = match &rec {
                Some(r) => tx_get::<LineRecord>(lines, r.line.as_bytes(), LINES)?,
                None => None,
            };
            let mut versions = Vec::new();
            if rec.is_some() {
                let mut v = 1u64;
                while let Some(sr) = tx_get::<SecretRecord>(secrets, &ver_key(serial, v), SECRETS)?
                {
                    versions.push(sr);
                    v += 1;
                }
            }
            let (outcome, writes) = rules::reset(rec.as_ref(), line.as_ref(), &versions, at, actor);
            let Some(w) = writes else {
                return Ok((outcome, None));
            };
            let entry = w.event.entry_after(&chain, self.audit_key.get());
            devices.remove(&key)?;
            if let Some(line) = &w.line {
                lines.insert(line.id.as_bytes(), to_cbor(line))?;
            }
            let mut hkey = key.to_vec();
            hkey.extend_from_slice(&entry.seq.to_be_bytes());
            history.insert(hkey, to_cbor(&w.history))?;
            for sr in &w.retired {
                secrets.insert(ver_key(sr.serial, sr.version), to_cbor(sr))?;
            }
            audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
            Ok((outcome, Some(entry)))
        });
        let (outcome, entry) = flatten(r)?;
        if let Some(entry) = entry {
            *head = (entry.seq, sealed_hash(&entry));
        }
        Ok(outcome)
    }

    fn resets(&self, serial: u64) -> Result<u64, StoreError> {
        self.reset_count(serial)
    }

    fn history(&self, serial: u64) -> Result<Vec<ResetRecord>, StoreError> {
        self.history
            .scan_prefix(serial.to_be_bytes())
            .map(|r| {
                let (_, v) = r.map_err(backend)?;
                from_cbor(&v).map_err(corrupt(HISTORY))
            })
            .collect()
    }

    fn revoked(&self) -> Result<Vec<RevokedCert>, StoreError> {
        let mut out = Vec::new();
        for r in self.revoked.iter() {
            let (k, v) = r.map_err(backend)?;
            let (Some(serial), Some(at)) = (u64_of(&k), u64_of(&v)) else {
                return Err(corrupt(REVOKED)("entry is not two 8-byte numbers".into()));
            };
            let rec = self.device(serial)?.ok_or_else(|| {
                corrupt(REVOKED)(format!("revoked serial {serial} has no device record"))
            })?;
            out.push(RevokedCert::revoked(&rec, at));
        }
        for r in self.all_history()? {
            let old = RevokedCert::superseded(&r);
            // A binding reset before generations existed has the serial its successor
            // carries: listing it would refuse the current certificate too.
            let current = self.device(old.serial)?;
            if current.is_none_or(|d| generation_of(&d.certificate) != old.generation) {
                out.push(old);
            }
        }
        out.sort();
        Ok(out)
    }

    fn revoke_operator(
        &self,
        name: &str,
        at: u64,
        actor: &str,
    ) -> Result<OperatorRevocation, StoreError> {
        let mut head = self.head()?;
        let chain = *head;
        let r = (&self.operators, &self.audit).transaction(|(operators, audit)| {
            let existing = tx_get::<OperatorRevocation>(operators, name.as_bytes(), OPERATORS)?;
            let (rec, event) = rules::revoke_operator(existing.as_ref(), name, at, actor);
            let Some(event) = event else {
                return Ok((rec, None));
            };
            let entry = event.entry_after(&chain, self.audit_key.get());
            operators.insert(name.as_bytes(), to_cbor(&rec))?;
            audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
            Ok((rec, Some(entry)))
        });
        let (rec, entry) = flatten(r)?;
        if let Some(entry) = entry {
            *head = (entry.seq, sealed_hash(&entry));
        }
        Ok(rec)
    }

    fn operator_revocation(&self, name: &str) -> Result<Option<OperatorRevocation>, StoreError> {
        match self.operators.get(name.as_bytes()).map_err(backend)? {
            None => Ok(None),
            Some(v) => from_cbor(&v).map(Some).map_err(corrupt(OPERATORS)),
        }
    }

    fn operator_revocations(&self) -> Result<Vec<OperatorRevocation>, StoreError> {
        self.operators
            .iter()
            .map(|r| {
                let (_, v) = r.map_err(backend)?;
                from_cbor(&v).map_err(corrupt(OPERATORS))
            })
            .collect()
    }

    fn change_line(
        &self,
        id: &str,
        change: super::LineChange,
        at: u64,
        actor: &str,
    ) -> Result<Option<LineRecord>, StoreError> {
        let mut head = self.head()?;
        let chain = *head;
        let r = (&self.lines, &self.audit).transaction(|(lines, audit)| {
            let line = tx_get::<LineRecord>(lines, id.as_bytes(), LINES)?;
            let Some((line, event)) = rules::change_line(line.as_ref(), change, at, actor) else {
                return Ok((None, None));
            };
            let Some(event) = event else {
                return Ok((Some(line), None));
            };
            let entry = event.entry_after(&chain, self.audit_key.get());
            lines.insert(id.as_bytes(), to_cbor(&line))?;
            audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
            Ok((Some(line), Some(entry)))
        });
        let (line, entry) = flatten(r)?;
        if let Some(entry) = entry {
            *head = (entry.seq, sealed_hash(&entry));
        }
        Ok(line)
    }

    fn record_event(
        &self,
        event: &str,
        serial: Option<u64>,
        actor: &str,
        detail: String,
        at: u64,
    ) -> Result<(), StoreError> {
        let mut head = self.head()?;
        let entry = AuditEvent {
            at,
            event: event.to_string(),
            serial,
            actor: actor.to_string(),
            detail,
        }
        .entry_after(&head, self.audit_key.get());
        self.audit
            .insert(entry.seq.to_be_bytes(), to_cbor(&entry))
            .map_err(backend)?;
        *head = (entry.seq, sealed_hash(&entry));
        Ok(())
    }

    fn set_audit_key(&self, key: AuditKey) {
        let _ = self.audit_key.set(key);
    }

    fn last_audit(&self) -> Result<Option<AuditEntry>, StoreError> {
        match self.audit.last().map_err(backend)? {
            None => Ok(None),
            Some((_, v)) => from_cbor(&v).map(Some).map_err(corrupt(AUDIT)),
        }
    }

    fn audit_raw(&self, after: u64) -> Box<dyn Iterator<Item = Result<RawAudit, StoreError>> + '_> {
        let start = after.saturating_add(1).to_be_bytes();
        Box::new(self.audit.range(start..).map(|r| {
            let (k, v) = r.map_err(backend)?;
            Ok((k.to_vec(), v.to_vec()))
        }))
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        self.data_file.sync_data().map_err(backend)
    }

    fn next_crl_number(&self, at_least: u64) -> Result<u64, StoreError> {
        // In sled's default tree, apart from the records (one process holds a sled store).
        let mut next = 0;
        self.db
            .update_and_fetch(CRL_NUMBER, |old| {
                let last = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                next = last.saturating_add(1).max(at_least);
                Some(next.to_be_bytes().to_vec())
            })
            .map_err(backend)?;
        self.sync()?;
        Ok(next)
    }

    fn devices(&self) -> Box<dyn Iterator<Item = Result<DeviceRecord, StoreError>> + '_> {
        Box::new(self.devices.iter().map(|r| {
            let (_, v) = r.map_err(backend)?;
            from_cbor(&v).map_err(corrupt(DEVICES))
        }))
    }

    fn audit(&self) -> Box<dyn Iterator<Item = Result<AuditEntry, StoreError>> + '_> {
        Box::new(self.audit.iter().map(|r| {
            let (_, v) = r.map_err(backend)?;
            from_cbor(&v).map_err(corrupt(AUDIT))
        }))
    }

    fn raw_records(&self) -> Result<Vec<RawRecord>, StoreError> {
        // Every tree sled holds, whatever its name, and its default tree (the CRL number): a
        // tree added later is in the comparison without anyone remembering to list it.
        let mut names = self.db.tree_names();
        names.sort();
        let mut out = Vec::new();
        for name in names {
            let tree = self.db.open_tree(&name).map_err(backend)?;
            let name = String::from_utf8_lossy(&name).into_owned();
            for r in tree.iter() {
                let (k, v) = r.map_err(backend)?;
                out.push((name.clone(), k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::test_support::{enroll_all, enrollment, kind, line};

    #[test]
    fn a_store_keeps_the_parameters_it_was_created_with() {
        let tmp = tempfile::tempdir().unwrap();
        // A store made before the store got compressed pages in 4 MiB segments (sled's
        // defaults, 512 KiB segments): sled refuses to open it with other parameters.
        let old = tmp.path().join("old");
        {
            let db = sled::Config::new().path(&old).open().unwrap();
            db.insert(b"k", b"v").unwrap();
            db.flush().unwrap();
        }
        assert_eq!(persisted_parameters(&old), Some((512 * 1024, false)));
        let store = SledStore::open(&old).unwrap();
        store.sync().unwrap();
        drop(store);
        assert_eq!(persisted_parameters(&old), Some((512 * 1024, false)));
        // A new store.
        let new = tmp.path().join("new");
        assert_eq!(persisted_parameters(&new), None);
        let store = SledStore::open(&new).unwrap();
        store.sync().unwrap();
        assert_eq!(persisted_parameters(&new), Some((SEGMENT_SIZE, true)));
    }

    #[test]
    fn a_batch_that_cannot_be_applied_applies_none_of_its_enrollments() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        store.add_line(&line(100), "operator:test").unwrap();
        // A damaged device record makes the third enrollment fail inside the transaction.
        store.damage_device_record_for_test(3);
        let before = store.raw_records().unwrap();
        let batch = [
            enrollment(1, 0xb1, 1),
            enrollment(2, 0xb2, 2),
            enrollment(3, 0xb3, 3),
        ];
        let err = enroll_all(&store, &batch).unwrap_err();
        assert!(err.to_string().contains(DEVICES), "{err}");
        assert_eq!(store.raw_records().unwrap(), before, "nothing written");
        // The audit head did not move: the next enrollment chains to the line-add entry.
        assert_eq!(
            kind(&store.apply_enrollment(&batch[0]).unwrap()),
            "created 1"
        );
        let verdict = crate::audit::verify(store.audit_raw(0), None, None, None).unwrap();
        assert_eq!((verdict.entries, verdict.first_bad), (2, None));
    }

    /// The CRL number only grows, and survives a restart (it was the signing time, kept in
    /// memory only).
    #[test]
    fn crl_numbers_only_grow_and_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        {
            let store = SledStore::open(&tmp.path().join("store")).unwrap();
            crate::store::test_support::crl_numbers_only_grow(&store);
            // Held apart from the records, in sled's default tree, and in the whole-store
            // comparison too (a refused request must not have signed a CRL either).
            assert_eq!(
                store.raw_records().unwrap(),
                vec![(
                    "__sled__default".to_string(),
                    CRL_NUMBER.to_vec(),
                    1_700_000_001u64.to_be_bytes().to_vec()
                )]
            );
        }
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        assert_eq!(store.next_crl_number(0).unwrap(), 1_700_000_002);
    }

    #[test]
    fn a_batch_of_enrollments_sees_its_own_writes_and_chains_its_audit_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        crate::store::test_support::batch_sees_its_own_writes(&store);
    }

    #[test]
    fn enrollments_and_secrets_writes_share_one_transaction_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        crate::store::test_support::enrollments_and_secrets_share_a_batch(&store);
    }

    #[test]
    fn a_pool_key_imported_and_given_out_in_one_batch() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        crate::store::test_support::pool_key_imported_and_given_out_in_one_batch(&store);
    }

    #[test]
    fn a_fetch_read_gives_what_the_single_reads_give() {
        let tmp = tempfile::tempdir().unwrap();
        let store = SledStore::open(&tmp.path().join("store")).unwrap();
        crate::store::test_support::fetch_read_gives_what_the_single_reads_give(&store);
    }
}
