//! The enrollment service the front ends call: registration authority, issuer, store and
//! group commit put together. Transport-neutral: bytes in, outcome out.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use protocol_spec::enroll::RequestEncoding;
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::profile::signature_value;
use protocol_spec::token::TokenPolicy;
use protocol_spec::{Problem, ProblemType};

use crate::commit::Committer;
use crate::issuer::Issuer;
use crate::ra::RegistrationAuthority;
use crate::records::DeviceStatus;
use crate::store::{EnrollOutcome, NewEnrollment, Store};

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
    store: Arc<dyn Store>,
    committer: Committer,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for CaService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaService")
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
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
        store: Arc<dyn Store>,
        policy: TokenPolicy,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, String> {
        let lines = store.lines().map_err(|e| e.to_string())?;
        let committer = Committer::start(store.clone())?;
        Ok(CaService {
            ra: RegistrationAuthority::new(policy, &lines),
            issuer,
            store,
            committer,
            clock,
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

    /// Re-reads the registered lines after a change.
    pub fn reload_lines(&self) -> Result<(), String> {
        let lines = self.store.lines().map_err(|e| e.to_string())?;
        self.ra.set_lines(&lines);
        Ok(())
    }

    /// Enrolls: checks, issues, commits durably, and returns the certificate.
    pub async fn enroll(
        &self,
        body: &[u8],
        encoding: RequestEncoding,
    ) -> Result<Enrolled, Problem> {
        let now = self.clock.now();
        let v = self.ra.verify(body, encoding, now)?;
        let serial = v.serial().get();

        // Fast path for retries and obvious conflicts, before spending a signature. The
        // transaction below re-checks all of it authoritatively.
        let existing = self
            .store
            .device(serial)
            .map_err(|e| internal("store read", e))?;
        if let Some(rec) = existing {
            if rec.status == DeviceStatus::Revoked {
                return Err(Problem::new(
                    ProblemType::Revoked,
                    format!("device {serial} is revoked"),
                ));
            }
            if rec.spki != v.spki() {
                return Err(Problem::new(
                    ProblemType::SerialTaken,
                    format!("serial {serial} is already bound to another key"),
                ));
            }
            self.committer
                .wait_durable()
                .await
                .map_err(|e| internal("durable wait", e))?;
            return Ok(Enrolled {
                certificate: rec.certificate,
                form: v.form(),
                created: false,
            });
        }
        if let Some(other) = self
            .store
            .serial_for_key(v.key_hash())
            .map_err(|e| internal("store read", e))?
        {
            return Err(Problem::new(
                ProblemType::DuplicateKey,
                format!("this public key is already bound to serial {other}"),
            ));
        }

        let issued = self.issuer.issue(&v).map_err(|e| internal("issuance", e))?;
        let outcome = self
            .committer
            .commit(NewEnrollment {
                serial,
                spki: v.spki().to_vec(),
                key_hash: *v.key_hash(),
                certificate: issued.der,
                line: v.line().to_string(),
                token_id: v.token_id().to_vec(),
                at: now,
            })
            .await
            .map_err(|e| internal("commit", e))?;
        match outcome {
            EnrollOutcome::Created(rec) => {
                tracing::debug!(serial, line = v.line(), "enrolled");
                Ok(Enrolled {
                    certificate: rec.certificate,
                    form: v.form(),
                    created: true,
                })
            }
            EnrollOutcome::Existing(rec) => Ok(Enrolled {
                certificate: rec.certificate,
                form: v.form(),
                created: false,
            }),
            EnrollOutcome::Refused(p) => Err(p),
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
            },
        })
    }
}
