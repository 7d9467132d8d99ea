//! CoAP binding constants (SPEC.md section 8), shared by the CA and the agent.

/// `application/cbor` (RFC 7049 / 8949).
pub const CF_CBOR: u16 = 60;
/// `application/concise-problem-details+cbor` (RFC 9290).
pub const CF_PROBLEM: u16 = 257;
/// `application/pkix-cert` (RFC 7252 registry, from RFC 9148).
pub const CF_PKIX_CERT: u16 = 287;
/// The enrollment resource.
pub const PATH_ENROLL: &str = "enroll";
/// The CA certificate resource.
pub const PATH_CA: &str = "ca";
/// Default block size when nothing smaller is asked for or needed (RFC 7959 SZX 6).
pub const DEFAULT_BLOCK: usize = 1024;
/// A response datagram to an unauthenticated peer is at most this many times the request
/// datagram (RFC 7252 section 11.3).
pub const AMPLIFICATION_FACTOR: usize = 3;
/// Largest datagram the CA reads; anything longer is refused as too large.
pub const MAX_DATAGRAM: usize = 4096 + 512;

/// RFC 7252 section 4.8 transmission parameters.
#[derive(Debug, Clone, Copy)]
pub struct TransmissionParams {
    /// ACK_TIMEOUT, milliseconds.
    pub ack_timeout_ms: u64,
    /// ACK_RANDOM_FACTOR, as a fraction (1.5).
    pub ack_random_factor: f64,
    /// MAX_RETRANSMIT.
    pub max_retransmit: u32,
}

impl Default for TransmissionParams {
    fn default() -> Self {
        TransmissionParams {
            ack_timeout_ms: 2000,
            ack_random_factor: 1.5,
            max_retransmit: 4,
        }
    }
}

impl TransmissionParams {
    /// EXCHANGE_LIFETIME (section 4.8.2), milliseconds: MAX_TRANSMIT_SPAN + 2 * MAX_LATENCY
    /// (100 s) + PROCESSING_DELAY (ACK_TIMEOUT).
    pub fn exchange_lifetime_ms(&self) -> u64 {
        let span = (self.ack_timeout_ms as f64
            * (2f64.powi(self.max_retransmit as i32) - 1.0)
            * self.ack_random_factor) as u64;
        span + 200_000 + self.ack_timeout_ms
    }
}

/// A CoAP uint option value: big-endian without leading zero bytes (RFC 7252 section 3.2).
pub fn uint_option(v: u32) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count();
    b[skip..].to_vec()
}

/// Decodes a uint option value (at most 4 bytes).
pub fn parse_uint_option(v: &[u8]) -> Option<u32> {
    if v.len() > 4 {
        return None;
    }
    Some(v.iter().fold(0u32, |a, b| (a << 8) | u32::from(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_give_the_rfc_exchange_lifetime() {
        // RFC 7252 4.8.2: EXCHANGE_LIFETIME is 247 seconds with the default parameters.
        assert_eq!(
            TransmissionParams::default().exchange_lifetime_ms() / 1000,
            247
        );
        assert_eq!(uint_option(0), Vec::<u8>::new());
        assert_eq!(uint_option(287), vec![1, 31]);
        assert_eq!(parse_uint_option(&[1, 31]), Some(287));
    }
}
