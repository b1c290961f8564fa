//! tarpit: an eBPF/XDP-assisted SMTP tarpit.
//!
//! The library holds everything the `tarpit` binary does, so that tests and
//! benchmarks can drive the same code. Its top-level modules form layers,
//! lowest first; a module uses modules of its own or lower layers, never
//! of a higher one, and no chain of uses leads back to where it started:
//!
//! 1. `config` (the TOML file, validated at load, DNS list syntax
//!    included), `smtp` (parsing and canonical forwarding, no I/O: the
//!    session and the backend read into its buffers), `safe_fs` (files root
//!    writes), `kernel_version`, `heap` (the allocator's arenas and trim), `tls`, `shutdown` (the drain token the
//!    agent hands down to the server and every session);
//! 2. `kernel` (the only module that touches aya: loading, attaching, the
//!    pinned maps), `logging`, `policy` (pure tarpit decisions),
//!    `reputation` (DNSBL/DNSWL, FCrDNS, greylisting), `backend` (the
//!    MTA), `state` (the run-time allow and block file), `metrics`;
//! 3. `closed_loop` (the agent's link to the kernel: offenders, the
//!    pre-greet verdict, the allow-list sync), `cluster` (blocks and
//!    greylist shared with other MX hosts through Redis);
//! 4. `session` (one client), then `server` (listeners and limits), then
//!    `ops` (reload, shutdown, privileges, metrics endpoint);
//! 5. `run` (the agent) and `cli` (the command line).
//!
//! `tests/layering.rs` keeps this true: it fails on any import cycle
//! between these modules (`use` or inline `crate::` path alike) and on aya
//! outside `kernel`.
pub mod backend;
pub mod cli;
pub mod closed_loop;
pub mod cluster;
pub mod config;
pub mod heap;
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
