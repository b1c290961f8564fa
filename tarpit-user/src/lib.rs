//! tarpit: an eBPF/XDP-assisted SMTP tarpit.
//!
//! The library holds everything the `tarpit` binary does, so that tests and
//! benchmarks can drive the same code: `config` (the TOML file, validated
//! at load), `kernel` (the only module that touches aya), `smtp` (parsing,
//! no I/O), `policy` (pure tarpit decisions), and the agent's I/O: `session`
//! (one client), `server` (listeners and limits), `backend` (the MTA),
//! `tls`, `metrics`.
pub mod backend;
pub mod cli;
pub mod closed_loop;
pub mod config;
pub mod kernel;
pub mod kernel_version;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod policy;
pub mod reputation;
pub mod run;
pub mod safe_fs;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod smtp;
pub mod state;
pub mod tls;
