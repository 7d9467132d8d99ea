//! Token objects made and searched for from several threads of one process, against a real
//! SoftHSM2 token: the suite's test CAs share one token, and SoftHSM2 before 2.7.0 (Debian 12
//! ships 2.6.1) fails an object's creation with CKR_GENERAL_ERROR when a `C_FindObjects` in the
//! same process reads the new object's file while it is still empty (SoftHSMv2 issue 573).
//! The issuer holds searches and creations one at a time; this test makes both at once.
//!
//! A PKCS#11 module reads `SOFTHSM2_CONF` once per process, so the test runs itself again as a
//! child process with the variable set (the test process's own environment is left alone).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use ca_server::issuer::{Pkcs11Uri, TokenKey};
use protocol_spec::KeyAlgorithm;

const MODULE: &str = common::SOFTHSM_MODULE;
const CHILD: &str = "IMPRINT_PKCS11_THREADS_PIN_FILE";

#[test]
fn keys_made_while_other_threads_search_the_token_are_all_made() {
    if let Ok(pin_file) = std::env::var(CHILD) {
        return make_and_search_at_once(&pin_file);
    }
    let token = common::SoftHsmToken::new("threads");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "keys_made_while_other_threads_search_the_token_are_all_made",
            "--nocapture",
        ])
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

fn uri(pin_file: &str, object: &str) -> Pkcs11Uri {
    Pkcs11Uri::parse(&format!(
        "pkcs11:token=threads;object={object}?module-path={MODULE}&pin-source=file:{pin_file}"
    ))
    .unwrap()
}

/// Three threads each make 8 key pairs (and seal a key-encryption key, an AES key object) while
/// three others open an existing key over and over (each open searches the token).
fn make_and_search_at_once(pin_file: &str) {
    TokenKey::generate(&uri(pin_file, "first"), KeyAlgorithm::Ed25519).unwrap();
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
                        TokenKey::generate(&u, alg).unwrap_or_else(|e| panic!("key {t}-{i}: {e}"));
                        ca_server::issuer::pkcs11::seal_kek(&u, &[7u8; 32])
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
                        TokenKey::open(&uri(pin_file, "first"))
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
