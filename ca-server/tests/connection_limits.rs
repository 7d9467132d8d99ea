//! The TCP doors under hostile clients: connection slots per source address and per listener,
//! the admin door's own slots, and time limits on a client that connects and sends nothing.
// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use ca_server::admin_client::AdminClient;
use common::{Device, Line, TestCa, operator};
use protocol_spec::KeyAlgorithm;
use protocol_spec::messages::ResponseForm;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpSocket, TcpStream};

/// Longest a test waits for what the server must do; never reached when the server behaves.
const GUARD: Duration = Duration::from_secs(30);

/// A TCP connection to `addr` from `source`.
async fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(SocketAddr::new(source, 0)).unwrap();
    s.connect(addr).await.unwrap()
}

/// Whether the server closes `tcp` (end of stream or a reset) within [`GUARD`], reading and
/// dropping whatever it sends first.
async fn closed_by_server<S: tokio::io::AsyncRead + Unpin>(tcp: &mut S) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(GUARD, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Finding 5 of the hardening issue: slots were shared by everyone and taken before accept, so
/// 2048 bare TCP connections from one source locked a door (the admin door too). One source
/// now holds at most its share of each door; a device on another source enrolls and an
/// operator is answered while that source holds every connection it may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_holds_its_share_of_slots_and_others_enroll_and_administer() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let (cert, key) = operator(&ca, "alice");
    ca.set_limits(|l| {
        // Long enough that the bare connections are still held while the others are served.
        l.request_timeout_secs = 120;
        l.max_connections = 8;
        l.max_connections_per_source = 4;
        l.admin_max_connections = 8;
        l.admin_max_connections_per_source = 4;
    });
    let server = ca.start().await;
    let (https, admin) = (server.https.unwrap(), server.admin.unwrap());
    let attacker = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));
    // 12 bare connections to each door: 4 held, the 8 others closed by the server at once.
    let mut held = Vec::new();
    for door in [https, admin] {
        let mut conns = Vec::new();
        for _ in 0..12 {
            conns.push(connect_from(attacker, door).await);
        }
        let mut closed = 0;
        for c in conns.iter_mut().skip(4) {
            if closed_by_server(c).await {
                closed += 1;
            }
        }
        assert_eq!(
            closed, 8,
            "the connections past the source's share are closed"
        );
        held.extend(conns);
    }
    // A device on another source enrolls.
    let device = Device::new(1, KeyAlgorithm::Ed25519);
    let client = ca
        .client(https)
        .with_source(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
    tokio::time::timeout(
        GUARD,
        client.enroll(device.request(&line, ResponseForm::Compact)),
    )
    .await
    .expect("the enrollment door answers another source")
    .unwrap();
    // An operator is answered at the admin door.
    let op = AdminClient::new(&format!("https://{admin}"), &ca.ca_pem_path(), &cert, &key).unwrap();
    let metrics = op.request("GET", "/metrics", None).await.unwrap();
    assert_eq!(metrics.status.as_u16(), 200);
    let text = String::from_utf8(metrics.body).unwrap();
    for door in ["enrollment", "admin"] {
        let line =
            format!("imprint_refused_connections_total{{door=\"{door}\",reason=\"source\"}} 8");
        assert!(text.contains(&line), "{line} in\n{text}");
    }
    drop(held);
    server.stop().await;
}

/// Each door's listener has a cap of its own over all sources: connections past it are closed
/// on accept, and a slot freed is taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_closes_new_connections_until_a_slot_is_free() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    ca.set_limits(|l| {
        l.request_timeout_secs = 120;
        l.max_connections = 4;
        l.max_connections_per_source = 2;
    });
    let server = ca.start().await;
    let https = server.https.unwrap();
    let mut held = Vec::new();
    for last in 3..=4u8 {
        for _ in 0..2 {
            held.push(connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), https).await);
        }
    }
    let mut late = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5)), https).await;
    assert!(closed_by_server(&mut late).await, "the listener is full");
    drop(held.pop());
    // The freed slot: a device enrolls (its connection may race the close above, so retry).
    let client = ca.client(https);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(Ok(a)) = tokio::time::timeout(GUARD, client.ca_certificate()).await {
            assert_eq!(a, ca.ca_der);
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a freed slot is taken again");
    drop(held);
    server.stop().await;
}

/// A client that connects and sends nothing is closed once the request time limit has passed,
/// before the TLS handshake and after it (the header read timer also runs on an idle
/// connection), at each door.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_closed_after_the_time_limit() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    ca.set_request_timeout(1);
    let server = ca.start().await;
    for door in [server.https, server.mtls, server.admin] {
        let mut tcp = TcpStream::connect(door.unwrap()).await.unwrap();
        let started = std::time::Instant::now();
        assert!(closed_by_server(&mut tcp).await, "{door:?}: still open");
        assert!(started.elapsed() >= Duration::from_millis(900));
    }
    // After a completed handshake, no request.
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut tls = tls_from(&ca, localhost, server.https.unwrap()).await;
    assert!(closed_by_server(&mut tls).await, "idle TLS still open");
    server.stop().await;
}

/// A TLS connection from `source` to `addr`, trusting the test CA; the handshake's error when
/// the server closes the connection first.
async fn try_tls_from(
    ca: &TestCa,
    source: IpAddr,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = connect_from(source, addr).await;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    tokio_rustls::TlsConnector::from(common::trusting(&ca.ca_der))
        .connect(name, tcp)
        .await
}

/// [`try_tls_from`], which must succeed.
async fn tls_from(
    ca: &TestCa,
    source: IpAddr,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    try_tls_from(ca, source, addr).await.unwrap()
}

/// SPEC.md section 11.6 (hardening issue, finding 12): a per-source rate at the device doors.
/// A source past its rate gets 429 with Retry-After and the rate-limited problem, on its
/// kept-alive connection; another source is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_past_its_rate_gets_429_with_retry_after_and_others_enroll() {
    use http_body_util::{BodyExt, Empty};
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    ca.set_limits(|l| {
        l.rate_per_source = 1;
        l.rate_burst_per_source = 3;
    });
    let server = ca.start().await;
    let https = server.https.unwrap();
    let tls = tls_from(&ca, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)), https).await;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    // The burst, then 429 as soon as the bucket is empty (it refills at one a second, far
    // slower than these requests on one connection).
    let mut answers = Vec::new();
    let limited = loop {
        assert!(answers.len() < 100, "never limited: {answers:?}");
        let req = hyper::Request::get("/ca")
            .header("host", "127.0.0.1")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        answers.push(status);
        if status != 200 {
            break resp;
        }
    };
    assert!(
        answers.len() > 2,
        "the burst of 3, less the handshake's 1, is served first: {answers:?}"
    );
    assert_eq!(limited.status().as_u16(), 429);
    assert_eq!(limited.headers()["retry-after"], "1");
    assert_eq!(
        limited.headers()["content-type"],
        "application/concise-problem-details+cbor"
    );
    let body = limited.into_body().collect().await.unwrap().to_bytes();
    let problem = protocol_spec::Problem::from_cbor(&body).unwrap();
    assert_eq!(problem.kind, protocol_spec::ProblemType::RateLimited);
    // Another source is not held back by this one.
    let device = Device::new(2, KeyAlgorithm::Ed25519);
    ca.client(https)
        .with_source(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .enroll(device.request(&line, ResponseForm::Compact))
        .await
        .unwrap();
    server.stop().await;
}

/// Every TLS handshake costs the CA a signature, and a source that only opened connections and
/// made (or abandoned) handshakes was never counted: its rate counted requests. Each accepted
/// connection now takes `rate_handshake_cost` (1) from its source's rate at the device doors
/// (SPEC.md 11.6), and past it the connection is closed before the handshake, at the HTTPS and
/// the mutual-TLS door alike, while another source is served. With the cost 0, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_count_against_their_source_s_rate_and_another_source_is_served() {
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let attacker = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let other = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    for cost in [1, 0] {
        ca.set_limits(|l| {
            l.rate_per_source = 1;
            l.rate_burst_per_source = 5;
            l.rate_handshake_cost = cost;
        });
        let server = ca.start().await;
        let (https, mtls) = (server.https.unwrap(), server.mtls.unwrap());
        // Three handshakes abandoned (the connection closed at once), then ten made in full
        // with no request: the burst of 5 serves two, the rest are closed unanswered.
        for _ in 0..3 {
            drop(connect_from(attacker, https).await);
        }
        let mut made = 0;
        for _ in 0..10 {
            if try_tls_from(&ca, attacker, https).await.is_ok() {
                made += 1;
            }
        }
        // The mutual-TLS door counts against the same rate: no handshake either. (A
        // handshake there completes on the client's side before the server judges the
        // missing client certificate, so an error here is the connection closed first.)
        let at_mtls = try_tls_from(&ca, attacker, mtls).await;
        if cost == 1 {
            assert!(made <= 3, "handshakes past the rate: {made} of 10 made");
            assert!(made >= 1, "the burst serves the first");
            assert!(at_mtls.is_err(), "the mutual-TLS door made the handshake");
        } else {
            assert_eq!(made, 10, "not counted with the cost 0");
            assert!(at_mtls.is_ok());
        }
        // Another source is served meanwhile: a handshake at each door, and an enrollment.
        try_tls_from(&ca, other, mtls).await.unwrap();
        let device = Device::new(10 + u64::from(cost), KeyAlgorithm::Ed25519);
        ca.client(https)
            .with_source(other)
            .enroll(device.request(&line, ResponseForm::Compact))
            .await
            .unwrap();
        server.stop().await;
    }
}

/// A client that pipelines requests and never reads the answers stalls the server's writes;
/// it kept its connection (and so its source's slot) for good. Its connection now ends once
/// the server's writes make no progress for the time limit, and the source is served again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_loses_its_connection_after_the_time_limit() {
    use tokio::io::AsyncWriteExt;
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    ca.set_limits(|l| {
        l.request_timeout_secs = 2;
        l.max_connections_per_source = 1;
    });
    let server = ca.start().await;
    let https = server.https.unwrap();
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 5));
    let mut slow = tls_from(&ca, source, https).await;
    // Requests, never an answer read, until the server stops reading them (its writes block).
    let chunk = b"GET /ca HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".repeat(1000);
    let mut sent = 0usize;
    loop {
        match tokio::time::timeout(Duration::from_secs(1), slow.write_all(&chunk)).await {
            Ok(Ok(())) => sent += 1000,
            Ok(Err(e)) => panic!("the server closed before its writes stalled: {e}"),
            Err(_) => break,
        }
        assert!(sent < 2_000_000, "the server never stopped reading");
    }
    let stalled = std::time::Instant::now();
    // The source's one slot is free again once the server gave up on the stalled writes.
    let get_ca = |c: tokio_rustls::client::TlsStream<TcpStream>| async move {
        use http_body_util::Empty;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(c))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/ca")
            .header("host", "127.0.0.1")
            .body(Empty::<bytes::Bytes>::new())
            .ok()?;
        sender
            .send_request(req)
            .await
            .ok()
            .map(|r| r.status().as_u16())
    };
    loop {
        assert!(
            stalled.elapsed() < GUARD,
            "the stalled connection still holds the source's slot after {GUARD:?}"
        );
        if let Ok(tls) = try_tls_from(&ca, source, https).await
            && get_ca(tls).await == Some(200)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{sent} requests pipelined; the source was served again {:?} after the writes stalled",
        stalled.elapsed()
    );
    drop(slow);
    server.stop().await;
}

/// The admin door has a rate per source of its own (hardening issue): an operator's client
/// past it gets 429 in the admin door's JSON problem form, with Retry-After, on its kept-alive
/// connection, and is served again once the bucket refills; its new connections past the rate
/// are closed before the handshake while another source still makes one; and the device doors
/// still serve that address, whose device rate is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_door_has_a_rate_per_source_of_its_own() {
    use std::process::Command;
    let ca = TestCa::new(KeyAlgorithm::Ed25519);
    let line = Line::new("line-1", KeyAlgorithm::Ed25519);
    ca.add_line(&line, 1, 100, None);
    let (cert, key) = operator(&ca, "alice");
    ca.set_limits(|l| {
        l.admin_rate_per_source = 1;
        l.admin_rate_burst_per_source = 4;
    });
    let server = ca.start().await;
    let (https, admin) = (server.https.unwrap(), server.admin.unwrap());
    let url = format!("https://{admin}/health");
    // Eight requests on one kept-alive connection (curl reuses it for every URL): the handshake
    // takes one of the burst of 4, three requests are answered, the rest get 429.
    let headers = ca.tmp.path().join("headers");
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(ca.ca_pem_path())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .arg("-D")
        .arg(&headers)
        .args(["-w", "\nCODE %{http_code} %{num_connects}\n"])
        .args(std::iter::repeat_n(url.as_str(), 8))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: Vec<(&str, usize)> = stdout
        .lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("CODE ")?.split_whitespace();
            Some((w.next()?, w.next()?.parse().ok()?))
        })
        .collect();
    let codes: Vec<&str> = results.iter().map(|r| r.0).collect();
    let connects: usize = results.iter().map(|r| r.1).sum();
    assert_eq!(
        connects, 1,
        "one connection for the eight requests: {stdout}"
    );
    assert_eq!(
        codes,
        ["200", "200", "200", "429", "429", "429", "429", "429"],
        "{stdout}"
    );
    let headers = std::fs::read_to_string(&headers)
        .unwrap()
        .to_ascii_lowercase();
    assert!(headers.contains("retry-after: 1"), "{headers}");
    assert!(
        headers.contains("content-type: application/problem+json"),
        "{headers}"
    );
    assert!(
        stdout.contains("\"status\":429") && stdout.contains("too many requests"),
        "the admin door's problem: {stdout}"
    );
    // Past its rate, this address's next connection is closed before the handshake; another
    // address makes one (an admin handshake without a client certificate completes on the
    // client's side before the server judges it).
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert!(try_tls_from(&ca, local, admin).await.is_err());
    try_tls_from(&ca, IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), admin)
        .await
        .unwrap();
    // The device doors serve the same address: their rate is another.
    let device = Device::new(1, KeyAlgorithm::Ed25519);
    ca.client(https)
        .with_source(local)
        .enroll(device.request(&line, ResponseForm::Compact))
        .await
        .unwrap();
    // Once the bucket has refilled (1 a second), the operator is served again.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let op = AdminClient::new(&format!("https://{admin}"), &ca.ca_pem_path(), &cert, &key).unwrap();
    let r = op.request("GET", "/health", None).await.unwrap();
    assert_eq!(r.status.as_u16(), 200);
    server.stop().await;
}
