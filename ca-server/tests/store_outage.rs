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

/// A database that stops answering (frozen: its connections stay open, nothing comes back)
/// must not stall the CA's doors. Before the fix, each enrollment's store read held an async
/// worker for the store's whole call limit (10 s): with as many such requests as workers (two
/// here, as in the CA's runtime on this machine), `GET /ca`, which needs no database, waited
/// 10 s too. Now a slow call hands its worker back, and once a bound of calls wait and the
/// database has answered none for a second, new ones are refused as `unavailable` at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_stops_answering_stalls_no_door() {
    let (pg_dir, settings) = own_cluster();
    let cluster = Cluster(pg_dir.clone());
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, settings);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100_000, None);
    let server = ca.start().await;
    let client = ca.client(server.https.unwrap());
    // The store's connections are open and warm before the database freezes.
    let first = Device::new(1, KeyAlgorithm::Ed25519);
    client
        .enroll(first.request(&line, ResponseForm::Full))
        .await
        .unwrap();

    let d = pg_dir.clone();
    tokio::task::spawn_blocking(move || script("freeze", &d))
        .await
        .unwrap();
    // The clients run on a runtime of their own, so that the CA's two workers (this test's
    // runtime) serve nothing but the CA.
    let ca_der = ca.ca_der.clone();
    let https = server.https.unwrap();
    let devices: Vec<Device> = (2..=60u64)
        .map(|serial| Device::new(serial, KeyAlgorithm::Ed25519))
        .collect();
    let requests: Vec<Vec<u8>> = devices
        .iter()
        .map(|d| d.request(&line, ResponseForm::Full))
        .collect();
    let probe = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = Arc::new(
                device_agent::https::HttpsClient::new(
                    device_agent::url::CaUrl::parse(&format!("https://{https}")).unwrap(),
                    &ca_der,
                )
                .unwrap(),
            );
            // More waiting enrollments than the CA has workers, and more than the store lets
            // wait at once.
            // A first wave of 40 waits on the frozen database; a second wave comes once
            // it has answered nothing for 1.5 s. Each outcome with its time from its request.
            let mut requests = requests.into_iter();
            let mut waiting = Vec::new();
            let send = |request: Vec<u8>| {
                let client = client.clone();
                tokio::spawn(async move {
                    let started = std::time::Instant::now();
                    let r = client.enroll(request).await;
                    (r, started.elapsed())
                })
            };
            for request in requests.by_ref().take(40) {
                waiting.push(send(request));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let asked = std::time::Instant::now();
            let ca_cert =
                tokio::time::timeout(Duration::from_secs(8), client.ca_certificate()).await;
            let ca_answer = asked.elapsed();
            tokio::time::sleep(Duration::from_millis(1000)).await;
            for request in requests {
                waiting.push(send(request));
            }
            let mut outcomes = Vec::new();
            for w in waiting {
                outcomes.push(w.await.unwrap());
            }
            (ca_cert, ca_answer, outcomes)
        })
    });
    let (ca_cert, ca_answer, outcomes) = tokio::task::spawn_blocking(move || probe.join().unwrap())
        .await
        .unwrap();
    let d = pg_dir.clone();
    tokio::task::spawn_blocking(move || script("thaw", &d))
        .await
        .unwrap();

    let ca_cert = ca_cert
        .unwrap_or_else(|_| panic!("GET /ca not answered within 8 s while the database was frozen"))
        .unwrap();
    assert_eq!(ca_cert, ca.ca_der);
    assert!(
        ca_answer < Duration::from_secs(3),
        "GET /ca, which needs no database, took {ca_answer:?} while enrollments waited for it"
    );
    for (serial, (r, after)) in (2u64..).zip(&outcomes) {
        match r {
            Ok(other) => panic!("serial {serial} answered {other:?} while the database was frozen"),
            // The second wave: 40 calls wait and the database has answered nothing for a
            // second, so each is refused at once.
            Err(AgentError::Refused(p)) if serial >= 42 => assert!(
                p.kind == ProblemType::Unavailable && *after < Duration::from_secs(2),
                "serial {serial}, sent while 40 calls waited on a silent database: {p:?} after {after:?}"
            ),
            // The first wave waits out the store's call limit (10 s), or the door's own.
            Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::Unavailable),
            Err(e) if serial >= 42 => panic!("serial {serial}: {e}"),
            Err(_) => {}
        }
    }
    // Once the database answers again, every device enrolls, once.
    for device in &devices {
        let serial = device.serial.get();
        let mut tries = 0;
        loop {
            tries += 1;
            match client
                .enroll(device.request(&line, ResponseForm::Full))
                .await
            {
                Ok(EnrollResponse::Full { .. }) => break,
                Ok(other) => panic!("serial {serial}: {other:?}"),
                Err(e) => assert!(tries < 100, "serial {serial} after the thaw: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let store = server.service.store();
    assert_eq!(store.devices().count(), 60);
    assert_eq!(store.line("line-1").unwrap().unwrap().enrolled, 60);
    server.stop().await;
    drop(ca);
    drop(cluster);
}

/// A database that is slow but keeps answering is waited for: no request is refused. The
/// cluster is stopped for 250 ms and let run for 30 ms, again and again, while 96 devices
/// enroll at once, so that many calls wait longer than the store's quick-answer time. Before
/// the fix, 32 such calls made the store refuse the next as if the database could not be
/// reached (a loaded CI machine made 50 concurrent enrollments of one test fail so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_database_is_waited_for_not_called_unreachable() {
    let (pg_dir, settings) = own_cluster();
    let cluster = Cluster(pg_dir.clone());
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, settings);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100_000, None);
    let server = ca.start().await;
    let client = ca.client(server.https.unwrap());
    client
        .enroll(Device::new(1, KeyAlgorithm::Ed25519).request(&line, ResponseForm::Full))
        .await
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stutter = {
        let (stop, d) = (stop.clone(), pg_dir.clone());
        std::thread::spawn(move || {
            let mut stops = 0;
            while !stop.load(Ordering::SeqCst) {
                script("freeze", &d);
                std::thread::sleep(Duration::from_millis(250));
                script("thaw", &d);
                std::thread::sleep(Duration::from_millis(30));
                stops += 1;
            }
            stops
        })
    };
    // The clients on a runtime of their own, as above.
    let ca_der = ca.ca_der.clone();
    let https = server.https.unwrap();
    let requests: Vec<(u64, Vec<u8>)> = (2..=97u64)
        .map(|serial| {
            let d = Device::new(serial, KeyAlgorithm::Ed25519);
            (serial, d.request(&line, ResponseForm::Full))
        })
        .collect();
    let outcomes = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let client = Arc::new(
                device_agent::https::HttpsClient::new(
                    device_agent::url::CaUrl::parse(&format!("https://{https}")).unwrap(),
                    &ca_der,
                )
                .unwrap(),
            );
            let tasks: Vec<_> = requests
                .into_iter()
                .map(|(serial, request)| {
                    let client = client.clone();
                    tokio::spawn(async move { (serial, client.enroll(request).await) })
                })
                .collect();
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.push(t.await.unwrap());
            }
            outcomes
        })
    })
    .await
    .unwrap();
    stop.store(true, Ordering::SeqCst);
    let stops = tokio::task::spawn_blocking(move || stutter.join().unwrap())
        .await
        .unwrap();
    assert!(stops >= 2, "the database was stopped {stops} times");
    for (serial, r) in &outcomes {
        match r {
            Ok(EnrollResponse::Full { .. }) => {}
            other => panic!("serial {serial}, the database slow but answering: {other:?}"),
        }
    }
    assert_eq!(server.service.store().devices().count(), 97);
    server.stop().await;
    drop(ca);
    drop(cluster);
}
