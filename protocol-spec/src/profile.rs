//! The deterministic device-certificate profile (SPEC.md section "Certificate profile"), shared
//! by the CA (issue) and the device (expand a compact response).
//!
//! Both sides build the to-be-signed certificate with the same rcgen parameters from the same
//! inputs (CA certificate, serial, device SPKI), so the bytes are identical; the CA signs them,
//! the device replays the CA's signature and checks it under the pinned CA key.

use std::cell::Cell;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::FromDer;

use crate::keys::{KeyAlgorithm, KeyPair, PublicKey};
use crate::{CertSerial, spki};

/// notAfter of every device certificate: 99991231235959Z, "no well-defined expiration date"
/// (RFC 5280 section 4.1.2.5).
pub const NOT_AFTER_UNIX: i64 = 253_402_300_799;

const OID_SERIAL_NUMBER: [u64; 4] = [2, 5, 4, 5];

/// Errors from building, expanding or linting a certificate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The CA certificate is not one this profile can issue under.
    #[error("CA certificate unusable: {0}")]
    BadCaCertificate(String),
    /// rcgen refused the parameters.
    #[error("certificate construction failed: {0}")]
    Build(#[from] rcgen::Error),
    /// The CA's signature does not verify over the rebuilt certificate.
    #[error(
        "the CA signature does not verify over the rebuilt certificate (wrong key, serial or CA)"
    )]
    SignatureInvalid,
    /// The compact response names a different CA key.
    #[error("the response was issued by CA key {got}, not the pinned CA key {want}")]
    WrongCa {
        /// Key id in the response.
        got: String,
        /// Key id of the pinned CA.
        want: String,
    },
    /// A certificate does not match the profile.
    #[error("profile lint: {0}")]
    Lint(String),
}

/// A CA certificate, parsed once, with what the profile takes from it.
#[derive(Debug, Clone)]
pub struct CertProfile {
    ca_der: Vec<u8>,
    ca_subject_der: Vec<u8>,
    ca_key_id: Vec<u8>,
    ca_public_key: PublicKey,
    not_before: OffsetDateTime,
}

/// A certificate and its signature value, as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCertificate {
    /// The full certificate, DER.
    pub der: Vec<u8>,
    /// The CA's signature value (what a compact response carries).
    pub signature: Vec<u8>,
}

impl CertProfile {
    /// Reads the CA certificate (DER).
    pub fn from_ca_der(ca_der: &[u8]) -> Result<Self, ProfileError> {
        let bad = |m: &str| ProfileError::BadCaCertificate(m.to_string());
        let (rest, ca) = X509Certificate::from_der(ca_der).map_err(|e| bad(&e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes"));
        }
        let ca_public_key =
            spki::decode(ca.tbs_certificate.subject_pki.raw).map_err(|e| bad(&e.to_string()))?;
        let ca_key_id = ca
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .ok_or_else(|| bad("no subjectKeyIdentifier"))?;
        let not_before = OffsetDateTime::from_unix_timestamp(ca.validity().not_before.timestamp())
            .map_err(|e| bad(&e.to_string()))?;
        Ok(CertProfile {
            ca_der: ca_der.to_vec(),
            ca_subject_der: ca.tbs_certificate.subject.as_raw().to_vec(),
            ca_key_id,
            ca_public_key,
            not_before,
        })
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_der
    }

    /// The CA's subjectKeyIdentifier: the key id a compact response names.
    pub fn ca_key_id(&self) -> &[u8] {
        &self.ca_key_id
    }

    /// The CA's public key.
    pub fn ca_public_key(&self) -> &PublicKey {
        &self.ca_public_key
    }

    /// Issues the device certificate: builds the to-be-signed bytes and signs them with the CA key.
    pub fn issue(
        &self,
        serial: impl Into<CertSerial>,
        device_spki: &[u8],
        ca_key: &KeyPair,
        rng: &dyn SecureRandom,
    ) -> Result<IssuedCertificate, ProfileError> {
        self.issue_with(serial, device_spki, ca_key.rcgen_signer(rng))
    }

    /// [`CertProfile::issue`] with any signer of the CA key: one in a file, or one whose private
    /// half never leaves a token (a PKCS#11 HSM). rcgen hands `signer` the to-be-signed bytes
    /// and places the signature it returns; the signer's public key must be the CA's.
    pub fn issue_with<S: rcgen::SigningKey>(
        &self,
        serial: impl Into<CertSerial>,
        device_spki: &[u8],
        signer: S,
    ) -> Result<IssuedCertificate, ProfileError> {
        if signer.der_bytes() != self.ca_public_key.raw.as_slice()
            || signer.algorithm() != self.ca_public_key.algorithm.rcgen()
        {
            return Err(ProfileError::BadCaCertificate(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        let der = self.build(serial.into(), device_spki, signer)?;
        let signature = signature_value(&der)?;
        Ok(IssuedCertificate { der, signature })
    }

    /// Rebuilds the certificate from a compact response: the same to-be-signed bytes as the CA
    /// built, with `signature` attached, after checking the signature under the pinned CA key.
    /// `serial` is the device serial and the generation the response names (0 when it names
    /// none).
    pub fn expand(
        &self,
        serial: impl Into<CertSerial>,
        device_spki: &[u8],
        ca_key_id: &[u8],
        signature: &[u8],
    ) -> Result<Vec<u8>, ProfileError> {
        if ca_key_id != self.ca_key_id.as_slice() {
            return Err(ProfileError::WrongCa {
                got: hex::encode(ca_key_id),
                want: hex::encode(&self.ca_key_id),
            });
        }
        let replay = ReplaySigner {
            ca: &self.ca_public_key,
            signature,
            verified: Cell::new(false),
        };
        let der = match self.build(serial.into(), device_spki, &replay) {
            Ok(der) => der,
            Err(_) if !replay.verified.get() => return Err(ProfileError::SignatureInvalid),
            Err(e) => return Err(e),
        };
        if !replay.verified.get() {
            return Err(ProfileError::SignatureInvalid);
        }
        Ok(der)
    }

    fn build<S: rcgen::SigningKey>(
        &self,
        serial: CertSerial,
        device_spki: &[u8],
        signer: S,
    ) -> Result<Vec<u8>, ProfileError> {
        let device_key = spki::decode(device_spki)
            .map_err(|e| ProfileError::Lint(format!("device key: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&self.ca_der.as_slice().into(), signer)?;
        let params = self.device_params(serial, device_key.algorithm)?;
        let subject = DeviceKeyData(device_key);
        Ok(params.signed_by(&subject, &issuer)?.der().to_vec())
    }

    fn device_params(
        &self,
        cert_serial: CertSerial,
        device_alg: KeyAlgorithm,
    ) -> Result<CertificateParams, ProfileError> {
        let mut p = CertificateParams::default();
        p.serial_number = Some(SerialNumber::from_slice(&cert_serial.magnitude()));
        let serial = cert_serial.device;
        let mut dn = DistinguishedName::new();
        let printable = rcgen::string::PrintableString::try_from(serial.to_string())?;
        dn.push(
            DnType::CustomDnType(OID_SERIAL_NUMBER.to_vec()),
            DnValue::PrintableString(printable),
        );
        dn.push(DnType::CommonName, serial.to_string());
        p.distinguished_name = dn;
        p.not_before = self.not_before;
        p.not_after = not_after();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = match device_alg {
            KeyAlgorithm::Ed25519 => vec![KeyUsagePurpose::DigitalSignature],
            KeyAlgorithm::P256 => vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyAgreement,
            ],
        };
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        p.key_identifier_method = KeyIdMethod::Sha256;
        Ok(p)
    }

    /// Pre-issuance lint: parses `der` back and checks every field against the profile for
    /// (`serial`, `device_spki`), and the signature under the CA key.
    pub fn lint(
        &self,
        der: &[u8],
        serial: impl Into<CertSerial>,
        device_spki: &[u8],
    ) -> Result<(), ProfileError> {
        self.lint_with(der, serial.into(), device_spki, true)
    }

    /// [`CertProfile::lint`], with the signature check optional: the CA's own fresh signature
    /// is checked to catch a faulty signer (a fault during signing can leak the key), at the
    /// cost of one verification per certificate.
    pub fn lint_with(
        &self,
        der: &[u8],
        cert_serial: CertSerial,
        device_spki: &[u8],
        check_signature: bool,
    ) -> Result<(), ProfileError> {
        let serial = cert_serial.device;
        let fail = |m: String| Err(ProfileError::Lint(m));
        let (rest, cert) =
            X509Certificate::from_der(der).map_err(|e| ProfileError::Lint(e.to_string()))?;
        if !rest.is_empty() {
            return fail("trailing bytes".into());
        }
        let tbs = &cert.tbs_certificate;
        if tbs.version.0 != 2 {
            return fail(format!("version {} is not v3", tbs.version.0 + 1));
        }
        let got_serial = tbs.raw_serial();
        let trimmed: Vec<u8> = got_serial.iter().copied().skip_while(|b| *b == 0).collect();
        if trimmed != cert_serial.magnitude()
            || got_serial.len() > 20
            || got_serial.first().is_some_and(|b| b & 0x80 != 0)
        {
            return fail(format!(
                "serial {} is not the certificate serial of {cert_serial}",
                hex::encode(got_serial)
            ));
        }
        if tbs.issuer.as_raw() != self.ca_subject_der.as_slice() {
            return fail("issuer is not the CA subject".into());
        }
        if tbs.validity.not_before.timestamp() != self.not_before.unix_timestamp()
            || tbs.validity.not_after.timestamp() != NOT_AFTER_UNIX
        {
            return fail("validity is not (CA notBefore, 99991231235959Z)".into());
        }
        let mut subject = tbs.subject.iter_attributes();
        let sn = subject.next().map(|a| {
            (
                a.attr_type().to_id_string(),
                a.as_str().ok().map(str::to_string),
            )
        });
        let cn = subject.next().map(|a| {
            (
                a.attr_type().to_id_string(),
                a.as_str().ok().map(str::to_string),
            )
        });
        let want = Some(serial.to_string());
        if sn != Some(("2.5.4.5".into(), want.clone()))
            || cn != Some(("2.5.4.3".into(), want))
            || subject.next().is_some()
        {
            return fail("subject is not serialNumber=S, CN=S".into());
        }
        if tbs.subject_pki.raw != device_spki {
            return fail("subjectPublicKeyInfo is not the device key".into());
        }
        let device_key =
            spki::decode(device_spki).map_err(|e| ProfileError::Lint(e.to_string()))?;
        let mut seen = Vec::new();
        for ext in tbs.extensions() {
            let oid = ext.oid.to_id_string();
            if seen.contains(&oid) {
                return fail(format!("extension {oid} appears twice"));
            }
            seen.push(oid.clone());
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    if !ext.critical || bc.ca || bc.path_len_constraint.is_some() {
                        return fail("basicConstraints must be critical CA:FALSE".into());
                    }
                }
                ParsedExtension::KeyUsage(ku) => {
                    let want_ka = device_key.algorithm == KeyAlgorithm::P256;
                    let other = ku.flags & !(0x01 | 0x10);
                    if !ext.critical
                        || !ku.digital_signature()
                        || ku.key_agreement() != want_ka
                        || other != 0
                    {
                        return fail(format!("keyUsage {ku} is not the profile's"));
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    if ext.critical
                        || !eku.client_auth
                        || eku.any
                        || eku.server_auth
                        || eku.code_signing
                        || eku.email_protection
                        || eku.time_stamping
                        || eku.ocsp_signing
                        || !eku.other.is_empty()
                    {
                        return fail("extKeyUsage must be clientAuth only, non-critical".into());
                    }
                }
                ParsedExtension::AuthorityKeyIdentifier(aki) => {
                    if ext.critical
                        || aki.key_identifier.as_ref().map(|k| k.0)
                            != Some(self.ca_key_id.as_slice())
                        || aki.authority_cert_issuer.is_some()
                        || aki.authority_cert_serial.is_some()
                    {
                        return fail("authorityKeyIdentifier must be the CA's key id only".into());
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(ski) => {
                    let want = &spki::sha256(device_spki)[..20];
                    if ext.critical || ski.0 != want {
                        return fail("subjectKeyIdentifier is not SHA-256(SPKI)[0..20]".into());
                    }
                }
                _ => return fail(format!("unexpected extension {oid}")),
            }
        }
        if seen.len() != 5 {
            return fail(format!("{} extensions, the profile has 5", seen.len()));
        }
        let sig_alg = cert.signature_algorithm.algorithm.to_id_string();
        let want_alg = match self.ca_public_key.algorithm {
            KeyAlgorithm::Ed25519 => "1.3.101.112",
            KeyAlgorithm::P256 => "1.2.840.10045.4.3.2",
        };
        if sig_alg != want_alg || tbs.signature.algorithm.to_id_string() != want_alg {
            return fail(format!(
                "signature algorithm {sig_alg} is not the CA's {want_alg}"
            ));
        }
        if check_signature
            && !self
                .ca_public_key
                .verify_x509(tbs.as_ref(), &cert.signature_value.data)
        {
            return fail("signature does not verify under the CA key".into());
        }
        Ok(())
    }
}

/// Makes a self-signed CA certificate for `key`: CN = `name`, notBefore = `not_before_unix`
/// (also every device certificate's notBefore), notAfter 99991231235959Z, pathLen 0.
pub fn new_ca_certificate(
    name: &str,
    key: &KeyPair,
    not_before_unix: i64,
    rng: &dyn SecureRandom,
) -> Result<Vec<u8>, ProfileError> {
    new_ca_certificate_with(name, &key.rcgen_signer(rng), not_before_unix)
}

/// [`new_ca_certificate`] signed by any signer of the CA key (a token's, say).
pub fn new_ca_certificate_with<S: rcgen::SigningKey>(
    name: &str,
    signer: &S,
    not_before_unix: i64,
) -> Result<Vec<u8>, ProfileError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    p.distinguished_name = dn;
    p.not_before = OffsetDateTime::from_unix_timestamp(not_before_unix)
        .map_err(|e| ProfileError::BadCaCertificate(e.to_string()))?;
    p.not_after = not_after();
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
    ];
    p.use_authority_key_identifier_extension = true;
    p.key_identifier_method = KeyIdMethod::Sha256;
    Ok(p.self_signed(signer)?.der().to_vec())
}

/// The signature value (BIT STRING contents) of a DER certificate.
pub fn signature_value(der: &[u8]) -> Result<Vec<u8>, ProfileError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| ProfileError::Lint(e.to_string()))?;
    Ok(cert.signature_value.data.to_vec())
}

/// The certificate serial of a DER device certificate (device serial and generation), or why
/// it has none.
pub fn cert_serial(der: &[u8]) -> Result<CertSerial, ProfileError> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| ProfileError::Lint(e.to_string()))?;
    let raw = cert.tbs_certificate.raw_serial();
    CertSerial::from_integer_octets(raw).ok_or_else(|| {
        ProfileError::Lint(format!(
            "serial {} is not a device certificate serial",
            hex::encode(raw)
        ))
    })
}

/// DER to PEM `CERTIFICATE`.
pub fn cert_pem(der: &[u8]) -> String {
    pem::encode(&pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// The first `CERTIFICATE` of a PEM document, as DER.
pub fn cert_from_pem(text: &str) -> Option<Vec<u8>> {
    pem::parse_many(text)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
}

fn not_after() -> OffsetDateTime {
    // 9999-12-31T23:59:59Z is within time's range; the fallback is unreachable.
    OffsetDateTime::from_unix_timestamp(NOT_AFTER_UNIX).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

struct DeviceKeyData(PublicKey);

impl rcgen::PublicKeyData for DeviceKeyData {
    fn der_bytes(&self) -> &[u8] {
        &self.0.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.0.algorithm.rcgen()
    }
}

/// "Signs" by handing back a signature received from the CA, after checking it over the bytes
/// rcgen asks to sign.
struct ReplaySigner<'a> {
    ca: &'a PublicKey,
    signature: &'a [u8],
    verified: Cell<bool>,
}

impl rcgen::PublicKeyData for &ReplaySigner<'_> {
    fn der_bytes(&self) -> &[u8] {
        &self.ca.raw
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        self.ca.algorithm.rcgen()
    }
}

impl rcgen::SigningKey for &ReplaySigner<'_> {
    fn sign(&self, tbs: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        if self.ca.verify_x509(tbs, self.signature) {
            self.verified.set(true);
            Ok(self.signature.to_vec())
        } else {
            Err(rcgen::Error::RingUnspecified)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DeviceSerial;
    use ring::rand::SystemRandom;

    #[test]
    fn issue_lint_expand_for_every_key_combination() {
        let rng = SystemRandom::new();
        for ca_alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
            let ca_key = KeyPair::generate(ca_alg, &rng).unwrap();
            let ca = new_ca_certificate("Test CA", &ca_key, 1_700_000_000, &rng).unwrap();
            let profile = CertProfile::from_ca_der(&ca).unwrap();
            for dev_alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
                let dev = KeyPair::generate(dev_alg, &rng).unwrap();
                let serial = DeviceSerial::new(0x80_0000_0001).unwrap();
                let spki = dev.spki_der();
                let issued = profile.issue(serial, &spki, &ca_key, &rng).unwrap();
                profile.lint(&issued.der, serial, &spki).unwrap();
                let rebuilt = profile
                    .expand(serial, &spki, profile.ca_key_id(), &issued.signature)
                    .unwrap();
                assert_eq!(rebuilt, issued.der);
                let other = DeviceSerial::new(2).unwrap();
                assert!(matches!(
                    profile.expand(other, &spki, profile.ca_key_id(), &issued.signature),
                    Err(ProfileError::SignatureInvalid)
                ));
                assert!(profile.lint(&issued.der, other, &spki).is_err());
                // The same serial and key under another generation: another certificate
                // serial, which the generation-0 signature does not sign.
                let next = CertSerial::new(serial, 1);
                assert!(matches!(
                    profile.expand(next, &spki, profile.ca_key_id(), &issued.signature),
                    Err(ProfileError::SignatureInvalid)
                ));
                assert!(profile.lint(&issued.der, next, &spki).is_err());
                let again = profile.issue(next, &spki, &ca_key, &rng).unwrap();
                profile.lint(&again.der, next, &spki).unwrap();
                let rebuilt = profile
                    .expand(next, &spki, profile.ca_key_id(), &again.signature)
                    .unwrap();
                assert_eq!(rebuilt, again.der);
            }
        }
    }
}
