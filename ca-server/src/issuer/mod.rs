//! The issuer: the only code that touches the CA private key, behind one entry point.
//!
//! The key is a file loaded into memory or an object in a PKCS#11 token ([`CaKey`]); every
//! signature the CA key makes goes through here: device certificates ([`Issuer::issue`]), the
//! CRL ([`Issuer::sign_crl`]) and the HTTPS server certificate made at init
//! ([`Issuer::server_certificate`]).

pub mod key;
pub mod pkcs11;

use protocol_spec::KeyPair;
use protocol_spec::profile::{CertProfile, IssuedCertificate};
use protocol_spec::{CertSerial, DeviceSerial};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyUsagePurpose, SanType};
use ring::rand::SystemRandom;

pub use key::{CaKey, SignError};
pub use pkcs11::{BdkToken, BdkTokenError, Pkcs11Uri, SessionLimits, TokenKey};

use crate::config::{CaDir, Config};
use crate::ra::VerifiedEnrollment;
use crate::records::RevokedCert;
use crate::secrets::SecretKeys;

/// Why issuance (or a CRL) failed.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// Signing or building failed, or the pre-issuance lint refused the result: an internal
    /// error to the client.
    #[error("issuance failed for serial {serial}: {reason}")]
    Failed {
        /// The serial (0 for a CRL).
        serial: u64,
        /// What failed.
        reason: String,
    },
    /// The CA key's token does not answer: `unavailable` to the client, who may retry.
    #[error("{0}")]
    Unavailable(String),
}

/// Holds the CA key and the certificate profile.
pub struct Issuer {
    key: CaKey,
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
    pub fn new(key: CaKey, ca_der: &[u8]) -> Result<Self, String> {
        let profile = CertProfile::from_ca_der(ca_der).map_err(|e| e.to_string())?;
        if profile.ca_public_key().raw != key.public_key_raw()
            || profile.ca_public_key().algorithm != key.algorithm()
        {
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
    /// `generation`: how many times the serial was reset, carried in the certificate serial
    /// (SPEC.md 5).
    pub fn issue(
        &self,
        v: &VerifiedEnrollment,
        generation: u32,
    ) -> Result<IssuedCertificate, IssueError> {
        let serial = CertSerial::new(v.serial(), generation);
        let fail = |reason: String| IssueError::Failed {
            serial: serial.device.get(),
            reason,
        };
        let signer = self.key.signer(&self.rng);
        let issued =
            self.profile
                .issue_with(serial, v.spki(), &signer)
                .map_err(|e| match signer.take_error() {
                    Some(SignError::Unavailable(why)) => IssueError::Unavailable(why),
                    Some(SignError::Failed(why)) => fail(why),
                    None => fail(e.to_string()),
                })?;
        self.check_issued(&issued.der, serial, v.spki())
            .map_err(fail)?;
        Ok(issued)
    }

    /// Signs a CRL listing `revoked` with the CA key (RFC 5280 section 5): each certificate by
    /// its serial (device serial and generation) and revocation time, reason superseded when
    /// a reset replaced it; thisUpdate `now`, nextUpdate `now + validity`, the CRL number given,
    /// the authority key identifier of the CA.
    pub fn sign_crl(
        &self,
        revoked: &[RevokedCert],
        now: u64,
        validity: u64,
        number: u64,
    ) -> Result<Vec<u8>, IssueError> {
        let fail = |reason: String| IssueError::Failed { serial: 0, reason };
        let time = |t: u64| {
            i64::try_from(t)
                .ok()
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .ok_or_else(|| fail(format!("time {t} out of range")))
        };
        let revoked_certs = revoked
            .iter()
            .filter_map(|c| DeviceSerial::new(c.serial).map(|s| (c, s)))
            .map(|(c, serial)| {
                Ok(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(
                        &CertSerial::new(serial, c.generation).magnitude(),
                    ),
                    revocation_time: time(c.at)?,
                    reason_code: c.superseded.then_some(rcgen::RevocationReason::Superseded),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, IssueError>>()?;
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
        let signer = self.key.signer(&self.rng);
        let issuer =
            rcgen::Issuer::from_ca_cert_der(&self.profile.ca_der().to_vec().into(), &signer)
                .map_err(|e| fail(format!("CA certificate: {e}")))?;
        let crl = params
            .signed_by(&issuer)
            .map_err(|e| signing_failure(signer.take_error(), "CRL", e))?;
        Ok(crl.der().to_vec())
    }

    /// An HTTPS server certificate issued by the CA for the key `key`, so that devices verify
    /// the server with the one CA certificate they pin; returns the certificate's PEM. `init`
    /// makes that key of the CA's algorithm (a file, or sealed by the CA's token): with an
    /// Ed25519 CA, every TLS handshake a device makes signs and verifies Ed25519 only (cheaper
    /// than P-256 on both sides; TLS 1.3 clients such as rustls, OpenSSL 1.1.1+ (curl) and Go
    /// support it). `names` are extra DNS names or IP addresses besides localhost, 127.0.0.1
    /// and ::1.
    pub fn server_certificate(
        &self,
        key: &KeyPair,
        names: &[String],
        now: u64,
    ) -> Result<String, IssueError> {
        let fail = |reason: String| IssueError::Failed { serial: 0, reason };
        let dns = |n: &str| {
            n.try_into()
                .map(SanType::DnsName)
                .map_err(|e: rcgen::Error| fail(format!("--tls-name {n:?}: {e}")))
        };
        let mut sans = vec![
            dns("localhost")?,
            SanType::IpAddress([127, 0, 0, 1].into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        for n in names {
            match n.parse::<std::net::IpAddr>() {
                Ok(ip) => sans.push(SanType::IpAddress(ip)),
                Err(_) => sans.push(dns(n)?),
            }
        }
        let mut p = CertificateParams::default();
        p.distinguished_name
            .push(DnType::CommonName, "Imprint CA server");
        p.subject_alt_names = sans;
        let start = time::OffsetDateTime::from_unix_timestamp(i64::try_from(now).unwrap_or(0))
            .map_err(|e| fail(e.to_string()))?;
        p.not_before = start;
        p.not_after = start + time::Duration::days(3650);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.use_authority_key_identifier_extension = true;
        let signer = self.key.signer(&self.rng);
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.profile.ca_der().into(), &signer)
            .map_err(|e| fail(e.to_string()))?;
        let cert = p
            .signed_by(&key.rcgen_signer(&self.rng), &issuer)
            .map_err(|e| signing_failure(signer.take_error(), "server certificate", e))?;
        Ok(cert.pem())
    }

    /// The pre-issuance lint [`Issuer::issue`] runs on what it just signed: every field of the
    /// profile and, when [`Issuer::verifies_own_signatures`], the signature under the CA key.
    fn check_issued(&self, der: &[u8], serial: CertSerial, spki: &[u8]) -> Result<(), String> {
        self.profile
            .lint_with(der, serial, spki, self.verify_signatures)
            .map_err(|e| e.to_string())
    }
}

/// The CA key `config` names: the token in `[issuer] pkcs11`, or the file `ca.key.pem` in the
/// CA folder. A URI in config.toml with a `pin-value` is refused: a PIN is never kept there.
pub fn load_ca_key(dir: &CaDir, config: &Config) -> Result<CaKey, String> {
    let Some(text) = &config.issuer.pkcs11 else {
        let key_pem = std::fs::read_to_string(dir.ca_key()).map_err(|e| {
            format!(
                "{}: {e} (run `ca-server init --dir {}` first)",
                dir.ca_key().display(),
                dir.root().display()
            )
        })?;
        return KeyPair::from_pem(&key_pem, &SystemRandom::new())
            .map(CaKey::File)
            .map_err(|e| format!("{}: {e}", dir.ca_key().display()));
    };
    let at = || format!("{}: [issuer] pkcs11", dir.config().display());
    let uri = Pkcs11Uri::parse(text).map_err(|e| format!("{}: {e}", at()))?;
    if let pkcs11::PinSource::Value(_) = uri.pin {
        return Err(format!(
            "{}: the URI holds a pin-value; a PIN is never kept in config.toml: use pin-source=file:PATH, or set {}",
            at(),
            pkcs11::PIN_ENV
        ));
    }
    TokenKey::open(&uri, &session_limits(dir, config)?).map(CaKey::Token)
}

/// How many sessions the CA opens with its token (`[issuer] pkcs11_sessions`).
pub fn session_limits(dir: &CaDir, config: &Config) -> Result<SessionLimits, String> {
    match config.issuer.pkcs11_sessions {
        Some(0) => Err(format!(
            "{}: [issuer] pkcs11_sessions must be at least 1",
            dir.config().display()
        )),
        n => Ok(SessionLimits::sessions(n)),
    }
}

/// The keys that seal secrets at rest: from `kek.sealed`, unsealed by the CA's token, when the
/// folder has it; else from `kek.bin`. When config.toml names a PKCS#11 token, that token keeps
/// the DUKPT BDKs added from now on (opened at its first use).
pub fn load_secret_keys(dir: &CaDir, config: &Config) -> Result<SecretKeys, String> {
    let keys = load_kek_keys(dir, config)?;
    let Some(text) = &config.issuer.pkcs11 else {
        return Ok(keys);
    };
    let uri = Pkcs11Uri::parse(text)
        .map_err(|e| format!("{}: [issuer] pkcs11: {e}", dir.config().display()))?;
    Ok(keys.with_bdk_token(BdkToken::new(&uri, &session_limits(dir, config)?)))
}

fn load_kek_keys(dir: &CaDir, config: &Config) -> Result<SecretKeys, String> {
    let sealed_path = dir.kek_sealed();
    let sealed = match std::fs::read(&sealed_path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return SecretKeys::load(&dir.kek());
        }
        Err(e) => return Err(format!("{}: {e}", sealed_path.display())),
    };
    let at = |e: String| format!("{}: {e}", sealed_path.display());
    let text = config.issuer.pkcs11.as_ref().ok_or_else(|| {
        at("sealed by a PKCS#11 token, but config.toml names none ([issuer] pkcs11)".into())
    })?;
    let uri = Pkcs11Uri::parse(text)
        .map_err(|e| format!("{}: [issuer] pkcs11: {e}", dir.config().display()))?;
    let kek = pkcs11::unseal_kek(&uri, &sealed, &session_limits(dir, config)?).map_err(at)?;
    SecretKeys::new(&kek).map_err(at)
}

/// What a failed rcgen signing means: the signer's own error when it kept one (a token that
/// does not answer is `Unavailable`), rcgen's otherwise.
fn signing_failure(kept: Option<SignError>, what: &str, e: rcgen::Error) -> IssueError {
    match kept {
        Some(SignError::Unavailable(why)) => IssueError::Unavailable(why),
        Some(SignError::Failed(why)) => IssueError::Failed {
            serial: 0,
            reason: format!("{what}: {why}"),
        },
        None => IssueError::Failed {
            serial: 0,
            reason: format!("{what}: {e}"),
        },
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use protocol_spec::profile::new_ca_certificate;
    use protocol_spec::{KeyAlgorithm, KeyPair};

    /// A certificate as a faulty signer would leave it: issued, then one bit of its signature
    /// flipped (the signature is the last bytes of the DER).
    fn with_bad_signature(issuer: &Issuer, serial: DeviceSerial, spki: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        let mut der = issuer
            .profile
            .issue_with(serial, spki, &issuer.key.signer(&rng))
            .unwrap()
            .der;
        assert!(issuer.check_issued(&der, serial.into(), spki).is_ok());
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

            let on = Issuer::new(CaKey::File(ca_key), &ca_der).unwrap();
            assert!(on.verifies_own_signatures(), "on by default");
            let bad = with_bad_signature(&on, serial, &spki);
            let refused = on.check_issued(&bad, serial.into(), &spki).unwrap_err();
            assert!(refused.contains("signature"), "{alg}: {refused}");

            let off = on.with_signature_check(false);
            assert!(!off.verifies_own_signatures());
            // Off, the lint still checks every field but not the signature: the same bytes pass.
            off.check_issued(&bad, serial.into(), &spki).unwrap();
            // ... and a field the profile does not allow is still refused.
            let other = DeviceSerial::new(43).unwrap();
            assert!(off.check_issued(&bad, other.into(), &spki).is_err());
            assert!(
                off.check_issued(&bad, CertSerial::new(serial, 1), &spki)
                    .is_err()
            );
        }
    }
}
