//! The issuer: the only code that touches the CA private key, behind one entry point.

use protocol_spec::profile::{CertProfile, IssuedCertificate};
use protocol_spec::{DeviceSerial, KeyPair};
use ring::rand::SystemRandom;

use crate::ra::VerifiedEnrollment;

/// Why issuance failed. Always an internal error to the client.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// Signing or building failed, or the pre-issuance lint refused the result.
    #[error("issuance failed for serial {serial}: {reason}")]
    Failed {
        /// The serial.
        serial: u64,
        /// What failed.
        reason: String,
    },
}

/// Holds the CA key and the certificate profile.
pub struct Issuer {
    key: KeyPair,
    profile: CertProfile,
    rng: SystemRandom,
    verify_signatures: bool,
}

impl std::fmt::Debug for Issuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issuer")
            .field("ca_key_id", &hex::encode(self.profile.ca_key_id()))
            .finish_non_exhaustive()
    }
}

impl Issuer {
    /// An issuer for the CA certificate `ca_der` and its key.
    pub fn new(key: KeyPair, ca_der: &[u8]) -> Result<Self, String> {
        let profile = CertProfile::from_ca_der(ca_der).map_err(|e| e.to_string())?;
        if profile.ca_public_key().raw != key.public_key_raw() {
            return Err("the CA key does not belong to the CA certificate".into());
        }
        Ok(Issuer {
            key,
            profile,
            rng: SystemRandom::new(),
            verify_signatures: true,
        })
    }

    /// Whether the lint also verifies the CA's own signature (default: yes).
    pub fn with_signature_check(mut self, on: bool) -> Self {
        self.verify_signatures = on;
        self
    }

    /// The profile (CA certificate, key id) for the front ends.
    pub fn profile(&self) -> &CertProfile {
        &self.profile
    }

    /// Issues the certificate for a verified enrollment and lints it (SPEC.md section 5): a
    /// certificate that fails the lint is never returned.
    pub fn issue(&self, v: &VerifiedEnrollment) -> Result<IssuedCertificate, IssueError> {
        let serial = v.serial();
        let fail = |reason: String| IssueError::Failed {
            serial: serial.get(),
            reason,
        };
        let issued = self
            .profile
            .issue(serial, v.spki(), &self.key, &self.rng)
            .map_err(|e| fail(e.to_string()))?;
        self.lint(&issued.der, serial, v.spki()).map_err(fail)?;
        Ok(issued)
    }

    fn lint(&self, der: &[u8], serial: DeviceSerial, spki: &[u8]) -> Result<(), String> {
        self.profile
            .lint(der, serial, spki)
            .map_err(|e| e.to_string())
    }
}
