//! The CA under a flood, with its default limits: garbage datagrams at the CoAP door, garbage
//! bytes at every TLS door, and slow clients that take a connection and trickle a request,
//! all from attacker addresses, while valid devices enroll over CoAP and HTTPS from others and
//! an operator reads the admin door. At least 99% of the valid devices enroll; the admin door
//! answers every time; nothing the attackers sent is on record.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ca_server::admin_client::AdminClient;
use common::{Device, Line, TestCa, operator};
use device_agent::coap::CoapClient;
use device_agent::url::CaUrl;
use protocol_spec::KeyAlgorithm;
use protocol_spec::messages::ResponseForm;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, UdpSocket};

/// Valid devices, half over CoAP, half over HTTPS.
const DEVICES: u64 = 1000;

fn attacker(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 66, n))
}

fn random(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    SystemRandom::new().fill(&mut b).unwrap();
    b
}

/// Garbage datagrams: random bytes, and CoAP-shaped ones (version 1, a random code, options
/// and payload of random bytes), about `per_sec` a second until `stop`.
async fn udp_garbage(
    from: IpAddr,
    to: SocketAddr,
    per_sec: u64,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) {
    let sock = UdpSocket::bind(SocketAddr::new(from, 0)).await.unwrap();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let per_tick = (per_sec / 100).max(1);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        for i in 0..per_tick {
            let len = 1 + (random(2)[0] as usize * 5) % 1200;
            let mut d = random(len);
            if i % 2 == 0 && d.len() >= 4 {
                d[0] = 0x40 | (d[0] & 0x3f); // version 1, any type and token length
            }
            let _ = sock.send_to(&d, to).await;
            sent.fetch_add(1, Ordering::Relaxed);
        }
        // Whatever comes back (a reset, a 4.00) is read and dropped.
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(0), sock.recv_from(&mut buf)).await
        {}
    }
}

/// Connections that send random bytes to a TLS door and wait for the server to close them.
async fn tls_garbage(from: IpAddr, to: SocketAddr, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) {
    while !stop.load(Ordering::Relaxed) {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(from, 0)).unwrap();
        let Ok(mut tcp) = s.connect(to).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = tcp.write_all(&random(1 + random(1)[0] as usize * 8)).await;
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(15), async {
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await;
        done.fetch_add(1, Ordering::Relaxed);
    }
}

/// A slow client: completes the TLS handshake, sends the start of a request, then one byte a
/// second until the server closes the connection; then again.
async fn slow_client(
    ca_der: Vec<u8>,
    from: IpAddr,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    closed: Arc<AtomicU64>,
) {
    let config = common::trusting(&ca_der);
    while !stop.load(Ordering::Relaxed) {
        let s = TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(from, 0)).unwrap();
        let Ok(tcp) = s.connect(to).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let Ok(mut tls) = tokio_rustls::TlsConnector::from(config.clone())
            .connect(name, tcp)
            .await
        else {
            continue;
        };
        let head = b"POST /enroll HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/cbor\r\nContent-Length: 900\r\n\r\n";
        if tls.write_all(head).await.is_err() {
            continue;
        }
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            if tls.write_all(b"x").await.is_err() || tls.flush().await.is_err() {
                break;
            }
            let mut buf = [0u8; 512];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(1), tls.read(&mut buf)).await
            {
                break;
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_devices_enroll_and_the_admin_door_answers_through_a_flood() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Arc::new(Line::new("line-1", KeyAlgorithm::Ed25519));
    ca.add_line(&line, 1, 100_000, None);
    let (cert, key) = operator(&ca, "alice");
    let server = ca.start().await;
    let (https, coap, mtls, admin) = (
        server.https.unwrap(),
        server.coap.unwrap(),
        server.mtls.unwrap(),
        server.admin.unwrap(),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let datagrams = Arc::new(AtomicU64::new(0));
    let garbage_conns = Arc::new(AtomicU64::new(0));
    let slow_closed = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for k in 0..2u8 {
        attackers.push(tokio::spawn(udp_garbage(
            attacker(1 + k),
            coap,
            2000,
            stop.clone(),
            datagrams.clone(),
        )));
    }
    for (k, door) in [https, mtls, admin, https].into_iter().enumerate() {
        attackers.push(tokio::spawn(tls_garbage(
            attacker(10 + k as u8),
            door,
            stop.clone(),
            garbage_conns.clone(),
        )));
    }
    for k in 0..32u8 {
        attackers.push(tokio::spawn(slow_client(
            ca.ca_der.clone(),
            attacker(20 + k % 4),
            if k % 2 == 0 { https } else { mtls },
            stop.clone(),
            slow_closed.clone(),
        )));
    }
    // Let the flood build up before the devices come.
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The operator reads the admin door every 250 ms throughout.
    let op = Arc::new(
        AdminClient::new(&format!("https://{admin}"), &ca.ca_pem_path(), &cert, &key).unwrap(),
    );
    let admin_answers = Arc::new(AtomicU64::new(0));
    let admin_failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let watcher = {
        let (op, stop, ok, failures) = (
            op.clone(),
            stop.clone(),
            admin_answers.clone(),
            admin_failures.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                match tokio::time::timeout(
                    Duration::from_secs(5),
                    op.request("GET", "/health", None),
                )
                .await
                {
                    Ok(Ok(r)) if r.status.as_u16() == 200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.lock().unwrap().push(format!(
                        "after {:?}: {:?}",
                        started.elapsed(),
                        other.map(|r| r.map(|r| r.status))
                    )),
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // Valid devices, each from a source of its own among 127.0.0.10-41, half over CoAP and half
    // over HTTPS, retrying as the device agent does.
    let next = Arc::new(AtomicU64::new(1));
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut devices = Vec::new();
    for w in 0..8u8 {
        let (next, latencies, failed, line) = (
            next.clone(),
            latencies.clone(),
            failed.clone(),
            line.clone(),
        );
        let source = |serial: u64| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + (serial % 32) as u8));
        let https_client = ca.client(https);
        devices.push(tokio::spawn(async move {
            let _ = w;
            loop {
                let serial = next.fetch_add(1, Ordering::Relaxed);
                if serial > DEVICES {
                    return;
                }
                let request = Device::new(serial, KeyAlgorithm::Ed25519)
                    .request(&line, ResponseForm::Compact);
                let t = Instant::now();
                let r = if serial % 2 == 0 {
                    let c = CoapClient::new(CaUrl::parse(&format!("coap://{coap}")).unwrap())
                        .with_source(source(serial));
                    device_agent::retry::run(device_agent::retry::Backoff::default(), |_| {
                        c.enroll_once(request.clone())
                    })
                    .await
                } else {
                    let c = https_client.with_source(source(serial));
                    device_agent::retry::run(device_agent::retry::Backoff::default(), |_| {
                        c.enroll(request.clone())
                    })
                    .await
                };
                match r {
                    Ok(_) => latencies.lock().unwrap().push(t.elapsed()),
                    Err(e) => failed.lock().unwrap().push(format!("serial {serial}: {e}")),
                }
            }
        }));
    }
    for d in devices {
        d.await.unwrap();
    }
    let valid_seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    for a in attackers {
        a.abort();
    }

    let mut lat = latencies.lock().unwrap().clone();
    lat.sort();
    let ok = lat.len() as u64;
    let p99 = lat
        .get((lat.len() * 99 / 100).min(lat.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default();
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    eprintln!(
        "flood: {ok}/{DEVICES} valid devices enrolled in {valid_seconds:.1} s (p50 {p50:?}, p99 {p99:?}); \
         {} garbage datagrams, {} garbage TLS connections closed, {} slow clients cut off; \
         admin answered {} times",
        datagrams.load(Ordering::Relaxed),
        garbage_conns.load(Ordering::Relaxed),
        slow_closed.load(Ordering::Relaxed),
        admin_answers.load(Ordering::Relaxed),
    );
    let failed = failed.lock().unwrap().clone();
    assert!(
        ok * 100 >= DEVICES * 99,
        "only {ok} of {DEVICES} valid devices enrolled: {failed:?}"
    );
    let admin_failures = admin_failures.lock().unwrap().clone();
    assert!(
        admin_failures.is_empty(),
        "the admin door did not answer: {admin_failures:?}"
    );
    assert!(admin_answers.load(Ordering::Relaxed) > 0);
    assert!(datagrams.load(Ordering::Relaxed) > 1000, "the flood ran");
    assert!(garbage_conns.load(Ordering::Relaxed) > 10, "the flood ran");
    // Only the valid devices are on record.
    let store = server.service.store().clone();
    assert_eq!(store.devices().count() as u64, ok);
    server.stop().await;
}
