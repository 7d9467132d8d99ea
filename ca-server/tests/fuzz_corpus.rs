//! Every committed fuzz input, replayed on the stable toolchain through the fuzz targets' own
//! bodies (fuzz/harness, compiled here as modules): the seeds made from the test vectors
//! (fuzz/seeds/TARGET) and every input that once crashed a target (fuzz/regressions/TARGET).
//! So `cargo test --workspace` runs what the fuzzers start from and what they found, without
//! cargo-fuzz or nightly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

#[path = "../../fuzz/harness/protocol.rs"]
mod protocol;
#[path = "../../fuzz/harness/server.rs"]
mod server;

type Target = (&'static str, fn(&[u8]));

const TARGETS: [Target; 8] = [
    ("coap_datagram", server::coap_datagram),
    ("admin_body", server::admin_body),
    ("enroll_request_cbor", protocol::enroll_request_cbor),
    ("enroll_request_json", protocol::enroll_request_json),
    ("factory_token", protocol::factory_token),
    ("csr", protocol::csr),
    ("compact_response", protocol::compact_response),
    ("secret_ack", protocol::secret_ack),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` on each file, and names every file that made it panic.
fn replay(target: fn(&[u8]), files: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).unwrap();
        if std::panic::catch_unwind(|| target(&bytes)).is_err() {
            failed.push(f.display().to_string());
        }
    }
    failed
}

#[test]
fn every_committed_seed_and_regression_passes_its_target() {
    let mut failed = Vec::new();
    for (name, target) in TARGETS {
        let seeds = inputs("seeds", name);
        assert!(
            !seeds.is_empty(),
            "no seeds for {name}: run fuzz/make-seeds.py"
        );
        failed.extend(replay(target, &seeds));
        failed.extend(replay(target, &inputs("regressions", name)));
    }
    assert!(failed.is_empty(), "inputs that fail: {failed:#?}");
    // Every regression folder belongs to a target (a misspelt one would never be replayed).
    if let Ok(dirs) = std::fs::read_dir(fuzz_dir().join("regressions")) {
        for d in dirs {
            let name = d.unwrap().file_name().into_string().unwrap();
            assert!(
                TARGETS.iter().any(|(t, _)| *t == name),
                "fuzz/regressions/{name} is no target"
            );
        }
    }
}

/// The replay can fail: an input that breaks a target's rule is caught and named.
#[test]
fn the_replay_names_an_input_that_breaks_a_rule() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad");
    std::fs::write(&f, b"x").unwrap();
    let failed = replay(|_| panic!("the rule broke"), std::slice::from_ref(&f));
    assert_eq!(failed, vec![f.display().to_string()]);
}

/// The seeds reach deep: the vectors' accepted compact response is accepted by the agent's
/// target, and a seed's enrollment request passes every check, so the fuzzers start from
/// inputs that get past the decoders.
#[test]
fn the_seeds_reach_past_the_decoders() {
    let seeds = fuzz_dir().join("seeds");
    let compact =
        std::fs::read(seeds.join("compact_response/ok-compact-ed25519-ca-response-compact.cbor"))
            .unwrap();
    protocol::compact_response(&compact);
    let request =
        std::fs::read(seeds.join("enroll_request_cbor/ok-compact-ed25519-ca-request.cbor"))
            .unwrap();
    let decoded = protocol_spec::messages::EnrollRequest::from_cbor(&request).unwrap();
    protocol_spec::enroll::check_request(
        decoded,
        &protocol::lines,
        protocol::NOW,
        protocol_spec::token::TokenPolicy::default(),
    )
    .unwrap();
}
