//! The token's session pool used from many threads of one process, against a real SoftHSM2
//! token: signers beyond the session cap wait for a session (and never make the token open
//! more), a signer that waits too long is told `unavailable`; and token objects made while
//! other threads search the token are all made (the suite's test CAs share one token, and
//! SoftHSM2 before 2.7.0, Debian 12 ships 2.6.1, fails an object's creation with
//! CKR_GENERAL_ERROR when a `C_FindObjects` in the same process reads the new object's file
//! while it is still empty: SoftHSMv2 issue 573; the issuer holds searches and creations one at
//! a time).
//!
//! A PKCS#11 module reads `SOFTHSM2_CONF` once per process, so each test runs itself again as a
//! child process with the variable set (the test process's own environment is left alone).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ca_server::issuer::pkcs11::session::{Fault, TokenSessions};
use ca_server::issuer::{Pkcs11Uri, SessionLimits, SignError, TokenKey};
use protocol_spec::{KeyAlgorithm, PublicKey};

const MODULE: &str = common::SOFTHSM_MODULE;
const CHILD: &str = "IMPRINT_PKCS11_THREADS_PIN_FILE";

/// Runs `body` (given the PIN file) in a child process running only the test `name`, with a
/// new token labelled `threads` of its own.
fn in_own_process(name: &str, body: impl FnOnce(&str)) {
    if let Ok(pin_file) = std::env::var(CHILD) {
        return body(&pin_file);
    }
    let token = common::SoftHsmToken::new("threads");
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env("SOFTHSM2_CONF", &token.conf)
        .env(CHILD, &token.pin_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn keys_made_while_other_threads_search_the_token_are_all_made() {
    in_own_process(
        "keys_made_while_other_threads_search_the_token_are_all_made",
        make_and_search_at_once,
    );
}

/// 16 threads sign through two keys (Ed25519 and P-256) of one token whose pool may open 2
/// sessions: every signature verifies under its key, the two keys share one pool, and the
/// token never had more than 2 sessions open: the pool counts a session from before its
/// `C_OpenSession` to after its `C_CloseSession`, and a watcher thread also reads the token's
/// own count (`ulSessionCount`) throughout, for modules that report one (SoftHSM2 2.6.1
/// does not, and its session handles come from a counter shared with objects, so they do not
/// tell either).
#[test]
fn sixteen_signers_share_a_cap_of_two_sessions_and_every_signature_verifies() {
    in_own_process(
        "sixteen_signers_share_a_cap_of_two_sessions_and_every_signature_verifies",
        |pin_file| {
            let limits = SessionLimits {
                max: 2,
                wait: Duration::from_secs(60),
            };
            let keys = [KeyAlgorithm::Ed25519, KeyAlgorithm::P256]
                .map(|alg| TokenKey::generate(&uri(pin_file, alg.name()), alg, &limits).unwrap());
            let signed = AtomicUsize::new(0);
            let token_counts = std::thread::scope(|s| {
                let watcher = s.spawn(|| {
                    let mut seen = Vec::new();
                    // Until every signature is made (or a signer failed, and so never will).
                    let give_up = Instant::now() + Duration::from_secs(120);
                    while signed.load(Ordering::SeqCst) < 16 * 24 && Instant::now() < give_up {
                        seen.extend(keys[0].session_stats().token_count);
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    seen
                });
                for t in 0..16 {
                    let (keys, signed) = (&keys, &signed);
                    s.spawn(move || {
                        for i in 0..24 {
                            let key = &keys[(t + i) % 2];
                            let msg = format!("message {i} of signer {t}");
                            let sig = key
                                .sign_x509(msg.as_bytes())
                                .unwrap_or_else(|e| panic!("signer {t}: {e}"));
                            let public = PublicKey {
                                algorithm: key.algorithm(),
                                raw: key.public_key_raw().to_vec(),
                            };
                            assert!(public.verify_x509(msg.as_bytes(), &sig), "{t}-{i}");
                            signed.fetch_add(1, Ordering::SeqCst);
                        }
                    });
                }
                watcher.join().unwrap()
            });
            assert!(token_counts.iter().all(|n| *n <= 2), "{token_counts:?}");
            assert_eq!(signed.load(Ordering::SeqCst), 16 * 24);
            let stats = keys[0].session_stats();
            assert_eq!(stats, keys[1].session_stats(), "one pool for the token");
            assert_eq!(stats.max, 2);
            assert_eq!(stats.peak_open, 2, "{stats:?}");
            assert!(stats.open <= 2, "{stats:?}");
            println!("384 signatures from 16 threads on at most 2 sessions: {stats:?}");
        },
    );
}

/// With every session busy, a signer waits for one: past the wait it is told `unavailable`
/// (nothing signed, no session opened beyond the cap); a signer waiting when the session comes
/// back gets it.
#[test]
fn a_signer_that_finds_every_session_busy_waits_then_is_unavailable() {
    in_own_process(
        "a_signer_that_finds_every_session_busy_waits_then_is_unavailable",
        |pin_file| {
            let wait = Duration::from_secs(2);
            let limits = SessionLimits { max: 1, wait };
            let u = uri(pin_file, "busy");
            let key = TokenKey::generate(&u, KeyAlgorithm::Ed25519, &limits).unwrap();
            // The pool the key signs through: this process's one pool for the token.
            let pool = TokenSessions::open(&u, &limits).unwrap();
            let (held_tx, held) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            std::thread::scope(|s| {
                let holder = s.spawn({
                    let pool = pool.clone();
                    move || {
                        pool.with_session(|_, _| {
                            held_tx.send(()).unwrap();
                            release_rx.recv().unwrap();
                            Ok::<_, Fault<()>>(())
                        })
                    }
                });
                held.recv().unwrap();
                let started = Instant::now();
                match key.sign_x509(b"no session for me") {
                    Err(SignError::Unavailable(why)) => {
                        assert!(why.contains("busy"), "{why}");
                        assert!(!why.contains(common::SOFTHSM_PIN), "{why}");
                    }
                    other => panic!("{other:?}"),
                }
                assert!(started.elapsed() >= wait, "{:?}", started.elapsed());
                let waiter = s.spawn(|| key.sign_x509(b"my turn"));
                std::thread::sleep(Duration::from_millis(100));
                release.send(()).unwrap();
                holder.join().unwrap().unwrap();
                let sig = waiter.join().unwrap().unwrap();
                let public = PublicKey {
                    algorithm: KeyAlgorithm::Ed25519,
                    raw: key.public_key_raw().to_vec(),
                };
                assert!(public.verify_x509(b"my turn", &sig));
            });
            let stats = pool.stats();
            assert_eq!((stats.peak_open, stats.open), (1, 1), "{stats:?}");
        },
    );
}

/// A call whose closure panics gives its session's place back (issue 15): the pool, at a cap
/// of one session, serves the next call at once. Before, the panic lost the place for good and
/// every later call waited, then was told `unavailable`.
#[test]
fn a_call_that_panics_frees_its_session_for_the_next_call() {
    in_own_process(
        "a_call_that_panics_frees_its_session_for_the_next_call",
        |pin_file| {
            let limits = SessionLimits {
                max: 1,
                wait: Duration::from_secs(2),
            };
            let u = uri(pin_file, "panics");
            let key = TokenKey::generate(&u, KeyAlgorithm::Ed25519, &limits).unwrap();
            let pool = TokenSessions::open(&u, &limits).unwrap();
            let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.with_session(|_, _| -> Result<(), Fault<()>> {
                    panic!("a bug in a session call")
                })
            }));
            assert!(panicked.is_err());
            assert_eq!(pool.stats().open, 0, "{:?}", pool.stats());
            let started = Instant::now();
            let sig = key
                .sign_x509(b"after the panic")
                .unwrap_or_else(|e| panic!("{e}"));
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
            let public = PublicKey {
                algorithm: KeyAlgorithm::Ed25519,
                raw: key.public_key_raw().to_vec(),
            };
            assert!(public.verify_x509(b"after the panic", &sig));
            let stats = pool.stats();
            assert_eq!((stats.peak_open, stats.open), (1, 1), "{stats:?}");
        },
    );
}

/// `init --pkcs11-existing` uses the operator CA's key already in the token and makes one only
/// when the token holds nothing of that label (issue 15): a wrong PIN stops it with the PIN's
/// error, and so does a public key left without its private half, with nothing made. Before,
/// any failure to open the key was taken for its absence and a key pair generated (beside the
/// lone public key, which then made the label ambiguous).
#[test]
fn an_existing_operator_key_is_made_only_when_the_token_holds_none() {
    in_own_process(
        "an_existing_operator_key_is_made_only_when_the_token_holds_none",
        |pin_file| {
            use ca_server::config::CaDir;
            use ca_server::operators::{OperatorCaKey, ensure_operator_ca};
            use cryptoki::object::{Attribute, ObjectClass};
            let limits = SessionLimits::default();
            let tmp = tempfile::tempdir().unwrap();
            let dir = CaDir::new(tmp.path());
            let existing = |uri: Pkcs11Uri| OperatorCaKey::Token {
                uri,
                limits,
                existing: true,
            };
            let wrong_pin = Pkcs11Uri::parse(&format!(
                "pkcs11:token=threads;object=ca?module-path={MODULE}&pin-value=97531"
            ))
            .unwrap();
            let err = ensure_operator_ca(&dir, &existing(wrong_pin), 1_700_000_000).unwrap_err();
            assert!(err.contains("PIN is wrong"), "{err}");
            assert_eq!(err.lines().count(), 1, "{err}");
            assert!(!err.contains("97531"), "{err}");
            assert!(!dir.operator_ca_cert().exists());

            // The labels of the objects of `class` in the token.
            let u = uri(pin_file, "ca");
            let pool = TokenSessions::open(&u, &limits).unwrap();
            let labels = |class: ObjectClass| {
                pool.with_session(|session, _| {
                    let mut labels = Vec::new();
                    for h in session.find_objects(&[Attribute::Class(class)]).unwrap() {
                        for a in session
                            .get_attributes(h, &[cryptoki::object::AttributeType::Label])
                            .unwrap()
                        {
                            if let Attribute::Label(l) = a {
                                labels.push(String::from_utf8(l).unwrap());
                            }
                        }
                    }
                    labels.sort();
                    Ok::<_, Fault<()>>(labels)
                })
                .unwrap()
            };
            assert!(labels(ObjectClass::PRIVATE_KEY).is_empty());

            // A public key labelled ca-operators, its private half gone.
            let lone = uri(pin_file, "ca-operators");
            TokenKey::generate(&lone, KeyAlgorithm::P256, &limits).unwrap();
            pool.with_session(|session, _| {
                for h in session
                    .find_objects(&[
                        Attribute::Class(ObjectClass::PRIVATE_KEY),
                        Attribute::Label(b"ca-operators".to_vec()),
                    ])
                    .unwrap()
                {
                    session.destroy_object(h).unwrap();
                }
                Ok::<_, Fault<()>>(())
            })
            .unwrap();
            let err = ensure_operator_ca(&dir, &existing(u.clone()), 1_700_000_000).unwrap_err();
            assert!(
                err.contains("public key with that label but no private key"),
                "{err}"
            );
            assert!(labels(ObjectClass::PRIVATE_KEY).is_empty());
            assert_eq!(labels(ObjectClass::PUBLIC_KEY), ["ca-operators"]);
            assert!(!dir.operator_ca_cert().exists());

            // Nothing of that label: made.
            pool.with_session(|session, _| {
                for h in session
                    .find_objects(&[Attribute::Label(b"ca-operators".to_vec())])
                    .unwrap()
                {
                    session.destroy_object(h).unwrap();
                }
                Ok::<_, Fault<()>>(())
            })
            .unwrap();
            assert!(ensure_operator_ca(&dir, &existing(u), 1_700_000_000).unwrap());
            assert!(dir.operator_ca_cert().exists());
            assert_eq!(labels(ObjectClass::PRIVATE_KEY), ["ca-operators"]);
        },
    );
}

/// Signers that wait for a session do so off the async workers: with both workers of a
/// two-worker runtime signing while the one session is held elsewhere, a task that only sleeps
/// 50 ms still finishes at once. Before, each waiting signer held its worker for the whole wait
/// (3 s here), and every task of the runtime (the CA's doors, its timers) with it.
#[test]
fn signers_waiting_for_a_session_leave_the_async_runtime_running() {
    in_own_process(
        "signers_waiting_for_a_session_leave_the_async_runtime_running",
        |pin_file| {
            let limits = SessionLimits {
                max: 1,
                wait: Duration::from_secs(3),
            };
            let u = uri(pin_file, "runtime");
            let key = std::sync::Arc::new(
                TokenKey::generate(&u, KeyAlgorithm::Ed25519, &limits).unwrap(),
            );
            let pool = TokenSessions::open(&u, &limits).unwrap();
            let (held_tx, held) = std::sync::mpsc::channel();
            let (release, release_rx) = std::sync::mpsc::channel::<()>();
            let holder = std::thread::spawn(move || {
                pool.with_session(|_, _| {
                    held_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok::<_, Fault<()>>(())
                })
            });
            held.recv().unwrap();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            let took = rt.block_on(async {
                // Signing is synchronous on the workers, as the CA's doors do it.
                let signers: Vec<_> = (0..2)
                    .map(|i| {
                        let key = key.clone();
                        tokio::spawn(async move { key.sign_x509(format!("m{i}").as_bytes()) })
                    })
                    .collect();
                std::thread::sleep(Duration::from_millis(300));
                let started = Instant::now();
                tokio::spawn(async { tokio::time::sleep(Duration::from_millis(50)).await })
                    .await
                    .unwrap();
                let took = started.elapsed();
                release.send(()).unwrap();
                for s in signers {
                    match s.await.unwrap() {
                        Ok(_) | Err(SignError::Unavailable(_)) => {}
                        other => panic!("{other:?}"),
                    }
                }
                took
            });
            holder.join().unwrap().unwrap();
            assert!(
                took < Duration::from_millis(1500),
                "a 50 ms task took {took:?} while signers waited for a session"
            );
        },
    );
}

fn uri(pin_file: &str, object: &str) -> Pkcs11Uri {
    Pkcs11Uri::parse(&format!(
        "pkcs11:token=threads;object={object}?module-path={MODULE}&pin-source=file:{pin_file}"
    ))
    .unwrap()
}

/// Three threads each make 8 key pairs (and seal a key-encryption key, an AES key object) while
/// three others open an existing key over and over (each open searches the token).
fn make_and_search_at_once(pin_file: &str) {
    let limits = SessionLimits::default();
    TokenKey::generate(&uri(pin_file, "first"), KeyAlgorithm::Ed25519, &limits).unwrap();
    // Makers still at work; a maker that fails (panics) counts as done too, so that the
    // searchers stop and the failure is reported rather than waited on.
    let making = AtomicUsize::new(3);
    std::thread::scope(|s| {
        let making = &making;
        let makers: Vec<_> = (0..3)
            .map(|t| {
                s.spawn(move || {
                    let _done = Done(making);
                    for i in 0..8 {
                        let u = uri(pin_file, &format!("k-{t}-{i}"));
                        let alg = if i % 2 == 0 {
                            KeyAlgorithm::Ed25519
                        } else {
                            KeyAlgorithm::P256
                        };
                        TokenKey::generate(&u, alg, &limits)
                            .unwrap_or_else(|e| panic!("key {t}-{i}: {e}"));
                        ca_server::issuer::pkcs11::seal_kek(&u, &[7u8; 32], &limits)
                            .unwrap_or_else(|e| panic!("key-encryption key {t}-{i}: {e}"));
                    }
                })
            })
            .collect();
        let searchers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(move || {
                    let mut opened = 0u32;
                    while making.load(Ordering::SeqCst) > 0 {
                        TokenKey::open(&uri(pin_file, "first"), &limits)
                            .unwrap_or_else(|e| panic!("open: {e}"));
                        opened += 1;
                    }
                    opened
                })
            })
            .collect();
        let made: Vec<_> = makers.into_iter().map(|m| m.join()).collect();
        let opened: Vec<_> = searchers.into_iter().map(|h| h.join()).collect();
        assert!(made.iter().all(Result::is_ok), "a key was not made (above)");
        let opened: u32 = opened.into_iter().map(Result::unwrap).sum();
        assert!(opened > 0, "the searches ran while keys were made");
        println!("24 key pairs and 24 AES keys made while the token was searched {opened} times");
    });
}

/// Counts a maker out when its thread ends, however it ends.
struct Done<'a>(&'a AtomicUsize);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
