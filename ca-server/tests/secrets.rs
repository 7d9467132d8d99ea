//! Per-device secrets over mutual TLS, on real sockets with a real sled store.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use ca_server::server::RunningServer;
use common::{Line, TestCa, snapshot};
use device_agent::AgentError;
use device_agent::secrets::{SyncOutcome, mtls_client, sync};
use device_agent::state::DeviceState;
use device_agent::url::CaUrl;
use protocol_spec::profile::CertProfile;
use protocol_spec::{KeyAlgorithm, ProblemType};
use ring::rand::SystemRandom;

/// An enrolled device (over CoAP, the cheap way), ready for the secrets door.
async fn enrolled(
    ca: &TestCa,
    server: &RunningServer,
    line: &Line,
    serial: u64,
    alg: KeyAlgorithm,
) -> DeviceState {
    common::enrolled_over_coap(ca, server.coap.unwrap(), line, serial, alg).await
}

fn mtls_url(server: &RunningServer) -> CaUrl {
    CaUrl::parse(&format!("https://{}", server.mtls.unwrap())).unwrap()
}

async fn setup() -> (TestCa, Line, RunningServer) {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100_000, None);
    let server = ca.start().await;
    (ca, line, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_ack_rotate_for_both_key_types() {
    let (ca, line, server) = setup().await;
    for (serial, alg) in [(1, KeyAlgorithm::Ed25519), (2, KeyAlgorithm::P256)] {
        let mut dev = enrolled(&ca, &server, &line, serial, alg).await;
        let client = mtls_client(mtls_url(&server), &dev).unwrap();
        let mut saves = 0;
        let out = sync(&client, &mut dev, |_| {
            saves += 1;
            Ok(())
        })
        .await
        .unwrap();
        assert!(
            matches!(out, SyncOutcome::Stored { version: 1, .. }),
            "{alg}"
        );
        assert_eq!(saves, 2, "stored before the ack, and again after");
        let v = server.service.store().secret_versions(serial).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].key_id, dev.secrets[0].key_id);
        assert!(v[0].delivered_at.is_some() && v[0].confirmed_at.is_some());
        // Fetching again gives the same version; nothing new.
        assert_eq!(
            sync(&client, &mut dev, |_| Ok(())).await.unwrap(),
            SyncOutcome::UpToDate { version: 1 }
        );
        // Rotation: version 2 pending; the next sync picks it up; both versions stay.
        let rotated = server.service.rotate_secret(serial, "test").await.unwrap();
        assert_eq!(rotated.version, 2);
        assert!(rotated.delivered_at.is_none());
        let out = sync(&client, &mut dev, |_| Ok(())).await.unwrap();
        assert_eq!(
            out,
            SyncOutcome::Stored {
                key_id: rotated.key_id.clone(),
                version: 2
            }
        );
        let v = server.service.store().secret_versions(serial).unwrap();
        assert_eq!(v.iter().map(|r| r.version).collect::<Vec<_>>(), vec![1, 2]);
        assert!(
            v.iter()
                .all(|r| r.delivered_at.is_some() && r.confirmed_at.is_some())
        );
        assert_ne!(
            dev.secrets[0].secret.as_slice(),
            dev.secrets[1].secret.as_slice()
        );
        // An ack that does not match what was delivered is refused.
        let bad = protocol_spec::messages::SecretAck {
            key_id: rotated.key_id.clone(),
            version: 2,
            kcv: vec![0, 0, 0],
        };
        match device_agent::secrets::ack(&client, &bad).await {
            Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::AckMismatch),
            other => panic!("{other:?}"),
        }
    }
    server.stop().await;
}

/// A TLS client of the secrets door trusting the CA, with a client certificate and its key
/// (PKCS#8) or none.
fn client_config(ca_der: &[u8], client: Option<(Vec<u8>, Vec<u8>)>) -> Arc<rustls::ClientConfig> {
    common::tls_client(
        ca_der,
        client.map(|(cert, key)| {
            (
                cert.into(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
            )
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused_at_the_door() {
    let (ca, line, server) = setup().await;
    let url = mtls_url(&server);
    let dev = enrolled(&ca, &server, &line, 10, KeyAlgorithm::Ed25519).await;
    let mtls = server.mtls.unwrap();
    // No client certificate: the handshake fails with TLS 1.3's certificate_required alert.
    let alert = common::handshake_refusal(mtls, client_config(&ca.ca_der, None)).await;
    assert!(
        alert.contains("received fatal alert: CertificateRequired"),
        "no client certificate: {alert}"
    );
    // A certificate from another CA (same serial, same key): the handshake fails.
    let other = TestCa::with_file_key(KeyAlgorithm::Ed25519);
    let other_profile = CertProfile::from_ca_der(&other.ca_der).unwrap();
    let other_key = protocol_spec::KeyPair::from_pem(
        &std::fs::read_to_string(other.dir.ca_key()).unwrap(),
        &SystemRandom::new(),
    )
    .unwrap();
    let forged = other_profile
        .issue(
            dev.serial,
            &dev.key.spki_der(),
            &other_key,
            &SystemRandom::new(),
        )
        .unwrap();
    let mut impostor =
        DeviceState::generate(dev.serial, KeyAlgorithm::Ed25519, &SystemRandom::new()).unwrap();
    impostor.key =
        protocol_spec::KeyPair::from_pkcs8(dev.key.pkcs8_der(), &SystemRandom::new()).unwrap();
    impostor.certificate = Some(forged.der);
    impostor.ca_certificate = Some(ca.ca_der.clone());
    // Its issuer name is the real CA's ("Test CA"), so the server checks it under the real CA
    // key, where its signature fails: rustls answers a bad signature with decrypt_error.
    let forged_der = impostor.certificate.clone().unwrap();
    let alert = common::handshake_refusal(
        mtls,
        client_config(&ca.ca_der, Some((forged_der, dev.key.pkcs8_der().to_vec()))),
    )
    .await;
    assert!(
        alert.contains("received fatal alert: DecryptError"),
        "a certificate from another CA: {alert}"
    );
    // The device agent, too, fails there.
    let c = mtls_client(url.clone(), &impostor).unwrap();
    assert!(matches!(
        device_agent::secrets::fetch(&c).await,
        Err(AgentError::Transport(_))
    ));
    assert!(
        server
            .service
            .store()
            .secret_versions(10)
            .unwrap()
            .is_empty()
    );
    // The real device works; once revoked, a new connection is refused in the handshake
    // (alert certificate_revoked), and a connection kept alive from before is refused at its
    // next request.
    let client = mtls_client(url.clone(), &dev).unwrap();
    let mut kept = client.session().await.unwrap();
    device_agent::secrets::fetch_on(&mut kept).await.unwrap();
    assert!(server.service.revoke(10, "test").await.unwrap().is_some());
    match device_agent::secrets::fetch(&client).await {
        Err(AgentError::Transport(msg)) => assert!(
            msg.to_ascii_lowercase().contains("revoked"),
            "the handshake refusal names the revocation: {msg}"
        ),
        other => panic!("{other:?}"),
    }
    match device_agent::secrets::fetch_on(&mut kept).await {
        Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::Revoked),
        other => panic!("{other:?}"),
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_fetches_the_secret_with_cert_and_key() {
    let (ca, line, server) = setup().await;
    let dev = enrolled(&ca, &server, &line, 20, KeyAlgorithm::P256).await;
    let dir = ca.tmp.path();
    std::fs::write(
        dir.join("dev.pem"),
        protocol_spec::profile::cert_pem(dev.certificate.as_ref().unwrap()),
    )
    .unwrap();
    std::fs::write(dir.join("dev.key"), dev.key.to_pem().as_bytes()).unwrap();
    let addr: SocketAddr = server.mtls.unwrap();
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-sS",
        "--fail-with-body",
        "-H",
        "Accept: application/json",
        "--cacert",
    ])
    .arg(ca.ca_pem_path())
    .arg("--cert")
    .arg(dir.join("dev.pem"))
    .arg("--key")
    .arg(dir.join("dev.key"))
    .arg(format!("https://{addr}/secret"));
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = protocol_spec::messages::SecretDelivery::from_json(&out.stdout).unwrap();
    assert_eq!(d.version, 1);
    assert_eq!(d.check().unwrap().name(), "aes-256");
    assert_eq!(
        server.service.store().secret_versions(20).unwrap()[0].key_id,
        d.key_id
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_batch_goes_one_key_per_device_and_a_duplicate_import_changes_nothing() {
    let (ca, line, server) = setup().await;
    let store = server.service.store().clone();
    let keys = server.service.secret_keys();
    let key = |i: u8| zeroize::Zeroizing::new([i; 32]);
    let batch: Vec<_> = (1..=3u8).map(|i| (format!("batch-{i}"), key(i))).collect();
    assert_eq!(
        ca_server::service::import_batch(store.as_ref(), keys, batch, 1, "test").unwrap(),
        3
    );
    let before = snapshot(&store);
    // Same ids again, or a known key under a new id: refused whole.
    let again: Vec<_> = vec![
        ("batch-9".to_string(), key(9)),
        ("batch-1".to_string(), key(10)),
    ];
    let e = ca_server::service::import_batch(store.as_ref(), keys, again, 2, "test").unwrap_err();
    assert!(
        e.contains("key id \"batch-1\" is already known; nothing was imported"),
        "{e}"
    );
    let dup_key: Vec<_> = vec![("fresh".to_string(), key(2))];
    let e = ca_server::service::import_batch(store.as_ref(), keys, dup_key, 2, "test").unwrap_err();
    assert!(
        e.contains("the key of \"fresh\" is already known; nothing was imported"),
        "{e}"
    );
    assert_eq!(snapshot(&store), before, "a refused import changes nothing");
    let mut got = HashSet::new();
    for serial in 100..104 {
        let mut dev = enrolled(&ca, &server, &line, serial, KeyAlgorithm::Ed25519).await;
        let client = mtls_client(mtls_url(&server), &dev).unwrap();
        sync(&client, &mut dev, |_| Ok(())).await.unwrap();
        let s = &dev.secrets[0];
        if s.key_id.starts_with("batch-") {
            let i: u8 = s.key_id["batch-".len()..].parse().unwrap();
            assert_eq!(
                s.secret.as_slice(),
                key(i).as_slice(),
                "the imported key itself"
            );
        }
        assert!(got.insert(s.key_id.clone()));
    }
    let imported: Vec<_> = got.iter().filter(|k| k.starts_with("batch-")).collect();
    assert_eq!(
        imported.len(),
        3,
        "each imported key went to exactly one device; the fourth got a fresh one"
    );
    assert!(store.pool(0, 10).unwrap().is_empty());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_devices_get_distinct_secrets_and_no_plaintext_reaches_the_disk() {
    const DEVICES: u64 = 10_000;
    let (ca, line, server) = setup().await;
    let server = Arc::new(server);
    let ca = Arc::new(ca);
    let line = Arc::new(line);
    let next = Arc::new(std::sync::atomic::AtomicU64::new(1));
    let secrets = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (ca, line, server, next, secrets) = (
            ca.clone(),
            line.clone(),
            server.clone(),
            next.clone(),
            secrets.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let serial = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if serial > DEVICES {
                    return;
                }
                let mut dev = enrolled(&ca, &server, &line, serial, KeyAlgorithm::Ed25519).await;
                let client = mtls_client(mtls_url(&server), &dev).unwrap();
                sync(&client, &mut dev, |_| Ok(())).await.unwrap();
                let s = dev.secrets.pop().unwrap();
                secrets
                    .lock()
                    .unwrap()
                    .push((serial, s.key_id.clone(), s.secret.to_vec()));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = secrets.lock().unwrap().clone();
    assert_eq!(all.len() as u64, DEVICES);
    let distinct_secrets: HashSet<_> = all.iter().map(|(_, _, s)| s.clone()).collect();
    let distinct_ids: HashSet<_> = all.iter().map(|(_, k, _)| k.clone()).collect();
    assert_eq!(
        distinct_secrets.len() as u64,
        DEVICES,
        "no two devices share a secret"
    );
    assert_eq!(
        distinct_ids.len() as u64,
        DEVICES,
        "no two devices share a key id"
    );
    let store = server.service.store();
    for (serial, key_id, _) in &all {
        let v = store.secret_versions(*serial).unwrap();
        assert_eq!(v.len(), 1);
        assert_eq!((&v[0].key_id, v[0].version), (key_id, 1));
        assert!(
            v[0].delivered_at.is_some() && v[0].confirmed_at.is_some(),
            "serial {serial}"
        );
    }
    store.sync().unwrap();
    // Every byte of the store's files (the sled folder, or the PostgreSQL cluster's data folder
    // with its write-ahead log): no plaintext secret anywhere.
    let mut files = Vec::new();
    let root = if ca.on_postgres() {
        std::path::PathBuf::from(
            std::env::var("IMPRINT_TEST_PG_DIR")
                .expect("IMPRINT_TEST_PG_DIR: the data folder of the test database"),
        )
        .join("data")
    } else {
        ca.dir.store()
    };
    let mut stack = vec![root];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(std::fs::read(e.path()).unwrap());
            }
        }
    }
    let total: usize = files.iter().map(Vec::len).sum();
    assert!(
        total > 1_000_000,
        "the store holds the data ({total} bytes)"
    );
    // One pass over the files for all the secrets at once (a plain window-by-window lookup, in
    // this unoptimised test code, took a minute over a PostgreSQL data folder).
    let finder = aho_corasick::AhoCorasick::new(all.iter().map(|(_, _, s)| s.as_slice())).unwrap();
    let mut planted = files[0].clone();
    planted.extend_from_slice(&all[DEVICES as usize / 2].2);
    assert!(
        finder.is_match(planted.as_slice()),
        "the scan finds a secret"
    );
    for f in &files {
        if let Some(m) = finder.find(f.as_slice()) {
            panic!(
                "a plaintext secret is on disk (serial {})",
                all[m.pattern().as_usize()].0
            );
        }
    }
}

/// Finding 1 of the hardening issue, at the secrets door: an ack whose body never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_body_that_never_comes_gets_408_and_the_connection_is_closed() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    ca.set_request_timeout(1);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let server = ca.start().await;
    let dev = enrolled(&ca, &server, &line, 21, KeyAlgorithm::P256).await;
    let dir = ca.tmp.path().to_path_buf();
    std::fs::write(
        dir.join("dev.pem"),
        protocol_spec::profile::cert_pem(dev.certificate.as_ref().unwrap()),
    )
    .unwrap();
    std::fs::write(dir.join("dev.key"), dev.key.to_pem().as_bytes()).unwrap();
    let addr: SocketAddr = server.mtls.unwrap();
    let client = Some((dir.join("dev.pem"), dir.join("dev.key")));
    common::stalled_body(addr, ca.ca_pem_path(), client, "/secret/ack")
        .await
        .assert_timed_out(true);
    server.stop().await;
}
