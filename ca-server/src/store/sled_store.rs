//! The embedded store on sled: one tree per entity, one multi-tree transaction per enrollment.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use protocol_spec::{Problem, ProblemType};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};

use super::{EnrollOutcome, NewEnrollment, RawRecord, Store, StoreError};
use crate::records::{
    AuditEntry, DeviceRecord, DeviceStatus, LineRecord, TokenUse, from_cbor, to_cbor,
};

const DEVICES: &str = "devices";
const KEYS: &str = "keys";
const TOKENS: &str = "tokens";
const LINES: &str = "lines";
const AUDIT: &str = "audit";

/// sled-backed [`Store`].
pub struct SledStore {
    path: PathBuf,
    db: sled::Db,
    devices: sled::Tree,
    keys: sled::Tree,
    tokens: sled::Tree,
    lines: sled::Tree,
    audit: sled::Tree,
    /// sled's data file, opened again so that `sync` can fdatasync it: sled's own flush uses
    /// sync_file_range on Linux, which neither flushes the drive cache nor orders metadata.
    data_file: File,
    /// (last seq, last hash) of the audit chain; held while a write computes the next entry.
    audit_head: Mutex<(u64, [u8; 32])>,
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
fn token_key(line: &str, cti: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(line.len() + 1 + cti.len());
    k.extend_from_slice(line.as_bytes());
    k.push(0);
    k.extend_from_slice(cti);
    k
}

type TxResult<T> = Result<T, ConflictableTransactionError<StoreError>>;

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

impl SledStore {
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
            Some((_, v)) => {
                let e: AuditEntry = from_cbor(&v).map_err(corrupt(AUDIT))?;
                (e.seq, e.hash())
            }
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
            audit,
            db,
            data_file,
            audit_head: Mutex::new(head),
        })
    }

    fn open_db(path: &Path) -> Result<sled::Db, StoreError> {
        sled::Config::new()
            .path(path)
            .cache_capacity(64 * 1024 * 1024)
            .mode(sled::Mode::LowSpace)
            .open()
            .map_err(|e| match e {
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

    fn next_entry(
        head: &(u64, [u8; 32]),
        at: u64,
        event: &str,
        serial: Option<u64>,
        actor: &str,
        detail: String,
    ) -> AuditEntry {
        AuditEntry {
            seq: head.0 + 1,
            at,
            event: event.to_string(),
            serial,
            actor: actor.to_string(),
            detail,
            prev_hash: head.1.to_vec(),
        }
    }
}

fn refused(kind: ProblemType, detail: String) -> TxResult<EnrollOutcome> {
    Ok(EnrollOutcome::Refused(Problem::new(kind, detail)))
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
        let mut head = self.head()?;
        let entry = Self::next_entry(
            &head,
            line.created_at,
            "line-add",
            None,
            actor,
            format!(
                "line={} serials={}-{} quota={}",
                line.id, line.first_serial, line.last_serial, line.quota
            ),
        );
        let r = (&self.lines, &self.audit).transaction(|(lines, audit)| {
            if lines.get(line.id.as_bytes())?.is_some() {
                return abort(StoreError::Refused(format!(
                    "line {:?} already exists",
                    line.id
                )));
            }
            lines.insert(line.id.as_bytes(), to_cbor(line))?;
            audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
            Ok(())
        });
        flatten(r)?;
        *head = (entry.seq, entry.hash());
        drop(head);
        self.sync()
    }

    fn apply_enrollment(&self, e: &NewEnrollment) -> Result<EnrollOutcome, StoreError> {
        let mut head = self.head()?;
        let entry = Self::next_entry(
            &head,
            e.at,
            "enroll",
            Some(e.serial),
            &e.line,
            format!(
                "key={} cti={}",
                hex::encode(e.key_hash),
                hex::encode(&e.token_id)
            ),
        );
        let serial_key = e.serial.to_be_bytes();
        let tkey = token_key(&e.line, &e.token_id);
        let r = (
            &self.devices,
            &self.keys,
            &self.tokens,
            &self.lines,
            &self.audit,
        )
            .transaction(|(devices, keys, tokens, lines, audit)| {
                if let Some(rec) = tx_get::<DeviceRecord>(devices, &serial_key, DEVICES)? {
                    if rec.status == DeviceStatus::Revoked {
                        return refused(
                            ProblemType::Revoked,
                            format!("device {} is revoked", e.serial),
                        );
                    }
                    if rec.spki == e.spki {
                        return Ok(EnrollOutcome::Existing(rec));
                    }
                    return refused(
                        ProblemType::SerialTaken,
                        format!("serial {} is already bound to another key", e.serial),
                    );
                }
                if let Some(other) = keys.get(e.key_hash)? {
                    let other = <[u8; 8]>::try_from(other.as_ref())
                        .map(u64::from_be_bytes)
                        .unwrap_or(0);
                    return refused(
                        ProblemType::DuplicateKey,
                        format!("this public key is already bound to serial {other}"),
                    );
                }
                if let Some(used) = tx_get::<TokenUse>(tokens, &tkey, TOKENS)? {
                    return refused(
                        ProblemType::TokenReplayed,
                        format!(
                            "token {} was consumed by the enrollment of serial {}",
                            hex::encode(&e.token_id),
                            used.serial
                        ),
                    );
                }
                let Some(mut line) = tx_get::<LineRecord>(lines, e.line.as_bytes(), LINES)? else {
                    return refused(
                        ProblemType::LineUnknown,
                        format!("line {:?} is not registered", e.line),
                    );
                };
                if !line.active {
                    return refused(
                        ProblemType::LineUnknown,
                        format!("line {:?} is disabled", e.line),
                    );
                }
                if line.enrolled >= line.quota {
                    return refused(
                        ProblemType::QuotaExhausted,
                        format!("line {:?} has enrolled its quota of {}", e.line, line.quota),
                    );
                }
                line.enrolled += 1;
                let rec = DeviceRecord {
                    serial: e.serial,
                    spki: e.spki.clone(),
                    certificate: e.certificate.clone(),
                    line: e.line.clone(),
                    token_id: e.token_id.clone(),
                    enrolled_at: e.at,
                    status: DeviceStatus::Active,
                    revoked_at: None,
                };
                devices.insert(&serial_key, to_cbor(&rec))?;
                keys.insert(&e.key_hash, &serial_key)?;
                tokens.insert(
                    tkey.as_slice(),
                    to_cbor(&TokenUse {
                        serial: e.serial,
                        key_hash: e.key_hash.to_vec(),
                    }),
                )?;
                lines.insert(e.line.as_bytes(), to_cbor(&line))?;
                audit.insert(&entry.seq.to_be_bytes(), to_cbor(&entry))?;
                Ok(EnrollOutcome::Created(rec))
            });
        let outcome = flatten(r)?;
        if matches!(outcome, EnrollOutcome::Created(_)) {
            *head = (entry.seq, entry.hash());
        }
        Ok(outcome)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(backend)?;
        self.data_file.sync_data().map_err(backend)
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
        let mut out = Vec::new();
        for (name, tree) in [
            (DEVICES, &self.devices),
            (KEYS, &self.keys),
            (TOKENS, &self.tokens),
            (LINES, &self.lines),
            (AUDIT, &self.audit),
        ] {
            for r in tree.iter() {
                let (k, v) = r.map_err(backend)?;
                out.push((name.to_string(), k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }

    fn size_on_disk(&self) -> Result<u64, StoreError> {
        self.db.size_on_disk().map_err(backend)
    }
}
