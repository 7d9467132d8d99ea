//! Property tests: every message round-trips through CBOR and JSON, and no decoder panics on
//! arbitrary bytes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use protocol_spec::csr::ParsedCsr;
use protocol_spec::enroll::{self, RequestEncoding};
use protocol_spec::messages::{
    EnrollRequest, EnrollResponse, ResponseForm, SecretAck, SecretDelivery,
};
use protocol_spec::problem::{ALL_PROBLEM_TYPES, Problem};
use protocol_spec::profile::CertProfile;
use protocol_spec::token::{self, FactoryClaims, LineInfo, TokenPolicy};
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::SystemRandom;

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn enroll_request_round_trips(token in bytes(600), csr in bytes(1500), compact in any::<bool>()) {
        let r = EnrollRequest { token, csr, form: if compact { ResponseForm::Compact } else { ResponseForm::Full } };
        prop_assert_eq!(EnrollRequest::from_cbor(&r.to_cbor()).unwrap(), r.clone());
        prop_assert_eq!(EnrollRequest::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn enroll_response_round_trips(a in bytes(800), b in bytes(100), compact in any::<bool>(), generation in any::<u32>()) {
        let r = if compact {
            EnrollResponse::Compact { ca_key_id: b, signature: a, generation }
        } else {
            EnrollResponse::Full { certificate: a }
        };
        prop_assert_eq!(EnrollResponse::from_cbor(&r.to_cbor()).unwrap(), r.clone());
        prop_assert_eq!(EnrollResponse::from_json(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn secret_messages_round_trip(key_id in "[a-z0-9-]{1,40}", version in any::<u64>(), secret in any::<[u8; 32]>(), dukpt in any::<Option<(bool, [u8; 8])>>()) {
        let (algorithm, secret, initial_key_id) = match dukpt {
            None => ("aes-256", secret.to_vec(), None),
            Some((true, id)) => ("aes-256-dukpt", secret.to_vec(), Some(id)),
            Some((false, id)) => ("aes-128-dukpt", secret[..16].to_vec(), Some(id)),
        };
        let kcv = protocol_spec::secret::SecretAlgorithm::from_name(algorithm).unwrap().kcv(&secret).unwrap();
        let d = SecretDelivery { key_id: key_id.clone(), version, algorithm: algorithm.into(), secret: secret.into(), kcv: kcv.clone(), initial_key_id };
        prop_assert!(d.check().is_ok());
        prop_assert_eq!(SecretDelivery::from_cbor(&d.to_cbor()).unwrap(), d.clone());
        prop_assert_eq!(SecretDelivery::from_json(&d.to_json()).unwrap(), d);
        let a = SecretAck { key_id, version, kcv };
        prop_assert_eq!(SecretAck::from_cbor(&a.to_cbor()).unwrap(), a.clone());
        prop_assert_eq!(SecretAck::from_json(&a.to_json()).unwrap(), a);
    }

    /// SPEC.md 10: `KeyId = tstr .size (1..64)`; an ack naming another is malformed, not an
    /// ack of something else.
    #[test]
    fn an_ack_key_id_outside_1_to_64_octets_is_malformed(len in prop_oneof![Just(0usize), 65usize..200]) {
        let a = SecretAck { key_id: "k".repeat(len), version: 1, kcv: vec![1, 2, 3] };
        for decoded in [SecretAck::from_cbor(&a.to_cbor()), SecretAck::from_json(&a.to_json())] {
            prop_assert_eq!(decoded.unwrap_err().kind, protocol_spec::ProblemType::Malformed);
        }
    }

    #[test]
    fn problems_round_trip(i in 0..ALL_PROBLEM_TYPES.len(), detail in ".{0,80}") {
        let p = Problem::new(ALL_PROBLEM_TYPES[i].clone(), detail);
        prop_assert_eq!(Problem::from_cbor(&p.to_cbor()).unwrap(), p.clone());
        prop_assert_eq!(Problem::from_json(&p.to_json()).unwrap(), p);
    }

    #[test]
    fn decoders_never_panic_on_random_bytes(data in bytes(3000)) {
        let _ = EnrollRequest::from_cbor(&data);
        let _ = EnrollRequest::from_json(&data);
        let _ = EnrollResponse::from_cbor(&data);
        let _ = EnrollResponse::from_json(&data);
        let _ = SecretDelivery::from_cbor(&data);
        let _ = SecretDelivery::from_json(&data);
        let _ = SecretAck::from_cbor(&data);
        let _ = SecretAck::from_json(&data);
        let _ = Problem::from_cbor(&data);
        let _ = Problem::from_json(&data);
        let _ = token::inspect(&data);
        let _ = ParsedCsr::parse(&data);
        let _ = CertProfile::from_ca_der(&data);
        let _ = PublicKey::from_spki_der(&data);
        let none = |_: &str| None::<LineInfo>;
        let _ = enroll::check(&data, RequestEncoding::Cbor, &none, 0, TokenPolicy::default());
        let _ = enroll::check(&data, RequestEncoding::Json, &none, 0, TokenPolicy::default());
    }

    #[test]
    fn mutated_valid_requests_never_panic_and_are_never_accepted_with_another_key(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)
    ) {
        let (body, dir, now) = valid_request();
        let mut mutated = body.clone();
        for (pos, x) in flips {
            let i = pos % mutated.len();
            mutated[i] ^= x.max(1);
        }
        if let Ok(checked) = enroll::check(&mutated, RequestEncoding::Cbor, &dir, now, TokenPolicy::default()) {
            // A mutation may hit bytes nobody signs (CBOR framing that still decodes the same);
            // it may never change what was vouched for.
            let orig = enroll::check(&body, RequestEncoding::Cbor, &dir, now, TokenPolicy::default()).unwrap();
            prop_assert_eq!(checked.token().claims(), orig.token().claims());
            prop_assert_eq!(checked.csr().spki_der(), orig.csr().spki_der());
        }
    }

    #[test]
    fn claims_survive_mint_and_verify(serial in 1u64.., iat in 0u64..4_000_000_000, ttl in 0u64..=token::MAX_LIFETIME, cti in bytes(64), hash in any::<[u8; 32]>()) {
        prop_assume!(!cti.is_empty());
        let key = line_key();
        let claims = FactoryClaims { line: "l".into(), serial: DeviceSerial::new(serial).unwrap(), key_hash: hash, issued_at: iat, expires_at: iat + ttl, token_id: cti };
        let t = token::mint(&claims, &key, &SystemRandom::new()).unwrap();
        let info = LineInfo { public_key: PublicKey::from(&key), first_serial: 1, last_serial: u64::MAX, active: true };
        let dir = move |_: &str| Some(info.clone());
        let v = token::verify(&t, &dir, iat, TokenPolicy::default()).unwrap();
        prop_assert_eq!(v.claims(), &claims);
    }
}

fn line_key() -> KeyPair {
    KeyPair::generate(KeyAlgorithm::Ed25519, &SystemRandom::new()).unwrap()
}

fn valid_request() -> (Vec<u8>, impl Fn(&str) -> Option<LineInfo>, u64) {
    let rng = SystemRandom::new();
    let line = line_key();
    let dev = KeyPair::generate(KeyAlgorithm::P256, &rng).unwrap();
    let serial = DeviceSerial::new(7).unwrap();
    let claims = FactoryClaims {
        line: "l".into(),
        serial,
        key_hash: protocol_spec::spki::sha256(&dev.spki_der()),
        issued_at: 1000,
        expires_at: 1600,
        token_id: vec![9; 16],
    };
    let req = EnrollRequest {
        token: token::mint(&claims, &line, &rng).unwrap(),
        csr: protocol_spec::csr::build(&dev, serial, &rng).unwrap(),
        form: ResponseForm::Full,
    };
    let info = LineInfo {
        public_key: PublicKey::from(&line),
        first_serial: 1,
        last_serial: 10,
        active: true,
    };
    (req.to_cbor(), move |_: &str| Some(info.clone()), 1100)
}
