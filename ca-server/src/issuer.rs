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

    /// Whether the lint also verifies the CA's own signature (default: yes; `[issuer]
    /// verify_own_signatures` in config.toml).
    pub fn with_signature_check(mut self, on: bool) -> Self {
        self.verify_signatures = on;
        self
    }

    /// Whether the lint verifies the CA's own signature on every certificate it issues.
    pub fn verifies_own_signatures(&self) -> bool {
        self.verify_signatures
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
        self.check_issued(&issued.der, serial, v.spki())
            .map_err(fail)?;
        Ok(issued)
    }

    /// Signs a CRL listing `revoked` (serial, revocation time) with the CA key (RFC 5280
    /// section 5): thisUpdate `now`, nextUpdate `now + validity`, the CRL number given, the
    /// authority key identifier of the CA.
    pub fn sign_crl(
        &self,
        revoked: &[(u64, u64)],
        now: u64,
        validity: u64,
        number: u64,
    ) -> Result<Vec<u8>, String> {
        let time = |t: u64| {
            i64::try_from(t)
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .ok_or_else(|| format!("time {t} out of range"))
        };
        let revoked_certs = revoked
            .iter()
            .map(|(serial, at)| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(&serial.to_be_bytes()),
                    revocation_time: time(*at)?,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: time(now)?,
            next_update: time(now.saturating_add(validity.max(1)))?,
            crl_number: rcgen::SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::PreSpecified(
                self.profile.ca_key_id().to_vec(),
            ),
        };
        let issuer = rcgen::Issuer::from_ca_cert_der(
            &self.profile.ca_der().to_vec().into(),
            self.key.rcgen_signer(&self.rng),
        )
        .map_err(|e| format!("CA certificate: {e}"))?;
        let crl = params
            .signed_by(&issuer)
            .map_err(|e| format!("CRL signing: {e}"))?;
        Ok(crl.der().to_vec())
    }

    /// The pre-issuance lint [`Issuer::issue`] runs on what it just signed: every field of the
    /// profile and, when [`Issuer::verifies_own_signatures`], the signature under the CA key.
    fn check_issued(&self, der: &[u8], serial: DeviceSerial, spki: &[u8]) -> Result<(), String> {
        self.profile
            .lint_with(der, serial, spki, self.verify_signatures)
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use protocol_spec::KeyAlgorithm;
    use protocol_spec::profile::new_ca_certificate;

    /// A certificate as a faulty signer would leave it: issued, then one bit of its signature
    /// flipped (the signature is the last bytes of the DER).
    fn with_bad_signature(issuer: &Issuer, serial: DeviceSerial, spki: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        let mut der = issuer
            .profile
            .issue(serial, spki, &issuer.key, &rng)
            .unwrap()
            .der;
        assert!(issuer.check_issued(&der, serial, spki).is_ok());
        let last = der.len() - 1;
        der[last] ^= 0x01;
        der
    }

    #[test]
    fn the_signature_check_is_applied_only_when_on() {
        for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
            let rng = SystemRandom::new();
            let ca_key = KeyPair::generate(alg, &rng).unwrap();
            let ca_der = new_ca_certificate("t", &ca_key, 0, &rng).unwrap();
            let device = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
            let spki = device.spki_der();
            let serial = DeviceSerial::new(42).unwrap();

            let on = Issuer::new(ca_key, &ca_der).unwrap();
            assert!(on.verifies_own_signatures(), "on by default");
            let bad = with_bad_signature(&on, serial, &spki);
            let refused = on.check_issued(&bad, serial, &spki).unwrap_err();
            assert!(refused.contains("signature"), "{alg}: {refused}");

            let off = on.with_signature_check(false);
            assert!(!off.verifies_own_signatures());
            // Off, the lint still checks every field but not the signature: the same bytes pass.
            off.check_issued(&bad, serial, &spki).unwrap();
            // ... and a field the profile does not allow is still refused.
            let other = DeviceSerial::new(43).unwrap();
            assert!(off.check_issued(&bad, other, &spki).is_err());
        }
    }
}
