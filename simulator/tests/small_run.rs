//! A small simulation end to end, both transports: the binary's exit status and the
//! verification pass of its report.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

fn simulate(transport: &str, devices: u32) -> serde_json::Value {
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_simulator"))
        .args([
            "--devices",
            &devices.to_string(),
            "--transport",
            transport,
            "--concurrency",
            "32",
            "--quiet",
            "--report",
        ])
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
        stdout.contains("report: "),
        "the simulator says where the report is"
    );
    serde_json::from_slice(&std::fs::read(tmp.path().join("report.json")).unwrap()).unwrap()
}

#[test]
fn small_simulations_enroll_every_device_and_verify_the_store() {
    for transport in ["coap", "https"] {
        let r = simulate(transport, 600);
        assert_eq!(r["devices_ok"], 600, "{transport}");
        assert_eq!(r["devices_failed"], 0);
        let v = &r["verification"];
        assert_eq!(v["records"], 600);
        assert_eq!(v["certificates_valid"], 600);
        assert_eq!(v["devices_matching_store"], 600);
        assert_eq!(v["shared_keys"], 0);
        assert_eq!(v["index_mismatches"], 0);
        assert_eq!(v["audit_chain_ok"], true);
        assert!(r["ca"]["peak_memory_bytes"].as_u64().unwrap() > 0);
        assert!(r["ceiling"]["devices_per_second"].as_f64().unwrap() > 0.0);
        assert_eq!(r["config"]["transport"], transport);
    }
}
