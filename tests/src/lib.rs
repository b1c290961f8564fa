//! The end-to-end test harness.
//!
//! Every test gets its own world: two network namespaces joined by a veth
//! pair (198.51.100.0/24 and fd5b:1e00::/64), its own pin directory, its own
//! cgroup, its own Postfix and rbldnsd inside its namespaces. Everything is
//! torn down by `Drop`, also when the test panics, and by id, so tests run
//! in parallel without seeing each other.
//!
//! Processes enter namespaces with `nsenter --net=` rather than
//! `ip netns exec`, which would remount /sys and hide bpffs and cgroups.
pub mod agent;
pub mod dnsmasq;
pub mod dovecot;
pub mod env;
pub mod exim;
pub mod hooks;
pub mod netns;
pub mod pins;
pub mod postfix;
pub mod rbldnsd;
pub mod recording_mta;
pub mod redis;
pub mod smtp_client;
pub mod swaks;
pub mod tempdir;
pub mod tls_cert;
pub mod wait;

pub use agent::Agent;
pub use env::{require_root, tarpit_bin, unique_id};
pub use netns::{CLIENT_V4, CLIENT_V6, SERVER_V4, SERVER_V6, ServiceNet, TestNet, server_for};
pub use pins::{PinDir, TestCgroup};
pub use postfix::Postfix;
pub use rbldnsd::Rbldnsd;
pub use tempdir::TempDir;
