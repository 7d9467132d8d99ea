#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imprint_fuzz::protocol::enroll_request_cbor(data));
