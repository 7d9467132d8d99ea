//! `ca-server store copy`: a sled CA with devices, secrets (generated and imported), a reset
//! and a revocation moves to PostgreSQL; the copy verifies, the CA then serves from it with
//! every binding and the audit chain intact, and a second copy into the same schema is refused.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use ca_server::config::StoreSettings;
use common::{Line, TestCa};
use device_agent::secrets::{SyncOutcome, mtls_client, sync};
use device_agent::state::DeviceState;
use device_agent::url::CaUrl;
use protocol_spec::KeyAlgorithm;

async fn enrolled(
    ca: &TestCa,
    coap: std::net::SocketAddr,
    line: &Line,
    serial: u64,
) -> DeviceState {
    common::enrolled_over_coap(ca, coap, line, serial, KeyAlgorithm::Ed25519).await
}

fn ca_server(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_ca_moves_to_postgres_with_every_binding_and_its_audit_chain() {
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, StoreSettings::default());
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1000, None);
    let dir = ca.root().to_str().unwrap().to_string();
    // Two imported keys, given to the first two devices.
    let keys = ca.tmp.path().join("keys.jsonl");
    std::fs::write(
        &keys,
        format!(
            "{{\"key_id\": \"imp-1\", \"key\": \"{}\"}}\n{{\"key_id\": \"imp-2\", \"key\": \"{}\"}}\n",
            "11".repeat(32),
            "22".repeat(32)
        ),
    )
    .unwrap();
    let out = ca_server(&["secrets", "import", "--dir", &dir, keys.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A DUKPT BDK, sealed: copied as it is (the copy's verification compares them).
    let out = ca_server(&[
        "dukpt",
        "add-bdk",
        "--dir",
        &dir,
        "--bdk-id",
        "12345678",
        "--generate",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A BDK held in a PKCS#11 token (as a token CA records it): its label, no key bytes
    // (PostgreSQL: NULL ciphertext and nonce), copied as it is too.
    ca.store()
        .add_bdk(
            &ca_server::records::BdkRecord {
                id: "ABCD0001".into(),
                algorithm: "aes-256".into(),
                ciphertext: Vec::new(),
                nonce: Vec::new(),
                kcv: vec![1, 2, 3, 4, 5],
                created_at: 7,
                token_object: Some("ca-bdk-ABCD0001".into()),
            },
            "test",
        )
        .unwrap();
    let bdks_before = ca.store().bdks().unwrap();
    assert_eq!(bdks_before.len(), 2);

    let server = ca.start().await;
    let mut devices = Vec::new();
    for serial in 1..=6 {
        let mut dev = enrolled(&ca, server.coap.unwrap(), &line, serial).await;
        let url = CaUrl::parse(&format!("https://{}", server.mtls.unwrap())).unwrap();
        let client = mtls_client(url, &dev).unwrap();
        assert!(matches!(
            sync(&client, &mut dev, |_| Ok(())).await.unwrap(),
            SyncOutcome::Stored { .. }
        ));
        devices.push(dev);
    }
    server
        .service
        .rotate_secret(3, "operator:test")
        .await
        .unwrap();
    assert!(
        server
            .service
            .revoke(4, "operator:test")
            .await
            .unwrap()
            .is_some()
    );
    server.service.reset(5, "operator:test").await.unwrap();
    server
        .service
        .revoke_operator("mallory", "operator:test")
        .await
        .unwrap();
    let before: Vec<_> = (1..=6)
        .map(|s| {
            let st = server.service.store();
            (
                st.device(s).unwrap(),
                st.secret_versions(s).unwrap(),
                st.history(s).unwrap(),
            )
        })
        .collect();
    server.stop().await;

    let target = common::pg_store();
    let (url, schema) = (target.url.clone().unwrap(), target.schema.clone().unwrap());
    let ca_file = target.ca_file.clone().unwrap();
    let copy = |switch: bool| {
        let mut args = vec![
            "store",
            "copy",
            "--dir",
            &dir,
            "--to",
            &url,
            "--schema",
            &schema,
            "--ca-file",
            ca_file.to_str().unwrap(),
        ];
        if switch {
            args.push("--switch");
        }
        ca_server(&args)
    };
    let out = copy(false);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("verified"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!ca.on_postgres(), "without --switch config.toml stays");
    // Into a schema that holds records: refused, config unchanged.
    let out = copy(true);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already holds records"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ca.on_postgres());
    // Into the emptied schema again, and switched.
    let pg = ca_server::store::pg_config(&ca.dir, &target)
        .unwrap()
        .unwrap();
    ca_server::store::PgStore::drop_schema(&pg).unwrap();
    let out = copy(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ca.on_postgres(), "--switch points config.toml at the copy");

    // The CA serves from PostgreSQL: every record as it was, the chain intact and growing.
    let out = ca_server(&["audit", "verify", "--dir", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let server = ca.start().await;
    let store = server.service.store();
    for (s, (device, versions, history)) in (1..=6).zip(&before) {
        assert_eq!(&store.device(s).unwrap(), device, "device {s}");
        assert_eq!(
            &store.secret_versions(s).unwrap(),
            versions,
            "secrets of {s}"
        );
        assert_eq!(&store.history(s).unwrap(), history, "history of {s}");
    }
    assert_eq!(store.secret_versions(1).unwrap()[0].source, "import");
    assert_eq!(
        store.bdks().unwrap(),
        bdks_before,
        "the sealed BDK and the token's, as they were"
    );
    // Device 3 picks up its rotated version; device 1 has nothing new.
    let url = CaUrl::parse(&format!("https://{}", server.mtls.unwrap())).unwrap();
    let d3 = &mut devices[2];
    let out = sync(&mtls_client(url.clone(), d3).unwrap(), d3, |_| Ok(()))
        .await
        .unwrap();
    assert!(matches!(out, SyncOutcome::Stored { .. }), "{out:?}");
    let d1 = &mut devices[0];
    let out = sync(&mtls_client(url, d1).unwrap(), d1, |_| Ok(()))
        .await
        .unwrap();
    assert!(matches!(out, SyncOutcome::UpToDate { .. }), "{out:?}");
    // Serial 5 (reset) enrolls again; serial 4 (revoked) cannot. The revoked operator came
    // along.
    enrolled(&ca, server.coap.unwrap(), &line, 5).await;
    let revoked = server.service.store().operator_revocations().unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(
        (revoked[0].name.as_str(), revoked[0].actor.as_str()),
        ("mallory", "operator:test")
    );
    server.stop().await;
    let out = ca_server(&["audit", "verify", "--dir", &dir]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
