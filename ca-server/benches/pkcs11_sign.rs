//! Signatures per second with the CA key in a PKCS#11 token (SoftHSM2), through the CA's session
//! pool (`TokenKey::sign_x509`), beside the same loop with the key in a file (`KeyPair`, what
//! `ca.key.pem` loads into) and a raw cryptoki loop (one session per thread, logged in, the key
//! handle found before the clock starts, then `C_SignInit` + `C_Sign` per message and nothing
//! else), so that the pool's own cost shows as a ratio.
//!
//! ```text
//! cargo bench -p ca-server --bench pkcs11_sign -- [SIGNATURES] [THREADS] [SESSIONS]
//! ```
//!
//! SIGNATURES: per algorithm and path (default 20000); THREADS: signing at once (default: the
//! CPU threads); SESSIONS: the pool's cap, `[issuer] pkcs11_sessions` (default THREADS). Both
//! algorithms run: Ed25519 (`CKM_EDDSA`) and P-256 (`CKM_ECDSA` over the SHA-256 digest, which
//! the raw loop computes too). Every path signs the same 300-byte messages (a certificate's
//! to-be-signed part is about that size), each signature of the run is checked afterwards
//! outside the clock (one per thread and path).
//!
//! The bench makes its own SoftHSM2 token in a temporary folder (`softhsm2-util`, Debian
//! package softhsm2) and runs itself again as a child process with `SOFTHSM2_CONF` pointing
//! there: a module reads it once per process.
// A benchmark aborts on failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use ca_server::issuer::{Pkcs11Uri, SessionLimits, TokenKey};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::eddsa::{EddsaParams, EddsaSignatureScheme};
use cryptoki::object::{Attribute, ObjectClass};
use cryptoki::session::UserType;
use cryptoki::types::AuthPin;
use protocol_spec::{KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::SystemRandom;

const CHILD: &str = "IMPRINT_PKCS11_SIGN_BENCH_PIN_FILE";
const TOKEN: &str = "imprint-bench";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let Ok(pin_file) = std::env::var(CHILD) else {
        // The parent: a token of its own, then the same binary again with SOFTHSM2_CONF set.
        let token = common::SoftHsmToken::new(TOKEN);
        let status = Command::new(std::env::current_exe().unwrap())
            .args(&args)
            .env("SOFTHSM2_CONF", &token.conf)
            .env(CHILD, &token.pin_file)
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    };
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let threads: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(cpus)
        .max(1);
    let sessions: usize = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(threads)
        .max(1);
    let limits = SessionLimits {
        max: sessions,
        wait: Duration::from_secs(60),
    };
    println!(
        "pkcs11_sign: {n} signatures per algorithm and path, {threads} threads, a pool of {sessions} sessions, SoftHSM2 token in a temporary folder"
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>9} {:>9}",
        "key", "file/s", "pool/s", "raw/s", "pool/raw", "pool/file"
    );
    let raw = RawToken::open(&pin_file);
    let rng = SystemRandom::new();
    for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
        let messages = messages(n);
        let file_key = KeyPair::generate(alg, &rng).unwrap();
        let file = run(
            &messages,
            threads,
            &public(alg, file_key.public_key_raw()),
            |m| file_key.sign_x509(m, &rng).unwrap(),
        );

        let uri = Pkcs11Uri::parse(&format!(
            "pkcs11:token={TOKEN};object=bench-{}?module-path={}&pin-source=file:{pin_file}",
            alg.name(),
            common::SOFTHSM_MODULE
        ))
        .unwrap();
        let token_key = TokenKey::generate(&uri, alg, &limits).unwrap();
        let token_public = public(alg, token_key.public_key_raw());
        let pool = run(&messages, threads, &token_public, |m| {
            token_key.sign_x509(m).unwrap()
        });
        let stats = token_key.session_stats();
        assert!(stats.peak_open <= sessions, "{stats:?}");

        let raw_rate = raw.run(&uri.object, alg, &messages, threads, &token_public);
        println!(
            "{:<8} {:>12.0} {:>12.0} {:>12.0} {:>8.0}% {:>8.0}%",
            alg.name(),
            file,
            pool,
            raw_rate,
            100.0 * pool / raw_rate,
            100.0 * pool / file
        );
    }
}

/// `n` messages of 300 bytes, each different.
fn messages(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut m = vec![0x5a; 300];
            m[..8].copy_from_slice(&(i as u64).to_be_bytes());
            m
        })
        .collect()
}

fn public(algorithm: KeyAlgorithm, raw: &[u8]) -> PublicKey {
    PublicKey {
        algorithm,
        raw: raw.to_vec(),
    }
}

/// Signs every message with `sign` from `threads` threads (each its share, in order); the
/// signatures per second. The last signature of each thread is checked afterwards, off the
/// clock.
fn run(
    messages: &[Vec<u8>],
    threads: usize,
    public: &PublicKey,
    sign: impl Fn(&[u8]) -> Vec<u8> + Sync,
) -> f64 {
    let share = messages.len().div_ceil(threads).max(1);
    let started = Instant::now();
    let last: Vec<Option<(usize, Vec<u8>)>> = std::thread::scope(|s| {
        let handles: Vec<_> = messages
            .chunks(share)
            .enumerate()
            .map(|(t, chunk)| {
                let sign = &sign;
                s.spawn(move || {
                    let mut last = None;
                    for (i, m) in chunk.iter().enumerate() {
                        last = Some((t * share + i, sign(m)));
                    }
                    last
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let rate = messages.len() as f64 / started.elapsed().as_secs_f64();
    for (i, sig) in last.into_iter().flatten() {
        assert!(
            public.verify_x509(&messages[i], &sig),
            "{} signature {i} does not verify",
            public.algorithm
        );
    }
    rate
}

/// The token through cryptoki alone, without the CA's pool.
struct RawToken {
    ctx: Pkcs11,
    slot: cryptoki::slot::Slot,
    pin: String,
}

impl RawToken {
    fn open(pin_file: &str) -> Self {
        let ctx = Pkcs11::new(common::SOFTHSM_MODULE).unwrap();
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(P11Error::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => panic!("C_Initialize: {e}"),
        }
        let slot = ctx
            .get_slots_with_token()
            .unwrap()
            .into_iter()
            .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == TOKEN)
            .unwrap();
        let pin = std::fs::read_to_string(pin_file)
            .unwrap()
            .trim_end()
            .to_string();
        RawToken { ctx, slot, pin }
    }

    /// [`run`] with one session per thread, opened and logged in (and the key found) before
    /// the clock starts; the raw signature turned into X.509's form after it stops.
    fn run(
        &self,
        label: &str,
        alg: KeyAlgorithm,
        messages: &[Vec<u8>],
        threads: usize,
        public: &PublicKey,
    ) -> f64 {
        let share = messages.len().div_ceil(threads).max(1);
        let chunks: Vec<_> = messages.chunks(share).collect();
        let ready = std::sync::Barrier::new(chunks.len() + 1);
        let (elapsed, last) = std::thread::scope(|s| {
            let handles: Vec<_> = chunks
                .iter()
                .enumerate()
                .map(|(t, chunk)| {
                    let ready = &ready;
                    s.spawn(move || {
                        let session = self.ctx.open_rw_session(self.slot).unwrap();
                        let pin: AuthPin = self.pin.clone().into();
                        match session.login(UserType::User, Some(&pin)) {
                            Ok(()) | Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => {}
                            Err(e) => panic!("C_Login: {e}"),
                        }
                        let key = session
                            .find_objects(&[
                                Attribute::Class(ObjectClass::PRIVATE_KEY),
                                Attribute::Label(label.as_bytes().to_vec()),
                            ])
                            .unwrap()[0];
                        let mechanism = match alg {
                            KeyAlgorithm::Ed25519 => {
                                Mechanism::Eddsa(EddsaParams::new(EddsaSignatureScheme::Pure))
                            }
                            KeyAlgorithm::P256 => Mechanism::Ecdsa,
                        };
                        ready.wait();
                        let mut last = None;
                        for (i, m) in chunk.iter().enumerate() {
                            let sig = match alg {
                                KeyAlgorithm::Ed25519 => session.sign(&mechanism, key, m),
                                KeyAlgorithm::P256 => session.sign(
                                    &mechanism,
                                    key,
                                    ring::digest::digest(&ring::digest::SHA256, m).as_ref(),
                                ),
                            }
                            .unwrap();
                            last = Some((t * share + i, sig));
                        }
                        last
                    })
                })
                .collect();
            ready.wait();
            let started = Instant::now();
            let last: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            (started.elapsed(), last)
        });
        for (i, sig) in last.into_iter().flatten() {
            let sig = match alg {
                KeyAlgorithm::Ed25519 => sig,
                KeyAlgorithm::P256 => ecdsa_der(&sig),
            };
            assert!(
                public.verify_x509(&messages[i], &sig),
                "raw {alg} signature {i} does not verify"
            );
        }
        messages.len() as f64 / elapsed.as_secs_f64()
    }
}

/// The DER `Ecdsa-Sig-Value` for a raw r||s (for the check only).
fn ecdsa_der(rs: &[u8]) -> Vec<u8> {
    let integer = |x: &[u8]| {
        let x = &x[x.iter().position(|b| *b != 0).unwrap_or(x.len() - 1)..];
        let mut out = vec![0x02];
        if x[0] & 0x80 != 0 {
            out.extend([x.len() as u8 + 1, 0]);
        } else {
            out.push(x.len() as u8);
        }
        out.extend_from_slice(x);
        out
    };
    let (r, s) = rs.split_at(rs.len() / 2);
    let (r, s) = (integer(r), integer(s));
    let mut der = vec![0x30, (r.len() + s.len()) as u8];
    der.extend(r);
    der.extend(s);
    der
}
