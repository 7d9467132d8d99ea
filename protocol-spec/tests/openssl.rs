//! The vector certificates checked by OpenSSL, the reference a user would reach for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(vectors())
        .output()
        .expect("openssl must be installed (.ci/run installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok_cases() -> Vec<Value> {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(vectors().join("manifest.json")).unwrap()).unwrap();
    manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["kind"] == "enroll" && c["expect"] == "ok")
        .cloned()
        .collect()
}

#[test]
fn openssl_verifies_every_vector_certificate_strictly_as_a_client_certificate() {
    let cases = ok_cases();
    let mut cas = std::collections::BTreeSet::new();
    for case in &cases {
        let ca = format!("cas/{}.pem", case["ca"].as_str().unwrap());
        cas.insert(ca.clone());
        let cert = case["certificate_pem"].as_str().unwrap();
        let (ok, text) = openssl(&[
            "verify",
            "-x509_strict",
            "-purpose",
            "sslclient",
            "-CAfile",
            &ca,
            cert,
        ]);
        assert!(ok && text.contains(": OK"), "{}: {text}", case["name"]);
    }
    assert_eq!(cas.len(), 2, "both CA algorithms are covered");
}

#[test]
fn openssl_shows_the_profile_fields() {
    for case in ok_cases() {
        let cert = case["certificate_pem"].as_str().unwrap();
        let (ok, text) = openssl(&[
            "x509", "-in", cert, "-noout", "-text", "-serial", "-subject", "-nameopt", "RFC2253",
        ]);
        assert!(ok, "{text}");
        let (_, der_text) = openssl(&["asn1parse", "-in", cert]);
        let name = case["name"].as_str().unwrap();
        // The certificate serial is generation * 2^64 + the device serial (SPEC.md 5); the
        // device serial appears in serialNumber and CN.
        let subject_line = text.lines().find(|l| l.starts_with("subject=")).unwrap();
        let serial_hex = text
            .lines()
            .find(|l| l.starts_with("serial="))
            .unwrap()
            .trim_start_matches("serial=");
        let value = u128::from_str_radix(serial_hex, 16).unwrap();
        let serial = value as u64;
        assert_eq!(
            (value >> 64) as u64,
            case["generation"].as_u64().unwrap_or(0),
            "{name}: the generation above the device serial"
        );
        assert_eq!(
            subject_line,
            format!("subject=CN={serial},serialNumber={serial}"),
            "{name}"
        );
        assert!(
            text.contains("Not After : Dec 31 23:59:59 9999 GMT"),
            "{name}: {text}"
        );
        assert!(
            der_text.contains("GENERALIZEDTIME   :99991231235959Z"),
            "{name}: {der_text}"
        );
        for needle in [
            "X509v3 Basic Constraints: critical\n                CA:FALSE",
            "X509v3 Extended Key Usage: \n                TLS Web Client Authentication",
            "X509v3 Authority Key Identifier:",
            "X509v3 Subject Key Identifier:",
        ] {
            assert!(
                text.contains(needle),
                "{name}: missing {needle:?} in\n{text}"
            );
        }
        let p256 = text.contains("id-ecPublicKey");
        let ku = if p256 {
            "Digital Signature, Key Agreement"
        } else {
            "Digital Signature\n"
        };
        assert!(
            text.contains(&format!("X509v3 Key Usage: critical\n                {ku}")),
            "{name}: {text}"
        );
    }
}

#[test]
fn openssl_accepts_the_vector_kcv_as_aes_of_the_zero_block() {
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(vectors().join("manifest.json")).unwrap()).unwrap();
    let case = manifest["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == "secret")
        .unwrap();
    let key = case["secret_hex"].as_str().unwrap();
    let dir = std::env::temp_dir().join(format!("imprint-kcv-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let zero = dir.join("zero.bin");
    std::fs::write(&zero, [0u8; 16]).unwrap();
    let out = Command::new("openssl")
        .args(["enc", "-aes-256-ecb", "-nopad", "-K", key, "-in"])
        .arg(&zero)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        hex::encode(&out.stdout[..3]),
        case["kcv_hex"].as_str().unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 15: OpenSSL 3.0 refused ring's PKCS#8 v2 Ed25519 documents ("unsupported"); the key
/// files are v1 now, which `openssl pkey` reads, and it finds the same public key.
#[test]
fn openssl_reads_every_vector_private_key() {
    for name in [
        "cas/ca-ed25519.key.pem",
        "cas/ca-p256.key.pem",
        "lines/line-a.key.pem",
        "lines/line-b.key.pem",
        "lines/line-c.key.pem",
        "lines/line-d.key.pem",
    ] {
        let (ok, text) = openssl(&["pkey", "-in", name, "-pubout"]);
        assert!(ok, "{name}: {text}");
        let pem = std::fs::read_to_string(vectors().join(name)).unwrap();
        let key = protocol_spec::KeyPair::from_pem(&pem, &ring::rand::SystemRandom::new()).unwrap();
        let public = protocol_spec::PublicKey::from(&key).to_pem();
        assert_eq!(text.trim(), public.replace("\r\n", "\n").trim(), "{name}");
    }
}
