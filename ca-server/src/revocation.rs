//! Revocation: the set of revoked serials the mutual-TLS door consults at every handshake, and
//! the CRL published at `GET /crl`, signed by the CA and regenerated when something is revoked.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

/// How long a CRL is valid (nextUpdate - thisUpdate), seconds: 7 days.
pub const CRL_VALIDITY: u64 = 7 * 86_400;
/// A CRL older than this is signed again when asked for, seconds: 1 day.
pub const CRL_REFRESH: u64 = 86_400;

/// The revoked serials and the current CRL.
#[derive(Debug, Default)]
pub struct Revocations {
    revoked: RwLock<HashSet<u64>>,
    crl: Mutex<CrlState>,
}

#[derive(Debug, Default)]
struct CrlState {
    current: Option<Crl>,
    last_number: u64,
}

/// A signed CRL.
#[derive(Debug, Clone)]
pub struct Crl {
    /// DER.
    pub der: Arc<Vec<u8>>,
    /// thisUpdate, Unix seconds.
    pub this_update: u64,
    /// The CRL number.
    pub number: u64,
}

impl Revocations {
    /// The set loaded from the store's list.
    pub fn new(revoked: impl IntoIterator<Item = u64>) -> Self {
        Revocations {
            revoked: RwLock::new(revoked.into_iter().collect()),
            crl: Mutex::new(CrlState::default()),
        }
    }

    /// Whether `serial` is revoked.
    pub fn is_revoked(&self, serial: u64) -> bool {
        self.revoked
            .read()
            .map(|s| s.contains(&serial))
            .unwrap_or(true)
    }

    /// How many serials are revoked.
    pub fn count(&self) -> usize {
        self.revoked.read().map(|s| s.len()).unwrap_or(0)
    }

    /// Records a change and drops the current CRL, so that the next request signs a new one.
    /// Returns whether it was a change (false: `serial` already was in that state).
    pub fn set(&self, serial: u64, revoked: bool) -> bool {
        let changed = match self.revoked.write() {
            Ok(mut s) if revoked => s.insert(serial),
            Ok(mut s) => s.remove(&serial),
            // A poisoned set: count it as a change, so that the CRL is signed again.
            Err(_) => true,
        };
        if let Ok(mut c) = self.crl.lock() {
            c.current = None;
        }
        changed
    }

    /// Takes the store's whole list (another CA node may have revoked since): returns whether
    /// the set changed, and if so drops the current CRL, so that the next request signs a new one.
    pub fn replace(&self, revoked: impl IntoIterator<Item = u64>) -> bool {
        let new: HashSet<u64> = revoked.into_iter().collect();
        let changed = match self.revoked.write() {
            Ok(mut s) if *s != new => {
                *s = new;
                true
            }
            Ok(_) => false,
            Err(_) => true,
        };
        if changed && let Ok(mut c) = self.crl.lock() {
            c.current = None;
        }
        changed
    }

    /// The current CRL, or a new one from `sign(floor)` when there is none or it is older
    /// than [`CRL_REFRESH`]. `sign` returns the new CRL's number and DER; `floor` is the least
    /// number it may carry: one more than the last this process signed, and at least the
    /// signing time in seconds (the numbers before they were kept in the store).
    pub fn crl<F, E>(&self, now: u64, sign: F) -> Result<Crl, E>
    where
        F: FnOnce(u64) -> Result<(u64, Vec<u8>), E>,
    {
        // The state is a cache and a counter, consistent after any panic: a poisoned lock
        // is taken as it is.
        let mut state = self
            .crl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = &state.current
            && now.saturating_sub(c.this_update) < CRL_REFRESH
        {
            return Ok(c.clone());
        }
        let (number, der) = sign(now.max(state.last_number + 1))?;
        let crl = Crl {
            der: Arc::new(der),
            this_update: now,
            number,
        };
        state.last_number = number;
        state.current = Some(crl.clone());
        Ok(crl)
    }
}
