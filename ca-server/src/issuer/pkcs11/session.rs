//! One pool of sessions per PKCS#11 token, shared by everything the CA does in that token: the
//! CA key's signatures ([`super::TokenKey`]), the operator CA's, the DUKPT BDKs
//! ([`super::BdkToken`]) and the sealed key-encryption key.
//!
//! A pool holds the module's context and the token's slot and logs the user in once: in
//! PKCS#11 a login holds for every session of the application on that token, and a new
//! session's `C_Login` answers `CKR_USER_ALREADY_LOGGED_IN` (each new session still logs in,
//! because SoftHSM2 logs the application out when its last session on the token closes). Idle
//! sessions are kept for the next call. At most [`SessionLimits::max`] sessions are open at once
//! (`[issuer] pkcs11_sessions`: an HSM limits the sessions of a partition); a call that finds
//! every one busy waits for one, at most [`SessionLimits::wait`], and is then
//! [`Failure::Unavailable`]. A token that refuses another session (its own session limit,
//! `CKR_SESSION_COUNT`, shared with other applications) is waited on the same way, for one of
//! the pool's sessions to come back; the module is never reset for it. One process has one
//! pool per token ([`TokenSessions::open`] hands out the pool that is already open), so the CA
//! key, the operator CA's key and the BDKs share the sessions and the login.
//!
//! A call whose session fails ([`Fault::Lost`]) is tried again: on another session, after
//! every idle one is closed (when one session failed, the others most likely did too); then
//! after the module is reset (`C_Finalize`, `C_Initialize`: a token pulled out and put back, or
//! SoftHSM2's token folder gone and back, is seen again only then; at most once a second, with
//! no call in flight) and the slot found again. Past that the token is
//! [`Failure::Unavailable`]; the next call tries again, so calls resume by themselves when the
//! token is back. An object handle found on a session is cached for one [`TokenSessions::epoch`]
//! ([`HandleCache`]): the epoch changes whenever sessions are dropped after a failure.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError, RwLock, TryLockError, Weak};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::object::ObjectHandle;
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;

use super::{PIN_ENV, PinSource, Pkcs11Uri};

/// How many sessions a pool may open, and how long a call waits for one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// Sessions open at once, at most (at least 1).
    pub max: usize,
    /// How long a call waits for a session when all of them are busy.
    pub wait: Duration,
}

impl SessionLimits {
    /// How long a call waits for a busy session by default.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);

    /// At most `max` sessions (the number of CPU threads when `None`; at least 1), the default
    /// wait.
    pub fn sessions(max: Option<usize>) -> Self {
        SessionLimits {
            max: max
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
                .max(1),
            wait: Self::DEFAULT_WAIT,
        }
    }
}

impl Default for SessionLimits {
    /// One session per CPU thread: as many as can sign at once.
    fn default() -> Self {
        Self::sessions(None)
    }
}

/// How a call on a session ended, when it did not succeed.
#[derive(Debug)]
pub enum Fault<E> {
    /// The session, an object handle or the token is gone: the call is tried again (see the
    /// module documentation).
    Lost(String),
    /// The call failed for a reason of its own; not tried again. The session is closed rather
    /// than kept: an operation the token refused might still be active on it.
    Failed(E),
}

/// Why a call through the pool did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure<E> {
    /// The token does not answer, or every session stayed busy: nothing was done; retry later.
    Unavailable(String),
    /// The token refused the login (a wrong or locked PIN, or no PIN to give): retrying will
    /// not help.
    Refused(String),
    /// The call's own failure ([`Fault::Failed`]).
    Op(E),
}

impl<E: std::fmt::Display> std::fmt::Display for Failure<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unavailable(why) | Failure::Refused(why) => f.write_str(why),
            Failure::Op(e) => e.fmt(f),
        }
    }
}

/// What a pool has done, for tests and for operators sizing `[issuer] pkcs11_sessions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// The most sessions the pool may open at once.
    pub max: usize,
    /// Sessions open now (busy or idle). A session is counted from before its `C_OpenSession`
    /// until after its `C_CloseSession` returned, so the token never holds more for the pool.
    pub open: usize,
    /// The most sessions that were open at once, counted so.
    pub peak_open: usize,
    /// Sessions opened since the pool was (`C_OpenSession` calls that succeeded).
    pub opened: u64,
    /// The number of sessions the token reports open (`ulSessionCount` of `C_GetTokenInfo`,
    /// all applications'), when it reports one: SoftHSM2 does not.
    pub token_count: Option<u64>,
}

/// The sessions of one token (see the module documentation).
pub struct TokenSessions {
    /// The URI of the first key the pool was opened for: module, token, serial and PIN source.
    uri: Pkcs11Uri,
    /// The PIN, to log in again after the application was logged out (its last session closed,
    /// or the module reset).
    pin: AuthPin,
    limits: SessionLimits,
    /// The module's context and the token's slot. Calls hold it shared; a reset of the module
    /// holds it alone, so that no call is in flight while the library is reset.
    conn: RwLock<Connection>,
    state: Mutex<State>,
    /// Signalled when a session goes back to the pool or is closed.
    freed: Condvar,
    epoch: AtomicU64,
    last_reset: Mutex<Option<Instant>>,
}

struct Connection {
    ctx: Pkcs11,
    slot: Slot,
}

#[derive(Default)]
struct State {
    idle: Vec<Session>,
    /// Sessions open, idle or busy (never more than `limits.max`).
    open: usize,
    peak_open: usize,
    opened: u64,
}

impl std::fmt::Debug for TokenSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSessions")
            .field("token", &self.uri.token)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// Why no session was taken.
#[derive(Debug)]
enum Taken {
    /// The token or its module does not answer: try again after dropping the idle sessions,
    /// then after a reset of the module.
    Lost(String),
    /// Every session stayed busy for the pool's wait.
    Busy(String),
    /// The token itself refused another session (`CKR_SESSION_COUNT`: the HSM's own session
    /// limit, which other applications share): the pool waits for one of its sessions, as
    /// at its cap. Never a reason to reset the module.
    Full(String),
    Refused(String),
}

impl TokenSessions {
    /// The pool of the token `uri` names: the one this process already has open, or a new one
    /// with `limits` (connected, and logged in with the URI's PIN, before it is returned).
    pub fn open(
        uri: &Pkcs11Uri,
        limits: &SessionLimits,
    ) -> Result<Arc<Self>, Failure<std::convert::Infallible>> {
        type Pools = Mutex<HashMap<(PathBuf, String, Option<String>), Weak<TokenSessions>>>;
        static POOLS: OnceLock<Pools> = OnceLock::new();
        let key = (
            uri.module_path.clone(),
            uri.token.clone(),
            uri.serial.clone(),
        );
        let mut pools = POOLS
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(pool) = pools.get(&key).and_then(Weak::upgrade) {
            return Ok(pool);
        }
        let pool = Arc::new(Self::connect(uri, limits)?);
        pools.retain(|_, p| p.strong_count() > 0);
        pools.insert(key, Arc::downgrade(&pool));
        Ok(pool)
    }

    /// How the pool's errors name the token.
    pub fn token(&self) -> &str {
        &self.uri.token
    }

    /// Changes whenever sessions are dropped after a failure or the module is reset: object
    /// handles found before may no longer be valid.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// What the pool has done so far, and the token's own count of open sessions when it
    /// keeps one.
    pub fn stats(&self) -> SessionStats {
        let token_count = {
            let conn = self.conn.read().unwrap_or_else(PoisonError::into_inner);
            conn.ctx
                .get_token_info(conn.slot)
                .ok()
                .and_then(|info| info.session_count())
        };
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        SessionStats {
            max: self.limits.max,
            open: state.open,
            peak_open: state.peak_open,
            opened: state.opened,
            token_count,
        }
    }

    /// Runs `op` on a session of the pool (given the current [`TokenSessions::epoch`]), tried
    /// again as the module documentation says when it reports [`Fault::Lost`].
    pub fn with_session<T, E>(
        &self,
        mut op: impl FnMut(&Session, u64) -> Result<T, Fault<E>>,
    ) -> Result<T, Failure<E>> {
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt == 2
                && let Err(why) = self.reset()
            {
                last = format!("{last}; resetting the module: {why}");
                break;
            }
            let conn = self.conn.read().unwrap_or_else(PoisonError::into_inner);
            let lease = match self.take(&conn) {
                Ok(s) => Lease {
                    pool: self,
                    session: Some(s),
                },
                Err(Taken::Lost(why)) => {
                    last = why;
                    drop(conn);
                    self.drop_idle();
                    continue;
                }
                Err(Taken::Busy(why) | Taken::Full(why)) => {
                    return Err(Failure::Unavailable(why));
                }
                Err(Taken::Refused(why)) => return Err(Failure::Refused(why)),
            };
            // A panic in `op` drops the lease, which closes the session and frees its place.
            // (The lease holds its session until put back or dropped: `None` cannot happen.)
            let Some(session) = lease.session.as_ref() else {
                continue;
            };
            match op(session, self.epoch()) {
                Ok(v) => {
                    lease.put_back();
                    return Ok(v);
                }
                Err(Fault::Lost(why)) => {
                    last = format!("token {:?}: {why}", self.uri.token);
                    drop(lease);
                    drop(conn);
                    self.drop_idle();
                }
                Err(Fault::Failed(e)) => {
                    drop(lease);
                    return Err(Failure::Op(e));
                }
            }
        }
        Err(Failure::Unavailable(last))
    }

    fn connect(
        uri: &Pkcs11Uri,
        limits: &SessionLimits,
    ) -> Result<Self, Failure<std::convert::Infallible>> {
        let ctx = context(&uri.module_path).map_err(Failure::Unavailable)?;
        let slot = find_slot(&ctx, uri).map_err(Failure::Unavailable)?;
        let pin = uri.read_pin().map_err(Failure::Refused)?;
        let session = match open_logged_in(&ctx, slot, &pin, uri) {
            Ok(s) => s,
            Err(Taken::Refused(why)) => return Err(Failure::Refused(why)),
            Err(Taken::Lost(why) | Taken::Busy(why) | Taken::Full(why)) => {
                return Err(Failure::Unavailable(why));
            }
        };
        let state = State {
            open: 1,
            peak_open: 1,
            opened: 1,
            idle: vec![session],
        };
        Ok(TokenSessions {
            uri: uri.clone(),
            pin,
            limits: SessionLimits {
                max: limits.max.max(1),
                wait: limits.wait,
            },
            conn: RwLock::new(Connection { ctx, slot }),
            state: Mutex::new(state),
            freed: Condvar::new(),
            epoch: AtomicU64::new(0),
            last_reset: Mutex::new(None),
        })
    }

    /// An idle session; or a new one when fewer than the maximum are open; or, when all are
    /// busy, the first one given back within the wait. When the token refuses another session
    /// (its own limit, [`Taken::Full`]), the sessions the pool holds then are its cap for this
    /// call: it waits for one of them, as at the pool's cap.
    fn take(&self, conn: &Connection) -> Result<Session, Taken> {
        let deadline = Instant::now() + self.limits.wait;
        let mut cap = self.limits.max;
        let mut token_full = None;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(s) = state.idle.pop() {
                return Ok(s);
            }
            if state.open < cap {
                state.open += 1;
                state.peak_open = state.peak_open.max(state.open);
                drop(state);
                match open_logged_in(&conn.ctx, conn.slot, &self.pin, &self.uri) {
                    Ok(s) => {
                        self.state
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .opened += 1;
                        return Ok(s);
                    }
                    Err(Taken::Full(why)) => {
                        self.closed(1);
                        state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                        cap = state.open;
                        token_full = Some(why);
                        continue;
                    }
                    Err(e) => {
                        self.closed(1);
                        return Err(e);
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Taken::Busy(match &token_full {
                    Some(why) => format!(
                        "{why}; none of the pool's {} sessions came back within {} ms",
                        cap,
                        self.limits.wait.as_millis()
                    ),
                    None => format!(
                        "token {:?}: all {} sessions stayed busy for {} ms ([issuer] pkcs11_sessions)",
                        self.uri.token,
                        self.limits.max,
                        self.limits.wait.as_millis()
                    ),
                }));
            }
            // Off the async worker: a caller waiting for a session must not hold the
            // runtime's other tasks (every door, the timers) with it.
            state = crate::blocking::off_the_runtime(|| {
                self.freed
                    .wait_timeout(state, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            });
        }
    }

    fn closed(&self, n: usize) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.open = state.open.saturating_sub(n);
        drop(state);
        self.freed.notify_all();
    }

    /// Closes every idle session (after a session failed, the others most likely did too) and
    /// starts a new epoch.
    fn drop_idle(&self) {
        let stale = std::mem::take(
            &mut self
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .idle,
        );
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let n = stale.len();
        drop(stale);
        self.closed(n);
    }

    /// Resets the module (`C_Finalize`, `C_Initialize`) and finds the token's slot again: a
    /// token that was removed and put back, or a module that lost its device, is usable again
    /// only after this. At most once a second, with no call in flight (waiting at most the
    /// pool's wait for the calls in flight to end).
    fn reset(&self) -> Result<(), String> {
        {
            let mut last = self
                .last_reset
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err("the last reset was less than a second ago".into());
            }
            *last = Some(Instant::now());
        }
        // Polled rather than waited for: a writer waiting on the lock would stop new calls
        // behind a call that hangs in the token.
        let deadline = Instant::now() + self.limits.wait;
        let mut conn = crate::blocking::off_the_runtime(|| {
            loop {
                match self.conn.try_write() {
                    Ok(c) => break Ok(c),
                    Err(TryLockError::Poisoned(p)) => break Ok(p.into_inner()),
                    Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(TryLockError::WouldBlock) => {
                        break Err("calls to the token are still in flight".to_string());
                    }
                }
            }
        })?;
        // Every session of the old initialization is closed by C_Finalize.
        self.drop_idle();
        let _ = conn.ctx.clone().finalize();
        match conn
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(format!("C_Initialize: {}", short(&e))),
        }
        conn.slot = find_slot(&conn.ctx, &self.uri)?;
        self.epoch.fetch_add(1, Ordering::SeqCst);
        tracing::info!(token = %self.uri.token, "reconnected to the PKCS#11 token");
        Ok(())
    }
}

/// A session taken from a pool, for one call: given back by [`Lease::put_back`] after a call
/// that succeeded; otherwise closed when dropped (after a failure, or a panic in the call),
/// which frees its place in the pool.
struct Lease<'a> {
    pool: &'a TokenSessions,
    /// Always `Some` until [`Lease::put_back`] or the drop takes it.
    session: Option<Session>,
}

impl Lease<'_> {
    /// The session goes back to the pool, idle, for the next call.
    fn put_back(mut self) {
        if let Some(session) = self.session.take() {
            self.pool
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .idle
                .push(session);
            self.pool.freed.notify_one();
        }
    }
}

impl Drop for Lease<'_> {
    /// Closes the session, then counts it out: the token never sees more than the maximum.
    /// Closed rather than kept: an operation the token refused, or that a panic cut short,
    /// might still be active on it.
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            drop(session);
            self.pool.closed(1);
        }
    }
}

/// Object handles found on a pool's sessions, by label, each valid for the
/// [`TokenSessions::epoch`] it was found in.
#[derive(Debug, Default)]
pub struct HandleCache(Mutex<(u64, HashMap<String, ObjectHandle>)>);

impl HandleCache {
    /// The handle of `label` found in `epoch`, if any.
    pub fn get(&self, epoch: u64, label: &str) -> Option<ObjectHandle> {
        let cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (cache.0 == epoch)
            .then(|| cache.1.get(label).copied())
            .flatten()
    }

    /// Remembers the handle of `label`, found in `epoch`.
    pub fn put(&self, epoch: u64, label: &str, handle: ObjectHandle) {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.0 != epoch {
            *cache = (epoch, HashMap::new());
        }
        cache.1.insert(label.to_string(), handle);
    }

    /// Forgets the handle of `label` (its object was deleted).
    pub fn forget(&self, label: &str) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1
            .remove(label);
    }
}

/// Whether a failure means the token or the session is gone (try again on a fresh session, then
/// report the token unavailable) rather than a refusal of this request.
pub fn is_unavailable(e: &P11Error) -> bool {
    match e {
        P11Error::Pkcs11(rv, _) => matches!(
            rv,
            RvError::DeviceError
                | RvError::DeviceRemoved
                | RvError::DeviceMemory
                | RvError::TokenNotPresent
                | RvError::TokenNotRecognized
                | RvError::SessionHandleInvalid
                | RvError::SessionClosed
                | RvError::SlotIdInvalid
                | RvError::UserNotLoggedIn
                | RvError::CryptokiNotInitialized
                | RvError::GeneralError
                | RvError::FunctionFailed
        ),
        P11Error::LibraryLoading(_) | P11Error::NullFunctionPointer => true,
        _ => false,
    }
}

/// Whether a failure means an object handle is no longer valid (the object was deleted, or the
/// token reset): the handle must be found again.
pub fn is_stale_handle(e: &P11Error) -> bool {
    matches!(
        e,
        P11Error::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
    )
}

/// A one-line description of a PKCS#11 failure: the return value's name (CKR_...) and the
/// function, not the standard's paragraph-long explanation.
pub fn short(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// One context per module in a process: `C_Initialize` may be called once per library, and two
/// tokens of one module (or two CAs in one process, as in the tests) share it.
fn context(module: &Path) -> Result<Pkcs11, String> {
    static CONTEXTS: OnceLock<Mutex<HashMap<PathBuf, Pkcs11>>> = OnceLock::new();
    let mut map = CONTEXTS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    if let Some(ctx) = map.get(module) {
        return Ok(ctx.clone());
    }
    let ctx = Pkcs11::new(module)
        .map_err(|e| format!("PKCS#11 module {}: cannot load it ({e})", module.display()))?;
    match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
        Err(e) => {
            return Err(format!(
                "PKCS#11 module {}: C_Initialize failed: {}",
                module.display(),
                short(&e)
            ));
        }
    }
    map.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Initializes a token in this process: the module's first uninitialized token gets `label`, the
/// security officer PIN `so_pin` and the user PIN `user_pin` (what `softhsm2-util
/// --init-token --free` does). Not used by the CA: an HSM's tokens are made with its vendor's
/// tools. The test suite's token pass makes a token per test CA with it, because Debian's
/// SoftHSM2 (2.6.1) does not keep one token consistent while several processes write and read
/// it at once (a process loading the module then finds no token, or a key twice: upstream issues
/// 757 and 573), and because SoftHSM2 shows a process only the tokens that existed when it
/// loaded the module and those it made itself.
#[doc(hidden)]
pub fn init_token(module: &Path, label: &str, so_pin: &str, user_pin: &str) -> Result<(), String> {
    // Two threads must not both take the one uninitialized token.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let ctx = context(module)?;
    let at = |what: &str, e: P11Error| format!("token {label:?}: {what}: {}", short(&e));
    let free = ctx
        .get_slots_with_token()
        .map_err(|e| at("cannot list the slots", e))?
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .is_ok_and(|info| !info.token_initialized())
        })
        .ok_or_else(|| {
            format!(
                "token {label:?}: PKCS#11 module {} offers no uninitialized token",
                module.display()
            )
        })?;
    let so = AuthPin::new(so_pin.into());
    ctx.init_token(free, &so, label)
        .map_err(|e| at("C_InitToken", e))?;
    let session = ctx
        .open_rw_session(free)
        .map_err(|e| at("cannot open a session", e))?;
    session
        .login(UserType::So, Some(&so))
        .map_err(|e| at("security officer login", e))?;
    session
        .init_pin(&AuthPin::new(user_pin.into()))
        .map_err(|e| at("C_InitPIN", e))?;
    Ok(())
}

/// The slot holding the token `uri` names (by label, and serial when given).
fn find_slot(ctx: &Pkcs11, uri: &Pkcs11Uri) -> Result<Slot, String> {
    let slots = ctx.get_slots_with_token().map_err(|e| {
        format!(
            "PKCS#11 module {}: cannot list its slots: {}",
            uri.module_path.display(),
            short(&e)
        )
    })?;
    let mut labels = Vec::new();
    for slot in slots {
        let Ok(info) = ctx.get_token_info(slot) else {
            continue;
        };
        let label = info.label().trim_end().to_string();
        if label == uri.token
            && uri
                .serial
                .as_deref()
                .is_none_or(|s| info.serial_number().trim_end() == s)
        {
            return Ok(slot);
        }
        // An uninitialized token (SoftHSM2 always offers one) has no label worth naming.
        if !label.is_empty() {
            labels.push(format!("{label:?}"));
        }
    }
    Err(format!(
        "no token labelled {:?} in PKCS#11 module {} (tokens there: {})",
        uri.token,
        uri.module_path.display(),
        if labels.is_empty() {
            "none".to_string()
        } else {
            labels.join(", ")
        }
    ))
}

/// Opens a read-write session (read-only on a write-protected token) and logs the user in (a
/// no-op when the application already is).
fn open_logged_in(
    ctx: &Pkcs11,
    slot: Slot,
    pin: &AuthPin,
    uri: &Pkcs11Uri,
) -> Result<Session, Taken> {
    let session = match ctx.open_rw_session(slot) {
        Err(P11Error::Pkcs11(RvError::TokenWriteProtected, _)) => ctx.open_ro_session(slot),
        other => other,
    }
    .map_err(|e| open_failure(&uri.token, &e))?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => Err(Taken::Refused(format!(
            "token {:?}: the PIN is wrong ({})",
            uri.token,
            match &uri.pin {
                PinSource::File(p) => format!("read from {}", p.display()),
                PinSource::Value(_) => "given as pin-value".to_string(),
                PinSource::Environment => format!("read from {PIN_ENV}"),
            }
        ))),
        Err(P11Error::Pkcs11(RvError::PinLocked, _)) => Err(Taken::Refused(format!(
            "token {:?}: the user PIN is locked (too many wrong PINs); the security officer must unlock it",
            uri.token
        ))),
        Err(e) => Err(Taken::Lost(format!(
            "token {:?}: login failed: {}",
            uri.token,
            short(&e)
        ))),
    }
}

/// Why `C_OpenSession` failed, for the pool: the token's own session limit reached
/// (`CKR_SESSION_COUNT`, which only `C_OpenSession` returns: the token has too many sessions,
/// or too many read/write sessions, open already) is [`Taken::Full`], a wait; anything else a
/// token that does not answer.
fn open_failure(token: &str, e: &P11Error) -> Taken {
    let why = format!("token {token:?}: cannot open a session: {}", short(e));
    match e {
        P11Error::Pkcs11(RvError::SessionCount, _) => Taken::Full(why),
        _ => Taken::Lost(why),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use cryptoki::context::Function;

    /// Issue 15: the token's own session limit was taken for a lost token, and the module was
    /// reset for it. SoftHSM2 has no session limit, so this is checked here rather than
    /// against a token.
    #[test]
    fn a_token_at_its_session_limit_is_waited_for_never_reset() {
        let full = open_failure(
            "hsm",
            &P11Error::Pkcs11(RvError::SessionCount, Function::OpenSession),
        );
        assert!(
            matches!(&full, Taken::Full(why) if why.contains("CKR_SESSION_COUNT") || why.contains("SessionCount")),
            "{full:?}"
        );
        for lost in [
            RvError::DeviceRemoved,
            RvError::TokenNotPresent,
            RvError::DeviceError,
            RvError::GeneralError,
        ] {
            let taken = open_failure("hsm", &P11Error::Pkcs11(lost, Function::OpenSession));
            assert!(matches!(taken, Taken::Lost(_)), "{lost:?}: {taken:?}");
        }
    }
}
