//! The stateful rules: what a write may do given what is stored. Enrollment (SPEC.md 3.3, checks
//! 12 to 17), the secret lifecycle (SPEC.md 10: allocate, deliver, acknowledge, rotate, import),
//! reset, revocation and line changes.
//!
//! Each rule is a pure function of a small view of the records the write touches: the store
//! reads the view inside its transaction, asks the rule, and applies the writes the rule returns
//! (or nothing, with the rule's typed [`Refusal`]). The service's fast path asks the same
//! functions over what it read outside a transaction, so that an obvious refusal or a retry is
//! answered before a signature is spent. No rule reads a clock, a socket or a store; the wire
//! problem of a refusal is made once, by [`Refusal::problem`].

use protocol_spec::{Problem, ProblemType};

use crate::records::{
    BdkRecord, DeviceRecord, DeviceStatus, LineRecord, OperatorRevocation, PoolEntry, ResetRecord,
    SecretRecord, TokenUse,
};

/// Why a rule refused a write. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The device is revoked.
    Revoked {
        /// Device.
        serial: u64,
    },
    /// The serial is bound to another key.
    SerialTaken {
        /// Device.
        serial: u64,
    },
    /// The key is bound to another serial (for ever, even after that serial was reset).
    DuplicateKey {
        /// The serial that holds the key.
        holder: u64,
    },
    /// The token id was consumed by another enrollment of the line.
    TokenReplayed {
        /// Token id.
        token_id: Vec<u8>,
        /// The serial whose enrollment consumed it.
        by: u64,
    },
    /// The line is not registered.
    LineUnknown {
        /// Line id.
        line: String,
    },
    /// The line is disabled.
    LineDisabled {
        /// Line id.
        line: String,
    },
    /// The line enrolled its quota.
    QuotaExhausted {
        /// Line id.
        line: String,
        /// Its quota.
        quota: u64,
    },
    /// No device with that serial (a secrets write, a mutual-TLS client).
    UnknownDevice {
        /// Device.
        serial: u64,
    },
    /// The serial is now bound to another key than the one the request authenticated with (an
    /// operator reset it since).
    Rebound {
        /// Device.
        serial: u64,
    },
    /// A mutual-TLS client presented a certificate that is not the one on record.
    NotTheCertificate {
        /// Device.
        serial: u64,
    },
    /// An acknowledgement names a version that was not delivered to this device.
    AckNotDelivered {
        /// Device.
        serial: u64,
        /// Key id acknowledged.
        key_id: String,
        /// Version acknowledged.
        version: u64,
    },
    /// An acknowledgement's key check value is not the delivered secret's.
    AckKcv,
    /// A new secret's keyed hash is already bound to another device or version: two devices
    /// with one secret must be impossible (a broken random generator; never the device's fault).
    SecretNotUnique,
    /// An import names a key id the store (or the batch) already has.
    ImportKeyIdKnown {
        /// Key id.
        key_id: String,
    },
    /// An import carries a key the store (or the batch) already has.
    ImportKeyKnown {
        /// Key id of the entry.
        key_id: String,
    },
    /// The certificate was made for a generation of the serial that is no longer the next
    /// one (an operator reset the serial between the read and the write): issue it again for
    /// the generation the store gives now.
    StaleGeneration {
        /// Device.
        serial: u64,
        /// The generation the certificate carries.
        generation: u32,
        /// The generation a new binding of the serial takes now.
        next: u64,
    },
}

impl Refusal {
    /// The wire problem: the one mapping from a refusal to what a device is told.
    pub fn problem(&self) -> Problem {
        let (kind, detail) = match self {
            Refusal::Revoked { serial } => {
                (ProblemType::Revoked, format!("device {serial} is revoked"))
            }
            Refusal::SerialTaken { serial } => (
                ProblemType::SerialTaken,
                format!("serial {serial} is already bound to another key"),
            ),
            Refusal::DuplicateKey { holder } => (
                ProblemType::DuplicateKey,
                format!("this public key is already bound to serial {holder}"),
            ),
            Refusal::TokenReplayed { token_id, by } => (
                ProblemType::TokenReplayed,
                format!(
                    "token {} was consumed by the enrollment of serial {by}",
                    hex::encode(token_id)
                ),
            ),
            Refusal::LineUnknown { line } => (
                ProblemType::LineUnknown,
                format!("line {line:?} is not registered"),
            ),
            Refusal::LineDisabled { line } => (
                ProblemType::LineUnknown,
                format!("line {line:?} is disabled"),
            ),
            Refusal::QuotaExhausted { line, quota } => (
                ProblemType::QuotaExhausted,
                format!("line {line:?} has enrolled its quota of {quota}"),
            ),
            Refusal::UnknownDevice { serial } => (
                ProblemType::UnknownDevice,
                format!("no enrollment record for serial {serial}"),
            ),
            Refusal::Rebound { serial } => (
                ProblemType::UnknownDevice,
                format!("serial {serial} is now bound to another key"),
            ),
            Refusal::NotTheCertificate { serial } => (
                ProblemType::UnknownDevice,
                format!("this is not the certificate on record for serial {serial}"),
            ),
            Refusal::AckNotDelivered {
                serial,
                key_id,
                version,
            } => (
                ProblemType::AckMismatch,
                format!("key {key_id} version {version} was not delivered to device {serial}"),
            ),
            Refusal::AckKcv => (
                ProblemType::AckMismatch,
                "the key check value does not match the delivered secret".to_string(),
            ),
            Refusal::SecretNotUnique | Refusal::StaleGeneration { .. } => {
                return Problem::internal();
            }
            Refusal::ImportKeyIdKnown { key_id } => (
                ProblemType::Malformed,
                format!("key id {key_id:?} is already known; nothing was imported"),
            ),
            Refusal::ImportKeyKnown { key_id } => (
                ProblemType::Malformed,
                format!("the key of {key_id:?} is already known; nothing was imported"),
            ),
        };
        Problem::new(kind, detail)
    }

    /// Whether asking again (with a new secret or a certificate issued again, after reading
    /// again) may succeed: a secret that was not unique, a certificate of a stale generation.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Refusal::SecretNotUnique | Refusal::StaleGeneration { .. }
        )
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::SecretNotUnique => f.write_str("secret already bound to another device"),
            Refusal::StaleGeneration {
                serial,
                generation,
                next,
            } => write!(
                f,
                "certificate of serial {serial} made for generation {generation}, the next is {next}"
            ),
            other => f.write_str(&other.problem().detail),
        }
    }
}

/// What an audit entry will say, before the store chains and seals it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix seconds.
    pub at: u64,
    /// `enroll`, `secret-deliver`, ...
    pub event: String,
    /// The device concerned.
    pub serial: Option<u64>,
    /// Who caused it.
    pub actor: String,
    /// Facts, never a secret.
    pub detail: String,
}

impl AuditEvent {
    /// The sealed entry that records this event after the chain's head (sequence number,
    /// hash), naming this process's node ([`crate::audit::node`]), with its MAC under `key`:
    /// what every store appends.
    pub fn entry_after(
        &self,
        head: &(u64, [u8; 32]),
        key: Option<&crate::audit::AuditKey>,
    ) -> crate::records::AuditEntry {
        crate::records::AuditEntry {
            seq: head.0 + 1,
            at: self.at,
            event: self.event.clone(),
            serial: self.serial,
            actor: self.actor.clone(),
            detail: self.detail.clone(),
            prev_hash: head.1.to_vec(),
            node: crate::audit::node().map(str::to_string),
            hash: Vec::new(),
            mac: None,
        }
        .sealed(key)
    }
}

// ---------------------------------------------------------------------------------------------
// Enrollment

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
    /// The reset generation its certificate serial carries (SPEC.md 5): how many times the
    /// serial was reset when it was issued.
    pub generation: u32,
    /// Line id.
    pub line: String,
    /// Token id consumed.
    pub token_id: Vec<u8>,
    /// Unix seconds.
    pub at: u64,
}

/// The records an enrollment touches, as stored now.
#[derive(Debug, Clone, Default)]
pub struct EnrollView {
    /// The record of the serial.
    pub device: Option<DeviceRecord>,
    /// The serial that holds the key (SPKI hash), if any.
    pub key_holder: Option<u64>,
    /// The enrollment that consumed the token id on this line, if any.
    pub token_use: Option<TokenUse>,
    /// The line.
    pub line: Option<LineRecord>,
    /// How many times the serial was reset (its earlier bindings in the history): the
    /// generation a new binding's certificate must carry.
    pub resets: u64,
}

/// What applying an enrollment did (or, from [`enroll`], will do).
#[derive(Debug, Clone)]
pub enum EnrollOutcome {
    /// A new binding was recorded.
    Created(DeviceRecord),
    /// (serial, key) was already bound: the stored record, unchanged.
    Existing(DeviceRecord),
    /// A rule refused it; nothing was written.
    Refused(Refusal),
}

/// The writes of a new binding, all in one transaction.
#[derive(Debug, Clone)]
pub struct EnrollWrites {
    /// The new device record (serial -> key -> certificate).
    pub device: DeviceRecord,
    /// The line with its count raised by one.
    pub line: LineRecord,
    /// The token use (line, token id) -> serial.
    pub token_use: TokenUse,
    /// What the audit entry says.
    pub event: AuditEvent,
}

/// How (serial, key) stands with what is stored: the first checks of an enrollment, which the
/// service also makes before spending a signature. `Ok(Some(record))`: already bound, this is
/// a retry; `Ok(None)`: free.
pub fn binding(
    device: Option<&DeviceRecord>,
    key_holder: Option<u64>,
    serial: u64,
    spki: &[u8],
) -> Result<Option<DeviceRecord>, Refusal> {
    if let Some(rec) = device {
        if rec.status == DeviceStatus::Revoked {
            return Err(Refusal::Revoked { serial });
        }
        if rec.spki == spki {
            return Ok(Some(rec.clone()));
        }
        return Err(Refusal::SerialTaken { serial });
    }
    // A key stays bound to its serial for ever, even after an operator reset the serial; only
    // that serial may take it again.
    match key_holder {
        Some(holder) if holder != serial => Err(Refusal::DuplicateKey { holder }),
        _ => Ok(None),
    }
}

/// The enrollment rule (SPEC.md 3.3, checks 12 to 17): the outcome, and the writes when it
/// creates a binding.
pub fn enroll(view: &EnrollView, e: &NewEnrollment) -> (EnrollOutcome, Option<EnrollWrites>) {
    let refused = |r| (EnrollOutcome::Refused(r), None);
    match binding(view.device.as_ref(), view.key_holder, e.serial, &e.spki) {
        Err(r) => return refused(r),
        Ok(Some(rec)) => return (EnrollOutcome::Existing(rec), None),
        Ok(None) => {}
    }
    // RFC 5280 4.1.2.2: certificate serials are unique per CA. A new binding's certificate
    // carries the serial's reset count as its generation, so it repeats no earlier binding's.
    if u64::from(e.generation) != view.resets {
        return refused(Refusal::StaleGeneration {
            serial: e.serial,
            generation: e.generation,
            next: view.resets,
        });
    }
    if let Some(used) = &view.token_use {
        return refused(Refusal::TokenReplayed {
            token_id: e.token_id.clone(),
            by: used.serial,
        });
    }
    let Some(line) = &view.line else {
        return refused(Refusal::LineUnknown {
            line: e.line.clone(),
        });
    };
    if !line.active {
        return refused(Refusal::LineDisabled {
            line: e.line.clone(),
        });
    }
    if line.enrolled >= line.quota {
        return refused(Refusal::QuotaExhausted {
            line: e.line.clone(),
            quota: line.quota,
        });
    }
    let device = DeviceRecord {
        serial: e.serial,
        spki: e.spki.clone(),
        certificate: e.certificate.clone(),
        line: e.line.clone(),
        token_id: e.token_id.clone(),
        enrolled_at: e.at,
        status: DeviceStatus::Active,
        revoked_at: None,
    };
    let mut line = line.clone();
    line.enrolled += 1;
    let event = AuditEvent {
        at: e.at,
        event: "enroll".into(),
        serial: Some(e.serial),
        actor: e.line.clone(),
        detail: format!(
            "key={} cti={}",
            hex::encode(e.key_hash),
            hex::encode(&e.token_id)
        ),
    };
    (
        EnrollOutcome::Created(device.clone()),
        Some(EnrollWrites {
            device,
            line,
            token_use: TokenUse { serial: e.serial },
            event,
        }),
    )
}

// ---------------------------------------------------------------------------------------------
// Devices at the mutual-TLS door

/// Whether the device `rec` of `serial` is the active binding of the key hashed `key_hash`
/// (`None`: any key): a secrets request, or a client at the door, must be.
pub fn active_binding(
    rec: Option<&DeviceRecord>,
    serial: u64,
    key_hash: Option<&[u8; 32]>,
) -> Result<(), Refusal> {
    match rec {
        None => Err(Refusal::UnknownDevice { serial }),
        Some(d) if d.status == DeviceStatus::Revoked => Err(Refusal::Revoked { serial }),
        Some(d) if key_hash.is_some_and(|h| protocol_spec::spki::sha256(&d.spki) != *h) => {
            Err(Refusal::Rebound { serial })
        }
        Some(_) => Ok(()),
    }
}

/// The door's rule for a mutual-TLS client of `serial` presenting `certificate`: the record
/// exists, is active, and holds this very certificate. Returns that record.
pub fn admit<'a>(
    rec: Option<&'a DeviceRecord>,
    serial: u64,
    certificate: &[u8],
) -> Result<&'a DeviceRecord, Refusal> {
    active_binding(rec, serial, None)?;
    match rec {
        Some(d) if d.certificate == certificate => Ok(d),
        _ => Err(Refusal::NotTheCertificate { serial }),
    }
}

// ---------------------------------------------------------------------------------------------
// Secrets

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
        /// The certificate the device authenticated with, when the door has not checked it
        /// against the record: the transaction applies the door's rule ([`admit`]) instead,
        /// over the record it reads anyway.
        certificate: Option<Vec<u8>>,
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

impl SecretOp {
    /// The device the write is for (none for an import).
    pub fn serial(&self) -> Option<u64> {
        match self {
            SecretOp::Allocate { record, .. } | SecretOp::Rotate { record, .. } => {
                Some(record.serial)
            }
            SecretOp::Delivered { serial, .. } | SecretOp::Ack { serial, .. } => Some(*serial),
            SecretOp::Import { .. } => None,
        }
    }

    /// The existing version the write names (delivery, acknowledgement).
    pub fn names_version(&self) -> Option<u64> {
        match self {
            SecretOp::Delivered { version, .. } | SecretOp::Ack { version, .. } => Some(*version),
            _ => None,
        }
    }

    /// The new version the write adds (allocation, rotation).
    pub fn new_version(&self) -> Option<&SecretRecord> {
        match self {
            SecretOp::Allocate { record, .. } | SecretOp::Rotate { record, .. } => Some(record),
            _ => None,
        }
    }
}

/// Who holds a secret's keyed hash or a key id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// An imported key still in the pool.
    Pool,
    /// A device's version.
    Version {
        /// Device.
        serial: u64,
        /// Version.
        version: u64,
    },
}

/// The records a secrets write touches, as stored now. A store fills the fields the write
/// needs ([`SecretOp::serial`], [`SecretOp::names_version`], [`SecretOp::new_version`]);
/// the others stay empty.
#[derive(Debug, Clone, Default)]
pub struct SecretView {
    /// The device record.
    pub device: Option<DeviceRecord>,
    /// The device's newest version number (0: none).
    pub head: u64,
    /// The newest version.
    pub newest: Option<SecretRecord>,
    /// The version the write names, with its acknowledgement time merged in.
    pub named: Option<SecretRecord>,
    /// Who holds the new version's keyed hash.
    pub tag_holder: Option<Holder>,
    /// Who holds the new version's key id.
    pub key_id_holder: Option<Holder>,
    /// Whether the pool entry an allocation takes is still there.
    pub pool_entry_present: bool,
    /// For an import, per entry: (key id known, key known) in the store.
    pub import_known: Vec<(bool, bool)>,
    /// For a new version holding a DUKPT Initial Key ([`dukpt_claim`]): the next derivation
    /// id its BDK gives out, as stored (`None`: no such BDK).
    pub dukpt_next: Option<u64>,
}

/// The (BDK id, derivation id) a new version claims when it holds a DUKPT Initial Key: its
/// source is `dukpt-...` and its key id is the Initial Key ID in hex.
pub fn dukpt_claim(rec: &SecretRecord) -> Option<(String, u32)> {
    if !rec.source.starts_with("dukpt-") {
        return None;
    }
    let id = protocol_spec::dukpt::InitialKeyId::from_hex(&rec.key_id).ok()?;
    Some((id.bdk_id().to_string(), id.derivation_id()))
}

/// What a secrets write did (or, from [`secret`], will do).
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
    Refused(Refusal),
}

/// One write a secrets rule asks for.
#[derive(Debug, Clone)]
pub enum SecretWrite {
    /// A new version: the record, its keyed hash and key id bound to it, the device's head.
    NewVersion(SecretRecord),
    /// A pool entry taken by the new version.
    TakeFromPool(String),
    /// A version's record rewritten (its first delivery).
    UpdateVersion(SecretRecord),
    /// An acknowledgement of (serial, version) at a time.
    Ack {
        /// Device.
        serial: u64,
        /// Version.
        version: u64,
        /// Unix seconds.
        at: u64,
    },
    /// An imported key into the pool, its keyed hash and key id held by the pool.
    PoolEntry(PoolEntry),
    /// A BDK's allocation counter moves past the derivation id a new version took.
    DukptNext {
        /// The BDK id.
        bdk_id: String,
        /// The counter as read (the derivation id taken).
        taken: u64,
    },
}

/// The secrets rule: the outcome, the writes, and the audit event when it changes something
/// (only changes are events worth an entry: a second delivery or ack is not).
pub fn secret(
    view: &SecretView,
    op: &SecretOp,
) -> (SecretOutcome, Vec<SecretWrite>, Option<AuditEvent>) {
    let (outcome, writes) = secret_writes(view, op);
    let event = matches!(outcome, SecretOutcome::Done(_)).then(|| secret_event(op));
    (outcome, writes, event)
}

fn secret_writes(view: &SecretView, op: &SecretOp) -> (SecretOutcome, Vec<SecretWrite>) {
    let none = |o| (o, Vec::new());
    let refuse = |r| (SecretOutcome::Refused(r), Vec::new());
    // The device must exist, be active and, when the request came from a device, still hold the
    // key the request was authenticated with: a revoke or a reset committed between the door's
    // check and this transaction wins.
    let active = |serial: u64, binding: Option<&[u8; 32]>| {
        active_binding(view.device.as_ref(), serial, binding)
    };
    // A new version is bound only if its keyed hash and key id are free (or, for an imported
    // key, held by the pool entry it comes from).
    let blocked = |from_pool: bool| -> Option<SecretOutcome> {
        match view.tag_holder {
            None => {}
            Some(Holder::Pool) if from_pool => {}
            Some(_) => return Some(SecretOutcome::Refused(Refusal::SecretNotUnique)),
        }
        match view.key_id_holder {
            None => None,
            Some(Holder::Pool) if from_pool => None,
            Some(_) => Some(SecretOutcome::Conflict),
        }
    };
    match op {
        SecretOp::Allocate {
            record,
            from_pool,
            binding,
        } => {
            if let Err(r) = active(record.serial, Some(binding)) {
                return refuse(r);
            }
            // The next version goes to a device with none, or whose newest belongs to a binding
            // an operator reset (retired).
            if view.head > 0 {
                match &view.newest {
                    Some(latest) if latest.retired_at.is_none() => {
                        return none(SecretOutcome::Existing(latest.clone()));
                    }
                    None => return none(SecretOutcome::Conflict),
                    Some(_) => {}
                }
            }
            if record.version != view.head + 1 {
                return none(SecretOutcome::Conflict);
            }
            if from_pool.is_some() && !view.pool_entry_present {
                return none(SecretOutcome::Conflict);
            }
            if let Some(o) = blocked(from_pool.is_some()) {
                return none(o);
            }
            let mut writes = vec![SecretWrite::NewVersion(record.clone())];
            if let Some(id) = from_pool {
                writes.push(SecretWrite::TakeFromPool(id.clone()));
            }
            match dukpt_write(view, record) {
                Some(w) => writes.extend(w),
                None => return none(SecretOutcome::Conflict),
            }
            (SecretOutcome::Done(Some(record.clone())), writes)
        }
        SecretOp::Rotate { record, .. } => {
            if let Err(r) = active(record.serial, None) {
                return refuse(r);
            }
            if view.head + 1 != record.version {
                return none(SecretOutcome::Conflict);
            }
            if let Some(o) = blocked(false) {
                return none(o);
            }
            let mut writes = vec![SecretWrite::NewVersion(record.clone())];
            match dukpt_write(view, record) {
                Some(w) => writes.extend(w),
                None => return none(SecretOutcome::Conflict),
            }
            (SecretOutcome::Done(Some(record.clone())), writes)
        }
        SecretOp::Delivered {
            serial,
            at,
            binding,
            ..
        } => {
            if let Err(r) = active(*serial, Some(binding)) {
                return refuse(r);
            }
            let Some(mut rec) = view.named.clone().filter(|r| r.retired_at.is_none()) else {
                return none(SecretOutcome::Conflict);
            };
            if rec.delivered_at.is_some() {
                return none(SecretOutcome::Unchanged(rec));
            }
            rec.delivered_at = Some(*at);
            (
                SecretOutcome::Done(Some(rec.clone())),
                vec![SecretWrite::UpdateVersion(rec)],
            )
        }
        SecretOp::Ack {
            serial,
            key_id,
            version,
            kcv,
            at,
            binding,
            certificate,
        } => {
            if let Some(cert) = certificate
                && let Err(r) = admit(view.device.as_ref(), *serial, cert)
            {
                return refuse(r);
            }
            if let Err(r) = active(*serial, Some(binding)) {
                return refuse(r);
            }
            let Some(mut rec) = view.named.clone().filter(|r| {
                r.key_id == *key_id && r.delivered_at.is_some() && r.retired_at.is_none()
            }) else {
                return refuse(Refusal::AckNotDelivered {
                    serial: *serial,
                    key_id: key_id.clone(),
                    version: *version,
                });
            };
            if rec.kcv != *kcv {
                return refuse(Refusal::AckKcv);
            }
            if rec.confirmed_at.is_some() {
                // Confirmed before: nothing changes, so no audit entry.
                return none(SecretOutcome::Unchanged(rec));
            }
            rec.confirmed_at = Some(*at);
            (
                SecretOutcome::Done(Some(rec)),
                vec![SecretWrite::Ack {
                    serial: *serial,
                    version: *version,
                    at: *at,
                }],
            )
        }
        SecretOp::Import { entries, .. } => {
            let mut ids = std::collections::HashSet::new();
            let mut tags = std::collections::HashSet::new();
            for (i, e) in entries.iter().enumerate() {
                let (id_known, key_known) =
                    view.import_known.get(i).copied().unwrap_or((true, true));
                if !ids.insert(e.key_id.as_str()) || id_known {
                    return refuse(Refusal::ImportKeyIdKnown {
                        key_id: e.key_id.clone(),
                    });
                }
                if !tags.insert(e.index_tag.as_slice()) || key_known {
                    return refuse(Refusal::ImportKeyKnown {
                        key_id: e.key_id.clone(),
                    });
                }
            }
            (
                SecretOutcome::Done(None),
                entries
                    .iter()
                    .cloned()
                    .map(SecretWrite::PoolEntry)
                    .collect(),
            )
        }
    }
}

/// The counter write of a new version holding a DUKPT Initial Key: its derivation id must be
/// the one its BDK gives out next (another allocation took it: read again), and the counter
/// moves past it in the same transaction. Versions of other sources write nothing here.
/// `None` when the claim conflicts.
fn dukpt_write(view: &SecretView, record: &SecretRecord) -> Option<Vec<SecretWrite>> {
    let Some((bdk_id, derivation_id)) = dukpt_claim(record) else {
        return Some(Vec::new());
    };
    if view.dukpt_next != Some(u64::from(derivation_id)) {
        return None;
    }
    Some(vec![SecretWrite::DukptNext {
        bdk_id,
        taken: u64::from(derivation_id),
    }])
}

/// What the audit entry of a secrets write says.
fn secret_event(op: &SecretOp) -> AuditEvent {
    let device = |serial: u64, at: u64, event: &str, detail| AuditEvent {
        at,
        event: event.to_string(),
        serial: Some(serial),
        actor: "device".to_string(),
        detail,
    };
    match op {
        SecretOp::Allocate {
            record, from_pool, ..
        } => device(
            record.serial,
            record.created_at,
            "secret-deliver",
            format!(
                "key_id={} version={} source={}{}",
                record.key_id,
                record.version,
                record.source,
                from_pool
                    .as_ref()
                    .map(|p| format!(" pool_id={p}"))
                    .unwrap_or_default()
            ),
        ),
        SecretOp::Rotate { record, actor } => AuditEvent {
            at: record.created_at,
            event: "secret-rotate".into(),
            serial: Some(record.serial),
            actor: actor.clone(),
            detail: format!("key_id={} version={}", record.key_id, record.version),
        },
        SecretOp::Delivered {
            serial,
            version,
            at,
            ..
        } => device(*serial, *at, "secret-deliver", format!("version={version}")),
        SecretOp::Ack {
            serial,
            key_id,
            version,
            at,
            ..
        } => device(
            *serial,
            *at,
            "secret-ack",
            format!("key_id={key_id} version={version}"),
        ),
        SecretOp::Import { entries, at, actor } => AuditEvent {
            at: *at,
            event: "secret-import".into(),
            serial: None,
            actor: actor.clone(),
            detail: format!("{} keys", entries.len()),
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Operators' writes: reset, revoke, lines

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

/// The writes of a reset.
#[derive(Debug, Clone)]
pub struct ResetWrites {
    /// The device record to remove (the serial is free again).
    pub serial: u64,
    /// The device's line with its count lowered by one, if the line exists.
    pub line: Option<LineRecord>,
    /// The binding as it was, for the history.
    pub history: ResetRecord,
    /// The device's versions not yet retired, now retired.
    pub retired: Vec<SecretRecord>,
    /// What the audit entry says.
    pub event: AuditEvent,
}

/// The reset rule: frees a serial for re-enrollment. The record moves to the history, the
/// secret versions of the binding are retired (never delivered again), the line's count goes
/// down by one (a repair does not use up the quota twice); the key stays bound to the serial.
/// A revoked device is not reset: its certificate serial stays on the CRL.
pub fn reset(
    device: Option<&DeviceRecord>,
    line: Option<&LineRecord>,
    versions: &[SecretRecord],
    at: u64,
    actor: &str,
) -> (ResetOutcome, Option<ResetWrites>) {
    let Some(rec) = device else {
        return (ResetOutcome::Missing, None);
    };
    if rec.status == DeviceStatus::Revoked {
        return (ResetOutcome::Revoked, None);
    }
    let line = line.map(|l| LineRecord {
        enrolled: l.enrolled.saturating_sub(1),
        ..l.clone()
    });
    let retired = versions
        .iter()
        .filter(|v| v.retired_at.is_none())
        .map(|v| SecretRecord {
            retired_at: Some(at),
            ..v.clone()
        })
        .collect();
    let event = AuditEvent {
        at,
        event: "reset".into(),
        serial: Some(rec.serial),
        actor: actor.to_string(),
        detail: format!(
            "key={} cti={} line={}",
            hex::encode(protocol_spec::spki::sha256(&rec.spki)),
            hex::encode(&rec.token_id),
            rec.line
        ),
    };
    (
        ResetOutcome::Reset(rec.clone()),
        Some(ResetWrites {
            serial: rec.serial,
            line,
            history: ResetRecord {
                device: rec.clone(),
                reset_at: at,
                actor: actor.to_string(),
            },
            retired,
            event,
        }),
    )
}

/// The revocation rule: the record with its new status, and the event when it changes.
/// `None`: no such device.
pub fn set_status(
    device: Option<&DeviceRecord>,
    status: DeviceStatus,
    at: u64,
    actor: &str,
) -> Option<(DeviceRecord, Option<AuditEvent>)> {
    let rec = device?;
    if rec.status == status {
        return Some((rec.clone(), None));
    }
    let changed = DeviceRecord {
        status,
        revoked_at: (status == DeviceStatus::Revoked).then_some(at),
        ..rec.clone()
    };
    let event = AuditEvent {
        at,
        event: match status {
            DeviceStatus::Revoked => "revoke",
            DeviceStatus::Active => "reinstate",
        }
        .into(),
        serial: Some(rec.serial),
        actor: actor.to_string(),
        detail: String::new(),
    };
    Some((changed, Some(event)))
}

/// The operator revocation rule: the revocation as it stands after the write, and the event
/// when this write makes it (an operator already revoked stays revoked as first recorded).
pub fn revoke_operator(
    existing: Option<&OperatorRevocation>,
    name: &str,
    at: u64,
    actor: &str,
) -> (OperatorRevocation, Option<AuditEvent>) {
    if let Some(r) = existing {
        return (r.clone(), None);
    }
    let r = OperatorRevocation {
        name: name.to_string(),
        revoked_at: at,
        actor: actor.to_string(),
    };
    let event = AuditEvent {
        at,
        event: "operator-revoke".into(),
        serial: None,
        actor: actor.to_string(),
        detail: format!("operator={name}"),
    };
    (r, Some(event))
}

/// A line registration's audit event; `Err` when the id is taken.
pub fn add_line(
    existing: Option<&LineRecord>,
    line: &LineRecord,
    actor: &str,
) -> Result<AuditEvent, String> {
    if existing.is_some() {
        return Err(line.id.clone());
    }
    Ok(AuditEvent {
        at: line.created_at,
        event: "line-add".into(),
        serial: None,
        actor: actor.to_string(),
        detail: format!(
            "line={} serials={}-{} quota={} rate={}",
            line.id, line.first_serial, line.last_serial, line.quota, line.rate
        ),
    })
}

/// A BDK addition's audit event (id, algorithm and KCV; never the key); `Err` when the id is
/// taken.
pub fn add_bdk(
    existing: Option<&BdkRecord>,
    bdk: &BdkRecord,
    actor: &str,
) -> Result<AuditEvent, String> {
    if existing.is_some() {
        return Err(bdk.id.clone());
    }
    Ok(AuditEvent {
        at: bdk.created_at,
        event: "dukpt-add-bdk".into(),
        serial: None,
        actor: actor.to_string(),
        detail: format!(
            "bdk_id={} algorithm={} kcv={}{}",
            bdk.id,
            bdk.algorithm,
            hex::encode_upper(&bdk.kcv),
            match &bdk.token_object {
                Some(label) => format!(" token_object={label}"),
                None => String::new(),
            }
        ),
    })
}

/// An operator's change to a registered line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineChange {
    /// Enable (true) or disable (false) the line.
    Active(bool),
    /// Set its rate limit: enrollments per second, 0 = none.
    Rate(u32),
}

/// The line change rule (enable, disable, rate): the line as it is then, and the event when it
/// changes. `None`: no such line.
pub fn change_line(
    line: Option<&LineRecord>,
    change: LineChange,
    at: u64,
    actor: &str,
) -> Option<(LineRecord, Option<AuditEvent>)> {
    let l = line?;
    let (changed, event, detail) = match change {
        LineChange::Active(active) if l.active == active => return Some((l.clone(), None)),
        LineChange::Rate(rate) if l.rate == rate => return Some((l.clone(), None)),
        LineChange::Active(active) => (
            LineRecord {
                active,
                ..l.clone()
            },
            if active {
                "line-enable"
            } else {
                "line-disable"
            },
            format!("line={}", l.id),
        ),
        LineChange::Rate(rate) => (
            LineRecord { rate, ..l.clone() },
            "line-rate",
            format!("line={} rate={} was={}", l.id, rate, l.rate),
        ),
    };
    let event = AuditEvent {
        at,
        event: event.into(),
        serial: None,
        actor: actor.to_string(),
        detail,
    };
    Some((changed, Some(event)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(quota: u64, enrolled: u64, active: bool) -> LineRecord {
        LineRecord {
            id: "line-1".into(),
            public_key: vec![1; 44],
            first_serial: 1,
            last_serial: 100,
            quota,
            rate: 0,
            enrolled,
            active,
            created_at: 1,
            secret_source: Default::default(),
        }
    }

    fn enrollment(serial: u64, key: u8) -> NewEnrollment {
        let spki = vec![key; 44];
        NewEnrollment {
            serial,
            key_hash: protocol_spec::spki::sha256(&spki),
            spki,
            certificate: vec![7; 300],
            generation: 0,
            line: "line-1".into(),
            token_id: vec![9; 16],
            at: 1_000,
        }
    }

    fn device(serial: u64, key: u8, status: DeviceStatus) -> DeviceRecord {
        DeviceRecord {
            serial,
            spki: vec![key; 44],
            certificate: vec![7; 300],
            line: "line-1".into(),
            token_id: vec![9; 16],
            enrolled_at: 1,
            status,
            revoked_at: None,
        }
    }

    fn refusal(o: &(EnrollOutcome, Option<EnrollWrites>)) -> Option<Refusal> {
        match o {
            (EnrollOutcome::Refused(r), None) => Some(r.clone()),
            _ => None,
        }
    }

    #[test]
    fn each_enrollment_refusal_comes_from_its_record_and_writes_nothing() {
        let e = enrollment(5, 1);
        let free = EnrollView {
            line: Some(line(10, 0, true)),
            ..Default::default()
        };
        let with = |f: &dyn Fn(&mut EnrollView)| {
            let mut v = free.clone();
            f(&mut v);
            refusal(&enroll(&v, &e))
        };
        assert_eq!(
            with(&|v| v.device = Some(device(5, 1, DeviceStatus::Revoked))),
            Some(Refusal::Revoked { serial: 5 })
        );
        assert_eq!(
            with(&|v| v.device = Some(device(5, 2, DeviceStatus::Active))),
            Some(Refusal::SerialTaken { serial: 5 })
        );
        assert_eq!(
            with(&|v| v.key_holder = Some(6)),
            Some(Refusal::DuplicateKey { holder: 6 })
        );
        assert_eq!(
            with(&|v| v.token_use = Some(TokenUse { serial: 4 })),
            Some(Refusal::TokenReplayed {
                token_id: vec![9; 16],
                by: 4
            })
        );
        assert_eq!(
            with(&|v| v.line = None),
            Some(Refusal::LineUnknown {
                line: "line-1".into()
            })
        );
        assert_eq!(
            with(&|v| v.line = Some(line(10, 0, false))),
            Some(Refusal::LineDisabled {
                line: "line-1".into()
            })
        );
        assert_eq!(
            with(&|v| v.line = Some(line(10, 10, true))),
            Some(Refusal::QuotaExhausted {
                line: "line-1".into(),
                quota: 10
            })
        );
        // The key held by this very serial (a reset serial taking its key again) is no refusal.
        assert_eq!(with(&|v| v.key_holder = Some(5)), None);
        // A serial reset once: a certificate of generation 0 would repeat the first binding's
        // certificate serial; it must be issued again, for generation 1.
        let stale = with(&|v| v.resets = 1).unwrap();
        assert_eq!(
            stale,
            Refusal::StaleGeneration {
                serial: 5,
                generation: 0,
                next: 1
            }
        );
        assert!(stale.is_retryable());
        let again = NewEnrollment {
            generation: 1,
            ..e.clone()
        };
        let reset_once = EnrollView {
            resets: 1,
            ..free.clone()
        };
        assert!(matches!(
            enroll(&reset_once, &again).0,
            EnrollOutcome::Created(_)
        ));
    }

    #[test]
    fn a_new_binding_counts_the_line_and_a_retry_writes_nothing() {
        let e = enrollment(5, 1);
        let view = EnrollView {
            line: Some(line(10, 3, true)),
            ..Default::default()
        };
        let (o, w) = enroll(&view, &e);
        assert!(matches!(o, EnrollOutcome::Created(ref d) if d.serial == 5));
        let w = w.unwrap();
        assert_eq!((w.line.enrolled, w.token_use.serial), (4, 5));
        assert_eq!(
            (w.event.event.as_str(), w.event.actor.as_str()),
            ("enroll", "line-1")
        );
        let retry = EnrollView {
            device: Some(device(5, 1, DeviceStatus::Active)),
            ..view
        };
        let (o, w) = enroll(&retry, &e);
        assert!(matches!(o, EnrollOutcome::Existing(_)) && w.is_none());
    }

    fn version(serial: u64, v: u64) -> SecretRecord {
        SecretRecord {
            serial,
            version: v,
            key_id: format!("k{serial}-{v}"),
            ciphertext: vec![],
            nonce: vec![],
            kcv: vec![1, 2, 3],
            index_tag: vec![v as u8; 32],
            source: "csprng".into(),
            created_at: 1,
            delivered_at: None,
            confirmed_at: None,
            retired_at: None,
        }
    }

    #[test]
    fn secrets_rules_refuse_strangers_and_never_bind_one_secret_twice() {
        let binding = protocol_spec::spki::sha256(&[1u8; 44]);
        let alloc = SecretOp::Allocate {
            record: version(5, 1),
            from_pool: None,
            binding,
        };
        let active = SecretView {
            device: Some(device(5, 1, DeviceStatus::Active)),
            ..Default::default()
        };
        let (o, w, ev) = secret(&active, &alloc);
        assert!(matches!(o, SecretOutcome::Done(Some(_))) && w.len() == 1 && ev.is_some());
        let outcome = |v: &SecretView, op: &SecretOp| secret(v, op).0;
        // Unknown, revoked, rebound.
        assert!(matches!(
            outcome(&SecretView::default(), &alloc),
            SecretOutcome::Refused(Refusal::UnknownDevice { serial: 5 })
        ));
        let revoked = SecretView {
            device: Some(device(5, 1, DeviceStatus::Revoked)),
            ..Default::default()
        };
        assert!(matches!(
            outcome(&revoked, &alloc),
            SecretOutcome::Refused(Refusal::Revoked { .. })
        ));
        let rebound = SecretView {
            device: Some(device(5, 2, DeviceStatus::Active)),
            ..Default::default()
        };
        assert!(matches!(
            outcome(&rebound, &alloc),
            SecretOutcome::Refused(Refusal::Rebound { .. })
        ));
        // A keyed hash held by another version: refused, retryable with a new secret.
        let shared = SecretView {
            tag_holder: Some(Holder::Version {
                serial: 6,
                version: 1,
            }),
            ..active.clone()
        };
        match outcome(&shared, &alloc) {
            SecretOutcome::Refused(r) => assert!(r.is_retryable()),
            other => panic!("{other:?}"),
        }
        // A device that has a current version gets it, not a second one.
        let has = SecretView {
            head: 1,
            newest: Some(version(5, 1)),
            ..active.clone()
        };
        assert!(matches!(outcome(&has, &alloc), SecretOutcome::Existing(_)));
        // An ack of a version never delivered; then with the wrong KCV; then twice.
        let ack_with = |kcv: Vec<u8>, certificate: Option<Vec<u8>>| SecretOp::Ack {
            serial: 5,
            key_id: "k5-1".into(),
            version: 1,
            kcv,
            at: 9,
            binding,
            certificate,
        };
        let ack = |kcv: Vec<u8>| ack_with(kcv, None);
        let undelivered = SecretView {
            named: Some(version(5, 1)),
            ..active.clone()
        };
        assert!(matches!(
            outcome(&undelivered, &ack(vec![1, 2, 3])),
            SecretOutcome::Refused(Refusal::AckNotDelivered { .. })
        ));
        let mut delivered = version(5, 1);
        delivered.delivered_at = Some(2);
        let view = SecretView {
            named: Some(delivered.clone()),
            ..active.clone()
        };
        assert!(matches!(
            outcome(&view, &ack(vec![0, 0, 0])),
            SecretOutcome::Refused(Refusal::AckKcv)
        ));
        // An ack whose certificate the door did not check: the transaction applies the
        // door's rule. Another certificate of the same key (an earlier generation) is refused,
        // the record's own passes.
        let with_cert = |certificate: Vec<u8>| ack_with(vec![1, 2, 3], Some(certificate));
        let record_cert = view.device.as_ref().map(|d| d.certificate.clone()).unwrap();
        let mut other_cert = record_cert.clone();
        other_cert.push(0);
        assert!(matches!(
            outcome(&view, &with_cert(other_cert)),
            SecretOutcome::Refused(Refusal::NotTheCertificate { .. })
        ));
        let revoked_view = SecretView {
            device: Some(device(5, 1, DeviceStatus::Revoked)),
            ..view.clone()
        };
        assert!(matches!(
            outcome(&revoked_view, &with_cert(record_cert.clone())),
            SecretOutcome::Refused(Refusal::Revoked { .. })
        ));
        assert!(matches!(
            outcome(&view, &with_cert(record_cert)),
            SecretOutcome::Done(_)
        ));
        let (o, w, ev) = secret(&view, &ack(vec![1, 2, 3]));
        assert!(matches!(o, SecretOutcome::Done(_)) && w.len() == 1 && ev.is_some());
        delivered.confirmed_at = Some(3);
        let again = SecretView {
            named: Some(delivered),
            ..active
        };
        let (o, w, ev) = secret(&again, &ack(vec![1, 2, 3]));
        assert!(matches!(o, SecretOutcome::Unchanged(_)) && w.is_empty() && ev.is_none());
    }

    #[test]
    fn reset_retires_the_bindings_versions_and_gives_the_line_its_count_back() {
        let rec = device(5, 1, DeviceStatus::Active);
        let mut old = version(5, 1);
        old.retired_at = Some(1);
        let (o, w) = reset(
            Some(&rec),
            Some(&line(10, 4, true)),
            &[old, version(5, 2)],
            50,
            "operator:alice",
        );
        assert!(matches!(o, ResetOutcome::Reset(_)));
        let w = w.unwrap();
        assert_eq!(w.line.unwrap().enrolled, 3);
        assert_eq!(w.retired.len(), 1, "only the version not yet retired");
        assert_eq!(w.retired[0].retired_at, Some(50));
        let revoked = device(5, 1, DeviceStatus::Revoked);
        assert!(matches!(
            reset(Some(&revoked), None, &[], 50, "x"),
            (ResetOutcome::Revoked, None)
        ));
        assert!(matches!(
            reset(None, None, &[], 50, "x"),
            (ResetOutcome::Missing, None)
        ));
    }

    #[test]
    fn an_operator_is_revoked_once_and_stays_revoked_as_first_recorded() {
        let (first, event) = revoke_operator(None, "bob", 10, "operator:alice");
        let event = event.unwrap();
        assert_eq!(
            (event.event.as_str(), event.detail.as_str()),
            ("operator-revoke", "operator=bob")
        );
        let (again, none) = revoke_operator(Some(&first), "bob", 20, "operator:carol");
        assert_eq!((again, none), (first, None));
    }

    #[test]
    fn every_refusal_maps_to_its_problem_type_and_internal_says_nothing() {
        assert_eq!(
            Refusal::DuplicateKey { holder: 3 }.problem().kind,
            ProblemType::DuplicateKey
        );
        assert_eq!(
            Refusal::LineDisabled { line: "l".into() }.problem().kind,
            ProblemType::LineUnknown
        );
        let p = Refusal::SecretNotUnique.problem();
        assert_eq!((p.kind, p.detail.as_str()), (ProblemType::Internal, ""));
    }
}
