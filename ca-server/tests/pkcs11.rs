//! The CA key in a PKCS#11 token (issue 15), against a real SoftHSM2 token made in a temporary
//! folder for each test (`SOFTHSM2_CONF`). Every PKCS#11 call happens in a `ca-server` process
//! of its own, as a user runs it: a module reads `SOFTHSM2_CONF` once per process.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use ca_server::config::CaDir;
use common::{Device, Line, SoftHsmToken as SoftToken, TestCa};
use protocol_spec::KeyAlgorithm;
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::profile::CertProfile;

const MODULE: &str = common::SOFTHSM_MODULE;
const PIN: &str = common::SOFTHSM_PIN;

// A SoftHSM2 token labelled `imprint` (`SoftToken::new("imprint")`), with what these tests do
// through it.
impl SoftToken {
    /// The URI of key `object` in this token, its PIN in a file.
    fn uri(&self, object: &str) -> String {
        format!(
            "pkcs11:token=imprint;object={object}?module-path={MODULE}&pin-source=file:{}",
            self.pin_file.display()
        )
    }

    /// `ca-server ARGS` with this token's configuration.
    fn ca_server(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ca-server"))
            .args(args)
            .env("SOFTHSM2_CONF", &self.conf)
            .output()
            .unwrap()
    }

    /// `ca-server init --pkcs11 URI` into a new CA folder.
    fn init_ca(&self, algorithm: KeyAlgorithm, object: &str) -> TestCa {
        self.init_ca_with(algorithm, object, &[])
    }

    /// `ca-server init --pkcs11 URI EXTRA...` into a new CA folder.
    fn init_ca_with(&self, algorithm: KeyAlgorithm, object: &str, extra: &[&str]) -> TestCa {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        let uri = self.uri(object);
        let out = self.ca_server(
            &[
                "init",
                "--dir",
                dir.root().to_str().unwrap(),
                "--algorithm",
                algorithm.name(),
                "--name",
                "Token CA",
                "--pkcs11",
                &uri,
            ]
            .into_iter()
            .chain(extra.iter().copied())
            .collect::<Vec<_>>(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let pem = std::fs::read_to_string(dir.ca_cert()).unwrap();
        let ca_der = protocol_spec::profile::cert_from_pem(&pem).unwrap();
        TestCa { tmp, dir, ca_der }
    }

    /// `ca-server line add` of `line` (serials 1-100) on the CA, with this token's
    /// configuration: the store seals its audit entries under a key the token unseals, and
    /// only a process with `SOFTHSM2_CONF` reaches the token.
    fn add_line(&self, ca: &TestCa, line: &Line) {
        let pem = ca.tmp.path().join(format!("{}.pub.pem", line.id));
        std::fs::write(&pem, protocol_spec::PublicKey::from(&line.key).to_pem()).unwrap();
        let out = self.ca_server(&[
            "line",
            "add",
            "--dir",
            ca.root().to_str().unwrap(),
            "--id",
            &line.id,
            "--public-key",
            pem.to_str().unwrap(),
            "--serials",
            "1-100",
        ]);
        assert!(out.status.success(), "{}", text(&out.stderr));
    }

    /// `ca-server serve` on the CA, HTTPS on a free port.
    fn serve(&self, ca: &TestCa) -> (Server, SocketAddr) {
        let (server, addrs) = self.serve_on(ca, &["--https", "127.0.0.1:0", "--no-admin"]);
        (server, addrs["https"])
    }

    /// `ca-server serve` on the CA with `listeners` (e.g. `--https 127.0.0.1:0`): the process
    /// and the addresses it printed, by listener.
    fn serve_on(
        &self,
        ca: &TestCa,
        listeners: &[&str],
    ) -> (Server, std::collections::BTreeMap<String, SocketAddr>) {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca-server"))
            .arg("serve")
            .args(listeners)
            .arg("--dir")
            .arg(ca.root())
            .env("SOFTHSM2_CONF", &self.conf)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addrs = ca_server::server::parse_listening_line(&line)
            .unwrap_or_else(|| panic!("unexpected: {line}"));
        (Server(child), addrs)
    }
}

/// A `ca-server serve` process, killed when the test ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn openssl(args: &[&str], files: &[&Path]) -> Output {
    Command::new("openssl")
        .args(args)
        .args(files)
        .output()
        .unwrap()
}

/// Every file in `dir` (recursively, the store's too) holding a private key, by name: a PEM
/// private key of any kind, or a DER PKCS#8 document of an Ed25519 or P-256 key (its
/// algorithm identifier right after the version).
fn private_key_files(dir: &Path) -> Vec<String> {
    const PKCS8_ED25519: &[u8] = &[0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    const PKCS8_V2_ED25519: &[u8] = &[0x02, 0x01, 0x01, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70];
    const PKCS8_EC: &[u8] = &[
        0x02, 0x01, 0x00, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01,
    ];
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(private_key_files(&path));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let holds = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        if holds(b"PRIVATE KEY")
            || holds(PKCS8_ED25519)
            || holds(PKCS8_V2_ED25519)
            || holds(PKCS8_EC)
        {
            found.push(path.file_name().unwrap().to_string_lossy().into_owned());
        }
    }
    found.sort();
    found
}

#[test]
fn init_with_the_key_in_a_token_writes_no_ca_key_file_and_config_keeps_no_pin() {
    for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
        let token = SoftToken::new("imprint");
        let ca = token.init_ca(alg, "ca");
        // Neither the CA key nor the operator CA's is a file (both are key pairs of the
        // token), and the key-encryption key and the HTTPS server's key are written only
        // sealed by the token: no file in the folder holds a private key.
        assert!(!ca.dir.ca_key().exists(), "{alg}");
        assert!(!ca.dir.operator_ca_key().exists(), "{alg}");
        assert!(
            !ca.dir.tls_key().exists() && ca.dir.tls_key_sealed().exists(),
            "{alg}"
        );
        assert!(
            !ca.dir.kek().exists() && ca.dir.kek_sealed().exists(),
            "{alg}"
        );
        assert_eq!(private_key_files(ca.root()), Vec::<String>::new(), "{alg}");
        assert_eq!(
            probe(&token, &["private-keys"])["labels"],
            serde_json::json!(["ca", "ca-operators"]),
            "{alg}"
        );
        // The CA certificate carries the token's key, of the algorithm asked for.
        let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
        assert_eq!(profile.ca_public_key().algorithm, alg);
        // Self-signed in the token, and the HTTPS server certificate signed by it: openssl
        // verifies both.
        let ca_pem = ca.dir.ca_cert();
        for cert in [ca.dir.ca_cert(), ca.dir.tls_cert()] {
            let out = openssl(&["verify", "-CAfile"], &[&ca_pem, &cert]);
            assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
        }
        let config = std::fs::read_to_string(ca.dir.config()).unwrap();
        assert!(
            config.contains("pkcs11 = \"pkcs11:token=imprint;object=ca?"),
            "{config}"
        );
        assert!(
            !config.contains("pin-value") && !config.contains(PIN),
            "{config}"
        );
        // The HTTPS door's key, unsealed by the token at start: curl (OpenSSL) verifies the
        // server against the CA certificate and gets it.
        let (_server, addr) = token.serve(&ca);
        assert_eq!(curl_ca(&ca, addr), ca.ca_der, "{alg}");
    }
}

/// GET /ca over HTTPS with curl, the server verified against the CA certificate: the body.
fn curl_ca(ca: &TestCa, addr: SocketAddr) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["--silent", "--show-error", "--fail", "--cacert"])
        .arg(ca.dir.ca_cert())
        .arg(format!("https://{addr}/ca"))
        .output()
        .unwrap();
    assert!(out.status.success(), "curl: {}", text(&out.stderr));
    out.stdout
}

/// `init --pkcs11 URI --tls-key-file`: the HTTPS server's key is a plain file (the one private
/// key file of the folder, 0600, and no sealed one), the token holds the CA's and the operator
/// CA's keys, and the HTTPS door serves with the file key.
#[test]
fn init_with_tls_key_file_keeps_the_server_key_in_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let token = SoftToken::new("imprint");
    let ca = token.init_ca_with(KeyAlgorithm::Ed25519, "ca", &["--tls-key-file"]);
    assert_eq!(private_key_files(ca.root()), ["tls.key.pem"]);
    assert!(!ca.dir.tls_key_sealed().exists());
    let mode = std::fs::metadata(ca.dir.tls_key())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        probe(&token, &["private-keys"])["labels"],
        serde_json::json!(["ca", "ca-operators"])
    );
    let (_server, addr) = token.serve(&ca);
    assert_eq!(curl_ca(&ca, addr), ca.ca_der);
}

/// With the CA key in a token, the operator CA's key is a second key pair of that token: init
/// writes no key file for it, `operator add` signs through the token, openssl verifies the
/// operator's certificate against the operator CA certificate, and the admin door lets the
/// operator in.
#[test]
fn operator_add_signs_with_the_operator_ca_key_in_the_token_and_the_admin_door_accepts_it() {
    let token = SoftToken::new("imprint");
    let ca = token.init_ca(KeyAlgorithm::P256, "ca");
    let root = ca.root().to_str().unwrap().to_string();
    assert_eq!(private_key_files(ca.root()), Vec::<String>::new());
    let out = token.ok(&["operator", "add", "--dir", &root, "alice"]);
    assert!(out.contains("operator alice (admin)"), "{out}");
    // Still no operator CA key file; the operator's own key is for the operator to take away.
    assert!(!ca.dir.operator_ca_key().exists());
    assert_eq!(private_key_files(ca.root()), ["alice.key.pem"]);
    let (cert, key) = (
        ca.dir.operators().join("alice.pem"),
        ca.dir.operators().join("alice.key.pem"),
    );
    let operators_ca = ca.dir.operator_ca_cert();
    for c in [&operators_ca, &cert] {
        let out = openssl(&["verify", "-CAfile"], &[&operators_ca, c]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains(": OK"), "{}", text(&out.stdout));
    }
    // Signed in the token: the CLI had no operator CA key file to sign with.
    assert_eq!(
        probe(&token, &["private-keys"])["labels"],
        serde_json::json!(["ca", "ca-operators"])
    );

    let (_server, addrs) =
        token.serve_on(&ca, &["--https", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let out = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(["operator", "list", "--json"])
        .env("IMPRINT_ADMIN", format!("https://{}", addrs["admin"]))
        .env("IMPRINT_OPERATOR_CERT", &cert)
        .env("IMPRINT_OPERATOR_KEY", &key)
        .env("IMPRINT_CA_CERT", ca.dir.ca_cert())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "alice", "{list}");
}

#[test]
fn init_with_pkcs11_existing_uses_the_key_already_in_the_token() {
    let token = SoftToken::new("imprint");
    let first = token.init_ca(KeyAlgorithm::P256, "shared");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("again");
    let uri = token.uri("shared");
    let out = token.ca_server(&[
        "init",
        "--dir",
        dir.to_str().unwrap(),
        "--pkcs11",
        &uri,
        "--pkcs11-existing",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("(p256)"),
        "{}",
        text(&out.stdout)
    );
    let pem = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let again =
        CertProfile::from_ca_der(&protocol_spec::profile::cert_from_pem(&pem).unwrap()).unwrap();
    let before = CertProfile::from_ca_der(&first.ca_der).unwrap();
    assert_eq!(again.ca_public_key(), before.ca_public_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolls_with_a_token_ca_and_openssl_verifies_its_certificate_and_the_crl() {
    for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
        let token = SoftToken::new("imprint");
        let ca = token.init_ca(alg, "ca");
        let line = Line::new("line-1", KeyAlgorithm::Ed25519);
        token.add_line(&ca, &line);
        let (_server, addr) = token.serve(&ca);
        // The client pins the CA certificate: the handshake itself checks the server
        // certificate the token signed at init.
        let client = ca.client(addr);
        let mut certs = Vec::new();
        for (serial, dev_alg) in [(7, KeyAlgorithm::Ed25519), (8, KeyAlgorithm::P256)] {
            let dev = Device::new(serial, dev_alg);
            let answer = client
                .enroll(dev.request(&line, ResponseForm::Full))
                .await
                .unwrap();
            let EnrollResponse::Full { certificate } = answer else {
                panic!("{answer:?}");
            };
            certs.push(certificate);
        }
        let crl = client
            .request("GET", "/crl", None, "application/pkix-crl", Vec::new())
            .await
            .unwrap();
        assert_eq!(crl.status, 200);

        tokio::task::block_in_place(|| {
            let files = ca.tmp.path();
            let ca_pem = ca.dir.ca_cert();
            for (i, der) in certs.iter().enumerate() {
                let path = files.join(format!("device-{i}.pem"));
                std::fs::write(&path, protocol_spec::profile::cert_pem(der)).unwrap();
                let out = openssl(&["verify", "-CAfile"], &[&ca_pem, &path]);
                assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
                assert!(text(&out.stdout).contains(": OK"), "{alg}");
            }
            let crl_path = files.join("ca.crl");
            std::fs::write(&crl_path, &crl.body).unwrap();
            let out = openssl(
                &["crl", "-inform", "DER", "-noout", "-verify", "-in"],
                &[&crl_path, Path::new("-CAfile"), &ca_pem],
            );
            assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
            assert!(text(&out.stderr).contains("verify OK"), "{alg}");
        });
    }
}

#[test]
fn a_wrong_pin_a_missing_token_and_a_missing_key_each_exit_2_with_one_line_naming_it() {
    let token = SoftToken::new("imprint");
    token.init_ca(KeyAlgorithm::Ed25519, "ca");
    let secret_pin = "98765431";
    let cases = [
        (
            format!("pkcs11:token=imprint;object=new?module-path={MODULE}&pin-value={secret_pin}"),
            false,
            "PIN is wrong",
        ),
        // --pkcs11-existing: the PIN's error too, never a key made instead (issue 15).
        (
            format!("pkcs11:token=imprint;object=ca?module-path={MODULE}&pin-value={secret_pin}"),
            true,
            "PIN is wrong",
        ),
        (
            format!("pkcs11:token=elsewhere;object=ca?module-path={MODULE}&pin-value={PIN}"),
            false,
            "no token labelled \"elsewhere\"",
        ),
        (
            format!("pkcs11:token=imprint;object=absent?module-path={MODULE}&pin-value={PIN}"),
            true,
            "object \"absent\": no private key",
        ),
        (
            format!(
                "pkcs11:token=imprint;object=ca?module-path=/nonexistent/p11.so&pin-value={PIN}"
            ),
            false,
            "module /nonexistent/p11.so",
        ),
    ];
    for (uri, existing, want) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        let mut args = vec!["init", "--dir", dir.to_str().unwrap(), "--pkcs11", &uri];
        if existing {
            args.push("--pkcs11-existing");
        }
        let out = token.ca_server(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{uri}: {err}");
        assert_eq!(err.lines().count(), 1, "{uri}: {err}");
        assert!(err.contains(want), "{uri}: {err}");
        assert!(
            !err.contains(secret_pin) && !err.contains(PIN),
            "a PIN in {err}"
        );
        // Nothing of a CA is left behind.
        assert!(!dir.join("ca.pem").exists(), "{uri}");
    }
    assert_eq!(
        probe(&token, &["private-keys"])["labels"],
        serde_json::json!(["ca", "ca-operators"])
    );
}

#[test]
fn serve_refuses_a_wrong_pin_file_altered_sealed_keys_and_a_pin_value_in_config() {
    let token = SoftToken::new("imprint");
    let ca = token.init_ca(KeyAlgorithm::Ed25519, "ca");
    let root = ca.root().to_str().unwrap().to_string();
    let serve = |token: &SoftToken| {
        token.ca_server(&[
            "serve",
            "--dir",
            &root,
            "--https",
            "127.0.0.1:0",
            "--no-admin",
        ])
    };

    std::fs::write(&token.pin_file, "4321\n").unwrap();
    let out = serve(&token);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("PIN is wrong") && err.contains("pin"), "{err}");
    assert!(!err.contains("4321"), "{err}");

    std::fs::write(&token.pin_file, format!("{PIN}\n")).unwrap();
    // A sealed key-encryption key that was altered: the token refuses to open it.
    let sealed = std::fs::read(ca.dir.kek_sealed()).unwrap();
    let mut altered = sealed.clone();
    *altered.last_mut().unwrap() ^= 1;
    std::fs::write(ca.dir.kek_sealed(), &altered).unwrap();
    let out = serve(&token);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("kek.sealed") && err.contains("could not unseal"),
        "{err}"
    );
    std::fs::write(ca.dir.kek_sealed(), &sealed).unwrap();
    // The same for the sealed HTTPS server key; and the sealed key-encryption key in its
    // place (the same token's AES key, another magic and associated data) does not open as it.
    let sealed_tls = std::fs::read(ca.dir.tls_key_sealed()).unwrap();
    let mut altered = sealed_tls.clone();
    *altered.last_mut().unwrap() ^= 1;
    for wrong in [altered, sealed.clone()] {
        std::fs::write(ca.dir.tls_key_sealed(), &wrong).unwrap();
        let out = serve(&token);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("tls.key.sealed"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    std::fs::write(ca.dir.tls_key_sealed(), &sealed_tls).unwrap();

    let config = std::fs::read_to_string(ca.dir.config()).unwrap();
    let with_value = config.replace(
        &format!("&pin-source=file:{}", token.pin_file.display()),
        &format!("&pin-value={PIN}"),
    );
    assert_ne!(with_value, config);
    std::fs::write(ca.dir.config(), with_value).unwrap();
    let out = serve(&token);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("never kept in config.toml"), "{err}");
    assert!(!err.contains(PIN), "{err}");
    drop(token.tmp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_disappears_while_serving_gives_unavailable_and_signing_resumes() {
    let token = SoftToken::new("imprint");
    let ca = token.init_ca(KeyAlgorithm::Ed25519, "ca");
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    token.add_line(&ca, &line);
    let (_server, addr) = token.serve(&ca);
    let client = ca.client(addr);
    let enroll = |serial: u64| {
        let request = Device::new(serial, KeyAlgorithm::Ed25519).request(&line, ResponseForm::Full);
        let client = &client;
        async move { client.enroll(request).await }
    };
    enroll(1).await.unwrap();

    // The token's folder goes away (SoftHSM2's stand-in for a token pulled out of its slot).
    let tokens = token.tmp.path().join("tokens");
    let away = token.tmp.path().join("away");
    std::fs::rename(&tokens, &away).unwrap();
    match enroll(2).await {
        Err(device_agent::AgentError::Refused(p)) => {
            assert_eq!(
                p.kind,
                protocol_spec::problem::ProblemType::Unavailable,
                "{p:?}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Back: the same server reconnects (at most once a second) and signs again; serial 2,
    // retrying as a device does, enrolls within a few seconds.
    std::fs::rename(&away, &tokens).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match enroll(2).await {
            Ok(_) => break,
            Err(device_agent::AgentError::Refused(p))
                if p.kind == protocol_spec::problem::ProblemType::Unavailable
                    && std::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    enroll(3).await.unwrap();
}

/// The token going away while the admin door serves (issue 15): the door's TLS keeps working
/// (its key was unsealed at start), a revocation is stored, and the CRL, which the CA key must
/// sign again, answers 503 `unavailable` rather than an internal error; once the token is
/// back the CRL is signed, lists the revoked certificate and verifies. Before, the CRL
/// answered 500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_disappears_while_the_admin_door_serves_gives_503_and_the_crl_resumes() {
    let token = SoftToken::new("imprint");
    let ca = token.init_ca(KeyAlgorithm::P256, "ca");
    let root = ca.root().to_str().unwrap().to_string();
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    token.add_line(&ca, &line);
    token.ok(&["operator", "add", "--dir", &root, "alice"]);
    let (cert, key) = (
        ca.dir.operators().join("alice.pem"),
        ca.dir.operators().join("alice.key.pem"),
    );
    let (_server, addrs) =
        token.serve_on(&ca, &["--https", "127.0.0.1:0", "--admin", "127.0.0.1:0"]);
    let EnrollResponse::Full { certificate } = ca
        .client(addrs["https"])
        .enroll(Device::new(1, KeyAlgorithm::P256).request(&line, ResponseForm::Full))
        .await
        .unwrap()
    else {
        panic!("not a full response");
    };
    let admin = |method: &str, path: &str| {
        let out = Command::new("curl")
            .args(["-sS", "-X", method, "-w", "\n%{http_code}", "--cacert"])
            .arg(ca.dir.ca_cert())
            .arg("--cert")
            .arg(&cert)
            .arg("--key")
            .arg(&key)
            .arg(format!("https://{}{path}", addrs["admin"]))
            .output()
            .unwrap();
        // The handshake and the request went through: an HTTP status came back.
        assert!(out.status.success(), "curl: {}", text(&out.stderr));
        let (body, status) = out.stdout.split_at(out.stdout.len().saturating_sub(3));
        (
            String::from_utf8_lossy(status).parse::<u16>().unwrap(),
            body.to_vec(),
        )
    };
    tokio::task::block_in_place(|| {
        assert_eq!(admin("GET", "/crl").0, 200);

        let tokens = token.tmp.path().join("tokens");
        let away = token.tmp.path().join("away");
        std::fs::rename(&tokens, &away).unwrap();
        let (status, body) = admin("POST", "/devices/1/revoke");
        assert_eq!(status, 200, "{}", text(&body));
        let (status, body) = admin("GET", "/crl");
        assert_eq!(status, 503, "{}", text(&body));
        let problem: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("cannot be reached"),
            "{problem}"
        );
        assert_eq!(admin("GET", "/health").0, 200);

        // Back: the server reconnects (at most once a second) and signs the CRL again.
        std::fs::rename(&away, &tokens).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let crl = loop {
            match admin("GET", "/crl") {
                (200, crl) => break crl,
                (503, _) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                (status, body) => panic!("{status}: {}", text(&body)),
            }
        };
        let crl_path = ca.tmp.path().join("ca.crl");
        std::fs::write(&crl_path, &crl).unwrap();
        let out = openssl(
            &["crl", "-inform", "DER", "-noout", "-verify", "-in"],
            &[&crl_path, Path::new("-CAfile"), &ca.dir.ca_cert()],
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("verify OK"));
        let (_, device) = x509_parser::parse_x509_certificate(&certificate).unwrap();
        let (_, listed) = x509_parser::parse_x509_crl(&crl).unwrap();
        assert!(
            listed
                .iter_revoked_certificates()
                .any(|r| *r.serial() == device.serial),
            "the revoked device's certificate is not on the CRL"
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_to_token_moves_a_file_key_into_the_token_and_the_ca_goes_on_signing() {
    for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
        let token = SoftToken::new("imprint");
        let ca = TestCa::with_file_key(alg);
        let line = Line::new("line-1", KeyAlgorithm::Ed25519);
        ca.add_line(&line, 1, 100, None);
        // The key file is PKCS#8 that openssl reads (v1 for Ed25519).
        let out = openssl(&["pkey", "-noout", "-in"], &[&ca.dir.ca_key()]);
        assert!(out.status.success(), "{alg}: {}", text(&out.stderr));

        let uri = token.uri("moved");
        let root = ca.root().to_str().unwrap().to_string();
        let out = token.ca_server(&["key", "to-token", "--dir", &root, "--pkcs11", &uri]);
        assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
        assert!(!ca.dir.ca_key().exists(), "{alg}");
        // The HTTPS server's key is sealed by the token and the operator CA's key is a key
        // pair there, as init --pkcs11 makes them: no private key file is left.
        assert!(
            !ca.dir.tls_key().exists() && ca.dir.tls_key_sealed().exists(),
            "{alg}"
        );
        assert!(!ca.dir.operator_ca_key().exists(), "{alg}");
        assert_eq!(private_key_files(ca.root()), Vec::<String>::new(), "{alg}");
        assert_eq!(
            probe(&token, &["private-keys"])["labels"],
            serde_json::json!(["moved", "moved-operators"]),
            "{alg}"
        );
        // operator add signs in the token, under the operator CA certificate that was there.
        token.ok(&["operator", "add", "--dir", &root, "alice"]);
        let alice = ca.dir.operators().join("alice.pem");
        let operators_ca = ca.dir.operator_ca_cert();
        let out = openssl(&["verify", "-CAfile"], &[&operators_ca, &alice]);
        assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
        let config = std::fs::read_to_string(ca.dir.config()).unwrap();
        assert!(config.contains("object=moved"), "{config}");

        // Done twice: refused, nothing changes.
        let out = token.ca_server(&["key", "to-token", "--dir", &root, "--pkcs11", &uri]);
        assert_eq!(out.status.code(), Some(2));
        assert!(
            text(&out.stderr).contains("already in a token"),
            "{}",
            text(&out.stderr)
        );

        // The server signs with the token's copy: a device enrolls and openssl verifies.
        enroll_and_verify(&token, &ca, &line, &format!("{alg}")).await;
    }
}

/// Serves `ca` with its key in `token`: device 5 of `line` enrolls, openssl verifies its
/// certificate against the CA's, and the HTTPS door serves with the key the token unsealed.
async fn enroll_and_verify(token: &SoftToken, ca: &TestCa, line: &Line, what: &str) {
    let (_server, addr) = token.serve(ca);
    let dev = Device::new(5, KeyAlgorithm::P256);
    let EnrollResponse::Full { certificate } = ca
        .client(addr)
        .enroll(dev.request(line, ResponseForm::Full))
        .await
        .unwrap()
    else {
        panic!("not a full response");
    };
    tokio::task::block_in_place(|| {
        let path = ca.tmp.path().join("device.pem");
        std::fs::write(&path, protocol_spec::profile::cert_pem(&certificate)).unwrap();
        let out = openssl(&["verify", "-CAfile"], &[&ca.dir.ca_cert(), &path]);
        assert!(out.status.success(), "{what}: {}", text(&out.stderr));
        assert_eq!(curl_ca(ca, addr), ca.ca_der, "{what}");
    });
}

/// `key to-token` that failed after its imports (here: config.toml.new cannot be written) can
/// be run again (issue 15): the second run uses the keys the first one imported, and the CA
/// ends as a clean run leaves it: no key file, one key pair per label, and the token signs
/// under the CA's and the operator CA's certificates. Before, the second run was refused: the
/// token already held a key with that label.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_to_token_that_failed_part_way_can_be_run_again() {
    let token = SoftToken::new("imprint");
    let ca = TestCa::with_file_key(KeyAlgorithm::P256);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let uri = token.uri("moved");
    let root = ca.root().to_str().unwrap().to_string();
    let config = std::fs::read_to_string(ca.dir.config()).unwrap();

    let blocker = ca.root().join("config.toml.new");
    std::fs::create_dir(&blocker).unwrap();
    let out = token.ca_server(&["key", "to-token", "--dir", &root, "--pkcs11", &uri]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("config.toml.new"), "{err}");
    // Stopped after both imports, before anything of the CA folder's keys changed.
    assert_eq!(
        probe(&token, &["private-keys"])["labels"],
        serde_json::json!(["moved", "moved-operators"])
    );
    assert!(ca.dir.ca_key().exists() && ca.dir.operator_ca_key().exists());
    assert!(ca.dir.tls_key().exists());
    assert_eq!(std::fs::read_to_string(ca.dir.config()).unwrap(), config);

    std::fs::remove_dir(&blocker).unwrap();
    token.ok(&["key", "to-token", "--dir", &root, "--pkcs11", &uri]);
    assert_eq!(private_key_files(ca.root()), Vec::<String>::new());
    assert!(ca.dir.tls_key_sealed().exists());
    assert_eq!(
        probe(&token, &["private-keys"])["labels"],
        serde_json::json!(["moved", "moved-operators"])
    );
    assert!(
        std::fs::read_to_string(ca.dir.config())
            .unwrap()
            .contains("object=moved")
    );
    // The operator CA's key signs in the token, under the operator CA certificate.
    token.ok(&["operator", "add", "--dir", &root, "alice"]);
    let alice = ca.dir.operators().join("alice.pem");
    let out = openssl(
        &["verify", "-CAfile"],
        &[&ca.dir.operator_ca_cert(), &alice],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The CA key signs a device's certificate in the token; the HTTPS door serves with the
    // key the token unsealed.
    enroll_and_verify(&token, &ca, &line, "run again").await;

    // Another CA's key is never taken for this one's: the label is refused, nothing changes.
    let other = TestCa::with_file_key(KeyAlgorithm::P256);
    let other_root = other.root().to_str().unwrap().to_string();
    let out = token.ca_server(&["key", "to-token", "--dir", &other_root, "--pkcs11", &uri]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("already holds another key with that label"),
        "{err}"
    );
    assert!(other.dir.ca_key().exists() && other.dir.tls_key().exists());
}

// ---------------------------------------------------------------------------------------------
// DUKPT BDKs kept in the token (issue 16): a token CA's BDK is an object of the token, never
// key bytes in the store; the token encrypts the Initial Key's derivation data.

use protocol_spec::dukpt::{self, AesKey, InitialKeyId, KeyType, KeyUsage, Ksn};

/// The X9.24-3-2017 vectors (protocol-spec/vectors/dukpt/).
fn vectors() -> serde_json::Value {
    serde_json::from_str(include_str!(
        "../../protocol-spec/vectors/dukpt/x9.24-3-2017.json"
    ))
    .unwrap()
}

/// What [`token_probe`] found or did, from a process of its own (a module reads
/// `SOFTHSM2_CONF` once per process): `inspect LABEL` (the secret-key objects with that label
/// and their attributes), `destroy LABEL`, `private-keys` (the labels of every private key),
/// `initial-key LABEL TYPE IKID` (the Initial Key the
/// CA's token code derives, in hex: test vectors only).
fn probe(token: &SoftToken, action: &[&str]) -> serde_json::Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "token_probe",
            "--exact",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("SOFTHSM2_CONF", &token.conf)
        .env("IMPRINT_TOKEN_PROBE", action.join(" "))
        .env("IMPRINT_TOKEN_PROBE_URI", token.uri("probe"))
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let line = stdout
        .lines()
        .find_map(|l| l.split_once("probe: ").map(|(_, json)| json))
        .unwrap_or_else(|| panic!("no probe line: {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// Not a test of its own: the other process [`probe`] starts (does nothing unless
/// `IMPRINT_TOKEN_PROBE` is set).
#[test]
fn token_probe() {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    use cryptoki::session::UserType;
    let Ok(action) = std::env::var("IMPRINT_TOKEN_PROBE") else {
        return;
    };
    let words: Vec<&str> = action.split(' ').collect();
    let uri =
        ca_server::issuer::Pkcs11Uri::parse(&std::env::var("IMPRINT_TOKEN_PROBE_URI").unwrap())
            .unwrap();
    let result = match words.as_slice() {
        ["initial-key", label, key_type, ikid] => {
            let token = ca_server::issuer::BdkToken::new(&uri, &Default::default());
            let key = token
                .initial_key(
                    label,
                    KeyType::from_name(key_type).unwrap(),
                    InitialKeyId::from_hex(ikid).unwrap(),
                )
                .unwrap();
            serde_json::json!({ "initial_key": hex::encode_upper(key.expose()) })
        }
        ["private-keys"] => {
            let ctx = Pkcs11::new(MODULE).unwrap();
            ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .unwrap();
            let slot = ctx
                .get_slots_with_token()
                .unwrap()
                .into_iter()
                .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == "imprint")
                .unwrap();
            let session = ctx.open_ro_session(slot).unwrap();
            session
                .login(UserType::User, Some(&PIN.to_string().into()))
                .unwrap();
            let mut labels = Vec::new();
            for h in session
                .find_objects(&[Attribute::Class(ObjectClass::PRIVATE_KEY)])
                .unwrap()
            {
                for a in session.get_attributes(h, &[AttributeType::Label]).unwrap() {
                    if let Attribute::Label(l) = a {
                        labels.push(String::from_utf8(l).unwrap());
                    }
                }
            }
            labels.sort();
            serde_json::json!({ "labels": labels })
        }
        [what @ ("inspect" | "destroy"), label] => {
            let ctx = Pkcs11::new(MODULE).unwrap();
            ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
                .unwrap();
            let slot = ctx
                .get_slots_with_token()
                .unwrap()
                .into_iter()
                .find(|s| ctx.get_token_info(*s).unwrap().label().trim_end() == "imprint")
                .unwrap();
            let session = ctx.open_rw_session(slot).unwrap();
            session
                .login(UserType::User, Some(&PIN.to_string().into()))
                .unwrap();
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(label.as_bytes().to_vec()),
                ])
                .unwrap();
            if *what == "destroy" {
                for h in &found {
                    session.destroy_object(*h).unwrap();
                }
                serde_json::json!({ "destroyed": found.len() })
            } else {
                let mut objects = Vec::new();
                for h in &found {
                    let mut o = serde_json::Map::new();
                    for a in session
                        .get_attributes(
                            *h,
                            &[
                                AttributeType::KeyType,
                                AttributeType::ValueLen,
                                AttributeType::Token,
                                AttributeType::Sensitive,
                                AttributeType::Extractable,
                                AttributeType::Encrypt,
                                AttributeType::Decrypt,
                                AttributeType::Sign,
                                AttributeType::Wrap,
                                AttributeType::Derive,
                            ],
                        )
                        .unwrap()
                    {
                        let (k, v) = match a {
                            Attribute::KeyType(t) => ("key_type", serde_json::json!(t.to_string())),
                            Attribute::ValueLen(n) => {
                                ("value_len", serde_json::json!(u64::from(n)))
                            }
                            Attribute::Token(b) => ("token", serde_json::json!(b)),
                            Attribute::Sensitive(b) => ("sensitive", serde_json::json!(b)),
                            Attribute::Extractable(b) => ("extractable", serde_json::json!(b)),
                            Attribute::Encrypt(b) => ("encrypt", serde_json::json!(b)),
                            Attribute::Decrypt(b) => ("decrypt", serde_json::json!(b)),
                            Attribute::Sign(b) => ("sign", serde_json::json!(b)),
                            Attribute::Wrap(b) => ("wrap", serde_json::json!(b)),
                            Attribute::Derive(b) => ("derive", serde_json::json!(b)),
                            _ => continue,
                        };
                        o.insert(k.into(), v);
                    }
                    // The key's value: the token must refuse to give it.
                    let value = session.get_attributes(*h, &[AttributeType::Value]);
                    let readable = matches!(&value, Ok(v) if v.iter().any(|a| matches!(a, Attribute::Value(_))));
                    o.insert("value_readable".into(), serde_json::json!(readable));
                    objects.push(serde_json::Value::Object(o));
                }
                serde_json::json!({ "objects": objects })
            }
        }
        ["store", dir] => {
            // The CA's store as `ca-server` opens it (the audit key unsealed by the token).
            let dir = CaDir::new(dir);
            let config = dir.load_config().unwrap();
            let store = ca_server::store::open(&dir, &config.store).unwrap();
            let keys = ca_server::issuer::load_secret_keys(&dir, &config).unwrap();
            let bdks: Vec<_> = store
                .bdks()
                .unwrap()
                .iter()
                .map(|b| {
                    serde_json::json!({
                        "id": b.id,
                        "token_object": b.token_object,
                        "ciphertext": hex::encode(&b.ciphertext),
                        "nonce": hex::encode(&b.nonce),
                        "kcv": hex::encode_upper(&b.kcv),
                        "kek_opens": keys.open_bdk(b).is_ok(),
                        "next": store.dukpt_next(&b.id).unwrap(),
                    })
                })
                .collect();
            let versions: Vec<_> = store
                .secrets()
                .map(|v| {
                    let v = v.unwrap();
                    serde_json::json!({ "serial": v.serial, "key_id": v.key_id })
                })
                .collect();
            let records: Vec<String> = common::snapshot(&store)
                .into_iter()
                .map(|(t, k, v)| format!("{t}:{}:{}", hex::encode(k), hex::encode(v)))
                .collect();
            serde_json::json!({ "bdks": bdks, "versions": versions, "records": records })
        }
        other => panic!("unknown probe {other:?}"),
    };
    println!("probe: {result}");
}

impl SoftToken {
    /// `ca-server init --pkcs11 URI` into a new CA folder on the suite's store (PostgreSQL with
    /// IMPRINT_TEST_STORE=postgres, else sled).
    fn init_ca_on_suite_store(&self, object: &str) -> TestCa {
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        let uri = self.uri(object);
        let mut args = vec![
            "init".to_string(),
            "--dir".into(),
            dir.root().to_str().unwrap().into(),
            "--name".into(),
            "Token CA".into(),
            "--pkcs11".into(),
            uri,
        ];
        let store = common::test_store();
        if let Some(url) = &store.url {
            args.extend(["--store".into(), url.clone()]);
            if let Some(ca) = &store.ca_file {
                args.extend(["--store-ca-file".into(), ca.to_str().unwrap().into()]);
            }
            if let Some(schema) = &store.schema {
                args.extend(["--store-schema".into(), schema.clone()]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.ca_server(&args);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let pem = std::fs::read_to_string(dir.ca_cert()).unwrap();
        let ca_der = protocol_spec::profile::cert_from_pem(&pem).unwrap();
        TestCa { tmp, dir, ca_der }
    }

    /// `ca-server ARGS` with this token's configuration; its stdout, after checking it
    /// succeeded.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.ca_server(args);
        assert!(
            out.status.success(),
            "ca-server {args:?}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        text(&out.stdout)
    }
}

/// Every stored BDK is held in the token: a label, no key bytes, nothing the key-encryption
/// key opens; no record of the store holds any of `keys_hex` (a BDK sealed under the KEK would
/// have ciphertext and no label here).
fn assert_held_in_token(token: &SoftToken, ca: &TestCa, object: &str, keys_hex: &[&str]) {
    let found = probe(token, &["store", ca.root().to_str().unwrap()]);
    let bdks = found["bdks"].as_array().unwrap();
    assert!(!bdks.is_empty());
    for b in bdks {
        let id = b["id"].as_str().unwrap();
        assert_eq!(
            b["token_object"],
            format!("{object}-bdk-{id}"),
            "BDK {id} is not kept in the token: {b}"
        );
        assert_eq!(
            (&b["ciphertext"], &b["nonce"]),
            (&"".into(), &"".into()),
            "{b}"
        );
        assert_eq!(b["kek_opens"], false, "{b}");
    }
    for r in found["records"].as_array().unwrap() {
        let r = r.as_str().unwrap().to_lowercase();
        for key in keys_hex {
            assert!(
                !r.contains(&key.to_lowercase()),
                "a record holds a key: {r}"
            );
            // PostgreSQL rows are JSON text: the key in hex there is the hex of that text.
            assert!(!r.contains(&hex::encode(key.to_lowercase())), "{r}");
            assert!(!r.contains(&hex::encode(key.to_uppercase())), "{r}");
        }
    }
}

/// The object `label` in the token: one AES key, on the token, sensitive, not extractable,
/// for encryption only, its value never readable.
fn assert_token_object(token: &SoftToken, label: &str, len: u64) {
    let found = probe(token, &["inspect", label]);
    let objects = found["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 1, "{label}: {found}");
    let o = &objects[0];
    assert_eq!(o["key_type"], "CKK_AES", "{o}");
    assert_eq!(o["value_len"], len, "{o}");
    for (attr, want) in [
        ("token", true),
        ("sensitive", true),
        ("extractable", false),
        ("encrypt", true),
        ("decrypt", false),
        ("sign", false),
        ("wrap", false),
        ("derive", false),
        ("value_readable", false),
    ] {
        assert_eq!(o[attr], want, "{label}: {attr} in {o}");
    }
}

#[test]
fn a_token_ca_s_bdks_are_token_objects_and_derive_the_standard_s_keys() {
    let token = SoftToken::new("imprint");
    let v = vectors();
    let bdk128 = v["bdks"]["aes-128"].as_str().unwrap();
    let bdk256 = v["bdks"]["aes-256"].as_str().unwrap();
    let ikid = v["initial_key_id"].as_str().unwrap();
    // Two CAs in one token, one per vector BDK, both under the vectors' BDK id.
    let cas = [
        ("ca", bdk128, KeyType::Aes128),
        ("ca2", bdk256, KeyType::Aes256),
    ];
    for (object, bdk_hex, key_type) in cas {
        let ca = token.init_ca_on_suite_store(object);
        let root = ca.root().to_str().unwrap().to_string();
        let file = ca.tmp.path().join("bdk.hex");
        std::fs::write(&file, format!("{bdk_hex}\n")).unwrap();
        let bdk = AesKey::from_hex(bdk_hex).unwrap();
        let out = token.ok(&[
            "dukpt",
            "add-bdk",
            "--dir",
            &root,
            "--bdk-id",
            "12345678",
            "--key-file",
            file.to_str().unwrap(),
        ]);
        // The KCV is the token's, and the key's.
        assert!(
            out.contains(&format!("kcv {}", hex::encode_upper(bdk.kcv())))
                && out.contains("kept in the PKCS#11 token"),
            "{out}"
        );
        let label = format!("{object}-bdk-12345678");
        assert_token_object(&token, &label, key_type.key_len() as u64);

        // Generated in the token: never anywhere else.
        let out = token.ok(&[
            "dukpt",
            "add-bdk",
            "--dir",
            &root,
            "--bdk-id",
            "CAFE0001",
            "--generate",
            "--algorithm",
            "aes-128",
            "--json",
        ]);
        let view: ca_server::dukpt::BdkView = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (view.algorithm.as_str(), view.custody.as_str()),
            ("aes-128", "token")
        );
        assert_token_object(&token, &format!("{object}-bdk-CAFE0001"), 16);
        assert_held_in_token(&token, &ca, object, &[bdk_hex]);
        let list = token.ok(&["dukpt", "list", "--dir", &root, "--json"]);
        let views: Vec<ca_server::dukpt::BdkView> = serde_json::from_str(&list).unwrap();
        assert_eq!(views.len(), 2);
        assert!(views.iter().all(|v| v.custody == "token"), "{list}");

        // The token's Initial Key is the standard's.
        let want = v["initial_keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["bdk"] == key_type.name())
            .unwrap();
        let got = probe(&token, &["initial-key", &label, key_type.name(), ikid]);
        assert_eq!(got["initial_key"], want["initial_key"], "{object}");

        // `dukpt derive` through the token gives every working key of the vectors (their KCVs).
        for t in v["transactions"].as_array().unwrap() {
            if t["bdk"] != key_type.name() {
                continue;
            }
            let ksn = format!("{ikid}{}", t["counter"].as_str().unwrap());
            for w in t["working_keys"].as_array().unwrap() {
                let key = AesKey::from_hex(w["key"].as_str().unwrap()).unwrap();
                let out = token.ok(&[
                    "dukpt",
                    "derive",
                    "--dir",
                    &root,
                    "--ksn",
                    &ksn,
                    "--usage",
                    w["usage"].as_str().unwrap(),
                    "--key-type",
                    w["type"].as_str().unwrap(),
                    "--json",
                ]);
                let d: ca_server::dukpt::DeriveView = serde_json::from_str(&out).unwrap();
                assert_eq!(d.kcv, hex::encode_upper(key.kcv()), "{ksn} {w}");
            }
        }

        // The same id again: refused, and the token's object is still the one.
        let out = token.ca_server(&[
            "dukpt",
            "add-bdk",
            "--dir",
            &root,
            "--bdk-id",
            "12345678",
            "--generate",
        ]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("already exists"));
        assert_token_object(&token, &label, key_type.key_len() as u64);
    }
}

/// `ca-server line add` of `line` (serials 1-100) with secret source `dukpt:BDKID`.
fn add_dukpt_line(token: &SoftToken, ca: &TestCa, line: &Line, bdk_id: &str) {
    let pem = ca.tmp.path().join(format!("{}.pub.pem", line.id));
    std::fs::write(&pem, protocol_spec::PublicKey::from(&line.key).to_pem()).unwrap();
    token.ok(&[
        "line",
        "add",
        "--dir",
        ca.root().to_str().unwrap(),
        "--id",
        &line.id,
        "--public-key",
        pem.to_str().unwrap(),
        "--serials",
        "1-100",
        "--secret-source",
        &format!("dukpt:{bdk_id}"),
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_of_a_token_ca_get_initial_keys_from_the_token_and_a_deleted_bdk_is_refused() {
    use device_agent::secrets::{SyncOutcome, mtls_client, sync};
    use device_agent::url::CaUrl;

    const IMPORTED: &str = "00112233445566778899AABBCCDDEEFF0102030405060708090A0B0C0D0E0F10";
    let token = SoftToken::new("imprint");
    let ca = token.init_ca_on_suite_store("ca");
    let root = ca.root().to_str().unwrap().to_string();
    let file = ca.tmp.path().join("bdk.hex");
    std::fs::write(&file, IMPORTED).unwrap();
    token.ok(&[
        "dukpt",
        "add-bdk",
        "--dir",
        &root,
        "--bdk-id",
        "5EED0001",
        "--key-file",
        file.to_str().unwrap(),
    ]);
    let imported = AesKey::from_hex(IMPORTED).unwrap();
    let line_a = Line::new("line-a", KeyAlgorithm::Ed25519);
    add_dukpt_line(&token, &ca, &line_a, "5EED0001");
    token.ok(&["operator", "add", "--dir", &root, "alice"]);

    let (server, addrs) = token.serve_on(
        &ca,
        &[
            "--https",
            "127.0.0.1:0",
            "--coap",
            "127.0.0.1:0",
            "--mtls",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
    );
    let (coap, mtls, admin) = (addrs["coap"], addrs["mtls"], addrs["admin"]);
    let url = CaUrl::parse(&format!("https://{mtls}")).unwrap();

    // The admin API adds a BDK generated in the token.
    let ops = ca.dir.operators();
    let admin_env = |c: &mut Command| {
        c.env("IMPRINT_ADMIN", format!("https://{admin}"))
            .env("IMPRINT_OPERATOR_CERT", ops.join("alice.pem"))
            .env("IMPRINT_OPERATOR_KEY", ops.join("alice.key.pem"))
            .env("IMPRINT_CA_CERT", ca.dir.ca_cert());
    };
    let out = tokio::task::block_in_place(|| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ca-server"));
        c.args([
            "dukpt",
            "add-bdk",
            "--bdk-id",
            "5EED0002",
            "--generate",
            "--json",
        ]);
        admin_env(&mut c);
        c.output().unwrap()
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let view: ca_server::dukpt::BdkView = serde_json::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(
        (view.algorithm.as_str(), view.custody.as_str()),
        ("aes-256", "token")
    );
    tokio::task::block_in_place(|| assert_token_object(&token, "ca-bdk-5EED0002", 32));

    // Devices on the imported BDK's line: each Initial Key is the software derivation from the
    // known key.
    let mut devices = Vec::new();
    for serial in 1..=3u64 {
        let mut s =
            common::enrolled_over_coap(&ca, coap, &line_a, serial, KeyAlgorithm::Ed25519).await;
        let client = mtls_client(url.clone(), &s).unwrap();
        let out = sync(&client, &mut s, |_| Ok(())).await.unwrap();
        assert!(
            matches!(out, SyncOutcome::Stored { version: 1, .. }),
            "{out:?}"
        );
        let sec = &s.secrets[0];
        assert_eq!(sec.algorithm, "aes-256-dukpt");
        let id = InitialKeyId::from_bytes(sec.initial_key_id.unwrap());
        assert_eq!(id.to_string(), format!("5EED0001{:08X}", serial - 1));
        assert_eq!(
            sec.secret.as_slice(),
            dukpt::initial_key(&imported, id).expose(),
            "serial {serial}"
        );
        devices.push(s);
    }

    // The token's object goes away while the server runs (it has used it): the next device is
    // told `unavailable`, and nothing is allocated or stored for it.
    tokio::task::block_in_place(|| {
        assert_eq!(
            probe(&token, &["destroy", "ca-bdk-5EED0001"])["destroyed"],
            1
        );
    });
    let mut s = common::enrolled_over_coap(&ca, coap, &line_a, 4, KeyAlgorithm::Ed25519).await;
    let client = mtls_client(url.clone(), &s).unwrap();
    match sync(&client, &mut s, |_| Ok(())).await {
        Err(device_agent::AgentError::Refused(p)) => assert_eq!(
            p.kind,
            protocol_spec::problem::ProblemType::Unavailable,
            "{p:?}"
        ),
        other => panic!("{other:?}"),
    }
    assert!(s.secrets.is_empty());
    drop(server);

    // The host side agrees with the devices (while the BDK was there)... and now refuses,
    // naming the missing object; nothing was stored for serial 4.
    tokio::task::block_in_place(|| {
        let d = &devices[1];
        let (ksn, _) = d
            .dukpt_transaction(1, KeyUsage::PinEncryption, None)
            .unwrap();
        let out = token.ca_server(&["dukpt", "derive", "--dir", &root, "--ksn", &ksn.to_string()]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(
            err.contains("no BDK object labelled \"ca-bdk-5EED0001\""),
            "{err}"
        );

        let found = probe(&token, &["store", &root]);
        let versions = found["versions"].as_array().unwrap();
        assert_eq!(versions.len(), 3, "{versions:?}");
        assert!(versions.iter().all(|v| v["serial"] != 4), "{versions:?}");
        let a = found["bdks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["id"] == "5EED0001")
            .unwrap()
            .clone();
        assert_eq!(a["next"], 3, "{a}");
        assert_held_in_token(&token, &ca, "ca", &[IMPORTED]);
    });
}

/// `dukpt derive` agrees with the device side for a BDK in the token, at the counters around
/// the rollover.
#[test]
fn dukpt_derive_with_a_token_bdk_agrees_with_the_device_side() {
    let token = SoftToken::new("imprint");
    let ca = token.init_ca_on_suite_store("ca");
    let root = ca.root().to_str().unwrap().to_string();
    let out = token.ok(&[
        "dukpt",
        "add-bdk",
        "--dir",
        &root,
        "--bdk-id",
        "ABCD0001",
        "--generate",
        "--algorithm",
        "aes-256",
        "--json",
    ]);
    let view: ca_server::dukpt::BdkView = serde_json::from_str(&out).unwrap();
    // The Initial Key of a device the token derives; the device side runs from it alone.
    let id = InitialKeyId::from_hex("ABCD00010000002A").unwrap();
    let got = probe(
        &token,
        &["initial-key", "ca-bdk-ABCD0001", "aes-256", &id.to_string()],
    );
    let ik = AesKey::from_hex(got["initial_key"].as_str().unwrap()).unwrap();
    for counter in [1u32, 2, 0x1FFFE, 0x20000, 0x20001] {
        let ksn = Ksn {
            initial_key_id: id,
            counter,
        };
        let device = dukpt::DukptDevice::resume(&ik, id, counter)
            .unwrap()
            .next_transaction()
            .unwrap();
        assert_eq!(device.ksn, ksn);
        let kcv = device
            .working_key(KeyUsage::PinEncryption, KeyType::Aes256)
            .unwrap()
            .kcv();
        let out = token.ok(&["dukpt", "derive", "--dir", &root, "--ksn", &ksn.to_string()]);
        assert!(
            out.contains(&format!("kcv {}", hex::encode_upper(kcv))),
            "counter {counter:#x}: {out}"
        );
    }
    assert_eq!(view.custody, "token");

    // A second CA folder on the same token key (`--pkcs11-existing`) would name its BDK
    // ABCD0001 with the same label: refused, nothing stored, the first CA's object untouched.
    let tmp = tempfile::tempdir().unwrap();
    let again = tmp.path().join("again");
    let again = again.to_str().unwrap();
    token.ok(&[
        "init",
        "--dir",
        again,
        "--pkcs11",
        &token.uri("ca"),
        "--pkcs11-existing",
    ]);
    let out = token.ca_server(&[
        "dukpt",
        "add-bdk",
        "--dir",
        again,
        "--bdk-id",
        "ABCD0001",
        "--generate",
    ]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("already holds an object labelled \"ca-bdk-ABCD0001\""),
        "{err}"
    );
    assert_eq!(
        token
            .ok(&["dukpt", "list", "--dir", again, "--json"])
            .trim(),
        "[]"
    );
    assert_token_object(&token, "ca-bdk-ABCD0001", 32);
    token.ok(&[
        "dukpt",
        "derive",
        "--dir",
        &root,
        "--ksn",
        "ABCD00010000002A00000001",
    ]);
}

/// A CA whose key moves into a token keeps deriving from the BDK it sealed under the KEK
/// before; the BDKs it adds from then on are token objects.
#[test]
fn a_ca_moved_into_a_token_keeps_its_sealed_bdk_and_adds_token_ones() {
    const SEALED: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";
    let token = SoftToken::new("imprint");
    let ca = TestCa::with_file_key(KeyAlgorithm::Ed25519);
    let root = ca.root().to_str().unwrap().to_string();
    let file = ca.tmp.path().join("bdk.hex");
    std::fs::write(&file, SEALED).unwrap();
    token.ok(&[
        "dukpt",
        "add-bdk",
        "--dir",
        &root,
        "--bdk-id",
        "12345678",
        "--key-file",
        file.to_str().unwrap(),
    ]);
    token.ok(&[
        "key",
        "to-token",
        "--dir",
        &root,
        "--pkcs11",
        &token.uri("moved"),
    ]);
    token.ok(&[
        "dukpt",
        "add-bdk",
        "--dir",
        &root,
        "--bdk-id",
        "12345679",
        "--generate",
    ]);
    let list = token.ok(&["dukpt", "list", "--dir", &root, "--json"]);
    let views: Vec<ca_server::dukpt::BdkView> = serde_json::from_str(&list).unwrap();
    let custody: Vec<_> = views
        .iter()
        .map(|v| (v.bdk_id.as_str(), v.custody.as_str()))
        .collect();
    assert_eq!(custody, [("12345678", "sealed"), ("12345679", "token")]);
    assert_token_object(&token, "moved-bdk-12345679", 32);
    let ksn = "123456789012345600000001";
    let out = token.ok(&["dukpt", "derive", "--dir", &root, "--ksn", ksn]);
    let want = dukpt::host_working_key(
        &AesKey::from_hex(SEALED).unwrap(),
        Ksn::from_hex(ksn).unwrap(),
        KeyUsage::PinEncryption,
        KeyType::Aes128,
    )
    .unwrap()
    .kcv();
    assert!(
        out.contains(&format!("kcv {}", hex::encode_upper(want))),
        "{out}"
    );
    token.ok(&[
        "dukpt",
        "derive",
        "--dir",
        &root,
        "--ksn",
        "123456790000000100000001",
    ]);
}
