//! AES DUKPT Base Derivation Keys through the real CLI, offline (the store opened directly) and
//! through the admin API of a running server over mutual TLS: stored sealed, listed by id,
//! algorithm and KCV, the host-side KCV of a transaction's working key; every refusal stores
//! nothing. Runs on the suite's store (sled, or PostgreSQL with IMPRINT_TEST_STORE=postgres).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{TestCa, snapshot};
use protocol_spec::KeyAlgorithm;
use protocol_spec::dukpt::{self, AesKey, KeyType, KeyUsage, Ksn};

const BDK: &str = "FEDCBA9876543210F1F1F1F1F1F1F1F1";

fn run(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ca-server"));
    c.args(args).env_remove("IMPRINT_ADMIN");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(args: &[&str], env: &[(&str, &Path)]) -> String {
    let o = run(args, env);
    let (out, err) = text(&o);
    assert!(o.status.success(), "ca-server {args:?}: {out}{err}");
    out
}

/// Runs and expects exit code 2 (refused) with `why` on stderr.
fn refused(args: &[&str], env: &[(&str, &Path)], why: &str) {
    let o = run(args, env);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "ca-server {args:?}: {out}{err}");
    assert!(
        err.contains(why),
        "ca-server {args:?}: {err:?} lacks {why:?}"
    );
}

fn key_file(dir: &Path, name: &str, hex: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{hex}\n")).unwrap();
    p
}

/// The host-side KCV of a PIN-encryption working key, computed here from the BDK directly.
fn expected_kcv(bdk_hex: &str, ksn: &str, key_type: KeyType) -> String {
    let bdk = AesKey::from_hex(bdk_hex).unwrap();
    let key = dukpt::host_working_key(
        &bdk,
        Ksn::from_hex(ksn).unwrap(),
        KeyUsage::PinEncryption,
        key_type,
    )
    .unwrap();
    hex::encode_upper(key.kcv())
}

/// No record of the store holds the key's octets (sealed, never in the clear).
fn assert_key_sealed(ca: &TestCa, key_hex: &str) {
    let key = hex::decode(key_hex).unwrap();
    let upper = key_hex.to_uppercase();
    let lower = key_hex.to_lowercase();
    for (table, k, v) in snapshot(&ca.store()) {
        for hay in [&k, &v] {
            assert!(
                !hay.windows(key.len()).any(|w| w == key.as_slice()),
                "{table} holds the key"
            );
            let s = String::from_utf8_lossy(hay);
            assert!(
                !s.contains(&upper) && !s.contains(&lower),
                "{table} holds the key in hex"
            );
        }
    }
}

#[test]
fn offline_add_list_derive_and_every_refusal_stores_nothing() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let dir = ca.root().to_str().unwrap().to_string();
    let tmp = ca.tmp.path();
    let good = key_file(tmp, "bdk.hex", BDK);

    let out = ok(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "12345678",
            "--key-file",
            good.to_str().unwrap(),
        ],
        &[],
    );
    let kcv = hex::encode_upper(AesKey::from_hex(BDK).unwrap().kcv());
    assert_eq!(kcv, "FF0BD7C455");
    assert!(
        out.contains("BDK 12345678 stored: aes-128, kcv FF0BD7C455"),
        "{out}"
    );
    assert!(!out.contains(BDK), "{out}");
    assert_key_sealed(&ca, BDK);

    let list = ok(&["dukpt", "list", "--dir", &dir], &[]);
    assert!(
        list.contains("12345678") && list.contains("aes-128") && list.contains(&kcv),
        "{list}"
    );
    assert!(!list.contains(BDK), "{list}");

    // The published pair's Initial Key ID at counter 1: the PIN key AF8CB133...
    let derived = ok(
        &[
            "dukpt",
            "derive",
            "--dir",
            &dir,
            "--bdk-id",
            "12345678",
            "--ksn",
            "123456789012345600000001",
        ],
        &[],
    );
    let want = expected_kcv(BDK, "123456789012345600000001", KeyType::Aes128);
    assert_eq!(
        want,
        hex::encode_upper(
            AesKey::from_hex("AF8CB133A78F8DC2D1359F18527593FB")
                .unwrap()
                .kcv()
        )
    );
    assert!(derived.contains(&format!("kcv {want}")), "{derived}");
    assert!(
        derived.contains("ksn 123456789012345600000001"),
        "{derived}"
    );

    // Refusals, each with nothing stored.
    let before = snapshot(&ca.store());
    let other = key_file(tmp, "other.hex", &"11".repeat(16));
    refused(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "12345678",
            "--key-file",
            other.to_str().unwrap(),
        ],
        &[],
        "BDK 12345678 already exists",
    );
    let short = key_file(tmp, "short.hex", &"22".repeat(15));
    refused(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "0000AAAA",
            "--key-file",
            short.to_str().unwrap(),
        ],
        &[],
        "16 octets (AES-128) or 32 octets (AES-256), not 15",
    );
    let long = key_file(tmp, "long.hex", &"22".repeat(24));
    refused(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "0000AAAA",
            "--key-file",
            long.to_str().unwrap(),
        ],
        &[],
        "not 24",
    );
    let nonhex = key_file(tmp, "nonhex.hex", &"zz".repeat(16));
    refused(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "0000AAAA",
            "--key-file",
            nonhex.to_str().unwrap(),
        ],
        &[],
        "32 or 64 hex digits",
    );
    refused(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "123",
            "--generate",
        ],
        &[],
        "8 hex digits",
    );
    refused(
        &[
            "dukpt",
            "derive",
            "--dir",
            &dir,
            "--ksn",
            "ABCDEF01ABCDEF0100000001",
        ],
        &[],
        "no BDK ABCDEF01",
    );
    refused(
        &[
            "dukpt",
            "derive",
            "--dir",
            &dir,
            "--bdk-id",
            "0000AAAA",
            "--ksn",
            "123456789012345600000001",
        ],
        &[],
        "names BDK 12345678, not 0000AAAA",
    );
    refused(
        &[
            "dukpt",
            "derive",
            "--dir",
            &dir,
            "--ksn",
            "12345678901234560001FFFF",
        ],
        &[],
        "at most 16 one bits",
    );
    assert_eq!(snapshot(&ca.store()), before, "a refusal changed the store");

    // A generated AES-256 BDK: listed with its KCV, derivable.
    let out = ok(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "CAFE0001",
            "--generate",
        ],
        &[],
    );
    assert!(out.contains("BDK CAFE0001 stored: aes-256"), "{out}");
    let derived = ok(
        &[
            "dukpt",
            "derive",
            "--dir",
            &dir,
            "--ksn",
            "CAFE00010000000100000003",
            "--key-type",
            "aes-128",
            "--usage",
            "data-encrypt",
        ],
        &[],
    );
    assert!(
        derived.contains("data-encrypt aes-128 working key, counter 3"),
        "{derived}"
    );
    let events: Vec<String> = ca
        .store()
        .audit()
        .map(|e| e.unwrap())
        .filter(|e| e.event == "dukpt-add-bdk")
        .map(|e| e.detail)
        .collect();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(
        events[0],
        "bdk_id=12345678 algorithm=aes-128 kcv=FF0BD7C455"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_the_admin_api() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let server = ca.start().await;
    let admin = server.admin.unwrap();
    let root = ca.root().to_str().unwrap().to_string();
    ok(&["operator", "add", "--dir", &root, "alice"], &[]);
    let ops = ca.dir.operators();
    let (cert, key, ca_pem) = (
        ops.join("alice.pem"),
        ops.join("alice.key.pem"),
        ca.ca_pem_path(),
    );
    let url = PathBuf::from(format!("https://{admin}"));
    let env: Vec<(&str, &Path)> = vec![
        ("IMPRINT_ADMIN", url.as_path()),
        ("IMPRINT_OPERATOR_CERT", cert.as_path()),
        ("IMPRINT_OPERATOR_KEY", key.as_path()),
        ("IMPRINT_CA_CERT", ca_pem.as_path()),
    ];
    let bdk256 = format!("{BDK}{BDK}");
    let file = key_file(ca.tmp.path(), "bdk.hex", &bdk256);
    let run_blocking = |args: Vec<String>, env: Vec<(String, PathBuf)>| {
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &Path)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_path())).collect();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, &env)
        })
    };
    let owned_env: Vec<(String, PathBuf)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_path_buf()))
        .collect();
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    let o = run_blocking(
        args(&[
            "dukpt",
            "add-bdk",
            "--bdk-id",
            "12345678",
            "--key-file",
            file.to_str().unwrap(),
            "--json",
        ]),
        owned_env.clone(),
    )
    .await
    .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let view: ca_server::dukpt::BdkView = serde_json::from_str(&out).unwrap();
    assert_eq!(view.algorithm, "aes-256");
    assert_eq!(view.kcv, "410EDFCA2A");

    // The same id again: 409, refused; a key of the wrong length: 400. Neither is stored
    // (the list below still has the one BDK).
    let o = run_blocking(
        args(&["dukpt", "add-bdk", "--bdk-id", "12345678", "--generate"]),
        owned_env.clone(),
    )
    .await
    .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("already exists"), "{err}");
    let short = key_file(ca.tmp.path(), "short.hex", "0011");
    let o = run_blocking(
        args(&[
            "dukpt",
            "add-bdk",
            "--bdk-id",
            "0000BBBB",
            "--key-file",
            short.to_str().unwrap(),
        ]),
        owned_env.clone(),
    )
    .await
    .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not 2"), "{err}");

    let o = run_blocking(args(&["dukpt", "list", "--json"]), owned_env.clone())
        .await
        .unwrap();
    let views: Vec<ca_server::dukpt::BdkView> = serde_json::from_str(&text(&o).0).unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(views[0].bdk_id, "12345678");

    let o = run_blocking(
        args(&[
            "dukpt",
            "derive",
            "--ksn",
            "123456789012345600020000",
            "--json",
        ]),
        owned_env.clone(),
    )
    .await
    .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let d: ca_server::dukpt::DeriveView = serde_json::from_str(&out).unwrap();
    assert_eq!(
        d.kcv, "C8057698B4",
        "the published-supplement AES-256 key at 0x20000"
    );
    assert_eq!(
        d.kcv,
        expected_kcv(&bdk256, "123456789012345600020000", KeyType::Aes256)
    );
    let o = run_blocking(
        args(&["dukpt", "derive", "--ksn", "0BADBDK0000000000000001"]),
        owned_env.clone(),
    )
    .await
    .unwrap();
    assert_eq!(o.status.code(), Some(2));
    let o = run_blocking(
        args(&["dukpt", "derive", "--ksn", "0BADB0D1000000000000001F"]),
        owned_env,
    )
    .await
    .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no BDK 0BADB0D1"), "{err}");
    server.stop().await;
    assert_key_sealed(&ca, &bdk256);
}
