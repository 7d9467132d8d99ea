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
}

/// How devices reach the CA for enrollment: one client per CA node, devices spread over the
/// nodes round robin (device index modulo the number of nodes).
pub enum Enrollment {
    /// HTTPS, a new TLS connection per device.
    Https(Vec<HttpsClient>),
    /// CoAP over UDP.
    Coap(Vec<CoapClient>),
}

impl Enrollment {
    fn nodes(&self) -> usize {
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
    let mut errors = BTreeMap::new();
    for t in tasks {
        if let Ok(e) = t.await {
            for (k, v) in e {
                *errors.entry(k).or_insert(0) += v;
            }
        }
    }
    let phases = std::mem::take(&mut *hist.lock().unwrap_or_else(|p| p.into_inner()));
    let received = std::mem::take(&mut *received.lock().unwrap_or_else(|p| p.into_inner()));
    let evidence = std::mem::take(&mut *evidence.lock().unwrap_or_else(|p| p.into_inner()));
    Outcome {
        phases,
        errors,
        received,
        evidence,
    }
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
) -> BTreeMap<String, u64> {
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
                Err(e) => {
                    *errors.entry(error_kind(&e)).or_insert(0) += 1;
                    return errors;
                }
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
    errors
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
                    kcv: protocol_spec::secret::kcv(&d.secret),
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
