//! A small simulation end to end, both transports: the binary's exit status and the
//! verification pass of its report.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn simulate(transport: &str, devices: u32, extra: &[&str]) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_simulator"))
        .args(["--devices", &devices.to_string(), "--transport", transport])
        .args(["--concurrency", "32", "--quiet"])
        .args(extra)
        .arg("--report")
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{transport}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("verification: PASSED"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "result: PASSED: all {devices} devices completed and the verification pass passed"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains("report: "),
        "the simulator says where the report is"
    );
    let html = std::fs::read_to_string(tmp.path().join("report.html")).unwrap();
    assert!(
        html.contains("Verification: <span class=\"ok\">PASSED</span>"),
        "the HTML report states the verdict"
    );
    assert!(html.contains("Result: <span class=\"ok\">PASSED</span>"));
    assert_eq!(html.matches("<svg").count(), 2, "two charts, inline");
    serde_json::from_slice(&std::fs::read(tmp.path().join("report.json")).unwrap()).unwrap()
}

#[test]
fn small_simulations_survive_a_ca_kill_and_verify_the_store() {
    for transport in ["coap", "https"] {
        // The CA is killed with SIGKILL after 1 s (and every second after): devices retry and
        // the verification pass must find nothing lost, nothing duplicated.
        let r = simulate(transport, 2000, &["--kill-ca-every", "1"]);
        assert_eq!(r["devices_ok"], 2000, "{transport}");
        assert_eq!(r["devices_failed"], 0);
        assert!(
            r["ca_restarts"].as_u64().unwrap() >= 1,
            "{transport}: the CA was killed at least once"
        );
        let v = &r["verification"];
        assert_eq!(v["records"], 2000);
        assert_eq!(v["certificates_valid"], 2000);
        assert_eq!(v["devices_matching_store"], 2000);
        assert_eq!(v["devices_missing_from_store"], 0);
        assert_eq!(v["devices_with_confirmed_secret"], 2000);
        assert_eq!(v["shared_secrets"], 0);
        assert_eq!(v["shared_keys"], 0);
        assert_eq!(v["index_mismatches"], 0);
        assert_eq!(v["audit_chain_ok"], true);
        assert_eq!(v["devices_run"], 2000);
        assert_eq!(v["secrets_unsealed"], 2000);
        assert_eq!(v["shared_key_ids"], 0);
        assert_eq!(v["devices_missing_audit_entries"], 0);
        // A line-add entry, then enroll, secret-deliver and secret-ack per device.
        assert_eq!(v["audit_entries"], 1 + 3 * 2000);
        let pass = &r["verification_pass"];
        assert!(pass["seconds"].as_f64().unwrap() > 0.0);
        assert!(pass["peak_memory_bytes"].as_u64().unwrap() > 0);
        assert_eq!(pass["peak_reset_before_pass"], true);
        assert!(r["ca"]["peak_memory_bytes"].as_u64().unwrap() > 0);
        assert!(r["ceiling"]["devices_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(
            r["ceiling"]["clock"], "thread-cpu",
            "the report names its clock"
        );
        assert_eq!(r["config"]["transport"], transport);
    }
}

/// `--secret-source dukpt`: the embedded CA gets a generated BDK and DUKPT lines; every device
/// receives its AES DUKPT Initial Key (through a CA kill too), and the verification pass derives
/// each one again from the BDK.
#[test]
fn a_dukpt_run_checks_every_initial_key_against_the_bdk() {
    let r = simulate(
        "coap",
        1000,
        &["--secret-source", "dukpt", "--kill-ca-every", "1"],
    );
    assert_eq!(r["devices_ok"], 1000);
    assert_eq!(r["config"]["secret_source"], "dukpt");
    let v = &r["verification"];
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["devices_with_confirmed_secret"], 1000);
    assert_eq!(v["secrets_unsealed"], 1000);
    assert_eq!(v["dukpt_initial_keys_verified"], 1000);
    assert_eq!(v["dukpt_initial_keys_wrong"], 0);
    assert_eq!(v["shared_secrets"], 0);
    assert_eq!(v["shared_key_ids"], 0, "no Initial Key ID twice");
    // The BDK's addition, a line-add entry, then enroll, secret-deliver and secret-ack per
    // device.
    assert_eq!(v["audit_entries"], 2 + 3 * 1000);
}

#[test]
fn coap_devices_enroll_through_datagram_loss() {
    let r = simulate("coap", 300, &["--loss", "0.2", "--no-secrets"]);
    assert_eq!(r["devices_ok"], 300);
    assert_eq!(r["verification"]["ok"], true);
    assert_eq!(r["config"]["loss"], "0.2");
}

#[test]
fn the_embedded_ca_applies_ca_verify_own_signatures_both_ways() {
    // The CA child warns on stderr (the simulator passes it through) when it runs without the
    // check: the setting reached the process that issues.
    for (value, warned) in [("false", true), ("true", false)] {
        let tmp = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_simulator"))
            .args(["--devices", "20", "--concurrency", "4", "--quiet"])
            .args(["--no-secrets", "--ca-verify-own-signatures", value])
            .arg("--report")
            .arg(tmp.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{value}: {stderr}");
        assert_eq!(
            stderr.contains("verify_own_signatures = false"),
            warned,
            "{value}: {stderr}"
        );
        let r: serde_json::Value =
            serde_json::from_slice(&std::fs::read(tmp.path().join("report.json")).unwrap())
                .unwrap();
        assert_eq!(r["config"]["ca_verify_own_signatures"], value);
    }
}

/// The test database (`.ci/run` starts one; so does
/// `eval "$(ca-server/scripts/test-postgres.sh start)"`): URL and server CA.
fn test_database() -> (String, String) {
    let need = |v: &str| {
        std::env::var(v).unwrap_or_else(|_| {
            panic!(
                "this test needs PostgreSQL: set IMPRINT_TEST_PG_URL, IMPRINT_TEST_PG_CA and IMPRINT_STORE_PASSWORD, e.g. with `eval \"$(ca-server/scripts/test-postgres.sh start)\"` (.ci/run does)"
            )
        })
    };
    need("IMPRINT_STORE_PASSWORD");
    (need("IMPRINT_TEST_PG_URL"), need("IMPRINT_TEST_PG_CA"))
}

/// What `sql` returns from the test database, through psql.
fn psql(url: &str, ca: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .arg(url)
        .args(["-tAc", sql])
        .env(
            "PGPASSWORD",
            std::env::var("IMPRINT_STORE_PASSWORD").unwrap(),
        )
        .env("PGSSLROOTCERT", ca)
        .output()
        .expect("psql (apt-get install postgresql-client-15)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn small_simulations_on_postgresql_survive_a_ca_kill_and_verify_the_database() {
    let (url, ca) = test_database();
    for transport in ["coap", "https"] {
        let r = simulate(
            transport,
            1000,
            &[
                "--store",
                &url,
                "--store-ca-file",
                &ca,
                "--kill-ca-every",
                "1",
            ],
        );
        assert_eq!(r["devices_ok"], 1000, "{transport}");
        assert!(r["ca_restarts"].as_u64().unwrap() >= 1, "{transport}");
        let v = &r["verification"];
        assert_eq!(v["records"], 1000);
        assert_eq!(v["devices_matching_store"], 1000);
        assert_eq!(v["devices_with_confirmed_secret"], 1000);
        assert_eq!(v["secret_versions"], 1000);
        assert_eq!(v["index_mismatches"], 0);
        assert_eq!(v["audit_entries"], 1 + 3 * 1000);
        assert!(r["store_bytes"].as_u64().unwrap() > 0);
        // The report names the database and the run's own schema, which is gone afterwards.
        let name = r["config"]["ca"].as_str().unwrap().to_string();
        assert!(name.contains("PostgreSQL"), "{name}");
        assert!(!name.contains(&std::env::var("IMPRINT_STORE_PASSWORD").unwrap()));
        let schema = name.rsplit(' ').next().unwrap();
        assert!(schema.starts_with("imprint_sim_"), "{name}");
        assert_eq!(
            psql(
                &url,
                &ca,
                &format!("SELECT count(*) FROM pg_namespace WHERE nspname = '{schema}'")
            ),
            "0",
            "{transport}: the run's schema {schema} was dropped"
        );
    }
}

/// Three embedded CA nodes on one database, devices spread over them round robin, a random node
/// killed every second: every device through every phase, the database verified, and every
/// node's entries in the one audit chain.
#[test]
fn three_nodes_on_postgresql_survive_node_kills_and_verify_the_database() {
    let (url, ca) = test_database();
    for transport in ["coap", "https"] {
        let r = simulate(
            transport,
            1200,
            &[
                "--store",
                &url,
                "--store-ca-file",
                &ca,
                "--nodes",
                "3",
                "--kill-node-every",
                "1",
            ],
        );
        assert_eq!(r["devices_ok"], 1200, "{transport}");
        assert_eq!(r["config"]["nodes"], "3");
        let nodes = r["ca_nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 3);
        assert!(r["ca_restarts"].as_u64().unwrap() >= 1, "{transport}");
        let v = &r["verification"];
        assert_eq!(v["records"], 1200);
        assert_eq!(v["devices_matching_store"], 1200);
        assert_eq!(v["devices_with_confirmed_secret"], 1200);
        assert_eq!(v["index_mismatches"], 0);
        assert_eq!(v["audit_entries"], 1 + 3 * 1200);
        // Every node wrote entries into the one chain (round robin gives each about a third).
        let by_node = v["audit_entries_by_node"].as_object().unwrap();
        for n in ["sim-node-1", "sim-node-2", "sim-node-3"] {
            assert!(
                by_node.get(n).and_then(|c| c.as_u64()).unwrap_or(0) >= 600,
                "{transport}: {by_node:?}"
            );
        }
        assert_eq!(r["verdict"]["passed"], true);
    }
}

#[test]
fn several_nodes_need_a_database() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_simulator"))
        .args(["--devices", "10", "--nodes", "2", "--quiet"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--nodes above 1 needs --store"), "{err}");
}
