//! The command-line tools as a user runs them: `line-station`, `device-agent`, and enrollment by
//! hand with openssl and curl, against a real CA server on loopback.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};

use ca_server::config::CaDir;
use ca_server::server::{self, ListenOverrides};
use ca_server::setup::{self, InitOptions};

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn agent() -> Command {
    Command::new(env!("CARGO_BIN_EXE_device-agent"))
}

fn station() -> Command {
    Command::new(env!("CARGO_BIN_EXE_line-station"))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A CA with line `l1` (serials 1-999, key made by `line-station keygen`), serving HTTPS.
async fn ca_with_line(
    dir: &Path,
    alg: protocol_spec::KeyAlgorithm,
) -> (ca_server::server::RunningServer, SocketAddr) {
    let ca = CaDir::new(dir.join("ca"));
    setup::init(
        &ca,
        &InitOptions {
            algorithm: alg,
            name: "CLI Test CA".into(),
            tls_names: vec![],
            now: now() - 60,
            store: Default::default(),
            ca_key: Default::default(),
        },
    )
    .unwrap();
    run(station()
        .args(["keygen", "--name", "l1", "--out"])
        .arg(dir.join("line")));
    let pem = std::fs::read_to_string(dir.join("line/l1.pub.pem")).unwrap();
    // Opened as the CA opens it, so that its audit entry is sealed with the CA's audit key.
    let store = ca_server::store::open(&ca, &Default::default()).unwrap();
    ca_server::lines::add_line(store.as_ref(), "l1", &pem, (1, 999), None, now(), "test").unwrap();
    drop(store);
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = server::start(
        &ca,
        &ListenOverrides {
            https: Some(loopback),
            coap: Some(loopback),
            mtls: Some(loopback),
            admin: Some(loopback),
            no_admin: false,
        },
    )
    .await
    .unwrap();
    let addr = server.https.unwrap();
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_and_line_station_binaries_enroll_both_key_types() {
    for (ca_alg, dev_alg, form) in [
        (protocol_spec::KeyAlgorithm::Ed25519, "p256", "full"),
        (protocol_spec::KeyAlgorithm::P256, "ed25519", "compact"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (server, addr) = ca_with_line(d, ca_alg).await;
        let state = d.join("dev.state");
        let pubkey = run(agent()
            .args([
                "keygen",
                "--serial",
                "42",
                "--algorithm",
                dev_alg,
                "--state",
            ])
            .arg(&state))
        .stdout;
        std::fs::write(d.join("dev.pub.pem"), &pubkey).unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&state).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "state file is private");
        // keygen refuses to replace a device's key.
        assert!(
            !agent()
                .args(["keygen", "--serial", "42", "--state"])
                .arg(&state)
                .status()
                .unwrap()
                .success()
        );
        run(station()
            .args(["attest", "--line", "l1", "--serial", "42", "--key"])
            .arg(d.join("line/l1.key"))
            .arg("--public-key")
            .arg(d.join("dev.pub.pem"))
            .arg("--out")
            .arg(d.join("t.cwt")));
        let url = format!("https://{addr}");
        let ca_pem = d.join("ca/ca.pem");
        run(agent()
            .args(["enroll", "--form", form, "--url", &url, "--state"])
            .arg(&state)
            .arg("--token")
            .arg(d.join("t.cwt"))
            .arg("--ca-cert")
            .arg(&ca_pem));
        let shown =
            String::from_utf8(run(agent().args(["show", "--state"]).arg(&state)).stdout).unwrap();
        assert!(
            shown.contains("enrolled:    yes") && shown.contains("serialNumber=42"),
            "{shown}"
        );
        assert!(
            !shown.contains("PRIVATE"),
            "show never prints the private key"
        );
        let cert = run(agent().args(["show", "--pem", "--state"]).arg(&state)).stdout;
        std::fs::write(d.join("dev.pem"), &cert).unwrap();
        let v = run(Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
            .arg(&ca_pem)
            .arg(d.join("dev.pem")));
        assert!(String::from_utf8_lossy(&v.stdout).contains(": OK"));
        // The store holds exactly what the device holds.
        let der = protocol_spec::profile::cert_from_pem(&String::from_utf8(cert).unwrap()).unwrap();
        assert_eq!(
            server
                .service
                .store()
                .device(42)
                .unwrap()
                .unwrap()
                .certificate,
            der
        );
        // Enrolling again is a no-op that succeeds.
        run(agent()
            .args(["enroll", "--url", &url, "--state"])
            .arg(&state)
            .arg("--token")
            .arg(d.join("t.cwt"))
            .arg("--ca-cert")
            .arg(&ca_pem));
        // A token for another serial is caught on the device before anything is sent.
        let state2 = d.join("dev2.state");
        run(agent()
            .args(["keygen", "--serial", "43", "--state"])
            .arg(&state2));
        let out = agent()
            .args(["enroll", "--url", &url, "--state"])
            .arg(&state2)
            .arg("--token")
            .arg(d.join("t.cwt"))
            .arg("--ca-cert")
            .arg(&ca_pem)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("the token is for serial 42, this device is 43")
        );
        server.stop().await;
    }
}

/// The provisioning record (SPEC.md section 13): an enrolled device's record is 100 octets for
/// serial 42 with either key, and the record with the CA certificate alone rebuilds a state
/// whose certificate is byte-identical and which fetches the device's secret over mutual TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provisioning_record_rebuilds_a_device_that_fetches_its_secret() {
    for (ca_alg, dev_alg) in [
        (protocol_spec::KeyAlgorithm::Ed25519, "ed25519"),
        (protocol_spec::KeyAlgorithm::P256, "p256"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let (server, addr) = ca_with_line(d, ca_alg).await;
        let mtls = format!("https://{}", server.mtls.unwrap());
        let (state, rebuilt, rec) = (d.join("dev.state"), d.join("new.state"), d.join("dev.rec"));
        let ca_pem = d.join("ca/ca.pem");
        tokio::task::block_in_place(|| {
            let pubkey = run(agent()
                .args([
                    "keygen",
                    "--serial",
                    "42",
                    "--algorithm",
                    dev_alg,
                    "--state",
                ])
                .arg(&state))
            .stdout;
            std::fs::write(d.join("dev.pub.pem"), &pubkey).unwrap();
            run(station()
                .args(["attest", "--line", "l1", "--serial", "42", "--key"])
                .arg(d.join("line/l1.key"))
                .arg("--public-key")
                .arg(d.join("dev.pub.pem"))
                .arg("--out")
                .arg(d.join("t.cwt")));
            run(agent()
                .args(["enroll", "--form", "compact", "--state"])
                .arg(&state)
                .args(["--url", &format!("https://{addr}"), "--token"])
                .arg(d.join("t.cwt"))
                .arg("--ca-cert")
                .arg(&ca_pem));
            run(agent()
                .args(["secret", "--url", &mtls, "--state"])
                .arg(&state));
            let out = run(agent()
                .args(["export-record", "--state"])
                .arg(&state)
                .arg("--out")
                .arg(&rec));
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("(100 bytes)"),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let meta = std::fs::metadata(&rec).unwrap();
            assert_eq!(meta.len(), 100, "{dev_alg}: 99 + 1 serial octet");
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            assert_eq!(mode & 0o777, 0o600, "the record holds the private key");

            run(agent()
                .args(["import-record", "--record"])
                .arg(&rec)
                .arg("--ca-cert")
                .arg(&ca_pem)
                .arg("--state")
                .arg(&rebuilt));
            let pem = |s: &Path| run(agent().args(["show", "--pem", "--state"]).arg(s)).stdout;
            assert_eq!(
                pem(&rebuilt),
                pem(&state),
                "{dev_alg}: byte-identical certificate"
            );
            let key = |s: &Path| run(agent().args(["show", "--key-pem", "--state"]).arg(s)).stdout;
            assert_eq!(key(&rebuilt), key(&state), "{dev_alg}: the same key");
            // The rebuilt device fetches its secret over mutual TLS: the one the device has.
            let out = run(agent()
                .args(["secret", "--url", &mtls, "--state"])
                .arg(&rebuilt));
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("version 1"),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            let secrets = |s: &Path| {
                String::from_utf8(run(agent().args(["show", "--state"]).arg(s)).stdout)
                    .unwrap()
                    .lines()
                    .filter(|l| l.starts_with("secret:"))
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            };
            assert_eq!(secrets(&rebuilt), secrets(&state));
            assert_eq!(secrets(&rebuilt).len(), 1);

            // A state file is never replaced, and another CA's certificate rebuilds nothing.
            let again = agent()
                .args(["import-record", "--record"])
                .arg(&rec)
                .arg("--ca-cert")
                .arg(&ca_pem)
                .arg("--state")
                .arg(&rebuilt)
                .output()
                .unwrap();
            assert!(!again.status.success());
            let other = d.join("other");
            std::fs::create_dir_all(&other).unwrap();
            let rng = ring::rand::SystemRandom::new();
            let other_key = protocol_spec::KeyPair::generate(ca_alg, &rng).unwrap();
            let other_ca =
                protocol_spec::profile::new_ca_certificate("Other CA", &other_key, 0, &rng)
                    .unwrap();
            std::fs::write(other.join("ca.der"), other_ca).unwrap();
            let wrong = agent()
                .args(["import-record", "--record"])
                .arg(&rec)
                .arg("--ca-cert")
                .arg(other.join("ca.der"))
                .arg("--state")
                .arg(other.join("s"))
                .output()
                .unwrap();
            assert!(!wrong.status.success());
            assert!(!other.join("s").exists());
        });
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_by_hand_with_openssl_and_curl() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (server, addr) = ca_with_line(d, protocol_spec::KeyAlgorithm::Ed25519).await;
    for (serial, keygen) in [
        ("7", vec!["genpkey", "-algorithm", "ed25519"]),
        (
            "8",
            vec!["ecparam", "-name", "prime256v1", "-genkey", "-noout"],
        ),
    ] {
        let key = d.join(format!("k{serial}.pem"));
        let csr = d.join(format!("r{serial}.csr"));
        run(Command::new("openssl").args(&keygen).arg("-out").arg(&key));
        run(Command::new("openssl")
            .args(["req", "-new", "-subj", &format!("/CN={serial}"), "-key"])
            .arg(&key)
            .arg("-out")
            .arg(&csr));
        let token = d.join(format!("t{serial}.cwt"));
        run(station()
            .args(["attest", "--line", "l1", "--serial", serial, "--key"])
            .arg(d.join("line/l1.key"))
            .arg("--csr")
            .arg(&csr)
            .arg("--out")
            .arg(&token));
        let csr_der = run(Command::new("openssl")
            .args(["req", "-outform", "DER", "-in"])
            .arg(&csr))
        .stdout;
        let body = format!(
            r#"{{"token":"{}","csr":"{}"}}"#,
            protocol_spec::messages::b64(&std::fs::read(&token).unwrap()),
            protocol_spec::messages::b64(&csr_der)
        );
        let req = d.join(format!("req{serial}.json"));
        std::fs::write(&req, body).unwrap();
        let url = format!("https://{addr}");
        let ca_pem = d.join("ca/ca.pem");
        let json = run(Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(&ca_pem)
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(format!("@{}", req.display()))
            .arg(format!("{url}/enroll")))
        .stdout;
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        let der = protocol_spec::messages::unb64(v["certificate"].as_str().unwrap(), "certificate")
            .unwrap();
        let pem = run(Command::new("curl")
            .args(["-sS", "--fail-with-body", "--cacert"])
            .arg(&ca_pem)
            .args([
                "-H",
                "Content-Type: application/json",
                "-H",
                "Accept: application/pem-certificate-chain",
                "--data-binary",
            ])
            .arg(format!("@{}", req.display()))
            .arg(format!("{url}/enroll")))
        .stdout;
        assert_eq!(
            protocol_spec::profile::cert_from_pem(&String::from_utf8(pem.clone()).unwrap())
                .unwrap(),
            der,
            "a retry gets the same bytes"
        );
        let cert = d.join(format!("c{serial}.pem"));
        std::fs::write(&cert, &pem).unwrap();
        let ca_der = d.join("ca-from-server.der");
        run(Command::new("curl")
            .args(["-sS", "--fail", "--cacert"])
            .arg(&ca_pem)
            .arg("-o")
            .arg(&ca_der)
            .arg(format!("{url}/ca")));
        let ca_from_server = d.join("ca-from-server.pem");
        run(Command::new("openssl")
            .args(["x509", "-inform", "DER", "-in"])
            .arg(&ca_der)
            .arg("-out")
            .arg(&ca_from_server));
        let v = run(Command::new("openssl")
            .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
            .arg(&ca_from_server)
            .arg(&cert));
        assert!(String::from_utf8_lossy(&v.stdout).contains(": OK"));
        // The certificate carries the openssl key.
        let a = run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key))
        .stdout;
        let b = run(Command::new("openssl")
            .args(["x509", "-noout", "-pubkey", "-in"])
            .arg(&cert))
        .stdout;
        assert_eq!(a, b);
    }
    // A refusal is a problem document curl shows as-is.
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(d.join("ca/ca.pem"))
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            r#"{"token":"AA","csr":"AA"}"#,
            "-w",
            "\n%{http_code}",
        ])
        .arg(format!("https://{addr}/enroll"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("urn:imprint:problem:malformed") && text.ends_with("400"),
        "{text}"
    );
    server.stop().await;
}

#[test]
fn show_ends_quietly_when_its_reader_goes_away_and_each_tool_describes_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("dev.state");
    run(agent()
        .args(["keygen", "--serial", "9", "--state"])
        .arg(&state));
    // `device-agent show | head`: the reader is gone before show writes a byte.
    for extra in [&[][..], &["--key-pem"][..]] {
        let mut child = agent()
            .args(["show", "--state"])
            .arg(&state)
            .args(extra)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let help = |cmd: &mut Command| String::from_utf8(run(cmd.arg("--help")).stdout).unwrap();
    let station_help = help(&mut station());
    assert!(
        station_help.starts_with("Imprint line station: line keys and factory-attestation tokens"),
        "{station_help}"
    );
    assert!(!station_help.contains("device agent"), "{station_help}");
    assert!(help(&mut agent()).starts_with("Imprint device agent"));
}

#[test]
fn the_key_pem_is_one_openssl_reads_for_both_key_types() {
    let tmp = tempfile::tempdir().unwrap();
    for alg in ["ed25519", "p256"] {
        let state = tmp.path().join(format!("{alg}.state"));
        let public = run(agent()
            .args(["keygen", "--serial", "9", "--algorithm", alg, "--state"])
            .arg(&state))
        .stdout;
        let key = tmp.path().join(format!("{alg}.key"));
        let pem = run(agent().args(["show", "--key-pem", "--state"]).arg(&state)).stdout;
        std::fs::write(&key, pem).unwrap();
        let derived = run(Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key))
        .stdout;
        let norm = |b: &[u8]| String::from_utf8_lossy(b).replace('\r', "");
        assert_eq!(norm(&derived), norm(&public), "{alg}");
    }
}
