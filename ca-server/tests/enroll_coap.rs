//! CoAP enrollment on real UDP sockets: the agent, a lossy relay, libcoap, malformed datagrams.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Device, Line, TestCa, snapshot};
use device_agent::coap::CoapClient;
use device_agent::enroll::{accept_response, build_request};
use device_agent::state::DeviceState;
use device_agent::url::CaUrl;
use protocol_spec::coap::TransmissionParams;
use protocol_spec::messages::{EnrollResponse, ResponseForm};
use protocol_spec::profile::CertProfile;
use protocol_spec::{DeviceSerial, KeyAlgorithm};
use ring::rand::SystemRandom;
use tokio::net::UdpSocket;

fn coap_url(addr: SocketAddr) -> CaUrl {
    CaUrl::parse(&format!("coap://{addr}")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enrolls_both_key_types_over_coap_compact_full_and_blockwise() {
    let ca = TestCa::new(KeyAlgorithm::P256);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    let rng = SystemRandom::new();
    let mut serial = 0;
    for alg in [KeyAlgorithm::Ed25519, KeyAlgorithm::P256] {
        // Compact (one datagram), full, and full with the request forced into 64-byte Block1
        // pieces (the response then comes back in Block2 pieces: amplification limit).
        for (form, block1) in [
            (ResponseForm::Compact, 1024),
            (ResponseForm::Full, 1024),
            (ResponseForm::Full, 64),
        ] {
            serial += 1;
            let state =
                DeviceState::generate(DeviceSerial::new(serial).unwrap(), alg, &rng).unwrap();
            let token = line.token(serial, &state.key.spki_der());
            let req = build_request(&state, &token, form, &rng).unwrap().to_cbor();
            let client = CoapClient::new(coap_url(addr)).with_block1_size(block1);
            let mut sock = client.socket().await.unwrap();
            let resp = client.enroll(&mut sock, req).await.unwrap();
            assert_eq!(
                matches!(resp, EnrollResponse::Compact { .. }),
                form == ResponseForm::Compact
            );
            let cert = accept_response(&state, &profile, &resp).unwrap();
            assert_eq!(
                server
                    .service
                    .store()
                    .device(serial)
                    .unwrap()
                    .unwrap()
                    .certificate,
                cert
            );
        }
    }
    let client = CoapClient::new(coap_url(addr));
    let mut sock = client.socket().await.unwrap();
    assert_eq!(
        client.ca_certificate(&mut sock).await.unwrap(),
        ca.ca_der,
        "GET /ca through Block2"
    );
    let stats = &server.coap_stats;
    assert_eq!(stats.processed.load(Ordering::Relaxed), 6);
    server.stop().await;
}

/// A UDP relay that drops `loss` of the datagrams in each direction, and records every distinct
/// (client, Message ID) it delivered to the server.
async fn lossy_relay(
    server: SocketAddr,
    loss: f64,
) -> (SocketAddr, Arc<Mutex<HashSet<(SocketAddr, u16)>>>) {
    let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
    let addr = front.local_addr().unwrap();
    let delivered: Arc<Mutex<HashSet<(SocketAddr, u16)>>> = Arc::default();
    let upstreams: Arc<Mutex<BTreeMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let d = delivered.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut drop_it = move || {
            // xorshift: reproducible loss without a dependency.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % 10_000) as f64 / 10_000.0 < loss
        };
        loop {
            let Ok((n, client)) = front.recv_from(&mut buf).await else {
                return;
            };
            let up = {
                let ups = upstreams.lock().unwrap();
                ups.get(&client).cloned()
            };
            let up = match up {
                Some(u) => u,
                None => {
                    let u = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
                    u.connect(server).await.unwrap();
                    upstreams.lock().unwrap().insert(client, u.clone());
                    let (u2, front2) = (u.clone(), front.clone());
                    let mut seed2 = (client.port() as u64).wrapping_mul(0x2545_f491_4f6c_dd1d) | 1;
                    tokio::spawn(async move {
                        let mut b = vec![0u8; 8192];
                        while let Ok(n) = u2.recv(&mut b).await {
                            seed2 ^= seed2 << 13;
                            seed2 ^= seed2 >> 7;
                            seed2 ^= seed2 << 17;
                            if (seed2 % 10_000) as f64 / 10_000.0 >= loss {
                                let _ = front2.send_to(&b[..n], client).await;
                            }
                        }
                    });
                    u
                }
            };
            if drop_it() {
                continue;
            }
            if n >= 4 {
                d.lock()
                    .unwrap()
                    .insert((client, u16::from_be_bytes([buf[2], buf[3]])));
            }
            let _ = up.send(&buf[..n]).await;
        }
    });
    (addr, delivered)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_devices_enroll_through_30_percent_loss_each_way_processed_once() {
    const DEVICES: u64 = 1000;
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, DEVICES, None);
    let server = ca.start().await;
    let (relay, delivered) = lossy_relay(server.coap.unwrap(), 0.30).await;
    let params = TransmissionParams {
        ack_timeout_ms: 150,
        ack_random_factor: 1.5,
        max_retransmit: 4,
    };
    let client = CoapClient::new(coap_url(relay)).with_params(params);
    let profile = Arc::new(CertProfile::from_ca_der(&ca.ca_der).unwrap());
    let line = Arc::new(line);
    let received: Arc<Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let attempts = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(1));
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let (client, profile, line, received, attempts, next) = (
            client.clone(),
            profile.clone(),
            line.clone(),
            received.clone(),
            attempts.clone(),
            next.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let rng = SystemRandom::new();
            loop {
                let serial = next.fetch_add(1, Ordering::Relaxed);
                if serial > DEVICES {
                    return;
                }
                let state = DeviceState::generate(
                    DeviceSerial::new(serial).unwrap(),
                    KeyAlgorithm::Ed25519,
                    &rng,
                )
                .unwrap();
                let token = line.token(serial, &state.key.spki_der());
                let req = build_request(&state, &token, ResponseForm::Compact, &rng)
                    .unwrap()
                    .to_cbor();
                // The agent's own retry loop on top of CoAP retransmission, as `device-agent
                // enroll` does: an exchange that exhausts MAX_RETRANSMIT is tried again.
                let backoff = device_agent::retry::Backoff {
                    initial: Duration::from_millis(50),
                    max: Duration::from_millis(500),
                    max_attempts: 50,
                };
                let resp = device_agent::retry::run(backoff, |_| {
                    attempts.fetch_add(1, Ordering::Relaxed);
                    let (client, req) = (&client, req.clone());
                    async move { client.enroll_once(req).await }
                })
                .await;
                let resp = match resp {
                    Ok(r) => r,
                    Err(e) => panic!("serial {serial}: {e}"),
                };
                let cert = accept_response(&state, &profile, &resp).unwrap();
                assert!(received.lock().unwrap().insert(serial, cert).is_none());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len() as u64, DEVICES, "every device enrolled");
    let store = server.service.store();
    assert_eq!(
        store.devices().count() as u64,
        DEVICES,
        "one record per device, no second certificate"
    );
    for (serial, cert) in &received {
        assert_eq!(&store.device(*serial).unwrap().unwrap().certificate, cert);
    }
    let stats = &server.coap_stats;
    let processed = stats.processed.load(Ordering::Relaxed);
    let delivered = delivered.lock().unwrap().len() as u64;
    assert_eq!(
        processed, delivered,
        "each exchange that reached the server was processed exactly once"
    );
    let dups = stats.duplicates_answered.load(Ordering::Relaxed)
        + stats.duplicates_in_progress.load(Ordering::Relaxed);
    assert!(
        dups > 100,
        "retransmissions reached the server and were answered from the cache ({dups})"
    );
    assert!(
        attempts.load(Ordering::Relaxed) > DEVICES,
        "some exchanges failed for good and were retried"
    );
    server.stop().await;
}

/// Sends raw bytes from a new socket and returns the answer, if one comes within 300 ms.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    exchange(&s, addr, bytes).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datagrams_get_the_documented_answer_and_change_nothing() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let before = snapshot(server.service.store());
    // Truncated header: dropped.
    assert_eq!(raw(addr, &[0x40, 0x02]).await, None);
    // Unknown version: silently ignored (RFC 7252 section 3).
    assert_eq!(raw(addr, &[0x80, 0x01, 0x12, 0x34]).await, None);
    // Confirmable with a reserved option delta (15): Reset with the same Message ID.
    let rst = raw(addr, &[0x40, 0x02, 0x12, 0x35, 0xf1, 0x00])
        .await
        .unwrap();
    assert_eq!(
        (rst[0] >> 4 & 3, rst[1], &rst[2..4]),
        (3, 0, &[0x12, 0x35][..])
    );
    // Non-confirmable with the same fault: silently ignored.
    assert_eq!(raw(addr, &[0x50, 0x02, 0x12, 0x36, 0xf1, 0x00]).await, None);
    // Token length 9 (reserved): Reset.
    let rst = raw(addr, &[0x49, 0x02, 0x12, 0x37, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        .await
        .unwrap();
    assert_eq!(rst[0] >> 4 & 3, 3);
    // CON ping (empty message): Reset.
    let rst = raw(addr, &[0x40, 0x00, 0x12, 0x38]).await.unwrap();
    assert_eq!(rst[0] >> 4 & 3, 3);
    // An unknown critical option (2049): 4.02 Bad Option, piggybacked.
    let mut p = vec![0x40, 0x02, 0x12, 0x39];
    p.extend_from_slice(&[0xb6]); // Uri-Path (11), 6 bytes
    p.extend_from_slice(b"enroll");
    p.extend_from_slice(&[0xe0, 0x06, 0xe9]); // delta 269 + 0x06e9 = 2038 after 11: option 2049
    let ans = raw(addr, &p).await.unwrap();
    assert_eq!(
        (ans[0] >> 4 & 3, ans[1], &ans[2..4]),
        (2, 0x82, &[0x12, 0x39][..]),
        "4.02 Bad Option"
    );
    // Oversize payload (5000 bytes): 4.13 Request Entity Too Large.
    let mut big = vec![0x40, 0x02, 0x12, 0x3a, 0xb6];
    big.extend_from_slice(b"enroll");
    big.push(0xff);
    big.extend(std::iter::repeat_n(0u8, 5000));
    let ans = raw(addr, &big).await.unwrap();
    assert_eq!(ans[1], 0x8d, "4.13");
    // A well-formed request whose payload is not an EnrollRequest ({1: 80 bytes}, no csr):
    // 4.00 with the problem, in one datagram (the request is large enough for it).
    let mut bad = vec![0x40, 0x02, 0x12, 0x3b, 0xb6];
    bad.extend_from_slice(b"enroll");
    bad.extend_from_slice(&[0xff, 0xa1, 0x01, 0x58, 80]);
    bad.extend_from_slice(&[0u8; 80]);
    let ans = raw(addr, &bad).await.unwrap();
    assert_eq!(ans[1], 0x80, "4.00");
    let pos = ans.iter().position(|b| *b == 0xff).unwrap();
    let problem = protocol_spec::Problem::from_cbor(&ans[pos + 1..]).unwrap();
    assert_eq!(problem.kind, protocol_spec::ProblemType::Malformed);
    // Unknown resource: 4.04; wrong method: 4.05.
    let mut nf = vec![0x40, 0x01, 0x12, 0x3c, 0xb3];
    nf.extend_from_slice(b"xyz");
    assert_eq!(raw(addr, &nf).await.unwrap()[1], 0x84);
    let mut wm = vec![0x40, 0x04, 0x12, 0x3d, 0xb6];
    wm.extend_from_slice(b"enroll");
    assert_eq!(raw(addr, &wm).await.unwrap()[1], 0x85);
    assert_eq!(snapshot(server.service.store()), before, "nothing stored");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libcoap_client_enrolls_through_block2_and_fetches_the_ca() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let dir = ca.tmp.path();
    let dev = Device::new(11, KeyAlgorithm::P256);
    let req = dir.join("req.cbor");
    std::fs::write(&req, dev.request(&line, ResponseForm::Full)).unwrap();
    let out = dir.join("resp.cbor");
    // -b 64: 64-byte blocks; the request goes in Block1 pieces, and the full certificate comes
    // back in Block2 pieces (a response may not exceed three times the small final piece).
    let mut cmd = std::process::Command::new("coap-client-notls");
    cmd.args(["-m", "post", "-t", "60", "-A", "60", "-b", "64", "-f"])
        .arg(&req)
        .arg("-o")
        .arg(&out)
        .arg(format!("coap://{addr}/enroll"));
    let run = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("coap-client-notls (Debian package libcoap3-bin, installed by .ci/run)");
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let EnrollResponse::Full { certificate } =
        EnrollResponse::from_cbor(&std::fs::read(&out).unwrap()).unwrap()
    else {
        panic!("not a full response")
    };
    assert!(certificate.len() > 3 * 100, "larger than one 64-byte block");
    assert_eq!(
        server
            .service
            .store()
            .device(11)
            .unwrap()
            .unwrap()
            .certificate,
        certificate
    );
    let pem = dir.join("dev.pem");
    std::fs::write(&pem, protocol_spec::profile::cert_pem(&certificate)).unwrap();
    let v = std::process::Command::new("openssl")
        .args(["verify", "-x509_strict", "-purpose", "sslclient", "-CAfile"])
        .arg(ca.ca_pem_path())
        .arg(&pem)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&v.stdout).contains(": OK"), "{v:?}");
    let ca_out = dir.join("ca.der");
    let mut cmd = std::process::Command::new("coap-client-notls");
    cmd.args(["-m", "get", "-A", "287", "-o"])
        .arg(&ca_out)
        .arg(format!("coap://{addr}/ca"));
    let run = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(run.status.success());
    assert_eq!(std::fs::read(&ca_out).unwrap(), ca.ca_der);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_message_id_with_another_token_is_a_new_exchange_not_a_duplicate() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // An 8-byte token: a request large enough for a 16-byte block within three times its size.
    let get_ca = |token: u8| {
        let mut p = vec![0x48, 0x01, 0x77, 0x01];
        p.extend_from_slice(&[token; 8]);
        p.push(0xb2);
        p.extend_from_slice(b"ca");
        p
    };
    let mut buf = vec![0u8; 4096];
    // (token, duplicates answered from the cache so far)
    for (token, dups_so_far) in [(0xaa, 0), (0xaa, 1), (0xbb, 1)] {
        s.send_to(&get_ca(token), addr).await.unwrap();
        let (n, _) = tokio::time::timeout(Duration::from_secs(2), s.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (buf[0] & 0x0f, &buf[4..12]),
            (8, &[token; 8][..]),
            "the answer carries the request's token"
        );
        assert_eq!(&buf[2..4], &[0x77, 0x01]);
        assert_eq!(buf[1], 0x45, "2.05 Content");
        assert!(n > 12 && n <= 45, "{n} bytes for a 15-byte request");
        let dups = server
            .coap_stats
            .duplicates_answered
            .load(Ordering::Relaxed);
        assert_eq!(dups, dups_so_far, "token {token:#x}");
    }
    server.stop().await;
}

/// Sends `bytes` from `s` and returns the answer, if one comes within 300 ms.
async fn exchange(s: &UdpSocket, addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    s.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_millis(300), s.recv_from(&mut buf)).await {
        Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

/// Finding 2 of the hardening issue: one large request primed the duplicate cache, then every
/// 4-byte datagram naming the same (peer, Message ID, token) got the whole cached answer back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duplicate_cache_answers_no_datagram_smaller_than_a_third_of_the_answer() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let device = Device::new(7, KeyAlgorithm::Ed25519);
    // A confirmable POST /enroll with no token, full form: the answer is large.
    let mut req = vec![0x40, 0x02, 0x42, 0x42, 0xb6];
    req.extend_from_slice(b"enroll");
    req.extend_from_slice(&[0x11, 60]); // Content-Format 60 (option 12, delta 1 after 11)
    req.push(0xff);
    req.extend_from_slice(&device.request(&line, ResponseForm::Full));
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut first = None;
    for _ in 0..20 {
        first = exchange(&s, addr, &req).await;
        if first.is_some() {
            break;
        }
    }
    let first = first.expect("the enrollment is answered");
    assert_eq!(first[1], 0x44, "2.04 Changed");
    assert!(first.len() <= req.len() * 3);
    // A true retransmission gets the same bytes from the cache.
    assert_eq!(exchange(&s, addr, &req).await.as_deref(), Some(&first[..]));
    let refused_before = server
        .coap_stats
        .amplification_refused
        .load(Ordering::Relaxed);
    // A 4-byte datagram with the same Message ID and (empty) token gets nothing.
    for _ in 0..3 {
        assert_eq!(exchange(&s, addr, &[0x40, 0x02, 0x42, 0x42]).await, None);
    }
    // Nor does any datagram under a third of the cached answer.
    let short = &req[..first.len().div_ceil(3) - 1];
    assert_eq!(exchange(&s, addr, short).await, None);
    assert_eq!(
        server
            .coap_stats
            .amplification_refused
            .load(Ordering::Relaxed),
        refused_before + 4
    );
    server.stop().await;
}

/// Finding 8: blocks never went below 16 bytes, so a 7-byte GET /ca got 37 bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_is_more_than_three_times_the_datagram_that_asked() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    // GET /ca with no token: 7 bytes; even a 16-byte block does not fit in 21.
    let tiny = [0x40, 0x01, 0x10, 0x01, 0xb2, b'c', b'a'];
    let ans = exchange(&s, addr, &tiny).await.unwrap();
    assert!(ans.len() <= 21, "{} bytes for a 7-byte request", ans.len());
    assert_eq!(
        (ans[0] >> 4 & 3, ans[1], &ans[2..4]),
        (2, 0x80, &[0x10, 0x01][..]),
        "a bare 4.00 piggybacked on the ACK"
    );
    // Unknown resource, 8 bytes: the 4.04 without its problem body.
    let nf = [0x40, 0x01, 0x10, 0x02, 0xb3, b'x', b'y', b'z'];
    let ans = exchange(&s, addr, &nf).await.unwrap();
    assert!(ans.len() <= 24);
    assert_eq!(ans[1], 0x84);
    // With a token and a larger request the certificate comes in blocks, each within 3x.
    let mut get = vec![0x48, 0x01, 0x10, 0x03, 1, 2, 3, 4, 5, 6, 7, 8, 0xb2];
    get.extend_from_slice(b"ca");
    let ans = exchange(&s, addr, &get).await.unwrap();
    assert_eq!(ans[1], 0x45, "2.05 Content");
    assert!(ans.len() <= get.len() * 3);
    server.stop().await;
}

/// A confirmable `POST /enroll` datagram with Message ID `mid`, carrying `payload` as Block1
/// piece `num` of 16-byte pieces (`more` pieces to follow) under Request-Tag `tag`.
fn block1_piece(mid: u16, tag: &[u8], num: u32, more: bool, payload: &[u8]) -> Vec<u8> {
    use coap_lite::block_handler::BlockValue;
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.code = MessageClass::Request(RequestType::Post);
    p.header.message_id = mid;
    p.set_token(mid.to_be_bytes().to_vec());
    p.add_option(CoapOption::UriPath, b"enroll".to_vec());
    p.add_option(CoapOption::ContentFormat, vec![60]);
    p.add_option_as(
        CoapOption::Block1,
        BlockValue::new(num as usize, more, 16).unwrap(),
    );
    p.add_option(CoapOption::Unknown(292), tag.to_vec());
    p.payload = payload.to_vec();
    p.to_bytes().unwrap()
}

/// Finding 3 of the hardening issue: 10,000 first Block1 pieces with distinct Request-Tags took
/// the CA from 10.8 to 40.7 MB. Reassembly state is bounded per source address and in total,
/// the oldest out first, and another source still enrolls through Block1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block1_state_is_bounded_per_source_and_in_total_and_others_still_enroll() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    ca.set_limits(|l| {
        l.coap_assemblies_per_source = 8;
        l.coap_assemblies = 20;
    });
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let stats = server.coap_stats.clone();
    let held = || stats.block1_held.load(Ordering::Relaxed);
    // One source, many sockets (ports), each body's first piece under its own Request-Tag.
    let mut mid = 0x1000u16;
    for _ in 0..4 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        for _ in 0..25 {
            mid += 1;
            let piece = block1_piece(mid, &mid.to_be_bytes(), 0, true, &[0xa5; 16]);
            let ans = exchange(&s, addr, &piece).await.expect("2.31 Continue");
            assert_eq!(ans[1], 0x5f, "2.31 Continue");
        }
    }
    assert_eq!(held(), 8, "one source holds its share, no more");
    assert_eq!(stats.block1_evicted.load(Ordering::Relaxed), 92);
    // Other sources fill the total, not past it.
    for last in 3..=6u8 {
        let s = UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, last), 0))
            .await
            .unwrap();
        for _ in 0..8 {
            mid += 1;
            let piece = block1_piece(mid, &mid.to_be_bytes(), 0, true, &[0x5a; 16]);
            assert_eq!(exchange(&s, addr, &piece).await.unwrap()[1], 0x5f);
        }
    }
    assert_eq!(held(), 20, "the total cap");
    // A device on another source enrolls with its request in 64-byte Block1 pieces.
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    let rng = SystemRandom::new();
    let state =
        DeviceState::generate(DeviceSerial::new(9).unwrap(), KeyAlgorithm::Ed25519, &rng).unwrap();
    let token = line.token(9, &state.key.spki_der());
    let req = build_request(&state, &token, ResponseForm::Compact, &rng)
        .unwrap()
        .to_cbor();
    let client = CoapClient::new(coap_url(addr))
        .with_block1_size(64)
        .with_source("127.0.0.2".parse().unwrap());
    let mut sock = client.socket().await.unwrap();
    let resp = client.enroll(&mut sock, req).await.unwrap();
    accept_response(&state, &profile, &resp).unwrap();
    assert!(held() <= 20);
    server.stop().await;
}

/// A confirmable request with an 8-byte token: `POST /enroll` (Content-Format 60) with
/// `payload` asking for 16-byte Block2 pieces, or `GET /ca` when `payload` is `None`.
fn small_block_request(mid: u16, payload: Option<&[u8]>) -> Vec<u8> {
    use coap_lite::block_handler::BlockValue;
    use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
    let mut p = Packet::new();
    p.header.set_version(1);
    p.header.set_type(MessageType::Confirmable);
    p.header.message_id = mid;
    p.set_token([mid.to_be_bytes(), mid.to_be_bytes(), [1, 2], [3, 4]].concat());
    match payload {
        Some(body) => {
            p.header.code = MessageClass::Request(RequestType::Post);
            p.add_option(CoapOption::UriPath, b"enroll".to_vec());
            p.add_option(CoapOption::ContentFormat, vec![60]);
            p.add_option_as(CoapOption::Block2, BlockValue::new(0, false, 16).unwrap());
            p.payload = body.to_vec();
        }
        None => {
            p.header.code = MessageClass::Request(RequestType::Get);
            p.add_option(CoapOption::UriPath, b"ca".to_vec());
        }
    }
    p.to_bytes().unwrap()
}

/// Finding 4 of the hardening issue: Block2 state grew with every distinct source and a 7-byte
/// `GET /ca` stored a copy of the CA certificate that was never read back. Now `GET /ca` holds
/// nothing, enrollment answers are bounded per source address and in total, oldest out first,
/// and a device on another source still gets its full certificate in Block2 pieces.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block2_state_is_bounded_per_source_and_in_total_and_get_ca_holds_none() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    ca.set_limits(|l| {
        l.coap_block2_per_source = 8;
        l.coap_block2 = 12;
    });
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let stats = server.coap_stats.clone();
    let held = || stats.block2_held.load(Ordering::Relaxed);
    // GET /ca from many ports of one source, in 16-byte pieces (a 15-byte request): the first
    // piece of the certificate each time, and nothing held.
    let mut mid = 0x2000u16;
    for _ in 0..20 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        mid += 1;
        let ans = exchange(&s, addr, &small_block_request(mid, None))
            .await
            .unwrap();
        assert_eq!(ans[1], 0x45, "2.05 Content");
    }
    assert_eq!(held(), 0, "GET /ca keeps no Block2 state");
    // Undecodable enrollment requests from 40 ports of one source, each answered with a problem
    // in 16-byte pieces (more to come): the source keeps 8. Every socket stays open until the
    // counts are read: a port closed and drawn again would be the same endpoint, whose answer
    // replaces its own instead of evicting another's.
    let mut open = Vec::new();
    for _ in 0..40 {
        let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        mid += 1;
        let ans = exchange(&s, addr, &small_block_request(mid, Some(&[0xff; 40])))
            .await
            .unwrap();
        assert_eq!(ans[1], 0x80, "4.00, its first piece");
        open.push(s);
    }
    assert_eq!(held(), 8, "one source holds its share, no more");
    assert_eq!(stats.block2_evicted.load(Ordering::Relaxed), 32);
    let s = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    for _ in 0..8 {
        mid += 1;
        let req = small_block_request(mid, Some(&[0xff; 40]));
        assert_eq!(exchange(&s, addr, &req).await.unwrap()[1], 0x80);
        // Each request from the same endpoint replaces that endpoint's answer.
    }
    assert_eq!(held(), 9);
    for _ in 0..6 {
        let s = UdpSocket::bind("127.0.0.3:0").await.unwrap();
        mid += 1;
        let req = small_block_request(mid, Some(&[0xff; 40]));
        assert_eq!(exchange(&s, addr, &req).await.unwrap()[1], 0x80);
        open.push(s);
    }
    assert_eq!(held(), 12, "the total cap");
    // A device on another source gets its full certificate in Block2 pieces (its request in
    // 64-byte Block1 pieces: the small last piece makes the answer come in Block2 pieces).
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    let rng = SystemRandom::new();
    let state =
        DeviceState::generate(DeviceSerial::new(5).unwrap(), KeyAlgorithm::P256, &rng).unwrap();
    let token = line.token(5, &state.key.spki_der());
    let req = build_request(&state, &token, ResponseForm::Full, &rng)
        .unwrap()
        .to_cbor();
    let client = CoapClient::new(coap_url(addr))
        .with_block1_size(64)
        .with_source("127.0.0.2".parse().unwrap());
    let mut sock = client.socket().await.unwrap();
    let resp = client.enroll(&mut sock, req).await.unwrap();
    assert!(matches!(resp, EnrollResponse::Full { .. }));
    accept_response(&state, &profile, &resp).unwrap();
    assert!(held() <= 12);
    server.stop().await;
}

/// The duplicate cache is bounded per source address and in total, the oldest out first: one
/// source's many exchanges push out its own oldest (a retransmission of a forgotten exchange
/// is processed again, not answered from the cache), and a device on another source enrolls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_duplicate_cache_is_bounded_per_source_and_in_total() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    ca.set_limits(|l| {
        l.coap_exchanges_per_source = 16;
        l.coap_exchanges = 40;
    });
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let stats = server.coap_stats.clone();
    let held = || stats.exchanges_held.load(Ordering::Relaxed);
    let answered = || stats.duplicates_answered.load(Ordering::Relaxed);
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let first = small_block_request(0x3000, None);
    assert_eq!(exchange(&s, addr, &first).await.unwrap()[1], 0x45);
    for mid in 0x3001..0x3064u16 {
        let ans = exchange(&s, addr, &small_block_request(mid, None)).await;
        assert_eq!(ans.unwrap()[1], 0x45, "2.05 Content");
    }
    assert_eq!(held(), 16, "one source holds its share, no more");
    assert_eq!(stats.exchanges_evicted.load(Ordering::Relaxed), 100 - 16);
    // The newest is still a duplicate; the first was forgotten and is a new exchange.
    let newest = small_block_request(0x3063, None);
    assert_eq!(exchange(&s, addr, &newest).await.unwrap()[1], 0x45);
    assert_eq!(answered(), 1);
    assert_eq!(exchange(&s, addr, &first).await.unwrap()[1], 0x45);
    assert_eq!(answered(), 1, "a forgotten exchange is processed again");
    // Other sources fill the total, not past it.
    for last in 3..=5u8 {
        let s = UdpSocket::bind((std::net::Ipv4Addr::new(127, 0, 0, last), 0))
            .await
            .unwrap();
        for mid in 0..16u16 {
            let ans = exchange(&s, addr, &small_block_request(mid, None)).await;
            assert_eq!(ans.unwrap()[1], 0x45);
        }
    }
    assert_eq!(held(), 40, "the total cap");
    // A device on another source enrolls.
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    let rng = SystemRandom::new();
    let state =
        DeviceState::generate(DeviceSerial::new(3).unwrap(), KeyAlgorithm::Ed25519, &rng).unwrap();
    let token = line.token(3, &state.key.spki_der());
    let req = build_request(&state, &token, ResponseForm::Compact, &rng)
        .unwrap()
        .to_cbor();
    let client = CoapClient::new(coap_url(addr)).with_source("127.0.0.2".parse().unwrap());
    let mut sock = client.socket().await.unwrap();
    let resp = client.enroll(&mut sock, req).await.unwrap();
    accept_response(&state, &profile, &resp).unwrap();
    assert_eq!(held(), 40);
    server.stop().await;
}

/// SPEC.md section 11.6 (hardening issue, finding 12): a per-source rate, counted per new
/// exchange. A source past it gets 4.29 with Max-Age (a retransmission gets the same answer
/// from the cache and is not counted); another source enrolls meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_past_its_rate_gets_4_29_with_max_age_and_others_enroll() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    ca.set_limits(|l| {
        l.rate_per_source = 1;
        l.rate_burst_per_source = 3;
    });
    let server = ca.start().await;
    let addr = server.coap.unwrap();
    let s = UdpSocket::bind("127.0.0.3:0").await.unwrap();
    let mut codes = Vec::new();
    let mut mid = 0x4000u16;
    let (req, ans) = loop {
        assert!(codes.len() < 100, "never limited: {codes:?}");
        mid += 1;
        let req = small_block_request(mid, None);
        let ans = exchange(&s, addr, &req).await.unwrap();
        codes.push(ans[1]);
        if ans[1] != 0x45 {
            break (req, ans);
        }
    };
    assert!(codes.len() > 3, "the burst of 3 is served first: {codes:?}");
    assert_eq!(ans[1], 0x9d, "4.29 Too Many Requests");
    let packet = coap_lite::Packet::from_bytes(&ans).unwrap();
    let max_age = packet
        .get_first_option(coap_lite::CoapOption::MaxAge)
        .expect("Max-Age");
    assert_eq!(protocol_spec::coap::parse_uint_option(max_age), Some(1));
    let limited = server.coap_stats.rate_limited.load(Ordering::Relaxed);
    assert_eq!(limited, 1);
    // Its retransmission: the same answer, not counted again.
    assert_eq!(exchange(&s, addr, &req).await.unwrap(), ans);
    assert_eq!(server.coap_stats.rate_limited.load(Ordering::Relaxed), 1);
    // Another source enrolls.
    let profile = CertProfile::from_ca_der(&ca.ca_der).unwrap();
    let rng = SystemRandom::new();
    let state =
        DeviceState::generate(DeviceSerial::new(4).unwrap(), KeyAlgorithm::Ed25519, &rng).unwrap();
    let token = line.token(4, &state.key.spki_der());
    let req = build_request(&state, &token, ResponseForm::Compact, &rng)
        .unwrap()
        .to_cbor();
    let client = CoapClient::new(coap_url(addr)).with_source("127.0.0.2".parse().unwrap());
    let mut sock = client.socket().await.unwrap();
    let resp = client.enroll(&mut sock, req).await.unwrap();
    accept_response(&state, &profile, &resp).unwrap();
    server.stop().await;
}
