//! Regenerates `protocol-spec/vectors/` byte for byte from fixed seeds.
//!
//! ```text
//! cargo run -p protocol-spec --example generate_vectors
//! ```
//!
//! Every key comes from SHA-256 of a label; ECDSA nonces come from a fixed byte mixed (by ring)
//! with the key and message, so P-256 signatures are reproducible too. `tests/vectors.rs`
//! includes this file and fails when the committed files differ from what it produces.
// ring's fixed-output generators are the only way to make ring's key generation and ECDSA
// signing reproducible; they are test-only APIs and used here for exactly that.
#![allow(deprecated)]
// A generator that cannot produce a vector has nothing sensible to do but stop, loudly.
#![allow(clippy::panic)]

use std::collections::BTreeMap;
use std::path::Path;

use coset::CborSerializable as _;
use protocol_spec::csr;
use protocol_spec::messages::{
    EnrollRequest, EnrollResponse, ResponseForm, SecretAck, SecretDelivery,
};
use protocol_spec::problem::{ALL_PROBLEM_TYPES, Problem};
use protocol_spec::profile::{self, CertProfile};
use protocol_spec::secret::kcv;
use protocol_spec::token::{self, FactoryClaims};
use protocol_spec::{CertSerial, DeviceSerial, KeyAlgorithm, KeyPair, PublicKey};
use ring::test::rand::{FixedByteRandom, FixedSliceRandom};
use serde_json::{Value, json};

/// The "current time" every case is checked at: 2026-01-01T00:00:00Z.
pub const NOW: u64 = 1_767_225_600;
/// notBefore of the vector CAs (and so of every vector certificate): 2025-12-01T00:00:00Z.
pub const CA_NOT_BEFORE: i64 = 1_764_547_200;

/// The fixed "random" source for ECDSA nonces (ring mixes it with the key and the message).
pub fn nonce_rng() -> FixedByteRandom {
    FixedByteRandom { byte: 0x42 }
}

/// A key pair derived from `label`.
pub fn seeded_key(label: &str, alg: KeyAlgorithm) -> KeyPair {
    let seed = ring::digest::digest(
        &ring::digest::SHA256,
        format!("imprint-vector-{label}").as_bytes(),
    );
    let rng = FixedSliceRandom {
        bytes: seed.as_ref(),
    };
    // Load the generated document again with the nonce source every other user of the key
    // (the vector test, which reads the PEM) will use.
    let generated = ok(KeyPair::generate(alg, &rng), label);
    ok(
        KeyPair::from_pkcs8(generated.pkcs8_der(), &nonce_rng()),
        label,
    )
}

fn ok<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:?}"),
    }
}

struct Gen {
    files: BTreeMap<String, Vec<u8>>,
    cases: Vec<Value>,
    rng: FixedByteRandom,
}

struct Device {
    key: KeyPair,
    serial: DeviceSerial,
}

impl Gen {
    fn put(&mut self, path: &str, bytes: Vec<u8>) -> String {
        self.files.insert(path.to_string(), bytes);
        path.to_string()
    }

    fn device(&self, label: &str, alg: KeyAlgorithm, serial: u64) -> Device {
        Device {
            key: seeded_key(label, alg),
            serial: ok(DeviceSerial::new(serial).ok_or("zero"), "serial"),
        }
    }

    fn claims(&self, line: &str, dev: &Device, cti: u8) -> FactoryClaims {
        FactoryClaims {
            line: line.to_string(),
            serial: dev.serial,
            key_hash: protocol_spec::spki::sha256(&dev.key.spki_der()),
            issued_at: NOW - 60,
            expires_at: NOW + 540,
            token_id: vec![cti; 16],
        }
    }

    fn token(&self, claims: &FactoryClaims, line_key: &KeyPair) -> Vec<u8> {
        ok(token::mint(claims, line_key, &self.rng), "mint")
    }

    fn csr(&self, dev: &Device) -> Vec<u8> {
        ok(csr::build(&dev.key, dev.serial, &self.rng), "csr")
    }

    #[allow(clippy::too_many_arguments)]
    fn enroll_case(
        &mut self,
        name: &str,
        description: &str,
        body: Vec<u8>,
        json: bool,
        expect: &str,
        ca: Option<(&str, &KeyPair, &CertProfile)>,
        device_spki: Option<Vec<u8>>,
        serial: Option<CertSerial>,
    ) {
        let ext = if json { "json" } else { "cbor" };
        let request = self.put(&format!("cases/{name}/request.{ext}"), body);
        let mut case = json!({
            "name": name,
            "kind": "enroll",
            "description": description,
            "request": request,
            "encoding": ext,
            "expect": expect,
        });
        if let (Some((ca_name, ca_key, profile)), Some(spki), Some(serial)) =
            (ca, device_spki, serial)
        {
            let issued = ok(profile.issue(serial, &spki, ca_key, &self.rng), "issue");
            let full = EnrollResponse::Full {
                certificate: issued.der.clone(),
            };
            let compact = EnrollResponse::Compact {
                ca_key_id: profile.ca_key_id().to_vec(),
                signature: issued.signature.clone(),
                generation: serial.generation,
            };
            case["ca"] = json!(ca_name);
            if serial.generation != 0 {
                case["generation"] = json!(serial.generation);
            }
            case["certificate"] =
                json!(self.put(&format!("cases/{name}/certificate.der"), issued.der.clone()));
            case["certificate_pem"] = json!(self.put(
                &format!("cases/{name}/certificate.pem"),
                profile::cert_pem(&issued.der).into_bytes()
            ));
            case["response_full"] =
                json!(self.put(&format!("cases/{name}/response-full.cbor"), full.to_cbor()));
            case["response_compact"] = json!(self.put(
                &format!("cases/{name}/response-compact.cbor"),
                compact.to_cbor()
            ));
            case["response_full_json"] =
                json!(self.put(&format!("cases/{name}/response-full.json"), full.to_json()));
        }
        self.cases.push(case);
    }
}

/// A P-384 key: a real, well-formed key of an algorithm Imprint refuses.
struct P384(ring::signature::EcdsaKeyPair);

impl rcgen::PublicKeyData for P384 {
    fn der_bytes(&self) -> &[u8] {
        use ring::signature::KeyPair as _;
        self.0.public_key().as_ref()
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P384_SHA384
    }
}

impl rcgen::SigningKey for P384 {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0
            .sign(&nonce_rng(), msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| rcgen::Error::RingUnspecified)
    }
}

fn p384_csr() -> Vec<u8> {
    let alg = &ring::signature::ECDSA_P384_SHA384_ASN1_SIGNING;
    let seed = ring::digest::digest(&ring::digest::SHA384, b"imprint-vector-p384");
    let pkcs8 = ok(
        ring::signature::EcdsaKeyPair::generate_pkcs8(
            alg,
            &FixedSliceRandom {
                bytes: &seed.as_ref()[..48],
            },
        ),
        "p384",
    );
    let kp = ok(
        ring::signature::EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &nonce_rng()),
        "p384",
    );
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "1010");
    ok(params.serialize_request(&P384(kp)), "p384 csr")
        .der()
        .to_vec()
}

/// Every vector file, by path relative to `vectors/`.
pub fn generate() -> BTreeMap<String, Vec<u8>> {
    let mut g = Gen {
        files: BTreeMap::new(),
        cases: Vec::new(),
        rng: nonce_rng(),
    };

    // --- CAs ---
    let ca_ed = seeded_key("ca-ed25519", KeyAlgorithm::Ed25519);
    let ca_p = seeded_key("ca-p256", KeyAlgorithm::P256);
    let mut cas = Vec::new();
    for (name, key) in [("ca-ed25519", &ca_ed), ("ca-p256", &ca_p)] {
        let der = ok(
            profile::new_ca_certificate(
                &format!("Imprint Vector CA ({name})"),
                key,
                CA_NOT_BEFORE,
                &g.rng,
            ),
            "ca",
        );
        g.put(&format!("cas/{name}.der"), der.clone());
        g.put(
            &format!("cas/{name}.pem"),
            profile::cert_pem(&der).into_bytes(),
        );
        g.put(
            &format!("cas/{name}.key.pem"),
            key.to_pem().as_bytes().to_vec(),
        );
        cas.push(json!({"name": name, "algorithm": key.algorithm().name(),
            "certificate": format!("cas/{name}.der"), "key": format!("cas/{name}.key.pem")}));
    }
    let prof_ed = ok(
        CertProfile::from_ca_der(&g.files["cas/ca-ed25519.der"]),
        "profile",
    );
    let prof_p = ok(
        CertProfile::from_ca_der(&g.files["cas/ca-p256.der"]),
        "profile",
    );
    let ed_ca = Some(("ca-ed25519", &ca_ed, &prof_ed));
    let p_ca = Some(("ca-p256", &ca_p, &prof_p));

    // --- lines ---
    let line_a = seeded_key("line-a", KeyAlgorithm::Ed25519);
    let line_b = seeded_key("line-b", KeyAlgorithm::P256);
    let line_c = seeded_key("line-c", KeyAlgorithm::Ed25519);
    let line_d = seeded_key("line-d", KeyAlgorithm::Ed25519);
    let rogue = seeded_key("rogue", KeyAlgorithm::Ed25519);
    let rogue_p = seeded_key("rogue-p256", KeyAlgorithm::P256);
    let mut lines = Vec::new();
    for (id, key, first, last, active) in [
        ("line-a", &line_a, 1000u64, 1999u64, true),
        ("line-b", &line_b, 2000, 2999, true),
        ("line-c", &line_c, u64::MAX - 615, u64::MAX, true),
        ("line-d", &line_d, 3000, 3999, false),
    ] {
        let path = format!("lines/{id}.pub.pem");
        g.put(&path, PublicKey::from(key).to_pem().into_bytes());
        g.put(
            &format!("lines/{id}.key.pem"),
            key.to_pem().as_bytes().to_vec(),
        );
        lines.push(
            json!({"id": id, "algorithm": key.algorithm().name(), "public_key": path,
            "first_serial": first.to_string(), "last_serial": last.to_string(), "active": active}),
        );
    }

    // --- valid enrollments ---
    let ed = KeyAlgorithm::Ed25519;
    let p = KeyAlgorithm::P256;
    let valid: [(&str, &str, KeyAlgorithm, u64, bool, ResponseForm, bool); 9] = [
        (
            "ok-ed25519-device-ed25519-ca",
            "Ed25519 device, Ed25519 CA, full response",
            ed,
            1001,
            false,
            ResponseForm::Full,
            false,
        ),
        (
            "ok-p256-device-ed25519-ca",
            "P-256 device, Ed25519 CA, full response",
            p,
            1002,
            false,
            ResponseForm::Full,
            false,
        ),
        (
            "ok-ed25519-device-p256-ca",
            "Ed25519 device, P-256 CA, full response",
            ed,
            1003,
            true,
            ResponseForm::Full,
            false,
        ),
        (
            "ok-p256-device-p256-ca",
            "P-256 device, P-256 CA, full response",
            p,
            1004,
            true,
            ResponseForm::Full,
            false,
        ),
        (
            "ok-compact-ed25519-ca",
            "compact response from an Ed25519 CA",
            ed,
            1005,
            false,
            ResponseForm::Compact,
            false,
        ),
        (
            "ok-compact-p256-ca",
            "compact response from a P-256 CA",
            p,
            1006,
            true,
            ResponseForm::Compact,
            false,
        ),
        (
            "ok-json-request",
            "the JSON mapping of a request",
            p,
            1007,
            false,
            ResponseForm::Full,
            true,
        ),
        (
            "ok-es256-line",
            "a P-256 line station (ES256 token)",
            ed,
            2001,
            false,
            ResponseForm::Full,
            false,
        ),
        (
            "ok-largest-serial",
            "serial 2^64-1: a 9-octet certificate serial",
            ed,
            u64::MAX,
            false,
            ResponseForm::Full,
            false,
        ),
    ];
    for (name, desc, alg, serial, p256_ca, form, json_enc) in valid {
        let dev = g.device(name, alg, serial);
        let (line_id, line_key) = match serial {
            2000..=2999 => ("line-b", &line_b),
            s if s > u64::MAX - 1000 => ("line-c", &line_c),
            _ => ("line-a", &line_a),
        };
        let claims = g.claims(line_id, &dev, (serial % 251) as u8);
        let req = EnrollRequest {
            token: g.token(&claims, line_key),
            csr: g.csr(&dev),
            form,
        };
        let body = if json_enc {
            req.to_json()
        } else {
            req.to_cbor()
        };
        let ca = if p256_ca { p_ca } else { ed_ca };
        g.enroll_case(
            name,
            desc,
            body,
            json_enc,
            "ok",
            ca,
            Some(dev.key.spki_der()),
            Some(dev.serial.into()),
        );
    }

    // --- enrollments of a serial an operator reset (SPEC.md 5, 10.1) ---
    // The CA decides the generation from its store; the request is like any other.
    for (name, desc, alg, serial, p256_ca, generation) in [
        (
            "ok-reset-generation-1-ed25519-ca",
            "a serial enrolled again after one reset: generation 1 in the certificate serial and the compact response",
            ed,
            1008,
            false,
            1u32,
        ),
        (
            "ok-reset-generation-200-p256-ca",
            "generation 200 (top bit set: the certificate serial gets a leading 00), P-256 CA",
            p,
            1009,
            true,
            200,
        ),
    ] {
        let dev = g.device(name, alg, serial);
        let claims = g.claims("line-a", &dev, (serial % 251) as u8);
        let body = EnrollRequest {
            token: g.token(&claims, &line_a),
            csr: g.csr(&dev),
            form: ResponseForm::Compact,
        }
        .to_cbor();
        let ca = if p256_ca { p_ca } else { ed_ca };
        g.enroll_case(
            name,
            desc,
            body,
            false,
            "ok",
            ca,
            Some(dev.key.spki_der()),
            Some(CertSerial::new(dev.serial, generation)),
        );
    }

    // --- invalid enrollments, each decided from the message alone ---
    let dev = g.device("bad", ed, 1500);
    let good_csr = g.csr(&dev);
    let base = g.claims("line-a", &dev, 0xAA);
    let bad = |g: &mut Gen, name: &str, desc: &str, token: Vec<u8>, csr: Vec<u8>, expect: &str| {
        let body = EnrollRequest {
            token,
            csr,
            form: ResponseForm::Full,
        }
        .to_cbor();
        g.enroll_case(name, desc, body, false, expect, None, None, None);
    };
    let t = g.token(
        &FactoryClaims {
            issued_at: NOW - 1200,
            expires_at: NOW - 600,
            ..base.clone()
        },
        &line_a,
    );
    bad(
        &mut g,
        "token-expired",
        "exp ten minutes before now (beyond the 120 s skew)",
        t,
        good_csr.clone(),
        "token-expired",
    );
    let t = g.token(
        &FactoryClaims {
            issued_at: NOW + 600,
            expires_at: NOW + 1200,
            ..base.clone()
        },
        &line_a,
    );
    bad(
        &mut g,
        "token-not-yet-valid",
        "iat ten minutes after now",
        t,
        good_csr.clone(),
        "token-expired",
    );
    let t = g.token(
        &FactoryClaims {
            issued_at: NOW - 60,
            expires_at: NOW + 30 * 86400,
            ..base.clone()
        },
        &line_a,
    );
    bad(
        &mut g,
        "token-lifetime-too-long",
        "exp - iat of 30 days exceeds the 1-hour maximum",
        t,
        good_csr.clone(),
        "token-expired",
    );
    let t = g.token(&base, &rogue);
    bad(
        &mut g,
        "token-signature-unknown-key",
        "signed by a key that is not line-a's",
        t,
        good_csr.clone(),
        "token-signature",
    );
    let mut t = g.token(&base, &line_a);
    if let Some(pos) = t.windows(16).position(|w| w == [0xAA; 16]) {
        t[pos] = 0xAB;
    }
    bad(
        &mut g,
        "token-signature-tampered",
        "one byte of the signed cti changed",
        t,
        good_csr.clone(),
        "token-signature",
    );
    let t = g.token(&base, &rogue_p);
    bad(
        &mut g,
        "token-alg-mismatch",
        "ES256 token for a line registered with an Ed25519 key",
        t,
        good_csr.clone(),
        "token-signature",
    );
    let mut t = g.token(&base, &line_a);
    t.truncate(t.len() - 20);
    bad(
        &mut g,
        "token-truncated",
        "the token cut 20 bytes short",
        t,
        good_csr.clone(),
        "malformed",
    );
    let t = {
        let payload = ok(
            coset::cwt::ClaimsSetBuilder::new()
                .issuer("line-a".into())
                .subject("1500".into())
                .issued_at(coset::cwt::Timestamp::WholeSeconds((NOW - 60) as i64))
                .expiration_time(coset::cwt::Timestamp::WholeSeconds((NOW + 540) as i64))
                .cwt_id(vec![0xAA; 16])
                .build()
                .to_vec(),
            "claims",
        );
        let sign1 = coset::CoseSign1Builder::new()
            .protected(
                coset::HeaderBuilder::new()
                    .algorithm(coset::iana::Algorithm::EdDSA)
                    .build(),
            )
            .payload(payload)
            .create_signature(b"", |tbs| ok(line_a.sign_cose(tbs, &nonce_rng()), "sign"))
            .build();
        ok(coset::TaggedCborSerializable::to_tagged_vec(sign1), "sign1")
    };
    bad(
        &mut g,
        "token-missing-cnf",
        "a well-signed token without cnf",
        t,
        good_csr.clone(),
        "malformed",
    );
    let t = g.token(
        &FactoryClaims {
            line: "line-z".into(),
            ..base.clone()
        },
        &line_a,
    );
    bad(
        &mut g,
        "line-unknown",
        "iss names a line that is not registered",
        t,
        good_csr.clone(),
        "line-unknown",
    );
    let dev_d = g.device("bad-d", ed, 3001);
    let t = g.token(&g.claims("line-d", &dev_d, 0xAD), &line_d);
    let csr_d = g.csr(&dev_d);
    bad(
        &mut g,
        "line-disabled",
        "a registered but disabled line",
        t,
        csr_d,
        "line-unknown",
    );
    let dev_far = g.device("bad-far", ed, 5000);
    let t = g.token(&g.claims("line-a", &dev_far, 0xAF), &line_a);
    let csr_far = g.csr(&dev_far);
    bad(
        &mut g,
        "serial-out-of-range",
        "serial 5000 outside line-a's 1000-1999",
        t,
        csr_far,
        "serial-out-of-range",
    );
    let other = g.device("bad-other", ed, 1500);
    let t = g.token(&base, &line_a);
    let other_csr = g.csr(&other);
    bad(
        &mut g,
        "key-mismatch",
        "token confirms one key, the CSR carries another",
        t,
        other_csr,
        "key-mismatch",
    );
    let mut broken = good_csr.clone();
    if let Some(last) = broken.last_mut() {
        *last ^= 0x01;
    }
    let t = g.token(&base, &line_a);
    bad(
        &mut g,
        "csr-signature",
        "the CSR's signature with one bit flipped",
        t,
        broken,
        "csr-signature",
    );
    let t = g.token(&base, &line_a);
    bad(
        &mut g,
        "key-algorithm",
        "a P-384 CSR (only Ed25519 and P-256 are allowed)",
        t,
        p384_csr(),
        "key-algorithm",
    );
    let t = g.token(&base, &line_a);
    bad(
        &mut g,
        "csr-truncated",
        "the CSR cut 10 bytes short",
        t,
        good_csr[..good_csr.len() - 10].to_vec(),
        "malformed",
    );
    g.enroll_case(
        "malformed-not-cbor",
        "bytes that are not CBOR",
        b"\xff\x00hello".to_vec(),
        false,
        "malformed",
        None,
        None,
        None,
    );
    let body = protocol_spec::cbor::MapWriter::new()
        .bytes(1, &g.token(&base, &line_a))
        .encode();
    g.enroll_case(
        "malformed-missing-csr",
        "a request without field 2 (csr)",
        body,
        false,
        "malformed",
        None,
        None,
        None,
    );
    let body = protocol_spec::cbor::MapWriter::new()
        .bytes(1, &g.token(&base, &line_a))
        .bytes(2, &good_csr)
        .uint(3, 7)
        .encode();
    g.enroll_case(
        "malformed-unknown-form",
        "form 7 is neither full (0) nor compact (1)",
        body,
        false,
        "malformed",
        None,
        None,
        None,
    );
    g.enroll_case(
        "malformed-json",
        "JSON whose csr is not base64url",
        br#"{"token":"2D6EQ6EBJ6A","csr":"not base64!"}"#.to_vec(),
        true,
        "malformed",
        None,
        None,
        None,
    );
    let body = protocol_spec::cbor::MapWriter::new()
        .bytes(1, &g.token(&base, &line_a))
        .bytes(2, &vec![0u8; 5000])
        .encode();
    g.enroll_case(
        "too-large",
        "a 5 kB request (the limit is 4096 bytes)",
        body,
        false,
        "too-large",
        None,
        None,
        None,
    );

    // --- compact expansion on the device side ---
    let compact_src = "cases/ok-compact-ed25519-ca/response-compact.cbor";
    let src = ok(EnrollResponse::from_cbor(&g.files[compact_src]), "compact");
    if let EnrollResponse::Compact {
        ca_key_id,
        signature,
        ..
    } = src
    {
        let mut sig = signature.clone();
        sig[10] ^= 0x01;
        let body = EnrollResponse::Compact {
            ca_key_id: ca_key_id.clone(),
            signature: sig,
            generation: 0,
        }
        .to_cbor();
        let path = g.put("cases/expand-bad-signature/response-compact.cbor", body);
        g.cases.push(json!({"name": "expand-bad-signature", "kind": "expand",
            "description": "compact response whose signature has one bit flipped",
            "response": path, "device_case": "ok-compact-ed25519-ca", "ca": "ca-ed25519", "expect": "signature-invalid"}));
        let wrong = g.device("expand-wrong-key", ed, 1005);
        let path = g.put(
            "cases/expand-wrong-key/device.spki.der",
            wrong.key.spki_der(),
        );
        g.cases
            .push(json!({"name": "expand-wrong-key", "kind": "expand",
            "description": "a valid compact response expanded with another device key",
            "response": compact_src, "device_spki": path, "device_case": "ok-compact-ed25519-ca",
            "ca": "ca-ed25519", "expect": "signature-invalid"}));
        g.cases.push(json!({"name": "expand-wrong-ca", "kind": "expand",
            "description": "a compact response from the Ed25519 CA expanded against the P-256 CA",
            "response": compact_src, "device_case": "ok-compact-ed25519-ca", "ca": "ca-p256", "expect": "wrong-ca"}));
    }
    let reset_src = "cases/ok-reset-generation-1-ed25519-ca/response-compact.cbor";
    if let EnrollResponse::Compact {
        ca_key_id,
        signature,
        ..
    } = ok(EnrollResponse::from_cbor(&g.files[reset_src]), "compact")
    {
        let body = EnrollResponse::Compact {
            ca_key_id,
            signature,
            generation: 0,
        }
        .to_cbor();
        let path = g.put("cases/expand-wrong-generation/response-compact.cbor", body);
        g.cases.push(json!({"name": "expand-wrong-generation", "kind": "expand",
            "description": "the compact response of a generation-1 certificate with its generation (key 4) left out",
            "response": path, "device_case": "ok-reset-generation-1-ed25519-ca", "ca": "ca-ed25519", "expect": "signature-invalid"}));
    }

    // --- provisioning records (SPEC.md 13): what a device keeps, and rebuilds from ---
    for (case, alg, serial, ca_name, prof) in [
        ("ok-compact-ed25519-ca", ed, 1005, "ca-ed25519", &prof_ed),
        ("ok-compact-p256-ca", p, 1006, "ca-p256", &prof_p),
        (
            "ok-reset-generation-1-ed25519-ca",
            ed,
            1008,
            "ca-ed25519",
            &prof_ed,
        ),
    ] {
        let dev = g.device(case, alg, serial);
        let cert = g.files[&format!("cases/{case}/certificate.der")].clone();
        let record = ok(
            protocol_spec::record::ProvisioningRecord::of(&dev.key, &cert, prof, &g.rng),
            "record",
        )
        .encode();
        let size = record.len();
        let path = g.put(&format!("records/{case}.rec"), record.to_vec());
        g.cases
            .push(json!({"name": format!("record-{case}"), "kind": "record",
            "description": format!("the provisioning record of {case}'s device: {size} octets"),
            "record": path, "device_case": case, "ca": ca_name, "size": size, "expect": "ok"}));
    }

    // --- secret delivery ---
    let mut secret = [0u8; 32];
    let seed = ring::digest::digest(&ring::digest::SHA256, b"imprint-vector-secret");
    secret.copy_from_slice(seed.as_ref());
    let delivery = SecretDelivery {
        key_id: "k-0000000000000001".into(),
        version: 1,
        algorithm: protocol_spec::messages::SECRET_ALGORITHM.into(),
        secret: zeroize::Zeroizing::new(secret.to_vec()),
        kcv: kcv(&secret).to_vec(),
        initial_key_id: None,
    };
    let ack = SecretAck {
        key_id: delivery.key_id.clone(),
        version: 1,
        kcv: delivery.kcv.clone(),
    };
    let d_cbor = g.put("secrets/delivery.cbor", delivery.to_cbor().to_vec());
    let d_json = g.put("secrets/delivery.json", delivery.to_json().to_vec());
    let a_cbor = g.put("secrets/ack.cbor", ack.to_cbor());
    let a_json = g.put("secrets/ack.json", ack.to_json());
    g.cases
        .push(json!({"name": "secret-delivery", "kind": "secret",
        "description": "a version-1 secret and its acknowledgement",
        "delivery": d_cbor, "delivery_json": d_json, "ack": a_cbor, "ack_json": a_json,
        "secret_hex": hex::encode(secret), "kcv_hex": hex::encode(kcv(&secret)), "expect": "ok"}));

    // --- a DUKPT Initial Key delivery: the X9.24-3-2017 published pair (BDK
    // FEDCBA9876543210F1F1F1F1F1F1F1F1, Initial Key ID 1234567890123456) as version 1 ---
    let Ok(bdk) = protocol_spec::dukpt::AesKey::from_hex("FEDCBA9876543210F1F1F1F1F1F1F1F1") else {
        panic!("the published BDK is 16 bytes of hex");
    };
    let Ok(ikid) = protocol_spec::dukpt::InitialKeyId::from_hex("1234567890123456") else {
        panic!("the published Initial Key ID is 16 hex digits");
    };
    let ik = protocol_spec::dukpt::initial_key(&bdk, ikid);
    let dukpt_delivery = SecretDelivery {
        key_id: ikid.to_string(),
        version: 1,
        algorithm: "aes-128-dukpt".into(),
        secret: zeroize::Zeroizing::new(ik.expose().to_vec()),
        kcv: ik.kcv().to_vec(),
        initial_key_id: Some(ikid.bytes()),
    };
    let dukpt_ack = SecretAck {
        key_id: dukpt_delivery.key_id.clone(),
        version: 1,
        kcv: dukpt_delivery.kcv.clone(),
    };
    let d_cbor = g.put(
        "secrets/delivery-dukpt.cbor",
        dukpt_delivery.to_cbor().to_vec(),
    );
    let d_json = g.put(
        "secrets/delivery-dukpt.json",
        dukpt_delivery.to_json().to_vec(),
    );
    let a_cbor = g.put("secrets/ack-dukpt.cbor", dukpt_ack.to_cbor());
    let a_json = g.put("secrets/ack-dukpt.json", dukpt_ack.to_json());
    g.cases
        .push(json!({"name": "secret-delivery-dukpt", "kind": "secret",
        "description": "an AES-128 DUKPT Initial Key (ANSI X9.24-3-2017 published pair) as version 1, and its acknowledgement",
        "delivery": d_cbor, "delivery_json": d_json, "ack": a_cbor, "ack_json": a_json,
        "secret_hex": hex::encode(ik.expose()), "kcv_hex": hex::encode(ik.kcv()),
        "initial_key_id_hex": hex::encode(ikid.bytes()), "expect": "ok"}));

    // --- problem details ---
    for kind in ALL_PROBLEM_TYPES {
        let p = Problem::new(kind.clone(), format!("example detail for {kind}"));
        g.put(&format!("problems/{}.json", kind.name()), p.to_json());
        g.put(&format!("problems/{}.cbor", kind.name()), p.to_cbor());
    }

    let manifest = json!({
        "now": NOW,
        "token_policy": {"max_clock_skew": 120, "max_lifetime": protocol_spec::token::MAX_LIFETIME},
        "cas": cas,
        "lines": lines,
        "cases": g.cases,
    });
    let mut text = ok(serde_json::to_vec_pretty(&manifest), "manifest");
    text.push(b'\n');
    g.files.insert("manifest.json".into(), text);
    g.files
}

/// The vectors folder of this crate.
pub fn vectors_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

#[allow(dead_code)]
fn main() -> std::io::Result<()> {
    let dir = vectors_dir();
    for sub in ["cas", "lines", "cases", "records", "secrets", "problems"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p)?;
        }
    }
    let files = generate();
    for (path, bytes) in &files {
        let full = dir.join(path);
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&full, bytes)?;
    }
    println!("wrote {} files under {}", files.len(), dir.display());
    Ok(())
}
