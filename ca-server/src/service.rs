//! The enrollment service the front ends call: registration authority, issuer, store and
//! group commit put together. Transport-neutral: bytes in, outcome out.

use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use protocol_spec::enroll::RequestEncoding;
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::profile::signature_value;
use protocol_spec::token::TokenPolicy;
use protocol_spec::{Problem, ProblemType};

use crate::commit::Committer;
use crate::issuer::{IssueError, Issuer};
use crate::metrics::{Metrics, Transport};
use crate::ra::{RegistrationAuthority, rules};
use crate::records::{
    BdkRecord, DeviceRecord, DeviceStatus, LineRecord, RevokedCert, SecretRecord, SecretSource,
};
use crate::revocation::{CRL_VALIDITY, Crl, Revocations};
use crate::secrets::SecretKeys;
use crate::store::{
    EnrollOutcome, FetchRead, NewEnrollment, ResetOutcome, SecretOp, SecretOutcome, Store,
    StoreError,
};
use protocol_spec::messages::{SecretAck, SecretDelivery};
use zeroize::Zeroizing;

/// Where time comes from (a fake in tests of time rules).
pub trait Clock: Send + Sync + 'static {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }
}

/// A device as the mutual-TLS door authenticated it: its serial and the SHA-256 of the key
/// its certificate holds. Every secrets write checks, in its transaction, that the serial is
/// still bound to that key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The serial.
    pub serial: u64,
    /// SHA-256 of the SPKI.
    pub key_hash: [u8; 32],
    /// The line the device enrolled on (from the record the door read).
    pub line: String,
}

/// How many of the imported pool's entries a secret fetch reads to choose one from.
const POOL_SPREAD: usize = 32;

/// A successful enrollment, ready to encode.
#[derive(Debug, Clone)]
pub struct Enrolled {
    /// The certificate, DER.
    pub certificate: Vec<u8>,
    /// The form the device asked for.
    pub form: ResponseForm,
    /// Whether this request created the binding (false: a retry got the stored one).
    pub created: bool,
}

/// The CA's enrollment logic.
pub struct CaService {
    ra: RegistrationAuthority,
    issuer: Issuer,
    secrets: Arc<SecretKeys>,
    store: Arc<dyn Store>,
    committer: Committer,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    revocations: Arc<Revocations>,
    /// This process's id among the nodes on a shared store.
    instance: String,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

/// What a client is told of a store failure: `unavailable` when the database is not answering
/// (nothing was written; retry) or when whether a write was made is not known (a retry gets
/// the same answer), else `internal`.
fn store_failure(context: &str, e: StoreError) -> Problem {
    match e {
        StoreError::Unavailable(why) => {
            tracing::warn!(error = %why, "{context}: store unavailable");
            Problem::new(
                ProblemType::Unavailable,
                "the CA's database is not answering; nothing was written; retry",
            )
        }
        StoreError::Unknown(why) => {
            tracing::warn!(error = %why, "{context}: store outcome unknown");
            Problem::new(
                ProblemType::Unavailable,
                "the CA's database did not confirm the write; retry: a retry gets the same answer",
            )
        }
        e => internal(context, e),
    }
}

/// What a client is told of an issuer failure: `unavailable` when the CA key's token does not
/// answer (nothing was signed or written; retry), else `internal`.
fn issuer_failure(context: &str, e: IssueError) -> Problem {
    match e {
        IssueError::Unavailable(why) => {
            tracing::warn!(error = %why, "{context}: CA key unavailable");
            Problem::new(
                ProblemType::Unavailable,
                "the CA's signing key cannot be reached; nothing was written; retry",
            )
        }
        e => internal(context, e),
    }
}

/// What a client is told of a failed Initial Key derivation: `unavailable` when the token
/// holding the BDK does not answer or does not show the BDK's object (as for the CA key:
/// nothing was derived or written; retry), else `internal`.
fn bdk_failure(context: &str, e: crate::secrets::BdkUseError) -> Problem {
    match e {
        crate::secrets::BdkUseError::Unavailable(why) => {
            tracing::warn!(error = %why, "{context}: BDK unavailable");
            Problem::new(
                ProblemType::Unavailable,
                "the CA's key token cannot derive this device's key now; nothing was written; retry",
            )
        }
        e => internal(context, e),
    }
}

fn internal(context: &str, e: impl std::fmt::Display) -> Problem {
    // The detail stays in the server's log; the client sees only "internal".
    tracing::error!(error = %e, "{context}");
    Problem::internal()
}

impl CaService {
    /// Assembles the service and starts the group-commit thread.
    pub fn new(
        issuer: Issuer,
        secrets: SecretKeys,
        store: Arc<dyn Store>,
        policy: TokenPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let lines = store.lines().map_err(|e| e.to_string())?;
        let revoked = store.revoked().map_err(|e| e.to_string())?;
        let metrics = Arc::new(Metrics::new());
        let committer = Committer::start(store.clone(), metrics.clone())?;
        Ok(CaService {
            ra: RegistrationAuthority::new(policy, &lines),
            issuer,
            secrets: Arc::new(secrets),
            store,
            committer,
            clock,
            metrics,
            revocations: Arc::new(Revocations::new(revoked)),
            instance: {
                let mut id = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                    .map_err(|_| "no random bytes for the instance id".to_string())?;
                hex::encode(id)
            },
        })
    }

    /// The issuer (CA certificate, key id).
    pub fn issuer(&self) -> &Issuer {
        &self.issuer
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The committer (for statistics).
    pub fn committer(&self) -> &Committer {
        &self.committer
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The revoked certificates (for the mutual-TLS door's handshake check).
    pub fn revocations(&self) -> &Arc<Revocations> {
        &self.revocations
    }

    /// The clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
    }

    /// Re-reads the registered lines after a change.
    pub fn reload_lines(&self) -> Result<(), String> {
        let lines = self.store.lines().map_err(|e| e.to_string())?;
        self.ra.set_lines(&lines);
        Ok(())
    }

    /// Says on the store that this node stops serving (its share of each line's rate goes to
    /// the others at their next refresh).
    pub fn leave(&self) -> Result<(), String> {
        self.store.leave(&self.instance).map_err(|e| e.to_string())
    }

    /// Reads again what other CA nodes on a shared store may have changed: the revoked
    /// certificates, those of revoked devices and those a reset superseded (the mutual-TLS door
    /// refuses them from the next handshake; the CRL is signed again), and the lines; and says on the store that this node is alive, learning how many nodes
    /// share each line's rate (those seen within `window`). Returns whether the revoked set
    /// changed.
    pub fn refresh_shared_state(&self, window: std::time::Duration) -> Result<bool, String> {
        let node = crate::audit::node().unwrap_or("unnamed");
        let nodes = self
            .store
            .heartbeat(&self.instance, node, window)
            .map_err(|e| e.to_string())?;
        if self.ra.set_nodes(nodes) {
            tracing::info!(
                nodes,
                "CA nodes serving from the store; each line's rate is shared among them"
            );
        }
        let revoked = self.store.revoked().map_err(|e| e.to_string())?;
        let changed = self.revocations.replace(revoked);
        self.reload_lines()?;
        Ok(changed)
    }

    /// Enrolls: checks, issues, commits durably, and returns the certificate. Counted in the
    /// metrics under `transport`.
    pub async fn enroll(
        &self,
        body: &[u8],
        encoding: RequestEncoding,
        transport: Transport,
    ) -> Result<Enrolled, Problem> {
        let started = Instant::now();
        let r = self.enroll_inner(body, encoding).await;
        self.metrics
            .enrollment(transport, r.as_ref().map(|e| e.created), started.elapsed());
        r
    }

    async fn enroll_inner(
        &self,
        body: &[u8],
        encoding: RequestEncoding,
    ) -> Result<Enrolled, Problem> {
        let now = self.clock.now();
        let v = self.ra.verify(body, encoding, now)?;
        let serial = v.serial().get();

        // An operator may reset the serial between the read and the write: the certificate,
        // made for the generation read, is then made again for the new one (at most a few
        // times; resets are rare operator actions).
        for _ in 0..4 {
            match self.enroll_once(&v, serial, now).await? {
                Some(done) => return Ok(done),
                None => continue,
            }
        }
        Err(internal(
            "enrollment",
            "the serial's generation changed under every attempt",
        ))
    }

    /// One attempt of [`CaService::enroll_inner`]: `None` when the certificate was made for a
    /// generation that is no longer the serial's next.
    async fn enroll_once(
        &self,
        v: &crate::ra::VerifiedEnrollment,
        serial: u64,
        now: u64,
    ) -> Result<Option<Enrolled>, Problem> {
        // Fast path for retries and obvious conflicts, before spending a signature: the same
        // rule the transaction below applies authoritatively, over what is stored now.
        // The key may be bound to this very serial between the two reads (a concurrent
        // identical request): then the transaction below returns the stored certificate.
        let read = self
            .store
            .binding_of(serial, v.key_hash())
            .map_err(|e| store_failure("store read", e))?;
        if let Some(rec) = rules::binding(read.device.as_ref(), read.key_holder, serial, v.spki())
            .map_err(|r| r.problem())?
        {
            self.committer
                .wait_durable()
                .await
                .map_err(|e| internal("durable wait", e))?;
            return Ok(Some(Enrolled {
                certificate: rec.certificate,
                form: v.form(),
                created: false,
            }));
        }

        self.ra.rate_check(v.line())?;
        // RFC 5280 4.1.2.2: the certificate serial carries how many times the serial was reset,
        // so that a binding after a reset repeats no earlier certificate's serial.
        let generation = u32::try_from(read.resets)
            .map_err(|_| internal("issuance", format!("serial {serial} reset too often")))?;
        let issued = self
            .issuer
            .issue(v, generation)
            .map_err(|e| issuer_failure("issuance", e))?;
        let outcome = self
            .committer
            .commit(NewEnrollment {
                serial,
                spki: v.spki().to_vec(),
                key_hash: *v.key_hash(),
                certificate: issued.der,
                generation,
                line: v.line().to_string(),
                token_id: v.token_id().to_vec(),
                at: now,
            })
            .await
            .map_err(|e| store_failure("commit", e))?;
        match outcome {
            EnrollOutcome::Created(rec) => {
                tracing::info!(serial, generation, line = v.line(), "enrolled");
                Ok(Some(Enrolled {
                    certificate: rec.certificate,
                    form: v.form(),
                    created: true,
                }))
            }
            EnrollOutcome::Existing(rec) => Ok(Some(Enrolled {
                certificate: rec.certificate,
                form: v.form(),
                created: false,
            })),
            EnrollOutcome::Refused(r) if r.is_retryable() => {
                tracing::info!(serial, "{r}; issuing again");
                Ok(None)
            }
            EnrollOutcome::Refused(r) => Err(r.problem()),
        }
    }

    /// The response message for an enrollment, in the form the device asked for.
    pub fn response(&self, e: &Enrolled) -> Result<EnrollResponse, Problem> {
        Ok(match e.form {
            ResponseForm::Full => EnrollResponse::Full {
                certificate: e.certificate.clone(),
            },
            ResponseForm::Compact => EnrollResponse::Compact {
                ca_key_id: self.issuer.profile().ca_key_id().to_vec(),
                signature: signature_value(&e.certificate)
                    .map_err(|err| internal("stored certificate", err))?,
                generation: crate::records::generation_of(&e.certificate),
            },
        })
    }
}

impl CaService {
    /// The device a mutual-TLS client certificate belongs to. The TLS layer has already checked
    /// the chain to the CA; here the record must exist, be active, and hold this very
    /// certificate.
    pub fn device_for_certificate(&self, cert_der: &[u8]) -> Result<DeviceIdentity, Problem> {
        let serial = device_serial_of(cert_der)?;
        let rec = self
            .store
            .device(serial)
            .map_err(|e| store_failure("store read", e))?;
        identity(rec.as_ref(), serial, cert_der)
    }

    /// The door's check for a secret fetch, with the fetch's first reads in the same flight
    /// ([`Store::fetch_read`]): the device's versions, then its record (which the door checks),
    /// then the pool's first entries. One round trip to a database where there were three.
    pub fn device_for_fetch(
        &self,
        cert_der: &[u8],
    ) -> Result<(DeviceIdentity, FetchRead), Problem> {
        let serial = device_serial_of(cert_der)?;
        let read = self
            .store
            .fetch_read(serial, POOL_SPREAD)
            .map_err(|e| store_failure("store read", e))?;
        let id = identity(read.device.as_ref(), serial, cert_der)?;
        Ok((id, read))
    }

    /// Checks again that `id` is the serial's current, active binding (after reads that did
    /// not go through a transaction which checks it).
    fn still_bound(&self, id: &DeviceIdentity) -> Result<(), Problem> {
        let rec = self
            .store
            .device(id.serial)
            .map_err(|e| store_failure("store read", e))?;
        rules::active_binding(rec.as_ref(), id.serial, Some(&id.key_hash)).map_err(|r| r.problem())
    }

    fn deliver(
        &self,
        rec: &SecretRecord,
        secret: Option<Zeroizing<Vec<u8>>>,
    ) -> Result<SecretDelivery, Problem> {
        let secret = match secret {
            Some(s) => s,
            None => self
                .secrets
                .open_version(rec)
                .map_err(|e| internal("secret decryption", e))?,
        };
        let algorithm = crate::secrets::algorithm_of(&rec.source);
        // The key check value stored when the version was sealed (the AEAD vouches that the
        // secret is the one it was computed from): computing it again would leave an AES key
        // schedule of the secret on the stack.
        if secret.len() != algorithm.secret_len() || rec.kcv.len() < 3 {
            return Err(internal("delivery", "a stored secret of the wrong length"));
        }
        let kcv = rec.kcv.clone();
        let initial_key_id = if algorithm.has_initial_key_id() {
            Some(
                protocol_spec::dukpt::InitialKeyId::from_hex(&rec.key_id)
                    .map_err(|e| internal("delivery", e))?
                    .bytes(),
            )
        } else {
            None
        };
        Ok(SecretDelivery {
            key_id: rec.key_id.clone(),
            version: rec.version,
            algorithm: algorithm.name().to_string(),
            secret,
            kcv,
            initial_key_id,
        })
    }

    /// Where the secrets of device `id` come from: its line's source, as the registration
    /// authority caches it (a line's source is set when the line is added and never changes);
    /// read from the store for a line added on another node since this one last refreshed
    /// (`random` when the line is gone: the write's transaction refuses that anyway).
    fn secret_source_of(&self, id: &DeviceIdentity) -> Result<SecretSource, Problem> {
        if let Some(source) = self.ra.secret_source(&id.line) {
            return Ok(source);
        }
        Ok(self
            .store
            .line(&id.line)
            .map_err(|e| store_failure("store read", e))?
            .map(|l| l.secret_source)
            .unwrap_or_default())
    }

    /// The device's newest secret; version 1 is allocated on the first fetch (from the imported
    /// pool if it has keys, else from the CSPRNG). Delivery is durable before the answer.
    pub async fn fetch_secret(&self, id: &DeviceIdentity) -> Result<SecretDelivery, Problem> {
        self.fetch_secret_after(id, None).await
    }

    /// [`CaService::fetch_secret`], starting from what [`CaService::device_for_fetch`] read
    /// (`first`, used by the first attempt; later attempts read again).
    pub async fn fetch_secret_after(
        &self,
        id: &DeviceIdentity,
        first: Option<FetchRead>,
    ) -> Result<SecretDelivery, Problem> {
        let started = Instant::now();
        let r = self.fetch_secret_inner(id, first).await;
        self.metrics
            .delivery(r.as_ref().map(|_| ()), started.elapsed());
        r
    }

    async fn fetch_secret_inner(
        &self,
        id: &DeviceIdentity,
        mut first: Option<FetchRead>,
    ) -> Result<SecretDelivery, Problem> {
        let (serial, binding) = (id.serial, id.key_hash);
        for attempt in 0..8u64 {
            let now = self.clock.now();
            // The door's read: the device's record came after these versions and was checked,
            // so a reset since they were read has already been refused.
            let first_read = first.take();
            let checked = first_read.is_some();
            let (versions, read_pool) = match first_read {
                Some(r) => (r.versions, Some(r.pool)),
                None => (
                    self.store
                        .secret_versions(serial)
                        .map_err(|e| store_failure("store read", e))?,
                    None,
                ),
            };
            // The newest version of the current binding; versions of a binding an operator
            // reset are retired, and the new binding gets the next version.
            let current = versions.last().filter(|l| l.retired_at.is_none());
            let next_version = versions.last().map_or(1, |l| l.version + 1);
            if let Some(latest) = current {
                if latest.delivered_at.is_none() {
                    let op = SecretOp::Delivered {
                        serial,
                        version: latest.version,
                        at: now,
                        binding,
                    };
                    match self
                        .committer
                        .secret(op)
                        .await
                        .map_err(|e| store_failure("commit", e))?
                    {
                        SecretOutcome::Done(_) | SecretOutcome::Unchanged(_) => {}
                        SecretOutcome::Refused(r) => return Err(r.problem()),
                        _ => continue,
                    }
                } else {
                    // No transaction checked the binding on this path: unless the door's read
                    // of the record came after these versions, a reset (and a new binding's
                    // version) since the door's check shows only in a read made now.
                    if !checked {
                        self.still_bound(id)?;
                    }
                    self.committer
                        .wait_durable()
                        .await
                        .map_err(|e| internal("durable wait", e))?;
                }
                return self.deliver(latest, None);
            }
            let (secret, key_id, source, from_pool) = match self.secret_source_of(id)? {
                SecretSource::Dukpt(bdk_id) => {
                    let (secret, key_id, source) =
                        crate::secrets::dukpt_secret(self.store.as_ref(), &self.secrets, bdk_id, 0)
                            .map_err(|e| bdk_failure("DUKPT allocation", e))?;
                    (secret, key_id, source, None)
                }
                source => {
                    // One read of the pool's first entries; concurrent fetches each take a
                    // different one of them, by serial and attempt, so that they rarely meet
                    // on the same key (the loser of such a meeting reads again).
                    let mut pool = match read_pool {
                        Some(p) => p,
                        None => self
                            .store
                            .pool(0, POOL_SPREAD)
                            .map_err(|e| store_failure("store read", e))?,
                    };
                    let pick = match pool.len() as u64 {
                        0 => None,
                        n => Some((serial % n + attempt % n) % n),
                    };
                    let pool = pick.map(|k| pool.swap_remove(k as usize));
                    match pool {
                        Some(entry) => {
                            let s = self
                                .secrets
                                .open_pool(&entry)
                                .map_err(|e| internal("pool decryption", e))?;
                            (
                                s,
                                entry.key_id.clone(),
                                "import".to_string(),
                                Some(entry.key_id),
                            )
                        }
                        None if source == SecretSource::Pool => {
                            return Err(Problem::new(
                                ProblemType::Unavailable,
                                "this device's line takes imported keys only, and none is left; \
                                 retry after an import",
                            ));
                        }
                        None => (
                            Zeroizing::new(
                                self.secrets
                                    .generate()
                                    .map_err(|e| internal("random", e))?
                                    .to_vec(),
                            ),
                            self.secrets
                                .new_key_id()
                                .map_err(|e| internal("random", e))?,
                            "csprng".to_string(),
                            None,
                        ),
                    }
                }
            };
            let record =
                self.secrets
                    .seal_version(serial, next_version, key_id, &secret, &source, now);
            // The secret went through ring's stack (key check value, keyed hash, sealing, and
            // for DUKPT the derivation): wiped before the commit below lets the task yield.
            crate::secrets::scrub_stack();
            let mut record = record.map_err(|e| internal("sealing", e))?;
            record.delivered_at = Some(now);
            let op = SecretOp::Allocate {
                record,
                from_pool,
                binding,
            };
            match self
                .committer
                .secret(op)
                .await
                .map_err(|e| store_failure("commit", e))?
            {
                SecretOutcome::Done(Some(rec)) => {
                    tracing::debug!(serial, version = rec.version, "secret allocated");
                    return self.deliver(&rec, Some(secret));
                }
                SecretOutcome::Refused(r) if !r.is_retryable() => return Err(r.problem()),
                // Another fetch won the race, a pool entry was taken, or (with a broken random
                // generator) the secret was not unique: read again.
                _ => continue,
            }
        }
        Err(internal(
            "secret allocation",
            "no progress after 8 attempts",
        ))
    }

    /// Records the device's acknowledgement (idempotent), for a device the door admitted.
    pub async fn ack_secret(&self, id: &DeviceIdentity, ack: SecretAck) -> Result<(), Problem> {
        let started = Instant::now();
        let r = self
            .ack_secret_inner(id.serial, id.key_hash, None, ack)
            .await;
        self.metrics.ack(r.as_ref().map(|_| ()), started.elapsed());
        r
    }

    /// Records the acknowledgement of the device holding `cert_der`, which the door has not
    /// checked against the record: the acknowledgement's own transaction applies the door's
    /// rule over the record it reads anyway (one read of the record fewer; on PostgreSQL one
    /// round trip fewer).
    pub async fn ack_secret_for_certificate(
        &self,
        cert_der: &[u8],
        ack: SecretAck,
    ) -> Result<(), Problem> {
        let started = Instant::now();
        let r = match crate::tls::certificate_serial_and_key(cert_der) {
            None => Err(Problem::new(
                ProblemType::UnknownDevice,
                "the certificate's serial is not a device serial",
            )),
            Some((serial, key_hash)) => {
                self.ack_secret_inner(serial.device.get(), key_hash, Some(cert_der.to_vec()), ack)
                    .await
            }
        };
        self.metrics.ack(r.as_ref().map(|_| ()), started.elapsed());
        r
    }

    async fn ack_secret_inner(
        &self,
        serial: u64,
        key_hash: [u8; 32],
        certificate: Option<Vec<u8>>,
        ack: SecretAck,
    ) -> Result<(), Problem> {
        let op = SecretOp::Ack {
            serial,
            key_id: ack.key_id,
            version: ack.version,
            kcv: ack.kcv.to_vec(),
            at: self.clock.now(),
            binding: key_hash,
            certificate,
        };
        match self
            .committer
            .secret(op)
            .await
            .map_err(|e| store_failure("commit", e))?
        {
            SecretOutcome::Done(_) | SecretOutcome::Unchanged(_) => Ok(()),
            SecretOutcome::Refused(r) => Err(r.problem()),
            SecretOutcome::Existing(_) | SecretOutcome::Conflict => {
                Err(internal("ack", "unexpected store outcome"))
            }
        }
    }

    /// Creates a new pending version for a device; it is delivered on the device's next fetch.
    pub async fn rotate_secret(&self, serial: u64, actor: &str) -> Result<SecretRecord, Problem> {
        let (_, mut done, mut failed) = self.rotate_many(vec![serial], actor, 1).await?;
        match (done.pop(), failed.pop()) {
            (Some(rec), _) => Ok(rec),
            (None, Some((_, p))) => Err(p),
            (None, None) => Err(internal("rotation", "no outcome for the serial")),
        }
    }

    /// Rotates many devices, a batch of them per group commit. Returns how many were rotated,
    /// the first `keep` new versions, and the devices that could not be rotated (revoked,
    /// gone) with why.
    pub async fn rotate_many(
        &self,
        serials: Vec<u64>,
        actor: &str,
        keep: usize,
    ) -> Result<(u64, Vec<SecretRecord>, Vec<(u64, Problem)>), Problem> {
        let (mut rotated, mut done, mut failed) = (0u64, Vec::new(), Vec::new());
        for chunk in serials.chunks(512) {
            let (keys, at, actor) = (self.secrets.clone(), self.clock.now(), actor.to_string());
            let chunk = chunk.to_vec();
            let results = self
                .committer
                .run(move |s| {
                    let results = rotate_batch(s, &keys, &chunk, at, &actor)?;
                    Ok(chunk.into_iter().zip(results).collect::<Vec<_>>())
                })
                .await
                .map_err(|e| store_failure("commit", e))?;
            for (serial, r) in results {
                match r {
                    Ok(rec) => {
                        rotated += 1;
                        if done.len() < keep {
                            done.push(rec);
                        }
                    }
                    Err(p) => failed.push((serial, p)),
                }
            }
        }
        self.metrics.rotated(rotated);
        Ok((rotated, done, failed))
    }

    /// Revokes a device: refused at the mutual-TLS door from its next handshake on, and listed
    /// in the CRL. Returns the record, `None` if there is no such device.
    pub async fn revoke(&self, serial: u64, actor: &str) -> Result<Option<DeviceRecord>, Problem> {
        let (at, actor) = (self.clock.now(), actor.to_string());
        let rec = self
            .committer
            .run(move |s| s.set_status(serial, DeviceStatus::Revoked, at, &actor))
            .await
            .map_err(|e| store_failure("commit", e))?;
        // Revoking a revoked device changes nothing: no count, no log line.
        if let Some(r) = &rec
            && self
                .revocations
                .set(RevokedCert::revoked(r, r.revoked_at.unwrap_or(at)), true)
        {
            self.metrics.revoked();
            tracing::info!(serial, "device revoked");
        }
        Ok(rec)
    }

    /// Frees a serial for re-enrollment, keeping its history (see [`Store::reset_device`]).
    pub async fn reset(&self, serial: u64, actor: &str) -> Result<ResetOutcome, Problem> {
        let (at, actor) = (self.clock.now(), actor.to_string());
        let outcome = self
            .committer
            .run(move |s| s.reset_device(serial, at, &actor))
            .await
            .map_err(|e| store_failure("commit", e))?;
        if let ResetOutcome::Reset(rec) = &outcome {
            // The superseded certificate goes on the CRL (signed again on the next request)
            // and is refused at the mutual-TLS handshake.
            let old = RevokedCert {
                superseded: true,
                ..RevokedCert::revoked(rec, at)
            };
            self.revocations.set(old, true);
            self.metrics.reset();
            tracing::info!(serial, "device reset");
        }
        Ok(outcome)
    }

    /// Revokes an operator: refused at the admin door from its next request (durable on
    /// return). Revoking a revoked operator returns the first revocation.
    pub async fn revoke_operator(
        &self,
        name: &str,
        actor: &str,
    ) -> Result<crate::records::OperatorRevocation, StoreError> {
        let (name, at, actor) = (name.to_string(), self.clock.now(), actor.to_string());
        let rec = self
            .committer
            .run(move |s| s.revoke_operator(&name, at, &actor))
            .await?;
        tracing::info!(operator = %rec.name, "operator revoked");
        Ok(rec)
    }

    /// The current CRL (signed again when something was revoked or it is a day old).
    pub fn crl(&self) -> Result<Crl, Problem> {
        let now = self.clock.now();
        self.revocations.crl(now, |floor| {
            let revoked = self.store.revoked().map_err(|e| store_failure("CRL", e))?;
            // Kept in the store: numbers grow across restarts and across every node.
            let number = self
                .store
                .next_crl_number(floor)
                .map_err(|e| store_failure("CRL number", e))?;
            let der = self
                .issuer
                .sign_crl(&revoked, now, CRL_VALIDITY, number)
                .map_err(|e| issuer_failure("CRL", e))?;
            Ok((number, der))
        })
    }

    /// Registers a line (durable on return) and starts accepting its tokens.
    pub async fn add_line(&self, line: LineRecord, actor: &str) -> Result<LineRecord, StoreError> {
        let actor = actor.to_string();
        let l = line.clone();
        self.committer.run(move |s| s.add_line(&l, &actor)).await?;
        self.reload_lines().map_err(StoreError::Backend)?;
        Ok(line)
    }

    /// Stores a sealed DUKPT Base Derivation Key (durable on return).
    pub async fn add_bdk(&self, bdk: BdkRecord, actor: &str) -> Result<BdkRecord, StoreError> {
        let actor = actor.to_string();
        let b = bdk.clone();
        self.committer.run(move |s| s.add_bdk(&b, &actor)).await?;
        Ok(bdk)
    }

    /// Enables or disables a line or sets its rate (durable on return); `None` if unknown.
    pub async fn change_line(
        &self,
        id: &str,
        change: crate::store::LineChange,
        actor: &str,
    ) -> Result<Option<LineRecord>, String> {
        let (id, at, actor) = (id.to_string(), self.clock.now(), actor.to_string());
        let line = self
            .committer
            .run(move |s| s.change_line(&id, change, at, &actor))
            .await
            .map_err(|e| e.to_string())?;
        self.reload_lines()?;
        Ok(line)
    }

    /// Appends an audit entry for an operator's lookup (durable on return).
    pub async fn record_event(
        &self,
        event: &'static str,
        serial: Option<u64>,
        actor: &str,
        detail: String,
    ) -> Result<(), String> {
        let (at, actor) = (self.clock.now(), actor.to_string());
        self.committer
            .run(move |s| s.record_event(event, serial, &actor, detail, at))
            .await
            .map_err(|e| e.to_string())
    }

    /// The secret keys (for imports).
    pub fn secret_keys(&self) -> &SecretKeys {
        &self.secrets
    }
}

/// Seals and stores an import batch, all or nothing (used online by the admin API and offline by
/// `ca-server secrets import`). Returns how many keys were imported.
/// The device serial a client certificate names.
fn device_serial_of(cert_der: &[u8]) -> Result<u64, Problem> {
    Ok(crate::tls::certificate_serial(cert_der)
        .ok_or_else(|| {
            Problem::new(
                ProblemType::UnknownDevice,
                "the certificate's serial is not a device serial",
            )
        })?
        .device
        .get())
}

/// The door's rule ([`rules::admit`]) over the record read for `serial`.
fn identity(
    rec: Option<&DeviceRecord>,
    serial: u64,
    cert_der: &[u8],
) -> Result<DeviceIdentity, Problem> {
    let rec = rules::admit(rec, serial, cert_der).map_err(|r| r.problem())?;
    Ok(DeviceIdentity {
        serial,
        key_hash: protocol_spec::spki::sha256(&rec.spki),
        line: rec.line.clone(),
    })
}

pub fn import_batch(
    store: &dyn Store,
    keys: &SecretKeys,
    batch: Vec<crate::secrets::ImportedKey>,
    at: u64,
    actor: &str,
) -> Result<usize, String> {
    let n = batch.len();
    let entries = batch
        .into_iter()
        .map(|(id, key)| keys.seal_pool(id, &key, at))
        .collect::<Result<Vec<_>, _>>()?;
    let op = SecretOp::Import {
        entries,
        at,
        actor: actor.to_string(),
    };
    match store.apply_secret(&op).map_err(|e| e.to_string())? {
        SecretOutcome::Done(_) => {
            store.sync().map_err(|e| e.to_string())?;
            Ok(n)
        }
        SecretOutcome::Refused(r) => Err(r.to_string()),
        other => Err(format!("import failed: {other:?}")),
    }
}

/// A rotation of `serial` to the version after its newest: a new secret and key id, sealed.
fn next_rotation(
    store: &dyn Store,
    keys: &SecretKeys,
    serial: u64,
    at: u64,
    actor: &str,
    dukpt_taken: &mut std::collections::HashMap<protocol_spec::dukpt::BdkId, u64>,
) -> Result<SecretOp, crate::store::StoreError> {
    let fail = |e: String| crate::store::StoreError::Backend(e);
    let head = store
        .secret_versions(serial)?
        .last()
        .map(|r| r.version)
        .unwrap_or(0);
    let line_source = match store.device(serial)? {
        Some(d) => store
            .line(&d.line)?
            .map(|l| l.secret_source)
            .unwrap_or_default(),
        None => SecretSource::Random,
    };
    let (secret, key_id, source) = match line_source {
        // A new Initial Key under a new derivation id; the rotations before it in the same
        // batch took the ids before it.
        SecretSource::Dukpt(bdk_id) => {
            let taken = dukpt_taken.entry(bdk_id).or_default();
            let r = crate::secrets::dukpt_secret(store, keys, bdk_id, *taken)
                .map_err(|e| fail(e.to_string()))?;
            *taken += 1;
            r
        }
        SecretSource::Random | SecretSource::Pool => (
            Zeroizing::new(keys.generate().map_err(fail)?.to_vec()),
            keys.new_key_id().map_err(fail)?,
            "csprng".to_string(),
        ),
    };
    let record = keys
        .seal_version(serial, head + 1, key_id, &secret, &source, at)
        .map_err(fail)?;
    Ok(SecretOp::Rotate {
        record,
        actor: actor.to_string(),
    })
}

/// Adds version n+1 to each device of `serials` inside `store` (not yet synced), all in one
/// store write ([`Store::apply_writes`]); a device whose write conflicted (a key id drawn twice,
/// a duplicate serial in the list) is retried alone with [`rotate_in`]. One result per serial,
/// in order; the outer error is the store's.
pub fn rotate_batch(
    store: &dyn Store,
    keys: &SecretKeys,
    serials: &[u64],
    at: u64,
    actor: &str,
) -> Result<Vec<Result<SecretRecord, Problem>>, crate::store::StoreError> {
    let fail = |e: String| crate::store::StoreError::Backend(e);
    let mut writes = Vec::with_capacity(serials.len());
    let mut dukpt_taken = std::collections::HashMap::new();
    for &serial in serials {
        writes.push(crate::store::Write::Secret(next_rotation(
            store,
            keys,
            serial,
            at,
            actor,
            &mut dukpt_taken,
        )?));
    }
    let outcomes = store.apply_writes(&writes)?;
    if outcomes.len() != serials.len() {
        return Err(fail(format!(
            "{} outcomes for {} rotations",
            outcomes.len(),
            serials.len()
        )));
    }
    serials
        .iter()
        .zip(outcomes)
        .map(|(&serial, outcome)| match outcome {
            crate::store::Written::Secret(SecretOutcome::Done(Some(rec))) => Ok(Ok(rec)),
            crate::store::Written::Secret(SecretOutcome::Refused(r)) if !r.is_retryable() => {
                Ok(Err(r.problem()))
            }
            _ => rotate_in(store, keys, serial, at, actor),
        })
        .collect()
}

/// Adds version n+1 to a device's secrets inside `store` (not yet synced). The outer error is
/// the store's, the inner the device's (unknown, revoked).
pub fn rotate_in(
    store: &dyn Store,
    keys: &SecretKeys,
    serial: u64,
    at: u64,
    actor: &str,
) -> Result<Result<SecretRecord, Problem>, crate::store::StoreError> {
    let fail = |e: String| crate::store::StoreError::Backend(e);
    for _ in 0..8 {
        let op = next_rotation(
            store,
            keys,
            serial,
            at,
            actor,
            &mut std::collections::HashMap::new(),
        )?;
        match store.apply_secret(&op)? {
            SecretOutcome::Done(Some(rec)) => return Ok(Ok(rec)),
            SecretOutcome::Refused(r) if !r.is_retryable() => return Ok(Err(r.problem())),
            _ => continue,
        }
    }
    Err(fail("rotation made no progress after 8 attempts".into()))
}
