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
pub mod record;
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

/// The serialNumber of a device certificate (SPEC.md section 5): the device serial, and the
/// reset generation of its binding, so that a serial enrolled again after a reset gets a
/// certificate serial of its own (RFC 5280 section 4.1.2.2: "unique for each certificate
/// issued by a given CA").
///
/// The INTEGER is `generation * 2^64 + serial`: generation 0 (a serial never reset) is the
/// device serial itself, as before generations existed; generation g >= 1 puts g in the octets
/// above the eight of the serial (at most 12 octets, with a leading 00 when g's top bit is set:
/// within RFC 5280's 20).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CertSerial {
    /// The device serial: the subject's serialNumber and CN.
    pub device: DeviceSerial,
    /// How many times an operator reset the serial before this binding was enrolled.
    pub generation: u32,
}

impl CertSerial {
    /// The certificate serial of `device`'s binding of `generation`.
    pub fn new(device: DeviceSerial, generation: u32) -> Self {
        CertSerial { device, generation }
    }

    /// The INTEGER's value, big-endian, without leading zero octets (DER adds one 00 where the
    /// top bit is set).
    pub fn magnitude(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(12);
        if self.generation != 0 {
            v.extend_from_slice(&self.generation.to_be_bytes());
        }
        v.extend_from_slice(&self.device.get().to_be_bytes());
        let zeros = v.iter().take_while(|b| **b == 0).count();
        v.split_off(zeros)
    }

    /// Reads the contents octets of a certificate's serialNumber INTEGER (as x509-parser's
    /// `raw_serial` gives them). `None` for a negative or zero value, or one no device
    /// certificate of this profile carries (more than 12 octets of value).
    pub fn from_integer_octets(raw: &[u8]) -> Option<Self> {
        if raw.first().is_none_or(|b| b & 0x80 != 0) {
            return None;
        }
        let value: Vec<u8> = raw.iter().copied().skip_while(|b| *b == 0).collect();
        if value.len() > 12 {
            return None;
        }
        let mut padded = [0u8; 12];
        padded[12 - value.len()..].copy_from_slice(&value);
        let (high, low) = padded.split_at(4);
        let generation = u32::from_be_bytes(high.try_into().ok()?);
        let device = DeviceSerial::new(u64::from_be_bytes(low.try_into().ok()?))?;
        Some(CertSerial { device, generation })
    }
}

impl From<DeviceSerial> for CertSerial {
    /// Generation 0: a serial never reset.
    fn from(device: DeviceSerial) -> Self {
        CertSerial {
            device,
            generation: 0,
        }
    }
}

impl std::fmt::Display for CertSerial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.generation == 0 {
            write!(f, "{}", self.device)
        } else {
            write!(f, "{} (generation {})", self.device, self.generation)
        }
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

    #[test]
    fn certificate_serials_carry_the_generation_above_the_device_serial() {
        let s = |v| DeviceSerial::new(v).unwrap();
        // Generation 0 is the device serial, as before generations existed.
        assert_eq!(CertSerial::from(s(21)).magnitude(), [21]);
        assert_eq!(
            CertSerial::new(s(21), 1).magnitude(),
            [1, 0, 0, 0, 0, 0, 0, 0, 21]
        );
        let top = CertSerial::new(s(u64::MAX), u32::MAX);
        assert_eq!(top.magnitude().len(), 12);
        for c in [CertSerial::from(s(1)), CertSerial::new(s(21), 1), top] {
            // DER contents octets: a leading 00 where the value's top bit is set.
            let m = c.magnitude();
            let mut der = if m[0] & 0x80 != 0 { vec![0] } else { vec![] };
            der.extend_from_slice(&m);
            assert_eq!(CertSerial::from_integer_octets(&der), Some(c), "{c}");
        }
        assert_eq!(CertSerial::from_integer_octets(&[0x80]), None, "negative");
        assert_eq!(CertSerial::from_integer_octets(&[0]), None, "zero");
        assert_eq!(CertSerial::from_integer_octets(&[1; 13]), None, "too long");
        assert_eq!(
            CertSerial::from_integer_octets(&[1, 0, 0, 0, 0, 0, 0, 0, 0]),
            None,
            "serial 0 of generation 1"
        );
    }
}
