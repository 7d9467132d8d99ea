//! Hostile requests at the mutual-TLS secrets door and at the admin door, on real sockets with
//! real TLS and the suite's store (sled, or PostgreSQL with `IMPRINT_TEST_STORE=postgres`):
//! every kind of bad request gets its own documented answer (SPEC.md sections 7, 9, 10 and
//! 11.8), and the whole store ([`common::snapshot`]: every record of every table, the audit
//! chain and the CRL number included) is byte for byte what it was before.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use common::{
    Line, TestCa, assert_unchanged, handshake_refusal, pem_identity, snapshot, tls_client,
};
use device_agent::AgentError;
use device_agent::https::{HttpAnswer, HttpsClient, problem_of};
use device_agent::secrets::{mtls_client, sync};
use device_agent::url::CaUrl;
use protocol_spec::KeyAlgorithm;
use protocol_spec::messages::SecretAck;
use ring::rand::SystemRandom;

const ED: KeyAlgorithm = KeyAlgorithm::Ed25519;
const CBOR: &str = "application/cbor";
const JSON: &str = "application/json";

/// (status, problem type name) of an answer, `-` when it carries no problem.
fn answer(a: &HttpAnswer) -> (u16, String) {
    let name = match problem_of(a) {
        AgentError::Refused(p) => p.kind.name().to_string(),
        _ => "-".to_string(),
    };
    (a.status, name)
}

fn allow(a: &HttpAnswer) -> &str {
    a.headers
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn url(addr: SocketAddr) -> CaUrl {
    CaUrl::parse(&format!("https://{addr}")).unwrap()
}

/// One request of a hostile case: method, path, content type, body.
struct Ask {
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
}

fn ask(
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
) -> Ask {
    Ask {
        method,
        path,
        content_type,
        body,
    }
}

fn ack_body(key_id: &str, version: u64, kcv: &[u8]) -> Vec<u8> {
    SecretAck {
        key_id: key_id.into(),
        version,
        kcv: kcv.to_vec(),
    }
    .to_cbor()
}

async fn send(client: &HttpsClient, a: &Ask) -> HttpAnswer {
    let accept = a.content_type.filter(|c| *c == JSON).unwrap_or(CBOR);
    client
        .request(a.method, a.path, a.content_type, accept, a.body.clone())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_at_the_secrets_door_has_its_problem_and_changes_nothing() {
    let ca = TestCa::new(ED);
    let line = Line::new("line-1", ED);
    ca.add_line(&line, 1, 1000, None);
    // A line whose devices take imported keys only: while the pool is empty, a fetch is
    // `unavailable` and nothing is written.
    let pool_line = Line::new("pool", ED);
    {
        let store = ca.store();
        let pem = protocol_spec::PublicKey::from(&pool_line.key).to_pem();
        let mut rec =
            ca_server::lines::new_line("pool", &pem, (5000, 5999), None, common::now()).unwrap();
        rec.secret_source = ca_server::lines::secret_source(store.as_ref(), "pool").unwrap();
        store.add_line(&rec, "test").unwrap();
    }
    let server = ca.start().await;
    let (coap, mtls) = (server.coap.unwrap(), server.mtls.unwrap());
    let store = server.service.store().clone();

    // A: version 1 delivered and acknowledged, version 2 rotated and not yet delivered.
    let mut a = common::enrolled_over_coap(&ca, coap, &line, 1, ED).await;
    let client = mtls_client(url(mtls), &a).unwrap();
    sync(&client, &mut a, |_| Ok(())).await.unwrap();
    let v2 = server.service.rotate_secret(1, "test").await.unwrap();
    let v1 = store.secret_versions(1).unwrap().remove(0);
    // B: version 1 delivered, not acknowledged; A must not acknowledge it.
    let b = common::enrolled_over_coap(&ca, coap, &line, 2, ED).await;
    device_agent::secrets::fetch(&mtls_client(url(mtls), &b).unwrap())
        .await
        .unwrap();
    let b1 = store.secret_versions(2).unwrap().remove(0);
    let p = common::enrolled_over_coap(&ca, coap, &pool_line, 5000, ED).await;

    // The pool line's device while the pool is empty: 503 unavailable, nothing allocated.
    let before = snapshot(&store);
    let got = mtls_client(url(mtls), &p)
        .unwrap()
        .request("GET", "/secret", None, CBOR, Vec::new())
        .await
        .unwrap();
    assert_eq!(answer(&got), (503, "unavailable".into()));
    assert_unchanged(&store, &before, "a fetch from an empty pool");
    // From here on the pool holds keys too, so that every refusal below shows it untouched.
    let key = |i: u8| zeroize::Zeroizing::new([i; 32]);
    let batch = vec![
        ("pool-1".to_string(), key(1)),
        ("pool-2".to_string(), key(2)),
    ];
    ca_server::service::import_batch(store.as_ref(), server.service.secret_keys(), batch, 1, "t")
        .unwrap();

    let over_64 = "k".repeat(65);
    let cases: Vec<(&str, Ask, u16, &str)> = vec![
        (
            "an ack that is no CBOR map",
            ask("POST", "/secret/ack", Some(CBOR), b"hello".to_vec()),
            400,
            "malformed",
        ),
        (
            "a CBOR ack missing its fields",
            ask("POST", "/secret/ack", Some(CBOR), b"\xa1\x01\x61k".to_vec()),
            400,
            "malformed",
        ),
        (
            "an empty ack",
            ask("POST", "/secret/ack", Some(CBOR), Vec::new()),
            400,
            "malformed",
        ),
        (
            "a JSON ack of the wrong shape",
            ask(
                "POST",
                "/secret/ack",
                Some(JSON),
                br#"{"key_id": 1}"#.to_vec(),
            ),
            400,
            "malformed",
        ),
        (
            "a JSON ack with a member too many",
            ask(
                "POST",
                "/secret/ack",
                Some(JSON),
                format!(
                    r#"{{"key_id": "{}", "version": 1, "kcv": "AAAA", "extra": 1}}"#,
                    v1.key_id
                )
                .into_bytes(),
            ),
            400,
            "malformed",
        ),
        (
            "a KCV of two octets",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body(&v1.key_id, 1, &[1, 2]),
            ),
            400,
            "malformed",
        ),
        (
            "an empty key id",
            ask("POST", "/secret/ack", Some(CBOR), ack_body("", 1, &v1.kcv)),
            400,
            "malformed",
        ),
        (
            "a key id over 64 octets",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body(&over_64, 1, &v1.kcv),
            ),
            400,
            "malformed",
        ),
        (
            "an ack over the size limit",
            ask("POST", "/secret/ack", Some(CBOR), vec![0xa0; 600]),
            413,
            "too-large",
        ),
        (
            "an ack as text/plain",
            ask(
                "POST",
                "/secret/ack",
                Some("text/plain"),
                ack_body(&v1.key_id, 1, &v1.kcv),
            ),
            415,
            "malformed",
        ),
        (
            "an ack as a form (curl's default)",
            ask(
                "POST",
                "/secret/ack",
                Some("application/x-www-form-urlencoded"),
                ack_body(&v1.key_id, 1, &v1.kcv),
            ),
            415,
            "malformed",
        ),
        (
            "an unknown key id",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body("k00000000000000000000000000000000", 1, &v1.kcv),
            ),
            409,
            "ack-mismatch",
        ),
        (
            "a delivered key id with another version",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body(&v1.key_id, 2, &v1.kcv),
            ),
            409,
            "ack-mismatch",
        ),
        (
            "a delivered version with another KCV",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body(&v1.key_id, 1, &[0, 0, 0]),
            ),
            409,
            "ack-mismatch",
        ),
        (
            "a version rotated but never delivered",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body(&v2.key_id, 2, &v2.kcv),
            ),
            409,
            "ack-mismatch",
        ),
        (
            "another device's delivered version",
            ask(
                "POST",
                "/secret/ack",
                Some(JSON),
                SecretAck {
                    key_id: b1.key_id.clone(),
                    version: 1,
                    kcv: b1.kcv.clone(),
                }
                .to_json(),
            ),
            409,
            "ack-mismatch",
        ),
        (
            "GET on the ack",
            ask("GET", "/secret/ack", None, Vec::new()),
            405,
            "malformed",
        ),
        (
            "PUT on the ack",
            ask(
                "PUT",
                "/secret/ack",
                Some(CBOR),
                ack_body(&v1.key_id, 1, &v1.kcv),
            ),
            405,
            "malformed",
        ),
        (
            "POST on the secret",
            ask("POST", "/secret", Some(CBOR), Vec::new()),
            405,
            "malformed",
        ),
        (
            "DELETE on the secret",
            ask("DELETE", "/secret", None, Vec::new()),
            405,
            "malformed",
        ),
        (
            "an unknown path",
            ask("GET", "/secrets", None, Vec::new()),
            404,
            "malformed",
        ),
        (
            "the enrollment door's path",
            ask("POST", "/enroll", Some(CBOR), b"\xa0".to_vec()),
            404,
            "malformed",
        ),
        // Not a refusal, and no change either: an acknowledgement repeated (the device lost
        // the first 204) is answered again and recorded once.
        (
            "a repeated acknowledgement",
            ask(
                "POST",
                "/secret/ack",
                Some(CBOR),
                ack_body(&v1.key_id, 1, &v1.kcv),
            ),
            204,
            "-",
        ),
    ];
    let before = snapshot(&store);
    for (what, req, status, kind) in &cases {
        let got = send(&client, req).await;
        assert_eq!(answer(&got), (*status, kind.to_string()), "{what}");
        if *status == 405 {
            let want = if req.path == "/secret/ack" {
                "POST"
            } else {
                "GET"
            };
            assert_eq!(allow(&got), want, "{what}: Allow");
        }
        if req.content_type == Some(JSON) && *status >= 400 {
            assert_eq!(got.content_type, "application/problem+json", "{what}");
        }
        assert_unchanged(&store, &before, what);
    }

    // A device revoked and one whose serial was reset, each on a connection kept open from
    // before: refused at the next request (revoked; unknown-device), and at a new handshake.
    let r = common::enrolled_over_coap(&ca, coap, &line, 3, ED).await;
    let s = common::enrolled_over_coap(&ca, coap, &line, 4, ED).await;
    let mut r_kept = mtls_client(url(mtls), &r).unwrap().session().await.unwrap();
    let mut s_kept = mtls_client(url(mtls), &s).unwrap().session().await.unwrap();
    let r1 = device_agent::secrets::fetch_on(&mut r_kept).await.unwrap();
    let s1 = device_agent::secrets::fetch_on(&mut s_kept).await.unwrap();
    assert!(server.service.revoke(3, "test").await.unwrap().is_some());
    assert!(matches!(
        server.service.reset(4, "test").await.unwrap(),
        ca_server::store::ResetOutcome::Reset(_)
    ));
    let before = snapshot(&store);
    for (who, kept, ack, kind) in [
        ("revoked", &mut r_kept, &r1, "revoked"),
        ("reset", &mut s_kept, &s1, "unknown-device"),
    ] {
        let got = kept
            .request("GET", "/secret", None, CBOR, Vec::new())
            .await
            .unwrap();
        assert_eq!(answer(&got), (403, kind.into()), "{who}: fetch");
        let body = ack_body(&ack.key_id, ack.version, &ack.kcv);
        let got = kept
            .request("POST", "/secret/ack", Some(CBOR), CBOR, body)
            .await
            .unwrap();
        assert_eq!(answer(&got), (403, kind.into()), "{who}: ack");
        assert_unchanged(&store, &before, who);
    }
    for (who, dev) in [("revoked", &r), ("reset", &s)] {
        let config = tls_client(
            &ca.ca_der,
            Some((
                dev.certificate.clone().unwrap().into(),
                rustls::pki_types::PrivateKeyDer::Pkcs8(dev.key.pkcs8_der().to_vec().into()),
            )),
        );
        let alert = handshake_refusal(mtls, config).await;
        assert!(
            alert.contains("received fatal alert: CertificateRevoked"),
            "{who} at a new handshake: {alert}"
        );
        assert_unchanged(&store, &before, who);
    }

    // Strangers, refused in the handshake: no certificate, an operator's, another CA's.
    let op = common::operator(&ca, "alice");
    let other = TestCa::with_file_key(ED);
    let forged = protocol_spec::profile::CertProfile::from_ca_der(&other.ca_der)
        .unwrap()
        .issue(
            a.serial,
            &a.key.spki_der(),
            &protocol_spec::KeyPair::from_pem(
                &std::fs::read_to_string(other.dir.ca_key()).unwrap(),
                &SystemRandom::new(),
            )
            .unwrap(),
            &SystemRandom::new(),
        )
        .unwrap();
    let a_key = || rustls::pki_types::PrivateKeyDer::Pkcs8(a.key.pkcs8_der().to_vec().into());
    for (who, client, alert) in [
        ("no certificate", None, "CertificateRequired"),
        (
            "an operator certificate",
            Some(pem_identity(&op.0, &op.1)),
            "UnknownCA",
        ),
        (
            "a certificate of another CA for A's serial and key",
            Some((forged.der.into(), a_key())),
            "DecryptError",
        ),
    ] {
        let got = handshake_refusal(mtls, tls_client(&ca.ca_der, client)).await;
        assert!(
            got.contains(&format!("received fatal alert: {alert}")),
            "{who}: {got}"
        );
        assert_unchanged(&store, &before, who);
    }
    // The device whose answers these were still works.
    assert!(matches!(
        sync(&client, &mut a, |_| Ok(())).await.unwrap(),
        device_agent::secrets::SyncOutcome::Stored { version: 2, .. }
    ));
    server.stop().await;
}

/// (status, the problem's own status, its detail) of an admin answer.
fn admin_answer(a: &HttpAnswer) -> (u16, u16, String) {
    let p: ca_server::ops::AdminProblem = serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("HTTP {}: no admin problem ({e}): {:?}", a.status, a.body));
    assert_eq!(a.content_type, "application/problem+json");
    (a.status, p.status, p.detail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_at_the_admin_door_has_its_problem_and_changes_nothing() {
    let ca = TestCa::new(ED);
    let line = Line::new("line-1", ED);
    ca.add_line(&line, 1, 1000, None);
    let alice = common::operator_with(&ca, "alice", &[]);
    let bob = common::operator_with(&ca, "bob", &["--role", "read-only"]);
    let carol = common::operator_with(&ca, "carol", &[]);
    let server = ca.start().await;
    let (coap, admin) = (server.coap.unwrap(), server.admin.unwrap());
    let store = server.service.store().clone();
    let as_operator = |files: &(std::path::PathBuf, std::path::PathBuf)| {
        HttpsClient::with_config(
            url(admin),
            tls_client(&ca.ca_der, Some(pem_identity(&files.0, &files.1))),
        )
        .unwrap()
    };
    let client = as_operator(&alice);
    // Device 5 active (its secret fetched), device 6 revoked, operator carol revoked.
    let five = common::enrolled_over_coap(&ca, coap, &line, 5, ED).await;
    device_agent::secrets::fetch(&mtls_client(url(server.mtls.unwrap()), &five).unwrap())
        .await
        .unwrap();
    common::enrolled_over_coap(&ca, coap, &line, 6, ED).await;
    for path in ["/devices/6/revoke", "/operators/carol/revoke"] {
        let a = client
            .request("POST", path, None, JSON, Vec::new())
            .await
            .unwrap();
        assert_eq!(a.status, 200, "{path}");
    }
    let pem = protocol_spec::PublicKey::from(&Line::new("x", ED).key).to_pem();
    let line_body = |id: &str, serials: &str, extra: &str| {
        format!(r#"{{"id": "{id}", "public_key": {pem:?}, "serials": "{serials}"{extra}}}"#)
            .into_bytes()
    };
    let j = |s: &str| s.as_bytes().to_vec();
    let cases: Vec<(Ask, u16, &str)> = vec![
        (
            ask("GET", "/devices/abc", None, vec![]),
            400,
            "is not a device serial",
        ),
        (
            ask("GET", "/devices/0", None, vec![]),
            400,
            "is not a device serial",
        ),
        (
            ask("GET", "/devices/999", None, vec![]),
            404,
            "no device 999",
        ),
        // A body sent to a route that takes none: refused, not ignored (device 5 stays
        // active, which the store snapshot checks).
        (
            ask(
                "POST",
                "/devices/5/revoke",
                Some(JSON),
                j(r#"{"reason":"keyCompromise"}"#),
            ),
            400,
            "takes no request body",
        ),
        (
            ask("POST", "/devices/5/reset", Some(JSON), j("{}")),
            400,
            "takes no request body",
        ),
        (
            ask("GET", "/devices/5", Some(JSON), j("{}")),
            400,
            "takes no request body",
        ),
        (
            ask("POST", "/devices/999/revoke", None, vec![]),
            404,
            "no enrolled device 999",
        ),
        (
            ask("POST", "/devices/999/reset", None, vec![]),
            404,
            "no enrolled device 999",
        ),
        (
            ask("POST", "/devices/6/reset", None, vec![]),
            409,
            "device 6 is revoked",
        ),
        (
            ask("POST", "/secrets/rotate", Some(JSON), j("{}")),
            400,
            "exactly one",
        ),
        (
            ask(
                "POST",
                "/secrets/rotate",
                Some(JSON),
                j(r#"{"serial": 5, "all": true}"#),
            ),
            400,
            "exactly one",
        ),
        (
            ask(
                "POST",
                "/secrets/rotate",
                Some(JSON),
                j(r#"{"serial": 999}"#),
            ),
            404,
            "serial 999",
        ),
        (
            ask("POST", "/secrets/rotate", Some(JSON), j(r#"{"serial": 6}"#)),
            403,
            "serial 6",
        ),
        (
            ask(
                "POST",
                "/secrets/rotate",
                Some(JSON),
                j(r#"{"line": "nope"}"#),
            ),
            404,
            "no line",
        ),
        (
            ask(
                "POST",
                "/secrets/rotate",
                Some(JSON),
                j(r#"{"serial": 5, "extra": 1}"#),
            ),
            400,
            "unknown field",
        ),
        (
            ask("POST", "/secrets/rotate", Some(JSON), j("serial=5")),
            400,
            "request body",
        ),
        (
            ask("POST", "/secrets/rotate", Some(CBOR), j(r#"{"serial": 5}"#)),
            415,
            "not application/json",
        ),
        (
            ask(
                "POST",
                "/secrets/rotate",
                Some("text/plain"),
                j(r#"{"serial": 5}"#),
            ),
            415,
            "not application/json",
        ),
        (
            ask("POST", "/secrets/rotate", Some(JSON), vec![b' '; 70_000]),
            413,
            "over 65536 bytes",
        ),
        (
            ask(
                "POST",
                "/lines",
                Some(JSON),
                line_body("line-1", "2000-2999", ""),
            ),
            409,
            "already exists",
        ),
        (
            ask(
                "POST",
                "/lines",
                Some(JSON),
                line_body("bad id!", "2000-2999", ""),
            ),
            400,
            "line id",
        ),
        (
            ask(
                "POST",
                "/lines",
                Some(JSON),
                j(r#"{"id": "l2", "public_key": "nope", "serials": "2000-2999"}"#),
            ),
            400,
            "public key",
        ),
        (
            ask(
                "POST",
                "/lines",
                Some(JSON),
                line_body("l2", "2999-2000", ""),
            ),
            400,
            "2999-2000",
        ),
        (
            ask(
                "POST",
                "/lines",
                Some(JSON),
                line_body("l2", "2000-2999", r#", "rate": 2000000"#),
            ),
            400,
            "above 1000000",
        ),
        (
            ask(
                "POST",
                "/lines",
                Some(JSON),
                line_body("l2", "2000-2999", r#", "secret_source": "dukpt:0000ABCD""#),
            ),
            400,
            "no BDK 0000ABCD",
        ),
        (
            ask("POST", "/lines/nope/disable", None, vec![]),
            404,
            "nope",
        ),
        (ask("POST", "/lines/nope/enable", None, vec![]), 404, "nope"),
        (
            ask("POST", "/lines/nope/rate", Some(JSON), j(r#"{"rate": 1}"#)),
            404,
            "nope",
        ),
        (
            ask(
                "POST",
                "/lines/line-1/rate",
                Some(JSON),
                j(r#"{"rate": "fast"}"#),
            ),
            400,
            "request body",
        ),
        (
            ask("POST", "/operators/nobody/revoke", None, vec![]),
            404,
            "no operator \"nobody\"",
        ),
        (
            ask("POST", "/operators/bad%20name/revoke", None, vec![]),
            400,
            "operator name",
        ),
        (
            ask("GET", "/audit?after=x", None, vec![]),
            400,
            "is not a number",
        ),
        (
            ask("GET", "/audit?what=1", None, vec![]),
            400,
            "unknown query parameter",
        ),
        (
            ask("GET", "/audit/verify?what=1", None, vec![]),
            400,
            "unknown query",
        ),
        (
            ask("POST", "/dukpt/bdks", Some(JSON), j("{}")),
            400,
            "request body",
        ),
        (
            ask(
                "POST",
                "/dukpt/bdks",
                Some(JSON),
                j(r#"{"bdk_id": "nothex!!", "generate": true}"#),
            ),
            400,
            "nothex!!",
        ),
        (
            ask(
                "POST",
                "/dukpt/derive",
                Some(JSON),
                j(r#"{"ksn": "0000ABCD0000000000000001"}"#),
            ),
            404,
            "0000ABCD",
        ),
        (ask("DELETE", "/devices/5", None, vec![]), 405, "only GET"),
        (
            ask("GET", "/secrets/rotate", None, vec![]),
            405,
            "only POST",
        ),
        (
            ask("PUT", "/lines", Some(JSON), j("{}")),
            405,
            "only GET, POST",
        ),
        (
            ask("GET", "/nothing", None, vec![]),
            404,
            "no admin resource GET /nothing",
        ),
    ];
    let before = snapshot(&store);
    for (req, status, detail) in &cases {
        let what = format!("{} {}", req.method, req.path);
        let got = send(&client, req).await;
        let (http, body_status, got_detail) = admin_answer(&got);
        assert_eq!(
            (http, body_status),
            (*status, *status),
            "{what}: {got_detail}"
        );
        assert!(
            got_detail.contains(detail),
            "{what}: {got_detail:?} lacks {detail:?}"
        );
        if *status == 405 {
            assert_eq!(
                allow(&got),
                detail.trim_start_matches("only "),
                "{what}: Allow"
            );
        }
        assert_unchanged(&store, &before, &what);
    }

    // A read-only operator's writes and a revoked operator's every request: 403.
    for (who, files, req, detail) in [
        (
            "read-only",
            &bob,
            ask("POST", "/devices/5/revoke", None, vec![]),
            "read-only",
        ),
        (
            "read-only",
            &bob,
            ask(
                "POST",
                "/lines",
                Some(JSON),
                line_body("l3", "3000-3999", ""),
            ),
            "read-only",
        ),
        (
            "read-only",
            &bob,
            ask("POST", "/secrets/rotate", Some(CBOR), j("x")),
            "read-only",
        ),
        (
            "revoked",
            &carol,
            ask("GET", "/devices/5", None, vec![]),
            "was revoked",
        ),
        (
            "revoked",
            &carol,
            ask("POST", "/devices/5/revoke", None, vec![]),
            "was revoked",
        ),
    ] {
        let got = send(&as_operator(files), &req).await;
        let (http, _, got_detail) = admin_answer(&got);
        assert_eq!(http, 403, "{who}: {got_detail}");
        assert!(got_detail.contains(detail), "{who}: {got_detail}");
        assert_unchanged(&store, &before, who);
    }

    // Refused in the handshake: no certificate, a device's, another CA's operator.
    let other = TestCa::new(ED);
    let mallory = common::operator_with(&other, "alice", &[]);
    let device = (
        rustls::pki_types::CertificateDer::from(five.certificate.clone().unwrap()),
        rustls::pki_types::PrivateKeyDer::Pkcs8(five.key.pkcs8_der().to_vec().into()),
    );
    for (who, identity, alert) in [
        ("no certificate", None, "CertificateRequired"),
        ("a device certificate", Some(device), "UnknownCA"),
        (
            "another CA's operator of the same name",
            Some(pem_identity(&mallory.0, &mallory.1)),
            // Every operator CA has the same name, so the server checks it under its own
            // operator CA's key, where its signature fails: decrypt_error.
            "DecryptError",
        ),
    ] {
        let got = handshake_refusal(admin, tls_client(&ca.ca_der, identity)).await;
        assert!(
            got.contains(&format!("received fatal alert: {alert}")),
            "{who}: {got}"
        );
        assert_unchanged(&store, &before, who);
    }
    server.stop().await;
}
