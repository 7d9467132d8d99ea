//! The Imprint CA server, split by trust boundary:
//!
//! - front ends ([`https`], [`doors`]; the CoAP door a sans-IO endpoint plus its socket loop):
//!   decode, limit, map errors; nothing else;
//! - registration authority ([`ra`]): decides, and alone can make a `VerifiedEnrollment`;
//! - issuer ([`issuer`]): the only holder of the CA key;
//! - store ([`store`]): a trait, with sled as the embedded default, written through group commit
//!   ([`commit`]) so that every answer waits for its data to be on disk.
#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod audit;
pub mod blocking;
pub mod cli;
pub mod commit;
pub mod config;
pub mod doors;
pub mod dukpt;
pub mod https;
pub mod issuer;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod mtls;
pub mod operators;
pub mod ra;
pub mod records;
pub mod revocation;
pub mod secrets;
pub mod server;
pub mod service;
pub mod setup;
pub mod store;
pub mod tls;

/// The CoAP door, by its old path (the admin door reads its counters from here).
pub use doors::coap;
