//! The committed vectors: byte-for-byte reproducible, and every case has the outcome the
//! manifest says.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../examples/generate_vectors.rs"]
mod generate_vectors;

use std::collections::BTreeMap;
use std::path::Path;

use generate_vectors::{generate, nonce_rng, vectors_dir};
use protocol_spec::enroll::{self, RequestEncoding};
use protocol_spec::messages::{EnrollResponse, SecretAck, SecretDelivery};
use protocol_spec::problem::{ALL_PROBLEM_TYPES, Problem};
use protocol_spec::profile::{self, CertProfile, ProfileError};
use protocol_spec::record::ProvisioningRecord;
use protocol_spec::token::{LineInfo, TokenPolicy};
use protocol_spec::{CertSerial, KeyPair, PublicKey};
use serde_json::Value;

fn read(rel: &str) -> Vec<u8> {
    let p = vectors_dir().join(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn committed_files(dir: &Path, prefix: &str, out: &mut BTreeMap<String, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type().unwrap().is_dir() {
            if name == "dukpt" {
                // Transcribed from the published X9.24-3 supplement, not generated: checked by
                // tests/dukpt.rs against the code, never regenerated from it.
                continue;
            }
            committed_files(&entry.path(), &format!("{name}/"), out);
        } else if name != "README.md" {
            out.insert(name, std::fs::read(entry.path()).unwrap());
        }
    }
}

#[test]
fn committed_vectors_are_what_the_generator_produces() {
    let generated = generate();
    let mut committed = BTreeMap::new();
    committed_files(&vectors_dir(), "", &mut committed);
    for (path, bytes) in &generated {
        match committed.get(path) {
            None => panic!("vectors/{path} is generated but not committed; run the generator"),
            Some(c) if c != bytes => panic!("vectors/{path} differs from what the code produces"),
            Some(_) => {}
        }
    }
    for path in committed.keys() {
        assert!(
            generated.contains_key(path),
            "vectors/{path} is committed but no longer generated"
        );
    }
    assert!(generated.len() > 100);
}

struct Context {
    manifest: Value,
    lines: BTreeMap<String, LineInfo>,
}

fn context() -> Context {
    let manifest: Value = serde_json::from_slice(&read("manifest.json")).unwrap();
    let mut lines = BTreeMap::new();
    for l in manifest["lines"].as_array().unwrap() {
        let pem = String::from_utf8(read(l["public_key"].as_str().unwrap())).unwrap();
        lines.insert(
            l["id"].as_str().unwrap().to_string(),
            LineInfo {
                public_key: PublicKey::from_pem(&pem).unwrap(),
                first_serial: l["first_serial"].as_str().unwrap().parse().unwrap(),
                last_serial: l["last_serial"].as_str().unwrap().parse().unwrap(),
                active: l["active"].as_bool().unwrap(),
            },
        );
    }
    Context { manifest, lines }
}

fn ca(name: &str) -> (CertProfile, KeyPair) {
    let profile = CertProfile::from_ca_der(&read(&format!("cas/{name}.der"))).unwrap();
    let pem = String::from_utf8(read(&format!("cas/{name}.key.pem"))).unwrap();
    (profile, KeyPair::from_pem(&pem, &nonce_rng()).unwrap())
}

fn cases<'a>(ctx: &'a Context, kind: &str) -> Vec<&'a Value> {
    ctx.manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == kind)
        .collect()
}

#[test]
fn at_least_25_cases_covering_every_message_decidable_problem() {
    let ctx = context();
    let all = ctx.manifest["cases"].as_array().unwrap();
    assert!(all.len() >= 25, "only {} cases", all.len());
    for p in [
        "token-expired",
        "token-signature",
        "line-unknown",
        "serial-out-of-range",
        "key-mismatch",
        "csr-signature",
        "key-algorithm",
        "malformed",
        "too-large",
    ] {
        assert!(
            all.iter().any(|c| c["expect"] == p),
            "no vector expects {p}"
        );
    }
}

#[test]
fn every_enroll_case_has_its_expected_outcome() {
    let ctx = context();
    let policy = TokenPolicy {
        max_clock_skew: ctx.manifest["token_policy"]["max_clock_skew"]
            .as_u64()
            .unwrap(),
        max_lifetime: ctx.manifest["token_policy"]["max_lifetime"]
            .as_u64()
            .unwrap(),
    };
    let now = ctx.manifest["now"].as_u64().unwrap();
    let dir = |id: &str| ctx.lines.get(id).cloned();
    let mut ok_count = 0;
    for case in cases(&ctx, "enroll") {
        let name = case["name"].as_str().unwrap();
        let body = read(case["request"].as_str().unwrap());
        let enc = if case["encoding"] == "json" {
            RequestEncoding::Json
        } else {
            RequestEncoding::Cbor
        };
        let outcome = enroll::check(&body, enc, &dir, now, policy);
        let expect = case["expect"].as_str().unwrap();
        match outcome {
            Err(p) => assert_eq!(p.kind.name(), expect, "{name}: got {p}"),
            Ok(checked) => {
                assert_eq!(expect, "ok", "{name}: accepted, expected {expect}");
                ok_count += 1;
                let (profile, ca_key) = ca(case["ca"].as_str().unwrap());
                let generation = case["generation"].as_u64().unwrap_or(0) as u32;
                let serial = CertSerial::new(checked.token().claims().serial, generation);
                let spki = checked.csr().spki_der();
                let want = read(case["certificate"].as_str().unwrap());
                let issued = profile.issue(serial, spki, &ca_key, &nonce_rng()).unwrap();
                assert_eq!(issued.der, want, "{name}: issued certificate differs");
                profile.lint(&want, serial, spki).unwrap();
                let full =
                    EnrollResponse::from_cbor(&read(case["response_full"].as_str().unwrap()))
                        .unwrap();
                assert_eq!(
                    full,
                    EnrollResponse::Full {
                        certificate: want.clone()
                    }
                );
                let json =
                    EnrollResponse::from_json(&read(case["response_full_json"].as_str().unwrap()))
                        .unwrap();
                assert_eq!(json, full);
                let EnrollResponse::Compact {
                    ca_key_id,
                    signature,
                    generation: sent,
                } = EnrollResponse::from_cbor(&read(case["response_compact"].as_str().unwrap()))
                    .unwrap()
                else {
                    panic!("{name}: compact response is not compact");
                };
                assert_eq!(
                    sent, generation,
                    "{name}: the compact response's generation"
                );
                assert_eq!(profile::cert_serial(&want).unwrap(), serial, "{name}");
                let expanded = profile
                    .expand(serial, spki, &ca_key_id, &signature)
                    .unwrap();
                assert_eq!(
                    expanded, want,
                    "{name}: compact expansion differs from the full certificate"
                );
            }
        }
    }
    assert!(ok_count >= 11);
}

#[test]
fn expansion_fails_for_a_wrong_signature_key_or_ca() {
    let ctx = context();
    let by_name = |n: &str| {
        ctx.manifest["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == n)
            .unwrap()
            .clone()
    };
    let expand_cases = cases(&ctx, "expand");
    assert_eq!(expand_cases.len(), 4);
    for case in expand_cases {
        let name = case["name"].as_str().unwrap();
        let device = by_name(case["device_case"].as_str().unwrap());
        let cert = read(device["certificate"].as_str().unwrap());
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
        // The device knows its serial, not the generation: that comes from the response.
        let serial = profile::cert_serial(&cert).unwrap().device;
        let spki = match case.get("device_spki") {
            Some(p) => read(p.as_str().unwrap()),
            None => parsed.tbs_certificate.subject_pki.raw.to_vec(),
        };
        let (profile, _) = ca(case["ca"].as_str().unwrap());
        let EnrollResponse::Compact {
            ca_key_id,
            signature,
            generation,
        } = EnrollResponse::from_cbor(&read(case["response"].as_str().unwrap())).unwrap()
        else {
            panic!("{name}: not compact");
        };
        let err = profile
            .expand(
                CertSerial::new(serial, generation),
                &spki,
                &ca_key_id,
                &signature,
            )
            .unwrap_err();
        let got = match err {
            ProfileError::SignatureInvalid => "signature-invalid",
            ProfileError::WrongCa { .. } => "wrong-ca",
            other => panic!("{name}: unexpected {other}"),
        };
        assert_eq!(got, case["expect"].as_str().unwrap(), "{name}");
    }
}

#[test]
fn provisioning_records_rebuild_their_device_s_certificate() {
    let ctx = context();
    let records = cases(&ctx, "record");
    assert_eq!(records.len(), 3);
    let mut algorithms = Vec::new();
    for case in records {
        let name = case["name"].as_str().unwrap();
        let bytes = read(case["record"].as_str().unwrap());
        assert_eq!(bytes.len() as u64, case["size"].as_u64().unwrap(), "{name}");
        // Serials 1005-1008 take 2 octets: 101 octets, 102 with generation 1; at most 104
        // for any serial below 2^32 and generation below 256, with either device key.
        assert!(bytes.len() <= 102, "{name}: {} octets", bytes.len());
        let record = ProvisioningRecord::decode(&bytes).unwrap();
        assert_eq!(*record.encode(), bytes, "{name}: encoding is canonical");
        let (profile, _) = ca(case["ca"].as_str().unwrap());
        let device = ctx.manifest["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == case["device_case"])
            .unwrap();
        let want = read(device["certificate"].as_str().unwrap());
        let (key, cert) = record.rebuild(&profile, &nonce_rng()).unwrap();
        assert_eq!(cert, want, "{name}: rebuilt certificate differs");
        algorithms.push(key.algorithm());
    }
    assert!(algorithms.contains(&protocol_spec::KeyAlgorithm::Ed25519));
    assert!(algorithms.contains(&protocol_spec::KeyAlgorithm::P256));
}

#[test]
fn secret_vectors_decode_and_carry_the_right_kcv() {
    let ctx = context();
    let secret_cases = cases(&ctx, "secret");
    assert_eq!(secret_cases.len(), 2, "aes-256 and aes-128-dukpt");
    for case in secret_cases {
        let d = SecretDelivery::from_cbor(&read(case["delivery"].as_str().unwrap())).unwrap();
        let dj = SecretDelivery::from_json(&read(case["delivery_json"].as_str().unwrap())).unwrap();
        assert_eq!(d, dj);
        assert_eq!(
            hex::encode(d.secret.as_slice()),
            case["secret_hex"].as_str().unwrap()
        );
        assert_eq!(hex::encode(&d.kcv), case["kcv_hex"].as_str().unwrap());
        d.check().unwrap();
        assert_eq!(
            d.initial_key_id.map(hex::encode),
            case["initial_key_id_hex"].as_str().map(String::from)
        );
        let a = SecretAck::from_cbor(&read(case["ack"].as_str().unwrap())).unwrap();
        assert_eq!(
            a,
            SecretAck::from_json(&read(case["ack_json"].as_str().unwrap())).unwrap()
        );
        assert_eq!(
            (a.key_id.as_str(), a.version, &a.kcv),
            (d.key_id.as_str(), d.version, &d.kcv)
        );
    }
    // The DUKPT delivery carries the published Initial Key and the JSON field initial_key_id.
    let json = String::from_utf8(read("secrets/delivery-dukpt.json")).unwrap();
    assert!(json.contains("\"initial_key_id\""), "{json}");
    let d = SecretDelivery::from_cbor(&read("secrets/delivery-dukpt.cbor")).unwrap();
    assert_eq!(
        hex::encode_upper(d.secret.as_slice()),
        "1273671EA26AC29AFA4D1084127652A1"
    );
}

#[test]
fn problem_vectors_decode_to_their_types() {
    for kind in ALL_PROBLEM_TYPES {
        let j = Problem::from_json(&read(&format!("problems/{}.json", kind.name()))).unwrap();
        let c = Problem::from_cbor(&read(&format!("problems/{}.cbor", kind.name()))).unwrap();
        assert_eq!(j.kind, kind);
        assert_eq!(c, j);
    }
}
