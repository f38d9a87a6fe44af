//! cargo-fuzz target `frame_decoder`: see `fuzz/harness/` for what it checks.
#![no_main]

#[path = "../harness/mod.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::frame_decoder(data));
