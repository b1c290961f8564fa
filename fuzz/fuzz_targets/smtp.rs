//! Fuzzes what the agent runs on untrusted bytes
//! (`tarpit::smtp::fuzz::exercise`): the client's stream through the real
//! `ClientReader`, checking that what would be forwarded holds no bare CR,
//! LF or NUL and frames the same commands and ends of data under a lenient
//! reader as under the agent's strict one, however the input is split; and
//! the MTA's replies through the reply parser and EHLO rewriting.
//!
//! Run: `cargo +nightly fuzz run smtp -- -max_total_time=60`
//! (from /work/main/fuzz; needs `cargo install cargo-fuzz`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tarpit::smtp::fuzz::exercise(data);
});
