//! The crypto ceiling of this machine, measured at start-up: the per-device cost of the
//! primitives a device's life needs, on one core, so that a run on any machine says how close to
//! the limit it came. The TLS handshakes a device makes (server-authenticated for HTTPS
//! enrollment, mutual for its secret) are counted too, measured in memory with the CA's own
//! rustls configurations, both sides, no sockets.

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
    /// One server-authenticated TLS 1.3 handshake, both sides (HTTPS enrollment only).
    pub https_handshake_us: f64,
    /// One mutual TLS 1.3 handshake, both sides (the secret phases; 0 with `--no-secrets`).
    pub mtls_handshake_us: f64,
    /// Sum, one core.
    pub per_device_us: f64,
    /// Cores available.
    pub cores: usize,
    /// Devices per second if every core did nothing but this crypto.
    pub devices_per_second: f64,
    /// The clock that timed it.
    pub clock: ClockKind,
}

/// Which TLS handshakes a device's life includes.
#[derive(Debug, Clone, Copy)]
pub struct Handshakes {
    /// Enrollment over HTTPS (a new connection per device).
    pub https: bool,
    /// Secret fetch + ack over mutual TLS (one connection).
    pub mtls: bool,
}

/// Measures with `n` devices (a fraction of a second).
pub fn measure(
    n: u32,
    device_alg: KeyAlgorithm,
    ca_alg: KeyAlgorithm,
    handshakes: Handshakes,
) -> Result<Ceiling, String> {
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
    // Each primitive runs as its own batch over all `n` devices, timed by this thread's CPU
    // time: a time slice lost to another process on a shared machine is not crypto. Where
    // that cannot be read, wall time, and the ceiling says so (`clock`).
    let mut per = Vec::new();
    let mut clock = CpuClock::start();
    let devices = (1..=u64::from(n))
        .map(|i| {
            let serial = DeviceSerial::new(i).ok_or("serial")?;
            let dev = KeyPair::generate(device_alg, &rng).map_err(|x| e(&x))?;
            let spki_der = dev.spki_der();
            let csr = csr::build(&dev, serial, &rng).map_err(|x| e(&x))?;
            Ok((serial, spki_der, csr))
        })
        .collect::<Result<Vec<_>, String>>()?;
    per.push(clock.lap(n));
    let bodies = devices
        .iter()
        .map(|(serial, spki_der, csr)| {
            let claims = FactoryClaims {
                line: "l".into(),
                serial: *serial,
                key_hash: spki::sha256(spki_der),
                issued_at: 10,
                expires_at: 600,
                token_id: serial.get().to_be_bytes().to_vec(),
            };
            let tok = token::mint(&claims, &line, &rng).map_err(|x| e(&x))?;
            Ok(EnrollRequest {
                token: tok,
                csr: csr.clone(),
                form: ResponseForm::Compact,
            }
            .to_cbor())
        })
        .collect::<Result<Vec<_>, String>>()?;
    per.push(clock.lap(n));
    let checked = bodies
        .iter()
        .map(|body| {
            enroll::check(
                body,
                RequestEncoding::Cbor,
                &dir,
                100,
                TokenPolicy::default(),
            )
            .map_err(|x| e(&x))
        })
        .collect::<Result<Vec<_>, String>>()?;
    per.push(clock.lap(n));
    let issued = devices
        .iter()
        .zip(&checked)
        .map(|((serial, spki_der, _), c)| {
            let issued = ca
                .issue(*serial, c.csr().spki_der(), &ca_key, &rng)
                .map_err(|x| e(&x))?;
            ca.lint(&issued.der, *serial, spki_der).map_err(|x| e(&x))?;
            Ok(issued)
        })
        .collect::<Result<Vec<_>, String>>()?;
    per.push(clock.lap(n));
    for ((serial, spki_der, _), issued) in devices.iter().zip(&issued) {
        ca.expand(*serial, spki_der, ca.ca_key_id(), &issued.signature)
            .map_err(|x| e(&x))?;
    }
    per.push(clock.lap(n));
    let (https_us, mtls_us, tls_clock) = tls::measure(100, device_alg, ca_alg)?;
    let https_handshake_us = if handshakes.https { https_us } else { 0.0 };
    let mtls_handshake_us = if handshakes.mtls { mtls_us } else { 0.0 };
    let per_device_us: f64 = per.iter().sum::<f64>() + https_handshake_us + mtls_handshake_us;
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    Ok(Ceiling {
        device_keygen_csr_us: per[0],
        token_sign_us: per[1],
        ca_verify_us: per[2],
        ca_issue_us: per[3],
        device_verify_us: per[4],
        https_handshake_us,
        mtls_handshake_us,
        per_device_us,
        cores,
        devices_per_second: cores as f64 * 1e6 / per_device_us,
        clock: clock.kind.and(tls_clock),
    })
}

/// Which clock timed the ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClockKind {
    /// The measuring thread's CPU time (`/proc/thread-self/schedstat`): time slices lost to
    /// other processes are not counted.
    ThreadCpu,
    /// Wall time, because this thread's CPU time could not be read: a busy machine makes the
    /// primitives look slower and the ceiling lower.
    Wall,
}

impl ClockKind {
    /// For people.
    pub fn describe(self) -> &'static str {
        match self {
            ClockKind::ThreadCpu => "thread CPU time",
            ClockKind::Wall => {
                "wall time (thread CPU time unreadable: a busy machine lowers the ceiling)"
            }
        }
    }

    /// Wall if either is.
    fn and(self, other: ClockKind) -> ClockKind {
        if self == ClockKind::Wall || other == ClockKind::Wall {
            ClockKind::Wall
        } else {
            ClockKind::ThreadCpu
        }
    }
}

/// Times laps in this thread's CPU time (Linux `/proc/thread-self/schedstat`, nanoseconds on a
/// CPU) or, from the first lap where that cannot be read, in wall time, and remembers which.
struct CpuClock {
    kind: ClockKind,
    last_cpu_us: Option<f64>,
    last_wall: Instant,
}

impl CpuClock {
    fn thread_cpu_us() -> Option<f64> {
        std::fs::read_to_string("/proc/thread-self/schedstat")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map(|ns| ns / 1000.0)
    }

    fn start() -> Self {
        let last_cpu_us = Self::thread_cpu_us();
        CpuClock {
            kind: if last_cpu_us.is_some() {
                ClockKind::ThreadCpu
            } else {
                ClockKind::Wall
            },
            last_cpu_us,
            last_wall: Instant::now(),
        }
    }

    /// Microseconds per item since the last lap, for `n` items.
    fn lap(&mut self, n: u32) -> f64 {
        let wall = Instant::now();
        let wall_us = (wall - self.last_wall).as_secs_f64() * 1e6;
        self.last_wall = wall;
        let cpu = Self::thread_cpu_us();
        let elapsed = match (self.kind, self.last_cpu_us, cpu) {
            (ClockKind::ThreadCpu, Some(before), Some(now)) => now - before,
            _ => {
                self.kind = ClockKind::Wall;
                wall_us
            }
        };
        self.last_cpu_us = cpu;
        elapsed / f64::from(n.max(1))
    }
}

/// TLS handshakes in memory with the CA's real rustls configurations.
mod tls {
    use std::sync::Arc;

    use ca_server::config::CaDir;
    use ca_server::setup::{self, InitOptions};
    use protocol_spec::profile::{self, CertProfile};
    use protocol_spec::{DeviceSerial, KeyAlgorithm, KeyPair};
    use ring::rand::SystemRandom;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

    /// Microseconds per (HTTPS, mutual-TLS) handshake, both sides together, averaged over `n`.
    pub fn measure(
        n: u32,
        device_alg: KeyAlgorithm,
        ca_alg: KeyAlgorithm,
    ) -> Result<(f64, f64, super::ClockKind), String> {
        let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
        let dir = CaDir::new(tmp.path().join("ca"));
        setup::init(
            &dir,
            &InitOptions {
                algorithm: ca_alg,
                name: "ceiling".into(),
                tls_names: vec![],
                now: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs().saturating_sub(3600))
                    .unwrap_or(0),
                store: Default::default(),
                ca_key: Default::default(),
            },
        )?;
        let rng = SystemRandom::new();
        let ca_pem = std::fs::read_to_string(dir.ca_cert()).map_err(|e| e.to_string())?;
        let ca_der = profile::cert_from_pem(&ca_pem).ok_or("CA certificate")?;
        let ca_key = KeyPair::from_pem(
            &std::fs::read_to_string(dir.ca_key()).map_err(|e| e.to_string())?,
            &rng,
        )
        .map_err(|e| e.to_string())?;
        let device = KeyPair::generate(device_alg, &rng).map_err(|e| e.to_string())?;
        let serial = DeviceSerial::new(1).ok_or("serial")?;
        let cert = CertProfile::from_ca_der(&ca_der)
            .and_then(|p| p.issue(serial, &device.spki_der(), &ca_key, &rng))
            .map_err(|e| e.to_string())?
            .der;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.clone()))
            .map_err(|e| e.to_string())?;
        let plain = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let mutual = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from(cert)],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(device.pkcs8_der().to_vec())),
            )
            .map_err(|e| e.to_string())?;
        let https = ca_server::tls::https_server_config(
            &dir.tls_cert(),
            &ca_server::tls::ServerKey::file(&dir.tls_key())?,
        )?;
        let mtls = ca_server::tls::mtls_server_config(
            &dir.ca_cert(),
            &dir.tls_cert(),
            &ca_server::tls::ServerKey::file(&dir.tls_key())?,
            Arc::new(ca_server::revocation::Revocations::default()),
        )?;
        let time = |client: Arc<ClientConfig>,
                    server: Arc<ServerConfig>|
         -> Result<(f64, super::ClockKind), String> {
            handshake(&client, &server)?; // warm-up
            let mut clock = super::CpuClock::start();
            for _ in 0..n {
                handshake(&client, &server)?;
            }
            Ok((clock.lap(n), clock.kind))
        };
        let (https_us, a) = time(Arc::new(plain), https)?;
        let (mtls_us, b) = time(Arc::new(mutual), mtls)?;
        Ok((https_us, mtls_us, a.and(b)))
    }

    /// One full handshake, the flights passed between the two sides in memory.
    fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Result<(), String> {
        let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
        let mut c = ClientConnection::new(client.clone(), name).map_err(|e| e.to_string())?;
        let mut s = ServerConnection::new(server.clone()).map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        for _ in 0..10 {
            if !c.is_handshaking() && !s.is_handshaking() {
                return Ok(());
            }
            buf.clear();
            while c.wants_write() {
                c.write_tls(&mut buf).map_err(|e| e.to_string())?;
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).map_err(|e| e.to_string())?;
                s.process_new_packets().map_err(|e| e.to_string())?;
            }
            buf.clear();
            while s.wants_write() {
                s.write_tls(&mut buf).map_err(|e| e.to_string())?;
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).map_err(|e| e.to_string())?;
                c.process_new_packets().map_err(|e| e.to_string())?;
            }
        }
        Err("the in-memory TLS handshake did not finish".into())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn the_clock_says_which_time_it_measured() {
        // Sleeping costs no CPU: thread CPU time barely moves, wall time moves by the sleep.
        let mut cpu = CpuClock::start();
        assert_eq!(cpu.kind, ClockKind::ThreadCpu, "Linux has schedstat");
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(cpu.lap(1) < 50_000.0);
        let mut wall = CpuClock {
            kind: ClockKind::Wall,
            last_cpu_us: None,
            last_wall: Instant::now(),
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert!(wall.lap(1) >= 100_000.0);
        assert_eq!(ClockKind::ThreadCpu.and(ClockKind::Wall), ClockKind::Wall);
        let c = measure(
            20,
            KeyAlgorithm::Ed25519,
            KeyAlgorithm::Ed25519,
            Handshakes {
                https: false,
                mtls: false,
            },
        )
        .unwrap();
        assert_eq!(c.clock, ClockKind::ThreadCpu);
    }
}
