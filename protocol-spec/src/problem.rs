//! Problem types: one stable name per failure, one mapping to HTTP status and CoAP code.
//!
//! On HTTP a problem travels as RFC 9457 problem details (`application/problem+json`); on CoAP as
//! RFC 9290 concise problem details (`application/concise-problem-details+cbor`, content format
//! 257) with the problem type in the custom entry keyed by [`PROBLEM_TYPE_KEY`].

use ciborium::Value;
use serde::{Deserialize, Serialize};

/// URI prefix of every problem type (RFC 9457 section 3.1.1 "type").
pub const PROBLEM_URI_PREFIX: &str = "urn:imprint:problem:";
/// Custom problem detail entry (RFC 9290 section 3) that carries the problem type URI.
pub const PROBLEM_TYPE_KEY: &str = "urn:imprint:problem";

/// Every failure an Imprint server reports. Unknown names from a newer peer decode as `Unknown`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemType {
    /// The token's `exp` has passed, or its `iat` is in the future, beyond the allowed clock skew,
    /// or its lifetime exceeds the maximum.
    TokenExpired,
    /// The token's signature does not verify under the line's key, or uses a disallowed algorithm.
    TokenSignature,
    /// The token id (`cti`) was already consumed by a different enrollment.
    TokenReplayed,
    /// The token's issuer is not a registered, active line.
    LineUnknown,
    /// The serial is outside the line's registered range.
    SerialOutOfRange,
    /// The line has enrolled as many devices as its quota allows.
    QuotaExhausted,
    /// The token's key confirmation does not match the CSR's public key.
    KeyMismatch,
    /// The CSR's self-signature (proof of possession) does not verify.
    CsrSignature,
    /// The CSR's key or signature algorithm is not Ed25519 or P-256/SHA-256.
    KeyAlgorithm,
    /// The public key is already bound to another serial.
    DuplicateKey,
    /// The serial is already bound to another public key.
    SerialTaken,
    /// The device is revoked.
    Revoked,
    /// Too many requests; retry later.
    RateLimited,
    /// The message cannot be decoded or misses a required field.
    Malformed,
    /// The message exceeds the size limit.
    TooLarge,
    /// The mutual-TLS client is not an enrolled device (no record for its serial).
    UnknownDevice,
    /// An acknowledgement names a key id, version or KCV that is not the one delivered.
    AckMismatch,
    /// The request did not arrive whole within the server's time limit (a body announced and
    /// not sent, or Block1 pieces that stopped coming).
    RequestTimeout,
    /// The server failed; detail stays on the server.
    Internal,
    /// The server cannot reach what it needs to answer (its database, its key token) and wrote
    /// nothing; retry after the time the response names.
    Unavailable,
    /// A type this implementation does not know (from a newer peer).
    Unknown(String),
}

/// Every known problem type, in the order SPEC.md lists them.
pub const ALL_PROBLEM_TYPES: [ProblemType; 20] = [
    ProblemType::TokenExpired,
    ProblemType::TokenSignature,
    ProblemType::TokenReplayed,
    ProblemType::LineUnknown,
    ProblemType::SerialOutOfRange,
    ProblemType::QuotaExhausted,
    ProblemType::KeyMismatch,
    ProblemType::CsrSignature,
    ProblemType::KeyAlgorithm,
    ProblemType::DuplicateKey,
    ProblemType::SerialTaken,
    ProblemType::Revoked,
    ProblemType::RateLimited,
    ProblemType::Malformed,
    ProblemType::TooLarge,
    ProblemType::UnknownDevice,
    ProblemType::AckMismatch,
    ProblemType::RequestTimeout,
    ProblemType::Internal,
    ProblemType::Unavailable,
];

impl ProblemType {
    /// The short name, e.g. `token-expired`.
    pub fn name(&self) -> &str {
        match self {
            ProblemType::TokenExpired => "token-expired",
            ProblemType::TokenSignature => "token-signature",
            ProblemType::TokenReplayed => "token-replayed",
            ProblemType::LineUnknown => "line-unknown",
            ProblemType::SerialOutOfRange => "serial-out-of-range",
            ProblemType::QuotaExhausted => "quota-exhausted",
            ProblemType::KeyMismatch => "key-mismatch",
            ProblemType::CsrSignature => "csr-signature",
            ProblemType::KeyAlgorithm => "key-algorithm",
            ProblemType::DuplicateKey => "duplicate-key",
            ProblemType::SerialTaken => "serial-taken",
            ProblemType::Revoked => "revoked",
            ProblemType::RateLimited => "rate-limited",
            ProblemType::Malformed => "malformed",
            ProblemType::TooLarge => "too-large",
            ProblemType::UnknownDevice => "unknown-device",
            ProblemType::AckMismatch => "ack-mismatch",
            ProblemType::RequestTimeout => "request-timeout",
            ProblemType::Internal => "internal",
            ProblemType::Unavailable => "unavailable",
            ProblemType::Unknown(s) => s,
        }
    }

    /// Parses a short name; unknown names become [`ProblemType::Unknown`].
    pub fn from_name(name: &str) -> Self {
        ALL_PROBLEM_TYPES
            .iter()
            .find(|p| p.name() == name)
            .cloned()
            .unwrap_or_else(|| ProblemType::Unknown(name.to_string()))
    }

    /// The full type URI, e.g. `urn:imprint:problem:token-expired`.
    pub fn uri(&self) -> String {
        format!("{PROBLEM_URI_PREFIX}{}", self.name())
    }

    /// A one-line human title.
    pub fn title(&self) -> &'static str {
        match self {
            ProblemType::TokenExpired => "factory token expired or not yet valid",
            ProblemType::TokenSignature => "factory token signature invalid",
            ProblemType::TokenReplayed => "factory token already used",
            ProblemType::LineUnknown => "line unknown or disabled",
            ProblemType::SerialOutOfRange => "serial outside the line's range",
            ProblemType::QuotaExhausted => "line quota exhausted",
            ProblemType::KeyMismatch => "token does not confirm the CSR key",
            ProblemType::CsrSignature => "CSR signature invalid",
            ProblemType::KeyAlgorithm => "key or signature algorithm not allowed",
            ProblemType::DuplicateKey => "public key already bound to another serial",
            ProblemType::SerialTaken => "serial already bound to another key",
            ProblemType::Revoked => "device revoked",
            ProblemType::RateLimited => "too many requests",
            ProblemType::Malformed => "malformed message",
            ProblemType::TooLarge => "message too large",
            ProblemType::UnknownDevice => "not an enrolled device",
            ProblemType::AckMismatch => "acknowledgement does not match the delivered secret",
            ProblemType::RequestTimeout => "request not received in time",
            ProblemType::Internal => "internal error",
            ProblemType::Unavailable => "service unavailable",
            ProblemType::Unknown(_) => "unknown problem",
        }
    }

    /// The HTTP status code.
    pub fn http_status(&self) -> u16 {
        match self {
            ProblemType::TokenExpired | ProblemType::TokenSignature => 401,
            ProblemType::LineUnknown
            | ProblemType::SerialOutOfRange
            | ProblemType::QuotaExhausted
            | ProblemType::Revoked
            | ProblemType::UnknownDevice => 403,
            ProblemType::TokenReplayed
            | ProblemType::DuplicateKey
            | ProblemType::SerialTaken
            | ProblemType::AckMismatch => 409,
            ProblemType::KeyMismatch
            | ProblemType::CsrSignature
            | ProblemType::KeyAlgorithm
            | ProblemType::Malformed => 400,
            ProblemType::RequestTimeout => 408,
            ProblemType::TooLarge => 413,
            ProblemType::RateLimited => 429,
            ProblemType::Unavailable => 503,
            ProblemType::Internal | ProblemType::Unknown(_) => 500,
        }
    }

    /// The CoAP response code as (class, detail): 4.01 is `(4, 1)`. 4.09 is RFC 8132's Conflict,
    /// 4.29 RFC 8516's Too Many Requests.
    pub fn coap_code(&self) -> (u8, u8) {
        match self.http_status() {
            400 => (4, 0),
            401 => (4, 1),
            403 => (4, 3),
            408 => (4, 8),
            409 => (4, 9),
            413 => (4, 13),
            429 => (4, 29),
            503 => (5, 3),
            _ => (5, 0),
        }
    }

    /// Whether a client may retry the same request later and expect a different answer.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProblemType::RateLimited
                | ProblemType::Internal
                | ProblemType::RequestTimeout
                | ProblemType::Unavailable
        )
    }
}

impl std::fmt::Display for ProblemType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A problem with its type and a human-readable detail (never internal state).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {detail}")]
pub struct Problem {
    /// The stable type.
    pub kind: ProblemType,
    /// What exactly went wrong, naming the field or rule at fault.
    pub detail: String,
}

/// RFC 9457 JSON body.
#[derive(Debug, Serialize, Deserialize)]
struct ProblemJson {
    #[serde(rename = "type")]
    kind: String,
    title: String,
    status: u16,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    detail: String,
}

impl Problem {
    /// A problem of `kind` with `detail`.
    pub fn new(kind: ProblemType, detail: impl Into<String>) -> Self {
        Problem {
            kind,
            detail: detail.into(),
        }
    }

    /// Shorthand for a malformed-message problem.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Problem::new(ProblemType::Malformed, detail)
    }

    /// The internal error as shown to clients: the detail stays on the server.
    pub fn internal() -> Self {
        Problem::new(ProblemType::Internal, "")
    }

    /// RFC 9457 `application/problem+json` body.
    pub fn to_json(&self) -> Vec<u8> {
        self.to_json_with_status(self.kind.http_status())
    }

    /// The RFC 9457 body of a response whose HTTP status is not the type's own (405 and 415
    /// carry a `malformed` problem): RFC 9457 section 3.1.4 says `status` must be the one the
    /// server sent.
    pub fn to_json_with_status(&self, status: u16) -> Vec<u8> {
        let body = ProblemJson {
            kind: self.kind.uri(),
            title: self.kind.title().to_string(),
            status,
            detail: self.detail.clone(),
        };
        serde_json::to_vec(&body).unwrap_or_default()
    }

    /// Parses an RFC 9457 body written by [`Problem::to_json`].
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let body: ProblemJson = serde_json::from_slice(bytes).ok()?;
        let name = body.kind.strip_prefix(PROBLEM_URI_PREFIX)?;
        Some(Problem::new(ProblemType::from_name(name), body.detail))
    }

    /// RFC 9290 concise problem details: `{-1: title, -2: detail, "urn:imprint:problem": type}`.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut map = vec![(
            Value::Integer((-1).into()),
            Value::Text(self.kind.title().to_string()),
        )];
        if !self.detail.is_empty() {
            map.push((
                Value::Integer((-2).into()),
                Value::Text(self.detail.clone()),
            ));
        }
        map.push((
            Value::Text(PROBLEM_TYPE_KEY.to_string()),
            Value::Text(self.kind.uri()),
        ));
        crate::cbor::to_vec(&Value::Map(map))
    }

    /// Parses concise problem details written by [`Problem::to_cbor`].
    pub fn from_cbor(bytes: &[u8]) -> Option<Self> {
        let Value::Map(map) = crate::cbor::from_slice(bytes).ok()? else {
            return None;
        };
        let mut kind = None;
        let mut detail = String::new();
        for (k, v) in map {
            match (k, v) {
                (Value::Text(k), Value::Text(v)) if k == PROBLEM_TYPE_KEY => {
                    kind = v
                        .strip_prefix(PROBLEM_URI_PREFIX)
                        .map(ProblemType::from_name);
                }
                (Value::Integer(i), Value::Text(v)) if i128::from(i) == -2 => detail = v,
                _ => {}
            }
        }
        Some(Problem::new(kind?, detail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_round_trips_through_json_and_cbor() {
        for kind in ALL_PROBLEM_TYPES {
            let p = Problem::new(kind.clone(), "because");
            assert_eq!(Problem::from_json(&p.to_json()), Some(p.clone()));
            assert_eq!(Problem::from_cbor(&p.to_cbor()), Some(p.clone()));
            assert_eq!(ProblemType::from_name(kind.name()), kind);
            let (class, _) = kind.coap_code();
            assert_eq!(u16::from(class), kind.http_status() / 100);
        }
        assert_eq!(
            ProblemType::from_name("from-the-future"),
            ProblemType::Unknown("from-the-future".into())
        );
    }
}
