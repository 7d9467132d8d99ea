//! Imprint's wire protocol, sans I/O: messages and their CBOR/JSON codecs, the factory-attestation
//! token, CSR checks, the deterministic certificate profile, and the stateless half of enrollment
//! checking. No sockets, no clock (time comes in as `now`), no storage.
//!
//! `SPEC.md` beside this crate is the normative description; the vectors in `vectors/` pin it.
#![forbid(unsafe_code)]

pub mod cbor;
pub mod coap;
pub mod csr;
pub mod dukpt;
pub mod enroll;
pub mod keys;
pub mod messages;
pub mod problem;
pub mod profile;
pub mod secret;
pub mod spki;
pub mod token;

pub use keys::{KeyAlgorithm, KeyPair, PublicKey};
pub use problem::{Problem, ProblemType};

/// A device serial number: a positive integer that is also the certificate serial
/// (RFC 5280 section 4.1.2.2: positive, at most 20 octets; u64 needs at most 9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceSerial(u64);

impl DeviceSerial {
    /// A serial; zero is not a valid certificate serial.
    pub fn new(v: u64) -> Option<Self> {
        (v != 0).then_some(DeviceSerial(v))
    }

    /// The numeric value.
    pub fn get(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for DeviceSerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::str::FromStr for DeviceSerial {
    type Err = &'static str;

    /// Canonical decimal only: digits, no sign, no leading zero, 1 to 18446744073709551615.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err("serial must be decimal digits");
        }
        if s.starts_with('0') {
            return Err("serial must not be zero or have leading zeros");
        }
        let v: u64 = s
            .parse()
            .map_err(|_| "serial exceeds 18446744073709551615")?;
        DeviceSerial::new(v).ok_or("serial must not be zero")
    }
}

/// Seconds since the Unix epoch: how time enters this crate.
pub type UnixTime = u64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_parsing_is_canonical() {
        assert_eq!("42".parse::<DeviceSerial>().unwrap().get(), 42);
        for bad in ["", "0", "042", "+1", "-1", "1a", "18446744073709551616"] {
            assert!(bad.parse::<DeviceSerial>().is_err(), "{bad}");
        }
    }
}
