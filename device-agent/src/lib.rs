//! The Imprint device agent: the device's side of enrollment (and, later, secrets).
//!
//! The protocol logic is sans-IO ([`enroll`], [`retry`]): state and bytes in, bytes out, `now`
//! passed in. The transports ([`https`]) are thin. [`state`] keeps the device's one file,
//! written atomically, standing in for its write-once memory. [`line_station`] is the factory
//! side: line keys and tokens.
#![forbid(unsafe_code)]

pub mod coap;
pub mod enroll;
pub mod error;
pub mod https;
pub mod line_station;
pub mod record;
pub mod retry;
pub mod secrets;
pub mod state;
pub mod url;

pub use error::AgentError;
