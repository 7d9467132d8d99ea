//! The listeners, one module per door (DESIGN.md section 9). Moving in steps: the CoAP door is
//! here; HTTPS enrollment, the mutual-TLS secrets door and the admin door are still
//! `crate::https`, `crate::mtls` and `crate::admin`.

pub mod coap;
