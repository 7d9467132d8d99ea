//! The crypto ceiling of this machine, measured at start-up: the per-device cost of the
//! primitives a device's life needs, on one core, so that a run on any machine says how close to
//! the limit it came.

use std::time::Instant;

use protocol_spec::enroll::{self, RequestEncoding};
use protocol_spec::messages::{EnrollRequest, ResponseForm};
use protocol_spec::profile::{self, CertProfile};
use protocol_spec::token::{self, FactoryClaims, LineInfo, TokenPolicy};
use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair, PublicKey, csr, spki};
use ring::rand::SystemRandom;
use serde::Serialize;

/// Microseconds per device for each primitive, and the resulting ceiling.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// Device keygen + CSR.
    pub device_keygen_csr_us: f64,
    /// Line station token signature.
    pub token_sign_us: f64,
    /// CA: token verify + CSR verify.
    pub ca_verify_us: f64,
    /// CA: certificate sign + lint.
    pub ca_issue_us: f64,
    /// Device: expand + verify the response.
    pub device_verify_us: f64,
    /// Sum, one core.
    pub per_device_us: f64,
    /// Cores available.
    pub cores: usize,
    /// Devices per second if every core did nothing but this crypto.
    pub devices_per_second: f64,
}

/// Measures with `n` devices (a fraction of a second).
pub fn measure(n: u32, device_alg: KeyAlgorithm, ca_alg: KeyAlgorithm) -> Result<Ceiling, String> {
    let rng = SystemRandom::new();
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let ca_key = KeyPair::generate(ca_alg, &rng).map_err(|x| e(&x))?;
    let ca = CertProfile::from_ca_der(
        &profile::new_ca_certificate("ceiling", &ca_key, 0, &rng).map_err(|x| e(&x))?,
    )
    .map_err(|x| e(&x))?;
    let line = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).map_err(|x| e(&x))?;
    let info = LineInfo {
        public_key: PublicKey::from(&line),
        first_serial: 1,
        last_serial: u64::MAX,
        active: true,
    };
    let dir = |_: &str| Some(info.clone());
    let mut t = [0f64; 5];
    for i in 1..=u64::from(n) {
        let serial = DeviceSerial::new(i).ok_or("serial")?;
        let s = Instant::now();
        let dev = KeyPair::generate(device_alg, &rng).map_err(|x| e(&x))?;
        let spki_der = dev.spki_der();
        let csr = csr::build(&dev, serial, &rng).map_err(|x| e(&x))?;
        let a = Instant::now();
        let claims = FactoryClaims {
            line: "l".into(),
            serial,
            key_hash: spki::sha256(&spki_der),
            issued_at: 10,
            expires_at: 600,
            token_id: i.to_be_bytes().to_vec(),
        };
        let tok = token::mint(&claims, &line, &rng).map_err(|x| e(&x))?;
        let body = EnrollRequest {
            token: tok,
            csr,
            form: ResponseForm::Compact,
        }
        .to_cbor();
        let b = Instant::now();
        let checked = enroll::check(
            &body,
            RequestEncoding::Cbor,
            &dir,
            100,
            TokenPolicy::default(),
        )
        .map_err(|x| e(&x))?;
        let c = Instant::now();
        let issued = ca
            .issue(serial, checked.csr().spki_der(), &ca_key, &rng)
            .map_err(|x| e(&x))?;
        ca.lint(&issued.der, serial, &spki_der).map_err(|x| e(&x))?;
        let d = Instant::now();
        ca.expand(serial, &spki_der, ca.ca_key_id(), &issued.signature)
            .map_err(|x| e(&x))?;
        let f = Instant::now();
        for (acc, dt) in t.iter_mut().zip([a - s, b - a, c - b, d - c, f - d]) {
            *acc += dt.as_secs_f64() * 1e6;
        }
    }
    let n = f64::from(n.max(1));
    let per: Vec<f64> = t.iter().map(|x| x / n).collect();
    let per_device_us: f64 = per.iter().sum();
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    Ok(Ceiling {
        device_keygen_csr_us: per[0],
        token_sign_us: per[1],
        ca_verify_us: per[2],
        ca_issue_us: per[3],
        device_verify_us: per[4],
        per_device_us,
        cores,
        devices_per_second: cores as f64 * 1e6 / per_device_us,
    })
}
