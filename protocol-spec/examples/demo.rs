//! An in-process enrollment demo: devices, a line station and a CA, no network.
//!
//! ```text
//! cargo run --release -p protocol-spec --example demo -- 2000
//! ```
//!
//! Each device generates a key, the line station mints a token, the CA checks the request,
//! issues and lints the certificate, and the device expands the compact response back into the
//! identical certificate. Prints the rate per phase.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol_spec::enroll::{self, RequestEncoding};
use protocol_spec::messages::{EnrollRequest, EnrollResponse, ResponseForm};
use protocol_spec::profile::{self, CertProfile};
use protocol_spec::token::{self, FactoryClaims, LineInfo, TokenPolicy};
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey, csr, spki};
use ring::rand::{SecureRandom, SystemRandom};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let rng = SystemRandom::new();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
    let ca_der = profile::new_ca_certificate("Imprint Demo CA", &ca_key, now as i64, &rng).unwrap();
    let ca = CertProfile::from_ca_der(&ca_der).unwrap();
    let line_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
    let line = LineInfo {
        public_key: PublicKey::from(&line_key),
        first_serial: 1,
        last_serial: n,
        active: true,
    };
    let lines = |id: &str| (id == "demo-line").then(|| line.clone());

    let mut t = [Duration::ZERO; 4];
    let start = Instant::now();
    for s in 1..=n {
        let alg = if s % 2 == 0 {
            KeyAlgorithm::P256
        } else {
            KeyAlgorithm::Ed25519
        };
        let serial = DeviceSerial::new(s).unwrap();
        let t0 = Instant::now();
        let dev = KeyPair::generate(alg, &rng).unwrap();
        let spki_der = dev.spki_der();
        let csr = csr::build(&dev, serial, &rng).unwrap();
        let t1 = Instant::now();
        let mut cti = vec![0u8; 16];
        rng.fill(&mut cti).unwrap();
        let claims = FactoryClaims {
            line: "demo-line".into(),
            serial,
            key_hash: spki::sha256(&spki_der),
            issued_at: now,
            expires_at: now + 600,
            token_id: cti,
        };
        let tok = token::mint(&claims, &line_key, &rng).unwrap();
        let body = EnrollRequest {
            token: tok,
            csr,
            form: ResponseForm::Compact,
        }
        .to_cbor();
        let t2 = Instant::now();
        let checked = enroll::check(
            &body,
            RequestEncoding::Cbor,
            &lines,
            now,
            TokenPolicy::default(),
        )
        .unwrap();
        let issued = ca
            .issue(serial, checked.csr().spki_der(), &ca_key, &rng)
            .unwrap();
        ca.lint(&issued.der, serial, checked.csr().spki_der())
            .unwrap();
        let response = EnrollResponse::Compact {
            ca_key_id: ca.ca_key_id().to_vec(),
            signature: issued.signature.clone(),
            generation: 0,
        }
        .to_cbor();
        let t3 = Instant::now();
        let EnrollResponse::Compact {
            ca_key_id,
            signature,
            ..
        } = EnrollResponse::from_cbor(&response).unwrap()
        else {
            unreachable!()
        };
        let cert = ca
            .expand(serial, &spki_der, &ca_key_id, &signature)
            .unwrap();
        assert_eq!(cert, issued.der);
        let t4 = Instant::now();
        for (acc, d) in t.iter_mut().zip([t1 - t0, t2 - t1, t3 - t2, t4 - t3]) {
            *acc += d;
        }
    }
    let total = start.elapsed();
    println!(
        "enrolled {n} devices in-process in {total:.2?} ({:.0} devices/s on one core)",
        n as f64 / total.as_secs_f64()
    );
    for (name, d) in [
        "device keygen + CSR",
        "line token",
        "CA check + issue + lint",
        "device expand + verify",
    ]
    .iter()
    .zip(t)
    {
        println!(
            "  {name:<26} {:>8.1} us/device",
            d.as_secs_f64() * 1e6 / n as f64
        );
    }
}
