//! tarpit: an eBPF/XDP-assisted SMTP tarpit.
//!
//! The library holds everything the `tarpit` binary does, so that tests and
//! benchmarks can drive the same code: `config` (the TOML file, validated
//! at load), `kernel` (the only module that touches aya).
pub mod cli;
pub mod config;
pub mod kernel;
pub mod kernel_version;
pub mod logging;
pub mod reputation;
pub mod run;
