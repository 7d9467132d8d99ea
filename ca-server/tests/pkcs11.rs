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
        let tmp = tempfile::tempdir().unwrap();
        let dir = CaDir::new(tmp.path().join("ca"));
        let uri = self.uri(object);
        let out = self.ca_server(&[
            "init",
            "--dir",
            dir.root().to_str().unwrap(),
            "--algorithm",
            algorithm.name(),
            "--name",
            "Token CA",
            "--pkcs11",
            &uri,
        ]);
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
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_ca-server"))
            .args(["serve", "--https", "127.0.0.1:0", "--no-admin", "--dir"])
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
        (Server(child), addrs["https"])
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

/// Every file in `dir` (recursively) holding a PEM private key, by name.
fn private_key_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(private_key_files(&path));
        } else if std::fs::read(&path)
            .unwrap()
            .windows(11)
            .any(|w| w == b"PRIVATE KEY")
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
        // The TLS server key and the operator CA's key are files; the CA key is not, and the
        // key-encryption key is sealed by the token.
        assert!(!ca.dir.ca_key().exists(), "{alg}");
        assert!(
            !ca.dir.kek().exists() && ca.dir.kek_sealed().exists(),
            "{alg}"
        );
        assert_eq!(
            private_key_files(ca.root()),
            ["operators-ca.key.pem", "tls.key.pem"],
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
    }
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
}

#[test]
fn serve_refuses_a_wrong_pin_file_an_altered_sealed_kek_and_a_pin_value_in_config() {
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
        let (_server, addr) = token.serve(&ca);
        let dev = Device::new(5, KeyAlgorithm::P256);
        let EnrollResponse::Full { certificate } = ca
            .client(addr)
            .enroll(dev.request(&line, ResponseForm::Full))
            .await
            .unwrap()
        else {
            panic!("not a full response");
        };
        tokio::task::block_in_place(|| {
            let path = ca.tmp.path().join("device.pem");
            std::fs::write(&path, protocol_spec::profile::cert_pem(&certificate)).unwrap();
            let out = openssl(&["verify", "-CAfile"], &[&ca.dir.ca_cert(), &path]);
            assert!(out.status.success(), "{alg}: {}", text(&out.stderr));
        });
    }
}
