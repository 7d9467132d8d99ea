//! Targets on ca-server: datagrams through the CoAP endpoint, the admin request bodies.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ca_server::doors::coap::{CoapConfig, Endpoint, JobId, MAX_RESPONSE_DATAGRAM, Transmit};
use ca_server::dukpt::{AddBdk, DeriveRequest};
use ca_server::limits::SourceRate;
use ca_server::ops::{AddLine, MAX_LINE_RATE, RotateRequest, SetRate};
use ca_server::records::SecretSource;
use protocol_spec::coap::AMPLIFICATION_FACTOR;
use protocol_spec::dukpt::{KeyType, KeyUsage, Ksn};
use protocol_spec::{Problem, ProblemType};

/// A sequence of datagrams through one CoAP [`Endpoint`] with small caps, on a virtual clock.
/// The input is frames of: one control byte (bits 0-1: which of four sources, two addresses
/// with two ports each; bits 2-3: what becomes of an enrollment job: answered at once with a
/// certificate-sized answer, answered with a problem, answered at the next frame, or abandoned
/// as if the workers were busy; bits 4-7: seconds the clock moves, times 8), a two-byte
/// big-endian length, and the datagram. Checked on every datagram sent: at most three times
/// the datagram that caused it, and at most 1152 bytes; on the state: within its caps, and
/// empty once every lifetime has passed.
pub fn coap_datagram(data: &[u8]) {
    let config = CoapConfig {
        max_remembered: 8,
        max_remembered_per_source: 5,
        max_assemblies: 3,
        max_assemblies_per_source: 2,
        max_representations: 3,
        max_representations_per_source: 2,
        ..CoapConfig::default()
    };
    let rate = Arc::new(SourceRate::new(1000, 20, 4));
    let ca = vec![0x30; 700];
    let mut e = Endpoint::new(config.clone(), ca, rate, Arc::default(), 0xfff0);
    let start = Instant::now();
    let mut now = start;
    let sources: [SocketAddr; 4] = [
        ([192, 0, 2, 1], 5683).into(),
        ([192, 0, 2, 1], 40000).into(),
        ([192, 0, 2, 2], 5683).into(),
        ("[2001:db8::1]:5683")
            .parse()
            .unwrap_or(([192, 0, 2, 3], 1).into()),
    ];
    // The size of the datagram behind each job out, for the 3x check of its answer.
    let mut asked: HashMap<JobId, usize> = HashMap::new();
    let mut later: Vec<JobId> = Vec::new();
    let mut rest = data;
    while let [control, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (datagram, next) = tail.split_at(len);
        rest = next;
        now += Duration::from_secs(u64::from(control >> 4) * 8);
        if e.poll_timeout().is_some_and(|t| t <= now) {
            e.handle_timeout(now);
        }
        for id in later.drain(..) {
            e.complete(now, id, Ok(vec![0xb6; 900]));
            drain(&mut e, asked.remove(&id).unwrap_or(0));
        }
        let peer = sources[usize::from(control & 3)];
        let job = e.handle(now, peer, datagram);
        drain(&mut e, datagram.len());
        if let Some(job) = job {
            assert!(job.body.len() <= protocol_spec::messages::MAX_ENROLL_REQUEST);
            match (control >> 2) & 3 {
                0 => {
                    // As long as a full certificate answer.
                    let answer = Ok(vec![0xb6; 300 + job.body.len() % 700]);
                    e.complete(now, job.id, answer);
                    drain(&mut e, datagram.len());
                }
                1 => {
                    let p = Problem::new(ProblemType::Unavailable, "store away");
                    e.complete(now, job.id, Err(p));
                    drain(&mut e, datagram.len());
                }
                2 => {
                    asked.insert(job.id, datagram.len());
                    later.push(job.id);
                }
                _ => {
                    e.abandon(job.id);
                    drain(&mut e, 0);
                }
            }
        }
        let s = e.stats();
        assert!(s.exchanges_held.load(Ordering::Relaxed) <= config.max_remembered as u64);
        assert!(s.block1_held.load(Ordering::Relaxed) <= config.max_assemblies as u64);
        assert!(s.block2_held.load(Ordering::Relaxed) <= config.max_representations as u64);
    }
    // Everything is forgotten once every lifetime has passed.
    e.handle_timeout(now + config.exchange_lifetime * 2);
    assert_eq!(e.poll_timeout(), None, "state left after every lifetime");
}

/// Checks and sends nothing: each datagram queued is within 3x of `asked` and 1152 bytes.
fn drain(e: &mut Endpoint, asked: usize) {
    while let Some(Transmit { contents, .. }) = e.poll_transmit() {
        assert!(
            contents.len() <= asked * AMPLIFICATION_FACTOR,
            "{} bytes sent for a {asked}-byte datagram",
            contents.len()
        );
        assert!(contents.len() <= MAX_RESPONSE_DATAGRAM);
    }
}

/// An admin request body: the first byte picks which (`POST /lines`, `POST /lines/ID/rate`,
/// `POST /secrets/rotate`, `POST /dukpt/bdks`, `POST /dukpt/derive`), the rest is its JSON.
/// Decoded as the admin door decodes it, then through the checks the door makes before it
/// reaches the store (the lookups that need the store are not made here).
pub fn admin_body(data: &[u8]) {
    let Some((which, json)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            let Ok(body) = serde_json::from_slice::<AddLine>(json) else {
                return;
            };
            if let Ok(range) = ca_server::lines::parse_range(&body.serials) {
                assert!(range.0 >= 1 && range.0 <= range.1);
                let _ = ca_server::lines::new_line(
                    &body.id,
                    &body.public_key,
                    range,
                    body.quota,
                    protocol_spec_now(),
                );
            }
            let _ = body.rate > MAX_LINE_RATE;
            if let Some(s) = &body.secret_source {
                let _ = s.parse::<SecretSource>();
            }
        }
        1 => {
            let _ = serde_json::from_slice::<SetRate>(json);
        }
        2 => {
            let _ = serde_json::from_slice::<RotateRequest>(json);
        }
        3 => {
            let Ok(body) = serde_json::from_slice::<AddBdk>(json) else {
                return;
            };
            let _ = ca_server::dukpt::parse_bdk_id(&body.bdk_id);
            if let Ok(keys) = ca_server::secrets::SecretKeys::new(&[7; 32]) {
                let _ = ca_server::dukpt::key_of(&body, &keys);
            }
        }
        _ => {
            let Ok(body) = serde_json::from_slice::<DeriveRequest>(json) else {
                return;
            };
            let _ = Ksn::from_hex(&body.ksn);
            if let Some(u) = &body.usage {
                let _ = u.parse::<KeyUsage>();
            }
            if let Some(t) = &body.key_type {
                let _ = KeyType::from_name(t);
            }
        }
    }
}

fn protocol_spec_now() -> u64 {
    1_767_225_600
}
