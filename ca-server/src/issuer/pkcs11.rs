//! The CA key in a PKCS#11 token (a hardware security module; SoftHSM2 in the tests), named by
//! an RFC 7512 PKCS#11 URI and used through the `cryptoki` crate.
//!
//! Every call goes through the token's session pool ([`session::TokenSessions`]: one per token
//! in a process, shared with the operator CA's key, the DUKPT BDKs and the sealed key-encryption
//! key), which logs in once, bounds the sessions open at once, and tries a call again on a fresh
//! session, then after resetting the module, when the token stops answering. Past that a
//! signature is [`SignError::Unavailable`]; the next one tries again, so signing resumes by
//! itself when the token is back. The private key's handle is found once per epoch of the pool.
//!
//! Ed25519 signs with `CKM_EDDSA` (PKCS#11 3.0) over the message; P-256 with `CKM_ECDSA` over
//! its SHA-256 digest, the token's raw r||s turned into the DER `Ecdsa-Sig-Value` X.509 wants.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use cryptoki::types::AuthPin;
use protocol_spec::{KeyAlgorithm, KeyPair};
use zeroize::{Zeroize, Zeroizing};

use super::key::SignError;

pub mod bdk;
pub mod session;
pub use bdk::{BdkToken, BdkTokenError};
pub use session::{SessionLimits, SessionStats, TokenSessions};

use session::{Failure, Fault, HandleCache, is_stale_handle, is_unavailable, short};

/// DER OBJECT IDENTIFIER 1.3.101.112 (id-Ed25519, RFC 8410): CKA_EC_PARAMS of an Ed25519 key.
const ED25519_PARAMS: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
/// DER PrintableString "edwards25519", the other CKA_EC_PARAMS PKCS#11 3.0 allows for Ed25519.
const ED25519_PARAMS_NAME: &[u8] = b"\x13\x0cedwards25519";
/// DER OBJECT IDENTIFIER 1.2.840.10045.3.1.7 (prime256v1, RFC 5480).
const P256_PARAMS: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

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

/// The CA's key in a token: the token's session pool ([`TokenSessions`]), the key's public half
/// and its private half's handle, found once per epoch of the pool.
pub struct TokenKey {
    sessions: Arc<TokenSessions>,
    uri: Pkcs11Uri,
    algorithm: KeyAlgorithm,
    public_raw: Vec<u8>,
    handles: HandleCache,
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

/// The [`HandleCache`] label of a key's private half.
const PRIVATE: &str = "private";

impl TokenKey {
    /// Opens the key `uri` names, which must already be in the token, through the token's
    /// session pool (opened with `limits` if this process has none yet).
    pub fn open(uri: &Pkcs11Uri, limits: &SessionLimits) -> Result<Self, String> {
        Self::open_if_present(uri, limits)?.ok_or_else(|| {
            format!(
                "{}: no private key with that label in the token (give the key's label as object=, or make one with `ca-server init --pkcs11`)",
                uri.describe()
            )
        })
    }

    /// Opens the key `uri` names as [`TokenKey::open`] does; `None` only when the token holds
    /// no object of that label at all (neither half). Any other failure (a wrong PIN, a token
    /// that is not there, one half without the other) is an error: a caller that would make
    /// the key when it is absent must not make it for those.
    pub fn open_if_present(
        uri: &Pkcs11Uri,
        limits: &SessionLimits,
    ) -> Result<Option<Self>, String> {
        let sessions = TokenSessions::open(uri, limits).map_err(|e| e.to_string())?;
        let found = sessions
            .with_session(|session, epoch| {
                let held = token_objects();
                let Some(private) = find_key(session, uri, ObjectClass::PRIVATE_KEY, &held)
                    .map_err(Fault::Failed)?
                else {
                    if find_key(session, uri, ObjectClass::PUBLIC_KEY, &held)
                        .map_err(Fault::Failed)?
                        .is_some()
                    {
                        return Err(Fault::Failed(format!(
                            "{}: the token holds a public key with that label but no private key (delete it, or name another object=)",
                            uri.describe()
                        )));
                    }
                    return Ok(None);
                };
                let (algorithm, public_raw) =
                    public_half(session, uri, &held).map_err(Fault::Failed)?;
                Ok(Some((epoch, private, algorithm, public_raw)))
            })
            .map_err(|e| e.to_string())?;
        let Some((epoch, private, algorithm, public_raw)) = found else {
            return Ok(None);
        };
        let handles = HandleCache::default();
        handles.put(epoch, PRIVATE, private);
        Ok(Some(TokenKey {
            sessions,
            uri: uri.clone(),
            algorithm,
            public_raw,
            handles,
        }))
    }

    /// Generates a new key pair of `algorithm` in the token, labelled (and with the id) as
    /// `uri` says: the private half sensitive and not extractable. Refuses when the token
    /// already holds a private key with that label.
    pub fn generate(
        uri: &Pkcs11Uri,
        algorithm: KeyAlgorithm,
        limits: &SessionLimits,
    ) -> Result<Self, String> {
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
        let sessions = TokenSessions::open(uri, limits).map_err(|e| e.to_string())?;
        sessions
            .with_session(|session, _| {
                let held = token_objects();
                if find_key(session, uri, ObjectClass::PRIVATE_KEY, &held)
                    .map_err(Fault::Failed)?
                    .is_some()
                {
                    return Err(Fault::Failed(format!(
                        "{}: the token already holds a private key with that label; use it with --pkcs11-existing, or name another object=",
                        uri.describe()
                    )));
                }
                session
                    .generate_key_pair(&mechanism, &public, &private)
                    .map_err(|e| {
                        Fault::Failed(format!(
                            "{}: the token could not generate a {algorithm} key pair: {}",
                            uri.describe(),
                            short(&e)
                        ))
                    })
            })
            .map_err(|e| e.to_string())?;
        Self::open(uri, limits)
    }

    /// Imports `key` (a file key) into the token as a private-key object (sensitive, not
    /// extractable) and a public-key object, both labelled (and with the id) as `uri` says,
    /// then opens it. Refuses when the token already holds a private key with that label.
    pub fn import(uri: &Pkcs11Uri, key: &KeyPair, limits: &SessionLimits) -> Result<Self, String> {
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
        let mut private = [
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
        let sessions = TokenSessions::open(uri, limits).map_err(|e| e.to_string())?;
        let created = sessions.with_session(|session, _| {
            let held = token_objects();
            if find_key(session, uri, ObjectClass::PRIVATE_KEY, &held)
                .map_err(Fault::Failed)?
                .is_some()
            {
                return Err(Fault::Failed(format!(
                    "{}: the token already holds a private key with that label; name another object=",
                    uri.describe()
                )));
            }
            let created = |template: &[Attribute], what: &str| {
                session.create_object(template).map_err(|e| {
                    Fault::Failed(format!(
                        "{}: the token refused the {what}: {}",
                        uri.describe(),
                        short(&e)
                    ))
                })
            };
            let public_handle = created(&public, "public key")?;
            if let Err(e) = created(&private, "private key") {
                let _ = session.destroy_object(public_handle);
                return Err(e);
            }
            Ok(())
        });
        for a in private.iter_mut() {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        created.map_err(|e| e.to_string())?;
        Self::open(uri, limits)
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

    /// What the token's session pool has done so far (shared with every other user of the
    /// token in this process).
    pub fn session_stats(&self) -> SessionStats {
        self.sessions.stats()
    }

    /// Signs as X.509 expects (see the module documentation) on a session of the token's pool;
    /// [`SignError::Unavailable`] when the token does not answer, or every session stays busy.
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
        let signed = self.sessions.with_session(|session, epoch| {
            let key = self.key_handle(session, epoch)?;
            session.sign(&mechanism, key, &data).map_err(|e| {
                if is_unavailable(&e) || is_stale_handle(&e) {
                    Fault::Lost(short(&e))
                } else {
                    Fault::Failed(short(&e))
                }
            })
        });
        match signed {
            Ok(sig) => self.x509_signature(sig),
            Err(Failure::Unavailable(why)) => Err(SignError::Unavailable(why)),
            Err(Failure::Refused(why)) => Err(SignError::Failed(why)),
            Err(Failure::Op(why)) => {
                Err(SignError::Failed(format!("{}: {why}", self.uri.describe())))
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

    /// The private key's handle: cached for the pool's epoch, or found again.
    fn key_handle(&self, session: &Session, epoch: u64) -> Result<ObjectHandle, Fault<String>> {
        if let Some(h) = self.handles.get(epoch, PRIVATE) {
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
        .map_err(Fault::Lost)?
        .ok_or_else(|| Fault::Lost("the private key is not in the token".into()))?;
        self.handles.put(epoch, PRIVATE, h);
        Ok(h)
    }
}

/// Token objects are made, and searched for, one at a time in a process: the check that a
/// label is free and the creation then hold together, and SoftHSM2 before 2.7.0 (Debian 12
/// ships 2.6.1) has a race between `C_FindObjects` and object creation in one process: a search
/// that reads a new object's file while it is still empty marks the object invalid, and its
/// creation fails with CKR_GENERAL_ERROR (SoftHSMv2 issue 573, fixed by its commit 07f0b98).
/// The test suite, with every test CA in one token, met it. Searches are rare (at start, and
/// when a session's key handle must be found again); signing is not held. It is taken while a
/// session is held, never before one is taken: a caller holding it while waiting for a session
/// could wait on callers that hold sessions and wait for it.
struct TokenObjects(#[allow(dead_code)] std::sync::MutexGuard<'static, ()>);

fn token_objects() -> TokenObjects {
    static HELD: Mutex<()> = Mutex::new(());
    TokenObjects(HELD.lock().unwrap_or_else(PoisonError::into_inner))
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
/// The same for a sealed HTTPS server key.
const SEALED_TLS_MAGIC: &[u8; 12] = b"IMPRINT-TLS1";

/// Seals the CA's key-encryption key for secrets with an AES-256 key in the token (label
/// `OBJECT-kek`, made sensitive and not extractable when the token has none): AES-GCM in the
/// token, a fresh 12-byte IV. Returns the sealed file: magic, IV, ciphertext and tag.
///
/// The secrets themselves are still sealed in the CA's memory under keys derived from the
/// key-encryption key, which the token unseals once at start ([`unseal_kek`]): the file on
/// disk is useless without the token, and sealing a secret costs no call to the token.
pub fn seal_kek(uri: &Pkcs11Uri, kek: &[u8], limits: &SessionLimits) -> Result<Vec<u8>, String> {
    seal(uri, SEALED_KEK_MAGIC, "key-encryption key", kek, limits)
}

/// Opens a file [`seal_kek`] wrote, in the token.
pub fn unseal_kek(
    uri: &Pkcs11Uri,
    sealed: &[u8],
    limits: &SessionLimits,
) -> Result<Zeroizing<Vec<u8>>, String> {
    unseal(uri, SEALED_KEK_MAGIC, "key-encryption key", sealed, limits)
}

/// Seals the HTTPS server's private key (PKCS#8 PEM) in the token, as [`seal_kek`] does the
/// key-encryption key but under a magic of its own (also the AES-GCM associated data), so that
/// neither sealed file opens as the other: for `tls.key.sealed`.
pub fn seal_tls_key(
    uri: &Pkcs11Uri,
    pem: &[u8],
    limits: &SessionLimits,
) -> Result<Vec<u8>, String> {
    seal(uri, SEALED_TLS_MAGIC, "HTTPS server key", pem, limits)
}

/// Opens a file [`seal_tls_key`] wrote, in the token.
pub fn unseal_tls_key(
    uri: &Pkcs11Uri,
    sealed: &[u8],
    limits: &SessionLimits,
) -> Result<Zeroizing<Vec<u8>>, String> {
    unseal(uri, SEALED_TLS_MAGIC, "HTTPS server key", sealed, limits)
}

/// Seals `bytes` in the token: AES-GCM under the token's AES key `OBJECT-kek` (made there on
/// first use, sensitive and not extractable), `magic` as prefix and associated data.
fn seal(
    uri: &Pkcs11Uri,
    magic: &[u8; 12],
    what: &str,
    bytes: &[u8],
    limits: &SessionLimits,
) -> Result<Vec<u8>, String> {
    let mut iv = [0u8; 12];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut iv)
        .map_err(|_| "random generator failed".to_string())?;
    let sessions = TokenSessions::open(uri, limits).map_err(|e| e.to_string())?;
    let sealed = sessions
        .with_session(|session, _| {
            let held = token_objects();
            let aes = match find_kek_key(session, uri, &held).map_err(Fault::Failed)? {
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
                        Fault::Failed(format!(
                            "{}: the token could not make an AES key for the key-encryption key: {}",
                            uri.describe(),
                            short(&e)
                        ))
                    })?,
            };
            drop(held);
            let mut iv_param = iv;
            let params = cryptoki::mechanism::aead::GcmParams::new(
                &mut iv_param,
                magic,
                128.into(),
            )
            .map_err(|e| Fault::Failed(short(&e)))?;
            session
                .encrypt(&Mechanism::AesGcm(params), aes, bytes)
                .map_err(|e| {
                    Fault::Failed(format!(
                        "{}: the token could not seal the {what}: {}",
                        uri.describe(),
                        short(&e)
                    ))
                })
        })
        .map_err(|e| e.to_string())?;
    let mut out = magic.to_vec();
    out.extend_from_slice(&iv);
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// Opens what [`seal`] sealed with `magic`, in the token.
fn unseal(
    uri: &Pkcs11Uri,
    magic: &[u8; 12],
    what: &str,
    sealed: &[u8],
    limits: &SessionLimits,
) -> Result<Zeroizing<Vec<u8>>, String> {
    let rest = sealed
        .strip_prefix(magic.as_slice())
        .filter(|r| r.len() > 12 + 16)
        .ok_or_else(|| format!("not a sealed {what}"))?;
    let (iv, ciphertext) = rest.split_at(12);
    let sessions = TokenSessions::open(uri, limits).map_err(|e| e.to_string())?;
    sessions
        .with_session(|session, _| {
            let aes = find_kek_key(session, uri, &token_objects())
                .map_err(Fault::Failed)?
                .ok_or_else(|| {
                    Fault::Failed(format!(
                        "token {:?}: no AES key labelled {:?} to unseal the {what}",
                        uri.token,
                        String::from_utf8_lossy(&kek_label(uri))
                    ))
                })?;
            let mut iv = iv.to_vec();
            let params =
                cryptoki::mechanism::aead::GcmParams::new(&mut iv, magic, 128.into())
                    .map_err(|e| Fault::Failed(short(&e)))?;
            session
                .decrypt(&Mechanism::AesGcm(params), aes, ciphertext)
                .map(Zeroizing::new)
                .map_err(|e| {
                    Fault::Failed(format!(
                        "{}: the token could not unseal the {what} (another token's, or altered): {}",
                        uri.describe(),
                        short(&e)
                    ))
                })
        })
        .map_err(|e| e.to_string())
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
