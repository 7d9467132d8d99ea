//! Revocation: the set of revoked certificate serials the mutual-TLS door consults at every
//! handshake (revoked devices' certificates, and those a reset superseded), and the CRL
//! published at `GET /crl`, signed by the CA and regenerated when something is revoked or reset.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use crate::records::RevokedCert;

/// How long a CRL is valid (nextUpdate - thisUpdate), seconds: 7 days.
pub const CRL_VALIDITY: u64 = 7 * 86_400;
/// A CRL older than this is signed again when asked for, seconds: 1 day.
pub const CRL_REFRESH: u64 = 86_400;

/// A certificate serial: (device serial, reset generation), SPEC.md 5.
pub type CertKey = (u64, u32);

/// The revoked certificate serials and the current CRL.
#[derive(Debug, Default)]
pub struct Revocations {
    revoked: RwLock<Listed>,
    crl: Mutex<CrlState>,
}

/// The certificates listed: those of revoked devices, and those a reset superseded.
#[derive(Debug, Default, PartialEq, Eq)]
struct Listed {
    devices: HashSet<CertKey>,
    superseded: HashSet<CertKey>,
}

impl Listed {
    fn of(certs: impl IntoIterator<Item = RevokedCert>) -> Self {
        let mut l = Listed::default();
        for c in certs {
            if c.superseded {
                l.superseded.insert(c.key());
            } else {
                l.devices.insert(c.key());
            }
        }
        l
    }
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
    /// The set loaded from the store's list ([`crate::store::Store::revoked`]).
    pub fn new(revoked: impl IntoIterator<Item = RevokedCert>) -> Self {
        Revocations {
            revoked: RwLock::new(Listed::of(revoked)),
            crl: Mutex::new(CrlState::default()),
        }
    }

    /// Whether the certificate of `serial` and `generation` is revoked: its device is
    /// revoked, or a reset superseded it.
    pub fn is_revoked(&self, serial: u64, generation: u32) -> bool {
        self.revoked
            .read()
            .map(|s| {
                s.devices.contains(&(serial, generation))
                    || s.superseded.contains(&(serial, generation))
            })
            .unwrap_or(true)
    }

    /// How many devices are revoked (superseded certificates not counted).
    pub fn count(&self) -> usize {
        self.revoked.read().map(|s| s.devices.len()).unwrap_or(0)
    }

    /// Records a change and drops the current CRL, so that the next request signs a new one.
    /// Returns whether it was a change (false: the certificate already was in that state).
    pub fn set(&self, cert: RevokedCert, listed: bool) -> bool {
        let changed = match self.revoked.write() {
            Ok(mut s) => {
                let set = if cert.superseded {
                    &mut s.superseded
                } else {
                    &mut s.devices
                };
                if listed {
                    set.insert(cert.key())
                } else {
                    set.remove(&cert.key())
                }
            }
            // A poisoned set: count it as a change, so that the CRL is signed again.
            Err(_) => true,
        };
        if let Ok(mut c) = self.crl.lock() {
            c.current = None;
        }
        changed
    }

    /// Takes the store's whole list (another CA node may have revoked or reset since): returns
    /// whether the set changed, and if so drops the current CRL, so that the next request signs
    /// a new one.
    pub fn replace(&self, revoked: impl IntoIterator<Item = RevokedCert>) -> bool {
        let new = Listed::of(revoked);
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
