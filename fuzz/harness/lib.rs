//! The bodies of the fuzz targets, one function per decoder, each taking the fuzzer's bytes.
//! They call the crates' public entry points only, the very functions the doors and the agent
//! call, and check what must hold whatever the input (no panic; a decoded value encodes back
//! to itself; no forged certificate is accepted; the CoAP endpoint never answers more than three
//! times a datagram and forgets everything in time).
//!
//! `protocol` needs protocol-spec and device-agent only, `server` needs ca-server (feature
//! `server`). ca-server/tests/fuzz_corpus.rs compiles both files on the stable toolchain and
//! replays every committed seed and regression through them.
#![forbid(unsafe_code)]

pub mod protocol;
#[cfg(feature = "server")]
pub mod server;
