//! The verification pass after the run. With the embedded CA it reads the CA's store, one
//! record at a time: there is one record per device run; every certificate chains to the CA
//! and matches its device's key; every certificate a device stored is the one on record; no
//! public key, secret (each version unsealed with the key-encryption key the simulator made)
//! or key id belongs to two devices; the key, token, secret and key-id indices agree with the
//! records both ways; the audit log verifies as `ca-server audit verify` verifies it, and holds
//! each device's enroll, secret-deliver and secret-ack entries. A remote CA's store cannot be
//! read, so the pass is device-side instead: from what each device saw ([`Evidence`]), every
//! certificate chains to the pinned CA and matches its device's serial and key, no public key,
//! certificate serial, secret or key id belongs to two devices, and every device acknowledged a
//! secret version.

use ca_server::audit;
use ca_server::records::{AuditEntry, from_cbor};
use ca_server::secrets::SecretKeys;
use ca_server::store::{Index, IndexEntry, Store, token_index_key};
use protocol_spec::profile::CertProfile;
use protocol_spec::{DeviceSerial, spki};
use serde::Serialize;

/// What the pass found, and where it looked.
#[derive(Debug, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Verification {
    /// Against the embedded CA's store.
    Store(StoreVerification),
    /// Device-side, for a remote CA.
    DeviceSide(DeviceSideVerification),
}

impl Verification {
    /// Every check passed.
    pub fn ok(&self) -> bool {
        match self {
            Verification::Store(v) => v.ok,
            Verification::DeviceSide(v) => v.ok,
        }
    }

    /// Where the pass looked, for people.
    pub fn label(&self) -> &'static str {
        match self {
            Verification::Store(_) => "against the CA's store",
            Verification::DeviceSide(_) => "device-side: a remote CA's store cannot be read",
        }
    }

    /// The first few problems found.
    pub fn problems(&self) -> &[String] {
        match self {
            Verification::Store(v) => &v.problems,
            Verification::DeviceSide(v) => &v.problems,
        }
    }

    /// One line of figures.
    pub fn figures(&self) -> String {
        match self {
            Verification::Store(v) => {
                format!(
                    "{} records for {} devices, {} certificates valid, {}/{} device certificates match the store, {} confirmed secrets, {} secrets unsealed, {} DUKPT Initial Keys derived again from the BDK ({} wrong), {} shared keys, {} shared secrets, {} shared key ids, {} index mismatches, {} devices missing audit entries, audit log of {} entries {}",
                    v.records,
                    v.devices_run,
                    v.certificates_valid,
                    v.devices_matching_store,
                    v.devices_with_certificate,
                    v.devices_with_confirmed_secret,
                    v.secrets_unsealed,
                    v.dukpt_initial_keys_verified,
                    v.dukpt_initial_keys_wrong,
                    v.shared_keys,
                    v.shared_secrets,
                    v.shared_key_ids,
                    v.index_mismatches,
                    v.devices_missing_audit_entries,
                    v.audit_entries,
                    if v.audit_chain_ok { "intact" } else { "BROKEN" }
                ) + &if v.audit_entries_by_node.len() > 1 {
                    format!(
                        " (by node: {})",
                        v.audit_entries_by_node
                            .iter()
                            .map(|(n, c)| format!("{n} {c}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                }
            }
            Verification::DeviceSide(v) => format!(
                "{} devices with a certificate, {} certificates valid against the pinned CA, {} acknowledged secrets, {} shared keys, {} shared certificate serials, {} shared secrets, {} shared key ids",
                v.devices_with_certificate,
                v.certificates_valid,
                v.devices_with_acked_secret,
                v.shared_keys,
                v.shared_certificate_serials,
                v.shared_secrets,
                v.shared_key_ids
            ),
        }
    }
}

/// What the pass against the embedded CA's store found.
#[derive(Debug, Default, Serialize)]
pub struct StoreVerification {
    /// Devices the run asked for (each must have exactly one record).
    pub devices_run: u64,
    /// Device records in the store.
    pub records: u64,
    /// Records whose certificate passed the profile lint (chain, key, serial, fields).
    pub certificates_valid: u64,
    /// Devices that stored a certificate.
    pub devices_with_certificate: u64,
    /// ... whose certificate is byte for byte the one on record.
    pub devices_matching_store: u64,
    /// Devices holding a certificate the store has no record of (must be 0).
    pub devices_missing_from_store: u64,
    /// Public keys bound to more than one serial (must be 0).
    pub shared_keys: u64,
    /// Index entries (key, token, secret, key id) that disagree with the records, checked
    /// from the records to the index and from the index to the records (must be 0).
    pub index_mismatches: u64,
    /// Secret versions in the store.
    pub secret_versions: u64,
    /// Devices with a secret delivered and confirmed (serial -> key -> key id -> version).
    pub devices_with_confirmed_secret: u64,
    /// Secret versions unsealed with the key-encryption key.
    pub secrets_unsealed: u64,
    /// Secrets held by more than one device (must be 0), found by unsealing every version.
    pub shared_secrets: u64,
    /// Key ids held by more than one secret version (must be 0).
    pub shared_key_ids: u64,
    /// DUKPT versions whose unsealed Initial Key equals the one derived again here from the
    /// stored BDK and the version's Initial Key ID (ANSI X9.24-3-2017).
    pub dukpt_initial_keys_verified: u64,
    /// DUKPT versions whose Initial Key is not the BDK's for its Initial Key ID, or whose
    /// BDK or Initial Key ID cannot be read (must be 0).
    pub dukpt_initial_keys_wrong: u64,
    /// Devices missing one of the audit entries of their life: enroll and, with secrets,
    /// secret-deliver and secret-ack (must be 0).
    pub devices_missing_audit_entries: u64,
    /// Audit entries, and whether the hash chain verified.
    pub audit_entries: u64,
    /// Whether the audit log verified from the first entry to the last (each entry's own hash,
    /// its link to the one before, its encoding: the CA's own `audit verify`).
    pub audit_chain_ok: bool,
    /// Audit entries by the CA node that wrote them (one chain over all of them).
    pub audit_entries_by_node: std::collections::BTreeMap<String, u64>,
    /// Every check passed.
    pub ok: bool,
    /// The first few problems found, for the report.
    pub problems: Vec<String>,
}

/// Problems kept for the report.
const MAX_PROBLEMS: usize = 20;

fn note(problems: &mut Vec<String>, p: String) {
    if problems.len() < MAX_PROBLEMS {
        problems.push(p);
    }
}

impl StoreVerification {
    fn problem(&mut self, p: String) {
        note(&mut self.problems, p);
    }

    fn mismatch(&mut self, p: String) {
        self.index_mismatches += 1;
        self.problem(p);
    }
}

/// A DUKPT version against the BDK: its key id is its Initial Key ID, whose first 4 octets name
/// the BDK; the Initial Key derived here from that BDK must be the one the CA sealed.
fn check_initial_key(
    v: &mut StoreVerification,
    bdks: &std::collections::HashMap<String, protocol_spec::dukpt::Bdk>,
    sv: &ca_server::records::SecretRecord,
    secret: &[u8],
) {
    let what = format!("serial {} version {}", sv.serial, sv.version);
    let Ok(id) = protocol_spec::dukpt::InitialKeyId::from_hex(&sv.key_id) else {
        v.dukpt_initial_keys_wrong += 1;
        v.problem(format!(
            "{what}: key id {:?} is not an Initial Key ID",
            sv.key_id
        ));
        return;
    };
    let Some(bdk) = bdks.get(&id.bdk_id().to_string()) else {
        v.dukpt_initial_keys_wrong += 1;
        v.problem(format!(
            "{what}: no BDK {} for Initial Key ID {id}",
            id.bdk_id()
        ));
        return;
    };
    if protocol_spec::dukpt::initial_key(bdk, id).expose() == secret {
        v.dukpt_initial_keys_verified += 1;
    } else {
        v.dukpt_initial_keys_wrong += 1;
        v.problem(format!(
            "{what}: the Initial Key is not the BDK's for Initial Key ID {id}"
        ));
    }
}

/// Audit events each device of a run must have (bits of [`AuditSeen`]).
const SEEN_ENROLL: u8 = 1;
const SEEN_DELIVER: u8 = 2;
const SEEN_ACK: u8 = 4;

/// Which audit events each device of the run has, by device index (one byte per device), and
/// how many entries each CA node wrote.
struct AuditSeen(Vec<u8>, std::collections::BTreeMap<String, u64>);

impl AuditSeen {
    fn mark(&mut self, value: &[u8]) {
        let Ok(e) = from_cbor::<AuditEntry>(value) else {
            return; // `audit::verify` names the entry that does not decode.
        };
        *self
            .1
            .entry(e.node.clone().unwrap_or_else(|| "(unnamed)".into()))
            .or_default() += 1;
        let bit = match e.event.as_str() {
            "enroll" => SEEN_ENROLL,
            "secret-deliver" => SEEN_DELIVER,
            "secret-ack" => SEEN_ACK,
            _ => return,
        };
        if let Some(slot) = e
            .serial
            .and_then(|s| s.checked_sub(1))
            .and_then(|i| self.0.get_mut(usize::try_from(i).ok()?))
        {
            *slot |= bit;
        }
    }
}

/// Runs the pass over a stopped CA's store (sled or PostgreSQL). `received[i]` is the SHA-256
/// of the certificate device `i` stored (serial `i + 1`; zeros: none); `kek` unseals the
/// secrets. The store is read one record at a time; what is kept is a few bytes per device
/// (digests sorted to find what two devices share). Each index is checked against the records
/// as a multiset: a sum of one digest per entry, which equals the sum over what the records
/// say the index must hold exactly when both hold the same entries; only when they differ is
/// the index read again to name the entries at fault.
pub fn verify_store(
    store: &dyn Store,
    ca_der: &[u8],
    kek: &SecretKeys,
    received: &[[u8; 32]],
    secrets: bool,
) -> Result<StoreVerification, String> {
    let profile = CertProfile::from_ca_der(ca_der).map_err(|e| e.to_string())?;
    let err = |e: ca_server::store::StoreError| e.to_string();
    let mut v = StoreVerification {
        devices_run: received.len() as u64,
        ..StoreVerification::default()
    };

    // The audit log: the CA's own verification, and on the way which events each device has.
    let mut seen = AuditSeen(vec![0u8; received.len()], Default::default());
    let verdict = audit::verify(
        store.audit_raw(0).inspect(|r| {
            if let Ok((_, value)) = r {
                seen.mark(value);
            }
        }),
        None,
        Some(&kek.audit_key()),
        None,
    )
    .map_err(err)?;
    v.audit_entries = verdict.entries;
    v.audit_chain_ok = verdict.ok();
    v.audit_entries_by_node = std::mem::take(&mut seen.1);
    if let Some(bad) = &verdict.first_bad {
        v.problem(format!("audit log: {}", bad.reason));
    }

    // Device records, and the index entries each one must have.
    let mut expected = IndexSums::default();
    let mut keys: Vec<([u8; 16], u64)> = Vec::with_capacity(received.len());
    let mut plaintexts: Vec<([u8; 16], u64)> = Vec::new();
    let mut key_ids: Vec<([u8; 16], u64)> = Vec::new();
    let mut on_record = vec![false; received.len()];
    for rec in store.devices() {
        let rec = rec.map_err(err)?;
        v.records += 1;
        let Some(serial) = DeviceSerial::new(rec.serial) else {
            v.problem("record with serial 0".to_string());
            continue;
        };
        match profile.lint(&rec.certificate, serial, &rec.spki) {
            Ok(()) => v.certificates_valid += 1,
            Err(e) => v.problem(format!("serial {}: {e}", rec.serial)),
        }
        let index = (rec.serial - 1) as usize;
        match (received.get(index), on_record.get_mut(index)) {
            (Some(got), Some(slot)) => {
                *slot = true;
                let d = ring::digest::digest(&ring::digest::SHA256, &rec.certificate);
                if *got != [0u8; 32] && got.as_slice() != d.as_ref() {
                    v.problem(format!(
                        "serial {}: device holds another certificate than the store",
                        rec.serial
                    ));
                } else if *got != [0u8; 32] {
                    v.devices_matching_store += 1;
                }
                let events = seen.0.get(index).copied().unwrap_or(0);
                let want = if secrets {
                    SEEN_ENROLL | SEEN_DELIVER | SEEN_ACK
                } else {
                    SEEN_ENROLL
                };
                if events & want != want {
                    v.devices_missing_audit_entries += 1;
                    v.problem(format!(
                        "serial {}: audit log lacks its {}",
                        rec.serial,
                        [
                            (SEEN_ENROLL, "enroll"),
                            (SEEN_DELIVER, "secret-deliver"),
                            (SEEN_ACK, "secret-ack"),
                        ]
                        .iter()
                        .filter(|(bit, _)| want & bit != 0 && events & bit == 0)
                        .map(|(_, name)| *name)
                        .collect::<Vec<_>>()
                        .join(" and ")
                    ));
                }
            }
            _ => v.problem(format!(
                "serial {}: a record for a serial no device of this run has",
                rec.serial
            )),
        }
        keys.push((digest16(&rec.spki), rec.serial));
        for (index, key) in expected_of_device(&rec) {
            expected.add(index, &key, (rec.serial, 0));
        }
    }

    // The DUKPT BDKs, opened with the KEK, for an independent derivation of each Initial Key.
    let mut bdks = std::collections::HashMap::new();
    for b in store.bdks().map_err(err)? {
        match kek.open_bdk(&b) {
            Ok(k) => {
                bdks.insert(b.id.clone(), k);
            }
            Err(e) => v.problem(format!("BDK {}: {e}", b.id)),
        }
    }

    // Secret versions: each a version of a device on record, unsealed with the KEK.
    for sv in store.secrets() {
        let sv = sv.map_err(err)?;
        v.secret_versions += 1;
        let known = sv
            .serial
            .checked_sub(1)
            .and_then(|i| on_record.get(usize::try_from(i).ok()?))
            .copied()
            .unwrap_or(false);
        if !known {
            v.problem(format!(
                "serial {} version {}: a secret version of a serial with no device record",
                sv.serial, sv.version
            ));
        }
        match kek.open_version(&sv) {
            Ok(secret) => {
                v.secrets_unsealed += 1;
                if sv.source.starts_with("dukpt-") {
                    check_initial_key(&mut v, &bdks, &sv, &secret);
                }
                plaintexts.push((digest16(secret.as_slice()), sv.serial));
                if kek.index_tag(&secret) != sv.index_tag {
                    v.mismatch(format!(
                        "serial {} version {}: the index tag is not the sealed secret's",
                        sv.serial, sv.version
                    ));
                }
            }
            Err(e) => v.problem(format!("serial {} version {}: {e}", sv.serial, sv.version)),
        }
        key_ids.push((digest16(sv.key_id.as_bytes()), sv.serial));
        for (index, key) in expected_of_version(&sv) {
            expected.add(index, &key, (sv.serial, sv.version));
        }
        if known && sv.version == 1 && sv.delivered_at.is_some() && sv.confirmed_at.is_some() {
            v.devices_with_confirmed_secret += 1;
        }
    }

    // Each index against the records, both ways at once (equal multisets).
    for index in Index::ALL {
        let mut actual = IndexSums::default();
        let mut unreadable = false;
        for entry in store.index(index) {
            match entry {
                Ok(IndexEntry {
                    key,
                    holder: Some(holder),
                }) => actual.add(index, &key, holder),
                // An imported key still in the pool: no device's.
                Ok(IndexEntry { holder: None, .. }) => {}
                Err(e) => {
                    unreadable = true;
                    v.mismatch(format!("{} index: {e}", index.name()));
                }
            }
        }
        if actual.get(index) != expected.get(index) && !unreadable {
            name_index_differences(store, index, &mut v)?;
        }
    }

    // What two devices share.
    v.shared_keys = shared(&mut keys, "the same public key", &mut v.problems);
    v.shared_secrets = shared(&mut plaintexts, "the same secret", &mut v.problems);
    v.shared_key_ids = shared(&mut key_ids, "secrets with one key id", &mut v.problems);

    for (i, got) in received.iter().enumerate() {
        if *got == [0u8; 32] {
            continue;
        }
        v.devices_with_certificate += 1;
        if !on_record.get(i).copied().unwrap_or(false) {
            v.devices_missing_from_store += 1;
            v.problem(format!(
                "serial {}: device holds a certificate the store has no record of",
                i + 1
            ));
        }
    }
    if v.records != v.devices_run {
        v.problem(format!(
            "{} device records for {} devices run",
            v.records, v.devices_run
        ));
    }
    if secrets && v.devices_with_confirmed_secret != v.devices_with_certificate {
        v.problem(format!(
            "{} of {} enrolled devices have a delivered and confirmed secret",
            v.devices_with_confirmed_secret, v.devices_with_certificate
        ));
    }
    v.ok = v.problems.is_empty()
        && v.dukpt_initial_keys_wrong == 0
        && v.certificates_valid == v.records
        && v.devices_matching_store == v.devices_with_certificate
        && v.shared_keys == 0
        && v.shared_secrets == 0
        && v.shared_key_ids == 0
        && v.index_mismatches == 0
        && v.devices_missing_audit_entries == 0
        && v.audit_chain_ok;
    Ok(v)
}

/// The key and token index entries a device record must have.
fn expected_of_device(rec: &ca_server::records::DeviceRecord) -> [(Index, Vec<u8>); 2] {
    [
        (Index::Keys, spki::sha256(&rec.spki).to_vec()),
        (Index::Tokens, token_index_key(&rec.line, &rec.token_id)),
    ]
}

/// The secret-index and key-id entries a secret version must have.
fn expected_of_version(sv: &ca_server::records::SecretRecord) -> [(Index, Vec<u8>); 2] {
    [
        (Index::SecretTags, sv.index_tag.clone()),
        (Index::KeyIds, sv.key_id.as_bytes().to_vec()),
    ]
}

/// The digest of one index entry (index, value, holder), 128 bits.
fn entry_digest(index: Index, key: &[u8], (serial, version): (u64, u64)) -> u128 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(index.name().as_bytes());
    ctx.update(&(key.len() as u64).to_be_bytes());
    ctx.update(key);
    ctx.update(&serial.to_be_bytes());
    ctx.update(&version.to_be_bytes());
    let d = ctx.finish();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d.as_ref()[..16]);
    u128::from_be_bytes(b)
}

/// Per index: how many entries, and the sum (mod 2^128) of their digests. Two multisets of
/// entries with equal counts and sums are equal but with negligible chance.
#[derive(Default)]
struct IndexSums([(u64, u128); 4]);

impl IndexSums {
    fn slot(index: Index) -> usize {
        match index {
            Index::Keys => 0,
            Index::Tokens => 1,
            Index::SecretTags => 2,
            Index::KeyIds => 3,
        }
    }

    fn add(&mut self, index: Index, key: &[u8], holder: (u64, u64)) {
        let s = &mut self.0[Self::slot(index)];
        s.0 += 1;
        s.1 = s.1.wrapping_add(entry_digest(index, key, holder));
    }

    fn get(&self, index: Index) -> (u64, u128) {
        self.0[Self::slot(index)]
    }
}

/// An index that differs from the records: reads both again, holding their digests this time,
/// and names the entries on one side only.
fn name_index_differences(
    store: &dyn Store,
    index: Index,
    v: &mut StoreVerification,
) -> Result<(), String> {
    let err = |e: ca_server::store::StoreError| e.to_string();
    let mut want: Vec<(u128, u64, u64)> = Vec::new();
    match index {
        Index::Keys | Index::Tokens => {
            for rec in store.devices() {
                let rec = rec.map_err(err)?;
                for (i, key) in expected_of_device(&rec) {
                    if i == index {
                        want.push((entry_digest(index, &key, (rec.serial, 0)), rec.serial, 0));
                    }
                }
            }
        }
        Index::SecretTags | Index::KeyIds => {
            for sv in store.secrets() {
                let sv = sv.map_err(err)?;
                for (i, key) in expected_of_version(&sv) {
                    if i == index {
                        let h = (sv.serial, sv.version);
                        want.push((entry_digest(index, &key, h), sv.serial, sv.version));
                    }
                }
            }
        }
    }
    let mut have: Vec<(u128, u64, u64, Vec<u8>)> = Vec::new();
    for e in store.index(index) {
        let e = e.map_err(err)?;
        if let Some((serial, version)) = e.holder {
            have.push((
                entry_digest(index, &e.key, (serial, version)),
                serial,
                version,
                e.key,
            ));
        }
    }
    want.sort_unstable();
    have.sort_unstable();
    let before = v.index_mismatches;
    if want.len() != have.len() {
        v.mismatch(format!(
            "the {} index holds {} entries for {} the records call for",
            index.name(),
            have.len(),
            want.len()
        ));
    }
    let who = |serial: u64, version: u64| match index {
        Index::Keys | Index::Tokens => format!("serial {serial}"),
        Index::SecretTags | Index::KeyIds => format!("serial {serial} version {version}"),
    };
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < have.len() {
        match (want.get(i), have.get(j)) {
            (Some(w), Some(h)) if w.0 == h.0 => {
                i += 1;
                j += 1;
            }
            (Some(w), h) if h.is_none_or(|h| w.0 < h.0) => {
                v.mismatch(format!(
                    "{}: no {} index entry names it",
                    who(w.1, w.2),
                    index.name()
                ));
                i += 1;
            }
            (_, Some(h)) => {
                v.mismatch(format!(
                    "{} index entry {} names {}, whose record does not hold it",
                    index.name(),
                    hex::encode(&h.3),
                    who(h.1, h.2)
                ));
                j += 1;
            }
            (_, None) => i += 1,
        }
    }
    if v.index_mismatches == before {
        v.mismatch(format!(
            "the {} index differs from the records",
            index.name()
        ));
    }
    Ok(())
}

/// Values held by more than one serial in `items` (value, serial): sorted in place, each
/// repeat counted once and noted.
fn shared(items: &mut [([u8; 16], u64)], what: &str, problems: &mut Vec<String>) -> u64 {
    items.sort_unstable();
    let mut n = 0;
    for pair in items.windows(2) {
        if let [(a, i), (b, j)] = pair
            && a == b
        {
            n += 1;
            note(problems, format!("serials {i} and {j} hold {what}"));
        }
    }
    n
}

/// What one device saw, kept for the device-side pass. Digests are SHA-256 cut to 128 bits:
/// ample to tell millions of values apart, and only ever held in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Evidence {
    /// The device serial (0: the device did not finish).
    pub serial: u64,
    /// The serial number its certificate carries (0: unreadable).
    pub certificate_serial: u64,
    /// Whether its certificate passed the profile lint: issued by the pinned CA (signature
    /// verified), for this serial and this device's key, every field as the profile says.
    pub certificate_valid: bool,
    /// Digest of its public key (SPKI DER).
    pub key: [u8; 16],
    /// Digest of the secret it acknowledged (zeros: none).
    pub secret: [u8; 16],
    /// Digest of that secret's key id.
    pub key_id: [u8; 16],
    /// The secret version it acknowledged (0: none).
    pub acked_version: u64,
}

/// SHA-256 of `bytes`, cut to 128 bits.
pub fn digest16(bytes: &[u8]) -> [u8; 16] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// What the device-side pass found.
#[derive(Debug, Default, Serialize)]
pub struct DeviceSideVerification {
    /// Devices that hold a certificate.
    pub devices_with_certificate: u64,
    /// ... whose certificate chains to the pinned CA and matches its serial and key.
    pub certificates_valid: u64,
    /// Public keys held by more than one device (must be 0).
    pub shared_keys: u64,
    /// Certificate serial numbers held by more than one device (must be 0).
    pub shared_certificate_serials: u64,
    /// Devices that acknowledged a secret version (with secrets: all of them).
    pub devices_with_acked_secret: u64,
    /// Secrets held by more than one device (must be 0).
    pub shared_secrets: u64,
    /// Secret key ids held by more than one device (must be 0).
    pub shared_key_ids: u64,
    /// Every check passed.
    pub ok: bool,
    /// The first few problems found, for the report.
    pub problems: Vec<String>,
}

/// Runs the device-side pass over what the devices saw (`evidence[i]` for device `i`; a
/// device that did not finish has serial 0 and is not counted). With `secrets`, every device
/// must have acknowledged a secret version.
pub fn verify_devices(evidence: &[Evidence], secrets: bool) -> DeviceSideVerification {
    let mut v = DeviceSideVerification::default();
    let done: Vec<&Evidence> = evidence.iter().filter(|e| e.serial != 0).collect();
    v.devices_with_certificate = done.len() as u64;
    for e in &done {
        if e.certificate_valid && e.certificate_serial == e.serial {
            v.certificates_valid += 1;
        } else if !e.certificate_valid {
            note(
                &mut v.problems,
                format!(
                    "serial {}: certificate does not pass the profile lint against the pinned CA",
                    e.serial
                ),
            );
        } else {
            note(
                &mut v.problems,
                format!(
                    "serial {}: certificate carries serial {}",
                    e.serial, e.certificate_serial
                ),
            );
        }
        if e.acked_version != 0 {
            v.devices_with_acked_secret += 1;
        }
    }
    let serial_of = |i: usize| done.get(i).map_or(0, |e| e.serial);
    v.shared_keys = duplicates(
        &done,
        |e| e.key,
        |a, b| {
            format!(
                "serials {} and {} hold the same public key",
                serial_of(a),
                serial_of(b)
            )
        },
        &mut v.problems,
    );
    v.shared_certificate_serials = duplicates(
        &done,
        |e| e.certificate_serial,
        |a, b| {
            format!(
                "serials {} and {} hold certificates with one serial number",
                serial_of(a),
                serial_of(b)
            )
        },
        &mut v.problems,
    );
    let acked: Vec<&Evidence> = done
        .iter()
        .copied()
        .filter(|e| e.acked_version != 0)
        .collect();
    let acked_serial = |i: usize| acked.get(i).map_or(0, |e| e.serial);
    v.shared_secrets = duplicates(
        &acked,
        |e| e.secret,
        |a, b| {
            format!(
                "serials {} and {} hold the same secret",
                acked_serial(a),
                acked_serial(b)
            )
        },
        &mut v.problems,
    );
    v.shared_key_ids = duplicates(
        &acked,
        |e| e.key_id,
        |a, b| {
            format!(
                "serials {} and {} hold secrets with one key id",
                acked_serial(a),
                acked_serial(b)
            )
        },
        &mut v.problems,
    );
    if secrets && v.devices_with_acked_secret != v.devices_with_certificate {
        note(
            &mut v.problems,
            format!(
                "{} of {} enrolled devices acknowledged a secret",
                v.devices_with_acked_secret, v.devices_with_certificate
            ),
        );
    }
    v.ok = v.problems.is_empty() && v.certificates_valid == v.devices_with_certificate;
    v
}

/// Values that occur more than once among `items` (each repeat counted once), found by
/// sorting (a few bytes per device, where a hash set would cost several times more).
fn duplicates<T: Ord + Copy>(
    items: &[&Evidence],
    value: impl Fn(&Evidence) -> T,
    describe: impl Fn(usize, usize) -> String,
    problems: &mut Vec<String>,
) -> u64 {
    let mut sorted: Vec<(T, usize)> = items
        .iter()
        .enumerate()
        .map(|(i, e)| (value(e), i))
        .collect();
    sorted.sort_unstable();
    let mut n = 0;
    for pair in sorted.windows(2) {
        if let [(a, i), (b, j)] = pair
            && a == b
        {
            n += 1;
            note(problems, describe(*i, *j));
        }
    }
    n
}

/// The serial number of a DER certificate, if it fits in 64 bits (RFC 5280 section 4.1):
///
/// ```text
/// Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
///     [0] EXPLICIT version OPTIONAL, serialNumber INTEGER, ... }, ... }
/// ```
pub fn certificate_serial(der: &[u8]) -> Option<u64> {
    let cert = inside(der, 0x30)?;
    let mut tbs = inside(cert, 0x30)?;
    if tbs.first() == Some(&0xa0) {
        let (header, len) = tlv_header(tbs)?;
        tbs = tbs.get(header.checked_add(len)?..)?;
    }
    let bytes = inside(tbs, 0x02)?;
    // DER INTEGER: a leading 0x00 only keeps a positive number's top bit clear.
    let digits = match bytes {
        [0, rest @ ..] => rest,
        _ if bytes.first().is_some_and(|b| b & 0x80 != 0) => return None,
        _ => bytes,
    };
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    Some(digits.iter().fold(0u64, |n, b| (n << 8) | u64::from(*b)))
}

/// The contents of the DER element at the start of `der`, if its tag is `tag`.
fn inside(der: &[u8], tag: u8) -> Option<&[u8]> {
    if der.first() != Some(&tag) {
        return None;
    }
    let (header, len) = tlv_header(der)?;
    der.get(header..header.checked_add(len)?)
}

/// (header length, contents length) of the DER element at the start of `der`.
fn tlv_header(der: &[u8]) -> Option<(usize, usize)> {
    let first = *der.get(1)?;
    if first < 0x80 {
        return Some((2, usize::from(first)));
    }
    let n = usize::from(first & 0x7f);
    if n == 0 || n > 4 {
        return None;
    }
    let len = der
        .get(2..2 + n)?
        .iter()
        .fold(0usize, |l, b| (l << 8) | usize::from(*b));
    Some((2 + n, len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use ca_server::store::SledStore;
    use protocol_spec::{KeyAlgorithm, KeyPair, profile};
    use ring::rand::SystemRandom;

    #[test]
    fn reads_the_serial_of_an_issued_certificate() {
        let rng = SystemRandom::new();
        let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let ca =
            CertProfile::from_ca_der(&profile::new_ca_certificate("t", &ca_key, 0, &rng).unwrap())
                .unwrap();
        let device = KeyPair::generate(KeyAlgorithm::P256, &rng).unwrap();
        for serial in [1u64, 127, 128, 700_001, u64::MAX >> 1, u64::MAX] {
            let Some(sn) = DeviceSerial::new(serial) else {
                continue;
            };
            let cert = ca.issue(sn, &device.spki_der(), &ca_key, &rng).unwrap();
            assert_eq!(certificate_serial(&cert.der), Some(serial), "{serial}");
        }
        assert_eq!(certificate_serial(b"\x30\x03\x02\x01"), None);
        assert_eq!(certificate_serial(&[]), None);
    }

    fn seen(serial: u64, key: u8, secret: u8) -> Evidence {
        Evidence {
            serial,
            certificate_serial: serial,
            certificate_valid: true,
            key: [key; 16],
            secret: [secret; 16],
            key_id: [secret; 16],
            acked_version: 1,
        }
    }

    #[test]
    fn the_device_side_pass_finds_shared_keys_and_secrets_and_missing_acks() {
        let good = [seen(1, 1, 1), seen(2, 2, 2), Evidence::default()];
        let v = verify_devices(&good, true);
        assert!(v.ok, "{:?}", v.problems);
        assert_eq!(v.devices_with_certificate, 2);
        assert_eq!(v.devices_with_acked_secret, 2);

        let v = verify_devices(&[seen(1, 1, 1), seen(2, 1, 1), seen(3, 3, 3)], true);
        assert!(!v.ok);
        assert_eq!(
            (v.shared_keys, v.shared_secrets, v.shared_key_ids),
            (1, 1, 1)
        );
        assert!(
            v.problems.iter().any(|p| p.contains("serials 1 and 2")),
            "{:?}",
            v.problems
        );

        let mut no_ack = seen(4, 4, 4);
        no_ack.acked_version = 0;
        assert!(!verify_devices(&[seen(1, 1, 1), no_ack], true).ok);
        assert!(verify_devices(&[seen(1, 1, 1), no_ack], false).ok);

        let mut wrong = seen(5, 5, 5);
        wrong.certificate_serial = 1;
        let v = verify_devices(&[seen(1, 1, 1), wrong], true);
        assert_eq!(v.shared_certificate_serials, 1);
        assert!(!v.ok);
    }

    /// A real store of `n` devices as a run leaves it: each enrolled on line-1 with a
    /// certificate of the CA, its secret version 1 allocated, delivered and acknowledged.
    struct Fixture {
        tmp: tempfile::TempDir,
        ca_key: KeyPair,
        ca_der: Vec<u8>,
        kek: SecretKeys,
        /// The SHA-256 of the certificate each device holds.
        received: Vec<[u8; 32]>,
        /// Each device's key and secret.
        devices: Vec<(KeyPair, [u8; 32])>,
    }

    fn sha256(b: &[u8]) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, b).as_ref());
        out
    }

    impl Fixture {
        fn new(n: u64) -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let store = SledStore::open(&tmp.path().join("store")).unwrap();
            Self::fill(&store, n, tmp)
        }

        /// `n` devices enrolled, each with a delivered and acknowledged secret, in `store`.
        fn fill(store: &dyn Store, n: u64, tmp: tempfile::TempDir) -> Self {
            use ca_server::store::{NewEnrollment, SecretOp, SecretOutcome};
            let rng = SystemRandom::new();
            let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
            let ca_der = profile::new_ca_certificate("t", &ca_key, 0, &rng).unwrap();
            let ca = CertProfile::from_ca_der(&ca_der).unwrap();
            let kek = SecretKeys::new(&[7u8; 32]).unwrap();
            // As the CA does: every audit entry sealed with the key derived from the KEK.
            store.set_audit_key(kek.audit_key());
            let line = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
            let pem = protocol_spec::PublicKey::from(&line).to_pem();
            ca_server::lines::add_line(store, "line-1", &pem, (1, n), None, 1000, "t").unwrap();
            let (mut received, mut devices) = (Vec::new(), Vec::new());
            for serial in 1..=n {
                let key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
                let spki = key.spki_der();
                let sn = DeviceSerial::new(serial).unwrap();
                let cert = ca.issue(sn, &spki, &ca_key, &rng).unwrap().der;
                let binding = spki::sha256(&spki);
                let created = store
                    .apply_enrollment(&NewEnrollment {
                        serial,
                        spki,
                        key_hash: binding,
                        certificate: cert.clone(),
                        generation: 0,
                        line: "line-1".into(),
                        token_id: serial.to_be_bytes().to_vec(),
                        at: 1000,
                    })
                    .unwrap();
                assert!(matches!(
                    created,
                    ca_server::store::EnrollOutcome::Created(_)
                ));
                let secret = kek.generate().unwrap();
                let key_id = kek.new_key_id().unwrap();
                let mut record = kek
                    .seal_version(serial, 1, key_id.clone(), secret.as_ref(), "csprng", 1001)
                    .unwrap();
                record.delivered_at = Some(1001);
                let kcv = record.kcv.clone();
                let ops = [
                    SecretOp::Allocate {
                        record,
                        from_pool: None,
                        binding,
                    },
                    SecretOp::Ack {
                        serial,
                        key_id,
                        version: 1,
                        kcv,
                        at: 1002,
                        binding,
                        certificate: None,
                    },
                ];
                for op in ops {
                    let o = store.apply_secret(&op).unwrap();
                    assert!(matches!(o, SecretOutcome::Done(_)), "{o:?}");
                }
                received.push(sha256(&cert));
                devices.push((key, *secret));
            }
            store.sync().unwrap();
            Fixture {
                tmp,
                ca_key,
                ca_der,
                kek,
                received,
                devices,
            }
        }

        fn path(&self) -> std::path::PathBuf {
            self.tmp.path().join("store")
        }

        fn verify(&self) -> StoreVerification {
            self.verify_in(&SledStore::open(&self.path()).unwrap())
        }

        fn verify_in(&self, store: &dyn Store) -> StoreVerification {
            verify_store(store, &self.ca_der, &self.kek, &self.received, true).unwrap()
        }

        /// Changes the store behind the CA's back, with sled itself.
        fn tamper(&self, f: impl FnOnce(&sled::Db)) {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let db = loop {
                // The pass's store may still hold sled's lock for a moment after it is dropped.
                match ca_server::store::sled_config(&self.path()).open() {
                    Ok(db) => break db,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("{e}"),
                }
            };
            f(&db);
            db.flush().unwrap();
        }

        fn device(&self, db: &sled::Db, serial: u64) -> ca_server::records::DeviceRecord {
            let v = db
                .open_tree("devices")
                .unwrap()
                .get(serial.to_be_bytes())
                .unwrap()
                .unwrap();
            from_cbor(&v).unwrap()
        }

        fn put_device(&self, db: &sled::Db, rec: &ca_server::records::DeviceRecord) {
            let bytes = ca_server::records::to_cbor(rec);
            let devices = db.open_tree("devices").unwrap();
            devices.insert(rec.serial.to_be_bytes(), bytes).unwrap();
        }

        fn secret(&self, db: &sled::Db, serial: u64) -> ca_server::records::SecretRecord {
            let key = SledStore::secret_version_key(serial, 1);
            let v = db.open_tree("secrets").unwrap().get(key).unwrap().unwrap();
            from_cbor(&v).unwrap()
        }

        fn put_secret(&self, db: &sled::Db, rec: &ca_server::records::SecretRecord) {
            let key = SledStore::secret_version_key(rec.serial, rec.version);
            let secrets = db.open_tree("secrets").unwrap();
            secrets
                .insert(key, ca_server::records::to_cbor(rec))
                .unwrap();
        }
    }

    fn fails_with(v: &StoreVerification, words: &str) {
        assert!(!v.ok, "the pass must fail: {v:?}");
        assert!(
            v.problems.iter().any(|p| p.contains(words)),
            "want a problem with {words:?}: {:?}",
            v.problems
        );
    }

    #[test]
    fn the_store_pass_passes_a_store_as_a_run_leaves_it() {
        let f = Fixture::new(4);
        let v = f.verify();
        assert!(v.ok, "{:?}", v.problems);
        assert_eq!((v.devices_run, v.records, v.certificates_valid), (4, 4, 4));
        assert_eq!(v.devices_matching_store, 4);
        assert_eq!(v.devices_with_confirmed_secret, 4);
        assert_eq!(v.secrets_unsealed, 4);
        // line-add, then enroll, secret-deliver and secret-ack per device.
        assert_eq!(v.audit_entries, 1 + 4 * 3);
        assert!(v.audit_chain_ok);
        // Without secrets, the same store passes too.
        let v = verify_store(
            &SledStore::open(&f.path()).unwrap(),
            &f.ca_der,
            &f.kek,
            &f.received,
            false,
        )
        .unwrap();
        assert!(v.ok, "{:?}", v.problems);
    }

    #[test]
    fn the_store_pass_fails_a_forged_certificate() {
        let rng = SystemRandom::new();
        let forger = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let other_ca = profile::new_ca_certificate("t", &forger, 0, &rng).unwrap();
        let other_ca = CertProfile::from_ca_der(&other_ca).unwrap();
        for how in ["signature changed", "signed by another CA"] {
            let mut f = Fixture::new(3);
            let serial = DeviceSerial::new(2).unwrap();
            let spki = f.devices[1].0.spki_der();
            let forged = match how {
                "signature changed" => {
                    let ca = CertProfile::from_ca_der(&f.ca_der).unwrap();
                    let mut der = ca.issue(serial, &spki, &f.ca_key, &rng).unwrap().der;
                    let last = der.len() - 1;
                    der[last] ^= 1;
                    der
                }
                _ => other_ca.issue(serial, &spki, &forger, &rng).unwrap().der,
            };
            f.tamper(|db| {
                let mut rec = f.device(db, 2);
                rec.certificate = forged.clone();
                f.put_device(db, &rec);
            });
            // The device holds the forged certificate too: only the lint can tell.
            f.received[1] = sha256(&forged);
            let v = f.verify();
            assert_eq!(v.certificates_valid, 2, "{how}");
            assert_eq!(v.devices_matching_store, 3, "{how}");
            fails_with(&v, "serial 2:");
        }
    }

    #[test]
    fn the_store_pass_fails_a_shared_key() {
        let mut f = Fixture::new(3);
        let rng = SystemRandom::new();
        // Serial 2 rebound to serial 1's key, with a certificate the CA really signed for it.
        let spki = f.devices[0].0.spki_der();
        let ca = CertProfile::from_ca_der(&f.ca_der).unwrap();
        let cert = ca
            .issue(DeviceSerial::new(2).unwrap(), &spki, &f.ca_key, &rng)
            .unwrap()
            .der;
        f.tamper(|db| {
            let mut rec = f.device(db, 2);
            rec.spki = spki.clone();
            rec.certificate = cert.clone();
            f.put_device(db, &rec);
        });
        f.received[1] = sha256(&cert);
        let v = f.verify();
        assert_eq!(v.certificates_valid, 3, "{:?}", v.problems);
        assert_eq!(v.shared_keys, 1);
        fails_with(&v, "serials 1 and 2 hold the same public key");
    }

    #[test]
    fn the_store_pass_unseals_and_fails_a_shared_secret() {
        let f = Fixture::new(3);
        // Serial 2's version sealed over serial 1's secret, its index tag left as it was: only
        // unsealing shows that two devices hold one secret.
        f.tamper(|db| {
            let old = f.secret(db, 2);
            let mut rec = f
                .kek
                .seal_version(2, 1, old.key_id.clone(), &f.devices[0].1, "csprng", 1001)
                .unwrap();
            rec.index_tag = old.index_tag;
            rec.delivered_at = old.delivered_at;
            f.put_secret(db, &rec);
        });
        let v = f.verify();
        assert_eq!(v.shared_secrets, 1, "{:?}", v.problems);
        fails_with(&v, "serials 1 and 2 hold the same secret");
        fails_with(&v, "the index tag is not the sealed secret's");
    }

    #[test]
    fn the_store_pass_fails_a_shared_key_id() {
        let f = Fixture::new(3);
        f.tamper(|db| {
            let one = f.secret(db, 1);
            let old = f.secret(db, 2);
            let mut rec = f
                .kek
                .seal_version(2, 1, one.key_id, &f.devices[1].1, "csprng", 1001)
                .unwrap();
            rec.delivered_at = old.delivered_at;
            f.put_secret(db, &rec);
        });
        let v = f.verify();
        assert_eq!(v.shared_key_ids, 1, "{:?}", v.problems);
        fails_with(&v, "serials 1 and 2 hold secrets with one key id");
    }

    #[test]
    fn the_store_pass_fails_a_broken_audit_chain() {
        // The last entry changed in place: no successor's prev_hash shows it, its own hash does.
        let f = Fixture::new(2);
        f.tamper(|db| {
            let audit = db.open_tree("audit").unwrap();
            let (k, v) = audit.last().unwrap().unwrap();
            let mut e: AuditEntry = from_cbor(&v).unwrap();
            e.detail = format!("{} (edited)", e.detail);
            audit.insert(k, ca_server::records::to_cbor(&e)).unwrap();
        });
        let v = f.verify();
        assert!(!v.audit_chain_ok);
        fails_with(&v, "audit log: entry 7's content does not match its hash");

        // An entry removed from the middle.
        let f = Fixture::new(2);
        f.tamper(|db| {
            let audit = db.open_tree("audit").unwrap();
            audit.remove(3u64.to_be_bytes()).unwrap();
        });
        let v = f.verify();
        assert!(!v.audit_chain_ok);
        fails_with(&v, "entry 3 is missing");
    }

    #[test]
    fn the_store_pass_fails_a_device_without_its_audit_entries() {
        // The newest entry (the last device's ack) removed: the chain that is left verifies.
        let f = Fixture::new(2);
        f.tamper(|db| {
            let audit = db.open_tree("audit").unwrap();
            let (k, _) = audit.last().unwrap().unwrap();
            audit.remove(k).unwrap();
        });
        let v = f.verify();
        assert!(v.audit_chain_ok, "{:?}", v.problems);
        assert_eq!(v.devices_missing_audit_entries, 1);
        fails_with(&v, "serial 2: audit log lacks its secret-ack");
    }

    #[test]
    fn the_store_pass_fails_a_missing_index_entry() {
        for (tree, words) in [
            ("keys", "serial 3: no key index entry names it"),
            ("tokens", "serial 3: no token index entry names it"),
            (
                "secret_index",
                "serial 3 version 1: no secret tag index entry names it",
            ),
            (
                "key_ids",
                "serial 3 version 1: no key id index entry names it",
            ),
        ] {
            let f = Fixture::new(3);
            f.tamper(|db| {
                let rec = f.device(db, 3);
                let secret = f.secret(db, 3);
                let key = match tree {
                    "keys" => spki::sha256(&rec.spki).to_vec(),
                    "tokens" => SledStore::token_index_key(&rec.line, &rec.token_id),
                    "secret_index" => secret.index_tag.clone(),
                    _ => secret.key_id.as_bytes().to_vec(),
                };
                let removed = db.open_tree(tree).unwrap().remove(key).unwrap();
                assert!(removed.is_some(), "{tree}");
            });
            let v = f.verify();
            assert!(v.index_mismatches >= 1, "{tree}");
            fails_with(&v, words);
            // ... and the index holds one entry fewer than there are records.
            fails_with(&v, "holds 2 entries for 3 the records call for");
        }
    }

    #[test]
    fn the_store_pass_fails_an_index_entry_that_names_no_record() {
        // The key index checked from the index side: an extra entry for a key no device holds.
        let f = Fixture::new(2);
        f.tamper(|db| {
            let keys = db.open_tree("keys").unwrap();
            keys.insert([9u8; 32], &1u64.to_be_bytes()).unwrap();
        });
        let v = f.verify();
        fails_with(
            &v,
            &format!(
                "key index entry {} names serial 1, whose record does not hold it",
                hex::encode([9u8; 32])
            ),
        );
        fails_with(
            &v,
            "the key index holds 3 entries for 2 the records call for",
        );
    }

    #[test]
    fn the_store_pass_fails_when_records_and_devices_run_differ() {
        let mut f = Fixture::new(2);
        // A third device ran but holds nothing and has no record.
        f.received.push([0u8; 32]);
        let v = f.verify();
        fails_with(&v, "2 device records for 3 devices run");
    }

    #[test]
    fn the_store_pass_counts_no_imported_pool_key_as_a_device_s() {
        let f = Fixture::new(2);
        {
            let store = SledStore::open(&f.path()).unwrap();
            store.set_audit_key(f.kek.audit_key());
            let entry = f.kek.seal_pool("pool-1".into(), &[42u8; 32], 1003).unwrap();
            let op = ca_server::store::SecretOp::Import {
                entries: vec![entry],
                at: 1003,
                actor: "t".into(),
            };
            store.apply_secret(&op).unwrap();
            store.sync().unwrap();
        }
        let v = f.verify();
        assert!(v.ok, "{:?}", v.problems);
    }

    /// The pass reads PostgreSQL as it reads sled, and fails on a changed row there too. The
    /// test database: `.ci/run` starts one, as does
    /// `eval "$(ca-server/scripts/test-postgres.sh start)"`.
    #[test]
    fn the_store_pass_reads_postgresql_and_fails_its_changed_rows() {
        use ca_server::store::{PgConfig, PgStore};
        let need = |v: &str| {
            std::env::var(v).unwrap_or_else(|_| {
                panic!(
                    "this test needs PostgreSQL: set IMPRINT_TEST_PG_URL, IMPRINT_TEST_PG_CA and IMPRINT_STORE_PASSWORD, e.g. with `eval \"$(ca-server/scripts/test-postgres.sh start)\"` (.ci/run does)"
                )
            })
        };
        let (url, ca, password) = (
            need("IMPRINT_TEST_PG_URL"),
            need("IMPRINT_TEST_PG_CA"),
            need("IMPRINT_STORE_PASSWORD"),
        );
        let mut tag = [0u8; 6];
        ring::rand::SecureRandom::fill(&SystemRandom::new(), &mut tag).unwrap();
        let config = PgConfig {
            url: url.clone(),
            password: Some(zeroize::Zeroizing::new(password.clone())),
            ca_file: Some(ca.clone().into()),
            schema: format!("t_verify_{}", hex::encode(tag)),
        };
        PgStore::migrate(&config).unwrap();
        struct Dropped(PgConfig);
        impl Drop for Dropped {
            fn drop(&mut self) {
                let _ = PgStore::drop_schema(&self.0);
            }
        }
        let _dropped = Dropped(config.clone());
        let store = PgStore::open(&config).unwrap();
        let f = Fixture::fill(&store, 3, tempfile::tempdir().unwrap());
        let v = f.verify_in(&store);
        assert!(v.ok, "{:?}", v.problems);
        assert_eq!(
            (v.records, v.secret_versions, v.secrets_unsealed),
            (3, 3, 3)
        );
        assert_eq!(v.audit_entries, 1 + 3 * 3);
        let sql = |q: &str| {
            let out = std::process::Command::new("psql")
                .arg(&url)
                .args(["-v", "ON_ERROR_STOP=1", "-c", q])
                .env("PGPASSWORD", &password)
                .env("PGSSLROOTCERT", &ca)
                .env("PGOPTIONS", format!("-c search_path={}", config.schema))
                .output()
                .expect("psql (apt-get install postgresql-client-15)");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sql("DELETE FROM tokens WHERE serial = 3");
        sql("INSERT INTO keys (key_hash, serial) VALUES (decode(repeat('09', 32), 'hex'), 1)");
        let v = f.verify_in(&store);
        fails_with(&v, "serial 3: no token index entry names it");
        fails_with(
            &v,
            &format!(
                "key index entry {} names serial 1, whose record does not hold it",
                hex::encode([9u8; 32])
            ),
        );
        // Serial 1's sealed secret copied onto serial 2: the pass unseals every version and
        // finds it sealed for another (the serial and version are bound into the seal).
        sql(
            "UPDATE secret_versions SET ciphertext = (SELECT ciphertext FROM secret_versions WHERE serial = 1), nonce = (SELECT nonce FROM secret_versions WHERE serial = 1) WHERE serial = 2",
        );
        let v = f.verify_in(&store);
        fails_with(
            &v,
            "serial 2 version 1: a stored secret failed authentication",
        );
    }
}
