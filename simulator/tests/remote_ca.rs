//! `simulator --ca URL...` against a CA that runs elsewhere: a real `ca-server serve` (the
//! simulator binary's hidden `ca-server` subcommand, its own process and sockets), a line
//! registered on it beforehand, the device-side verification pass, and the flags' errors.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use protocol_spec::{KeyAlgorithm, KeyPair, PublicKey};
use ring::rand::SystemRandom;

const SIMULATOR: &str = env!("CARGO_BIN_EXE_simulator");

/// `simulator ca-server ARGS`, which must succeed.
fn ca_server(args: &[&str]) {
    let out = Command::new(SIMULATOR)
        .arg("ca-server")
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ca-server {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A line key as `line-station keygen` writes it: PKCS#8 PEM (mode 0600) and the public key.
fn line_keygen(dir: &Path) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate(KeyAlgorithm::Ed25519, &SystemRandom::new()).unwrap();
    let (key_path, pub_path) = (dir.join("line.key"), dir.join("line.pub.pem"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .unwrap();
    std::io::Write::write_all(&mut f, key.to_pem().as_bytes()).unwrap();
    std::fs::write(&pub_path, PublicKey::from(&key).to_pem()).unwrap();
    (key_path, pub_path)
}

/// A CA serving in its own process, stopped with SIGTERM.
struct RemoteCa {
    child: Child,
    addrs: BTreeMap<String, SocketAddr>,
}

impl RemoteCa {
    /// `ca-server serve` on three free ports; reads the `ca-server: listening ...` line.
    fn serve(dir: &Path) -> Self {
        let mut child = Command::new(SIMULATOR)
            .args(["ca-server", "serve", "--dir"])
            .arg(dir)
            .args(["--https", "127.0.0.1:0", "--coap", "127.0.0.1:0"])
            .args(["--mtls", "127.0.0.1:0", "--no-admin"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addrs = ca_server::server::parse_listening_line(&line)
            .unwrap_or_else(|| panic!("not a listening line: {line:?}"));
        RemoteCa { child, addrs }
    }

    fn url(&self, scheme: &str, listener: &str) -> String {
        format!("{scheme}://{}", self.addrs[listener])
    }

    /// SIGTERM, and the CA must exit cleanly.
    fn stop(mut self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        assert!(self.child.wait().unwrap().success(), "the CA exits 0");
    }
}

impl Drop for RemoteCa {
    fn drop(&mut self) {
        // Only if a failed assertion skipped stop(): never leave a CA running.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn simulate(args: &[String], report: &Path) -> Output {
    Command::new(SIMULATOR)
        .args(args)
        .args(["--concurrency", "32", "--quiet", "--report"])
        .arg(report)
        .output()
        .unwrap()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_run_against_a_remote_ca_passes_the_device_side_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    let ca_dir_s = ca_dir.to_str().unwrap();
    ca_server(&["init", "--dir", ca_dir_s]);
    let (line_key, line_pub) = line_keygen(tmp.path());
    ca_server(&[
        "line",
        "add",
        "--dir",
        ca_dir_s,
        "--id",
        "line-r",
        "--public-key",
        line_pub.to_str().unwrap(),
        "--serials",
        "900001-901000",
    ]);
    let ca = RemoteCa::serve(&ca_dir);
    let ca_cert = ca_dir.join("ca.pem");
    let line = |serials: &str| {
        strings(&[
            "--ca-cert",
            ca_cert.to_str().unwrap(),
            "--line-key",
            line_key.to_str().unwrap(),
            "--line-id",
            "line-r",
            "--serials",
            serials,
        ])
    };

    // CoAP enrollment, secrets over mutual TLS: 500 devices on serials 900001-900500.
    let report = tmp.path().join("report-coap");
    let mut args = strings(&["--ca", &ca.url("coap", "coap")]);
    args.extend(strings(&["--mtls", &ca.url("https", "mtls")]));
    args.extend(line("900001-900500"));
    args.extend(strings(&["--devices", "500"]));
    let out = simulate(&args, &report);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("verification: PASSED (device-side"),
        "the summary says where the pass looked: {stdout}"
    );
    assert!(stdout.contains("CA: not measured: remote CA"), "{stdout}");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["devices_ok"], 500);
    assert_eq!(r["devices_failed"], 0);
    let v = &r["verification"];
    assert_eq!(v["kind"], "device-side");
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["devices_with_certificate"], 500);
    assert_eq!(v["certificates_valid"], 500);
    assert_eq!(v["devices_with_acked_secret"], 500);
    for shared in [
        "shared_keys",
        "shared_certificate_serials",
        "shared_secrets",
        "shared_key_ids",
    ] {
        assert_eq!(v[shared], 0, "{shared}");
    }
    // What a remote CA does not let the simulator measure is null, not zero.
    assert!(r["ca"].is_null());
    assert!(r["store_bytes"].is_null());
    assert!(r["store_bytes_per_device"].is_null());
    assert_eq!(r["config"]["ca"], ca.url("coap", "coap"));
    assert_eq!(r["config"]["transport"], "coap");
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    assert!(html.contains("Verification: <span class=\"ok\">PASSED</span>"));
    assert!(html.contains("device-side"));
    assert!(html.contains("not measured: remote CA"));

    // HTTPS from the scheme, spread round robin over two URLs of the node; the next serials.
    let report = tmp.path().join("report-https");
    let https = ca.url("https", "https");
    let mut args = strings(&["--ca", &https, "--ca"]);
    args.push(https.replace("127.0.0.1", "localhost"));
    args.extend(line("900501-901000"));
    args.extend(strings(&["--devices", "200", "--no-secrets"]));
    let out = simulate(&args, &report);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(r["devices_ok"], 200);
    assert_eq!(r["config"]["transport"], "https");
    assert_eq!(r["verification"]["certificates_valid"], 200);
    assert_eq!(r["verification"]["ok"], true);

    // Serials a run already used are refused by the CA, and the simulator says why.
    let mut args = strings(&["--ca", &ca.url("coap", "coap"), "--no-secrets"]);
    args.extend(line("900001-900500"));
    args.extend(strings(&["--devices", "5"]));
    let out = simulate(&args, &tmp.path().join("report-again"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("serial-taken"), "{stdout}");
    assert!(stdout.contains("give --serials a range no run has used"));
    // The words match the exit status: no device completed, so nothing PASSED.
    assert!(!stdout.contains("PASSED"), "{stdout}");
    assert!(
        stdout.contains("result: FAILED: 0 of 5 devices completed (failures: serial-taken 5)"),
        "{stdout}"
    );
    let html = std::fs::read_to_string(tmp.path().join("report-again/report.html")).unwrap();
    assert!(html.contains("Result: <span class=\"bad\">FAILED</span>"));
    assert!(!html.contains("PASSED"));

    // Another CA's certificate is caught before any device runs.
    let other = tmp.path().join("other");
    ca_server(&["init", "--dir", other.to_str().unwrap()]);
    let mut args = strings(&["--ca", &ca.url("coap", "coap"), "--no-secrets"]);
    args.extend(line("900001-900500"));
    let cert_at = args.iter().position(|a| a == "--ca-cert").unwrap() + 1;
    args[cert_at] = other.join("ca.pem").to_str().unwrap().to_string();
    args.extend(strings(&["--devices", "5"]));
    let out = simulate(&args, &tmp.path().join("report-other"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("serves another CA certificate than --ca-cert"),
        "{stderr}"
    );

    ca.stop();
}

#[test]
fn remote_flags_are_checked_and_errors_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_dir = tmp.path().join("ca");
    ca_server(&["init", "--dir", ca_dir.to_str().unwrap()]);
    let (line_key, _) = line_keygen(tmp.path());
    let cert = ca_dir.join("ca.pem");
    let line = strings(&[
        "--line-key",
        line_key.to_str().unwrap(),
        "--line-id",
        "line-r",
        "--serials",
        "1-100",
    ]);
    let ca_cert = strings(&["--ca-cert", cert.to_str().unwrap()]);
    // No CA listens at these addresses: every case must fail before contacting one.
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--transport", "https"]),
                ca_cert.clone(),
                line.clone(),
            ]
            .concat(),
            "--transport https disagrees with --ca coap://127.0.0.1:9",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--ca", "https://127.0.0.1:9"]),
                ca_cert.clone(),
                line.clone(),
            ]
            .concat(),
            "use different transports",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--no-secrets"]),
                line.clone(),
            ]
            .concat(),
            "--ca needs --ca-cert",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9"]),
                ca_cert.clone(),
                line.clone(),
            ]
            .concat(),
            "--ca needs --mtls",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--mtls", "coap://127.0.0.1:9"]),
                ca_cert.clone(),
                line.clone(),
            ]
            .concat(),
            "--mtls coap://127.0.0.1:9: the secrets door is mutual TLS",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--no-secrets"]),
                ca_cert.clone(),
                line.clone(),
                strings(&["--devices", "101"]),
            ]
            .concat(),
            "--devices 101 does not fit in the line stations' serials (--serials 1-100: 100 in all)",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--no-secrets"]),
                ca_cert.clone(),
            ]
            .concat(),
            "--ca needs the line station to play",
        ),
        (
            [
                strings(&["--ca", "coap://127.0.0.1:9", "--no-secrets"]),
                strings(&["--kill-ca-every", "1"]),
                ca_cert.clone(),
                line.clone(),
            ]
            .concat(),
            "--kill-node-every needs the embedded CA",
        ),
        (ca_cert.clone(), "--ca-cert describes a remote CA"),
    ];
    for (args, want) in cases {
        let out = simulate(&args, &tmp.path().join("report"));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(want),
            "{args:?}: want {want:?}, got {stderr}"
        );
    }
}
