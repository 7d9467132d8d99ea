//! PostgreSQL stopped for 5 seconds while devices enroll over HTTPS and fetch their secrets:
//! requests meanwhile get `unavailable` (503, Retry-After) with nothing written, the CA
//! reconnects by itself, every device that got an answer is on record with exactly that
//! answer, the others succeed on retry, and the audit chain verifies.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Cluster, Device, Line, TestCa, own_cluster, script};
use device_agent::AgentError;
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::{KeyAlgorithm, ProblemType};

const DEVICES: u64 = 300;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_seconds_without_the_database_lose_nothing() {
    let (pg_dir, settings) = own_cluster();
    let cluster = Cluster(pg_dir.clone());
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, settings);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100_000, None);
    let server = ca.start().await;
    let client = Arc::new(ca.client(server.https.unwrap()));
    let line = Arc::new(line);
    let answers: Arc<Mutex<HashMap<u64, Vec<u8>>>> = Arc::default();
    let unavailable = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(1));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, line, answers, unavailable, next, done) = (
            client.clone(),
            line.clone(),
            answers.clone(),
            unavailable.clone(),
            next.clone(),
            done.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let serial = next.fetch_add(1, Ordering::Relaxed);
                if serial > DEVICES {
                    return;
                }
                let device = Device::new(serial, KeyAlgorithm::Ed25519);
                let request = device.request(&line, ResponseForm::Full);
                // The same request again until it is answered: a retry gets the same answer.
                let mut tries = 0;
                let cert = loop {
                    tries += 1;
                    match client.enroll(request.clone()).await {
                        Ok(EnrollResponse::Full { certificate }) => break certificate,
                        Ok(other) => panic!("serial {serial}: {other:?}"),
                        Err(AgentError::Refused(p)) if p.kind == ProblemType::Unavailable => {
                            unavailable.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(AgentError::Refused(p)) => panic!("serial {serial}: {p}"),
                        Err(_) => {}
                    }
                    assert!(tries < 200, "serial {serial}: no answer after 200 tries");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                answers.lock().unwrap().insert(serial, cert);
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // The database goes away once a third of the devices are enrolled, for 5 seconds.
    while done.load(Ordering::Relaxed) < DEVICES / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = pg_dir.clone();
    tokio::task::spawn_blocking(move || script("pause", &d))
        .await
        .unwrap();
    let during = done.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let d = pg_dir.clone();
    tokio::task::spawn_blocking(move || script("resume", &d))
        .await
        .unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        unavailable.load(Ordering::Relaxed) > 0,
        "requests during the outage were told unavailable"
    );
    assert!(
        done.load(Ordering::Relaxed) == DEVICES && during < DEVICES,
        "the outage came mid-run ({during} enrolled then) and every device enrolled afterwards"
    );
    // Every answer is on record, byte for byte, and nothing else is.
    let store = server.service.store();
    let answers = answers.lock().unwrap().clone();
    for (serial, cert) in &answers {
        let rec = store
            .device(*serial)
            .unwrap()
            .unwrap_or_else(|| panic!("serial {serial} answered but not on record"));
        assert_eq!(&rec.certificate, cert, "serial {serial}");
    }
    assert_eq!(store.devices().count() as u64, DEVICES);
    assert_eq!(store.line("line-1").unwrap().unwrap().enrolled, DEVICES);
    server.stop().await;
    let out = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(["audit", "verify", "--dir", ca.root().to_str().unwrap()])
        .env_remove("IMPRINT_STORE_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    drop(ca);
    drop(cluster);
}
