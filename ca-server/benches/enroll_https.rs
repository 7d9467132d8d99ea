//! HTTPS enrollment throughput: the CA as a separate process, durable (group commit +
//! fdatasync), a new TLS connection per device, device requests (keys, tokens, CSRs) made
//! before the clock starts so that the figure is the enrollment round trip itself.
//!
//! ```text
//! cargo bench -p ca-server --bench enroll_https -- [DEVICES] [CONCURRENCY] [keep-alive] [CA-ALG]
//! ```
//!
//! CA-ALG is the CA's key algorithm, `ed25519` (the default) or `p256`; devices use Ed25519.
//!
//! With `keep-alive`, each of the CONCURRENCY tasks is a line gateway relaying devices over one
//! kept-alive connection (the design's 8,600/s row); the figure adds p50/p99 latency.
//!
//! The load generator shares this machine's cores with the CA, which real devices do not: each
//! brings its own CPU. So the bench also reports the CPU time each process spent per
//! enrollment (`/proc/PID/stat`, all threads) and what the CA's figure allows when the CA has
//! every core to itself: the enrollments per second its CPU time per enrollment adds up to.
//!
//! With `IMPRINT_TEST_STORE=postgres` (and the test database's environment, see the README),
//! the CA keeps its records in PostgreSQL; the bench then also reports the CPU time of the
//! database's processes per enrollment, and the bytes per device the store takes on disk.
// A benchmark aborts on failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use common::{Device, Line, TestCa};
use protocol_spec::KeyAlgorithm;
use protocol_spec::messages::ResponseForm;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let devices: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(64);
    let keep_alive = args.get(2).is_some_and(|a| a == "keep-alive");
    let ca_alg = args
        .get(3)
        .map(|a| KeyAlgorithm::from_name(a).expect("CA-ALG: ed25519 or p256"))
        .unwrap_or(KeyAlgorithm::Ed25519);
    eprintln!("CA key algorithm {ca_alg}");
    let ca = TestCa::new(ca_alg);
    let line = Line::new("bench", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, devices, None);
    eprintln!("preparing {devices} device requests ...");
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        (1..=devices)
            .map(|s| Device::new(s, KeyAlgorithm::Ed25519).request(&line, ResponseForm::Compact))
            .collect(),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args([
            "serve",
            "--https",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--dir",
        ])
        .arg(ca.root())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    let addr = ca_server::server::parse_listening_line(&first).unwrap()["https"];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = ca.client(addr);
    let next = Arc::new(AtomicUsize::new(0));
    let ca_cpu_before = cpu_seconds(child.id());
    let db_cpu_before = ca.on_postgres().then(database_cpu_seconds);
    let own_cpu_before = cpu_seconds(std::process::id());
    let start = Instant::now();
    let (failures, latencies): (usize, Vec<f64>) = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let (client, next, requests) = (client.clone(), next.clone(), requests.clone());
            tasks.push(tokio::spawn(async move {
                let mut failed = 0;
                if keep_alive {
                    let mut latencies = Vec::new();
                    let mut session = client.session().await.unwrap();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(body) = requests.get(i) else {
                            return (failed, latencies);
                        };
                        let t = Instant::now();
                        let a = session
                            .request(
                                "POST",
                                "/enroll",
                                Some("application/cbor"),
                                "application/cbor",
                                body.clone(),
                            )
                            .await;
                        latencies.push(t.elapsed().as_secs_f64() * 1e3);
                        if !a.is_ok_and(|a| a.status == 200) {
                            failed += 1;
                        }
                    }
                }
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = requests.get(i) else {
                        return (failed, Vec::new());
                    };
                    let src = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
                        127,
                        2,
                        (i / 250 % 250) as u8 + 1,
                        (i % 250) as u8 + 1,
                    ));
                    if client.with_source(src).enroll(body.clone()).await.is_err() {
                        failed += 1;
                    }
                }
            }));
        }
        let mut f = 0;
        let mut all = Vec::new();
        for t in tasks {
            let (failed, lat) = t.await.unwrap();
            f += failed;
            all.extend(lat);
        }
        all.sort_by(|a, b| a.total_cmp(b));
        (f, all)
    });
    let secs = start.elapsed().as_secs_f64();
    let ca_cpu = cpu_seconds(child.id()) - ca_cpu_before;
    let db_cpu = db_cpu_before.map(|b| database_cpu_seconds() - b);
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let _ = child.kill();
    let _ = child.wait();
    let bytes = ca.store().size_on_disk().unwrap_or(0);
    // A rate over failed enrollments is no rate: refuse before printing one.
    assert_eq!(failures, 0, "{failures} of {devices} enrollments failed");
    if !latencies.is_empty() {
        println!(
            "keep-alive latency: p50 {:.1} ms, p99 {:.1} ms",
            latencies[latencies.len() / 2],
            latencies[latencies.len() * 99 / 100]
        );
    }
    println!(
        "https enroll{}: {devices} devices, concurrency {concurrency}: {:.2} s, {:.0} enrollments/s, {failures} failures",
        if keep_alive {
            " (kept-alive connections)"
        } else {
            ""
        },
        secs,
        devices as f64 / secs
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = |cpu: f64| cpu / devices as f64 * 1e6;
    println!(
        "CPU per enrollment: CA {:.0} us, load generator {:.0} us; the CA alone on {cores} cores: {:.0} enrollments/s",
        per(ca_cpu),
        per(own_cpu),
        cores as f64 * devices as f64 / ca_cpu
    );
    if let Some(db) = db_cpu {
        println!(
            "PostgreSQL processes: {:.0} us of CPU per enrollment; CA + database alone on {cores} cores: {:.0} enrollments/s",
            per(db),
            cores as f64 * devices as f64 / (ca_cpu + db)
        );
    }
    println!(
        "store: {bytes} bytes on disk, {:.0} bytes per device ({})",
        bytes as f64 / devices as f64,
        if ca.on_postgres() {
            "PostgreSQL: pg_total_relation_size over the schema's tables"
        } else {
            "sled"
        }
    );
}

/// CPU seconds of the test database's processes (the postmaster and every backend and
/// helper it started), from its data folder's postmaster.pid.
fn database_cpu_seconds() -> f64 {
    let dir = std::env::var("IMPRINT_TEST_PG_DIR").expect("IMPRINT_TEST_PG_DIR");
    let pid_file = std::fs::read_to_string(format!("{dir}/data/postmaster.pid")).unwrap();
    let postmaster: u32 = pid_file.lines().next().unwrap().trim().parse().unwrap();
    let mut total = cpu_seconds(postmaster);
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            total += stat_cpu_seconds(&stat);
        }
    }
    total
}

/// User + system CPU time of process `pid`, all its threads, in seconds (`/proc/PID/stat`
/// fields 14 and 15, in clock ticks of 1/100 s on Linux).
fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu_seconds(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap())
}

/// User + system CPU seconds from the text of a `/proc/PID/stat`.
fn stat_cpu_seconds(stat: &str) -> f64 {
    // The command name (field 2) may hold spaces; the fields after it are plain numbers.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}
