//! The listeners, one module per door (DESIGN.md section 9): enrollment over HTTPS
//! ([`enroll_https`]) and over CoAP ([`coap`]: a sans-IO endpoint and a small socket loop), the
//! mutual-TLS secrets door ([`secrets`]) and the admin door ([`admin`]). The three TLS doors share
//! their HTTP serving ([`http`]: connection slots, rates, time limits, problem responses); no
//! door imports another.

pub mod admin;
pub mod coap;
pub mod enroll_https;
pub mod http;
pub mod secrets;

/// Seconds a client is told to wait when the store is unavailable (Retry-After, and CoAP's
/// Max-Age on 5.03).
pub(crate) const UNAVAILABLE_RETRY_SECS: u32 = 2;
/// Seconds a client is told to wait when it is rate-limited (a bucket that refills at one or
/// more requests per second has one again within a second).
pub(crate) const RATE_LIMITED_RETRY_SECS: u32 = 1;
