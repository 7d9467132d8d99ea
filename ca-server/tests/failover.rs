//! A PostgreSQL primary with a synchronous standby (streaming replication, set up by
//! `test-postgres.sh standby`), and CA nodes on a multi-host URL that asks for the read-write
//! server. The primary is killed with SIGKILL mid-run and the standby promoted: the nodes
//! reconnect by themselves, and every certificate and secret a device holds is on record in
//! the promoted database, once. And a commit whose wait for the standby is cancelled (which
//! PostgreSQL reports as success, with a warning) is not reported as done before the standby
//! has it.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ca_server::config::StoreSettings;
use common::{Cluster, Line, TestCa, own_cluster, psql, script, standby};
use device_agent::AgentError;
use device_agent::https::HttpsClient;
use device_agent::state::DeviceState;
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::profile::CertProfile;
use protocol_spec::{DeviceSerial, KeyAlgorithm, ProblemType};

const DEVICES: u64 = 240;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `settings` on both servers: primary first, then the standby, the read-write one chosen.
fn multi_host(settings: &StoreSettings, standby_port: u16) -> StoreSettings {
    let url = settings.url.clone().unwrap();
    // postgresql://imprint@127.0.0.1:P1/imprint?sslmode=require
    let (head, tail) = url.split_once("/imprint?").unwrap();
    StoreSettings {
        url: Some(format!(
            "{head},127.0.0.1:{standby_port}/imprint?{tail}&target_session_attrs=read-write"
        )),
        ..settings.clone()
    }
}

/// The CA's store settings with the single-server `url` moved to `port`.
fn only(ca: &TestCa, url: &str, port: u16) -> StoreSettings {
    let (head, tail) = url.split_once("/imprint?").unwrap();
    let (user_host, _) = head.rsplit_once(':').unwrap();
    StoreSettings {
        url: Some(format!("{user_host}:{port}/imprint?{tail}")),
        ..ca.dir.load_config().unwrap().store
    }
}

fn port_of(cluster: &Path) -> u16 {
    let options = std::fs::read_to_string(cluster.join("options")).unwrap();
    options.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What a device holds after its run: its certificate and its secret's key id and KCV.
type Held = (Vec<u8>, String, Vec<u8>);

/// Enrolls one device through `enroll` and fetches its secret through `mtls`, retrying the same
/// request on `unavailable` or a lost connection until `deadline`.
async fn one_device(
    ca: &TestCa,
    line: &Line,
    serial: u64,
    enroll: &HttpsClient,
    mtls: std::net::SocketAddr,
    deadline: Instant,
    unavailable: &AtomicU64,
) -> Held {
    let rng = ring::rand::SystemRandom::new();
    let mut dev = DeviceState::generate(
        DeviceSerial::new(serial).unwrap(),
        KeyAlgorithm::Ed25519,
        &rng,
    )
    .unwrap();
    let token = line.token(serial, &dev.key.spki_der());
    let request = device_agent::enroll::build_request(&dev, &token, ResponseForm::Full, &rng)
        .unwrap()
        .to_cbor();
    let retry = |what: &str, e: AgentError| {
        match &e {
            AgentError::Refused(p) if p.kind == ProblemType::Unavailable => {
                unavailable.fetch_add(1, Ordering::Relaxed);
            }
            AgentError::Refused(p) => panic!("serial {serial} {what}: {p}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "serial {serial} {what}: no answer before the deadline: {e}"
        );
    };
    let response = loop {
        match enroll.enroll(request.clone()).await {
            Ok(r) => break r,
            Err(e) => retry("enroll", e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let EnrollResponse::Full { certificate } = &response else {
        panic!("serial {serial}: {response:?}");
    };
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    dev.certificate =
        Some(device_agent::enroll::accept_response(&dev, &profile, &response).unwrap());
    dev.ca_certificate = Some(ca.ca_der.clone());
    let url = device_agent::url::CaUrl::parse(&format!("https://{mtls}")).unwrap();
    let client = device_agent::secrets::mtls_client(url, &dev).unwrap();
    let secret = loop {
        match device_agent::secrets::fetch(&client).await {
            Ok(s) => break s,
            Err(e) => retry("secret", e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    (
        certificate.clone(),
        secret.key_id.clone(),
        secret.kcv.clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_run_loses_nothing_once_the_standby_is_promoted() {
    let started = Instant::now();
    let (primary_dir, settings) = own_cluster();
    let _primary = Cluster(primary_dir.clone());
    let (standby_dir, standby_port) = standby(&primary_dir);
    let _standby = Cluster(standby_dir.clone());
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, multi_host(&settings, standby_port));
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100_000, None);
    let mut nodes = Vec::new();
    let mut doors = Vec::new();
    for name in ["node-a", "node-b"] {
        let (child, addrs) = common::serve_process_addrs(
            &ca,
            &["--no-admin", "--mtls", "127.0.0.1:0", "--node-id", name],
        );
        nodes.push(Node(child));
        doors.push((ca.client(addrs["https"]), addrs["mtls"]));
    }
    let ca = Arc::new(ca);
    let line = Arc::new(line);
    let doors = Arc::new(doors);
    let held: Arc<Mutex<HashMap<u64, Held>>> = Arc::default();
    let unavailable = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(1));
    let deadline = Instant::now() + Duration::from_secs(100);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (ca, line, doors, held, unavailable, next) = (
            ca.clone(),
            line.clone(),
            doors.clone(),
            held.clone(),
            unavailable.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let serial = next.fetch_add(1, Ordering::Relaxed);
                if serial > DEVICES {
                    return;
                }
                // Enrolled through one node, its secret fetched from the other.
                let (enroll, _) = &doors[(serial % 2) as usize];
                let (_, mtls) = &doors[((serial + 1) % 2) as usize];
                let h = one_device(&ca, &line, serial, enroll, *mtls, deadline, &unavailable).await;
                held.lock().unwrap().insert(serial, h);
            }
        }));
    }
    // The primary dies once a third of the devices hold their secret; the standby is promoted
    // a second later, as an operator or a failover manager would.
    while (held.lock().unwrap().len() as u64) < DEVICES / 3 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let d = primary_dir.clone();
    tokio::task::spawn_blocking(move || script("kill", &d))
        .await
        .unwrap();
    let killed = Instant::now();
    let at_kill = held.lock().unwrap().len() as u64;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let d = standby_dir.clone();
    tokio::task::spawn_blocking(move || script("promote", &d))
        .await
        .unwrap();
    // The first device to finish after the promotion marks the end of the outage.
    while held.lock().unwrap().len() as u64 <= at_kill + 8 {
        assert!(
            Instant::now() < deadline,
            "no device finished after the promotion"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "service back {:.1} s after the primary was killed ({at_kill} devices done then)",
        killed.elapsed().as_secs_f64()
    );
    for t in tasks {
        t.await.unwrap();
    }
    drop(nodes);
    assert!(at_kill < DEVICES, "the kill came mid-run");

    // Everything any device holds is on record in the promoted database, once.
    let held = held.lock().unwrap().clone();
    assert_eq!(held.len() as u64, DEVICES);
    let promoted = ca_server::store::open(
        &ca.dir,
        &only(&ca, settings.url.as_deref().unwrap(), standby_port),
    )
    .unwrap();
    for (serial, (cert, key_id, kcv)) in &held {
        let rec = promoted
            .device(*serial)
            .unwrap()
            .unwrap_or_else(|| panic!("serial {serial} holds a certificate the database lost"));
        assert_eq!(&rec.certificate, cert, "serial {serial}");
        let versions = promoted.secret_versions(*serial).unwrap();
        assert!(
            versions
                .iter()
                .any(|v| &v.key_id == key_id && v.kcv.as_slice() == kcv.as_slice()),
            "serial {serial} holds secret {key_id} that the database lost"
        );
    }
    assert_eq!(promoted.devices().count() as u64, DEVICES);
    let mut key_ids: Vec<String> = promoted.secrets().map(|s| s.unwrap().key_id).collect();
    let all = key_ids.len();
    key_ids.sort();
    key_ids.dedup();
    assert_eq!(key_ids.len(), all, "a secret key id on record twice");
    assert_eq!(promoted.line("line-1").unwrap().unwrap().enrolled, DEVICES);
    drop(promoted);
    let out = Command::new(env!("CARGO_BIN_EXE_ca-server"))
        .args(["audit", "verify", "--dir", ca.root().to_str().unwrap()])
        .env_remove("IMPRINT_STORE_PASSWORD")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "{} unavailable answers retried; the test took {:.1} s",
        unavailable.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

/// Waits until a backend of the CA waits for the synchronous standby; returns how many do.
fn wait_for_sync_rep(cluster: &Path, port: u16) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: u64 = psql(
            cluster,
            port,
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'imprint-ca' AND wait_event = 'SyncRep'",
        )
        .parse()
        .unwrap();
        if n > 0 {
            return n;
        }
        assert!(Instant::now() < deadline, "no commit waits for the standby");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_the_standby_never_confirmed_is_not_reported_as_done() {
    let (primary_dir, settings) = own_cluster();
    let _primary = Cluster(primary_dir.clone());
    let primary_port = port_of(&primary_dir);
    let (standby_dir, standby_port) = standby(&primary_dir);
    let _standby = Cluster(standby_dir.clone());
    let ca = TestCa::with_store(KeyAlgorithm::Ed25519, settings.clone());
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 1000, None);
    let server = ca.start().await;
    let client = Arc::new(ca.client(server.https.unwrap()));
    let device = common::Device::new(7, KeyAlgorithm::Ed25519);
    let request = device.request(&line, ResponseForm::Full);

    // The standby stops: every commit on the primary now waits for it.
    let d = standby_dir.clone();
    tokio::task::spawn_blocking(move || script("pause", &d))
        .await
        .unwrap();
    let c = client.clone();
    let r = request.clone();
    let first = tokio::spawn(async move { c.enroll(r).await });
    // An operator (or a statement timeout) cancels the waits: PostgreSQL then answers the
    // commit with success and a warning that it may not be on the standby.
    let d = primary_dir.clone();
    tokio::task::spawn_blocking(move || {
        wait_for_sync_rep(&d, primary_port);
        psql(
            &d,
            primary_port,
            "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity WHERE application_name = 'imprint-ca' AND wait_event = 'SyncRep'",
        )
    })
    .await
    .unwrap();
    match first.await.unwrap() {
        Err(AgentError::Refused(p)) if p.kind == ProblemType::Unavailable => {}
        other => panic!("a commit the standby never confirmed was answered: {other:?}"),
    }
    // The row is committed on the primary, and visible there...
    assert_eq!(
        psql(
            &primary_dir,
            primary_port,
            &format!(
                "SELECT count(*) FROM {}.devices WHERE serial = 7",
                ca.dir.load_config().unwrap().store.schema.unwrap()
            )
        ),
        "1"
    );
    // ... but the retry is not answered from it while the standby is still away: the CA first
    // waits for a commit of its own to be confirmed.
    let c = client.clone();
    let r = request.clone();
    let retry = tokio::spawn(async move { c.enroll(r).await });
    let d = primary_dir.clone();
    tokio::task::spawn_blocking(move || wait_for_sync_rep(&d, primary_port))
        .await
        .unwrap();
    // Slept on a blocking thread, not with tokio's timer: before the store's slow calls gave
    // their worker back (store_outage::a_database_that_stops_answering_stalls_no_door), the
    // CA's waiting store reads held both of this runtime's workers and the timer with them. The
    // sleep stays off the runtime so that this test does not depend on that.
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(500)))
        .await
        .unwrap();
    if retry.is_finished() {
        panic!(
            "the retry was answered before the standby confirmed: {:?}",
            retry.await
        );
    }
    let d = standby_dir.clone();
    tokio::task::spawn_blocking(move || script("resume", &d))
        .await
        .unwrap();
    let cert = match retry.await.unwrap() {
        Ok(EnrollResponse::Full { certificate }) => certificate,
        other => panic!("the retry after the standby came back: {other:?}"),
    };
    // The answer is on the standby, byte for byte.
    let schema = ca.dir.load_config().unwrap().store.schema.unwrap();
    let on_standby = psql(
        &standby_dir,
        standby_port,
        &format!("SELECT encode(certificate, 'hex') FROM {schema}.devices WHERE serial = 7"),
    );
    assert_eq!(on_standby, hex::encode(&cert));
    server.stop().await;
}
