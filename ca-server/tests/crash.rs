//! The server process killed with SIGKILL in the middle of a burst of enrollments: every
//! certificate a client received is in the store afterwards, and the invariants hold.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::process::Child;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ca_server::records::DeviceRecord;
use ca_server::store::Store;
use common::{Device, Line, TestCa};
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::{KeyAlgorithm, spki};

fn spawn_server(ca: &TestCa) -> (Child, SocketAddr) {
    common::serve_process(ca, &["--admin", "127.0.0.1:0"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_nothing_that_was_answered() {
    const DEVICES: u64 = 4000;
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1_000_000, None);
    let requests: Arc<Vec<(u64, Vec<u8>)>> = Arc::new(
        (1..=DEVICES)
            .map(|s| {
                (
                    s,
                    Device::new(s, KeyAlgorithm::Ed25519).request(&line, ResponseForm::Full),
                )
            })
            .collect(),
    );

    let (mut child, addr) = spawn_server(&ca);
    let client = ca.client(addr);
    let next = Arc::new(AtomicUsize::new(0));
    let received: Arc<Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (client, next, received, requests) = (
            client.clone(),
            next.clone(),
            received.clone(),
            requests.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some((serial, body)) = requests.get(i) else {
                    return;
                };
                if let Ok(EnrollResponse::Full { certificate }) = client.enroll(body.clone()).await
                {
                    received.lock().unwrap().insert(*serial, certificate);
                }
            }
        }));
    }
    // Kill once a good part of the burst is answered, while the rest is in flight.
    loop {
        let n = received.lock().unwrap().len();
        if n >= 1000 {
            break;
        }
        assert!(
            next.load(Ordering::Relaxed) < DEVICES as usize,
            "burst ended before the kill"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    let received = received.lock().unwrap().clone();
    assert!(
        received.len() >= 1000 && received.len() < DEVICES as usize,
        "killed mid-burst: {} answered",
        received.len()
    );

    // Restarted, the server answers every answered request again with the same bytes.
    let (mut child, addr) = spawn_server(&ca);
    let client = ca.client(addr);
    for (serial, cert) in received.iter().step_by(7) {
        let body = requests[(*serial - 1) as usize].1.clone();
        let again = client.enroll(body).await.unwrap();
        assert_eq!(
            again,
            EnrollResponse::Full {
                certificate: cert.clone()
            },
            "serial {serial}"
        );
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // Every received certificate is in the store, and the invariants hold.
    let store = ca.store();
    for (serial, cert) in &received {
        let rec = store
            .device(*serial)
            .unwrap()
            .unwrap_or_else(|| panic!("serial {serial} answered but not stored"));
        assert_eq!(&rec.certificate, cert, "serial {serial}");
    }
    check_invariants(store.as_ref());
}

/// No key on two serials, no serial with two keys, every token used once, indices consistent,
/// audit chain intact.
pub fn check_invariants(store: &dyn Store) {
    let raw = store.raw_records().unwrap();
    let rows = |name: &str| raw.iter().filter(|(t, _, _)| t == name).count();
    let devices: Vec<DeviceRecord> = store.devices().map(|d| d.unwrap()).collect();
    assert_eq!(
        rows("keys"),
        devices.len(),
        "one key index entry per device"
    );
    assert_eq!(
        rows("tokens"),
        devices.len(),
        "one consumed token per device"
    );
    let mut seen_keys = HashSet::new();
    let mut seen_tokens = HashSet::new();
    for d in &devices {
        let h = spki::sha256(&d.spki);
        assert!(
            seen_keys.insert(h),
            "key of serial {} bound twice",
            d.serial
        );
        assert_eq!(
            store.serial_for_key(&h).unwrap(),
            Some(d.serial),
            "key index of serial {}",
            d.serial
        );
        assert!(
            seen_tokens.insert((d.line.clone(), d.token_id.clone())),
            "token of serial {} used twice",
            d.serial
        );
    }
    let mut prev = [0u8; 32];
    let mut enrolls = 0;
    for (i, e) in store.audit().enumerate() {
        let e = e.unwrap();
        assert_eq!(e.seq, i as u64 + 1);
        assert_eq!(
            e.prev_hash,
            prev.to_vec(),
            "audit chain broken at {}",
            e.seq
        );
        prev = e.compute_hash();
        enrolls += usize::from(e.event == "enroll");
    }
    assert_eq!(enrolls, devices.len(), "one audit entry per enrollment");
}
