//! Fuzzes the SMTP command, reply, line and end-of-data parsing that the
//! agent runs on untrusted bytes (`tarpit::smtp::fuzz::exercise`).
//!
//! Run: `cargo +nightly fuzz run smtp -- -max_total_time=60`
//! (from /work/main/fuzz; needs `cargo install cargo-fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tarpit::smtp::fuzz::exercise(data);
});
