//! The registration authority: decides whether a request deserves a certificate.
//!
//! The stateless rules (token, line, range, CSR, key binding) come from `protocol_spec::enroll`;
//! the stateful ones (revoked, serial taken, duplicate key, replay, quota) are re-checked inside
//! the store transaction. Only this module can make a [`VerifiedEnrollment`], and the issuer
//! takes nothing else.

pub mod rules;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use protocol_spec::enroll::{self, RequestEncoding};
use protocol_spec::messages::ResponseForm;
use protocol_spec::token::{LineInfo, TokenPolicy};
use protocol_spec::{DeviceSerial, Problem, ProblemType, PublicKey, spki};

use crate::records::{LineRecord, SecretSource};

/// A request that passed every stateless check.
#[derive(Debug, Clone)]
pub struct VerifiedEnrollment {
    serial: DeviceSerial,
    spki: Vec<u8>,
    key_hash: [u8; 32],
    line: String,
    token_id: Vec<u8>,
    form: ResponseForm,
}

impl VerifiedEnrollment {
    /// The vouched-for serial.
    pub fn serial(&self) -> DeviceSerial {
        self.serial
    }
    /// The proven key.
    pub fn spki(&self) -> &[u8] {
        &self.spki
    }
    /// SHA-256 of the key.
    pub fn key_hash(&self) -> &[u8; 32] {
        &self.key_hash
    }
    /// The line that vouched.
    pub fn line(&self) -> &str {
        &self.line
    }
    /// The token id.
    pub fn token_id(&self) -> &[u8] {
        &self.token_id
    }
    /// The response form asked for.
    pub fn form(&self) -> ResponseForm {
        self.form
    }
}

/// Registered lines, cached for the hot path.
#[derive(Debug, Default)]
pub struct RegistrationAuthority {
    lines: RwLock<HashMap<String, LineInfo>>,
    /// Where each line's device secrets come from (fixed when the line is added).
    secret_sources: RwLock<HashMap<String, SecretSource>>,
    /// Per-line rate limits: (enrollments per second, bucket).
    rates: Mutex<HashMap<String, (u32, Bucket)>>,
    /// CA nodes serving from the same store, this one included: each takes an equal share of
    /// every line's rate (SPEC.md 10.1).
    nodes: AtomicU32,
    policy: TokenPolicy,
}

/// A token bucket: `rate` tokens a second, holding at most one second's worth (and at least
/// one token).
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64) -> Self {
        Bucket {
            tokens: rate.max(1.0),
            at: Instant::now(),
        }
    }

    /// Takes one token; `Err(seconds)` until the next one when there is none.
    fn take(&mut self, rate: f64, now: Instant) -> Result<(), f64> {
        let cap = rate.max(1.0);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(cap);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err((1.0 - self.tokens) / rate.max(f64::MIN_POSITIVE))
        }
    }
}

impl RegistrationAuthority {
    /// An authority applying `policy` to the given lines.
    pub fn new(policy: TokenPolicy, lines: &[LineRecord]) -> Self {
        let ra = RegistrationAuthority {
            lines: RwLock::new(HashMap::new()),
            secret_sources: RwLock::new(HashMap::new()),
            rates: Mutex::new(HashMap::new()),
            nodes: AtomicU32::new(1),
            policy,
        };
        ra.set_lines(lines);
        ra
    }

    /// Replaces the cached lines (after an operator change).
    pub fn set_lines(&self, lines: &[LineRecord]) {
        let map = lines
            .iter()
            .filter_map(|l| {
                let public_key = PublicKey::from_spki_der(&l.public_key).ok()?;
                Some((
                    l.id.clone(),
                    LineInfo {
                        public_key,
                        first_serial: l.first_serial,
                        last_serial: l.last_serial,
                        active: l.active,
                    },
                ))
            })
            .collect();
        if let Ok(mut guard) = self.lines.write() {
            *guard = map;
        }
        if let Ok(mut guard) = self.secret_sources.write() {
            *guard = lines
                .iter()
                .map(|l| (l.id.clone(), l.secret_source))
                .collect();
        }
        if let Ok(mut rates) = self.rates.lock() {
            let old = std::mem::take(&mut *rates);
            for l in lines.iter().filter(|l| l.rate > 0) {
                // A bucket survives a reload unless the line's rate changed.
                let bucket = match old.get(&l.id) {
                    Some((r, b)) if *r == l.rate => *b,
                    _ => Bucket::full(self.share(l.rate)),
                };
                rates.insert(l.id.clone(), (l.rate, bucket));
            }
        }
    }

    /// Where the secrets of line `line`'s devices come from, as cached; `None` for a line this
    /// node has not loaded yet (added on another node since the last refresh): read the store.
    pub fn secret_source(&self, line: &str) -> Option<SecretSource> {
        self.secret_sources.read().ok()?.get(line).copied()
    }

    /// Sets how many CA nodes serve from the store (at least 1); returns whether it changed.
    pub fn set_nodes(&self, n: u32) -> bool {
        self.nodes.swap(n.max(1), Ordering::Relaxed) != n.max(1)
    }

    /// CA nodes sharing each line's rate, this one included.
    pub fn nodes(&self) -> u32 {
        self.nodes.load(Ordering::Relaxed).max(1)
    }

    /// This node's share of a line's rate.
    fn share(&self, rate: u32) -> f64 {
        f64::from(rate) / f64::from(self.nodes())
    }

    /// The line's rate limit (SPEC.md section 3.3, check 11a): called for a verified request
    /// that would create a new binding, so that neither forged tokens nor retries of an
    /// existing binding (a replayed datagram, a device that lost its answer) use up the rate.
    pub fn rate_check(&self, line: &str) -> Result<(), Problem> {
        let mut rates = self.rates.lock().map_err(|_| Problem::internal())?;
        let Some((rate, bucket)) = rates.get_mut(line) else {
            return Ok(());
        };
        let nodes = self.nodes();
        bucket.take(self.share(*rate), Instant::now()).map_err(|wait| {
            let across = if nodes > 1 {
                format!(" across {nodes} CA nodes")
            } else {
                String::new()
            };
            Problem::new(
                ProblemType::RateLimited,
                format!(
                    "line {line:?} may enroll {rate} devices per second{across}; retry in {:.0} ms",
                    (wait * 1000.0).ceil()
                ),
            )
        })
    }

    /// Runs the stateless checks of SPEC.md section 3.3 (1 to 11).
    pub fn verify(
        &self,
        body: &[u8],
        encoding: RequestEncoding,
        now: u64,
    ) -> Result<VerifiedEnrollment, Problem> {
        let guard = self.lines.read().map_err(|_| Problem::internal())?;
        let dir = |id: &str| guard.get(id).cloned();
        let checked = enroll::check(body, encoding, &dir, now, self.policy)?;
        drop(guard);
        let claims = checked.token().claims();
        let spki_der = checked.csr().spki_der().to_vec();
        Ok(VerifiedEnrollment {
            serial: claims.serial,
            key_hash: spki::sha256(&spki_der),
            spki: spki_der,
            line: claims.line.clone(),
            token_id: claims.token_id.clone(),
            form: checked.form(),
        })
    }
}
