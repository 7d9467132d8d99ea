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
        owned_env.clone(),
    )
    .await
    .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no BDK 0BADB0D1"), "{err}");
    // A line naming an unknown BDK, through the admin API: refused, not registered.
    let line = common::Line::new("line-x", KeyAlgorithm::Ed25519);
    let pem = ca.tmp.path().join("line-x.pub.pem");
    std::fs::write(&pem, protocol_spec::PublicKey::from(&line.key).to_pem()).unwrap();
    let o = run_blocking(
        args(&[
            "line",
            "add",
            "--id",
            "line-x",
            "--public-key",
            pem.to_str().unwrap(),
            "--serials",
            "1-10",
            "--secret-source",
            "dukpt:DEADBEEF",
        ]),
        owned_env.clone(),
    )
    .await
    .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no BDK DEADBEEF is stored"), "{err}");
    let o = run_blocking(args(&["line", "list", "--json"]), owned_env)
        .await
        .unwrap();
    assert!(
        !text(&o).0.contains("line-x"),
        "the refused line was registered"
    );
    server.stop().await;
    assert_key_sealed(&ca, &bdk256);
}

// ---------------------------------------------------------------------------------------------
// DUKPT lines: the device's secret is its Initial Key under a derivation id of its own.

use ca_server::records::{LineRecord, SecretSource};
use ca_server::store::{
    EnrollOutcome, NewEnrollment, SecretOp, SecretOutcome, Store, Write, Written,
};
use protocol_spec::dukpt::{BdkId, InitialKeyId};

/// The test's own BDK, kept here to check every Initial Key independently of the CA.
const LINE_BDK: &str = "00112233445566778899AABBCCDDEEFF0102030405060708090A0B0C0D0E0F10";

fn secret_keys(ca: &TestCa) -> ca_server::secrets::SecretKeys {
    ca_server::issuer::load_secret_keys(&ca.dir, &ca.dir.load_config().unwrap()).unwrap()
}

fn dukpt_line(store: &dyn Store, id: &str, bdk: BdkId, last: u64) {
    let rec = LineRecord {
        id: id.into(),
        public_key: protocol_spec::PublicKey::from(
            &common::Line::new(id, KeyAlgorithm::Ed25519).key,
        )
        .spki_der(),
        first_serial: 1,
        last_serial: last,
        quota: last,
        rate: 0,
        enrolled: 0,
        active: true,
        created_at: common::now(),
        secret_source: SecretSource::Dukpt(bdk),
    };
    store.add_line(&rec, "test").unwrap();
}

/// 10,000 devices on a DUKPT line, each given its version 1 through the real store's
/// transactions (the allocation rule and the per-BDK counter, in batches of 500 as the group
/// commit makes them): distinct Initial Key IDs under the BDK's id, derivation ids 0..9999, each
/// Initial Key equal to an independent derivation from the BDK, all distinct.
#[test]
fn ten_thousand_devices_get_distinct_initial_keys_each_derived_from_the_bdk() {
    const N: u64 = 10_000;
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let store = ca.store();
    let keys = secret_keys(&ca);
    let bdk_id: BdkId = "5EED0001".parse().unwrap();
    let bdk = AesKey::from_hex(LINE_BDK).unwrap();
    ca_server::dukpt::add_bdk(store.as_ref(), &keys, bdk_id, &bdk, common::now(), "test").unwrap();
    dukpt_line(store.as_ref(), "dukpt-line", bdk_id, N);

    let binding = |serial: u64| {
        let spki = [&b"spki"[..], &serial.to_be_bytes()].concat();
        (protocol_spec::spki::sha256(&spki), spki)
    };
    for chunk in (1..=N).collect::<Vec<_>>().chunks(1_000) {
        let writes: Vec<Write> = chunk
            .iter()
            .map(|&serial| {
                let (key_hash, spki) = binding(serial);
                Write::Enroll(NewEnrollment {
                    serial,
                    spki,
                    key_hash,
                    certificate: vec![1; 8],
                    line: "dukpt-line".into(),
                    token_id: serial.to_be_bytes().to_vec(),
                    at: common::now(),
                    generation: 0,
                })
            })
            .collect();
        for w in store.apply_writes(&writes).unwrap() {
            assert!(matches!(w, Written::Enroll(EnrollOutcome::Created(_))));
        }
    }
    for chunk in (1..=N).collect::<Vec<_>>().chunks(500) {
        let writes: Vec<Write> = chunk
            .iter()
            .enumerate()
            .map(|(k, &serial)| {
                let (secret, key_id, source) =
                    ca_server::secrets::dukpt_secret(store.as_ref(), &keys, bdk_id, k as u64)
                        .unwrap();
                let mut record = keys
                    .seal_version(serial, 1, key_id, &secret, &source, common::now())
                    .unwrap();
                record.delivered_at = Some(record.created_at);
                Write::Secret(SecretOp::Allocate {
                    record,
                    from_pool: None,
                    binding: binding(serial).0,
                })
            })
            .collect();
        for w in store.apply_writes(&writes).unwrap() {
            assert!(
                matches!(w, Written::Secret(SecretOutcome::Done(Some(_)))),
                "{w:?}"
            );
        }
        store.sync().unwrap();
    }
    assert_eq!(store.dukpt_next("5EED0001").unwrap(), N);

    let mut ids = std::collections::HashSet::new();
    let mut initial_keys = std::collections::HashSet::new();
    for serial in 1..=N {
        let versions = store.secret_versions(serial).unwrap();
        assert_eq!(versions.len(), 1);
        let v = &versions[0];
        assert_eq!(v.source, "dukpt-aes-256");
        let id = InitialKeyId::from_hex(&v.key_id).unwrap();
        assert_eq!(id.bdk_id(), bdk_id);
        assert!(u64::from(id.derivation_id()) < N);
        assert!(ids.insert(id), "Initial Key ID {id} given twice");
        let stored = keys.open_version(v).unwrap();
        let independent = dukpt::initial_key(&bdk, id);
        assert_eq!(stored.as_slice(), independent.expose(), "serial {serial}");
        assert_eq!(v.kcv, independent.kcv().to_vec());
        assert!(initial_keys.insert(stored.to_vec()));
    }
    assert_eq!(ids.len() as u64, N);

    // A second allocation claiming a derivation id already taken conflicts (nothing written):
    // the counter in the transaction, and the Initial Key ID's uniqueness behind it.
    let before = snapshot(&store);
    let (key_hash, spki) = binding(N + 1);
    let mut rec = LineRecord {
        ..store.line("dukpt-line").unwrap().unwrap()
    };
    rec.id = "dukpt-line-2".into();
    rec.first_serial = N + 1;
    rec.last_serial = N + 1;
    rec.enrolled = 0;
    store.add_line(&rec, "test").unwrap();
    store
        .apply_enrollment(&NewEnrollment {
            serial: N + 1,
            spki,
            key_hash,
            certificate: vec![1; 8],
            line: "dukpt-line-2".into(),
            token_id: b"last".to_vec(),
            at: common::now(),
            generation: 0,
        })
        .unwrap();
    let after_setup = snapshot(&store);
    assert_ne!(before, after_setup);
    let allocate = |derivation_id: u32| {
        let id = InitialKeyId::new(bdk_id, derivation_id);
        let ik = dukpt::initial_key(&bdk, id);
        let mut record = keys
            .seal_version(
                N + 1,
                1,
                id.to_string(),
                ik.expose(),
                "dukpt-aes-256",
                common::now(),
            )
            .unwrap();
        record.delivered_at = Some(record.created_at);
        store
            .apply_secret(&SecretOp::Allocate {
                record,
                from_pool: None,
                binding: key_hash,
            })
            .unwrap()
    };
    // An Initial Key ID given before: the same Initial Key, refused as not unique.
    let out = allocate(17);
    assert!(
        matches!(out, SecretOutcome::Refused(ref r) if r.to_string().contains("already bound")),
        "{out:?}"
    );
    // A derivation id that is not the BDK's next one: a conflict, read again.
    let out = allocate(N as u32 + 5);
    assert!(matches!(out, SecretOutcome::Conflict), "{out:?}");
    assert_eq!(
        snapshot(&store),
        after_setup,
        "a conflicting allocation wrote something"
    );
}

/// A line naming an unknown BDK is refused, and nothing is stored.
#[test]
fn a_line_naming_an_unknown_bdk_is_refused() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let dir = ca.root().to_str().unwrap().to_string();
    let line = common::Line::new("line-d", KeyAlgorithm::Ed25519);
    let pem = ca.tmp.path().join("line-d.pub.pem");
    std::fs::write(&pem, protocol_spec::PublicKey::from(&line.key).to_pem()).unwrap();
    let before = snapshot(&ca.store());
    let add = |source: &str| {
        run(
            &[
                "line",
                "add",
                "--dir",
                &dir,
                "--id",
                "line-d",
                "--public-key",
                pem.to_str().unwrap(),
                "--serials",
                "1-100",
                "--secret-source",
                source,
            ],
            &[],
        )
    };
    let o = add("dukpt:0BADBD00");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("no BDK 0BADBD00 is stored"), "{err}");
    let o = add("dukpt:xyz");
    assert_eq!(o.status.code(), Some(2));
    let o = add("vault");
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("not random, pool or dukpt:BDKID"), "{err}");
    assert_eq!(snapshot(&ca.store()), before);
    // With the BDK stored, the same line is registered, and listed with its source.
    let f = key_file(ca.tmp.path(), "bdk.hex", BDK);
    ok(
        &[
            "dukpt",
            "add-bdk",
            "--dir",
            &dir,
            "--bdk-id",
            "0BADBD00",
            "--key-file",
            f.to_str().unwrap(),
        ],
        &[],
    );
    let out = text(&add("dukpt:0BADBD00")).0;
    assert!(out.contains("secrets dukpt:0BADBD00"), "{out}");
    let list = ok(&["line", "list", "--dir", &dir], &[]);
    assert!(list.contains("dukpt:0BADBD00"), "{list}");
    assert_eq!(
        ca.store().line("line-d").unwrap().unwrap().secret_source,
        SecretSource::Dukpt("0BADBD00".parse().unwrap())
    );
}

/// Devices on a DUKPT line over real mutual TLS: each receives `aes-256-dukpt`, its Initial
/// Key and Initial Key ID, checks the KCV and acknowledges; each Initial Key equals an
/// independent derivation from the BDK; `device show` names the Initial Key ID; rotation gives
/// a new Initial Key under a new derivation id as version 2; the device-side KCV of a
/// transaction equals `ca-server dukpt derive` for the same KSN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_on_a_dukpt_line_over_mutual_tls() {
    use device_agent::secrets::{SyncOutcome, mtls_client, sync};
    use device_agent::state::DeviceState;
    use device_agent::url::CaUrl;
    use protocol_spec::messages::ResponseForm;

    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let keys = secret_keys(&ca);
    let bdk_id: BdkId = "5EED0002".parse().unwrap();
    let bdk = AesKey::from_hex(LINE_BDK).unwrap();
    {
        let store = ca.store();
        ca_server::dukpt::add_bdk(store.as_ref(), &keys, bdk_id, &bdk, common::now(), "test")
            .unwrap();
    }
    let line = common::Line::new("line-k", KeyAlgorithm::Ed25519);
    let pem = ca.tmp.path().join("line-k.pub.pem");
    std::fs::write(&pem, protocol_spec::PublicKey::from(&line.key).to_pem()).unwrap();
    let dir = ca.root().to_str().unwrap().to_string();
    ok(
        &[
            "line",
            "add",
            "--dir",
            &dir,
            "--id",
            "line-k",
            "--public-key",
            pem.to_str().unwrap(),
            "--serials",
            "1-1000",
            "--secret-source",
            "dukpt:5EED0002",
        ],
        &[],
    );
    let server = ca.start().await;
    let rng = ring::rand::SystemRandom::new();
    let url = CaUrl::parse(&format!("https://{}", server.mtls.unwrap())).unwrap();
    let mut devices = Vec::new();
    for serial in 1..=12u64 {
        let mut s = DeviceState::generate(
            protocol_spec::DeviceSerial::new(serial).unwrap(),
            KeyAlgorithm::Ed25519,
            &rng,
        )
        .unwrap();
        let token = line.token(serial, &s.key.spki_der());
        let req = device_agent::enroll::build_request(&s, &token, ResponseForm::Compact, &rng)
            .unwrap()
            .to_cbor();
        let coap = device_agent::coap::CoapClient::new(
            CaUrl::parse(&format!("coap://{}", server.coap.unwrap())).unwrap(),
        );
        let resp = coap.enroll_once(req).await.unwrap();
        let profile = protocol_spec::profile::CertProfile::from_ca_der(&ca.ca_der).unwrap();
        s.certificate = Some(device_agent::enroll::accept_response(&s, &profile, &resp).unwrap());
        s.ca_certificate = Some(ca.ca_der.clone());
        let client = mtls_client(url.clone(), &s).unwrap();
        let out = sync(&client, &mut s, |_| Ok(())).await.unwrap();
        assert!(
            matches!(out, SyncOutcome::Stored { version: 1, .. }),
            "{out:?}"
        );
        devices.push(s);
    }
    let mut ids = std::collections::HashSet::new();
    for d in &devices {
        let sec = &d.secrets[0];
        assert_eq!(sec.algorithm, "aes-256-dukpt");
        assert!(sec.acknowledged);
        let id = InitialKeyId::from_bytes(sec.initial_key_id.unwrap());
        assert_eq!(id.bdk_id(), bdk_id);
        assert_eq!(sec.key_id, id.to_string());
        assert!(ids.insert(id));
        assert_eq!(sec.secret.as_slice(), dukpt::initial_key(&bdk, id).expose());
        let view = ca_server::ops::device_view(&server.service, d.serial.get()).unwrap();
        assert_eq!(
            view.secrets[0].initial_key_id.as_deref(),
            Some(id.to_string().as_str())
        );
        assert!(view.secrets[0].confirmed_at.is_some());
    }

    // Rotation: a new Initial Key under a new derivation id, as version 2.
    let first = InitialKeyId::from_bytes(devices[0].secrets[0].initial_key_id.unwrap());
    let rotated = server
        .service
        .rotate_secret(1, "operator:test")
        .await
        .unwrap();
    assert_eq!(rotated.version, 2);
    let client = mtls_client(url.clone(), &devices[0]).unwrap();
    let out = sync(&client, &mut devices[0], |_| Ok(())).await.unwrap();
    assert!(
        matches!(out, SyncOutcome::Stored { version: 2, .. }),
        "{out:?}"
    );
    let second = InitialKeyId::from_bytes(devices[0].secrets[1].initial_key_id.unwrap());
    assert_ne!(second, first);
    assert_eq!(second.bdk_id(), bdk_id);
    assert!(!ids.contains(&second));
    assert_eq!(
        devices[0].secrets[1].secret.as_slice(),
        dukpt::initial_key(&bdk, second).expose()
    );
    // A whole line rotated in one batch: every device a new, distinct id.
    let (n, _, failed) = server
        .service
        .rotate_many((1..=12).collect(), "operator:test", 0)
        .await
        .unwrap();
    assert_eq!((n, failed.len()), (12, 0));
    server.stop().await;

    let store = ca.store();
    let mut all = std::collections::HashSet::new();
    for serial in 1..=12u64 {
        for v in store.secret_versions(serial).unwrap() {
            let id = InitialKeyId::from_hex(&v.key_id).unwrap();
            assert!(all.insert(id), "{id} twice");
            assert_eq!(
                keys.open_version(&v).unwrap().as_slice(),
                dukpt::initial_key(&bdk, id).expose()
            );
        }
    }
    assert_eq!(all.len(), 12 + 1 + 12);
    assert_eq!(store.dukpt_next("5EED0002").unwrap(), 25);
    drop(store);

    // The device side (the agent's state, the standard's register) and the host side
    // (`ca-server dukpt derive`) give the same KCV for the same KSN.
    let d = &devices[3];
    for counter in [1u32, 2, 0x1FFFE, 0x20000, 0x20001] {
        let (ksn, kcv) = d
            .dukpt_transaction(counter, KeyUsage::PinEncryption, None)
            .unwrap();
        let host = ok(
            &["dukpt", "derive", "--dir", &dir, "--ksn", &ksn.to_string()],
            &[],
        );
        assert!(
            host.contains(&format!("kcv {}", hex::encode_upper(kcv))),
            "counter {counter:#x}: {host}"
        );
    }
}

/// A `pool` line takes imported keys only: its first device gets the imported key, the next
/// one finds the pool empty and is told `unavailable` (nothing allocated from the CSPRNG).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_line_takes_imported_keys_only() {
    use device_agent::secrets::{SyncOutcome, mtls_client, sync};
    use device_agent::state::DeviceState;
    use device_agent::url::CaUrl;
    use protocol_spec::messages::ResponseForm;

    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let dir = ca.root().to_str().unwrap().to_string();
    let batch = ca.tmp.path().join("keys.jsonl");
    std::fs::write(
        &batch,
        format!(
            "{{\"key_id\": \"imp-1\", \"key\": \"{}\"}}\n",
            "5a".repeat(32)
        ),
    )
    .unwrap();
    ok(
        &["secrets", "import", "--dir", &dir, batch.to_str().unwrap()],
        &[],
    );
    let line = common::Line::new("line-p", KeyAlgorithm::Ed25519);
    let pem = ca.tmp.path().join("line-p.pub.pem");
    std::fs::write(&pem, protocol_spec::PublicKey::from(&line.key).to_pem()).unwrap();
    ok(
        &[
            "line",
            "add",
            "--dir",
            &dir,
            "--id",
            "line-p",
            "--public-key",
            pem.to_str().unwrap(),
            "--serials",
            "1-10",
            "--secret-source",
            "pool",
        ],
        &[],
    );
    let server = ca.start().await;
    let rng = ring::rand::SystemRandom::new();
    let url = CaUrl::parse(&format!("https://{}", server.mtls.unwrap())).unwrap();
    let mut outcomes = Vec::new();
    for serial in 1..=2u64 {
        let mut s = DeviceState::generate(
            protocol_spec::DeviceSerial::new(serial).unwrap(),
            KeyAlgorithm::Ed25519,
            &rng,
        )
        .unwrap();
        let token = line.token(serial, &s.key.spki_der());
        let req = device_agent::enroll::build_request(&s, &token, ResponseForm::Compact, &rng)
            .unwrap()
            .to_cbor();
        let coap = device_agent::coap::CoapClient::new(
            CaUrl::parse(&format!("coap://{}", server.coap.unwrap())).unwrap(),
        );
        let resp = coap.enroll_once(req).await.unwrap();
        let profile = protocol_spec::profile::CertProfile::from_ca_der(&ca.ca_der).unwrap();
        s.certificate = Some(device_agent::enroll::accept_response(&s, &profile, &resp).unwrap());
        s.ca_certificate = Some(ca.ca_der.clone());
        let client = mtls_client(url.clone(), &s).unwrap();
        outcomes.push((sync(&client, &mut s, |_| Ok(())).await, s));
    }
    assert!(matches!(
        outcomes[0].0,
        Ok(SyncOutcome::Stored { version: 1, .. })
    ));
    assert_eq!(outcomes[0].1.secrets[0].key_id, "imp-1");
    match &outcomes[1].0 {
        Err(device_agent::AgentError::Refused(p)) => {
            assert_eq!(p.kind, protocol_spec::ProblemType::Unavailable, "{p:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        server
            .service
            .store()
            .secret_versions(2)
            .unwrap()
            .is_empty(),
        "nothing allocated for the second device"
    );
    server.stop().await;
}

/// A node learns where a line's secrets come from by its cached lines, refreshed every
/// `[store] refresh_ms`; a device that enrolled on a line added through another node since then
/// fetches from this node all the same, and gets its line's source (read from the database),
/// not the CSPRNG's. Two nodes in one process on one PostgreSQL schema, refreshing once an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_has_not_seen_a_line_yet_gives_its_devices_the_line_s_source() {
    use device_agent::secrets::{SyncOutcome, mtls_client, sync};
    use device_agent::state::DeviceState;
    use device_agent::url::CaUrl;
    use protocol_spec::messages::ResponseForm;

    let mut settings = common::pg_store();
    settings.refresh_ms = Some(3_600_000);
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, settings);
    let keys = secret_keys(&ca);
    let bdk_id: BdkId = "5EED0003".parse().unwrap();
    let bdk = AesKey::from_hex(LINE_BDK).unwrap();
    ca_server::dukpt::add_bdk(
        ca.store().as_ref(),
        &keys,
        bdk_id,
        &bdk,
        common::now(),
        "test",
    )
    .unwrap();
    let a = ca.start().await;
    let b = ca.start().await;
    let line = common::Line::new("line-late", KeyAlgorithm::Ed25519);
    let rec = LineRecord {
        id: "line-late".into(),
        public_key: protocol_spec::PublicKey::from(&line.key).spki_der(),
        first_serial: 1,
        last_serial: 100,
        quota: 100,
        rate: 0,
        enrolled: 0,
        active: true,
        created_at: common::now(),
        secret_source: SecretSource::Dukpt(bdk_id),
    };
    // Through node B (which reloads its own lines at once); node A will not for an hour.
    b.service.add_line(rec, "operator:test").await.unwrap();

    let rng = ring::rand::SystemRandom::new();
    let mut s = DeviceState::generate(
        protocol_spec::DeviceSerial::new(7).unwrap(),
        KeyAlgorithm::Ed25519,
        &rng,
    )
    .unwrap();
    let token = line.token(7, &s.key.spki_der());
    let req = device_agent::enroll::build_request(&s, &token, ResponseForm::Compact, &rng)
        .unwrap()
        .to_cbor();
    let coap = device_agent::coap::CoapClient::new(
        CaUrl::parse(&format!("coap://{}", b.coap.unwrap())).unwrap(),
    );
    let resp = coap.enroll_once(req).await.unwrap();
    let profile = protocol_spec::profile::CertProfile::from_ca_der(&ca.ca_der).unwrap();
    s.certificate = Some(device_agent::enroll::accept_response(&s, &profile, &resp).unwrap());
    s.ca_certificate = Some(ca.ca_der.clone());
    // The secret from node A.
    let url = CaUrl::parse(&format!("https://{}", a.mtls.unwrap())).unwrap();
    let out = sync(&mtls_client(url, &s).unwrap(), &mut s, |_| Ok(()))
        .await
        .unwrap();
    assert!(
        matches!(out, SyncOutcome::Stored { version: 1, .. }),
        "{out:?}"
    );
    let sec = &s.secrets[0];
    assert_eq!(
        sec.algorithm, "aes-256-dukpt",
        "node A used the line's source"
    );
    let id = InitialKeyId::from_bytes(sec.initial_key_id.unwrap());
    assert_eq!(id.bdk_id(), bdk_id);
    assert_eq!(sec.secret.as_slice(), dukpt::initial_key(&bdk, id).expose());
    a.stop().await;
    b.stop().await;
}
