//! HTTPS enrollment on real sockets with a real sled store.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Device, Line, TestCa, now, snapshot};
use device_agent::AgentError;
use device_agent::enroll::{accept_response, build_request};
use device_agent::state::DeviceState;
use protocol_spec::messages::{EnrollRequest, EnrollResponse, ResponseForm};
use protocol_spec::profile::CertProfile;
use protocol_spec::{KeyAlgorithm, ProblemType};
use ring::rand::SystemRandom;

const ED: KeyAlgorithm = KeyAlgorithm::Ed25519;
const P256: KeyAlgorithm = KeyAlgorithm::P256;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_every_device_and_ca_algorithm_over_https() {
    for ca_alg in [ED, P256] {
        let ca = TestCa::new(ca_alg);
        let line = Line::new("line-1", P256);
        ca.add_line(&line, 1, 100, None);
        let server = ca.start().await;
        let client = ca.client(server.https.unwrap());
        let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
        let rng = SystemRandom::new();
        let mut serial = 0;
        for dev_alg in [ED, P256] {
            for form in [ResponseForm::Full, ResponseForm::Compact] {
                serial += 1;
                let state = DeviceState::generate(
                    protocol_spec::DeviceSerial::new(serial).unwrap(),
                    dev_alg,
                    &rng,
                )
                .unwrap();
                let token = line.token(serial, &state.key.spki_der());
                let req = build_request(&state, &token, form, &rng).unwrap();
                let resp = client.enroll(req.to_cbor()).await.unwrap();
                assert_eq!(
                    matches!(resp, EnrollResponse::Compact { .. }),
                    form == ResponseForm::Compact
                );
                let cert = accept_response(&state, &profile, &resp).unwrap();
                let rec = server
                    .service
                    .store()
                    .device(serial)
                    .unwrap()
                    .expect("record stored");
                assert_eq!(
                    rec.certificate, cert,
                    "{ca_alg}/{dev_alg}/{form:?}: device and store agree"
                );
                // A retry with a fresh token gets the same bytes and no new record.
                let again = build_request(
                    &state,
                    &line.token(serial, &state.key.spki_der()),
                    ResponseForm::Full,
                    &rng,
                )
                .unwrap();
                let resp2 = client.enroll(again.to_cbor()).await.unwrap();
                assert_eq!(resp2, EnrollResponse::Full { certificate: cert });
            }
        }
        assert_eq!(server.service.store().devices().count(), 4);
        assert_eq!(client.ca_certificate().await.unwrap(), ca.ca_der);
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_keys_racing_for_one_serial_bind_exactly_one() {
    let ca = TestCa::new(ED);
    let line = Line::new("line-1", ED);
    ca.add_line(&line, 1, 1000, None);
    let server = ca.start().await;
    let client = ca.client(server.https.unwrap());
    let bodies: Vec<Vec<u8>> = (0..50)
        .map(|_| Device::new(7, ED).request(&line, ResponseForm::Full))
        .collect();
    let before = snapshot(server.service.store());
    let tasks: Vec<_> = bodies
        .into_iter()
        .map(|b| {
            let c = client.clone();
            tokio::spawn(async move { c.enroll(b).await })
        })
        .collect();
    let mut ok = Vec::new();
    let mut taken = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(EnrollResponse::Full { certificate }) => ok.push(certificate),
            Err(AgentError::Refused(p)) if p.kind == ProblemType::SerialTaken => taken += 1,
            other => panic!("unexpected outcome {other:?}"),
        }
    }
    assert_eq!((ok.len(), taken), (1, 49));
    let rec = server.service.store().device(7).unwrap().unwrap();
    assert_eq!(rec.certificate, ok[0]);
    let after = snapshot(server.service.store());
    // Exactly one device, one key, one token, one audit entry more, and the line count.
    assert_eq!(after.len(), before.len() + 4);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_identical_requests_get_the_same_bytes_and_one_record() {
    for ca_alg in [ED, P256] {
        let ca = TestCa::new(ca_alg);
        let line = Line::new("line-1", ED);
        ca.add_line(&line, 1, 1000, None);
        let server = ca.start().await;
        let client = ca.client(server.https.unwrap());
        let body = Device::new(9, P256).request(&line, ResponseForm::Full);
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let (c, b) = (client.clone(), body.clone());
                tokio::spawn(async move { c.enroll(b).await })
            })
            .collect();
        let mut certs = std::collections::BTreeSet::new();
        for t in tasks {
            match t.await.unwrap().unwrap() {
                EnrollResponse::Full { certificate } => certs.insert(certificate),
                other => panic!("{other:?}"),
            };
        }
        assert_eq!(
            certs.len(),
            1,
            "{ca_alg}: every answer is the same certificate"
        );
        let devices: Vec<_> = server.service.store().devices().collect();
        assert_eq!(devices.len(), 1);
        assert_eq!(
            &devices[0].as_ref().unwrap().certificate,
            certs.first().unwrap()
        );
        let audit = server
            .service
            .store()
            .audit()
            .filter(|e| e.as_ref().unwrap().event == "enroll")
            .count();
        assert_eq!(audit, 1);
        server.stop().await;
    }
}

/// Sends `body` (CBOR unless `json`) and returns (status, problem type name).
async fn post(addr: std::net::SocketAddr, ca: &TestCa, body: Vec<u8>, json: bool) -> (u16, String) {
    let client = ca.client(addr);
    let ct = if json {
        "application/json"
    } else {
        "application/cbor"
    };
    let a = client
        .request("POST", "/enroll", Some(ct), ct, body)
        .await
        .unwrap();
    let p = device_agent::https::problem_of(&a);
    let name = match p {
        AgentError::Refused(p) => p.kind.name().to_string(),
        other => format!("not a problem: {other}"),
    };
    (a.status, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reachable_problem_has_its_status_and_type_and_changes_nothing() {
    let ca = TestCa::new(ED);
    let line = Line::new("line-1", ED);
    let small = Line::new("small", ED);
    let rogue = Line::new("line-1", ED);
    ca.add_line(&line, 1, 1000, None);
    ca.add_line(&small, 5000, 5999, Some(1));
    // A line limited to 1 enrollment per second.
    let slow = Line::new("slow", ED);
    {
        let store = ca.store();
        let pem = protocol_spec::PublicKey::from(&slow.key).to_pem();
        let mut rec = ca_server::lines::new_line("slow", &pem, (7000, 7999), None, now()).unwrap();
        rec.rate = 1;
        store.add_line(&rec, "test").unwrap();
    }
    let server = ca.start().await;
    let addr = server.https.unwrap();
    let client = ca.client(addr);

    // Bindings the conflicts below run into.
    let enrolled = Device::new(10, ED);
    let cti = vec![0x5a; 16];
    let first = EnrollRequest {
        token: line.token_with(
            10,
            &enrolled.key.spki_der(),
            cti.clone(),
            now() - 5,
            now() + 600,
        ),
        csr: enrolled.csr(),
        form: ResponseForm::Full,
    };
    client.enroll(first.to_cbor()).await.unwrap();
    client
        .enroll(Device::new(5000, ED).request(&small, ResponseForm::Full))
        .await
        .unwrap();

    let d = Device::new(20, ED);
    let spki = d.key.spki_der();
    let req = |token: Vec<u8>, csr: Vec<u8>| {
        EnrollRequest {
            token,
            csr,
            form: ResponseForm::Full,
        }
        .to_cbor()
    };
    let other = Device::new(20, P256);
    let mut bad_csr = d.csr();
    *bad_csr.last_mut().unwrap() ^= 1;
    // A real P-384 CSR made by openssl: a well-formed key of an algorithm Imprint refuses.
    let dir = ca.tmp.path();
    let (key, csr) = (dir.join("p384.pem"), dir.join("p384.csr"));
    assert!(
        std::process::Command::new("openssl")
            .args(["ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out"])
            .arg(&key)
            .status()
            .unwrap()
            .success()
    );
    assert!(
        std::process::Command::new("openssl")
            .args(["req", "-new", "-subj", "/CN=20", "-outform", "DER", "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&csr)
            .status()
            .unwrap()
            .success()
    );
    let p384_csr = std::fs::read(&csr).unwrap();
    let cases: Vec<(&str, Vec<u8>, bool, u16)> = vec![
        (
            "token-expired",
            req(
                line.token_with(20, &spki, vec![1; 16], now() - 2000, now() - 1000),
                d.csr(),
            ),
            false,
            401,
        ),
        (
            "token-signature",
            req(rogue.token(20, &spki), d.csr()),
            false,
            401,
        ),
        (
            "token-replayed",
            req(
                line.token_with(20, &spki, cti.clone(), now() - 5, now() + 600),
                d.csr(),
            ),
            false,
            409,
        ),
        (
            "line-unknown",
            req(Line::new("nope", ED).token(20, &spki), d.csr()),
            false,
            403,
        ),
        (
            "serial-out-of-range",
            req(
                line.token(4000, &spki),
                Device {
                    serial: protocol_spec::DeviceSerial::new(4000).unwrap(),
                    key: protocol_spec::KeyPair::from_pkcs8(
                        d.key.pkcs8_der(),
                        &SystemRandom::new(),
                    )
                    .unwrap(),
                }
                .csr(),
            ),
            false,
            403,
        ),
        (
            "quota-exhausted",
            Device::new(5001, ED).request(&small, ResponseForm::Full),
            false,
            403,
        ),
        (
            "key-mismatch",
            req(line.token(20, &spki), other.csr()),
            false,
            400,
        ),
        (
            "csr-signature",
            req(line.token(20, &spki), bad_csr),
            false,
            400,
        ),
        (
            "key-algorithm",
            req(line.token(20, &spki), p384_csr),
            false,
            400,
        ),
        (
            "duplicate-key",
            req(
                line.token(21, &enrolled.key.spki_der()),
                Device {
                    serial: protocol_spec::DeviceSerial::new(21).unwrap(),
                    key: protocol_spec::KeyPair::from_pkcs8(
                        enrolled.key.pkcs8_der(),
                        &SystemRandom::new(),
                    )
                    .unwrap(),
                }
                .csr(),
            ),
            false,
            409,
        ),
        (
            "serial-taken",
            Device::new(10, ED).request(&line, ResponseForm::Full),
            false,
            409,
        ),
        ("malformed", b"\xa1\x01".to_vec(), false, 400),
        ("malformed", br#"{"token": 1}"#.to_vec(), true, 400),
        ("too-large", vec![0u8; 9000], false, 413),
    ];
    let before = snapshot(server.service.store());
    for (want, body, json, status) in cases {
        let (got_status, got) = post(addr, &ca, body, json).await;
        assert_eq!((got_status, got.as_str()), (status, want));
        assert_eq!(
            snapshot(server.service.store()),
            before,
            "{want} changed the store"
        );
    }

    // rate-limited: the slow line's second enrollment within a second, with Retry-After.
    let first_slow = Device::new(7000, ED).request(&slow, ResponseForm::Full);
    client.enroll(first_slow.clone()).await.unwrap();
    let before = snapshot(server.service.store());
    let a = client
        .request(
            "POST",
            "/enroll",
            Some("application/cbor"),
            "application/cbor",
            Device::new(7001, ED).request(&slow, ResponseForm::Full),
        )
        .await
        .unwrap();
    match device_agent::https::problem_of(&a) {
        AgentError::Refused(p) => assert_eq!(p.kind.name(), "rate-limited"),
        other => panic!("{other}"),
    }
    assert_eq!(a.status, 429);
    // A retry of an existing binding (a device that lost its answer) is not rate-limited.
    client.enroll(first_slow).await.unwrap();
    // As a user sees it, with the Retry-After header.
    let body = ca.tmp.path().join("slow.cbor");
    std::fs::write(
        &body,
        Device::new(7002, ED).request(&slow, ResponseForm::Full),
    )
    .unwrap();
    let out = std::process::Command::new("curl")
        .args([
            "-sS",
            "-i",
            "-H",
            "Content-Type: application/cbor",
            "--cacert",
        ])
        .arg(ca.ca_pem_path())
        .arg("--data-binary")
        .arg(format!("@{}", body.display()))
        .arg(format!("https://{addr}/enroll"))
        .output()
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 429"), "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert_eq!(
        snapshot(server.service.store()),
        before,
        "rate-limited changed the store"
    );
    // The bucket refills: a second later the line enrolls again.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    client
        .enroll(Device::new(7001, ED).request(&slow, ResponseForm::Full))
        .await
        .unwrap();

    // revoked: the device's own retry after an operator revoked it.
    assert!(server.service.revoke(10, "test").await.unwrap().is_some());
    let before = snapshot(server.service.store());
    let retry = EnrollRequest {
        token: line.token(10, &enrolled.key.spki_der()),
        csr: enrolled.csr(),
        form: ResponseForm::Full,
    };
    let (status, kind) = post(addr, &ca, retry.to_cbor(), false).await;
    assert_eq!((status, kind.as_str()), (403, "revoked"));
    assert_eq!(
        snapshot(server.service.store()),
        before,
        "revoked changed the store"
    );
    server.stop().await;
}

/// Finding 1 of the hardening issue: a client that sent headers announcing a body and then
/// nothing kept its connection slot for good; 2048 of them locked the door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_never_comes_gets_408_and_the_connection_is_closed() {
    let ca = TestCa::new(ED);
    ca.set_request_timeout(1);
    let server = ca.start().await;
    let addr = server.https.unwrap();
    let before = snapshot(server.service.store());
    common::stalled_body(addr, ca.ca_pem_path(), None, "/enroll")
        .await
        .assert_timed_out(true);
    assert_eq!(snapshot(server.service.store()), before, "nothing stored");
    server.stop().await;
}

/// Hardening finding 12: the 415 and 405 problem bodies said `"status":400`; RFC 9457 section
/// 3.1.4: the member is the status the server sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_problem_sent_with_its_own_status_says_that_status() {
    let ca = TestCa::new(ED);
    let server = ca.start().await;
    let client = ca.client(server.https.unwrap());
    for (method, path, ctype, want) in [
        ("POST", "/enroll", Some("text/plain"), 415),
        ("PUT", "/ca", None, 405),
        ("GET", "/enroll", None, 405),
    ] {
        let a = client
            .request(method, path, ctype, "application/json", b"x".to_vec())
            .await
            .unwrap();
        assert_eq!(a.status, want, "{method} {path}");
        let body: serde_json::Value = serde_json::from_slice(&a.body).unwrap();
        assert_eq!(body["status"], want, "{method} {path}: {body}");
        assert_eq!(body["type"], "urn:imprint:problem:malformed");
    }
    server.stop().await;
}

/// Hardening finding 12: tokens could live a day by default while SPEC.md section 11.3 says
/// they live minutes. A CA with the default configuration takes the line station's 10 minutes
/// and an hour, and refuses a token made to live two hours (token-expired).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_living_longer_than_an_hour_is_refused_by_default() {
    let ca = TestCa::new(ED);
    let line = Line::new("line-1", ED);
    ca.add_line(&line, 1, 100, None);
    let server = ca.start().await;
    let client = ca.client(server.https.unwrap());
    let enroll = |serial: u64, ttl: u64| {
        let d = Device::new(serial, ED);
        let token = line.token_with(
            serial,
            &d.key.spki_der(),
            serial.to_be_bytes().to_vec(),
            now() - 5,
            now() - 5 + ttl,
        );
        EnrollRequest {
            token,
            csr: d.csr(),
            form: ResponseForm::Compact,
        }
        .to_cbor()
    };
    let default_ttl = device_agent::line_station::DEFAULT_TTL;
    assert_eq!(default_ttl, 600, "the line station's default: 10 minutes");
    client.enroll(enroll(1, default_ttl)).await.unwrap();
    client.enroll(enroll(2, 3600)).await.unwrap();
    let before = snapshot(server.service.store());
    match client.enroll(enroll(3, 7200)).await {
        Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::TokenExpired),
        other => panic!("a two-hour token: {other:?}"),
    }
    assert_eq!(snapshot(server.service.store()), before, "nothing stored");
    server.stop().await;
}
