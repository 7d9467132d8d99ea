#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imprint_fuzz::server::coap_datagram(data));
