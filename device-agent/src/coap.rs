//! The CoAP transport. The protocol part is sans I/O and driven by `now`: an [`Exchange`] is
//! one confirmable message with RFC 7252 section 4.8 retransmission, and a [`BlockwiseRequest`]
//! strings exchanges together for Block1 requests and Block2 responses (RFC 7959). The
//! [`CoapClient`] at the bottom is the thin UDP edge.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use coap_lite::block_handler::BlockValue;
use coap_lite::{CoapOption, MessageClass, MessageType, Packet, RequestType};
use protocol_spec::Problem;
use protocol_spec::coap::{
    CF_CBOR, CF_PKIX_CERT, PATH_CA, PATH_ENROLL, TransmissionParams, parse_uint_option, uint_option,
};
use protocol_spec::messages::EnrollResponse;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::UdpSocket;

use crate::AgentError;
use crate::url::CaUrl;

/// Request-Tag (RFC 9175): ties the Block1 pieces of one body together.
const REQUEST_TAG: u16 = 292;

/// What an exchange produced.
#[derive(Debug)]
pub enum ExchangeEvent {
    /// The response.
    Response(Packet),
    /// The server reset the exchange.
    Reset,
}

/// One confirmable request and its retransmissions (RFC 7252 section 4.2 and 4.8).
#[derive(Debug)]
pub struct Exchange {
    bytes: Vec<u8>,
    mid: u16,
    token: Vec<u8>,
    params: TransmissionParams,
    timeout: Duration,
    next: Option<Instant>,
    retransmits: u32,
    acked: bool,
    sent_once: bool,
    deadline: Instant,
}

impl Exchange {
    /// A new exchange for `packet` (its message ID and token must be set). `jitter` in [0, 1)
    /// places the first timeout between ACK_TIMEOUT and ACK_TIMEOUT * ACK_RANDOM_FACTOR.
    pub fn new(
        packet: &Packet,
        now: Instant,
        params: TransmissionParams,
        jitter: f64,
    ) -> Result<Self, AgentError> {
        let bytes = packet
            .to_bytes_with_limit(protocol_spec::coap::MAX_DATAGRAM)
            .map_err(|e| AgentError::Invalid(format!("CoAP message: {e}")))?;
        let factor = 1.0 + jitter.clamp(0.0, 1.0) * (params.ack_random_factor - 1.0);
        let timeout = Duration::from_millis(params.ack_timeout_ms).mul_f64(factor);
        // MAX_TRANSMIT_WAIT: the last retransmission plus its timeout.
        let wait = timeout.mul_f64(2f64.powi(params.max_retransmit as i32 + 1) - 1.0);
        Ok(Exchange {
            bytes,
            mid: packet.header.message_id,
            token: packet.get_token().to_vec(),
            params,
            timeout,
            next: None,
            retransmits: 0,
            acked: false,
            sent_once: false,
            deadline: now + wait,
        })
    }

    /// The datagram to send now, if any: the first transmission, or a retransmission whose
    /// timeout passed (the timeout doubles each time, section 4.2).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<&[u8]> {
        if self.acked {
            return None;
        }
        if !self.sent_once {
            self.sent_once = true;
            self.next = Some(now + self.timeout);
            return Some(&self.bytes);
        }
        match self.next {
            Some(t) if now >= t && self.retransmits < self.params.max_retransmit => {
                self.retransmits += 1;
                self.timeout *= 2;
                self.next = Some(now + self.timeout);
                Some(&self.bytes)
            }
            _ => None,
        }
    }

    /// When to call again: the next retransmission, or the point of giving up.
    pub fn poll_timeout(&self) -> Instant {
        match self.next {
            Some(t) if !self.acked && self.retransmits < self.params.max_retransmit => t,
            _ => self.deadline,
        }
    }

    /// True once the exchange has failed for good (no answer within MAX_TRANSMIT_WAIT).
    pub fn is_expired(&self, now: Instant) -> bool {
        now >= self.deadline
    }

    /// Retransmissions so far.
    pub fn retransmits(&self) -> u32 {
        self.retransmits
    }

    /// Feeds a received datagram. Returns the event it completes, if any, and a datagram to
    /// send back (the ACK of a separate confirmable response).
    pub fn handle(&mut self, datagram: &[u8]) -> (Option<ExchangeEvent>, Option<Vec<u8>>) {
        let Ok(p) = Packet::from_bytes(datagram) else {
            return (None, None);
        };
        let mtype = p.header.get_type();
        match mtype {
            MessageType::Reset if p.header.message_id == self.mid => {
                (Some(ExchangeEvent::Reset), None)
            }
            MessageType::Acknowledgement if p.header.message_id == self.mid => {
                if p.header.code == MessageClass::Empty {
                    // Section 5.2.2: the response will come separately.
                    self.acked = true;
                    (None, None)
                } else if p.get_token() == self.token.as_slice() {
                    self.acked = true;
                    (Some(ExchangeEvent::Response(p)), None)
                } else {
                    // Section 5.3.2: a response whose token does not match is not ours (a stale
                    // answer to an earlier exchange with the same Message ID); keep retrying.
                    (None, None)
                }
            }
            MessageType::Confirmable | MessageType::NonConfirmable
                if p.get_token() == self.token.as_slice()
                    && matches!(p.header.code, MessageClass::Response(_)) =>
            {
                self.acked = true;
                let ack = (mtype == MessageType::Confirmable).then(|| {
                    let mut a = Packet::new();
                    a.header.set_version(1);
                    a.header.set_type(MessageType::Acknowledgement);
                    a.header.code = MessageClass::Empty;
                    a.header.message_id = p.header.message_id;
                    a.to_bytes().unwrap_or_default()
                });
                (Some(ExchangeEvent::Response(p)), ack)
            }
            _ => (None, None),
        }
    }
}

/// A request, possibly sent in Block1 pieces, whose response may come in Block2 pieces.
#[derive(Debug)]
pub struct BlockwiseRequest {
    method: RequestType,
    path: String,
    content_format: Option<u16>,
    accept: Option<u16>,
    payload: Vec<u8>,
    block1_size: usize,
    request_tag: Vec<u8>,
    /// Next Block1 piece to send (when the payload is split).
    block1_num: usize,
    /// Block2 pieces received so far.
    body: Vec<u8>,
    etag: Option<Vec<u8>>,
}

/// What the next step of a blockwise request is.
#[derive(Debug)]
pub enum BlockStep {
    /// Send this request packet next (message ID and token still to be set).
    Send(Packet),
    /// The complete response: code, content format, body.
    Done(u8, Option<u16>, Vec<u8>),
}

impl BlockwiseRequest {
    /// A request; payloads larger than `block1_size` go in Block1 pieces of that size.
    pub fn new(
        method: RequestType,
        path: &str,
        content_format: Option<u16>,
        accept: Option<u16>,
        payload: Vec<u8>,
        block1_size: usize,
        request_tag: Vec<u8>,
    ) -> Self {
        BlockwiseRequest {
            method,
            path: path.to_string(),
            content_format,
            accept,
            payload,
            block1_size: block1_size.clamp(16, 1024).next_power_of_two(),
            request_tag,
            block1_num: 0,
            body: Vec::new(),
            etag: None,
        }
    }

    fn base(&self) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(self.method);
        for seg in self.path.split('/').filter(|s| !s.is_empty()) {
            p.add_option(CoapOption::UriPath, seg.as_bytes().to_vec());
        }
        if let Some(a) = self.accept {
            p.add_option(CoapOption::Accept, uint_option(u32::from(a)));
        }
        p
    }

    fn blockwise(&self) -> bool {
        self.payload.len() > self.block1_size
    }

    /// The first packet to send.
    pub fn first(&mut self) -> Packet {
        self.block1_packet()
    }

    fn block1_packet(&self) -> Packet {
        let mut p = self.base();
        if let Some(cf) = self.content_format {
            p.add_option(CoapOption::ContentFormat, uint_option(u32::from(cf)));
        }
        if !self.blockwise() {
            p.payload = self.payload.clone();
            return p;
        }
        let start = self.block1_num * self.block1_size;
        let end = (start + self.block1_size).min(self.payload.len());
        let more = end < self.payload.len();
        if let Ok(b1) = BlockValue::new(self.block1_num, more, self.block1_size) {
            p.add_option_as(CoapOption::Block1, b1);
        }
        p.add_option(CoapOption::Size1, uint_option(self.payload.len() as u32));
        p.add_option(CoapOption::Unknown(REQUEST_TAG), self.request_tag.clone());
        p.payload = self.payload[start..end].to_vec();
        p
    }

    /// Takes a response and says what to do next.
    pub fn on_response(&mut self, r: &Packet) -> Result<BlockStep, AgentError> {
        let code = u8::from(r.header.code);
        let cf = r
            .get_first_option(CoapOption::ContentFormat)
            .and_then(|v| parse_uint_option(v))
            .and_then(|v| u16::try_from(v).ok());
        if code == 0x5F {
            // 2.31 Continue: send the next Block1 piece.
            if !self.blockwise() {
                return Err(AgentError::Verify(
                    "2.31 Continue to a request that was not split".into(),
                ));
            }
            self.block1_num += 1;
            if self.block1_num * self.block1_size >= self.payload.len() {
                return Err(AgentError::Verify(
                    "2.31 Continue after the last piece".into(),
                ));
            }
            return Ok(BlockStep::Send(self.block1_packet()));
        }
        let block2 = r
            .get_first_option_as::<BlockValue>(CoapOption::Block2)
            .and_then(Result::ok);
        let Some(b2) = block2 else {
            if !self.body.is_empty() {
                return Err(AgentError::Verify(
                    "Block2 sequence ended without Block2".into(),
                ));
            }
            return Ok(BlockStep::Done(code, cf, r.payload.clone()));
        };
        let etag = r.get_first_option(CoapOption::ETag).cloned();
        if self.body.is_empty() {
            self.etag = etag;
        } else if etag != self.etag {
            return Err(AgentError::Transport(
                "the representation changed between Block2 pieces".into(),
            ));
        }
        let offset = usize::from(b2.num) * b2.size();
        if offset != self.body.len() {
            return Err(AgentError::Verify(format!(
                "Block2 piece at offset {offset}, expected {}",
                self.body.len()
            )));
        }
        self.body.extend_from_slice(&r.payload);
        if self.body.len() > 64 * 1024 {
            return Err(AgentError::Verify("response larger than 64 KiB".into()));
        }
        if !b2.more {
            return Ok(BlockStep::Done(code, cf, std::mem::take(&mut self.body)));
        }
        let mut next = self.base();
        let num = self.body.len() / b2.size();
        if let Ok(v) = BlockValue::new(num, false, b2.size()) {
            next.add_option_as(CoapOption::Block2, v);
        }
        Ok(BlockStep::Send(next))
    }
}

/// A CoAP client for one CA.
#[derive(Debug, Clone)]
pub struct CoapClient {
    url: CaUrl,
    params: TransmissionParams,
    source: Option<IpAddr>,
    block1_size: usize,
}

/// A UDP socket connected to the CA, reusable across requests (one per simulated device
/// worker, or one per device).
#[derive(Debug)]
pub struct CoapSocket {
    socket: UdpSocket,
    next_mid: u16,
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    let _ = SystemRandom::new().fill(&mut b);
    b
}

impl CoapClient {
    /// A client for `url` (coap://) with the default transmission parameters.
    pub fn new(url: CaUrl) -> Self {
        CoapClient {
            url,
            params: TransmissionParams::default(),
            source: None,
            block1_size: 1024,
        }
    }

    /// Changes the transmission parameters (RFC 7252 section 4.8.1 allows it).
    pub fn with_params(mut self, params: TransmissionParams) -> Self {
        self.params = params;
        self
    }

    /// Sends from this source address.
    pub fn with_source(mut self, source: IpAddr) -> Self {
        self.source = Some(source);
        self
    }

    /// Splits request payloads larger than `size` into Block1 pieces.
    pub fn with_block1_size(mut self, size: usize) -> Self {
        self.block1_size = size;
        self
    }

    /// Opens a socket to the CA.
    pub async fn socket(&self) -> Result<CoapSocket, AgentError> {
        let t = |e: std::io::Error| AgentError::Transport(format!("{}: {e}", self.url.authority()));
        let target: SocketAddr = tokio::net::lookup_host(self.url.authority())
            .await
            .map_err(t)?
            .find(|a| self.source.is_none_or(|s| s.is_ipv4() == a.is_ipv4()))
            .ok_or_else(|| {
                AgentError::Transport(format!("{}: no address", self.url.authority()))
            })?;
        let local = match (self.source, target) {
            (Some(ip), _) => SocketAddr::new(ip, 0),
            (None, SocketAddr::V4(_)) => SocketAddr::from(([0, 0, 0, 0], 0)),
            (None, SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
        };
        let socket = UdpSocket::bind(local).await.map_err(t)?;
        socket.connect(target).await.map_err(t)?;
        Ok(CoapSocket {
            socket,
            next_mid: u16::from_be_bytes(random_bytes::<2>()),
        })
    }

    /// One request, Block1 and Block2 handled, on `sock`: (code, content format, body).
    pub async fn request(
        &self,
        sock: &mut CoapSocket,
        mut req: BlockwiseRequest,
    ) -> Result<(u8, Option<u16>, Vec<u8>), AgentError> {
        let mut packet = req.first();
        let mut buf = vec![0u8; 2048];
        loop {
            sock.next_mid = sock.next_mid.wrapping_add(1);
            packet.header.message_id = sock.next_mid;
            packet.set_token(random_bytes::<8>().to_vec());
            let jitter =
                f64::from(u32::from_le_bytes(random_bytes::<4>())) / (f64::from(u32::MAX) + 1.0);
            let mut ex = Exchange::new(&packet, Instant::now(), self.params, jitter)?;
            let response = loop {
                let now = Instant::now();
                if let Some(bytes) = ex.poll_transmit(now) {
                    // A send error is treated like a lost datagram; retransmission covers it.
                    let _ = sock.socket.send(bytes).await;
                }
                if ex.is_expired(now) {
                    return Err(AgentError::Transport(format!(
                        "{}: no response after {} retransmissions",
                        self.url.authority(),
                        ex.retransmits()
                    )));
                }
                let wait = ex.poll_timeout().saturating_duration_since(now);
                match tokio::time::timeout(wait, sock.socket.recv(&mut buf)).await {
                    Err(_) => continue,
                    Ok(Err(_)) => continue, // ICMP port unreachable and the like: keep trying
                    Ok(Ok(n)) => {
                        let (event, reply) = ex.handle(&buf[..n]);
                        if let Some(r) = reply {
                            let _ = sock.socket.send(&r).await;
                        }
                        match event {
                            Some(ExchangeEvent::Response(p)) => break p,
                            Some(ExchangeEvent::Reset) => {
                                return Err(AgentError::Verify("the CA reset the exchange".into()));
                            }
                            None => {}
                        }
                    }
                }
            };
            match req.on_response(&response)? {
                BlockStep::Send(next) => packet = next,
                BlockStep::Done(code, cf, body) => return Ok((code, cf, body)),
            }
        }
    }

    /// `POST /enroll` with a CBOR EnrollRequest.
    pub async fn enroll(
        &self,
        sock: &mut CoapSocket,
        request_cbor: Vec<u8>,
    ) -> Result<EnrollResponse, AgentError> {
        let req = BlockwiseRequest::new(
            RequestType::Post,
            PATH_ENROLL,
            Some(CF_CBOR),
            Some(CF_CBOR),
            request_cbor,
            self.block1_size,
            random_bytes::<4>().to_vec(),
        );
        let (code, _cf, body) = self.request(sock, req).await?;
        if code >> 5 == 2 {
            return EnrollResponse::from_cbor(&body)
                .map_err(|p| AgentError::Verify(format!("response: {}", p.detail)));
        }
        Err(problem_of(code, &body))
    }

    /// One enrollment attempt on a new socket (what a retry loop calls).
    pub async fn enroll_once(&self, request_cbor: Vec<u8>) -> Result<EnrollResponse, AgentError> {
        let mut sock = self.socket().await?;
        self.enroll(&mut sock, request_cbor).await
    }

    /// `GET /ca`: the CA certificate, DER.
    pub async fn ca_certificate(&self, sock: &mut CoapSocket) -> Result<Vec<u8>, AgentError> {
        let req = BlockwiseRequest::new(
            RequestType::Get,
            PATH_CA,
            None,
            Some(CF_PKIX_CERT),
            Vec::new(),
            1024,
            Vec::new(),
        );
        let (code, _, body) = self.request(sock, req).await?;
        if code == 0x45 {
            Ok(body)
        } else {
            Err(problem_of(code, &body))
        }
    }
}

/// The problem in an error response.
pub fn problem_of(code: u8, body: &[u8]) -> AgentError {
    match Problem::from_cbor(body) {
        Some(p) => AgentError::Refused(p),
        None if code >> 5 == 5 => {
            AgentError::Transport(format!("CoAP {}.{:02}", code >> 5, code & 0x1f))
        }
        None => AgentError::Verify(format!(
            "CoAP {}.{:02} without problem details",
            code >> 5,
            code & 0x1f
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> TransmissionParams {
        TransmissionParams {
            ack_timeout_ms: 2000,
            ack_random_factor: 1.5,
            max_retransmit: 4,
        }
    }

    fn con(mid: u16) -> Packet {
        let mut p = Packet::new();
        p.header.set_version(1);
        p.header.set_type(MessageType::Confirmable);
        p.header.code = MessageClass::Request(RequestType::Post);
        p.header.message_id = mid;
        p.set_token(vec![1, 2, 3, 4]);
        p
    }

    #[test]
    fn retransmits_with_doubling_timeouts_then_gives_up() {
        let t0 = Instant::now();
        let mut ex = Exchange::new(&con(7), t0, params(), 0.0).unwrap();
        assert!(ex.poll_transmit(t0).is_some());
        assert!(ex.poll_transmit(t0 + Duration::from_millis(1999)).is_none());
        // Retransmissions at 2, 6, 14, 30 s (timeouts 2, 4, 8, 16).
        let mut at = Vec::new();
        let mut now = t0;
        while !ex.is_expired(now) {
            now = ex.poll_timeout();
            if ex.poll_transmit(now).is_some() {
                at.push((now - t0).as_secs());
            }
        }
        assert_eq!(at, vec![2, 6, 14, 30]);
        // MAX_TRANSMIT_WAIT = ACK_TIMEOUT * (2^(MAX_RETRANSMIT+1) - 1) = 62 s.
        assert_eq!((now - t0).as_secs(), 62);
    }

    #[test]
    fn a_piggybacked_ack_completes_and_stops_retransmission() {
        let t0 = Instant::now();
        let mut ex = Exchange::new(&con(9), t0, params(), 0.5).unwrap();
        ex.poll_transmit(t0);
        let mut ack = Packet::new();
        ack.header.set_version(1);
        ack.header.set_type(MessageType::Acknowledgement);
        ack.header.message_id = 9;
        ack.header.code = MessageClass::from(0x44);
        ack.set_token(vec![1, 2, 3, 4]);
        let (ev, reply) = ex.handle(&ack.to_bytes().unwrap());
        assert!(matches!(ev, Some(ExchangeEvent::Response(_))) && reply.is_none());
        assert!(ex.poll_transmit(t0 + Duration::from_secs(10)).is_none());
        // An ACK with our Message ID but another token is a stale answer: not ours, and the
        // exchange keeps retransmitting.
        let mut ex3 = Exchange::new(&con(9), t0, params(), 0.0).unwrap();
        ex3.poll_transmit(t0);
        let mut stale = ack.clone();
        stale.set_token(vec![9, 9, 9, 9]);
        assert!(ex3.handle(&stale.to_bytes().unwrap()).0.is_none());
        assert!(ex3.poll_transmit(t0 + Duration::from_secs(2)).is_some());
        // An ACK for another message ID is not ours.
        let mut ex2 = Exchange::new(&con(10), t0, params(), 0.5).unwrap();
        ex2.poll_transmit(t0);
        assert!(ex2.handle(&ack.to_bytes().unwrap()).0.is_none());
    }

    #[test]
    fn block1_splits_and_block2_reassembles() {
        let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        let mut req = BlockwiseRequest::new(
            RequestType::Post,
            "enroll",
            Some(60),
            Some(60),
            payload,
            128,
            vec![7],
        );
        let first = req.first();
        let b1 = first
            .get_first_option_as::<BlockValue>(CoapOption::Block1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (b1.num, b1.more, b1.size(), first.payload.len()),
            (0, true, 128, 128)
        );
        let mut cont = Packet::new();
        cont.header.code = MessageClass::from(0x5F);
        let BlockStep::Send(second) = req.on_response(&cont).unwrap() else {
            panic!()
        };
        let BlockStep::Send(third) = req.on_response(&cont).unwrap() else {
            panic!()
        };
        let b1 = third
            .get_first_option_as::<BlockValue>(CoapOption::Block1)
            .unwrap()
            .unwrap();
        assert_eq!(
            (b1.num, b1.more, third.payload.len(), second.payload.len()),
            (2, false, 44, 128)
        );
        // The response arrives in two 64-byte Block2 pieces and a short last one.
        let body: Vec<u8> = (0..150u8).collect();
        for (num, chunk) in body.chunks(64).enumerate() {
            let mut r = Packet::new();
            r.header.code = MessageClass::from(0x44);
            let more = (num + 1) * 64 < body.len();
            r.add_option_as(CoapOption::Block2, BlockValue::new(num, more, 64).unwrap());
            r.payload = chunk.to_vec();
            match req.on_response(&r).unwrap() {
                BlockStep::Send(next) => {
                    let b2 = next
                        .get_first_option_as::<BlockValue>(CoapOption::Block2)
                        .unwrap()
                        .unwrap();
                    assert_eq!(usize::from(b2.num), num + 1);
                    assert!(next.payload.is_empty());
                }
                BlockStep::Done(code, _, got) => {
                    assert_eq!((code, got), (0x44, body.clone()));
                    return;
                }
            }
        }
        panic!("never completed");
    }
}
