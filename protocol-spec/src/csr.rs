//! PKCS#10 certification requests (RFC 2986): the device's proof of possession.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::prelude::FromDer;

use crate::keys::{KeyAlgorithm, PublicKey};
use crate::problem::{Problem, ProblemType};
use crate::spki;

/// Largest accepted CSR, in bytes (a real one is 150 to 300).
pub const MAX_CSR_LEN: usize = 2048;

const OID_ED25519: &str = "1.3.101.112";
const OID_ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";

/// A CSR that parsed and carries an allowed key, not yet signature-checked.
#[derive(Debug, Clone)]
pub struct ParsedCsr {
    spki_der: Vec<u8>,
    public_key: PublicKey,
    info: Vec<u8>,
    signature: Vec<u8>,
}

/// A CSR whose self-signature verified: the requester holds the private key.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    spki_der: Vec<u8>,
    public_key: PublicKey,
}

impl ParsedCsr {
    /// Parses DER; refuses trailing bytes, keys other than Ed25519/P-256, and signature
    /// algorithms other than Ed25519 / ecdsa-with-SHA256 matching the key.
    pub fn parse(der: &[u8]) -> Result<Self, Problem> {
        if der.len() > MAX_CSR_LEN {
            return Err(Problem::new(
                ProblemType::TooLarge,
                format!("csr is {} bytes; the limit is {MAX_CSR_LEN}", der.len()),
            ));
        }
        let (rest, csr) = X509CertificationRequest::from_der(der)
            .map_err(|e| Problem::malformed(format!("csr: not a DER PKCS#10 request: {e}")))?;
        if !rest.is_empty() {
            return Err(Problem::malformed(format!(
                "csr: {} trailing bytes",
                rest.len()
            )));
        }
        let spki_der = csr.certification_request_info.subject_pki.raw.to_vec();
        let public_key = spki::decode(&spki_der)
            .map_err(|e| Problem::new(ProblemType::KeyAlgorithm, format!("csr: {e}")))?;
        let sig_oid = csr.signature_algorithm.algorithm.to_id_string();
        let expected = match public_key.algorithm {
            KeyAlgorithm::Ed25519 => OID_ED25519,
            KeyAlgorithm::P256 => OID_ECDSA_SHA256,
        };
        if sig_oid != expected {
            return Err(Problem::new(
                ProblemType::KeyAlgorithm,
                format!(
                    "csr: signature algorithm {sig_oid} not allowed for a {} key (expected {expected})",
                    public_key.algorithm
                ),
            ));
        }
        // RFC 8410 section 6 / RFC 5758 section 3.2: the parameters MUST be absent.
        if csr.signature_algorithm.parameters.is_some() {
            return Err(Problem::new(
                ProblemType::KeyAlgorithm,
                "csr: signature algorithm parameters must be absent",
            ));
        }
        if csr.signature_value.unused_bits != 0 {
            return Err(Problem::malformed(
                "csr: signature bit string has unused bits",
            ));
        }
        Ok(ParsedCsr {
            spki_der,
            public_key,
            info: csr.certification_request_info.raw.to_vec(),
            signature: csr.signature_value.data.to_vec(),
        })
    }

    /// The DER SubjectPublicKeyInfo in the request.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The requested public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }

    /// Checks the self-signature.
    pub fn verify(self) -> Result<VerifiedCsr, Problem> {
        if !self.public_key.verify_x509(&self.info, &self.signature) {
            return Err(Problem::new(
                ProblemType::CsrSignature,
                "csr: signature does not verify under the requested key (no proof of possession)",
            ));
        }
        Ok(VerifiedCsr {
            spki_der: self.spki_der,
            public_key: self.public_key,
        })
    }
}

impl VerifiedCsr {
    /// The DER SubjectPublicKeyInfo proven by the request.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The proven public key.
    pub fn public_key(&self) -> &PublicKey {
        &self.public_key
    }
}

/// Builds a CSR for a device key (subject CN = serial). Used by the agent and the vectors.
pub fn build(
    key: &crate::keys::KeyPair,
    serial: crate::DeviceSerial,
    rng: &dyn ring::rand::SecureRandom,
) -> Result<Vec<u8>, rcgen::Error> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, serial.to_string());
    let csr = params.serialize_request(&key.rcgen_signer(rng))?;
    Ok(csr.der().to_vec())
}
