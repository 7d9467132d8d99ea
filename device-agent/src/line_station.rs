//! The line station's side: its key and the tokens it mints.

use protocol_spec::csr::ParsedCsr;
use protocol_spec::token::{self, FactoryClaims};
use protocol_spec::{DeviceSerial, KeyPair, PublicKey, spki};
use ring::rand::SecureRandom;

use crate::AgentError;

/// Default token lifetime: ten minutes.
pub const DEFAULT_TTL: u64 = 600;

/// Mints a token for (`serial`, SPKI), valid from `now` for `ttl` seconds, with a random cti.
pub fn attest(
    line_key: &KeyPair,
    line: &str,
    serial: DeviceSerial,
    device_spki: &[u8],
    now: u64,
    ttl: u64,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, AgentError> {
    let mut cti = vec![0u8; 16];
    rng.fill(&mut cti)
        .map_err(|_| AgentError::Invalid("random generator failed".into()))?;
    let claims = FactoryClaims {
        line: line.to_string(),
        serial,
        key_hash: spki::sha256(device_spki),
        issued_at: now,
        expires_at: now.saturating_add(ttl),
        token_id: cti,
    };
    token::mint(&claims, line_key, rng).map_err(|e| AgentError::Invalid(format!("signing: {e}")))
}

/// The device SPKI from a CSR (PEM or DER), after checking its proof of possession: a line
/// station vouches only for a key the device demonstrably holds.
pub fn spki_from_csr(bytes: &[u8]) -> Result<Vec<u8>, AgentError> {
    let der = csr_der(bytes)?;
    let csr = ParsedCsr::parse(&der)
        .and_then(ParsedCsr::verify)
        .map_err(|p| AgentError::Invalid(format!("CSR: {}", p.detail)))?;
    Ok(csr.spki_der().to_vec())
}

/// A CSR's DER from PEM (`CERTIFICATE REQUEST`) or DER bytes (returned as they are).
pub fn csr_der(bytes: &[u8]) -> Result<Vec<u8>, AgentError> {
    Ok(
        match std::str::from_utf8(bytes)
            .ok()
            .and_then(|t| pem::parse(t).ok())
        {
            Some(p) if p.tag() == "CERTIFICATE REQUEST" || p.tag() == "NEW CERTIFICATE REQUEST" => {
                p.into_contents()
            }
            Some(p) => {
                return Err(AgentError::Invalid(format!(
                    "CSR: PEM label is {:?}, not CERTIFICATE REQUEST",
                    p.tag()
                )));
            }
            None => bytes.to_vec(),
        },
    )
}

/// The device SPKI from a public key PEM.
pub fn spki_from_public_key_pem(text: &str) -> Result<Vec<u8>, AgentError> {
    PublicKey::from_pem(text)
        .map(|k| k.spki_der())
        .map_err(|e| AgentError::Invalid(format!("public key: {e}")))
}
