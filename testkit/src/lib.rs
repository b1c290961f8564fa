//! What the end-to-end tests (crate `tarpit-tests`) and the benchmark
//! (`cargo xtask bench`) share: a server and a client network namespace
//! joined by a veth pair in 198.51.100.0/24 and fd5b:1e00::/64 only, the
//! Postfix test instance of tests/peers, and ids that carry the pid of the
//! process that made a thing, so that leftovers of a dead process can be
//! told from things still in use.
//!
//! Each side keeps its own names (tests: `tps-`/`tpc-` namespaces, bench:
//! `tpb-`): the suite's leak check and the bench's stale sweep go by them.
pub mod id;
pub mod netns;
pub mod postfix;
pub mod run;
pub mod xdp_pass;

pub use id::{owner_alive, unique_id};
pub use netns::{CLIENT_V4, CLIENT_V6, NetPair, SERVER_V4, SERVER_V6, is_test_address};
pub use run::{feed, run};
