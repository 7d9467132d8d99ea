//! The CoAP front end (RFC 7252 over UDP, coap-lite for the message format): `POST /enroll`
//! (CBOR), `GET /ca`; confirmable and non-confirmable requests; piggybacked responses;
//! duplicate detection; Block2 and Block1 (RFC 7959); amplification limit (section 11.3).
//!
//! One task reads the socket and answers what is cheap (duplicates, errors, `GET /ca`, Block1
//! continuations) at once; enrollments go to a fixed pool of worker tasks through a bounded
//! queue, so that the number of tasks never grows with the number of datagrams. When the queue
//! is full a request is dropped unanswered and the device's retransmission brings it back later.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use coap_lite::block_handler::BlockValue;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use protocol_spec::coap::{
    AMPLIFICATION_FACTOR, CF_CBOR, CF_PKIX_CERT, CF_PROBLEM, DEFAULT_BLOCK, MAX_DATAGRAM, PATH_CA,
    PATH_ENROLL, parse_uint_option, uint_option,
};
use protocol_spec::enroll::RequestEncoding;
use protocol_spec::messages::MAX_ENROLL_REQUEST;
use protocol_spec::{Problem, ProblemType};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::limits::{PerSource, SourceRate};
use crate::service::CaService;

/// Largest datagram the server sends (fits the IPv6 minimum MTU with room for headers).
const MAX_RESPONSE_DATAGRAM: usize = 1152;
/// Critical options this server understands (RFC 7252 section 5.4.1: any other critical option
/// in a request MUST get 4.02 Bad Option).
const UNDERSTOOD_CRITICAL: [u16; 7] = [3, 7, 11, 15, 17, 23, 27];
/// Request-Tag (RFC 9175), elective.
const REQUEST_TAG: u16 = 292;

/// Limits and timing of the CoAP front end.
#[derive(Debug, Clone)]
pub struct CoapConfig {
    /// How long a response is kept for duplicate detection (EXCHANGE_LIFETIME).
    pub exchange_lifetime: Duration,
    /// Most exchanges remembered at once; past it the oldest are forgotten (a retransmission
    /// older than that is processed again, which for enrollment returns the stored answer).
    pub max_remembered: usize,
    /// Most exchanges remembered at once for one source address; past it that source's
    /// oldest are forgotten.
    pub max_remembered_per_source: usize,
    /// Request bodies being received in Block1 pieces, at most, from one source address;
    /// past it that source's oldest is forgotten (its next piece gets 4.08).
    pub max_assemblies_per_source: usize,
    /// Request bodies being received in Block1 pieces, at most, from all sources.
    pub max_assemblies: usize,
    /// Enrollment answers being sent in Block2 pieces, at most, to one source address; past it
    /// that source's oldest is forgotten (a request for its next piece gets 4.08).
    pub max_representations_per_source: usize,
    /// Enrollment answers being sent in Block2 pieces, at most, to all sources.
    pub max_representations: usize,
    /// Enrollment workers.
    pub workers: usize,
    /// Enrollments queued for the workers before new ones are dropped.
    pub queue: usize,
}

impl Default for CoapConfig {
    fn default() -> Self {
        CoapConfig {
            exchange_lifetime: Duration::from_millis(
                protocol_spec::coap::TransmissionParams::default().exchange_lifetime_ms(),
            ),
            max_remembered: 200_000,
            max_remembered_per_source: 50_000,
            max_assemblies_per_source: 256,
            max_assemblies: 4096,
            max_representations_per_source: 256,
            max_representations: 16_384,
            workers: 64,
            queue: 8192,
        }
    }
}

/// Counters, for tests, benchmarks and metrics.
#[derive(Debug, Default)]
pub struct CoapStats {
    /// Datagrams received.
    pub received: AtomicU64,
    /// Enrollment requests run through the service (each exchange at most once).
    pub processed: AtomicU64,
    /// Retransmissions answered from the cache.
    pub duplicates_answered: AtomicU64,
    /// Retransmissions of an exchange still being processed (ignored).
    pub duplicates_in_progress: AtomicU64,
    /// Requests dropped because the worker queue was full.
    pub dropped_busy: AtomicU64,
    /// Datagrams dropped or reset as malformed.
    pub malformed: AtomicU64,
    /// Resets sent.
    pub resets: AtomicU64,
    /// Requests answered 4.29 because their source exceeded its rate.
    pub rate_limited: AtomicU64,
    /// Exchanges remembered for duplicate detection now.
    pub exchanges_held: AtomicU64,
    /// Exchanges forgotten before EXCHANGE_LIFETIME to make room (cap per source or total).
    pub exchanges_evicted: AtomicU64,
    /// Block1 bodies in reassembly now.
    pub block1_held: AtomicU64,
    /// Block1 bodies forgotten before their last piece to make room (cap per source or total).
    pub block1_evicted: AtomicU64,
    /// Enrollment answers held for their next Block2 pieces now.
    pub block2_held: AtomicU64,
    /// Enrollment answers forgotten before their last piece was asked for, to make room.
    pub block2_evicted: AtomicU64,
    /// Answers not sent, or cut down to their code, because they would have been more than
    /// three times the datagram that asked (RFC 7252 section 11.3).
    pub amplification_refused: AtomicU64,
}

/// A remembered exchange, with the token of its request: a retransmission repeats the token,
/// while a new request that happens to reuse a (peer, Message ID) within the lifetime (a new
/// socket on a recycled port) carries another one and is a new exchange.
#[derive(Clone)]
enum Exchange {
    InProgress(Vec<u8>),
    Done(Vec<u8>, Arc<Vec<u8>>),
}

type ExchangeKey = (SocketAddr, u16);

/// An enrollment answer being sent in Block2 pieces, kept for the follow-up requests (which
/// carry no payload, so the answer cannot be made again from them). `GET /ca` keeps nothing:
/// its pieces are cut from the issuer's certificate each time.
struct Representation {
    code: u8,
    content_format: u16,
    body: Arc<Vec<u8>>,
}

/// Request payloads arriving in Block1 pieces.
struct Assembly {
    bytes: Vec<u8>,
    block_size: usize,
}

/// How long a Block1 body waits for its next piece.
const ASSEMBLY_LIFETIME: Duration = Duration::from_secs(60);

struct Job {
    request: Packet,
    request_len: usize,
    peer: SocketAddr,
    body: Vec<u8>,
    block1: Option<BlockValue>,
}

/// The CoAP front end.
pub struct CoapFrontEnd {
    socket: Arc<UdpSocket>,
    service: Arc<CaService>,
    config: CoapConfig,
    /// Recently seen exchanges, by (peer, Message ID), bounded per source address and in
    /// total, expiring in arrival order.
    dedup: Mutex<PerSource<ExchangeKey, Exchange>>,
    blocks: Mutex<PerSource<SocketAddr, Representation>>,
    assemblies: Mutex<PerSource<(SocketAddr, Vec<u8>), Assembly>>,
    next_mid: AtomicU16,
    rate: Arc<SourceRate>,
    /// Counters.
    pub stats: Arc<CoapStats>,
}

impl std::fmt::Debug for CoapFrontEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoapFrontEnd")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

fn code(class: u8, detail: u8) -> u8 {
    (class << 5) | detail
}

const CHANGED: u8 = 0x44; // 2.04
const CONTENT: u8 = 0x45; // 2.05
const CONTINUE: u8 = 0x5F; // 2.31

/// Serves CoAP on `socket` until `shutdown` turns true.
pub async fn serve(
    socket: UdpSocket,
    service: Arc<CaService>,
    config: CoapConfig,
    stats: Arc<CoapStats>,
    rate: Arc<SourceRate>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (tx, rx) = mpsc::channel::<Job>(config.queue.max(1));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let front = Arc::new(CoapFrontEnd {
        socket: Arc::new(socket),
        service,
        dedup: Mutex::new(PerSource::new(
            config.max_remembered_per_source,
            config.max_remembered,
        )),
        blocks: Mutex::new(PerSource::new(
            config.max_representations_per_source,
            config.max_representations,
        )),
        assemblies: Mutex::new(PerSource::new(
            config.max_assemblies_per_source,
            config.max_assemblies,
        )),
        next_mid: AtomicU16::new(std::process::id() as u16),
        rate,
        stats,
        config,
    });
    let mut workers = Vec::new();
    for _ in 0..front.config.workers.max(1) {
        let (front, rx) = (front.clone(), rx.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let job = { rx.lock().await.recv().await };
                let Some(job) = job else { return };
                front.enroll(job).await;
            }
        }));
    }
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    let mut last_sweep = Instant::now();
    loop {
        let (n, peer) = tokio::select! {
            r = front.socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive failed");
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        front.stats.received.fetch_add(1, Ordering::Relaxed);
        front.datagram(&buf[..n], peer, &tx);
        if last_sweep.elapsed() > Duration::from_secs(1) {
            last_sweep = Instant::now();
            front.sweep(last_sweep);
        }
    }
    drop(tx);
    for w in workers {
        w.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave them inconsistent in a way that
    // matters more than stopping to serve; keep going with the data as it is.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl CoapFrontEnd {
    fn sweep(&self, now: Instant) {
        let mut dedup = lock(&self.dedup);
        dedup.expire(now, self.config.exchange_lifetime);
        self.stats
            .exchanges_held
            .store(dedup.len() as u64, Ordering::Relaxed);
        drop(dedup);
        let life = self.config.exchange_lifetime;
        let mut blocks = lock(&self.blocks);
        blocks.expire(now, life);
        self.stats
            .block2_held
            .store(blocks.len() as u64, Ordering::Relaxed);
        drop(blocks);
        let mut assemblies = lock(&self.assemblies);
        assemblies.expire(now, ASSEMBLY_LIFETIME);
        self.stats
            .block1_held
            .store(assemblies.len() as u64, Ordering::Relaxed);
    }

    fn send(&self, bytes: &[u8], peer: SocketAddr) {
        // Non-blocking: if the socket buffer is full the datagram is lost, as any datagram may
        // be, and the peer retransmits.
        let _ = self.socket.try_send_to(bytes, peer);
    }

    fn reset(&self, mid: u16, peer: SocketAddr) {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Reset);
        p.header.code = MessageClass::Empty;
        p.header.message_id = mid;
        if let Ok(b) = p.to_bytes() {
            self.stats.resets.fetch_add(1, Ordering::Relaxed);
            self.send(&b, peer);
        }
    }

    /// Handles one datagram on the receive task.
    fn datagram(&self, data: &[u8], peer: SocketAddr, jobs: &mpsc::Sender<Job>) {
        // RFC 7252 section 3: "Messages with unknown version numbers MUST be silently ignored."
        if data.len() < 4 || data[0] >> 6 != 1 {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let con = (data[0] >> 4) & 0x3 == 0;
        let mid = u16::from_be_bytes([data[2], data[3]]);
        if data.len() > MAX_DATAGRAM {
            // Too large to be ours. A confirmable request gets 4.13 with the limit in Size1.
            if con && data[1] >> 5 == 0 && data[1] != 0 {
                let mut p = Packet::new();
                p.header.set_version(1);
                p.header.set_type(MessageType::Acknowledgement);
                p.header.message_id = mid;
                let tkl = usize::from(data[0] & 0x0f).min(8);
                p.set_token(data.get(4..4 + tkl).unwrap_or_default().to_vec());
                p.header.code = MessageClass::from(code(4, 13));
                p.add_option(CoapOption::Size1, uint_option(MAX_ENROLL_REQUEST as u32));
                if let Ok(b) = p.to_bytes() {
                    self.send(&b, peer);
                }
            }
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let packet = match Packet::from_bytes(data) {
            Ok(p) => p,
            Err(e) => {
                // Section 4.2: a confirmable message that cannot be processed is rejected with
                // a Reset; section 4.3: a non-confirmable one is silently ignored.
                tracing::debug!(%peer, error = %e, "malformed CoAP message");
                self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                if con {
                    self.reset(mid, peer);
                }
                return;
            }
        };
        let mtype = packet.header.get_type();
        let request = match packet.header.code {
            MessageClass::Request(r) => r,
            MessageClass::Empty => {
                // A confirmable empty message is a ping: answered with Reset (section 4.3).
                if mtype == MessageType::Confirmable {
                    self.reset(mid, peer);
                }
                return;
            }
            _ => {
                // Responses and reserved classes are not for a server; reject a confirmable one.
                if mtype == MessageType::Confirmable {
                    self.reset(mid, peer);
                }
                return;
            }
        };
        if !matches!(
            mtype,
            MessageType::Confirmable | MessageType::NonConfirmable
        ) {
            return;
        }
        if !packet.payload.is_empty()
            && data.get(data.len() - packet.payload.len() - 1) != Some(&0xff)
        {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Duplicate detection (section 4.5).
        let key = (peer, mid);
        {
            let mut d = lock(&self.dedup);
            let token = packet.get_token();
            match d.get(&key) {
                Some(Exchange::Done(t, bytes)) if t.as_slice() == token => {
                    // RFC 7252 section 11.3 holds for every datagram sent, a repeated answer
                    // too: a true retransmission is as large as the request that built the
                    // answer (which was cut to three times its size); a smaller datagram that
                    // names the same exchange would turn the cache into a reflector.
                    if bytes.len() > data.len() * AMPLIFICATION_FACTOR {
                        drop(d);
                        self.stats
                            .amplification_refused
                            .fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    let bytes = bytes.clone();
                    drop(d);
                    self.stats
                        .duplicates_answered
                        .fetch_add(1, Ordering::Relaxed);
                    self.send(&bytes, peer);
                    return;
                }
                Some(Exchange::InProgress(t)) if t.as_slice() == token => {
                    self.stats
                        .duplicates_in_progress
                        .fetch_add(1, Ordering::Relaxed);
                    return;
                }
                _ => {
                    // A new exchange (or a reused Message ID with another token): remembered
                    // as the newest, within the caps per source and in total, the oldest out
                    // first (a retransmission of a forgotten exchange is processed again,
                    // which for enrollment returns the stored answer).
                    let evicted =
                        d.insert(key, Exchange::InProgress(token.to_vec()), Instant::now());
                    self.stats
                        .exchanges_evicted
                        .fetch_add(evicted as u64, Ordering::Relaxed);
                    self.stats
                        .exchanges_held
                        .store(d.len() as u64, Ordering::Relaxed);
                }
            }
        }
        let len = data.len();
        // The source's rate (SPEC.md section 11.6), counted for each new exchange: 4.29 with
        // Max-Age, remembered like any answer so that its retransmissions are not counted.
        if self.rate.check(peer.ip(), Instant::now()).is_err() {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let p = Problem::new(
                ProblemType::RateLimited,
                "too many requests from this address; retry later",
            );
            self.finish_problem(&packet, len, peer, code(4, 29), &p);
            return;
        }
        if let Some(bad) = packet
            .options()
            .map(|(n, _)| *n)
            .find(|n| n % 2 == 1 && !UNDERSTOOD_CRITICAL.contains(n))
        {
            let p = Problem::malformed(format!("critical option {bad} is not understood"));
            self.finish_problem(&packet, len, peer, code(4, 2), &p);
            return;
        }
        let path = uri_path(&packet);
        match (path.as_str(), request) {
            (PATH_CA, RequestType::Get) => {
                let body = Arc::new(self.service.issuer().profile().ca_der().to_vec());
                self.finish(&packet, len, peer, CONTENT, Some(CF_PKIX_CERT), body, None);
            }
            (PATH_ENROLL, RequestType::Post) => self.enroll_request(packet, len, peer, jobs),
            (PATH_CA | PATH_ENROLL, _) => {
                let p = Problem::malformed(format!("method not allowed on /{path}"));
                self.finish_problem(&packet, len, peer, code(4, 5), &p);
            }
            _ => {
                let p = Problem::malformed(format!("no resource /{path}"));
                self.finish_problem(&packet, len, peer, code(4, 4), &p);
            }
        }
    }

    fn enroll_request(
        &self,
        packet: Packet,
        len: usize,
        peer: SocketAddr,
        jobs: &mpsc::Sender<Job>,
    ) {
        let uint = |o: CoapOption| {
            packet
                .get_first_option(o)
                .and_then(|v| parse_uint_option(v))
        };
        if let Some(cf) = uint(CoapOption::ContentFormat)
            && cf != u32::from(CF_CBOR)
        {
            let p = Problem::malformed(format!(
                "content format {cf} is not {CF_CBOR} (application/cbor)"
            ));
            return self.finish_problem(&packet, len, peer, code(4, 15), &p);
        }
        if let Some(accept) = uint(CoapOption::Accept)
            && accept != u32::from(CF_CBOR)
        {
            let p = Problem::malformed(format!("only content format {CF_CBOR} can be returned"));
            return self.finish_problem(&packet, len, peer, code(4, 6), &p);
        }
        // A follow-up request for the next Block2 piece of a response already made.
        if let Some(b2) = block_option(&packet, CoapOption::Block2)
            && b2.num > 0
        {
            let repr = {
                let mut blocks = lock(&self.blocks);
                blocks.touch(&peer, Instant::now());
                blocks
                    .get(&peer)
                    .map(|r| (r.code, r.content_format, r.body.clone()))
            };
            match repr {
                Some((c, cf, body)) => {
                    return self.finish(&packet, len, peer, c, Some(cf), body, None);
                }
                None if packet.payload.is_empty() => {
                    let p = Problem::malformed("no response to continue; send the request again");
                    return self.finish_problem(&packet, len, peer, code(4, 8), &p);
                }
                None => {}
            }
        }
        let mut block1 = None;
        let body = match block_option(&packet, CoapOption::Block1) {
            None => packet.payload.clone(),
            Some(b1) => match self.assemble(&packet, peer, &b1) {
                Err((c, p)) => return self.finish_problem(&packet, len, peer, c, &p),
                Ok(None) => {
                    // More to come: 2.31 Continue, echoing Block1 (RFC 7959 section 2.3).
                    let echo = BlockValue {
                        num: b1.num,
                        more: true,
                        size_exponent: b1.size_exponent,
                    };
                    return self.finish(
                        &packet,
                        len,
                        peer,
                        CONTINUE,
                        None,
                        Arc::new(Vec::new()),
                        Some(echo),
                    );
                }
                Ok(Some(whole)) => {
                    block1 = Some(b1);
                    whole
                }
            },
        };
        if body.len() > MAX_ENROLL_REQUEST {
            let p = Problem::new(
                ProblemType::TooLarge,
                format!(
                    "request is {} bytes; the limit is {MAX_ENROLL_REQUEST}",
                    body.len()
                ),
            );
            return self.finish_problem(&packet, len, peer, code(4, 13), &p);
        }
        let key = (peer, packet.header.message_id);
        let job = Job {
            request: packet,
            request_len: len,
            peer,
            body,
            block1,
        };
        if jobs.try_send(job).is_err() {
            // Busy: forget the exchange so that the retransmission is processed.
            lock(&self.dedup).remove(&key);
            self.stats.dropped_busy.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Adds a Block1 piece; `Some(payload)` when the last piece arrived.
    fn assemble(
        &self,
        packet: &Packet,
        peer: SocketAddr,
        b1: &BlockValue,
    ) -> Result<Option<Vec<u8>>, (u8, Problem)> {
        // RFC 7959 section 2.3 / RFC 9175 section 3: the pieces of one body share the endpoint
        // and the Request-Tag (the token may change from piece to piece).
        let tag = packet
            .get_first_option(CoapOption::Unknown(REQUEST_TAG))
            .cloned()
            .unwrap_or_default();
        let key = (peer, tag);
        if let Some(total) = packet
            .get_first_option(CoapOption::Size1)
            .and_then(|v| parse_uint_option(v))
            && total as usize > MAX_ENROLL_REQUEST
        {
            let p = Problem::new(
                ProblemType::TooLarge,
                format!("request of {total} bytes exceeds {MAX_ENROLL_REQUEST}"),
            );
            return Err((code(4, 13), p));
        }
        let mut all = lock(&self.assemblies);
        let result = self.add_piece(&mut all, key, packet, b1);
        self.stats
            .block1_held
            .store(all.len() as u64, Ordering::Relaxed);
        result
    }

    /// [`assemble`](Self::assemble) on the locked assemblies.
    fn add_piece(
        &self,
        all: &mut PerSource<(SocketAddr, Vec<u8>), Assembly>,
        key: (SocketAddr, Vec<u8>),
        packet: &Packet,
        b1: &BlockValue,
    ) -> Result<Option<Vec<u8>>, (u8, Problem)> {
        let size = b1.size();
        let now = Instant::now();
        if b1.num == 0 {
            // Bounded per source and in total, oldest first out (DESIGN.md section 7; hardening
            // finding 3): a peer's many first pieces push out its own oldest bodies, not
            // another source's.
            let evicted = all.insert(
                key.clone(),
                Assembly {
                    bytes: Vec::new(),
                    block_size: size,
                },
                now,
            );
            self.stats
                .block1_evicted
                .fetch_add(evicted as u64, Ordering::Relaxed);
        }
        let Some(a) = all.get_mut(&key) else {
            let p = Problem::malformed("Block1 piece without its first piece");
            return Err((code(4, 8), p));
        };
        let offset = usize::from(b1.num) * size;
        if size != a.block_size
            || offset != a.bytes.len()
            || (b1.more && packet.payload.len() != size)
        {
            all.remove(&key);
            return Err((
                code(4, 8),
                Problem::malformed("Block1 pieces out of order or of the wrong size"),
            ));
        }
        a.bytes.extend_from_slice(&packet.payload);
        let too_large = a.bytes.len() > MAX_ENROLL_REQUEST;
        all.touch(&key, now);
        if too_large {
            all.remove(&key);
            let p = Problem::new(
                ProblemType::TooLarge,
                format!("request exceeds {MAX_ENROLL_REQUEST} bytes"),
            );
            return Err((code(4, 13), p));
        }
        if b1.more {
            return Ok(None);
        }
        Ok(all.remove(&key).map(|a| a.bytes))
    }

    async fn enroll(&self, job: Job) {
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        let (c, cf, body) = match self
            .service
            .enroll(
                &job.body,
                RequestEncoding::Cbor,
                crate::metrics::Transport::Coap,
            )
            .await
        {
            Ok(enrolled) => match self.service.response(&enrolled) {
                Ok(msg) => (CHANGED, CF_CBOR, msg.to_cbor()),
                Err(p) => problem_parts(&p),
            },
            Err(p) => problem_parts(&p),
        };
        let block1 = job.block1.map(|b| BlockValue {
            num: b.num,
            more: false,
            size_exponent: b.size_exponent,
        });
        self.finish(
            &job.request,
            job.request_len,
            job.peer,
            c,
            Some(cf),
            Arc::new(body),
            block1,
        );
    }

    fn finish_problem(&self, req: &Packet, len: usize, peer: SocketAddr, c: u8, p: &Problem) {
        self.finish(
            req,
            len,
            peer,
            c,
            Some(CF_PROBLEM),
            Arc::new(p.to_cbor()),
            None,
        );
    }

    /// Builds the response (Block2 when the body does not fit the block size or the
    /// amplification limit), remembers it for duplicates, and sends it.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        req: &Packet,
        req_len: usize,
        peer: SocketAddr,
        c: u8,
        content_format: Option<u16>,
        body: Arc<Vec<u8>>,
        block1: Option<BlockValue>,
    ) {
        let mut bytes = self.encode(req, req_len, peer, c, content_format, &body, block1);
        if bytes.len() > req_len * AMPLIFICATION_FACTOR {
            // Not even the smallest block fits three times this request: the code alone.
            self.stats
                .amplification_refused
                .fetch_add(1, Ordering::Relaxed);
            bytes = self.bare(req, c);
        }
        let key = (peer, req.header.message_id);
        let bytes = Arc::new(bytes);
        if let Some(e) = lock(&self.dedup).get_mut(&key) {
            *e = Exchange::Done(req.get_token().to_vec(), bytes.clone());
        }
        self.send(&bytes, peer);
    }

    /// An answer's header to `req`: piggybacked on the ACK of a confirmable request, else a
    /// non-confirmable message with a new Message ID; the request's token.
    fn reply_to(&self, req: &Packet) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        if req.header.get_type() == MessageType::Confirmable {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = req.header.message_id;
        } else {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = self.next_mid.fetch_add(1, Ordering::Relaxed);
        }
        p.set_token(req.get_token().to_vec());
        p
    }

    /// The answer to `req` with its response code alone (no option, no payload): never larger
    /// than the request (same token). A success code becomes 4.00, since there is no room for
    /// what succeeded.
    fn bare(&self, req: &Packet, c: u8) -> Vec<u8> {
        let mut p = self.reply_to(req);
        let c = if c >> 5 == 2 { code(4, 0) } else { c };
        p.header.code = MessageClass::from(c);
        p.to_bytes().unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn encode(
        &self,
        req: &Packet,
        req_len: usize,
        peer: SocketAddr,
        c: u8,
        content_format: Option<u16>,
        body: &Arc<Vec<u8>>,
        block1: Option<BlockValue>,
    ) -> Vec<u8> {
        let mut p = self.reply_to(req);
        p.header.code = MessageClass::from(c);
        if let Some(cf) = content_format {
            p.add_option(CoapOption::ContentFormat, uint_option(u32::from(cf)));
        }
        // RFC 7252 section 5.9.3.4 and RFC 8516 section 3: Max-Age says when to retry a 5.03
        // or a 4.29.
        let retry = match c {
            x if x == code(5, 3) => Some(crate::https::UNAVAILABLE_RETRY_SECS),
            x if x == code(4, 29) => Some(crate::https::RATE_LIMITED_RETRY_SECS),
            _ => None,
        };
        if let Some(secs) = retry {
            p.add_option(CoapOption::MaxAge, uint_option(secs));
        }
        if let Some(b1) = block1 {
            p.add_option_as(CoapOption::Block1, b1);
        }
        // RFC 7252 section 11.3: at most three times the request to an unauthenticated peer.
        let limit = (req_len * AMPLIFICATION_FACTOR).min(MAX_RESPONSE_DATAGRAM);
        let base = p.to_bytes().map(|b| b.len()).unwrap_or(16);
        let asked = block_option(req, CoapOption::Block2);
        let preferred = asked
            .as_ref()
            .map(|b| b.size())
            .unwrap_or(DEFAULT_BLOCK)
            .min(DEFAULT_BLOCK);
        // The byte offset the client asks for, in its own block size (RFC 7959 section 2.4).
        let offset = asked
            .as_ref()
            .map(|b| usize::from(b.num) * b.size())
            .unwrap_or(0);
        if offset == 0 && body.len() <= preferred && base + 1 + body.len() <= limit {
            p.payload = body.to_vec();
        } else {
            // Room for the Block2 option (up to 4 bytes), ETag (9) and Size2 (3); when a small
            // request leaves no room for a 16-byte block with them, the piece goes without
            // ETag and Size2 (both elective, RFC 7959 section 2.4) rather than beyond three
            // times the request.
            let fixed = base + 1 + 4;
            let (room, tags) = match limit.checked_sub(fixed + 9 + 3) {
                Some(r) if r >= 16 => (r, true),
                _ => (limit.saturating_sub(fixed), false),
            };
            let mut size = 16;
            while size * 2 <= room.min(preferred) {
                size *= 2;
            }
            // A smaller block than asked for is allowed; NUM then counts in the smaller size.
            let num = offset / size;
            let start = num * size;
            if start >= body.len() && !(start == 0 && body.is_empty()) {
                p.header.code = MessageClass::from(code(4, 2));
                p.clear_all_options();
                p.add_option(
                    CoapOption::ContentFormat,
                    uint_option(u32::from(CF_PROBLEM)),
                );
                p.payload = Problem::malformed("Block2 number beyond the end").to_cbor();
                return p.to_bytes_with_limit(MAX_DATAGRAM).unwrap_or_default();
            }
            let end = (start + size).min(body.len());
            let more = end < body.len();
            if let Ok(b2) = BlockValue::new(num, more, size) {
                p.add_option_as(CoapOption::Block2, b2);
            }
            if tags {
                let etag = ring::digest::digest(&ring::digest::SHA256, body);
                p.add_option(CoapOption::ETag, etag.as_ref()[..8].to_vec());
                if num == 0 {
                    p.add_option(CoapOption::Size2, uint_option(body.len() as u32));
                }
            }
            p.payload = body[start..end].to_vec();
            let bytes = p.to_bytes_with_limit(MAX_DATAGRAM).unwrap_or_default();
            // An enrollment answer is kept for the next pieces only while pieces remain and
            // this one is sent (an answer cut down to its code leaves nothing to continue),
            // bounded per source and in total, oldest out first (hardening finding 4).
            if uri_path(req) == PATH_ENROLL {
                let mut blocks = lock(&self.blocks);
                if more && bytes.len() <= limit {
                    let evicted = blocks.insert(
                        peer,
                        Representation {
                            code: c,
                            content_format: content_format.unwrap_or(0),
                            body: body.clone(),
                        },
                        Instant::now(),
                    );
                    self.stats
                        .block2_evicted
                        .fetch_add(evicted as u64, Ordering::Relaxed);
                } else if !more {
                    blocks.remove(&peer);
                }
                self.stats
                    .block2_held
                    .store(blocks.len() as u64, Ordering::Relaxed);
            }
            return bytes;
        }
        p.to_bytes_with_limit(MAX_DATAGRAM).unwrap_or_default()
    }
}

fn problem_parts(p: &Problem) -> (u8, u16, Vec<u8>) {
    if p.kind == ProblemType::Internal {
        tracing::warn!("enrollment failed with an internal error");
    }
    let (class, detail) = p.kind.coap_code();
    (code(class, detail), CF_PROBLEM, p.to_cbor())
}

fn uri_path(p: &Packet) -> String {
    p.get_option(CoapOption::UriPath)
        .map(|segs| {
            segs.iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
                .join("/")
        })
        .unwrap_or_default()
}

fn block_option(p: &Packet, which: CoapOption) -> Option<BlockValue> {
    p.get_first_option_as::<BlockValue>(which)
        .and_then(Result::ok)
}
