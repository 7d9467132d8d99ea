//! The factory-attestation token: a CWT (RFC 8392) in a tagged COSE_Sign1 (RFC 9052 section 4.2),
//! signed by a line station's key.
//!
//! Claims: iss (1) line id, sub (2) device serial in decimal, exp (4), iat (6), cti (7) token id,
//! cnf (8) = `{ 3 (kid): SHA-256(device SPKI) }` (RFC 8747 section 3.4).

use ciborium::Value;
use coset::cwt::{ClaimName, ClaimsSet, ClaimsSetBuilder, Timestamp};
use coset::{
    CborSerializable, CoseSign1, CoseSign1Builder, HeaderBuilder, TaggedCborSerializable, iana,
};
use ring::rand::SecureRandom;

use crate::DeviceSerial;
use crate::keys::{KeyAlgorithm, KeyError, KeyPair, PublicKey};
use crate::problem::{Problem, ProblemType};

/// Largest accepted token, in bytes (a real one is about 160).
pub const MAX_TOKEN_LEN: usize = 512;
/// Largest accepted token id (`cti`), in bytes.
pub const MAX_CTI_LEN: usize = 64;
/// The `kid` confirmation method of RFC 8747 section 3.4 inside `cnf`.
const CNF_KID: i64 = 3;

/// What a line station asserts about one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryClaims {
    /// `iss`: the line id as registered with the CA.
    pub line: String,
    /// `sub`: the device serial.
    pub serial: DeviceSerial,
    /// `cnf`: SHA-256 of the device's DER SubjectPublicKeyInfo.
    pub key_hash: [u8; 32],
    /// `iat`, seconds since the Unix epoch.
    pub issued_at: u64,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
    /// `cti`: unique token id.
    pub token_id: Vec<u8>,
}

/// A line as the verifier knows it.
#[derive(Debug, Clone)]
pub struct LineInfo {
    /// The line station's public key.
    pub public_key: PublicKey,
    /// First serial the line may vouch for.
    pub first_serial: u64,
    /// Last serial the line may vouch for (inclusive).
    pub last_serial: u64,
    /// Disabled lines vouch for nothing.
    pub active: bool,
}

/// Where the verifier looks lines up.
pub trait LineDirectory {
    /// The line registered under `id`, if any.
    fn line(&self, id: &str) -> Option<LineInfo>;
}

impl<F: Fn(&str) -> Option<LineInfo>> LineDirectory for F {
    fn line(&self, id: &str) -> Option<LineInfo> {
        self(id)
    }
}

/// Time rules for tokens.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    /// Allowed difference between the line station's clock and ours, in seconds.
    pub max_clock_skew: u64,
    /// Longest accepted `exp - iat`, in seconds.
    pub max_lifetime: u64,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            max_clock_skew: 120,
            max_lifetime: MAX_LIFETIME,
        }
    }
}

/// The longest `exp - iat` a CA accepts by default, seconds: one hour. SPEC.md section 11.3:
/// "Tokens live minutes"; line stations issue them for 10 minutes, and a device may wait on
/// the line for a while before it enrolls.
pub const MAX_LIFETIME: u64 = 3600;

/// A token whose signature, line, time and range were checked. Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    claims: FactoryClaims,
}

impl VerifiedToken {
    /// The verified claims.
    pub fn claims(&self) -> &FactoryClaims {
        &self.claims
    }
}

fn cose_alg(alg: KeyAlgorithm) -> iana::Algorithm {
    match alg {
        KeyAlgorithm::Ed25519 => iana::Algorithm::EdDSA,
        KeyAlgorithm::P256 => iana::Algorithm::ES256,
    }
}

/// Signs `claims` with the line key: the tagged COSE_Sign1 bytes.
pub fn mint(
    claims: &FactoryClaims,
    line_key: &KeyPair,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, KeyError> {
    let cnf = Value::Map(vec![(
        Value::Integer(CNF_KID.into()),
        Value::Bytes(claims.key_hash.to_vec()),
    )]);
    let payload = ClaimsSetBuilder::new()
        .issuer(claims.line.clone())
        .subject(claims.serial.to_string())
        .expiration_time(Timestamp::WholeSeconds(clamp_i64(claims.expires_at)))
        .issued_at(Timestamp::WholeSeconds(clamp_i64(claims.issued_at)))
        .cwt_id(claims.token_id.clone())
        .claim(iana::CwtClaimName::Cnf, cnf)
        .build()
        .to_vec()
        .map_err(|_| KeyError::Random)?;
    let protected = HeaderBuilder::new()
        .algorithm(cose_alg(line_key.algorithm()))
        .build();
    let sign1 = CoseSign1Builder::new()
        .protected(protected)
        .payload(payload)
        .try_create_signature(b"", |tbs| line_key.sign_cose(tbs, rng))?
        .build();
    sign1.to_tagged_vec().map_err(|_| KeyError::Random)
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Decodes a token without checking anything but its structure: what a line station's log or an
/// operator's tool shows. Never use the result to authorize.
pub fn inspect(token: &[u8]) -> Result<(iana::Algorithm, FactoryClaims), Problem> {
    let (sign1, claims) = decode(token)?;
    let alg = match sign1.protected.header.alg {
        Some(coset::Algorithm::Assigned(a)) => a,
        _ => {
            return Err(Problem::new(
                ProblemType::TokenSignature,
                "token: no registered alg in the protected header",
            ));
        }
    };
    Ok((alg, claims))
}

fn decode(token: &[u8]) -> Result<(CoseSign1, FactoryClaims), Problem> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Problem::new(
            ProblemType::TooLarge,
            format!(
                "token is {} bytes; the limit is {MAX_TOKEN_LEN}",
                token.len()
            ),
        ));
    }
    let sign1 = CoseSign1::from_tagged_slice(token)
        .map_err(|e| Problem::malformed(format!("token: not a tagged COSE_Sign1: {e}")))?;
    let payload = sign1
        .payload
        .as_deref()
        .ok_or_else(|| Problem::malformed("token: COSE_Sign1 has no payload"))?;
    let set = ClaimsSet::from_slice(payload)
        .map_err(|e| Problem::malformed(format!("token: payload is not a CWT claims set: {e}")))?;
    let claims = claims_from_set(set)?;
    Ok((sign1, claims))
}

fn claims_from_set(set: ClaimsSet) -> Result<FactoryClaims, Problem> {
    let line = set
        .issuer
        .ok_or_else(|| Problem::malformed("token: missing iss (line id)"))?;
    let sub = set
        .subject
        .ok_or_else(|| Problem::malformed("token: missing sub (device serial)"))?;
    let serial: DeviceSerial = sub
        .parse()
        .map_err(|e| Problem::malformed(format!("token: sub {sub:?}: {e}")))?;
    let whole = |t: Option<Timestamp>, name: &str| -> Result<u64, Problem> {
        match t {
            Some(Timestamp::WholeSeconds(s)) => u64::try_from(s)
                .map_err(|_| Problem::malformed(format!("token: {name} is negative"))),
            Some(Timestamp::FractionalSeconds(_)) => Err(Problem::malformed(format!(
                "token: {name} must be whole seconds"
            ))),
            None => Err(Problem::malformed(format!("token: missing {name}"))),
        }
    };
    let issued_at = whole(set.issued_at, "iat")?;
    let expires_at = whole(set.expiration_time, "exp")?;
    let token_id = set
        .cwt_id
        .ok_or_else(|| Problem::malformed("token: missing cti (token id)"))?;
    if token_id.is_empty() || token_id.len() > MAX_CTI_LEN {
        return Err(Problem::malformed(format!(
            "token: cti must be 1 to {MAX_CTI_LEN} bytes, is {}",
            token_id.len()
        )));
    }
    let cnf_name = ClaimName::Assigned(iana::CwtClaimName::Cnf);
    let cnf = set
        .rest
        .into_iter()
        .find(|(name, _)| *name == cnf_name)
        .map(|(_, v)| v)
        .ok_or_else(|| Problem::malformed("token: missing cnf (key confirmation)"))?;
    let key_hash = match cnf {
        Value::Map(entries) => entries
            .into_iter()
            .find_map(|(k, v)| match (k, v) {
                (Value::Integer(i), Value::Bytes(b)) if i128::from(i) == i128::from(CNF_KID) => {
                    Some(b)
                }
                _ => None,
            })
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .ok_or_else(|| {
                Problem::malformed("token: cnf must hold kid (3) with a 32-byte SHA-256")
            })?,
        _ => return Err(Problem::malformed("token: cnf must be a map")),
    };
    Ok(FactoryClaims {
        line,
        serial,
        key_hash,
        issued_at,
        expires_at,
        token_id,
    })
}

/// Verifies a token: structure, line, algorithm, signature, time and serial range, in that order.
pub fn verify(
    token: &[u8],
    lines: &dyn LineDirectory,
    now: u64,
    policy: TokenPolicy,
) -> Result<VerifiedToken, Problem> {
    let (sign1, claims) = decode(token)?;
    // RFC 9052 section 3.1: "crit" lists header labels the recipient MUST understand; we
    // understand none beyond alg, so any entry fails the token.
    if !sign1.protected.header.crit.is_empty() {
        return Err(Problem::malformed(
            "token: unknown critical header parameters",
        ));
    }
    let line = lines.line(&claims.line).ok_or_else(|| {
        Problem::new(
            ProblemType::LineUnknown,
            format!("line {:?} is not registered", claims.line),
        )
    })?;
    if !line.active {
        return Err(Problem::new(
            ProblemType::LineUnknown,
            format!("line {:?} is disabled", claims.line),
        ));
    }
    let expected = cose_alg(line.public_key.algorithm);
    match &sign1.protected.header.alg {
        Some(coset::Algorithm::Assigned(a)) if *a == expected => {}
        other => {
            return Err(Problem::new(
                ProblemType::TokenSignature,
                format!(
                    "token alg {other:?} does not match line {:?}'s {} key (expected {expected:?})",
                    claims.line, line.public_key.algorithm
                ),
            ));
        }
    }
    sign1
        .verify_signature(b"", |sig, data| {
            if line.public_key.verify_cose(data, sig) {
                Ok(())
            } else {
                Err(())
            }
        })
        .map_err(|()| {
            Problem::new(
                ProblemType::TokenSignature,
                format!(
                    "token signature does not verify under line {:?}'s key",
                    claims.line
                ),
            )
        })?;
    if claims.expires_at < claims.issued_at
        || claims.expires_at - claims.issued_at > policy.max_lifetime
    {
        return Err(Problem::new(
            ProblemType::TokenExpired,
            format!(
                "token lifetime exp-iat = {}s is outside 0..={}s",
                i128::from(claims.expires_at) - i128::from(claims.issued_at),
                policy.max_lifetime
            ),
        ));
    }
    if claims.issued_at > now.saturating_add(policy.max_clock_skew) {
        return Err(Problem::new(
            ProblemType::TokenExpired,
            format!(
                "token iat {} is in the future (now {now})",
                claims.issued_at
            ),
        ));
    }
    if claims.expires_at.saturating_add(policy.max_clock_skew) < now {
        return Err(Problem::new(
            ProblemType::TokenExpired,
            format!("token expired at {} (now {now})", claims.expires_at),
        ));
    }
    let s = claims.serial.get();
    if s < line.first_serial || s > line.last_serial {
        return Err(Problem::new(
            ProblemType::SerialOutOfRange,
            format!(
                "serial {s} is outside line {:?}'s range {}-{}",
                claims.line, line.first_serial, line.last_serial
            ),
        ));
    }
    Ok(VerifiedToken { claims })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    fn setup(alg: KeyAlgorithm) -> (KeyPair, FactoryClaims) {
        let rng = SystemRandom::new();
        let key = KeyPair::generate(alg, &rng).unwrap();
        let claims = FactoryClaims {
            line: "line-1".into(),
            serial: DeviceSerial::new(1000).unwrap(),
            key_hash: [7; 32],
            issued_at: 1_000_000,
            expires_at: 1_000_600,
            token_id: vec![1; 16],
        };
        (key, claims)
    }

    #[test]
    fn mint_then_verify_both_algorithms() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
            let (key, claims) = setup(alg);
            let token = mint(&claims, &key, &SystemRandom::new()).unwrap();
            let info = LineInfo {
                public_key: PublicKey::from(&key),
                first_serial: 1,
                last_serial: 2000,
                active: true,
            };
            let dir = |id: &str| (id == "line-1").then(|| info.clone());
            let v = verify(&token, &dir, 1_000_100, TokenPolicy::default()).unwrap();
            assert_eq!(v.claims(), &claims);
            let late = verify(&token, &dir, 1_000_600 + 121, TokenPolicy::default()).unwrap_err();
            assert_eq!(late.kind, ProblemType::TokenExpired);
            let early = verify(&token, &dir, 1_000_000 - 121, TokenPolicy::default()).unwrap_err();
            assert_eq!(early.kind, ProblemType::TokenExpired);
            let mut bad = token.clone();
            let n = bad.len() - 1;
            bad[n] ^= 1;
            assert_eq!(
                verify(&bad, &dir, 1_000_100, TokenPolicy::default())
                    .unwrap_err()
                    .kind,
                ProblemType::TokenSignature
            );
        }
    }
}
