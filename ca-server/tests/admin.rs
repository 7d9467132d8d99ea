//! The operator surface on real sockets: operator certificates at the admin door, every
//! `ca-server` admin subcommand against a running server, revocation at the handshake and in
//! the CRL (checked with openssl), the audit chain, and the metrics (checked by a parser).
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ca_server::audit::{AuditLine, AuditVerdict};
use ca_server::config::StoreSettings;
use ca_server::ops::{DeviceView, LineView, RotateResult};
use ca_server::server::RunningServer;
use common::{Line, TestCa};
use device_agent::AgentError;
use device_agent::enroll::{accept_response, build_request};
use device_agent::secrets::{SyncOutcome, mtls_client, sync};
use device_agent::state::DeviceState;
use device_agent::url::CaUrl;
use protocol_spec::messages::ResponseForm;
use protocol_spec::profile::{CertProfile, cert_pem};
use protocol_spec::{DeviceSerial, KeyAlgorithm, ProblemType, PublicKey};
use ring::rand::SystemRandom;

/// Enrolls `serial` over CoAP with a fresh key; the state is ready for the secrets door.
async fn enroll(
    ca: &TestCa,
    coap: SocketAddr,
    line: &Line,
    serial: u64,
    alg: KeyAlgorithm,
) -> Result<DeviceState, AgentError> {
    let rng = SystemRandom::new();
    let mut s = DeviceState::generate(DeviceSerial::new(serial).unwrap(), alg, &rng).unwrap();
    let token = line.token(serial, &s.key.spki_der());
    let req = build_request(&s, &token, ResponseForm::Compact, &rng)
        .unwrap()
        .to_cbor();
    let client =
        device_agent::coap::CoapClient::new(CaUrl::parse(&format!("coap://{coap}")).unwrap());
    let resp = client.enroll_once(req).await?;
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    s.certificate = Some(accept_response(&s, &profile, &resp)?);
    s.ca_certificate = Some(ca.ca_der.clone());
    Ok(s)
}

async fn sync_secret(mtls: SocketAddr, dev: &mut DeviceState) -> SyncOutcome {
    let url = CaUrl::parse(&format!("https://{mtls}")).unwrap();
    let client = mtls_client(url, dev).unwrap();
    sync(&client, dev, |_| Ok(())).await.unwrap()
}

/// The operator's files and the server's addresses, for running `ca-server` as a user would.
struct Operator {
    cert: PathBuf,
    key: PathBuf,
    ca_cert: PathBuf,
    admin: String,
}

impl Operator {
    fn add(ca: &TestCa, server: &RunningServer, name: &str) -> Self {
        Self::add_at(ca, server.admin.unwrap(), name)
    }

    fn add_at(ca: &TestCa, admin: SocketAddr, name: &str) -> Self {
        Self::add_as(ca, admin, name, &[])
    }

    /// `operator add NAME EXTRA...` (such as `--role read-only`).
    fn add_as(ca: &TestCa, admin: SocketAddr, name: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "operator",
            "add",
            "--dir",
            ca.root().to_str().unwrap(),
            name,
        ];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{}", stderr(&out));
        let ops = ca.dir.operators();
        let cert = ops.join(format!("{name}.pem"));
        let key = ops.join(format!("{name}.key.pem"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        Operator {
            cert,
            key,
            ca_cert: ca.ca_pem_path(),
            admin: format!("https://{admin}"),
        }
    }

    /// Runs `ca-server ARGS` with this operator's credentials in the environment.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ca-server"))
            .args(args)
            .env("IMPRINT_ADMIN", &self.admin)
            .env("IMPRINT_OPERATOR_CERT", &self.cert)
            .env("IMPRINT_OPERATOR_KEY", &self.key)
            .env("IMPRINT_CA_CERT", &self.ca_cert)
            .output()
            .unwrap()
    }

    /// Runs and expects success; stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ca-server {args:?}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        stdout(&out)
    }

    fn json<T: for<'de> serde::Deserialize<'de>>(&self, args: &[&str]) -> T {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    fn curl(&self, url: &str) -> Output {
        curl(url, &self.ca_cert, Some((&self.cert, &self.key)))
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(args)
        .env_remove("IMPRINT_ADMIN")
        .output()
        .unwrap()
}

fn curl(url: &str, ca: &Path, client: Option<(&Path, &Path)>) -> Output {
    let mut c = Command::new("curl");
    c.args(["-sS", "--fail-with-body", "--cacert"]).arg(ca);
    if let Some((cert, key)) = client {
        c.arg("--cert").arg(cert).arg("--key").arg(key);
    }
    c.arg(url).output().unwrap()
}

/// curl failed in the TLS handshake (exit 35, or 56 when TLS 1.3 delivers the server's alert
/// after the client's Finished), not with an HTTP error answer (22) from a handler.
fn assert_tls_refused(out: &Output, what: &str) {
    assert!(
        matches!(out.status.code(), Some(35 | 56)),
        "{what}: curl exit {:?}, {}",
        out.status.code(),
        stderr(out)
    );
    let e = stderr(out).to_ascii_lowercase();
    assert!(e.contains("alert") || e.contains("ssl"), "{what}: {e}");
}

/// Checks every line of a scrape against the Prometheus text format 0.0.4 grammar (the parser
/// crate skips lines it does not understand, so it alone cannot fail on a malformed one).
fn check_exposition_format(text: &str) {
    fn name_ok(n: &str) -> bool {
        let mut c = n.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
            && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
    }
    let mut typed = std::collections::HashMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, tail) = (parts.next(), parts.next(), parts.next());
            assert!(name.is_some_and(name_ok), "bad comment line {line:?}");
            match kind {
                Some("HELP") => assert!(tail.is_some(), "{line:?}"),
                Some("TYPE") => {
                    let t = tail.unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                        "{line:?}"
                    );
                    typed.insert(name.unwrap().to_string(), t.to_string());
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("no value");
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let (name, labels) = match series.split_once('{') {
            None => (series, ""),
            Some((n, l)) => (n, l.strip_suffix('}').expect("unclosed labels")),
        };
        assert!(name_ok(name), "bad metric name in {line:?}");
        let family = ["_bucket", "_sum", "_count", "_total"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| typed.contains_key(*b)))
            .unwrap_or(name);
        assert!(
            typed.contains_key(family),
            "sample without a TYPE: {line:?}"
        );
        let mut rest = labels;
        while !rest.is_empty() {
            let (k, v) = rest.split_once("=\"").expect("label without =\"");
            assert!(name_ok(k), "bad label name in {line:?}");
            let end = v.find('"').expect("unterminated label value");
            assert!(
                !v[..end].contains('\\'),
                "escapes not expected here: {line:?}"
            );
            rest = v[end + 1..].strip_prefix(',').unwrap_or(&v[end + 1..]);
        }
    }
    for (name, t) in &typed {
        if t == "histogram" {
            assert!(
                text.contains(&format!("{name}_bucket")),
                "{name} has no buckets"
            );
            assert!(text.contains("le=\"+Inf\""), "{name} has no +Inf bucket");
            assert!(
                text.contains(&format!("{name}_count")),
                "{name} has no count"
            );
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write_device_files(dir: &Path, dev: &DeviceState) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("dev{}.pem", dev.serial.get()));
    let key = dir.join(format!("dev{}.key", dev.serial.get()));
    std::fs::write(&cert, cert_pem(dev.certificate.as_ref().unwrap())).unwrap();
    std::fs::write(&key, dev.key.to_pem().as_bytes()).unwrap();
    (cert, key)
}

async fn setup() -> (TestCa, Line, RunningServer) {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1000, None);
    let server = ca.start().await;
    (ca, line, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_and_device_certificates_stay_at_their_own_doors() {
    let (ca, line, server) = setup().await;
    let op = tokio::task::block_in_place(|| Operator::add(&ca, &server, "alice"));
    let dev = enroll(&ca, server.coap.unwrap(), &line, 7, KeyAlgorithm::P256)
        .await
        .unwrap();
    let (dev_cert, dev_key) = write_device_files(ca.tmp.path(), &dev);
    let admin = server.admin.unwrap();
    let mtls = server.mtls.unwrap();
    tokio::task::block_in_place(|| {
        // The operator at the admin door: in.
        let out = op.curl(&format!("https://{admin}/health"));
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(stdout(&out), "ok\n");
        // A device certificate at the admin door: the handshake fails (another root).
        let out = curl(
            &format!("https://{admin}/health"),
            &ca.ca_pem_path(),
            Some((&dev_cert, &dev_key)),
        );
        assert_tls_refused(&out, "a device certificate at the admin door");
        // No certificate at all: refused too.
        let out = curl(&format!("https://{admin}/health"), &ca.ca_pem_path(), None);
        assert_tls_refused(&out, "no certificate at the admin door");
        // The CLI with a device's certificate as operator certificate: refused, and it says
        // so.
        let out = Command::new(env!("CARGO_BIN_EXE_ca-server"))
            .args(["device", "show", "7"])
            .env("IMPRINT_ADMIN", &op.admin)
            .env("IMPRINT_OPERATOR_CERT", &dev_cert)
            .env("IMPRINT_OPERATOR_KEY", &dev_key)
            .env("IMPRINT_CA_CERT", &op.ca_cert)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(stderr(&out).contains("admin API"), "{}", stderr(&out));
        // The operator at the secrets door: the handshake fails (operator CA not trusted).
        let out = curl(
            &format!("https://{mtls}/secret"),
            &ca.ca_pem_path(),
            Some((&op.cert, &op.key)),
        );
        assert_tls_refused(&out, "an operator certificate at the secrets door");
        // The device at its own door: in.
        let out = curl(
            &format!("https://{mtls}/secret"),
            &ca.ca_pem_path(),
            Some((&dev_cert, &dev_key)),
        );
        assert!(out.status.success(), "{}", stderr(&out));
    });
    // The operator profile refuses a device certificate even on its own (belt and braces).
    let why = ca_server::operators::operator_name(dev.certificate.as_ref().unwrap()).unwrap_err();
    assert!(why.contains("device certificate"), "{why}");
    let op_der =
        protocol_spec::profile::cert_from_pem(&std::fs::read_to_string(&op.cert).unwrap()).unwrap();
    assert_eq!(
        ca_server::operators::operator_name(&op_der).unwrap(),
        "alice"
    );
    // A second operator of the same name is refused, wherever its files would go: names are
    // issued once.
    let elsewhere = ca.tmp.path().join("elsewhere");
    let out = run(&[
        "operator",
        "add",
        "--dir",
        ca.root().to_str().unwrap(),
        "--out",
        elsewhere.to_str().unwrap(),
        "alice",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already issued"), "{}", stderr(&out));
    assert!(!elsewhere.join("alice.pem").exists());
    server.stop().await;
}

/// `openssl verify -crl_check` of `cert` against the CA and the CRL the HTTPS door publishes
/// now: (passed, openssl's output).
fn openssl_verify_with_crl(ca: &TestCa, https: SocketAddr, cert: &Path) -> (bool, String) {
    let crl = ca.tmp.path().join("now.crl.pem");
    let out = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "-H",
            "Accept: application/x-pem-file",
            "--cacert",
        ])
        .arg(ca.ca_pem_path())
        .arg("-o")
        .arg(&crl)
        .arg(format!("https://{https}/crl"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = Command::new("openssl")
        .args(["verify", "-crl_check", "-CAfile"])
        .arg(ca.ca_pem_path())
        .arg("-CRLfile")
        .arg(&crl)
        .arg(cert)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

/// RFC 5280 4.1.2.2: a CA's certificate serials are unique. A serial reset twice and enrolled
/// three times has three certificates with three certificate serials (the reset generation in
/// the serial, SPEC.md 5), each rebuilt by the device from a compact response; at each reset
/// the old certificate goes on the CRL, so openssl refuses it and accepts the current one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_serial_gets_a_new_certificate_serial_and_the_old_one_is_on_the_crl() {
    let (ca, line, server) = setup().await;
    let op = tokio::task::block_in_place(|| Operator::add(&ca, &server, "alice"));
    let (coap, https, mtls) = (
        server.coap.unwrap(),
        server.https.unwrap(),
        server.mtls.unwrap(),
    );
    let mut certs: Vec<(Vec<u8>, PathBuf)> = Vec::new();
    let mut earlier: Vec<DeviceState> = Vec::new();
    for generation in 0..3u8 {
        let alg = [KeyAlgorithm::Ed25519, KeyAlgorithm::P256][usize::from(generation % 2)];
        let mut dev = enroll(&ca, coap, &line, 21, alg).await.unwrap();
        let der = dev.certificate.clone().unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let serial = cert.tbs_certificate.raw_serial().to_vec();
        for (earlier, _) in &certs {
            let (_, e) = x509_parser::parse_x509_certificate(earlier).unwrap();
            assert_eq!(e.tbs_certificate.issuer, cert.tbs_certificate.issuer);
            assert_ne!(
                e.tbs_certificate.raw_serial(),
                serial.as_slice(),
                "issuer and serial of generation {generation} repeat an earlier certificate's"
            );
        }
        // The new binding is the one on record, and it fetches its secret over mutual TLS.
        match sync_secret(mtls, &mut dev).await {
            SyncOutcome::Stored { .. } => {}
            other => panic!("{other:?}"),
        }
        let dir = ca.tmp.path().join(format!("g{generation}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (pem, _) = write_device_files(&dir, &dev);
        let (ok, text) = tokio::task::block_in_place(|| openssl_verify_with_crl(&ca, https, &pem));
        assert!(ok, "generation {generation}, current: {text}");
        for (i, (_, old)) in certs.iter().enumerate() {
            let (ok, text) =
                tokio::task::block_in_place(|| openssl_verify_with_crl(&ca, https, old));
            assert!(!ok, "generation {i}, reset: openssl accepted it: {text}");
            assert!(text.contains("revoked"), "{text}");
        }
        // A superseded certificate is refused in the mutual-TLS handshake, as revoked.
        for old in &earlier {
            let url = CaUrl::parse(&format!("https://{mtls}")).unwrap();
            match device_agent::secrets::fetch(&mtls_client(url, old).unwrap()).await {
                Err(AgentError::Transport(msg)) => {
                    assert!(msg.to_ascii_lowercase().contains("revoked"), "{msg}")
                }
                other => panic!("{:?}", other.map(|_| ())),
            }
        }
        let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "show", "21"]));
        assert_eq!(v.binding.unwrap().generation, u32::from(generation));
        certs.push((der, pem));
        earlier.push(dev);
        let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "reset", "21"]));
        assert_eq!(v.status, "reset");
    }
    server.stop().await;
}

/// An `openssl s_client` session on the admin door with `op`'s certificate: one kept-alive
/// connection; `get` sends a request on it and returns what came back within a few seconds.
struct KeptAlive {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl KeptAlive {
    fn open(op: &Operator, admin: SocketAddr) -> Self {
        let mut child = Command::new("openssl")
            .args([
                "s_client",
                "-quiet",
                "-no_ign_eof",
                "-connect",
                &admin.to_string(),
            ])
            .arg("-cert")
            .arg(&op.cert)
            .arg("-key")
            .arg(&op.key)
            .arg("-CAfile")
            .arg(&op.ca_cert)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        KeptAlive { child, stdin, out }
    }

    fn get(&mut self, path: &str, until: &str) -> String {
        use std::io::Write;
        self.out.lock().unwrap().clear();
        write!(
            self.stdin,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"
        )
        .unwrap();
        self.stdin.flush().unwrap();
        for _ in 0..100 {
            let text = String::from_utf8_lossy(&self.out.lock().unwrap()).to_string();
            if text.contains(until) {
                return text;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        String::from_utf8_lossy(&self.out.lock().unwrap()).to_string()
    }
}

impl Drop for KeptAlive {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 14 finding 6: an operator revoked with `ca-server operator revoke` is refused at the
/// admin door from its very next request, on a connection it kept open too (a real openssl
/// client), and by the CLI; `operator list` shows who is revoked, when and by whom; the
/// revocation is in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_operator_is_refused_at_the_admin_door_at_once() {
    let (ca, _line, server) = setup().await;
    let admin = server.admin.unwrap();
    tokio::task::block_in_place(|| {
        let alice = Operator::add(&ca, &server, "alice");
        let bob = Operator::add(&ca, &server, "bob");
        let mut session = KeptAlive::open(&bob, admin);
        let first = session.get("/health", "ok\n");
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        let list: Vec<ca_server::ops::OperatorView> = alice.json(&["operator", "list"]);
        let status: Vec<(&str, &str)> = list
            .iter()
            .map(|o| (o.name.as_str(), o.status.as_str()))
            .collect();
        assert_eq!(status, [("alice", "active"), ("bob", "active")]);

        let out = alice.ok(&["operator", "revoke", "bob"]);
        assert!(out.contains("operator bob: revoked"), "{out}");
        // The kept-alive connection: its next request is refused.
        let second = session.get("/health", "revoked");
        assert!(second.starts_with("HTTP/1.1 403"), "{second}");
        assert!(second.contains("operator bob was revoked"), "{second}");
        // A new connection: curl is refused, and so is the CLI.
        let out = bob.curl(&format!("https://{admin}/health"));
        assert!(!out.status.success());
        assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));
        let out = bob.run(&["line", "list"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("403"), "{}", stderr(&out));
        // alice still works; revoking again changes nothing; an unknown name is refused.
        alice.ok(&["line", "list"]);
        alice.ok(&["operator", "revoke", "bob"]);
        let out = alice.run(&["operator", "revoke", "carol"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("404"), "{}", stderr(&out));
        let list: Vec<ca_server::ops::OperatorView> = alice.json(&["operator", "list"]);
        let bob_view = list.iter().find(|o| o.name == "bob").unwrap();
        assert_eq!(bob_view.status, "revoked");
        assert_eq!(bob_view.revoked_by.as_deref(), Some("operator:alice"));
        let text = alice.ok(&["operator", "list"]);
        assert!(text.contains("by operator:alice"), "{text}");
        let export = alice.ok(&["audit", "export"]);
        let revocations: Vec<AuditLine> = export
            .lines()
            .map(|l| serde_json::from_str::<AuditLine>(l).unwrap())
            .filter(|e| e.event == "operator-revoke")
            .collect();
        assert_eq!(revocations.len(), 1, "one entry, not one per call");
        assert_eq!(revocations[0].actor, "operator:alice");
    });
    server.stop().await;
}

/// A read-only operator (`operator add --role read-only`, for metrics scrapers) may GET every
/// read-only resource over real mutual TLS (curl and the CLI), and every write endpoint answers
/// it 403 with a problem that says why, changing nothing; an admin operator keeps every right;
/// `operator list` shows each role. Run on sled and on PostgreSQL (`IMPRINT_TEST_STORE`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_operator_reads_and_every_write_is_refused() {
    let (ca, line, server) = setup().await;
    let admin = server.admin.unwrap();
    let mut dev = enroll(&ca, server.coap.unwrap(), &line, 5, KeyAlgorithm::Ed25519)
        .await
        .unwrap();
    sync_secret(server.mtls.unwrap(), &mut dev).await;
    tokio::task::block_in_place(|| {
        let alice = Operator::add(&ca, &server, "alice");
        let scraper = Operator::add_as(&ca, admin, "scraper", &["--role", "read-only"]);
        // The role is in the certificate: the subject's unit.
        let pem = std::fs::read_to_string(&scraper.cert).unwrap();
        let der = protocol_spec::profile::cert_from_pem(&pem).unwrap();
        let id = ca_server::operators::operator_identity(&der).unwrap();
        assert_eq!(
            (id.name.as_str(), id.role),
            ("scraper", ca_server::operators::OperatorRole::ReadOnly)
        );
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(&scraper.cert)
            .output()
            .unwrap();
        assert!(
            stdout(&out).contains("OU = operators-read-only"),
            "{}",
            stdout(&out)
        );

        // Every read, with curl.
        for path in [
            "/metrics",
            "/health",
            "/crl",
            "/devices/5",
            "/lines",
            "/operators",
            "/dukpt/bdks",
            "/audit?after=0&limit=10",
            "/audit/verify",
        ] {
            let out = scraper.curl(&format!("https://{admin}{path}"));
            assert!(
                out.status.success(),
                "GET {path}: {}{}",
                stdout(&out),
                stderr(&out)
            );
        }
        let metrics = stdout(&scraper.curl(&format!("https://{admin}/metrics")));
        assert!(metrics.contains("imprint_"), "{metrics}");

        // Every write, refused before it is routed, and the store unchanged.
        let store = server.service.store().clone();
        let before = common::snapshot(&store);
        for (path, body) in [
            ("/devices/5/revoke", ""),
            ("/devices/5/reset", ""),
            ("/secrets/rotate", r#"{"all":true}"#),
            ("/lines", r#"{"id":"x","public_key":"","serials":"1-2"}"#),
            ("/lines/line-1/disable", ""),
            ("/lines/line-1/enable", ""),
            ("/lines/line-1/rate", r#"{"rate":1}"#),
            ("/dukpt/bdks", "{}"),
            ("/dukpt/derive", "{}"),
            ("/operators/alice/revoke", ""),
            ("/no-such-resource", ""),
        ] {
            let out = Command::new("curl")
                .args(["-sS", "-X", "POST", "-H", "Content-Type: application/json"])
                .args(["-d", body, "-w", "\n%{http_code}", "--cacert"])
                .arg(&scraper.ca_cert)
                .arg("--cert")
                .arg(&scraper.cert)
                .arg("--key")
                .arg(&scraper.key)
                .arg(format!("https://{admin}{path}"))
                .output()
                .unwrap();
            let text = stdout(&out);
            assert!(text.ends_with("\n403"), "POST {path}: {text}");
            let problem: serde_json::Value =
                serde_json::from_str(text.trim_end_matches("\n403")).unwrap();
            assert_eq!(problem["status"], 403, "{text}");
            let detail = problem["detail"].as_str().unwrap();
            assert!(
                detail.contains("operator scraper is read-only")
                    && detail.contains(&format!("POST {path} needs an admin operator")),
                "{detail}"
            );
        }
        assert_eq!(
            common::snapshot(&store),
            before,
            "a refused write changes nothing, not even the audit log"
        );

        // The CLI, as the scraper: reads work, changes are refused with the reason.
        scraper.ok(&["line", "list"]);
        let out = scraper.run(&["line", "disable", "line-1"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("403") && stderr(&out).contains("read-only"),
            "{}",
            stderr(&out)
        );
        let out = scraper.run(&["device", "revoke", "5"]);
        assert!(!out.status.success(), "{}", stdout(&out));

        // The admin keeps every right, and sees the roles.
        let list: Vec<ca_server::ops::OperatorView> = alice.json(&["operator", "list"]);
        let roles: Vec<(&str, Option<&str>)> = list
            .iter()
            .map(|o| (o.name.as_str(), o.role.as_deref()))
            .collect();
        assert_eq!(
            roles,
            [("alice", Some("admin")), ("scraper", Some("read-only"))]
        );
        let text = alice.ok(&["operator", "list"]);
        let scraper_row = text.lines().find(|l| l.starts_with("scraper")).unwrap();
        assert!(scraper_row.contains("read-only"), "{text}");
        alice.ok(&["line", "disable", "line-1"]);
        alice.ok(&["line", "enable", "line-1"]);
        // A read-only operator can be revoked like any other, and then reads nothing.
        alice.ok(&["operator", "revoke", "scraper"]);
        let out = scraper.curl(&format!("https://{admin}/metrics"));
        assert!(!out.status.success());
        assert!(stdout(&out).contains("revoked"), "{}", stdout(&out));
    });
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_against_a_running_server() {
    let (ca, line, server) = setup().await;
    let op = tokio::task::block_in_place(|| Operator::add(&ca, &server, "ops.bob"));
    let mut dev = enroll(&ca, server.coap.unwrap(), &line, 10, KeyAlgorithm::Ed25519)
        .await
        .unwrap();
    let mut other = enroll(&ca, server.coap.unwrap(), &line, 11, KeyAlgorithm::P256)
        .await
        .unwrap();
    assert!(matches!(
        sync_secret(server.mtls.unwrap(), &mut dev).await,
        SyncOutcome::Stored { .. }
    ));
    sync_secret(server.mtls.unwrap(), &mut other).await;

    // device show: the binding and version 1 delivered and confirmed.
    let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "show", "10"]));
    assert_eq!(v.status, "active");
    let b = v.binding.as_ref().unwrap();
    let spki_hash = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        &dev.key.spki_der(),
    ));
    assert_eq!(b.key_fingerprint, format!("sha256:{spki_hash}"));
    assert_eq!(b.line, "line-1");
    assert_eq!(b.key_algorithm, "ed25519");
    assert_eq!(
        protocol_spec::profile::cert_from_pem(&b.certificate).unwrap(),
        dev.certificate.clone().unwrap()
    );
    assert_eq!(v.secrets.len(), 1);
    assert_eq!(v.secrets[0].key_id, dev.secrets[0].key_id);
    assert!(v.secrets[0].delivered_at.is_some() && v.secrets[0].confirmed_at.is_some());

    // rotate one device, the device picks it up; the record keeps both versions.
    let r: RotateResult =
        tokio::task::block_in_place(|| op.json(&["secrets", "rotate", "--serial", "10"]));
    assert_eq!((r.requested, r.rotated), (1, 1));
    assert_eq!(r.versions[0].version, 2);
    let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "show", "10"]));
    assert_eq!(v.secrets.len(), 2);
    assert!(v.secrets[1].delivered_at.is_none(), "pending until fetched");
    assert!(matches!(
        sync_secret(server.mtls.unwrap(), &mut dev).await,
        SyncOutcome::Stored { .. }
    ));
    let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "show", "10"]));
    assert_eq!(
        v.secrets
            .iter()
            .map(|s| (
                s.version,
                s.delivered_at.is_some(),
                s.confirmed_at.is_some()
            ))
            .collect::<Vec<_>>(),
        vec![(1, true, true), (2, true, true)]
    );
    assert_eq!(v.secrets[1].key_id, r.versions[0].key_id);
    // The human form shows the same facts and the certificate, never a secret.
    let text = tokio::task::block_in_place(|| op.ok(&["device", "show", "10"]));
    assert!(text.contains(&format!("sha256:{spki_hash}")), "{text}");
    assert!(text.contains(&r.versions[0].key_id), "{text}");
    assert!(text.contains("BEGIN CERTIFICATE"), "{text}");
    for s in &dev.secrets {
        let secret = s.secret.as_slice();
        assert!(!text.contains(&hex::encode(secret)));
    }

    // rotate a line and all: every active device of the line gets a new pending version.
    let r: RotateResult =
        tokio::task::block_in_place(|| op.json(&["secrets", "rotate", "--line", "line-1"]));
    assert_eq!((r.requested, r.rotated), (2, 2));
    let r: RotateResult = tokio::task::block_in_place(|| op.json(&["secrets", "rotate", "--all"]));
    assert_eq!((r.requested, r.rotated), (2, 2));
    let out = tokio::task::block_in_place(|| op.run(&["secrets", "rotate", "--line", "nope"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no line"), "{}", stderr(&out));

    // lines: add, list, disable (its tokens are refused at once), enable.
    let line2 = Line::new("line-2", KeyAlgorithm::P256);
    let pem_path = ca.tmp.path().join("line-2.pub.pem");
    std::fs::write(&pem_path, PublicKey::from(&line2.key).to_pem()).unwrap();
    let added: LineView = tokio::task::block_in_place(|| {
        op.json(&[
            "line",
            "add",
            "--id",
            "line-2",
            "--public-key",
            pem_path.to_str().unwrap(),
            "--serials",
            "2000-2999",
            "--quota",
            "10",
            "--rate",
            "50",
        ])
    });
    assert_eq!(
        (
            added.first_serial,
            added.last_serial,
            added.quota,
            added.rate
        ),
        (2000, 2999, 10, 50)
    );
    let dup = tokio::task::block_in_place(|| {
        op.run(&[
            "line",
            "add",
            "--id",
            "line-2",
            "--public-key",
            pem_path.to_str().unwrap(),
            "--serials",
            "2000-2999",
        ])
    });
    assert!(!dup.status.success());
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    enroll(
        &ca,
        server.coap.unwrap(),
        &line2,
        2000,
        KeyAlgorithm::Ed25519,
    )
    .await
    .unwrap();
    let lines: Vec<LineView> = tokio::task::block_in_place(|| op.json(&["line", "list"]));
    assert_eq!(
        lines
            .iter()
            .map(|l| (l.id.as_str(), l.enrolled, l.active))
            .collect::<Vec<_>>(),
        vec![("line-1", 2, true), ("line-2", 1, true)]
    );
    let listed = tokio::task::block_in_place(|| op.ok(&["line", "list"]));
    assert!(
        listed.contains("line-2") && listed.contains("2000-2999"),
        "{listed}"
    );
    let l: LineView = tokio::task::block_in_place(|| op.json(&["line", "disable", "line-2"]));
    assert!(!l.active);
    match enroll(
        &ca,
        server.coap.unwrap(),
        &line2,
        2001,
        KeyAlgorithm::Ed25519,
    )
    .await
    {
        Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::LineUnknown),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let l: LineView = tokio::task::block_in_place(|| op.json(&["line", "enable", "line-2"]));
    assert!(l.active);
    enroll(
        &ca,
        server.coap.unwrap(),
        &line2,
        2001,
        KeyAlgorithm::Ed25519,
    )
    .await
    .unwrap();
    // rate: one enrollment a second; the second at once is refused, until the rate is lifted.
    let l: LineView = tokio::task::block_in_place(|| op.json(&["line", "rate", "line-2", "1"]));
    assert_eq!(l.rate, 1);
    let coap = server.coap.unwrap();
    enroll(&ca, coap, &line2, 2002, KeyAlgorithm::Ed25519)
        .await
        .unwrap();
    match enroll(&ca, coap, &line2, 2003, KeyAlgorithm::Ed25519).await {
        Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::RateLimited),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let l: LineView = tokio::task::block_in_place(|| op.json(&["line", "rate", "line-2", "0"]));
    assert_eq!(l.rate, 0);
    enroll(&ca, coap, &line2, 2003, KeyAlgorithm::Ed25519)
        .await
        .unwrap();
    let refused = tokio::task::block_in_place(|| op.run(&["line", "rate", "line-9", "5"]));
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("no line"), "{}", stderr(&refused));

    // revoke: the next handshake fails, and the serial is in the CRL, which openssl accepts.
    let https = server.https.unwrap();
    let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "revoke", "10"]));
    assert_eq!(v.status, "revoked");
    let url = CaUrl::parse(&format!("https://{}", server.mtls.unwrap())).unwrap();
    match device_agent::secrets::fetch(&mtls_client(url, &dev).unwrap()).await {
        Err(AgentError::Transport(msg)) => {
            assert!(msg.to_ascii_lowercase().contains("revoked"), "{msg}")
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
    let crl_path = ca.tmp.path().join("ca.crl");
    tokio::task::block_in_place(|| {
        let out = Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(ca.ca_pem_path())
            .arg("-o")
            .arg(&crl_path)
            .arg(format!("https://{https}/crl"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let out = Command::new("openssl")
            .args(["crl", "-inform", "DER", "-noout", "-text", "-in"])
            .arg(&crl_path)
            .arg("-CAfile")
            .arg(ca.ca_pem_path())
            .arg("-verify")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stderr(&out).contains("verify OK"), "{}", stderr(&out));
        assert!(
            stdout(&out).contains("Serial Number: 0A"),
            "{}",
            stdout(&out)
        );
        assert!(
            !stdout(&out).contains("Serial Number: 0B"),
            "{}",
            stdout(&out)
        );
    });
    let der = std::fs::read(&crl_path).unwrap();
    let (_, crl) = x509_parser::parse_x509_crl(&der).unwrap();
    let listed: Vec<u64> = crl
        .iter_revoked_certificates()
        .map(|r| {
            r.raw_serial()
                .iter()
                .fold(0u64, |a, b| (a << 8) | u64::from(*b))
        })
        .collect();
    assert_eq!(listed, vec![10]);
    // A revoked device cannot enroll again, and cannot be rotated.
    let out = tokio::task::block_in_place(|| op.run(&["secrets", "rotate", "--serial", "10"]));
    assert!(!out.status.success());

    // A revoked device is not reset: its certificate serial stays on the CRL.
    let out = tokio::task::block_in_place(|| op.run(&["device", "reset", "10"]));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("409") && stderr(&out).contains("revoked"),
        "{}",
        stderr(&out)
    );
    // A revoked device's acknowledgement is refused by the store transaction itself, even when
    // it passed the door before the revocation committed.
    let revoked_id = ca_server::service::DeviceIdentity {
        serial: 10,
        key_hash: protocol_spec::spki::sha256(&dev.key.spki_der()),
        line: "line-1".into(),
    };
    let last = dev.secrets.last().unwrap();
    let ack = protocol_spec::messages::SecretAck {
        key_id: last.key_id.clone(),
        version: last.version,
        kcv: last.kcv.clone(),
    };
    let p = server
        .service
        .ack_secret(&revoked_id, ack)
        .await
        .unwrap_err();
    assert_eq!(p.kind, ProblemType::Revoked);
    let p = server.service.fetch_secret(&revoked_id).await.unwrap_err();
    assert_eq!(p.kind, ProblemType::Revoked);

    // reset: the serial is free again (history kept, old secrets retired, the line's count
    // back down); a new key enrolls and receives a new version, never the old binding's
    // secret, and the old binding can no longer fetch anything.
    let enrolled_before = |op: &Operator| -> u64 {
        let lines: Vec<LineView> = op.json(&["line", "list"]);
        lines.iter().find(|l| l.id == "line-1").unwrap().enrolled
    };
    let count = tokio::task::block_in_place(|| enrolled_before(&op));
    let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "reset", "11"]));
    assert_eq!(v.status, "reset");
    assert_eq!(v.history.len(), 1);
    assert_eq!(v.history[0].status, "active");
    assert!(v.secrets.iter().all(|s| s.retired_at.is_some()));
    assert_eq!(
        tokio::task::block_in_place(|| enrolled_before(&op)),
        count - 1
    );
    let old_id = ca_server::service::DeviceIdentity {
        serial: 11,
        key_hash: protocol_spec::spki::sha256(&other.key.spki_der()),
        line: "line-1".into(),
    };
    let mut again = enroll(&ca, server.coap.unwrap(), &line, 11, KeyAlgorithm::Ed25519)
        .await
        .unwrap();
    assert_eq!(tokio::task::block_in_place(|| enrolled_before(&op)), count);
    let before = v.secrets.len() as u64;
    match sync_secret(server.mtls.unwrap(), &mut again).await {
        SyncOutcome::Stored { .. } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(again.secrets[0].version, before + 1);
    assert!(
        other
            .secrets
            .iter()
            .all(|s| s.secret.as_slice() != again.secrets[0].secret.as_slice())
    );
    // The old binding passed the door before the reset: it still gets nothing.
    let p = server.service.fetch_secret(&old_id).await.unwrap_err();
    assert_eq!(p.kind, ProblemType::UnknownDevice, "{p:?}");
    // The old key is still bound to serial 11 for ever: it cannot enroll another serial.
    let token = line.token(12, &other.key.spki_der());
    let mut stolen = DeviceState::generate(
        DeviceSerial::new(12).unwrap(),
        KeyAlgorithm::P256,
        &SystemRandom::new(),
    )
    .unwrap();
    stolen.key =
        protocol_spec::KeyPair::from_pkcs8(other.key.pkcs8_der(), &SystemRandom::new()).unwrap();
    let req = build_request(&stolen, &token, ResponseForm::Compact, &SystemRandom::new())
        .unwrap()
        .to_cbor();
    let coap = device_agent::coap::CoapClient::new(
        CaUrl::parse(&format!("coap://{}", server.coap.unwrap())).unwrap(),
    );
    match coap.enroll_once(req).await {
        Err(AgentError::Refused(p)) => assert_eq!(p.kind, ProblemType::DuplicateKey),
        other => panic!("{:?}", other.map(|_| ())),
    }
    let v: DeviceView = tokio::task::block_in_place(|| op.json(&["device", "show", "11"]));
    assert_eq!(v.status, "active");
    assert_eq!(v.history.len(), 1);
    assert_eq!(v.binding.unwrap().key_algorithm, "ed25519");
    // The CRL still lists the revoked serial 10 ...
    let crl = tokio::task::block_in_place(|| {
        Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(ca.ca_pem_path())
            .arg(format!("https://{https}/crl"))
            .output()
            .unwrap()
    });
    let (_, crl) = x509_parser::parse_x509_crl(&crl.stdout).unwrap();
    // ... and now the certificate of serial 11's reset binding, reason superseded.
    let listed: Vec<(Vec<u8>, Option<u8>)> = crl
        .iter_revoked_certificates()
        .map(|r| (r.raw_serial().to_vec(), r.reason_code().map(|(_, c)| c.0)))
        .collect();
    assert_eq!(listed, vec![(vec![10], None), (vec![11], Some(4))]);
    let out = tokio::task::block_in_place(|| op.run(&["device", "show", "999"]));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no device 999"), "{}", stderr(&out));

    // audit export: every kind of event, with who did it; audit verify: intact.
    let export = tokio::task::block_in_place(|| op.ok(&["audit", "export"]));
    let entries: Vec<AuditLine> = export
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=entries.len() as u64).collect::<Vec<_>>()
    );
    for (event, actor) in [
        ("line-add", "test"),
        ("enroll", "line-1"),
        ("secret-deliver", "device"),
        ("secret-ack", "device"),
        ("secret-rotate", "operator:ops.bob"),
        ("device-show", "operator:ops.bob"),
        ("line-add", "operator:ops.bob"),
        ("line-disable", "operator:ops.bob"),
        ("line-enable", "operator:ops.bob"),
        ("line-rate", "operator:ops.bob"),
        ("revoke", "operator:ops.bob"),
        ("reset", "operator:ops.bob"),
        ("audit-export", "operator:ops.bob"),
    ] {
        assert!(
            entries.iter().any(|e| e.event == event && e.actor == actor),
            "no {event} by {actor} in the audit log"
        );
    }
    let verdict: AuditVerdict = tokio::task::block_in_place(|| op.json(&["audit", "verify"]));
    assert!(verdict.ok(), "{verdict:?}");
    assert!(verdict.entries >= entries.len() as u64);
    let text = tokio::task::block_in_place(|| op.ok(&["audit", "verify"]));
    assert!(text.contains("audit chain intact"), "{text}");
    let anchor = format!("{}:{}", verdict.entries, verdict.head);
    tokio::task::block_in_place(|| op.ok(&["audit", "verify", "--expect", &anchor]));
    let wrong = format!("{}:{}", verdict.entries, "00".repeat(32));
    let out = tokio::task::block_in_place(|| op.run(&["audit", "verify", "--expect", &wrong]));
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let out = tokio::task::block_in_place(|| op.run(&["audit", "verify", "--expect", "nonsense"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("SEQ:HASH"), "{}", stderr(&out));

    // With sled, offline commands refuse to touch a store the server holds; with PostgreSQL
    // they work beside it.
    let out = run(&["line", "list", "--dir", ca.root().to_str().unwrap()]);
    if ca.on_postgres() {
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(stdout(&out).contains("line-2"), "{}", stdout(&out));
    } else {
        assert!(!out.status.success());
        assert!(stderr(&out).contains("in use"), "{}", stderr(&out));
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_as_prometheus_text() {
    let (ca, line, server) = setup().await;
    let op = tokio::task::block_in_place(|| Operator::add(&ca, &server, "carol"));
    let mut dev = enroll(&ca, server.coap.unwrap(), &line, 20, KeyAlgorithm::Ed25519)
        .await
        .unwrap();
    sync_secret(server.mtls.unwrap(), &mut dev).await;
    // A refusal, so that a problem type shows up as an outcome.
    let _ = enroll(
        &ca,
        server.coap.unwrap(),
        &line,
        5000,
        KeyAlgorithm::Ed25519,
    )
    .await;
    let out = tokio::task::block_in_place(|| {
        op.curl(&format!("https://{}/metrics", server.admin.unwrap()))
    });
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    check_exposition_format(&text);
    let lines = text.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    };
    assert_eq!(
        value(
            "imprint_enrollments_total",
            &[("transport", "coap"), ("outcome", "issued")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "imprint_enrollments_total",
            &[("transport", "coap"), ("outcome", "serial-out-of-range")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value(
            "imprint_secret_deliveries_total",
            &[("outcome", "delivered")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value("imprint_secret_acks_total", &[("outcome", "confirmed")]),
        Some(1.0)
    );
    assert_eq!(
        value(
            "imprint_enrollment_duration_seconds",
            &[("transport", "coap")]
        ),
        Some(2.0),
        "both enrollments observed in the latency histogram: {text}"
    );
    assert!(value("imprint_commit_batch_size", &[]).unwrap() >= 3.0);
    assert!(value("imprint_store_size_bytes", &[]).unwrap() > 0.0);
    assert_eq!(
        value("imprint_line_enrolled_devices", &[("line", "line-1")]),
        Some(1.0)
    );
    assert!(value("imprint_coap_events_total", &[("event", "processed")]).unwrap() >= 2.0);
    assert!(scrape.docs.contains_key("imprint_enrollments_total"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_one_edited_entry() {
    // Edits the bytes sled keeps; the same on PostgreSQL's rows is the next test.
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, StoreSettings::default());
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1000, None);
    let server = ca.start().await;
    for serial in 1..=4 {
        let mut dev = enroll(
            &ca,
            server.coap.unwrap(),
            &line,
            serial,
            KeyAlgorithm::Ed25519,
        )
        .await
        .unwrap();
        sync_secret(server.mtls.unwrap(), &mut dev).await;
    }
    server.stop().await;
    let ok = run(&["audit", "verify", "--dir", ca.root().to_str().unwrap()]);
    assert!(ok.status.success(), "{}{}", stdout(&ok), stderr(&ok));
    let entries = {
        let db = open_sled(&ca.dir.store());
        db.open_tree("audit").unwrap().len() as u64
    };
    assert!(entries >= 13, "line-add + 4 x (enroll, deliver, ack)");
    // One byte changed anywhere in one entry (first, middle, last entry; first, middle, last
    // byte): `audit verify` names that entry, and exits 1.
    for seq in [1, entries / 2, entries] {
        for position in [Position::First, Position::Middle, Position::Last] {
            let copy = ca.tmp.path().join(format!("copy-{seq}-{position:?}"));
            copy_dir(ca.root(), &copy);
            {
                let db = open_sled(&copy.join("store"));
                let audit = db.open_tree("audit").unwrap();
                let key = seq.to_be_bytes();
                let mut value = audit.get(key).unwrap().unwrap().to_vec();
                let i = match position {
                    Position::First => 0,
                    Position::Middle => value.len() / 2,
                    Position::Last => value.len() - 1,
                };
                value[i] ^= 0x01;
                audit.insert(key, value).unwrap();
                db.flush().unwrap();
            }
            let out = run(&["audit", "verify", "--dir", copy.to_str().unwrap()]);
            assert_eq!(
                out.status.code(),
                Some(1),
                "{}{}",
                stdout(&out),
                stderr(&out)
            );
            assert!(
                stdout(&out).contains(&format!("BROKEN at entry {seq}:")),
                "edited entry {seq} ({position:?} byte): {}",
                stdout(&out)
            );
            let out = run(&["audit", "verify", "--json", "--dir", copy.to_str().unwrap()]);
            let v: AuditVerdict = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(&out), stderr(&out)));
            assert_eq!(v.first_bad.unwrap().seq, seq);
        }
    }
    // Removing an entry is named too.
    let copy = ca.tmp.path().join("copy-removed");
    copy_dir(ca.root(), &copy);
    {
        let db = open_sled(&copy.join("store"));
        db.open_tree("audit")
            .unwrap()
            .remove(5u64.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let out = run(&["audit", "verify", "--dir", copy.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("BROKEN at entry 5:"),
        "{}",
        stdout(&out)
    );
    assert!(stdout(&out).contains("missing"), "{}", stdout(&out));
    // Issue 14: someone who can write the store but has no audit key changes entry 3 and
    // recomputes every hash after it, consistently: the hash chain alone would pass, but the
    // MACs name entry 3, whether the forger keeps the old MACs or strips them.
    let head: AuditVerdict = serde_json::from_slice(
        &run(&[
            "audit",
            "verify",
            "--json",
            "--dir",
            ca.root().to_str().unwrap(),
        ])
        .stdout,
    )
    .unwrap();
    assert_eq!((head.keyed, head.keyed_from), (true, Some(1)), "{head:?}");
    let anchor = format!("{}:{}", head.entries, head.head);
    for (name, keep_macs) in [("kept", true), ("stripped", false)] {
        let copy = ca.tmp.path().join(format!("copy-rewritten-{name}"));
        copy_dir(ca.root(), &copy);
        {
            use ca_server::records::{AuditEntry, from_cbor, to_cbor};
            let db = open_sled(&copy.join("store"));
            let audit = db.open_tree("audit").unwrap();
            let mut prev = Vec::new();
            for seq in 1..=entries {
                let key = seq.to_be_bytes();
                let mut e: AuditEntry = from_cbor(&audit.get(key).unwrap().unwrap()).unwrap();
                if seq >= 3 {
                    if seq == 3 {
                        e.detail = "forged".into();
                    }
                    e.prev_hash = prev.clone();
                    let mac = e.mac.clone().filter(|_| keep_macs);
                    e = e.sealed(None);
                    e.mac = mac;
                    audit.insert(key, to_cbor(&e)).unwrap();
                }
                prev = e.hash.clone();
            }
            db.flush().unwrap();
        }
        let out = run(&["audit", "verify", "--dir", copy.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{name}: {}", stdout(&out));
        let why = if keep_macs {
            "does not vouch"
        } else {
            "carries no MAC"
        };
        assert!(
            stdout(&out).contains("BROKEN at entry 3:") && stdout(&out).contains(why),
            "MACs {name}: {}",
            stdout(&out)
        );
        // And the server refuses to start on a chain that ends unsealed.
        if !keep_macs {
            let out = run(&[
                "serve",
                "--dir",
                copy.to_str().unwrap(),
                "--https",
                "127.0.0.1:0",
            ]);
            assert!(!out.status.success());
            assert!(stderr(&out).contains("without a MAC"), "{}", stderr(&out));
        }
    }
    // What a MAC cannot show: the newest entry removed. The head recorded before does.
    let copy = ca.tmp.path().join("copy-truncated");
    copy_dir(ca.root(), &copy);
    {
        let db = open_sled(&copy.join("store"));
        db.open_tree("audit")
            .unwrap()
            .remove(entries.to_be_bytes())
            .unwrap();
        db.flush().unwrap();
    }
    let out = run(&["audit", "verify", "--dir", copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout(&out));
    let out = run(&[
        "audit",
        "verify",
        "--dir",
        copy.to_str().unwrap(),
        "--expect",
        &anchor,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains(&format!("BROKEN at entry {entries}:"))
            && stdout(&out).contains("gone"),
        "{}",
        stdout(&out)
    );
    let out = run(&[
        "audit",
        "verify",
        "--dir",
        ca.root().to_str().unwrap(),
        "--expect",
        &anchor,
    ]);
    assert!(out.status.success(), "{}", stdout(&out));
    // Bytes added to an entry (an unknown field) are named too.
    let copy = ca.tmp.path().join("copy-extended");
    copy_dir(ca.root(), &copy);
    {
        let db = open_sled(&copy.join("store"));
        let audit = db.open_tree("audit").unwrap();
        let key = 2u64.to_be_bytes();
        let v = audit.get(key).unwrap().unwrap().to_vec();
        let mut map: ciborium::Value = ciborium::from_reader(v.as_slice()).unwrap();
        if let ciborium::Value::Map(m) = &mut map {
            m.push(("x".into(), "extra".into()));
        }
        let mut out = Vec::new();
        ciborium::into_writer(&map, &mut out).unwrap();
        audit.insert(key, out).unwrap();
        db.flush().unwrap();
    }
    let out = run(&["audit", "verify", "--dir", copy.to_str().unwrap()]);
    assert!(
        stdout(&out).contains("BROKEN at entry 2:"),
        "{}",
        stdout(&out)
    );
    // And the export of the original has every entry, in order.
    let out = run(&["audit", "export", "--dir", ca.root().to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out).lines().count() as u64, entries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_tell_what_happened_but_never_a_secret_or_a_key() {
    let ca = TestCa::new(KeyAlgorithm::P256);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1000, None);
    let log = ca.tmp.path().join("server.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(["serve", "--dir", ca.root().to_str().unwrap()])
        .args(["--https", "127.0.0.1:0", "--coap", "127.0.0.1:0"])
        .args(["--mtls", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("IMPRINT_LOG", "trace")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    let at = ca_server::server::parse_listening_line(&first).unwrap();
    let op = tokio::task::block_in_place(|| Operator::add_at(&ca, at["admin"], "dana"));
    let mut devices = Vec::new();
    for (serial, alg) in [(1, KeyAlgorithm::Ed25519), (2, KeyAlgorithm::P256)] {
        let mut dev = enroll(&ca, at["coap"], &line, serial, alg).await.unwrap();
        sync_secret(at["mtls"], &mut dev).await;
        devices.push(dev);
    }
    tokio::task::block_in_place(|| {
        op.ok(&["device", "show", "1"]);
        op.ok(&["secrets", "rotate", "--all"]);
    });
    for dev in &mut devices {
        sync_secret(at["mtls"], dev).await;
    }
    tokio::task::block_in_place(|| op.ok(&["device", "revoke", "2"]));
    let _ = device_agent::secrets::fetch(
        &mtls_client(
            CaUrl::parse(&format!("https://{}", at["mtls"])).unwrap(),
            &devices[1],
        )
        .unwrap(),
    )
    .await;
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success());
    let text = std::fs::read_to_string(&log).unwrap();
    // It does log what happened ...
    for expected in ["admin request", "device revoked", "revoked device refused"] {
        assert!(
            text.contains(expected),
            "no {expected:?} in the log:\n{text}"
        );
    }
    // ... and nothing secret, in any encoding.
    use base64::Engine;
    let mut forbidden: Vec<(String, String)> = Vec::new();
    for dev in &devices {
        for s in &dev.secrets {
            let b: &[u8] = s.secret.as_ref();
            forbidden.push(("secret hex".into(), hex::encode(b)));
            forbidden.push((
                "secret base64".into(),
                base64::engine::general_purpose::STANDARD_NO_PAD.encode(b),
            ));
            forbidden.push((
                "secret base64url".into(),
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b),
            ));
            forbidden.push(("secret bytes".into(), format!("{b:?}")));
        }
        forbidden.push(("device key".into(), hex::encode(dev.key.pkcs8_der())));
    }
    // Absent when the token seals it (IMPRINT_TEST_PKCS11): kek.sealed, opened only in memory.
    if let Ok(kek) = std::fs::read(ca.dir.kek()) {
        forbidden.push(("KEK".into(), hex::encode(kek)));
    }
    for pem in [
        ca.dir.ca_key(),
        ca.dir.tls_key(),
        ca.dir.operator_ca_key(),
        op.key.clone(),
    ] {
        if pem != op.key && !pem.exists() {
            continue; // the CA's own keys are in a token (IMPRINT_TEST_PKCS11)
        }
        for l in std::fs::read_to_string(&pem).unwrap().lines() {
            if !l.starts_with("-----") && l.len() > 16 {
                forbidden.push((format!("{}", pem.display()), l.to_string()));
            }
        }
    }
    for (what, needle) in &forbidden {
        assert!(
            !text.contains(needle.as_str()),
            "{what} appears in the server log"
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Position {
    First,
    Middle,
    Last,
}

/// Opens a sled folder as the CA does (its own segment size and compression), waiting for a lock the stopped server's threads may still hold.
fn open_sled(path: &Path) -> sled::Db {
    for _ in 0..150 {
        if let Ok(db) = ca_server::store::sled_config(path).open() {
            return db;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ca_server::store::sled_config(path).open().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// Finding 1 of the hardening issue, at the admin door: a request body that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_body_that_never_comes_gets_408_and_the_connection_is_closed() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    ca.set_request_timeout(1);
    let server = ca.start().await;
    let op = Operator::add(&ca, &server, "alice");
    let addr = server.admin.unwrap();
    let client = Some((op.cert.clone(), op.key.clone()));
    common::stalled_body(addr, op.ca_cert.clone(), client, "/lines")
        .await
        .assert_timed_out(false);
    server.stop().await;
}

/// Runs `sql` with psql against the test database (the schema of `ca`).
fn psql(ca: &TestCa, sql: &str) -> String {
    let config = ca.dir.load_config().unwrap();
    let url = config.store.url.unwrap();
    let schema = config.store.schema.unwrap();
    let out = Command::new("psql")
        .arg(&url)
        .args(["-qtA", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGOPTIONS", format!("-c search_path={schema}"))
        .env(
            "PGPASSWORD",
            std::env::var("IMPRINT_STORE_PASSWORD").unwrap_or_default(),
        )
        .output()
        .expect("psql (Debian package postgresql-client-15)");
    assert!(out.status.success(), "{sql}: {}", stderr(&out));
    stdout(&out)
}

/// The same tamper checks on PostgreSQL's rows: an edited column, an edited hash, a chain
/// rewritten without the audit key (with and without its MACs); each is named by `audit
/// verify`, which exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_edited_row_on_postgres() {
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, common::pg_store());
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1000, None);
    let server = ca.start().await;
    for serial in 1..=2 {
        let mut dev = enroll(
            &ca,
            server.coap.unwrap(),
            &line,
            serial,
            KeyAlgorithm::Ed25519,
        )
        .await
        .unwrap();
        sync_secret(server.mtls.unwrap(), &mut dev).await;
    }
    server.stop().await;
    let dir = ca.root().to_str().unwrap().to_string();
    let verify = || run(&["audit", "verify", "--dir", &dir]);
    assert!(verify().status.success(), "{}", stdout(&verify()));
    let entries: u64 = psql(&ca, "SELECT count(*) FROM audit")
        .trim()
        .parse()
        .unwrap();
    assert!(
        entries >= 7,
        "line-add + 2 x (enroll, deliver, ack): {entries}"
    );
    let broken = |seq: u64, what: &str| {
        let out = verify();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: {}{}",
            stdout(&out),
            stderr(&out)
        );
        assert!(
            stdout(&out).contains(&format!("BROKEN at entry {seq}:")),
            "{what}: {}",
            stdout(&out)
        );
    };
    psql(
        &ca,
        "UPDATE audit SET detail = detail || ' forged' WHERE seq = 3",
    );
    broken(3, "edited detail");
    psql(
        &ca,
        "UPDATE audit SET detail = left(detail, length(detail) - 7) WHERE seq = 3",
    );
    assert!(verify().status.success(), "restored");
    psql(
        &ca,
        &format!(
            "UPDATE audit SET hash = set_byte(hash, 0, get_byte(hash, 0) # 1) WHERE seq = {entries}"
        ),
    );
    broken(entries, "edited hash");
    psql(
        &ca,
        &format!(
            "UPDATE audit SET hash = set_byte(hash, 0, get_byte(hash, 0) # 1) WHERE seq = {entries}"
        ),
    );
    assert!(verify().status.success(), "restored");
    // Issue 14: whoever can write the tables but has no audit key changes entry 3 and
    // recomputes every hash after it (and the head): the MACs name entry 3.
    let rows: Vec<ca_server::records::AuditEntry> = {
        let store = ca.store();
        store.audit().map(Result::unwrap).collect()
    };
    assert!(rows.iter().all(|e| e.mac.is_some()), "every entry sealed");
    let row_sql = |e: &ca_server::records::AuditEntry| {
        format!(
            "UPDATE audit SET detail = '{}', prev_hash = '\\x{}', hash = '\\x{}', mac = {} WHERE seq = {};",
            e.detail.replace('\'', "''"),
            hex::encode(&e.prev_hash),
            hex::encode(&e.hash),
            e.mac
                .as_ref()
                .map_or("NULL".to_string(), |m| format!("'\\x{}'", hex::encode(m))),
            e.seq
        )
    };
    let mut restore = String::from("BEGIN;");
    for e in rows.iter().filter(|e| e.seq >= 3) {
        restore += &row_sql(e);
    }
    restore += &format!(
        "UPDATE audit_head SET hash = '\\x{}' WHERE id = 1; COMMIT;",
        hex::encode(&rows.last().unwrap().hash)
    );
    let mut prev = vec![0u8; 32];
    let mut sql = String::from("BEGIN;");
    for mut e in rows {
        if e.seq >= 3 {
            if e.seq == 3 {
                e.detail = "forged".into();
            }
            e.prev_hash = prev.clone();
            let mac = e.mac.clone();
            e = e.sealed(None);
            e.mac = mac;
            sql += &row_sql(&e);
        }
        prev = e.hash.clone();
    }
    sql += &format!(
        "UPDATE audit_head SET hash = '\\x{}' WHERE id = 1; COMMIT;",
        hex::encode(&prev)
    );
    psql(&ca, &sql);
    broken(3, "rewritten with every later hash");
    assert!(
        stdout(&verify()).contains("does not vouch"),
        "{}",
        stdout(&verify())
    );
    // With the MACs stripped as well: named, and the server will not start on it.
    psql(&ca, "UPDATE audit SET mac = NULL WHERE seq >= 3");
    broken(3, "rewritten, MACs stripped");
    assert!(
        stdout(&verify()).contains("carries no MAC"),
        "{}",
        stdout(&verify())
    );
    let out = run(&["serve", "--dir", &dir, "--https", "127.0.0.1:0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("without a MAC"), "{}", stderr(&out));
    psql(&ca, &restore);
    assert!(verify().status.success(), "restored: {}", stdout(&verify()));
    psql(&ca, "DELETE FROM audit WHERE seq = 5");
    broken(5, "removed row");
    assert!(
        stdout(&verify()).contains("missing"),
        "{}",
        stdout(&verify())
    );
}

/// Hardening finding 10: `audit verify --dir` on a folder that is no CA made an empty store
/// there and said "intact", exit 0.
#[test]
fn a_folder_that_is_no_ca_is_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let missing = tmp.path().join("nonexistent");
    for args in [
        vec!["audit", "verify", "--dir"],
        vec!["line", "list", "--dir"],
        vec!["audit", "export", "--dir"],
    ] {
        let mut args = args.clone();
        args.push(missing.to_str().unwrap());
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stdout(&out));
        assert!(
            stderr(&out).contains("is not a CA folder"),
            "{args:?}: {}",
            stderr(&out)
        );
        assert!(!missing.exists(), "{args:?} made {}", missing.display());
    }
}
