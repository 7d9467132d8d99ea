//! The CoAP door's protocol, sans IO: [`Endpoint::handle`] takes one datagram, its source and
//! `now`; what to send comes out of [`Endpoint::poll_transmit`], an enrollment to run comes out
//! as an [`EnrollJob`] whose answer goes back in through [`Endpoint::complete`], and
//! [`Endpoint::poll_timeout`] says when [`Endpoint::handle_timeout`] has state to expire. No
//! socket, no clock, no task: the caller owns all three (`super::socket` in the server, a
//! virtual clock in the tests below, the fuzz targets).
//!
//! Block1 and Block2 are handled here rather than by coap-lite's `BlockHandler`, which was
//! considered: it keeps its state in an `lru_time_cache` that reads the system clock itself
//! (no virtual clock, no `poll_timeout`), bounds neither the number of states in total nor
//! per source address (finding 3 and 4 of the hardening issue), keys a request body by
//! method, path and endpoint instead of endpoint and Request-Tag (RFC 9175 section 3), cuts
//! responses to one fixed message size where RFC 7252 section 11.3 needs a size chosen from
//! each request's own (the 3x rule), sends no ETag or Size2, and panics (`expect`) when a
//! packet fails to encode. What it would save is about 150 lines.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coap_lite::block_handler::BlockValue;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use protocol_spec::coap::{
    AMPLIFICATION_FACTOR, CF_CBOR, CF_PKIX_CERT, CF_PROBLEM, DEFAULT_BLOCK, MAX_DATAGRAM, PATH_CA,
    PATH_ENROLL, parse_uint_option, uint_option,
};
use protocol_spec::messages::MAX_ENROLL_REQUEST;
use protocol_spec::{Problem, ProblemType};

use super::{CoapConfig, CoapStats};
use crate::limits::{PerSource, SourceRate};

/// Largest datagram the server sends (fits the IPv6 minimum MTU with room for headers).
pub const MAX_RESPONSE_DATAGRAM: usize = 1152;
/// How long a Block1 body waits for its next piece.
pub const ASSEMBLY_LIFETIME: Duration = Duration::from_secs(60);
/// Expiry runs at most this often: [`Endpoint::poll_timeout`] asks to be called again no
/// sooner than this after the last expiry, so that a full cache expiring one entry at a time
/// costs a wake-up a second and not one per entry (an entry may outlive its lifetime by this
/// much).
const EXPIRY_GRANULARITY: Duration = Duration::from_secs(1);
/// Critical options this server understands (RFC 7252 section 5.4.1: any other critical option
/// in a request MUST get 4.02 Bad Option).
const UNDERSTOOD_CRITICAL: [u16; 7] = [3, 7, 11, 15, 17, 23, 27];
/// Request-Tag (RFC 9175), elective.
const REQUEST_TAG: u16 = 292;

const CHANGED: u8 = 0x44; // 2.04
const CONTENT: u8 = 0x45; // 2.05
const CONTINUE: u8 = 0x5F; // 2.31

/// One datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to.
    pub destination: SocketAddr,
    /// The datagram.
    pub contents: Bytes,
}

/// Names an enrollment handed out by [`Endpoint::handle`] until its answer comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(u64);

/// An enrollment request, whole (Block1 pieces put together), for the service to decide; its
/// answer goes back through [`Endpoint::complete`] with its `id`.
#[derive(Debug)]
pub struct EnrollJob {
    /// The job's name, for [`Endpoint::complete`] or [`Endpoint::abandon`].
    pub id: JobId,
    /// The request body: a CBOR EnrollRequest, at most `MAX_ENROLL_REQUEST` bytes.
    pub body: Vec<u8>,
}

/// The CoAP door's state: duplicate cache, Block1 bodies in reassembly, Block2 answers being
/// sent, enrollments out with the service, and datagrams waiting to be sent. Each bounded per
/// source address and in total, oldest first out (SPEC.md section 8).
pub struct Endpoint {
    config: CoapConfig,
    ca_der: Arc<Vec<u8>>,
    rate: Arc<SourceRate>,
    stats: Arc<CoapStats>,
    /// Recently seen exchanges, by (peer, Message ID), expiring in arrival order.
    dedup: PerSource<ExchangeKey, Exchange>,
    blocks: PerSource<SocketAddr, Representation>,
    assemblies: PerSource<(SocketAddr, Vec<u8>), Assembly>,
    /// Enrollments handed out and not answered yet, by job (job numbers grow with time, so the
    /// first is the oldest). The caller bounds how many are out (its queue); one not answered
    /// within EXCHANGE_LIFETIME is forgotten.
    jobs: BTreeMap<JobId, Pending>,
    next_job: u64,
    next_mid: u16,
    transmits: VecDeque<Transmit>,
    last_expiry: Option<Instant>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("exchanges", &self.dedup.len())
            .field("assemblies", &self.assemblies.len())
            .field("representations", &self.blocks.len())
            .field("jobs", &self.jobs.len())
            .field("transmits", &self.transmits.len())
            .finish_non_exhaustive()
    }
}

/// A remembered exchange, with the token of its request: a retransmission repeats the token,
/// while a new request that happens to reuse a (peer, Message ID) within the lifetime (a new
/// socket on a recycled port) carries another one and is a new exchange.
enum Exchange {
    InProgress(Vec<u8>),
    Done(Vec<u8>, Bytes),
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

/// What an answer to an enrollment job needs of its request.
struct Pending {
    request: Packet,
    request_len: usize,
    peer: SocketAddr,
    block1: Option<BlockValue>,
    at: Instant,
}

impl Endpoint {
    /// An endpoint with nothing remembered. `ca_der` is the CA certificate `GET /ca` serves;
    /// `rate` is the per-source rate shared with the other device doors; non-confirmable
    /// answers get Message IDs counting from `first_message_id`.
    pub fn new(
        config: CoapConfig,
        ca_der: Vec<u8>,
        rate: Arc<SourceRate>,
        stats: Arc<CoapStats>,
        first_message_id: u16,
    ) -> Self {
        Endpoint {
            dedup: PerSource::new(config.max_remembered_per_source, config.max_remembered),
            blocks: PerSource::new(
                config.max_representations_per_source,
                config.max_representations,
            ),
            assemblies: PerSource::new(config.max_assemblies_per_source, config.max_assemblies),
            config,
            ca_der: Arc::new(ca_der),
            rate,
            stats,
            jobs: BTreeMap::new(),
            next_job: 0,
            next_mid: first_message_id,
            transmits: VecDeque::new(),
            last_expiry: None,
        }
    }

    /// The counters this endpoint keeps.
    pub fn stats(&self) -> &Arc<CoapStats> {
        &self.stats
    }

    /// Takes one datagram from `peer`, received at `now`. Answers are queued for
    /// [`poll_transmit`](Self::poll_transmit); an enrollment request comes back as a job for
    /// the service, whose answer goes to [`complete`](Self::complete).
    pub fn handle(&mut self, now: Instant, peer: SocketAddr, data: &[u8]) -> Option<EnrollJob> {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        // RFC 7252 section 3: "Messages with unknown version numbers MUST be silently ignored."
        if data.len() < 4 || data[0] >> 6 != 1 {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
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
                    self.send(Bytes::from(b), peer);
                }
            }
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
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
                return None;
            }
        };
        let mtype = packet.header.get_type();
        let request = match packet.header.code {
            MessageClass::Request(r) => r,
            // A confirmable empty message is a ping: answered with Reset (section 4.3).
            // Responses and reserved classes are not for a server; a confirmable one is
            // rejected the same way.
            _ => {
                if mtype == MessageType::Confirmable {
                    self.reset(mid, peer);
                }
                return None;
            }
        };
        if !matches!(
            mtype,
            MessageType::Confirmable | MessageType::NonConfirmable
        ) {
            return None;
        }
        if !packet.payload.is_empty()
            && data.get(data.len() - packet.payload.len() - 1) != Some(&0xff)
        {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if !self.new_exchange(now, peer, mid, packet.get_token(), data.len()) {
            return None;
        }
        let len = data.len();
        // The source's rate (SPEC.md section 11.6), counted for each new exchange: 4.29 with
        // Max-Age, remembered like any answer so that its retransmissions are not counted.
        if self.rate.check(peer.ip(), now).is_err() {
            self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
            let p = Problem::new(
                ProblemType::RateLimited,
                "too many requests from this address; retry later",
            );
            self.finish_problem(now, &packet, len, peer, code(4, 29), &p);
            return None;
        }
        if let Some(bad) = packet
            .options()
            .map(|(n, _)| *n)
            .find(|n| n % 2 == 1 && !UNDERSTOOD_CRITICAL.contains(n))
        {
            let p = Problem::malformed(format!("critical option {bad} is not understood"));
            self.finish_problem(now, &packet, len, peer, code(4, 2), &p);
            return None;
        }
        let path = uri_path(&packet);
        match (path.as_str(), request) {
            (PATH_CA, RequestType::Get) => {
                let body = self.ca_der.clone();
                let cf = Some(CF_PKIX_CERT);
                self.finish(now, &packet, len, peer, CONTENT, cf, body, None);
                None
            }
            (PATH_ENROLL, RequestType::Post) => self.enroll_request(now, packet, len, peer),
            (PATH_CA | PATH_ENROLL, _) => {
                let p = Problem::malformed(format!("method not allowed on /{path}"));
                self.finish_problem(now, &packet, len, peer, code(4, 5), &p);
                None
            }
            _ => {
                let p = Problem::malformed(format!("no resource /{path}"));
                self.finish_problem(now, &packet, len, peer, code(4, 4), &p);
                None
            }
        }
    }

    /// The service's answer to the job `id`: the CBOR EnrollResponse, or the problem. Queues
    /// the response (remembered for duplicates, in Block2 pieces if it must be). An unknown or
    /// forgotten job is ignored.
    pub fn complete(&mut self, now: Instant, id: JobId, answer: Result<Vec<u8>, Problem>) {
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let (c, cf, body) = match answer {
            Ok(cbor) => (CHANGED, CF_CBOR, cbor),
            Err(p) => problem_parts(&p),
        };
        let block1 = job.block1.map(|b| BlockValue {
            num: b.num,
            more: false,
            size_exponent: b.size_exponent,
        });
        self.finish(
            now,
            &job.request,
            job.request_len,
            job.peer,
            c,
            Some(cf),
            Arc::new(body),
            block1,
        );
    }

    /// The job `id` could not be run (the workers' queue is full): the exchange is forgotten,
    /// so that the device's retransmission is processed as new.
    pub fn abandon(&mut self, id: JobId) {
        if let Some(job) = self.jobs.remove(&id) {
            self.dedup
                .remove(&(job.peer, job.request.header.message_id));
            self.stats.dropped_busy.fetch_add(1, Ordering::Relaxed);
            self.held();
        }
    }

    /// The next datagram to send, oldest first.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) next has something to expire; `None`
    /// while nothing is held.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let life = self.config.exchange_lifetime;
        let due = [
            self.dedup.oldest_at().map(|t| t + life),
            self.blocks.oldest_at().map(|t| t + life),
            self.assemblies.oldest_at().map(|t| t + ASSEMBLY_LIFETIME),
            self.jobs.values().next().map(|j| j.at + life),
        ]
        .into_iter()
        .flatten()
        .min()?;
        Some(match self.last_expiry {
            Some(last) => due.max(last + EXPIRY_GRANULARITY),
            None => due,
        })
    }

    /// Forgets what has lived its time by `now`: exchanges and Block2 answers after
    /// EXCHANGE_LIFETIME, Block1 bodies after [`ASSEMBLY_LIFETIME`] without a new piece, jobs
    /// not answered within EXCHANGE_LIFETIME.
    pub fn handle_timeout(&mut self, now: Instant) {
        let life = self.config.exchange_lifetime;
        self.dedup.expire(now, life);
        self.blocks.expire(now, life);
        self.assemblies.expire(now, ASSEMBLY_LIFETIME);
        while let Some(entry) = self.jobs.first_entry() {
            if now.saturating_duration_since(entry.get().at) < life {
                break;
            }
            entry.remove();
        }
        self.last_expiry = Some(now);
        self.held();
    }

    /// Remembers the exchange (peer, `mid`) as new, or answers it as a duplicate (section
    /// 4.5); `false` when the datagram is a duplicate and has been dealt with.
    fn new_exchange(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        mid: u16,
        token: &[u8],
        len: usize,
    ) -> bool {
        let key = (peer, mid);
        match self.dedup.get(&key) {
            Some(Exchange::Done(t, bytes)) if t.as_slice() == token => {
                // RFC 7252 section 11.3 holds for every datagram sent, a repeated answer too: a
                // true retransmission is as large as the request that built the answer (which
                // was cut to three times its size); a smaller datagram that names the same
                // exchange would turn the cache into a reflector.
                if bytes.len() > len * AMPLIFICATION_FACTOR {
                    self.stats
                        .amplification_refused
                        .fetch_add(1, Ordering::Relaxed);
                    return false;
                }
                let bytes = bytes.clone();
                self.stats
                    .duplicates_answered
                    .fetch_add(1, Ordering::Relaxed);
                self.send(bytes, peer);
                false
            }
            Some(Exchange::InProgress(t)) if t.as_slice() == token => {
                self.stats
                    .duplicates_in_progress
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
            _ => {
                // A new exchange (or a reused Message ID with another token): remembered as the
                // newest, within the caps per source and in total, the oldest out first (a
                // retransmission of a forgotten exchange is processed again, which for
                // enrollment returns the stored answer).
                let evicted = self
                    .dedup
                    .insert(key, Exchange::InProgress(token.to_vec()), now);
                self.stats
                    .exchanges_evicted
                    .fetch_add(evicted as u64, Ordering::Relaxed);
                self.held();
                true
            }
        }
    }

    fn enroll_request(
        &mut self,
        now: Instant,
        packet: Packet,
        len: usize,
        peer: SocketAddr,
    ) -> Option<EnrollJob> {
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
            self.finish_problem(now, &packet, len, peer, code(4, 15), &p);
            return None;
        }
        if let Some(accept) = uint(CoapOption::Accept)
            && accept != u32::from(CF_CBOR)
        {
            let p = Problem::malformed(format!("only content format {CF_CBOR} can be returned"));
            self.finish_problem(now, &packet, len, peer, code(4, 6), &p);
            return None;
        }
        // A follow-up request for the next Block2 piece of a response already made.
        if let Some(b2) = block_option(&packet, CoapOption::Block2)
            && b2.num > 0
        {
            self.blocks.touch(&peer, now);
            let repr = self
                .blocks
                .get(&peer)
                .map(|r| (r.code, r.content_format, r.body.clone()));
            match repr {
                Some((c, cf, body)) => {
                    self.finish(now, &packet, len, peer, c, Some(cf), body, None);
                    return None;
                }
                None if packet.payload.is_empty() => {
                    let p = Problem::malformed("no response to continue; send the request again");
                    self.finish_problem(now, &packet, len, peer, code(4, 8), &p);
                    return None;
                }
                None => {}
            }
        }
        let mut block1 = None;
        let body = match block_option(&packet, CoapOption::Block1) {
            None => packet.payload.clone(),
            Some(b1) => match self.assemble(now, &packet, peer, &b1) {
                Err((c, p)) => {
                    self.finish_problem(now, &packet, len, peer, c, &p);
                    return None;
                }
                Ok(None) => {
                    // More to come: 2.31 Continue, echoing Block1 (RFC 7959 section 2.3).
                    let echo = BlockValue {
                        num: b1.num,
                        more: true,
                        size_exponent: b1.size_exponent,
                    };
                    let empty = Arc::new(Vec::new());
                    self.finish(now, &packet, len, peer, CONTINUE, None, empty, Some(echo));
                    return None;
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
            self.finish_problem(now, &packet, len, peer, code(4, 13), &p);
            return None;
        }
        let id = JobId(self.next_job);
        self.next_job += 1;
        self.jobs.insert(
            id,
            Pending {
                request: packet,
                request_len: len,
                peer,
                block1,
                at: now,
            },
        );
        Some(EnrollJob { id, body })
    }

    /// Adds a Block1 piece; `Some(payload)` when the last piece arrived.
    fn assemble(
        &mut self,
        now: Instant,
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
        let result = self.add_piece(now, key, packet, b1);
        self.held();
        result
    }

    /// [`assemble`](Self::assemble) once the piece's body is known.
    fn add_piece(
        &mut self,
        now: Instant,
        key: (SocketAddr, Vec<u8>),
        packet: &Packet,
        b1: &BlockValue,
    ) -> Result<Option<Vec<u8>>, (u8, Problem)> {
        let size = b1.size();
        let all = &mut self.assemblies;
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

    #[allow(clippy::too_many_arguments)]
    fn finish_problem(
        &mut self,
        now: Instant,
        req: &Packet,
        len: usize,
        peer: SocketAddr,
        c: u8,
        p: &Problem,
    ) {
        let body = Arc::new(p.to_cbor());
        self.finish(now, req, len, peer, c, Some(CF_PROBLEM), body, None);
    }

    /// Builds the response (Block2 when the body does not fit the block size or the
    /// amplification limit), remembers it for duplicates, and queues it.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &mut self,
        now: Instant,
        req: &Packet,
        req_len: usize,
        peer: SocketAddr,
        c: u8,
        content_format: Option<u16>,
        body: Arc<Vec<u8>>,
        block1: Option<BlockValue>,
    ) {
        let mut bytes = self.encode(now, req, req_len, peer, c, content_format, &body, block1);
        if bytes.len() > req_len * AMPLIFICATION_FACTOR {
            // Not even the smallest block fits three times this request: the code alone.
            self.stats
                .amplification_refused
                .fetch_add(1, Ordering::Relaxed);
            bytes = self.bare(req, c);
        }
        let key = (peer, req.header.message_id);
        let bytes = Bytes::from(bytes);
        if let Some(e) = self.dedup.get_mut(&key) {
            *e = Exchange::Done(req.get_token().to_vec(), bytes.clone());
        }
        self.send(bytes, peer);
    }

    fn send(&mut self, contents: Bytes, destination: SocketAddr) {
        self.transmits.push_back(Transmit {
            destination,
            contents,
        });
    }

    fn reset(&mut self, mid: u16, peer: SocketAddr) {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Reset);
        p.header.code = MessageClass::Empty;
        p.header.message_id = mid;
        if let Ok(b) = p.to_bytes() {
            self.stats.resets.fetch_add(1, Ordering::Relaxed);
            self.send(Bytes::from(b), peer);
        }
    }

    /// The gauges of what is held, after a change.
    fn held(&self) {
        let s = &self.stats;
        s.exchanges_held
            .store(self.dedup.len() as u64, Ordering::Relaxed);
        s.block1_held
            .store(self.assemblies.len() as u64, Ordering::Relaxed);
        s.block2_held
            .store(self.blocks.len() as u64, Ordering::Relaxed);
    }

    /// An answer's header to `req`: piggybacked on the ACK of a confirmable request, else a
    /// non-confirmable message with a new Message ID; the request's token.
    fn reply_to(&mut self, req: &Packet) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        if req.header.get_type() == MessageType::Confirmable {
            p.header.set_type(MessageType::Acknowledgement);
            p.header.message_id = req.header.message_id;
        } else {
            p.header.set_type(MessageType::NonConfirmable);
            p.header.message_id = self.next_mid;
            self.next_mid = self.next_mid.wrapping_add(1);
        }
        p.set_token(req.get_token().to_vec());
        p
    }

    /// The answer to `req` with its response code alone (no option, no payload): never larger
    /// than the request (same token). A success code becomes 4.00, since there is no room for
    /// what succeeded.
    fn bare(&mut self, req: &Packet, c: u8) -> Vec<u8> {
        let mut p = self.reply_to(req);
        let c = if c >> 5 == 2 { code(4, 0) } else { c };
        p.header.code = MessageClass::from(c);
        p.to_bytes().unwrap_or_default()
    }

    #[allow(clippy::too_many_arguments)]
    fn encode(
        &mut self,
        now: Instant,
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
            x if x == code(5, 3) => Some(crate::doors::UNAVAILABLE_RETRY_SECS),
            x if x == code(4, 29) => Some(crate::doors::RATE_LIMITED_RETRY_SECS),
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
            return p.to_bytes_with_limit(MAX_DATAGRAM).unwrap_or_default();
        }
        // Room for the Block2 option (up to 4 bytes), ETag (9) and Size2 (3); when a small
        // request leaves no room for a 16-byte block with them, the piece goes without ETag and
        // Size2 (both elective, RFC 7959 section 2.4) rather than beyond three times the
        // request.
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
        // An enrollment answer is kept for the next pieces only while pieces remain and this
        // one is sent (an answer cut down to its code leaves nothing to continue), bounded per
        // source and in total, oldest out first (hardening finding 4).
        if uri_path(req) == PATH_ENROLL {
            if more && bytes.len() <= limit {
                let evicted = self.blocks.insert(
                    peer,
                    Representation {
                        code: c,
                        content_format: content_format.unwrap_or(0),
                        body: body.clone(),
                    },
                    now,
                );
                self.stats
                    .block2_evicted
                    .fetch_add(evicted as u64, Ordering::Relaxed);
            } else if !more {
                self.blocks.remove(&peer);
            }
            self.held();
        }
        bytes
    }
}

fn code(class: u8, detail: u8) -> u8 {
    (class << 5) | detail
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

#[cfg(test)]
mod tests {
    //! The endpoint alone, on a virtual clock: `now` is a start instant plus what each test
    //! adds; nothing sleeps and no socket is opened.
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    const CA: &[u8] = &[0x30; 700];

    fn peer(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, last], port))
    }

    fn endpoint(config: CoapConfig) -> Endpoint {
        let rate = Arc::new(SourceRate::new(0, 0, 16));
        Endpoint::new(config, CA.to_vec(), rate, Arc::default(), 7)
    }

    fn request(mid: u16, token: &[u8], method: RequestType, path: &str) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(method);
        p.header.message_id = mid;
        p.set_token(token.to_vec());
        p.add_option(CoapOption::UriPath, path.as_bytes().to_vec());
        p
    }

    /// A confirmable `POST /enroll` with `body`, padded by a long token to a size whose three
    /// times holds a small answer.
    fn enroll(mid: u16, body: &[u8]) -> Vec<u8> {
        let mut p = request(mid, &mid.to_be_bytes(), RequestType::Post, "enroll");
        p.add_option(CoapOption::ContentFormat, vec![60]);
        p.payload = body.to_vec();
        p.to_bytes().unwrap()
    }

    fn sent(e: &mut Endpoint) -> Vec<Transmit> {
        std::iter::from_fn(|| e.poll_transmit()).collect()
    }

    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn an_enrollment_is_a_job_once_and_its_retransmission_is_answered_from_the_cache() {
        let t0 = Instant::now();
        let mut e = endpoint(CoapConfig::default());
        let a = peer(1, 5683);
        let req = enroll(1, &[0xa5; 40]);
        let job = e.handle(t0, a, &req).expect("a job");
        assert_eq!(job.body, vec![0xa5; 40]);
        assert!(
            sent(&mut e).is_empty(),
            "nothing before the service answers"
        );
        // A retransmission while the service works is ignored, and is no second job.
        assert!(e.handle(t0 + Duration::from_secs(2), a, &req).is_none());
        assert!(sent(&mut e).is_empty());
        assert_eq!(count(&e.stats().duplicates_in_progress), 1);
        e.complete(t0 + Duration::from_secs(3), job.id, Ok(vec![0xb6; 60]));
        let first = sent(&mut e);
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].destination, a);
        let answer = Packet::from_bytes(&first[0].contents).unwrap();
        assert_eq!(answer.header.code, MessageClass::from(CHANGED));
        assert_eq!(answer.header.message_id, 1);
        assert_eq!(answer.payload, vec![0xb6; 60]);
        // The same request again: the same bytes, from the cache, with no job.
        assert!(e.handle(t0 + Duration::from_secs(5), a, &req).is_none());
        assert_eq!(sent(&mut e), first);
        assert_eq!(count(&e.stats().duplicates_answered), 1);
        assert_eq!(count(&e.stats().processed), 1);
        // The same Message ID from another port is another endpoint's exchange: a new job.
        assert!(e.handle(t0, peer(1, 5684), &req).is_some());
    }

    #[test]
    fn a_cached_answer_goes_to_no_datagram_under_a_third_of_its_size() {
        let t0 = Instant::now();
        let mut e = endpoint(CoapConfig::default());
        let a = peer(1, 5683);
        let req = enroll(9, &[0xa5; 300]);
        let job = e.handle(t0, a, &req).unwrap();
        e.complete(t0, job.id, Ok(vec![0xb6; 800]));
        let first = sent(&mut e);
        assert!(first[0].contents.len() > 400 && first[0].contents.len() <= req.len() * 3);
        // The header of the same exchange alone (Message ID 9, its token): 6 bytes.
        let short = &req[..6];
        assert!(e.handle(t0, a, short).is_none());
        assert!(sent(&mut e).is_empty(), "no reflection");
        assert_eq!(count(&e.stats().amplification_refused), 1);
        // A datagram of exactly a third of the answer still gets it.
        let third = &req[..first[0].contents.len().div_ceil(3)];
        assert!(e.handle(t0, a, third).is_none());
        assert_eq!(sent(&mut e), first);
    }

    #[test]
    fn exchanges_past_the_per_source_cap_evict_that_sources_oldest_first() {
        let t0 = Instant::now();
        let config = CoapConfig {
            max_remembered_per_source: 3,
            max_remembered: 5,
            ..CoapConfig::default()
        };
        let mut e = endpoint(config);
        let (a, b) = (peer(1, 1000), peer(2, 1000));
        let get = |mid: u16| {
            request(mid, &[1, 2, 3, 4, 5, 6, 7, 8], RequestType::Get, "ca")
                .to_bytes()
                .unwrap()
        };
        for mid in 0..4 {
            e.handle(t0 + Duration::from_secs(u64::from(mid)), a, &get(mid));
        }
        assert_eq!(count(&e.stats().exchanges_evicted), 1);
        assert_eq!(count(&e.stats().exchanges_held), 3);
        sent(&mut e);
        // Message ID 0 was forgotten: answered again as new, not from the cache.
        e.handle(t0 + Duration::from_secs(5), a, &get(0));
        assert_eq!(count(&e.stats().duplicates_answered), 0);
        // 3 is remembered: from the cache.
        e.handle(t0 + Duration::from_secs(5), a, &get(3));
        assert_eq!(count(&e.stats().duplicates_answered), 1);
        // Another source fills the total of 5: the oldest of all (a's) go, b's stay.
        for mid in 0..3 {
            e.handle(t0 + Duration::from_secs(6), b, &get(mid));
        }
        assert_eq!(count(&e.stats().exchanges_held), 5);
        e.handle(t0 + Duration::from_secs(7), b, &get(2));
        assert_eq!(count(&e.stats().duplicates_answered), 2);
    }

    #[test]
    fn poll_timeout_names_the_expiry_and_handle_timeout_forgets_what_lived_its_time() {
        let t0 = Instant::now();
        let mut e = endpoint(CoapConfig::default());
        assert_eq!(e.poll_timeout(), None, "nothing held, nothing to wait for");
        let life = CoapConfig::default().exchange_lifetime;
        let a = peer(1, 5683);
        let req = enroll(4, &[0xa5; 40]);
        let job = e.handle(t0, a, &req).unwrap();
        e.complete(t0, job.id, Ok(vec![0xb6; 30]));
        sent(&mut e);
        // A Block1 body waits 60 s for its next piece, the exchange 247 s.
        let mut p = request(5, &[5], RequestType::Post, "enroll");
        p.add_option_as(CoapOption::Block1, BlockValue::new(0, true, 16).unwrap());
        p.payload = vec![1; 16];
        let t1 = t0 + Duration::from_secs(10);
        assert!(e.handle(t1, a, &p.to_bytes().unwrap()).is_none());
        assert_eq!(sent(&mut e)[0].contents[1], CONTINUE);
        // The body is due first, at 70 s, before the exchange at 247 s.
        assert_eq!(e.poll_timeout(), Some(t1 + ASSEMBLY_LIFETIME));
        let mut p = request(6, &[6], RequestType::Post, "enroll");
        p.add_option_as(CoapOption::Block1, BlockValue::new(1, false, 16).unwrap());
        p.payload = vec![2; 3];
        let second_piece = p.to_bytes().unwrap();
        // A job out for the service changes nothing: it is due after the lifetime.
        let t2 = t0 + Duration::from_secs(20);
        e.handle(t2, peer(9, 1), &enroll(1, &[0; 40]));
        assert_eq!(e.poll_timeout(), Some(t1 + ASSEMBLY_LIFETIME));
        e.handle_timeout(t1 + ASSEMBLY_LIFETIME);
        assert_eq!(count(&e.stats().block1_held), 0);
        sent(&mut e);
        assert!(e.handle(t1 + ASSEMBLY_LIFETIME, a, &second_piece).is_none());
        let answer = sent(&mut e);
        assert_eq!(
            answer[0].contents[1],
            code(4, 8),
            "a piece without its first"
        );
        // Expiry runs at most once a second.
        assert_eq!(
            e.poll_timeout(),
            Some(t0 + life),
            "the first exchange is due next"
        );
        e.handle_timeout(t0 + life);
        assert!(e.poll_timeout().unwrap() >= t0 + life + EXPIRY_GRANULARITY);
        // The first exchange is forgotten: its retransmission is a new job.
        assert!(e.handle(t0 + life, a, &req).is_some());
        // Every job left unanswered is forgotten after the lifetime too, and then nothing is
        // held at all.
        e.handle_timeout(t0 + life * 3);
        assert_eq!(e.poll_timeout(), None);
        assert_eq!(count(&e.stats().exchanges_held), 0);
        assert_eq!(e.jobs.len(), 0);
    }

    #[test]
    fn an_answer_in_block2_pieces_is_held_per_source_within_its_cap() {
        let t0 = Instant::now();
        let config = CoapConfig {
            max_representations_per_source: 2,
            max_representations: 3,
            ..CoapConfig::default()
        };
        let mut e = endpoint(config);
        let a = peer(1, 1);
        // A request small enough that a 900-byte answer comes in pieces.
        for (i, port) in [1u16, 2, 3].into_iter().enumerate() {
            let from = peer(1, port);
            let job = e.handle(t0, from, &enroll(i as u16, &[0xa5; 60])).unwrap();
            e.complete(
                t0 + Duration::from_secs(i as u64),
                job.id,
                Ok(vec![0xb6; 900]),
            );
            let t = sent(&mut e);
            let p = Packet::from_bytes(&t[0].contents).unwrap();
            let b2 = block_option(&p, CoapOption::Block2).unwrap();
            assert!(b2.more && b2.num == 0);
        }
        assert_eq!(count(&e.stats().block2_held), 2, "two per source");
        assert_eq!(count(&e.stats().block2_evicted), 1);
        // The first port's answer was evicted: its next piece gets 4.08.
        let next = |mid: u16| {
            let mut p = request(mid, &[1], RequestType::Post, "enroll");
            p.add_option_as(CoapOption::Block2, BlockValue::new(1, false, 64).unwrap());
            p.to_bytes().unwrap()
        };
        assert!(e.handle(t0, a, &next(100)).is_none());
        assert_eq!(sent(&mut e)[0].contents[1], code(4, 8));
        // The third port's answer is still there: its next piece comes.
        assert!(e.handle(t0, peer(1, 3), &next(101)).is_none());
        let t = sent(&mut e);
        let p = Packet::from_bytes(&t[0].contents).unwrap();
        assert_eq!(p.header.code, MessageClass::from(CHANGED));
        assert!(!p.payload.is_empty() && p.payload.iter().all(|b| *b == 0xb6));
    }

    #[test]
    fn an_abandoned_job_leaves_its_exchange_to_be_processed_again() {
        let t0 = Instant::now();
        let mut e = endpoint(CoapConfig::default());
        let a = peer(1, 1);
        let req = enroll(3, &[1; 20]);
        let job = e.handle(t0, a, &req).unwrap();
        e.abandon(job.id);
        assert_eq!(count(&e.stats().dropped_busy), 1);
        // The answer of an abandoned job goes nowhere.
        e.complete(t0, job.id, Ok(vec![1]));
        assert!(sent(&mut e).is_empty());
        let again = e.handle(t0, a, &req).expect("the retransmission is new");
        assert_ne!(again.id, job.id);
    }
}
