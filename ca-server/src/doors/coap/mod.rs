//! The CoAP door (RFC 7252 over UDP, coap-lite for the message format; SPEC.md section 8):
//! `POST /enroll` (CBOR), `GET /ca`; confirmable and non-confirmable requests; piggybacked
//! responses; duplicate detection; Block2 and Block1 (RFC 7959); the amplification limit
//! (RFC 7252 section 11.3).
//!
//! Split as quinn-proto splits QUIC: [`Endpoint`] is the protocol, with no socket and no clock
//! (datagrams and `now` in, datagrams and enrollment jobs out), so that every limit is tested
//! with a virtual clock and fuzzed without a socket; [`serve`] is the small tokio loop around
//! it, with the pool of workers that run the enrollment jobs through the service.

mod endpoint;
mod socket;

use std::sync::atomic::AtomicU64;
use std::time::Duration;

pub use endpoint::{
    ASSEMBLY_LIFETIME, Endpoint, EnrollJob, JobId, MAX_RESPONSE_DATAGRAM, Transmit,
};
pub use socket::serve;

/// Limits and timing of the CoAP door.
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
