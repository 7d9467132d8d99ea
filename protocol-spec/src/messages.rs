//! Enrollment and secret-delivery messages, with their CBOR encoding (normative) and the JSON
//! mapping HTTPS also accepts (byte strings as unpadded base64url, RFC 4648 section 5).

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::cbor::{IntMap, MapWriter};
use crate::problem::{Problem, ProblemType};

/// Largest accepted CBOR enrollment request, in bytes.
pub const MAX_ENROLL_REQUEST: usize = 4096;
/// Largest accepted JSON enrollment request (base64 adds a third), in bytes.
pub const MAX_ENROLL_REQUEST_JSON: usize = 8192;
/// Largest accepted secret acknowledgement, in bytes.
pub const MAX_ACK: usize = 512;

/// Unpadded base64url for output; padding tolerated on input.
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Encodes bytes as unpadded base64url.
pub fn b64(bytes: &[u8]) -> String {
    B64.encode(bytes)
}

/// Decodes base64url (padding optional), naming `field` on failure.
pub fn unb64(text: &str, field: &str) -> Result<Vec<u8>, Problem> {
    B64.decode(text)
        .map_err(|e| Problem::malformed(format!("{field}: not base64url: {e}")))
}

fn too_large(what: &str, len: usize, max: usize) -> Problem {
    Problem::new(
        ProblemType::TooLarge,
        format!("{what} is {len} bytes; the limit is {max}"),
    )
}

/// Which response an enrolling device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResponseForm {
    /// The whole certificate, DER.
    #[default]
    Full,
    /// The CA key id and the signature only; the device rebuilds the certificate.
    Compact,
}

/// `EnrollRequest = { 1: token, 2: csr, ? 3: form }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrollRequest {
    /// The factory token (tagged COSE_Sign1).
    pub token: Vec<u8>,
    /// The PKCS#10 CSR, DER.
    pub csr: Vec<u8>,
    /// The requested response form.
    pub form: ResponseForm,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequestJson {
    token: String,
    csr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    form: Option<String>,
}

impl EnrollRequest {
    /// CBOR encoding.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut w = MapWriter::new().bytes(1, &self.token).bytes(2, &self.csr);
        if self.form == ResponseForm::Compact {
            w = w.uint(3, 1);
        }
        w.encode()
    }

    /// Decodes CBOR, enforcing [`MAX_ENROLL_REQUEST`].
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, Problem> {
        if bytes.len() > MAX_ENROLL_REQUEST {
            return Err(too_large("enroll request", bytes.len(), MAX_ENROLL_REQUEST));
        }
        let mut m = IntMap::decode(bytes, "enroll request").map_err(Problem::malformed)?;
        let token = m.bytes(1, "token").map_err(Problem::malformed)?;
        let csr = m.bytes(2, "csr").map_err(Problem::malformed)?;
        let form = match m.opt_uint(3, "form").map_err(Problem::malformed)? {
            None | Some(0) => ResponseForm::Full,
            Some(1) => ResponseForm::Compact,
            Some(n) => {
                return Err(Problem::malformed(format!(
                    "enroll request: unknown form {n}"
                )));
            }
        };
        Ok(EnrollRequest { token, csr, form })
    }

    /// JSON mapping.
    pub fn to_json(&self) -> Vec<u8> {
        let j = EnrollRequestJson {
            token: b64(&self.token),
            csr: b64(&self.csr),
            form: (self.form == ResponseForm::Compact).then(|| "compact".to_string()),
        };
        serde_json::to_vec(&j).unwrap_or_default()
    }

    /// Decodes the JSON mapping, enforcing [`MAX_ENROLL_REQUEST_JSON`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, Problem> {
        if bytes.len() > MAX_ENROLL_REQUEST_JSON {
            return Err(too_large(
                "enroll request",
                bytes.len(),
                MAX_ENROLL_REQUEST_JSON,
            ));
        }
        let j: EnrollRequestJson = serde_json::from_slice(bytes)
            .map_err(|e| Problem::malformed(format!("enroll request: invalid JSON: {e}")))?;
        let form = match j.form.as_deref() {
            None | Some("full") => ResponseForm::Full,
            Some("compact") => ResponseForm::Compact,
            Some(other) => {
                return Err(Problem::malformed(format!(
                    "enroll request: form {other:?} is neither \"full\" nor \"compact\""
                )));
            }
        };
        Ok(EnrollRequest {
            token: unb64(&j.token, "token")?,
            csr: unb64(&j.csr, "csr")?,
            form,
        })
    }
}

/// `EnrollResponse = { 1: certificate } / { 2: ca-key-id, 3: signature, ? 4: generation }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollResponse {
    /// The certificate, DER.
    Full {
        /// DER certificate.
        certificate: Vec<u8>,
    },
    /// What the device needs to rebuild the certificate.
    Compact {
        /// The issuing CA's subjectKeyIdentifier.
        ca_key_id: Vec<u8>,
        /// The CA's signature over the to-be-signed certificate.
        signature: Vec<u8>,
        /// The reset generation the certificate serial carries (SPEC.md 5): 0 for a serial
        /// never reset, and then absent on the wire.
        generation: u32,
    },
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollResponseJson {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_key_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signature: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    generation: Option<u32>,
}

impl EnrollResponse {
    /// CBOR encoding.
    pub fn to_cbor(&self) -> Vec<u8> {
        match self {
            EnrollResponse::Full { certificate } => MapWriter::new().bytes(1, certificate).encode(),
            EnrollResponse::Compact {
                ca_key_id,
                signature,
                generation,
            } => {
                let m = MapWriter::new().bytes(2, ca_key_id).bytes(3, signature);
                match generation {
                    0 => m,
                    g => m.uint(4, u64::from(*g)),
                }
                .encode()
            }
        }
    }

    /// Decodes CBOR.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, Problem> {
        let mut m = IntMap::decode(bytes, "enroll response").map_err(Problem::malformed)?;
        if m.has(1) {
            return Ok(EnrollResponse::Full {
                certificate: m.bytes(1, "certificate").map_err(Problem::malformed)?,
            });
        }
        let ca_key_id = m.bytes(2, "ca-key-id").map_err(Problem::malformed)?;
        let signature = m.bytes(3, "signature").map_err(Problem::malformed)?;
        let generation = match m.opt_uint(4, "generation").map_err(Problem::malformed)? {
            None => 0,
            Some(g) => u32::try_from(g).map_err(|_| {
                Problem::malformed("enroll response: generation is over 4294967295")
            })?,
        };
        Ok(EnrollResponse::Compact {
            ca_key_id,
            signature,
            generation,
        })
    }

    /// JSON mapping.
    pub fn to_json(&self) -> Vec<u8> {
        let j = match self {
            EnrollResponse::Full { certificate } => EnrollResponseJson {
                certificate: Some(b64(certificate)),
                ca_key_id: None,
                signature: None,
                generation: None,
            },
            EnrollResponse::Compact {
                ca_key_id,
                signature,
                generation,
            } => EnrollResponseJson {
                certificate: None,
                ca_key_id: Some(b64(ca_key_id)),
                signature: Some(b64(signature)),
                generation: (*generation != 0).then_some(*generation),
            },
        };
        serde_json::to_vec(&j).unwrap_or_default()
    }

    /// Decodes the JSON mapping.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Problem> {
        let j: EnrollResponseJson = serde_json::from_slice(bytes)
            .map_err(|e| Problem::malformed(format!("enroll response: invalid JSON: {e}")))?;
        match (j.certificate, j.ca_key_id, j.signature, j.generation) {
            (Some(c), None, None, None) => Ok(EnrollResponse::Full {
                certificate: unb64(&c, "certificate")?,
            }),
            (None, Some(k), Some(s), g) => Ok(EnrollResponse::Compact {
                ca_key_id: unb64(&k, "ca_key_id")?,
                signature: unb64(&s, "signature")?,
                generation: g.unwrap_or(0),
            }),
            _ => Err(Problem::malformed(
                "enroll response: need certificate, or ca_key_id and signature",
            )),
        }
    }
}

/// The secret algorithm of a CA-generated or imported secret: a 256-bit key for AES-256 (and
/// anything else that takes 32 uniformly random bytes). DUKPT lines deliver `aes-128-dukpt` or
/// `aes-256-dukpt` instead (see [`crate::secret::SecretAlgorithm`]).
pub const SECRET_ALGORITHM: &str = "aes-256";

/// `SecretDelivery = { 1: key-id, 2: version, 3: algorithm, 4: secret, 5: kcv,
/// ? 6: initial-key-id }`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretDelivery {
    /// Stable identifier of this key (for DUKPT: the Initial Key ID in hex).
    pub key_id: String,
    /// Version of the device's secret, from 1.
    pub version: u64,
    /// [`SECRET_ALGORITHM`], `aes-128-dukpt` or `aes-256-dukpt`.
    pub algorithm: String,
    /// The secret bytes (32, or 16 for an AES-128 DUKPT Initial Key; zeroized on drop).
    pub secret: Zeroizing<Vec<u8>>,
    /// Key check value: see [`crate::secret::SecretAlgorithm::kcv`] (3 or 5 octets).
    pub kcv: Vec<u8>,
    /// The DUKPT Initial Key ID (BDK id || derivation id), for the DUKPT algorithms only.
    pub initial_key_id: Option<[u8; 8]>,
}

impl std::fmt::Debug for SecretDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretDelivery")
            .field("key_id", &self.key_id)
            .field("version", &self.version)
            .field("algorithm", &self.algorithm)
            .field("secret", &"[redacted]")
            .field("kcv", &hex::encode(&self.kcv))
            .field("initial_key_id", &self.initial_key_id.map(hex::encode))
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretDeliveryJson {
    key_id: String,
    version: u64,
    algorithm: String,
    secret: String,
    kcv: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    initial_key_id: Option<String>,
}

/// Largest secret a delivery may carry.
const MAX_SECRET: usize = 64;
/// Largest key check value.
const MAX_KCV: usize = 16;

fn secret_bytes(b: &[u8]) -> Result<Zeroizing<Vec<u8>>, Problem> {
    if b.is_empty() || b.len() > MAX_SECRET {
        return Err(Problem::malformed(format!(
            "secret must be 1 to {MAX_SECRET} bytes, is {}",
            b.len()
        )));
    }
    Ok(Zeroizing::new(b.to_vec()))
}

fn kcv_bytes(b: &[u8]) -> Result<Vec<u8>, Problem> {
    if b.len() < 3 || b.len() > MAX_KCV {
        return Err(Problem::malformed(format!(
            "kcv must be 3 to {MAX_KCV} bytes, is {}",
            b.len()
        )));
    }
    Ok(b.to_vec())
}

fn initial_key_id_bytes(b: &[u8]) -> Result<[u8; 8], Problem> {
    <[u8; 8]>::try_from(b)
        .map_err(|_| Problem::malformed(format!("initial-key-id must be 8 bytes, is {}", b.len())))
}

impl SecretDelivery {
    /// Whether the delivery is consistent: a known algorithm, a secret of its length, an
    /// Initial Key ID exactly when the algorithm is DUKPT, and the KCV of the secret.
    pub fn check(&self) -> Result<crate::secret::SecretAlgorithm, String> {
        let alg = crate::secret::SecretAlgorithm::from_name(&self.algorithm)
            .ok_or_else(|| format!("secret algorithm {:?} is not known", self.algorithm))?;
        if self.secret.len() != alg.secret_len() {
            return Err(format!(
                "an {} secret is {} bytes, not {}",
                alg.name(),
                alg.secret_len(),
                self.secret.len()
            ));
        }
        if alg.has_initial_key_id() != self.initial_key_id.is_some() {
            return Err(format!(
                "an {} delivery {} an initial key id",
                alg.name(),
                if alg.has_initial_key_id() {
                    "needs"
                } else {
                    "has no"
                }
            ));
        }
        if alg.kcv(&self.secret).as_deref() != Some(self.kcv.as_slice()) {
            return Err("the key check value does not match the secret".into());
        }
        Ok(alg)
    }

    /// CBOR encoding.
    pub fn to_cbor(&self) -> Zeroizing<Vec<u8>> {
        let mut w = MapWriter::new()
            .text(1, &self.key_id)
            .uint(2, self.version)
            .text(3, &self.algorithm)
            .bytes(4, self.secret.as_ref())
            .bytes(5, &self.kcv);
        if let Some(id) = &self.initial_key_id {
            w = w.bytes(6, id);
        }
        w.encode_secret()
    }

    /// Decodes CBOR.
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, Problem> {
        let mut m = IntMap::decode(bytes, "secret").map_err(Problem::malformed)?;
        let key_id = m.text(1, "key-id").map_err(Problem::malformed)?;
        let version = m.uint(2, "version").map_err(Problem::malformed)?;
        let algorithm = m.text(3, "algorithm").map_err(Problem::malformed)?;
        let raw = Zeroizing::new(m.bytes(4, "secret").map_err(Problem::malformed)?);
        let kcv = kcv_bytes(&m.bytes(5, "kcv").map_err(Problem::malformed)?)?;
        let initial_key_id = m
            .opt_bytes(6, "initial-key-id")
            .map_err(Problem::malformed)?
            .map(|b| initial_key_id_bytes(&b))
            .transpose()?;
        Ok(SecretDelivery {
            key_id,
            version,
            algorithm,
            secret: secret_bytes(&raw)?,
            kcv,
            initial_key_id,
        })
    }

    /// JSON mapping.
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let j = SecretDeliveryJson {
            key_id: self.key_id.clone(),
            version: self.version,
            algorithm: self.algorithm.clone(),
            secret: b64(self.secret.as_ref()),
            kcv: b64(&self.kcv),
            initial_key_id: self.initial_key_id.map(|id| b64(&id)),
        };
        // Written into a buffer wiped when dropped and sized once, before writing, for the
        // largest encoding (every character escaped as \uXXXX): no reallocation leaves an
        // unwiped copy behind.
        let strings = [
            &j.key_id,
            &j.algorithm,
            &j.secret,
            &j.kcv,
            j.initial_key_id.as_ref().unwrap_or(&j.kcv),
        ];
        let bound = 256 + 6 * strings.iter().map(|s| s.len()).sum::<usize>();
        let mut out = Zeroizing::new(Vec::with_capacity(bound));
        if serde_json::to_writer(&mut *out, &j).is_err() {
            out.clear();
        }
        zeroize::Zeroize::zeroize(&mut { j.secret });
        out
    }

    /// Decodes the JSON mapping.
    pub fn from_json(bytes: &[u8]) -> Result<Self, Problem> {
        let j: SecretDeliveryJson = serde_json::from_slice(bytes)
            .map_err(|e| Problem::malformed(format!("secret: invalid JSON: {e}")))?;
        let raw = Zeroizing::new(unb64(&j.secret, "secret")?);
        zeroize::Zeroize::zeroize(&mut { j.secret });
        Ok(SecretDelivery {
            key_id: j.key_id,
            version: j.version,
            algorithm: j.algorithm,
            secret: secret_bytes(&raw)?,
            kcv: kcv_bytes(&unb64(&j.kcv, "kcv")?)?,
            initial_key_id: j
                .initial_key_id
                .map(|s| initial_key_id_bytes(&unb64(&s, "initial_key_id")?))
                .transpose()?,
        })
    }
}

/// `SecretAck = { 1: key-id, 2: version, 3: kcv }`: the device confirms what it stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretAck {
    /// The key id delivered.
    pub key_id: String,
    /// The version delivered.
    pub version: u64,
    /// The KCV the device computed over the secret it stored (3 or 5 octets, as delivered).
    pub kcv: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretAckJson {
    key_id: String,
    version: u64,
    kcv: String,
}

/// A key id as SPEC.md section 10 has it: `KeyId = tstr .size (1..64)`.
fn key_id(text: String) -> Result<String, Problem> {
    if (1..=64).contains(&text.len()) {
        Ok(text)
    } else {
        Err(Problem::malformed(format!(
            "key-id: {} octets, not 1 to 64",
            text.len()
        )))
    }
}

impl SecretAck {
    /// CBOR encoding.
    pub fn to_cbor(&self) -> Vec<u8> {
        MapWriter::new()
            .text(1, &self.key_id)
            .uint(2, self.version)
            .bytes(3, &self.kcv)
            .encode()
    }

    /// Decodes CBOR, enforcing [`MAX_ACK`].
    pub fn from_cbor(bytes: &[u8]) -> Result<Self, Problem> {
        if bytes.len() > MAX_ACK {
            return Err(too_large("secret ack", bytes.len(), MAX_ACK));
        }
        let mut m = IntMap::decode(bytes, "secret ack").map_err(Problem::malformed)?;
        Ok(SecretAck {
            key_id: key_id(m.text(1, "key-id").map_err(Problem::malformed)?)?,
            version: m.uint(2, "version").map_err(Problem::malformed)?,
            kcv: kcv_bytes(&m.bytes(3, "kcv").map_err(Problem::malformed)?)?,
        })
    }

    /// JSON mapping.
    pub fn to_json(&self) -> Vec<u8> {
        let j = SecretAckJson {
            key_id: self.key_id.clone(),
            version: self.version,
            kcv: b64(&self.kcv),
        };
        serde_json::to_vec(&j).unwrap_or_default()
    }

    /// Decodes the JSON mapping, enforcing [`MAX_ACK`].
    pub fn from_json(bytes: &[u8]) -> Result<Self, Problem> {
        if bytes.len() > MAX_ACK {
            return Err(too_large("secret ack", bytes.len(), MAX_ACK));
        }
        let j: SecretAckJson = serde_json::from_slice(bytes)
            .map_err(|e| Problem::malformed(format!("secret ack: invalid JSON: {e}")))?;
        Ok(SecretAck {
            key_id: key_id(j.key_id)?,
            version: j.version,
            kcv: kcv_bytes(&unb64(&j.kcv, "kcv")?)?,
        })
    }
}
