//! DUKPT Base Derivation Keys held in the CA's PKCS#11 token (SPEC.md 10.2, "BDK custody"):
//! each one an AES secret-key object labelled `OBJECT-bdk-BDKID` (OBJECT: the CA key's label),
//! sensitive, not extractable, usable for encryption only. A BDK made with `--generate` is
//! generated in the token and never exists outside it; an imported one is created from the
//! operator's key, whose plaintext is wiped right after. The token then does the only step of
//! X9.24-3-2017 that needs the BDK, AES-ECB of the Initial Key's derivation data
//! (`CKM_AES_ECB`, one 16-octet block per call), and computes the BDK's key check value
//! (AES-CMAC of a zero block: two `CKM_AES_ECB` blocks); every key derived from the Initial Key
//! is computed in the CA's memory, as for a BDK sealed under the key-encryption key.
//!
//! Every call goes through the token's session pool ([`TokenSessions`], shared with the CA
//! key), opened at the first call that needs it: a CA that never derives never asks the token
//! for anything. A token that does not answer is [`BdkTokenError::Unavailable`], as signing
//! reports it; a BDK object that is not in the token is [`BdkTokenError::Missing`].

use std::sync::{Arc, Mutex, PoisonError};

use cryptoki::error::Error as P11Error;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType as P11KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use protocol_spec::dukpt::{self, AesKey, BdkId, InitialKeyId, KCV_LEN, KeyType};
use zeroize::{Zeroize, Zeroizing};

use super::session::{
    Failure, Fault, HandleCache, SessionLimits, TokenSessions, is_stale_handle, is_unavailable,
    short,
};
use super::{Pkcs11Uri, TokenObjects, token_objects};

/// Why the token did not do what was asked with a BDK.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BdkTokenError {
    /// The token does not answer (a session, the device, the module): nothing was derived or
    /// stored; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The BDK's object is not in the token (deleted, or another token): nothing was derived.
    #[error("{0}")]
    Missing(String),
    /// The token already holds an object with the label a new BDK's would have.
    #[error("{0}")]
    Taken(String),
    /// The token refused (a label taken, a mechanism or template it does not support, a key
    /// check value that does not match).
    #[error("{0}")]
    Failed(String),
}

/// The CA's PKCS#11 token, as the keeper of its DUKPT BDKs.
pub struct BdkToken {
    uri: Pkcs11Uri,
    limits: SessionLimits,
    /// The token's session pool, once a call needed it.
    sessions: Mutex<Option<Arc<TokenSessions>>>,
    /// Object handles by label, found once per epoch of the pool (forgotten when the token
    /// says a handle is invalid).
    handles: HandleCache,
}

impl std::fmt::Debug for BdkToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdkToken")
            .field("token", &self.uri.token)
            .field("object", &self.uri.object)
            .finish_non_exhaustive()
    }
}

/// How a call failed, when the token answered.
enum Attempt {
    /// The object is not in the token.
    Missing(String),
    /// The token refused.
    Refused(String),
    /// The label of a new object is taken.
    Taken(String),
}

impl BdkToken {
    /// The token `uri` names (the CA key's URI: its token, and its label as the prefix of every
    /// BDK object's label), through the token's session pool (opened with `limits` if this
    /// process has none yet). Nothing is opened until the first call that needs the token.
    pub fn new(uri: &Pkcs11Uri, limits: &SessionLimits) -> Self {
        BdkToken {
            uri: uri.clone(),
            limits: *limits,
            sessions: Mutex::new(None),
            handles: HandleCache::default(),
        }
    }

    /// The label of BDK `id`'s object: `OBJECT-bdk-BDKID`.
    pub fn label(&self, id: BdkId) -> String {
        format!("{}-bdk-{id}", self.uri.object)
    }

    /// How errors name the token.
    pub fn describe(&self) -> String {
        format!("token {:?}", self.uri.token)
    }

    /// Generates an AES key of `key_type` in the token as BDK `id`'s object, and returns its
    /// label and its key check value, computed in the token. Refuses a label already taken.
    pub fn generate(
        &self,
        id: BdkId,
        key_type: KeyType,
    ) -> Result<(String, [u8; KCV_LEN]), BdkTokenError> {
        let label = self.label(id);
        let template = bdk_template(&label, key_type);
        self.create(&label, |session| {
            session.generate_key(&Mechanism::AesKeyGen, &template)
        })?;
        match self.kcv(&label) {
            Ok(kcv) => Ok((label, kcv)),
            Err(e) => {
                self.destroy_quietly(&label);
                Err(e)
            }
        }
    }

    /// Creates BDK `id`'s object from `bdk`, which is wiped as soon as the token has it (the
    /// template's copy too), and returns its label and its key check value, computed in the
    /// token and checked against the key's own. Refuses a label already taken.
    pub fn import(&self, id: BdkId, bdk: AesKey) -> Result<(String, [u8; KCV_LEN]), BdkTokenError> {
        let label = self.label(id);
        let key_type = bdk.key_type();
        let expected = bdk.kcv();
        let mut template = bdk_template(&label, key_type);
        template.retain(|a| !matches!(a, Attribute::ValueLen(_)));
        template.push(Attribute::Class(ObjectClass::SECRET_KEY));
        template.push(Attribute::Value(bdk.expose().to_vec()));
        drop(bdk);
        let created = self.create(&label, |session| session.create_object(&template));
        for a in template.iter_mut() {
            if let Attribute::Value(v) = a {
                v.zeroize();
            }
        }
        created?;
        match self.kcv(&label) {
            Ok(kcv) if kcv == expected => Ok((label, kcv)),
            Ok(_) => {
                self.destroy_quietly(&label);
                Err(BdkTokenError::Failed(format!(
                    "{}: the key check value the token computes for {label:?} is not the key's; the object was deleted",
                    self.describe()
                )))
            }
            Err(e) => {
                self.destroy_quietly(&label);
                Err(e)
            }
        }
    }

    /// The key check value (SPEC.md 10.2: AES-CMAC of a zero block, 5 octets) of the BDK object
    /// `label`, computed in the token.
    pub fn kcv(&self, label: &str) -> Result<[u8; KCV_LEN], BdkTokenError> {
        dukpt::kcv_with(|block| self.encrypt_block(label, block))
    }

    /// The Initial Key of `id` under the BDK object `label` of `key_type`: the derivation data
    /// encrypted in the token, the key put together here.
    pub fn initial_key(
        &self,
        label: &str,
        key_type: KeyType,
        id: InitialKeyId,
    ) -> Result<AesKey, BdkTokenError> {
        dukpt::initial_key_with(key_type, id, |block| self.encrypt_block(label, block))
    }

    /// Deletes the BDK object `label` (an addition the store then refused leaves nothing
    /// behind); a failure is logged, not returned: the caller is already reporting one.
    pub fn destroy_quietly(&self, label: &str) {
        let outcome = self.with_session(|session, epoch| {
            let h = self.handle(session, epoch, label)?;
            session.destroy_object(h).map_err(|e| classify(&e))
        });
        self.handles.forget(label);
        if let Err(e) = outcome {
            tracing::warn!(
                token = %self.uri.token,
                object = label,
                error = %e,
                "could not delete a BDK object the store does not record; delete it by hand"
            );
        }
    }

    /// AES-ECB of one block under the BDK object `label`, in the token.
    fn encrypt_block(&self, label: &str, block: [u8; 16]) -> Result<[u8; 16], BdkTokenError> {
        let out = self.with_session(|session, epoch| {
            let h = self.handle(session, epoch, label)?;
            session
                .encrypt(&Mechanism::AesEcb, h, &block)
                .map(Zeroizing::new)
                .map_err(|e| {
                    if is_stale_handle(&e) {
                        self.handles.forget(label);
                    }
                    classify(&e)
                })
        })?;
        <[u8; 16]>::try_from(out.as_slice()).map_err(|_| {
            BdkTokenError::Failed(format!(
                "{}: AES-ECB of one block under {label:?} gave {} octets",
                self.describe(),
                out.len()
            ))
        })
    }

    /// Makes the object `label` with `make`, after checking that no object has that label; the
    /// check and the creation hold together ([`token_objects`]).
    fn create(
        &self,
        label: &str,
        make: impl Fn(&Session) -> Result<ObjectHandle, P11Error>,
    ) -> Result<(), BdkTokenError> {
        let (epoch, handle) = self.with_session(|session, epoch| {
            let held = token_objects();
            if find(session, label, &held)?.is_some() {
                return Err(Fault::Failed(Attempt::Taken(format!(
                    "the token already holds an object labelled {label:?} (left by an addition that did not finish, or another CA's): delete it, or choose another BDK id"
                ))));
            }
            make(session).map(|h| (epoch, h)).map_err(|e| classify(&e))
        })?;
        self.handles.put(epoch, label, handle);
        Ok(())
    }

    /// Runs `op` on a session of the token's pool (opened at the first call).
    fn with_session<T>(
        &self,
        op: impl FnMut(&Session, u64) -> Result<T, Fault<Attempt>>,
    ) -> Result<T, BdkTokenError> {
        let sessions = {
            let mut pool = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
            match &*pool {
                Some(p) => p.clone(),
                None => {
                    let p = TokenSessions::open(&self.uri, &self.limits).map_err(|e| match e {
                        Failure::Refused(why) => BdkTokenError::Failed(why),
                        other => BdkTokenError::Unavailable(other.to_string()),
                    })?;
                    *pool = Some(p.clone());
                    p
                }
            }
        };
        sessions.with_session(op).map_err(|e| match e {
            Failure::Unavailable(why) => BdkTokenError::Unavailable(why),
            Failure::Refused(why) => BdkTokenError::Failed(why),
            Failure::Op(Attempt::Missing(why)) => {
                BdkTokenError::Missing(format!("{}: {why}", self.describe()))
            }
            Failure::Op(Attempt::Refused(why)) => {
                BdkTokenError::Failed(format!("{}: {why}", self.describe()))
            }
            Failure::Op(Attempt::Taken(why)) => {
                BdkTokenError::Taken(format!("{}: {why}", self.describe()))
            }
        })
    }

    /// The handle of the object `label`: cached for the pool's epoch, or found.
    fn handle(
        &self,
        session: &Session,
        epoch: u64,
        label: &str,
    ) -> Result<ObjectHandle, Fault<Attempt>> {
        if let Some(h) = self.handles.get(epoch, label) {
            return Ok(h);
        }
        let h = find(session, label, &token_objects())?.ok_or_else(|| {
            Fault::Failed(Attempt::Missing(format!(
                "no BDK object labelled {label:?} in the token (deleted, or the CA is pointed at another token)"
            )))
        })?;
        self.handles.put(epoch, label, h);
        Ok(h)
    }
}

/// The attributes of a BDK object: an AES secret key on the token, private, sensitive, not
/// extractable, for encryption only (X9.24-3-2017 derivation only ever encrypts under a BDK),
/// and not modifiable, so that no one can give it another use later.
fn bdk_template(label: &str, key_type: KeyType) -> Vec<Attribute> {
    vec![
        Attribute::KeyType(P11KeyType::AES),
        Attribute::ValueLen((key_type.key_len() as u64).into()),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Encrypt(true),
        Attribute::Decrypt(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Derive(false),
        Attribute::Modifiable(false),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

/// The one secret-key object labelled `label`; an error when several are.
fn find(
    session: &Session,
    label: &str,
    _held: &TokenObjects,
) -> Result<Option<ObjectHandle>, Fault<Attempt>> {
    let found = session
        .find_objects(&[
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::Label(label.as_bytes().to_vec()),
        ])
        .map_err(|e| match classify(&e) {
            Fault::Failed(Attempt::Refused(why)) => {
                Fault::Failed(Attempt::Refused(format!("cannot search the token: {why}")))
            }
            other => other,
        })?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(Fault::Failed(Attempt::Refused(format!(
            "{} secret keys are labelled {label:?}; keep one",
            found.len()
        )))),
    }
}

/// What a PKCS#11 failure means here: the token gone or a handle no longer valid (the object
/// was deleted: found again, or missing), both tried again; or a refusal.
fn classify(e: &P11Error) -> Fault<Attempt> {
    if is_unavailable(e) || is_stale_handle(e) {
        Fault::Lost(short(e))
    } else {
        Fault::Failed(Attempt::Refused(short(e)))
    }
}
