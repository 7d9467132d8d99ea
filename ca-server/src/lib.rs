//! The Imprint CA server, split by trust boundary:
//!
//! - the doors ([`doors`]: enrollment over HTTPS and CoAP, the mutual-TLS secrets door, the admin
//!   door, and the HTTP serving the TLS doors share): decode, limit, map errors; nothing else;
//! - operator actions' messages and views ([`ops`]), shared by the admin door and the command
//!   line;
//! - registration authority ([`ra`]): decides, and alone can make a `VerifiedEnrollment`;
//! - issuer ([`issuer`]): the only holder of the CA key;
//! - store ([`store`]): a trait, with sled as the embedded default, written through group commit
//!   ([`commit`]) so that every answer waits for its data to be on disk.
#![forbid(unsafe_code)]

pub mod admin_client;
pub mod audit;
pub mod blocking;
pub mod cli;
pub mod commit;
pub mod config;
pub mod doors;
pub mod dukpt;
pub mod issuer;
pub mod limits;
pub mod lines;
pub mod metrics;
pub mod operators;
pub mod ops;
pub mod ra;
pub mod records;
pub mod revocation;
pub mod secrets;
pub mod server;
pub mod service;
pub mod setup;
pub mod store;
pub mod tls;
