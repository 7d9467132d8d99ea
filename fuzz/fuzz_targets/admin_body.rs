#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| imprint_fuzz::server::admin_body(data));
