//! Virtual devices: small state machines from the device-agent library, stepped by a bounded
//! number of tasks (not a task per device) over real sockets.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use device_agent::AgentError;
use device_agent::coap::{CoapClient, CoapSocket};
use device_agent::enroll::{accept_response, build_request};
use device_agent::https::HttpsClient;
use device_agent::line_station::attest;
use device_agent::state::DeviceState;
use hdrhistogram::Histogram;
use protocol_spec::KeyAlgorithm;
use protocol_spec::messages::ResponseForm;
use protocol_spec::profile::CertProfile;
use ring::rand::SystemRandom;

use crate::line::Lines;
use crate::verify::{Evidence, digest16};

/// Phases of one device's life, in order.
pub const PHASES: [&str; 6] = ["keygen", "token", "enroll", "verify", "secret", "ack"];

/// Shared counters the live view and the report read.
#[derive(Debug, Default)]
pub struct Progress {
    /// Devices through every phase.
    pub done: AtomicU64,
    /// Devices that failed.
    pub failed: AtomicU64,
    /// Devices taken by a worker.
    pub started: AtomicU64,
}

/// What the workers measured.
pub struct Outcome {
    /// Latency histograms per phase, microseconds.
    pub phases: Vec<Histogram<u64>>,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// SHA-256 of the certificate each device stored, by device index (zeros: none).
    pub received: Vec<[u8; 32]>,
    /// What each device saw, by device index, when [`Fleet::device_checks`] is on (else empty).
    pub evidence: Vec<Evidence>,
    /// Workers that stopped before the devices ran out: no socket, or a panic. Their devices
    /// count as failed (`not-run`), never as done.
    pub worker_faults: Vec<String>,
}

/// The failure kind of a device no worker finished: never taken (every worker had stopped), or
/// taken by a worker that panicked while stepping it.
pub const NOT_RUN: &str = "not-run";

/// How devices reach the CA for enrollment: one client per CA node, devices spread over the
/// nodes round robin (device index modulo the number of nodes).
pub enum Enrollment {
    /// HTTPS, a new TLS connection per device.
    Https(Vec<HttpsClient>),
    /// CoAP over UDP.
    Coap(Vec<CoapClient>),
}

impl Enrollment {
    /// CA nodes the devices are spread over.
    pub fn nodes(&self) -> usize {
        match self {
            Enrollment::Https(c) => c.len(),
            Enrollment::Coap(c) => c.len(),
        }
    }
}

/// What every worker needs.
pub struct Fleet {
    /// Devices to run.
    pub devices: u64,
    /// Device key algorithm.
    pub algorithm: KeyAlgorithm,
    /// Tasks stepping devices.
    pub concurrency: usize,
    /// The CA node(s), over HTTPS or CoAP.
    pub enrollment: Enrollment,
    /// The pinned CA.
    pub profile: CertProfile,
    /// The CA certificate, DER.
    pub ca_der: Vec<u8>,
    /// The mutual-TLS door(s), round robin like enrollment; empty: devices skip the secret
    /// phases.
    pub secrets: Vec<device_agent::url::CaUrl>,
    /// The line stations whose serials the devices take, in order.
    pub lines: Lines,
    /// Whether devices connect from their own loopback addresses (127.0.0.0/8, see
    /// [`source_ip`]); only for a CA on loopback.
    pub spread_sources: bool,
    /// Whether devices keep [`Evidence`] for the device-side verification pass (a CA whose
    /// store the simulator cannot read): each device also lints its certificate.
    pub device_checks: bool,
}

impl Fleet {
    /// The source address of device `index`, when sources are spread.
    fn source(&self, index: u64) -> Option<IpAddr> {
        self.spread_sources.then(|| source_ip(index + 1))
    }
}

/// A loopback source address for device `serial`, spread over 127.0.0.0/8.
pub fn source_ip(serial: u64) -> IpAddr {
    let i = serial % (250 * 250 * 250);
    let (a, b, c) = (i / 62_500, (i / 250) % 250, i % 250);
    IpAddr::V4(Ipv4Addr::new(127, 1 + a as u8, 1 + b as u8, 1 + c as u8))
}

fn error_kind(e: &AgentError) -> String {
    match e {
        AgentError::Refused(p) => p.kind.name().to_string(),
        AgentError::Transport(_) => "transport".into(),
        AgentError::Verify(_) => "verify".into(),
        _ => "other".into(),
    }
}

/// Runs every device through its phases.
pub async fn run(fleet: Arc<Fleet>, progress: Arc<Progress>) -> Outcome {
    let received = Arc::new(Mutex::new(vec![[0u8; 32]; fleet.devices as usize]));
    let evidence = Arc::new(Mutex::new(if fleet.device_checks {
        vec![Evidence::default(); fleet.devices as usize]
    } else {
        Vec::new()
    }));
    // One set of histograms for all workers (a few hundred kB each; per-worker copies would
    // cost hundreds of MB at high concurrency).
    let hist = Arc::new(Mutex::new(
        PHASES.iter().map(|_| histogram()).collect::<Vec<_>>(),
    ));
    let mut tasks = Vec::new();
    for _ in 0..fleet.concurrency.max(1) {
        let (fleet, progress, received, evidence, hist) = (
            fleet.clone(),
            progress.clone(),
            received.clone(),
            evidence.clone(),
            hist.clone(),
        );
        tasks.push(tokio::spawn(async move {
            worker(&fleet, &progress, &received, &evidence, &hist).await
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await);
    }
    let (errors, worker_faults) = tally(results, fleet.devices, &progress);
    let phases = std::mem::take(&mut *hist.lock().unwrap_or_else(|p| p.into_inner()));
    let received = std::mem::take(&mut *received.lock().unwrap_or_else(|p| p.into_inner()));
    let evidence = std::mem::take(&mut *evidence.lock().unwrap_or_else(|p| p.into_inner()));
    Outcome {
        phases,
        errors,
        received,
        evidence,
        worker_faults,
    }
}

/// What one worker reports: its devices' failures by kind, or why it stopped early.
type WorkerReport = (BTreeMap<String, u64>, Option<String>);

/// Adds up the workers' reports. Every device of `devices` ends up counted once in
/// `progress`: done, failed, or (when no worker finished it) failed as [`NOT_RUN`].
fn tally(
    results: Vec<Result<WorkerReport, tokio::task::JoinError>>,
    devices: u64,
    progress: &Progress,
) -> (BTreeMap<String, u64>, Vec<String>) {
    let mut errors = BTreeMap::new();
    let mut faults = Vec::new();
    for (n, r) in results.into_iter().enumerate() {
        match r {
            Ok((e, fault)) => {
                for (k, v) in e {
                    *errors.entry(k).or_insert(0) += v;
                }
                faults.extend(fault.map(|f| format!("worker {n}: {f}")));
            }
            Err(e) if e.is_panic() => faults.push(format!("worker {n} panicked")),
            Err(e) => faults.push(format!("worker {n} did not finish: {e}")),
        }
    }
    let done = progress.done.load(Ordering::Relaxed);
    let failed = progress.failed.load(Ordering::Relaxed);
    let lost = devices.saturating_sub(done.saturating_add(failed));
    if lost > 0 {
        *errors.entry(NOT_RUN.to_string()).or_insert(0) += lost;
        progress.failed.fetch_add(lost, Ordering::Relaxed);
    }
    (errors, faults)
}

fn histogram() -> Histogram<u64> {
    // 1 us to 10 min, 3 significant figures: constant, valid bounds, so this cannot fail.
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("constant histogram bounds are valid")
}

async fn worker(
    fleet: &Fleet,
    progress: &Progress,
    received: &Mutex<Vec<[u8; 32]>>,
    evidence: &Mutex<Vec<Evidence>>,
    hist: &Mutex<Vec<Histogram<u64>>>,
) -> WorkerReport {
    let rng = SystemRandom::new();
    let mut errors = BTreeMap::new();
    // Over CoAP each worker keeps one socket per CA node (from its own loopback address) for
    // the devices it steps, as a line gateway would; Message IDs keep their exchanges apart.
    let mut socks = Vec::new();
    if let Enrollment::Coap(nodes) = &fleet.enrollment {
        let first = progress.started.load(Ordering::Relaxed);
        for coap in nodes {
            let coap = match fleet.source(first) {
                Some(ip) => coap.clone().with_source(ip),
                None => coap.clone(),
            };
            match coap.socket().await {
                Ok(s) => socks.push(s),
                // The devices this worker would have stepped go to the others, or count as
                // not run when every worker stopped.
                Err(e) => return (errors, Some(format!("no CoAP socket: {e}"))),
            }
        }
    }
    loop {
        let i = progress.started.fetch_add(1, Ordering::Relaxed);
        if i >= fleet.devices {
            break;
        }
        let mut times = [0u64; PHASES.len()];
        let result = device(fleet, i, &rng, &mut times, &mut socks).await;
        if let Ok(mut h) = hist.lock() {
            for (h, t) in h.iter_mut().zip(times) {
                if t > 0 {
                    let _ = h.record(t);
                }
            }
        }
        match result {
            Ok((cert_hash, seen)) => {
                if let Ok(mut r) = received.lock() {
                    r[i as usize] = cert_hash;
                }
                if let Some(seen) = seen
                    && let Ok(mut r) = evidence.lock()
                    && let Some(slot) = r.get_mut(i as usize)
                {
                    *slot = seen;
                }
                progress.done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                *errors.entry(error_kind(&e)).or_insert(0) += 1;
                progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    (errors, None)
}

fn record(slot: &mut u64, since: Instant) -> Instant {
    let now = Instant::now();
    *slot = (now - since).as_micros().max(1) as u64;
    now
}

/// One device through its phases: the SHA-256 of the certificate it stored and, with
/// [`Fleet::device_checks`], what it saw.
async fn device(
    fleet: &Fleet,
    index: u64,
    rng: &SystemRandom,
    times: &mut [u64; PHASES.len()],
    socks: &mut [CoapSocket],
) -> Result<([u8; 32], Option<Evidence>), AgentError> {
    let t0 = Instant::now();
    let (line, sn) = fleet
        .lines
        .for_device(index)
        .ok_or_else(|| AgentError::Invalid(format!("device {index}: no line station covers it")))?;
    let mut state = DeviceState::generate(sn, fleet.algorithm, rng)?;
    let t1 = record(&mut times[0], t0);
    let token = attest(
        &line.key,
        &line.id,
        sn,
        &state.key.spki_der(),
        // Minted at attestation time, as a line station does: a run longer than a token's
        // lifetime must not hand out tokens dated from its start.
        unix_now(),
        600,
        rng,
    )?;
    let request = build_request(&state, &token, ResponseForm::Compact, rng)?.to_cbor();
    let t2 = record(&mut times[1], t1);
    let backoff = device_agent::retry::Backoff::default();
    let node = (index % fleet.enrollment.nodes().max(1) as u64) as usize;
    let response = match (&fleet.enrollment, socks.get_mut(node)) {
        (Enrollment::Coap(nodes), Some(sock)) => {
            let coap = nodes
                .get(node)
                .ok_or_else(|| AgentError::Invalid(format!("no CoAP client for CA node {node}")))?;
            let mut attempt = 0;
            loop {
                attempt += 1;
                match coap.enroll(sock, request.clone()).await {
                    Ok(r) => break r,
                    Err(e) if e.is_transient() => match backoff.delay(attempt, 0.5) {
                        Some(d) => tokio::time::sleep(d).await,
                        None => return Err(e),
                    },
                    Err(e) => return Err(e),
                }
            }
        }
        (Enrollment::Https(nodes), _) => {
            let client = nodes.get(node).ok_or_else(|| {
                AgentError::Invalid(format!("no HTTPS client for CA node {node}"))
            })?;
            let client = match fleet.source(index) {
                Some(ip) => client.with_source(ip),
                None => client.clone(),
            };
            device_agent::retry::run(backoff, |_| client.enroll(request.clone())).await?
        }
        (Enrollment::Coap(_), None) => {
            return Err(AgentError::Invalid(format!(
                "no CoAP socket for CA node {node}"
            )));
        }
    };
    let t3 = record(&mut times[2], t2);
    let cert = accept_response(&state, &fleet.profile, &response)?;
    let t4 = record(&mut times[3], t3);
    let digest = ring::digest::digest(&ring::digest::SHA256, &cert);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    state.certificate = Some(cert);
    state.ca_certificate = Some(fleet.ca_der.clone());
    // (SHA-256(secret), SHA-256(key id), version) of the acknowledged secret, cut to 128 bits.
    let mut acked = None;
    let door = (index % fleet.secrets.len().max(1) as u64) as usize;
    if let Some(url) = fleet.secrets.get(door) {
        // One mutual-TLS connection: fetch, check the KCV, store, acknowledge.
        let client = device_agent::secrets::mtls_client(url.clone(), &state)?;
        let client = match fleet.source(index) {
            Some(ip) => client.with_source(ip),
            None => client,
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let phase = async {
                let mut session = client.session().await?;
                let d = device_agent::secrets::fetch_on(&mut session).await?;
                let t5 = record(&mut times[4], t4);
                let ack = protocol_spec::messages::SecretAck {
                    key_id: d.key_id.clone(),
                    version: d.version,
                    // fetch_on checked it is the KCV of the secret.
                    kcv: d.kcv.clone(),
                };
                device_agent::secrets::ack_on(&mut session, &ack).await?;
                record(&mut times[5], t5);
                Ok::<_, AgentError>((
                    digest16(d.secret.as_slice()),
                    digest16(d.key_id.as_bytes()),
                    d.version,
                ))
            };
            match phase.await {
                Ok(seen) => {
                    acked = Some(seen);
                    break;
                }
                // The CA may have been killed mid-exchange: fetch again (same version) and ack.
                Err(e) if e.is_transient() => match backoff.delay(attempt, 0.5) {
                    Some(d) => tokio::time::sleep(d).await,
                    None => return Err(e),
                },
                Err(e) => return Err(e),
            }
        }
    }
    let seen = fleet.device_checks.then(|| {
        // After the timed phases: the profile lint re-parses the certificate and checks every
        // field and the CA's signature, as the store pass does for an embedded CA.
        let spki = state.key.spki_der();
        let cert = state.certificate.as_deref().unwrap_or_default();
        let (secret, key_id, acked_version) = acked.unwrap_or_default();
        Evidence {
            serial: sn.get(),
            certificate_serial: crate::verify::certificate_serial(cert).unwrap_or(0),
            certificate_valid: fleet.profile.lint(cert, sn, &spki).is_ok(),
            key: digest16(&spki),
            secret,
            key_id,
            acked_version,
        }
    });
    Ok((out, seen))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::line::LineStation;
    use device_agent::url::CaUrl;
    use protocol_spec::KeyPair;
    use protocol_spec::profile::new_ca_certificate;

    /// A fleet of `devices` over CoAP whose workers send from `source`.
    fn fleet(devices: u64, concurrency: usize, source: IpAddr) -> Fleet {
        let rng = SystemRandom::new();
        let ca_key = KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap();
        let ca_der = new_ca_certificate("t", &ca_key, 0, &rng).unwrap();
        let url = CaUrl::parse("coap://127.0.0.1:9").unwrap();
        Fleet {
            devices,
            algorithm: KeyAlgorithm::Ed25519,
            concurrency,
            enrollment: Enrollment::Coap(vec![CoapClient::new(url).with_source(source)]),
            profile: CertProfile::from_ca_der(&ca_der).unwrap(),
            ca_der,
            secrets: vec![],
            lines: Lines::new(vec![LineStation {
                id: "line-1".into(),
                key: KeyPair::generate(KeyAlgorithm::Ed25519, &rng).unwrap(),
                first: 1,
                last: devices,
            }]),
            spread_sources: false,
            device_checks: false,
        }
    }

    #[tokio::test]
    async fn devices_of_workers_without_a_socket_count_as_failed() {
        // 192.0.2.1 (TEST-NET-1) is no address of this machine: binding to it fails, so every
        // worker stops before its first device.
        let fleet = Arc::new(fleet(40, 4, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))));
        let progress = Arc::new(Progress::default());
        let outcome = run(fleet, progress.clone()).await;
        assert_eq!(progress.done.load(Ordering::Relaxed), 0);
        assert_eq!(progress.failed.load(Ordering::Relaxed), 40);
        assert_eq!(
            outcome.errors.get(NOT_RUN),
            Some(&40),
            "{:?}",
            outcome.errors
        );
        assert_eq!(
            outcome.worker_faults.len(),
            4,
            "{:?}",
            outcome.worker_faults
        );
        assert!(
            outcome
                .worker_faults
                .iter()
                .all(|f| f.contains("no CoAP socket")),
            "{:?}",
            outcome.worker_faults
        );
    }

    #[tokio::test]
    async fn a_panicked_worker_is_a_fault_and_its_device_a_failure() {
        let progress = Progress::default();
        // Of 5 devices, 3 done, 1 failed, and the one a worker was stepping when it panicked.
        progress.done.store(3, Ordering::Relaxed);
        progress.failed.store(1, Ordering::Relaxed);
        let fine =
            tokio::spawn(async { (BTreeMap::from([("transport".to_string(), 1u64)]), None) });
        let panicked = tokio::spawn(async {
            if progress_is_poisoned() {
                panic!("a worker's bug");
            }
            (BTreeMap::new(), None)
        });
        let results = vec![fine.await, panicked.await];
        let (errors, faults) = tally(results, 5, &progress);
        assert_eq!(faults, vec!["worker 1 panicked".to_string()]);
        assert_eq!(errors.get("transport"), Some(&1));
        assert_eq!(errors.get(NOT_RUN), Some(&1));
        assert_eq!(progress.failed.load(Ordering::Relaxed), 2);
    }

    /// Always true: keeps the panic in the task above from making its tail unreachable.
    fn progress_is_poisoned() -> bool {
        std::hint::black_box(true)
    }
}
