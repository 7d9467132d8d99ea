//! A group-commit batch (enrollments and secrets writes) in one transaction of two round trips.
//!
//! 1. Reads, pipelined: the audit head locked first (so every writer, in any process, applies
//!    its batch after the one before has committed), then every record any write of the batch
//!    touches, one statement per table (`= ANY($1)`).
//! 2. The registration authority's rules, in the batch's order, over those records held in
//!    memory: each write sees what the writes before it did, exactly as one transaction per
//!    write would.
//! 3. Writes, pipelined: one multi-row statement per table (`unnest`), every conditional one
//!    checked for the number of rows it had to change; then the audit head, then commit.
//!
//! The database's constraints still hold every invariant: a write that meets another writer
//! (a unique violation, a conditional update short of its rows) fails the transaction with
//! [`StoreError::Conflict`], and the whole batch is read and decided again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::{
    Chain, DEVICE_COLUMNS, Db, LINE_COLUMNS, P, Pool, SECRET_COLUMNS, device_of, i, line_of, oi,
    pg, secret_of, status_name, u,
};
use crate::ra::rules::{self, EnrollOutcome, EnrollView, Holder, NewEnrollment, SecretOp};
use crate::ra::rules::{SecretOutcome, SecretView, SecretWrite};
use crate::records::{AuditEntry, DeviceRecord, LineRecord, PoolEntry, SecretRecord, TokenUse};
use crate::store::{StoreError, Write, Written};

pub(super) const INSERT_DEVICES: &str = "INSERT INTO devices (serial, spki, key_hash, certificate, line, token_id, enrolled_at, status, revoked_at) SELECT * FROM unnest($1::bigint[], $2::bytea[], $3::bytea[], $4::bytea[], $5::text[], $6::bytea[], $7::bigint[], $8::text[], $9::bigint[])";
pub(super) const INSERT_KEYS: &str =
    "INSERT INTO keys (key_hash, serial) SELECT * FROM unnest($1::bytea[], $2::bigint[])";
pub(super) const INSERT_TOKENS: &str = "INSERT INTO tokens (line, token_id, serial) SELECT * FROM unnest($1::text[], $2::bytea[], $3::bigint[])";
pub(super) const INSERT_SECRET_KEYS: &str = "INSERT INTO secret_keys (index_tag, key_id, serial, version) SELECT * FROM unnest($1::bytea[], $2::text[], $3::bigint[], $4::bigint[])";
pub(super) const INSERT_VERSIONS: &str = "INSERT INTO secret_versions (serial, version, key_id, ciphertext, nonce, kcv, index_tag, source, created_at, delivered_at, confirmed_at, retired_at) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bytea[], $5::bytea[], $6::bytea[], $7::bytea[], $8::text[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])";
pub(super) const INSERT_POOL: &str = "INSERT INTO secret_pool (key_id, ciphertext, nonce, kcv, index_tag, imported_at) SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[], $4::bytea[], $5::bytea[], $6::bigint[])";
pub(super) const INSERT_AUDITS: &str = "INSERT INTO audit (seq, at, event, serial, actor, detail, prev_hash, hash, node, mac) SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::bigint[], $5::text[], $6::text[], $7::bytea[], $8::bytea[], $9::text[], $10::bytea[])";

/// The batch's statements take arrays (`= ANY($1)`, `unnest`) of a few dozen keys at most, and
/// each must find them through an index, whatever the tables held when it was planned: a
/// prepared statement's generic plan, made while the tables were nearly empty, was a
/// sequential scan that then grew with every device stored. Planning each call for its arrays
/// (`force_custom_plan`) cured that but cost the database about a fifth of its CPU (a profile of
/// its processes during a run: the planner 15-20% of their samples). So the batch's transaction
/// plans each statement once per connection (`force_generic_plan`) with sequential scans and
/// hash and merge joins ruled out: every plan is an index lookup per key, which is right for a
/// batch's few keys at any table size.
pub(super) const PLANS: &str = "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), set_config('enable_seqscan', 'off', true), set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)";
const LOCK_HEAD: &str = "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE";
const SET_HEAD: &str = "UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1";
const READ_KEYS: &str = "SELECT key_hash, serial FROM keys WHERE key_hash = ANY($1)";
const READ_TOKENS: &str = "SELECT t.line, t.token_id, t.serial FROM tokens t JOIN unnest($1::text[], $2::bytea[]) AS w(line, token_id) ON t.line = w.line AND t.token_id = w.token_id";
const READ_SECRET_KEYS: &str = "SELECT index_tag, key_id, serial, version FROM secret_keys WHERE index_tag = ANY($1) OR key_id = ANY($2)";
const READ_POOL: &str = "SELECT key_id FROM secret_pool WHERE key_id = ANY($1)";
/// How many times each enrolling serial was reset: the generation its new binding takes.
const READ_RESETS: &str =
    "SELECT serial, count(*) FROM device_resets WHERE serial = ANY($1) GROUP BY serial";
/// An imported key's row gets its holder, once: only while it has none.
const CLAIM_POOL_KEYS: &str = "UPDATE secret_keys s SET serial = w.serial, version = w.version FROM unnest($1::bytea[], $2::bigint[], $3::bigint[]) AS w(tag, serial, version) WHERE s.index_tag = w.tag AND s.serial IS NULL";
const SET_DELIVERED: &str = "UPDATE secret_versions s SET delivered_at = w.at FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS w(serial, version, at) WHERE s.serial = w.serial AND s.version = w.version AND s.delivered_at IS NULL AND s.retired_at IS NULL";
const SET_CONFIRMED: &str = "UPDATE secret_versions s SET confirmed_at = w.at FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS w(serial, version, at) WHERE s.serial = w.serial AND s.version = w.version AND s.confirmed_at IS NULL";
const TAKE_POOL: &str = "DELETE FROM secret_pool WHERE key_id = ANY($1)";
const READ_DUKPT_NEXT: &str = "SELECT id, next_derivation FROM dukpt_bdks WHERE id = ANY($1)";
/// A BDK's allocation counter moves on only from the value the batch read: two writers taking
/// the same derivation id cannot both commit.
const MOVE_DUKPT_NEXT: &str = "UPDATE dukpt_bdks b SET next_derivation = w.next FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS w(id, before, next) WHERE b.id = w.id AND b.next_derivation = w.before";
/// The quota held by the database: a line's count rises only while it stays within the quota.
const COUNT_LINES: &str = "UPDATE lines l SET enrolled = l.enrolled + w.n FROM unnest($1::text[], $2::bigint[]) AS w(id, n) WHERE l.id = w.id AND l.active AND l.enrolled + w.n <= l.quota";

/// Applies `writes` in one transaction; see the module's documentation.
pub(super) async fn apply(
    pool: Arc<Pool>,
    writes: Arc<Vec<Write>>,
) -> Result<Vec<Written>, StoreError> {
    let conn = pool.get().await?;
    // The transaction is opened by a `BEGIN` sent in the same flight as the reads (one round
    // trip fewer than a `BEGIN` of its own), so it is ended here by hand; until it is, the
    // connection is not reused if this task ends early.
    conn.open.store(true, Ordering::SeqCst);
    let db = conn.db()?;
    let begun = std::sync::atomic::AtomicBool::new(false);
    let decided = async {
        let (mut chain, mut state) = read(&db, &writes, &begun).await?;
        let mut changes = Changes {
            audit_key: pool.audit_key.get().cloned(),
            ..Changes::default()
        };
        let outcomes = writes
            .iter()
            .map(|w| match w {
                Write::Enroll(e) => Written::Enroll(state.enroll(e, &mut changes, &mut chain)),
                Write::Secret(op) => Written::Secret(state.secret(op, &mut changes, &mut chain)),
            })
            .collect::<Vec<_>>();
        write(&db, &changes, &chain).await?;
        Ok::<_, StoreError>(outcomes)
    }
    .await;
    match decided {
        Ok(outcomes) => {
            // No ROLLBACK after a failed COMMIT: the transaction has ended either way, and a
            // ROLLBACK outside one draws a WARNING, which this store takes for a commit the
            // synchronous standby did not confirm.
            db.simple("COMMIT").await?;
            conn.open.store(false, Ordering::SeqCst);
            Ok(outcomes)
        }
        Err(e) => {
            // The connection goes back to the pool outside any transaction, or is closed. No
            // ROLLBACK when the BEGIN was never sent (a failure before the reads): outside a
            // transaction it would draw a WARNING.
            if !begun.load(Ordering::SeqCst) || db.simple("ROLLBACK").await.is_ok() {
                conn.open.store(false, Ordering::SeqCst);
            }
            Err(e)
        }
    }
}

/// The records a batch touches, as they stand after the writes decided so far. A key absent
/// from a map is absent from the database: every key any write names was read.
#[derive(Default)]
struct State {
    devices: HashMap<u64, DeviceRecord>,
    keys: HashMap<[u8; 32], u64>,
    tokens: HashMap<(String, Vec<u8>), u64>,
    lines: HashMap<String, LineRecord>,
    versions: HashMap<u64, BTreeMap<u64, SecretRecord>>,
    by_tag: HashMap<Vec<u8>, Holder>,
    by_key_id: HashMap<String, Holder>,
    pool: HashSet<String>,
    /// Resets per enrolling serial (absent: none).
    resets: HashMap<u64, u64>,
    /// DUKPT allocation counters of the BDKs the batch's new versions name.
    dukpt_next: HashMap<String, u64>,
}

/// A new secret-key row: (index tag, key id, (serial, version); none for a pool key).
type SecretKeyRow = (Vec<u8>, String, Option<(u64, u64)>);

/// What the batch writes, table by table.
#[derive(Default)]
struct Changes {
    devices: Vec<(DeviceRecord, [u8; 32])>,
    keys: Vec<([u8; 32], u64)>,
    tokens: Vec<(String, Vec<u8>, u64)>,
    /// Enrollments per line.
    line_counts: BTreeMap<String, u64>,
    secret_keys: Vec<SecretKeyRow>,
    /// Pool keys taken by a version: (index tag, serial, version).
    claims: Vec<(Vec<u8>, u64, u64)>,
    /// New versions, as they stand at the end of the batch.
    versions: BTreeMap<(u64, u64), SecretRecord>,
    /// First deliveries and acknowledgements of versions written before the batch.
    delivered: Vec<(u64, u64, u64)>,
    confirmed: Vec<(u64, u64, u64)>,
    /// Pool entries taken (written before the batch), and new ones.
    taken: Vec<String>,
    pool: Vec<PoolEntry>,
    /// DUKPT counters moved: BDK id -> (as read before the batch, as the batch leaves it).
    dukpt_next: BTreeMap<String, (u64, u64)>,
    audit: Vec<AuditEntry>,
    /// The key that seals the audit entries.
    audit_key: Option<crate::audit::AuditKey>,
}

/// Opens the transaction, locks the audit head and reads every record the writes touch, in
/// one round trip.
async fn read(
    db: &Db<'_>,
    writes: &[Write],
    begun: &std::sync::atomic::AtomicBool,
) -> Result<(Chain, State), StoreError> {
    let mut serials: Vec<i64> = Vec::new();
    let mut enroll_serials: Vec<i64> = Vec::new();
    let mut key_hashes: Vec<&[u8]> = Vec::new();
    let (mut token_lines, mut token_ids): (Vec<&str>, Vec<&[u8]>) = (Vec::new(), Vec::new());
    let mut line_ids: Vec<&str> = Vec::new();
    let mut secret_serials: Vec<i64> = Vec::new();
    let (mut tags, mut key_ids): (Vec<&[u8]>, Vec<&str>) = (Vec::new(), Vec::new());
    let mut pool_ids: Vec<&str> = Vec::new();
    let mut bdk_ids: Vec<String> = Vec::new();
    for w in writes {
        match w {
            Write::Enroll(e) => {
                serials.push(i(e.serial));
                enroll_serials.push(i(e.serial));
                key_hashes.push(e.key_hash.as_slice());
                token_lines.push(&e.line);
                token_ids.push(&e.token_id);
                line_ids.push(&e.line);
            }
            Write::Secret(op) => {
                if let Some(s) = op.serial() {
                    serials.push(i(s));
                    secret_serials.push(i(s));
                }
                if let Some(rec) = op.new_version() {
                    tags.push(&rec.index_tag);
                    key_ids.push(&rec.key_id);
                    if let Some((bdk_id, _)) = rules::dukpt_claim(rec) {
                        bdk_ids.push(bdk_id);
                    }
                }
                match op {
                    SecretOp::Allocate {
                        from_pool: Some(id),
                        ..
                    } => pool_ids.push(id),
                    SecretOp::Import { entries, .. } => {
                        for e in entries {
                            tags.push(&e.index_tag);
                            key_ids.push(&e.key_id);
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    let device_sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE serial = ANY($1)");
    let line_sql = format!("SELECT {LINE_COLUMNS} FROM lines WHERE id = ANY($1)");
    let version_sql =
        format!("SELECT {SECRET_COLUMNS} FROM secret_versions WHERE serial = ANY($1)");
    let mut sqls = vec![PLANS, LOCK_HEAD, device_sql.as_str()];
    if !key_hashes.is_empty() {
        sqls.extend([READ_KEYS, READ_TOKENS, line_sql.as_str(), READ_RESETS]);
    }
    if !secret_serials.is_empty() {
        sqls.push(version_sql.as_str());
    }
    if !tags.is_empty() {
        sqls.push(READ_SECRET_KEYS);
    }
    if !pool_ids.is_empty() {
        sqls.push(READ_POOL);
    }
    if !bdk_ids.is_empty() {
        sqls.push(READ_DUKPT_NEXT);
    }
    // Prepared first, so that the statements below all leave in one flight, in this order.
    db.prepare(&sqls).await?;
    let p_serials: [P<'_>; 1] = [&serials];
    let p_keys: [P<'_>; 1] = [&key_hashes];
    let p_tokens: [P<'_>; 2] = [&token_lines, &token_ids];
    let p_lines: [P<'_>; 1] = [&line_ids];
    let p_resets: [P<'_>; 1] = [&enroll_serials];
    let p_versions: [P<'_>; 1] = [&secret_serials];
    let p_secret_keys: [P<'_>; 2] = [&tags, &key_ids];
    let p_pool: [P<'_>; 1] = [&pool_ids];
    let p_bdks: [P<'_>; 1] = [&bdk_ids];
    let enrolling = !key_hashes.is_empty();
    // The BEGIN leaves at the first poll below: from here on the connection is in a
    // transaction.
    begun.store(true, Ordering::SeqCst);
    let (_, _, head, devices, keys, tokens, lines, resets, versions, secret_keys, pool, dukpt) = tokio::try_join!(
        db.simple("BEGIN"),
        db.exec(PLANS, &[]),
        db.one(LOCK_HEAD, &[]),
        db.all(device_sql.as_str(), &p_serials),
        db.all_if(enrolling, READ_KEYS, &p_keys),
        db.all_if(enrolling, READ_TOKENS, &p_tokens),
        db.all_if(enrolling, line_sql.as_str(), &p_lines),
        db.all_if(enrolling, READ_RESETS, &p_resets),
        db.all_if(
            !secret_serials.is_empty(),
            version_sql.as_str(),
            &p_versions
        ),
        db.all_if(!tags.is_empty(), READ_SECRET_KEYS, &p_secret_keys),
        db.all_if(!pool_ids.is_empty(), READ_POOL, &p_pool),
        db.all_if(!bdk_ids.is_empty(), READ_DUKPT_NEXT, &p_bdks),
    )?;
    let hash: Vec<u8> = head.try_get(1).map_err(pg)?;
    let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| StoreError::Corrupt {
        tree: "audit_head",
        reason: "hash is not 32 bytes".into(),
    })?;
    let chain = (u(head.try_get(0).map_err(pg)?), hash);

    let mut state = State::default();
    for r in &devices {
        let d = device_of(r)?;
        state.devices.insert(d.serial, d);
    }
    for r in &keys {
        let hash: Vec<u8> = r.try_get(0).map_err(pg)?;
        let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|_| StoreError::Corrupt {
            tree: "keys",
            reason: "key hash is not 32 bytes".into(),
        })?;
        state.keys.insert(hash, u(r.try_get(1).map_err(pg)?));
    }
    for r in &tokens {
        let key = (r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?);
        state.tokens.insert(key, u(r.try_get(2).map_err(pg)?));
    }
    for r in &lines {
        let l = line_of(r)?;
        state.lines.insert(l.id.clone(), l);
    }
    for r in &resets {
        state
            .resets
            .insert(u(r.try_get(0).map_err(pg)?), u(r.try_get(1).map_err(pg)?));
    }
    for r in &versions {
        let v = secret_of(r)?;
        state
            .versions
            .entry(v.serial)
            .or_default()
            .insert(v.version, v);
    }
    for r in &secret_keys {
        let serial: Option<i64> = r.try_get(2).map_err(pg)?;
        let version: Option<i64> = r.try_get(3).map_err(pg)?;
        let holder = match (serial, version) {
            (Some(s), Some(v)) => Holder::Version {
                serial: u(s),
                version: u(v),
            },
            _ => Holder::Pool,
        };
        state.by_tag.insert(r.try_get(0).map_err(pg)?, holder);
        state.by_key_id.insert(r.try_get(1).map_err(pg)?, holder);
    }
    for r in &pool {
        state.pool.insert(r.try_get(0).map_err(pg)?);
    }
    for r in &dukpt {
        state
            .dukpt_next
            .insert(r.try_get(0).map_err(pg)?, u(r.try_get(1).map_err(pg)?));
    }
    Ok((chain, state))
}

/// Seals the audit entry for `event` after `chain`, moves `chain` to it and queues it.
fn audit(changes: &mut Changes, chain: &mut Chain, event: &rules::AuditEvent) {
    let entry = event.entry_after(chain, changes.audit_key.as_ref());
    *chain = (entry.seq, entry.compute_hash());
    changes.audit.push(entry);
}

impl State {
    fn enroll(&mut self, e: &NewEnrollment, ch: &mut Changes, chain: &mut Chain) -> EnrollOutcome {
        let token = (e.line.clone(), e.token_id.clone());
        let view = EnrollView {
            device: self.devices.get(&e.serial).cloned(),
            key_holder: self.keys.get(&e.key_hash).copied(),
            token_use: self.tokens.get(&token).map(|&serial| TokenUse { serial }),
            line: self.lines.get(&e.line).cloned(),
            resets: self.resets.get(&e.serial).copied().unwrap_or(0),
        };
        let (outcome, writes) = rules::enroll(&view, e);
        if let Some(w) = writes {
            // A reset serial enrolling again with its own key keeps its key row.
            if view.key_holder.is_none() {
                self.keys.insert(e.key_hash, e.serial);
                ch.keys.push((e.key_hash, e.serial));
            }
            self.tokens.insert(token, w.token_use.serial);
            ch.tokens
                .push((e.line.clone(), e.token_id.clone(), w.token_use.serial));
            *ch.line_counts.entry(e.line.clone()).or_default() += 1;
            self.lines.insert(e.line.clone(), w.line);
            self.devices.insert(e.serial, w.device.clone());
            ch.devices.push((w.device, e.key_hash));
            audit(ch, chain, &w.event);
        }
        outcome
    }

    fn secret(&mut self, op: &SecretOp, ch: &mut Changes, chain: &mut Chain) -> SecretOutcome {
        let mut view = SecretView::default();
        if let Some(serial) = op.serial() {
            view.device = self.devices.get(&serial).cloned();
            let versions = self.versions.get(&serial);
            if op.new_version().is_some() {
                view.newest = versions.and_then(|v| v.values().next_back()).cloned();
                view.head = view.newest.as_ref().map_or(0, |r| r.version);
            }
            if let Some(version) = op.names_version() {
                view.named = versions.and_then(|v| v.get(&version)).cloned();
            }
        }
        if let Some(rec) = op.new_version() {
            view.tag_holder = self.by_tag.get(&rec.index_tag).copied();
            view.key_id_holder = self.by_key_id.get(&rec.key_id).copied();
            if let Some((bdk_id, _)) = rules::dukpt_claim(rec) {
                view.dukpt_next = self.dukpt_next.get(&bdk_id).copied();
            }
        }
        match op {
            SecretOp::Allocate {
                from_pool: Some(id),
                ..
            } => view.pool_entry_present = self.pool.contains(id),
            SecretOp::Import { entries, .. } => {
                view.import_known = entries
                    .iter()
                    .map(|e| {
                        (
                            self.by_key_id.contains_key(&e.key_id),
                            self.by_tag.contains_key(&e.index_tag),
                        )
                    })
                    .collect();
            }
            _ => {}
        }
        let (outcome, writes, event) = rules::secret(&view, op);
        let from_pool = writes
            .iter()
            .any(|w| matches!(w, SecretWrite::TakeFromPool(_)));
        for w in writes {
            self.apply(w, from_pool, ch);
        }
        if let Some(event) = event {
            audit(ch, chain, &event);
        }
        outcome
    }

    fn apply(&mut self, w: SecretWrite, from_pool: bool, ch: &mut Changes) {
        match w {
            SecretWrite::NewVersion(rec) => {
                let (serial, version) = (rec.serial, rec.version);
                let holder = Holder::Version { serial, version };
                let queued = ch
                    .secret_keys
                    .iter_mut()
                    .find(|(tag, _, _)| *tag == rec.index_tag);
                match queued {
                    // A pool key imported in this batch: its new row names the holder at once.
                    Some(row) if from_pool => row.2 = Some((serial, version)),
                    _ if from_pool => ch.claims.push((rec.index_tag.clone(), serial, version)),
                    _ => ch.secret_keys.push((
                        rec.index_tag.clone(),
                        rec.key_id.clone(),
                        Some((serial, version)),
                    )),
                }
                self.by_tag.insert(rec.index_tag.clone(), holder);
                self.by_key_id.insert(rec.key_id.clone(), holder);
                self.versions
                    .entry(serial)
                    .or_default()
                    .insert(version, rec.clone());
                ch.versions.insert((serial, version), rec);
            }
            SecretWrite::TakeFromPool(id) => {
                self.pool.remove(&id);
                match ch.pool.iter().position(|p| p.key_id == id) {
                    Some(at) => {
                        ch.pool.remove(at);
                    }
                    None => ch.taken.push(id),
                }
            }
            SecretWrite::UpdateVersion(rec) => {
                let (serial, version, at) = (rec.serial, rec.version, rec.delivered_at);
                self.update(serial, version, |r| r.delivered_at = at);
                match ch.versions.get_mut(&(serial, version)) {
                    Some(new) => new.delivered_at = at,
                    None => ch.delivered.push((serial, version, at.unwrap_or(0))),
                }
            }
            SecretWrite::Ack {
                serial,
                version,
                at,
            } => {
                self.update(serial, version, |r| r.confirmed_at = Some(at));
                match ch.versions.get_mut(&(serial, version)) {
                    Some(new) => new.confirmed_at = Some(at),
                    None => ch.confirmed.push((serial, version, at)),
                }
            }
            SecretWrite::DukptNext { bdk_id, taken } => {
                let next = taken.saturating_add(1);
                self.dukpt_next.insert(bdk_id.clone(), next);
                ch.dukpt_next
                    .entry(bdk_id)
                    .and_modify(|(_, n)| *n = next)
                    .or_insert((taken, next));
            }
            SecretWrite::PoolEntry(e) => {
                self.by_tag.insert(e.index_tag.clone(), Holder::Pool);
                self.by_key_id.insert(e.key_id.clone(), Holder::Pool);
                self.pool.insert(e.key_id.clone());
                ch.secret_keys
                    .push((e.index_tag.clone(), e.key_id.clone(), None));
                ch.pool.push(e);
            }
        }
    }

    fn update(&mut self, serial: u64, version: u64, f: impl FnOnce(&mut SecretRecord)) {
        if let Some(r) = self
            .versions
            .get_mut(&serial)
            .and_then(|v| v.get_mut(&version))
        {
            f(r);
        }
    }
}

/// A statement that had to change `want` rows and changed `got`: another writer was there.
fn rows(got: u64, want: usize, what: &str) -> Result<(), StoreError> {
    if got == want as u64 {
        Ok(())
    } else {
        Err(StoreError::Conflict(format!(
            "{what}: {got} of {want} rows changed"
        )))
    }
}

/// Writes the batch's changes, one statement per table, in one round trip.
async fn write(db: &Db<'_>, ch: &Changes, chain: &Chain) -> Result<(), StoreError> {
    // Devices.
    let d_serial: Vec<i64> = ch.devices.iter().map(|(d, _)| i(d.serial)).collect();
    let d_spki: Vec<&[u8]> = ch.devices.iter().map(|(d, _)| d.spki.as_slice()).collect();
    let d_hash: Vec<&[u8]> = ch.devices.iter().map(|(_, h)| h.as_slice()).collect();
    let d_cert: Vec<&[u8]> = ch
        .devices
        .iter()
        .map(|(d, _)| d.certificate.as_slice())
        .collect();
    let d_line: Vec<&str> = ch.devices.iter().map(|(d, _)| d.line.as_str()).collect();
    let d_token: Vec<&[u8]> = ch
        .devices
        .iter()
        .map(|(d, _)| d.token_id.as_slice())
        .collect();
    let d_at: Vec<i64> = ch.devices.iter().map(|(d, _)| i(d.enrolled_at)).collect();
    let d_status: Vec<&str> = ch
        .devices
        .iter()
        .map(|(d, _)| status_name(d.status))
        .collect();
    let d_revoked: Vec<Option<i64>> = ch.devices.iter().map(|(d, _)| oi(d.revoked_at)).collect();
    let p_devices: [P<'_>; 9] = [
        &d_serial, &d_spki, &d_hash, &d_cert, &d_line, &d_token, &d_at, &d_status, &d_revoked,
    ];
    // Keys, tokens, line counts.
    let k_hash: Vec<&[u8]> = ch.keys.iter().map(|(h, _)| h.as_slice()).collect();
    let k_serial: Vec<i64> = ch.keys.iter().map(|(_, s)| i(*s)).collect();
    let t_line: Vec<&str> = ch.tokens.iter().map(|t| t.0.as_str()).collect();
    let t_id: Vec<&[u8]> = ch.tokens.iter().map(|t| t.1.as_slice()).collect();
    let t_serial: Vec<i64> = ch.tokens.iter().map(|t| i(t.2)).collect();
    let l_id: Vec<&str> = ch.line_counts.keys().map(String::as_str).collect();
    let l_n: Vec<i64> = ch.line_counts.values().map(|n| i(*n)).collect();
    // Secret keys, claims, versions, deliveries, acknowledgements, pool.
    let sk_tag: Vec<&[u8]> = ch.secret_keys.iter().map(|s| s.0.as_slice()).collect();
    let sk_id: Vec<&str> = ch.secret_keys.iter().map(|s| s.1.as_str()).collect();
    let sk_serial: Vec<Option<i64>> = ch.secret_keys.iter().map(|s| s.2.map(|h| i(h.0))).collect();
    let sk_version: Vec<Option<i64>> = ch.secret_keys.iter().map(|s| s.2.map(|h| i(h.1))).collect();
    let c_tag: Vec<&[u8]> = ch.claims.iter().map(|c| c.0.as_slice()).collect();
    let c_serial: Vec<i64> = ch.claims.iter().map(|c| i(c.1)).collect();
    let c_version: Vec<i64> = ch.claims.iter().map(|c| i(c.2)).collect();
    let v = || ch.versions.values();
    let v_serial: Vec<i64> = v().map(|r| i(r.serial)).collect();
    let v_version: Vec<i64> = v().map(|r| i(r.version)).collect();
    let v_id: Vec<&str> = v().map(|r| r.key_id.as_str()).collect();
    let v_ct: Vec<&[u8]> = v().map(|r| r.ciphertext.as_slice()).collect();
    let v_nonce: Vec<&[u8]> = v().map(|r| r.nonce.as_slice()).collect();
    let v_kcv: Vec<&[u8]> = v().map(|r| r.kcv.as_slice()).collect();
    let v_tag: Vec<&[u8]> = v().map(|r| r.index_tag.as_slice()).collect();
    let v_source: Vec<&str> = v().map(|r| r.source.as_str()).collect();
    let v_created: Vec<i64> = v().map(|r| i(r.created_at)).collect();
    let v_delivered: Vec<Option<i64>> = v().map(|r| oi(r.delivered_at)).collect();
    let v_confirmed: Vec<Option<i64>> = v().map(|r| oi(r.confirmed_at)).collect();
    let v_retired: Vec<Option<i64>> = v().map(|r| oi(r.retired_at)).collect();
    let p_versions: [P<'_>; 12] = [
        &v_serial,
        &v_version,
        &v_id,
        &v_ct,
        &v_nonce,
        &v_kcv,
        &v_tag,
        &v_source,
        &v_created,
        &v_delivered,
        &v_confirmed,
        &v_retired,
    ];
    let triple = |xs: &[(u64, u64, u64)]| -> [Vec<i64>; 3] {
        [
            xs.iter().map(|x| i(x.0)).collect(),
            xs.iter().map(|x| i(x.1)).collect(),
            xs.iter().map(|x| i(x.2)).collect(),
        ]
    };
    let [dl_serial, dl_version, dl_at] = triple(&ch.delivered);
    let [cf_serial, cf_version, cf_at] = triple(&ch.confirmed);
    let taken: Vec<&str> = ch.taken.iter().map(String::as_str).collect();
    let po_id: Vec<&str> = ch.pool.iter().map(|p| p.key_id.as_str()).collect();
    let po_ct: Vec<&[u8]> = ch.pool.iter().map(|p| p.ciphertext.as_slice()).collect();
    let po_nonce: Vec<&[u8]> = ch.pool.iter().map(|p| p.nonce.as_slice()).collect();
    let po_kcv: Vec<&[u8]> = ch.pool.iter().map(|p| p.kcv.as_slice()).collect();
    let po_tag: Vec<&[u8]> = ch.pool.iter().map(|p| p.index_tag.as_slice()).collect();
    let po_at: Vec<i64> = ch.pool.iter().map(|p| i(p.imported_at)).collect();
    let dn_id: Vec<&str> = ch.dukpt_next.keys().map(String::as_str).collect();
    let dn_before: Vec<i64> = ch.dukpt_next.values().map(|v| i(v.0)).collect();
    let dn_next: Vec<i64> = ch.dukpt_next.values().map(|v| i(v.1)).collect();
    // Audit.
    let a = || ch.audit.iter();
    let a_seq: Vec<i64> = a().map(|e| i(e.seq)).collect();
    let a_at: Vec<i64> = a().map(|e| i(e.at)).collect();
    let a_event: Vec<&str> = a().map(|e| e.event.as_str()).collect();
    let a_serial: Vec<Option<i64>> = a().map(|e| oi(e.serial)).collect();
    let a_actor: Vec<&str> = a().map(|e| e.actor.as_str()).collect();
    let a_detail: Vec<&str> = a().map(|e| e.detail.as_str()).collect();
    let a_prev: Vec<&[u8]> = a().map(|e| e.prev_hash.as_slice()).collect();
    let a_hash: Vec<&[u8]> = a().map(|e| e.hash.as_slice()).collect();
    let a_node: Vec<Option<&str>> = a().map(|e| e.node.as_deref()).collect();
    let a_mac: Vec<Option<&[u8]>> = a().map(|e| e.mac.as_deref()).collect();
    let p_audit: [P<'_>; 10] = [
        &a_seq, &a_at, &a_event, &a_serial, &a_actor, &a_detail, &a_prev, &a_hash, &a_node, &a_mac,
    ];
    let head_seq = i(chain.0);
    let head_hash = chain.1.as_slice();

    db.prepare(&[
        INSERT_SECRET_KEYS,
        CLAIM_POOL_KEYS,
        INSERT_VERSIONS,
        SET_DELIVERED,
        SET_CONFIRMED,
        TAKE_POOL,
        INSERT_POOL,
        INSERT_DEVICES,
        INSERT_KEYS,
        INSERT_TOKENS,
        COUNT_LINES,
        INSERT_AUDITS,
        SET_HEAD,
        MOVE_DUKPT_NEXT,
    ])
    .await?;
    let p_secret_keys: [P<'_>; 4] = [&sk_tag, &sk_id, &sk_serial, &sk_version];
    let p_claims: [P<'_>; 3] = [&c_tag, &c_serial, &c_version];
    let p_delivered: [P<'_>; 3] = [&dl_serial, &dl_version, &dl_at];
    let p_confirmed: [P<'_>; 3] = [&cf_serial, &cf_version, &cf_at];
    let p_taken: [P<'_>; 1] = [&taken];
    let p_pool: [P<'_>; 6] = [&po_id, &po_ct, &po_nonce, &po_kcv, &po_tag, &po_at];
    let p_keys: [P<'_>; 2] = [&k_hash, &k_serial];
    let p_tokens: [P<'_>; 3] = [&t_line, &t_id, &t_serial];
    let p_lines: [P<'_>; 2] = [&l_id, &l_n];
    let p_head: [P<'_>; 2] = [&head_seq, &head_hash];
    let p_dukpt: [P<'_>; 3] = [&dn_id, &dn_before, &dn_next];
    // In this order on the wire: secret-key rows before the versions and pool entries that
    // reference them.
    let (sk, claimed, _, delivered, confirmed, taken_n, _, _, _, _, counted, _, _, moved) = tokio::try_join!(
        db.exec_if(!sk_tag.is_empty(), INSERT_SECRET_KEYS, &p_secret_keys),
        db.exec_if(!c_tag.is_empty(), CLAIM_POOL_KEYS, &p_claims),
        db.exec_if(!v_serial.is_empty(), INSERT_VERSIONS, &p_versions),
        db.exec_if(!dl_serial.is_empty(), SET_DELIVERED, &p_delivered),
        db.exec_if(!cf_serial.is_empty(), SET_CONFIRMED, &p_confirmed),
        db.exec_if(!taken.is_empty(), TAKE_POOL, &p_taken),
        db.exec_if(!po_id.is_empty(), INSERT_POOL, &p_pool),
        db.exec_if(!d_serial.is_empty(), INSERT_DEVICES, &p_devices),
        db.exec_if(!k_hash.is_empty(), INSERT_KEYS, &p_keys),
        db.exec_if(!t_line.is_empty(), INSERT_TOKENS, &p_tokens),
        db.exec_if(!l_id.is_empty(), COUNT_LINES, &p_lines),
        db.exec_if(!a_seq.is_empty(), INSERT_AUDITS, &p_audit),
        db.exec_if(!a_seq.is_empty(), SET_HEAD, &p_head),
        db.exec_if(!dn_id.is_empty(), MOVE_DUKPT_NEXT, &p_dukpt),
    )?;
    rows(sk, sk_tag.len(), "secret keys")?;
    rows(claimed, c_tag.len(), "pool keys")?;
    rows(delivered, dl_serial.len(), "deliveries")?;
    rows(confirmed, cf_serial.len(), "acknowledgements")?;
    rows(taken_n, taken.len(), "pool entries")?;
    rows(counted, l_id.len(), "line counts")?;
    rows(moved, dn_id.len(), "DUKPT counters")?;
    Ok(())
}
