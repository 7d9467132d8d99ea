//! The CA key in a PKCS#11 token (a hardware security module; SoftHSM2 in the tests), named by
//! an RFC 7512 PKCS#11 URI and used through the `cryptoki` crate.
//!
//! Signing takes an idle session from a pool, or opens one when none is idle (so there are at
//! most as many sessions as threads signing at once), and gives it back afterwards. The user is
//! logged in once: in PKCS#11 a login holds for every session of the application on that token,
//! and a new session's `C_Login` answers `CKR_USER_ALREADY_LOGGED_IN`. The private key's handle
//! is found once and cached. A session that fails is dropped with every idle one and the
//! signature is tried once more on a fresh session (logging in again if the token was reset);
//! if that fails too, the module is reset (`C_Finalize`, `C_Initialize`: a token pulled out and
//! put back, or SoftHSM2's token folder gone and back, is seen again only then; at most once a
//! second) and the slot found again for a last try. Past that the token is
//! [`SignError::Unavailable`]; the next signature tries again, so signing resumes by itself
//! when the token is back.
//!
//! Ed25519 signs with `CKM_EDDSA` (PKCS#11 3.0) over the message; P-256 with `CKM_ECDSA` over
//! its SHA-256 digest, the token's raw r||s turned into the DER `Ecdsa-Sig-Value` X.509 wants.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::AuthPin;
use protocol_spec::{KeyAlgorithm, KeyPair};
use zeroize::Zeroizing;

use super::key::SignError;

pub mod bdk;
pub use bdk::{BdkToken, BdkTokenError};

/// DER OBJECT IDENTIFIER 1.3.101.112 (id-Ed25519, RFC 8410): CKA_EC_PARAMS of an Ed25519 key.
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER PrintableString "edwards25519", the other CKA_EC_PARAMS PKCS#11 3.0 allows for Ed25519.
const ED25519_PARAMS_NAME: &[u8] = b"\x13\x0cedwards25519";
/// DER OBJECT IDENTIFIER 1.2.840.10045.3.1.7 (prime256v1, RFC 5480).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// Idle sessions kept open for the next signatures.
const MAX_IDLE_SESSIONS: usize = 64;

/// Where the PIN comes from (RFC 7512 section 2.3, `pin-source` and `pin-value`).
#[derive(Clone, PartialEq, Eq)]
pub enum PinSource {
    /// `pin-source=file:PATH` (or a bare path): the first line of that file.
    File(PathBuf),
    /// `pin-value=PIN`: accepted on the command line (tests, one-off use), never written to
    /// config.toml.
    Value(Zeroizing<String>),
    /// Neither: the PIN comes from `IMPRINT_PKCS11_PIN` in the environment.
    Environment,
}

impl std::fmt::Debug for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => f.debug_tuple("File").field(p).finish(),
            PinSource::Value(_) => f.write_str("Value(<redacted>)"),
            PinSource::Environment => f.write_str("Environment"),
        }
    }
}

/// The environment variable holding the PIN when the URI gives no `pin-source`.
pub const PIN_ENV: &str = "IMPRINT_PKCS11_PIN";

/// A parsed PKCS#11 URI (RFC 7512) naming the CA's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pkcs11Uri {
    /// `token=`: the token's label.
    pub token: String,
    /// `object=`: the key's label (CKA_LABEL of the private and public objects).
    pub object: String,
    /// `id=`: the key's CKA_ID, when given.
    pub id: Option<Vec<u8>>,
    /// `serial=`: the token's serial number, when given.
    pub serial: Option<String>,
    /// `module-path=`: the PKCS#11 library.
    pub module_path: PathBuf,
    /// Where the PIN comes from.
    pub pin: PinSource,
}

impl Pkcs11Uri {
    /// Parses `pkcs11:token=T;object=O[;id=..][;serial=..][;type=private]?module-path=M[&pin-source=file:P|&pin-value=V]`.
    pub fn parse(uri: &str) -> Result<Self, String> {
        let rest = uri
            .strip_prefix("pkcs11:")
            .ok_or("a PKCS#11 URI starts with \"pkcs11:\"")?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut token = None;
        let mut object = None;
        let mut id = None;
        let mut serial = None;
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| format!("PKCS#11 URI: {attr:?} is not name=value"))?;
            let value = percent_decode(value)?;
            let text = || {
                String::from_utf8(value.clone())
                    .map_err(|_| format!("PKCS#11 URI: {name} is not UTF-8"))
            };
            match name {
                "token" => token = Some(text()?),
                "object" => object = Some(text()?),
                "id" => id = Some(value.clone()),
                "serial" => serial = Some(text()?),
                "type" if value == b"private" => {}
                "type" => {
                    return Err(
                        "PKCS#11 URI: type must be private (the CA key's private half)".into(),
                    );
                }
                other => return Err(format!("PKCS#11 URI: unsupported attribute {other:?}")),
            }
        }
        let mut module_path = None;
        let mut pin = PinSource::Environment;
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| format!("PKCS#11 URI: {attr:?} is not name=value"))?;
            let value = Zeroizing::new(percent_decode(value)?);
            let text = String::from_utf8(value.to_vec())
                .map_err(|_| format!("PKCS#11 URI: {name} is not UTF-8"))?;
            match name {
                "module-path" => module_path = Some(PathBuf::from(text)),
                "pin-source" => {
                    let path = text.strip_prefix("file:").unwrap_or(&text);
                    // RFC 7512 allows a file: URI (file:///path) or a plain path.
                    let path = path.strip_prefix("//").unwrap_or(path);
                    pin = PinSource::File(PathBuf::from(path));
                }
                "pin-value" => pin = PinSource::Value(Zeroizing::new(text)),
                other => {
                    return Err(format!(
                        "PKCS#11 URI: unsupported query attribute {other:?}"
                    ));
                }
            }
        }
        Ok(Pkcs11Uri {
            token: token.ok_or("PKCS#11 URI: token= (the token's label) is missing")?,
            object: object.ok_or("PKCS#11 URI: object= (the key's label) is missing")?,
            id,
            serial,
            module_path: module_path
                .ok_or("PKCS#11 URI: module-path= (the PKCS#11 library) is missing")?,
            pin,
        })
    }

    /// The URI as config.toml keeps it: the same key, never a PIN value (`pin-value` is left
    /// out; a `pin-source` file is kept).
    pub fn to_config_string(&self) -> String {
        let mut s = format!(
            "pkcs11:token={};object={}",
            percent_encode(self.token.as_bytes()),
            percent_encode(self.object.as_bytes())
        );
        if let Some(id) = &self.id {
            s += ";id=";
            for b in id {
                s += &format!("%{b:02X}");
            }
        }
        if let Some(serial) = &self.serial {
            s += &format!(";serial={}", percent_encode(serial.as_bytes()));
        }
        s += &format!(
            "?module-path={}",
            percent_encode(self.module_path.as_os_str().as_encoded_bytes())
        );
        if let PinSource::File(p) = &self.pin {
            s += &format!(
                "&pin-source=file:{}",
                percent_encode(p.as_os_str().as_encoded_bytes())
            );
        }
        s
    }

    /// How errors name the key: token and object labels, never the PIN.
    pub fn describe(&self) -> String {
        format!("token {:?}, object {:?}", self.token, self.object)
    }

    fn read_pin(&self) -> Result<AuthPin, String> {
        let pin = match &self.pin {
            PinSource::Value(v) => v.to_string(),
            PinSource::File(path) => {
                let text = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .map_err(|e| format!("PIN file {}: {e}", path.display()))?,
                );
                text.lines().next().unwrap_or("").to_string()
            }
            PinSource::Environment => std::env::var(PIN_ENV).map_err(|_| {
                format!(
                    "no PIN for {}: the URI has no pin-source=file:PATH and {PIN_ENV} is not set",
                    self.describe()
                )
            })?,
        };
        Ok(AuthPin::from(pin))
    }
}

/// The CA's key in a token: the module and slot, the PIN (to log in again after the token
/// was reset), the key's public half, and the session pool.
pub struct TokenKey {
    /// The module's context and the token's slot. Signatures hold it shared; a reconnection
    /// (`C_Finalize`, `C_Initialize`, the slot found again) holds it alone, so no call is in
    /// flight while the library is reset.
    conn: RwLock<Connection>,
    uri: Pkcs11Uri,
    pin: AuthPin,
    algorithm: KeyAlgorithm,
    public_raw: Vec<u8>,
    key: Mutex<Option<ObjectHandle>>,
    idle: Mutex<Vec<Session>>,
    last_reconnect: Mutex<Option<Instant>>,
}

struct Connection {
    ctx: Pkcs11,
    slot: Slot,
}

/// How one signing attempt ended, when it did not sign.
enum Attempt {
    /// The session, the key handle or the token is gone: try again, then reconnect.
    Lost(String),
    /// The token refused this signature.
    Refused(String),
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKey")
            .field("token", &self.uri.token)
            .field("object", &self.uri.object)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl TokenKey {
    /// Opens the key `uri` names, which must already be in the token.
    pub fn open(uri: &Pkcs11Uri) -> Result<Self, String> {
        let ctx = context(&uri.module_path)?;
        let slot = find_slot(&ctx, uri)?;
        let pin = uri.read_pin()?;
        let session = open_session(&ctx, slot, &pin, false, uri)?;
        let held = token_objects();
        let private = find_key(&session, uri, ObjectClass::PRIVATE_KEY, &held)?.ok_or_else(|| {
            format!(
                "{}: no private key with that label in the token (give the key's label as object=, or make one with `ca-server init --pkcs11`)",
                uri.describe()
            )
        })?;
        let (algorithm, public_raw) = public_half(&session, uri, &held)?;
        drop(held);
        let key = TokenKey {
            conn: RwLock::new(Connection { ctx, slot }),
            uri: uri.clone(),
            pin,
            algorithm,
            public_raw,
            key: Mutex::new(Some(private)),
            idle: Mutex::new(Vec::new()),
            last_reconnect: Mutex::new(None),
        };
        key.give_back(session);
        Ok(key)
    }

    /// Generates a new key pair of `algorithm` in the token, labelled (and with the id) as
    /// `uri` says: the private half sensitive and not extractable. Refuses when the token
    /// already holds a private key with that label.
    pub fn generate(uri: &Pkcs11Uri, algorithm: KeyAlgorithm) -> Result<Self, String> {
        let held = token_objects();
        let ctx = context(&uri.module_path)?;
        let slot = find_slot(&ctx, uri)?;
        let pin = uri.read_pin()?;
        let session = open_session(&ctx, slot, &pin, true, uri)?;
        if find_key(&session, uri, ObjectClass::PRIVATE_KEY, &held)?.is_some() {
            return Err(format!(
                "{}: the token already holds a private key with that label; use it with --pkcs11-existing, or name another object=",
                uri.describe()
            ));
        }
        let (mechanism, params) = match algorithm {
            KeyAlgorithm::Ed25519 => (Mechanism::EccEdwardsKeyPairGen, ED25519_PARAMS),
            KeyAlgorithm::P256 => (Mechanism::EccKeyPairGen, P256_PARAMS),
        };
        let label = uri.object.as_bytes().to_vec();
        let id = uri.id.clone().unwrap_or_else(|| label.clone());
        let public = [
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(params.to_vec()),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        session
            .generate_key_pair(&mechanism, &public, &private)
            .map_err(|e| {
                format!(
                    "{}: the token could not generate a {algorithm} key pair: {}",
                    uri.describe(),
                    short(&e)
                )
            })?;
        drop(session);
        drop(held);
        Self::open(uri)
    }

    /// Imports `key` (a file key) into the token as a private-key object (sensitive, not
    /// extractable) and a public-key object, both labelled (and with the id) as `uri` says,
    /// then opens it. Refuses when the token already holds a private key with that label.
    pub fn import(uri: &Pkcs11Uri, key: &KeyPair) -> Result<Self, String> {
        let held = token_objects();
        let ctx = context(&uri.module_path)?;
        let slot = find_slot(&ctx, uri)?;
        let pin = uri.read_pin()?;
        let session = open_session(&ctx, slot, &pin, true, uri)?;
        if find_key(&session, uri, ObjectClass::PRIVATE_KEY, &held)?.is_some() {
            return Err(format!(
                "{}: the token already holds a private key with that label; name another object=",
                uri.describe()
            ));
        }
        let (key_type, params) = match key.algorithm() {
            KeyAlgorithm::Ed25519 => (KeyType::EC_EDWARDS, ED25519_PARAMS),
            KeyAlgorithm::P256 => (KeyType::EC, P256_PARAMS),
        };
        let secret = private_value(key)?;
        let label = uri.object.as_bytes().to_vec();
        let id = uri.id.clone().unwrap_or_else(|| label.clone());
        let point = key.public_key_raw();
        let mut ec_point = vec![0x04, u8::try_from(point.len()).map_err(|e| e.to_string())?];
        ec_point.extend_from_slice(point);
        let public = [
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(key_type),
            Attribute::Token(true),
            Attribute::Private(false),
            Attribute::Verify(true),
            Attribute::EcParams(params.to_vec()),
            Attribute::EcPoint(ec_point),
            Attribute::Label(label.clone()),
            Attribute::Id(id.clone()),
        ];
        let private = [
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::KeyType(key_type),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Sign(true),
            Attribute::EcParams(params.to_vec()),
            Attribute::Value(secret.to_vec()),
            Attribute::Label(label),
            Attribute::Id(id),
        ];
        let created = |template: &[Attribute], what: &str| {
            session.create_object(template).map_err(|e| {
                format!(
                    "{}: the token refused the {what}: {}",
                    uri.describe(),
                    short(&e)
                )
            })
        };
        let public_handle = created(&public, "public key")?;
        if let Err(e) = created(&private, "private key") {
            let _ = session.destroy_object(public_handle);
            return Err(e);
        }
        drop(session);
        drop(held);
        Self::open(uri)
    }

    /// The key's algorithm (from the token's key type and curve).
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }

    /// The raw public key, read from the token's public-key object.
    pub fn public_key_raw(&self) -> &[u8] {
        &self.public_raw
    }

    /// The URI this key was opened with.
    pub fn uri(&self) -> &Pkcs11Uri {
        &self.uri
    }

    /// Signs as X.509 expects (see the module documentation): on a session that fails, once
    /// more on a fresh one; then once more after reconnecting to the module (at most one
    /// reconnection a second); then [`SignError::Unavailable`].
    pub fn sign_x509(&self, msg: &[u8]) -> Result<Vec<u8>, SignError> {
        let (mechanism, data) = match self.algorithm {
            KeyAlgorithm::Ed25519 => (
                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure)),
                msg.to_vec(),
            ),
            KeyAlgorithm::P256 => (
                Mechanism::Ecdsa,
                ring::digest::digest(&ring::digest::SHA256, msg)
                    .as_ref()
                    .to_vec(),
            ),
        };
        let mut last = String::new();
        for attempt in 0..3 {
            if attempt == 2
                && let Err(why) = self.reconnect()
            {
                last = format!("{last}; reconnecting: {why}");
                break;
            }
            let outcome = {
                let conn = self.conn.read().unwrap_or_else(PoisonError::into_inner);
                self.try_sign(&conn, &mechanism, &data)
            };
            match outcome {
                Ok(sig) => return self.x509_signature(sig),
                Err(Attempt::Refused(why)) => {
                    return Err(SignError::Failed(format!("{}: {why}", self.uri.describe())));
                }
                Err(Attempt::Lost(why)) => {
                    last = why;
                    self.drop_idle();
                }
            }
        }
        Err(SignError::Unavailable(format!(
            "{}: {last}",
            self.uri.describe()
        )))
    }

    fn try_sign(
        &self,
        conn: &Connection,
        mechanism: &Mechanism,
        data: &[u8],
    ) -> Result<Vec<u8>, Attempt> {
        let session = self.session(conn)?;
        let key = self.key_handle(&session)?;
        match session.sign(mechanism, key, data) {
            Ok(sig) => {
                self.give_back(session);
                Ok(sig)
            }
            Err(e) if is_unavailable(&e) => Err(Attempt::Lost(short(&e))),
            Err(
                e @ P11Error::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _),
            ) => Err(Attempt::Lost(short(&e))),
            Err(e) => {
                self.give_back(session);
                Err(Attempt::Refused(short(&e)))
            }
        }
    }

    fn x509_signature(&self, sig: Vec<u8>) -> Result<Vec<u8>, SignError> {
        match self.algorithm {
            KeyAlgorithm::Ed25519 if sig.len() == 64 => Ok(sig),
            KeyAlgorithm::P256 => ecdsa_der(&sig).ok_or_else(|| {
                SignError::Failed(format!(
                    "the token returned a {}-byte ECDSA signature, not 64",
                    sig.len()
                ))
            }),
            KeyAlgorithm::Ed25519 => Err(SignError::Failed(format!(
                "the token returned a {}-byte Ed25519 signature, not 64",
                sig.len()
            ))),
        }
    }

    /// An idle session, or a new one (logged in) when none is idle.
    fn session(&self, conn: &Connection) -> Result<Session, Attempt> {
        if let Some(s) = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
        {
            return Ok(s);
        }
        let session = conn
            .ctx
            .open_ro_session(conn.slot)
            .map_err(|e| Attempt::Lost(format!("opening a session: {}", short(&e))))?;
        match session.login(UserType::User, Some(&self.pin)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
            Err(e @ P11Error::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => Err(
                Attempt::Refused(format!("the token refused the PIN: {}", short(&e))),
            ),
            Err(e) => Err(Attempt::Lost(format!("logging in: {}", short(&e)))),
        }
    }

    fn give_back(&self, session: Session) {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
    }

    /// Forgets every idle session and the key handle (after a session failed, the others
    /// most likely did too).
    fn drop_idle(&self) {
        let stale = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        *self.key.lock().unwrap_or_else(PoisonError::into_inner) = None;
        drop(stale);
    }

    fn key_handle(&self, session: &Session) -> Result<ObjectHandle, Attempt> {
        let mut cached = self.key.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = *cached {
            return Ok(h);
        }
        // A key that is not found is taken as a token that is not (or not yet) all there:
        // the key was in it when the server started.
        let h = find_key(
            session,
            &self.uri,
            ObjectClass::PRIVATE_KEY,
            &token_objects(),
        )
        .map_err(Attempt::Lost)?
        .ok_or_else(|| Attempt::Lost("the private key is not in the token".into()))?;
        *cached = Some(h);
        Ok(h)
    }

    /// Resets the module (`C_Finalize`, `C_Initialize`) and finds the token's slot again: a
    /// token that was removed and put back, or a module that lost its device, is usable
    /// again only after this. At most once a second, with no call in flight.
    fn reconnect(&self) -> Result<(), String> {
        {
            let mut last = self
                .last_reconnect
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return Err("the last reconnection was less than a second ago".into());
            }
            *last = Some(Instant::now());
        }
        let mut conn = self.conn.write().unwrap_or_else(PoisonError::into_inner);
        self.drop_idle();
        // Every session of the old initialization is closed by C_Finalize.
        let _ = conn.ctx.clone().finalize();
        match conn
            .ctx
            .initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(format!("C_Initialize: {}", short(&e))),
        }
        conn.slot = find_slot(&conn.ctx, &self.uri)?;
        tracing::info!(token = %self.uri.token, "reconnected to the PKCS#11 token");
        Ok(())
    }
}

/// Token objects are made, and searched for, one at a time in a process: the check that a
/// label is free and the creation then hold together, and SoftHSM2 before 2.7.0 (Debian 12
/// ships 2.6.1) has a race between `C_FindObjects` and object creation in one process: a search
/// that reads a new object's file while it is still empty marks the object invalid, and its
/// creation fails with CKR_GENERAL_ERROR (SoftHSMv2 issue 573, fixed by its commit 07f0b98).
/// The test suite, with every test CA in one token, met it. Searches are rare (at start, and
/// when a session's key handle must be found again); signing is not held.
struct TokenObjects(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

fn token_objects() -> TokenObjects {
    static HELD: Mutex<()> = Mutex::new(());
    TokenObjects(HELD.lock().unwrap_or_else(PoisonError::into_inner))
}

/// One context per module in a process: `C_Initialize` may be called once per library, and two
/// CAs in one process (the tests) share it.
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

/// Opens a session and logs the user in (a no-op when the application already is).
fn open_session(
    ctx: &Pkcs11,
    slot: Slot,
    pin: &AuthPin,
    rw: bool,
    uri: &Pkcs11Uri,
) -> Result<Session, String> {
    let session = if rw {
        ctx.open_rw_session(slot)
    } else {
        ctx.open_ro_session(slot)
    }
    .map_err(|e| {
        format!(
            "token {:?}: cannot open a session: {}",
            uri.token,
            short(&e)
        )
    })?;
    match session.login(UserType::User, Some(pin)) {
        Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(session),
        Err(P11Error::Pkcs11(RvError::PinIncorrect, _)) => Err(format!(
            "token {:?}: the PIN is wrong ({})",
            uri.token,
            match &uri.pin {
                PinSource::File(p) => format!("read from {}", p.display()),
                PinSource::Value(_) => "given as pin-value".to_string(),
                PinSource::Environment => format!("read from {PIN_ENV}"),
            }
        )),
        Err(P11Error::Pkcs11(RvError::PinLocked, _)) => Err(format!(
            "token {:?}: the user PIN is locked (too many wrong PINs); the security officer must unlock it",
            uri.token
        )),
        Err(e) => Err(format!(
            "token {:?}: login failed: {}",
            uri.token,
            short(&e)
        )),
    }
}

/// The one object of `class` with the URI's label (and id); an error when several match.
fn find_key(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
    _held: &TokenObjects,
) -> Result<Option<ObjectHandle>, String> {
    let mut template = vec![
        Attribute::Class(class),
        Attribute::Label(uri.object.as_bytes().to_vec()),
    ];
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    let found = session
        .find_objects(&template)
        .map_err(|e| format!("{}: cannot search the token: {}", uri.describe(), short(&e)))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(format!(
            "{}: {} keys have that label; add id= to the URI to choose one",
            uri.describe(),
            found.len()
        )),
    }
}

/// The algorithm and raw public key, from the public-key object beside the private key.
fn public_half(
    session: &Session,
    uri: &Pkcs11Uri,
    held: &TokenObjects,
) -> Result<(KeyAlgorithm, Vec<u8>), String> {
    let handle = find_key(session, uri, ObjectClass::PUBLIC_KEY, held)?.ok_or_else(|| {
        format!(
            "{}: no public-key object with that label beside the private key (import it with the same label)",
            uri.describe()
        )
    })?;
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::EcParams,
                AttributeType::EcPoint,
            ],
        )
        .map_err(|e| {
            format!(
                "{}: cannot read the public key: {}",
                uri.describe(),
                short(&e)
            )
        })?;
    let (mut key_type, mut params, mut point) = (None, None, None);
    for a in attrs {
        match a {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::EcParams(p) => params = Some(p),
            Attribute::EcPoint(p) => point = Some(p),
            _ => {}
        }
    }
    let unsupported = || {
        format!(
            "{}: the key is neither Ed25519 nor P-256 (the two algorithms Imprint signs with)",
            uri.describe()
        )
    };
    let (Some(key_type), Some(params), Some(point)) = (key_type, params, point) else {
        return Err(unsupported());
    };
    // CKA_EC_POINT is a DER OCTET STRING around the point (PKCS#11 2.40 and 3.0); some tokens
    // return the bare point.
    let point = match point.as_slice() {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && rest.len() < 128 => {
            rest.to_vec()
        }
        _ => point,
    };
    if key_type == KeyType::EC_EDWARDS
        && (params == ED25519_PARAMS || params == ED25519_PARAMS_NAME)
        && point.len() == 32
    {
        Ok((KeyAlgorithm::Ed25519, point))
    } else if key_type == KeyType::EC
        && params == P256_PARAMS
        && point.len() == 65
        && point.first() == Some(&0x04)
    {
        Ok((KeyAlgorithm::P256, point))
    } else {
        Err(unsupported())
    }
}

/// What a sealed key-encryption key file starts with; also the AES-GCM additional data.
const SEALED_KEK_MAGIC: &[u8; 12] = b"IMPRINT-KEK1";

/// Seals the CA's key-encryption key for secrets with an AES-256 key in the token (label
/// `OBJECT-kek`, made sensitive and not extractable when the token has none): AES-GCM in the
/// token, a fresh 12-byte IV. Returns the sealed file: magic, IV, ciphertext and tag.
///
/// The secrets themselves are still sealed in the CA's memory under keys derived from the
/// key-encryption key, which the token unseals once at start ([`unseal_kek`]): the file on
/// disk is useless without the token, and sealing a secret costs no call to the token.
pub fn seal_kek(uri: &Pkcs11Uri, kek: &[u8]) -> Result<Vec<u8>, String> {
    let held = token_objects();
    let ctx = context(&uri.module_path)?;
    let slot = find_slot(&ctx, uri)?;
    let pin = uri.read_pin()?;
    let session = open_session(&ctx, slot, &pin, true, uri)?;
    let aes = match find_kek_key(&session, uri, &held)? {
        Some(h) => h,
        None => session
            .generate_key(
                &Mechanism::AesKeyGen,
                &[
                    Attribute::Token(true),
                    Attribute::Private(true),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Encrypt(true),
                    Attribute::Decrypt(true),
                    Attribute::ValueLen(32.into()),
                    Attribute::Label(kek_label(uri)),
                ],
            )
            .map_err(|e| {
                format!(
                    "{}: the token could not make an AES key for the key-encryption key: {}",
                    uri.describe(),
                    short(&e)
                )
            })?,
    };
    let mut iv = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut iv)
        .map_err(|_| "random generator failed".to_string())?;
    let mut iv_param = iv;
    let params =
        cryptoki::mechanism::aead::GcmParams::new(&mut iv_param, SEALED_KEK_MAGIC, 128.into())
            .map_err(|e| short(&e))?;
    let sealed = session
        .encrypt(&Mechanism::AesGcm(params), aes, kek)
        .map_err(|e| {
            format!(
                "{}: the token could not seal the key-encryption key: {}",
                uri.describe(),
                short(&e)
            )
        })?;
    let mut out = SEALED_KEK_MAGIC.to_vec();
    out.extend_from_slice(&iv);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens a file [`seal_kek`] wrote, in the token.
pub fn unseal_kek(uri: &Pkcs11Uri, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, String> {
    let rest = sealed
        .strip_prefix(SEALED_KEK_MAGIC.as_slice())
        .filter(|r| r.len() > 12 + 16)
        .ok_or("not a sealed key-encryption key")?;
    let (iv, ciphertext) = rest.split_at(12);
    let ctx = context(&uri.module_path)?;
    let slot = find_slot(&ctx, uri)?;
    let pin = uri.read_pin()?;
    let session = open_session(&ctx, slot, &pin, false, uri)?;
    let aes = find_kek_key(&session, uri, &token_objects())?.ok_or_else(|| {
        format!(
            "token {:?}: no AES key labelled {:?} to unseal the key-encryption key",
            uri.token,
            String::from_utf8_lossy(&kek_label(uri))
        )
    })?;
    let mut iv = iv.to_vec();
    let params = cryptoki::mechanism::aead::GcmParams::new(&mut iv, SEALED_KEK_MAGIC, 128.into())
        .map_err(|e| short(&e))?;
    session
        .decrypt(&Mechanism::AesGcm(params), aes, ciphertext)
        .map(Zeroizing::new)
        .map_err(|e| {
            format!(
                "{}: the token could not unseal the key-encryption key (another token's, or altered): {}",
                uri.describe(),
                short(&e)
            )
        })
}

fn kek_label(uri: &Pkcs11Uri) -> Vec<u8> {
    format!("{}-kek", uri.object).into_bytes()
}

fn find_kek_key(
    session: &Session,
    uri: &Pkcs11Uri,
    _held: &TokenObjects,
) -> Result<Option<ObjectHandle>, String> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(kek_label(uri)),
        ])
        .map_err(|e| format!("{}: cannot search the token: {}", uri.describe(), short(&e)))?;
    Ok(found.first().copied())
}

/// The private value PKCS#11 takes as CKA_VALUE: the 32-byte seed of an Ed25519 key (RFC 8032),
/// the 32-byte scalar of a P-256 key, read from the key's PKCS#8 document (RFC 8410's
/// `CurvePrivateKey`, RFC 5915's `ECPrivateKey`). What the token then signs is checked against
/// the CA certificate before anything else changes, so a misread value cannot go unnoticed.
fn private_value(key: &KeyPair) -> Result<Zeroizing<Vec<u8>>, String> {
    let doc = key.pkcs8_der();
    let marker: &[u8] = match key.algorithm() {
        // OCTET STRING (34) { OCTET STRING (32) seed }
        KeyAlgorithm::Ed25519 => &[0x04, 0x22, 0x04, 0x20],
        // ECPrivateKey: version INTEGER 1, privateKey OCTET STRING (32)
        KeyAlgorithm::P256 => &[0x02, 0x01, 0x01, 0x04, 0x20],
    };
    let at = doc
        .windows(marker.len())
        .position(|w| w == marker)
        .map(|i| i + marker.len())
        .ok_or("the key file's PKCS#8 document has no private value where expected")?;
    let value = doc
        .get(at..at + 32)
        .ok_or("the key file's PKCS#8 document is cut short")?;
    Ok(Zeroizing::new(value.to_vec()))
}

/// Whether a failure means the token or the session is gone (retry on a fresh session, then
/// report the token unavailable) rather than a refusal of this request.
fn is_unavailable(e: &P11Error) -> bool {
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
                | RvError::SessionCount
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

/// A one-line description of a PKCS#11 failure: the return value's name (CKR_...) and the
/// function, not the standard's paragraph-long explanation.
fn short(e: &P11Error) -> String {
    match e {
        P11Error::Pkcs11(rv, function) => format!("{function} returned {rv:?}"),
        other => other.to_string(),
    }
}

/// The DER `Ecdsa-Sig-Value` (RFC 5480 section 2.2.3) for a token's fixed-size r||s.
fn ecdsa_der(rs: &[u8]) -> Option<Vec<u8>> {
    if rs.len() != 64 {
        return None;
    }
    let (r, s) = rs.split_at(32);
    let integer = |x: &[u8]| {
        let first = x.iter().position(|b| *b != 0).unwrap_or(x.len() - 1);
        let x = &x[first..];
        let mut out = vec![0x02];
        if x.first().is_some_and(|b| b & 0x80 != 0) {
            out.push(u8::try_from(x.len() + 1).unwrap_or(0));
            out.push(0);
        } else {
            out.push(u8::try_from(x.len()).unwrap_or(0));
        }
        out.extend_from_slice(x);
        out
    };
    let (r, s) = (integer(r), integer(s));
    // At most 2 * 35 bytes: the short length form.
    let mut der = vec![0x30, u8::try_from(r.len() + s.len()).ok()?];
    der.extend_from_slice(&r);
    der.extend_from_slice(&s);
    Some(der)
}

fn percent_decode(s: &str) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| "PKCS#11 URI: a % is not followed by two hex digits".to_string())?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn percent_encode(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~/:".contains(b) {
            s.push(char::from(*b));
        } else {
            s += &format!("%{b:02X}");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn a_uri_parses_and_config_keeps_no_pin_value() {
        let u = Pkcs11Uri::parse(
            "pkcs11:token=imprint;object=ca%20key;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=1234",
        )
        .unwrap();
        assert_eq!(u.token, "imprint");
        assert_eq!(u.object, "ca key");
        assert_eq!(u.id, Some(vec![1, 2]));
        assert_eq!(u.pin, PinSource::Value(Zeroizing::new("1234".into())));
        assert!(!format!("{u:?}").contains("1234"));
        let kept = u.to_config_string();
        assert!(!kept.contains("pin"), "{kept}");
        let again = Pkcs11Uri::parse(&kept).unwrap();
        assert_eq!(
            (again.token, again.object, again.id),
            (u.token, u.object, u.id)
        );
        assert_eq!(again.pin, PinSource::Environment);

        let f = Pkcs11Uri::parse(
            "pkcs11:token=t;object=o?module-path=/m.so&pin-source=file:/etc/imprint/pin",
        )
        .unwrap();
        assert_eq!(f.pin, PinSource::File("/etc/imprint/pin".into()));
        assert_eq!(Pkcs11Uri::parse(&f.to_config_string()).unwrap(), f);

        for bad in [
            "token=t;object=o?module-path=/m.so",
            "pkcs11:object=o?module-path=/m.so",
            "pkcs11:token=t?module-path=/m.so",
            "pkcs11:token=t;object=o",
            "pkcs11:token=t;object=o;type=public?module-path=/m.so",
            "pkcs11:token=t;object=o;id=%G1?module-path=/m.so",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn raw_ecdsa_signatures_become_der_that_ring_verifies() {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = protocol_spec::PublicKey {
            algorithm: KeyAlgorithm::P256,
            raw: key.public_key().as_ref().to_vec(),
        };
        // Enough signatures that some r or s has its high bit set or a leading zero byte.
        for i in 0..200u32 {
            let msg = i.to_be_bytes();
            let fixed = key.sign(&rng, &msg).unwrap();
            let der = ecdsa_der(fixed.as_ref()).unwrap();
            assert!(public.verify_x509(&msg, &der), "signature {i}");
        }
        assert!(ecdsa_der(&[0; 63]).is_none());
    }
}
